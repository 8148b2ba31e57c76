"""The Kubeflow pipeline: compiled IR (tasks, order, GPU, condition, caching), the committed YAML is fresh,
cron validation, upload/schedule argument handling, and the whole DAG through kfp.local (slow).

upload/schedule cannot reach a KFP server here: they run against a recording stand-in for
``kfp.Client`` that answers the calls they make, so what is tested is what they ask the server for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from models.config import MODEL_KINDS
from pipelines.__main__ import main
from recsys.config import ConfigError, PipelineConfig, kfp_cron, load_params, params_from_yaml_text
from tests.conftest import REPO_ROOT

COMPILED = REPO_ROOT / "pipelines" / "recsys_training.yaml"


# --------------------------------------------------------------------------------------------------
# cron


@pytest.mark.parametrize(
    ("cron", "normalised"),
    [
        ("0 0 3 * * *", "0 0 3 * * *"),
        ("  0  30 2 * *   MON-FRI ", "0 30 2 * * MON-FRI"),
        ("0 */15 * * * ?", "0 */15 * * * ?"),
        ("0 0 9 1,15 JAN-JUN *", "0 0 9 1,15 JAN-JUN *"),
        ("@daily", "@daily"),
        ("@every 1h30m", "@every 1h30m"),
    ],
)
def test_kfp_cron_accepts(cron, normalised):
    assert kfp_cron(cron) == normalised


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * *", r"has 5 field\(s\); KFP's cron has 6, seconds first.*did you mean '0 0 3 \* \* \*'"),
        ("0 0 3 * * * 2026", r"has 7 field\(s\)"),
        ("", r"has 0 field\(s\)"),
        ("0 60 3 * * *", r"minute value '60' is out of range \(allowed 0-59\)"),
        ("0 0 24 * * *", r"hour value '24' is out of range"),
        ("0 0 3 0 * *", r"day of month value '0' is out of range \(allowed 1-31\)"),
        ("0 0 3 * 13 *", r"month value '13' is out of range \(allowed 1-12 or JAN-DEC\)"),
        ("0 0 3 * * 7", r"day of week value '7' is out of range"),
        ("0 0 3 * * FUNDAY", r"day of week value 'FUNDAY'"),
        ("0 0 5-3 * * *", r"hour field '5-3': the range runs backwards"),
        ("0 */0 * * * *", r"step after '/' must be a positive integer"),
        ("? 0 3 * * *", r"second value '\?'"),
        ("@fortnightly", r"has 1 field\(s\)"),
    ],
)
def test_kfp_cron_rejects_with_a_clear_message(cron, message):
    with pytest.raises(ValueError, match=message):
        kfp_cron(cron)


def test_params_cron_is_validated_at_load():
    with pytest.raises(ConfigError, match=r"pipeline\.cron: .*has 5 field"):
        load_params(REPO_ROOT / "params.yaml", overrides={"pipeline.cron": "0 3 * * *"})


# --------------------------------------------------------------------------------------------------
# upload / schedule against a recording kfp.Client stand-in


class RecordingKfpClient:
    """Answers like a KFP server holding ``pipelines`` (name -> id) and their versions (newest first)."""

    def __init__(self, pipelines: dict[str, str] | None = None, versions: dict[str, list[str]] | None = None):
        self.pipelines = dict(pipelines or {})
        self.versions = {pid: list(names) for pid, names in (versions or {}).items()}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", {"name": name}))
        return self.pipelines.get(name)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(
            ("upload_pipeline", {"path": pipeline_package_path, "name": pipeline_name, "ns": namespace})
        )
        self.pipelines[pipeline_name] = "pid-new"
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
        self.calls.append(("create_recurring_run", kwargs))
        return SimpleNamespace(recurring_run_id="rid-1")

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
    assert run["no_catchup"] is True and run["enabled"] is True


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


def test_pipeline_config_rejects_latest_and_bad_resources():
    with pytest.raises(ValueError, match="pin a release tag"):
        PipelineConfig(image_tag="latest")
    with pytest.raises(ConfigError, match=r"pipeline\.train_resources\.memory_request"):
        load_params(REPO_ROOT / "params.yaml", overrides={"pipeline.train_resources.memory_request": "lots"})


# --------------------------------------------------------------------------------------------------
# the compiled pipeline (KFP IR)

TRAIN_TASKS = ["train-two-tower", "train-multi-tower", "train-multi-tower-din", "train-dlrm"]
ORDER = [  # (task, a task it must run after): the DAG's edges, by display name
    ("ingest", "configure"),
    ("features", "ingest"),
    ("validate-raw", "ingest"),
    ("training-set", "features"),
    ("training-set", "validate-raw"),
    ("validate-training-set", "training-set"),
    ("online-store", "training-set"),
    *[(train, "validate-training-set") for train in TRAIN_TASKS],
    *[("evaluate", train) for train in TRAIN_TASKS],
    ("export", "evaluate"),
    ("build-index", "export"),
    ("bundle", "build-index"),
    ("bundle", "evaluate"),
    *[("bundle", train) for train in TRAIN_TASKS],
    ("gate", "bundle"),
    ("gate", "online-store"),  # no deploy before the online store holds the run's features
]


@pytest.fixture(scope="module")
def params():
    return load_params(REPO_ROOT / "params.yaml")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kfp") / "recsys_training.yaml"
    assert main(["--params", str(REPO_ROOT / "params.yaml"), "compile", "--output", str(out)]) == 0
    return {"text": out.read_text(), "spec": yaml.safe_load(out.read_text())}


@pytest.fixture(scope="module")
def tasks(compiled) -> dict[str, dict[str, Any]]:
    """Every task by display name: its spec, its IR key, and the DAG component that holds it."""
    spec = compiled["spec"]
    found: dict[str, dict[str, Any]] = {}

    def walk(dag: dict[str, Any], parent: str) -> None:
        for key, task in dag["tasks"].items():
            found[task["taskInfo"]["name"]] = {"key": key, "spec": task, "parent": parent}
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"], task["taskInfo"]["name"])

    walk(spec["root"]["dag"], "root")
    return found


def _executor(compiled, tasks, name: str) -> dict[str, Any]:
    component = compiled["spec"]["components"][tasks[name]["spec"]["componentRef"]["name"]]
    return compiled["spec"]["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def test_compiled_pipeline_has_every_task(compiled, tasks, params):
    assert compiled["spec"]["pipelineInfo"]["name"] == params.pipeline.name == "recsys-training"
    steps = {name for name, task in tasks.items() if not task["key"].startswith("condition")}
    assert steps == {
        "configure", "ingest", "features", "validate-raw", "training-set", "validate-training-set",
        "online-store", *TRAIN_TASKS, "evaluate", "export", "build-index", "bundle", "gate", "deploy",
    }  # fmt: skip


def test_tasks_run_in_dag_order(tasks):
    def upstream(name: str) -> set[str]:
        keys = {task["key"]: other for other, task in tasks.items()}
        direct = {keys[key] for key in tasks[name]["spec"].get("dependentTasks", [])}
        return direct | {far for near in direct for far in upstream(near)}

    for task, before in ORDER:
        assert before in upstream(task), f"{task} does not wait for {before}"
    for train in TRAIN_TASKS:  # the four trainings are independent: they run in parallel
        assert not set(TRAIN_TASKS) & upstream(train)


def test_training_tasks_request_the_gpu_and_resources(compiled, tasks, params):
    cfg = params.pipeline
    for train in TRAIN_TASKS:
        resources = _executor(compiled, tasks, train)["resources"]
        assert (
            resources["accelerator"]["resourceType"] == "{{$.inputs.parameters['pipelinechannel--gpu_type']}}"
        )
        assert resources["accelerator"]["resourceCount"] == str(cfg.accelerator_limit)
        assert resources["resourceCpuRequest"] == cfg.train_resources.cpu_request
        assert resources["resourceMemoryLimit"] == cfg.train_resources.memory_limit
    for other in ("ingest", "evaluate", "deploy"):
        resources = _executor(compiled, tasks, other)["resources"]
        assert "accelerator" not in resources
        assert resources["resourceMemoryRequest"] == cfg.step_resources.memory_request
    gpu = compiled["spec"]["root"]["inputDefinitions"]["parameters"]["gpu_type"]
    assert gpu["defaultValue"] == cfg.accelerator_type


def test_deploy_runs_only_when_the_gate_passes_and_is_never_cached(compiled, tasks):
    deploy = tasks["deploy"]
    condition = tasks[deploy["parent"]]["spec"]
    assert (
        condition["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    )
    gate_key = tasks["gate"]["key"]
    assert gate_key in condition["dependentTasks"]
    gate_component = compiled["spec"]["components"][tasks["gate"]["spec"]["componentRef"]["name"]]
    assert gate_component["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"
    assert not deploy["spec"].get("cachingOptions", {}).get("enableCache", False)
    assert not tasks["gate"]["spec"].get("cachingOptions", {}).get("enableCache", False)
    # the online store lives outside the run too: a cache hit on the training set must not skip its backfill
    assert not tasks["online-store"]["spec"].get("cachingOptions", {}).get("enableCache", False)
    for name in ("ingest", "features", "training-set", "train-dlrm", "build-index", "bundle"):
        assert tasks[name]["spec"]["cachingOptions"]["enableCache"] is True


# A container image as the KFP v2 driver resolves it (backend driver.go / resolve.go): an input-parameter
# placeholder is substituted only as the whole image string; a placeholder inside a longer string makes the
# pod image the bare parameter value (e.g. "repo:{{...image_tag}}" -> "0.1.0"), which nothing can pull.
PARAMETER_PLACEHOLDER = re.compile(r"\{\{\$\.inputs\.parameters\['(?:pipelinechannel--)?([^']+)'\]\}\}")
# a full reference: [registry/]repo[:tag][@sha256:digest] with a tag or a digest
FULL_IMAGE_REFERENCE = re.compile(
    r"(?:[a-z0-9.-]+(?::\d+)?/)?[a-z0-9._/-]+(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


def driver_resolved_image(image: str, parameters: dict[str, Any]) -> str:
    """``image`` after the KFP driver's substitution, with the pipeline's parameter defaults."""
    match = PARAMETER_PLACEHOLDER.search(image)
    if match is None:
        return image
    return str(parameters[match.group(1)]["defaultValue"])


def test_driver_rule_resolves_only_whole_string_placeholders():
    parameters = {"image": {"defaultValue": "r.io/a/b:1.0"}, "image_tag": {"defaultValue": "0.1.0"}}
    whole = "{{$.inputs.parameters['pipelinechannel--image']}}"
    assert driver_resolved_image(whole, parameters) == "r.io/a/b:1.0"
    # the form the pipeline compiled to before: a tag placeholder inside the reference
    assert driver_resolved_image(
        "r.io/a/b:{{$.inputs.parameters['pipelinechannel--image_tag']}}", parameters
    ) == ("0.1.0")


def _is_full_reference(image: str) -> bool:
    return bool(FULL_IMAGE_REFERENCE.fullmatch(image)) and (
        "@sha256:" in image or ":" in image.split("/")[-1]
    )


def test_every_task_image_resolves_to_the_pinned_image_without_installing_kfp(compiled, tasks, params):
    cfg = params.pipeline
    parameters = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    for name in tasks:
        if tasks[name]["key"].startswith("condition"):
            continue
        container = _executor(compiled, tasks, name)
        image = driver_resolved_image(container["image"], parameters)
        assert _is_full_reference(image), f"{name}: the driver would run image {image!r}"
        assert image == (cfg.training_image if name in TRAIN_TASKS else cfg.image), name
        assert "pip install" not in " ".join(container["command"])  # kfp comes with the image
        assert "executor_main" in " ".join(container["command"])
    assert not _is_full_reference("0.1.0") and _is_full_reference("ghcr.io/a/b@sha256:" + "0" * 64)
    assert set(parameters) == {"params_yaml", "data_source", "gpu_type", "namespace", "deploy_dry_run"}


def test_params_default_is_the_validated_params_file(compiled, params):
    default = compiled["spec"]["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    assert "\n" not in default  # KFP copies defaults into the header comment; a newline would break it
    assert params_from_yaml_text(default) == params


def test_committed_pipeline_is_up_to_date(compiled):
    assert COMPILED.exists(), "pipelines/recsys_training.yaml missing: run `python -m pipelines compile`"
    assert COMPILED.read_text() == compiled["text"], (
        "pipelines/recsys_training.yaml is stale (pipelines/ or params.yaml changed): "
        "run `python -m pipelines compile` and commit the result"
    )


def test_configure_applies_the_run_parameters(params):
    from pipelines import steps
    from pipelines.recsys_training import params_as_text

    text = steps.configure(params_as_text(params), "movielens", "nvidia.com/mig-1g.10gb", "recsys-dev")
    effective = params_from_yaml_text(text)
    assert effective.data.source == "movielens"
    assert effective.pipeline.accelerator_type == "nvidia.com/mig-1g.10gb"
    assert effective.deploy.namespace == "recsys-dev"
    assert effective.models == params.models
    with pytest.raises(ConfigError, match=r"data\.source"):
        steps.configure(params_as_text(params), "csv", "nvidia.com/gpu", "recsys")
    with pytest.raises(ConfigError, match=r"deploy\.namespace"):
        steps.configure(params_as_text(params), "synthetic", "nvidia.com/gpu", "Not_A_Namespace")


# --------------------------------------------------------------------------------------------------
# artifact plumbing used by the wrappers


def test_rebase_moves_configured_paths_into_artifacts(tmp_path):
    from pipelines.artifact_paths import rebase, rebase_all

    moves = {"artifacts/models": tmp_path / "all", "artifacts/models/dlrm": tmp_path / "dlrm"}
    assert (
        rebase("artifacts/models/two_tower/model.safetensors", moves)
        == tmp_path / "all/two_tower/model.safetensors"
    )
    assert rebase("artifacts/models/dlrm/config.json", moves) == tmp_path / "dlrm/config.json"  # deepest wins
    assert rebase_all({"a": "artifacts/models/x"}, moves) == {"a": tmp_path / "all/x"}
    with pytest.raises(ValueError, match="not under any artifact directory"):
        rebase("artifacts/index/items.faiss", moves)


def test_published_metrics_are_the_finite_numbers_by_dotted_path(tmp_path):
    from pipelines.metrics_artifact import publish_metrics

    source = tmp_path / "evaluation.json"
    source.write_text(
        json.dumps({"ranking": {"dlrm": {"auc": 0.71, "ok": True}}, "n": 3, "nan": float("nan")})
    )
    logged: dict[str, float] = {}
    artifact = SimpleNamespace(path=str(tmp_path / "out" / "metrics"), log_metric=logged.__setitem__)
    assert publish_metrics(source, artifact) == {"ranking.dlrm.auc": 0.71, "n": 3.0}
    assert logged == {"ranking.dlrm.auc": 0.71, "n": 3.0}
    assert json.loads(Path(artifact.path).read_text())["n"] == 3  # the file travels with the artifact


# --------------------------------------------------------------------------------------------------
# the wrappers, called in-process on real steps (artifacts are plain directories, as kfp.local makes them)


class FakeArtifact(SimpleNamespace):
    """What a KFP executor hands a component: a local ``path``, a ``uri``, and ``log_metric``."""

    def __init__(self, path: Path):
        super().__init__(path=str(path), uri=str(path), metadata={})

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


def _unit_rows(rng, n: int, dim: int):
    import numpy as np

    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_downstream_wrappers_drive_the_real_steps_on_artifact_paths(tmp_path, params):
    """export's artifact -> build_index -> bundle -> gate -> deploy (dry run), as the DAG wires them."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipelines import steps
    from pipelines.recsys_training import params_as_text
    from recsys.bundle_manifest import load_manifest

    rng = np.random.default_rng(0)
    exported = tmp_path / "export" / "exported"
    exported.mkdir(parents=True)
    names = {
        Path(params.index.item_embeddings).name: "item_ids",
        Path(params.index.query_embeddings).name: "user_ids",
    }
    for file, id_key in names.items():
        save_file(
            {id_key: np.arange(500, dtype=np.int64), "embeddings": _unit_rows(rng, 500, 16)},
            str(exported / file),
        )
    evaluation = tmp_path / "evaluate" / "evaluation"
    evaluation.parent.mkdir()
    metrics: dict[str, Any] = {}
    for dotted in params.gate.metrics:  # a value for every metric the gate judges, wherever config puts it
        *parents, leaf = dotted.split(".")
        node = metrics
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = 0.7
    evaluation.write_text(json.dumps(metrics))
    # a bundle of the embeddings and the index only: the trained models are run-local's business
    files = {name: source for name, source in params.bundle.files.items() if not name.startswith("models/")}
    files.pop("popular_items.json", None)
    text = params_as_text(
        params.model_copy(update={"bundle": params.bundle.model_copy(update={"files": files})})
    )
    art = {
        name: FakeArtifact(tmp_path / name / name)
        for name in ("index", "index_metrics", "bundle", "decision", "isvc")
    }
    models = {kind: FakeArtifact(tmp_path / "train" / kind) for kind in MODEL_KINDS}

    steps.build_index(text, exported=FakeArtifact(exported), index=art["index"], metrics=art["index_metrics"])
    assert (Path(art["index"].path) / Path(params.index.output).name).is_file()
    assert art["index_metrics"].metadata  # the index metrics reach the UI
    steps.bundle(
        text,
        FakeArtifact(exported),
        art["index"],
        evaluation=FakeArtifact(evaluation),
        bundle=art["bundle"],
        **models,
    )
    manifest = load_manifest(art["bundle"].path)  # verifies every checksum
    assert set(manifest["files"]) == set(files)
    assert manifest["metrics"] == metrics  # the evaluation travels with the bundle
    assert steps.gate(text, evaluation=FakeArtifact(evaluation), decision=art["decision"]) is True
    assert art["decision"].metadata["passed"] == 1.0
    assert steps.deploy(text, bundle=art["bundle"], dry_run=True, manifest=art["isvc"]) == ""
    isvc = yaml.safe_load(Path(art["isvc"].path).read_text())
    env = {e["name"]: e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == Path(art["bundle"].path).resolve().as_uri()


# --------------------------------------------------------------------------------------------------
# the whole DAG through kfp.local


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_run_local_end_to_end_on_the_tiny_preset(tmp_path):
    from pipelines.local_run import run_local
    from recsys.bundle_manifest import load_manifest
    from serving.bundle import load_bundle

    bundle = run_local(
        REPO_ROOT / "params.yaml", preset="tiny", pipeline_root=tmp_path, overrides={"training.epochs": 1}
    )
    manifest = load_manifest(bundle)  # every checksum verified
    assert manifest["metrics"]["retrieval"] and manifest["metrics"]["ranking"]  # evaluation travelled along
    served = load_bundle(bundle, load_params(REPO_ROOT / "params.yaml").serving.default_ranker)
    assert served.version == manifest["version"]  # the serving code loads what the DAG produced
    (run_dir,) = tmp_path.iterdir()
    rendered = list(run_dir.rglob("manifest"))  # deploy's dry-run InferenceService, when the gate passed
    gate = json.loads(next(run_dir.rglob("gate/decision")).read_text())
    assert bool(rendered) == gate["passed"]
