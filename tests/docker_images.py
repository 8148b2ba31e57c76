"""The container tests' shared session fixtures (tests/conftest.py exposes them): a Docker client, and the
pipeline and serving images built from this checkout by ``images/build.py`` (Docker's layer cache makes
a rebuild of unchanged sources a few seconds). Without a reachable daemon they skip, saying so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def docker_client() -> Any:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker daemon reachable ({exc}); images/docker_engine.sh starts one as root")
    return client


@pytest.fixture(scope="session")
def images(docker_client) -> dict[str, str]:
    """The pipeline and serving images, built from this checkout (cached layers make a rebuild quick):
    name -> the local tag params.yaml gives it."""
    from recsys.config import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "images" / "build.py"), "pipeline", "serving"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    tag = params.pipeline.image_tag
    return {"pipeline": f"{params.pipeline.image_repo}:{tag}", "serving": f"{params.deploy.image_repo}:{tag}"}
