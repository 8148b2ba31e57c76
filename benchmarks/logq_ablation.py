"""Does log-Q correction help the two-tower on the skewed catalogue? Train it with and without, same data.

Run after `dvc repro` (needs data/training and data/features): ``python -m benchmarks.logq_ablation``.
Both variants are trained by the real train step with the same seed and evaluated by the evaluate step's
full-catalogue retrieval metrics on the test window; results go to benchmarks/results/logq_ablation.*.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from components import evaluate, train
from recsys import artifact_layout as layout
from recsys import training_data
from recsys.catalogue import item_catalogue
from recsys.config import load_params
from recsys.step_contract import STEPS

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    base = load_params()
    training_dir = layout.TRAINING_DIR
    test_start = training_data.test_start_of(training_dir)
    catalogue = item_catalogue(layout.FEATURES_DIR, test_start, base.feast.ttl_days.item_stats)
    ranking_test = training_data.read_split(training_dir, "ranking", "test")
    task = evaluate.retrieval_task(
        training_dir, ranking_test, catalogue, base.evaluation.ks, base.evaluation.exclude_seen
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for logq in (True, False):
            name = "log-Q corrected" if logq else "plain in-batch softmax"
            params = load_params(overrides={"models.two_tower.logq_correction": logq})
            out = Path(tmp) / str(logq)
            fitted = train.run(
                "two_tower", STEPS["train"].scope(params), training_dir, out, out / "m.json", out / "p.png"
            )
            rows[name] = {
                "epochs": fitted["epochs"],
                **evaluate.model_retrieval_metrics(out, task),
            }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "logq_ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    ks = base.evaluation.ks
    lines = [
        "| two-tower loss | "
        + " | ".join(f"recall@{k}" for k in ks)
        + " | "
        + " | ".join(f"ndcg@{k}" for k in ks)
        + " |",
        "|---|" + "---:|" * (2 * len(ks)),
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r[f'recall@{k}']:.4f}" for k in ks)
            + " | "
            + " | ".join(f"{r[f'ndcg@{k}']:.4f}" for k in ks)
            + " |"
        )
    lines += [
        "",
        "Default preset, full catalogue, items seen before the test window excluded; same seed and data. "
        "The baselines on the same task are in metrics/evaluation.json.",
    ]
    (RESULTS / "logq_ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
