"""The compiled pipeline gives exactly the tasks that touch the promote store (gate reads it, promote writes
it, deploy restores its pointer on a rollback) the store's endpoint and credentials from the Secret
``promote.secret``, under the names boto3 and KServe read; no other pod needs or breaks on that Secret."""

from __future__ import annotations

import yaml

from pipelines.recsys_training import compile_pipeline
from tests.conftest import REPO_ROOT

# the Feast tasks that register views publish the feature tables the shared registry names
STORE_TASKS = {"ingest", "training-set", "online-store", "monitor", "gate", "promote", "deploy"}
KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def _executor_of_each_task(spec: dict) -> dict[str, str]:
    found = {}

    def walk(dag: dict) -> None:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                found[task["taskInfo"]["name"]] = component["executorLabel"]

    walk(spec["root"]["dag"])
    return found


def test_exactly_the_store_tasks_get_the_object_store_secret(tmp_path, params):
    out = compile_pipeline(REPO_ROOT / "params.yaml", tmp_path / "pipeline.yaml")
    documents = list(yaml.safe_load_all(out.read_text()))
    (spec,) = [d for d in documents if "pipelineInfo" in d]
    (platform,) = [d for d in documents if "platforms" in d]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_store = {}
    for name, label in _executor_of_each_task(spec).items():
        for secret in executors.get(label, {}).get("secretAsEnv", []):
            if secret["secretName"] == params.promote.secret:
                with_store[name] = {(e["secretKey"], e["envVar"]) for e in secret["keyToEnv"]}
                assert secret.get("optional", False) is False  # a missing Secret stops the task, loudly
    assert set(with_store) == STORE_TASKS
    assert all(pairs == {(key, key) for key in KEYS} for pairs in with_store.values())
