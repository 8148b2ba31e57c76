"""The deploy step's rollout on a live InferenceService (components/deploy.py, recsys/isvc_rollout.py).

No cluster here, so the cluster is simulated at the API boundary: the production overlay's InferenceService
(``kubectl kustomize``) is stored, JSON Patches are applied to it by ``jsonpatch`` (RFC 6902, ``test`` ops
included) exactly as the API server applies them, and every InferenceService written or read is validated
against KServe's CRD schema (manifests/crds/). What each poll reads back is a frame from
tests/fixtures/kserve_status/: the InferenceService status as KServe v0.14.1, v0.15.2 and v0.20.0 write it
(one file each, citing the functions that write it), with the Knative Service or Deployment behind it
(knative_service.yaml, deployment.yaml, citing Knative's and Kubernetes' types). Every test that reads a
status runs once per version. The wire format of the requests is checked against an HTTP server.
"""

from __future__ import annotations

import copy
import json
import string
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, ClassVar

import jsonpatch
import pytest
import yaml
from kubernetes import client as k8s

from components import deploy
from recsys import isvc_rollout as rollout
from recsys import kube_namespace
from recsys.config import load_params
from recsys.manifest_schemas import custom_resource_errors
from tests.conftest import REPO_ROOT, revalidated

PARAMS = load_params(REPO_ROOT / "params.yaml")
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "kserve_status"
VERSIONS = ("v0.14.1", "v0.15.2", "v0.20.0")
NEW_URI = "s3://recsys-models/bundles/20261203T101500Z-3f9a0c1b2d4e/"
NEW_IMAGE = f"{PARAMS.deploy.image_repo}:0.2.0"
OLD, NEW, RESTORED = "recsys-predictor-00001", "recsys-predictor-00002", "recsys-predictor-00003"
URL = "http://recsys.recsys.example.com"
CANARY = PARAMS.deploy.canary_traffic_percent

Frame = tuple[dict[str, Any], dict[str, Any] | None]  # (InferenceService status, its ksvc / Deployment)


# ------------------------------------------------------------------------------------------------
# the fixtures: KServe's status per version, Knative's and Kubernetes' objects


@cache
def _workloads(name: str, old_image: str, old_uri: str) -> dict[str, Any]:
    text = (FIXTURES / name).read_text()
    models = {"OLD_IMAGE": old_image, "OLD_URI": old_uri, "NEW_IMAGE": NEW_IMAGE, "NEW_URI": NEW_URI}
    return yaml.safe_load(string.Template(text).substitute(models))


class Frames:
    """One KServe version's frames: ``kn(name)`` (Knative mode) and ``raw(name)`` (Standard mode)."""

    def __init__(self, version: str, isvc: dict[str, Any]):
        self.version = version
        self.statuses = yaml.safe_load((FIXTURES / f"{version}.yaml").read_text())
        assert self.statuses["version"] == version
        old = rollout.model_fields(isvc)
        self.ksvcs = _workloads("knative_service.yaml", old.image, old.storage_uri)
        self.deployments = _workloads("deployment.yaml", old.image, old.storage_uri)

    def kn(self, name: str, ksvc: str | None = None) -> Frame:
        return copy.deepcopy(self.statuses["knative"][name]), copy.deepcopy(self.ksvcs[ksvc or name])

    def raw(self, name: str, deployment: str | None = None) -> Frame:
        return copy.deepcopy(self.statuses["raw"][name]), copy.deepcopy(self.deployments[deployment or name])


@pytest.fixture(params=VERSIONS)
def kserve(request, production_isvc) -> Frames:
    return Frames(request.param, production_isvc)


# ------------------------------------------------------------------------------------------------
# the cluster at its API boundary


class SimulatedCluster(deploy.InferenceServiceApi):
    """One InferenceService: JSON Patches applied by RFC 6902 rules, a new generation per spec change, the
    CRD schema enforced on every write and read; ``frames[generation][i]`` is what the i-th read of that
    generation returns (the last one repeats), and ``get_workload`` the object behind that frame."""

    def __init__(self, isvc: dict[str, Any] | None, frames: dict[int, list[Frame]]):
        self.stored = copy.deepcopy(isvc)
        self.frames = frames
        self.reads: dict[int, int] = {}
        self.patches: list[list[dict[str, Any]]] = []
        self.workload_refs: list[rollout.WorkloadRef] = []
        self.before_patch = None  # a concurrent edit, applied right before the next patch
        self.workload: dict[str, Any] | None = None

    def get(self, name, namespace):
        if self.stored is None:
            return None
        generation = self.stored["metadata"]["generation"]
        i = self.reads.get(generation, 0)
        self.reads[generation] = i + 1
        frames = self.frames.get(generation) or [({}, None)]
        status, self.workload = copy.deepcopy(frames[min(i, len(frames) - 1)])
        live = copy.deepcopy(self.stored) | {"status": status}
        assert custom_resource_errors(live) == []
        return live

    def get_workload(self, ref):
        self.workload_refs.append(ref)
        found = self.workload or {}
        kind = {"services": "Service", "deployments": "Deployment"}[ref.plural]
        if (found.get("kind"), found.get("metadata", {}).get("name")) == (kind, ref.name):
            return copy.deepcopy(found)
        return None

    def create(self, isvc):
        self.stored = deploy.inference_service_to_dict(isvc)
        self.stored["metadata"]["generation"] = 1
        assert custom_resource_errors(self.stored) == []
        return copy.deepcopy(self.stored)

    def json_patch(self, name, namespace, ops):
        json.dumps(ops)  # the body travels as JSON
        if self.before_patch:
            self.before_patch(self.stored)
            self.before_patch = None
        self.patches.append(ops)
        try:
            patched = jsonpatch.apply_patch(self.stored, ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise deploy.DeployError(f"patch failed: 422 Unprocessable Entity {exc}") from exc
        assert custom_resource_errors(patched) == []
        if patched["spec"] != self.stored["spec"]:
            patched["metadata"]["generation"] += 1
        self.stored = patched
        return copy.deepcopy(patched)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def roll_out(cluster: SimulatedCluster, storage_uri: str = NEW_URI, image: str = NEW_IMAGE, **cfg):
    config = revalidated(PARAMS.deploy, **cfg)
    isvc = deploy.build_inference_service(config, image, storage_uri)
    clock, rollbacks = FakeClock(), []
    try:
        url = deploy.roll_out(isvc, config, cluster, rollbacks.append, sleep=clock.sleep, clock=clock)
    finally:
        cluster.elapsed = clock.now
    return url, rollbacks


def without_model(isvc: dict[str, Any]) -> dict[str, Any]:
    """Everything but what a rollout may change (the model, the canary setting, the generation)."""
    out = copy.deepcopy(isvc)
    out.pop("status", None)
    out["metadata"].pop("generation")
    container = out["spec"]["predictor"]["containers"][0]
    container.pop("image")
    container["env"] = [e for e in container["env"] if e["name"] != "STORAGE_URI"]
    out["spec"]["predictor"].pop("canaryTrafficPercent", None)
    return out


def model_of(isvc: dict[str, Any]) -> tuple[str, str]:
    fields = rollout.model_fields(isvc)
    return fields.image, fields.storage_uri


def with_model(isvc: dict[str, Any], canary: int | None = None) -> dict[str, Any]:
    """``isvc`` already carrying the new model (and a canary share)."""
    out = copy.deepcopy(isvc)
    out["spec"]["predictor"]["containers"][0]["image"] = NEW_IMAGE
    env = out["spec"]["predictor"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "STORAGE_URI")["value"] = NEW_URI
    if canary is not None:
        out["spec"]["predictor"]["canaryTrafficPercent"] = canary
    return out


def ops_kinds(ops: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(op["op"], op["path"].rsplit("/", 1)[-1]) for op in ops]


# ------------------------------------------------------------------------------------------------
# Knative mode: canary, promotion, KServe's rollback


def test_a_healthy_canary_is_promoted_and_the_operators_scaling_stays(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.kn("rolled_out")],
            4: [kserve.kn("canary_pending")] * 2 + [kserve.kn("canary_ready")] * 10,
            5: [kserve.kn("canary_ready", "promoted"), kserve.kn("promoted")],
        },
    )
    url, rollbacks = roll_out(cluster)
    assert url == URL and rollbacks == []
    model, promote = cluster.patches
    assert {"op": "add", "path": rollout.CANARY_PATH, "value": CANARY} in model
    assert [op["op"] for op in model] == ["test", "test", "replace", "replace", "add"]
    assert promote == rollout.promote_patch(CANARY)
    final = cluster.stored
    assert model_of(final) == (NEW_IMAGE, NEW_URI)
    assert "canaryTrafficPercent" not in final["spec"]["predictor"]  # promoted: 100% to the new revision
    # the production overlay's replicas, autoscaling, resources, probes, volumes: as the operator left them
    assert without_model(final) == without_model(production_isvc)
    predictor = final["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 10)
    assert predictor["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    deploy.inference_service_from_dict({k: v for k, v in final.items() if k != "status"})
    # promoted only after the canary stayed healthy for canary_soak_s
    assert cluster.reads[4] >= 2 + 1 + PARAMS.deploy.canary_soak_s / 10
    # the promotion waited for the traffic to move (the first read still showed the 10% split)
    assert cluster.reads[5] == 2
    assert {(r.group, r.plural, r.name) for r in cluster.workload_refs} == {
        ("serving.knative.dev", "services", "recsys-predictor")
    }


def test_a_failed_canary_is_pinned_then_the_previous_model_restored(production_isvc, kserve):
    """KServe's documented rollback: canaryTrafficPercent 0 first, then the previous model (pinned until
    its revision is Ready), then the previous canary setting (none: 100% to it)."""
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.kn("rolled_out")],
            4: [kserve.kn("canary_pending"), kserve.kn("canary_failed")],
            5: [kserve.kn("pinned")],
            6: [kserve.kn("pinned", "restored_pinned"), kserve.kn("restored_pinned")],
            7: [kserve.kn("unpinned")],
        },
    )
    with pytest.raises(
        deploy.DeployError, match=r"rolled back to s3://.*BlockedByFailedLoad.*ModelLoadFailed"
    ):
        roll_out(cluster)
    _, pin, restore, unpin = cluster.patches
    assert pin == [{"op": "add", "path": rollout.CANARY_PATH, "value": 0}]
    assert ops_kinds(restore) == [
        ("test", "name"),
        ("test", "name"),
        ("replace", "image"),
        ("replace", "value"),
    ]
    assert unpin == [
        {"op": "test", "path": rollout.CANARY_PATH, "value": 0},
        {"op": "remove", "path": rollout.CANARY_PATH},
    ]
    assert cluster.reads[6] == 2  # unpinned only once the restored revision was Ready
    assert cluster.stored["spec"] == production_isvc["spec"]  # image, STORAGE_URI, no canary: as before


def test_the_rollback_hook_runs_with_the_reason(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {3: [kserve.kn("rolled_out")], 4: [kserve.kn("canary_failed")], 6: [kserve.kn("restored_pinned")]},
    )
    config = revalidated(PARAMS.deploy)
    isvc = deploy.build_inference_service(config, NEW_IMAGE, NEW_URI)
    reasons: list[str] = []
    with pytest.raises(deploy.DeployError):
        deploy.roll_out(isvc, config, cluster, reasons.append, sleep=lambda s: None)
    assert len(reasons) == 1 and "BlockedByFailedLoad" in reasons[0]


def test_a_canary_that_never_becomes_ready_is_rolled_back_at_the_timeout(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.kn("rolled_out")],
            4: [kserve.kn("canary_pending")],
            6: [kserve.kn("restored_pinned")],
            7: [kserve.kn("unpinned")],
        },
    )
    with pytest.raises(deploy.DeployError, match=r"not healthy in time.*is not ready yet"):
        roll_out(cluster, timeout_s=120)
    assert cluster.stored["spec"] == production_isvc["spec"]
    assert 120 <= cluster.elapsed < 140


def test_a_rollback_whose_restored_revision_never_comes_up_stays_pinned(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {3: [kserve.kn("rolled_out")], 4: [kserve.kn("canary_failed")], 6: [kserve.kn("pinned")]},
    )
    with pytest.raises(deploy.DeployError, match="rolled back"):
        roll_out(cluster, timeout_s=60)
    assert len(cluster.patches) == 3  # model, pin, restore: never unpinned onto a revision not Ready
    assert cluster.stored["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert model_of(cluster.stored) == model_of(production_isvc)


def test_a_canary_that_fails_during_the_soak_is_rolled_back(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.kn("rolled_out")],
            4: [kserve.kn("canary_ready")] * 3 + [kserve.kn("canary_failed")],
            6: [kserve.kn("restored_pinned")],
            7: [kserve.kn("unpinned")],
        },
    )
    with pytest.raises(deploy.DeployError, match="rolled back"):
        roll_out(cluster, canary_soak_s=60)
    assert rollout.promote_patch(CANARY) not in cluster.patches
    assert cluster.stored["spec"] == production_isvc["spec"]


def test_no_canary_while_kserve_has_no_rolled_out_revision(production_isvc, kserve):
    """KServe splits traffic only when latestRolledoutRevision names a revision; else a canary setting
    would be ignored (100% to the new revision) and the rollout would wait for a split that never comes."""
    cluster = SimulatedCluster(
        production_isvc,
        {3: [kserve.kn("never_rolled_out", "canary_failed")], 4: [kserve.kn("first_rollout", "promoted")]},
    )
    url, _ = roll_out(cluster)
    assert url == URL
    (model,) = cluster.patches
    assert not any(op["path"] == rollout.CANARY_PATH for op in model)
    assert model_of(cluster.stored) == (NEW_IMAGE, NEW_URI)


def test_the_first_deploy_creates_the_whole_service(kserve):
    cluster = SimulatedCluster(None, {1: [({}, None), kserve.kn("promoted")]})
    url, _ = roll_out(cluster)
    assert url == URL and cluster.patches == []
    expected = deploy.inference_service_to_dict(
        deploy.build_inference_service(PARAMS.deploy, NEW_IMAGE, NEW_URI)
    )
    assert {k: v for k, v in cluster.stored.items() if k != "metadata"} == {
        k: v for k, v in expected.items() if k != "metadata"
    }


def test_a_live_deploy_acts_in_its_pods_namespace_when_params_name_none(kserve, tmp_path, monkeypatch):
    """deploy.namespace null (params.yaml): the task's ServiceAccount namespace, i.e. the run's profile;
    outside a pod that is an error naming the key, before anything is created."""
    assert PARAMS.deploy.namespace is None
    monkeypatch.setattr(kube_namespace, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    cluster = SimulatedCluster(None, {1: [kserve.kn("promoted")]})
    with pytest.raises(kube_namespace.NamespaceError, match=r"deploy\.namespace is null"):
        deploy.run(PARAMS.deploy, "0.2.0", NEW_URI, kserve_client=cluster)
    assert cluster.stored is None
    (tmp_path / "namespace").write_text("team-a")
    monkeypatch.setattr(kube_namespace, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    assert deploy.run(PARAMS.deploy, "0.2.0", NEW_URI, kserve_client=cluster) == URL
    assert cluster.stored["metadata"]["namespace"] == "team-a"
    named = revalidated(PARAMS.deploy, namespace="team-b")  # a configured namespace wins
    assert deploy.build_inference_service(named, NEW_IMAGE, NEW_URI).metadata.namespace == "team-b"


def test_a_first_deploy_that_never_becomes_ready_fails_and_says_so(kserve):
    cluster = SimulatedCluster(None, {1: [kserve.kn("canary_failed")]})
    with pytest.raises(deploy.DeployError, match=r"created but is not Ready.*BlockedByFailedLoad"):
        roll_out(cluster)


def test_a_healthy_canary_left_by_an_interrupted_run_is_promoted(production_isvc, kserve):
    cluster = SimulatedCluster(
        with_model(production_isvc, canary=10),
        {3: [kserve.kn("canary_ready")], 4: [kserve.kn("promoted")]},
    )
    assert roll_out(cluster)[0] == URL
    assert cluster.patches == [rollout.promote_patch(10)]


def test_an_unhealthy_service_that_already_has_the_model_is_left_alone(production_isvc, kserve):
    cluster = SimulatedCluster(with_model(production_isvc), {3: [kserve.kn("canary_failed")]})
    with pytest.raises(deploy.DeployError, match=r"not healthy.*nothing was changed"):
        roll_out(cluster)
    assert cluster.patches == []


def test_nothing_is_patched_when_the_model_is_already_serving(production_isvc, kserve):
    cluster = SimulatedCluster(with_model(production_isvc), {3: [kserve.kn("promoted")]})
    assert roll_out(cluster)[0] == URL
    assert cluster.patches == []


def test_a_concurrent_edit_fails_the_patch_instead_of_writing_elsewhere(production_isvc, kserve):
    cluster = SimulatedCluster(production_isvc, {3: [kserve.kn("rolled_out")]})

    def operator_adds_an_env_var(stored):
        stored["spec"]["predictor"]["containers"][0]["env"].insert(0, {"name": "LOG_LEVEL", "value": "debug"})

    cluster.before_patch = operator_adds_an_env_var
    with pytest.raises(deploy.DeployError, match="patch failed: 422"):
        roll_out(cluster)
    assert model_of(cluster.stored) == model_of(production_isvc)


# ------------------------------------------------------------------------------------------------
# Standard mode (RawDeployment): the Deployment decides


def test_a_raw_deployment_is_done_only_when_its_deployment_rolled_out(production_isvc, kserve):
    """The InferenceService's status passes too early: its observedGeneration is the Deployment's (7 after
    the HPA's rescaling, already past the InferenceService's 4) and PredictorReady stays True while the
    Deployment still runs the old model, then rolls."""
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.raw("rolled_out")],
            4: [kserve.raw("rolled_out")] * 2 + [kserve.raw("rolling")] * 2 + [kserve.raw("rolled_out_new")],
        },
    )
    url, _ = roll_out(cluster)
    assert url == URL
    (model,) = cluster.patches
    assert not any(op["path"] == rollout.CANARY_PATH for op in model)
    assert model_of(cluster.stored) == (NEW_IMAGE, NEW_URI)
    assert cluster.reads[4] >= 5  # through the stale and the rolling frames
    assert {(r.group, r.plural) for r in cluster.workload_refs} == {("apps", "deployments")}


def test_a_raw_deployment_past_its_progress_deadline_is_rolled_back(production_isvc, kserve):
    cluster = SimulatedCluster(
        production_isvc,
        {
            3: [kserve.raw("rolled_out")],
            4: [kserve.raw("rolling"), kserve.raw("deadline_exceeded")],
            5: [kserve.raw("rolled_out")],
        },
    )
    with pytest.raises(deploy.DeployError, match=r"rolled back.*ProgressDeadlineExceeded"):
        roll_out(cluster)
    _, rollback = cluster.patches  # no traffic to pin in Standard mode: the previous model straight back
    assert ops_kinds(rollback) == [
        ("test", "name"),
        ("test", "name"),
        ("replace", "image"),
        ("replace", "value"),
    ]
    assert cluster.stored["spec"] == production_isvc["spec"]


# ------------------------------------------------------------------------------------------------
# the decision on each version's status objects


KNATIVE_CASES = [
    # (InferenceService frame, workload frame, revision before, canary, action, reason)
    ("rolled_out", "rolled_out", OLD, 10, "wait", "no new predictor revision"),
    ("canary_pending", "canary_pending", OLD, 10, "wait", f"revision {NEW} is not ready yet"),
    ("canary_ready", "canary_ready", OLD, 10, "promote", "serving 10%"),
    ("canary_ready", "unobserved", OLD, 10, "wait", "has not observed generation 2"),
    ("canary_ready", "canary_pending", OLD, 10, "wait", f"is at revision {OLD}, not {NEW}"),
    ("canary_ready", None, OLD, 10, "promote", "serving 10%"),  # no ksvc readable: KServe's copy
    ("canary_ready", "canary_ready", OLD, None, "wait", "serves 10% of the traffic, not 100%"),
    ("canary_failed", "canary_failed", OLD, 10, "rollback", "BlockedByFailedLoad"),
    ("promoted", "promoted", None, None, "promote", "serving all"),
    ("promoted", "unobserved", None, None, "wait", "has not observed generation 2"),
    # the rollback: the failed canary's model status is not the restored revision's
    ("pinned", "pinned", NEW, 0, "wait", "no new predictor revision"),
    ("restored_pinned", "restored_pinned", NEW, 0, "promote", "serving 0%"),
    ("restored_pinned", "canary_ready", NEW, 0, "wait", f"is at revision {NEW}, not {RESTORED}"),
]


@pytest.mark.parametrize(("frame", "ksvc", "before", "canary", "action", "reason"), KNATIVE_CASES)
def test_knative_decision(production_isvc, kserve, frame, ksvc, before, canary, action, reason):
    spec_model = (
        production_isvc if frame in ("restored_pinned", "rolled_out") else with_model(production_isvc)
    )
    status = kserve.statuses["knative"][frame]
    workload = kserve.ksvcs[ksvc] if ksvc else None
    live = spec_model | {"status": status}
    assert custom_resource_errors(live) == []  # shaped as KServe's CRD says a status is
    decision = rollout.canary_decision(live, 3, before, canary, workload)
    assert (decision.action, reason in decision.reason) == (action, True), decision


RAW_CASES = [
    # the patch is in, KServe has not written the Deployment yet: ISVC observedGeneration 7 >= 4, all Ready
    ("rolled_out", "rolled_out", "wait", "does not run"),
    ("rolling", "rolling", "wait", "1 of 2 replicas updated"),
    ("rolled_out_new", "rolled_out_new", "promote", "its Deployment rolled out"),
    ("rolled_out_new", None, "wait", "Deployment is not there"),
    ("deadline_exceeded", "deadline_exceeded", "rollback", "ProgressDeadlineExceeded"),
]


@pytest.mark.parametrize(("frame", "deployment", "action", "reason"), RAW_CASES)
def test_raw_decision(production_isvc, kserve, frame, deployment, action, reason):
    live = with_model(production_isvc) | {"status": kserve.statuses["raw"][frame]}
    live["metadata"] = live["metadata"] | {"generation": 4}
    assert custom_resource_errors(live) == []
    assert rollout.deployment_mode(live) == "Standard"
    assert rollout.revision_before(live) is None  # 0.14.1's latestCreatedRevision is a Deployment revision
    workload = kserve.deployments[deployment] if deployment else None
    decision = rollout.canary_decision(live, 4, None, None, workload)
    assert (decision.action, reason in decision.reason) == (action, True), decision


def test_a_raw_deployment_after_an_hpa_rescale_is_not_mistaken_for_the_new_generation(
    production_isvc, kserve
):
    """What the previous state machine trusted: observedGeneration >= generation and Ready."""
    live = with_model(production_isvc) | {"status": kserve.statuses["raw"]["rolled_out"]}
    live["metadata"] = live["metadata"] | {"generation": 4}
    assert live["status"]["observedGeneration"] > 4
    assert {c["type"]: c["status"] for c in live["status"]["conditions"]}["Ready"] == "True"
    assert rollout.canary_decision(live, 4, None, None, kserve.deployments["rolled_out"]).action == "wait"


def test_an_old_failure_of_another_revision_does_not_roll_back(production_isvc, kserve):
    status = copy.deepcopy(kserve.statuses["knative"]["canary_ready"])
    status["modelStatus"]["lastFailureInfo"] = {"reason": "ModelLoadFailed", "modelRevisionName": OLD}
    live = with_model(production_isvc) | {"status": status}
    assert rollout.canary_decision(live, 3, OLD, 10, kserve.ksvcs["canary_ready"]).action == "promote"


# ------------------------------------------------------------------------------------------------
# the deployment mode, per version


def test_the_mode_is_read_from_each_versions_status(production_isvc, kserve):
    """0.15.1+ record status.deploymentMode ("Serverless"/"RawDeployment" in 0.15, "Knative"/"Standard"
    from 0.16); 0.14 records nothing, and the status's shape tells."""
    recorded = {"v0.14.1": (None, None), "v0.15.2": ("Serverless", "RawDeployment")}
    knative, raw = recorded.get(kserve.version, ("Knative", "Standard"))
    for frame, status in kserve.statuses["knative"].items():
        assert status.get("deploymentMode") == knative, frame
        assert rollout.deployment_mode(production_isvc | {"status": status}) == "Knative", frame
    for frame, status in kserve.statuses["raw"].items():
        assert status.get("deploymentMode") == raw, frame
        assert rollout.deployment_mode(production_isvc | {"status": status}) == "Standard", frame


@pytest.mark.parametrize(
    ("status", "annotations", "canary"),
    [
        ({"deploymentMode": "Knative"}, {}, True),
        (
            {"deploymentMode": "Serverless"},
            {},
            True,
        ),  # 0.15's name, still recorded by 0.16.0 after an upgrade
        # the mode the controller recorded wins over the annotation (GetDeploymentMode)
        ({"deploymentMode": "Standard"}, {"serving.kserve.io/deploymentMode": "Knative"}, False),
        ({"deploymentMode": "RawDeployment"}, {}, False),
        ({}, {"serving.kserve.io/deploymentMode": "Knative"}, True),
        ({}, {"serving.kserve.io/deploymentMode": "Serverless"}, True),
        ({}, {"serving.kserve.io/deploymentMode": "RawDeployment"}, False),
        ({}, {"serving.kserve.io/deploymentMode": "Standard"}, False),
        # nothing recorded, nothing annotated, no status yet: the shipped default, Serverless (0.14.1-0.20.0)
        ({}, {}, True),
    ],
)
def test_the_canary_is_used_only_in_knative_mode(status, annotations, canary):
    isvc = {"metadata": {"annotations": annotations}, "status": status}
    assert rollout.is_serverless(isvc) is canary


def test_the_canary_share_needs_a_rolled_out_revision(production_isvc, kserve):
    def live(frame):
        return production_isvc | {"status": kserve.statuses["knative"][frame]}

    assert rollout.canary_share(live("rolled_out"), 10) == 10
    assert rollout.canary_share(live("never_rolled_out"), 10) is None
    assert (
        rollout.canary_share(production_isvc | {"status": kserve.statuses["raw"]["rolled_out"]}, 10) is None
    )
    assert rollout.canary_share(live("rolled_out"), None) is None


def test_the_workload_is_looked_up_where_kserve_names_it(production_isvc, kserve):
    knative = rollout.workload_refs(production_isvc | {"status": kserve.statuses["knative"]["rolled_out"]})
    raw = rollout.workload_refs(production_isvc | {"status": kserve.statuses["raw"]["rolled_out"]})
    assert [(r.plural, r.name) for r in knative] == [
        ("services", "recsys-predictor"),
        ("services", "recsys-predictor-default"),
    ]
    assert (raw[0].group, raw[0].version, raw[0].plural, raw[0].namespace) == (
        "apps",
        "v1",
        "deployments",
        "recsys",
    )
    unknown = rollout.workload_refs(production_isvc | {"status": {}})
    assert {r.plural for r in unknown} == {"services", "deployments"}


# ------------------------------------------------------------------------------------------------
# on the wire


class _ApiServer(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_PATCH(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "type": self.headers["Content-Type"], "body": body})
        status = 422 if any(op.get("value") == "conflict" for op in body) else 200
        self._reply(status, {"metadata": {"generation": 4}} if status == 200 else {"reason": "Invalid"})

    def do_GET(self):
        self.requests.append({"path": self.path, "method": "GET"})
        self._reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_patches_go_out_as_rfc6902_json_patch(production_isvc):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = k8s.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        api_client = k8s.ApiClient(configuration)
        api = deploy.InferenceServiceApi(SimpleNamespace(api_instance=k8s.CustomObjectsApi(api_client)))
        ops = rollout.model_patch(production_isvc, NEW_IMAGE, NEW_URI, 10)
        assert api.json_patch("recsys", "recsys", ops) == {"metadata": {"generation": 4}}
        (request,) = _ApiServer.requests
        _ApiServer.requests.clear()
        assert request == {
            "path": "/apis/serving.kserve.io/v1beta1/namespaces/recsys/inferenceservices/recsys",
            "type": "application/json-patch+json",
            "body": ops,
        }
        assert api.get("recsys", "recsys") is None  # 404: absent, a first deploy
        ref = rollout.WorkloadRef("apps", "v1", "deployments", "recsys", "recsys-predictor")
        assert api.get_workload(ref) is None  # 404: not there (yet)
        assert (
            _ApiServer.requests[-1]["path"] == "/apis/apps/v1/namespaces/recsys/deployments/recsys-predictor"
        )
        with pytest.raises(deploy.DeployError, match="patch failed: 422"):
            api.json_patch("recsys", "recsys", [{"op": "test", "path": "/x", "value": "conflict"}])
    finally:
        server.shutdown()
