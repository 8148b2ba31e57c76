"""The features step's SparkApplication (recsys/spark_application.py): its manifest against the Kubeflow
Spark Operator's CRD schema (v2.5.2, manifests/crds/), and the wait on ``status.applicationState.state``
as the operator writes it (api/v1beta2/sparkapplication_types.go; internal/controller/sparkapplication/
controller.go: SUBMITTED -> RUNNING -> SUCCEEDING -> COMPLETED, or FAILING / SUBMISSION_FAILED -> FAILED)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

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
