"""Training-set step: point-in-time training sets from Feast's ``get_historical_features``.

The entity frames come from the events (ranking: every impression with its label; retrieval: the
positive events), each row carrying a ``row_id`` (the event's position in time order). Feast joins every
feature as of the event time: the latest feature row with timestamp <= event time and within the view's
TTL. The result is left-joined back onto the entity frame by ``row_id`` and missing features (no row
within the TTL) get the contract's explicit defaults ("" / 0 / empty list): every event is kept once,
whichever offline store (DuckDB locally, Spark on a cluster) ran the join.

Splits are by time (train < valid < test, cut points from params), written atomically with a manifest
that the validation step reads. The join, the defaults and the split run in Arrow on batches of
``training_set.call_rows`` entity rows, each written (a row group per split) before the next is built.
Nothing event-sized is held whole, and the events are read once: DuckDB (its own connection,
``training_set.duckdb_memory_limit``, spilling to ``duckdb_spill_dir``) sorts the event record batches
as the raw contract check hands them on, and writes time-ordered copies of the entity rows and of every
feature table to a scratch folder, which the batches and the join's sweep (recsys.as_of_rows) read a
record batch at a time.
Afterwards the online store is backfilled with ``materialize(start,
end)`` up to the end of the data, so serving reads the latest features.
The join itself is recsys.point_in_time's (its docstring says how it is posed to stay linear); the
report holds its seconds per feature view.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no usage telemetry, set before Feast is imported

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.artifact_io import staged_parquet_writers, write_json, write_text
from recsys.as_of_rows import duckdb_connection, time_sorted_copy
from recsys.config import FeastConfig, FeaturesConfig, TrainingSetConfig
from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    TIMESTAMP,
    DataContractError,
    EventBatches,
    open_events,
)
from recsys.feature_store import (
    feature_repo,
    feature_table_path,
    materialize_online_store,
    open_feature_store,
    registered_repo,
)
from recsys.point_in_time import (
    JoinStats,
    configure_duckdb,
    feature_columns,
    historical_batches,
    training_schema,
)
from recsys.step_contract import STEPS
from recsys.training_data import MANIFEST, SPLITS

CONTRACT = STEPS["training_set"]
ENTITY_BATCH_ROWS = 1 << 20  # event rows read (contract check) and sorted rows written at a time
ENTITY_COLUMNS = ("user_id", "item_id", TIMESTAMP, "label")  # what the sort reads of the events

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitCuts:
    """Time cut points: train < valid_start <= valid < test_start <= test."""

    valid_start: pd.Timestamp
    test_start: pd.Timestamp

    def split_of(self, timestamps: pd.Series) -> np.ndarray:
        """The split name of each timestamp."""
        return np.where(
            timestamps < self.valid_start, "train", np.where(timestamps < self.test_start, "valid", "test")
        )


def run(
    config: TrainingSetConfig,
    features_dir: str | Path,
    raw_dir: str | Path,
    output_dir: str | Path,
    *,
    feast: FeastConfig,
    features: FeaturesConfig,
    metrics_file: str | Path,
    report_file: str | Path,
) -> dict[str, Any]:
    """Build, split and write both training sets, then backfill the online store; returns the report."""
    started = time.perf_counter()
    features_dir = Path(features_dir).resolve()
    output_dir = Path(output_dir)
    events_path = Path(raw_dir) / "events.parquet"
    tables = {name: feature_table_path(features_dir, name) for name in FEATURE_TABLE_KEYS}
    if config.duckdb_spill_dir is not None:
        Path(config.duckdb_spill_dir).mkdir(parents=True, exist_ok=True)
    sorting = tempfile.TemporaryDirectory(prefix="training-set-", dir=config.duckdb_spill_dir)
    scratch = Path(sorting.name)
    t0 = time.perf_counter()
    con = duckdb_connection(config.duckdb_memory_limit, config.duckdb_spill_dir)
    try:  # time-ordered copies on disk: the join sweeps them, nothing is held whole
        entity_path = scratch / "entity_rows.parquet"
        checked = sorted_entity_rows(con, events_path, entity_path)  # the step's one read of the events
        sources = {
            name: time_sorted_copy(con, path, scratch / f"{name}.parquet", FEATURE_TABLE_KEYS[name])
            for name, path in tables.items()
        }
    except BaseException:
        sorting.cleanup()
        raise
    finally:
        con.close()
    first_event, last_event = checked.first_time, checked.last_time
    assert first_event is not None and last_event is not None  # finish() raised on no rows
    store = open_feature_store(feast)
    build_repo = functools.partial(feature_repo, feast, features)
    repo = build_repo(features_dir)
    store.apply(registered_repo(feast, features, features_dir).objects())  # feast.source_uri's copy if set
    cuts = split_cuts(pd.Series([first_event, last_event]), config)
    configure_duckdb(config.duckdb_memory_limit, config.duckdb_spill_dir)

    report: dict[str, Any] = {"sets": {}, "seconds": {}, "view_seconds": {}, "defaulted_rows": {}}
    report["seconds"]["sort"] = round(time.perf_counter() - t0, 2)
    entity_rows: dict[str, int] = {}  # counted before the join: the validation gate compares with them
    event_span = f"{first_event} .. {last_event}"
    schema = training_schema(repo)
    sets = ("retrieval", "ranking")
    names = [f"{name}_{split}" for name in sets for split in SPLITS]
    summaries = {name: SplitSummary() for name in names}
    with sorting, staged_parquet_writers(output_dir, dict.fromkeys(names, schema)) as writers:
        for name in sets:
            counts = dict.fromkeys(SPLITS, 0)
            entity_df = _counted(entity_batches(entity_path, name, config.call_rows), cuts, counts)
            t0 = time.perf_counter()
            stats = JoinStats()
            batches = historical_batches(
                store, entity_df, name, sources, build_repo, config.chunk_rows, config.call_rows, stats
            )
            for batch in batches:  # a batch is written (a row group per split) before the next is built
                split = cuts.split_of(pd.Series(batch.column(TIMESTAMP).to_pandas()))
                for split_name in SPLITS:
                    part = batch.filter(pa.array(split == split_name))
                    if part.num_rows:
                        writers[f"{name}_{split_name}"].write_table(part)
                        summaries[f"{name}_{split_name}"].add(part)
            report["seconds"][name] = round(time.perf_counter() - t0, 2)
            report["view_seconds"][name] = stats.seconds
            report["defaulted_rows"][name] = stats.defaulted_rows
            entity_rows |= {f"{name}_{s}": n for s, n in counts.items()}
            for split_name in SPLITS:
                if not summaries[f"{name}_{split_name}"].rows:
                    raise DataContractError(
                        f"training set '{name}': split '{split_name}' is empty; check training_set cut "
                        f"points (valid_start={cuts.valid_start}, test_start={cuts.test_start}) against "
                        f"the event times {event_span}"
                    )
    report["sets"] = {name: summaries[name].describe() for name in names}
    manifest = {
        "valid_start": cuts.valid_start.isoformat(),
        "test_start": cuts.test_start.isoformat(),
        "history_length": features.history_length,
        "entity_rows": entity_rows,
        "feature_columns": feature_columns(repo),
    }
    write_json(manifest, output_dir / MANIFEST)

    if feast.materialize:
        t0 = time.perf_counter()
        start, end = materialize_online_store(store, tables, build_repo)
        report["seconds"]["materialize"] = round(time.perf_counter() - t0, 2)
        report["materialized"] = {"start": start.isoformat(), "end": end.isoformat()}
    report["seconds"]["total"] = round(time.perf_counter() - started, 2)
    report["cuts"] = {"valid_start": manifest["valid_start"], "test_start": manifest["test_start"]}
    write_json(report, metrics_file)
    write_text(_markdown(report), report_file)
    log.info(
        "training_set: %s in %.1fs",
        ", ".join(f"{name}={info['rows']:,}" for name, info in report["sets"].items()),
        report["seconds"]["total"],
    )
    return report


def entity_frames(events: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Entity rows per training set, in time order; ``row_id`` is the event's index in that order."""
    ordered = events.sort_values([TIMESTAMP, "user_id", "item_id"], kind="stable", ignore_index=True)
    ranking = ordered[["user_id", "item_id", TIMESTAMP, "label"]].copy()
    ranking.insert(0, "row_id", np.arange(len(ranking), dtype=np.int64))
    ranking["label"] = ranking["label"].astype(np.int64)
    retrieval = ranking[ranking["label"] == 1].reset_index(drop=True)
    return {"retrieval": retrieval, "ranking": ranking}


def sorted_entity_rows(con: Any, events_path: Path, target: Path) -> EventBatches:
    """The events' entity columns written to ``target`` in :func:`entity_frames`'s order (time, user,
    item, then file order: pandas' stable sort), by DuckDB's external sort under its memory limit.

    The sort is the step's only read of the events: DuckDB scans an Arrow stream of the file's record
    batches, each checked against the raw contract as it passes (:class:`EventBatches`, returned with
    the row count and the first and last event time) and numbered in file order for the tie-break.
    """
    events = open_events(events_path)  # the footer (columns, dtypes, not empty) before any row
    checker = EventBatches(events_path, ENTITY_COLUMNS)
    fields = [events.schema_arrow.field(name) for name in ENTITY_COLUMNS]
    schema = pa.schema([*fields, pa.field("file_row_number", pa.int64())])

    def numbered() -> Iterator[pa.RecordBatch]:
        for batch in checker.read(events, ENTITY_BATCH_ROWS):
            numbers = np.arange(checker.rows - batch.num_rows, checker.rows, dtype=np.int64)
            columns = [batch.column(name) for name in ENTITY_COLUMNS]
            yield pa.RecordBatch.from_arrays([*columns, pa.array(numbers)], schema=schema)

    con.register("checked_events", pa.RecordBatchReader.from_batches(schema, numbered()))
    try:
        con.execute(
            f"COPY (SELECT user_id, item_id, {TIMESTAMP}, CAST(label AS BIGINT) AS label "
            f"FROM checked_events ORDER BY {TIMESTAMP}, user_id, item_id, file_row_number) TO '{target}' "
            f"(FORMAT parquet, ROW_GROUP_SIZE {ENTITY_BATCH_ROWS})"
        )
    except Exception:
        if checker.error is not None:  # DuckDB wraps the failure of the batch it was scanning
            raise checker.error from None
        raise
    finally:
        con.unregister("checked_events")
    checker.finish()
    return checker


def entity_batches(path: Path, name: str, call_rows: int) -> Iterator[pd.DataFrame]:
    """The entity frame of training set ``name`` (as :func:`entity_frames` builds it) from the sorted
    entity rows, in frames of ``call_rows`` rows (the last shorter): ``row_id`` counts the events in time
    order, retrieval keeps the positives with their ``row_id``."""
    pending: list[pd.DataFrame] = []
    held, row_id = 0, 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=min(call_rows, ENTITY_BATCH_ROWS)):
        frame = batch.to_pandas()
        frame.insert(0, "row_id", np.arange(row_id, row_id + len(frame), dtype=np.int64))
        row_id += len(frame)
        if name == "retrieval":
            frame = frame[frame["label"] == 1].reset_index(drop=True)
        pending.append(frame)
        held += len(frame)
        while held >= call_rows:
            whole = pd.concat(pending, ignore_index=True)
            yield whole.iloc[:call_rows].reset_index(drop=True)
            pending, held = [whole.iloc[call_rows:]], held - call_rows
    if held:
        yield pd.concat(pending, ignore_index=True)


def _counted(
    frames: Iterator[pd.DataFrame], cuts: SplitCuts, counts: dict[str, int]
) -> Iterator[pd.DataFrame]:
    """``frames`` unchanged, their rows per split added to ``counts`` before the join sees them."""
    for frame in frames:
        split = cuts.split_of(frame[TIMESTAMP])
        for name in counts:
            counts[name] += int((split == name).sum())
        yield frame


def split_cuts(timestamps: pd.Series, config: TrainingSetConfig) -> SplitCuts:
    """Cut points from params: explicit timestamps, else the last whole days by fraction."""
    if config.valid_start is not None and config.test_start is not None:
        return SplitCuts(pd.Timestamp(config.valid_start), pd.Timestamp(config.test_start))
    first_day = timestamps.min().floor("D")
    end_day = timestamps.max().floor("D") + pd.Timedelta(days=1)
    n_days = (end_day - first_day).days
    n_test = max(1, round(n_days * config.test_fraction))
    n_valid = max(1, round(n_days * config.valid_fraction))
    if n_test + n_valid >= n_days:
        raise DataContractError(
            f"events span {n_days} day(s): too few to split into train / valid ({n_valid} d) / test "
            f"({n_test} d); lower training_set.valid_fraction / test_fraction or give explicit cut points"
        )
    test_start = end_day - pd.Timedelta(days=n_test)
    return SplitCuts(test_start - pd.Timedelta(days=n_valid), test_start)


# ---- inputs and report ----------------------------------------------------------------------------


class SplitSummary:
    """A training set's report row, accumulated batch by batch (distinct users and items as sorted id
    arrays: they grow with users and items, not with events)."""

    def __init__(self) -> None:
        self.rows = 0
        self.positives = 0
        self.users = np.zeros(0, dtype=np.int64)
        self.items = np.zeros(0, dtype=np.int64)
        self.first: pd.Timestamp | None = None
        self.last: pd.Timestamp | None = None

    def add(self, part: pa.Table) -> None:
        self.rows += part.num_rows
        self.positives += int(pc.sum(part.column("label")).as_py())
        self.users = np.union1d(self.users, part.column("user_id").to_numpy())
        self.items = np.union1d(self.items, part.column("item_id").to_numpy())
        first, last = (pd.Timestamp(v.as_py()) for v in pc.min_max(part.column(TIMESTAMP)).values())
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)

    def describe(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positives": self.positives,
            "positive_rate": round(self.positives / self.rows, 6),
            "users": len(self.users),
            "items": len(self.items),
            "first_event": self.first.isoformat(),
            "last_event": self.last.isoformat(),
        }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Training sets",
        "",
        f"Split by event time: valid from {report['cuts']['valid_start']}, "
        f"test from {report['cuts']['test_start']}.",
        "",
        "| set | rows | positives | positive rate | users | items | first event | last event |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, info in report["sets"].items():
        lines.append(
            f"| {name} | {info['rows']:,} | {info['positives']:,} | {info['positive_rate']:.4f} | "
            f"{info['users']:,} | {info['items']:,} | {info['first_event']} | {info['last_event']} |"
        )
    lines += ["", "Rows given default values because a view had no row within its TTL:", ""]
    views = sorted({view for counts in report["defaulted_rows"].values() for view in counts})
    lines += ["| set | " + " | ".join(views) + " |", "|---|" + "---:|" * len(views)]
    for name, counts in report["defaulted_rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{counts[v]:,}" for v in views) + " |")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    lines += ["", f"Time: {seconds}.", "", "Point-in-time join, seconds per feature view:", ""]
    lines += ["| set | " + " | ".join(views) + " |", "|---|" + "---:|" * len(views)]
    for name, per_view in report["view_seconds"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_view.get(v, 0.0):.2f}" for v in views) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.training_set", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)
    params = CONTRACT.load(args.params)
    run(params.training_set, feast=params.feast, features=params.features, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
