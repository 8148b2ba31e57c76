"""The one configuration: ``params.yaml`` parsed into typed, validated pydantic objects.

Every section forbids unknown keys, so a typo fails at load time instead of silently falling back to
a default. Errors are re-raised as :class:`ConfigError` with the dotted key path
(``data.synthetic.n_users: ...``) so the user can find the bad line without reading a traceback.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and the dotted key path."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------------
# data


class SyntheticSizes(Section):
    """Sizes of a synthetic dataset; a preset names one of these."""

    n_users: int = Field(gt=0)
    n_items: int = Field(gt=0)
    n_events: int = Field(gt=0)
    n_categories: int = Field(gt=1)
    n_brands: int = Field(gt=0)
    days: int = Field(gt=1)
    max_events_per_user: int = Field(gt=1)


_SIZE_FIELDS = ("n_users", "n_items", "n_events", "n_categories", "n_brands", "days", "max_events_per_user")
SYNTHETIC_PRESETS: dict[str, SyntheticSizes] = {
    name: SyntheticSizes(**dict(zip(_SIZE_FIELDS, sizes, strict=True)))
    for name, sizes in {
        # users, items, events, categories, brands, days, max events per user
        "tiny": (400, 300, 30_000, 12, 20, 60, 300),  # a few seconds: unit tests, the KFP local run
        "default": (5_000, 3_000, 400_000, 24, 60, 90, 400),  # `dvc repro` in minutes on 2 CPU cores
        "large": (1_000_000, 100_000, 10_000_000, 64, 500, 90, 200),  # benchmarks: >= 10M events
    }.items()
}


class SyntheticSource(Section):
    """The embedded deterministic generator with planted structure (see components/synthetic.py)."""

    preset: Literal["tiny", "default", "large"] = "default"
    # explicit sizes override the preset's, field by field
    n_users: int | None = Field(default=None, gt=0)
    n_items: int | None = Field(default=None, gt=0)
    n_events: int | None = Field(default=None, gt=0)
    n_categories: int | None = Field(default=None, gt=1)
    n_brands: int | None = Field(default=None, gt=0)
    days: int | None = Field(default=None, gt=1)
    max_events_per_user: int | None = Field(default=None, gt=1)
    start_date: datetime = datetime(2026, 6, 1, tzinfo=UTC)
    # structure knobs: how strongly each planted signal drives clicks
    taste_concentration: float = Field(default=0.15, gt=0)
    popularity_exponent: float = Field(default=1.1, gt=0)
    sequential_prob: float = Field(default=0.45, ge=0, le=1)
    cold_start_fraction: float = Field(default=0.25, ge=0, lt=1)
    base_ctr_logit: float = Field(default=-2.6)

    def sizes(self) -> SyntheticSizes:
        """The preset's sizes with any explicit override applied."""
        base = SYNTHETIC_PRESETS[self.preset].model_dump()
        overrides = {k: v for k, v in self.model_dump().items() if k in base and v is not None}
        return SyntheticSizes(**(base | overrides))

    @model_validator(mode="after")
    def _start_is_aware(self) -> SyntheticSource:
        if self.start_date.tzinfo is None:
            self.start_date = self.start_date.replace(tzinfo=UTC)
        return self


class MovieLensSource(Section):
    """MovieLens ml-100k / ml-1m: a local directory or zip (``path``), else a checksummed download.

    ``url`` defaults to the GroupLens archive of the variant; ``sha256`` defaults to the published
    digest of that archive (components/movielens.py), so a download is never used unverified.
    """

    variant: Literal["ml-100k", "ml-1m"] = "ml-100k"
    path: Path | None = None
    url: str | None = Field(default=None, pattern=r"^(https?|file)://")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    cache_dir: Path = Path("data/downloads")
    download_timeout_s: float = Field(default=120.0, gt=0)
    positive_rating: int = Field(default=4, ge=1, le=5)


class DataConfig(Section):
    source: Literal["synthetic", "movielens"] = "synthetic"
    raw_dir: Path = Path("data/raw")
    synthetic: SyntheticSource = SyntheticSource()
    movielens: MovieLensSource = MovieLensSource()


# --------------------------------------------------------------------------------------------------
# features


class FeaturesConfig(Section):
    """Feature tables computed from the raw tables for Feast file sources."""

    features_dir: Path = Path("data/features")
    history_length: int = Field(default=30, gt=0, le=512)
    stats_windows_days: list[int] = Field(default=[7, 30], min_length=1)

    @model_validator(mode="after")
    def _windows_positive_and_unique(self) -> FeaturesConfig:
        if any(w <= 0 for w in self.stats_windows_days):
            raise ValueError("stats_windows_days: every window must be a positive number of days")
        if len(set(self.stats_windows_days)) != len(self.stats_windows_days):
            raise ValueError("stats_windows_days: windows must be unique")
        return self


# --------------------------------------------------------------------------------------------------
# the whole file


class Params(Section):
    seed: int = Field(default=42, ge=0)
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values (for tests and CLIs)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else None
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
        shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
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
