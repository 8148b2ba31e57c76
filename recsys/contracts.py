"""Table contracts shared by every step: raw tables, feature tables and the defaults for missing features.

Raw tables are checked on write (ingest) and on read (features), so a malformed source fails with the
file and the column named instead of surfacing later as a shape error inside a model. Parquet files are
read through :func:`read_parquet` / :func:`parquet_schema`, so a truncated or foreign file is named in
the error instead of surfacing as an Arrow traceback. The events, the one table that grows with the log,
are checked a batch at a time by :class:`EventBatches` in every step that reads them (ingest, features,
training set), inside the pass that uses them: one definition of the check, and no extra read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# ---- raw tables (data/raw/<name>.parquet) --------------------------------------------------------
# column -> pandas dtype kind: "i" integer, "f" float, "s" string/categorical, "t" tz-aware UTC timestamp
RAW_COLUMNS: dict[str, dict[str, str]] = {
    "users": {
        "user_id": "i",
        "gender": "s",
        "age_bucket": "i",
        "occupation": "s",
        "zip_prefix": "s",
        "signup_timestamp": "t",
    },
    "items": {
        "item_id": "i",
        "category": "s",
        "brand": "s",
        "price": "f",
        "created_timestamp": "t",
    },
    "events": {
        "user_id": "i",
        "item_id": "i",
        "event_timestamp": "t",
        "label": "i",
        "event_type": "s",
    },
}
RAW_TABLES = tuple(RAW_COLUMNS)
# when each raw table's rows came to be known: a cut at an instant keeps the rows before it
KNOWN_SINCE = {"users": "signup_timestamp", "items": "created_timestamp", "events": "event_timestamp"}

# ---- feature tables (data/features/<name>.parquet), each with entity key(s) + event_timestamp -------
TIMESTAMP = "event_timestamp"
USER_PROFILE_FEATURES = ["gender", "age_bucket", "occupation", "zip_prefix"]
ITEM_PROFILE_FEATURES = ["category", "brand", "price"]
HISTORY_FEATURES = ["hist_item_ids", "hist_categories", "hist_length"]


def stats_features(prefix: str, windows: list[int]) -> list[str]:
    """Names of the activity statistics for ``prefix`` in ('user', 'item') over each window in days."""
    names = []
    for days in windows:
        names += [f"{prefix}_impressions_{days}d", f"{prefix}_clicks_{days}d", f"{prefix}_ctr_{days}d"]
    return names


FEATURE_TABLE_KEYS = {
    "user_profile": "user_id",
    "user_history": "user_id",
    "user_stats": "user_id",
    "item_profile": "item_id",
    "item_stats": "item_id",
}

# Explicit defaults for a feature that has no value as of an event (no row within TTL, new user/item).
# Models treat these like any value: "" maps to the out-of-vocabulary bucket, counts are 0.
MISSING_CATEGORY = ""
STRING_DEFAULT = MISSING_CATEGORY
NUMBER_DEFAULT = 0


class DataContractError(ValueError):
    """A table that breaks its contract; the message names the file and the problem."""


RawColumn = pd.Series | pa.Array | pa.ChunkedArray


def check_raw_table(name: str, df: pd.DataFrame, source: str | Path) -> None:
    """Raise :class:`DataContractError` unless ``df`` satisfies the raw contract for table ``name``."""
    check_raw_columns(name, list(df.columns), source)
    if df.empty:
        raise DataContractError(f"{source}: table '{name}' is empty")
    check_raw_dtypes(name, df, source)
    check_raw_values(name, {column: df[column] for column in RAW_COLUMNS[name]}, source)
    key = {"users": ["user_id"], "items": ["item_id"]}.get(name)
    if key and df.duplicated(key).any():
        dupes = df.loc[df.duplicated(key), key[0]].head(5).tolist()
        raise DataContractError(f"{source}: table '{name}' has duplicate {key[0]} values, e.g. {dupes}")


def check_raw_dtypes(name: str, df: pd.DataFrame, source: str | Path) -> None:
    """The dtype of each contract column ``df`` holds (a frame's dtypes follow from its Arrow schema, so
    an empty frame of the schema checks a whole file); timestamps must be tz-aware UTC."""
    for column, kind in RAW_COLUMNS[name].items():
        if column in df.columns and not _has_kind(df[column], kind):
            raise DataContractError(
                f"{source}: column '{column}' of table '{name}' has dtype {df[column].dtype}, "
                f"expected {_KIND_NAMES[kind]}"
            )


def check_raw_values(name: str, columns: Mapping[str, RawColumn], source: str | Path) -> None:
    """The per-row part of the raw contract on ``columns`` (any subset of the table's, pandas or Arrow):
    no nulls outside string columns, event labels 0 or 1."""
    for column, values in columns.items():
        kind = RAW_COLUMNS[name].get(column)
        nulls = 0 if kind in (None, "s") else _null_count(values)
        if nulls:
            message = f"column '{column}' of table '{name}' has {nulls} null value(s)"
            raise DataContractError(f"{source}: {message}")
    if name == "events" and "label" in columns:
        label = _numpy(columns["label"])
        bad = (label != 0) & (label != 1)
        if bad.any():
            raise DataContractError(
                f"{source}: column 'label' of table 'events' must be 0 or 1, "
                f"found {sorted(np.unique(label[bad]).tolist())[:5]}"
            )


def check_raw_columns(name: str, columns: list[str], source: str | Path) -> None:
    """Raise :class:`DataContractError` naming ``source`` and the columns table ``name`` lacks."""
    missing = [c for c in RAW_COLUMNS[name] if c not in columns]
    if missing:
        raise DataContractError(f"{source}: table '{name}' is missing column(s) {missing}; found {columns}")


def read_raw_tables(raw_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read and check the three raw tables; a missing or malformed file is named in the error."""
    raw_dir = Path(raw_dir)
    tables = {}
    for name in RAW_TABLES:
        path = raw_dir / f"{name}.parquet"
        if not path.exists():
            raise DataContractError(f"{path}: raw table '{name}' not found (run the ingest step first)")
        df = read_parquet(path)
        check_raw_table(name, df, path)
        tables[name] = df
    return tables


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet file (optionally only ``columns``); an unreadable file raises naming it."""
    with _readable_parquet(path):
        return pd.read_parquet(path, columns=columns)


def parquet_schema(path: str | Path) -> pa.Schema:
    """The schema in a parquet file's footer; a missing, truncated or foreign file raises naming it."""
    with _readable_parquet(path):
        return pq.read_schema(path)


# ---- raw events, a batch at a time --------------------------------------------------------------


def open_events(path: str | Path) -> pq.ParquetFile:
    """``events.parquet`` opened with its footer checked against the raw contract (columns, dtypes from
    the Arrow schema, not empty) before any row is read; :class:`EventBatches` checks the rows."""
    path = Path(path)
    if not path.exists():
        raise DataContractError(f"{path}: raw table 'events' not found (run the ingest step first)")
    with _readable_parquet(path):
        file = pq.ParquetFile(path)
    check_raw_columns("events", file.schema_arrow.names, path)
    if file.metadata.num_rows == 0:
        raise DataContractError(f"{path}: table 'events' is empty")
    check_raw_dtypes("events", file.schema_arrow.empty_table().to_pandas(), path)
    return file


class EventBatches:
    """One pass over the raw events, checked a batch at a time as it goes by (ingest's source batches,
    a step's record batches of ``events.parquet``), so no step reads the events just to check them.

    Each batch must hold ``columns`` with the contract's dtypes (checked once per Arrow schema, per
    frame for pandas), no nulls outside string columns and labels in {0, 1}; an error names the source
    and the column as :func:`check_raw_table` does, then the batch's rows ("... (events rows 1-10)").
    The pass counts the rows and keeps the first and last event time; :meth:`finish` fails on an empty
    pass naming the source. The last failure stays in :attr:`error` for a reader that wraps it (DuckDB,
    scanning the batches, raises its own error naming the Python one).
    """

    def __init__(self, source: str | Path, columns: Iterable[str] = RAW_COLUMNS["events"]) -> None:
        self.source = source
        self.columns = list(columns)
        self.rows = 0
        self.first_time: pd.Timestamp | None = None
        self.last_time: pd.Timestamp | None = None
        self.error: DataContractError | None = None
        self._next = 0  # the source row after the last batch
        self._schema: pa.Schema | None = None  # the last Arrow schema whose dtypes passed

    @staticmethod
    def rows_named(rows: range) -> str:
        """A batch's rows (1-based, as a person counts them), the suffix of its error messages."""
        return f"(events rows {rows.start + 1:,}-{rows.stop:,})"

    def check_columns(self, columns: list[str], rows: range) -> None:
        """Raise naming the batch's rows unless ``columns`` hold every column a batch must carry."""
        missing = [column for column in self.columns if column not in columns]
        if missing:
            problem = f"table 'events' is missing column(s) {missing}; found {columns}"
            self._fail(f"{self.source}: {problem} {self.rows_named(rows)}")

    def check(self, batch: pd.DataFrame | pa.RecordBatch, rows: range | None = None) -> None:
        """Check one batch; ``rows`` are its rows in the source (default: right after the last batch)."""
        rows = range(self._next, self._next + len(batch)) if rows is None else rows
        self._next = rows.stop
        try:
            self._check(batch, rows)
        except DataContractError as exc:
            self._fail(f"{exc} {self.rows_named(rows)}")

    def read(self, file: pq.ParquetFile, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """``file``'s record batches of :attr:`columns`, each checked before it is handed on; a file
        damaged mid-read raises naming it."""
        batches = file.iter_batches(batch_size=batch_rows, columns=self.columns)
        while True:
            try:
                with _readable_parquet(self.source):  # the read only: a contract error is not "unreadable"
                    batch = next(batches, None)
            except DataContractError as exc:
                self.error = exc
                raise
            if batch is None:
                return
            self.check(batch)
            yield batch

    def finish(self) -> None:
        """After the last batch: a pass that saw no rows is an error naming the source."""
        if not self.rows:
            self._fail(f"{self.source}: table 'events' is empty")

    def _check(self, batch: pd.DataFrame | pa.RecordBatch, rows: range) -> None:
        columns: dict[str, RawColumn]
        if isinstance(batch, pd.DataFrame):
            self.check_columns(list(batch.columns), rows)
            check_raw_dtypes("events", batch, self.source)
            columns = {name: batch[name] for name in self.columns}
        else:
            self.check_columns(batch.schema.names, rows)
            if self._schema is None or not batch.schema.equals(self._schema):
                check_raw_dtypes("events", batch.schema.empty_table().to_pandas(), self.source)
                self._schema = batch.schema
            columns = {name: batch.column(name) for name in self.columns}
        check_raw_values("events", columns, self.source)
        if len(batch) and TIMESTAMP in columns:
            low, high = _time_range(columns[TIMESTAMP])
            self.first_time = low if self.first_time is None else min(self.first_time, low)
            self.last_time = high if self.last_time is None else max(self.last_time, high)
        self.rows += len(batch)

    def _fail(self, message: str) -> None:
        self.error = DataContractError(message)
        raise self.error


def _time_range(column: RawColumn) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The earliest and latest of a non-null UTC timestamp column, as pandas Timestamps."""
    if isinstance(column, pd.Series):
        return column.min(), column.max()
    extremes = pc.min_max(column.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()))
    return pd.Timestamp(extremes["min"].as_py(), tz="UTC"), pd.Timestamp(extremes["max"].as_py(), tz="UTC")


def _null_count(column: RawColumn) -> int:
    return int(column.isna().sum()) if isinstance(column, pd.Series) else column.null_count


def _numpy(column: RawColumn) -> np.ndarray:
    if isinstance(column, pd.Series):
        return column.to_numpy()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False)


@contextmanager
def _readable_parquet(path: str | Path) -> Iterator[None]:
    if not Path(path).is_file():
        raise DataContractError(f"{path}: parquet file not found")
    try:
        yield
    # a truncated or damaged file raises ArrowInvalid, OSError, or (from the pandas metadata) a
    # UnicodeDecodeError or JSONDecodeError: all ValueError or OSError
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataContractError(f"{path}: not a readable parquet file: {exc}") from exc


_KIND_NAMES = {"i": "integer", "f": "float", "s": "string", "t": "UTC timestamp"}


def _has_kind(series: pd.Series, kind: str) -> bool:
    dtype = series.dtype
    if kind == "i":
        return pd.api.types.is_integer_dtype(dtype)
    if kind == "f":
        return pd.api.types.is_float_dtype(dtype) or pd.api.types.is_integer_dtype(dtype)
    if kind == "s":
        return pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype)
    if kind == "t":
        return isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC"
    raise AssertionError(kind)
