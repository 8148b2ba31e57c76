"""The monitor step (components/monitor.py) on traffic answered by the real models: clean traffic raises
no alarm; a shifted feature is found and named; degraded answers, a stale index and old embeddings are
caught; served CTR is attributed from later clicks; too little traffic is a skip, said so; the results
reach Prometheus' text format and the step's exit code."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from components import monitor as step
from serving.request_log import RequestLog
from tests.conftest import offline_serving_params, request_log_config, small_serving_bundle
from tests.synthetic_bundle import synthetic_training_frame

ROOT = Path(__file__).resolve().parents[1]
SERVED = 240  # answered users per scenario


@pytest.fixture(scope="module")
def params():
    return offline_serving_params()


@pytest.fixture(scope="module")
def world(params, tmp_path_factory):
    """A trained bundle, the training set it was trained on (the reference), raw events and the models."""
    from serving.server import build_models

    root = tmp_path_factory.mktemp("monitor")
    bundle = small_serving_bundle(params, root)
    train = synthetic_training_frame(60, 80, 1_000, params.features.stats_windows_days, seed=1)
    training_dir = root / "training"
    training_dir.mkdir()
    train.to_parquet(training_dir / f"ranking_{params.monitor.reference_split}.parquet")
    models = {m.name: m for m in build_models(bundle, params.serving, params.feast)}
    return {"root": root, "bundle": bundle, "train": train, "training_dir": training_dir, "models": models}


def serve(world, log_dir: Path, change=None, degraded_share: float = 0.0) -> None:
    """``SERVED`` retrieval answers for training rows' users, their features given in the request (as an
    online store would have served them), optionally changed; logged to ``log_dir``."""
    models = world["models"]
    rows = world["train"].sample(n=SERVED, random_state=3)
    names = [n for n in models["retrieval"].recommender.user_feature_names if n in rows and n != "user_id"]
    log = RequestLog(request_log_config(log_dir))
    for model in models.values():
        model.request_log = log
    instances = []
    for _, row in rows.iterrows():
        features = {n: (row[n].tolist() if isinstance(row[n], np.ndarray) else row[n]) for n in names}
        features = {n: (v.item() if isinstance(v, np.generic) else v) for n, v in features.items()}
        instances.append(
            {"user_id": int(row["user_id"]), "features": change(features) if change else features}
        )
    for start in range(0, len(instances), 8):
        models["retrieval"].answer({"instances": instances[start : start + 8]})
    log.flush()
    if degraded_share:
        _mark_degraded(log_dir, degraded_share)


def _mark_degraded(log_dir: Path, share: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in log_dir.rglob("*.parquet"):
        table = pq.read_table(path)
        flags = np.arange(len(table)) < int(share * len(table))
        table = table.set_column(table.schema.get_field_index("degraded"), "degraded", pa.array(flags))
        pq.write_table(table, path)


def write_events(world, raw_dir: Path, extra: pd.DataFrame | None = None) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    events = world["train"][["user_id", "item_id", "event_timestamp", "label"]]
    if extra is not None:
        events = pd.concat([events, extra], ignore_index=True)
    events.to_parquet(raw_dir / "events.parquet")
    return raw_dir


def check(params, world, log_dir: Path, raw_dir: Path, name: str, bundle: Path | None = None, **changes):
    monitor = params.monitor.model_copy(update=changes)
    out = world["root"] / name
    return step.run(
        monitor,
        params.serving,
        raw_dir=raw_dir,
        training_dir=world["training_dir"],
        bundle_dir=world["bundle"] if bundle is None else bundle,
        output=out / "monitor.json",
        textfile=out / "monitor.prom",
        report_file=out / "monitor.html",
        request_log_uri=str(log_dir),
    )


def test_clean_traffic_raises_no_alarm_and_reaches_prometheus_text(params, world, tmp_path):
    serve(world, tmp_path / "log")
    report = check(params, world, tmp_path / "log", write_events(world, tmp_path / "raw"), "clean")
    statuses = {name: c["status"] for name, c in report["checks"].items()}
    assert report["status"] == "ok", {n: c["message"] for n, c in report["checks"].items()}
    assert statuses["traffic"] == statuses["drift"] == statuses["online_recall"] == "ok"
    assert report["answers"] == SERVED and report["checks"]["drift"]["value"] < params.monitor.psi.warn
    assert set(report["checks"]["drift"]["psi"]) >= {"age_bucket", "gender", "hist_item_ids"}
    assert report["checks"]["online_recall"]["value"] >= params.monitor.online_recall.warn
    assert statuses["outcomes"] == "skipped"  # the events end in 2026-06, the answers are now
    expectations = report["checks"]["expectations"]
    assert expectations["status"] == "ok" and expectations["evaluated"] >= 2 * len(
        report["checks"]["drift"]["psi"]
    )
    assert (world["root"] / "clean" / "monitor_expectations" / "index.html").is_file()  # GX Data Docs
    text = (world["root"] / "clean" / "monitor.prom").read_text()
    assert 'recsys_monitor_check_status{check="drift"} 0.0' in text
    assert 'recsys_monitor_feature_psi{feature="age_bucket"}' in text
    assert json.loads((world["root"] / "clean" / "monitor.json").read_text())["status"] == "ok"
    assert "<h1>Monitor: ok</h1>" in (world["root"] / "clean" / "monitor.html").read_text()


def test_a_shifted_feature_is_found_and_named(params, world, tmp_path):
    def older(features: dict) -> dict:
        return features | {"age_bucket": features["age_bucket"] + 20}

    serve(world, tmp_path / "log", change=older)
    report = check(params, world, tmp_path / "log", write_events(world, tmp_path / "raw"), "drift")
    drift = report["checks"]["drift"]
    assert drift["status"] == "fail" and drift["feature"] == "age_bucket"
    assert "age_bucket" in drift["message"] and report["status"] == "fail"
    assert all(v < params.monitor.psi.warn for n, v in drift["psi"].items() if n != "age_bucket")
    expectations = report["checks"]["expectations"]  # ages 20 above the oldest in training: out of range
    assert expectations["status"] == "fail" and [f["column"] for f in expectations["failures"]] == [
        "age_bucket"
    ]
    assert "age_bucket: expect_column_values_to_be_between" in expectations["message"]


def test_a_stale_online_store_shows_as_drift_in_the_sequences(params, world, tmp_path):
    """A store that stopped updating serves each user's history as it was long ago: short lists."""

    def stale(features: dict) -> dict:
        return features | {"hist_item_ids": features["hist_item_ids"][:2], "hist_length": 2}

    serve(world, tmp_path / "log", change=stale)
    report = check(params, world, tmp_path / "log", write_events(world, tmp_path / "raw"), "stale")
    psi = report["checks"]["drift"]["psi"]
    assert report["checks"]["drift"]["status"] == "fail"
    assert psi["hist_item_ids"] >= params.monitor.psi.fail and psi["hist_length"] >= params.monitor.psi.fail


def test_degraded_answers_fail_and_are_left_out_of_the_drift(params, world, tmp_path):
    serve(world, tmp_path / "log", degraded_share=0.5)
    report = check(params, world, tmp_path / "log", write_events(world, tmp_path / "raw"), "degraded")
    degraded = report["checks"]["degraded_answers"]
    assert degraded["status"] == "fail" and degraded["value"] == pytest.approx(0.5)
    assert report["checks"]["drift"]["status"] == "ok"


def test_items_the_index_lacks_and_old_embeddings_are_caught(params, world, tmp_path):
    serve(world, tmp_path / "log")
    start = world["train"]["event_timestamp"].max()
    new_items = pd.DataFrame(
        {
            "user_id": np.int64(1),
            "item_id": np.arange(10_001, 10_011, dtype=np.int64),
            "event_timestamp": start + pd.to_timedelta(np.arange(10), unit="h"),
            "label": np.int64(0),
        }
    )
    raw = write_events(world, tmp_path / "raw", new_items)
    now = datetime.now(UTC) + timedelta(hours=100)
    monitor = params.monitor.model_copy(update={"window_hours": 200})
    out = tmp_path / "out"
    report = step.run(
        monitor,
        params.serving,
        raw,
        world["training_dir"],
        world["bundle"],
        out / "m.json",
        out / "m.prom",
        out / "m.html",
        now=now,
        request_log_uri=str(tmp_path / "log"),
    )
    coverage, age = report["checks"]["index_coverage"], report["checks"]["embedding_age"]
    assert coverage["missing_items"] == 10 and coverage["status"] == "fail"
    assert age["status"] == "fail" and age["value"] > 100


def test_served_ctr_counts_clicks_on_served_items_within_the_window(params, world, tmp_path):
    log_dir = tmp_path / "log"
    log = RequestLog(request_log_config(log_dir))
    world["models"]["recommend"].request_log = log
    users = world["train"]["user_id"].drop_duplicates().head(60).tolist()
    answers = world["models"]["recommend"].answer(
        {"instances": [{"user_id": int(u), "n": 5} for u in users[:8]]}
    )
    for start in range(8, len(users), 8):
        world["models"]["recommend"].answer(
            {"instances": [{"user_id": int(u), "n": 5} for u in users[start : start + 8]]}
        )
    log.flush()
    first = answers["predictions"][0]
    soon = pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)
    late = pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=30)
    clicks = pd.DataFrame(
        {
            "user_id": np.int64(first["user_id"]),
            "item_id": np.asarray(first["item_ids"][:3], dtype=np.int64),
            "event_timestamp": [soon, soon, late],  # the third is past the 24 h attribution window
            "label": np.int64(1),
        }
    )
    raw = write_events(world, tmp_path / "raw", clicks)
    report = check(params, world, log_dir, raw, "ctr", min_answers=10)
    outcomes = report["checks"]["outcomes"]
    served = 5 * len(users)
    assert outcomes["status"] == "ok" and outcomes["value"] == pytest.approx(2 / served)
    version = first["bundle_version"]
    assert outcomes["ctr_by_version"] == {version: pytest.approx(2 / served)}
    assert 0 < outcomes["coverage"][version] <= 1


def test_too_little_traffic_is_skipped_and_says_so(params, world, tmp_path):
    report = check(params, world, tmp_path / "nothing", write_events(world, tmp_path / "raw"), "quiet")
    traffic = report["checks"]["traffic"]
    assert traffic["status"] == "skipped" and "fewer than monitor.min_answers" in traffic["message"]
    assert all(report["checks"][name]["status"] == "skipped" for name in step.TRAFFIC_CHECKS)
    assert (
        "No expectations ran: too few answers"
        in (world["root"] / "quiet" / "monitor_expectations" / "index.html").read_text()
    )
    assert list(report["checks"]) == [
        "traffic",
        *step.TRAFFIC_CHECKS,
        "online_recall",
        "index_coverage",
        "embedding_age",
        "outcomes",
    ]
    assert report["status"] == "ok"


def test_population_stability_is_zero_for_the_same_sample_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    reference = pd.Series(rng.normal(size=5_000))
    assert step.population_stability(reference, reference, 10) == pytest.approx(0.0, abs=1e-9)
    assert step.population_stability(reference, reference + 0.1, 10) < 0.05
    assert step.population_stability(reference, reference + 1.0, 10) > 0.5
    colours = pd.Series(["red"] * 50 + ["blue"] * 50)
    assert step.population_stability(colours, pd.Series(["green"] * 100), 10) > 1.0


def test_a_failed_check_exits_1_with_stop_on_fail(params, world, tmp_path, monkeypatch):
    from tests.conftest import write_params

    serve(world, tmp_path / "log", degraded_share=1.0)
    raw = write_events(world, tmp_path / "raw")
    common = [
        "--raw-dir", str(raw), "--training-dir", str(world["training_dir"]),
        "--bundle-dir", str(world["bundle"]),
        "--output", str(tmp_path / "m.json"), "--textfile", str(tmp_path / "m.prom"),
        "--report-file", str(tmp_path / "m.html"), "--request-log", str(tmp_path / "log"),
    ]  # fmt: skip
    stop = write_params(tmp_path / "stop.yaml", {"serving.online_store": False})
    go_on = write_params(tmp_path / "go.yaml", {"serving.online_store": False, "monitor.stop_on_fail": False})
    assert step.main(["--params", str(stop), *common]) == 1
    assert step.main(["--params", str(go_on), *common]) == 0
    assert step.main(["--params", str(stop), "--exit-zero", *common]) == 0  # dvc repro: reported, not stopped
    assert json.loads((tmp_path / "m.json").read_text())["checks"]["degraded_answers"]["status"] == "fail"


# ---- bounded reads (issue 26): the same answers from the rows that matter --------------------------


def test_the_reference_is_every_kth_row_of_a_large_split_and_whole_when_small(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ranking_test.parquet"
    ids = np.arange(100_000, dtype=np.int64)
    table = pa.table({"row_id": ids, "hist": [[i % 7] for i in range(len(ids))]})
    pq.write_table(table, path, row_group_size=30_000)  # batches across row groups of uneven ends
    sample = step.reference_sample(path, 7_000)
    assert sample.schema == table.schema
    assert sample.column("row_id").to_pylist() == list(range(0, 100_000, 15))  # k = ceil(100000 / 7000)
    assert step.reference_sample(path, 7_000).equals(sample)  # the same on every run
    assert step.reference_sample(path, 100_000).equals(table)  # within the bound: whole, unchanged


def test_a_sampled_reference_keeps_the_checks_results(params, world, tmp_path):
    serve(world, tmp_path / "log")
    raw = write_events(world, tmp_path / "raw")
    whole = check(params, world, tmp_path / "log", raw, "whole")
    sampled = check(params, world, tmp_path / "log", raw, "sampled", reference_rows=400)
    assert len(world["train"]) > 400  # the sample is smaller than the split
    assert {n: c["status"] for n, c in sampled["checks"].items()} == {
        n: c["status"] for n, c in whole["checks"].items()
    }
    assert sampled["checks"]["drift"]["psi"] != whole["checks"]["drift"]["psi"]  # the sample was used


def test_the_event_log_reads_only_the_asked_rows(tmp_path):
    rng = np.random.default_rng(0)
    seconds = rng.integers(0, 10 * 86_400, 5_000)
    times = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(seconds, unit="s")
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 50, 5_000).astype(np.int64),
            "item_id": rng.integers(0, 200, 5_000).astype(np.int64),
            "event_timestamp": times,
            "label": rng.integers(0, 2, 5_000).astype(np.int64),
        }
    )
    path = tmp_path / "events.parquet"
    events.to_parquet(path, row_group_size=700)
    log = step.EventLog(path)
    assert log.end() == events["event_timestamp"].max()
    since, until = pd.Timestamp("2026-01-04 06:00", tz="UTC"), pd.Timestamp("2026-01-06", tz="UTC")
    users = np.array([3, 7, 11, 7])
    got = log.rows(step.EVENT_COLUMNS, since=since, until=until, users=users, label=1)
    time = events["event_timestamp"]
    kept = (time >= since) & (time <= until) & events["user_id"].isin(users) & (events["label"] == 1)
    want = events.loc[kept]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    naive = log.rows(["item_id"], since=since.tz_localize(None))  # a naive bound is UTC
    assert naive["item_id"].tolist() == events.loc[time >= since, "item_id"].tolist()
    pd.DataFrame(columns=["user_id", "item_id", "label"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet.*event_timestamp"):
        step.EventLog(tmp_path / "bad.parquet")


@pytest.mark.slow  # two Feast joins on the tiny preset's tables
def test_the_skew_join_on_the_sampled_entities_rows_equals_the_whole_tables(
    tiny_params, tiny_features_dir, tmp_path
):
    """The point-in-time join reads only the sampled users' and items' feature rows: the same answer as
    over the whole tables (the as-of join picks each entity's value from its own rows)."""
    from recsys.contracts import FEATURE_TABLE_KEYS
    from recsys.feature_store import open_feature_store, read_feature_table, registered_repo
    from tests.conftest import revalidated
    from tests.feast_fixtures import copy_feature_repo

    feast = revalidated(tiny_params.feast, repo_path=copy_feature_repo(tmp_path))
    open_feature_store(feast).apply(registered_repo(feast, tiny_params.features, tiny_features_dir).objects())
    offline = step.OfflineFeatures(feast, tiny_params.features, tiny_params.training_set, tiny_features_dir)
    whole = {name: read_feature_table(tiny_features_dir, name) for name in FEATURE_TABLE_KEYS}
    stats = whole["user_stats"].to_pandas()
    rows = stats.sample(n=120, random_state=0)
    shift = pd.to_timedelta(np.random.default_rng(1).integers(0, 5 * 86_400, len(rows)), unit="s")
    items = whole["item_stats"].column("item_id").to_numpy()
    sample = pd.DataFrame(
        {
            "user_id": rows["user_id"].to_numpy(),
            "time": (rows["event_timestamp"] + shift).to_numpy(),  # between snapshots, some past the end
            "item_ids": [[int(items[i % len(items)]), 0] if i % 5 else [] for i in range(len(rows))],
        }
    )
    sample["time"] = sample["time"].dt.tz_localize("UTC") if sample["time"].dt.tz is None else sample["time"]
    read = step.entity_rows(tiny_features_dir, {"user_id": sample["user_id"], "item_id": items[:3]})
    assert all(read[name].num_rows < whole[name].num_rows for name in ("user_stats", "user_history"))
    bounded, end = step._point_in_time(sample, offline)
    full, full_end = step._point_in_time(sample, offline, sources=whole)
    latest = max(pd.Timestamp(t.column("event_timestamp").to_numpy().max(), tz="UTC") for t in whole.values())
    assert end == full_end == latest
    assert len(bounded) == len(sample) and bounded["hist_length"].gt(0).any()
    pd.testing.assert_frame_equal(bounded, full)
