"""Ingest step: write the raw ``users``, ``items`` and ``events`` tables from the configured source.

The source is streamed (sources/__init__.py ``stream_source``): users and items whole, the events a batch
at a time, each batch cut at ``data.until``, checked against the raw contract and the user and item
tables, and written as row groups, so memory follows the largest batch, not the log. The three files are
staged completely before any is renamed into ``data/raw/``, so a bad source (a bad batch late in the
stream included) never replaces good data with a partial set. The CLI prints a bad source, a contract or
checksum error, or a bad params file as one line (``ingest: <message>``) and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifact_io import staged_files
from recsys.config import ConfigError, DataConfig
from recsys.contracts import KNOWN_SINCE, DataContractError, EventBatches, check_raw_table
from recsys.step_contract import STEPS
from sources import stream_source

CONTRACT = STEPS["ingest"]

log = logging.getLogger(__name__)
WRITE_BATCH_ROWS = 1_000_000  # at most this many event rows converted to Arrow and written (a row group)


def run(data: DataConfig, seed: int, raw_dir: str | Path) -> dict[str, Path]:
    """Build the raw tables from ``data.source`` and write them to ``raw_dir``."""
    raw_dir = Path(raw_dir)
    started = time.perf_counter()
    source = stream_source(data, seed)
    label = f"source '{data.source}'"
    until = None if data.until is None else pd.Timestamp(data.until)
    entities = {"users": source.users, "items": source.items}
    if until is not None:
        entities = {name: known_before(table, name, until) for name, table in entities.items()}
    for name, table in entities.items():
        check_raw_table(name, table, label)
    counts = {name: len(table) for name, table in entities.items()} | {"events": 0}

    def counted(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            counts["events"] += len(batch)
            yield batch

    checked = counted(checked_events(source.events, entities, label, until))
    created = not raw_dir.exists()
    try:
        paths = write_raw_tables(entities, checked, raw_dir)
    except BaseException:
        if created:  # a failed first run leaves no empty folder behind either
            _remove_if_empty(raw_dir)
        raise
    log.info(
        "ingest: %s -> %s (%s) in %.1fs",
        data.source,
        raw_dir,
        ", ".join(f"{name}={count:,}" for name, count in counts.items()),
        time.perf_counter() - started,
    )
    return paths


def checked_events(
    batches: Iterable[pd.DataFrame],
    entities: dict[str, pd.DataFrame],
    label: str,
    until: pd.Timestamp | None = None,
) -> Iterator[pd.DataFrame]:
    """The event batches cut at ``until`` and checked one at a time: the raw contract
    (:class:`recsys.contracts.EventBatches`, as every step checks the events) and the references to
    ``entities``, each error naming ``label`` and the batch's rows in the source's order (before the
    cut). After the last batch, an empty result is an error (naming the cut where there is one)."""
    known = {key: entities[table][key].to_numpy() for key, table in _REFERENCES}
    checker = EventBatches(label)
    read = 0
    first_time: pd.Timestamp | None = None
    for batch in batches:
        rows = range(read, read + len(batch))
        read = rows.stop
        checker.check_columns(list(batch.columns), rows)
        if until is not None and len(batch):
            earliest = batch[KNOWN_SINCE["events"]].min()
            first_time = earliest if first_time is None else min(first_time, earliest)
            batch = known_before(batch, "events", until)
        if batch.empty:
            continue
        checker.check(batch, rows)
        _check_references(batch, known, label, checker.rows_named(rows))
        yield batch
    if checker.rows == 0 and until is not None and read:
        raise DataContractError(f"data.until: {until} keeps no events (the first is at {first_time})")
    checker.finish()
    if until is not None:
        log.info("ingest: data until %s: %d of %d events", until, checker.rows, read)


def write_raw_tables(
    entities: dict[str, pd.DataFrame],
    events: Iterable[pd.DataFrame],
    raw_dir: Path,
    batch_rows: int = WRITE_BATCH_ROWS,
) -> dict[str, Path]:
    """Write the tables all-or-nothing. Users and items (a row each) are written whole; the events batch
    by batch, each converted to Arrow ``batch_rows`` rows at a time (a row group each), so they never
    exist whole, as a frame or as an Arrow table. The schema is the first batch's."""
    names = [*entities, "events"]
    with staged_files(raw_dir, names) as staged:
        for name, df in entities.items():
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), staged[name], compression="zstd")
        writer: pq.ParquetWriter | None = None
        try:
            for batch in events:
                if writer is None:
                    schema = pa.Schema.from_pandas(batch, preserve_index=False)
                    writer = pq.ParquetWriter(staged["events"], schema, compression="zstd")
                for first in range(0, len(batch), batch_rows):
                    part = batch.iloc[first : first + batch_rows]
                    writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise DataContractError(f"{raw_dir / 'events.parquet'}: no event batch to write")
    return {name: raw_dir / f"{name}.parquet" for name in names}


def known_before(table: pd.DataFrame, name: str, until: pd.Timestamp) -> pd.DataFrame:
    """The rows of raw table ``name`` known strictly before ``until`` (users signed up, items created,
    events logged). A daily scheduled run trains on "the data up to day D"; two runs for two days see
    different data, with the synthetic source as with a real one."""
    return table[table[KNOWN_SINCE[name]] < until].reset_index(drop=True)


# event column -> the table whose ids it must name
_REFERENCES = (("user_id", "users"), ("item_id", "items"))


def _check_references(batch: pd.DataFrame, known: dict[str, np.ndarray], label: str, rows: str) -> None:
    """Every event must point at a known user and item; a dangling id is a broken source."""
    for key, table in _REFERENCES:
        unknown = ~batch[key].isin(known[key])
        if unknown.any():
            examples = batch.loc[unknown, key].unique()[:5].tolist()
            raise DataContractError(
                f"{label}: {int(unknown.sum())} event(s) refer to {key} values missing from "
                f"table '{table}', e.g. {examples} {rows}"
            )


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (or gone): leave it
        directory.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = CONTRACT.load(args.params)
        run(params.data, params.seed, **CONTRACT.paths(args))
    except (ConfigError, DataContractError) as exc:  # DataContractError covers download + checksum errors
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
