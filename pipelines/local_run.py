"""``python -m pipelines run-local``: the whole KFP DAG on this machine through KFP's own local runner.

Two runners, the same compiled DAG:

- ``subprocess`` (default): ``kfp.local.SubprocessRunner`` runs each lightweight component as a subprocess
  of this Python (no containers, no per-task venv: the project and kfp are already installed here, which
  is what ``install_kfp_package=False`` expects). The subprocesses inherit the working directory and
  environment, so the run happens from the repository root with it on ``PYTHONPATH``, like ``dvc repro``,
  but with its own Feast registry and online store in ``<pipeline_root>/feast``
  (``$FEAST_FS_YAML_FILE_PATH``): a run on another preset must not overwrite the store that
  ``dvc repro`` filled and ``python -m serving`` reads (a tiny run used to replace users 1-400 there).
- ``docker``: ``kfp.local.DockerRunner`` runs every task in the project's built image, as the cluster
  does (``make images`` first): non-root, the code and Feast repo from the image, artifacts passed by KFP
  through the pipeline root mounted into each container. The GPU training image is not needed: there is
  no GPU in a local Docker, so the training tasks run in the pipeline (CPU) image unless
  ``training_image="cuda"``. Feast's registry and SQLite online store live in ``<pipeline_root>/feast``
  (``$FEAST_FS_YAML_FILE_PATH``), shared by the tasks as the SQL registry and Redis are in the cluster.

Deploy runs in dry-run mode: it renders the InferenceService for the produced bundle instead of applying it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from feast.constants import FEAST_FS_YAML_FILE_PATH_ENV_NAME as FEAST_YAML_ENV

from recsys import artifact_layout as layout
from recsys.config import Params, load_params

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_UID = 1000  # the images' non-root user (images/*.Dockerfile, deploy.run_as_user)


class LocalRunError(RuntimeError):
    """The local pipeline run failed; the message names the failed task."""


def run_local(
    params_path: str | Path = REPO_ROOT / "params.yaml",
    preset: str | None = None,
    pipeline_root: str | Path = REPO_ROOT / layout.KFP_LOCAL_DIR,
    overrides: dict[str, Any] | None = None,
    runner: str = "subprocess",
    training_image: str = "cpu",
) -> Path:
    """Run the DAG on ``params_path`` (synthetic ``preset``, dotted ``overrides``) with ``runner``
    ('subprocess' or 'docker'); returns the bundle directory."""
    from kfp import local

    from pipelines.recsys_training import build_pipeline

    overrides = dict(overrides or {}) | ({"data.synthetic.preset": preset} if preset else {})
    # no object store here: promote (and the gate, which compares with what was promoted) use a folder
    # laid out like the bucket, kept across runs, so a second run is gated against the first one's bundle;
    # beside the pipeline root, or inside it for Docker (the one folder mounted into the task containers)
    pipeline_root = Path(pipeline_root).resolve()
    promoted = pipeline_root / "promoted" if runner == "docker" else pipeline_root.parent / "promoted"
    overrides = {"promote.uri": promoted.as_uri()} | overrides
    params = load_params(params_path, overrides)
    if runner == "docker" and training_image == "cpu":
        params.pipeline.training_image_repo = params.pipeline.image_repo
        params.pipeline.training_image_digest = params.pipeline.image_digest
    pipeline = build_pipeline(params, scheduled=False)
    if runner == "docker":
        local_runner: Any = docker_runner(params, pipeline_root)
    elif runner == "subprocess":
        local_runner = local.SubprocessRunner(use_venv=False)
    else:
        raise LocalRunError(f"run-local: unknown runner {runner!r} (subprocess or docker)")
    local.init(runner=local_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    where = (
        _from_repository_root(shared_feast_store(pipeline_root / "feast"))
        if runner == "subprocess"
        else contextlib.nullcontext()
    )
    with where, warnings.catch_warnings():
        # the tasks name the pipeline image; here this venv *is* that image's environment, on purpose
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        # CPU/memory requests are the cluster's business; kfp.local warns once per task that it ignores them
        warnings.filterwarnings("ignore", message="Task .* have no effect in the current local runner")
        try:
            run = pipeline(deploy_dry_run=True)
        except RuntimeError as exc:
            raise LocalRunError(f"run-local: {exc} (task logs above; outputs under {pipeline_root})") from exc
    bundle = Path(run.output.path)
    log.info("run-local: bundle at %s", bundle)
    return bundle


def docker_runner(params: Params, pipeline_root: Path) -> Any:
    """A ``kfp.local.DockerRunner`` for the project image: checks the images exist, prepares the pipeline
    root (writable by the container user) and the Feast store the task containers share."""
    import docker
    from kfp import local

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise LocalRunError(f"run-local --runner docker: no Docker daemon reachable ({exc})") from exc
    for image in dict.fromkeys([params.pipeline.image, params.pipeline.training_image]):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            raise LocalRunError(
                f"run-local --runner docker: image {image} is not built here (make images)"
            ) from None
    pipeline_root.mkdir(parents=True, exist_ok=True)
    feast_yaml = shared_feast_store(pipeline_root / "feast")
    user = _container_user(pipeline_root)
    environment = {FEAST_YAML_ENV: str(feast_yaml), "HOME": "/tmp"}
    return local.DockerRunner(user=user, environment=environment)


def shared_feast_store(folder: Path) -> Path:
    """A feature_store.yaml whose registry and SQLite online store lie in ``folder`` (absolute paths), so
    that every task container of a run, and a serving container after it, opens the same store."""
    local_yaml = yaml.safe_load((REPO_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    local_yaml["registry"] = str(folder / "registry.db")
    local_yaml["online_store"] = {"type": "sqlite", "path": str(folder / "online_store.db")}
    path = folder / "feature_store.yaml"
    path.write_text(yaml.safe_dump(local_yaml, sort_keys=False))
    return path


def _container_user(pipeline_root: Path) -> str:
    """The uid:gid the task containers run as, owning ``pipeline_root``: the image's non-root user when
    this process is root (the folder is handed to it), else this process's own uid (HOME is /tmp)."""
    if os.geteuid() == 0:
        for folder, _, files in os.walk(pipeline_root):
            for path in [folder, *(os.path.join(folder, name) for name in files)]:
                os.chown(path, IMAGE_UID, IMAGE_UID)
        return f"{IMAGE_UID}:{IMAGE_UID}"
    return f"{os.geteuid()}:{os.getegid()}"


@contextlib.contextmanager
def _from_repository_root(feast_yaml: Path) -> Iterator[None]:
    """cwd = repository root and it on PYTHONPATH for the task subprocesses, with the run's own Feast store
    (``feast_yaml``); all restored afterwards."""
    previous_cwd = Path.cwd()
    previous = {name: os.environ.get(name) for name in ("PYTHONPATH", FEAST_YAML_ENV)}
    os.chdir(REPO_ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), previous["PYTHONPATH"]]))
    os.environ[FEAST_YAML_ENV] = str(feast_yaml)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
