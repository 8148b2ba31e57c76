"""The step contract (recsys/step_contract.py) is the one declaration of a step's sections and artifacts:
dvc.yaml's params, the Kubeflow wrappers' artifacts and configure's outputs follow it, and a step that
reads an undeclared section fails naming it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml
from kfp.dsl.types.type_annotations import InputAnnotation, OutputAnnotation

from models.registry import MODEL_KINDS
from pipelines import steps as wrappers
from recsys import artifact_layout as layout
from recsys.config import ConfigError
from recsys.step_contract import ALL_SECTIONS, STEPS, StepContract, step_params_from_json
from tests.conftest import REPO_ROOT, shipped_params

DVC_STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _step_of(stage: dict) -> str:
    return re.match(r"python -m components\.(\w+)", stage["cmd"]).group(1)


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_dvc_params_are_the_steps_sections(stage):
    contract = STEPS[_step_of(DVC_STAGES[stage])]
    declared = DVC_STAGES[stage].get("params", [])
    expected = sorted(contract.sections) if contract.sections != ALL_SECTIONS else sorted(ALL_SECTIONS)
    assert sorted(declared) == expected, f"dvc.yaml stage {stage}: params {declared} != contract {expected}"


def _declared(stage: dict, keys: tuple[str, ...]) -> list[Path]:
    return [Path(next(iter(e)) if isinstance(e, dict) else e) for key in keys for e in stage.get(key, [])]


def _covered(path: Path, declared: list[Path]) -> bool:
    """DVC tracks ``path`` when it, a folder holding it, or a file inside it is declared."""
    return any(path == d or d in path.parents or path in d.parents for d in declared)


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_dvc_deps_and_outs_hold_the_steps_files(stage):
    spec = DVC_STAGES[stage]
    contract = STEPS[_step_of(spec)]
    reads, writes = dict(contract.reads), dict(contract.writes)
    if contract.name == "validate":  # one step, a stage per target: the layout's files of that target
        target = re.search(r"--target (\w+)", spec["cmd"]).group(1)
        reads = {"data_dir": layout.RAW_DIR if target == "raw" else layout.TRAINING_DIR}
        writes = {"docs": layout.validation_docs(target), "summary": layout.validation_summary(target)}
    deps, outs = _declared(spec, ("deps",)), _declared(spec, ("outs", "metrics", "plots"))
    for name, path in reads.items():
        assert _covered(path, deps), f"dvc.yaml stage {stage}: {name} ({path}) is not among its deps"
    for name, path in writes.items():
        assert _covered(path, outs), f"dvc.yaml stage {stage}: {name} ({path}) is not among its outs"


def test_every_step_is_a_dvc_stage_or_a_cluster_task():
    in_dvc = {_step_of(stage) for stage in DVC_STAGES.values()}
    cluster_only = {"online_store", "promote", "deploy"}  # the world outside the run: Kubeflow tasks only
    cluster_only |= {"index_refresh"}  # the hourly pipeline's task; locally a command, not a DVC stage
    assert in_dvc | cluster_only == set(STEPS)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_each_kubeflow_wrapper_takes_and_makes_the_contracts_artifacts(name):
    contract = STEPS[name]
    signature = inspect.signature(getattr(wrappers, name))
    inputs, outputs = set(), set()
    for param in signature.parameters.values():
        marks = getattr(param.annotation, "__metadata__", ())  # Input[...] / Output[...] are Annotated
        if InputAnnotation in marks:
            inputs.add(param.name)
        elif OutputAnnotation in marks:
            outputs.add(param.name)
    if set(MODEL_KINDS) <= inputs:  # the trained models: one artifact per registered kind
        inputs = (inputs - set(MODEL_KINDS)) | {"models"}
    assert inputs == set(contract.inputs), name
    assert outputs == set(contract.outputs), name
    assert "config" in signature.parameters


def test_configure_makes_one_config_per_step():
    returned = inspect.signature(wrappers.configure).return_annotation
    assert list(returned._fields) == list(STEPS)


def test_a_step_reading_an_undeclared_section_fails_naming_it():
    scoped = STEPS["train"].scope(shipped_params())
    assert scoped.models == shipped_params().models
    with pytest.raises(AttributeError, match=r"step 'train' does not declare params section 'serving'"):
        scoped.serving  # noqa: B018


def test_a_scoped_config_round_trips_and_names_a_bad_or_foreign_one(tmp_path):
    contract = STEPS["build_index"]
    scoped = contract.scope(shipped_params())
    assert step_params_from_json(scoped.to_json(), contract).index == scoped.index
    path = tmp_path / "params.yaml"
    path.write_text(scoped.to_yaml())  # what a task hands its subprocess
    assert contract.load(path).dump() == scoped.dump()
    with pytest.raises(ConfigError, match="got the configuration of step 'ingest'"):
        step_params_from_json(STEPS["ingest"].scope(shipped_params()).to_json(), contract)
    raw = scoped.dump() | {"index": scoped.dump()["index"] | {"flat_max_items": "many"}}
    with pytest.raises(ConfigError, match=r"index\.flat_max_items"):
        contract.from_raw(raw, source="test")
    with pytest.raises(ConfigError, match=r"reads section\(s\) \['seed'\], which are missing"):
        contract.from_raw({"index": raw["index"]}, source="test")


def test_an_unknown_section_in_a_contract_is_refused():
    with pytest.raises(ValueError, match="unknown params section"):
        StepContract("x", ("nope",))
