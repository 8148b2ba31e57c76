"""Launch step for training: one model's ``python -m components.train``, on as many processes as configured.

- ``pipeline.training_nodes == 1``: in this process's machine (the pipeline's training task pod, or a
  laptop). ``pipeline.accelerator_limit > 1`` (or ``--nproc N``) starts ``torchrun --standalone
  --nproc_per_node=N`` (as ``python -m torch.distributed.run``), so every GPU of the pod trains a rank
  of DistributedDataParallel (models/trainer.py: NCCL on GPU, gloo on CPU); one process runs the train
  CLI directly.
- ``pipeline.training_nodes > 1``: a Kubeflow Training Operator ``PyTorchJob`` (``kubeflow.org/v1``) of
  ``training_nodes`` pods (one Master, the rest Workers), each running ``torchrun --nnodes=N
  --nproc_per_node=accelerator_limit``; the operator gives every pod its node rank and the master's
  address (``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, which torchrun reads). The
  training sets and the outputs travel through the ReadWriteMany volume ``pipeline.training_volume``,
  mounted at :data:`TRAINING_VOLUME_PATH` in the task and in the job's pods. The step waits for the job
  to succeed or fail and fails with the job's reason and how to read its logs. The job is owned by the
  task's own Pod (``metadata.ownerReferences``), so Kubernetes' garbage collector deletes it, and its
  pods, when the run's pod goes (run deleted, pod evicted or retried).

A task that holds GPUs (``require_gpu``; the compiled pipeline's, not run-local's) fails before training
when CUDA shows fewer than ``pipeline.accelerator_limit`` devices, rather than silently training on CPU;
the PyTorchJob's pods run the same check (``components.train --require-gpu N``). Every GPU pod gets a
memory-backed /dev/shm (:data:`SHM_SIZE_LIMIT`): NCCL and DataLoader workers share tensors through it,
and a container's default is 64 MiB.

The manifest is built by :func:`pytorch_job_manifest` only (tests validate it against the PyTorchJob
CRD's openAPI schema, manifests/crds/).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.registry import MODEL_KINDS
from recsys.config import PipelineConfig
from recsys.gpu_pods import SHM_PATH, SHM_SIZE_LIMIT, SHM_VOLUME, TRAINING_VOLUME_PATH, harden
from recsys.kube_namespace import SERVICE_ACCOUNT_NAMESPACE, own_namespace, pod_namespace
from recsys.step_contract import STEPS
from recsys.task_pod import custom_objects_api, task_pod_owner

CONTRACT = STEPS["train"]

log = logging.getLogger(__name__)

PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
PYTORCH_CONTAINER = "pytorch"  # the container name the Training Operator looks for in a PyTorchJob
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # the label the operator puts on the job's pods


class TrainingJobError(RuntimeError):
    """The distributed training did not produce a model; the message says which job and why."""


def run(
    kind: str,
    params_file: str | Path,
    training_dir: str | Path,
    model_dir: str | Path,
    metrics_file: str | Path,
    plot_file: str | Path,
    *,
    nproc: int | None = None,
    require_gpu: bool = False,
) -> dict[str, Any]:
    """Train ``kind`` on ``pipeline.accelerator_limit`` (or ``nproc``) processes per node over
    ``pipeline.training_nodes`` nodes; returns the metrics rank 0 wrote.

    ``require_gpu``: this pod must show ``pipeline.accelerator_limit`` CUDA devices (one node; the
    PyTorchJob's pods always check their own)."""
    params = CONTRACT.load(params_file)
    cfg = params.pipeline
    metrics_file = Path(metrics_file)
    if cfg.training_nodes > 1:
        run_pytorch_job(kind, Path(params_file), training_dir, model_dir, metrics_file, plot_file, cfg)
    else:
        if require_gpu:
            from recsys.gpu_pods import require_gpus

            require_gpus(cfg.accelerator_limit, cfg.accelerator_type)
        command = train_command(
            kind,
            params_file,
            training_dir,
            model_dir,
            metrics_file,
            plot_file,
            nproc=nproc or cfg.accelerator_limit,
        )
        log.info("launch: %s", " ".join(command))
        done = subprocess.run(command, check=False)
        if done.returncode != 0:
            raise TrainingJobError(f"training {kind} failed (exit {done.returncode}): {' '.join(command)}")
    return json.loads(metrics_file.read_text())


def train_command(
    kind: str,
    params_file: str | Path,
    training_dir: str | Path,
    model_dir: str | Path,
    metrics_file: str | Path,
    plot_file: str | Path,
    *,
    nproc: int,
    nodes: int = 1,
    python: str = sys.executable,
    require_gpu: int = 0,
) -> list[str]:
    """The train CLI for one node: plain with one process, under torchrun with several.

    Several nodes: ``--nnodes`` is fixed here, the node rank and the rendezvous address come from the
    ``PET_*`` environment the Training Operator sets in each pod. ``require_gpu``: every rank first
    checks that CUDA shows that many devices (``components.train --require-gpu``).
    """
    train = [
        "-m", "components.train", "--model", kind, "--params", str(params_file),
        "--training-dir", str(training_dir), "--model-dir", str(model_dir),
        "--metrics", str(metrics_file), "--plot", str(plot_file),
    ]  # fmt: skip
    if require_gpu:
        train += ["--require-gpu", str(require_gpu)]
    if nproc == 1 and nodes == 1:
        return [python, *train]
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    torchrun += ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}"]
    return [*torchrun, *train]


def pytorch_job_manifest(
    name: str,
    namespace: str,
    kind: str,
    cfg: PipelineConfig,
    workdir: str,
    owner: dict[str, Any] | None = None,
) -> dict:
    """The ``PyTorchJob`` training ``kind`` over ``cfg.training_nodes`` pods of ``cfg.accelerator_limit``
    GPUs each, in the training image, reading and writing under ``workdir`` on ``cfg.training_volume``;
    ``owner``: its ownerReference (:func:`task_pod_owner`), if any."""
    work = Path(workdir)
    command = train_command(
        kind,
        work / "params.yaml",
        work / "training_sets",
        work / "model",
        work / "metrics.json",
        work / "curves.png",
        nproc=cfg.accelerator_limit,
        nodes=cfg.training_nodes,
        python="python",
        require_gpu=cfg.accelerator_limit,  # the pods ask for these GPUs: never train on CPU instead
    )
    resources = cfg.train_resources
    gpus = {cfg.accelerator_type: str(cfg.accelerator_limit)}
    container = {
        "name": PYTORCH_CONTAINER,
        "image": cfg.training_image,
        "command": command,
        "env": [{"name": "FEAST_USAGE", "value": "False"}],
        "resources": {
            "requests": resources.requests() | gpus,
            "limits": resources.limits() | gpus,
        },
        "volumeMounts": [
            {"name": "training", "mountPath": TRAINING_VOLUME_PATH},
            {"name": SHM_VOLUME, "mountPath": SHM_PATH},  # NCCL and torch share tensors through /dev/shm
        ],
    }
    pod = {
        "metadata": {
            "labels": {"app.kubernetes.io/part-of": "recsys-kfp", "app.kubernetes.io/component": "training"},
            # an Istio sidecar keeps a finished pod Running and intercepts the rendezvous port
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "training", "persistentVolumeClaim": {"claimName": cfg.training_volume}},
                {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}},
            ],
            "tolerations": [
                {k: v for k, v in toleration.model_dump().items() if v is not None}
                for toleration in cfg.gpu_tolerations
            ],
            "nodeSelector": dict(cfg.gpu_node_selector),
        },
    }
    harden(pod["spec"], cfg.run_as_user)
    if cfg.image_pull_secrets:  # the training image from a private registry, as the task pods pull theirs
        pod["spec"]["imagePullSecrets"] = [{"name": name} for name in cfg.image_pull_secrets]
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if cfg.training_nodes > 1:
        replicas["Worker"] = {
            "replicas": cfg.training_nodes - 1,
            "restartPolicy": "OnFailure",
            "template": pod,
        }
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "recsys-kfp", "recsys-kfp/model": kind.replace("_", "-")},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(cfg.accelerator_limit),
            "runPolicy": {
                "backoffLimit": cfg.retries,
                "activeDeadlineSeconds": cfg.training_job_timeout_s,
                "cleanPodPolicy": "None",  # keep the pods of a failed job for `kubectl logs`
                "ttlSecondsAfterFinished": 7 * 24 * 3600,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def job_outcome(job: dict[str, Any]) -> tuple[str, str] | None:
    """``("Succeeded" | "Failed", message)`` once the operator has finished ``job``, else None."""
    for condition in reversed(job.get("status", {}).get("conditions", [])):
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            reason = condition.get("reason", "")
            return condition["type"], f"{reason}: {condition.get('message', '')}".strip(": ")
    return None


def run_pytorch_job(
    kind: str,
    params_file: Path,
    training_dir: str | Path,
    model_dir: str | Path,
    metrics_file: Path,
    plot_file: str | Path,
    cfg: PipelineConfig,
    *,
    api: Any = None,
    core_api: Any = None,
    poll_s: float = 15.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Stage the inputs on the shared volume, create the PyTorchJob, wait for it, collect its outputs."""
    name = f"recsys-train-{kind.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    # the job lives beside the task pod that owns it (an ownerReference never crosses namespaces)
    namespace = pod_namespace(SERVICE_ACCOUNT_NAMESPACE) or own_namespace(
        cfg.namespace, "pipeline.namespace", SERVICE_ACCOUNT_NAMESPACE
    )
    workdir = Path(TRAINING_VOLUME_PATH) / name
    workdir.mkdir(parents=True)
    shutil.copyfile(params_file, workdir / "params.yaml")
    shutil.copytree(training_dir, workdir / "training_sets")
    owner = task_pod_owner(namespace, core_api)
    manifest = pytorch_job_manifest(name, namespace, kind, cfg, str(workdir), owner=owner)
    api = api or custom_objects_api()
    api.create_namespaced_custom_object(
        PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL, manifest
    )
    log.info("created PyTorchJob %s/%s (%d nodes)", namespace, name, cfg.training_nodes)
    deadline = clock() + cfg.training_job_timeout_s
    logs = f"kubectl -n {namespace} logs -l {JOB_NAME_LABEL}={name} --prefix"
    while True:
        job = api.get_namespaced_custom_object(
            PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, namespace, PYTORCHJOB_PLURAL, name
        )
        outcome = job_outcome(job)
        if outcome is not None:
            break
        if clock() > deadline:
            raise TrainingJobError(
                f"PyTorchJob {namespace}/{name} did not finish in {cfg.training_job_timeout_s}s; see `{logs}`"
            )
        time.sleep(poll_s)
    state, message = outcome
    if state != "Succeeded":
        raise TrainingJobError(f"PyTorchJob {namespace}/{name} failed ({message}); see `{logs}`")
    if not (workdir / "model").is_dir():
        raise TrainingJobError(f"PyTorchJob {namespace}/{name} succeeded but wrote no model to {workdir}")
    shutil.copytree(workdir / "model", model_dir, dirs_exist_ok=True)
    shutil.copyfile(workdir / "metrics.json", metrics_file)
    shutil.copyfile(workdir / "curves.png", plot_file)
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.launch_training", description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_KINDS)
    CONTRACT.add_path_options(parser)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--plot", required=True)
    parser.add_argument("--nproc", type=int, default=None, help="default: pipeline.accelerator_limit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = run(
        args.model, args.params, args.training_dir, args.model_dir, args.metrics, args.plot, nproc=args.nproc
    )
    log.info("trained %s on %s process(es)", args.model, metrics.get("world_size", 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
