"""The built images, run for real: the whole tiny DAG through ``kfp.local.DockerRunner`` in the pipeline
image, and the serving image run as production runs it (read-only root, uid 1000, no capabilities, the
bundle mounted read-only, /tmp the only writable mount).

The images are built (or found up to date in Docker's build cache) by ``images/build.py`` at the start
(the session fixtures ``docker_client`` and ``images`` of tests/docker_images.py, shared with
tests/test_image_registry.py), so these tests always run the checkout's code. Without a reachable Docker
daemon every test here skips, saying so; ``.ci/run`` starts one (``images/docker_engine.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from recsys.config import load_params
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.container, pytest.mark.slow]

PARAMS = load_params(REPO_ROOT / "params.yaml")
PIPELINE_IMAGE = PARAMS.pipeline.image
SERVING_IMAGE = f"{PARAMS.deploy.image_repo}:{PARAMS.pipeline.image_tag}"
IMAGE_UID = PARAMS.deploy.run_as_user
TASKS = {
    "configure", "ingest", "features", "validate", "validate-2", "training-set", "monitor", "online-store",
    "train", "train-2", "train-3", "train-4", "evaluate", "export", "build-index", "bundle", "gate",
    "promote", "deploy",
}  # fmt: skip


@pytest.fixture(scope="session")
def container_dag(images, tmp_path_factory) -> dict[str, Path]:
    """The whole tiny-preset DAG, every task in the pipeline image; its run folder, bundle and Feast store."""
    from pipelines.local_run import run_local

    root = tmp_path_factory.mktemp("container_dag")
    os.chmod(root, 0o755)  # the serving container's uid reads the bundle and Feast files below it
    os.chmod(root.parent, 0o755)
    started = time.monotonic()
    bundle = run_local(REPO_ROOT / "params.yaml", preset="tiny", pipeline_root=root, runner="docker")
    print(f"container DAG: {time.monotonic() - started:.0f} s")
    (run_dir,) = [path for path in root.iterdir() if path.name.startswith(PARAMS.pipeline.name)]
    return {"run": run_dir, "bundle": bundle, "feast": root / "feast", "promoted": root / "promoted"}


# --------------------------------------------------------------------------------------------------
# the images themselves


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("image", ["pipeline", "serving"])
def test_images_run_non_root_with_the_production_feast_drivers(docker_client, images, image):
    config = docker_client.images.get(images[image]).attrs["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    # the production feature_store.yaml (SQL registry on PostgreSQL, Redis online store) gets as far as
    # connecting: its drivers are installed, and nothing listens on the addresses it is given
    probe = (
        "import os, psycopg, redis\n"
        "from pathlib import Path\n"
        "from feast import FeatureStore\n"
        "from feast.infra.online_stores.redis import RedisOnlineStore\n"
        "os.environ['FEAST_REGISTRY_PATH'] = 'postgresql+psycopg://feast:x@127.0.0.1:1/feast'\n"
        "os.environ['REDIS_CONNECTION_STRING'] = '127.0.0.1:1'\n"
        "os.environ['FEAST_PROJECT'] = 'recsys_production'\n"  # the Feast ConfigMap's key
        "try:\n"
        "    production = Path('/app/feature_repo/feature_store.production.yaml')\n"
        "    FeatureStore(repo_path='/app/feature_repo', fs_yaml_file=production).list_feature_views()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, str(exc)[:200])\n"
    )
    output = docker_client.containers.run(
        images[image], ["python", "-c", probe], entrypoint=[], remove=True, network_mode="none"
    ).decode()
    assert "OperationalError" in output and "127.0.0.1" in output, output
    assert "ModuleNotFound" not in output and "NoSuchModule" not in output


# --------------------------------------------------------------------------------------------------
# the whole DAG in containers


@pytest.mark.timeout(3600)
def test_whole_tiny_dag_runs_in_the_pipeline_image(container_dag):
    run = container_dag["run"]
    assert {path.name for path in run.iterdir()} == TASKS  # every task of the compiled pipeline ran
    if os.geteuid() == 0:  # the tasks ran as the image's non-root user, not as this process
        owners = {path.stat().st_uid for path in run.rglob("executor_output.json")}
        assert owners == {IMAGE_UID}
    evaluation = json.loads((run / "evaluate" / "evaluation").read_text())
    retrieval = evaluation["retrieval"]["two_tower"]
    assert 0.0 < retrieval["recall@50"] <= 1.0
    for ranker in ("multi_tower", "multi_tower_din", "dlrm"):
        assert 0.5 < evaluation["ranking"][ranker]["auc"] <= 1.0
    gate = json.loads((run / "gate" / "decision").read_text())
    assert gate["passed"] is True  # the first deploy: nothing deployed to compare against
    rendered = (run / "deploy" / "manifest").read_text()
    assert SERVING_IMAGE in rendered and "InferenceService" in rendered  # deploy's dry run
    from recsys.bundle_manifest import load_manifest

    manifest = load_manifest(container_dag["bundle"])  # every checksum verified
    assert manifest["metrics"] == evaluation
    # promote (in the container, as its uid) put the bundle at its versioned place and named it current;
    # the deploy renders the InferenceService onto that version
    pointer = json.loads((container_dag["promoted"] / "current.json").read_text())
    promoted = load_manifest(container_dag["promoted"] / pointer["version"])  # checksums verified again
    assert promoted["version"] == manifest["version"] == pointer["bundle_version"]
    assert pointer["version"] in rendered
    assert (container_dag["feast"] / "online_store.db").stat().st_size > 0  # online-store task's backfill


# --------------------------------------------------------------------------------------------------
# the serving image as production runs it


@pytest.fixture(scope="module")
def serving_container(docker_client, container_dag):
    """The serving image on the DAG's bundle and Feast store, hardened as the InferenceService runs it."""
    from docker import errors as docker_errors

    feast = container_dag["feast"]
    container = docker_client.containers.run(
        SERVING_IMAGE,
        detach=True,
        read_only=True,
        user=f"{IMAGE_UID}:{IMAGE_UID}",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        tmpfs={"/tmp": "rw,size=64m"},
        volumes={
            str(container_dag["bundle"]): {"bind": "/mnt/models", "mode": "ro"},
            str(feast): {"bind": str(feast), "mode": "ro"},
        },
        environment={"FEAST_FS_YAML_FILE_PATH": str(feast / "feature_store.yaml")},
        ports={"8080/tcp": ("127.0.0.1", None)},
    )
    try:
        container.reload()
        port = container.ports["8080/tcp"][0]["HostPort"]
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, container)
        yield container, base
    finally:
        with contextlib.suppress(docker_errors.NotFound):  # gone after the SIGTERM test
            container.remove(force=True)


@pytest.mark.timeout(3600)
def test_serving_container_answers_v1_v2_health_and_metrics(serving_container):
    container, base = serving_container
    attrs = container.attrs["HostConfig"]
    assert attrs["ReadonlyRootfs"] is True and attrs["CapDrop"] == ["ALL"]
    assert _get(base, "/v2/health/live")[0] == 200
    assert _get(base, "/v2/health/ready")[0] == 200
    for model in ("retrieval", "ranking", "recommend"):
        assert _get(base, f"/v2/models/{model}/ready")[0] == 200
    status, body = _post(
        base, "/v1/models/recommend:predict", {"instances": [{"user_id": 1}, {"user_id": 2}]}
    )
    assert status == 200, body
    predictions = json.loads(body)["predictions"]
    assert len(predictions) == 2 and all(prediction["item_ids"] for prediction in predictions)
    assert not any(prediction["degraded"] for prediction in predictions)  # the Feast store read, read-only
    status, body = _post(
        base,
        "/v2/models/retrieval/infer",
        {
            "inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}],
            "parameters": {"k": 5},
        },
    )
    assert status == 200, body
    outputs = {output["name"]: output for output in json.loads(body)["outputs"]}
    assert len(outputs["item_ids"]["data"]) == 5
    status, metrics = _get(base, "/metrics")
    assert status == 200 and "request_predict_seconds" in metrics


@pytest.mark.timeout(3600)
def test_serving_container_rejects_a_bad_request_with_a_4xx(serving_container):
    _, base = serving_container
    status, body = _post(base, "/v1/models/recommend:predict", {"instances": [{"user_id": "not-a-number"}]})
    assert 400 <= status < 500 and "user_id" in body


@pytest.mark.timeout(3600)
def test_serving_container_stops_cleanly_on_sigterm(serving_container):
    container, _ = serving_container
    started = time.monotonic()
    container.kill(signal=signal.SIGTERM)
    exit_code = container.wait(timeout=60)["StatusCode"]
    assert exit_code == 0, container.logs().decode()[-3000:]
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------------------------------


def _wait_ready(base: str, container: Any, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            raise AssertionError(f"serving container exited:\n{container.logs().decode()[-4000:]}")
        try:
            if _get(base, "/v2/health/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(
        f"serving container not ready in {timeout_s} s:\n{container.logs().decode()[-4000:]}"
    )


def _get(base: str, path: str) -> tuple[int, str]:
    return _request(urllib.request.Request(base + path))


def _post(base: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return _request(request)


def _request(request: urllib.request.Request) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
