"""The feedback loop for N simulated days on the tiny preset: serve, log, retrain, gate, promote, restart.

``python -m benchmarks.feedback_loop --days 4 --always_promote [--exploration epsilon_greedy]`` builds the
tiny pipeline in a temporary folder with the real steps (ingest, features, Feast training sets + online
store, every model, evaluate, export, index, bundle), then runs ``python -m components.simulate --days``'s
loop there (components/simulate.py's ``run_days``: each day serve the promote store's current version and
the day-0 one (``frozen``) on loopback, simulate and log the day, retrain with dvc.yaml's commands, gate,
promote, restart). ``--always_promote`` promotes every retrain and records the gate's verdict (the gate
compares evaluation metrics on each run's own, newer test window, and the first window of logged feedback
is harder to rank than the generated one, so it rejects the first retrain).

Results: benchmarks/results/feedback_loop[_<exploration>].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from components import build_index, bundle, export, features, ingest, simulate, training_set
from recsys import artifact_layout as layout
from recsys.config import load_params
from recsys.step_contract import STEPS
from sources.synthetic import world
from tests.conftest import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
POLICIES = ("served", "frozen", "popular", "random", "oracle")
log = logging.getLogger("feedback_loop")


def build(params) -> Path:
    """Day 0's pipeline in the current folder, in-process (ingest to bundle); returns the bundle folder."""
    ingest.run(params.data, params.seed, layout.RAW_DIR)
    paths = {step: STEPS[step].reads | STEPS[step].writes for step in STEPS}
    features.run(params.features, **paths["features"])
    training_set.run(
        params.training_set, feast=params.feast, features=params.features, **paths["training_set"]
    )
    train_and_evaluate(params)
    export.run(STEPS["export"].scope(params), **paths["export"])
    build_index.run(params.index, params.seed, **paths["build_index"])
    bundle.run("params.yaml", layout.EVALUATION, layout.BUNDLE_DIR, layout.bundle_members())
    return layout.BUNDLE_DIR.resolve()


@contextmanager
def tiny_workdir(preset: str, epochs: int, keep: bool = False) -> Iterator:
    """A temporary working folder with the project's params (``preset``, ``epochs``) and Feast repo, made
    the current directory; yields the loaded params. Removed afterwards unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix="feedback-loop-"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    shutil.copytree(ROOT / "feature_repo", work / "feature_repo", ignore=shutil.ignore_patterns("data"))
    previous = Path.cwd()
    os.chdir(work)
    try:
        overrides = {"data.synthetic.preset": preset, "training.epochs": epochs, "index.tune_queries": 200}
        raw = yaml.safe_load(Path("params.yaml").read_text())
        for dotted, value in overrides.items():  # in the file too: the loop's steps read it
            section, _, key = dotted.rpartition(".")
            node = raw
            for part in section.split("."):
                node = node[part]
            node[key] = value
        Path("params.yaml").write_text(yaml.safe_dump(raw))
        yield load_params("params.yaml")
    finally:
        os.chdir(previous)
        if keep:
            log.info("working folder kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_loop(args) -> dict:
    """Day 0 built here, then components/simulate.py's loop (subprocess steps) for ``args.days`` days."""
    with tiny_workdir(args.preset, args.epochs, args.keep) as params:
        sim = world(params.data.synthetic, params.seed)
        t0 = time.perf_counter()
        build(params)
        exploration = {"policy": args.exploration, "epsilon": args.epsilon, "seed": 0}
        traffic = simulate.Traffic(0, args.requests, args.list_size, args.seed)

        def report_day(row: dict) -> None:
            row["elapsed_s"] = round(time.perf_counter() - t0, 1)
            log.info("day %d: %s", row["day"], {k: round(v["ctr"], 4) for k, v in row["metrics"].items()})

        days = simulate.run_days(
            Path.cwd(), sim, args.days, traffic, exploration, args.always_promote, on_day=report_day
        )
    return {
        "preset": args.preset,
        "days": args.days,
        "requests_per_day": args.requests,
        "list_size": args.list_size,
        "epochs": args.epochs,
        "exploration": args.exploration,
        "epsilon": args.epsilon if args.exploration == "epsilon_greedy" else None,
        "position_bias": "1/log2(slot + 2)",
        "always_promote": args.always_promote,
        "per_day": days,
    }


def write_results(report: dict, stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Feedback loop, preset {report['preset']}, {report['requests_per_day']} requests/day, lists of "
        f"{report['list_size']}, exploration {report['exploration']}, "
        f"position bias {report['position_bias']}, "
        f"{'every retrain promoted' if report['always_promote'] else 'promoted only past the gate'}.",
        "",
        "| day | policy | CTR | expected CTR | coverage | Gini | top-10% share |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["per_day"]:
        for name, m in row["metrics"].items():
            lines.append(
                f"| {row['day']} | {name} | {m['ctr']:.4f} | {m['expected_ctr']:.4f} | {m['coverage']:.3f} | "
                f"{m['gini']:.3f} | {m['top10_share']:.3f} |"
            )
    gates = [
        f"after day {r['day']}: {'passed' if r['gate_passed'] else 'rejected'}"
        f"{'' if r['promoted'] == r['gate_passed'] else (' (promoted anyway)' if r['promoted'] else '')}"
        for r in report["per_day"]
        if "gate_passed" in r
    ]
    gaps = []
    for r in report["per_day"]:
        ctr = {name: m["expected_ctr"] for name, m in r["metrics"].items()}
        gaps.append(f"day {r['day']}: {ctr['served'] - ctr['frozen']:+.4f}")
    lines += [
        "",
        "Served minus frozen, expected CTR: " + ", ".join(gaps),
        "",
        "The gate on each retrain: " + (", ".join(gates) or "none"),
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    days = [r["day"] for r in report["per_day"]]
    for name in report["per_day"][0]["metrics"]:
        for ax, metric in zip(axes, ("expected_ctr", "coverage", "top10_share"), strict=True):
            ax.plot(days, [r["metrics"][name][metric] for r in report["per_day"]], marker="o", label=name)
            ax.set_title(metric)
            ax.set_xlabel("day")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.feedback_loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--list_size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exploration", default="none", choices=("none", "epsilon_greedy", "softmax"))
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--always_promote", action="store_true", help="promote every retrain, gate or not")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("FEAST_USAGE", "False")
    report = run_loop(args)
    stem = "feedback_loop" if args.exploration == "none" else f"feedback_loop_{args.exploration}"
    write_results(report, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
