"""Seconds and peak RSS of the ingest step reading your own event logs (``data.source: events``).

Run: ``python -m benchmarks.events_source [--events 1000000 3000000] [--label after]``. Each size is a
generated log of that many events (users = events / 10, items = events / 100, 30 days at second
resolution, so users have many events in the same second) plus 5% exact duplicates with their own
labels, shuffled (out of order in and across files) and split into four Parquet parts (a timestamp column)
and two CSV parts (unix seconds). ``python -m components.ingest`` reads them in its own process under
``/usr/bin/time -v`` (its maximum resident set size is the step's peak RSS). Results are merged by
(label, events) into ``benchmarks/results/events_source.{json,md}``: a ``before`` label measured on the
code before a change stays next to the ``after`` one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import yaml

from benchmarks.child_runs import merge_run, timed_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START = 1_780_272_000  # 2026-06-01T00:00:00Z
DAYS = 30
DUPLICATES = 0.05
PARQUET_PARTS, CSV_PARTS = 4, 2
TARGET_RATIO = 2.5  # peak at 10x the events over the peak at 1x


def write_logs(events: int, folder: Path, seed: int = 0) -> None:
    """``events`` distinct-ish events plus duplicates, shuffled, as Parquet and CSV parts in ``folder``."""
    rng = np.random.default_rng(seed)
    user = rng.integers(1, events // 10 + 1, events)
    item = rng.integers(1, events // 100 + 1, events)
    second = START + rng.integers(0, DAYS * 86_400, events)
    label = (rng.random(events) < 0.1).astype(np.int64)
    copies = rng.choice(events, int(events * DUPLICATES), replace=False)
    user, item, second = (np.concatenate([a, a[copies]]) for a in (user, item, second))
    label = np.concatenate([label, (rng.random(len(copies)) < 0.5).astype(np.int64)])
    order = rng.permutation(len(user))
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(order, PARQUET_PARTS + CSV_PARTS)
    for k, rows in enumerate(parts):
        columns = {"user_id": user[rows], "item_id": item[rows], "label": label[rows]}
        if k < PARQUET_PARTS:
            stamps = pa.array(second[rows] * 1_000_000, pa.timestamp("us", tz="UTC"))
            table = pa.table({**columns, "timestamp": stamps})
            pq.write_table(table, folder / f"part-{k}.parquet", row_group_size=500_000)
        else:
            pa_csv.write_csv(pa.table({**columns, "timestamp": second[rows]}), folder / f"part-{k}.csv")


def events_params(folder: Path, run_dir: Path, root: Path) -> Path:
    """params.yaml with ``data.source: events`` reading the generated parts (the shipped mapping)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["source"] = "events"
    params["data"]["until"] = None
    params["data"]["events"]["paths"] = [str(folder / "*.parquet"), str(folder / "*.csv")]
    params["data"]["events"]["timestamp_unit"] = "s"
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_ingest(params: Path, raw_dir: Path, root: Path) -> dict[str, Any]:
    """``python -m components.ingest`` in a child process under ``/usr/bin/time -v``."""
    command = [sys.executable, "-m", "components.ingest", "--params", str(params), "--raw-dir", str(raw_dir)]
    result = timed_process(command, root, "ingest")
    return {**result, "events_out": pq.ParquetFile(raw_dir / "events.parquet").metadata.num_rows}


def measure(events: int, root: Path, scratch: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="events-source-", dir=scratch) as tmp:
        run_dir = Path(tmp)
        write_logs(events, run_dir / "logs")
        rows_in = sum(
            pq.ParquetFile(p).metadata.num_rows for p in sorted((run_dir / "logs").glob("*.parquet"))
        ) + sum(sum(1 for _ in p.open()) - 1 for p in sorted((run_dir / "logs").glob("*.csv")))
        result = run_ingest(events_params(run_dir / "logs", run_dir, root), run_dir / "raw", root)
        return {"events": events, "rows_in": rows_in, **result}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Events source: ingest of your own logs",
        "",
        f"`python -m components.ingest` with `data.source: events` in its own process (`/usr/bin/time -v`), "
        f"{report['machine']}. Logs: {PARQUET_PARTS} Parquet + {CSV_PARTS} CSV parts, shuffled, "
        f"{DUPLICATES:.0%} exact duplicates; users = events / 10, items = events / 100, {DAYS} days. "
        "Command: `python -m benchmarks.events_source --events ... --label ...`.",
        "",
        "| code | events | rows read | events written | seconds | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(report["runs"], key=lambda r: (r["label"], r["events"])):
        lines.append(
            f"| {run['label']} | {run['events']:,} | {run['rows_in']:,} | {run['events_out']:,} | "
            f"{run['seconds']:.1f} | {run['peak_rss_gb']:.2f} |"
        )
    lines += ["", "Peak RSS growth (largest over smallest size measured, per label):", ""]
    for label in sorted({r["label"] for r in report["runs"]}):
        runs = sorted((r for r in report["runs"] if r["label"] == label), key=lambda r: r["events"])
        if len(runs) >= 2:
            ratio = runs[-1]["peak_rss_gb"] / runs[0]["peak_rss_gb"]
            size = runs[-1]["events"] / runs[0]["events"]
            lines.append(f"- {label}: {ratio:.2f}x at {size:g}x the events")
    lines += ["", f"Target (issue 26): peak RSS at 10x the events <= {TARGET_RATIO}x.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", nargs="+", type=int, default=[1_000_000, 3_000_000])
    parser.add_argument("--label", default="after", help="names the code measured (before / after)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose ingest step runs")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the generated logs")
    parser.add_argument("--output", type=Path, default=RESULTS / "events_source.json", help="results JSON")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"runs": []}
    for events in args.events:
        run = {"label": args.label, **measure(events, args.root.resolve(), args.scratch)}
        print(run, flush=True)
        report = merge_run(args.output, run, _markdown)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
