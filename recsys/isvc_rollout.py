"""A model rollout on a live KServe InferenceService, as data: the JSON Patches and the decision on a status.

A pipeline deploy changes only what the run owns, the model: the serving container's image and its
``STORAGE_URI``. Everything else (replicas, resources, autoscaling, anything an overlay or an operator
set) is left as it is on the cluster. That takes RFC 6902 JSON Patch: a merge patch would replace the
whole ``containers`` list, resources included. Each patch first ``test``s that the indices it writes still
name the serving container and its ``STORAGE_URI``, so a concurrent edit fails the patch instead of
writing into the wrong place.

In KServe's Knative mode (formerly "Serverless") the new model goes out as a canary:
``canaryTrafficPercent`` sends that share to the new revision, the rest stays on the last rolled-out one.
:func:`canary_decision` reads the InferenceService's status and says ``wait``, ``promote`` (the new
revision is the latest created and ready, takes its canary share, the model is loaded, nothing failed)
or ``rollback`` (the revision or the model load failed). Promoting removes ``canaryTrafficPercent``
(100% to the latest revision); rolling back restores the previous image, ``STORAGE_URI`` and canary
setting. Standard mode (formerly "RawDeployment", KServe 0.21's default) has no traffic split: the patch
goes out without a canary and the same decision waits for the new generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

SERVING_CONTAINER = "kserve-container"
STORAGE_URI_ENV = "STORAGE_URI"
CANARY_PATH = "/spec/predictor/canaryTrafficPercent"
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
KNATIVE_MODES = frozenset({"Knative", "Serverless"})  # Serverless: the deprecated name
# KServe's modelStatus.transitionStatus values that mean the new model will not load
FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})
# condition reasons (Knative / KServe) that mean the latest revision failed for good
FAILED_REASONS = frozenset(
    {"RevisionFailed", "ProgressDeadlineExceeded", "ContainerMissing", "ModelLoadFailed"}
)
_REVISION_CONDITIONS = ("PredictorConfigurationReady", "LatestDeploymentReady", "PredictorReady")


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


def rollback_patch(isvc: Mapping[str, Any], previous: ModelFields) -> list[dict[str, Any]]:
    """JSON Patch: the previous image, ``STORAGE_URI`` and canary setting back on the (patched) ``isvc``."""
    ops = _model_ops(model_fields(isvc), previous.image, previous.storage_uri)
    current = isvc.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent")
    if previous.canary_traffic_percent is not None:
        ops.append({"op": "add", "path": CANARY_PATH, "value": previous.canary_traffic_percent})
    elif current is not None:
        ops.append({"op": "remove", "path": CANARY_PATH})
    return ops


def is_serverless(isvc: Mapping[str, Any]) -> bool:
    """Whether the service runs on Knative (revisions, traffic splitting): the mode the controller recorded
    in the status, else the annotation, else KServe 0.21's default, Standard (raw Deployments).

    KServe 0.21 calls the modes ``Knative`` and ``Standard``; ``Serverless`` and ``RawDeployment`` are their
    deprecated names, still accepted.
    """
    mode = (isvc.get("status") or {}).get("deploymentMode") or (
        (isvc.get("metadata") or {}).get("annotations") or {}
    ).get(DEPLOYMENT_MODE_ANNOTATION, "Standard")
    return mode in KNATIVE_MODES


def canary_decision(
    isvc: Mapping[str, Any], generation: int, revision_before: str | None, canary_traffic_percent: int | None
) -> Decision:
    """What to do with a rollout of ``generation``, from the InferenceService's status.

    ``revision_before``: the predictor's latest created revision before the patch (a new one must appear;
    None for raw deployments, which have no revisions). ``canary_traffic_percent``: the share the new
    revision must be serving (None: no canary, it must serve everything).
    """
    status = isvc.get("status") or {}
    observed = status.get("observedGeneration") or 0
    if observed < generation:
        return Decision("wait", f"the controller has not reconciled generation {generation} yet ({observed})")
    failure = _failure(status, revision_before)
    if failure:
        return Decision("rollback", failure)
    conditions = _conditions(status)
    predictor = (status.get("components") or {}).get("predictor") or {}
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if revision_before is not None and created in (None, revision_before):
        return Decision("wait", "no new predictor revision yet")
    if created is not None and ready != created:
        return Decision("wait", f"revision {created} is not ready yet (latest ready: {ready})")
    for kind in ("PredictorReady", "Ready"):
        if conditions.get(kind, {}).get("status") != "True":
            return Decision("wait", f"condition {kind} is {conditions.get(kind, {}).get('status', 'absent')}")
    model = status.get("modelStatus") or {}
    if model and (model.get("states") or {}).get("targetModelState") not in (None, "", "Loaded"):
        return Decision("wait", f"model state {model['states']['targetModelState']}")
    if created is not None:
        share = sum(
            t.get("percent") or 0 for t in predictor.get("traffic") or [] if t.get("revisionName") == created
        )
        wanted = 100 if canary_traffic_percent is None else canary_traffic_percent
        if share != wanted:
            return Decision("wait", f"revision {created} serves {share}% of the traffic, not {wanted}%")
    where = f"revision {created}" if created else f"generation {generation}"
    share = "all" if canary_traffic_percent is None else f"{canary_traffic_percent}%"
    return Decision("promote", f"{where} is Ready, its model loaded, serving {share} of the traffic")


def _model_ops(fields: ModelFields, image: str, storage_uri: str) -> list[dict[str, Any]]:
    container = f"/spec/predictor/containers/{fields.container_index}"
    env = f"{container}/env/{fields.env_index}"
    return [
        {"op": "test", "path": f"{container}/name", "value": SERVING_CONTAINER},
        {"op": "test", "path": f"{env}/name", "value": STORAGE_URI_ENV},
        {"op": "replace", "path": f"{container}/image", "value": image},
        {"op": "replace", "path": f"{env}/value", "value": storage_uri},
    ]


def _conditions(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in status.get("conditions") or []}


def _failure(status: Mapping[str, Any], revision_before: str | None) -> str | None:
    model = status.get("modelStatus") or {}
    info = model.get("lastFailureInfo") or {}
    predictor = (status.get("components") or {}).get("predictor") or {}
    created = predictor.get("latestCreatedRevision")
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
