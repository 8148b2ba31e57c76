"""Sizes of the embedded synthetic dataset: named presets, from unit tests to benchmarks."""

from __future__ import annotations

from pydantic import Field

from recsys.config.section import Section


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
        "small": (2_000, 1_500, 150_000, 40, 40, 60, 300),  # the quality-bar tests: the default's shape, ~1/3
        "default": (5_000, 3_000, 400_000, 60, 60, 90, 400),  # `dvc repro` in minutes on 2 CPU cores
        "large": (1_000_000, 100_000, 10_000_000, 64, 500, 90, 200),  # benchmarks: >= 10M events
    }.items()
}
