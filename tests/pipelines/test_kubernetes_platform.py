"""The compiled pipeline's Kubernetes platform spec (kfp-kubernetes): exactly the Feast tasks get the
production feature_store.yaml (ConfigMap volume + $FEAST_FS_YAML_FILE_PATH) and the Feast Secret's keys as
environment; exactly the training tasks get the GPU nodes' tolerations and node selector, a memory-backed
/dev/shm, and (compiled for a cluster, not run-local) the flag that fails them when CUDA is missing; with
several training nodes the training tasks hold no GPU and mount the volume they share with their PyTorchJob.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from components import deploy
from pipelines.recsys_training import compile_pipeline
from recsys.gpu_pods import SHM_PATH, SHM_SIZE_LIMIT, SHM_VOLUME, TRAINING_VOLUME_PATH
from tests.conftest import REPO_ROOT, write_params

FEAST_TASKS = {"training-set", "online-store", "monitor"}  # monitor: the skew check reads the offline store
TRAIN_TASKS = {"train-two-tower", "train-multi-tower", "train-multi-tower-din", "train-dlrm"}
GPU_TASKS = TRAIN_TASKS | {"search"}  # the optional search trains models too


def _compile(tmp_path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    params_file = write_params(tmp_path / "params.yaml", changes or {})
    out = compile_pipeline(params_file, tmp_path / "pipeline.yaml")
    documents = list(yaml.safe_load_all(out.read_text()))
    (spec,) = [d for d in documents if "pipelineInfo" in d]
    platform = next((d for d in documents if "platforms" in d), {"platforms": {}})
    return {"spec": spec, "platform": platform["platforms"].get("kubernetes", {})}


def _tasks_by_executor(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Display name -> {executor label, container, task} for every task, inside conditions too."""
    found = {}

    def walk(dag: dict[str, Any]) -> None:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
                continue
            label = component["executorLabel"]
            container = spec["deploymentSpec"]["executors"][label]["container"]
            found[task["taskInfo"]["name"]] = {"executor": label, "container": container, "task": task}

    walk(spec["root"]["dag"])
    return found


@pytest.fixture(scope="module")
def single_node(tmp_path_factory) -> dict[str, Any]:
    return _compile(tmp_path_factory.mktemp("single"))


def test_exactly_the_feast_tasks_get_the_production_feast_config(single_node, params):
    tasks = _tasks_by_executor(single_node["spec"])
    executors = single_node["platform"]["deploymentSpec"]["executors"]
    with_config = {
        name for name, task in tasks.items() if "configMapAsVolume" in executors.get(task["executor"], {})
    }
    with_secret = {
        name
        for name, task in tasks.items()
        for secret in executors.get(task["executor"], {}).get("secretAsEnv", [])
        if secret["secretName"] == params.deploy.feast_secret
    }
    assert with_config == with_secret == FEAST_TASKS
    for name in FEAST_TASKS:
        config = executors[tasks[name]["executor"]]
        (volume,) = config["configMapAsVolume"]
        assert volume["configMapName"] == params.deploy.feast_config_map
        assert volume["mountPath"] == deploy.FEAST_CONFIG_DIR
        assert volume.get("optional", False) is False
        (secret,) = [s for s in config["secretAsEnv"] if s["secretName"] == params.deploy.feast_secret]
        assert secret["secretName"] == params.deploy.feast_secret
        assert {(e["secretKey"], e["envVar"]) for e in secret["keyToEnv"]} == {
            (key, key) for key in params.pipeline.feast_secret_keys
        }
        env = {e["name"]: e["value"] for e in tasks[name]["container"].get("env", [])}
        assert env[deploy.FEAST_YAML_ENV] == f"{deploy.FEAST_CONFIG_DIR}/feature_store.yaml"
        # the environment's Feast project: a key of the same ConfigMap (dev and production differ)
        (project,) = config["configMapAsEnv"]
        assert project["configMapName"] == params.deploy.feast_config_map
        assert project["keyToEnv"] == [
            {"configMapKey": deploy.FEAST_PROJECT_ENV, "envVar": deploy.FEAST_PROJECT_ENV}
        ]
    for name in set(tasks) - FEAST_TASKS:
        env = {e["name"] for e in tasks[name]["container"].get("env", [])}
        assert deploy.FEAST_YAML_ENV not in env, name


def test_the_secret_and_configmap_keys_are_the_variables_the_production_feature_store_yaml_uses(params):
    text = (REPO_ROOT / "feature_repo" / "feature_store.production.yaml").read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert set(re.findall(r"\$\{(\w+)\}", body)) == {
        *params.pipeline.feast_secret_keys,
        deploy.FEAST_PROJECT_ENV,
    }


def test_exactly_the_gpu_tasks_get_gpu_tolerations_and_node_selector(single_node, params):
    cfg = params.pipeline
    assert cfg.gpu_tolerations and cfg.gpu_node_selector, "the shipped params.yaml schedules onto GPU nodes"
    tasks = _tasks_by_executor(single_node["spec"])
    executors = single_node["platform"]["deploymentSpec"]["executors"]
    on_gpu = {name for name, task in tasks.items() if "tolerations" in executors.get(task["executor"], {})}
    selected = {name for name, task in tasks.items() if "nodeSelector" in executors.get(task["executor"], {})}
    assert on_gpu == selected == GPU_TASKS
    expected = [{k: v for k, v in t.model_dump().items() if v is not None} for t in cfg.gpu_tolerations]
    for name in GPU_TASKS:
        config = executors[tasks[name]["executor"]]
        assert config["tolerations"] == expected
        assert config["nodeSelector"]["labels"] == cfg.gpu_node_selector
        assert tasks[name]["container"]["resources"]["accelerator"]["resourceCount"] == str(
            cfg.accelerator_limit
        )


def _require_gpu(task: dict[str, Any]) -> Any:
    """The constant a task passes as ``require_gpu``, or None when it passes none."""
    value = task["task"].get("inputs", {}).get("parameters", {}).get("require_gpu")
    return None if value is None else value["runtimeValue"]["constant"]


def test_the_gpu_tasks_fail_without_cuda_and_get_a_memory_backed_dev_shm(single_node):
    tasks = _tasks_by_executor(single_node["spec"])
    executors = single_node["platform"]["deploymentSpec"]["executors"]
    requiring = {name for name, task in tasks.items() if _require_gpu(task) is not None}
    assert requiring == GPU_TASKS and all(_require_gpu(tasks[name]) is True for name in GPU_TASKS)
    with_shm = {
        name for name, task in tasks.items() if "emptyDirMounts" in executors.get(task["executor"], {})
    }
    assert with_shm == GPU_TASKS
    for name in GPU_TASKS:
        assert executors[tasks[name]["executor"]]["emptyDirMounts"] == [
            {"volumeName": SHM_VOLUME, "mountPath": SHM_PATH, "medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}
        ]


def test_tolerations_and_node_selector_follow_params(tmp_path):
    compiled = _compile(
        tmp_path,
        {
            "pipeline.gpu_tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
            ],
            "pipeline.gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        },
    )
    tasks = _tasks_by_executor(compiled["spec"])
    config = compiled["platform"]["deploymentSpec"]["executors"][tasks["train-dlrm"]["executor"]]
    assert config["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
    ]
    assert config["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}


def test_multi_node_training_tasks_hold_no_gpu_and_mount_the_shared_volume(tmp_path, params):
    compiled = _compile(tmp_path, {"pipeline.training_nodes": 3, "pipeline.accelerator_limit": 8})
    tasks = _tasks_by_executor(compiled["spec"])
    executors = compiled["platform"]["deploymentSpec"]["executors"]
    mounting = {name for name, task in tasks.items() if "pvcMount" in executors.get(task["executor"], {})}
    assert mounting == TRAIN_TASKS
    for name in TRAIN_TASKS:
        config = executors[tasks[name]["executor"]]
        (mount,) = config["pvcMount"]
        assert mount["mountPath"] == TRAINING_VOLUME_PATH
        assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == params.pipeline.training_volume
        assert "tolerations" not in config and "nodeSelector" not in config  # the PyTorchJob pods get them
        assert "emptyDirMounts" not in config  # ... and the /dev/shm, and run the CUDA check
        assert "accelerator" not in tasks[name]["container"]["resources"]
        assert _require_gpu(tasks[name]) is True
    assert {
        name for name, task in tasks.items() if "configMapAsVolume" in executors.get(task["executor"], {})
    } == (FEAST_TASKS)


def test_serving_gets_the_same_feast_config_map_and_secret_through_the_inference_service(params):
    """Serving is not a pipeline task: the InferenceService mounts the ConfigMap and takes the Secret."""
    isvc = deploy.inference_service_to_dict(
        deploy.build_inference_service(params.deploy, "r.io/recsys/serving:1", params.deploy.storage_uri)
    )
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    volumes = {v["name"]: v for v in predictor["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[deploy.FEAST_CONFIG_DIR]]["configMap"]["name"] == params.deploy.feast_config_map
    assert {"secretRef": {"name": params.deploy.feast_secret}} in container["envFrom"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[deploy.FEAST_YAML_ENV] == f"{deploy.FEAST_CONFIG_DIR}/feature_store.yaml"


def test_run_local_leaves_the_feast_path_to_the_local_runner(tmp_path, params):
    """kfp.local hands a task's env to its subprocess, where /etc/feast does not exist: the pipeline built for
    run-local keeps the Kubernetes config (ignored there) but sets no FEAST_FS_YAML_FILE_PATH."""
    from kfp import compiler

    from pipelines.recsys_training import build_pipeline

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(params, scheduled=False), str(out))
    spec, *_ = yaml.safe_load_all(out.read_text())
    tasks = _tasks_by_executor(spec)
    for name in FEAST_TASKS:
        assert deploy.FEAST_YAML_ENV not in {e["name"] for e in tasks[name]["container"].get("env", [])}
    for name in GPU_TASKS:  # run-local trains on CPU by design
        assert _require_gpu(tasks[name]) is False, name


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "pipeline.gpu_tolerations",
            [{"key": "a", "operator": "Exists", "value": "x", "effect": None}],
            "no value",
        ),
        (
            "pipeline.gpu_tolerations",
            [{"key": None, "operator": "Equal", "value": "x", "effect": None}],
            "Exists",
        ),
        ("pipeline.feast_secret_keys", ["REDIS-URL"], "environment variable"),
        ("pipeline.training_nodes", 0, "training_nodes"),
    ],
)
def test_bad_cluster_settings_fail_early_with_their_key(tmp_path, key, value, message):
    from recsys.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=message) as error:
        load_params(write_params(tmp_path / "params.yaml", {key: value}))
    assert key.split(".")[1] in str(error.value)
