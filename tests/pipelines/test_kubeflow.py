"""upload and schedule (pipelines/kubeflow.py through ``python -m pipelines``): argument handling and what
they ask the server for.

They cannot reach a KFP server here: they run against a recording stand-in for ``kfp.Client`` that answers
the calls they make, so what is tested is what they ask the server for.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kfp
import pytest
import yaml
from kfp_server_api import (
    V2beta1CronSchedule,
    V2beta1ListRecurringRunsResponse,
    V2beta1PipelineVersionReference,
    V2beta1RecurringRun,
    V2beta1RuntimeConfig,
    V2beta1Trigger,
)

from pipelines import kubeflow
from pipelines.__main__ import main
from recsys.config import load_params
from tests.conftest import REPO_ROOT


class RecordingKfpClient:
    """Answers like a multi-user KFP server holding ``pipelines`` (name -> id) in the profile namespace
    ``namespace`` (``shared``: the shared ones) and their versions (newest first).

    As the real server does, ``get_pipeline_id`` (no namespace) sees only shared pipelines, and
    ``list_pipelines`` those of the namespace it is given.
    """

    def __init__(
        self,
        pipelines: dict[str, str] | None = None,
        versions: dict[str, list[str]] | None = None,
        namespace: str = "recsys",
        shared: dict[str, str] | None = None,
    ):
        self.spaces: dict[str | None, dict[str, str]] = {
            namespace: dict(pipelines or {}),
            None: dict(shared or {}),
        }
        self.versions = {pid: list(names) for pid, names in (versions or {}).items()}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.recurring: list[Any] = []
        self.context_namespace = namespace

    def get_user_namespace(self):
        # kfp.Client: the namespace of its context file (``kfp`` CLI / set_user_namespace) or, in a pod of a
        # multi-user deployment, the pod's own; what a null pipeline.namespace resolves to
        return self.context_namespace

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", {"name": name}))
        return self.spaces[None].get(name)

    def list_pipelines(self, page_token="", page_size=10, sort_by="", filter=None, namespace=None):
        self.calls.append(("list_pipelines", {"namespace": namespace}))
        wanted = yaml.safe_load(filter)["predicates"][0]["stringValue"]
        found = [
            SimpleNamespace(pipeline_id=pid, display_name=name)
            for name, pid in self.spaces.get(namespace, {}).items()
            if name == wanted
        ]
        return SimpleNamespace(pipelines=found[:page_size] or None)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(
            ("upload_pipeline", {"path": pipeline_package_path, "name": pipeline_name, "ns": namespace})
        )
        if pipeline_name in self.spaces.setdefault(namespace, {}):
            raise RuntimeError(f"duplicate pipeline {pipeline_name!r} in {namespace}")  # the server's 409
        self.spaces[namespace][pipeline_name] = "pid-new"
        self.versions["pid-new"] = [pipeline_name]
        return SimpleNamespace(pipeline_id="pid-new")

    def upload_pipeline_version(
        self, pipeline_package_path, pipeline_version_name, pipeline_id=None, description=None
    ):
        self.calls.append(
            ("upload_pipeline_version", {"name": pipeline_version_name, "pipeline_id": pipeline_id})
        )
        self.versions[pipeline_id].insert(0, pipeline_version_name)
        return SimpleNamespace(pipeline_version_id=f"vid-{pipeline_version_name}")

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        self.calls.append(("list_pipeline_versions", {"pipeline_id": pipeline_id, "filter": filter}))
        names = self.versions.get(pipeline_id, [])
        if filter:
            wanted = yaml.safe_load(filter)["predicates"][0]["stringValue"]
            names = [n for n in names if n == wanted]
        shown = [SimpleNamespace(pipeline_version_id=f"vid-{n}", display_name=n) for n in names[:page_size]]
        return SimpleNamespace(pipeline_versions=shown or None)

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return SimpleNamespace(experiment_id=f"eid-{name}", display_name=name)

    def create_recurring_run(self, **kwargs):
        """Stores what KFP's API server returns, as kfp_server_api's own model (fields, status values)."""
        inspect.signature(kfp.Client.create_recurring_run).bind(self, **kwargs)  # the SDK's real parameters
        self.calls.append(("create_recurring_run", kwargs))
        params = kwargs.get("params")
        run = V2beta1RecurringRun(
            recurring_run_id=f"rid-{len(self.recurring) + 1}",
            display_name=kwargs["job_name"],
            pipeline_version_reference=V2beta1PipelineVersionReference(
                pipeline_id=kwargs["pipeline_id"], pipeline_version_id=kwargs["version_id"]
            ),
            trigger=V2beta1Trigger(cron_schedule=V2beta1CronSchedule(cron=kwargs["cron_expression"])),
            runtime_config=V2beta1RuntimeConfig(parameters=params) if params else None,
            status="ENABLED" if kwargs["enabled"] else "DISABLED",
            experiment_id=kwargs["experiment_id"],
        )
        self.recurring.append(run)
        return run

    def list_recurring_runs(
        self, page_token="", page_size=10, sort_by="", experiment_id=None, namespace=None, filter=None
    ):
        self.calls.append(("list_recurring_runs", {"namespace": namespace, "page_token": page_token}))
        start = int(page_token or 0)
        page = self.recurring[start : start + page_size]
        more = start + page_size < len(self.recurring)
        return V2beta1ListRecurringRunsResponse(
            recurring_runs=page or None, next_page_token=str(start + page_size) if more else None
        )

    def enable_recurring_run(self, recurring_run_id):
        self.calls.append(("enable_recurring_run", {"id": recurring_run_id}))
        self._run(recurring_run_id).status = "ENABLED"

    def disable_recurring_run(self, recurring_run_id):
        self.calls.append(("disable_recurring_run", {"id": recurring_run_id}))
        self._run(recurring_run_id).status = "DISABLED"

    def _run(self, recurring_run_id):
        (run,) = [r for r in self.recurring if r.recurring_run_id == recurring_run_id]
        return run

    def enabled(self) -> list[Any]:
        return [r for r in self.recurring if r.status == "ENABLED"]

    def called(self, name: str) -> list[dict[str, Any]]:
        return [args for call, args in self.calls if call == name]


@pytest.fixture
def package(tmp_path) -> Path:
    path = tmp_path / "recsys_training.yaml"
    path.write_text("pipelineInfo: {name: recsys-training}\n")
    return path


def _cli(*args: str, client: RecordingKfpClient) -> int:
    return main(["--params", str(REPO_ROOT / "params.yaml"), *args], kfp_client=client)


def test_upload_creates_the_pipeline_when_new(package):
    client = RecordingKfpClient()
    assert _cli("upload", "--host", "http://kfp", "--package", str(package), client=client) == 0
    (upload,) = client.called("upload_pipeline")
    assert upload == {"path": str(package), "name": "recsys-training", "ns": "recsys"}
    assert not client.called("upload_pipeline_version")


def test_a_null_pipeline_namespace_is_the_kfp_clients_and_an_explicit_one_wins(package):
    """params.yaml names no namespace: upload and schedule act in the profile the kfp client is set to;
    ``--namespace`` (or pipeline.namespace) overrides it."""
    assert load_params(REPO_ROOT / "params.yaml").pipeline.namespace is None
    client = RecordingKfpClient(namespace="team-a")
    assert _cli("upload", "--host", "http://kfp", "--package", str(package), client=client) == 0
    assert client.called("upload_pipeline")[0]["ns"] == "team-a"
    other = RecordingKfpClient(namespace="team-b")
    args = ("upload", "--host", "http://kfp", "--package", str(package), "--namespace", "team-b")
    assert _cli(*args, client=other) == 0
    assert other.called("upload_pipeline")[0]["ns"] == "team-b"


def test_the_real_kfp_client_reports_its_context_files_namespace(tmp_path, monkeypatch):
    """What ``client_namespace`` reads is kfp.Client's own: the namespace ``set_user_namespace`` saved in its
    context file is what a client made as ``connect`` makes it (namespace "kubeflow") answers."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    (tmp_path / "kfp").mkdir()
    (tmp_path / "kfp" / "context.json").write_text(json.dumps({"namespace": "team-a"}))
    client = kfp.Client(host="http://127.0.0.1:9", namespace="kubeflow")
    assert kubeflow.client_namespace(client) == "team-a"
    client.set_user_namespace("team-c")  # what `kfp` users run once; kept in the context file
    assert json.loads((tmp_path / "kfp" / "context.json").read_text())["namespace"] == "team-c"
    assert kubeflow.client_namespace(kfp.Client(host="http://127.0.0.1:9", namespace="kubeflow")) == "team-c"


def test_upload_adds_a_version_named_by_tag_and_content(package):
    client = RecordingKfpClient({"recsys-training": "pid-1"}, {"pid-1": ["recsys-training"]})
    assert _cli("upload", "--host", "http://kfp", "--package", str(package), client=client) == 0
    (version,) = client.called("upload_pipeline_version")
    assert version["pipeline_id"] == "pid-1"
    assert version["name"].startswith("0.1.0-") and len(version["name"]) == len("0.1.0-") + 12
    # same package, same default name: the server refuses a duplicate instead of piling up versions
    _cli("upload", "--host", "http://kfp", "--package", str(package), client=client)
    assert client.called("upload_pipeline_version")[1]["name"] == version["name"]
    _cli("upload", "--host", "http://kfp", "--package", str(package), "--version", "v7", client=client)
    assert client.called("upload_pipeline_version")[2]["name"] == "v7"


def test_upload_without_a_compiled_package_fails_before_any_call(tmp_path, capsys):
    client = RecordingKfpClient()
    assert (
        _cli("upload", "--host", "http://kfp", "--package", str(tmp_path / "none.yaml"), client=client) == 1
    )
    assert "run `python -m pipelines compile` first" in capsys.readouterr().err
    assert client.calls == []


def test_schedule_creates_a_recurring_run_of_the_newest_version():
    client = RecordingKfpClient({"recsys-training": "pid-1"}, {"pid-1": ["v2", "v1"]})
    code = _cli(
        "schedule", "--host", "http://kfp", "--cron", "0 0 3 * * *", "--experiment", "nightly", client=client
    )
    assert code == 0
    (experiment,) = client.called("create_experiment")
    assert experiment == {"name": "nightly", "namespace": "recsys"}
    (run,) = client.called("create_recurring_run")
    pipeline = load_params(REPO_ROOT / "params.yaml").pipeline
    assert run["cron_expression"] == "0 0 3 * * *"
    assert (run["experiment_id"], run["pipeline_id"], run["version_id"]) == ("eid-nightly", "pid-1", "vid-v2")
    assert run["max_concurrency"] == pipeline.max_concurrency
    assert run["service_account"] == pipeline.service_account
    assert run["no_catchup"] is True
    assert [r.recurring_run_id for r in client.enabled()] == ["rid-1"]  # created disabled, then enabled


def test_scheduling_again_replaces_the_earlier_recurring_run_instead_of_adding_one():
    client = RecordingKfpClient({"recsys-training": "pid-1"}, {"pid-1": ["v1"]})
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0  # the same: nothing changes
    assert len(client.called("create_recurring_run")) == 1 and len(client.enabled()) == 1
    client.versions["pid-1"].insert(0, "v2")  # a new version uploaded: the schedule moves to it
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0
    assert _cli("schedule", "--host", "http://kfp", "--cron", "0 0 4 * * *", client=client) == 0
    (firing,) = client.enabled()
    assert firing.pipeline_version_reference.pipeline_version_id == "vid-v2"
    assert firing.trigger.cron_schedule.cron == "0 0 4 * * *"
    assert [r.status for r in client.recurring] == ["DISABLED", "DISABLED", "ENABLED"]
    # never two firing at once: every earlier run was disabled before the new one was enabled
    order = [call for call, _ in client.calls if call.endswith("able_recurring_run")]
    assert order[-2:] == ["disable_recurring_run", "enable_recurring_run"]


def test_schedule_pages_through_recurring_runs_and_leaves_other_pipelines_alone():
    client = RecordingKfpClient(
        {"recsys-training": "pid-1", "recsys-index-refresh": "pid-2"}, {"pid-1": ["v1"], "pid-2": ["r1"]}
    )
    assert _cli("schedule", "--host", "http://kfp", "--pipeline", "index-refresh", client=client) == 0
    for minute in range(105):  # older schedules of the training pipeline, more than one page of 100
        client.create_recurring_run(
            experiment_id="eid-old",
            job_name=f"old-{minute}",
            cron_expression=f"0 {minute % 60} {minute // 60} * * *",
            pipeline_id="pid-1",
            version_id="vid-v1",
            enabled=True,
        )
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0
    assert len(client.called("list_recurring_runs")) >= 3  # 107 runs: two pages for this schedule
    firing = {r.pipeline_version_reference.pipeline_id: r for r in client.enabled()}
    assert sorted(firing) == ["pid-1", "pid-2"] and len(client.enabled()) == 2
    refresh = load_params(REPO_ROOT / "params.yaml").pipeline.index_refresh
    assert firing["pid-2"].trigger.cron_schedule.cron == refresh.cron
    assert firing["pid-2"].display_name.startswith(refresh.name)


def test_schedule_a_named_version_and_default_cron_and_experiment():
    client = RecordingKfpClient({"recsys-training": "pid-1"}, {"pid-1": ["v2", "v1"]})
    assert _cli("schedule", "--host", "http://kfp", "--version", "v1", client=client) == 0
    (run,) = client.called("create_recurring_run")
    pipeline = load_params(REPO_ROOT / "params.yaml").pipeline
    assert run["version_id"] == "vid-v1"
    assert run["cron_expression"] == pipeline.cron
    assert client.called("create_experiment")[0]["name"] == pipeline.experiment


@pytest.mark.parametrize(
    ("server", "args", "message"),
    [
        ({}, ["--cron", "0 3 * * *"], "KFP's cron has 6"),
        ({}, [], "is not on the server; run `python -m pipelines upload` first"),
        ({"recsys-training": "pid-1"}, ["--version", "v9"], "has no version 'v9'"),
    ],
)
def test_schedule_refuses_before_creating_anything(server, args, message, capsys):
    client = RecordingKfpClient(server, {pid: ["v1"] for pid in server.values()})
    assert _cli("schedule", "--host", "http://kfp", *args, client=client) == 1
    assert message in capsys.readouterr().err
    assert not client.called("create_recurring_run") and not client.called("create_experiment")
    if "cron" in message:
        assert client.calls == []  # a bad cron never reaches the server


def test_upload_then_schedule_find_the_pipeline_in_the_profile_namespace(package):
    """Multi-user Kubeflow: the pipeline lives in the profile namespace, where get_pipeline_id (shared
    pipelines only) does not look; the second upload must add a version, schedule must find it."""
    client = RecordingKfpClient()
    assert _cli("upload", "--host", "http://kfp", "--package", str(package), client=client) == 0
    assert _cli("upload", "--host", "http://kfp", "--package", str(package), client=client) == 0
    assert len(client.called("upload_pipeline")) == 1  # no duplicate create
    (version,) = client.called("upload_pipeline_version")
    assert version["pipeline_id"] == "pid-new"
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0
    assert client.called("create_recurring_run")[0]["pipeline_id"] == "pid-new"
    assert {"namespace": "recsys"} in client.called("list_pipelines")


def test_a_shared_pipeline_is_found_when_the_profile_has_none(package):
    client = RecordingKfpClient(shared={"recsys-training": "pid-shared"}, versions={"pid-shared": ["v1"]})
    assert _cli("schedule", "--host", "http://kfp", client=client) == 0
    assert client.called("create_recurring_run")[0]["pipeline_id"] == "pid-shared"


def test_client_credentials_take_one_way_to_authenticate(tmp_path):
    import kfp_server_api
    from kfp.client import ServiceAccountTokenVolumeCredentials

    from pipelines.kubeflow import KubeflowError, client_credentials

    assert client_credentials(None, {}) == {}
    assert client_credentials(None, {"KFP_TOKEN": "t0k"}) == {"existing_token": "t0k"}
    assert client_credentials(None, {"KFP_COOKIE": "authservice_session=abc"}) == {
        "cookies": "authservice_session=abc"
    }
    token = tmp_path / "token"
    token.write_text("sa-token")
    credentials = client_credentials(str(token), {})["credentials"]
    assert isinstance(credentials, ServiceAccountTokenVolumeCredentials)
    configuration = kfp_server_api.Configuration()
    credentials.refresh_api_key_hook(configuration)  # what kfp.Client calls before each request
    assert configuration.api_key["authorization"] == "sa-token"  # read from the file, as it rotates
    with pytest.raises(KubeflowError, match=r"--token-file: .*missing does not exist"):
        client_credentials(str(tmp_path / "missing"), {})
    with pytest.raises(KubeflowError, match="one way to authenticate"):
        client_credentials(str(token), {"KFP_TOKEN": "t0k"})
