"""The streaming form of a source: the per-entity tables whole, the events in batches.

Users and items have a row per entity (they may grow with the catalogue, not with the traffic); the
events grow with the traffic, so a source hands them over as an iterator of frames and the ingest step
checks and writes one batch at a time, its memory bounded by the largest batch instead of the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd


@dataclass
class RawStream:
    """``users`` and ``items`` whole, ``events`` as contract-shaped frames (each in the contract's columns;
    their concatenation is the events table). The iterator is consumed once."""

    users: pd.DataFrame
    items: pd.DataFrame
    events: Iterator[pd.DataFrame]


def whole(tables: dict[str, pd.DataFrame]) -> RawStream:
    """A source that reads everything at once, as a stream of one batch."""
    return RawStream(tables["users"], tables["items"], iter([tables["events"]]))
