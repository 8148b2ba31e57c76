"""The cluster runbook in manifests/README.md stays true: every command between its runbook markers that
needs no cluster or Docker daemon runs, as written, from a copy of the clone; the ones that do are marked
``# [cluster]`` / ``# [docker]``, and every step that talks to the cluster is there and marked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "manifests" / "README.md"
NOT_HERE = ("# [cluster]", "# [docker]")
# what a clone holds that the commands read (no data, artifacts, virtual environment or VCS state)
CLONE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", ".dvc", "data", "artifacts", "reports", "metrics", "plots", "build", "__pycache__",
    "*.egg-info", ".pytest_cache", ".ruff_cache", "wheelhouse", "benchmarks",
)  # fmt: skip


def runbook_commands() -> list[str]:
    """The shell commands of the runbook's ``bash`` blocks, one per line, in order."""
    text = README.read_text()
    start, end = text.index("<!-- runbook:start -->"), text.index("<!-- runbook:end -->")
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_runbook_marks_every_cluster_step():
    commands = runbook_commands()
    cluster = [c for c in commands if "# [cluster]" in c]
    for needed in (
        "kubectl apply -f manifests/profile/profile.yaml",
        "kubectl apply -f manifests/profile/namespace.yaml",
        "create secret generic recsys-feast-credentials",
        "kubectl apply -f build/recsys-production.yaml",
        "python -m pipelines upload",
        "python -m pipelines schedule",
        "curl",
    ):
        assert any(needed in c for c in cluster), f"runbook: no cluster step '{needed}'"
    for command in commands:
        talks_to_cluster = re.search(
            r"kubectl (apply|get|-n \S+ get)|pipelines (upload|schedule)|curl ", command
        )
        secret = "create secret" in command  # values from the environment: applied straight to the cluster
        if talks_to_cluster or secret:
            assert any(marker in command for marker in NOT_HERE), f"unmarked cluster command: {command}"
    assert "[Object store](#object-store)" in README.read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_runbook_commands_run_from_a_clone(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(REPO_ROOT, clone, ignore=CLONE_IGNORE)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("KUBECONFIG", None)
    runnable = [c for c in runbook_commands() if not any(marker in c for marker in NOT_HERE)]
    assert len(runnable) >= 6
    for command in runnable:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"runbook command failed: {command}\n{done.stdout}\n{done.stderr}"
    assert (clone / "pipelines" / "recsys_training.yaml").read_text().count("recsys-feast-config") >= 2
    rendered = (clone / "build" / "recsys-production.yaml").read_text()
    assert "kind: InferenceService" in rendered and "kind: PodDefault" not in rendered
