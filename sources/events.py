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

Streamed (``stream``, what ingest calls): each file is read, converted and checked ``batch_rows`` rows at a
time and spilled to Parquet with its file and row; DuckDB (sources/events_order.py, ``duckdb_memory_limit``,
spilling to ``spill_dir``) checks the references, deduplicates, spreads and orders the spill on disk, and
the events come back in batches of ``batch_rows``: memory follows the batch and the entities, not the log.
A file with a bad value is read again whole to name its first bad row and count them (the error path).
"""

from __future__ import annotations

import glob
import io
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.as_of_rows import duckdb_connection
from recsys.config import DataConfig
from recsys.config.schema import EventBounds, EventsSource
from recsys.contracts import DataContractError, check_raw_table
from recsys.object_store import ObjectStore, ObjectStoreError, open_store
from sources.events_order import SPILL_SCHEMA, check_references, first_seen, micros_to_time, write_ordered
from sources.ratings_files import UNKNOWN
from sources.stream import RawStream

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


def stream(data: DataConfig, seed: int) -> RawStream:
    """The source's streamer (what ingest reads): users and items whole, the events in batches."""
    return stream_events(data.events)


def read_events(cfg: EventsSource, now: pd.Timestamp | None = None) -> dict[str, pd.DataFrame]:
    """Read, check and map the event logs (and item/user tables) into contract-checked raw tables.

    ``now`` (default: the wall clock) is the instant after which an event is in the future.
    """
    raw = stream_events(cfg, now)
    events = pd.concat(list(raw.events), ignore_index=True)
    check_raw_table("events", events, "data.events (events)")
    return {"users": raw.users, "items": raw.items, "events": events}


def stream_events(cfg: EventsSource, now: pd.Timestamp | None = None) -> RawStream:
    """:func:`read_events` as a stream: the checks run before it returns, the events follow in batches
    of ``batch_rows`` (the spill folder is removed once they are consumed, or on an error)."""
    now = pd.Timestamp.now(tz="UTC") if now is None else now
    if cfg.spill_dir is not None:
        Path(cfg.spill_dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.TemporaryDirectory(prefix="events-source-", dir=cfg.spill_dir)
    try:
        spill_dir = Path(folder.name)
        reader = _Reader()
        mapping = cfg.columns.model_dump()
        spill, files = _spill_events(reader, cfg, mapping, now, spill_dir / "read.parquet")
        con = duckdb_connection(cfg.duckdb_memory_limit, spill_dir / "duckdb")
        try:
            given: dict[str, pd.DataFrame | None] = {}  # the item and user tables, where paths name them
            for name, (key, since, noun, verb, _) in _DIMENSIONS.items():
                section, given[name] = getattr(cfg, name), None
                if section.paths:
                    given[name] = reader.table(
                        name, f"data.events.{name}.paths", section.paths, section.columns.model_dump(),
                        cfg.timestamp_unit, cfg.bounds,
                    )  # fmt: skip
                    _check_unique(given[name], key)
                    check_references(con, str(spill), files, given[name], key, since, mapping, noun, verb)
            ordered = spill_dir / "ordered.parquet"
            write_ordered(con, str(spill), ordered, cfg.duplicate_label, cfg.batch_rows)
            spill.unlink()
            tables = {
                name: _dimension(given[name], first_seen(con, ordered, key), key, since, fills)
                for name, (key, since, _, _, fills) in _DIMENSIONS.items()
            }
        finally:
            con.close()
        for name, table in tables.items():
            check_raw_table(name, table, f"data.events ({name})")
    except BaseException:
        folder.cleanup()
        raise
    return RawStream(tables["users"], tables["items"], _ordered_batches(ordered, cfg.batch_rows, folder))


def _spill_events(
    reader: _Reader, cfg: EventsSource, mapping: dict[str, str | None], now: pd.Timestamp, target: Path
) -> tuple[Path, list[str]]:
    """Every events file read, converted and checked a batch at a time into ``target`` (the spill, with
    each row's file and row); the files read, in order. No event may be in the future."""
    files = reader.expand(cfg.paths, "data.events.paths")
    rows, late, first_late = 0, 0, None
    now_us = now.value // 1000  # a µs timestamp t is after now exactly when t > floor(now in µs)
    with pq.ParquetWriter(target, SPILL_SCHEMA) as writer:
        for index, location in enumerate(files):
            read = 0
            for raw in reader.batches(location, "events", mapping, cfg.batch_rows):
                try:
                    df = _convert(raw, location, mapping, KINDS["events"], cfg.timestamp_unit, cfg.bounds)
                except DataContractError:  # the file read whole names its first bad row and counts them
                    _convert(
                        reader.read_file(location, "events", mapping), location, mapping, KINDS["events"],
                        cfg.timestamp_unit, cfg.bounds,
                    )  # fmt: skip
                    raise
                if cfg.columns.rating is not None:
                    df["label"] = (df["rating"] >= cfg.positive_rating).astype(np.int64)
                micros = pd.DatetimeIndex(df["timestamp"]).asi8 // 1000
                bad = micros > now_us
                if bad.any() and first_late is None:
                    i = int(np.flatnonzero(bad)[0])
                    first_late = (location, read + i + 1, df["timestamp"].iloc[i])
                late += int(bad.sum())
                n = len(df)
                writer.write_table(
                    pa.table(
                        {
                            "user_id": df["user_id"].to_numpy(dtype=np.int64),
                            "item_id": df["item_id"].to_numpy(dtype=np.int64),
                            "ts": micros,
                            "label": df["label"].to_numpy(dtype=np.int64),
                            "seq": np.arange(rows, rows + n, dtype=np.int64),
                            "file": np.full(n, index, dtype=np.int32),
                            "row": np.arange(read + 1, read + n + 1, dtype=np.int64),
                        },
                        schema=SPILL_SCHEMA,
                    )
                )
                rows, read = rows + n, read + n
    if rows == 0:
        raise DataContractError(
            f"data.events.paths: {cfg.paths} hold no events (every file matched is empty)"
        )
    if first_late is not None:
        location, row, value = first_late
        raise DataContractError(
            f"{location}: row {row}, column '{mapping['timestamp']}' (timestamp): {value} is in the future "
            f"(now {now}) ({late} bad row(s))"
        )
    return target, files


def _ordered_batches(
    ordered: Path, batch_rows: int, folder: tempfile.TemporaryDirectory
) -> Iterator[pd.DataFrame]:
    """The ordered events as contract frames, ``batch_rows`` at a time; the spill folder goes at the end."""
    try:
        for batch in pq.ParquetFile(ordered).iter_batches(batch_size=batch_rows):
            label = batch.column("label").to_numpy()
            yield pd.DataFrame({
                "user_id": batch.column("user_id").to_numpy(),
                "item_id": batch.column("item_id").to_numpy(),
                "event_timestamp": micros_to_time(batch.column("ts").to_numpy()),
                "label": label,
                "event_type": _EVENT_TYPES[label],
            })  # fmt: skip
    finally:
        folder.cleanup()


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
        """The file's mapped columns whole (the item and user tables; an events file on the error path)."""
        frames = list(self.batches(location, table, mapping, None))
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def batches(
        self, location: str, table: str, mapping: dict[str, str | None], rows: int | None
    ) -> Iterator[pd.DataFrame]:
        """The file's mapped columns ``rows`` at a time (None: whole), in file order."""
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
        compression = "gzip" if location.endswith(".gz") else None
        try:  # only the mapped columns are read
            if fmt == "parquet":
                parquet = pq.ParquetFile(source)
                found = parquet.schema_arrow.names
            else:
                found = list(pd.read_csv(source, nrows=0, compression=compression).columns)
                if isinstance(source, io.BytesIO):
                    source.seek(0)
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
        try:
            if fmt == "parquet":
                columns = [c for c in found if c in wanted]
                if rows is None:
                    yield parquet.read(columns=columns).to_pandas()
                    return
                for batch in parquet.iter_batches(batch_size=rows, columns=columns):
                    yield pa.Table.from_batches([batch]).to_pandas()
            elif rows is None:
                yield pd.read_csv(source, dtype=str, compression=compression, usecols=lambda c: c in wanted)
            else:
                yield from pd.read_csv(
                    source, dtype=str, compression=compression, usecols=lambda c: c in wanted, chunksize=rows
                )
        except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as exc:
            raise DataContractError(f"{location}: not a readable {fmt} file: {exc}") from exc

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
        in_range = numbers.where(numbers.abs() < limit)
        # all text (ISO): no numbers to convert (pandas' unit cast of an all-NaN column can raise spuriously)
        times = (
            pd.to_datetime(in_range, unit=unit, utc=True)
            if in_range.notna().any()
            else pd.Series(pd.NaT, index=series.index, dtype="datetime64[ns, UTC]")
        )
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


def _check_unique(table: pd.DataFrame, key: str) -> None:
    """An item or user table lists each id once; a repeat names both rows."""
    duplicated = table.duplicated(key)
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        first = table.index[table[key] == table[key].iloc[i]][0]
        raise DataContractError(
            f"{table['_file'].iloc[i]}: row {table['_row'].iloc[i]}: {key} {table[key].iloc[i]} is listed "
            f"again (first at {table['_file'].iloc[first]} row {table['_row'].iloc[first]})"
        )


# the contract's columns of the item and user tables that a table may lack: (value when absent, dtype)
_ITEM_FILLS = {"category": (UNKNOWN, object), "brand": (UNKNOWN, object), "price": (0.0, np.float64)}
_USER_FILLS = {
    "gender": (UNKNOWN, object),
    "age_bucket": (0, np.int64),
    "occupation": (UNKNOWN, object),
    "zip_prefix": (UNKNOWN, object),
}


def _dimension(
    table: pd.DataFrame | None, first: pd.Series, key: str, since: str, fills: dict[str, tuple[Any, Any]]
) -> pd.DataFrame:
    """The contract's item or user table: the given ``table``'s rows (else the ids in the events, ``first``'s
    index), absent columns filled, known ``since`` the table's time (else the id's first event, ``first``,
    else the first event)."""
    ids = pd.Series(
        first.index.to_numpy(dtype=np.int64) if table is None else table[key].to_numpy(dtype=np.int64)
    )
    if table is not None and since in table:
        known = table[since].reset_index(drop=True)
    else:
        known = ids.map(first).fillna(first.min()).astype("datetime64[ns, UTC]")
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
