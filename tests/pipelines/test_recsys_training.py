"""The compiled pipeline (pipelines/recsys_training.py, KFP IR): tasks, order, GPU and resources, the gate's
condition, caching, images under the KFP driver's rule, the committed YAML is fresh, configure, and the
pipeline section of the config it is built from.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from pipelines.__main__ import main
from recsys.config import ConfigError, load_params, params_from_yaml_text
from tests.conftest import REPO_ROOT, revalidated

COMPILED = REPO_ROOT / "pipelines" / "recsys_training.yaml"


TRAIN_TASKS = ["train-two-tower", "train-multi-tower", "train-multi-tower-din", "train-dlrm"]
ORDER = [  # (task, a task it must run after): the DAG's edges, by display name
    ("ingest", "configure"),
    ("features", "ingest"),
    ("validate-raw", "ingest"),
    ("training-set", "features"),
    ("training-set", "validate-raw"),
    ("validate-training-set", "training-set"),
    ("monitor", "training-set"),
    *[(train, "monitor") for train in TRAIN_TASKS],  # a failed monitor check stops the run before training
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
    ("deploy", "promote"),  # the InferenceService serves the promoted, verified copy
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("kfp") / "recsys_training.yaml"
    assert main(["--params", str(REPO_ROOT / "params.yaml"), "compile", "--output", str(out)]) == 0
    # the pipeline spec, then the kfp-kubernetes platform spec (tests/pipelines/test_kubernetes_platform.py)
    spec, *_platform = yaml.safe_load_all(out.read_text())
    return {"text": out.read_text(), "spec": spec}


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
        "configure", "ingest", "features", "validate-raw", "training-set", "monitor", "validate-training-set",
        "online-store", *TRAIN_TASKS, "search", "evaluate", "export", "build-index", "bundle", "gate",
        "promote", "deploy",
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
    promote = tasks["promote"]  # only a gated bundle reaches the store (outside the run: never cached)
    assert promote["parent"] == deploy["parent"]
    assert not promote["spec"].get("cachingOptions", {}).get("enableCache", False)
    assert not tasks["gate"]["spec"].get("cachingOptions", {}).get("enableCache", False)
    # the online store lives outside the run too: a cache hit on the training set must not skip its backfill
    assert not tasks["online-store"]["spec"].get("cachingOptions", {}).get("enableCache", False)
    for name in ("ingest", "features", "training-set", "train-dlrm", "build-index", "bundle"):
        assert tasks[name]["spec"]["cachingOptions"]["enableCache"] is True


def test_search_is_an_optional_gpu_task_beside_the_trainings(compiled, tasks, params):
    search = tasks["search"]
    condition = tasks[search["parent"]]["spec"]
    assert (
        condition["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--run_search'] == true"
    )
    run_search = compiled["spec"]["root"]["inputDefinitions"]["parameters"]["run_search"]
    assert run_search["defaultValue"] is params.search.enabled is False  # off unless a run asks
    keys = {task["key"]: name for name, task in tasks.items()}
    assert "validate-training-set" in {keys[k] for k in condition.get("dependentTasks", [])} | {
        keys[k] for k in search["spec"].get("dependentTasks", [])
    }
    resources = _executor(compiled, tasks, "search")["resources"]
    assert resources["accelerator"]["resourceCount"] == str(params.pipeline.accelerator_limit)
    assert resources["resourceMemoryLimit"] == params.pipeline.train_resources.memory_limit
    assert (
        _executor(compiled, tasks, "search")["image"] == _executor(compiled, tasks, TRAIN_TASKS[0])["image"]
    )
    # nothing waits for it: its report is for the next params.yaml
    assert all(search["key"] not in t["spec"].get("dependentTasks", []) for t in tasks.values())


def test_every_group_receives_the_parameters_its_tasks_read(compiled):
    """A task inside a dsl.If group reads run parameters through the group's own inputs; one the group
    lacks fails at run time ("Parent pipeline input argument ... not found"): kfp 2.x drops a run
    parameter used only in a task's resource field (the search task's accelerator) from the group."""
    for name, component in compiled["spec"]["components"].items():
        if "dag" not in component:
            continue
        declared = set(component.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in component["dag"]["tasks"].items():
            for value in task.get("inputs", {}).get("parameters", {}).values():
                wanted = value.get("componentInputParameter")
                assert wanted is None or wanted in declared, f"{name}/{task_name} reads {wanted}"


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
        assert image == (cfg.training_image if name in [*TRAIN_TASKS, "search"] else cfg.image), name
        assert "pip install" not in " ".join(container["command"])  # kfp comes with the image
        assert "executor_main" in " ".join(container["command"])
    assert not _is_full_reference("0.1.0") and _is_full_reference("ghcr.io/a/b@sha256:" + "0" * 64)
    assert set(parameters) == {
        "params_yaml", "data_source", "gpu_type", "namespace", "data_until", "deploy_dry_run", "run_search",
    }  # fmt: skip


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

    configs = steps.configure(params_as_text(params), "movielens", "nvidia.com/mig-1g.10gb", "recsys-dev")
    assert _section(configs, "ingest").data.source == "movielens"
    assert _section(configs, "train").pipeline.accelerator_type == "nvidia.com/mig-1g.10gb"
    assert _section(configs, "deploy").deploy.namespace == "recsys-dev"
    assert _section(configs, "train").models == params.models
    with pytest.raises(ConfigError, match=r"data\.source"):
        steps.configure(params_as_text(params), "csv", "nvidia.com/gpu", "recsys")
    with pytest.raises(ConfigError, match=r"deploy\.namespace"):
        steps.configure(params_as_text(params), "synthetic", "nvidia.com/gpu", "Not_A_Namespace")


def test_a_scheduled_run_trains_on_the_data_up_to_its_day(compiled, tasks, params):
    """Every run of a schedule had the same inputs, so a daily run was a full cache hit: the configure
    task now gets KFP's schedule-time placeholder and sets data.until to the start of that day."""
    from pipelines import steps
    from pipelines.recsys_training import params_as_text

    component = compiled["spec"]["components"][tasks["configure"]["spec"]["componentRef"]["name"]]
    assert "schedule_time" in component["inputDefinitions"]["parameters"]
    argument = tasks["configure"]["spec"]["inputs"]["parameters"]["schedule_time"]
    assert argument["runtimeValue"]["constant"] == "{{$.pipeline_job_schedule_time_utc}}"
    text = params_as_text(params)
    monday = _section(
        steps.configure(text, "synthetic", "nvidia.com/gpu", "recsys", "", "2026-08-03T03:00:00Z"), "ingest"
    )
    tuesday = _section(
        steps.configure(text, "synthetic", "nvidia.com/gpu", "recsys", "", "2026-08-04T03:00:00+00:00"),
        "ingest",
    )
    assert monday.data.until.isoformat() == "2026-08-03T00:00:00+00:00"
    assert tuesday.data.until.isoformat() == "2026-08-04T00:00:00+00:00"
    backfill = steps.configure(
        text, "synthetic", "nvidia.com/gpu", "recsys", "2026-07-01", "2026-08-04T03:00:00Z"
    )
    assert _section(backfill, "ingest").data.until.isoformat() == "2026-07-01T00:00:00+00:00"
    # kfp.local and one-off runs leave the placeholder unresolved: params.yaml's data.until stands
    unresolved = steps.configure(
        text, "synthetic", "nvidia.com/gpu", "recsys", "", "{{$.pipeline_job_schedule_time_utc}}"
    )
    assert _section(unresolved, "ingest").data.until == params.data.until


def test_a_cluster_runs_monitor_reads_the_log_the_deployed_pods_write(compiled, tasks, params):
    """The pods log to ``deploy.request_log_uri`` (their filesystem is read-only); the compiled pipeline hands
    that to configure, which points the monitor's ``serving.request_log.uri`` at it."""
    from pipelines import steps
    from pipelines.recsys_training import params_as_text

    argument = tasks["configure"]["spec"]["inputs"]["parameters"]["served_log"]
    assert argument["runtimeValue"]["constant"] == params.deploy.request_log_uri != ""
    text = params_as_text(params)
    served = steps.configure(text, "synthetic", "nvidia.com/gpu", "recsys", served_log="s3://logs/answers/")
    assert _section(served, "monitor").serving.request_log.uri == "s3://logs/answers/"
    local = steps.configure(text, "synthetic", "nvidia.com/gpu", "recsys")  # run-local: the local log
    assert _section(local, "monitor").serving.request_log.uri == params.serving.request_log.uri


def _section(configs: Any, step: str) -> Any:
    """One step's configuration out of configure's outputs."""
    from recsys.step_contract import STEPS, step_params_from_json

    return step_params_from_json(getattr(configs, step), STEPS[step])


def test_each_task_gets_only_its_steps_sections(tasks):
    """Every step task's config is configure's output named after its step (recsys/step_contract.py)."""
    from recsys.step_contract import STEPS

    for name, task in tasks.items():
        config = task["spec"].get("inputs", {}).get("parameters", {}).get("config")
        if name == "configure" or config is None:
            continue
        # the component is the step's wrapper: comp-<step>, comp-<step>-2 for a second use
        wrapper = re.sub(r"-\d+$", "", task["spec"]["componentRef"]["name"].removeprefix("comp-"))
        step = wrapper.replace("-", "_")
        assert step in STEPS, name
        if "taskOutputParameter" in config:
            assert config["taskOutputParameter"] == {"producerTask": "configure", "outputParameterKey": step}
        else:  # inside a dsl.If group, the group passes configure's output on
            assert config["componentInputParameter"] == f"pipelinechannel--configure-{step}", name


def test_a_serving_change_leaves_the_trainings_inputs_and_cache_keys_as_they_were(params):
    """Compiling with a changed ``serving.*`` value changes the bundle's config (it records the whole
    configuration) and the monitor's (it reads where the server logs; never cached), and no training
    step's: the training tasks' inputs, KFP's cache key, stay."""
    from pipelines import steps
    from pipelines.recsys_training import params_as_text
    from recsys.step_contract import STEPS

    changed = params.model_copy(deep=True)
    changed.serving.max_request_bytes = params.serving.max_request_bytes * 2
    before = steps.configure(params_as_text(params), "synthetic", "nvidia.com/gpu", "recsys")
    after = steps.configure(params_as_text(changed), "synthetic", "nvidia.com/gpu", "recsys")
    differ = {step for step in STEPS if getattr(before, step) != getattr(after, step)}
    assert differ == {"bundle", "monitor"}, differ

    first, second = _compiled_spec(params), _compiled_spec(changed)
    for name in TRAIN_TASKS:
        assert _task_by_name(first, name) == _task_by_name(second, name), name
    assert first["root"]["inputDefinitions"] != second["root"]["inputDefinitions"]  # params_yaml default


def _compiled_spec(params: Any) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from kfp import compiler

    from pipelines.recsys_training import build_pipeline

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "p.yaml"
        compiler.Compiler().compile(build_pipeline(params), str(out))
        spec, *_ = yaml.safe_load_all(out.read_text())
    return spec


def _task_by_name(spec: dict[str, Any], display: str) -> dict[str, Any]:
    for task in spec["root"]["dag"]["tasks"].values():
        if task["taskInfo"]["name"] == display:
            component = spec["components"][task["componentRef"]["name"]]
            return {"task": task, "component": component}
    raise KeyError(display)


def test_a_run_date_that_is_not_a_date_is_named():
    from pipelines.run_window import RunWindowError, data_until

    with pytest.raises(RunWindowError, match="data_until: 'yesterday'"):
        data_until("yesterday", "")
    assert data_until("", "") is None


def test_pipeline_config_rejects_latest_and_bad_resources(params):
    with pytest.raises(ValueError, match="pin a release tag"):
        revalidated(params.pipeline, image_tag="latest")
    with pytest.raises(ConfigError, match=r"pipeline\.train_resources\.memory_request"):
        load_params(REPO_ROOT / "params.yaml", overrides={"pipeline.train_resources.memory_request": "lots"})
