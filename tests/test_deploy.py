"""The deploy step: the rendered InferenceService, its round trip through the KServe SDK, live-mode logic.

Live mode (the rollout on a cluster) is tests/test_rollout.py's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from components import deploy
from recsys.config import ConfigError, load_params
from tests.conftest import REPO_ROOT, revalidated, write_params


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
    assert rendered["metadata"]["name"] == cfg.isvc_name
    # deploy.namespace null: the manifest names none; an overlay places it, the deploy task uses its own
    assert cfg.namespace is None and "namespace" not in rendered["metadata"]
    predictor = rendered["spec"]["predictor"]
    assert predictor["minReplicas"] == cfg.min_replicas
    assert predictor["maxReplicas"] == cfg.max_replicas
    assert predictor["scaleTarget"] == cfg.scale_target
    assert predictor["scaleMetric"] == cfg.scale_metric
    assert predictor["serviceAccountName"] == cfg.service_account
    container = _container(rendered)
    assert container["name"] == "kserve-container"
    assert container["image"] == f"{cfg.image_repo}:{params.pipeline.image_tag}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["STORAGE_URI"] == cfg.storage_uri
    (project,) = [e for e in container["env"] if e["name"] == deploy.FEAST_PROJECT_ENV]
    assert project["valueFrom"] == {
        "configMapKeyRef": {"name": cfg.feast_config_map, "key": deploy.FEAST_PROJECT_ENV}
    }  # the environment's Feast project, as the pipeline's Feast tasks get it
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
    assert _container(rendered)["envFrom"] == [
        {"secretRef": {"name": params.deploy.feast_secret}},
        {"secretRef": {"name": params.deploy.storage_secret, "optional": True}},  # read bundles, write logs
    ]


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


# ---- a private registry: the serving image by digest, pulled with the pull secrets ----


def test_the_serving_image_by_digest_with_pull_secrets_matches_the_crd(tmp_path):
    from recsys import manifest_schemas

    digest = "sha256:" + "ab" * 32
    params_file = write_params(
        tmp_path / "params.yaml",
        {"deploy.image_digest": digest, "deploy.image_pull_secrets": ["regcred", "mirror.example.com"]},
    )
    out = tmp_path / "isvc.yaml"
    assert deploy.main(["--params", str(params_file), "--dry-run", "--output", str(out)]) == 0
    isvc = yaml.safe_load(out.read_text())
    params = load_params(params_file)
    assert _container(isvc)["image"] == f"{params.deploy.image_repo}@{digest}"  # the tag is not used
    predictor = isvc["spec"]["predictor"]
    assert predictor["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.example.com"}]
    assert manifest_schemas.custom_resource_errors(isvc) == []
    assert deploy.inference_service_to_dict(deploy.inference_service_from_dict(isvc)) == isvc
    broken = yaml.safe_load(out.read_text())
    broken["spec"]["predictor"]["imagePullSecrets"] = ["regcred"]  # names, not LocalObjectReferences
    assert manifest_schemas.custom_resource_errors(broken)


def test_no_pull_secrets_by_default(rendered):
    assert "imagePullSecrets" not in rendered["spec"]["predictor"]
