"""What a GPU training pod needs, shared by the training launcher, the Katib trials and the pipeline:
the volume paths its pods mount, a memory-backed ``/dev/shm``, and the check that CUDA is really there.
"""

from __future__ import annotations

import os

TRAINING_VOLUME_PATH = "/mnt/training"  # where the task and the PyTorchJob pods mount training_volume
SHM_VOLUME, SHM_PATH = "dshm", "/dev/shm"
# tmpfs pages count against the pod's memory limit; this caps them well under pipeline.train_resources
SHM_SIZE_LIMIT = "8Gi"


class GpuUnavailableError(RuntimeError):
    """A GPU task's pod has fewer CUDA devices than it asked for; the message says what torch sees."""


def require_gpus(count: int, accelerator: str = "GPU") -> None:
    """Fail unless torch sees at least ``count`` CUDA devices (no-op for 0).

    Why: ``training.device: auto`` falls back to CPU, so a GPU task landing on a node without the driver,
    running a CPU-only image, or scheduled without its accelerator limit (KFP <= 2.3 drops a limit whose
    GPU type is a run parameter) would train for hours on CPU and look successful.
    """
    if count <= 0:
        return
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= count:
        return
    names = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
    visible = ", ".join(f"{name}={os.environ.get(name, '<unset>')}" for name in names)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only (no CUDA)"
    raise GpuUnavailableError(
        f"this GPU task asked for {count} x {accelerator} but torch sees {seen} CUDA device(s) "
        f"(pod {os.environ.get('HOSTNAME', '?')}; torch {torch.__version__}, {build} build; {visible}). "
        "Check: the pod's resources.limits "
        f"name {accelerator}: {count} (`kubectl get pod -o yaml`; KFP <= 2.3 drops a GPU type given as a "
        "run parameter), its node has the NVIDIA driver and device plugin (`kubectl describe node`: "
        f"allocatable {accelerator}), and the image is the CUDA training image "
        "(pipeline.training_image_repo), not the CPU one. Refusing to train on CPU."
    )


def harden(pod_spec: dict, uid: int) -> dict:
    """``pod_spec`` with the restricted Pod Security Standard's settings, in place: its own containers run
    as ``uid`` (the images' non-root USER), never escalate, drop every capability; the pod uses the
    runtime's seccomp profile and gives its volumes group ``uid`` (changed only on a mismatch, so a large
    shared volume is not walked at every start). Set per container, not on the pod, so a sidecar another
    controller injects (Katib's metrics collector) keeps its own user."""
    pod_spec["securityContext"] = {
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod_spec["containers"]:
        container["securityContext"] = {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
    return pod_spec
