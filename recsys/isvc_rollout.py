"""A model rollout on a live KServe InferenceService, as data: the JSON Patches and the decision on a status.

A pipeline deploy changes only what the run owns, the model: the serving container's image and its
``STORAGE_URI``. Everything else (replicas, resources, autoscaling, anything an overlay or an operator
set) is left as it is on the cluster. That takes RFC 6902 JSON Patch: a merge patch would replace the
whole ``containers`` list, resources included. Each patch first ``test``s that the indices it writes still
name the serving container and its ``STORAGE_URI``, so a concurrent edit fails the patch instead of
writing into the wrong place.

In Knative mode (KServe <= 0.15: "Serverless") the new model goes out as a canary: ``canaryTrafficPercent``
sends that share to the new revision, the rest stays on ``latestRolledoutRevision``. KServe ignores the
setting while that revision is empty (it then routes 100% to the latest one), so :func:`canary_share`
says no canary there. :func:`canary_decision` says ``wait``, ``promote`` or ``rollback`` from the
InferenceService and the object KServe built for its predictor (:func:`workload_refs`: the Knative
Service, or in Standard mode, "RawDeployment" before 0.16, the Deployment). It never trusts the
InferenceService's ``status.observedGeneration``: KServe copies it from that other object
(``PropagateStatus`` / ``PropagateRawStatus`` in pkg/apis/serving/v1beta1/inference_service_status.go, 0.14
to 0.20), so it is not the InferenceService's generation, and a Deployment's generation moves whenever
the HPA rescales it. Done means: a predictor revision newer than the one before the patch is both the
latest created and the latest ready one (Knative), or the Deployment carries the new model, has observed
its own generation and has all replicas updated and available (Standard; KServe records no ready
revision there). Promoting removes ``canaryTrafficPercent``. Rolling back follows KServe's documented
order (docs/samples/v1beta1/rollout/README.md, "Rollback and pin the model"): ``canaryTrafficPercent: 0``
first (all traffic back on the last rolled-out revision), then the previous model, still pinned; once
that revision is Ready the previous canary setting comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

SERVING_CONTAINER = "kserve-container"
STORAGE_URI_ENV = "STORAGE_URI"
CANARY_PATH = "/spec/predictor/canaryTrafficPercent"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
# pkg/constants/constants.go: "Serverless"/"RawDeployment" up to 0.15.x; 0.16 renamed them "Knative"/
# "Standard" and still accepts (and, 0.16.0, still records) the old names
KNATIVE_MODES = frozenset({"Knative", "Serverless"})
STANDARD_MODES = frozenset({"Standard", "RawDeployment"})
# what an InferenceService that names no mode gets: the shipped inferenceservice-config's
# defaultDeploymentMode, "Serverless" from 0.14.1 to 0.20.0 (config/configmap/inferenceservice.yaml)
DEFAULT_MODE = "Knative"
# KServe's modelStatus.transitionStatus values that mean the new model will not load
FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
# condition reasons (Knative / KServe / Kubernetes) that mean the latest revision failed for good
FAILED_REASONS = frozenset(
    {"RevisionFailed", "ProgressDeadlineExceeded", "ContainerMissing", "ModelLoadFailed"}
)
_REVISION_CONDITIONS = ("PredictorConfigurationReady", "LatestDeploymentReady", "PredictorReady")
# conditions KServe sets only from a Knative Service (PropagateStatus); PropagateRawStatus: PredictorReady
_KNATIVE_CONDITIONS = frozenset(
    {"PredictorConfigurationReady", "PredictorRouteReady", "LatestDeploymentReady"}
)


class RolloutError(ValueError):
    """The live InferenceService is not shaped like the one this project deploys."""


@dataclass(frozen=True)
class ModelFields:
    """Where and what the model is on a live InferenceService."""

    container_index: int
    env_index: int
    image: str
    storage_uri: str
    canary_traffic_percent: int | None


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "promote", "rollback"]
    reason: str


@dataclass(frozen=True)
class WorkloadRef:
    """Where KServe's object for the predictor lives (a custom-object GET: /apis/<group>/<version>/...)."""

    group: str
    version: str
    plural: str
    namespace: str
    name: str


def model_fields(isvc: Mapping[str, Any]) -> ModelFields:
    predictor = isvc.get("spec", {}).get("predictor", {})
    containers = predictor.get("containers") or []
    for i, container in enumerate(containers):
        if container.get("name") == SERVING_CONTAINER:
            for j, env in enumerate(container.get("env") or []):
                if env.get("name") == STORAGE_URI_ENV and "value" in env:
                    return ModelFields(
                        i, j, container.get("image", ""), env["value"], predictor.get("canaryTrafficPercent")
                    )
            raise RolloutError(f"container {SERVING_CONTAINER} has no {STORAGE_URI_ENV} value")
    raise RolloutError(f"spec.predictor.containers has no {SERVING_CONTAINER}")


def model_patch(
    isvc: Mapping[str, Any], image: str, storage_uri: str, canary_traffic_percent: int | None
) -> list[dict[str, Any]]:
    """JSON Patch: the new image and ``STORAGE_URI``, and (Knative mode) the canary share; nothing else."""
    ops = _model_ops(model_fields(isvc), image, storage_uri)
    if canary_traffic_percent is not None:
        ops.append({"op": "add", "path": CANARY_PATH, "value": canary_traffic_percent})  # add = set
    return ops


def promote_patch(canary_traffic_percent: int) -> list[dict[str, Any]]:
    """JSON Patch: the canary becomes the whole service (no ``canaryTrafficPercent``: 100% to latest)."""
    return [
        {"op": "test", "path": CANARY_PATH, "value": canary_traffic_percent},
        {"op": "remove", "path": CANARY_PATH},
    ]


def pin_patch() -> list[dict[str, Any]]:
    """JSON Patch: KServe's rollback, all traffic to ``latestRolledoutRevision``, none to the latest one.

    A patch of its own, with no ``test`` on the containers, so a concurrent edit of the model cannot keep
    traffic on a failed revision."""
    return [{"op": "add", "path": CANARY_PATH, "value": 0}]


def rollback_patch(
    isvc: Mapping[str, Any], previous: ModelFields, pinned: bool = False
) -> list[dict[str, Any]]:
    """JSON Patch: the previous image and ``STORAGE_URI`` back on the (patched) ``isvc``; with the previous
    canary setting, or when ``pinned`` leaving ``canaryTrafficPercent: 0`` until :func:`unpin_patch`."""
    ops = _model_ops(model_fields(isvc), previous.image, previous.storage_uri)
    return ops if pinned else ops + _canary_ops(isvc, previous.canary_traffic_percent)


def unpin_patch(isvc: Mapping[str, Any], previous: ModelFields) -> list[dict[str, Any]]:
    """JSON Patch: the previous canary setting back after a pinned rollback (none: 100% to latest)."""
    return [
        {"op": "test", "path": CANARY_PATH, "value": 0},
        *_canary_ops(isvc, previous.canary_traffic_percent),
    ]


def deployment_mode(isvc: Mapping[str, Any]) -> str | None:
    """``Knative``, ``Standard`` or ``ModelMesh`` as the InferenceService shows it; None when it cannot tell.

    KServe's own order (GetDeploymentMode, pkg/controller/v1beta1/inferenceservice/utils/utils.go): the mode
    recorded in ``status.deploymentMode`` (written since 0.15.1), else the annotation. Before 0.15.1 a mode
    the cluster default chose is recorded nowhere, so the status's shape tells: only a Knative Service
    gives the predictor revisions, traffic and route/configuration conditions.
    """
    status = isvc.get("status") or {}
    annotations = (isvc.get("metadata") or {}).get("annotations") or {}
    named = status.get("deploymentMode") or annotations.get(DEPLOYMENT_MODE_ANNOTATION)
    if named:
        return "Knative" if named in KNATIVE_MODES else "Standard" if named in STANDARD_MODES else named
    predictor = _predictor(status)
    if (
        _KNATIVE_CONDITIONS & _conditions(status).keys()
        or predictor.get("traffic")
        or predictor.get("latestReadyRevision")
    ):
        return "Knative"
    return "Standard" if "PredictorReady" in _conditions(status) else None


def is_serverless(isvc: Mapping[str, Any]) -> bool:
    """Whether the predictor runs on Knative (revisions, traffic splitting); unknown: KServe's default."""
    return (deployment_mode(isvc) or DEFAULT_MODE) == "Knative"


def canary_share(isvc: Mapping[str, Any], canary_traffic_percent: int | None) -> int | None:
    """The canary share to roll ``isvc`` out with, or None (no traffic split: the patch serves it all).

    None in Standard mode (no revisions), and while ``latestRolledoutRevision`` is empty: KServe splits
    traffic only when it names one (ksvc_reconciler.go, ``CanaryTrafficPercent != nil &&
    lastRolledoutRevision != ""``, 0.14.1 to 0.20.0), else it sends 100% to the latest revision.
    """
    if canary_traffic_percent is None or not is_serverless(isvc) or not rolled_out_revision(isvc):
        return None
    return canary_traffic_percent


def rolled_out_revision(isvc: Mapping[str, Any]) -> str | None:
    """The predictor revision last rolled out with 100% of the traffic (Knative mode), if any."""
    return _predictor(isvc.get("status") or {}).get("latestRolledoutRevision") or None


def revision_before(isvc: Mapping[str, Any]) -> str | None:
    """The predictor's latest created revision, which a rollout must replace (None in Standard mode:
    KServe 0.14 writes the Deployment's revision number there, later releases nothing)."""
    if not is_serverless(isvc):
        return None
    return _predictor(isvc.get("status") or {}).get("latestCreatedRevision") or None


def workload_refs(isvc: Mapping[str, Any]) -> list[WorkloadRef]:
    """Where KServe's object for the predictor may be, most likely first.

    Named ``<isvc>-predictor``, or ``<isvc>-predictor-default`` when one of that legacy name exists
    (constants.PredictorServiceName / DefaultPredictorServiceName, components/predictor.go, 0.14.1). A
    Knative Service in Knative mode, a Deployment in Standard mode, both when the mode is unknown yet.
    """
    meta = isvc.get("metadata") or {}
    namespace, names = meta.get("namespace", ""), [f"{meta.get('name')}-predictor"]
    names.append(f"{names[0]}-default")
    mode = deployment_mode(isvc)
    kinds = {"Knative": [_KSVC], "Standard": [_DEPLOYMENT]}.get(mode or "", [_KSVC, _DEPLOYMENT])
    return [WorkloadRef(*kind, namespace, name) for kind in kinds for name in names]


def find_workload(
    isvc: Mapping[str, Any], get: Callable[[WorkloadRef], Mapping[str, Any] | None]
) -> Mapping[str, Any] | None:
    """The first of :func:`workload_refs` that ``get`` finds (None: none exists, or no status yet)."""
    if not isvc.get("status"):
        return None
    return next((found for ref in workload_refs(isvc) if (found := get(ref)) is not None), None)


def canary_decision(
    isvc: Mapping[str, Any],
    generation: int,
    revision_before: str | None,
    canary_traffic_percent: int | None,
    workload: Mapping[str, Any] | None = None,
) -> Decision:
    """What to do with a rollout of ``generation`` of ``isvc``.

    ``revision_before``: the predictor's latest created revision before the patch (a new one must appear;
    None when none must). ``canary_traffic_percent``: the share the new revision must be serving (None: all
    of it). ``workload``: the Knative Service or Deployment behind the predictor (:func:`find_workload`);
    Standard mode cannot be judged without it.
    """
    status = isvc.get("status") or {}
    if (isvc.get("metadata") or {}).get("generation", generation) < generation:
        return Decision("wait", f"read an InferenceService older than generation {generation}")
    if not status:
        return Decision("wait", "the InferenceService has no status yet")
    failure = _failure(status, revision_before) or _workload_failure(workload)
    if failure:
        return Decision("rollback", failure)
    if (workload or {}).get("kind") == "Deployment" or not is_serverless(isvc):
        wait = _deployment_wait(isvc, workload)
    else:
        wait = _knative_wait(isvc, revision_before, canary_traffic_percent, workload)
    if wait:
        return Decision("wait", wait)
    for kind in ("PredictorReady", "Ready"):
        if (state := _conditions(status).get(kind, {}).get("status")) != "True":
            return Decision("wait", f"condition {kind} is {state or 'absent'}")
    if not is_serverless(isvc):
        return Decision("promote", f"generation {generation} is Ready, its Deployment rolled out")
    created = _predictor(status).get("latestCreatedRevision")
    share = "all" if canary_traffic_percent is None else f"{canary_traffic_percent}%"
    return Decision(
        "promote", f"revision {created} is Ready, its model loaded, serving {share} of the traffic"
    )


def _knative_wait(
    isvc: Mapping[str, Any],
    revision_before: str | None,
    canary_traffic_percent: int | None,
    ksvc: Mapping[str, Any] | None,
) -> str | None:
    """Why a Knative-mode rollout is not done yet (None: it is): revisions, model, traffic, the ksvc."""
    status = isvc.get("status") or {}
    predictor = _predictor(status)
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if not created or created == revision_before:
        return "no new predictor revision yet"
    if ready != created:
        return f"revision {created} is not ready yet (latest ready: {ready})"
    model = status.get("modelStatus") or {}
    if (model.get("states") or {}).get("targetModelState") not in (None, "", "Loaded"):
        return f"model state {model['states']['targetModelState']}"
    share = sum(
        t.get("percent") or 0 for t in predictor.get("traffic") or [] if t.get("revisionName") == created
    )
    wanted = 100 if canary_traffic_percent is None else canary_traffic_percent
    if share != wanted:
        return f"revision {created} serves {share}% of the traffic, not {wanted}%"
    return _ksvc_wait(isvc, created, ksvc) if ksvc is not None else None


def _ksvc_wait(isvc: Mapping[str, Any], created: str, ksvc: Mapping[str, Any]) -> str | None:
    """Knative's own readiness (Service.IsReady, pkg/apis/serving/v1/service_lifecycle.go: observed its
    generation and Ready), and the same revision ready there as KServe copied, running the model."""
    meta, status = ksvc.get("metadata") or {}, ksvc.get("status") or {}
    name = meta.get("name")
    if (status.get("observedGeneration") or 0) != meta.get("generation"):
        return f"Knative Service {name} has not observed generation {meta.get('generation')} yet"
    if (status.get("latestCreatedRevisionName"), status.get("latestReadyRevisionName")) != (created, created):
        return f"Knative Service {name} is at revision {status.get('latestReadyRevisionName')}, not {created}"
    if (ready := _conditions(status).get("Ready", {}).get("status")) != "True":
        return f"Knative Service {name} Ready is {ready or 'absent'}"
    return _template_wait(isvc, ksvc, f"Knative Service {name}")


def _deployment_wait(isvc: Mapping[str, Any], deployment: Mapping[str, Any] | None) -> str | None:
    """``kubectl rollout status``'s test (kubernetes/kubectl pkg/polymorphichelpers/rollout_status.go) on a
    Deployment that carries the InferenceService's model."""
    if deployment is None:
        return "the predictor's Deployment is not there (yet)"
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    name = meta.get("name")
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 0):
        return f"Deployment {name} has not observed generation {meta.get('generation')} yet"
    if wait := _template_wait(isvc, deployment, f"Deployment {name}"):
        return wait
    updated, replicas = status.get("updatedReplicas") or 0, status.get("replicas") or 0
    if "replicas" in spec and updated < spec["replicas"]:
        return f"Deployment {name}: {updated} of {spec['replicas']} replicas updated"
    if replicas > updated:
        return f"Deployment {name}: {replicas - updated} old replicas pending termination"
    if (available := status.get("availableReplicas") or 0) < updated:
        return f"Deployment {name}: {available} of {updated} updated replicas available"
    return None


def _template_wait(isvc: Mapping[str, Any], workload: Mapping[str, Any], where: str) -> str | None:
    """Whether KServe has written the InferenceService's model into ``workload``'s pod template: before
    that, the object's readiness is the previous model's."""
    spec = (workload.get("spec") or {}).get("template", {}).get("spec") or {}
    container = next((c for c in spec.get("containers") or [] if c.get("name") == SERVING_CONTAINER), None)
    if container is None:
        return None  # a template this project did not shape: nothing to compare
    fields = model_fields(isvc)
    uri = next((e.get("value") for e in container.get("env") or [] if e.get("name") == STORAGE_URI_ENV), None)
    if container.get("image") != fields.image or uri not in (None, fields.storage_uri):
        return f"{where} does not run {fields.image} with {fields.storage_uri} yet"
    return None


def _model_ops(fields: ModelFields, image: str, storage_uri: str) -> list[dict[str, Any]]:
    container = f"/spec/predictor/containers/{fields.container_index}"
    env = f"{container}/env/{fields.env_index}"
    return [
        {"op": "test", "path": f"{container}/name", "value": SERVING_CONTAINER},
        {"op": "test", "path": f"{env}/name", "value": STORAGE_URI_ENV},
        {"op": "replace", "path": f"{container}/image", "value": image},
        {"op": "replace", "path": f"{env}/value", "value": storage_uri},
    ]


def _canary_ops(isvc: Mapping[str, Any], canary_traffic_percent: int | None) -> list[dict[str, Any]]:
    if canary_traffic_percent is not None:
        return [{"op": "add", "path": CANARY_PATH, "value": canary_traffic_percent}]
    if isvc.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent") is not None:
        return [{"op": "remove", "path": CANARY_PATH}]
    return []


def _predictor(status: Mapping[str, Any]) -> Mapping[str, Any]:
    return (status.get("components") or {}).get("predictor") or {}


def _conditions(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in status.get("conditions") or []}


def _failure(status: Mapping[str, Any], revision_before: str | None) -> str | None:
    """A failure of what is rolling out; the model status of ``revision_before`` (a failed canary being
    rolled back) is not one."""
    model = status.get("modelStatus") or {}
    info = model.get("lastFailureInfo") or {}
    created = _predictor(status).get("latestCreatedRevision")
    if revision_before is not None and created == revision_before:
        return None
    if model.get("transitionStatus") in FAILED_TRANSITIONS:
        detail = f": {info.get('reason')}: {info.get('message')}" if info else ""
        return f"model transition {model['transitionStatus']}{detail}"
    if info and created not in (None, revision_before) and info.get("modelRevisionName") == created:
        return f"revision {created} failed: {info.get('reason')}: {info.get('message')}"
    conditions = _conditions(status)
    for kind in _REVISION_CONDITIONS:
        condition = conditions.get(kind, {})
        if condition.get("status") == "False" and condition.get("reason") in FAILED_REASONS:
            return f"{kind} False ({condition['reason']}): {condition.get('message', '')}".rstrip(": ")
    return None


def _workload_failure(workload: Mapping[str, Any] | None) -> str | None:
    """A Deployment past its progress deadline (Progressing False, ProgressDeadlineExceeded) will not
    finish by itself; kubectl rollout status gives up on it too."""
    if workload is None or workload.get("kind") != "Deployment":
        return None
    progressing = _conditions(workload.get("status") or {}).get("Progressing", {})
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        name = (workload.get("metadata") or {}).get("name")
        return f"Deployment {name}: ProgressDeadlineExceeded: {progressing.get('message', '')}".rstrip(": ")
    return None


_KSVC = ("serving.knative.dev", "v1", "services")
_DEPLOYMENT = ("apps", "v1", "deployments")
