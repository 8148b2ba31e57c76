"""Every object ``kubectl kustomize`` renders validates: core kinds against Kubernetes' openAPI schemas
(kubernetes-validate, strict), the InferenceService against KServe's CRD schema, the launcher's PyTorchJob
against the Training Operator's (tests/test_launch_training.py); plus the profile namespace and the
training RBAC."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from recsys import manifest_schemas
from recsys.config import load_params
from tests.conftest import REPO_ROOT

MANIFESTS = REPO_ROOT / "manifests"
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/production"]
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomize_output_validates_against_kubernetes_and_crd_schemas(kustomization):
    objects = manifest_schemas.render_kustomization(MANIFESTS / kustomization)
    reports = manifest_schemas.validate_objects(objects)
    assert len(reports) == len(objects)
    assert any("InferenceService" in r and "CRD schema" in r for r in reports)
    assert sum("Kubernetes" in r for r in reports) == len(objects) - 1


def test_the_validators_reject_what_a_cluster_would():
    (isvc,) = _documents(MANIFESTS / "base" / "inferenceservice.yaml")
    assert manifest_schemas.custom_resource_errors(isvc) == []
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["minReplica"] = 2
    wrong = copy.deepcopy(isvc)
    wrong["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for broken in (typo, wrong):
        with pytest.raises(manifest_schemas.ManifestError, match="InferenceService/recsys"):
            manifest_schemas.validate_object(broken)
    role = next(d for d in _documents(MANIFESTS / "base" / "training-rbac.yaml") if d["kind"] == "Role")
    manifest_schemas.validate_object(role)
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(manifest_schemas.ManifestError, match="Role/recsys-trainer"):
        manifest_schemas.validate_object(role)
    with pytest.raises(manifest_schemas.ManifestError, match="no schema"):
        manifest_schemas.validate_object({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}})


def test_shipped_crd_schemas_name_their_source_and_are_reduced_losslessly():
    """The shipped files say where they came from; the reduction keeps every schema keyword reachable: a
    $ref points at a $defs entry, and no name -> schema map (properties) was replaced by a reference."""
    readme = (MANIFESTS / "crds" / "README.md").read_text()
    for (api_version, kind), filename in manifest_schemas.CUSTOM_RESOURCES.items():
        shipped = json.loads((MANIFESTS / "crds" / filename).read_text())
        assert f"{shipped['group']}/{shipped['version']}" == api_version and shipped["kind"] == kind
        assert shipped["source"].startswith("https://github.com/") and filename in readme
        defs = shipped["schema"]["$defs"]

        def walk(node, defs=defs):
            if isinstance(node, dict):
                if "$ref" in node:
                    assert node["$ref"].removeprefix("#/$defs/") in defs
                for key in ("properties", "patternProperties"):
                    assert "$ref" not in node.get(key, {}), "a properties map became a reference"
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        walk(shipped["schema"])
    assert "Apache-2.0" in readme


def test_reduce_crd_shares_repeated_subtrees_without_changing_validation():
    container = {
        "type": "object",
        "description": "dropped: no validation meaning",
        "required": ["name"],
        "properties": {name: {"type": "string"} for name in ("name", "image", "workingDir", "command0")},
    }
    container["properties"]["env"] = {"type": "array", "items": {"type": "object", "required": ["name"]}}
    crd = {
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "containers": {"type": "array", "items": container},
                                        "initContainers": {"type": "array", "items": container},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    reduced = manifest_schemas.reduce_crd(crd, "https://example.com/crd.yaml")
    assert reduced["schema"]["$defs"], "the repeated container schema is stored once"
    assert "description" not in json.dumps(reduced)
    strict = manifest_schemas._strict(reduced["schema"])
    import jsonschema

    good = {"spec": {"containers": [{"name": "a"}], "initContainers": [{"name": "b", "image": "i"}]}}
    assert not list(jsonschema.Draft202012Validator(strict).iter_errors(good))
    for bad in (
        {"spec": {"initContainers": [{"image": "i"}]}},  # name required
        {"spec": {"containers": [{"name": "a", "imag": "i"}]}},  # unknown field
    ):
        assert list(jsonschema.Draft202012Validator(strict).iter_errors(bad))


def test_profile_namespace_carries_the_labels_kfp_multi_user_and_kserve_need():
    (namespace,) = _documents(MANIFESTS / "profile" / "namespace.yaml")
    manifest_schemas.validate_object(namespace)
    production = yaml.safe_load((MANIFESTS / "overlays" / "production" / "kustomization.yaml").read_text())
    assert namespace["metadata"]["name"] == production["namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pipelines.kubeflow.org/enabled"] == "true"  # KFP multi-user provisions the namespace
    assert labels["app.kubernetes.io/part-of"] == "kubeflow-profile"
    assert labels["katib.kubeflow.org/metrics-collector-injection"] == "enabled"
    assert "control-plane" not in labels  # KServe's pod webhook skips namespaces labelled control-plane
    (profile,) = _documents(MANIFESTS / "profile" / "profile.yaml")
    assert profile["apiVersion"] == "kubeflow.org/v1" and profile["kind"] == "Profile"
    assert profile["metadata"]["name"] == production["namespace"]
    assert "namespace" not in profile["metadata"]  # cluster-scoped
    assert profile["spec"]["owner"]["kind"] == "User" and profile["spec"]["owner"]["name"]


def test_the_run_service_account_may_manage_pytorch_jobs_and_nothing_more():
    params = load_params(REPO_ROOT / "params.yaml")
    objects = _documents(MANIFESTS / "base" / "training-rbac.yaml")
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["kubeflow.org"],
            "resources": ["pytorchjobs"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        },
        {  # the features task's SparkApplication (features.engine: spark; recsys/spark_application.py)
            "apiGroups": ["sparkoperator.k8s.io"],
            "resources": ["sparkapplications"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        },
    ]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": params.pipeline.service_account}]
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert "training-rbac.yaml" in kustomization["resources"]
