"""The hourly ``recsys-index-refresh`` pipeline (pipelines/index_refresh.py): its compiled DAG, its run
window, and its task (pipelines/steps.py ``index_refresh``) on a real bundle and promote store: the
grown bundle is promoted over the version it grew from, nothing new promotes nothing, and a training run
that promoted in between is never replaced by the older model grown."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.__main__ import PACKAGES, main
from tests.conftest import REPO_ROOT
from tests.pipelines.test_steps import FakeArtifact
from tests.test_index_refresh import NEW, world  # noqa: F401  (the module fixture: a bundle + new items)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kfp") / "recsys_index_refresh.yaml"
    args = ["--params", str(REPO_ROOT / "params.yaml"), "compile", "--pipeline", "index-refresh"]
    assert main([*args, "--output", str(out)]) == 0
    spec, *platform = yaml.safe_load_all(out.read_text())
    return {"text": out.read_text(), "spec": spec, "platform": platform[0] if platform else {}}


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {task["taskInfo"]["name"]: task for task in spec["root"]["dag"]["tasks"].values()}


def test_the_refresh_dag_reads_the_hour_and_grows_the_index_uncached(compiled, params):
    spec = compiled["spec"]
    assert spec["pipelineInfo"]["name"] == params.pipeline.index_refresh.name == "recsys-index-refresh"
    tasks = _tasks(spec)
    assert set(tasks) == {"configure", "ingest", "features", "index-refresh"}
    assert tasks["index-refresh"]["dependentTasks"] == ["configure", "features"]
    assert tasks["index-refresh"]["cachingOptions"] == {}  # enableCaching false: reads the promote store
    window = tasks["configure"]["inputs"]["parameters"]["window"]
    assert window["runtimeValue"]["constant"] == "hour"
    schedule = tasks["configure"]["inputs"]["parameters"]["schedule_time"]
    assert schedule["runtimeValue"]["constant"] == "{{$.pipeline_job_schedule_time_utc}}"
    executors = compiled["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # the store's credentials: the refresh's, and ingest's (data_source=events may read s3:// logs)
    with_store = {name: spec["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
                  for name in ("index-refresh", "ingest")}  # fmt: skip
    for executor in with_store.values():
        secret = executors[executor]["secretAsEnv"][0]
        assert secret["secretName"] == params.promote.secret
        assert {k["envVar"] for k in secret["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"}
    assert sorted(executors) == sorted(with_store.values())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {params.pipeline.image}  # CPU only: no GPU image, no accelerator
    assert not any(
        "accelerator" in e["container"].get("resources", {})
        for e in spec["deploymentSpec"]["executors"].values()
    )


def test_committed_refresh_pipeline_is_up_to_date(compiled):
    committed = REPO_ROOT / PACKAGES["index-refresh"]
    assert committed.read_text() == compiled["text"], (
        f"{PACKAGES['index-refresh']} is stale: run `python -m pipelines compile` and commit the result"
    )


def test_the_hourly_run_sees_the_data_up_to_its_hour():
    from pipelines.run_window import RunWindowError, data_until

    assert data_until("", "2026-12-06T05:45:10Z", "hour") == datetime(2026, 12, 6, 5, tzinfo=UTC)
    assert data_until("", "2026-12-06T05:45:10Z") == datetime(2026, 12, 6, tzinfo=UTC)
    with pytest.raises(RunWindowError, match="window: 'week'"):
        data_until("", "2026-12-06T05:45:10Z", "week")


def _refresh_task(env: dict[str, Any], store: Path, tmp_path: Path, name: str) -> tuple[str, dict[str, Any]]:
    from pipelines import steps
    from recsys.step_contract import STEPS

    params = env["params"]
    promote = params.promote.model_copy(update={"uri": f"file://{store}"})
    config = STEPS["index_refresh"].scope(params.model_copy(update={"promote": promote})).to_json()
    report = FakeArtifact(tmp_path / f"{name}.json")
    current = steps.index_refresh(config, FakeArtifact(env["features"]), report)
    return current, json.loads(Path(report.path).read_text())


def _promote(env: dict[str, Any], store: Path, bundle: Path, version: str | None = None) -> dict[str, Any]:
    from components import promote

    cfg = env["params"].promote.model_copy(update={"uri": f"file://{store}"})
    return promote.run(cfg, bundle, version=version)


def test_the_task_promotes_the_grown_bundle_over_the_version_it_grew_from(world, tmp_path):  # noqa: F811
    from recsys.bundle_manifest import load_manifest
    from recsys.object_store import open_store, read_pointer

    store = tmp_path / "store"
    assert _refresh_task(world, store, tmp_path, "empty") == ("", {"promoted": 0.0, "added_items": 0})
    trained = _promote(world, store, world["bundle"])["version"]
    current, report = _refresh_task(world, store, tmp_path, "first")
    pointer = read_pointer(open_store(f"file://{store}"))
    assert current == pointer["version"] != trained and pointer["previous"]["version"] == trained
    assert report["added_items"] == NEW and report["promoted"] == 1.0
    grown = load_manifest(store / current, verify=True)
    assert grown["lineage"]["refreshed_from"] == trained
    again, report = _refresh_task(world, store, tmp_path, "again")  # every item indexed now
    assert again == current and report["added_items"] == 0 and report["promoted"] == 0.0


def test_a_training_promotion_in_between_is_never_replaced_by_the_older_grown_model(
    world,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from components import index_refresh
    from recsys.object_store import open_store, read_pointer

    store = tmp_path / "store"
    _promote(world, store, world["bundle"])
    grow = index_refresh.run

    def grow_while_a_training_run_promotes(*args, **kwargs):
        report = grow(*args, **kwargs)
        _promote(world, store, world["bundle"], version="trained-meanwhile")  # the daily run wins the race
        return report

    monkeypatch.setattr(index_refresh, "run", grow_while_a_training_run_promotes)
    current, report = _refresh_task(world, store, tmp_path, "raced")  # stands down, does not fail the run
    assert current == "trained-meanwhile" and report["superseded"] == 1.0 and report["promoted"] == 0.0
    assert read_pointer(open_store(f"file://{store}"))["version"] == "trained-meanwhile"
    assert report["version"] != current  # the grown version was uploaded, never made current


def test_a_fixed_promote_version_still_refreshes_under_the_grown_bundles_own_version(
    world,  # noqa: F811
    tmp_path,
):
    from recsys.object_store import open_store, read_pointer

    store = tmp_path / "store"
    _promote(world, store, world["bundle"], version="bootstrap")  # promote.version set: a fixed name
    current, report = _refresh_task(world, store, tmp_path, "fixed")
    pointer = read_pointer(open_store(f"file://{store}"))
    assert current == report["version"] == pointer["version"] != "bootstrap" and report["promoted"] == 1.0
    assert pointer["previous"]["version"] == "bootstrap"
