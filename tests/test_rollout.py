"""The deploy step's rollout on a live InferenceService (components/deploy.py, recsys/isvc_rollout.py).

No cluster here, so the cluster is simulated at the API boundary: the production overlay's InferenceService
(``kubectl kustomize``) is stored, JSON Patches are applied to it by ``jsonpatch`` (RFC 6902, ``test`` ops
included) exactly as the API server applies them, every object written or read is validated against
KServe's InferenceService CRD schema (manifests/crds/), and the status each poll returns is one of the
status objects below, shaped like KServe 0.21's Knative-mode canary rollout reports them (and valid under
the CRD's status schema). The wire format of the patch request is checked against an HTTP server.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, ClassVar

import jsonpatch
import pytest
from kubernetes import client as k8s

from components import deploy
from recsys import isvc_rollout as rollout
from recsys.config import load_params
from recsys.manifest_schemas import custom_resource_errors, render_kustomization
from tests.conftest import REPO_ROOT, revalidated

PARAMS = load_params(REPO_ROOT / "params.yaml")
NEW_URI = "s3://recsys-models/bundles/20261203T101500Z-3f9a0c1b2d4e/"
NEW_IMAGE = f"{PARAMS.deploy.image_repo}:0.2.0"
OLD, NEW = "recsys-predictor-00001", "recsys-predictor-00002"
T = "2026-12-03T10:15:00Z"
URL = "http://recsys.recsys.example.com"


# ------------------------------------------------------------------------------------------------
# KServe InferenceService status objects (Knative mode, KServe 0.21's name for Serverless)


def condition(kind: str, status: str = "True", reason: str | None = None, message: str | None = None):
    out = {"type": kind, "status": status, "lastTransitionTime": T}
    if reason:
        out |= {"reason": reason, "severity": "Error" if status == "False" else "Info"}
    if message:
        out["message"] = message
    return out


def isvc_status(
    observed: int,
    created: str,
    ready: str,
    traffic: list[tuple[str, int, bool]],
    *,
    rolled_out: str = OLD,
    previous: str | None = None,
    conditions: dict[str, dict[str, Any]] | None = None,
    model: dict[str, Any] | None = None,
    mode: str = "Knative",
) -> dict[str, Any]:
    kinds = ["IngressReady", "LatestDeploymentReady", "PredictorConfigurationReady", "PredictorReady"]
    kinds += ["PredictorRouteReady", "Ready"]
    predictor = {
        "latestCreatedRevision": created,
        "latestReadyRevision": ready,
        "latestRolledoutRevision": rolled_out,
        "traffic": [
            {"revisionName": name, "percent": percent, "latestRevision": latest}
            for name, percent, latest in traffic
        ],
        "url": "http://recsys-predictor.recsys.example.com",
        "address": {"url": "http://recsys-predictor.recsys.svc.cluster.local"},
    }
    if previous:
        predictor["previousRolledoutRevision"] = previous
    return {
        "observedGeneration": observed,
        "deploymentMode": mode,
        "url": URL,
        "address": {"url": "http://recsys.recsys.svc.cluster.local"},
        "conditions": [(conditions or {}).get(kind) or condition(kind) for kind in kinds],
        "components": {"predictor": predictor},
        "modelStatus": model
        or {
            "copies": {"failedCopies": 0, "totalCopies": 1},
            "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
            "transitionStatus": "UpToDate",
        },
    }


def rolled_out(observed: int, revision: str = OLD, previous: str | None = None) -> dict[str, Any]:
    return isvc_status(
        observed, revision, revision, [(revision, 100, True)], rolled_out=revision, previous=previous
    )


def canary_pending(observed: int) -> dict[str, Any]:
    """The new revision exists but is not ready: Knative still resolves the latest route to the old one."""
    return isvc_status(
        observed,
        NEW,
        OLD,
        [(OLD, 10, True), (OLD, 90, False)],
        conditions={
            "LatestDeploymentReady": condition("LatestDeploymentReady", "Unknown", "Deploying"),
            "PredictorConfigurationReady": condition("PredictorConfigurationReady", "Unknown", "Deploying"),
            "PredictorReady": condition("PredictorReady", "Unknown", "RevisionMissing"),
            "Ready": condition("Ready", "Unknown", "RevisionMissing"),
        },
        model={
            "copies": {"failedCopies": 0, "totalCopies": 1},
            "states": {"activeModelState": "Loaded", "targetModelState": "Pending"},
            "transitionStatus": "InProgress",
        },
    )


def canary_ready(observed: int) -> dict[str, Any]:
    return isvc_status(observed, NEW, NEW, [(NEW, 10, True), (OLD, 90, False)])


def canary_failed(observed: int) -> dict[str, Any]:
    message = f'Revision "{NEW}" failed with message: Container failed with: bundle verify FAILED.'
    return isvc_status(
        observed,
        NEW,
        OLD,
        [(OLD, 10, True), (OLD, 90, False)],
        conditions={
            "LatestDeploymentReady": condition("LatestDeploymentReady", "False", "RevisionFailed", message),
            "PredictorConfigurationReady": condition(
                "PredictorConfigurationReady", "False", "RevisionFailed", message
            ),
            "PredictorReady": condition("PredictorReady", "False", "RevisionFailed", message),
            "Ready": condition("Ready", "False", "RevisionFailed", message),
        },
        model={
            "copies": {"failedCopies": 1, "totalCopies": 1},
            "states": {"activeModelState": "Loaded", "targetModelState": "FailedToLoad"},
            "transitionStatus": "BlockedByFailedLoad",
            "lastFailureInfo": {
                "reason": "ModelLoadFailed",
                "message": "bundle verify FAILED: file 'items.faiss' SHA-256 differs from the manifest",
                "exitCode": 1,
                "location": f"{NEW}-deployment-5d8f7c9b6-x2x7k",
                "modelRevisionName": NEW,
                "time": T,
            },
        },
    )


# ------------------------------------------------------------------------------------------------
# the cluster at its API boundary


@pytest.fixture(scope="module")
def production_isvc() -> dict[str, Any]:
    """The InferenceService as the operator applied it: the production overlay, generation 3."""
    try:
        objects = render_kustomization(REPO_ROOT / "manifests" / "overlays" / "production")
    except FileNotFoundError:
        pytest.skip("kubectl not installed (renders the production overlay)")
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    return isvc | {"metadata": isvc["metadata"] | {"generation": 3}}


class SimulatedCluster(deploy.InferenceServiceApi):
    """One InferenceService: JSON Patches applied by RFC 6902 rules, a new generation per spec change, the
    CRD schema enforced on every write and read, and ``statuses[generation][i]`` on the i-th read."""

    def __init__(self, isvc: dict[str, Any] | None, statuses: dict[int, list[dict[str, Any]]]):
        self.stored = copy.deepcopy(isvc)
        # the operator's service as found: generation 3, rolled out on revision 00001 (Knative mode)
        self.statuses = ({3: [rolled_out(3)]} if isvc is not None else {}) | statuses
        self.reads: dict[int, int] = {}
        self.patches: list[list[dict[str, Any]]] = []
        self.before_patch = None  # a concurrent edit, applied right before the next patch

    def get(self, name, namespace):
        if self.stored is None:
            return None
        generation = self.stored["metadata"]["generation"]
        i = self.reads.get(generation, 0)
        self.reads[generation] = i + 1
        frames = self.statuses.get(generation) or [{}]
        live = copy.deepcopy(self.stored) | {"status": copy.deepcopy(frames[min(i, len(frames) - 1)])}
        assert custom_resource_errors(live) == []
        return live

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


# ------------------------------------------------------------------------------------------------
# the rollout


def test_a_healthy_canary_is_promoted_and_the_operators_scaling_stays(production_isvc):
    cluster = SimulatedCluster(
        production_isvc,
        {4: [canary_pending(4), canary_pending(4), *[canary_ready(4)] * 10], 5: [rolled_out(5, NEW, OLD)]},
    )
    url, rollbacks = roll_out(cluster)
    assert url == URL and rollbacks == []
    model, promote = cluster.patches
    assert {"op": "add", "path": rollout.CANARY_PATH, "value": PARAMS.deploy.canary_traffic_percent} in model
    assert [op["op"] for op in model] == ["test", "test", "replace", "replace", "add"]
    assert promote == rollout.promote_patch(PARAMS.deploy.canary_traffic_percent)
    final = cluster.stored
    assert model_of(final) == (NEW_IMAGE, NEW_URI)
    assert "canaryTrafficPercent" not in final["spec"]["predictor"]  # promoted: 100% to the new revision
    # the production overlay's replicas, autoscaling, resources, probes, volumes: as the operator left them
    assert without_model(final) == without_model(production_isvc)
    predictor = final["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 10)
    assert predictor["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    # the patched object is a valid KServe SDK model too (strict: no unknown or mistyped field)
    deploy.inference_service_from_dict({k: v for k, v in final.items() if k != "status"})
    # promoted only after the canary stayed healthy for canary_soak_s
    assert cluster.reads[4] >= 2 + 1 + PARAMS.deploy.canary_soak_s / 10


def test_a_failed_canary_is_rolled_back_to_exactly_the_previous_spec(production_isvc):
    cluster = SimulatedCluster(
        production_isvc, {4: [canary_pending(4), canary_failed(4)], 5: [rolled_out(5)]}
    )
    with pytest.raises(
        deploy.DeployError, match=r"rolled back to s3://.*BlockedByFailedLoad.*ModelLoadFailed"
    ):
        roll_out(cluster)
    _, rollback = cluster.patches
    assert {"op": "remove", "path": rollout.CANARY_PATH} in rollback
    assert cluster.stored["spec"] == production_isvc["spec"]  # image, STORAGE_URI, no canary: as before


def test_the_rollback_hook_runs_with_the_reason(production_isvc):
    cluster = SimulatedCluster(production_isvc, {4: [canary_failed(4)]})
    config = revalidated(PARAMS.deploy)
    isvc = deploy.build_inference_service(config, NEW_IMAGE, NEW_URI)
    reasons: list[str] = []
    with pytest.raises(deploy.DeployError):
        deploy.roll_out(isvc, config, cluster, reasons.append, sleep=lambda s: None)
    assert len(reasons) == 1 and "BlockedByFailedLoad" in reasons[0]


def test_a_canary_that_never_becomes_ready_is_rolled_back_at_the_timeout(production_isvc):
    cluster = SimulatedCluster(production_isvc, {4: [canary_pending(4)]})
    with pytest.raises(deploy.DeployError, match=r"not healthy in time.*is not ready yet"):
        roll_out(cluster, timeout_s=120)
    assert cluster.stored["spec"] == production_isvc["spec"]
    assert 120 <= cluster.elapsed < 140


def test_a_canary_that_fails_during_the_soak_is_rolled_back(production_isvc):
    cluster = SimulatedCluster(production_isvc, {4: [canary_ready(4)] * 3 + [canary_failed(4)]})
    with pytest.raises(deploy.DeployError, match="rolled back"):
        roll_out(cluster, canary_soak_s=60)
    assert len(cluster.patches) == 2  # the model, then the rollback: never promoted
    assert cluster.stored["spec"] == production_isvc["spec"]


def test_the_first_deploy_creates_the_whole_service():
    cluster = SimulatedCluster(None, {1: [rolled_out(1)]})
    url, _ = roll_out(cluster)
    assert url == URL and cluster.patches == []
    expected = deploy.inference_service_to_dict(
        deploy.build_inference_service(PARAMS.deploy, NEW_IMAGE, NEW_URI)
    )
    assert {k: v for k, v in cluster.stored.items() if k != "metadata"} == {
        k: v for k, v in expected.items() if k != "metadata"
    }


def test_raw_deployments_roll_out_without_a_canary(production_isvc):
    raw = production_isvc | {
        "metadata": production_isvc["metadata"]
        | {"annotations": {"serving.kserve.io/deploymentMode": "Standard"}}
    }
    cluster = SimulatedCluster(raw, {3: [rolled_out(3) | {"deploymentMode": "Standard"}]})
    cluster.statuses[4] = [
        {
            "observedGeneration": 4,
            "deploymentMode": "Standard",
            "url": URL,
            "conditions": [condition("PredictorReady"), condition("Ready")],
        }
    ]
    url, _ = roll_out(cluster)
    assert url == URL
    (model,) = cluster.patches
    assert not any(op["path"] == rollout.CANARY_PATH for op in model)
    assert model_of(cluster.stored) == (NEW_IMAGE, NEW_URI)


def test_nothing_is_patched_when_the_model_is_already_serving(production_isvc):
    serving = copy.deepcopy(production_isvc)
    serving["spec"]["predictor"]["containers"][0]["image"] = NEW_IMAGE
    env = serving["spec"]["predictor"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "STORAGE_URI")["value"] = NEW_URI
    cluster = SimulatedCluster(serving, {3: [rolled_out(3)]})
    assert roll_out(cluster)[0] == URL
    assert cluster.patches == []


def test_a_concurrent_edit_fails_the_patch_instead_of_writing_elsewhere(production_isvc):
    cluster = SimulatedCluster(production_isvc, {})

    def operator_adds_an_env_var(stored):
        stored["spec"]["predictor"]["containers"][0]["env"].insert(0, {"name": "LOG_LEVEL", "value": "debug"})

    cluster.before_patch = operator_adds_an_env_var
    with pytest.raises(deploy.DeployError, match="patch failed: 422"):
        roll_out(cluster)
    assert model_of(cluster.stored) == model_of(production_isvc)


# ------------------------------------------------------------------------------------------------
# the decision on status objects


@pytest.mark.parametrize(
    ("status", "action", "reason"),
    [
        (rolled_out(3), "wait", "not reconciled generation 4"),
        (canary_pending(4), "wait", "not ready yet"),
        (isvc_status(4, NEW, NEW, [(NEW, 10, True), (OLD, 90, False)],
                     conditions={"Ready": condition("Ready", "Unknown", "IngressNotConfigured")}),
         "wait", "condition Ready is Unknown"),
        (isvc_status(4, NEW, NEW, [(OLD, 10, True), (OLD, 90, False)]), "wait", "serves 0%"),
        (canary_ready(4), "promote", "serving 10%"),
        (canary_failed(4), "rollback", "BlockedByFailedLoad"),
        (isvc_status(4, NEW, OLD, [(OLD, 100, True)], conditions={"PredictorConfigurationReady": condition(
            "PredictorConfigurationReady", "False", "ProgressDeadlineExceeded", "Initial scale never achieved"
        )}), "rollback", "ProgressDeadlineExceeded"),
        (rolled_out(4), "wait", "no new predictor revision"),
    ],
)  # fmt: skip
def test_canary_decision(production_isvc, status, action, reason):
    live = production_isvc | {"status": status}
    assert custom_resource_errors(live) == []  # shaped as KServe's CRD says a status is
    decision = rollout.canary_decision(live, 4, OLD, 10)
    assert (decision.action, reason in decision.reason) == (action, True), decision


def test_an_old_failure_of_another_revision_does_not_roll_back(production_isvc):
    status = canary_ready(4)
    status["modelStatus"]["lastFailureInfo"] = {"reason": "ModelLoadFailed", "modelRevisionName": OLD}
    assert rollout.canary_decision(production_isvc | {"status": status}, 4, OLD, 10).action == "promote"


def test_promoted_means_all_traffic_on_the_latest_revision(production_isvc):
    assert (
        rollout.canary_decision(production_isvc | {"status": canary_ready(5)}, 5, None, None).action == "wait"
    )
    assert rollout.canary_decision(
        production_isvc | {"status": rolled_out(5, NEW)}, 5, None, None
    ).action == ("promote")


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
        assert request == {
            "path": "/apis/serving.kserve.io/v1beta1/namespaces/recsys/inferenceservices/recsys",
            "type": "application/json-patch+json",
            "body": ops,
        }
        assert api.get("recsys", "recsys") is None  # 404: absent, a first deploy
        with pytest.raises(deploy.DeployError, match="patch failed: 422"):
            api.json_patch("recsys", "recsys", [{"op": "test", "path": "/x", "value": "conflict"}])
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("status", "annotations", "canary"),
    [
        ({"deploymentMode": "Knative"}, {}, True),
        ({"deploymentMode": "Serverless"}, {}, True),  # the deprecated name
        # the mode the controller recorded wins over the annotation
        ({"deploymentMode": "Standard"}, {"serving.kserve.io/deploymentMode": "Knative"}, False),
        ({}, {"serving.kserve.io/deploymentMode": "Knative"}, True),
        ({}, {"serving.kserve.io/deploymentMode": "RawDeployment"}, False),
        ({}, {}, False),  # KServe 0.21's default is Standard: no revisions to split traffic between
    ],
)
def test_the_canary_is_used_only_in_knative_mode(status, annotations, canary):
    isvc = {"metadata": {"annotations": annotations}, "status": status}
    assert rollout.is_serverless(isvc) is canary


def test_a_healthy_canary_left_by_an_interrupted_run_is_promoted(production_isvc):
    half_done = copy.deepcopy(production_isvc)
    half_done["spec"]["predictor"]["containers"][0]["image"] = NEW_IMAGE
    env = half_done["spec"]["predictor"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "STORAGE_URI")["value"] = NEW_URI
    half_done["spec"]["predictor"]["canaryTrafficPercent"] = 10
    cluster = SimulatedCluster(half_done, {3: [canary_ready(3)], 4: [rolled_out(4, NEW, OLD)]})
    assert roll_out(cluster)[0] == URL
    assert cluster.patches == [rollout.promote_patch(10)]


def test_an_unhealthy_service_that_already_has_the_model_is_left_alone(production_isvc):
    stuck = copy.deepcopy(production_isvc)
    stuck["spec"]["predictor"]["containers"][0]["image"] = NEW_IMAGE
    env = stuck["spec"]["predictor"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "STORAGE_URI")["value"] = NEW_URI
    cluster = SimulatedCluster(stuck, {3: [canary_failed(3)]})
    with pytest.raises(deploy.DeployError, match=r"not healthy.*nothing was changed"):
        roll_out(cluster)
    assert cluster.patches == []


def test_a_first_deploy_that_never_becomes_ready_fails_and_says_so():
    cluster = SimulatedCluster(None, {1: [canary_failed(1)]})
    with pytest.raises(deploy.DeployError, match=r"created but is not Ready.*BlockedByFailedLoad"):
        roll_out(cluster)
