"""Point-in-time joins through Feast's ``get_historical_features``, kept linear in the number of events.

Feast joins every feature as of the event time: the latest feature row with timestamp <= event time and
within the view's TTL. Its file offline store silently drops an entity row when a view has rows for the
entity but none inside the TTL window, so the result is left-joined back onto the entity frame by
``row_id`` and missing features get the contract's explicit defaults ("" / 0 / empty list): every event
is kept once.

Speed. Feast's file offline store merges each entity row with *every* feature row of its entity before
filtering by time, and dask re-hashes the merged frames at each of its many ``persist`` calls. Two
measures keep this linear (``benchmarks/training_set_validate.py`` has the numbers):

- the entity frame is cut into time-ordered chunks of at most ``training_set.chunk_rows`` rows (spanning
  at most as many rows of any feature table, see ``_chunk_bounds``), and each chunk
  is joined against a copy of the feature tables that holds only the rows the chunk can use: per entity
  in the chunk, its last row before the chunk starts plus its rows inside the chunk's time range. Any
  other row is older than one of those (so never the latest <= the event time) or newer than every event
  of the chunk, so Feast's answer is unchanged; a test compares it with an unpruned join. The copy also
  holds one null placeholder row per entity, so that a view with no row inside its TTL yields defaults
  for that view only instead of Feast dropping the event's other features with it (``_AsOfRows``);
- dask hashes object columns that hold arrays (the behaviour history) through Arrow instead of pickling
  them three times per ``persist``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no usage telemetry, set before Feast is imported

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig
from feast.types import Array, Float32, Float64, Int32, Int64, String

from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    MISSING_CATEGORY,
    NUMBER_DEFAULT,
    TIMESTAMP,
)
from recsys.training_data import ENTITY_COLUMNS

log = logging.getLogger(__name__)


def historical_features(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    service: str,
    sources: dict[str, pa.Table],
    build_repo: Callable[[Path], Any],
    chunk_rows: int,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Feast's as-of join for every entity row (kept exactly once, defaults filled), chunk by chunk.

    ``build_repo(features_dir)`` builds the definitions over a directory of feature tables (each chunk
    gets its own). Returns the frame in ``row_id`` order and, per feature view, how many rows got defaults.
    """
    _register_arrow_tokens()
    repo = build_repo(Path(tempfile.gettempdir()))
    applied = sorted(_service_refs(store.get_feature_service(service)))
    staged = sorted(_service_refs(repo.services[service]))
    if applied != staged:
        raise RuntimeError(f"feature service '{service}': registry and definitions disagree")
    entity_df = entity_df.sort_values([TIMESTAMP, "row_id"], kind="stable", ignore_index=True)
    slicers = {name: _AsOfRows(table, FEATURE_TABLE_KEYS[name]) for name, table in sources.items()}
    parts = []
    with tempfile.TemporaryDirectory(prefix="feast-chunks-") as tmp:
        for number, (start, end) in enumerate(_chunk_bounds(entity_df, slicers, chunk_rows)):
            chunk_dir = Path(tmp) / f"chunk_{number:06d}"
            parts.append(
                _join_chunk(store, entity_df.iloc[start:end], service, slicers, build_repo, chunk_dir)
            )
    joined = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row_id"])
    return complete_training_rows(entity_df, joined, repo)


def complete_training_rows(
    entity_df: pd.DataFrame, joined: pd.DataFrame, repo: Any
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Left-join Feast's rows back onto every entity row by ``row_id`` and fill missing features.

    Feast may drop an entity row (no feature row within the TTL); a duplicated ``row_id`` would mean a
    broken join and raises instead of silently double-counting an event.
    """
    columns = feature_columns(repo)
    missing = [c for c in ["row_id", *columns] if c not in joined.columns]
    if missing:
        raise RuntimeError(f"get_historical_features returned no column(s) {missing}")
    frame = entity_df[ENTITY_COLUMNS].merge(
        joined[["row_id", *columns]], on="row_id", how="left", validate="one_to_one"
    )
    defaulted = {
        view: int(frame[names].isna().all(axis=1).sum()) for view, names in repo.feature_names.items()
    }
    dtypes = _feature_dtypes(repo)
    for column in columns:
        frame[column] = _fill_default(frame[column], dtypes[column])
    return frame.sort_values("row_id", ignore_index=True), defaulted


def feature_columns(repo: Any) -> list[str]:
    """Feature columns in contract order: user profile, history, user stats, item profile, item stats."""
    order = ["user_profile", "user_history", "user_stats", "item_profile", "item_stats"]
    return [name for view in order for name in repo.feature_names[view]]


class _AsOfRows:
    """A feature table in time order, swept forward chunk by chunk to find the rows a chunk can use.

    ``latest`` holds, per entity, the index of its newest row before the current chunk's start; chunks
    must come in time order, so the whole sweep reads every row once.
    """

    def __init__(self, table: pa.Table, key: str):
        self.key = key
        order = np.argsort(_ns(table.column(TIMESTAMP)), kind="stable")
        self.table = table.take(pa.array(order))
        self.ts = _ns(self.table.column(TIMESTAMP))
        self.ids, self.slot = np.unique(self.table.column(key).to_numpy(), return_inverse=True)
        self.latest = np.full(len(self.ids), -1, dtype=np.int64)
        self.swept = 0

    def rows_for(self, keys: np.ndarray, t_first: int, t_last: int) -> pa.Table:
        end_before = int(np.searchsorted(self.ts, t_first, side="left"))
        if end_before < self.swept:
            raise RuntimeError("chunks must come in time order")
        span = np.arange(self.swept, end_before, dtype=np.int64)
        np.maximum.at(self.latest, self.slot[span], span)
        self.swept = end_before
        slots = np.intersect1d(np.unique(keys), self.ids, assume_unique=True, return_indices=True)[2]
        before = self.latest[slots]
        end_inside = int(np.searchsorted(self.ts, t_last, side="right"))
        inside = np.arange(end_before, end_inside, dtype=np.int64)
        inside = inside[np.isin(self.slot[inside], slots)]
        usable = self.table.take(pa.array(np.concatenate([before[before >= 0], inside])))
        return pa.concat_tables([usable, self._placeholders(np.unique(keys))])

    def _placeholders(self, keys: np.ndarray) -> pa.Table:
        """One row per entity with a null timestamp and null features.

        Feast's file offline store drops the whole entity row when every row of *one* view lies outside
        that view's TTL, losing the other views' features too; it keeps a match whose timestamp is null
        (its TTL filter lets nulls through). With a placeholder, the stale view comes back null (then
        defaults) and the row keeps its other features. A real row inside the TTL sorts after the null
        one and wins Feast's newest-row pick, so nothing else changes.
        """
        schema = self.table.schema
        columns = {name: pa.nulls(len(keys), type=schema.field(name).type) for name in schema.names}
        columns[self.key] = pa.array(keys, type=schema.field(self.key).type)
        return pa.table(columns, schema=schema)


def _chunk_bounds(
    entity_df: pd.DataFrame, slicers: dict[str, _AsOfRows], chunk_rows: int
) -> list[tuple[int, int]]:
    """Row ranges of the time-ordered entity frame: at most ``chunk_rows`` entity rows per chunk, and a
    time span holding at most ``chunk_rows`` rows of any feature table.

    The second bound matters for sparse entity frames (retrieval: positives only), whose chunks would
    otherwise span many days of feature rows; Feast's join cost grows with entity rows x feature rows.
    """
    times = _ns(pa.array(entity_df[TIMESTAMP]))
    bounds = []
    start = 0
    while start < len(times):
        limit = np.iinfo(np.int64).max
        for slicer in slicers.values():
            first = int(np.searchsorted(slicer.ts, times[start], side="left"))
            if first + chunk_rows < len(slicer.ts):
                limit = min(limit, int(slicer.ts[first + chunk_rows]))
        end = min(start + chunk_rows, int(np.searchsorted(times, limit, side="left")))
        end = max(end, start + 1)
        bounds.append((start, end))
        start = end
    return bounds


def _join_chunk(
    store: FeatureStore,
    chunk: pd.DataFrame,
    service: str,
    slicers: dict[str, _AsOfRows],
    build_repo: Callable[[Path], Any],
    chunk_dir: Path,
) -> pd.DataFrame:
    """One Feast ``get_historical_features`` call over the rows this chunk can use."""
    chunk_dir.mkdir(parents=True)
    t_first, t_last = (int(v) for v in _ns(pa.array(chunk[TIMESTAMP].iloc[[0, -1]])))
    for name, slicer in slicers.items():
        keys = chunk[FEATURE_TABLE_KEYS[name]].to_numpy()
        pq.write_table(slicer.rows_for(keys, t_first, t_last), chunk_dir / f"{name}.parquet")
    staging = _staging_store(store.config, chunk_dir)
    staged_repo = build_repo(chunk_dir)
    staging.apply(staged_repo.objects())
    job = staging.get_historical_features(
        entity_df=chunk.reset_index(drop=True),
        features=staging.get_feature_service(service),
        full_feature_names=False,
    )
    return job.to_df()


def _staging_store(config: RepoConfig, chunk_dir: Path) -> FeatureStore:
    """A throwaway store (own registry) with the project's offline store, over one chunk's tables."""
    staging = RepoConfig(
        project=config.project,
        provider="local",
        registry=str(chunk_dir / "registry.db"),
        online_store={"type": "sqlite", "path": str(chunk_dir / "online_store.db")},
        offline_store=config.offline_store.model_dump(),
        entity_key_serialization_version=config.entity_key_serialization_version,
        repo_path=chunk_dir,
    )
    return FeatureStore(config=staging)


def _service_refs(service: Any) -> list[str]:
    return [f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features]


def _feature_dtypes(repo: Any) -> dict[str, Any]:
    return {f.name: f.dtype for view in repo.views.values() for f in view.features}


def _arrow_type(dtype: Any) -> pa.DataType:
    if isinstance(dtype, Array):
        return pa.list_(_arrow_type(dtype.base_type))
    if dtype in (Int64, Int32):
        return pa.int64()
    if dtype in (Float64, Float32):
        return pa.float64()
    if dtype == String:
        return pa.string()
    raise TypeError(f"no training-set column type for Feast type {dtype}")


def _fill_default(series: pd.Series, dtype: Any) -> pd.Series:
    """The contract's default for a missing value: "" for strings, 0 for numbers, [] for lists."""
    missing = series.isna().to_numpy()
    if isinstance(dtype, Array):
        if not missing.any():
            return series
        values = series.to_numpy(dtype=object).copy()
        empty = np.array([], dtype=object if dtype.base_type == String else np.int64)
        for i in np.flatnonzero(missing):
            values[i] = empty
        return pd.Series(values, index=series.index)
    if dtype == String:
        return series.where(~missing, MISSING_CATEGORY).astype(object)
    if dtype in (Int64, Int32):
        return series.fillna(NUMBER_DEFAULT).astype(np.int64)
    return series.fillna(NUMBER_DEFAULT).astype(np.float64)


def typed_table(frame: pd.DataFrame, repo: Any) -> pa.Table:
    """The contract's schema: entity columns, then every feature (no nulls)."""
    dtypes = _feature_dtypes(repo)
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC")),
        pa.field("label", pa.int64()),
    ] + [pa.field(name, _arrow_type(dtypes[name])) for name in feature_columns(repo)]
    schema = pa.schema(fields)
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _ns(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.timestamp("ns", tz="UTC")).cast(pa.int64()).to_numpy()


_ARROW_TOKENS = False


def _register_arrow_tokens() -> None:
    """Let dask hash object columns holding arrays via Arrow (see the module docstring); once per process.

    Dask names each persisted frame by a hash of its content and pickles object columns for it; for the
    list-valued history that dominated the retrieval time. Any other array goes to dask's own hashing.
    """
    global _ARROW_TOKENS
    if _ARROW_TOKENS:
        return
    from dask.base import normalize_token
    from dask.hashing import hash_buffer_hex

    dask_normalize = normalize_token.dispatch(np.ndarray)  # also runs dask's lazy numpy registration

    def normalize_column(column: np.ndarray) -> Any:
        if column.size and isinstance(column.flat[0], np.ndarray | list):
            try:
                arrow = pa.array(column, from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                return dask_normalize(column)
            buffers = [hash_buffer_hex(b) for b in arrow.buffers() if b is not None]
            return ("arrow", str(arrow.type), len(arrow), buffers)
        return dask_normalize(column)

    def normalize_array(x: np.ndarray) -> Any:
        if x.dtype.hasobject and x.ndim == 1:
            return normalize_column(x)
        if x.dtype.hasobject and x.ndim == 2:  # a pandas block: one row per column
            return ("block", x.shape, [normalize_column(row) for row in x])
        return dask_normalize(x)

    normalize_token.register(np.ndarray, normalize_array)
    _ARROW_TOKENS = True
