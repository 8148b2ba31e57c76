"""Point-in-time training sets from Feast: the as-of join, kept rows, defaults, splits, the online store."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import online_store, training_set
from recsys import as_of_rows, feature_store, point_in_time, training_data
from recsys.config import ConfigError, FeastConfig, load_params
from recsys.contracts import FEATURE_TABLE_KEYS, stats_features
from tests.conftest import revalidated, shipped_params
from tests.feast_fixtures import (
    HANDMADE_EVENTS,
    REPO_ROOT,
    copy_feature_repo,
    day,
    handmade_dataset,
    handmade_training_config,
    training_set_outputs,
)

SHIPPED = shipped_params()
FEATURES = revalidated(SHIPPED.features, history_length=30, stats_windows_days=[7, 30])


def _feast(repo_path) -> FeastConfig:
    return revalidated(SHIPPED.feast, repo_path=repo_path)


@pytest.fixture(scope="module")
def handmade_run(tmp_path_factory):
    """One run of the step on the hand-made case, shared by the tests that read its outputs."""
    tmp_path = tmp_path_factory.mktemp("handmade")
    feast_config = _feast(copy_feature_repo(tmp_path))
    raw_dir, features_dir = handmade_dataset(tmp_path / "data")
    out = training_set_outputs(tmp_path)
    report = training_set.run(
        handmade_training_config(), features_dir, raw_dir, **out, feast=feast_config, features=FEATURES
    )
    frames = {
        f"{name}_{split}": pq.read_table(out["output_dir"] / f"{name}_{split}.parquet").to_pandas()
        for name in training_data.TRAINING_SETS
        for split in training_data.SPLITS
    }
    return report, frames, out, feast_config, features_dir


def _by_event(frames: dict[str, pd.DataFrame], name: str = "ranking") -> pd.DataFrame:
    """All splits of one set, indexed by the event's position in HANDMADE_EVENTS (row_id = time order)."""
    frame = pd.concat([frames[f"{name}_{s}"] for s in training_data.SPLITS], ignore_index=True)
    order = sorted(range(len(HANDMADE_EVENTS)), key=lambda i: HANDMADE_EVENTS[i][2])
    event_of_row = {row_id: event for row_id, event in enumerate(order)}
    return frame.assign(event=frame["row_id"].map(event_of_row)).set_index("event").sort_index()


def test_feature_changed_after_the_event_gives_the_older_value(handmade_run):
    _, frames, *_ = handmade_run
    rows = _by_event(frames)
    assert rows.loc[0, "user_impressions_7d"] == 1  # day-1 snapshot, not the day-3 value 5
    assert rows.loc[0, "item_impressions_7d"] == 11
    assert list(rows.loc[3, "hist_item_ids"]) == [10]  # the row at the event, not the later [10, 11]
    assert list(rows.loc[3, "hist_categories"]) == ["cat_a"]
    assert rows.loc[3, "hist_length"] == 1
    assert list(rows.loc[0, "hist_item_ids"]) == []  # nothing clicked before the first event
    assert rows.loc[4, "user_impressions_7d"] == 4 and list(rows.loc[4, "hist_item_ids"]) == []


def test_rows_beyond_ttl_or_before_any_feature_row_are_kept_with_defaults(handmade_run):
    report, frames, *_ = handmade_run
    rows = _by_event(frames)
    # e1: user 2's stats are 5 days old (TTL 2) -> defaults; its profile and history still joined
    assert rows.loc[1, ["user_impressions_7d", "user_clicks_30d"]].tolist() == [0, 0]
    assert rows.loc[1, "user_ctr_7d"] == 0.0
    assert rows.loc[1, "gender"] == "M" and rows.loc[1, "item_impressions_7d"] == 12
    # e2: before user 3 signed up and without any user row -> every user feature is a default
    assert rows.loc[2, ["gender", "occupation", "zip_prefix"]].tolist() == ["", "", ""]
    assert rows.loc[2, "age_bucket"] == 0 and rows.loc[2, "hist_length"] == 0
    assert list(rows.loc[2, "hist_item_ids"]) == [] and list(rows.loc[2, "hist_categories"]) == []
    assert rows.loc[2, "category"] == "cat_a"  # item features are unaffected
    assert report["defaulted_rows"]["ranking"]["user_stats"] == 3  # e1, e2, e5
    assert report["defaulted_rows"]["ranking"]["user_profile"] == 1  # e2


def test_feast_returns_nulls_where_the_step_writes_defaults(handmade_run):
    """The premise of the defaults: the DuckDB store keeps every row and leaves a stale view null."""
    _, _, out, feast_cfg, _ = handmade_run
    store = feature_store.open_feature_store(feast_cfg)
    assert store.config.offline_store.type == "duckdb"
    entity = training_set.entity_frames(pd.read_parquet(out["output_dir"].parent / "data/raw/events.parquet"))
    ranking = entity["ranking"]
    returned = store.get_historical_features(
        entity_df=ranking, features=store.get_feature_service("ranking")
    ).to_df()
    assert sorted(returned["row_id"]) == sorted(ranking["row_id"])
    stale = returned.set_index("row_id").loc[ranking.loc[ranking["user_id"] == 2, "row_id"].min()]
    assert pd.isna(stale["user_impressions_7d"]) and stale["gender"] == "M"  # e1: stats beyond the TTL


def test_rows_a_store_drops_come_back_with_that_views_defaults_only(handmade_run, tmp_path):
    """The dask file store drops an entity row when one view has no row within its TTL; joined view by
    view and left-joined by row_id, the step's rows are the same as with the DuckDB store."""
    _, frames, out, feast_cfg, features_dir = handmade_run
    repo = copy_feature_repo(tmp_path)
    local = (repo / "feature_store.yaml").read_text()
    assert "type: duckdb" in local
    (repo / "feature_store.file.yaml").write_text(local.replace("type: duckdb", "type: file"))
    file_cfg = revalidated(feast_cfg, repo_path=repo, config_file="feature_store.file.yaml")
    store = feature_store.open_feature_store(file_cfg)
    build = functools.partial(feature_store.feature_repo, file_cfg, FEATURES)
    store.apply(build(features_dir).objects())
    ranking = training_set.entity_frames(
        pd.read_parquet(out["output_dir"].parent / "data/raw/events.parquet")
    )["ranking"]
    whole = store.get_historical_features(entity_df=ranking, features=store.get_feature_service("ranking"))
    assert len(whole.to_df()) < len(ranking)  # the file store drops rows ...
    sources = {n: feature_store.read_feature_table(features_dir, n) for n in FEATURE_TABLE_KEYS}
    frame, stats = point_in_time.historical_features(store, ranking, "ranking", sources, build, 2, 3)
    expected = _by_event(frames).set_index("row_id").sort_index()  # ... the step keeps them all
    assert frame["row_id"].tolist() == expected.index.tolist()
    for column in point_in_time.feature_columns(build(features_dir)):
        left, right = frame[column].tolist(), expected[column].tolist()
        if column.startswith("hist_") and column != "hist_length":
            left, right = [list(v) for v in left], [list(v) for v in right]
        assert left == right, column
    assert stats.defaulted_rows["user_stats"] == 3 and stats.defaulted_rows["user_profile"] == 1


def test_every_entity_row_once_with_contract_columns_and_no_nulls(handmade_run):
    _, frames, out, *_ = handmade_run
    ranking = pd.concat([frames[f"ranking_{s}"] for s in training_data.SPLITS])
    retrieval = pd.concat([frames[f"retrieval_{s}"] for s in training_data.SPLITS])
    assert sorted(ranking["row_id"]) == list(range(len(HANDMADE_EVENTS)))
    assert len(retrieval) == sum(e[3] for e in HANDMADE_EVENTS) and set(retrieval["label"]) == {1}
    assert set(retrieval["row_id"]) <= set(ranking["row_id"])
    schema = pq.read_schema(out["output_dir"] / "ranking_train.parquet")
    expected = ["row_id", "user_id", "item_id", "event_timestamp", "label"]
    expected += ["gender", "age_bucket", "occupation", "zip_prefix", "hist_item_ids", "hist_categories"]
    expected += ["hist_length", *stats_features("user", [7, 30]), "category", "brand", "price"]
    expected += stats_features("item", [7, 30])
    assert schema.names == expected
    assert schema.field("hist_item_ids").type == pa.list_(pa.int64())
    assert schema.field("hist_categories").type == pa.list_(pa.string())
    assert schema.field("event_timestamp").type == pa.timestamp("ns", tz="UTC")
    for frame in frames.values():
        assert not frame.isna().any().any()
    manifest = json.loads((out["output_dir"] / "manifest.json").read_text())
    assert manifest["entity_rows"] == {name: len(frame) for name, frame in frames.items()}
    assert manifest["feature_columns"] == expected[5:]
    assert json.loads(out["metrics_file"].read_text())["sets"]["ranking_test"]["rows"] == 2
    assert "ranking_valid" in out["report_file"].read_text()


def test_splits_follow_the_cut_points_and_do_not_overlap(handmade_run):
    _, frames, *_ = handmade_run
    for name in training_data.TRAINING_SETS:
        train, valid, test = (frames[f"{name}_{s}"]["event_timestamp"] for s in training_data.SPLITS)
        assert train.max() < day(7) <= valid.min() and valid.max() < day(9) <= test.min()
    assert len(frames["ranking_train"]) == 3 and len(frames["ranking_valid"]) == 1


def _latest_user_values(feast_cfg: FeastConfig) -> dict[str, list]:
    store = feature_store.open_feature_store(feast_cfg)
    return store.get_online_features(
        features=["user_stats:user_impressions_7d", "user_history:hist_item_ids", "user_profile:gender"],
        entity_rows=[{"user_id": 1}, {"user_id": 2}],
    ).to_dict()


def test_online_store_after_materialize_serves_the_latest_values(handmade_run):
    report, _, _, feast_cfg, _ = handmade_run
    online = _latest_user_values(feast_cfg)
    assert online["user_impressions_7d"] == [8, 4]  # the newest snapshots, not the ones of any event
    assert online["hist_item_ids"] == [[10, 11], [10]]  # the trailing rows after the last events
    assert online["gender"] == ["F", "M"]
    assert report["materialized"]["end"] > day(9, 10).isoformat()


def test_backfill_alone_fills_a_new_online_store(tmp_path):
    """The pipeline's uncached online-store step: a fresh repo, no training-set run before it."""
    feast_cfg = _feast(copy_feature_repo(tmp_path))
    _, features_dir = handmade_dataset(tmp_path / "data")
    assert feature_store.open_feature_store(feast_cfg).list_feature_views() == []  # nothing registered yet
    window = online_store.run(feast_cfg, FEATURES, features_dir)
    online = _latest_user_values(feast_cfg)
    assert online["user_impressions_7d"] == [8, 4] and online["gender"] == ["F", "M"]
    assert window["end"] > day(9, 10).isoformat()


def test_repo_objects_are_registered_with_absolute_sources(handmade_run):
    _, _, _, feast_cfg, features_dir = handmade_run
    store = feature_store.open_feature_store(feast_cfg)
    assert sorted(v.name for v in store.list_feature_views()) == sorted(FEATURE_TABLE_KEYS)
    for view in store.list_feature_views():
        assert view.batch_source.path == str(features_dir.resolve() / f"{view.name}.parquet")


def test_split_cuts_from_fractions_are_whole_days():
    stamps = pd.Series(pd.date_range("2026-06-01 00:10", periods=90 * 24, freq="h", tz="UTC"))
    shipped = SHIPPED.training_set  # valid_fraction = test_fraction = 0.1, no explicit cuts
    cuts = training_set.split_cuts(stamps, shipped)
    assert cuts.test_start == pd.Timestamp("2026-08-21", tz="UTC")  # the last 9 of 90 days
    assert cuts.valid_start == pd.Timestamp("2026-08-12", tz="UTC")
    assert list(cuts.split_of(stamps.iloc[[0, -1]])) == ["train", "test"]
    with pytest.raises(ValueError, match="too few to split"):
        training_set.split_cuts(stamps.iloc[:30], revalidated(shipped, valid_fraction=0.4, test_fraction=0.4))


def test_split_config_is_validated():
    with pytest.raises(ConfigError, match="valid_start and test_start"):
        load_params(REPO_ROOT / "params.yaml", overrides={"training_set.valid_start": "2026-08-01T00:00:00Z"})
    with pytest.raises(ConfigError, match="must leave some days"):
        load_params(
            REPO_ROOT / "params.yaml",
            overrides={"training_set.valid_fraction": 0.5, "training_set.test_fraction": 0.5},
        )


def test_a_duplicated_row_id_from_the_join_is_an_error(tmp_path):
    repo = feature_store.feature_repo(_feast(copy_feature_repo(tmp_path)), FEATURES, tmp_path)
    entity = pd.DataFrame(
        {"row_id": [0, 1], "user_id": [1, 2], "item_id": [10, 10], "event_timestamp": [day(1), day(2)]}
    ).assign(label=[0, 1])
    joined = pd.concat([entity, entity.iloc[[0]]], ignore_index=True)
    for column in point_in_time.feature_columns(repo):
        joined[column] = None
    with pytest.raises(pd.errors.MergeError):
        point_in_time.complete_training_rows(entity, joined, repo)


def test_as_of_rows_keep_the_last_row_before_the_chunk_within_the_ttl_and_the_rows_inside():
    ns = [int(day(d).value) for d in (0, 1, 2, 3, 4, 5)]
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 1, 2, 2, 1], pa.int64()),
            "event_timestamp": pa.array(ns, pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "value": pa.array([10, 11, 12, 20, 21, 13], pa.int64()),
        }
    )
    rows = as_of_rows.AsOfRows(table, "user_id", ttl_ns=None)
    first = rows.rows_for(np.array([1]), ns[2], ns[3])  # user 1: last before day 2 is day 1; day 2 inside
    assert _values(first) == [11, 12]
    second = rows.rows_for(np.array([1, 2]), ns[4], ns[5])  # day 2 (user 1), day 3 (user 2), both inside
    assert _values(second) == [12, 13, 20, 21]
    with pytest.raises(RuntimeError, match="time order"):
        rows.rows_for(np.array([1]), ns[0], ns[1])
    one_day = int(pd.Timedelta(days=1).value)
    fresh = as_of_rows.AsOfRows(table, "user_id", ttl_ns=one_day)
    assert _values(fresh.rows_for(np.array([1]), ns[3] + 1, ns[4])) == []  # day 2 is > 1 day before
    assert _values(fresh.rows_for(np.array([1, 2]), ns[4], ns[5])) == [13, 20, 21]  # day 3 just in


def test_chunks_bound_the_pairs_a_join_considers():
    """A chunk's cost is its entity rows plus, per entity row, its entity's feature rows inside the
    chunk's time range: a row per entity costs one pair per event; a row per event, the square."""
    hours = [day(0, h) for h in range(100)]
    dense = as_of_rows.AsOfRows(  # one feature row per hour, each user's own
        pa.table(
            {
                "user_id": pa.array(np.arange(100) % 5, pa.int64()),
                "event_timestamp": pa.array(hours, pa.timestamp("ns", tz="UTC")),
            }
        ),
        "user_id",
        ttl_ns=None,
    )
    times = point_in_time._ns(pa.array([day(0, h + 0.5) for h in range(100)], pa.timestamp("ns", tz="UTC")))
    keys = np.arange(100) % 5
    feature_ns = point_in_time._ns(pa.array(hours, pa.timestamp("ns", tz="UTC")))
    feature_keys = np.arange(100) % 5

    def pairs(start: int, end: int) -> int:  # counted row by row
        inside = (feature_ns >= times[start]) & (feature_ns <= times[end - 1])
        return sum(1 + int((inside & (feature_keys == k)).sum()) for k in keys[start:end])

    bounds = point_in_time._chunk_bounds(times, keys, dense, chunk_rows=60)
    assert bounds[0][0] == 0 and bounds[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for start, end in bounds:
        assert pairs(start, end) <= 60  # within the budget ...
        longer = min(100, start + (end - start) * 5 // 4 + 1)
        assert end == 100 or pairs(start, longer) > 60  # ... and not much shorter than it could be
    assert 5 < len(bounds) < 15
    static = as_of_rows.AsOfRows(  # one row per user, before every event
        pa.table(
            {
                "user_id": pa.array(np.arange(5), pa.int64()),
                "event_timestamp": pa.array([day(-1)] * 5, pa.timestamp("ns", tz="UTC")),
            }
        ),
        "user_id",
        ttl_ns=None,
    )
    assert point_in_time._chunk_bounds(times, keys, static, chunk_rows=60) == [(0, 60), (60, 100)]


def _values(table: pa.Table) -> list[int]:
    return sorted(table.column("value").to_pylist())


# ---- end to end on the generated tiny dataset -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_training(tiny_params, tiny_raw_dir, tiny_features_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_training")
    feast = _feast(copy_feature_repo(root))
    out = training_set_outputs(root)
    report = training_set.run(
        tiny_params.training_set,
        tiny_features_dir,
        tiny_raw_dir,
        **out,
        feast=feast,
        features=tiny_params.features,
    )
    frames = {
        f"{name}_{split}": pq.read_table(out["output_dir"] / f"{name}_{split}.parquet").to_pandas()
        for name in training_data.TRAINING_SETS
        for split in training_data.SPLITS
    }
    return report, frames, feast


@pytest.mark.slow
def test_generated_rows_equal_entity_rows_and_splits_are_disjoint(tiny_training, tiny_raw):
    _, frames, _ = tiny_training
    events = tiny_raw["events"]
    ranking = pd.concat([frames[f"ranking_{s}"] for s in training_data.SPLITS])
    retrieval = pd.concat([frames[f"retrieval_{s}"] for s in training_data.SPLITS])
    assert len(ranking) == len(events) and ranking["row_id"].is_unique
    assert sorted(ranking["row_id"]) == list(range(len(events)))
    assert len(retrieval) == int(events["label"].sum()) and retrieval["row_id"].is_unique
    for name in training_data.TRAINING_SETS:
        train, valid, test = (frames[f"{name}_{s}"]["event_timestamp"] for s in training_data.SPLITS)
        assert train.max() < valid.min() and valid.max() < test.min()


@pytest.mark.slow
def test_generated_history_and_stats_use_only_the_past(tiny_training, tiny_raw, tiny_params):
    """Every history item was clicked strictly before the event; stats count only days before it."""
    _, frames, _ = tiny_training
    ranking = pd.concat([frames[f"ranking_{s}"] for s in training_data.SPLITS], ignore_index=True)
    events = tiny_raw["events"].sort_values("event_timestamp")
    n = tiny_params.features.history_length
    clicks = {u: g for u, g in events[events["label"] == 1].groupby("user_id")}
    for row in ranking.sample(1500, random_state=0).itertuples():
        past = clicks.get(row.user_id)
        expected = [] if past is None else past.loc[past["event_timestamp"] < row.event_timestamp, "item_id"]
        assert list(row.hist_item_ids) == list(expected)[-n:], row.row_id
    # user_impressions_7d = the user's events in [day - 7, day) where day = the event's 00:00 UTC
    day_of = events.assign(day=events["event_timestamp"].dt.floor("D"))
    sample = ranking.sample(1500, random_state=1)
    for row in sample.itertuples():
        start = row.event_timestamp.floor("D")
        mine = day_of[day_of["user_id"] == row.user_id]
        count = int(((mine["day"] >= start - pd.Timedelta(days=7)) & (mine["day"] < start)).sum())
        assert row.user_impressions_7d == count, row.row_id


@pytest.mark.slow
def test_backfill_gives_the_online_store_of_feasts_own_materialize(
    tiny_params, tiny_features_dir, tmp_path, monkeypatch
):
    """The backfill materializes only each entity's newest row, a slice of entities at a time; Feast's
    materialize over the whole tables must leave the very same online store."""
    monkeypatch.setattr(feature_store, "MATERIALIZE_ROWS", 97)  # several slices per user view
    sources = {n: feature_store.read_feature_table(tiny_features_dir, n) for n in FEATURE_TABLE_KEYS}
    users = sources["user_profile"].column("user_id").to_pylist()
    items = sources["item_profile"].column("item_id").to_pylist()
    rows = [{"user_id": u, "item_id": items[i % len(items)]} for i, u in enumerate(users)]
    rows += [{"user_id": users[i % len(users)], "item_id": item} for i, item in enumerate(items)]
    online, window = {}, None
    for how in ("pruned", "feast"):
        feast = _feast(copy_feature_repo(tmp_path / how))
        store = feature_store.open_feature_store(feast)
        build = functools.partial(feature_store.feature_repo, feast, tiny_params.features)
        store.apply(build(tiny_features_dir).objects())
        if how == "pruned":
            window = feature_store.materialize_online_store(store, sources, build)
        else:
            store.materialize(start_date=window[0], end_date=window[1])
        online[how] = store.get_online_features(
            features=store.get_feature_service("ranking"), entity_rows=rows
        ).to_dict()
        intervals = store.get_feature_view("user_history").materialization_intervals
        assert [(a.timestamp(), b.timestamp()) for a, b in intervals] == [
            (window[0].timestamp(), window[1].timestamp())
        ]
    assert online["pruned"] == online["feast"]
    assert sum(v is not None for v in online["pruned"]["hist_item_ids"]) > len(users) // 2


@pytest.mark.slow
def test_pruned_chunks_give_the_same_rows_as_one_unpruned_feast_join(
    tiny_training, tiny_params, tiny_features_dir, tiny_raw
):
    _, _, feast = tiny_training
    store = feature_store.open_feature_store(feast)
    build = functools.partial(feature_store.feature_repo, feast, tiny_params.features)
    sources = {n: feature_store.read_feature_table(tiny_features_dir, n) for n in FEATURE_TABLE_KEYS}
    entity = training_set.entity_frames(tiny_raw["events"])["ranking"].iloc[::20]
    chunked, _ = point_in_time.historical_features(
        store, entity, "ranking", sources, build, chunk_rows=97, call_rows=400
    )
    whole = store.get_historical_features(entity_df=entity, features=store.get_feature_service("ranking"))
    reference, _ = point_in_time.complete_training_rows(entity, whole.to_df(), build(tiny_features_dir))
    assert len(chunked) == len(entity) == len(reference)
    for column in reference.columns:
        left, right = chunked[column].tolist(), reference[column].tolist()
        if column in ("hist_item_ids", "hist_categories"):
            left, right = [list(v) for v in left], [list(v) for v in right]
        assert left == right, column


def test_training_sets_are_joined_and_written_a_batch_at_a_time(handmade_run):
    """Each batch of ``call_rows`` entity rows (3 here) is joined, filled and written before the next:
    the files hold row groups of at most a batch, never one group of the whole set."""
    _, frames, out, *_ = handmade_run
    for name in frames:
        written = pq.ParquetFile(out["output_dir"] / f"{name}.parquet")
        sizes = [written.metadata.row_group(i).num_rows for i in range(written.num_row_groups)]
        assert max(sizes) <= handmade_training_config().call_rows and sum(sizes) == len(frames[name]), name
    ranking = sum(
        pq.ParquetFile(out["output_dir"] / f"ranking_{s}.parquet").num_row_groups
        for s in training_data.SPLITS
    )
    assert ranking >= len(HANDMADE_EVENTS) / handmade_training_config().call_rows


def test_batches_hold_at_most_call_rows_and_join_like_one_batch(handmade_run):
    """The same rows whatever the batch size: batches of 2 entity rows against one batch of them all."""
    _, _, out, feast_cfg, features_dir = handmade_run
    store = feature_store.open_feature_store(feast_cfg)
    build = functools.partial(feature_store.feature_repo, feast_cfg, FEATURES)
    sources = {n: feature_store.read_feature_table(features_dir, n) for n in FEATURE_TABLE_KEYS}
    ranking = training_set.entity_frames(
        pd.read_parquet(out["output_dir"].parent / "data/raw/events.parquet")
    )["ranking"]
    stats = point_in_time.JoinStats()
    small = list(point_in_time.historical_batches(store, ranking, "ranking", sources, build, 2, 2, stats))
    assert [b.num_rows for b in small] == [2] * (len(ranking) // 2) + [1] * (len(ranking) % 2)
    one = list(point_in_time.historical_batches(store, ranking, "ranking", sources, build, 2, 10**6, stats))
    assert len(one) == 1 and pa.concat_tables(small).equals(one[0])
    assert pa.concat_tables(small).schema == point_in_time.training_schema(build(features_dir))


def test_duckdb_memory_limit_and_spill_dir_reach_the_offline_store(handmade_run, tmp_path):
    """The step's DuckDB settings land on the connection Feast's DuckDB store joins on (ibis's default
    backend: feast/infra/offline_stores/duckdb.py reads the sources with ibis.read_parquet)."""
    import ibis

    con = ibis.get_backend()
    before = point_in_time.duckdb_settings()
    assert SHIPPED.training_set.duckdb_memory_limit == "4GB"
    assert before["memory_limit"] in ("3.7 GiB", "4.0 GB")  # the step (handmade_run) applied params'
    try:
        point_in_time.configure_duckdb("300MB", tmp_path / "spill")
        settings = point_in_time.duckdb_settings()
        assert settings["memory_limit"] in ("286.1 MiB", "300.0 MB")  # DuckDB prints it in its own units
        assert settings["temp_directory"] == str((tmp_path / "spill").resolve())
        assert (tmp_path / "spill").is_dir()
        # the connection Feast uses is the one configured (a read through it sees the same limit)
        assert con.raw_sql("SELECT current_setting('memory_limit')").fetchone()[0] == settings["memory_limit"]
    finally:
        for name in ("memory_limit", "temp_directory"):
            con.raw_sql(f"SET {name} = '{before[name].replace(' ', '')}'")


def test_duckdb_memory_limit_is_checked_at_load():
    with pytest.raises(ConfigError, match="duckdb_memory_limit"):
        load_params(REPO_ROOT / "params.yaml", overrides={"training_set.duckdb_memory_limit": "lots"})
