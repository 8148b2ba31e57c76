"""Feature tables are point-in-time correct: every value uses only events strictly before its row time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from components import features
from recsys.contracts import DataContractError, stats_features
from recsys.event_partitions import partition_events


@pytest.fixture(scope="module")
def tables(tiny_features_dir):
    return {p.stem: pd.read_parquet(p) for p in tiny_features_dir.glob("*.parquet")}


def test_all_feature_tables_are_written(tables, tiny_params):
    assert set(tables) == {"user_profile", "item_profile", "user_history", "user_stats", "item_stats"}
    for name, df in tables.items():
        assert str(df["event_timestamp"].dt.tz) == "UTC", name
    windows = tiny_params.features.stats_windows_days
    assert stats_features("user", windows) == [
        c for c in tables["user_stats"] if c.startswith("user_") and c != "user_id"
    ]


def test_history_rows_match_a_brute_force_reference_over_the_whole_dataset(tables, tiny_raw, tiny_params):
    """Every row (user, t) holds exactly the last N clicks with time < t, oldest first."""
    n = tiny_params.features.history_length
    clicks = tiny_raw["events"][tiny_raw["events"]["label"] == 1].merge(
        tiny_raw["items"][["item_id", "category"]], on="item_id"
    )
    clicks = clicks.sort_values(["user_id", "event_timestamp"])
    by_user = {u: g for u, g in clicks.groupby("user_id")}
    history = tables["user_history"]
    assert len(history) == len(tiny_raw["events"]) + tiny_raw["events"]["user_id"].nunique()
    empty = pd.DataFrame({"event_timestamp": pd.Series([], dtype="datetime64[ns, UTC]")})
    for row in history.itertuples(index=False):
        past = by_user.get(row.user_id, empty)
        past = past[past["event_timestamp"] < row.event_timestamp].tail(n)
        assert list(row.hist_item_ids) == past.get("item_id", pd.Series([])).tolist()
        assert list(row.hist_categories) == past.get("category", pd.Series([])).tolist()
        assert row.hist_length == len(past)


def test_history_never_holds_a_click_at_or_after_its_row_time(tables, tiny_raw):
    """Property over every (row, history item): some click of that item by that user precedes the row."""
    history = tables["user_history"]
    exploded = history[["user_id", "event_timestamp", "hist_item_ids"]].explode("hist_item_ids").dropna()
    exploded = exploded.rename(columns={"hist_item_ids": "item_id", "event_timestamp": "row_time"})
    exploded["item_id"] = exploded["item_id"].astype(np.int64)
    clicks = tiny_raw["events"][tiny_raw["events"]["label"] == 1]
    first_click = clicks.groupby(["user_id", "item_id"])["event_timestamp"].min().rename("first_click")
    joined = exploded.join(first_click, on=["user_id", "item_id"])
    assert joined["first_click"].notna().all()
    assert (joined["first_click"] < joined["row_time"]).all()


@pytest.mark.parametrize(
    ("table", "key", "prefix"), [("user_stats", "user_id", "user"), ("item_stats", "item_id", "item")]
)
def test_stats_snapshots_use_only_events_before_the_snapshot(
    tables, tiny_raw, tiny_params, table, key, prefix
):
    events = tiny_raw["events"]
    snapshots = tables[table]
    rng = np.random.default_rng(0)
    sample = snapshots.iloc[rng.choice(len(snapshots), size=min(300, len(snapshots)), replace=False)]
    grouped = {k: g for k, g in events.groupby(key)}
    for row in sample.itertuples(index=False):
        snap = row.event_timestamp
        assert snap == snap.normalize()  # snapshots sit at 00:00 UTC
        mine = grouped[getattr(row, key)]
        for days in tiny_params.features.stats_windows_days:
            window = mine[
                (mine["event_timestamp"] < snap) & (mine["event_timestamp"] >= snap - pd.Timedelta(days=days))
            ]
            assert getattr(row, f"{prefix}_impressions_{days}d") == len(window)
            assert getattr(row, f"{prefix}_clicks_{days}d") == int(window["label"].sum())
            expected_ctr = window["label"].mean() if len(window) else 0.0
            assert getattr(row, f"{prefix}_ctr_{days}d") == pytest.approx(expected_ctr)


def test_every_event_finds_the_snapshot_of_its_own_day(tables, tiny_raw):
    events = tiny_raw["events"]
    days = events.assign(event_timestamp=events["event_timestamp"].dt.floor("D"))[
        ["user_id", "event_timestamp"]
    ]
    known = tables["user_stats"][["user_id", "event_timestamp"]].drop_duplicates()
    merged = days.drop_duplicates().merge(known, how="left", indicator=True)
    assert (merged["_merge"] == "both").all()


def test_features_step_names_a_broken_raw_file(tiny_raw_dir, tmp_path, tiny_params):
    for p in tiny_raw_dir.glob("*.parquet"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    events = pd.read_parquet(tmp_path / "events.parquet").drop(columns=["item_id"])
    pa.parquet.write_table(pa.Table.from_pandas(events), tmp_path / "events.parquet")
    with pytest.raises(DataContractError, match=r"events\.parquet.*'item_id'"):
        features.run(tiny_params.features, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_history_is_built_and_written_batch_rows_at_a_time(tiny_raw_dir, tiny_raw, tiny_params, tmp_path):
    """The history (a list per event) is never whole in memory: each batch is one row group of at most
    ``features.batch_rows`` rows, and the table is the one built whole."""
    import pyarrow.parquet as pq

    config = tiny_params.features.model_copy(update={"batch_rows": 4_000})
    features.run(config, tiny_raw_dir, tmp_path)
    written = pq.ParquetFile(tmp_path / "user_history.parquet")
    sizes = [written.metadata.row_group(i).num_rows for i in range(written.num_row_groups)]
    whole = features.build_feature_tables(tiny_raw, tiny_params.features)["user_history"]
    assert sizes == [4_000] * (whole.num_rows // 4_000) + [whole.num_rows % 4_000] * bool(
        whole.num_rows % 4_000
    )
    assert len(sizes) > 3
    assert written.read().equals(whole)
    for name in ("user_profile", "item_profile", "user_stats", "item_stats"):  # the rest unchanged
        assert pq.read_table(tmp_path / f"{name}.parquet").equals(
            features.build_feature_tables(tiny_raw, tiny_params.features)[name]
        )


def _copy_raw(tiny_raw_dir, tiny_raw, target, events: pd.DataFrame | None = None, row_group_size=None):
    target.mkdir()
    for name in ("users", "items"):
        (target / f"{name}.parquet").write_bytes((tiny_raw_dir / f"{name}.parquet").read_bytes())
    events = tiny_raw["events"] if events is None else events
    pa.parquet.write_table(
        pa.Table.from_pandas(events, preserve_index=False),
        target / "events.parquet",
        row_group_size=row_group_size,
    )
    return target


def test_tables_do_not_depend_on_the_events_order_row_groups_or_partitions(
    tiny_raw_dir, tiny_raw, tiny_params, tmp_path, monkeypatch
):
    """Events shuffled over many row groups, split into several user and item ranges (spill files that
    are gone afterwards): every table equals, row for row, the one computed over all events at once."""
    import tempfile

    import pyarrow.parquet as pq

    shuffled = tiny_raw["events"].sample(frac=1.0, random_state=7)
    raw = _copy_raw(tiny_raw_dir, tiny_raw, tmp_path / "raw", shuffled, row_group_size=2_500)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    spilled = {}

    def spy(events, edges, spill_dir):
        parts = partition_events(events, edges, spill_dir)
        spilled.update({key: len(p) for key, p in parts.items()}, files=len(list(Path(spill_dir).iterdir())))
        return parts

    monkeypatch.setattr(features, "partition_events", spy)
    config = tiny_params.features.model_copy(update={"batch_rows": 5_000})
    features.run(config, raw, tmp_path / "out")
    assert spilled["user_id"] >= 5 and spilled["item_id"] >= 5
    assert spilled["files"] == spilled["user_id"] + spilled["item_id"]
    assert not list((tmp_path / "tmp").iterdir())  # the spill folder is removed
    whole = features.build_feature_tables(tiny_raw, tiny_params.features)
    for name, table in whole.items():
        assert pq.read_table(tmp_path / "out" / f"{name}.parquet").equals(table), name
    for name in ("user_history", "user_stats", "item_stats"):  # row groups of batch_rows rows
        written = pq.ParquetFile(tmp_path / "out" / f"{name}.parquet").metadata
        sizes = [written.row_group(i).num_rows for i in range(written.num_row_groups)]
        assert all(size == 5_000 for size in sizes[:-1]) and 0 < sizes[-1] <= 5_000, (name, sizes)


def test_a_bad_row_late_in_the_events_writes_nothing_and_leaves_no_spill(
    tiny_raw_dir, tiny_raw, tiny_params, tmp_path, monkeypatch
):
    import tempfile

    events = tiny_raw["events"].copy()
    events.loc[len(events) - 10, "label"] = 3  # in the last row group: found while partitioning
    raw = _copy_raw(tiny_raw_dir, tiny_raw, tmp_path / "raw", events, row_group_size=5_000)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    config = tiny_params.features.model_copy(update={"batch_rows": 5_000})
    with pytest.raises(DataContractError, match=r"events\.parquet: column 'label' .* found \[3\]"):
        features.run(config, raw, tmp_path / "out")
    assert not list((tmp_path / "tmp").iterdir())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
