"""Upload and schedule the compiled pipeline on a Kubeflow Pipelines server, thinly over ``kfp.Client``.

Everything that can be checked without a server (the package exists, the cron has KFP's 6 fields, the
pipeline was uploaded before it is scheduled) is checked first, so a mistake fails here with a clear
message instead of as a server error or, worse, as a schedule that never fires.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from recsys.config import PipelineConfig, kfp_cron

log = logging.getLogger(__name__)


class KubeflowError(RuntimeError):
    """An upload or schedule request that cannot be made; the message says what to fix."""


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    created_pipeline: bool


def connect(host: str, namespace: str | None, token_file: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (multi-user Kubeflow: ``namespace`` is the profile namespace),
    authenticated as :func:`client_credentials` says; upload and schedule then check its version."""
    import kfp

    return kfp.Client(host=host, namespace=namespace or "kubeflow", **client_credentials(token_file))


def client_namespace(client: Any) -> str | None:
    """The namespace ``kfp.Client`` picked when none was configured: its context file's
    (``~/.config/kfp/context.json``, ``kfp`` CLI's ``set_user_namespace``) or, in a pod of a multi-user
    Kubeflow, the pod's own (kfp/client/client.py reads the ServiceAccount's namespace file). None (empty)
    on a single-user KFP, where runs are not namespaced."""
    get = getattr(client, "get_user_namespace", None)
    return (get() if callable(get) else None) or None


MIN_KFP_BACKEND = (2, 4)


def check_server_version(client: Any) -> str | None:
    """The KFP backend's version, ``tag_name`` of ``/apis/v2beta1/healthz``; refuses one older than 2.4.

    Every backend of the version matrix (2.2 to 2.17) writes ``tag_name`` there (the image's
    ``TAG_NAME``; backend/src/apiserver/main.go), but the SDK's ``V2beta1GetHealthzResponse`` has no
    such field, so the body is read as it comes. A version that cannot be read (no answer, ``unknown``
    in a source build) is logged and not checked: the upload then fails or succeeds on its own.
    Why 2.4: pipelines/README.md, "What runs where" (tests/pipelines/test_version_matrix.py).
    """
    try:
        response = client._healthz_api.healthz_service_get_healthz(
            _preload_content=False, _request_timeout=30
        )
        tag = json.loads(response.data).get("tag_name")
    except Exception as exc:  # any failure: the version is just not known
        log.warning("could not read the KFP backend's version (%s); it is not checked", exc)
        return None
    version = release(tag)
    if version is None:
        log.warning("the KFP backend's version is %r; not checked (2.4 or later is needed)", tag)
        return tag
    if version < MIN_KFP_BACKEND:
        raise KubeflowError(
            f"KFP backend {tag} is older than 2.4 (Kubeflow 1.10): the GPU type is a run parameter, "
            "which it ignores (no GPU limit: training gets no GPU), and its driver rejects the "
            "kfp-kubernetes configs this SDK compiles (the Feast and object-store tasks fail); upgrade "
            "Kubeflow Pipelines to 2.4 or later (see 'What runs where' in pipelines/README.md)"
        )
    return tag


def release(tag: str | None) -> tuple[int, int] | None:
    """(major, minor) of a KFP backend's ``tag_name`` ("2.15.0", "v2.17.3"); None when it names none."""
    found = re.match(r"v?(\d+)\.(\d+)", str(tag or ""))
    return (int(found[1]), int(found[2])) if found else None


# kfp-kubernetes' securityContext (pipeline.task_security_context) is in the protos from 2.17 on: 2.15's run
# compiler parses the PlatformSpec strictly and refuses the run, 2.4.1's driver drops the field without a
# word (tests/pipelines/test_version_matrix.py)
MIN_SECURITY_CONTEXT_BACKEND = (2, 17)


def check_package_fits(package: Path, tag: str | None) -> None:
    """Refuse to upload a package whose tasks carry a security context to a backend that cannot apply it
    (an unknown version is not checked, as in :func:`check_server_version`)."""
    version = release(tag)
    if version is None or version >= MIN_SECURITY_CONTEXT_BACKEND or not package.is_file():
        return  # a missing package is upload's to report
    hardened = [
        name
        for document in yaml.safe_load_all(package.read_text())
        if document and "platforms" in document
        for name, config in document["platforms"]
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
        .items()
        if "securityContext" in config
    ]
    if hardened:
        raise KubeflowError(
            f"{package}: {len(hardened)} tasks carry a security context (pipeline.task_security_context), "
            f"which KFP backend {tag} cannot apply (2.17 or later: 2.15 refuses the run, 2.4 drops it); "
            "compile with pipeline.task_security_context false, or upgrade Kubeflow Pipelines"
        )


def client_credentials(
    token_file: str | None = None, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """How to authenticate to a multi-user Kubeflow: at most one of

    - ``token_file``: a ServiceAccount token file, re-read as it rotates (in a pod, the projected token
      ``/var/run/secrets/kubeflow/pipelines/token`` with audience ``pipelines.kubeflow.org``);
    - ``$KFP_TOKEN``: a bearer token (e.g. ``kubectl create token`` for a ServiceAccount of the profile);
    - ``$KFP_COOKIE``: the ingress's session cookie (``authservice_session=...`` / ``oauth2_proxy=...``).

    None of them: an in-cluster or unauthenticated standalone KFP. Secrets come from the environment or a
    file, never from the command line (shell history, process list).
    """
    environ = dict(os.environ if environ is None else environ)
    given = {
        name: value
        for name, value in (
            ("--token-file", token_file),
            ("$KFP_TOKEN", environ.get("KFP_TOKEN")),
            ("$KFP_COOKIE", environ.get("KFP_COOKIE")),
        )
        if value
    }
    if len(given) > 1:
        raise KubeflowError(f"give one way to authenticate, not {sorted(given)}")
    if token_file:
        if not Path(token_file).is_file():
            raise KubeflowError(f"--token-file: {token_file} does not exist")
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path=token_file)}
    if "$KFP_TOKEN" in given:
        return {"existing_token": given["$KFP_TOKEN"]}
    if "$KFP_COOKIE" in given:
        return {"cookies": given["$KFP_COOKIE"]}
    return {}


def upload(
    client: Any,
    package: str | Path,
    pipeline: PipelineConfig,
    version: str | None = None,
    namespace: str | None = None,
) -> Uploaded:
    """Upload ``package`` as a new pipeline, or as a new version of the pipeline of the same name.

    The default version name is the image tag plus a digest of the package, so uploading an unchanged
    package again is refused by the server as a duplicate instead of piling up identical versions.
    """
    package = Path(package)
    if not package.is_file():
        raise KubeflowError(f"{package}: no compiled pipeline; run `python -m pipelines compile` first")
    version_name = version or f"{pipeline.image_tag}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
    description = f"{pipeline.name} (recsys-kfp), image tag {pipeline.image_tag}"
    pipeline_id = pipeline_id_of(client, pipeline.name, namespace)
    if pipeline_id is None:  # a new pipeline: KFP names its first version after the pipeline
        created = client.upload_pipeline(
            str(package), pipeline_name=pipeline.name, description=description, namespace=namespace or None
        )
        version_id, first_name = _version(client, created.pipeline_id, None, pipeline.name)
        log.info("uploaded new pipeline %s (%s)", pipeline.name, created.pipeline_id)
        return Uploaded(created.pipeline_id, version_id, first_name, created_pipeline=True)
    uploaded = client.upload_pipeline_version(
        str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id, description=description
    )
    log.info("uploaded %s version %s (%s)", pipeline.name, version_name, uploaded.pipeline_version_id)
    return Uploaded(pipeline_id, uploaded.pipeline_version_id, version_name, created_pipeline=False)


def schedule(
    client: Any,
    pipeline: PipelineConfig,
    cron: str,
    experiment: str | None = None,
    version: str | None = None,
    namespace: str | None = None,
    arguments: dict[str, Any] | None = None,
) -> Any:
    """The pipeline's one recurring run: of its newest version (or ``version`` by name) on ``cron``.

    The cron is validated before any server call. Runs never overlap (``pipeline.max_concurrency``) and a
    paused schedule does not replay the runs it missed (``no_catchup``). Idempotent: KFP cannot change a
    recurring run, and every ``create_recurring_run`` adds one that fires too, so the pipeline's earlier
    recurring runs are disabled. An enabled one with the same version, cron and arguments is kept as it
    is; otherwise the new one is created disabled, the others disabled, then it is enabled (never two
    firing at once, and a failed create leaves the old schedule running).
    """
    cron = checked_cron(cron)
    pipeline_id = pipeline_id_of(client, pipeline.name, namespace)
    if pipeline_id is None:
        raise KubeflowError(
            f"pipeline {pipeline.name!r} is not on the server; run `python -m pipelines upload` first"
        )
    version_id, version_name = _version(client, pipeline_id, version, pipeline.name)
    exp = client.create_experiment(name=experiment or pipeline.experiment, namespace=namespace or None)
    earlier = recurring_runs_of(client, pipeline_id, namespace)
    wanted = {
        "version": version_id,
        "cron": cron,
        "arguments": arguments or {},
        "experiment": exp.experiment_id,
    }
    kept = [r for r in earlier if _enabled(r) and _schedule_of(r) == wanted]
    if kept:
        run = kept[0]
        log.info("%s is already scheduled on '%s' (%s)", pipeline.name, cron, run.recurring_run_id)
    else:
        run = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=f"{pipeline.name}-{version_name}",
            description=f"{pipeline.name} on cron '{cron}'",
            cron_expression=cron,
            max_concurrency=pipeline.max_concurrency,
            no_catchup=True,
            pipeline_id=pipeline_id,
            version_id=version_id,
            params=arguments or None,
            enabled=False,
            service_account=pipeline.service_account,
        )
    for other in earlier:
        if other.recurring_run_id != run.recurring_run_id and _enabled(other):
            client.disable_recurring_run(other.recurring_run_id)
            log.info("disabled the earlier recurring run %s (%s)", other.display_name, other.recurring_run_id)
    if not kept:
        client.enable_recurring_run(run.recurring_run_id)
        log.info(
            "scheduled %s (%s) on '%s' in experiment %s", pipeline.name, version_name, cron, exp.display_name
        )
    return run


def recurring_runs_of(client: Any, pipeline_id: str, namespace: str | None) -> list[Any]:
    """Every recurring run (all pages) in ``namespace`` whose pipeline is ``pipeline_id``, any version.

    The v2beta1 filter has no pipeline-id key for recurring runs, so they are matched here on
    ``pipeline_version_reference.pipeline_id``.
    """
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, namespace=namespace or None)
        for run in page.recurring_runs or []:
            reference = run.pipeline_version_reference
            if reference is not None and reference.pipeline_id == pipeline_id:
                found.append(run)
        token = page.next_page_token or ""
        if not token:
            return found


def _enabled(run: Any) -> bool:
    """``status`` is V2beta1RecurringRunStatus: the plain string ENABLED, DISABLED or STATUS_UNSPECIFIED."""
    return run.status == "ENABLED"


def _schedule_of(run: Any) -> dict[str, Any]:
    """What makes two recurring runs of a pipeline the same schedule."""
    cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
    config = run.runtime_config
    return {
        "version": run.pipeline_version_reference.pipeline_version_id,
        "cron": cron,
        "arguments": dict((config.parameters if config else None) or {}),
        "experiment": run.experiment_id,
    }


def pipeline_id_of(client: Any, name: str, namespace: str | None) -> str | None:
    """The id of pipeline ``name`` in ``namespace`` (a profile's own pipelines), else among the shared ones.

    ``kfp.Client.get_pipeline_id`` lists without a namespace, i.e. only shared pipelines: on multi-user
    Kubeflow a pipeline uploaded to the profile is not found, ``schedule`` then says it is not on the
    server and a second ``upload`` tries to create a duplicate.
    """
    predicate = {"operation": 1, "key": "display_name", "stringValue": name}  # 1 = EQUALS (v2beta1)
    found: list[Any] = []
    for where in dict.fromkeys([namespace or None, None]):
        listed = client.list_pipelines(
            filter=json.dumps({"predicates": [predicate]}), namespace=where, page_size=2
        )
        found = list(listed.pipelines or [])
        if found:
            break
    if len(found) > 1:
        raise KubeflowError(f"{len(found)} pipelines named {name!r} in {namespace or 'the shared space'}")
    return found[0].pipeline_id if found else None


def checked_cron(cron: str) -> str:
    try:
        return kfp_cron(cron)
    except ValueError as exc:
        raise KubeflowError(str(exc)) from None


def _version(client: Any, pipeline_id: str, name: str | None, pipeline_name: str) -> tuple[str, str]:
    """The id and name of version ``name`` (or the newest) of the pipeline."""
    query: dict[str, Any] = {"page_size": 1, "sort_by": "created_at desc"}
    if name is not None:  # the v2beta1 filter, as kfp.Client.get_pipeline_id writes it (1 = EQUALS)
        predicate = {"operation": 1, "key": "display_name", "stringValue": name}
        query["filter"] = json.dumps({"predicates": [predicate]})
    versions = client.list_pipeline_versions(pipeline_id, **query).pipeline_versions or []
    if not versions:
        which = f"version {name!r}" if name else "any version"
        raise KubeflowError(f"pipeline {pipeline_name!r} has no {which} on the server; upload it first")
    return versions[0].pipeline_version_id, versions[0].display_name
