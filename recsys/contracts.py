"""Table contracts shared by every step: raw tables, feature tables and the defaults for missing features.

Raw tables are checked on write (ingest) and on read (features), so a malformed source fails with the
file and the column named instead of surfacing later as a shape error inside a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise DataContractError(
            f"{source}: table '{name}' is missing column(s) {missing}; found {list(df.columns)}"
        )
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


def read_raw_tables(raw_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read and check the three raw tables; a missing or malformed file is named in the error."""
    raw_dir = Path(raw_dir)
    tables = {}
    for name in RAW_TABLES:
        path = raw_dir / f"{name}.parquet"
        if not path.exists():
            raise DataContractError(f"{path}: raw table '{name}' not found (run the ingest step first)")
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataContractError(f"{path}: cannot be read as parquet: {exc}") from exc
        check_raw_table(name, df, path)
        tables[name] = df
    return tables


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
