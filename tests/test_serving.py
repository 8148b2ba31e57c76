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
from benchmarks.serving_bundle import build_serving_bundle, item_catalogue, synthetic_training_frame
from recsys.config import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params():
    params = load_params(ROOT / "params.yaml")
    params.serving.online_store = False
    params.serving.max_batch = 8
    return params


@pytest.fixture(scope="module")
def bundle_dir(params, tmp_path_factory) -> Path:
    train = synthetic_training_frame(60, 80, 1_000, params.features.stats_windows_days, seed=1)
    item_cols = ["item_id", "category", "brand", "price"] + [
        c for c in train.columns if c.startswith("item_") and c != "item_id"
    ]
    tmp = tmp_path_factory.mktemp("serving")
    return build_serving_bundle(train, item_catalogue(train, item_cols), params, tmp / "bundle", tmp / "work")


@pytest.fixture(scope="module")
def client(params, bundle_dir):
    from fastapi.testclient import TestClient
    from kserve import ModelServer

    from serving.server import build_models, create_app

    server = ModelServer(enable_grpc=False)
    for model in build_models(bundle_dir, params.serving, params.feast):
        server.register_model(model)
    return TestClient(create_app(server))


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
    ("recommend", v2({"user_id": ["abc"]}), "inputs.user_id[0]"),
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
