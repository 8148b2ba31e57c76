"""Which features engine at which size: the features step's seconds and peak RSS, ``features.engine:
local`` vs ``spark`` (local mode, this machine), at several event counts, with the outputs compared.

Run: ``python -m benchmarks.spark_crossover [--events 100000 1000000 3000000]``. Results go to
``benchmarks/results/spark_crossover.{json,md}``.

Each size generates the synthetic dataset with the ``large`` preset's shape (10 events per user, 100 per
item, 90 days), then runs ``python -m components.features`` once per engine in its own process. Peak
RSS is that process *tree*'s (Python + Spark's JVM, sampled every 0.1 s with psutil), the number that
competes for the machine's memory. After both runs every table is compared column by column: a size
where the engines disagree is reported, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import yaml

from components import ingest
from recsys.config import load_params
from recsys.contracts import FEATURE_TABLE_KEYS

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def shape(events: int) -> dict[str, Any]:
    """Overrides for ``events`` events in the ``large`` preset's shape."""
    return {
        "data.synthetic.preset": "large",
        "data.synthetic.n_events": events,
        "data.synthetic.n_users": max(1_000, events // 10),
        "data.synthetic.n_items": max(1_000, events // 100),
    }


def run_step(params_file: Path, raw: Path, out: Path) -> dict[str, float]:
    """``python -m components.features`` in its own process: wall seconds and the tree's peak RSS."""
    command = [sys.executable, "-m", "components.features", "--params", str(params_file)]
    command += ["--raw-dir", str(raw), "--features-dir", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(_rss(p) for p in tree))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2)}


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def differences(left: Path, right: Path) -> list[str]:
    """Tables or columns where the two engines' outputs differ (empty: identical, schema included)."""
    wrong = []
    for name in sorted(FEATURE_TABLE_KEYS):
        a = pq.read_table(left / f"{name}.parquet").replace_schema_metadata(None)
        b = pq.read_table(right / f"{name}.parquet").replace_schema_metadata(None)
        if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
            wrong.append(f"{name}: schema or row count")
            continue
        wrong += [f"{name}.{c}" for c in a.column_names if not a.column(c).equals(b.column(c))]
    return wrong


def measure(events: int, driver_memory: str) -> dict[str, Any]:
    params = load_params(ROOT / "params.yaml", overrides=shape(events))
    sizes = params.data.synthetic.sizes()
    with tempfile.TemporaryDirectory(prefix="spark-crossover-") as tmp:
        tmp_dir, raw = Path(tmp), Path(tmp) / "raw"
        started = time.perf_counter()
        ingest.run(params.data, params.seed, raw)
        generate_s = time.perf_counter() - started
        row: dict[str, Any] = {
            "events": sizes.n_events, "users": sizes.n_users, "items": sizes.n_items,
            "generate_s": round(generate_s, 1),
        }  # fmt: skip
        for engine in ("local", "spark"):
            features = params.features.model_dump(mode="json") | {"engine": engine}
            features["spark"]["driver_memory"] = driver_memory
            params_file = tmp_dir / f"{engine}.yaml"
            params_file.write_text(yaml.safe_dump({"features": features}))
            row[engine] = run_step(params_file, raw, tmp_dir / engine)
            print(f"{events:,} events, {engine}: {row[engine]}", flush=True)
        row["differences"] = differences(tmp_dir / "local", tmp_dir / "spark")
        local = tmp_dir / "local"
        row["feature_rows"] = {
            n: pq.read_metadata(local / f"{n}.parquet").num_rows for n in sorted(FEATURE_TABLE_KEYS)
        }
    row["load_average"] = round(os.getloadavg()[0], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", nargs="+", type=int, default=[100_000, 1_000_000, 3_000_000])
    parser.add_argument("--driver-memory", default="4g", help="Spark local mode's heap (features.spark)")
    parser.add_argument("--append", action="store_true", help="keep the other sizes of the last results")
    args = parser.parse_args(argv)
    runs = [measure(n, args.driver_memory) for n in args.events]
    previous = RESULTS / "spark_crossover.json"
    if args.append and previous.is_file():  # a long size measured on its own, added to the table
        kept = [r for r in json.loads(previous.read_text())["runs"] if r["events"] not in args.events]
        runs = sorted(kept + runs, key=lambda r: r["events"])
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": "python -m benchmarks.spark_crossover " + " ".join(argv or sys.argv[1:]),
        "commands": "each size once: --events 100000 1000000 3000000, then --events 10000000 --append",
        "spark": {"master": "local[*]", "driver_memory": args.driver_memory},
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spark_crossover.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Features step: local engine vs Spark (local mode) on one machine",
        "",
        f"Machine: {report['machine']}. Command: `python -m benchmarks.spark_crossover` "
        f"({report['commands']}). Each engine runs "
        "`python -m components.features` in its own process; peak RSS is the process tree's (Python + "
        f"JVM). Spark: `local[*]`, driver memory {args.driver_memory}.",
        "",
        "| events | users | items | local s | spark s | local peak GB | spark peak GB | identical | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r['events']:,} | {r['users']:,} | {r['items']:,} | {r['local']['seconds']} | "
            f"{r['spark']['seconds']} | {r['local']['peak_rss_gb']} | {r['spark']['peak_rss_gb']} | "
            f"{'yes' if not r['differences'] else ', '.join(r['differences'])} | {r['load_average']} |"
            for r in runs
        ),
        "",
        "`identical`: every table equal column by column, Arrow schema included. `load`: the 1-minute load "
        "average after the run (the 2 cores were shared with other jobs).",
    ]
    (RESULTS / "spark_crossover.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
