"""The images through a real registry: Debian's ``docker-registry`` (the CNCF Distribution registry) serving
on loopback, ``images/build.py push`` into it, the lock it writes checked against the registry's own API,
the images pulled back by digest and a project task run from them, and ``python -m pipelines compile
--images`` naming every executor image by those digests.

Docker treats a registry on 127.0.0.0/8 as insecure-allowed (plain HTTP), so no daemon configuration and
no credentials are involved; a cloud registry with authentication is not exercised here. The training
image is the CUDA one (several GB, ``make images-training``): this module pushes the CPU pipeline image
under the training image's name instead (as ``run-local --training-image cpu`` trains in it), so the
lock holds all three names. Skips, saying why, without a Docker daemon or the ``docker-registry``
binary (``images/docker_engine.sh`` installs it as root).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from recsys.config import load_params, params_from_yaml_text
from recsys.image_lock import LockedImage, read_lock
from serving.local_server import stop_server
from tests.conftest import REPO_ROOT, write_params

pytestmark = [pytest.mark.container, pytest.mark.slow]

PARAMS = load_params(REPO_ROOT / "params.yaml")
TAG = PARAMS.pipeline.image_tag
PATH = "recsys"  # the registry path the images are pushed under: <registry>/recsys/<name>
# the CPU pipeline image, tagged locally under a training repository of the test's own (never pushed there)
TRAINING_STANDIN_REPO = "localhost/recsys-kfp-test/recsys-training"
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
)


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:<port>
    log: Path  # its access log (stdout)

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open() as fh:
            fh.seek(offset)
            return fh.read()


@pytest.fixture(scope="module")
def registry(docker_client, tmp_path_factory) -> Iterator[Registry]:
    """``docker-registry serve`` on 127.0.0.1 at a free port, its blobs in a temporary folder."""
    binary = shutil.which("docker-registry") or shutil.which("docker-registry", path="/usr/bin")
    if binary is None:
        pytest.skip(
            "no docker-registry binary (Debian: apt-get install docker-registry; images/docker_engine.sh)"
        )
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "version": 0.1,
        "log": {"level": "warn"},  # warnings only; the access log (one line per request) stays on
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "recsys-kfp-tests"},
    }
    (root / "config.yml").write_text(yaml.safe_dump(config))
    log = root / "registry.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [binary, "serve", str(root / "config.yml")], stdout=out, stderr=subprocess.STDOUT
        )
    served = Registry(f"127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"docker-registry exited {process.returncode}:\n{log.read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError):
                if _http(served.url("/v2/"))[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"docker-registry not answering in 30 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield served
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def pushed(images, registry, docker_client, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """``images/build.py push`` of pipeline, serving and (the stand-in) training into the registry: the
    lock it wrote, read back, and the local tags each image was built as."""
    folder = tmp_path_factory.mktemp("pushed")
    params_file = write_params(
        folder / "params.yaml", {"pipeline.training_image_repo": TRAINING_STANDIN_REPO}
    )
    standin = f"{TRAINING_STANDIN_REPO}:{TAG}"
    docker_client.images.get(images["pipeline"]).tag(TRAINING_STANDIN_REPO, TAG)
    lock_path = folder / "pushed.json"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "images" / "build.py"), "push",
            "--registry", f"{registry.host}/{PATH}", "--lock", str(lock_path), "--params", str(params_file),
            "pipeline", "serving", "training",
        ],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    print(f"push of three images: {time.monotonic() - started:.0f} s")
    lock = read_lock(lock_path) if lock_path.exists() else {}
    try:
        assert done.returncode == 0, f"push failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        built = {"pipeline": images["pipeline"], "serving": images["serving"], "training": standin}
        yield {"lock": lock, "path": lock_path, "built": built}
    finally:
        for name in [standin, *(image.tag for image in lock.values()), *(i.reference for i in lock.values())]:
            subprocess.run(["docker", "rmi", name], capture_output=True, check=False)  # references only


# ---- the push ---------------------------------------------------------------------------------------


def test_push_records_the_digest_the_registry_serves(pushed, registry, docker_client):
    lock: dict[str, LockedImage] = pushed["lock"]
    assert set(lock) == {"pipeline", "serving", "training"}
    for name, image in lock.items():
        repository = PARAMS.pipeline.image_repo if name == "pipeline" else PARAMS.deploy.image_repo
        if name == "training":
            repository = PARAMS.pipeline.training_image_repo
        assert image.repo == f"{registry.host}/{PATH}/{repository.rsplit('/', 1)[-1]}", name
        assert image.tag == f"{image.repo}:{TAG}" and image.built_as == pushed["built"][name]
        # the registry's own answer for the pushed tag: the manifest the lock names, byte for byte
        api_path = f"/v2/{image.repo.split('/', 1)[1]}"
        status, body, headers = _http(registry.url(f"{api_path}/manifests/{TAG}"), accept=MANIFEST_TYPES)
        assert status == 200, body[:300]
        assert headers["Docker-Content-Digest"] == image.digest, name
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == image.digest
        manifest = json.loads(body)
        # the image's config blob is the local image's id: the registry holds the image that was built
        assert manifest["config"]["digest"] == docker_client.images.get(pushed["built"][name]).id, name
        for layer in manifest["layers"]:
            status, _, layer_headers = _http(
                registry.url(f"{api_path}/blobs/{layer['digest']}"), method="HEAD"
            )
            assert status == 200 and int(layer_headers["Content-Length"]) == layer["size"], layer
    # the stand-in: the pipeline image under the training name, so the same manifest
    assert lock["training"].digest == lock["pipeline"].digest


def test_push_to_an_unreachable_registry_names_image_and_registry(images, pushed, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "images" / "build.py"), "push", "--registry", closed, "serving",
         "--lock", str(tmp_path / "pushed.json")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"pushing image 'serving' ({images['serving']}) to registry {closed} failed" in done.stderr
    assert not (tmp_path / "pushed.json").exists()
    assert not _local(f"{closed}/recsys-serving:{TAG}")  # its tag for the failed push is removed


# ---- pulled back by digest, and run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pulled(pushed, registry, docker_client) -> dict[str, str]:
    """Every pushed image pulled by its digest reference, after its registry tags were removed here."""
    lock: dict[str, LockedImage] = pushed["lock"]
    for image in lock.values():
        for name in (image.tag, image.reference):
            subprocess.run(["docker", "rmi", name], capture_output=True, check=False)
        assert not _local(image.reference), f"{image.reference} still known locally"
    before = registry.log_size()
    for name, image in lock.items():
        done = subprocess.run(
            ["docker", "pull", image.reference], capture_output=True, text=True, timeout=1800, check=False
        )
        assert done.returncode == 0, f"pull of {name} failed:\n{done.stdout}\n{done.stderr}"
        assert f"Digest: {image.digest}" in done.stdout, done.stdout
    fetched = registry.log_since(before)
    for image in lock.values():  # each manifest came from the registry, asked for by its digest
        path = f"/v2/{image.repo.split('/', 1)[1]}/manifests/{image.digest}"
        assert re.search(rf'"(GET|HEAD) {re.escape(path)} HTTP/1\.1" 200', fetched), (path, fetched[-2000:])
    for name, image in lock.items():
        assert (
            docker_client.images.get(image.reference).id == docker_client.images.get(pushed["built"][name]).id
        )
    return {name: image.reference for name, image in lock.items()}


def test_a_project_task_runs_from_the_pipeline_image_pulled_by_digest(pulled, pushed, tmp_path):
    """The ingest step (tiny synthetic preset) and the deploy step's dry run, in the pulled pipeline image
    named by digest: the tables it writes, and the InferenceService it renders onto the pushed serving
    image's digest."""
    serving = pushed["lock"]["serving"]
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)  # the image runs as uid 1000
    write_params(
        work / "params.yaml",
        {
            "data.synthetic.preset": "tiny",
            "deploy.image_repo": serving.repo,
            "deploy.image_digest": serving.digest,
            "deploy.image_pull_secrets": ["regcred"],
        },
    )
    run = ["docker", "run", "--rm", "--network", "none", "-v", f"{work}:/work", "-w", "/work"]
    ingest = subprocess.run(
        [*run, pulled["pipeline"], "python", "-m", "components.ingest", "--params", "params.yaml",
         "--raw-dir", "raw"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    tables = {
        name: pd.read_parquet(work / "raw" / f"{name}.parquet") for name in ("users", "items", "events")
    }
    sizes = load_params(work / "params.yaml").data.synthetic.sizes()
    assert len(tables["users"]) == sizes.n_users and len(tables["items"]) == sizes.n_items
    assert len(tables["events"]) > 0 and set(tables["events"]["user_id"]) <= set(tables["users"]["user_id"])
    rendered = subprocess.run(
        [*run, pulled["pipeline"], "python", "-m", "components.deploy", "--params", "params.yaml",
         "--dry-run", "--output", "isvc.yaml"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    isvc = yaml.safe_load((work / "isvc.yaml").read_text())
    predictor = isvc["spec"]["predictor"]
    assert predictor["containers"][0]["image"] == serving.reference
    assert predictor["imagePullSecrets"] == [{"name": "regcred"}]


def test_the_serving_image_pulled_by_digest_starts_its_cli(pulled):
    """As the InferenceService runs it: read-only root, /tmp its one writable mount."""
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", pulled["serving"],
         "--help"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: python -m serving" in done.stdout and "--model_dir" in done.stdout


# ---- compiled onto the digests ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["training", "index-refresh"])
def test_compile_with_the_lock_names_every_image_by_its_pushed_digest(pushed, tmp_path, which):
    lock: dict[str, LockedImage] = pushed["lock"]
    out = tmp_path / f"{which}.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "--params", str(REPO_ROOT / "params.yaml"), "compile",
         "--pipeline", which, "--images", str(pushed["path"]), "--output", str(out)],
        capture_output=True, text=True, timeout=600, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    spec = next(d for d in yaml.safe_load_all(out.read_text()) if d and "deploymentSpec" in d)
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    for name, executor in executors.items():
        training = re.fullmatch(r"exec-(train|search)(-\d+)?", name) is not None
        assert executor["container"]["image"] == lock["training" if training else "pipeline"].reference, name
    default = spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    params = params_from_yaml_text(default)
    assert params.deploy.image(params.pipeline.image_tag) == lock["serving"].reference


# ----------------------------------------------------------------------------------------------------


def _local(reference: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", reference], capture_output=True).returncode == 0


def _http(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers
