"""Table contracts shared by every step: raw tables, feature tables and the defaults for missing features.

Raw tables are checked on write (ingest) and on read (features), so a malformed source fails with the
file and the column named instead of surfacing later as a shape error inside a model. Parquet files are
read through :func:`read_parquet` / :func:`parquet_schema`, so a truncated or foreign file is named in
the error instead of surfacing as an Arrow traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
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


def check_raw_table(name: str, df: pd.DataFrame, source: str | Path) -> None:
    """Raise :class:`DataContractError` unless ``df`` satisfies the raw contract for table ``name``."""
    expected = RAW_COLUMNS[name]
    check_raw_columns(name, list(df.columns), source)
    if df.empty:
        raise DataContractError(f"{source}: table '{name}' is empty")
    for column, kind in expected.items():
        series = df[column]
        if not _has_kind(series, kind):
            raise DataContractError(
                f"{source}: column '{column}' of table '{name}' has dtype {series.dtype}, "
                f"expected {_KIND_NAMES[kind]}"
            )
        if kind != "s" and series.isna().any():
            raise DataContractError(
                f"{source}: column '{column}' of table '{name}' has {int(series.isna().sum())} null value(s)"
            )
    key = {"users": ["user_id"], "items": ["item_id"]}.get(name)
    if key and df.duplicated(key).any():
        dupes = df.loc[df.duplicated(key), key[0]].head(5).tolist()
        raise DataContractError(f"{source}: table '{name}' has duplicate {key[0]} values, e.g. {dupes}")
    if name == "events":
        bad = ~df["label"].isin([0, 1])
        if bad.any():
            raise DataContractError(
                f"{source}: column 'label' of table 'events' must be 0 or 1, "
                f"found {sorted(df.loc[bad, 'label'].unique().tolist())[:5]}"
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
