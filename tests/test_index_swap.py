"""Index swap (serving/index_swap.py): a running server takes up a refreshed index promoted to the store
(same models, more items) without a restart, and nothing else: a version with other models is left to a
rollout, a damaged one is refused while the old one serves on. In process through the models, then under
load through a real server whose clients never see a failed answer or a version going back."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from components import promote
from components.bundle import assemble_bundle
from components.index_refresh import grow_bundle
from recsys import artifact_layout as layout
from recsys.bundle_manifest import load_manifest
from recsys.config import ConfigError
from recsys.request_records import read_request_log
from serving.index_swap import FAILED, SKIPPED_NEW_MODEL, SWAPPED, SWAPS
from tests.conftest import (
    offline_serving_params,
    request_log_config,
    revalidated,
    shipped_params,
    small_serving_bundle,
    write_params,
)

NEW_ID_OFFSET = 100_000  # new items: every old item's vector again under id + offset (ties: top-2 has one)


# ---- bundles ------------------------------------------------------------------------------------


def refreshed_bundle(bundle_dir: Path, out_dir: Path, offset: int = NEW_ID_OFFSET) -> Path:
    """What an index refresh promotes (components.index_refresh.grow_bundle): ``bundle_dir``'s model files
    as they are, the index and item embeddings grown by a copy of every item under ``id + offset``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(bundle_dir / layout.ITEM_EMBEDDINGS))
    old_ids, vectors = tensors["item_ids"].astype(np.int64), tensors["embeddings"].astype(np.float32)
    added = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # unit vectors, as exported
    grow_bundle(bundle_dir, old_ids + offset, added, out_dir)
    return out_dir


def new_model_bundle(bundle_dir: Path, out_dir: Path) -> Path:
    """A bundle whose models are not the served ones (one model file changed): a rollout's business."""
    manifest = load_manifest(bundle_dir)
    files = {name: bundle_dir / name for name in manifest["files"]}
    config = out_dir.parent / f"{out_dir.name}-config.json"
    config.write_text(json.dumps(json.loads((bundle_dir / "models/dlrm/config.json").read_text()), indent=1))
    files["models/dlrm/config.json"] = config
    return _assemble(manifest, files, out_dir)


def _assemble(manifest: dict, files: dict[str, Path], out_dir: Path) -> Path:
    declared = {k.split(":", 1)[1]: v for k, v in manifest["dims"].items() if k.startswith("declared:")}
    return assemble_bundle(
        files,
        out_dir,
        params_text=yaml.safe_dump(manifest["params"]),
        metrics=manifest["metrics"],
        git_revision="test",
        embedding_dims=declared,
    )


def promoted(bundle: Path, store_uri: str) -> str:
    """Promote ``bundle`` (components.promote, as the pipeline does); its version."""
    promote.run(revalidated(shipped_params().promote, uri=store_uri, version=None), bundle)
    return load_manifest(bundle)["version"]


def version_of(bundle: Path) -> str:
    return load_manifest(bundle, verify=False)["version"]


def swaps(outcome: str) -> float:
    return SWAPS.labels(outcome=outcome)._value.get()


def wait_for(condition, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index_swap")
    old = small_serving_bundle(offline_serving_params(), root)
    return {
        "old": old,
        "refreshed": refreshed_bundle(old, root / "refreshed"),
        "damaged": refreshed_bundle(old, root / "damaged", offset=200_000),
        "new_model": new_model_bundle(old, root / "new_model"),
    }


# ---- in process ---------------------------------------------------------------------------------

INTERVAL_S = 0.05


@pytest.fixture
def store(tmp_path) -> tuple[Path, str]:
    folder = tmp_path / "store"
    return folder, folder.resolve().as_uri()


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The temp folder the poller downloads into (the process's ``tempfile.tempdir`` for the test)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def models(bundles, store, scratch, tmp_path):
    """The three models over the old bundle (promoted), polling the store, writing a request log."""
    from serving.server import load_serving_bundle, models_from_bundle

    _, uri = store
    promoted(bundles["old"], uri)
    params = offline_serving_params()
    params.serving.index_swap = revalidated(params.serving.index_swap, store_uri=uri, interval_s=INTERVAL_S)
    bundle = load_serving_bundle(bundles["old"], params.serving)
    from serving.request_log import RequestLog

    log = RequestLog(request_log_config(tmp_path / "request_log"))
    built = {m.name: m for m in models_from_bundle(bundle, params.serving, params.feast, log)}
    yield built
    for model in built.values():
        model.close()


def answers(models) -> dict[str, object]:
    """One V1 recommend, one V2 retrieval (k=10) for user 5: the versions reported, the items retrieved."""
    from kserve import InferInput, InferRequest

    v1 = models["recommend"].answer({"instances": [{"user_id": 5, "n": 5}]})["predictions"][0]
    request = InferRequest("retrieval", [InferInput("user_id", [1], "INT64", data=[5])], parameters={"k": 10})
    v2 = models["retrieval"].answer(request)
    return {
        "v1": v1["bundle_version"],
        "v2": v2.parameters["bundle_version"],
        "items": v2.outputs[0].as_numpy().ravel().tolist(),
    }


def test_a_refreshed_index_is_swapped_in_and_others_are_not(bundles, models, store, scratch, tmp_path):
    _, uri = store
    old, new = version_of(bundles["old"]), version_of(bundles["refreshed"])
    rec = models["recommend"].recommender
    swap = models["recommend"].index_swap
    assert swap is not None and models["retrieval"].index_swap is swap  # one poller per process
    before = answers(models)
    assert before["v1"] == before["v2"] == old and max(before["items"]) < NEW_ID_OFFSET

    # other models: never swapped, said once
    skipped = swaps(SKIPPED_NEW_MODEL)
    promoted(bundles["new_model"], uri)
    wait_for(lambda: swaps(SKIPPED_NEW_MODEL) == skipped + 1, what="the new model skipped")
    time.sleep(5 * INTERVAL_S)
    assert swaps(SKIPPED_NEW_MODEL) == skipped + 1 and models["recommend"].version == old

    # a version damaged in the store after promote: refused by the loader's checks, old one serves on
    failed = swaps(FAILED)
    with swap._lock:  # no poll between the promotion and the damage
        damaged = promoted(bundles["damaged"], uri)
        index_file = store[0] / damaged / layout.INDEX
        data = bytearray(index_file.read_bytes())
        data[-8] ^= 0xFF  # same size, other bytes
        index_file.write_bytes(bytes(data))
    wait_for(lambda: swaps(FAILED) > failed, what="the damaged version refused")
    assert answers(models)["v1"] == old
    with swap._lock:
        assert not list(scratch.iterdir())  # the refused download is gone

    # the refreshed index: swapped within a few intervals; a request holding the old snapshot keeps it
    holding = rec.snapshot()
    swapped = swaps(SWAPPED)
    promoted(bundles["refreshed"], uri)
    wait_for(lambda: models["retrieval"].version == new, what="the refreshed version served")
    assert swaps(SWAPPED) == swapped + 1
    after = answers(models)
    assert after["v1"] == after["v2"] == new
    assert any(item >= NEW_ID_OFFSET for item in after["items"])  # new items are retrieved
    assert len(rec.bundle.catalogue) == 2 * len(holding.bundle.catalogue)
    assert rec.bundle.two_tower is holding.bundle.two_tower  # the served models, not reloaded copies
    (result,) = rec.recommend([5], [5], ["multi_tower"], [None], holding)
    assert result.bundle_version == old  # computed from, and reporting, the snapshot it took
    ranked = models["ranking"].answer(
        {"instances": [{"user_id": 5, "item_ids": [1, 1 + NEW_ID_OFFSET], "ranker": "dlrm"}]}
    )["predictions"][0]
    assert ranked["bundle_version"] == new and np.isfinite(ranked["scores"]).all()

    # the request log and the answer counters carry the version each answer came from
    log = models["recommend"].request_log
    log.flush()
    rows = read_request_log(str(tmp_path / "request_log")).to_pylist()
    assert {r["bundle_version"] for r in rows} == {old, new}
    from serving.endpoints import ANSWERS

    assert ANSWERS.labels(endpoint="retrieval", bundle_version=new)._value.get() >= 1

    # stop: the thread ends and the temp dir of the served copy goes
    assert [p.name for p in scratch.iterdir()] == [swap._dir.name]  # the served copy only
    models["recommend"].close()
    assert not swap._thread.is_alive() and not list(scratch.iterdir())


def test_a_refreshed_index_is_taken_up_from_s3(bundles, s3_env, scratch):
    """The same through the S3 API (a real server on loopback), as in the cluster."""
    from serving.server import build_models

    uri = s3_env.uri("bundles")
    promoted(bundles["old"], uri)
    params = offline_serving_params()
    params.serving.index_swap = revalidated(params.serving.index_swap, store_uri=uri, interval_s=INTERVAL_S)
    built = build_models(bundles["old"], params.serving, params.feast)
    try:
        promoted(bundles["refreshed"], uri)
        wait_for(lambda: built[0].version == version_of(bundles["refreshed"]), what="swapped from S3")
        (answer,) = built[0].answer({"instances": [{"user_id": 5, "k": 200}]})["predictions"]
        assert len(answer["item_ids"]) == 160 and answer["bundle_version"] == built[0].version
    finally:
        for model in built:
            model.close()
    assert not list(scratch.iterdir())


def test_a_promoted_bundle_equal_to_the_served_one_is_left_alone(bundles, models):
    swap = models["recommend"].index_swap
    for _ in range(3):
        assert swap.poll_once() is None


def test_a_swap_needs_the_served_model_objects(bundles):
    from serving.bundle import load_bundle
    from serving.server import build_models

    params = offline_serving_params()
    rec = build_models(bundles["old"], params.serving, params.feast)[0].recommender
    other = load_bundle(bundles["refreshed"], params.serving.default_ranker)  # its own model objects
    with pytest.raises(ValueError, match="rollout"):
        rec.swap(rec.prepare(other))
    assert rec.bundle.version == version_of(bundles["old"])


def test_a_store_uri_that_is_not_a_store_stops_start_up(bundles):
    from serving.server import build_models

    params = offline_serving_params()
    params.serving.index_swap = revalidated(params.serving.index_swap, store_uri="/no/scheme")
    with pytest.raises(ConfigError, match=r"index_swap\.store_uri"):
        build_models(bundles["old"], params.serving, params.feast)


# ---- under load ---------------------------------------------------------------------------------

CLIENTS = 4


def server_tmpdir(tmp_path: Path, monkeypatch) -> Path:
    """The server's temp folder (``TMPDIR`` of the subprocess), to see what it leaves behind."""
    folder = tmp_path / "server_tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_a_server_under_load_swaps_without_a_failed_or_backward_answer(bundles, tmp_path, monkeypatch):
    import httpx

    from serving.local_server import free_port, start_server

    scratch = server_tmpdir(tmp_path, monkeypatch)
    store_uri = (tmp_path / "store").resolve().as_uri()
    old = promoted(bundles["old"], store_uri)
    new = version_of(bundles["refreshed"])
    params_file = write_params(tmp_path / "params.yaml", {"serving.index_swap.interval_s": 0.2})
    request_log = tmp_path / "request_log"
    extra = ["--no_online_store", "--index_swap_from", store_uri, "--request_log", str(request_log)]
    port = free_port()
    process = start_server(bundles["old"], params_file, port, extra)
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    seen: list[list[tuple[int, str | None]]] = [[] for _ in range(CLIENTS)]

    def client(i: int) -> None:
        bodies = [
            ("/v1/models/recommend:predict", {"instances": [{"user_id": 5 + i, "n": 5}]}),
            ("/v1/models/retrieval:predict", {"instances": [{"user_id": 5 + i, "k": 10}]}),
        ]
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                path, body = bodies[len(seen[i]) % 2]
                answer = http.post(path, json=body)
                version = (
                    answer.json()["predictions"][0]["bundle_version"] if answer.status_code == 200 else None
                )
                seen[i].append((answer.status_code, version))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(s) >= 5 for s in seen), what="every client answered")
        promoted(bundles["refreshed"], store_uri)
        promoted_at = time.monotonic()
        wait_for(lambda: all(s and s[-1][1] == new for s in seen), timeout_s=30, what="the new version")
        took_s = time.monotonic() - promoted_at
        time.sleep(0.5)  # more answers after the swap
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        process.terminate()
        code = process.wait(30)
    assert code == 0
    for answers_of_client in seen:
        assert {status for status, _ in answers_of_client} == {200}
        versions = [v for _, v in answers_of_client]
        assert set(versions) == {old, new}
        first_new = versions.index(new)
        assert all(v == new for v in versions[first_new:])  # never back from new to old
    assert took_s < 10
    rows = read_request_log(str(request_log)).to_pylist()
    assert {r["bundle_version"] for r in rows} == {old, new}
    assert sum(len(s) for s in seen) == len(rows)
    assert not list(scratch.glob("recsys-index-swap-*"))  # the served copy removed at stop


def test_every_worker_process_takes_up_the_refreshed_index(bundles, tmp_path, monkeypatch):
    """A poller per forked worker (threads do not survive a fork): each swaps, /metrics sums them."""
    import re

    import httpx

    from serving.local_server import free_port, start_server

    scratch = server_tmpdir(tmp_path, monkeypatch)
    store_uri = (tmp_path / "store").resolve().as_uri()
    promoted(bundles["old"], store_uri)
    new = version_of(bundles["refreshed"])
    params_file = write_params(tmp_path / "params.yaml", {"serving.index_swap.interval_s": 0.2})
    extra = ["--no_online_store", "--workers", "2", "--index_swap_from", store_uri, "--request_log", "off"]
    port = free_port()
    process = start_server(bundles["old"], params_file, port, extra)
    base = f"http://127.0.0.1:{port}"

    def swapped() -> float:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        found = re.search(r'^recsys_index_swaps_total\{outcome="swapped"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    try:
        assert swapped() == 0
        promoted(bundles["refreshed"], store_uri)
        wait_for(lambda: swapped() == 2, timeout_s=30, what="both workers swapped")
        for _ in range(10):  # a new connection each: the kernel picks the worker
            answer = httpx.post(f"{base}/v1/models/recommend:predict", json={"instances": [{"user_id": 5}]})
            assert answer.status_code == 200 and answer.json()["predictions"][0]["bundle_version"] == new
    finally:
        process.terminate()
        code = process.wait(60)
    assert code == 0
    assert not list(scratch.glob("recsys-index-swap-*"))
