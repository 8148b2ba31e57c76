"""The features step on a Spark cluster: a Kubeflow Spark Operator ``SparkApplication``
(``sparkoperator.k8s.io/v1beta2``) running recsys/spark_features.py over ``s3a://`` raw tables, created
through the Kubernetes API and waited for, as components/launch_training.py does with a PyTorchJob.

- The manifest (:func:`spark_application_manifest`) is validated against the operator's CRD schema
  (manifests/crds/sparkoperator.k8s.io_sparkapplications.json, spark-operator v2.5.2). Driver and executors
  run restricted (non-root ``pipeline.run_as_user``, no privilege escalation, every capability dropped,
  RuntimeDefault seccomp), get the object-store credentials from ``promote.secret`` as environment
  (S3A's default provider chain reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), and S3A is pointed
  at the task's own endpoint (``AWS_ENDPOINT_URL``), path-style, as promote's S3 client is.
- The wait (:func:`run_spark_application`) ends on ``status.applicationState.state`` COMPLETED or FAILED:
  the operator's terminal states with ``restartPolicy: Never`` (api/v1beta2/sparkapplication_types.go;
  internal/controller/sparkapplication/controller.go turns SUBMISSION_FAILED into FAILED once no retry
  is left, so SUBMISSION_FAILED is not final). A timeout or FAILED raises with the operator's error
  message and the ``kubectl logs`` command for the driver.
- The application is owned by the task's Pod (``ownerReferences``): deleting the run's pod deletes it,
  its driver and executors.

CLI (in a pipeline task or by hand with a kube context)::

    python -m recsys.spark_application --params params.yaml \\
        --raw-uri s3a://bucket/run/raw --features-uri s3a://bucket/run/features
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from recsys.config.schema import FeaturesConfig, SparkApplicationConfig
from recsys.gpu_pods import harden
from recsys.kube_namespace import SERVICE_ACCOUNT_NAMESPACE, own_namespace, pod_namespace
from recsys.spark_features import BASE_CONF
from recsys.task_pod import custom_objects_api, task_pod_owner

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "sparkoperator.k8s.io", "v1beta2", "sparkapplications"
# pkg/common/spark.go (v2.5.2): LabelSparkAppName, LabelSparkRole / SparkRoleDriver
APP_NAME_LABEL, ROLE_LABEL = "sparkoperator.k8s.io/app-name", "spark-role"
COMPLETED, FAILED = "COMPLETED", "FAILED"  # terminal ApplicationStateType values with restartPolicy Never
# keys of BASE_CONF that are runtime settings of the session, passed as sparkConf too
_SESSION_CONF = ("spark.sql.legacy.parquet.nanosAsLong", "spark.sql.session.timeZone")


class SparkApplicationError(RuntimeError):
    """The SparkApplication did not complete; the message names it, says why and how to read its logs."""


def spark_application_manifest(
    name: str,
    namespace: str,
    app: SparkApplicationConfig,
    features: FeaturesConfig,
    raw_uri: str,
    features_uri: str,
    *,
    run_as_user: int,
    s3_secret: str,
    s3_endpoint: str | None,
    image_pull_secrets: list[str] | None = None,
    owner: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``SparkApplication`` computing the feature tables of ``raw_uri`` into ``features_uri``."""
    for key, uri in (("raw_uri", raw_uri), ("features_uri", features_uri)):
        if not uri.startswith("s3a://"):
            raise SparkApplicationError(f"{key}: {uri!r}: a SparkApplication reads and writes s3a:// URIs")
    hadoop = {
        "fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.s3a.path.style.access": "true",  # MinIO and Ceph; promote's client addresses buckets the same way
    }
    if s3_endpoint:
        hadoop["fs.s3a.endpoint"] = s3_endpoint
        hadoop["fs.s3a.connection.ssl.enabled"] = str(s3_endpoint.startswith("https://")).lower()
    labels = {"app.kubernetes.io/part-of": "recsys-kfp", "app.kubernetes.io/component": "features"}
    pod = {
        "labels": labels,
        # an Istio sidecar keeps a finished driver Running and intercepts the driver <-> executor ports
        "annotations": {"sidecar.istio.io/inject": "false"},
        "envFrom": [{"secretRef": {"name": s3_secret}}],
        "env": [{"name": "FEAST_USAGE", "value": "False"}],
        **_restricted(run_as_user),
    }
    windows = ",".join(str(w) for w in features.stats_windows_days)
    arguments = ["--raw-dir", raw_uri, "--features-dir", features_uri, "--windows", windows]
    arguments += ["--history-length", str(features.history_length)]
    spec: dict[str, Any] = {
        "type": "Python",
        "pythonVersion": "3",
        "mode": "cluster",
        "image": app.image,
        "imagePullPolicy": "IfNotPresent",
        "mainApplicationFile": app.main_application_file,
        "arguments": arguments,
        "sparkVersion": app.spark_version,
        "sparkConf": {key: BASE_CONF[key] for key in _SESSION_CONF}
        | (
            {"spark.sql.shuffle.partitions": str(features.spark.shuffle_partitions)} if features.spark else {}
        ),
        "hadoopConf": hadoop,
        "restartPolicy": {"type": "Never"},  # a failed run fails the task; KFP's retries rerun it
        "timeToLiveSeconds": 7 * 24 * 3600,  # keep a finished application (and its status) a week
        "driver": {
            **pod,
            "cores": app.driver_cores,
            "memory": app.driver_memory,
            "serviceAccount": app.service_account,
        },
        "executor": {
            **pod,
            "instances": app.executor_instances,
            "cores": app.executor_cores,
            "memory": app.executor_memory,
            "deleteOnTermination": True,
        },
    }
    if image_pull_secrets:
        spec["imagePullSecrets"] = list(image_pull_secrets)
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SparkApplication",
        "metadata": metadata,
        "spec": spec,
    }


def _restricted(uid: int) -> dict[str, Any]:
    """The driver's and executors' pod and container security contexts: gpu_pods.harden's."""
    pod_spec = harden({"containers": [{}]}, uid)
    return {
        "podSecurityContext": pod_spec["securityContext"],
        "securityContext": pod_spec["containers"][0]["securityContext"],
    }


def application_outcome(application: dict[str, Any]) -> tuple[str, str] | None:
    """``(COMPLETED | FAILED, error message)`` once the operator has finished, else None."""
    state = application.get("status", {}).get("applicationState", {})
    if state.get("state") in (COMPLETED, FAILED):
        return state["state"], state.get("errorMessage", "")
    return None


def run_spark_application(
    manifest: dict[str, Any],
    timeout_s: float,
    *,
    api: Any = None,
    poll_s: float = 15.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create ``manifest`` and wait for COMPLETED (returns the application) or FAILED / timeout (raises)."""
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    api = api or custom_objects_api()
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    log.info("created SparkApplication %s/%s", namespace, name)
    logs = f"kubectl -n {namespace} logs -l {APP_NAME_LABEL}={name},{ROLE_LABEL}=driver --tail=200"
    deadline = clock() + timeout_s
    while True:
        application = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        outcome = application_outcome(application)
        if outcome is not None:
            break
        if clock() > deadline:
            state = (
                application.get("status", {}).get("applicationState", {}).get("state") or "not yet submitted"
            )
            raise SparkApplicationError(
                f"SparkApplication {namespace}/{name} did not finish in {timeout_s:.0f}s (state {state}); "
                f"see `{logs}`"
            )
        sleep(poll_s)
    state, message = outcome
    if state != COMPLETED:
        raise SparkApplicationError(
            f"SparkApplication {namespace}/{name} failed ({message or 'no error message'}); see `{logs}`"
        )
    log.info("SparkApplication %s/%s completed", namespace, name)
    return application


def launch(
    params_file: str, raw_uri: str, features_uri: str, *, api: Any = None, core_api: Any = None
) -> dict:
    """The features step on the cluster: the SparkApplication from ``params_file``, created and waited for."""
    from recsys.config import load_params
    from recsys.object_store import s3_endpoint

    params = load_params(params_file)
    if params.features.spark is None:
        raise SparkApplicationError(
            f"{params_file}: features.spark is missing (the SparkApplication's settings)"
        )
    app = params.features.spark.application
    namespace = pod_namespace(SERVICE_ACCOUNT_NAMESPACE) or own_namespace(
        params.pipeline.namespace, "pipeline.namespace", SERVICE_ACCOUNT_NAMESPACE
    )
    name = f"recsys-features-{uuid.uuid4().hex[:8]}"
    manifest = spark_application_manifest(
        name,
        namespace,
        app,
        params.features,
        raw_uri,
        features_uri,
        run_as_user=params.pipeline.run_as_user,
        s3_secret=params.promote.secret,
        s3_endpoint=s3_endpoint(),
        image_pull_secrets=params.pipeline.image_pull_secrets,
        owner=task_pod_owner(namespace, core_api, kind="SparkApplication"),
    )
    return run_spark_application(manifest, app.timeout_s, api=api)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.spark_application", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw-uri", required=True, help="s3a:// prefix holding the raw tables")
    parser.add_argument("--features-uri", required=True, help="s3a:// prefix for the feature tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    launch(args.params, args.raw_uri, args.features_uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
