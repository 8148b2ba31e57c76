"""The events source's global pass on disk: the spilled log checked against the item and user tables,
deduplicated, spread and ordered by DuckDB (its own connection, under its memory limit, spilling to disk).

The spill (written by sources/events.py a batch at a time) has one row per row read: ``user_id``,
``item_id``, ``ts`` (µs since the epoch, UTC), ``label``, ``seq`` (the global read order: files as listed,
rows in file order), ``file`` (index into the files read) and ``row`` (1-based in its file). Everything here
grows DuckDB's spill files, not this process: results come back as one row per entity at most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys.contracts import DataContractError

SPILL_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("ts", pa.int64()),
        ("label", pa.int64()),
        ("seq", pa.int64()),
        ("file", pa.int32()),
        ("row", pa.int64()),
    ]
)


def micros_to_time(micros: Any) -> Any:
    """µs since the epoch as UTC timestamps (ns resolution, as the contract's columns)."""
    return pd.to_datetime(np.asarray(micros, dtype=np.int64) * 1000, unit="ns", utc=True)


def check_references(
    con: Any, spill: str, files: list[str], table: pd.DataFrame, key: str, since: str,
    mapping: dict[str, str | None], noun: str, verb: str,
) -> None:  # fmt: skip
    """Every spilled event's ``key`` in ``table`` and not before the row's ``since``; a failure names the
    first such event in read order, its file and row, and counts them all."""
    ids = table[key].to_numpy(dtype=np.int64)
    known = {key: ids}
    if since in table:
        known["since"] = pd.DatetimeIndex(table[since]).asi8 // 1000
    con.register("_known", pa.table(known))
    try:
        found = con.execute(
            f"SELECT count(*), arg_min(e.file, e.seq), arg_min(e.row, e.seq), arg_min(e.{key}, e.seq) "
            f"FROM read_parquet(?) e ANTI JOIN _known k ON e.{key} = k.{key}",
            [spill],
        ).fetchall()[0]
        if found[0]:
            count, file, row, value = found
            raise DataContractError(
                f"{files[file]}: row {row}, column '{mapping[key]}' ({key}): {value} is not in the {noun} "
                f"table {sorted(set(table['_file']))} ({count} bad row(s))"
            )
        if since not in table:
            return
        found = con.execute(
            "SELECT count(*), arg_min(e.file, e.seq), arg_min(e.row, e.seq), arg_min(e.ts, e.seq), "
            f"arg_min(e.{key}, e.seq) FROM read_parquet(?) e JOIN _known k ON e.{key} = k.{key} "
            "WHERE e.ts < k.since",
            [spill],
        ).fetchall()[0]
    finally:
        con.unregister("_known")
    if found[0]:
        count, file, row, micros, own_id = found
        at = table.set_index(key).loc[own_id]
        raise DataContractError(
            f"{files[file]}: row {row}, column '{mapping['timestamp']}' (timestamp): "
            f"{micros_to_time([micros])[0]} is before its {noun} {own_id} {verb} ({at[since]}, "
            f"{at['_file']} row {at['_row']}) ({count} bad row(s))"
        )


def write_ordered(con: Any, spill: str, target: Path, duplicate_label: str, batch_rows: int) -> None:
    """The events to ``target`` (row groups of ``batch_rows``): one row per (user, item, ts), ordered by
    time then user, a user's same-µs events spread 1 µs apart in item order.

    The spread is the whole-log rule t'[i] = i + max_{j <= i}(t[j] - j) over a user's events sorted by
    (ts, item), i their position: a window over the user's rows, so DuckDB sorts and spills it.
    """
    label = "max(label)" if duplicate_label == "any" else "arg_max(label, seq)"
    con.execute(
        f"""
        COPY (
            WITH merged AS (
                SELECT user_id, item_id, ts, {label} AS label
                FROM read_parquet({_literal(spill)}) GROUP BY user_id, item_id, ts
            ), placed AS (
                SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts, item_id) - 1 AS pos
                FROM merged
            ), spread AS (
                SELECT user_id, item_id, label, pos + max(ts - pos) OVER (
                    PARTITION BY user_id ORDER BY ts, item_id
                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
                ) AS ts
                FROM placed
            )
            SELECT user_id, item_id, ts, label FROM spread ORDER BY ts, user_id
        ) TO {_literal(target)} (FORMAT parquet, ROW_GROUP_SIZE {int(batch_rows)})
        """
    )


def first_seen(con: Any, ordered: Path, key: str) -> pd.Series:
    """Each ``key``'s first (spread) event time, indexed by id in id order: one row per entity."""
    found = con.execute(
        f"SELECT {key}, min(ts) AS ts FROM read_parquet({_literal(ordered)}) GROUP BY {key} ORDER BY {key}"
    ).fetchnumpy()
    return pd.Series(micros_to_time(found["ts"]), index=np.asarray(found[key], dtype=np.int64))


def _literal(path: str | Path) -> str:
    """A path as an SQL string literal (COPY's target cannot be a parameter)."""
    return "'" + str(path).replace("'", "''") + "'"
