"""params.yaml is validated at load: bad values fail with the dotted key path in the message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.config import ConfigError, load_params, params_from_yaml_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shipped_with(fragment: str) -> str:
    """params.yaml with the sections of a YAML ``fragment`` merged in (every other key as shipped)."""

    def merge(into: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value
        return into

    shipped = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    return yaml.safe_dump(merge(shipped, yaml.safe_load(fragment)))


def test_project_params_load_with_expected_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.data.synthetic.preset == "default"
    assert params.data.synthetic.start_date.tzinfo is not None
    assert params.features.history_length > 0


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("data:\n  synthetic:\n    n_users: many\n", "data.synthetic.n_users", "integer"),
        ("data:\n  synthetic:\n    n_users: -5\n", "data.synthetic.n_users", "greater than 0"),
        ("data:\n  source: parquet\n", "data.source", "synthetic"),
        ("data:\n  synthetic:\n    n_usres: 10\n", "data.synthetic.n_usres", "unknown key"),
        ("features:\n  stats_windows_days: [7, 7]\n", "features", "unique"),
        ("features:\n  history_length: 0\n", "features.history_length", "greater than 0"),
        ("sead: 1\n", "sead", "unknown key"),
    ],
)
def test_bad_values_name_the_dotted_key(text, key, hint):
    with pytest.raises(ConfigError) as err:
        params_from_yaml_text(_shipped_with(text), source="p.yaml")
    message = str(err.value)
    assert "p.yaml" in message
    assert key in message
    assert hint in message


def test_malformed_yaml_and_non_mapping_are_rejected(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_preset_sizes_and_explicit_overrides():
    params = load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "large"})
    large = params.data.synthetic.sizes()
    assert large.n_events >= 10_000_000 and large.n_users >= 1_000_000 and large.n_items >= 100_000
    params = load_params(
        REPO_ROOT / "params.yaml",
        overrides={"data.synthetic.preset": "tiny", "data.synthetic.n_users": 77},
    )
    sizes = params.data.synthetic.sizes()
    assert sizes.n_users == 77
    assert sizes.n_items == 300  # the rest comes from the preset
