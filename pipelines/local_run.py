"""``python -m pipelines run-local``: the whole KFP DAG on this machine through KFP's own local runner.

``kfp.local.SubprocessRunner`` runs each lightweight component as a subprocess of this Python (no
containers, no per-task venv: the project and kfp are already installed here, which is what
``install_kfp_package=False`` expects). The subprocesses inherit the working directory and environment,
so the run happens from the repository root with it on ``PYTHONPATH``, exactly like ``dvc repro``. Deploy
runs in dry-run mode: it renders the InferenceService for the produced bundle instead of applying it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.config import load_params

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalRunError(RuntimeError):
    """The local pipeline run failed; the message names the failed task."""


def run_local(
    params_path: str | Path = REPO_ROOT / "params.yaml",
    preset: str | None = None,
    pipeline_root: str | Path = REPO_ROOT / "artifacts" / "kfp-local",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Run the DAG on ``params_path`` (synthetic ``preset``, dotted ``overrides``); returns the bundle dir."""
    from kfp import local

    from pipelines.recsys_training import build_pipeline

    overrides = dict(overrides or {}) | ({"data.synthetic.preset": preset} if preset else {})
    params = load_params(params_path, overrides)
    pipeline = build_pipeline(params)
    pipeline_root = Path(pipeline_root).resolve()
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    with _from_repository_root(), warnings.catch_warnings():
        # the tasks name the pipeline image; here this venv *is* that image's environment, on purpose
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        try:
            run = pipeline(deploy_dry_run=True)
        except RuntimeError as exc:
            raise LocalRunError(f"run-local: {exc} (task logs above; outputs under {pipeline_root})") from exc
    bundle = Path(run.output.path)
    log.info("run-local: bundle at %s", bundle)
    return bundle


@contextlib.contextmanager
def _from_repository_root() -> Iterator[None]:
    """cwd = repository root and it on PYTHONPATH for the task subprocesses; restored afterwards."""
    previous_cwd, previous_path = Path.cwd(), os.environ.get("PYTHONPATH")
    os.chdir(REPO_ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), previous_path]))
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        if previous_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous_path
