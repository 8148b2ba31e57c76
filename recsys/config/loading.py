"""Reading ``params.yaml`` into :class:`~recsys.config.schema.Params`, with errors that name the key path.

Every section forbids unknown keys, so a typo fails at load time instead of silently falling back to
a default. Errors are re-raised as :class:`ConfigError` with the dotted key path
(``data.synthetic.n_users: ...``) so the user can find the bad line without reading a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recsys.config.schema import Params

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the dotted key path."""


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values (for tests and CLIs)."""
    path = Path(path)
    if not path.is_file():
        # every value lives in the file (the schema has no defaults): no file, no configuration
        raise ConfigError(f"{path}: no such params file (cwd {Path.cwd()})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate an already-loaded mapping (the KFP pipeline passes params.yaml content as a string)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def params_from_yaml_text(text: str, source: str = "params") -> Params:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return parse_params(raw, source)


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; allowed keys are the section's fields)"
        got = err.get("input")
        # a check across sections (no key path) would show the whole configuration as its input
        quiet = err["type"] in ("extra_forbidden", "missing") or not err["loc"]
        shown = "" if quiet else f" (got {got!r})"
        lines.append(f"{key}: {message}{shown}")
    return f"{source}: invalid configuration:\n  " + "\n  ".join(lines)


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = value
