"""Data sources: each reads one kind of raw data into the contract's ``users``, ``items`` and ``events``.

A source is one module here declaring its ``NAME`` (the ``data.source`` value that selects it) and
``read(data, seed)``, listed once in :data:`SOURCES`; its settings are its own section under ``data`` in
params.yaml (recsys/config/schema.py). A source whose events outgrow memory also declares
``stream(data, seed)`` (a :class:`~sources.stream.RawStream`: users and items whole, events in batches);
the others are streamed as one batch. The ingest step (components/ingest.py) only calls
:func:`stream_source`, so adding a source touches no step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType, ModuleType
from typing import TypeVar

import pandas as pd

from recsys.config import DataConfig
from recsys.contracts import DataContractError
from sources import ciao, events, movielens, movietweetings, synthetic
from sources.stream import RawStream, whole

Reader = Callable[[DataConfig, int], dict[str, pd.DataFrame]]
Streamer = Callable[[DataConfig, int], RawStream]
_F = TypeVar("_F")

_MODULES: tuple[ModuleType, ...] = (synthetic, movielens, movietweetings, ciao, events)
# source name -> reader; read-only, so a test or a caller cannot register a source behind the config's back
SOURCES: Mapping[str, Reader] = MappingProxyType({module.NAME: module.read for module in _MODULES})


def _whole_stream(read: Reader) -> Streamer:
    return lambda data, seed: whole(read(data, seed))


# source name -> streamer: the module's own ``stream`` where it has one, else its reader as one batch
STREAMS: Mapping[str, Streamer] = MappingProxyType(
    {module.NAME: getattr(module, "stream", None) or _whole_stream(module.read) for module in _MODULES}
)


def load_source(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The raw tables of ``data.source`` in memory; an unknown name fails naming the known ones."""
    return _lookup(SOURCES, data)(data, seed)


def stream_source(data: DataConfig, seed: int) -> RawStream:
    """The raw tables of ``data.source`` with the events in batches (what ingest writes row group by row
    group); the batches concatenated are :func:`load_source`'s events."""
    return _lookup(STREAMS, data)(data, seed)


def _lookup(table: Mapping[str, _F], data: DataConfig) -> _F:
    found = table.get(data.source)
    if found is None:
        raise DataContractError(
            f"data.source: unknown source {data.source!r}; known sources: {', '.join(SOURCES)}"
        )
    return found


__all__ = ["SOURCES", "STREAMS", "RawStream", "Reader", "Streamer", "load_source", "stream_source"]
