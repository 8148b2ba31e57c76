"""How accurate are the off-policy estimates (components/ope.py), and do their intervals cover the truth?

``python -m benchmarks.ope_accuracy`` (about two minutes on 2 cores; needs no artifacts). The
synthetic ranking bandit of tests/ope_bandit.py has known click probabilities: the champion logs with an
exploration policy (softmax, epsilon-greedy at two epsilons), the challenger is served the same way on
other scores, and its true CTR is exact. At each log size, many independent logs are drawn and the
challenger's CTR is estimated by IPS, SNIPS and DR: reported are the bias, the RMSE, the mean interval
width and how often the 95% interval held the true value (and the paired difference interval the true
difference). Results go to benchmarks/results/ope_accuracy.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from components.ope import ESTIMATORS, estimate
from recsys.config import ExplorationConfig
from tests.ope_bandit import CHALLENGER, CHAMPION, EPSILON_GREEDY, POLICY, simulate, true_ctr

RESULTS = Path(__file__).parent / "results"
SIZES = {250: 200, 1_000: 200, 4_000: 200, 16_000: 100}  # logged requests -> independent runs
# the logging (and target) policies: softmax, epsilon-greedy, and epsilon-greedy with less exploration
POLICIES = {
    "softmax T=0.7": POLICY,
    "epsilon_greedy eps=0.5": EPSILON_GREEDY,
    "epsilon_greedy eps=0.3": EPSILON_GREEDY.model_copy(update={"epsilon": 0.3}),
}
CONFIDENCE = 0.95


def main() -> int:
    started = time.perf_counter()
    rng = np.random.default_rng(2026)
    rows, truths = [], {}
    for label, policy in POLICIES.items():
        truths[label] = {"challenger": true_ctr(CHALLENGER, policy), "champion": true_ctr(CHAMPION, policy)}
        rows += _scenario(label, policy, rng, truths[label]["challenger"], truths[label]["champion"])
    result = {
        "true_ctr": truths,
        "confidence": CONFIDENCE,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ope_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{CONFIDENCE:.0%} normal-approximation intervals over requests. True CTRs (challenger / champion): "
        + "; ".join(f"{label} {t['challenger']:.4f} / {t['champion']:.4f}" for label, t in truths.items()),
        "",
        "| policy | requests | runs | estimator | bias | RMSE | interval width | coverage "
        "| difference coverage | ESS slot 3 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['policy']} | {r['requests']} | {r['runs']} | {r['estimator']} | {r['bias']:+.4f} | "
        f"{r['rmse']:.4f} | {r['mean_interval_width']:.4f} | {r['coverage']:.2f} | "
        f"{r['difference_coverage']:.2f} | {r['median_ess_last_slot']:.0f} |"
        for r in rows
    ]
    lines += [
        "",
        "Synthetic ranking bandit of tests/ope_bandit.py: 8 candidates, 3 slots with position factors "
        "1/0.6/0.4; the champion logs with the policy, the challenger is served by the same policy on its "
        "own scores. Coverage: share of runs whose interval held the true value; difference coverage: the "
        "same for challenger - champion; ESS slot 3: median effective sample size of the deepest slot's "
        f"prefix weights. {result['seconds']} s in all.",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "ope_accuracy.md").write_text(text)
    print(text, end="")
    return 0


def _scenario(
    label: str, policy: ExplorationConfig, rng: np.random.Generator, truth: float, champion: float
) -> list[dict]:
    rows = []
    for n, runs in SIZES.items():
        values = {name: [] for name in ESTIMATORS}
        widths = {name: [] for name in ESTIMATORS}
        covered = {name: 0 for name in ESTIMATORS}
        delta_covered = {name: 0 for name in ESTIMATORS}
        champion_covered, ess = 0, []
        for _ in range(runs):
            report = estimate(simulate(n, rng, policy=policy), [CHALLENGER] * n, policy, CONFIDENCE)
            ess.append(report["effective_sample_size"][-1])
            champion_covered += report["champion"]["low"] <= champion <= report["champion"]["high"]
            for name, e in report["estimates"].items():
                values[name].append(e["ctr"])
                widths[name].append(e["high"] - e["low"])
                covered[name] += e["low"] <= truth <= e["high"]
                delta_covered[name] += e["delta_low"] <= truth - champion <= e["delta_high"]
        for name in ESTIMATORS:
            error = np.asarray(values[name]) - truth
            rows.append(
                {
                    "policy": label,
                    "requests": n,
                    "runs": runs,
                    "estimator": name,
                    "bias": float(error.mean()),
                    "rmse": float(np.sqrt(np.mean(error**2))),
                    "mean_interval_width": float(np.mean(widths[name])),
                    "coverage": covered[name] / runs,
                    "difference_coverage": delta_covered[name] / runs,
                    "champion_coverage": champion_covered / runs,
                    "median_ess_last_slot": float(np.median(ess)),
                }
            )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
