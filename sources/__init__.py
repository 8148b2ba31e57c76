"""Data sources: each reads one kind of raw data into the contract's ``users``, ``items`` and ``events``.

A source is one module here declaring its ``NAME`` (the ``data.source`` value that selects it) and
``read(data, seed)``, listed once in :data:`SOURCES`; its settings are its own section under ``data`` in
params.yaml (recsys/config/schema.py). The ingest step (components/ingest.py) only calls
:func:`load_source`, so adding a source touches no step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import pandas as pd

from recsys.config import DataConfig
from recsys.contracts import DataContractError
from sources import ciao, events, movielens, movietweetings, synthetic

Reader = Callable[[DataConfig, int], dict[str, pd.DataFrame]]

# source name -> reader; read-only, so a test or a caller cannot register a source behind the config's back
SOURCES: Mapping[str, Reader] = MappingProxyType(
    {module.NAME: module.read for module in (synthetic, movielens, movietweetings, ciao, events)}
)


def load_source(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The raw tables of ``data.source`` in memory; an unknown name fails naming the known ones."""
    reader = SOURCES.get(data.source)
    if reader is None:
        raise DataContractError(
            f"data.source: unknown source {data.source!r}; known sources: {', '.join(SOURCES)}"
        )
    return reader(data, seed)


__all__ = ["SOURCES", "Reader", "load_source"]
