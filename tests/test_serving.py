"""In-process tests of the model server: every model over V1 and V2 through KServe's real FastAPI app,
the bad-request table (each case a 400 naming the field, the server still answering afterwards), cold
start for unknown users and items, and start-up refusing a bundle whose checksum does not match."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from recsys.config import load_params
from tests.conftest import small_serving_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    params = load_params(ROOT / "params.yaml")
    params.serving.online_store = False
    params.serving.max_batch = 8
    return params


@pytest.fixture(scope="module")
def bundle_dir(params, tmp_path_factory) -> Path:
    return small_serving_bundle(params, tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def kserve_server(params, bundle_dir):
    from kserve import ModelServer

    from serving.server import build_models

    server = ModelServer(enable_grpc=False)
    for model in build_models(bundle_dir, params.serving, params.feast):
        server.register_model(model)
    return server


@pytest.fixture(scope="module")
def client(params, kserve_server):
    from fastapi.testclient import TestClient

    from serving.server import create_app

    return TestClient(create_app(kserve_server, params.serving.max_request_bytes))


def v2(inputs: dict, parameters: dict | None = None) -> dict:
    tensors = []
    for name, values in inputs.items():
        datatype = (
            "BYTES" if isinstance(values[0], str) else "FP64" if isinstance(values[0], float) else "INT64"
        )
        tensors.append({"name": name, "shape": [len(values)], "datatype": datatype, "data": values})
    body: dict = {"inputs": tensors}
    if parameters:
        body["parameters"] = parameters
    return body


def test_health_and_model_readiness(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    for name in ("retrieval", "ranking", "recommend"):
        assert client.get(f"/v1/models/{name}").json() == {"name": name, "ready": True}
        assert client.get(f"/v2/models/{name}/ready").status_code == 200


def test_retrieval_v1_and_v2_agree(client, bundle_dir):
    import json

    version = json.loads((bundle_dir / "manifest.json").read_text())["version"]
    v1 = client.post("/v1/models/retrieval:predict", json={"instances": [{"user_id": 5, "k": 7}]})
    assert v1.status_code == 200, v1.text
    prediction = v1.json()["predictions"][0]
    assert len(prediction["item_ids"]) == 7 and prediction["bundle_version"] == version
    assert prediction["scores"] == sorted(prediction["scores"], reverse=True)
    out = client.post("/v2/models/retrieval/infer", json=v2({"user_id": [5]}, {"k": 7}))
    assert out.status_code == 200, out.text
    outputs = {o["name"]: o for o in out.json()["outputs"]}
    assert outputs["item_ids"]["shape"] == [1, 7]
    assert outputs["item_ids"]["data"] == prediction["item_ids"]
    assert outputs["scores"]["data"] == pytest.approx(prediction["scores"], abs=1e-6)
    assert out.json()["parameters"]["bundle_version"] == version


def test_retrieval_from_features_only(client):
    body = {"instances": [{"features": {"gender": "F", "age_bucket": 25, "hist_item_ids": [3, 4]}, "k": 3}]}
    out = client.post("/v1/models/retrieval:predict", json=body)
    assert out.status_code == 200, out.text
    assert len(out.json()["predictions"][0]["item_ids"]) == 3


def test_ranking_v1_v2_and_rankers(client):
    items = [1, 2, 3, 999_999]  # the last is unknown to the store and the models: default path
    outs = {}
    for ranker in ("multi_tower", "multi_tower_din", "dlrm"):
        body = {"instances": [{"user_id": 5, "item_ids": items, "ranker": ranker}]}
        out = client.post("/v1/models/ranking:predict", json=body)
        assert out.status_code == 200, out.text
        prediction = out.json()["predictions"][0]
        assert prediction["ranker"] == ranker and prediction["item_ids"] == items
        assert 999_999 in prediction["default_item_ids"]
        outs[ranker] = prediction["scores"]
    assert outs["multi_tower"] != outs["dlrm"]  # the request's ranker is the one that scores
    out = client.post(
        "/v2/models/ranking/infer", json=v2({"user_id": [5], "item_ids": items}, {"ranker": "dlrm"})
    )
    assert out.status_code == 200, out.text
    scores = out.json()["outputs"][0]
    assert scores["name"] == "scores" and scores["shape"] == [4]
    assert scores["data"] == pytest.approx(outs["dlrm"], abs=1e-6)


def test_v1_answers_log_no_deprecation_warning_per_request(client):
    """KServe's V1 endpoints use FastAPI's deprecated ORJSONResponse, a warning per answer unless the
    server's filter is on; the filter silences that warning only."""
    from serving.server import silence_kserve_deprecations

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]})
        assert [w for w in caught if "ORJSONResponse" in str(w.message)]  # KServe still uses it
        caught.clear()
        silence_kserve_deprecations()
        for _ in range(3):
            out = client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]})
            assert out.status_code == 200, out.text
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_recommend_v1_v2_and_cold_start(client):
    body = {
        "instances": [{"user_id": 5, "n": 4, "context": {"exclude_item_ids": [1, 2]}}, {"user_id": 10**9}]
    }
    out = client.post("/v1/models/recommend:predict", json=body)
    assert out.status_code == 200, out.text
    known, unknown = out.json()["predictions"]
    assert known["source"] == "model" and len(known["item_ids"]) == 4
    assert not {1, 2} & set(known["item_ids"])
    assert known["scores"] == sorted(known["scores"], reverse=True)
    assert unknown["source"] == "popular" and unknown["cold_start"] and len(unknown["item_ids"]) == 20
    out = client.post("/v2/models/recommend/infer", json=v2({"user_id": [5, 6]}, {"n": 3}))
    assert out.status_code == 200, out.text
    outputs = {o["name"]: o for o in out.json()["outputs"]}
    assert outputs["item_ids"]["shape"] == [2, 3] and outputs["counts"]["data"] == [3, 3]


BAD_V1 = [
    ("retrieval", b'{"instances": [{"user_id": 1', "Unrecognized request format"),
    ("retrieval", {"instances": [{"user_id": "7"}]}, "instances[0].user_id"),
    ("retrieval", {"instances": [{}]}, "user_id' or 'features'"),
    ("retrieval", {"instances": []}, "instances: List should have at least 1 item"),
    ("retrieval", {"instances": [{"user_id": 1}] * 9}, "instances: List should have at most 8 items"),
    ("retrieval", {"instances": [{"user_id": 1, "k": 0}]}, "instances[0].k"),
    ("retrieval", {"instances": [{"user_id": 1, "k": 100_000}]}, "instances[0].k"),
    (
        "retrieval",
        {"instances": [{"user_id": 1, "features": {"price_typo": 1}}]},
        "instances[0].features.price_typo",
    ),
    (
        "retrieval",
        {"instances": [{"user_id": 1, "features": {"user_ctr_7d": "0.5"}}]},
        "features.user_ctr_7d",
    ),
    ("retrieval", {"inputs": []}, "unknown field(s) ['inputs']"),
    ("retrieval", {"no_instances": 1}, "unknown field"),
    ("ranking", {"instances": [{"user_id": 1}]}, "instances[0].item_ids: Field required"),
    ("ranking", {"instances": [{"user_id": 1, "item_ids": []}]}, "instances[0].item_ids"),
    ("ranking", {"instances": [{"user_id": 1, "item_ids": [1, 2.5]}]}, "instances[0].item_ids[1]"),
    ("ranking", {"instances": [{"user_id": 1, "item_ids": [1], "ranker": "xgb"}]}, "instances[0].ranker"),
    (
        "ranking",
        {"instances": [{"user_id": 1, "item_ids": [1, 2], "item_features": [{}]}]},
        "item_features has 1",
    ),
    (
        "ranking",
        {"instances": [{"user_id": 1, "item_ids": [1], "user_features": {"gender": 3}}]},
        "user_features.gender",
    ),
    ("recommend", {"instances": [{"user_id": 1, "n": 0}]}, "instances[0].n"),
    ("recommend", {"instances": [{"user_id": 1, "n": 101}]}, "instances[0].n"),
    ("recommend", {"instances": [{"user_id": True}]}, "instances[0].user_id"),
    ("recommend", {"instances": [{"user_id": 2**63}]}, "instances[0].user_id"),
    ("recommend", {"instances": {"user_id": 1}}, "instances"),
    ("recommend", [1, 2], "request body"),
]


@pytest.mark.parametrize(("model", "body", "message"), BAD_V1, ids=[f"v1-{i}" for i in range(len(BAD_V1))])
def test_bad_v1_requests_are_400_naming_the_field(client, model, body, message):
    url = f"/v1/models/{model}:predict"
    if isinstance(body, bytes):
        out = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        out = client.post(url, json=body)
    assert out.status_code == 400, out.text
    assert message in out.json()["error"]
    assert (
        client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]}).status_code == 200
    )


NAN_BODY = (
    b'{"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]},'
    b' {"name": "user_ctr_7d", "shape": [1], "datatype": "FP64", "data": [NaN]}]}'
)
BAD_V2 = [
    ("retrieval", b'{"inputs": [', "json"),
    ("retrieval", {"inputs": "x"}, "inputs"),
    ("retrieval", {}, "inputs: Field required"),
    ("retrieval", NAN_BODY, "inputs.user_ctr_7d[0]: Input should be a finite number"),
    ("retrieval", v2({"user_id": [1]}, {"k": 0}), "parameters.k"),
    ("retrieval", v2({"user_id": [1]}, {"kk": 3}), "unknown parameter"),
    ("retrieval", v2({"user_id": [1], "colour": ["red"]}), "unknown input(s) ['colour']"),
    ("retrieval", v2({"user_id": [1], "gender": ["F", "M"]}), "same batch size"),
    (
        "retrieval",
        {"inputs": [{"name": "user_id", "shape": [2], "datatype": "INT64", "data": [1]}]},
        "shape [2]",
    ),
    ("ranking", v2({"user_id": [1, 2], "item_ids": [1]}), "one user per V2 ranking request"),
    ("ranking", v2({"user_id": [1]}), "inputs.item_ids: required"),
    ("ranking", v2({"user_id": [1], "item_ids": [1]}, {"ranker": "nope"}), "parameters.ranker"),
    ("recommend", v2({"user_id": ["abc"]}), "inputs.user_id.datatype: ids are INT64"),
    (
        "recommend",
        {"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": ["abc"]}]},
        "inputs.user_id",
    ),
    ("recommend", v2({"user_id": list(range(9))}), "at most 8"),
    ("recommend", v2({"user_id": [1]}, {"n": 1000}), "parameters.n"),
]


@pytest.mark.parametrize(("model", "body", "message"), BAD_V2, ids=[f"v2-{i}" for i in range(len(BAD_V2))])
def test_bad_v2_requests_are_400_naming_the_field(client, model, body, message):
    url = f"/v2/models/{model}/infer"
    if isinstance(body, bytes):
        out = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        out = client.post(url, json=body)
    assert out.status_code == 400, out.text
    assert message.lower() in out.json()["error"].lower()
    assert client.post("/v2/models/recommend/infer", json=v2({"user_id": [5]})).status_code == 200


def test_metrics_endpoint_exposes_kserve_and_recsys_counters(client):
    client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 10**9}]})
    text = client.get("/metrics").text
    assert "request_predict_seconds" in text
    assert 'recsys_cold_start_answers_total{model="recommend"}' in text


def test_corrupted_bundle_stops_startup_naming_the_file(bundle_dir, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(bundle_dir, broken)
    weights = broken / "models" / "dlrm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--model_dir",
            str(broken),
            "--http_port",
            "0",
            "--host",
            "127.0.0.1",
            "--no_online_store",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "models/dlrm/model.safetensors" in done.stderr and "SHA-256" in done.stderr


def test_bundle_without_default_ranker_is_refused(params, bundle_dir, tmp_path):
    from recsys.bundle_manifest import BundleIntegrityError

    with pytest.raises(BundleIntegrityError, match="default_ranker 'dlrm'"):
        _drop_ranker_and_load(bundle_dir, tmp_path, "dlrm")


def _drop_ranker_and_load(bundle_dir: Path, tmp_path: Path, kind: str):
    import json

    from components.bundle import assemble_bundle
    from serving.bundle import load_bundle

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = {name: bundle_dir / name for name in manifest["files"] if not name.startswith(f"models/{kind}/")}
    out = assemble_bundle(files, tmp_path / "no_ranker", params_text="{}", metrics={})
    return load_bundle(out, kind)


# ---- the HTTP surface under abuse (issue: serving under attack and load) ---------------------------


def test_model_repository_routes_are_not_served(client):
    """Anyone reaching the port could unload every model through KServe's repository extension."""
    for verb in ("unload", "load"):
        assert client.post(f"/v2/repository/models/recommend/{verb}").status_code == 404
    assert (
        client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]}).status_code == 200
    )
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/v2/repository")]


def test_readiness_requires_every_model_loaded(client, kserve_server):
    model = kserve_server.dataplane.model_registry.get_model("ranking")
    model.ready = False
    try:
        answer = client.get("/v2/health/ready")
        assert answer.status_code == 503 and answer.json()["not_ready"] == ["ranking"]
    finally:
        model.ready = True
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_a_body_over_the_limit_is_413_before_it_is_parsed(client, params):
    limit = params.serving.max_request_bytes
    body = b'{"instances": [' + b" " * limit + b"]}"
    answer = client.post(
        "/v1/models/recommend:predict", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413 and "serving.max_request_bytes" in answer.json()["error"]
    streamed = client.post(  # no Content-Length: counted while it arrives
        "/v2/models/recommend/infer", content=iter([body[: limit // 2], body[limit // 2 :]])
    )
    assert streamed.status_code == 413
    assert (
        client.post("/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]}).status_code == 200
    )


ONE_USER = {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ({"id": "x" * 10_000, "inputs": [ONE_USER]}, {}, "id: 10000 characters"),
        ({"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}], "colour": 1},
         {}, "unknown field(s) ['colour']"),
        ({"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}],
          "outputs": [{"name": "nope"}]}, {}, "outputs: unknown output(s) ['nope']"),
        ({"inputs": [{"name": "user_id", "shape": [1], "datatype": "WHAT", "data": [1]}]},
         {}, "inputs.user_id.datatype: unknown datatype 'WHAT'"),
        ({"inputs": [{"name": "user_id", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
         {}, "inputs.user_id.datatype: ids are INT64"),
        ({"inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}]},
         {"Inference-Header-Content-Length": "abc"}, "Inference-Header-Content-Length"),
    ],
)  # fmt: skip
def test_v2_envelope_faults_are_400_naming_the_field(client, body, headers, field):
    import json

    answer = client.post(
        "/v2/models/recommend/infer",
        content=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    assert answer.status_code == 400, answer.text
    assert field in answer.text
    assert client.get("/v2/health/live").status_code == 200


def test_a_binary_tensor_of_the_wrong_size_is_a_4xx(client):
    import json

    header = json.dumps(
        {
            "inputs": [
                {"name": "user_id", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 5}}
            ]
        }
    ).encode()
    answer = client.post(
        "/v2/models/recommend/infer",
        content=header + b"\x01\x00\x00\x00\x00",  # 5 bytes for one INT64 (8)
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert 400 <= answer.status_code < 500, answer.text


@pytest.mark.parametrize("value", [1e308, 1e40, -1e40])
def test_extreme_dense_values_are_refused_not_answered_wrongly(client, value):
    answer = client.post(
        "/v1/models/recommend:predict",
        json={"instances": [{"user_id": 5, "context": {"features": {"user_ctr_7d": value}}}]},
    )
    assert answer.status_code == 400 and "user_ctr_7d" in answer.text and "trained on" in answer.text
    ordinary = client.post(
        "/v1/models/recommend:predict",
        json={"instances": [{"user_id": 5, "context": {"features": {"user_ctr_7d": 0.3}}}]},
    )
    assert ordinary.status_code == 200 and ordinary.json()["predictions"][0]["scores"]


def test_non_finite_scores_are_an_error_never_a_success(client, kserve_server, monkeypatch):
    import math

    model = kserve_server.dataplane.model_registry.get_model("ranking")
    original = model.run

    def broken(instances):
        results = original(instances)
        results[0].scores[0] = math.nan
        return results

    monkeypatch.setattr(model, "run", broken)
    answer = client.post(
        "/v1/models/ranking:predict", json={"instances": [{"user_id": 5, "item_ids": [1, 2, 3]}]}
    )
    assert answer.status_code == 500 and "non-finite scores" in answer.text


# ---- the server's own log and the online store at start-up and under it (issue: serving probe) ------


def test_a_bad_request_logs_one_escaped_line_without_a_traceback(client, caplog):
    """KServe logged each 400 with a ~25-line traceback and the client's text raw (newlines, terminal
    escapes: a client could forge log lines); now one line, escaped and cut short."""
    import logging

    forged = "colour\n2026-01-01 00:00:00 root ERROR \x1b[31mforged line" + "y" * 5_000
    kserve_log = logging.getLogger("kserve")  # as configured by KServe, it does not reach the root's caplog
    separate = not kserve_log.propagate
    if separate:
        kserve_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            answer = client.post(
                "/v1/models/retrieval:predict", json={"instances": [{"user_id": 1, "features": {forged: 1}}]}
            )
    finally:
        if separate:
            kserve_log.removeHandler(caplog.handler)
    assert answer.status_code == 400 and "forged line" in answer.json()["error"]
    # not counted: the test client's own line (httpx, or httpx2 where huggingface_hub brings it)
    # and KServe's timing trace that every request gets
    records = [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO
        and r.name.split(".")[0] not in ("httpx", "httpx2")
        and r.name != "kserve.trace"
    ]
    assert len(records) == 1, [r.getMessage()[:200] for r in records]
    (record,) = records
    line = record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert "/v1/models/retrieval:predict" in line and "400" in line and "instances[0].features" in line
    assert "\n" not in line and "\x1b" not in line and "\\n2026" in line and "\\x1b[31m" in line
    assert len(line) < 600


def test_a_missing_feast_registry_stops_startup_naming_it(bundle_dir, tmp_path):
    """Before, Feast made an empty registry and start-up died in a traceback: 'Feature service ranking
    does not exist in project recsys', naming no file."""
    from tests.conftest import write_params
    from tests.feast_fixtures import copy_feature_repo

    repo = copy_feature_repo(tmp_path)  # definitions and yaml, nothing registered: no data/registry.db
    params_file = write_params(tmp_path / "params.yaml", {"feast.repo_path": str(repo)})
    command = [sys.executable, "-m", "serving", "--model_dir", str(bundle_dir), "--params", str(params_file)]
    done = subprocess.run(
        [*command, "--http_port", "0", "--host", "127.0.0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    registry = repo / "data" / "registry.db"
    assert done.returncode == 1, done.stderr[-2000:]
    assert "serving: cannot start:" in done.stderr and str(registry) in done.stderr
    assert "Traceback" not in done.stderr and not registry.exists()


def test_a_deleted_online_store_file_is_noticed_by_the_next_request(params, bundle_dir, tmp_path, caplog):
    """Feast keeps its SQLite connection: a deleted file went on being read (or, reopened, was empty), so
    nothing said the store was gone. Now the next read fails: defaults, degraded, counted, one warning; and
    a new file in its place (``dvc repro`` writes its outputs anew) is read instead of the deleted one."""
    import logging
    import sqlite3

    from prometheus_client import REGISTRY

    from serving.server import build_models
    from tests.conftest import revalidated
    from tests.test_serving_startup import handmade_online_store, online_store_file

    feast = handmade_online_store(tmp_path)  # user 1 is in it
    config = revalidated(params.serving, online_store=True, feast_timeout_s=10)
    recommender = build_models(bundle_dir, config, feast)[-1].recommender
    db = online_store_file(feast)

    def recommend_user_1():
        (result,) = recommender.recommend([1], [5], ["multi_tower"], [None])
        return result

    assert not recommend_user_1().degraded and not recommend_user_1().cold_start
    failures = REGISTRY.get_sample_value("recsys_online_store_failures_total", {"entity": "user"}) or 0.0
    saved = db.read_bytes()
    db.unlink()
    with caplog.at_level(logging.WARNING, logger="serving.online_features"):
        gone = recommend_user_1()
    assert gone.degraded and len(gone.item_ids) == 5
    assert not gone.cold_start  # an outage is not a cold start (RecsysColdStartShareHigh stays quiet)
    assert REGISTRY.get_sample_value("recsys_online_store_failures_total", {"entity": "user"}) == failures + 1
    assert len(caplog.records) == 1 and str(db) in caplog.records[0].getMessage()

    db.write_bytes(saved)  # a new file, without user 1: only reading the new file can miss the user
    with sqlite3.connect(db) as connection:
        for (table,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%user%'"
        ):
            connection.execute(f'DELETE FROM "{table}"')
    replaced = recommend_user_1()
    assert not replaced.degraded and replaced.cold_start


def test_catalogue_positions_are_exact_and_safe_under_concurrent_first_use():
    """The encoded catalogue maps candidate ids to rows from a thread pool. pandas' ``get_indexer`` fills
    its hash table lazily and is not thread-safe: concurrent first calls on a fresh, unique index answered
    'Reindexing only valid with uniquely valued Index objects' (a 500 under 8 clients, 2 workers)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from serving.bundle import IdPositions

    ids = np.random.default_rng(0).permutation(np.arange(10, 200_010, 2))
    query = np.array([ids[5], 11, ids[0], 10**12, ids[-1], -3, ids[5]])
    expected = np.array([5, -1, 0, -1, len(ids) - 1, -1, 5])
    for _ in range(20):
        index = IdPositions(ids)  # fresh each round: the first queries race
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(index.positions, [query] * 32))
        assert all(np.array_equal(a, expected) for a in answers)
    with pytest.raises(ValueError, match="duplicate item ids"):
        IdPositions(np.array([3, 1, 3]))
