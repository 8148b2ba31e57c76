"""The features step's SparkApplication (recsys/spark_application.py): its manifest against the Kubeflow
Spark Operator's CRD schema (v2.5.2, manifests/crds/), and the wait on ``status.applicationState.state``
as the operator writes it (api/v1beta2/sparkapplication_types.go; internal/controller/sparkapplication/
controller.go: SUBMITTED -> RUNNING -> SUCCEEDING -> COMPLETED, or FAILING / SUBMISSION_FAILED -> FAILED)."""

from __future__ import annotations

import copy
import shutil
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from recsys import manifest_schemas, spark_application
from recsys.spark_application import SparkApplicationError, application_outcome, run_spark_application
from recsys.spark_features import argument_parser
from tests.conftest import shipped_params

RAW, FEATURES = "s3a://recsys-data/runs/r1/raw", "s3a://recsys-data/runs/r1/features"
OWNER = {"apiVersion": "v1", "kind": "Pod", "name": "task-pod", "uid": "u-1", "controller": False,
         "blockOwnerDeletion": False}  # fmt: skip


def _manifest(**changes: Any) -> dict[str, Any]:
    params = shipped_params()
    kwargs: dict[str, Any] = {
        "run_as_user": params.pipeline.run_as_user,
        "s3_secret": params.promote.secret,
        "s3_endpoint": "http://minio.minio.svc:9000",
        "image_pull_secrets": ["regcred"],
        "owner": OWNER,
    } | changes
    return spark_application.spark_application_manifest(
        "recsys-features-abc", "kubeflow-user", params.features.spark.application, params.features, RAW,
        FEATURES, **kwargs,
    )  # fmt: skip


def test_manifest_matches_the_operator_crd_schema():
    assert "ok (CRD schema sparkoperator.k8s.io_sparkapplications.json)" in manifest_schemas.validate_object(
        _manifest()
    )


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("spec", "restartPolicy", "type"), "Sometimes", "spec/restartPolicy/type"),
        (("spec", "driver", "cores"), 0, "spec/driver/cores"),
        (("spec", "executor", "replicas"), 2, "spec/executor"),  # not a field: instances is
        (("spec", "type"), "Go", "spec/type"),
    ],
)
def test_the_schema_catches_what_the_operator_would_reject(path, value, error):
    manifest = copy.deepcopy(_manifest())
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(manifest_schemas.ManifestError, match=error):
        manifest_schemas.validate_object(manifest)


def test_pods_run_restricted_with_the_object_store_credentials():
    params = shipped_params()
    spec = _manifest()["spec"]
    for role in ("driver", "executor"):
        pod = spec[role]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": params.pipeline.run_as_user,
            "runAsGroup": params.pipeline.run_as_user, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }  # fmt: skip
        assert pod["podSecurityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["envFrom"] == [{"secretRef": {"name": params.promote.secret}}]
    assert spec["driver"]["serviceAccount"] == params.features.spark.application.service_account
    assert spec["executor"]["instances"] == params.features.spark.application.executor_instances
    assert spec["hadoopConf"]["fs.s3a.endpoint"] == "http://minio.minio.svc:9000"
    assert spec["hadoopConf"]["fs.s3a.connection.ssl.enabled"] == "false"
    assert spec["sparkConf"]["spark.sql.legacy.parquet.nanosAsLong"] == "true"
    assert spec["imagePullSecrets"] == ["regcred"]
    assert _manifest()["metadata"]["ownerReferences"] == [OWNER]
    assert "fs.s3a.endpoint" not in _manifest(s3_endpoint=None)["spec"]["hadoopConf"]  # AWS itself


def test_arguments_are_the_drivers_command_line():
    params = shipped_params()
    args = argument_parser().parse_args(_manifest()["spec"]["arguments"])
    assert (args.raw_dir, args.features_dir) == (RAW, FEATURES)
    assert args.history_length == params.features.history_length
    assert [int(w) for w in args.windows.split(",")] == params.features.stats_windows_days
    assert args.master is None  # the operator's spark-submit sets the master


def test_a_uri_that_is_not_s3a_is_refused_by_name():
    params = shipped_params()
    with pytest.raises(SparkApplicationError, match=r"raw_uri: '/tmp/raw'.*s3a://"):
        spark_application.spark_application_manifest(
            "x", "ns", params.features.spark.application, params.features, "/tmp/raw", FEATURES,
            run_as_user=1000, s3_secret="s", s3_endpoint=None,
        )  # fmt: skip


class FakeOperator:
    """CustomObjectsApi as the Spark Operator drives it: each read returns the next state."""

    def __init__(self, states: list[tuple[str, str]]) -> None:
        self.states, self.created = list(states), []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("sparkoperator.k8s.io", "v1beta2", "sparkapplications")
        assert namespace == body["metadata"]["namespace"]
        self.created.append(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state, message = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        body = copy.deepcopy(self.created[-1])
        if state:
            body["status"] = {"applicationState": {"state": state, "errorMessage": message}}
        return body


def _run(states, timeout_s=100.0):
    api, now = FakeOperator(states), [0.0]

    def sleep(seconds):
        now[0] += seconds

    result = run_spark_application(
        _manifest(), timeout_s, api=api, poll_s=10, clock=lambda: now[0], sleep=sleep
    )
    return api, result


def test_waits_through_the_operator_states_to_completed():
    api, result = _run([("", ""), ("SUBMITTED", ""), ("RUNNING", ""), ("SUCCEEDING", ""), ("COMPLETED", "")])
    assert len(api.created) == 1
    assert application_outcome(result) == ("COMPLETED", "")


def test_failed_raises_with_the_operators_message_and_the_driver_logs():
    with pytest.raises(SparkApplicationError) as error:
        _run([("SUBMITTED", ""), ("SUBMISSION_FAILED", "image pull"), ("FAILED", "driver OOMKilled")])
    message = str(error.value)
    assert "kubeflow-user/recsys-features-abc failed (driver OOMKilled)" in message
    assert (
        "kubectl -n kubeflow-user logs -l sparkoperator.k8s.io/app-name=recsys-features-abc,spark-role=driver"
        in (message)
    )


def test_submission_failed_is_not_final():  # the operator retries or turns it into FAILED
    assert application_outcome({"status": {"applicationState": {"state": "SUBMISSION_FAILED"}}}) is None


def test_timeout_names_the_last_state():
    with pytest.raises(SparkApplicationError, match=r"did not finish in 30s \(state RUNNING\)"):
        _run([("RUNNING", "")], timeout_s=30)


def test_owner_is_the_task_pod(monkeypatch):
    monkeypatch.setenv("KFP_POD_NAME", "run-features-123")
    monkeypatch.setenv("KFP_POD_UID", "0f0e")
    owner = spark_application.task_pod_owner("kubeflow-user")
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "run-features-123", "uid": "0f0e",
                     "controller": False, "blockOwnerDeletion": False}  # fmt: skip


# --- the pipeline's features task (engine spark): KFP's artifact URIs, the launch, the copy -------------
# Artifact URIs as KFP writes them (kubeflow/pipelines backend/src/v2, tags 2.4.1 and 2.15.0): the
# default root config/env.go `defaultPipelineRoot = "minio://mlpipeline/v2/artifacts"`, the driver's
# per-run root `<root>/<pipeline>/<run id>` and each output `GenerateOutputURI(root, [taskName, salt,
# name])` (driver/driver.go, metadata/client.go); the roots "minio://my-bucket/my-path/123" and
# "s3://my-bucket/my-path/123" are objectstore/object_store_test.go's ParseBucketConfig cases.
def _kfp_uri(root: str, task: str, name: str) -> str:
    return f"{root.rstrip('/')}/recsys-training/run-1/{task}/salt-{task}/{name}"


@pytest.mark.parametrize(
    ("root", "bucket", "prefix"),
    [
        ("minio://mlpipeline/v2/artifacts", "mlpipeline", "v2/artifacts"),
        ("minio://my-bucket/my-path/123", "my-bucket", "my-path/123"),
        ("s3://my-bucket/my-path/123", "my-bucket", "my-path/123"),
    ],
)
def test_kfp_artifact_uris_map_to_s3a_and_the_staging_stays_out_of_the_outputs_prefix(root, bucket, prefix):
    raw, out = _kfp_uri(root, "ingest", "raw"), _kfp_uri(root, "features", "features")
    assert spark_application.spark_uri(raw, "raw") == (
        f"s3a://{bucket}/{prefix}/recsys-training/run-1/ingest/salt-ingest/raw"
    )
    staged = spark_application.staging_uri(spark_application.spark_uri(out, "features"))
    task_root = f"s3a://{bucket}/{prefix}/recsys-training/run-1/features/salt-features"
    assert staged == f"{task_root}/spark-staging/features"
    # DownloadBlob lists the output's key as a bare prefix (objectstore/object_store.go): never the staging
    output_key = spark_application.spark_uri(out, "features")
    assert not staged.startswith(output_key)


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("gs://bucket/v2/artifacts/raw", r"raw: 'gs://bucket/v2/artifacts/raw'.*minio:// or s3://"),
        ("/minio/mlpipeline/raw", r"raw: '/minio/mlpipeline/raw'.*S3"),
        ("minio://mlpipeline", "raw: 'minio://mlpipeline': needs a bucket and a key"),
        ("s3://bucket/root?region=us-east-1", "no query string"),
    ],
)
def test_uris_spark_cannot_reach_are_refused_by_name(uri, error):
    with pytest.raises(SparkApplicationError, match=error):
        spark_application.spark_uri(uri, "raw")


def _compiled_features_task(
    tmp_path, engine: str, scheduled: bool = True, which: str = "training"
) -> tuple[dict, dict]:
    from kfp import compiler

    from pipelines.index_refresh import build_refresh_pipeline
    from pipelines.recsys_training import build_pipeline

    params = shipped_params()
    params.features.engine = engine
    output = tmp_path / f"{which}-{engine}-{scheduled}.yaml"
    build = build_pipeline if which == "training" else build_refresh_pipeline
    compiler.Compiler().compile(build(params, scheduled=scheduled), str(output))
    pipeline, *platform = yaml.safe_load_all(output.read_text())
    kubernetes = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    return pipeline["deploymentSpec"]["executors"]["exec-features"], kubernetes.get("exec-features", {})


@pytest.mark.parametrize("which", ["training", "index-refresh"])
def test_the_compiled_spark_features_task_launches_the_application(tmp_path, which):
    params = shipped_params()
    executor, platform = _compiled_features_task(tmp_path, "spark", which=which)
    container = executor["container"]
    assert container["command"] == ["python", "-m", "recsys.spark_application"]
    assert container["args"] == [
        "--config", "{{$.inputs.parameters['config']}}",
        "--raw-uri", "{{$.inputs.artifacts['raw'].uri}}",
        "--features-uri", "{{$.outputs.artifacts['features'].uri}}",
        "--features-dir", "{{$.outputs.artifacts['features'].path}}",
        "--run-as-user", str(params.pipeline.run_as_user),
        "--s3-secret", params.promote.secret,
        *[arg for secret in params.pipeline.image_pull_secrets for arg in ("--image-pull-secret", secret)],
    ]  # fmt: skip
    assert container["image"] == params.pipeline.image
    (secret,) = platform["secretAsEnv"]  # the object store's endpoint and keys, for the task's copy
    assert secret["secretName"] == params.promote.secret
    assert {k["envVar"] for k in secret["keyToEnv"]} == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
    }  # fmt: skip


@pytest.mark.parametrize(("engine", "scheduled"), [("local", True), ("spark", False)])
def test_the_local_engine_and_run_local_keep_the_in_pod_features_step(tmp_path, engine, scheduled):
    executor, platform = _compiled_features_task(tmp_path, engine, scheduled)
    container = executor["container"]
    assert container["args"][-2:] == ["--function_to_execute", "features"]
    assert "kfp.dsl.executor_main" in " ".join(container["command"])
    assert "recsys.spark_application" not in yaml.safe_dump(executor)
    assert "secretAsEnv" not in platform


def test_the_compiled_arguments_are_the_cli_the_task_runs(tmp_path, monkeypatch):
    """The compiled args with KFP's placeholders filled in, as the launcher does (component/launcher_v2.go:
    strings.ReplaceAll per placeholder), reach run_task with the features section of the config."""
    from pipelines.recsys_training import params_as_text
    from pipelines.steps import configure

    params = shipped_params()
    params.features.engine = "spark"
    executor, _ = _compiled_features_task(tmp_path, "spark")
    config = configure(params_as_text(params), params.data.source, params.pipeline.accelerator_type, "")
    raw, out = (
        _kfp_uri("minio://mlpipeline/v2/artifacts", "ingest", "raw"),
        _kfp_uri("minio://mlpipeline/v2/artifacts", "features", "features"),
    )
    values = {
        "{{$.inputs.parameters['config']}}": config.features,
        "{{$.inputs.artifacts['raw'].uri}}": raw,
        "{{$.outputs.artifacts['features'].uri}}": out,
        "{{$.outputs.artifacts['features'].path}}": "/minio/" + out[len("minio://") :],
    }
    args = [values.get(arg, arg) for arg in executor["container"]["args"]]
    calls = []
    monkeypatch.setattr(spark_application, "run_task", lambda *a, **kw: calls.append((a, kw)))
    assert spark_application.main(args) == 0
    (positional, keywords) = calls[0]
    assert positional[0] == params.features
    assert positional[1:] == (raw, out, "/minio/" + out[len("minio://") :])
    assert keywords == {
        "run_as_user": params.pipeline.run_as_user,
        "s3_secret": params.promote.secret,
        "image_pull_secrets": list(params.pipeline.image_pull_secrets) or None,
    }


def test_the_task_cli_names_what_it_lacks(capsys):
    with pytest.raises(SystemExit):
        spark_application.main(["--config", "{}", "--raw-uri", RAW, "--features-uri", FEATURES])
    assert "--config needs --features-dir, --run-as-user, --s3-secret" in capsys.readouterr().err


@pytest.fixture()
def in_task_pod(tmp_path, monkeypatch):
    namespace = tmp_path / "namespace"
    namespace.write_text("kubeflow-user\n")
    monkeypatch.setattr(spark_application, "SERVICE_ACCOUNT_NAMESPACE", namespace)
    monkeypatch.setenv("KFP_POD_NAME", "recsys-training-features-pod")
    monkeypatch.setenv("KFP_POD_UID", "0f0e")


def _spark_params():
    params = shipped_params()
    params.features.engine = "spark"
    return params


def test_the_task_refuses_a_config_of_the_local_engine(tmp_path):
    params = shipped_params()  # engine local, while the compiled task is the Spark one
    with pytest.raises(SparkApplicationError, match=r"features\.engine is 'local'.*recompile"):
        spark_application.run_task(
            params.features, "minio://b/raw", "minio://b/features", tmp_path, run_as_user=1000, s3_secret="s"
        )


def test_a_minio_root_without_an_endpoint_is_refused(tmp_path, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        SparkApplicationError, match=r"minio:// pipeline root.*AWS_ENDPOINT_URL.*minio-service"
    ):
        spark_application.run_task(
            _spark_params().features, _kfp_uri("minio://mlpipeline/v2/artifacts", "ingest", "raw"),
            _kfp_uri("minio://mlpipeline/v2/artifacts", "features", "features"), tmp_path,
            run_as_user=1000, s3_secret="s",
        )  # fmt: skip


def test_a_failed_application_fails_the_task_and_writes_nothing(tmp_path, s3_env, in_task_pod):
    api = FakeOperator([("SUBMITTED", ""), ("RUNNING", ""), ("FAILED", "executor lost")])
    out = tmp_path / "features"
    with pytest.raises(
        SparkApplicationError, match=r"kubeflow-user/recsys-features-\w+ failed \(executor lost\)"
    ):
        spark_application.run_task(
            _spark_params().features, s3_env.uri("v2/artifacts/r/ingest/s/raw"),
            s3_env.uri("v2/artifacts/r/features/s/features"), out, run_as_user=1000, s3_secret="s",
            api=api, poll_s=0, sleep=lambda _: None,
        )  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
    (created,) = api.created
    assert created["spec"]["arguments"][:4] == [
        "--raw-dir", f"s3a://{s3_env.name}/v2/artifacts/r/ingest/s/raw",
        "--features-dir", f"s3a://{s3_env.name}/v2/artifacts/r/features/s/spark-staging/features",
    ]  # fmt: skip
    assert created["metadata"]["ownerReferences"][0]["name"] == "recsys-training-features-pod"


class DriverOperator(FakeOperator):
    """The operator's states SUBMITTED -> RUNNING -> COMPLETED, and before COMPLETED what its driver does:
    recsys/spark_features.py with the manifest's own arguments (local mode). Spark here has no hadoop-aws,
    so the driver's ``s3a://`` reads and writes go through a local mirror of the loopback S3 bucket: the
    raw objects are downloaded from it first, the written dataset folders (part files, ``_SUCCESS``,
    ``.crc``) uploaded to it after, key for key."""

    def __init__(self, bucket, mirror) -> None:
        super().__init__([("SUBMITTED", ""), ("RUNNING", ""), ("COMPLETED", "")])
        self.bucket, self.mirror, self.driver_args = bucket, mirror, None

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if len(self.states) == 1 and self.driver_args is None:
            self._drive(self.created[-1]["spec"])
        return super().get_namespaced_custom_object(group, version, namespace, plural, name)

    def _key(self, uri: str) -> str:
        prefix = f"s3a://{self.bucket.name}/"
        assert uri.startswith(prefix), uri
        return uri[len(prefix) :]

    def _drive(self, spec: dict[str, Any]) -> None:
        """spark-submit's ``--conf`` per ``sparkConf`` entry, then the main file with ``arguments`` (the
        operator's internal/controller/sparkapplication/submission.go, v2.5.2: ``sparkConfOption``, and
        ``app.Spec.Arguments`` after the main application file)."""
        from recsys import spark_features

        client, args = self.bucket.client(), list(spec["arguments"])
        raw_key = self._key(args[args.index("--raw-dir") + 1])
        out_key = self._key(args[args.index("--features-dir") + 1])
        for item in client.list_objects_v2(Bucket=self.bucket.name, Prefix=raw_key + "/")["Contents"]:
            local = self.mirror / item["Key"]
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(self.bucket.name, item["Key"], str(local))
        args[args.index("--raw-dir") + 1] = str(self.mirror / raw_key)
        args[args.index("--features-dir") + 1] = (self.mirror / out_key).as_uri()  # file://: Spark's layout
        self.driver_args = parsed = argument_parser().parse_args(args)
        windows = [int(w) for w in parsed.windows.split(",")]
        spark_features.run(
            parsed.raw_dir, parsed.features_dir, parsed.history_length, windows, "local[1]", spec["sparkConf"]
        )
        for path in sorted((self.mirror / out_key).rglob("*")):
            if path.is_file():
                key = f"{out_key}/{path.relative_to(self.mirror / out_key).as_posix()}"
                client.upload_file(str(path), self.bucket.name, key)


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime (17)")
def test_the_task_runs_the_application_and_hands_on_the_local_engines_tables(tmp_path, s3_env, in_task_pod):
    """The features task end to end over a KFP minio:// root (the loopback S3 server as KFP's MinIO): the
    raw input where the ingest task's launcher put it, the application's tables copied from the staging
    prefix into the output's local path as the local engine writes them, row for row, and the staging
    prefix removed."""
    pytest.importorskip("pyspark")
    from components import features as features_step
    from components import ingest
    from recsys.config import load_params
    from recsys.contracts import FEATURE_TABLE_KEYS
    from tests.conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "tiny"})
    ingest.run(params.data, params.seed, tmp_path / "raw")
    features_step.run(params.features, tmp_path / "raw", tmp_path / "local")  # engine local
    root = f"minio://{s3_env.name}/v2/artifacts"
    raw_uri, out_uri = _kfp_uri(root, "ingest", "raw"), _kfp_uri(root, "features", "features")
    client = s3_env.client()
    for path in sorted((tmp_path / "raw").iterdir()):  # as UploadBlob puts a directory artifact
        client.upload_file(str(path), s3_env.name, f"{raw_uri.split('/', 3)[3]}/{path.name}")
    api = DriverOperator(s3_env, tmp_path / "mirror")
    features = params.features.model_copy(update={"engine": "spark"})
    out = tmp_path / "minio" / "features"  # the output's local path (/minio/<bucket>/<key> in the pod)
    tables = spark_application.run_task(
        features, raw_uri, out_uri, out, run_as_user=1000, s3_secret="recsys-bundle-storage",
        api=api, poll_s=0, sleep=lambda _: None,
    )  # fmt: skip
    assert api.driver_args is not None
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.parquet" for n in FEATURE_TABLE_KEYS)
    assert tables == {name: out / f"{name}.parquet" for name in FEATURE_TABLE_KEYS}
    for name in sorted(FEATURE_TABLE_KEYS):
        local = pq.read_table(tmp_path / "local" / f"{name}.parquet").replace_schema_metadata(None)
        copied = pq.read_table(out / f"{name}.parquet").replace_schema_metadata(None)
        assert copied.schema.equals(local.schema), f"{name}: {copied.schema}\n!=\n{local.schema}"
        assert copied.num_rows == local.num_rows > 0, name
        for column in local.column_names:
            assert copied.column(column).equals(local.column(column)), f"{name}.{column}"
    listed = client.list_objects_v2(Bucket=s3_env.name, Prefix="v2/artifacts/")["Contents"]
    assert all("/spark-staging/" not in item["Key"] for item in listed)  # removed after the copy
    assert any(item["Key"].endswith("/ingest/salt-ingest/raw/events.parquet") for item in listed)
