"""Benchmarks whose every measured run is its own process (so its peak RSS is its own): the parent
re-invokes the module with ``--child <json>``; the child prints one JSON line of results."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_child_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one run, in its own process


def child_or_parent(
    args: argparse.Namespace,
    name: str,
    child_run: Callable[[dict[str, Any]], dict[str, Any]],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    markdown_table: Callable[[dict[str, Any]], str],
) -> int:
    """A child: its one run, printed. The parent: every run, written to ``args.out_dir/<name>.json|md``."""
    if args.child is not None:
        print(json.dumps(child_run(json.loads(args.child))), flush=True)
        return 0
    results = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / f"{name}.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return 0


def cpu_run_header(name: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a CPU training benchmark's results start with: the machine, torch and the data's shape."""
    import os

    import torch

    from benchmarks.train_throughput import _cpu_name

    return {
        "benchmark": name,
        "model": kind,
        "device": "cpu",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "base_rows": args.rows,
        "row_group_rows": args.row_group,
        "valid_rows": args.valid_rows,
        "epochs": args.epochs,
    }


def peak_rss_mib() -> dict[str, int]:
    """This process's peak RSS and its largest child's (a DataLoader worker), in MiB."""
    import resource

    return {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def run_child(module: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``python -m <module> --child <spec>`` from the checkout's root; the JSON line it printed last."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_process(command: list[str], cwd: Path, what: str) -> dict[str, float]:
    """``command`` under ``/usr/bin/time -v`` in ``cwd``: its wall seconds and peak RSS (GB, the child's own
    maximum resident set, not this process's); a failure raises with ``what`` and the tail of its stderr."""
    import re
    import subprocess

    done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak_kb / 1024**2, 2)}


def merge_run(path: Path, run: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """``run`` merged into the results JSON at ``path`` by (label, events), replacing an earlier run of the
    same pair, so a ``before`` label stays next to the ``after`` one; writes the JSON and its markdown."""
    import os
    import platform

    report = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    key = (run["label"], run["events"])
    report["runs"] = [r for r in report["runs"] if (r["label"], r["events"]) != key] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    return report
