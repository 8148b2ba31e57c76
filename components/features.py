"""Features step: timestamped feature tables for Feast file sources, computed from the raw tables.

Point-in-time correctness starts here. Every row carries the time from which its values are valid, and
its values use only events *strictly before* that time:

- ``user_history`` has a row at each of the user's event times holding the last N clicks before it (plus
  one trailing row after the last event, which the online store serves), so Feast's as-of join for an
  event at time t picks exactly the history "as of just before t";
- ``user_stats`` / ``item_stats`` are daily snapshots stamped at 00:00 UTC of day D, aggregating the
  window [D - w days, D): an event on day D joins the snapshot of D, which never includes day D itself.

All of it is vectorised numpy/pyarrow over sorted arrays (exclusive cumulative sums and searchsorted on
composite keys); no per-user Python loop, so the ``large`` preset stays fast.
The history (a list per event) is built and written ``features.batch_rows`` rows at a time.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys.artifact_io import staged_parquet_writers
from recsys.config import FeaturesConfig
from recsys.contracts import (
    ITEM_PROFILE_FEATURES,
    TIMESTAMP,
    USER_PROFILE_FEATURES,
    read_raw_tables,
    stats_features,
)
from recsys.step_contract import STEPS

CONTRACT = STEPS["features"]

log = logging.getLogger(__name__)
DAY_NS = 86_400 * 1_000_000_000
TRAILING_NS = 1_000_000_000  # the trailing history row sits one second after the user's last event


def run(features: FeaturesConfig, raw_dir: str | Path, features_dir: str | Path) -> dict[str, Path]:
    """Read the raw tables from ``raw_dir`` and write every feature table to ``features_dir``."""
    if features.engine == "spark":  # the same tables on Spark (README "Spark")
        from recsys.spark_features import run_configured

        return {name: Path(path) for name, path in run_configured(features, raw_dir, features_dir).items()}
    started = time.perf_counter()
    raw = read_raw_tables(raw_dir)
    small = _small_tables(raw, features)  # everything but the history: a row per entity or active day
    events = raw.pop("events")
    rows = {name: table.num_rows for name, table in small.items()} | {"user_history": 0}
    schemas = {name: table.schema for name, table in small.items()} | {"user_history": HISTORY_SCHEMA}
    with staged_parquet_writers(features_dir, dict(sorted(schemas.items()))) as writers:
        for name, table in small.items():
            writers[name].write_table(table)
        del small
        # the history holds a list per event: built and written batch_rows rows at a time
        for batch in user_history_batches(events, raw["items"], features.history_length, features.batch_rows):
            writers["user_history"].write_table(batch)
            rows["user_history"] += batch.num_rows
    log.info(
        "features: %s in %.1fs",
        ", ".join(f"{name}={count:,}" for name, count in sorted(rows.items())),
        time.perf_counter() - started,
    )
    return {name: Path(features_dir) / f"{name}.parquet" for name in sorted(rows)}


def build_feature_tables(raw: dict[str, pd.DataFrame], features: FeaturesConfig) -> dict[str, pa.Table]:
    """All feature tables as Arrow tables, keyed by table name (the Feast FileSource names)."""
    raw = {**raw, "events": _by_user(raw["events"])}
    tables = _small_tables(raw, features)
    tables["user_history"] = user_history(raw["events"], raw["items"], features.history_length)
    order = ("user_profile", "item_profile", "user_history", "user_stats", "item_stats")
    return {name: tables[name] for name in order}


def _by_user(events: pd.DataFrame) -> pd.DataFrame:
    return events.sort_values(["user_id", "event_timestamp"], kind="stable", ignore_index=True)


def _small_tables(raw: dict[str, pd.DataFrame], features: FeaturesConfig) -> dict[str, pa.Table]:
    """The profiles and daily snapshots; sorts ``raw["events"]`` by (user, time) in place for the history."""
    raw["events"] = _by_user(raw["events"])
    users, items, events = raw["users"], raw["items"], raw["events"]
    windows = sorted(features.stats_windows_days)
    return {
        "user_profile": _profile(users, "user_id", USER_PROFILE_FEATURES, "signup_timestamp"),
        "item_profile": _profile(items, "item_id", ITEM_PROFILE_FEATURES, "created_timestamp"),
        "user_stats": activity_snapshots(events, "user_id", "user", windows),
        "item_stats": activity_snapshots(events, "item_id", "item", windows),
    }


HISTORY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC")),
        pa.field("hist_item_ids", pa.list_(pa.int64())),
        pa.field("hist_categories", pa.list_(pa.string())),
        pa.field("hist_length", pa.int64()),
    ]
)


def user_history(events: pd.DataFrame, items: pd.DataFrame, length: int) -> pa.Table:
    """Last ``length`` clicked item ids and categories strictly before each of the user's event times.

    ``events`` must be sorted by (user_id, event_timestamp); event times are unique per user (contract),
    so the clicks strictly before an event are the clicks earlier in that order.
    """
    batches = list(user_history_batches(events, items, length, batch_rows=None))
    return pa.concat_tables(batches) if batches else HISTORY_SCHEMA.empty_table()


def user_history_batches(
    events: pd.DataFrame, items: pd.DataFrame, length: int, batch_rows: int | None
) -> Iterator[pa.Table]:
    """:func:`user_history` in (user, time) order, ``batch_rows`` rows at a time (None: one batch).

    Only per-row positions (a few integers per event) are held for the whole table; the lists, the
    large part, are built a batch at a time from them.
    """
    user = events["user_id"].to_numpy()
    ts = events[TIMESTAMP].to_numpy(dtype="datetime64[ns]").view(np.int64)
    label = events["label"].to_numpy().astype(np.int64)
    is_click = label == 1

    # clicks before each event within its user block: exclusive cumulative count reset at user starts
    block_start = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    block_len = np.diff(np.r_[block_start, len(user)])
    cum = np.cumsum(label) - label
    clicks_before = cum - np.repeat(cum[block_start], block_len)

    # one trailing row per user after the last event: the history that serving reads online
    last = block_start + block_len - 1
    row_user = np.concatenate([user, user[last]])
    row_ts = np.concatenate([ts, ts[last] + TRAILING_NS])
    row_clicks = np.concatenate([clicks_before, clicks_before[last] + label[last]])
    row_block = np.concatenate([np.repeat(np.arange(len(block_start)), block_len), np.arange(len(last))])

    click_item = events["item_id"].to_numpy()[is_click]
    first_click = np.searchsorted(np.flatnonzero(is_click), block_start)  # index of block's first click
    hist_len = np.minimum(row_clicks, length)
    hist_start = first_click[row_block] + row_clicks - hist_len

    # each click's category as an index into the item table's categories (null: an unknown item)
    categories = pa.array(items["category"].to_numpy(), type=pa.string())
    item_ids = items["item_id"].to_numpy()
    by_id = np.argsort(item_ids, kind="stable")
    at = np.searchsorted(item_ids, click_item, sorter=by_id).clip(max=max(len(item_ids) - 1, 0))
    click_category = by_id[at] if len(item_ids) else np.zeros(len(click_item), dtype=np.int64)
    known = item_ids[click_category] == click_item if len(item_ids) else np.zeros(len(click_item), bool)
    order = np.lexsort((row_ts, row_user))
    step = batch_rows or max(len(order), 1)
    for first in range(0, len(order), step):
        rows = order[first : first + step]
        lengths = hist_len[rows]
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
        flat = np.repeat(hist_start[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        category = pa.array(click_category[flat], mask=~known[flat])
        yield pa.table(
            {
                "user_id": pa.array(row_user[rows], type=pa.int64()),
                TIMESTAMP: _timestamps(row_ts[rows]),
                "hist_item_ids": pa.ListArray.from_arrays(offsets, pa.array(click_item[flat], pa.int64())),
                "hist_categories": pa.ListArray.from_arrays(offsets, categories.take(category)),
                "hist_length": pa.array(lengths, type=pa.int64()),
            },
            schema=HISTORY_SCHEMA,
        )


def activity_snapshots(events: pd.DataFrame, key: str, prefix: str, windows: list[int]) -> pa.Table:
    """Daily snapshots of impressions, clicks and CTR over each window, from events before the snapshot.

    A snapshot is written for every (key, day) with an event that day, plus the day after the key's last
    active day, so that every event finds the snapshot of its own day and serving finds the latest one.
    """
    ids = events[key].to_numpy()
    day = events[TIMESTAMP].to_numpy(dtype="datetime64[ns]").view(np.int64) // DAY_NS
    label = events["label"].to_numpy().astype(np.int64)
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
    return pa.table(columns)


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
