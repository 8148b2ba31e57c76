"""Point-in-time joins through Feast's ``get_historical_features``, posed so the engine's cost stays linear.

Feast joins every feature as of the event time: the latest feature row with timestamp <= event time and
within the view's TTL. The result is left-joined back onto the entity frame by ``row_id`` and missing
features get the contract's explicit defaults ("" / 0 / empty list): every event is kept once, whatever
the offline store does with an entity row that has no feature row (the DuckDB and Spark stores return it
with nulls, the dask file store drops it).

How the join is posed (``benchmarks/feast_offline_stores.py`` has the numbers). A store's as-of join
pairs each entity row with every feature row of its entity before it filters by time and TTL, so its
cost is entity rows x feature rows per entity; the join is posed to keep that product small:

- one view at a time: Feast is asked for one view's features of the service per call. Views differ by
  orders of magnitude in rows per entity (one profile row against a history row per event), so each
  gets its own chunks (below), no view's columns ride through another view's join, and each view is
  timed on its own; the views come back in one frame by ``row_id``. The cheap views go first;
- time chunks, pruned: the time-ordered entity rows are cut into chunks, and each chunk is joined
  against only the feature rows it can use (``recsys.as_of_rows``: a sweep over the table in time
  order holding one row per entity and a window, not the table): per entity in the chunk, its last
  row before the chunk starts (unless older than the view's TTL allows for any event of the chunk)
  plus its rows inside the chunk's time range. Any other row is older than one of those (so never the
  latest <= the event time), beyond the TTL, or newer than every event of the chunk, so Feast's answer
  is unchanged;
  a test compares it with an unpruned join. A chunk is as long as keeps its candidate pairs within
  ``training_set.chunk_rows`` (``chunk_bounds``);
- chunks batched: a batch of up to ``training_set.call_rows`` entity rows is one Feast call, each chunk's
  entity rows and pruned feature rows under a join key of their own (chunk x entity, ``_join_view``),
  so a call costs the sum of its chunks' pairs, not their product, and the store's fixed cost per call
  (planning, reading the sources) is paid once per batch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no usage telemetry, set before Feast is imported

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureStore, RepoConfig
from feast.types import Array, Float32, Float64, Int32, Int64, String

from recsys.as_of_rows import AsOfRows, TimeSorted, chunk_bounds, duckdb_settings_sql
from recsys.as_of_rows import ns as _ns
from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    MISSING_CATEGORY,
    NUMBER_DEFAULT,
    TIMESTAMP,
)
from recsys.feature_store import staging_config
from recsys.training_data import ENTITY_COLUMNS

log = logging.getLogger(__name__)

# Join order: the views with one row per entity first, then the daily snapshots, the history (a row per
# event, list-valued) last. Each view is its own call, so the order changes no value, only when the
# largest intermediate results are built.
VIEW_ORDER = ("user_profile", "item_profile", "user_stats", "item_stats", "user_history")


@dataclass
class JoinStats:
    """What a join did, per feature view: rows that got defaults, seconds."""

    defaulted_rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def historical_features(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    service: str,
    sources: Mapping[str, pa.Table | TimeSorted],
    build_repo: Callable[[Path], Any],
    chunk_rows: int,
    call_rows: int,
) -> tuple[pd.DataFrame, JoinStats]:
    """Feast's as-of join for every entity row (kept exactly once, defaults filled), view by view.

    ``build_repo(features_dir)`` builds the definitions over a directory of feature tables (the pruned
    copies live in one). ``chunk_rows`` bounds the candidate pairs of one time chunk, ``call_rows`` the
    entity rows of one Feast call. Returns the frame in ``row_id`` order and the per-view statistics.
    The whole result in one pandas frame: for tests and small data; the training-set step writes
    :func:`historical_batches` as they come.
    """
    stats = JoinStats()
    batches = list(
        historical_batches(store, entity_df, service, sources, build_repo, chunk_rows, call_rows, stats)
    )
    table = pa.concat_tables(batches)
    table = table.take(pa.array(np.argsort(table.column("row_id").to_numpy(), kind="stable")))
    return table.to_pandas(), stats


def historical_batches(
    store: FeatureStore,
    entity_df: pd.DataFrame | Iterable[pd.DataFrame],
    service: str,
    sources: Mapping[str, pa.Table | TimeSorted],
    build_repo: Callable[[Path], Any],
    chunk_rows: int,
    call_rows: int,
    stats: JoinStats,
) -> Iterator[pa.Table]:
    """The join in batches of at most ``call_rows`` time-ordered entity rows, each an Arrow table in the
    contract's schema (:func:`training_schema`, defaults filled), in (event time, ``row_id``) order.

    Memory follows the batch, not the events: a batch's views are joined, aligned by ``row_id`` and
    filled in Arrow (list columns never become Python objects), and the caller writes it before the
    next is built. ``entity_df`` is one frame (sorted here) or frames already in (event time,
    ``row_id``) order, read as they come; a source is a table in memory or a :class:`TimeSorted` copy
    on disk, swept a record batch at a time (``recsys.as_of_rows``). ``stats`` accumulates the rows
    given defaults and the seconds per view.
    """
    with tempfile.TemporaryDirectory(prefix="feast-pit-") as tmp:
        staging_dir = Path(tmp)
        repo = build_repo(staging_dir)
        applied = sorted(_service_refs(store.get_feature_service(service)))
        staged = sorted(_service_refs(repo.services[service]))
        if applied != staged:
            raise RuntimeError(f"feature service '{service}': registry and definitions disagree")
        features = _features_by_view(repo.services[service])
        for name in features:  # the staged sources exist (with their schema) before apply
            pq.write_table(_schema(sources[name]).empty_table(), staging_dir / f"{name}.parquet")
        staging = _staging_store(store.config, staging_dir)
        staging.apply(repo.objects())
        views = sorted(features, key=VIEW_ORDER.index)
        rows = {
            name: AsOfRows(sources[name], FEATURE_TABLE_KEYS[name], _ttl_ns(repo.views[name].ttl))
            for name in views
        }
        for name in views:
            stats.seconds.setdefault(name, 0.0)
            stats.defaulted_rows.setdefault(name, 0)
        schema = training_schema(repo)
        done = 0
        for batch in _entity_batches(entity_df, call_rows):
            row_ids = batch["row_id"].to_numpy()
            joined: dict[str, pa.Array | pa.ChunkedArray] = {}
            for name in views:
                t0 = time.perf_counter()
                view_rows = _join_view(
                    staging,
                    staging_dir / f"{name}.parquet",
                    name,
                    features[name],
                    batch,
                    rows[name],
                    chunk_rows,
                )
                aligned = _align(view_rows, row_ids, name)  # rows a store dropped: null
                if features[name]:
                    stats.defaulted_rows[name] += _all_null_rows(aligned, features[name])
                joined |= {feature: aligned.column(feature) for feature in features[name]}
                stats.seconds[name] = round(stats.seconds[name] + time.perf_counter() - t0, 3)
            yield _typed_batch(batch, joined, schema, repo)
            done += len(batch)
            log.info("point-in-time %s: %d rows", service, done)


def _entity_batches(
    entity_df: pd.DataFrame | Iterable[pd.DataFrame], call_rows: int
) -> Iterator[pd.DataFrame]:
    """Entity rows in (event time, ``row_id``) order, at most ``call_rows`` at a time: a frame is sorted
    and cut; frames that come one by one must already be in time order (checked, batch to batch)."""
    if isinstance(entity_df, pd.DataFrame):
        entity_df = [entity_df.sort_values([TIMESTAMP, "row_id"], kind="stable", ignore_index=True)]
    last = None
    for frame in entity_df:
        times = frame[TIMESTAMP]
        if len(frame) and ((last is not None and times.iloc[0] < last) or not times.is_monotonic_increasing):
            raise ValueError("entity rows must come in event-time order")
        if len(frame):
            last = times.iloc[-1]
        for first in range(0, len(frame), call_rows):
            yield frame.iloc[first : first + call_rows]


def _schema(source: pa.Table | TimeSorted) -> pa.Schema:
    return source.schema if isinstance(source, pa.Table) else pq.read_schema(source.path)


def _align(view_rows: pa.Table, row_ids: np.ndarray, name: str) -> pa.Table:
    """``view_rows`` in the order of ``row_ids``, a null row where the store returned none; a repeated
    ``row_id`` is a broken join, never a double-counted event."""
    got = view_rows.column("row_id").to_numpy()
    if len(np.unique(got)) != len(got):
        raise RuntimeError(f"feature view '{name}': get_historical_features repeated a row_id")
    order = np.argsort(row_ids, kind="stable")
    at = np.searchsorted(row_ids, got, sorter=order).clip(max=max(len(row_ids) - 1, 0))
    known = row_ids[order[at]] == got if len(row_ids) else np.zeros(0, dtype=bool)
    index = np.full(len(row_ids), -1, dtype=np.int64)
    index[order[at[known]]] = np.flatnonzero(known)
    return view_rows.take(pa.array(index, mask=index < 0))


def _all_null_rows(table: pa.Table, columns: list[str]) -> int:
    """Rows whose every column in ``columns`` is null: the view had no row for them."""
    null = np.ones(table.num_rows, dtype=bool)
    for column in columns:
        null &= table.column(column).is_null().to_numpy(zero_copy_only=False)
    return int(null.sum())


def _typed_batch(
    batch: pd.DataFrame, joined: dict[str, pa.Array | pa.ChunkedArray], schema: pa.Schema, repo: Any
) -> pa.Table:
    """A batch's entity columns and features in the contract's schema, missing values defaulted."""
    dtypes = _feature_dtypes(repo)
    columns: list[pa.Array | pa.ChunkedArray] = []
    for field_ in schema:
        if field_.name in joined:
            column = pc.cast(joined[field_.name], field_.type)
            columns.append(pc.fill_null(column, _default(dtypes[field_.name], field_.type)))
        else:
            columns.append(pa.Array.from_pandas(batch[field_.name]).cast(field_.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _default(dtype: Any, arrow_type: pa.DataType) -> pa.Scalar:
    """The contract's default for a missing value: "" for strings, 0 for numbers, [] for lists."""
    if isinstance(dtype, Array):
        return pa.scalar([], type=arrow_type)
    if dtype == String:
        return pa.scalar(MISSING_CATEGORY, type=arrow_type)
    return pa.scalar(NUMBER_DEFAULT, type=arrow_type)


def complete_training_rows(
    entity_df: pd.DataFrame, joined: pd.DataFrame, repo: Any
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Left-join Feast's rows back onto every entity row by ``row_id`` and fill missing features.

    A store may drop an entity row (the dask file store does when a view has no feature row within the
    TTL); a duplicated ``row_id`` would mean a broken join and raises instead of silently
    double-counting an event.
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


def _join_view(
    staging: FeatureStore,
    source_path: Path,
    name: str,
    features: list[str],
    entity_df: pd.DataFrame,
    rows: AsOfRows,
    chunk_rows: int,
) -> pa.Table:
    """One view's features for a batch of entity rows: its time chunks in one Feast call.

    The chunks share a table and an entity frame under *partitioned* join keys (chunk number x entity
    count + the entity's index): an entity row only meets the rows pruned for its own chunk, exactly as
    if each chunk were a call of its own, without a call's fixed cost per chunk. Chunk bounds come one at
    a time, each after the previous chunk's rows were taken, so ``rows`` holds no more than a chunk's
    window. Returns row_id + features, as Arrow (list columns stay Arrow lists).
    """
    key = rows.key
    times = _ns(pa.array(entity_df[TIMESTAMP]))
    if not len(times):
        return pa.table({"row_id": pa.array([], pa.int64()), **{f: pa.nulls(0) for f in features}})
    keys = entity_df[key].to_numpy()
    ids = np.union1d(rows.ids, keys)
    index = np.searchsorted(ids, keys)
    tables, chunk_of_row = [], np.empty(len(times), dtype=np.int64)
    for local, (start, end) in enumerate(chunk_bounds(times, keys, rows, chunk_rows)):
        chunk_of_row[start:end] = local
        usable = rows.rows_for(keys[start:end], int(times[start]), int(times[end - 1]))
        partitioned = local * len(ids) + np.searchsorted(ids, usable.column(key).to_numpy())
        column = usable.schema.get_field_index(key)
        tables.append(usable.set_column(column, key, pa.array(partitioned, pa.int64())))
    pq.write_table(pa.concat_tables(tables), source_path, coerce_timestamps="us")
    del tables
    entity = pd.DataFrame(
        {
            "row_id": entity_df["row_id"].to_numpy(),
            key: chunk_of_row * len(ids) + index,
            TIMESTAMP: pd.to_datetime(times, utc=True),
        }
    )
    job = staging.get_historical_features(
        entity_df=entity, features=[f"{name}:{f}" for f in features], full_feature_names=False
    )
    return job.to_arrow().select(["row_id", *features])


def _chunk_bounds(
    times: np.ndarray, keys: np.ndarray, rows: AsOfRows, chunk_rows: int
) -> list[tuple[int, int]]:
    """All chunk bounds at once (``recsys.as_of_rows.chunk_bounds``; the join takes them one by one)."""
    return list(chunk_bounds(times, keys, rows, chunk_rows))


def _staging_store(config: RepoConfig, staging_dir: Path) -> FeatureStore:
    """A throwaway store (own registry) with the project's offline store, over the pruned tables."""
    online = {"type": "sqlite", "path": str(staging_dir / "online_store.db")}
    return FeatureStore(config=staging_config(config, staging_dir, online, provider="local"))


def _service_refs(service: Any) -> list[str]:
    return [f"{view}:{f}" for view, names in _features_by_view(service).items() for f in names]


def _features_by_view(service: Any) -> dict[str, list[str]]:
    return {p.name: [f.name for f in p.features] for p in service.feature_view_projections}


def _ttl_ns(ttl: Any) -> int | None:
    """A view's TTL in nanoseconds; None (or zero, Feast's "no TTL") keeps every older row."""
    if not ttl:
        return None
    return int(pd.Timedelta(ttl).value)


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


def training_schema(repo: Any) -> pa.Schema:
    """The contract's schema: entity columns, then every feature (no nulls)."""
    dtypes = _feature_dtypes(repo)
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("item_id", pa.int64()),
        pa.field(TIMESTAMP, pa.timestamp("ns", tz="UTC")),
        pa.field("label", pa.int64()),
    ] + [pa.field(name, _arrow_type(dtypes[name])) for name in feature_columns(repo)]
    return pa.schema(fields)


def typed_table(frame: pd.DataFrame, repo: Any) -> pa.Table:
    """A frame in the contract's schema (:func:`training_schema`)."""
    schema = training_schema(repo)
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def configure_duckdb(memory_limit: str | None, spill_dir: Path | None, threads: int | None = None) -> None:
    """Bound the DuckDB offline store's memory and let it spill to ``spill_dir``.

    Feast's DuckDB store runs its joins on ibis's default DuckDB connection (``ibis.read_parquet`` in
    feast/infra/offline_stores/duckdb.py), one per process, so the settings go on that connection; a
    join that outgrows ``memory_limit`` spills to ``spill_dir`` instead of growing the process.
    """
    import ibis

    con = ibis.get_backend()
    for statement in duckdb_settings_sql(memory_limit, spill_dir, threads):
        con.raw_sql(statement)


def duckdb_settings() -> dict[str, str]:
    """The DuckDB offline store's current memory limit, spill directory and threads (what was applied)."""
    import ibis

    names = ("memory_limit", "temp_directory", "threads")
    query = "SELECT " + ", ".join(f"current_setting('{n}')" for n in names)
    values = ibis.get_backend().raw_sql(query).fetchone()
    return {name: str(value) for name, value in zip(names, values, strict=True)}
