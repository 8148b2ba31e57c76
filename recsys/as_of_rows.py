"""The feature rows a time chunk of a point-in-time join can use, swept forward over a time-ordered table.

Per entity in a chunk, a store's as-of join can only pick the entity's last row before the chunk starts
(unless it is older than the view's TTL allows for any event of the chunk) or one of its rows inside the
chunk's time range; ``AsOfRows`` hands out exactly those. Memory follows the entities and the window, not
the table: the table is read in time order a record batch at a time (an in-memory table is sorted once; a
file is sorted on disk by DuckDB under its memory limit, :func:`time_sorted_copy`), the rows already swept
past are folded into one row per entity (its newest), and only the rows from the current chunk on stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.contracts import TIMESTAMP

# rows read at a time from the time-ordered table, and swept rows kept before they are folded
BATCH_ROWS = 1 << 18


@dataclass(frozen=True)
class TimeSorted:
    """A feature table's copy on disk in time order, with its distinct entity keys (one per entity)."""

    path: Path
    ids: np.ndarray


def duckdb_connection(memory_limit: str | None, spill_dir: Path | None) -> Any:
    """A DuckDB connection of its own (not the offline store's) for the step's on-disk sorts, bounded by
    ``memory_limit`` and spilling to ``spill_dir`` beyond it."""
    import duckdb

    con = duckdb.connect()
    for statement in duckdb_settings_sql(memory_limit, spill_dir):
        con.execute(statement)
    con.execute("SET preserve_insertion_order = true")  # COPY writes the ORDER BY's order
    return con


def duckdb_settings_sql(
    memory_limit: str | None, spill_dir: Path | None, threads: int | None = None
) -> list[str]:
    """The SET statements bounding a DuckDB connection's memory and naming the folder it spills to
    (created here), for the step's own connection and for the offline store's alike."""
    statements = []
    if memory_limit is not None:
        statements.append(f"SET memory_limit = '{memory_limit}'")
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
        statements.append(f"SET temp_directory = '{Path(spill_dir).resolve()}'")
    if threads is not None:
        statements.append(f"SET threads = {int(threads)}")
    return statements


def time_sorted_copy(con: Any, source: Path, target: Path, key: str) -> TimeSorted:
    """``source`` written to ``target`` in time order (DuckDB's external sort: it spills, it does not grow
    the process), in row groups of ``BATCH_ROWS``; the distinct keys come from the same connection."""
    con.execute(
        f"COPY (SELECT * FROM read_parquet(?) ORDER BY {TIMESTAMP}) TO '{target}' "
        f"(FORMAT parquet, ROW_GROUP_SIZE {BATCH_ROWS})",
        [str(source)],
    )
    ids = con.execute(f"SELECT DISTINCT {key} FROM read_parquet(?) ORDER BY 1", [str(target)]).fetchnumpy()
    return TimeSorted(target, np.asarray(ids[key], dtype=np.int64))


def ns(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Timestamps as int64 nanoseconds since the epoch (UTC)."""
    return column.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy()


class AsOfRows:
    """A feature table swept forward in time order, chunk by chunk (chunks must come in time order).

    State: ``latest`` (one row per entity: its newest row before the window) and the window (the rows from
    the last chunk's start on, read ahead as far as a chunk needs); ``swept_latest`` per entity is its
    newest window row before the current chunk. Swept window rows are folded into ``latest`` once there are
    ``BATCH_ROWS`` of them: the window stays within about two batches whatever the entity count, and a
    fold (a pass over ``latest``) comes once per ``BATCH_ROWS`` feature rows.
    """

    def __init__(self, source: pa.Table | TimeSorted, key: str, ttl_ns: int | None):
        self.key = key
        self.ttl_ns = ttl_ns
        if isinstance(source, pa.Table):
            order = np.argsort(ns(source.column(TIMESTAMP)), kind="stable")
            self.ids = np.unique(source.column(key).to_numpy())
            schema = source.schema
            self._batches: Iterator[pa.RecordBatch] = iter(
                source.take(pa.array(order)).to_batches(max_chunksize=BATCH_ROWS)
            )
        else:
            self.ids = source.ids
            parquet = pq.ParquetFile(source.path)
            schema = parquet.schema_arrow
            self._batches = parquet.iter_batches(batch_size=BATCH_ROWS)
        n = len(self.ids)
        self._latest = schema.empty_table()
        self._latest_ts = np.zeros(0, dtype=np.int64)
        self._latest_row = np.full(n, -1, dtype=np.int64)  # per entity slot: its row in _latest
        self._window = schema.empty_table()
        self._ts = np.zeros(0, dtype=np.int64)
        self._slot = np.zeros(0, dtype=np.int64)
        self._swept = 0  # window rows before the current chunk's start
        self._swept_latest = np.full(n, -1, dtype=np.int64)  # per slot: its newest row in window[:swept]
        self._t_swept: int | None = None
        self._exhausted = False

    def inside_counts(self, t_lo: int, t_hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Entity slots with rows in [t_lo, t_hi] and their row counts (t_lo: not before the last chunk)."""
        self._check_order(t_lo)
        self._cover(t_hi)
        lo = int(np.searchsorted(self._ts, t_lo, side="left"))
        hi = int(np.searchsorted(self._ts, t_hi, side="right"))
        return np.unique(self._slot[lo:hi], return_counts=True)

    def rows_for(self, keys: np.ndarray, t_first: int, t_last: int) -> pa.Table:
        """The rows a chunk of entity rows (``keys``, event times in [t_first, t_last]) can use."""
        self._check_order(t_first)
        self._cover(t_last)
        end_before = int(np.searchsorted(self._ts, t_first, side="left"))
        span = np.arange(self._swept, end_before, dtype=np.int64)
        np.maximum.at(self._swept_latest, self._slot[span], span)
        self._swept, self._t_swept = end_before, t_first
        slots = self._slots(keys)
        in_window = self._swept_latest[slots]
        from_window = in_window[in_window >= 0]
        from_latest = self._latest_row[slots[in_window < 0]]
        from_latest = from_latest[from_latest >= 0]
        if self.ttl_ns is not None:
            from_window = from_window[self._ts[from_window] >= t_first - self.ttl_ns]
            from_latest = from_latest[self._latest_ts[from_latest] >= t_first - self.ttl_ns]
        end_inside = int(np.searchsorted(self._ts, t_last, side="right"))
        inside = np.arange(end_before, end_inside, dtype=np.int64)
        inside = inside[np.isin(self._slot[inside], slots)]
        rows = pa.concat_tables(
            [
                self._latest.take(pa.array(np.sort(from_latest))),
                self._window.take(pa.array(np.concatenate([np.sort(from_window), inside]))),
            ]
        )
        if self._swept >= BATCH_ROWS:
            self._fold()
        return rows

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        """The slots of the distinct ``keys`` that have feature rows (a search, not a pass over all ids)."""
        unique = np.unique(keys)
        if not len(self.ids):
            return np.zeros(0, dtype=np.int64)
        at = np.searchsorted(self.ids, unique).clip(max=len(self.ids) - 1)
        return at[self.ids[at] == unique]

    def _check_order(self, t: int) -> None:
        if self._t_swept is not None and t < self._t_swept:
            raise RuntimeError("chunks must come in time order")

    def _cover(self, t: int) -> None:
        """Read batches until the window holds every row with timestamp <= ``t``."""
        while not self._exhausted and (not len(self._ts) or self._ts[-1] <= t):
            batch = next(self._batches, None)
            if batch is None:
                self._exhausted = True
                break
            if not batch.num_rows:
                continue
            ts = ns(batch.column(TIMESTAMP))
            if (len(self._ts) and ts[0] < self._ts[-1]) or bool((np.diff(ts) < 0).any()):
                raise RuntimeError(f"feature rows of '{self.key}' are not in time order")
            keys = batch.column(self.key).to_numpy()
            slot = np.searchsorted(self.ids, keys).clip(max=max(len(self.ids) - 1, 0))
            if len(keys) and (not len(self.ids) or (self.ids[slot] != keys).any()):
                raise RuntimeError(f"a '{self.key}' of the feature rows is not among the table's keys")
            # one chunk: a take over many chunks would concatenate them at every chunk of the join
            self._window = pa.concat_tables([self._window, pa.Table.from_batches([batch])]).combine_chunks()
            self._ts = np.concatenate([self._ts, ts])
            self._slot = np.concatenate([self._slot, slot])

    def _fold(self) -> None:
        """Swept window rows -> ``latest`` (each entity's newest), and the window starts at the chunk."""
        updated = self._swept_latest >= 0
        kept = np.flatnonzero(~updated & (self._latest_row >= 0))
        moved = np.flatnonzero(updated)
        self._latest = pa.concat_tables(
            [
                self._latest.take(pa.array(self._latest_row[kept])),
                self._window.take(pa.array(self._swept_latest[moved])),
            ]
        ).combine_chunks()
        self._latest_ts = np.concatenate(
            [self._latest_ts[self._latest_row[kept]], self._ts[self._swept_latest[moved]]]
        )
        self._latest_row[:] = -1
        self._latest_row[kept] = np.arange(len(kept), dtype=np.int64)
        self._latest_row[moved] = len(kept) + np.arange(len(moved), dtype=np.int64)
        self._window = self._window.slice(self._swept)
        self._ts = self._ts[self._swept :].copy()
        self._slot = self._slot[self._swept :].copy()
        self._swept_latest[:] = -1
        self._swept = 0


def chunk_bounds(
    times: np.ndarray, keys: np.ndarray, rows: AsOfRows, chunk_rows: int
) -> Iterator[tuple[int, int]]:
    """Row ranges of the time-ordered entity rows (``times``, ``keys``) whose join stays within
    ``chunk_rows`` candidate pairs, one at a time (the sweep of ``rows`` may advance between them).

    A store's as-of join pairs each entity row with every usable row of its entity before it filters by
    time: the last row before the chunk plus the entity's rows inside the chunk's time range. So a chunk
    costs sum over its entity rows of (1 + rows of that entity inside the range). For a view with one
    row per entity (profiles) that is the entity row count; for the history (a row per event) it grows
    with the square of a user's events in the range, and chunks get short. Each chunk is the longest
    whose cost is at most ``chunk_rows`` (at least one row), to within a quarter of its length: the
    search starts from the previous chunk's length (exact bounds buy nothing but time).
    """
    slot = np.searchsorted(rows.ids, keys)
    slot[slot >= len(rows.ids)] = 0
    known = rows.ids[slot] == keys if len(rows.ids) else np.zeros(len(keys), dtype=bool)

    def cost(start: int, end: int) -> int:
        entities, counts = rows.inside_counts(int(times[start]), int(times[end - 1]))
        mine = slot[start:end][known[start:end]]
        at = np.searchsorted(entities, mine).clip(max=max(len(entities) - 1, 0))
        inside = counts[at][entities[at] == mine] if len(entities) else np.zeros(0, np.int64)
        return (end - start) + int(inside.sum())

    start, length = 0, chunk_rows
    while start < len(times):
        cap = min(chunk_rows, len(times) - start)  # a chunk costs at least its rows
        length = min(length, cap)  # start from the previous chunk's length: neighbours are alike
        if cost(start, start + length) <= chunk_rows:
            while length < cap:  # grow by a quarter while it fits
                longer = min(cap, max(length + 1, length * 5 // 4))
                if cost(start, start + longer) > chunk_rows:
                    break
                length = longer
        else:
            while length > 1:  # shrink by a fifth until it fits (one row always goes)
                length = max(1, length * 4 // 5)
                if cost(start, start + length) <= chunk_rows:
                    break
        yield start, start + length
        start += length
