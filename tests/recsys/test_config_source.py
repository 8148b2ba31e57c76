"""params.yaml is the one source of every configuration value: the schema (recsys/config/schema.py,
models/config.py) declares types, constraints and checks but no defaults, and params.yaml holds exactly
the schema's keys. A default added in code, a key missing from params.yaml or left over in it fails here.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from recsys.config import ConfigError, Params, load_params, parse_params
from tests.conftest import REPO_ROOT

PARAMS_FILE = REPO_ROOT / "params.yaml"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds: itself, or in ``X | None``, ``list[X]``, ``dict[k, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _reachable(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: dict[type[BaseModel], None] = {}
    todo = [root]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen[model] = None
        for field in model.model_fields.values():
            todo += _models_in(field.annotation)
    return list(seen)


SECTIONS = _reachable(Params)


def test_the_walk_reaches_the_nested_and_listed_sections():
    names = {model.__name__ for model in SECTIONS}
    assert {"Params", "DataConfig", "SyntheticSource", "Resources", "ModelsConfig", "TrainingConfig"} <= names
    assert {"SparseFeature", "FeatureGroup", "MLPConfig", "TowerConfig", "DINTowerConfig"} <= names


@pytest.mark.parametrize("section", SECTIONS, ids=lambda model: model.__name__)
def test_no_field_has_a_default_in_code(section):
    with_default = {
        name: field.get_default(call_default_factory=False)
        for name, field in section.model_fields.items()
        if not field.is_required()
    }
    assert not with_default, (
        f"{section.__name__}: defaults in code {with_default}; params.yaml is the one source of values, "
        "write the value there"
    )


def _key_differences(model: type[BaseModel], node: Any, path: str) -> list[str]:
    """Where ``node`` (a params.yaml subtree) and ``model``'s fields disagree on keys, recursively."""
    if not isinstance(node, dict):
        return [f"{path or '<root>'}: expected a mapping of {model.__name__}'s keys, got {node!r}"]
    fields, keys = set(model.model_fields), set(node)
    problems = [f"{path}{k}: in the schema, not in params.yaml" for k in sorted(fields - keys)]
    problems += [f"{path}{k}: in params.yaml, not in the schema" for k in sorted(keys - fields)]
    for name in sorted(fields & keys):
        annotation, value = model.model_fields[name].annotation, node[name]
        origin = typing.get_origin(annotation)
        inner = _models_in(annotation)
        if value is None or not inner:
            continue  # a leaf, or an optional section written as null
        if origin is dict:  # free keys (gate.metrics, training.per_model): only the values are sections
            continue
        if origin is list:
            for i, item in enumerate(value):
                problems += _key_differences(inner[0], item, f"{path}{name}[{i}].")
        elif origin in (None, types.UnionType, typing.Union):
            problems += _key_differences(inner[0], value, f"{path}{name}.")
    return problems


def test_params_yaml_holds_every_key_of_the_schema_and_nothing_else():
    shipped = yaml.safe_load(PARAMS_FILE.read_text())
    assert _key_differences(Params, shipped, "") == []


def test_the_key_comparison_sees_a_missing_and_an_extra_key():
    shipped = yaml.safe_load(PARAMS_FILE.read_text())
    del shipped["serving"]["max_k"]
    shipped["models"]["dlrm"]["final"]["widht"] = 3
    assert _key_differences(Params, shipped, "") == [
        "models.dlrm.final.widht: in params.yaml, not in the schema",
        "serving.max_k: in the schema, not in params.yaml",
    ]


def test_a_missing_params_file_is_an_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ConfigError, match="no such params file") as err:
        load_params(missing)
    assert str(missing) in str(err.value)


def test_a_partial_params_file_names_the_missing_key_path(tmp_path):
    shipped = yaml.safe_load(PARAMS_FILE.read_text())
    del shipped["serving"]["max_k"]
    partial = tmp_path / "params.yaml"
    partial.write_text(yaml.safe_dump(shipped))
    with pytest.raises(ConfigError) as err:
        load_params(partial)
    message = str(err.value)
    assert str(partial) in message
    assert "serving.max_k: Field required" in message


def test_a_missing_section_is_named_too():
    shipped = yaml.safe_load(PARAMS_FILE.read_text())
    del shipped["training"]
    with pytest.raises(ConfigError, match=r"(?m)^  training: Field required$"):
        parse_params(shipped, source="p.yaml")


def test_importing_the_config_does_not_import_the_kubernetes_client():
    code = "import sys, recsys.config; print('kubernetes' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
