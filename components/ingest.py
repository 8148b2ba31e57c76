"""Ingest step: write the raw ``users``, ``items`` and ``events`` tables from the configured source.

The three tables are checked against the raw contract and staged completely before any is renamed into
``data/raw/``, so a bad source never replaces good data with a partial set. The CLI prints a bad source,
a contract or checksum error, or a bad params file as one line (``ingest: <message>``) and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.artifact_io import staged_files
from recsys.config import ConfigError, DataConfig
from recsys.contracts import KNOWN_SINCE, RAW_TABLES, DataContractError, check_raw_table
from recsys.step_contract import STEPS
from sources import load_source

CONTRACT = STEPS["ingest"]

log = logging.getLogger(__name__)
WRITE_BATCH_ROWS = 1_000_000  # rows converted to Arrow and written (one row group) at a time


def run(data: DataConfig, seed: int, raw_dir: str | Path) -> dict[str, Path]:
    """Build the raw tables from ``data.source`` and write them to ``raw_dir``."""
    raw_dir = Path(raw_dir)
    started = time.perf_counter()
    tables = load_source(data, seed)
    if data.until is not None:
        tables = known_before(tables, pd.Timestamp(data.until))
    for name in RAW_TABLES:
        check_raw_table(name, tables[name], f"source '{data.source}'")
    _check_references(tables, data.source)
    paths = write_raw_tables({name: tables[name] for name in RAW_TABLES}, raw_dir)
    log.info(
        "ingest: %s -> %s (%s) in %.1fs",
        data.source,
        raw_dir,
        ", ".join(f"{name}={len(tables[name]):,}" for name in RAW_TABLES),
        time.perf_counter() - started,
    )
    return paths


def write_raw_tables(
    tables: dict[str, pd.DataFrame], raw_dir: Path, batch_rows: int = WRITE_BATCH_ROWS
) -> dict[str, Path]:
    """Write the tables all-or-nothing. Users and items (a row each) are written whole; the events are
    converted to Arrow ``batch_rows`` rows at a time (a row group each), so they never exist twice
    whole, as a frame and as an Arrow table."""
    with staged_files(raw_dir, list(tables)) as staged:
        for name, df in tables.items():
            if name != "events":
                pq.write_table(
                    pa.Table.from_pandas(df, preserve_index=False), staged[name], compression="zstd"
                )
                continue
            schema = pa.Schema.from_pandas(df, preserve_index=False)
            with pq.ParquetWriter(staged[name], schema, compression="zstd") as writer:
                for first in range(0, len(df), batch_rows):
                    part = df.iloc[first : first + batch_rows]
                    writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
    return {name: raw_dir / f"{name}.parquet" for name in tables}


def known_before(tables: dict[str, pd.DataFrame], until: pd.Timestamp) -> dict[str, pd.DataFrame]:
    """The tables as they stood before ``until``: users, items and events known strictly before it.

    A daily scheduled run trains on "the data up to day D"; two runs for two days see different data,
    with the synthetic source as with a real one. An empty result is a contract error naming the cut.
    """
    cut = {
        name: table[table[KNOWN_SINCE[name]] < until].reset_index(drop=True) for name, table in tables.items()
    }
    if cut["events"].empty:
        first = tables["events"][KNOWN_SINCE["events"]].min()
        raise DataContractError(f"data.until: {until} keeps no events (the first is at {first})")
    log.info("ingest: data until %s: %d of %d events", until, len(cut["events"]), len(tables["events"]))
    return cut


def _check_references(tables: dict[str, pd.DataFrame], source: str) -> None:
    """Every event must point at a known user and item; a dangling id is a broken source."""
    for key, table in (("user_id", "users"), ("item_id", "items")):
        unknown = ~tables["events"][key].isin(tables[table][key])
        if unknown.any():
            examples = tables["events"].loc[unknown, key].unique()[:5].tolist()
            raise DataContractError(
                f"source '{source}': {int(unknown.sum())} event(s) refer to {key} values missing from "
                f"table '{table}', e.g. {examples}"
            )


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
