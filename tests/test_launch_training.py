"""The training launcher (components/launch_training.py): torchrun for several processes on one node, a
Kubeflow PyTorchJob for several nodes (its manifest checked against the PyTorchJob CRD's openAPI schema),
and, on CPU, the same launcher running two gloo processes end to end."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from components import launch_training
from recsys import artifact_layout as layout
from recsys import manifest_schemas
from recsys.config import load_params
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
    manifest = launch_training.pytorch_job_manifest("recsys-train-dlrm-1a2b3c4d", "recsys", "dlrm", cfg, "/w")
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
        assert container["resources"]["limits"][cfg.accelerator_type] == "8"
        assert container["resources"]["requests"][cfg.accelerator_type] == "8"
        claims = {
            v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {cfg.training_volume}
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {launch_training.TRAINING_VOLUME_PATH}
        assert pod["nodeSelector"] == cfg.gpu_node_selector
        assert pod["tolerations"] == [
            {k: v for k, v in t.model_dump().items() if v is not None} for t in cfg.gpu_tolerations
        ]


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
