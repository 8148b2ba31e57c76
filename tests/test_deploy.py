"""The deploy step: the rendered InferenceService, its round trip through the KServe SDK, live-mode logic.

No cluster is reachable here, so live mode runs against a recording stand-in for ``KServeClient`` that
answers the four calls deploy makes (lookup, create/replace, wait, get) like the API would.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiException

from components import deploy
from recsys.config import ConfigError, load_params
from tests.conftest import REPO_ROOT, revalidated


@pytest.fixture(scope="module")
def params():
    return load_params(REPO_ROOT / "params.yaml")


@pytest.fixture(scope="module")
def rendered(params, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("deploy") / "isvc.yaml"
    assert deploy.main(["--params", str(REPO_ROOT / "params.yaml"), "--dry-run", "--output", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["predictor"]["containers"]
    return container


def test_dry_run_renders_the_custom_predictor(rendered, params):
    cfg = params.deploy
    assert rendered["apiVersion"] == "serving.kserve.io/v1beta1"
    assert rendered["kind"] == "InferenceService"
    assert (rendered["metadata"]["name"], rendered["metadata"]["namespace"]) == (cfg.isvc_name, cfg.namespace)
    predictor = rendered["spec"]["predictor"]
    assert predictor["minReplicas"] == cfg.min_replicas
    assert predictor["maxReplicas"] == cfg.max_replicas
    assert predictor["scaleTarget"] == cfg.scale_target
    assert predictor["scaleMetric"] == cfg.scale_metric
    assert predictor["serviceAccountName"] == cfg.service_account
    container = _container(rendered)
    assert container["name"] == "kserve-container"
    assert container["image"] == f"{cfg.image_repo}:{params.pipeline.image_tag}"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == cfg.storage_uri
    assert container["args"][:2] == ["--model_dir", deploy.MODEL_DIR]
    assert container["resources"] == {
        "requests": {"cpu": cfg.resources.cpu_request, "memory": cfg.resources.memory_request},
        "limits": {"cpu": cfg.resources.cpu_limit, "memory": cfg.resources.memory_limit},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": cfg.http_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": cfg.http_port}
    assert container["ports"] == [{"containerPort": cfg.http_port, "name": "http1", "protocol": "TCP"}]


def test_pod_security_settings(rendered, params):
    security = _container(rendered)["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == params.deploy.run_as_user > 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # a read-only root needs a writable /tmp, and the Feast config comes from a ConfigMap, read-only
    mounts = {m["mountPath"]: m for m in _container(rendered)["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered["spec"]["predictor"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    feast = mounts[deploy.FEAST_CONFIG_DIR]
    assert feast["readOnly"] is True
    assert volumes[feast["name"]]["configMap"]["name"] == params.deploy.feast_config_map
    assert _container(rendered)["envFrom"] == [{"secretRef": {"name": params.deploy.feast_secret}}]


def test_rendered_yaml_round_trips_through_the_sdk_model(rendered):
    from kserve import V1beta1InferenceService

    model = deploy.inference_service_from_dict(rendered)
    assert isinstance(model, V1beta1InferenceService)
    assert model.spec.predictor.containers[0].security_context.read_only_root_filesystem is True
    assert deploy.inference_service_to_dict(model) == rendered


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "predictor", "minReplica"), 1, "unknown field(s) ['minReplica']"),
        (("spec", "predictor", "containers", 0, "securityContext", "runAsNonRoot"), "yes", "expected bool"),
        (("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), "8080", "expected int"),
        (("spec", "predictor", "containers", 0, "name"), None, "`name`, must not be `None`"),
    ],
)
def test_strict_parse_rejects_what_the_sdk_would_drop_or_mistype(rendered, path, value, message):
    broken = yaml.safe_load(yaml.safe_dump(rendered))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(deploy.DeployError, match=re.escape(message)):
        deploy.inference_service_from_dict(broken)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("minio://mlpipeline/v2/artifacts/run/bundle", "s3://mlpipeline/v2/artifacts/run/bundle"),
        ("s3://models/bundles/v3", "s3://models/bundles/v3"),
        ("gs://models/bundle", "gs://models/bundle"),
        ("pvc://recsys-bundles/bundle", "pvc://recsys-bundles/bundle"),
    ],
)
def test_storage_uri_mapping(uri, expected):
    assert deploy.resolve_storage_uri(uri) == expected


def test_local_bundle_only_for_a_dry_run(tmp_path):
    with pytest.raises(deploy.DeployError, match="KServe cannot fetch it"):
        deploy.resolve_storage_uri(str(tmp_path))
    assert deploy.resolve_storage_uri(str(tmp_path), allow_local=True) == tmp_path.resolve().as_uri()


def test_bad_image_tag_fails_with_the_key(tmp_path, capsys):
    code = deploy.main(["--params", str(REPO_ROOT / "params.yaml"), "--dry-run", "--image-tag", "latest"])
    assert code == 1
    assert "pipeline.image_tag" in capsys.readouterr().err


def test_deploy_config_rejects_inverted_replicas(params):
    with pytest.raises(ValueError, match="min_replicas 4 exceeds max_replicas 2"):
        revalidated(params.deploy, min_replicas=4, max_replicas=2)
    with pytest.raises(ConfigError, match=r"deploy\.resources"):
        load_params(
            REPO_ROOT / "params.yaml",
            overrides={"deploy.resources.cpu_request": "4", "deploy.resources.cpu_limit": "2"},
        )


class RecordingKServe:
    """Answers deploy's calls like the API server: 404 until created, then a Ready generation."""

    def __init__(self, exists: bool, ready: bool = True, lookup_status: int = 404):
        self.exists, self.ready, self.lookup_status = exists, ready, lookup_status
        self.calls: list[tuple[str, Any]] = []
        self.api_instance = self

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("lookup", (group, version, namespace, plural, name)))
        if not self.exists:
            raise ApiException(status=self.lookup_status, reason="Not Found")
        return {"metadata": {"name": name, "generation": 3}}

    def create(self, isvc, namespace=None):
        self.calls.append(("create", isvc))
        return {"metadata": {"name": isvc.metadata.name, "generation": 1}}

    def replace(self, name, isvc, namespace=None):
        self.calls.append(("replace", isvc))
        return {"metadata": {"name": name, "generation": 4}}

    def wait_isvc_ready(self, name, namespace=None, timeout_seconds=600, polling_interval=10, **kwargs):
        self.calls.append(("wait", kwargs.get("expected_generation")))
        if not self.ready:
            raise RuntimeError(f"Timeout to start the InferenceService {name}")

    def get(self, name, namespace=None):
        return {"status": {"url": f"http://{name}.{namespace}.example.com"}}


def test_live_creates_when_absent_and_waits_for_its_generation(params, tmp_path):
    fake = RecordingKServe(exists=False)
    url = deploy.run(params.deploy, "0.1.0", "s3://b/v1", tmp_path / "applied.yaml", kserve_client=fake)
    assert url == "http://recsys.recsys.example.com"
    assert [c[0] for c in fake.calls] == ["lookup", "create", "wait"]
    assert fake.calls[0][1] == ("serving.kserve.io", "v1beta1", "recsys", "inferenceservices", "recsys")
    created = fake.calls[1][1]
    assert {e.name: e.value for e in created.spec.predictor.containers[0].env}["STORAGE_URI"] == "s3://b/v1"
    assert fake.calls[2][1] == 1
    assert "s3://b/v1" in (tmp_path / "applied.yaml").read_text()  # a record of what was applied


def test_live_replaces_when_present(params):
    fake = RecordingKServe(exists=True)
    deploy.run(params.deploy, "0.1.0", "minio://mlpipeline/x", kserve_client=fake)
    assert [c[0] for c in fake.calls] == ["lookup", "replace", "wait"]
    assert fake.calls[2][1] == 4  # waits for the new generation, not the old Ready one


def test_live_timeout_and_lookup_errors_are_named(params):
    with pytest.raises(deploy.DeployError, match=r"not Ready after 600s \(deploy.timeout_s\)"):
        deploy.run(
            params.deploy, "0.1.0", "s3://b/v1", kserve_client=RecordingKServe(exists=False, ready=False)
        )
    with pytest.raises(deploy.DeployError, match="lookup failed: 403"):
        deploy.run(
            params.deploy, "0.1.0", "s3://b/v1", kserve_client=RecordingKServe(False, lookup_status=403)
        )
    with pytest.raises(deploy.DeployError, match="KServe cannot fetch it"):
        deploy.run(params.deploy, "0.1.0", "/local/bundle", kserve_client=RecordingKServe(exists=False))
