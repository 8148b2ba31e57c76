"""upload/schedule refuse a KFP backend older than 2.4 (pipelines/kubeflow.py, check_server_version).

Why 2.4: tests/pipelines/test_version_matrix.py and "What runs where" in pipelines/README.md. The version
is the ``tag_name`` that every backend of the matrix writes in its healthz answer; here the SDK's own
generated ``HealthzServiceApi`` and ``ApiClient`` make the request, and only the HTTP connection pool is a
stand-in that answers as the backend's main.go does.
"""

from __future__ import annotations

import inspect
import io
import json
import logging

import kfp
import kfp_server_api
import pytest
import urllib3

from pipelines import kubeflow
from pipelines.__main__ import main
from pipelines.kubeflow import KubeflowError, check_server_version
from tests.conftest import REPO_ROOT, write_params
from tests.pipelines.test_kubeflow import RecordingKfpClient


class HealthzPool:
    """The connection pool of kfp_server_api's REST client: answers GET /apis/v2beta1/healthz with the
    body KFP's API server writes (backend/src/apiserver/main.go at 2.2.0 to 2.17.0)."""

    def __init__(self, tag_name: str | None, status: int = 200):
        self.body = {"commit_sha": "0123abc", "multi_user": True}
        if tag_name is not None:
            self.body["tag_name"] = tag_name
        self.status = status
        self.urls: list[str] = []

    def request(self, method, url, **kwargs):
        self.urls.append(f"{method} {url}")
        return urllib3.HTTPResponse(
            body=io.BytesIO(json.dumps(self.body).encode()),
            status=self.status,
            headers={"content-type": "application/json"},
            preload_content=kwargs.get("preload_content", True),
        )


class VersionedClient(RecordingKfpClient):
    """A recording kfp.Client whose server is KFP ``tag_name``, asked through the SDK's healthz API."""

    def __init__(self, tag_name: str | None, status: int = 200, **kwargs):
        super().__init__(**kwargs)
        api_client = kfp_server_api.ApiClient(kfp_server_api.Configuration(host="http://kfp.test"))
        self.pool = api_client.rest_client.pool_manager = HealthzPool(tag_name, status)
        self._healthz_api = kfp_server_api.HealthzServiceApi(api_client)


def test_the_sdk_client_keeps_the_healthz_api_the_check_uses():
    """``_healthz_api`` is private to kfp.Client: the check reads the raw answer through it, since the
    SDK's V2beta1GetHealthzResponse has no ``tag_name``."""
    assert "self._healthz_api = kfp_server_api.HealthzServiceApi(" in inspect.getsource(kfp.Client.__init__)
    assert "tag_name" not in kfp_server_api.V2beta1GetHealthzResponse.openapi_types


@pytest.mark.parametrize("tag", ["2.4.1", "2.5.0", "2.15.0", "2.17.0", "v2.17.3", "3.0.0"])
def test_a_backend_of_2_4_or_later_is_accepted(tag):
    client = VersionedClient(tag)
    assert check_server_version(client) == tag
    assert client.pool.urls == ["GET http://kfp.test/apis/v2beta1/healthz"]


@pytest.mark.parametrize("tag", ["2.2.0", "2.3.0", "v2.3.0", "2.0.5", "1.8.5"])
def test_an_older_backend_is_refused_with_the_reason(tag):
    with pytest.raises(KubeflowError) as refused:
        check_server_version(VersionedClient(tag))
    message = str(refused.value)
    assert f"KFP backend {tag} is older than 2.4 (Kubeflow 1.10)" in message
    assert "GPU type is a run parameter, which it ignores" in message
    assert "upgrade" in message and "What runs where" in message


@pytest.mark.parametrize(
    "client",
    [VersionedClient("unknown"), VersionedClient(None), VersionedClient("2.4.1", status=503)],
    ids=["tag-unknown", "no-tag", "server-error"],
)
def test_an_unknown_version_is_logged_and_not_checked(client, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.kubeflow"):
        check_server_version(client)
    assert "not checked" in caplog.text


@pytest.fixture
def server(monkeypatch):
    """``kfp.Client`` as ``connect`` builds it: the recording client of a backend of ``tag``."""
    made: list[VersionedClient] = []
    for variable in ("KFP_TOKEN", "KFP_COOKIE"):  # connect() authenticates with none of them
        monkeypatch.delenv(variable, raising=False)

    def serve(tag: str):
        def client(host, namespace, **credentials):
            made.append(VersionedClient(tag, namespace=namespace))
            return made[-1]

        monkeypatch.setattr(kfp, "Client", client)
        return made

    return serve


def test_connect_makes_the_client_and_upload_checks_its_version(server, capsys):
    made = server("2.4.1")
    assert kubeflow.connect("http://kfp.test", "recsys") is made[0]
    assert made[0].pool.urls == []  # connecting asks nothing; upload and schedule ask once
    server("2.3.0")
    assert main(["--params", str(REPO_ROOT / "params.yaml"), "upload", "--host", "http://kfp.test"]) == 1
    assert "KFP backend 2.3.0 is older than 2.4" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["upload"], ["schedule", "--cron", "0 0 3 * * *"]])
def test_upload_and_schedule_refuse_kubeflow_1_9_before_any_request(server, command, capsys):
    made = server("2.3.0")
    params = ["--params", str(REPO_ROOT / "params.yaml")]
    assert main([*params, *command, "--host", "http://kfp.test"]) == 1
    assert "KFP backend 2.3.0 is older than 2.4" in capsys.readouterr().err
    assert made[0].calls == []  # nothing listed, uploaded or scheduled


def test_upload_goes_on_against_kubeflow_1_10(server, capsys):
    made = server("2.4.1")
    params = ["--params", str(REPO_ROOT / "params.yaml")]
    assert main([*params, "upload", "--host", "http://kfp.test"]) == 0
    assert [name for name, _ in made[0].calls][-1] == "list_pipeline_versions"
    assert "upload_pipeline" in [name for name, _ in made[0].calls]


@pytest.mark.parametrize(("tag", "accepted"), [("2.4.1", False), ("2.15.0", False), ("2.17.0", True)])
def test_a_package_with_task_security_contexts_is_uploaded_only_to_kfp_2_17(
    server, tmp_path, tag, accepted, capsys
):
    """pipeline.task_security_context needs the 2.17 protos (tests/pipelines/test_version_matrix.py shows
    2.15 refusing the run and 2.4.1 dropping it): upload says so before sending anything."""
    params = write_params(tmp_path / "params.yaml", {"pipeline.task_security_context": True})
    package = tmp_path / "hardened.yaml"
    common = ["--params", str(params)]
    assert main([*common, "compile", "--pipeline", "training", "--output", str(package)]) == 0
    made = server(tag)
    code = main([*common, "upload", "--host", "http://kfp.test", "--package", str(package)])
    if accepted:
        assert code == 0 and "upload_pipeline" in [name for name, _ in made[0].calls]
    else:
        assert code == 1 and made[0].calls == []
        assert f"which KFP backend {tag} cannot apply" in capsys.readouterr().err
