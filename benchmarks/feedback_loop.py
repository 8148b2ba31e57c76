"""The feedback loop for N simulated days on the tiny preset: serve, log, retrain, gate, promote, restart.

``python -m benchmarks.feedback_loop --days 4 --always_promote [--exploration epsilon_greedy]`` builds the
tiny pipeline in a temporary folder with the real steps (ingest, features, Feast training sets + online
store, every model, evaluate, export, index, bundle), then each day:

1. **serve**: ``python -m serving`` on loopback for the promoted bundle (``served``) and one for the day-0
   bundle that never retrains (``frozen``), both on the same (refreshed) Feast online store;
2. **simulate + log**: components/simulate.py's day (same arrivals and click draws for ``served``,
   ``frozen``, ``popular``, ``random`` and ``oracle``); ``served``'s impressions and clicks are appended
   to ``data/raw`` (raw contract) and to ``data/raw/feedback.parquet`` with the bundle version;
3. **retrain** (not after the last day): features -> training_set (re-materialises the online store) ->
   train every model (``--epochs``) -> evaluate -> export -> build_index -> bundle. Skipped: ingest (the
   raw data is the generated period plus the logged feedback), the validate, search and OPE steps;
4. **gate + promote + deploy**: the gate step compares the new bundle with the served one; passed, the
   new bundle is served the next day (promote + deploy = a pointer flip and a server restart), else the
   served bundle stays; ``--always_promote`` promotes every retrain and records the gate's verdict
   (the gate compares evaluation metrics on each run's own, newer test window, and the first window of
   logged feedback is harder to rank than the generated one, so it rejects the first retrain).

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
from pathlib import Path

import yaml

from components import (
    build_index,
    bundle,
    export,
    features,
    gate,
    ingest,
    simulate,
    training_set,
)
from recsys import artifact_layout as layout
from recsys.config import load_params
from recsys.contracts import read_raw_tables
from recsys.step_contract import STEPS
from serving.local_server import free_port, start_server, stop_server
from sources.synthetic import DAY_S, world
from tests.conftest import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
POLICIES = ("served", "frozen", "popular", "random", "oracle")
log = logging.getLogger("feedback_loop")


def build(params, first: bool) -> Path:
    """The steps in the current folder; ``first`` adds the ingest. Returns the new bundle's folder."""
    if first:
        ingest.run(params.data, params.seed, layout.RAW_DIR)
    paths = {step: STEPS[step].reads | STEPS[step].writes for step in STEPS}
    features.run(params.features, **paths["features"])
    training_set.run(
        params.training_set, feast=params.feast, features=params.features, **paths["training_set"]
    )
    train_and_evaluate(params)
    export.run(STEPS["export"].scope(params), **paths["export"])
    build_index.run(params.index, params.seed, **paths["build_index"])
    out = Path("bundles") / f"bundle-{time.time_ns()}"
    bundle.run("params.yaml", layout.EVALUATION, out, layout.bundle_members())
    return out.resolve()


def serving_params(root: Path, exploration: str, epsilon: float) -> Path:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["feast"]["repo_path"] = str(root / "feature_repo")
    raw["serving"]["feast_timeout_s"] = 10.0
    raw["serving"]["exploration"] |= {"policy": exploration, "epsilon": epsilon, "seed": 0}
    path = root / "serving_params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_day(sim, params_file: Path, served: Path, frozen: Path, start: int, args) -> simulate.Day:
    """Both servers up, the day simulated, the feedback appended to data/raw, both servers down."""
    ports = {"served": free_port(), "frozen": free_port()}
    processes = {}
    try:
        for name, bundle_dir in (("served", served), ("frozen", frozen)):
            processes[name] = start_server(bundle_dir, params_file, ports[name])
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        traffic = simulate.Traffic(start, args.requests, args.list_size, args.seed)
        return simulate.run_day(sim, layout.RAW_DIR, layout.RAW_DIR, urls, traffic)
    finally:
        for process in processes.values():
            stop_server(process)


def run_loop(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="feedback-loop-"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    shutil.copytree(ROOT / "feature_repo", work / "feature_repo", ignore=shutil.ignore_patterns("data"))
    previous = Path.cwd()
    os.chdir(work)
    try:
        overrides = {
            "data.synthetic.preset": args.preset,
            "training.epochs": args.epochs,
            "index.tune_queries": 200,
        }
        params = load_params("params.yaml", overrides=overrides)
        raw = yaml.safe_load(Path("params.yaml").read_text())
        raw["data"]["synthetic"]["preset"] = args.preset
        Path("params.yaml").write_text(yaml.safe_dump(raw))
        sim = world(params.data.synthetic, params.seed)
        t0 = time.perf_counter()
        frozen = served = build(params, first=True)
        first_day = simulate.first_day_start(read_raw_tables(layout.RAW_DIR)["events"])
        params_file = serving_params(work, args.exploration, args.epsilon)
        days = []
        for day in range(args.days):
            result = one_day(sim, params_file, served, frozen, first_day + day * DAY_S, args)
            row = {"day": day, "served_version": result.versions["served"], "metrics": result.metrics}
            log.info("day %d: %s", day, {k: round(v["ctr"], 4) for k, v in result.metrics.items()})
            if day < args.days - 1:
                candidate = build(params, first=False)
                decision = gate.run(
                    params.gate,
                    metrics_file=layout.EVALUATION,
                    output=layout.GATE_DECISION,
                    deployed_bundle=str(served),
                )
                row["gate_passed"] = bool(decision["passed"])
                row["promoted"] = bool(decision["passed"] or args.always_promote)
                if row["promoted"]:
                    served = candidate
            row["elapsed_s"] = round(time.perf_counter() - t0, 1)
            days.append(row)
    finally:
        os.chdir(previous)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
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
