"""The training launcher (components/launch_training.py): torchrun for several processes on one node, a
Kubeflow PyTorchJob for several nodes (its manifest checked against the PyTorchJob CRD's openAPI schema,
owned by the task's pod), the CUDA check that keeps a GPU task from training on CPU, and, on CPU, the same
launcher running two gloo processes end to end."""

from __future__ import annotations

import copy
import json
import logging
import re
import sys

import pytest
from kubernetes import client as k8s

from components import launch_training, train
from recsys import artifact_layout as layout
from recsys import manifest_schemas
from recsys.config import load_params
from recsys.kube_namespace import NamespaceError
from tests.conftest import (
    REPO_ROOT,
    build_training_sets,
    pipeline_workdir,
    revalidated,
    shipped_params,
    write_params,
)


def _multi_node(nodes: int = 3, gpus: int = 8):
    return revalidated(shipped_params().pipeline, training_nodes=nodes, accelerator_limit=gpus)


POD_UID = "0b6c3a1e-1f0c-4c1e-9d58-2f4f5a7c9e11"
OWNER = {
    "apiVersion": "v1", "kind": "Pod", "name": "recsys-training-abc-123", "uid": POD_UID,
    "controller": False, "blockOwnerDeletion": False,
}  # fmt: skip


class FakeCoreV1Api:
    """Stands in for kubernetes.client.CoreV1Api: one readable pod, or an API error for every read."""

    def __init__(self, pod: k8s.V1Pod | None = None, error: Exception | None = None) -> None:
        self.pod, self.error, self.reads = pod, error, []

    def read_namespaced_pod(self, name: str, namespace: str) -> k8s.V1Pod:
        self.reads.append((namespace, name))
        if self.error is not None:
            raise self.error
        return self.pod


@pytest.fixture
def no_pod_env(monkeypatch):
    for name in ("KFP_POD_NAME", "KFP_POD_UID", "HOSTNAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_cuda_check_fails_clearly_when_torch_sees_too_few_gpus(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    train.require_gpus(0, "nvidia.com/gpu")  # nothing asked for, nothing checked
    if not torch.cuda.is_available():  # this machine: the message says what torch sees
        with pytest.raises(train.GpuUnavailableError) as error:
            train.require_gpus(1, "nvidia.com/gpu")
        message = str(error.value)
        for part in (
            "asked for 1 x nvidia.com/gpu", "torch sees 0 CUDA device(s)", f"torch {torch.__version__}",
            "CUDA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=<unset>", "device plugin",
            "CUDA training image", "Refusing to train on CPU",
        ):  # fmt: skip
            assert part in message, (part, message)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    train.require_gpus(2, "nvidia.com/gpu")
    too_few = re.escape("asked for 4 x nvidia.com/gpu but torch sees 2")
    with pytest.raises(train.GpuUnavailableError, match=too_few):
        train.require_gpus(4, "nvidia.com/gpu")


def test_the_train_cli_checks_the_gpus_before_reading_anything(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params_file = write_params(tmp_path / "params.yaml", {})
    argv = ["--model", "dlrm", "--params", str(params_file), "--training-dir", str(tmp_path / "missing")]
    accelerator = shipped_params().pipeline.accelerator_type
    with pytest.raises(train.GpuUnavailableError, match=re.escape(f"asked for 2 x {accelerator}")):
        train.main([*argv, "--require-gpu", "2"])
    with pytest.raises(FileNotFoundError):  # no check asked for: it goes on to read the missing sets
        train.main(argv)


def test_a_gpu_task_fails_before_launching_when_cuda_is_missing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launched = []
    monkeypatch.setattr(launch_training.subprocess, "run", lambda *a, **k: launched.append(a))
    params_file = write_params(tmp_path / "params.yaml", {"pipeline.accelerator_limit": 2})
    out = tmp_path / "out"
    paths = (tmp_path / "train", out / "model", out / "m.json", out / "c.png")
    with pytest.raises(train.GpuUnavailableError, match="asked for 2 x"):
        launch_training.run("dlrm", params_file, *paths, require_gpu=True)
    assert launched == []  # never a silent CPU run


def test_the_job_owner_comes_from_the_kfp_pod_env_or_the_api(no_pod_env, caplog):
    monkeypatch = no_pod_env
    assert launch_training.task_pod_owner("recsys", FakeCoreV1Api()) is None  # no pod name at all
    monkeypatch.setenv("KFP_POD_NAME", OWNER["name"])
    monkeypatch.setenv("KFP_POD_UID", POD_UID)
    unread = FakeCoreV1Api()
    assert launch_training.task_pod_owner("recsys", unread) == OWNER  # the launcher's downward-API env
    assert unread.reads == []
    monkeypatch.delenv("KFP_POD_NAME")
    monkeypatch.delenv("KFP_POD_UID")
    monkeypatch.setenv("HOSTNAME", OWNER["name"])
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=OWNER["name"], namespace="recsys", uid=POD_UID))
    api = FakeCoreV1Api(pod)
    owner = launch_training.task_pod_owner("recsys", api)
    assert owner == OWNER and api.reads == [("recsys", OWNER["name"])]
    # the names the API server reads: what the client's own V1OwnerReference serialises to
    reference = k8s.V1OwnerReference(
        api_version="v1", kind="Pod", name=OWNER["name"], uid=POD_UID, controller=False,
        block_owner_deletion=False,
    )  # fmt: skip
    assert k8s.ApiClient().sanitize_for_serialization(reference) == owner
    forbidden = FakeCoreV1Api(error=k8s.ApiException(status=403, reason="Forbidden"))
    with caplog.at_level(logging.WARNING, logger=launch_training.__name__):
        assert launch_training.task_pod_owner("recsys", forbidden) is None
    assert "PyTorchJob without an owner: cannot read pod recsys/" in caplog.text
    assert "ApiException" in caplog.text and "403" in caplog.text


def test_one_process_runs_the_train_cli_and_several_run_torchrun():
    paths = ("p.yaml", "train", "model", "m.json", "c.png")
    plain = launch_training.train_command("dlrm", *paths, nproc=1)
    assert plain[:3] == [sys.executable, "-m", "components.train"]
    assert "torch.distributed.run" not in plain
    local = launch_training.train_command("dlrm", *paths, nproc=4)
    assert local[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone"]
    assert local[5:7] == ["-m", "components.train"]
    nodes = launch_training.train_command("dlrm", *paths, nproc=8, nodes=3, python="python")
    assert nodes[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=3"]
    assert "--standalone" not in nodes  # the rendezvous is the Master pod (PET_MASTER_ADDR from the operator)
    for command in (plain, local, nodes):
        start = command.index("--model")
        flags = dict(zip(command[start::2], command[start + 1 :: 2], strict=True))
        assert flags == {
            "--model": "dlrm", "--params": "p.yaml", "--training-dir": "train", "--model-dir": "model",
            "--metrics": "m.json", "--plot": "c.png",
        }  # fmt: skip


@pytest.mark.parametrize("nodes", [2, 4])
def test_pytorch_job_manifest_matches_the_crd_schema(nodes):
    cfg = _multi_node(nodes=nodes)
    manifest = launch_training.pytorch_job_manifest(
        "recsys-train-dlrm-1a2b3c4d", "recsys", "dlrm", cfg, "/w", owner=OWNER
    )
    assert manifest["metadata"]["ownerReferences"] == [OWNER]
    assert manifest_schemas.custom_resource_errors(manifest) == []
    assert "PyTorchJob" in manifest_schemas.validate_object(manifest)


def test_the_crd_schema_rejects_a_broken_pytorch_job():
    """The schema check is live: a misspelt field, a wrong type and a missing container name all fail."""
    good = launch_training.pytorch_job_manifest("j", "recsys", "dlrm", _multi_node(), "/w")
    typo = copy.deepcopy(good)
    typo["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["tolerations"][0]["efect"] = (
        "NoSchedule"
    )
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    nameless = copy.deepcopy(good)
    del nameless["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    bad_resources = copy.deepcopy(good)
    bad_resources["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "resources"
    ] = ["8 GPUs"]
    for broken in (typo, wrong_type, nameless, bad_resources):
        assert manifest_schemas.custom_resource_errors(broken), broken
        with pytest.raises(manifest_schemas.ManifestError):
            manifest_schemas.validate_object(broken)


def test_pytorch_job_runs_torchrun_on_every_node_with_the_gpus_and_the_shared_volume():
    cfg = _multi_node(nodes=3, gpus=8)
    job = launch_training.pytorch_job_manifest(
        "recsys-train-dlrm-x", "recsys", "dlrm", cfg, "/mnt/training/x"
    )
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["namespace"] == "recsys"
    assert "ownerReferences" not in job["metadata"]  # no owner known: none invented
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"]["activeDeadlineSeconds"] == cfg.training_job_timeout_s
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the name the Training Operator looks for
        assert container["image"] == cfg.training_image
        command = container["command"]
        assert command[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=3"]
        assert command[command.index("--training-dir") + 1] == "/mnt/training/x/training_sets"
        assert command[command.index("--model-dir") + 1] == "/mnt/training/x/model"
        assert command[command.index("--require-gpu") + 1] == "8"  # every rank checks its pod's GPUs
        assert container["resources"]["limits"][cfg.accelerator_type] == "8"
        assert container["resources"]["requests"][cfg.accelerator_type] == "8"
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {cfg.training_volume}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert launch_training.TRAINING_VOLUME_PATH in mounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {
            "medium": "Memory", "sizeLimit": launch_training.SHM_SIZE_LIMIT
        }  # fmt: skip
        assert pod["nodeSelector"] == cfg.gpu_node_selector
        assert pod["tolerations"] == [
            {k: v for k, v in t.model_dump().items() if v is not None} for t in cfg.gpu_tolerations
        ]


class FakeCustomObjectsApi:
    """Stands in for the Training Operator: keeps the created job; the first read finds it done, with the
    outputs the job's rank 0 writes on the shared volume."""

    def __init__(self) -> None:
        self.created: list[dict] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        work = launch_training.Path(launch_training.TRAINING_VOLUME_PATH) / name
        (work / "model").mkdir()
        (work / "model" / "model.safetensors").write_bytes(b"weights")
        (work / "metrics.json").write_text("{}")
        (work / "curves.png").write_bytes(b"png")
        return {"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}


def test_the_pytorch_job_is_created_owned_by_the_task_pod(tmp_path, no_pod_env):
    monkeypatch = no_pod_env
    monkeypatch.setattr(launch_training, "TRAINING_VOLUME_PATH", str(tmp_path / "volume"))
    # the task pod's ServiceAccount namespace file: the job goes beside its owner, whatever params say
    (tmp_path / "sa-namespace").write_text("team-a\n")
    monkeypatch.setattr(launch_training, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "sa-namespace")
    monkeypatch.setenv("HOSTNAME", OWNER["name"])
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=OWNER["name"], uid=POD_UID))
    params_file = write_params(tmp_path / "params.yaml", {})
    (tmp_path / "sets").mkdir()
    api, out = FakeCustomObjectsApi(), tmp_path / "out"
    launch_training.run_pytorch_job(
        "dlrm", params_file, tmp_path / "sets", out / "model", out / "m.json", out / "c.png",
        revalidated(_multi_node(nodes=2, gpus=4), namespace="elsewhere"), api=api,
        core_api=FakeCoreV1Api(pod), poll_s=0,
    )  # fmt: skip
    (job,) = api.created
    assert job["metadata"]["namespace"] == "team-a"
    assert job["metadata"]["ownerReferences"] == [OWNER]
    assert manifest_schemas.custom_resource_errors(job) == []
    assert (out / "model" / "model.safetensors").read_bytes() == b"weights"


def test_outside_a_pod_the_job_goes_to_pipeline_namespace_and_none_set_is_a_clear_error(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(launch_training, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "no-service-account")
    monkeypatch.setattr(launch_training, "TRAINING_VOLUME_PATH", str(tmp_path / "volume"))
    params_file = write_params(tmp_path / "params.yaml", {})
    (tmp_path / "sets").mkdir()
    assert shipped_params().pipeline.namespace is None  # params.yaml names no namespace
    with pytest.raises(NamespaceError, match=r"pipeline\.namespace is null"):
        launch_training.run_pytorch_job(
            "dlrm", params_file, tmp_path / "sets", tmp_path / "m", tmp_path / "m.json", tmp_path / "c.png",
            _multi_node(nodes=2, gpus=4), api=FakeCustomObjectsApi(), poll_s=0,
        )  # fmt: skip


def test_job_outcome_reads_the_operators_final_condition():
    assert launch_training.job_outcome({}) is None
    running = {
        "status": {
            "conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]
        }
    }
    assert launch_training.job_outcome(running) is None
    done = copy.deepcopy(running)
    done["status"]["conditions"].append(
        {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}
    )
    assert launch_training.job_outcome(done)[0] == "Succeeded"
    failed = copy.deepcopy(running)
    failed["status"]["conditions"].append(
        {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "Worker 1 exited 1"}
    )
    assert launch_training.job_outcome(failed) == ("Failed", "PyTorchJobFailed: Worker 1 exited 1")


@pytest.fixture(scope="module")
def tiny_training_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    with pipeline_workdir(root):
        params = load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "tiny"})
        build_training_sets(params)
        return root / layout.TRAINING_DIR


@pytest.mark.slow
def test_launcher_trains_with_two_gloo_processes_on_cpu(tiny_training_sets, tmp_path, capfd):
    params_file = write_params(
        tmp_path / "params.yaml",
        {"data.synthetic.preset": "tiny", "training.epochs": 1, "training.device": "cpu"},
    )
    out = tmp_path / "out"
    metrics = launch_training.run(
        "dlrm",
        params_file,
        tiny_training_sets,
        out / "model",
        out / "metrics.json",
        out / "curves.png",
        nproc=2,
    )
    # both ranks joined the gloo group and trained (DDP all-reduces every step); rank 0 wrote the outputs
    assert metrics["world_size"] == 2
    logs = capfd.readouterr().err
    # each rank logs epoch 1 twice: the early-stopped run and the refit on train + valid
    assert logs.count("epoch 1:") == 4, logs
    assert metrics["refit"]["epochs"] == 1 and metrics["refit"]["rows"] > metrics["train_rows"]
    assert logs.count("train dlrm:") == 1, logs
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "model" / "model.safetensors").stat().st_size > 0
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from models import load_model

    model, _ = load_model(out / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]


@pytest.mark.slow
def test_launcher_fails_clearly_when_training_fails(tmp_path):
    params_file = write_params(tmp_path / "params.yaml", {"training.device": "cpu"})
    out = tmp_path / "out"
    with pytest.raises(launch_training.TrainingJobError, match="training dlrm failed"):
        launch_training.run(
            "dlrm", params_file, tmp_path / "missing", out / "model", out / "m.json", out / "c.png", nproc=2
        )
    assert not (out / "model").exists()


def test_pytorch_job_pods_pull_the_training_image_by_digest_with_the_pull_secrets():
    digest = "sha256:" + "cd" * 32
    cfg = revalidated(
        _multi_node(nodes=2), training_image_digest=digest, image_pull_secrets=["regcred", "mirror"]
    )
    job = launch_training.pytorch_job_manifest("j", "recsys", "dlrm", cfg, "/w")
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
        assert pod["containers"][0]["image"] == f"{cfg.training_image_repo}@{digest}"
    assert manifest_schemas.custom_resource_errors(job) == []
    plain = launch_training.pytorch_job_manifest("j", "recsys", "dlrm", _multi_node(nodes=2), "/w")
    assert "imagePullSecrets" not in plain["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_every_pytorch_job_pod_runs_restricted_as_the_images_user():
    """The restricted Pod Security Standard: non-root as the images' uid, no escalation, no capabilities,
    the runtime's seccomp profile; volumes writable by that group (a namespace labelled
    pod-security.kubernetes.io/enforce: restricted admits the job's pods)."""
    cfg = _multi_node(nodes=2, gpus=4)
    job = launch_training.pytorch_job_manifest("j", "recsys", "dlrm", cfg, "/w")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        spec = replica["template"]["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["securityContext"]["fsGroup"] == cfg.run_as_user == 1000
        (container,) = spec["containers"]
        assert container["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_user,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    assert manifest_schemas.custom_resource_errors(job) == []
