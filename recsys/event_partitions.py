"""The raw events split by entity into spill files, so a step holds one partition at a time, not all events.

``events.parquet`` is read a batch at a time (only the needed columns) in two passes:

1. count the events per user and per item (memory grows with users and items, not events);
2. route every row to the partition that owns its key and append it to that partition's spill file.

Partitions are contiguous key *ranges* sized to about ``target_rows`` rows each, so every entity's events
land in one partition, in file order (a per-entity result computed on a partition equals the one computed
on all events), and partitions taken in key order concatenate to the key-sorted whole (outputs keep the
order they have when computed at once). The raw contract is checked on the way (recsys.contracts
``EventBatches``), naming file, rows and column.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from recsys.contracts import TIMESTAMP, EventBatches, open_events

KEYS = ("user_id", "item_id")
# spill files per key, all open at once (two keys: 512 files, under the usual 1024 limit); past
# MAX_PARTITIONS * target_rows events the partitions grow beyond target_rows
MAX_PARTITIONS = 256
SPILL_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field(TIMESTAMP, pa.int64()),  # nanoseconds since the epoch, UTC
        pa.field("label", pa.int8()),
    ]
)


class Events(NamedTuple):
    """Event columns as numpy arrays: ids, time in ns since the epoch (UTC), label 0/1 (int64)."""

    user_id: np.ndarray
    item_id: np.ndarray
    event_timestamp: np.ndarray
    label: np.ndarray

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Events:
        """From a raw events frame (the contract's dtypes)."""
        return cls(
            df["user_id"].to_numpy().astype(np.int64, copy=False),
            df["item_id"].to_numpy().astype(np.int64, copy=False),
            df[TIMESTAMP].to_numpy(dtype="datetime64[ns]").view(np.int64),
            df["label"].to_numpy().astype(np.int64),
        )

    @classmethod
    def from_arrow(cls, table: pa.Table | pa.RecordBatch) -> Events:
        """From Arrow columns without nulls (a spill file or a checked raw batch)."""
        ts = table.column(TIMESTAMP)
        if pa.types.is_timestamp(ts.type):
            ts = ts.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64())
        return cls(
            _numpy(table.column("user_id")).astype(np.int64, copy=False),
            _numpy(table.column("item_id")).astype(np.int64, copy=False),
            _numpy(ts).astype(np.int64, copy=False),
            _numpy(table.column("label")).astype(np.int64),
        )

    def take(self, rows: np.ndarray | slice) -> Events:
        return Events(*(column[rows] for column in self))

    def by_user(self) -> Events:
        """Sorted by (user_id, event_timestamp), stable: ties keep their file order."""
        return self.take(np.lexsort((self.event_timestamp, self.user_id)))


def _numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class KeyCounts:
    """Sorted distinct keys of one column and their number of events."""

    keys: np.ndarray
    counts: np.ndarray

    def merge(self, keys: np.ndarray) -> KeyCounts:
        """These counts plus the events of ``keys`` (one batch's column)."""
        if not len(keys):
            return self
        batch_keys, batch_counts = np.unique(keys, return_counts=True)
        both = np.concatenate([self.keys, batch_keys])
        order = np.argsort(both, kind="stable")  # two sorted runs: a merge
        both, counts = both[order], np.concatenate([self.counts, batch_counts])[order]
        starts = np.flatnonzero(np.r_[True, both[1:] != both[:-1]])
        return KeyCounts(both[starts], np.add.reduceat(counts, starts))


def key_ranges(counts: KeyCounts, target_rows: int, extra_per_key: int = 0) -> np.ndarray:
    """The first key of each partition: contiguous keys holding about ``target_rows`` rows each.

    A key weighs its events plus ``extra_per_key`` (rows an output adds per key). A key heavier than
    ``target_rows`` gets a partition of its own; never more than :data:`MAX_PARTITIONS` partitions.
    """
    weight = counts.counts.astype(np.int64) + extra_per_key
    target = max(target_rows, -(-int(weight.sum()) // MAX_PARTITIONS), 1)
    bucket = (np.cumsum(weight) - weight) // target
    return counts.keys[np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])] if len(weight) else weight


class EventsFile:
    """``events.parquet`` checked against the raw contract and read a batch at a time.

    The footer is checked on opening (columns, dtypes, not empty); every batch a pass reads is checked
    as it goes by (:class:`recsys.contracts.EventBatches`: nulls, labels, its rows named in the error),
    so the checks ride on the passes the step makes anyway.
    """

    def __init__(self, path: str | Path, batch_rows: int) -> None:
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.file = open_events(self.path)

    @property
    def num_rows(self) -> int:
        return self.file.metadata.num_rows

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns``; a null in them or a label outside {0, 1} raises naming the file,
        the batch's rows and the column."""
        checker = EventBatches(self.path, columns)
        yield from checker.read(self.file, self.batch_rows)
        checker.finish()

    def count_keys(self) -> dict[str, KeyCounts]:
        """Events per user and per item (first pass: only the two id columns are read)."""
        empty = np.zeros(0, dtype=np.int64)
        counts = {key: KeyCounts(empty, empty) for key in KEYS}
        for batch in self.batches(list(KEYS)):
            for key in KEYS:
                counts[key] = counts[key].merge(_numpy(batch.column(key)).astype(np.int64, copy=False))
        return counts


@dataclass(frozen=True)
class Partitions:
    """Spill files of one key's partitions, in key order."""

    key: str
    paths: list[Path]

    def __iter__(self) -> Iterator[Events]:
        for path in self.paths:
            with pa.OSFile(str(path)) as source:
                table = ipc.open_stream(source).read_all()
            yield Events.from_arrow(table)

    def __len__(self) -> int:
        return len(self.paths)


def partition_events(
    events: EventsFile, edges: dict[str, np.ndarray], spill_dir: str | Path
) -> dict[str, Partitions]:
    """Second pass: every row appended to its user partition and to its item partition (Arrow IPC)."""
    spill_dir = Path(spill_dir)
    paths = {key: [spill_dir / f"{key}-{i:05d}.arrow" for i in range(len(edges[key]))] for key in edges}
    with ExitStack() as stack:
        writers = {
            key: [stack.enter_context(ipc.new_stream(str(path), SPILL_SCHEMA)) for path in paths[key]]
            for key in edges
        }
        for batch in events.batches(list(SPILL_SCHEMA.names)):
            rows = Events.from_arrow(batch)
            for key, edge in edges.items():
                part = np.searchsorted(edge, getattr(rows, key), side="right") - 1
                order = np.argsort(part, kind="stable")  # file order kept within a partition
                routed = rows.take(order)
                bounds = np.searchsorted(part[order], np.arange(len(edge) + 1))
                for index in np.flatnonzero(np.diff(bounds)):
                    piece = routed.take(slice(bounds[index], bounds[index + 1]))
                    writers[key][index].write_batch(_spill_batch(piece))
    return {key: Partitions(key, paths[key]) for key in edges}


def _spill_batch(events: Events) -> pa.RecordBatch:
    return pa.record_batch(
        [
            pa.array(events.user_id),
            pa.array(events.item_id),
            pa.array(events.event_timestamp),
            pa.array(events.label.astype(np.int8)),
        ],
        schema=SPILL_SCHEMA,
    )
