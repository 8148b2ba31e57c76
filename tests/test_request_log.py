"""The request log (serving/request_log.py): files written on size, on time and on close, whole or not at
all; a bounded buffer that drops and counts instead of blocking; a failing sink (a folder that cannot be
made, an S3 endpoint nobody answers) degrades and is counted, and the rows are written once it is back;
S3 through a real server on loopback; and the models' answers, V1 and V2, as the rows the monitor reads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from recsys.request_records import RECORD_SCHEMA, read_request_log
from serving.request_log import DROPPED_ROWS, LOGGED_ROWS, WRITE_ERRORS, RequestLog
from tests.conftest import offline_serving_params, request_log_config, small_serving_bundle

ROOT = Path(__file__).resolve().parents[1]


def row(user_id: int, **changes) -> dict:
    values = {
        "request_id": f"r{user_id}",
        "time": time.time(),
        "endpoint": "recommend",
        "user_id": user_id,
        "model": "multi_tower",
        "bundle_version": "v1",
        "item_ids": [3, 1, 2],
        "scores": [0.9, 0.5, 0.1],
        "candidates": 200,
        "source": "model",
        "cold_start": False,
        "degraded": False,
        "features": {"user_age": np.int64(31), "hist_item_ids": np.array([4, 5]), "ctr_7d": np.float32(0.5)},
    }
    return values | changes


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet"))


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("not within the time allowed")
        time.sleep(0.02)


def counter(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


def test_rows_round_trip_in_day_partitions_with_features_as_json(tmp_path):
    log = RequestLog(request_log_config(tmp_path))
    log.record([row(1), row(2) | {"user_id": None, "endpoint": "retrieval", "model": "two_tower"}])
    assert log.flush() == 2
    (written,) = files(tmp_path)
    assert written.parent.name.startswith("date=") and written.name.endswith(".parquet")
    table = read_request_log(str(tmp_path))
    assert table.schema == RECORD_SCHEMA
    rows = table.to_pylist()
    assert [r["user_id"] for r in rows] == [1, None]
    assert rows[0]["item_ids"] == [3, 1, 2] and rows[0]["candidates"] == 200
    assert rows[0]["features"] == '{"user_age":31,"hist_item_ids":[4,5],"ctr_7d":0.5}'
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp file left


def test_a_file_is_written_when_flush_rows_are_buffered_and_on_the_interval(tmp_path):
    by_size = RequestLog(request_log_config(tmp_path / "size", flush_rows=5, flush_interval_s=60))
    by_size.start()
    by_size.record([row(i) for i in range(4)])
    time.sleep(0.3)
    assert files(tmp_path / "size") == []  # 4 < flush_rows, and the interval is a minute
    by_size.record([row(4)])
    wait_for(lambda: len(files(tmp_path / "size")) == 1)
    by_time = RequestLog(request_log_config(tmp_path / "time", flush_interval_s=0.2))
    by_time.start()
    by_time.record([row(1)])
    wait_for(lambda: len(files(tmp_path / "time")) == 1)
    for log in (by_size, by_time):
        log.close()
    assert len(read_request_log(str(tmp_path / "size"))) == 5


def test_close_writes_what_is_buffered_and_later_rows_are_counted_not_kept(tmp_path):
    log = RequestLog(request_log_config(tmp_path))
    log.start()
    log.record([row(i) for i in range(7)])
    before = counter(DROPPED_ROWS, reason="closed")
    log.close()
    assert len(read_request_log(str(tmp_path))) == 7
    log.record([row(8)])
    log.close()  # idempotent
    assert counter(DROPPED_ROWS, reason="closed") == before + 1
    assert len(read_request_log(str(tmp_path))) == 7


def test_a_full_buffer_drops_the_newest_rows_and_counts_them(tmp_path):
    log = RequestLog(
        request_log_config(tmp_path, flush_rows=3, max_buffer_rows=3)
    )  # no writer thread: nothing drains
    before = counter(DROPPED_ROWS, reason="buffer_full")
    log.record([row(i) for i in range(5)])
    assert counter(DROPPED_ROWS, reason="buffer_full") == before + 2
    log.flush()
    assert [r["user_id"] for r in read_request_log(str(tmp_path)).to_pylist()] == [0, 1, 2]


def test_a_sink_that_cannot_be_written_degrades_and_the_rows_follow_once_it_is_back(tmp_path, caplog):
    blocked = tmp_path / "log"
    blocked.write_text("a file where the folder should be")  # every write fails with a real OSError
    log = RequestLog(request_log_config(blocked))
    errors, written = counter(WRITE_ERRORS), counter(LOGGED_ROWS)
    log.record([row(1), row(2)])  # the request path never raises
    assert log.flush() == 0
    assert counter(WRITE_ERRORS) == errors + 1 and counter(LOGGED_ROWS) == written
    assert "cannot write 2 rows" in caplog.text
    blocked.unlink()
    log.record([row(3)])
    assert log.flush() == 3
    assert [r["user_id"] for r in read_request_log(str(blocked)).to_pylist()] == [1, 2, 3]


def test_only_the_sampled_share_of_rows_carries_features(tmp_path):
    log = RequestLog(request_log_config(tmp_path, feature_sample=0.0))
    log.record([row(i) for i in range(20)])
    log.flush()
    assert read_request_log(str(tmp_path)).column("features").null_count == 20
    sampled = RequestLog(request_log_config(tmp_path / "half", feature_sample=0.5))
    sampled.record([row(i) for i in range(400)])
    sampled.flush()
    kept = 400 - read_request_log(str(tmp_path / "half")).column("features").null_count
    assert 140 < kept < 260


def test_day_partitions_older_than_the_retention_are_removed(tmp_path):
    old = tmp_path / "date=2020-01-01"
    old.mkdir()
    (old / "T000000Z-host-1-000001.parquet").write_bytes(b"old")
    log = RequestLog(request_log_config(tmp_path, retention_days=14))
    log.record([row(1)])
    log.flush()
    assert not old.exists() and len(files(tmp_path)) == 1


def test_reading_from_a_time_leaves_out_earlier_rows(tmp_path):
    from datetime import UTC, datetime

    log = RequestLog(request_log_config(tmp_path))
    log.record([row(1, time=1_700_000_000.0), row(2)])
    log.flush()
    since = datetime.fromtimestamp(1_750_000_000, UTC)
    assert [r["user_id"] for r in read_request_log(str(tmp_path), since).to_pylist()] == [2]
    assert len(read_request_log(str(tmp_path / "never-written"))) == 0


def test_s3_prefix_on_a_real_server(s3_env):
    uri = s3_env.uri("request-log")
    log = RequestLog(request_log_config(uri))
    log.record([row(1), row(2)])
    assert log.flush() == 2
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.name)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("request-log/date=") and keys[0].endswith(".parquet")
    assert [r["user_id"] for r in read_request_log(uri).to_pylist()] == [1, 2]


def test_an_s3_endpoint_nobody_answers_is_counted_not_raised(s3_env, monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    log = RequestLog(request_log_config(s3_env.uri("request-log")))
    errors = counter(WRITE_ERRORS)
    log.record([row(1)])
    assert log.flush() == 0
    assert counter(WRITE_ERRORS) == errors + 1


# ---- the models' answers as rows ----------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    return offline_serving_params()


@pytest.fixture(scope="module")
def logged_models(params, tmp_path_factory):
    from serving.server import build_models

    folder = tmp_path_factory.mktemp("request_log")
    bundle = small_serving_bundle(params, tmp_path_factory.mktemp("bundle"))
    log = RequestLog(request_log_config(folder))
    models = build_models(bundle, params.serving, params.feast)
    for model in models:
        model.request_log = log
    return {model.name: model for model in models}, log, folder


def test_every_endpoint_logs_what_it_answered(logged_models):
    from kserve import InferInput, InferRequest

    models, log, folder = logged_models
    v1 = models["recommend"].answer({"instances": [{"user_id": 5, "n": 4}, {"user_id": 999_999}]}, "abc")
    ranked = models["ranking"].answer({"instances": [{"user_id": 5, "item_ids": [1, 2, 3]}]})
    user = InferInput("user_id", [2], "INT64", data=[5, 6])
    request = InferRequest("retrieval", [user], request_id="v2-id", parameters={"k": 3})
    v2 = models["retrieval"].answer(request)
    log.flush()
    rows = read_request_log(str(folder)).to_pylist()
    by = {(r["endpoint"], r["user_id"]): r for r in rows}
    assert len(rows) == 5
    first, cold = v1["predictions"]
    logged = by[("recommend", 5)]
    assert logged["request_id"] == "abc" and logged["item_ids"] == first["item_ids"]
    assert np.allclose(logged["scores"], first["scores"], atol=1e-6)
    assert logged["model"] == first["ranker"] and logged["bundle_version"] == first["bundle_version"]
    assert logged["candidates"] > len(first["item_ids"]) and '"hist_item_ids"' in logged["features"]
    assert by[("recommend", 999_999)]["model"] == "popular" and by[("recommend", 999_999)]["cold_start"]
    assert cold["source"] == "popular"
    assert by[("ranking", 5)]["item_ids"] == [1, 2, 3] and by[("ranking", 5)]["candidates"] == 3
    assert by[("ranking", 5)]["scores"] == pytest.approx(ranked["predictions"][0]["scores"], abs=1e-6)
    assert v2.id == "v2-id" and {by[("retrieval", u)]["request_id"] for u in (5, 6)} == {"v2-id"}
    assert by[("retrieval", 5)]["model"] == "two_tower" and len(by[("retrieval", 5)]["item_ids"]) == 3
    v1_ids = {r["request_id"] for r in rows if r["endpoint"] == "ranking"}
    assert len(v1_ids) == 1 and len(next(iter(v1_ids))) == 32  # a new id when the client gave none
