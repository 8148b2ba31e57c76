"""Off-policy estimates checked against the simulator's ground truth, through real servers on loopback.

``python -m benchmarks.ope_simulator [--budget_s 600]`` builds the tiny pipeline (the day-0 build of
benchmarks/feedback_loop.py: the real steps), then for each exploration policy (softmax, epsilon-greedy):

1. the **champion** (the bundle served with ranker ``--champion_ranker``) answers a simulated day's
   arrivals through ``python -m serving`` with ``serving.exploration`` on; its request log (propensities,
   candidates) and the simulator's clicks (components/simulate.py: the generator's click model with the
   DCG position bias) are the logged data;
2. the **challenger** (the same bundle's ``--challenger_ranker``, so the same retrieval and candidates,
   a different model ranking them) is scored on the logged candidates through its server's ranking
   endpoint (components.ope's ``--challenger-bundle`` path, recsys/ranking_client.py) and estimated
   (components/ope.py: IPS, SNIPS, DR, 95% intervals);
3. the challenger then **really serves** the same arrivals with the same click draws (common random
   numbers), the same exploration: its CTR there is the ground truth. The truth used for error and
   coverage is its expected CTR on those arrivals (true click probability x examination, per served slot,
   averaged over requests: no click noise); its realised CTR is reported beside it.

Every run is a new traffic seed (arrivals and click draws); the servers' exploration draws are fresh.
Reported per policy and estimator: bias, RMSE, mean interval width, coverage of the truth, coverage of
the true challenger-minus-champion difference, and the per-slot effective sample size.
Results: benchmarks/results/ope_simulator.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.feedback_loop import build, tiny_workdir
from components import ope, simulate
from recsys import artifact_layout as layout
from recsys.config import ExplorationConfig
from recsys.contracts import read_raw_tables
from recsys.ranking_client import bundle_server, ranking_scores
from recsys.request_records import read_request_log
from sources.synthetic import world

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("ope_simulator")


def _logged_rows(log_dir: Path, total: int, timeout_s: float = 60.0) -> pd.DataFrame:
    """The champion's request log once it holds ``total`` recommend rows (it flushes on an interval)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = read_request_log(str(log_dir)).to_pandas()
        rows = rows.loc[rows["endpoint"] == "recommend"]
        if len(rows) >= total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(rows) < total:
        raise RuntimeError(f"{log_dir}: {len(rows)} logged answers after {timeout_s}s, expected {total}")
    return rows.sort_values("time", kind="stable").reset_index(drop=True)


def _aligned(rows: pd.DataFrame, day: simulate.Day) -> pd.DataFrame:
    """The run's logged answers, checked to be the champion's lists of the day in arrival order."""
    if len(rows) != len(day.user_ids):
        raise RuntimeError(f"{len(rows)} logged answers for {len(day.user_ids)} arrivals")
    for r, row in enumerate(rows.itertuples()):
        items = day.lists["champion"][r, : len(row.item_ids)]
        if int(row.user_id) != int(day.user_ids[r]) or items.tolist() != list(row.item_ids):
            raise RuntimeError(f"arrival {r}: the request log's answer is not the served list")
    return rows


def _expected_per_request(sim, history: np.ndarray, users: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Per request, the true clicks per served slot in expectation: sum_k exam_k p(user, item_k) / K."""
    n, k = lists.shape
    p = sim.click_probability(
        np.repeat(users, k), np.maximum(lists.reshape(-1), 1), np.repeat(history, k, axis=0)
    ).reshape(n, k) * (lists > 0)
    shown = (lists > 0).sum(axis=1)
    return (p * simulate.examination(k)).sum(axis=1) / np.maximum(shown, 1)


def one_run(
    sim, raw: dict[str, pd.DataFrame], urls: dict[str, str], log_dir: Path, done: int, traffic, target
) -> dict[str, Any]:
    """One simulated day: the champion logs, OPE estimates the challenger, the challenger really serves."""
    policies = {name: simulate.server_policy(url, traffic.list_size) for name, url in urls.items()}
    day = simulate.simulate_day(sim, raw["events"], raw["items"], policies, traffic)
    rows = _aligned(_logged_rows(log_dir, done + traffic.requests).iloc[done:], day)
    usable = (rows["source"] == "model").to_numpy() & rows["candidate_ids"].notna().to_numpy()
    index = np.flatnonzero(usable)
    answers = rows.iloc[index].reset_index(drop=True)
    clicked = np.concatenate(
        [day.clicks["champion"][r, : len(items)] for r, items in zip(index, answers["item_ids"], strict=True)]
    )
    logs = ope.logged_requests(answers, clicked)
    scores = ranking_scores(urls["challenger"], logs.user_ids, logs.candidates)
    report = ope.estimate(logs, scores, target, 0.95)
    history = simulate.recent_clicked_categories(raw["events"], sim, len(sim.activity()))[day.user_ids]
    truth = {}
    for name in ("champion", "challenger"):
        lists = day.lists[name][index]
        expected = _expected_per_request(sim, history[index], day.user_ids[index], lists)
        realised = day.clicks[name][index].sum(axis=1) / np.maximum((lists > 0).sum(axis=1), 1)
        truth[name] = {"expected_ctr": float(expected.mean()), "ctr": float(realised.mean())}
    return {"seed": traffic.seed, "requests": len(index), "estimate": report, "truth": truth}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per estimator: error against the expected truth, interval width and coverage over the runs."""
    out = {}
    for name in ope.ESTIMATORS:
        errors, covered, delta_covered, widths = [], [], [], []
        for run in runs:
            e, truth = run["estimate"]["estimates"][name], run["truth"]
            target = truth["challenger"]["expected_ctr"]
            difference = target - truth["champion"]["expected_ctr"]
            errors.append(e["ctr"] - target)
            covered.append(e["low"] <= target <= e["high"])
            delta_covered.append(e["delta_low"] <= difference <= e["delta_high"])
            widths.append(e["high"] - e["low"])
        errors_a = np.asarray(errors)
        out[name] = {
            "bias": float(errors_a.mean()),
            "rmse": float(np.sqrt((errors_a**2).mean())),
            "mean_abs_error": float(np.abs(errors_a).mean()),
            "interval_width": float(np.mean(widths)),
            "coverage": float(np.mean(covered)),
            "difference_coverage": float(np.mean(delta_covered)),
        }
    return out


def run_policy(sim, raw, bundle_dir: Path, args, policy: str, start_s: int) -> dict[str, Any]:
    """Champion and challenger servers for ``policy``, ``args.runs`` simulated days against them."""
    work = Path.cwd()
    exploration = {"policy": policy, "epsilon": args.epsilon, "temperature": args.temperature, "seed": None}
    target = ExplorationConfig(**exploration)
    files = {}
    for name, ranker in (("champion", args.champion_ranker), ("challenger", args.challenger_ranker)):
        files[name] = simulate.serving_params(
            work / "params.yaml",
            work / f"serving-{policy}-{name}.yaml",
            exploration=exploration,
            default_ranker=ranker,
            request_log={"flush_interval_s": 0.5},
        )
    log_dir = work / f"request-log-{policy}"
    runs = []
    with (
        bundle_server(bundle_dir, files["champion"], request_log=str(log_dir)) as champion,
        bundle_server(bundle_dir, files["challenger"]) as challenger,
    ):
        urls = {"champion": champion, "challenger": challenger}
        stop_at = time.monotonic() + args.budget_s / len(args.policies)
        for seed in range(args.runs):
            if seed >= 2 and time.monotonic() > stop_at:  # as many runs as fit in the time budget
                break
            traffic = simulate.Traffic(start_s, args.requests, args.list_size, seed)
            run = one_run(sim, raw, urls, log_dir, seed * args.requests, traffic, target)
            runs.append(run)
            estimates = {k: round(v["ctr"], 4) for k, v in run["estimate"]["estimates"].items()}
            log.info("%s seed %d: truth %s, estimates %s", policy, seed, run["truth"], estimates)
    return {
        "policy": policy,
        "epsilon": args.epsilon if policy == "epsilon_greedy" else None,
        "temperature": args.temperature if policy == "softmax" else None,
        "runs": runs,
        "summary": summarise(runs),
        "effective_sample_size": np.mean(
            [r["estimate"]["effective_sample_size"] for r in runs], axis=0
        ).tolist(),
        "truth_mean": {
            name: float(np.mean([r["truth"][name]["expected_ctr"] for r in runs]))
            for name in ("champion", "challenger")
        },
    }


def write_results(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ope_simulator.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"OPE against the simulator's ground truth: preset {report['preset']}, {report['requests']} arrivals "
        f"per run, lists of {report['list_size']}, champion ranker {report['champion_ranker']}, challenger "
        f"ranker {report['challenger_ranker']} (same bundle, same retrieval), runs (traffic seeds) per "
        "policy as fitted the time budget, 95% intervals. Truth: the challenger really serving the same "
        "arrivals with the same click draws (expected CTR: true click probability x examination).",
        "",
        "| policy | runs | truth challenger / champion | estimator | bias | RMSE | interval width | coverage "
        "| difference coverage | ESS first / last slot |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for part in report["policies"]:
        label = part["policy"] + (
            f" eps={part['epsilon']}" if part["epsilon"] is not None else f" T={part['temperature']}"
        )
        truth = f"{part['truth_mean']['challenger']:.4f} / {part['truth_mean']['champion']:.4f}"
        ess = part["effective_sample_size"]
        for name, s in part["summary"].items():
            lines.append(
                f"| {label} | {len(part['runs'])} | {truth} | {name} | {s['bias']:+.4f} | {s['rmse']:.4f} | "
                f"{s['interval_width']:.4f} | {s['coverage']:.2f} | {s['difference_coverage']:.2f} | "
                f"{ess[0]:.0f} / {ess[-1]:.0f} |"
            )
    lines += ["", f"Command: `{report['command']}` ({report['elapsed_s']:.0f} s on a 2-core machine).", ""]
    (RESULTS / "ope_simulator.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ope_simulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=20, help="at most this many traffic seeds per policy")
    parser.add_argument(
        "--budget_s", type=float, default=600, help="serving time for all policies (at least 2 runs each)"
    )
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--list_size", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--policies", nargs="+", default=["softmax", "epsilon_greedy"])
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--champion_ranker", default="multi_tower")
    parser.add_argument("--challenger_ranker", default="dlrm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("FEAST_USAGE", "False")
    t0 = time.perf_counter()
    with tiny_workdir(args.preset, args.epochs) as params:
        bundle_dir = build(params)
        sim = world(params.data.synthetic, params.seed)
        raw = read_raw_tables(layout.RAW_DIR)
        start = simulate.first_day_start(raw["events"])
        policies = [run_policy(sim, raw, bundle_dir, args, policy, start) for policy in args.policies]
    report = {
        "preset": args.preset,
        "max_runs": args.runs,
        "budget_s": args.budget_s,
        "requests": args.requests,
        "list_size": args.list_size,
        "champion_ranker": args.champion_ranker,
        "challenger_ranker": args.challenger_ranker,
        "position_bias": "1/log2(slot + 2)",
        "policies": policies,
        "elapsed_s": time.perf_counter() - t0,
        "command": "python -m benchmarks.ope_simulator " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_results(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
