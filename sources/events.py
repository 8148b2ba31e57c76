"""Your own event logs as the three raw tables (users, items, events) of the contract.

``data.events`` names one or more files or globs (``*``, ``?``, ``**``), local or ``s3://bucket/key``
(read through recsys/object_store.py with the environment promote uses: ``AWS_ENDPOINT_URL``, the
credentials, ...). The format follows the suffix: ``.parquet``/``.pq``, ``.csv``, ``.csv.gz`` (CSV with a
header row); names starting with ``_`` or ``.`` (``_SUCCESS``, ``.crc``) are skipped. A column mapping
names the file's columns for the contract's: user id, item id, timestamp, and either a 0/1 label or a
rating with its threshold (label = rating >= ``positive_rating``). Optional item and user tables, with
their own mappings, give items their category, brand, price and creation time and users their profile;
without them the catalogue is the ids seen in the events ("unknown" categories, price 0, created or signed
up at the first event).

Checks, each failing with the file, the row (1-based, the header not counted) and the column named:
- the raw contract: a mapped column missing from a file, a value of the wrong type (ids: integers;
  timestamps: unix time in ``timestamp_unit``, ISO-8601 text or a timestamp type, naive = UTC; labels:
  0/1 or true/false; ratings, prices: numbers), a duplicate id in the item or user table, an event whose
  user or item is not in the given table;
- time consistency: no event in the future, none before its item's ``created_timestamp`` or its user's
  ``signup_timestamp``;
- plausible values: ``bounds.numeric`` (rating, price, age_bucket in [low, high]) and
  ``bounds.categories`` (the allowed values of a string column; a null becomes "unknown", always allowed).

Duplicates and order (the stated rules):
- timestamps are kept to the microsecond (Feast's resolution);
- rows with the same (user, item, timestamp) are one event; its label is 1 if any copy is 1
  (``duplicate_label: any``) or the last copy read (``last``: files in the order listed, a glob's files
  by name, rows in file order);
- the rows may come in any order, in and across files: the events are ordered by time (then user);
- the contract keys events by (user, timestamp), so a user's events at the same microsecond are spread
  1 µs apart in item-id order, the user's later events moved on only as far as that needs (an event is
  never moved earlier than logged).
"""

from __future__ import annotations

import glob
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import DataConfig
from recsys.config.schema import EventBounds, EventsSource
from recsys.contracts import DataContractError, check_raw_table
from recsys.object_store import ObjectStore, ObjectStoreError, open_store
from sources.ratings_files import UNKNOWN

NAME = "events"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".csv.gz": "csv"}
# contract column -> how a file's values are read: int, float, str, time, label
KINDS: dict[str, dict[str, str]] = {
    "events": {"user_id": "int", "item_id": "int", "timestamp": "time", "label": "label", "rating": "float"},
    "items": {
        "item_id": "int",
        "category": "str",
        "brand": "str",
        "price": "float",
        "created_timestamp": "time",
    },
    "users": {
        "user_id": "int",
        "gender": "str",
        "age_bucket": "int",
        "occupation": "str",
        "zip_prefix": "str",
        "signup_timestamp": "time",
    },
}
_GLOB = re.compile(r"[*?]")
_EVENT_TYPES = np.array(["impression", "click"], dtype=object)  # indexed by label


def read(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The source table's reader: ``data.events``; ``seed`` is unused (the data is what it is)."""
    return read_events(data.events)


def read_events(cfg: EventsSource, now: pd.Timestamp | None = None) -> dict[str, pd.DataFrame]:
    """Read, check and map the event logs (and item/user tables) into contract-checked raw tables.

    ``now`` (default: the wall clock) is the instant after which an event is in the future.
    """
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    reader = _Reader()
    mapping = cfg.columns.model_dump()
    events = reader.table("events", "data.events.paths", cfg.paths, mapping, cfg.timestamp_unit, cfg.bounds)
    if events.empty:
        raise DataContractError(
            f"data.events.paths: {cfg.paths} hold no events (every file matched is empty)"
        )
    if cfg.columns.rating is not None:
        events["label"] = (events["rating"] >= cfg.positive_rating).astype(np.int64)
    late = events["timestamp"] > now
    _fail_at(events, late, mapping["timestamp"], "timestamp", lambda i: f"is in the future (now {now})")

    given: dict[str, pd.DataFrame | None] = {}  # the item and user tables, where paths name them
    for name, (key, since, noun, verb, _) in _DIMENSIONS.items():
        section, given[name] = getattr(cfg, name), None
        if section.paths:
            given[name] = reader.table(
                name, f"data.events.{name}.paths", section.paths, section.columns.model_dump(),
                cfg.timestamp_unit, cfg.bounds,
            )  # fmt: skip
            _check_dimension(events, given[name], key, since, mapping, noun, verb)
    ordered = _deduplicated_in_order(events, cfg.duplicate_label)
    tables = {
        name: _dimension(given[name], ordered, key, since, fills)
        for name, (key, since, _, _, fills) in _DIMENSIONS.items()
    }
    tables["events"] = ordered
    for name, table in tables.items():
        check_raw_table(name, table, f"data.events ({name})")
    return tables


# --------------------------------------------------------------------------------------------------
# files: paths and globs, local or s3://


class _Reader:
    """Expands paths and globs and reads each file into contract-named, typed, checked columns."""

    def __init__(self) -> None:
        self._stores: dict[str, ObjectStore] = {}

    def table(
        self, table: str, key: str, patterns: list[str], mapping: dict[str, str | None], unit: str,
        bounds: EventBounds,
    ) -> pd.DataFrame:  # fmt: skip
        """Every file of ``patterns`` read, converted and checked, with ``_file`` and ``_row`` columns."""
        frames = []
        for location in self.expand(patterns, key):
            raw = self.read_file(location, table, mapping)
            frames.append(_convert(raw, location, mapping, KINDS[table], unit, bounds))
        return pd.concat(frames, ignore_index=True)

    def expand(self, patterns: list[str], key: str) -> list[str]:
        found: dict[str, None] = {}
        for pattern in patterns:
            matches = self._s3_matches(pattern) if pattern.startswith("s3://") else _local_matches(pattern)
            matches = [m for m in matches if not m.rstrip("/").rsplit("/", 1)[-1].startswith(("_", "."))]
            if not matches:
                raise DataContractError(f"{key}: {pattern!r} matches no file")
            found.update(dict.fromkeys(matches))
        for location in found:
            _format(location)  # an unknown suffix fails before anything is read
        return list(found)

    def read_file(self, location: str, table: str, mapping: dict[str, str | None]) -> pd.DataFrame:
        source: str | io.BytesIO = location
        if location.startswith("s3://"):
            bucket, key = _split_s3(location)
            try:
                data = self._store(bucket).get_bytes(key)
            except ObjectStoreError as exc:
                raise DataContractError(str(exc)) from exc
            if data is None:
                raise DataContractError(f"{location}: file not found")
            source = io.BytesIO(data)
        fmt, wanted = _format(location), {column for column in mapping.values() if column}
        try:  # only the mapped columns are read
            if fmt == "parquet":
                parquet = pq.ParquetFile(source)
                found = parquet.schema_arrow.names
                df = parquet.read(columns=[c for c in found if c in wanted]).to_pandas()
            else:
                compression = "gzip" if location.endswith(".gz") else None
                found = list(pd.read_csv(source, nrows=0, compression=compression).columns)
                if isinstance(source, io.BytesIO):
                    source.seek(0)
                df = pd.read_csv(source, dtype=str, compression=compression, usecols=lambda c: c in wanted)
        except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as exc:
            raise DataContractError(f"{location}: not a readable {fmt} file: {exc}") from exc
        missing = [
            f"'{column}' ({name})" for name, column in mapping.items() if column and column not in found
        ]
        if missing:
            section = "data.events.columns" if table == "events" else f"data.events.{table}.columns"
            raise DataContractError(
                f"{location}: column(s) {', '.join(missing)} not found (mapped in {section}); found {found}"
            )
        return df

    def _s3_matches(self, pattern: str) -> list[str]:
        bucket, key = _split_s3(pattern)
        wildcard = _GLOB.search(key)
        if wildcard is None:
            return [pattern]  # a missing object is named when it is read
        regex = _glob_regex(key)
        try:
            keys = self._store(bucket).keys(key[: wildcard.start()])
        except ObjectStoreError as exc:
            raise DataContractError(str(exc)) from exc
        return [f"s3://{bucket}/{k}" for k in keys if regex.fullmatch(k)]

    def _store(self, bucket: str) -> ObjectStore:
        if bucket not in self._stores:
            try:
                self._stores[bucket] = open_store(f"s3://{bucket}")
            except ObjectStoreError as exc:
                raise DataContractError(str(exc)) from exc
        return self._stores[bucket]


def _local_matches(pattern: str) -> list[str]:
    if _GLOB.search(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if Path(pattern).is_dir():
        raise DataContractError(
            f"{pattern}: is a directory; name its files, e.g. {pattern.rstrip('/')}/*.parquet"
        )
    return [pattern] if Path(pattern).is_file() else []


def _split_s3(uri: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/(.+)", uri)
    if match is None:
        raise DataContractError(f"{uri!r}: expected s3://bucket/key")
    return match.group(1), match.group(2)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` within one path segment, ``**`` across segments (as ``glob`` with recursive=True)."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        else:
            parts.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(parts))


def _format(location: str) -> str:
    name = location.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise DataContractError(f"{location}: unknown format; name files {' | '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------------
# values: types, bounds and categories, per file


def _convert(
    raw: pd.DataFrame, where: str, mapping: dict[str, str | None], kinds: dict[str, str], unit: str,
    bounds: EventBounds,
) -> pd.DataFrame:  # fmt: skip
    out: dict[str, Any] = {}
    for name, column in mapping.items():
        if column is None:
            continue
        series, what = raw[column].reset_index(drop=True), f"column '{column}' ({name})"
        values = _CONVERTERS[kinds[name]](series, unit)
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            expected = _EXPECTED[kinds[name]].format(unit=unit)
            raise DataContractError(
                f"{where}: row {row + 1}, {what}: expected {expected}, found {series.iloc[row]!r} "
                f"({int(bad.sum())} bad row(s))"
            )
        if name in bounds.numeric:
            low, high = bounds.numeric[name]
            _first_bad(values, (values < low) | (values > high), where, what, f"outside [{low:g}, {high:g}]")
        if name in bounds.categories:
            allowed = [*bounds.categories[name], UNKNOWN]
            _first_bad(values, ~values.isin(allowed), where, what, f"not one of {allowed}")
        out[name] = values
    df = pd.DataFrame(out)
    df["_file"] = where
    df["_row"] = np.arange(1, len(df) + 1)
    return df


def _first_bad(values: pd.Series, bad: pd.Series, where: str, what: str, problem: str) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = values.iloc[row]
        shown = repr(value) if isinstance(value, str) else value
        raise DataContractError(
            f"{where}: row {row + 1}, {what}: {shown} is {problem} ({int(bad.sum())} bad row(s))"
        )


def _integers(series: pd.Series, unit: str) -> pd.Series:
    numbers = pd.to_numeric(series.astype(np.int64) if series.dtype == bool else series, errors="coerce")
    if pd.api.types.is_integer_dtype(numbers.dtype):
        return numbers.astype("Int64")  # not through float: ids beyond 2**53 stay exact
    return numbers.where(numbers % 1 == 0).astype("Int64")  # a non-integer becomes <NA>: a bad row


def _floats(series: pd.Series, unit: str) -> pd.Series:
    numbers = pd.to_numeric(series, errors="coerce").astype(np.float64)
    return numbers.where(np.isfinite(numbers))


def _labels(series: pd.Series, unit: str) -> pd.Series:
    if series.dtype == object:
        series = series.str.strip().str.lower().replace({"true": "1", "false": "0"})
    numbers = _integers(series, unit)
    return numbers.where(numbers.isin([0, 1]))


def _strings(series: pd.Series, unit: str) -> pd.Series:
    text = series.astype("string").str.strip()
    return text.mask(text == "").fillna(UNKNOWN).astype(object)


def _timestamps(series: pd.Series, unit: str) -> pd.Series:
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        times = series.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(series.dtype):
        times = series.dt.tz_localize("UTC")
    else:
        # numbers are unix time, anything else ISO-8601 text; beyond 2262 datetime64[ns] overflows: such a
        # number is a bad row, not an exception
        numbers = pd.to_numeric(series, errors="coerce")
        limit = pd.Timestamp.max.value / pd.Timedelta(1, unit=unit).value
        times = pd.to_datetime(numbers.where(numbers.abs() < limit), unit=unit, utc=True)
        text = numbers.isna() & series.notna()
        if text.any():
            iso = pd.to_datetime(series.where(text), utc=True, errors="coerce", format="ISO8601")
            times = times.where(~text, iso)
    return times.astype("datetime64[ns, UTC]").dt.floor("us")


_CONVERTERS = {"int": _integers, "float": _floats, "label": _labels, "str": _strings, "time": _timestamps}
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "label": "0/1 or true/false",
    "str": "text",
    "time": "a timestamp (unix {unit}, ISO-8601 or a timestamp type)",
}


# --------------------------------------------------------------------------------------------------
# the item and user tables against the events


def _fail_at(df: pd.DataFrame, bad: pd.Series, column: str, name: str, problem: Callable[[int], str]) -> None:
    """Fail naming the file and row of the first ``bad`` row of a concatenated table (read order)."""
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{df['_file'].iloc[i]}: row {df['_row'].iloc[i]}, column '{column}' ({name}): "
            f"{df[name].iloc[i]} {problem(i)} ({int(bad.sum())} bad row(s))"
        )


def _check_dimension(
    events: pd.DataFrame, table: pd.DataFrame, key: str, since: str, mapping: dict[str, str | None],
    noun: str, verb: str,
) -> None:  # fmt: skip
    """Unique ids in ``table``; every event's ``key`` in it, and not before the row's ``since``."""
    duplicated = table.duplicated(key)
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        first = table.index[table[key] == table[key].iloc[i]][0]
        raise DataContractError(
            f"{table['_file'].iloc[i]}: row {table['_row'].iloc[i]}: {key} {table[key].iloc[i]} is listed "
            f"again (first at {table['_file'].iloc[first]} row {table['_row'].iloc[first]})"
        )
    tables_files = sorted(set(table["_file"]))
    known = events[key].isin(table[key])
    _fail_at(events, ~known, mapping[key], key, lambda i: f"is not in the {noun} table {tables_files}")
    if since not in table:
        return
    at = table.set_index(key)
    own = events[key].map(at[since])
    early = events["timestamp"] < own

    def problem(i: int) -> str:
        own_id = events[key].iloc[i]
        row = at.loc[own_id]
        return f"is before its {noun} {own_id} {verb} ({row[since]}, {row['_file']} row {row['_row']})"

    _fail_at(events, early, mapping["timestamp"], "timestamp", problem)


def _deduplicated_in_order(events: pd.DataFrame, duplicate_label: str) -> pd.DataFrame:
    """One row per (user, item, timestamp), ordered by time then user, unique per (user, timestamp)."""
    keys = ["user_id", "item_id", "timestamp"]
    df = events[[*keys, "label"]].copy()
    df["user_id"], df["item_id"] = df["user_id"].astype(np.int64), df["item_id"].astype(np.int64)
    df["label"] = df["label"].astype(np.int64)
    df["_seq"] = np.arange(len(df))
    df = df.sort_values([*keys, "_seq"], kind="stable")
    if duplicate_label == "any":
        df["label"] = df.groupby(keys, sort=False)["label"].transform("max")
    df = df.drop_duplicates(keys, keep="last").sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    # strictly increasing per user in steps of >= 1 µs: t'[i] = i + max_{j <= i}(t[j] - j) within the user
    micros = pd.DatetimeIndex(df["timestamp"]).asi8 // 1000  # floored to µs on reading
    position = df.groupby("user_id", sort=False).cumcount().to_numpy()
    spread = pd.Series(micros - position).groupby(df["user_id"].to_numpy()).cummax().to_numpy() + position
    out = pd.DataFrame({
        "user_id": df["user_id"].to_numpy(),
        "item_id": df["item_id"].to_numpy(),
        "event_timestamp": pd.to_datetime(spread * 1000, unit="ns", utc=True),
        "label": df["label"].to_numpy(),
        "event_type": _EVENT_TYPES[df["label"].to_numpy()],
    })  # fmt: skip
    return out.sort_values(["event_timestamp", "user_id"], kind="stable", ignore_index=True)


# the contract's columns of the item and user tables that a table may lack: (value when absent, dtype)
_ITEM_FILLS = {"category": (UNKNOWN, object), "brand": (UNKNOWN, object), "price": (0.0, np.float64)}
_USER_FILLS = {
    "gender": (UNKNOWN, object),
    "age_bucket": (0, np.int64),
    "occupation": (UNKNOWN, object),
    "zip_prefix": (UNKNOWN, object),
}


def _dimension(
    table: pd.DataFrame | None, events: pd.DataFrame, key: str, since: str, fills: dict[str, tuple[Any, Any]]
) -> pd.DataFrame:
    """The contract's item or user table: the given ``table``'s rows (else the ids in the events), absent
    columns filled, known ``since`` the table's time (else the id's first event, else the first event)."""
    ids = pd.Series(np.unique(events[key]) if table is None else table[key].to_numpy(dtype=np.int64))
    if table is not None and since in table:
        known = table[since].reset_index(drop=True)
    else:
        first = events.groupby(key)["event_timestamp"].min()
        known = ids.map(first).fillna(events["event_timestamp"].min()).astype("datetime64[ns, UTC]")
    columns: dict[str, Any] = {key: ids.to_numpy(dtype=np.int64)}
    for name, (fill, dtype) in fills.items():
        columns[name] = table[name].to_numpy(dtype=dtype) if table is not None and name in table else fill
    columns[since] = known.array
    return pd.DataFrame(columns).sort_values(key, ignore_index=True)


# table -> its id, the time it is known since, how errors name a row and its time, the absent columns' fills
_DIMENSIONS = {
    "users": ("user_id", "signup_timestamp", "user", "signed up", _USER_FILLS),
    "items": ("item_id", "created_timestamp", "item", "created", _ITEM_FILLS),
}
