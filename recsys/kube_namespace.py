"""Which Kubernetes namespace a step acts in, without one written into params.yaml or the manifests.

Why: the same compiled pipeline and the same base manifests serve every Kubeflow profile (dev, staging,
production); the namespace is where the run's pods are (their ServiceAccount's namespace), where the
kustomize overlay puts the objects, or what the operator passes on the command line.
"""

from __future__ import annotations

from pathlib import Path

# mounted into every pod with a ServiceAccount token (the Kubernetes API docs' "service account
# admission"; kfp.Client reads the same file in-cluster, kfp/client/client.py _NAMESPACE_PATH)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class NamespaceError(RuntimeError):
    """No namespace was configured and this process is not in a pod that could tell its own."""


def pod_namespace(path: Path | None = None) -> str | None:
    """The namespace of the pod this process runs in; None outside a pod."""
    try:
        found = (path or SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except OSError:
        return None
    return found or None


def own_namespace(configured: str | None, key: str, path: Path | None = None) -> str:
    """``configured`` when set, else the pod's own namespace; outside a pod a null ``key`` is an error."""
    if configured:
        return configured
    found = pod_namespace(path)
    if found is None:
        raise NamespaceError(
            f"{key} is null (the pod's own namespace) but this process runs outside a pod "
            f"({path or SERVICE_ACCOUNT_NAMESPACE} not "
            f"found): set {key} in params.yaml or pass the namespace on the command line"
        )
    return found
