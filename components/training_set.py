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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no usage telemetry, set before Feast is imported

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys.artifact_io import staged_parquet_writers, write_json, write_text
from recsys.config import FeastConfig, FeaturesConfig, TrainingSetConfig
from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    TIMESTAMP,
    DataContractError,
    check_raw_table,
)
from recsys.feature_store import (
    feature_repo,
    materialize_online_store,
    open_feature_store,
    read_feature_table,
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
    events = _read_events(Path(raw_dir) / "events.parquet")
    store = open_feature_store(feast)
    build_repo = functools.partial(feature_repo, feast, features)
    repo = build_repo(features_dir)
    store.apply(registered_repo(feast, features, features_dir).objects())  # feast.source_uri's copy if set
    cuts = split_cuts(events[TIMESTAMP], config)
    sources = {name: read_feature_table(features_dir, name) for name in FEATURE_TABLE_KEYS}
    configure_duckdb(config.duckdb_memory_limit, config.duckdb_spill_dir)

    report: dict[str, Any] = {"sets": {}, "seconds": {}, "view_seconds": {}, "defaulted_rows": {}}
    entity_rows: dict[str, int] = {}  # counted before the join: the validation gate compares with them
    frames = entity_frames(events)
    event_span = f"{events[TIMESTAMP].min()} .. {events[TIMESTAMP].max()}"
    del events
    schema = training_schema(repo)
    names = [f"{name}_{split}" for name in frames for split in SPLITS]
    summaries = {name: SplitSummary() for name in names}
    with staged_parquet_writers(output_dir, dict.fromkeys(names, schema)) as writers:
        for name in list(frames):
            entity_df = frames.pop(name)
            entity_split = cuts.split_of(entity_df[TIMESTAMP])
            entity_rows |= {f"{name}_{s}": int((entity_split == s).sum()) for s in SPLITS}
            del entity_split
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
            for split_name in SPLITS:
                if not summaries[f"{name}_{split_name}"].rows:
                    raise DataContractError(
                        f"training set '{name}': split '{split_name}' is empty; check training_set cut "
                        f"points (valid_start={cuts.valid_start}, test_start={cuts.test_start}) against "
                        f"the event times {event_span}"
                    )
            del entity_df
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
        start, end = materialize_online_store(store, sources, build_repo)
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


def _read_events(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataContractError(f"{path}: raw table 'events' not found (run the ingest step first)")
    events = pd.read_parquet(path)
    check_raw_table("events", events, path)
    return events


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
