"""Seconds and peak RSS of the data steps (ingest, features, training set), each in its own process.

Run: ``python -m benchmarks.step_memory [--events 1000000 3000000] [--label after]``. Each size is the
``large`` preset scaled to that many events (users = events / 10, items = events / 100, as ``large`` has
them at 10M); every step runs as ``python -m components.<step>`` under ``/usr/bin/time -v`` (its maximum
resident set size is the step's peak RSS, the child's own, not this process's). The Feast repo is copied
into the run folder, so its registry and online store are the run's. Results are merged by (label,
events) into ``benchmarks/results/step_memory.{json,md}``: a ``before`` label measured on the code before
a change stays next to the ``after`` one.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from benchmarks.child_runs import merge_run, timed_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STEPS = ("ingest", "features", "training_set")
TARGET_RATIO = 2.5  # peak at 10x the data over the peak at 1x
TARGET_GB = 6.0  # every step at 10M events


def sized_params(events: int, run_dir: Path, root: Path) -> Path:
    """params.yaml with the ``large`` preset scaled to ``events`` and the Feast repo copied into the run."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    synthetic = params["data"]["synthetic"]
    synthetic.update(preset="large", n_events=events, n_users=events // 10, n_items=events // 100)
    repo = run_dir / "feature_repo"
    shutil.copytree(root / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    params["feast"]["repo_path"] = str(repo)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _step_args(step: str, params: Path, run_dir: Path) -> list[str]:
    raw, feats, out = run_dir / "raw", run_dir / "features", run_dir / "training"
    args = {
        "ingest": ["--raw-dir", raw],
        "features": ["--raw-dir", raw, "--features-dir", feats],
        "training_set": [
            "--raw-dir",
            raw,
            "--features-dir",
            feats,
            "--output-dir",
            out,
            "--metrics-file",
            run_dir / "training_set.json",
            "--report-file",
            run_dir / "training_set.md",
        ],
    }[step]
    return ["--params", str(params), *map(str, args)]


def run_step(step: str, params: Path, run_dir: Path, root: Path) -> dict[str, Any]:
    """One step in a child process under ``/usr/bin/time -v``: its wall seconds and peak RSS."""
    command = [sys.executable, "-m", f"components.{step}", *_step_args(step, params, run_dir)]
    return timed_process(command, root, step)


def measure(
    events: int, root: Path, scratch: Path | None, steps_run: tuple[str, ...] = STEPS
) -> dict[str, Any]:
    """The steps in order (each reads the previous one's outputs) on the ``large`` preset at ``events``."""
    with tempfile.TemporaryDirectory(prefix="step-memory-", dir=scratch) as tmp:
        run_dir = Path(tmp)
        params = sized_params(events, run_dir, root)
        steps = {}
        for step in steps_run:
            steps[step] = run_step(step, params, run_dir, root)
            print(f"{events:,} events: {step} {steps[step]}", flush=True)
        return {"events": events, "users": events // 10, "items": events // 100, "steps": steps}


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Data-step memory",
        "",
        f"Each step in its own process (`/usr/bin/time -v`), {report['machine']}; the `large` preset scaled "
        "to the events (users = events / 10, items = events / 100). Command: "
        "`python -m benchmarks.step_memory --events ... --label ...`.",
        "",
        "| code | events | users | items | step | seconds | peak RSS (GB) |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for run in sorted(report["runs"], key=lambda r: (r["label"], r["events"])):
        for step, value in run["steps"].items():
            lines.append(
                f"| {run['label']} | {run['events']:,} | {run['users']:,} | {run['items']:,} | {step} | "
                f"{value['seconds']:.1f} | {value['peak_rss_gb']:.2f} |"
            )
    lines += ["", "Peak RSS growth per step (largest over smallest size measured, per label):", ""]
    lines += ["| code | " + " | ".join(STEPS) + " |", "|---|" + "---:|" * len(STEPS)]
    for label in sorted({r["label"] for r in report["runs"]}):
        runs = sorted((r for r in report["runs"] if r["label"] == label), key=lambda r: r["events"])
        if len(runs) < 2:
            continue
        cells = []
        for step in STEPS:
            both = [r for r in runs if step in r["steps"]]
            if len(both) < 2:
                cells.append("-")
                continue
            ratio = both[-1]["steps"][step]["peak_rss_gb"] / both[0]["steps"][step]["peak_rss_gb"]
            cells.append(f"{ratio:.2f}x ({both[0]['events'] / 1e6:g}M -> {both[-1]['events'] / 1e6:g}M)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Targets (issue 26): every step <= {TARGET_RATIO}x its peak at 10x the data, <= {TARGET_GB} GB at "
        "10M events.",
        "",
    ]
    if report.get("notes"):
        lines += [report["notes"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", nargs="+", type=int, default=[1_000_000, 3_000_000])
    parser.add_argument("--label", default="after", help="names the code measured (before / after)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose steps run")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the run's data")
    parser.add_argument(
        "--steps", nargs="+", choices=STEPS, default=list(STEPS), help="a prefix of the steps"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "step_memory.json", help="results JSON")
    args = parser.parse_args(argv)
    for events in args.events:
        run = {"label": args.label, **measure(events, args.root.resolve(), args.scratch, tuple(args.steps))}
        report = merge_run(args.output, run, _markdown)
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
