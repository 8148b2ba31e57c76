"""End to end on the real steps (the tiny-preset ``tiny_pipeline`` fixture: trained models, bundle and
its Feast online store) -> ``python -m serving`` on 127.0.0.1; every model over V1 and V2 with online
features, the
train/serve skew check, and recommend degrading when the online store is unreachable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from models.registry import RANKERS
from serving.local_server import free_port, start_server, stop_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _store_yaml(path: Path, online_db: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "project": "recsys",
                "provider": "local",
                "registry": str(path.parent / "registry.db"),
                "online_store": {"type": "sqlite", "path": str(online_db)},
                "offline_store": {"type": "file"},
                "entity_key_serialization_version": 3,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline, tmp_path_factory):
    """The bundle, Feast repo and training sets of the real tiny-preset DAG (tests/conftest.py)."""
    root = tmp_path_factory.mktemp("serving_e2e")
    repo = tiny_pipeline / "feature_repo"
    raw = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    raw["data"]["synthetic"]["preset"] = "tiny"
    raw["feast"]["repo_path"] = str(repo)  # the pipeline's own registry and online store
    # what is tested here is function, not latency: on a loaded CI machine a 0.25 s online read can time
    # out and turn an answer into a (correctly) degraded one, which these assertions do not expect
    raw["serving"]["feast_timeout_s"] = 10.0
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    training = tiny_pipeline / "data" / "training"
    return {
        "root": root,
        "bundle": tiny_pipeline / "artifacts" / "bundle",
        "params_file": params_file,
        "train": pd.read_parquet(training / "ranking_train.parquet"),
        "test": pd.read_parquet(training / "ranking_test.parquet"),
        "registry": repo / "data" / "registry.db",
    }


@pytest.fixture(scope="module")
def server(pipeline):
    port = free_port()
    process = start_server(pipeline["bundle"], pipeline["params_file"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)
    assert process.returncode is not None


def test_every_model_over_v1_and_v2_with_online_features(server, pipeline):
    user = int(pipeline["train"]["user_id"].iloc[-1])
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        out = http.post(
            "/v1/models/retrieval:predict", json={"instances": [{"user_id": user, "k": 10}]}
        ).json()
        assert len(out["predictions"][0]["item_ids"]) == 10 and not out["predictions"][0]["cold_start"]
        out = http.post(
            "/v2/models/retrieval/infer",
            json={
                "inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [user]}],
                "parameters": {"k": 10},
            },
        )
        assert out.status_code == 200 and out.json()["outputs"][0]["shape"] == [1, 10]
        candidates = out.json()["outputs"][0]["data"]
        out = http.post(
            "/v1/models/ranking:predict", json={"instances": [{"user_id": user, "item_ids": candidates}]}
        )
        assert out.status_code == 200 and out.json()["predictions"][0]["default_item_ids"] == []
        out = http.post(
            "/v2/models/ranking/infer",
            json={
                "inputs": [
                    {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [user]},
                    {"name": "item_ids", "shape": [10], "datatype": "INT64", "data": candidates},
                ]
            },
        )
        assert out.status_code == 200 and len(out.json()["outputs"][0]["data"]) == 10
        out = http.post("/v1/models/recommend:predict", json={"instances": [{"user_id": user}]}).json()
        rec = out["predictions"][0]
        assert rec["source"] == "model" and len(rec["item_ids"]) == 20 and not rec["degraded"]
        manifest = json.loads((pipeline["bundle"] / "manifest.json").read_text())
        assert rec["bundle_version"] == manifest["version"]
        history = set(
            pipeline["train"].loc[pipeline["train"]["user_id"] == user, "hist_item_ids"].iloc[-1].tolist()
        )
        assert not history & set(rec["item_ids"]) or not history  # clicked items are not recommended again
        out = http.post(
            "/v2/models/recommend/infer",
            json={"inputs": [{"name": "user_id", "shape": [2], "datatype": "INT64", "data": [user, 10**9]}]},
        )
        assert out.status_code == 200 and out.json()["outputs"][0]["shape"][0] == 2
        assert "recsys_cold_start_answers_total" in http.get("/metrics").text


def test_served_ranking_scores_equal_offline_scores(server, pipeline):
    """The skew test: features passed as serving gets them (JSON, per user and per item) give the score
    the offline model gives on the point-in-time training row, for every ranker, to 1e-5."""
    import torch

    from models import load_model

    rows = pipeline["test"].sample(25, random_state=0)
    train = pipeline["train"]
    user_cols = [
        "gender",
        "age_bucket",
        "occupation",
        "zip_prefix",
        "hist_item_ids",
        "hist_categories",
        "hist_length",
    ] + [c for c in train.columns if c.startswith("user_") and c != "user_id"]
    item_cols = ["category", "brand", "price"] + [
        c for c in train.columns if c.startswith("item_") and c != "item_id"
    ]
    with httpx.Client(base_url=server, timeout=30) as http:
        for ranker in RANKERS:
            model, encoder = load_model(pipeline["bundle"] / "models" / ranker)
            with torch.inference_mode():
                offline = model.predict(encoder.encode(rows.reset_index(drop=True))).numpy()
            instances = [
                {
                    "user_id": int(r.user_id),
                    "item_ids": [int(r.item_id)],
                    "ranker": ranker,
                    "user_features": {c: _json(getattr(r, c)) for c in user_cols},
                    "item_features": [{c: _json(getattr(r, c)) for c in item_cols}],
                }
                for r in rows.itertuples()
            ]
            served = []
            for start in range(0, len(instances), 8):
                out = http.post(
                    "/v1/models/ranking:predict", json={"instances": instances[start : start + 8]}
                )
                assert out.status_code == 200, out.text
                served += [p["scores"][0] for p in out.json()["predictions"]]
            np.testing.assert_allclose(served, offline, rtol=0, atol=1e-5, err_msg=ranker)
            assert np.std(offline) > 0  # the rows differ, so equal scores are not a constant


def test_recommend_degrades_when_online_store_unreachable(pipeline, tmp_path):
    """A store whose database cannot be opened: start-up and requests succeed on defaults, the failure
    is counted in Prometheus and flagged in the answer."""
    down = tmp_path / "feast"
    down.mkdir()
    (down / "registry.db").write_bytes(pipeline["registry"].read_bytes())
    store_yaml = _store_yaml(down / "feature_store.yaml", tmp_path / "no_such_dir" / "online.db")
    raw = yaml.safe_load(pipeline["params_file"].read_text())
    raw["feast"]["config_file"] = str(store_yaml)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    user = int(pipeline["train"]["user_id"].iloc[-1])
    port = free_port()
    process = start_server(pipeline["bundle"], params_file, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            out = http.post("/v1/models/recommend:predict", json={"instances": [{"user_id": user}]})
            assert out.status_code == 200, out.text
            rec = out.json()["predictions"][0]
            assert rec["degraded"] and len(rec["item_ids"]) == 20
            metrics = http.get("/metrics").text
            counts = [
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith('recsys_online_store_failures_total{entity="user"}')
            ]
            assert counts and counts[0] >= 1
    finally:
        stop_server(process)


def _json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        assert math.isfinite(value)
        return float(value)
    return value


def test_liveness_answers_while_a_heavy_request_runs(server, pipeline):
    """Prediction runs off the event loop: a probe is answered in well under a second while a request
    ranking 64 users x 1000 candidates with DIN keeps a core busy (before, the probe waited for it)."""
    import threading
    import time

    users = pipeline["train"]["user_id"].drop_duplicates().head(64).astype(int).tolist()
    candidates = list(range(1, 1001))
    heavy = {
        "instances": [{"user_id": u, "item_ids": candidates, "ranker": "multi_tower_din"} for u in users]
    }
    timings: dict[str, float] = {}

    def send_heavy() -> None:
        started = time.perf_counter()
        with httpx.Client(base_url=server, timeout=120) as http:
            for _ in range(3):
                assert http.post("/v1/models/ranking:predict", json=heavy).status_code == 200
        timings["heavy"] = time.perf_counter() - started

    worker = threading.Thread(target=send_heavy)
    worker.start()
    probes = []
    with httpx.Client(base_url=server, timeout=30) as http:
        time.sleep(0.2)
        while worker.is_alive():
            started = time.perf_counter()
            assert http.get("/v2/health/live").status_code == 200
            probes.append(time.perf_counter() - started)
            time.sleep(0.05)
    worker.join()
    assert timings["heavy"] > 1.0, "the heavy requests finished too fast to test anything"
    # parsing the 64k-id body and writing the answer stay on the loop: a probe may wait for those, rarely
    assert len(probes) >= 5 and sorted(probes)[int(0.9 * len(probes))] < 0.25, (sorted(probes), timings)


def test_the_probe_table_against_the_live_server(server, pipeline):
    """serving/probe.py: every bad or hostile request gets its status, naming the field, and
    the server is alive after each."""
    from recsys.config import load_params
    from serving.probe import cases, probe

    limits = load_params(pipeline["params_file"]).serving
    outcomes = probe(server, cases(limits.max_batch, limits.max_request_bytes))
    failed = [(o.case.name, o.status, o.text[:200]) for o in outcomes if not o.ok]
    assert not failed, failed
    assert len(outcomes) >= 25


def test_the_monitor_on_the_live_server_finds_a_stale_online_store(pipeline, tiny_pipeline, tmp_path):
    """Served traffic checked end to end: the server's request log, Feast's offline point-in-time join of
    the same users, the real bundle. As served, the user profiles equal the offline ones; after newer
    profile rows reach the offline tables but not the online store (a missed materialization), the skew
    check fails on those features and names them."""
    import shutil

    from components import monitor
    from recsys.config import load_params

    params = load_params(pipeline["params_file"])
    log_dir = tmp_path / "request_log"
    users = pipeline["test"]["user_id"].sample(n=120, replace=True, random_state=0).astype(int).tolist()
    port = free_port()
    process = start_server(pipeline["bundle"], pipeline["params_file"], port, ["--request_log", str(log_dir)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for start in range(0, len(users), 8):
                body = {"instances": [{"user_id": u} for u in users[start : start + 8]]}
                assert http.post("/v1/models/recommend:predict", json=body).status_code == 200
    finally:
        stop_server(process)  # the request log is written on SIGTERM

    def check(features_dir: Path, name: str) -> dict:
        offline = monitor.OfflineFeatures(params.feast, params.features, params.training_set, features_dir)
        return monitor.run(
            params.monitor.model_copy(update={"min_answers": 50}),
            params.serving,
            tiny_pipeline / "data" / "raw",
            tiny_pipeline / "data" / "training",
            pipeline["bundle"],
            tmp_path / name / "monitor.json",
            tmp_path / name / "monitor.prom",
            tmp_path / name / "monitor.html",
            request_log_uri=str(log_dir),
            offline=offline,
        )

    features = tiny_pipeline / "data" / "features"
    served = check(features, "served")
    skew = served["checks"]["skew"]
    assert served["answers"] == len(users) and served["checks"]["online_recall"]["status"] == "ok"
    profile = ("gender", "age_bucket", "occupation", "zip_prefix")
    assert all(skew["match_rate"][name] == 1.0 for name in profile), skew["match_rate"]

    stale = tmp_path / "features"
    shutil.copytree(features, stale)
    table = pd.read_parquet(stale / "user_profile.parquet")
    end = max(pd.read_parquet(features / f"{n}.parquet")["event_timestamp"].max() for n in ("user_stats",))
    moved = table.assign(zip_prefix="zzz", event_timestamp=end)  # every user moved, one row newer each
    pd.concat([table, moved], ignore_index=True).to_parquet(stale / "user_profile.parquet")
    found = check(stale, "stale")["checks"]["skew"]
    assert found["status"] == "fail" and found["feature"] == "zip_prefix"
    assert found["match_rate"]["zip_prefix"] == 0.0 and "zip_prefix" in found["message"]
    assert found["match_rate"]["gender"] == 1.0
