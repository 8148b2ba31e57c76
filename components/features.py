"""Features step: timestamped feature tables for Feast file sources, computed from the raw tables.

Point-in-time correctness starts here. Every row carries the time from which its values are valid, and
its values use only events *strictly before* that time:

- ``user_history`` has a row at each of the user's event times holding the last N clicks before it (plus
  one trailing row after the last event, which the online store serves), so Feast's as-of join for an
  event at time t picks exactly the history "as of just before t";
- ``user_stats`` / ``item_stats`` are daily snapshots stamped at 00:00 UTC of day D, aggregating the
  window [D - w days, D): an event on day D joins the snapshot of D, which never includes day D itself.

All of it is vectorised numpy/pyarrow over sorted arrays (exclusive cumulative sums and searchsorted on
composite keys); no per-user Python loop, so the ``large`` preset stays fast. Memory follows
``features.batch_rows``, not the events: the events are split into user and item key ranges of about that
many rows (spill files) and computed one range at a time; the history is written that many rows a time.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifact_io import staged_parquet_writers
from recsys.config import FeaturesConfig
from recsys.contracts import (
    ITEM_PROFILE_FEATURES,
    TIMESTAMP,
    USER_PROFILE_FEATURES,
    DataContractError,
    check_raw_table,
    read_parquet,
    stats_features,
)
from recsys.event_partitions import Events, EventsFile, key_ranges, partition_events
from recsys.step_contract import STEPS

CONTRACT = STEPS["features"]

log = logging.getLogger(__name__)
DAY_NS = 86_400 * 1_000_000_000
TRAILING_NS = 1_000_000_000  # the trailing history row sits one second after the user's last event


def run(features: FeaturesConfig, raw_dir: str | Path, features_dir: str | Path) -> dict[str, Path]:
    """Read the raw tables from ``raw_dir`` and write every feature table to ``features_dir``.

    The events are never whole in memory: they are split by user range and by item range into spill
    files of about ``features.batch_rows`` rows (:mod:`recsys.event_partitions`, under the system temp
    folder: ``TMPDIR``), and the per-user and per-item tables are computed one partition at a time.
    Partitions are contiguous key ranges, so each table holds the same rows, in the same order, as when
    computed over all events at once (:func:`build_feature_tables`).
    """
    if features.engine == "spark":  # the same tables on Spark (README "Spark")
        from recsys.spark_features import run_configured

        return {name: Path(path) for name, path in run_configured(features, raw_dir, features_dir).items()}
    started = time.perf_counter()
    raw_dir, batch_rows = Path(raw_dir), features.batch_rows
    users, items = (_read_entity_table(raw_dir, name) for name in ("users", "items"))
    events = EventsFile(raw_dir / "events.parquet", batch_rows)
    profiles = _profiles(users, items)
    categories = ItemCategories.of(items)
    del users, items
    counts = events.count_keys()
    # a user's history has a row per event plus a trailing row: partitions hold ~batch_rows history rows
    edges = {
        "user_id": key_ranges(counts["user_id"], batch_rows, extra_per_key=1),
        "item_id": key_ranges(counts["item_id"], batch_rows),
    }
    del counts
    windows = sorted(features.stats_windows_days)
    schemas = {name: table.schema for name, table in profiles.items()} | {
        "user_history": HISTORY_SCHEMA,
        "user_stats": stats_schema("user_id", "user", windows),
        "item_stats": stats_schema("item_id", "item", windows),
    }
    rows = dict.fromkeys(schemas, 0)
    with (
        tempfile.TemporaryDirectory(prefix="features-spill-") as spill,
        staged_parquet_writers(features_dir, dict(sorted(schemas.items()))) as writers,
    ):
        partitions = partition_events(events, edges, spill)
        for name, table in profiles.items():
            writers[name].write_table(table)
            rows[name] = table.num_rows
        del profiles
        out = {
            name: RowGroups(writers[name], batch_rows)
            for name in ("user_history", "user_stats", "item_stats")
        }
        for part in partitions["user_id"]:  # users are disjoint across partitions: values unchanged
            part = part.by_user()
            out["user_stats"].write(activity_snapshots(part, "user_id", "user", windows))
            history = user_history_batches(
                part, categories, features.history_length, batch_rows, first_rows=out["user_history"].room
            )
            for batch in history:  # each batch fills the pending row group exactly, or ends the partition
                out["user_history"].write(batch)
        for part in partitions["item_id"]:
            out["item_stats"].write(activity_snapshots(part, "item_id", "item", windows))
        for name, writer in out.items():
            rows[name] = writer.close()
    log.info(
        "features: %s in %.1fs (%d user and %d item partitions)",
        ", ".join(f"{name}={count:,}" for name, count in sorted(rows.items())),
        time.perf_counter() - started,
        len(partitions["user_id"]),
        len(partitions["item_id"]),
    )
    return {name: Path(features_dir) / f"{name}.parquet" for name in sorted(rows)}


def build_feature_tables(raw: dict[str, pd.DataFrame], features: FeaturesConfig) -> dict[str, pa.Table]:
    """All feature tables as Arrow tables computed over all events at once (the reference for :func:`run`)."""
    events = Events.from_frame(raw["events"]).by_user()
    windows = sorted(features.stats_windows_days)
    categories = ItemCategories.of(raw["items"])
    tables = _profiles(raw["users"], raw["items"]) | {
        "user_history": user_history(events, categories, features.history_length),
        "user_stats": activity_snapshots(events, "user_id", "user", windows),
        "item_stats": activity_snapshots(events, "item_id", "item", windows),
    }
    order = ("user_profile", "item_profile", "user_history", "user_stats", "item_stats")
    return {name: tables[name] for name in order}


def _read_entity_table(raw_dir: Path, name: str) -> pd.DataFrame:
    """A raw table with a row per entity (users, items), read whole and checked."""
    path = raw_dir / f"{name}.parquet"
    if not path.exists():
        raise DataContractError(f"{path}: raw table '{name}' not found (run the ingest step first)")
    df = read_parquet(path)
    check_raw_table(name, df, path)
    return df


def _profiles(users: pd.DataFrame, items: pd.DataFrame) -> dict[str, pa.Table]:
    return {
        "user_profile": _profile(users, "user_id", USER_PROFILE_FEATURES, "signup_timestamp"),
        "item_profile": _profile(items, "item_id", ITEM_PROFILE_FEATURES, "created_timestamp"),
    }


class RowGroups:
    """Writes tables to a parquet writer in row groups of exactly ``rows`` rows (the last one fewer),
    whatever the sizes of the tables handed to it."""

    def __init__(self, writer: pq.ParquetWriter, rows: int) -> None:
        self.writer, self.rows = writer, rows
        self.pending: list[pa.Table] = []
        self.pending_rows = self.written = 0

    @property
    def room(self) -> int:
        """Rows that complete the pending row group."""
        return self.rows - self.pending_rows

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            take = min(self.room, table.num_rows)
            self.pending.append(table.slice(0, take))
            self.pending_rows += take
            table = table.slice(take)
            if not self.room:
                self._flush()

    def close(self) -> int:
        """Writes the last, partial row group; the number of rows written."""
        self._flush()
        return self.written

    def _flush(self) -> None:
        if self.pending_rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.rows)
            self.written += self.pending_rows
        self.pending, self.pending_rows = [], 0


HISTORY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC")),
        pa.field("hist_item_ids", pa.list_(pa.int64())),
        pa.field("hist_categories", pa.list_(pa.string())),
        pa.field("hist_length", pa.int64()),
    ]
)


@dataclass(frozen=True)
class ItemCategories:
    """Each item's category, looked up by id (an id missing from the items table: a null category)."""

    ids: np.ndarray
    by_id: np.ndarray  # positions that sort ``ids``
    categories: pa.Array

    @classmethod
    def of(cls, items: pd.DataFrame) -> ItemCategories:
        ids = items["item_id"].to_numpy()
        return cls(
            ids, np.argsort(ids, kind="stable"), pa.array(items["category"].to_numpy(), type=pa.string())
        )

    def positions(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's row in the items table, and whether the id is there at all."""
        if not len(self.ids):
            return np.zeros(len(item_ids), dtype=np.int64), np.zeros(len(item_ids), dtype=bool)
        at = np.searchsorted(self.ids, item_ids, sorter=self.by_id).clip(max=len(self.ids) - 1)
        row = self.by_id[at]
        return row, self.ids[row] == item_ids


def user_history(events: Events, categories: ItemCategories, length: int) -> pa.Table:
    """Last ``length`` clicked item ids and categories strictly before each of the user's event times.

    ``events`` must be sorted by (user_id, event_timestamp); event times are unique per user (contract),
    so the clicks strictly before an event are the clicks earlier in that order.
    """
    batches = list(user_history_batches(events, categories, length, batch_rows=None))
    return pa.concat_tables(batches) if batches else HISTORY_SCHEMA.empty_table()


def user_history_batches(
    events: Events,
    categories: ItemCategories,
    length: int,
    batch_rows: int | None,
    first_rows: int | None = None,
) -> Iterator[pa.Table]:
    """:func:`user_history` in (user, time) order, ``batch_rows`` rows at a time (None: one batch), the
    first batch ``first_rows`` rows (default ``batch_rows``: the room left in a pending row group).

    Only per-row positions (a few integers per event) are held for all of ``events``; the lists, the
    large part, are built a batch at a time from them.
    """
    user, ts, label = events.user_id, events.event_timestamp, events.label
    is_click = label == 1

    # clicks before each event within its user block: exclusive cumulative count reset at user starts
    block_start = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, np.int64)
    block_len = np.diff(np.r_[block_start, len(user)])
    cum = np.cumsum(label) - label
    clicks_before = cum - np.repeat(cum[block_start], block_len)

    # one trailing row per user after the last event: the history that serving reads online
    last = block_start + block_len - 1
    row_user = np.concatenate([user, user[last]])
    row_ts = np.concatenate([ts, ts[last] + TRAILING_NS])
    row_clicks = np.concatenate([clicks_before, clicks_before[last] + label[last]])
    row_block = np.concatenate([np.repeat(np.arange(len(block_start)), block_len), np.arange(len(last))])

    click_item = events.item_id[is_click]
    first_click = np.searchsorted(np.flatnonzero(is_click), block_start)  # index of block's first click
    hist_len = np.minimum(row_clicks, length)
    hist_start = first_click[row_block] + row_clicks - hist_len

    # each click's category as an index into the item table's categories (null: an unknown item)
    click_category, known = categories.positions(click_item)
    order = np.lexsort((row_ts, row_user))
    step = batch_rows or max(len(order), 1)
    first = 0
    while first < len(order):
        size = first_rows if first == 0 and first_rows else step
        rows = order[first : first + size]
        first += size
        lengths = hist_len[rows]
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
        flat = np.repeat(hist_start[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        category = pa.array(click_category[flat], mask=~known[flat])
        yield pa.table(
            {
                "user_id": pa.array(row_user[rows], type=pa.int64()),
                TIMESTAMP: _timestamps(row_ts[rows]),
                "hist_item_ids": pa.ListArray.from_arrays(offsets, pa.array(click_item[flat], pa.int64())),
                "hist_categories": pa.ListArray.from_arrays(offsets, categories.categories.take(category)),
                "hist_length": pa.array(lengths, type=pa.int64()),
            },
            schema=HISTORY_SCHEMA,
        )


def stats_schema(key: str, prefix: str, windows: list[int]) -> pa.Schema:
    """The schema of :func:`activity_snapshots`' table (known before any partition is computed)."""
    fields = [pa.field(key, pa.int64()), pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC"))]
    types = (pa.int64(), pa.int64(), pa.float64())  # impressions, clicks, ctr per window
    names = stats_features(prefix, windows)
    return pa.schema(fields + [pa.field(name, types[i % 3]) for i, name in enumerate(names)])


def activity_snapshots(events: Events, key: str, prefix: str, windows: list[int]) -> pa.Table:
    """Daily snapshots of impressions, clicks and CTR over each window, from events before the snapshot.

    A snapshot is written for every (key, day) with an event that day, plus the day after the key's last
    active day, so that every event finds the snapshot of its own day and serving finds the latest one.
    The values of a key depend only on that key's events, so any split of the keys gives the same rows.
    """
    ids = getattr(events, key)
    day = events.event_timestamp // DAY_NS
    label = events.label
    first_day = int(day.min()) - max(windows) - 1
    day_rel = day - first_day
    span = int(day_rel.max()) + 2
    daily = (
        pd.DataFrame({"k": ids, "d": day_rel, "imp": 1, "clk": label}).groupby(["k", "d"], sort=True).sum()
    )
    k = daily.index.get_level_values("k").to_numpy()
    d = daily.index.get_level_values("d").to_numpy()
    composite = _composite(k, d, ids, span)
    cum_imp = np.r_[0, np.cumsum(daily["imp"].to_numpy())]
    cum_clk = np.r_[0, np.cumsum(daily["clk"].to_numpy())]

    # snapshot days: each active day, plus the day after each key's last active day (deduplicated, sorted)
    is_last = np.r_[k[1:] != k[:-1], True]
    snap_composite = np.unique(np.concatenate([composite, composite[is_last] + 1]))
    snap_k = snap_composite // span + int(ids.min())
    snap_d = snap_composite % span
    columns: dict[str, pa.Array] = {
        key: pa.array(snap_k, type=pa.int64()),
        TIMESTAMP: _timestamps((snap_d + first_day) * DAY_NS),
    }
    names = iter(stats_features(prefix, windows))
    end = np.searchsorted(composite, snap_composite, side="left")  # days strictly before D
    for window in windows:
        begin = np.searchsorted(composite, snap_composite - window, side="left")
        impressions = cum_imp[end] - cum_imp[begin]
        clicks = cum_clk[end] - cum_clk[begin]
        ctr = np.divide(clicks, impressions, out=np.zeros(len(clicks)), where=impressions > 0)
        columns[next(names)] = pa.array(impressions, type=pa.int64())
        columns[next(names)] = pa.array(clicks, type=pa.int64())
        columns[next(names)] = pa.array(ctr, type=pa.float64())
    return pa.table(columns, schema=stats_schema(key, prefix, windows))


def _composite(k: np.ndarray, d: np.ndarray, all_ids: np.ndarray, span: int) -> np.ndarray:
    """A sortable (key, day) scalar; keys are offset so the window start never crosses into another key."""
    base = int(all_ids.min())
    return (k.astype(np.int64) - base) * span + d.astype(np.int64)


def _profile(df: pd.DataFrame, key: str, columns: list[str], valid_from: str) -> pa.Table:
    out = df[[key, *columns]].copy()
    out[TIMESTAMP] = df[valid_from]
    return pa.Table.from_pandas(out.sort_values(key, ignore_index=True), preserve_index=False)


def _timestamps(ns: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ns, dtype=np.int64), type=pa.int64()).view(pa.timestamp("ns", tz="UTC"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.features", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    run(params.features, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
