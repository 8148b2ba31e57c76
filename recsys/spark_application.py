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

In the compiled pipeline (``features.engine: spark``; pipelines/spark_task.py) the features task runs
:func:`run_task` with its KFP artifacts. What KFP does with them (kubeflow/pipelines backend/src/v2, tags
2.4.1 and 2.15.0, the same in both):

- An artifact's URI is ``<pipeline root>/<pipeline>/<run id>/<task>/<salt>/<name>``
  (driver/driver.go: ``GenerateOutputURI(pipelineRoot, [taskName, outputURISalt, name])``), the default
  root ``minio://mlpipeline/v2/artifacts`` (config/env.go); bucket = the first path segment
  (objectstore/config.go ``ParseBucketPathToConfig``). In the pod it is the local path ``/minio/<bucket>/
  <key>`` or ``/s3/<bucket>/<key>`` (component/launcher_v2.go ``LocalPathForURI``).
- The launcher downloads inputs before the command and, after it exits, uploads each output's *local
  path* to the output's key (``uploadOutputArtifacts`` -> objectstore ``UploadBlob``, file by file); a
  missing local path is skipped with a warning. Downstream tasks download the key by *prefix*
  (``DownloadBlob``: ``List(Prefix: key)``, no trailing slash).

So Spark reads the raw input where the ingest task's launcher uploaded it (``minio://b/k`` and ``s3://b/k``
become ``s3a://b/k``: :func:`spark_uri`), but does not write the features output's key: writing there
directly would hand the next tasks Spark's layout (part-file folders, Spark timestamps) instead of the
local engine's ``<table>.parquet`` files. It writes to ``<task root>/spark-staging/<name>``
(:func:`staging_uri`: this execution's own salted prefix, and not under the output's key prefix, which
``DownloadBlob`` would otherwise list too); the task then streams those part files into the output's local
path as the local engine's files and exact schemas (:func:`collect_feature_tables`), deletes the staging
prefix, and exits: the launcher uploads the local path as it does for every task.

Endpoint and credentials: the task and the SparkApplication use the object store of the Secret
``promote.secret`` (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``; the task gets
them as environment, the driver and executors by ``envFrom``), so that Secret must reach the pipeline
root's bucket: with a ``minio://`` root that is KFP's MinIO (``minio-service.kubeflow:9000`` by default,
objectstore/config.go; credentials of Secret ``mlpipeline-minio-artifact``), and a ``minio://`` URI
without ``AWS_ENDPOINT_URL`` is refused.

CLI (by hand with a kube context; the pipeline's task passes ``--config`` and ``--features-dir``)::

    python -m recsys.spark_application --params params.yaml \\
        --raw-uri s3a://bucket/run/raw --features-uri s3a://bucket/run/features
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
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
STAGING = "spark-staging"  # beside a task's outputs: where its SparkApplication writes
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


def spark_uri(uri: str, field: str) -> str:
    """A KFP artifact URI (``minio://`` or ``s3://``, or already ``s3a://``) as the ``s3a://`` URI Spark's
    S3A filesystem reads: the same bucket (the first path segment) and key."""
    for scheme in ("minio://", "s3://", "s3a://"):
        if uri.startswith(scheme):
            bucket, _, key = uri[len(scheme) :].partition("/")
            if bucket and key.strip("/") and "?" not in uri:
                return f"s3a://{bucket}/{key.strip('/')}"
            raise SparkApplicationError(f"{field}: {uri!r}: needs a bucket and a key, and no query string")
    raise SparkApplicationError(
        f"{field}: {uri!r}: a SparkApplication reads and writes S3 (minio://, s3:// or s3a:// URIs); "
        "set the pipeline root (kfp-launcher ConfigMap defaultPipelineRoot) to a minio:// or s3:// bucket"
    )


def staging_uri(features_uri: str) -> str:
    """Where the SparkApplication writes for output ``<task root>/<name>``: ``<task root>/spark-staging/
    <name>``, beside the output and outside its key prefix (see the module docstring)."""
    parent, _, name = features_uri.rstrip("/").rpartition("/")
    if not parent or "://" not in parent:
        raise SparkApplicationError(f"features_uri: {features_uri!r} has no parent prefix to stage under")
    return f"{parent}/{STAGING}/{name}"


def _part_files(keys: list[str]) -> list[str]:
    """Spark's data files among a dataset folder's keys, in partition order (``part-00000-...``): a sorted
    write's range partitions, so the rows come out in the sort order. ``_SUCCESS``/``.crc`` are skipped."""
    return sorted(k for k in keys if k.rsplit("/", 1)[-1].startswith("part-") and k.endswith(".parquet"))


def collect_feature_tables(staged_uri: str, features_dir: str | Path, windows: list[int]) -> dict[str, Path]:
    """Stream the tables Spark wrote under ``staged_uri`` (``s3a://``; one ``<name>.parquet/`` folder of
    part files each) into ``features_dir`` as the local engine writes them: one ``<name>.parquet`` file per
    table with its exact Arrow schema (recsys/spark_features.py ``feature_schemas``), one part file and
    one record batch at a time; every table is staged before any is renamed into place. Spark writes
    microsecond timestamps there, so times equal the local engine's when the raw times are whole
    microseconds (the generated data's are: the end-to-end test compares row for row); finer raw times are
    truncated to the microsecond."""
    from recsys.object_store import open_store
    from recsys.spark_features import feature_schemas

    store = open_store("s3://" + spark_uri(staged_uri, "staged_uri")[len("s3a://") :])
    out = Path(features_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=".spark-collect-", dir=out) as tmp:
        staged = {}
        for name, schema in feature_schemas(sorted(windows)).items():
            parts = _part_files(store.keys(f"{name}.parquet/"))
            if not parts:
                raise SparkApplicationError(
                    f"{store.uri(name + '.parquet/')}: the SparkApplication wrote no part files for "
                    f"table '{name}'"
                )
            staged[name] = Path(tmp) / f"{name}.parquet"
            _copy_table(store, parts, staged[name], schema, name)
        for name, path in staged.items():
            written[name] = out / f"{name}.parquet"
            path.replace(written[name])
    return written


def _copy_table(store: Any, parts: list[str], target: Path, schema: Any, name: str) -> None:
    """Part files ``parts`` of ``store`` as one Parquet file ``target`` with ``schema`` (Spark's
    timestamps and list types cast to the local engine's), one part and one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = target.with_suffix(".part")
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        for key in parts:
            with local.open("wb") as fh:
                for chunk in store.stream(key) or ():
                    fh.write(chunk)
            source = pq.ParquetFile(local)
            missing = sorted(set(schema.names) - set(source.schema_arrow.names))
            if missing:
                raise SparkApplicationError(f"{store.uri(key)}: table '{name}' lacks columns {missing}")
            for batch in source.iter_batches(batch_size=256 * 1024, columns=schema.names):
                arrays = [batch.column(field.name).cast(field.type) for field in schema]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
    local.unlink(missing_ok=True)


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri`` (``s3a://``); returns how many."""
    from recsys.object_store import open_store

    store = open_store("s3://" + spark_uri(uri, "uri")[len("s3a://") :])
    keys = store.keys()
    for key in keys:
        store.delete(key)
    return len(keys)


def _application(
    features: FeaturesConfig,
    namespace: str,
    raw_uri: str,
    features_uri: str,
    *,
    run_as_user: int,
    s3_secret: str,
    image_pull_secrets: list[str] | None,
    core_api: Any = None,
) -> dict[str, Any]:
    """The manifest for this launch: a fresh name, the object store of this process's environment, owned
    by the task's Pod."""
    from recsys.object_store import s3_endpoint

    if features.spark is None:
        raise SparkApplicationError("features.spark is missing (the SparkApplication's settings)")
    return spark_application_manifest(
        f"recsys-features-{uuid.uuid4().hex[:8]}",
        namespace,
        features.spark.application,
        features,
        raw_uri,
        features_uri,
        run_as_user=run_as_user,
        s3_secret=s3_secret,
        s3_endpoint=s3_endpoint(),
        image_pull_secrets=image_pull_secrets,
        owner=task_pod_owner(namespace, core_api, kind="SparkApplication"),
    )


def launch(
    params_file: str, raw_uri: str, features_uri: str, *, api: Any = None, core_api: Any = None
) -> dict:
    """The features step on the cluster: the SparkApplication from ``params_file``, created and waited for."""
    from recsys.config import load_params

    params = load_params(params_file)
    if params.features.spark is None:
        raise SparkApplicationError(
            f"{params_file}: features.spark is missing (the SparkApplication's settings)"
        )
    namespace = pod_namespace(SERVICE_ACCOUNT_NAMESPACE) or own_namespace(
        params.pipeline.namespace, "pipeline.namespace", SERVICE_ACCOUNT_NAMESPACE
    )
    manifest = _application(
        params.features,
        namespace,
        spark_uri(raw_uri, "--raw-uri"),
        spark_uri(features_uri, "--features-uri"),
        run_as_user=params.pipeline.run_as_user,
        s3_secret=params.promote.secret,
        image_pull_secrets=params.pipeline.image_pull_secrets,
        core_api=core_api,
    )
    return run_spark_application(manifest, params.features.spark.application.timeout_s, api=api)


def run_task(
    features: FeaturesConfig,
    raw_uri: str,
    features_uri: str,
    features_dir: str | Path,
    *,
    run_as_user: int,
    s3_secret: str,
    image_pull_secrets: list[str] | None = None,
    api: Any = None,
    core_api: Any = None,
    poll_s: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Path]:
    """The pipeline's features task with ``engine: spark``: the SparkApplication over the raw input
    artifact (``raw_uri``), writing to :func:`staging_uri` of the output (``features_uri``), waited for;
    then its tables as the local engine's files in ``features_dir`` (the output's local path, which the
    KFP launcher uploads), and the staging prefix deleted. Returns each table's file."""
    from recsys.object_store import s3_endpoint

    if features.engine != "spark" or features.spark is None:
        raise SparkApplicationError(
            f"features.engine is {features.engine!r} in this run's configuration, but the pipeline was "
            "compiled for engine spark (with a features.spark section): recompile "
            "(python -m pipelines compile) or run with features.engine: spark"
        )
    uris = {"raw": raw_uri, "features": features_uri}
    if s3_endpoint() is None and any(uri.startswith("minio://") for uri in uris.values()):
        raise SparkApplicationError(
            f"{raw_uri}: a minio:// pipeline root is KFP's MinIO, but AWS_ENDPOINT_URL is not set: give the "
            "task and the SparkApplication its endpoint and credentials through the Secret promote.secret "
            "(KFP's default endpoint: http://minio-service.kubeflow:9000)"
        )
    raw, staged = spark_uri(raw_uri, "raw"), staging_uri(spark_uri(features_uri, "features"))
    namespace = own_namespace(None, "the features task's namespace", SERVICE_ACCOUNT_NAMESPACE)
    manifest = _application(
        features,
        namespace,
        raw,
        staged,
        run_as_user=run_as_user,
        s3_secret=s3_secret,
        image_pull_secrets=image_pull_secrets,
        core_api=core_api,
    )
    run_spark_application(manifest, features.spark.application.timeout_s, api=api, poll_s=poll_s, sleep=sleep)
    tables = collect_feature_tables(staged, features_dir, features.stats_windows_days)
    from recsys.object_store import ObjectStoreError

    try:  # the tables are in place: a staging prefix left behind is only storage, not a failed task
        log.info(
            "features (SparkApplication): %s; %d staged objects removed",
            ", ".join(tables),
            delete_prefix(staged),
        )
    except ObjectStoreError as error:
        log.warning("features: could not remove the staging prefix %s (%s); delete it by hand", staged, error)
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.spark_application", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--params", default=None, help="params.yaml (by hand; default: params.yaml)")
    source.add_argument("--config", default=None, help="the features step's config (a pipeline task's)")
    parser.add_argument("--raw-uri", required=True, help="raw tables: s3a://, or a KFP minio:// / s3:// URI")
    parser.add_argument("--features-uri", required=True, help="feature tables: s3a://, minio:// or s3://")
    parser.add_argument(
        "--features-dir", default=None, help="with --config: the output's local path the tables go to"
    )
    parser.add_argument("--run-as-user", type=int, default=None, help="with --config: pipeline.run_as_user")
    parser.add_argument("--s3-secret", default=None, help="with --config: promote.secret")
    parser.add_argument("--image-pull-secret", action="append", default=[], help="with --config; repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.config is None:
        launch(args.params or "params.yaml", args.raw_uri, args.features_uri)
        return 0
    missing = [
        flag
        for flag, value in (
            ("--features-dir", args.features_dir),
            ("--run-as-user", args.run_as_user),
            ("--s3-secret", args.s3_secret),
        )
        if value is None
    ]
    if missing:
        parser.error(f"--config needs {', '.join(missing)}")
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(args.config, STEPS["features"])
    run_task(
        params.features,
        args.raw_uri,
        args.features_uri,
        args.features_dir,
        run_as_user=args.run_as_user,
        s3_secret=args.s3_secret,
        image_pull_secrets=args.image_pull_secret or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
