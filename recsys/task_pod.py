"""The Kubernetes side of a KFP task that launches a workload (a PyTorchJob, a SparkApplication): the
cluster clients and an ownerReference to the task's own Pod, shared by every launcher."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def task_pod_owner(namespace: str, core_api: Any = None, kind: str = "PyTorchJob") -> dict[str, Any] | None:
    """An ownerReference to this task's own Pod, or None (logged) when it cannot be known.

    Why: a launched ``kind`` outlives the task that created it (a deleted run, an evicted or retried
    pod), and an orphan keeps its GPUs or executors; owned by the pod, the garbage collector deletes it,
    and its pods, with the pod. The name and uid come from the KFP launcher's downward-API env
    (``KFP_POD_NAME``, ``KFP_POD_UID``), else the pod is read by its ``HOSTNAME`` (RBAC: ``get`` on pods).
    Not a controller reference, and ``blockOwnerDeletion`` false: setting it true needs ``update`` on
    pods/finalizers (OwnerReferencesPermissionEnforcement), and nothing should hold back a pod's deletion.
    """
    name, uid = os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME"), os.environ.get("KFP_POD_UID")
    if not name:
        log.warning("%s without an owner: no KFP_POD_NAME or HOSTNAME names this task's pod", kind)
        return None
    if not uid:
        try:
            pod = (core_api or core_v1_api()).read_namespaced_pod(name, namespace)
        except Exception as error:  # RBAC (403), no such pod, no cluster: the owner is a convenience
            log.warning(
                "%s without an owner: cannot read pod %s/%s (%s: %s); it will not be deleted with the "
                "run's pod", kind, namespace, name, type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )  # fmt: skip
            return None
        name, uid = pod.metadata.name, pod.metadata.uid
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name,
        "uid": uid,
        "controller": False,
        "blockOwnerDeletion": False,
    }


def load_kube_config() -> None:
    """In a pod its ServiceAccount, else the kubeconfig (a developer's machine)."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def custom_objects_api() -> Any:
    from kubernetes import client

    load_kube_config()
    return client.CustomObjectsApi()


def core_v1_api() -> Any:
    from kubernetes import client

    load_kube_config()
    return client.CoreV1Api()
