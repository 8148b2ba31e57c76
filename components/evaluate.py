"""Evaluate step: every model on the test window, each next to a baseline computed on the same split.

- **Retrieval** (two-tower): full-catalogue Recall@K, NDCG@K and HitRate@K over every item, not a sampled
  candidate set. Each test user is embedded with the features as of their first test event (point in
  time); the relevant items are the ones they click in the test window; items they clicked before it
  are excluded (``evaluation.exclude_seen``). The baseline ranks the catalogue by training clicks.
- **Ranking**: AUC, GAUC (per-user AUC weighted by impressions) and logloss on every test impression,
  next to two baselines fitted on the training split: an item-CTR baseline (smoothed training CTR of the
  item) and a logistic regression on user + item one-hot (models/baselines.py); the same on the test
  rows of users with a click history (``with_history``).

The item catalogue is taken as of the test start: profiles plus the latest statistics snapshot before
it (within the stats TTL), so no test-window click leaks into the item features.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.registry import RANKERS, RETRIEVAL_MODEL
from recsys import artifact_layout as layout
from recsys.artifact_io import write_json
from recsys.catalogue import item_catalogue
from recsys.contracts import TIMESTAMP
from recsys.step_contract import STEPS, StepParams
from recsys.training_data import read_split, test_start_of

CONTRACT = STEPS["evaluate"]

log = logging.getLogger(__name__)


def run(
    params: StepParams,
    training_dir: str | Path,
    models_dir: str | Path,
    features_dir: str | Path,
    output: str | Path,
) -> dict[str, Any]:
    """Write ``output`` (metrics/evaluation.json) with retrieval and ranking metrics next to their
    baselines."""
    training_dir, models_dir, features_dir = Path(training_dir), Path(models_dir), Path(features_dir)
    cfg = params.evaluation
    ranking_test = read_split(training_dir, "ranking", "test")
    test_start = test_start_of(training_dir)
    catalogue = item_catalogue(features_dir, test_start, params.feast.ttl_days.item_stats)

    report: dict[str, Any] = {"test_start": test_start.isoformat(), "catalogue_items": len(catalogue)}
    report["retrieval"] = evaluate_retrieval(
        layout.model_dir(RETRIEVAL_MODEL, models_dir),
        training_dir,
        ranking_test,
        catalogue,
        cfg.ks,
        cfg.exclude_seen,
    )
    report["ranking"] = evaluate_rankers(
        models_dir, training_dir, ranking_test, params.training.eval_batch_size
    )
    write_json(report, output)
    log.info("evaluate: %s", json.dumps(report, indent=1))
    return report


def evaluate_retrieval(
    model_dir: Path,
    training_dir: Path,
    ranking_test: pd.DataFrame,
    catalogue: pd.DataFrame,
    ks: list[int],
    exclude_seen: bool,
) -> dict[str, Any]:
    from models import ItemSets, full_catalogue_topk, load_model, retrieval_metrics

    model, encoder = load_model(model_dir)
    positives = read_split(training_dir, "retrieval", "test")
    past = pd.concat(
        [read_split(training_dir, "retrieval", s)[["user_id", "item_id"]] for s in ("train", "valid")]
    )

    first_rows = ranking_test.sort_values([TIMESTAMP, "row_id"]).drop_duplicates("user_id")
    users = first_rows[first_rows["user_id"].isin(positives["user_id"])].reset_index(drop=True)
    user_row = pd.Series(np.arange(len(users)), index=users["user_id"].to_numpy())
    item_index = pd.Series(np.arange(len(catalogue)), index=catalogue["item_id"].to_numpy())
    positives = positives[positives["item_id"].isin(item_index.index)]
    relevant = ItemSets.from_pairs(
        user_row[positives["user_id"]].to_numpy(), item_index[positives["item_id"]].to_numpy(), len(users)
    )
    seen = past[past["user_id"].isin(user_row.index) & past["item_id"].isin(item_index.index)]
    exclude = (
        ItemSets.from_pairs(
            user_row[seen["user_id"]].to_numpy(), item_index[seen["item_id"]].to_numpy(), len(users)
        )
        if exclude_seen
        else None
    )

    user_emb = model.user_embeddings(encoder.encode(users, features=model.user_feature_names()))
    item_emb = model.item_embeddings(encoder.encode(catalogue, features=model.item_feature_names()))
    k = max(ks)
    two_tower = retrieval_metrics(full_catalogue_topk(user_emb, item_emb, k, exclude), relevant, ks)

    # popularity baseline: the same top-k machinery with a constant user vector and click counts as items
    clicks = read_split(training_dir, "retrieval", "train")["item_id"].value_counts()
    popularity = torch.tensor(
        clicks.reindex(catalogue["item_id"], fill_value=0).to_numpy(), dtype=torch.float32
    )
    ones = torch.ones(len(users), 1)
    baseline = retrieval_metrics(full_catalogue_topk(ones, popularity[:, None], k, exclude), relevant, ks)
    lift = {f"recall@{kk}": _ratio(two_tower[f"recall@{kk}"], baseline[f"recall@{kk}"]) for kk in ks}
    return {
        RETRIEVAL_MODEL: two_tower,
        "popularity": baseline,
        "lift_over_popularity": lift,
        "users": len(users),
        "exclude_seen": exclude_seen,
    }


def evaluate_rankers(
    models_dir: Path, training_dir: Path, ranking_test: pd.DataFrame, batch_size: int
) -> dict[str, Any]:
    """Each ranker next to two baselines fitted on the training split: the item's smoothed CTR and a
    logistic regression on user + item one-hot (L2 chosen on validation). ``with_history`` repeats the
    AUCs on the test rows whose user has a click history (what DIN attends over)."""
    from models import load_model, ranking_metrics
    from models.baselines import OneHotLogisticRegression, item_ctr_logits

    labels = ranking_test["label"].to_numpy()
    groups = ranking_test["user_id"].to_numpy()
    out: dict[str, Any] = {"test_rows": len(ranking_test), "test_positive_rate": float(labels.mean())}
    logits: dict[str, np.ndarray] = {}
    for kind in RANKERS:
        model, encoder = load_model(models_dir / kind)
        logits[kind] = model.predict_split(encoder.encode(ranking_test), batch_size)

    train = read_split(training_dir, "ranking", "train")
    logits["item_ctr_baseline"] = item_ctr_logits(train, ranking_test)
    regression = OneHotLogisticRegression.fit_tuned(train, read_split(training_dir, "ranking", "valid"))
    logits["logistic_regression_baseline"] = regression.logits(ranking_test)
    for name, values in logits.items():
        out[name] = ranking_metrics(labels, values, groups)
    out["logistic_regression_baseline"]["l2"] = regression.l2

    has_history = ranking_test["hist_length"].to_numpy() > 0
    out["with_history"] = {"test_rows": int(has_history.sum())}
    if 0 < labels[has_history].sum() < has_history.sum():
        for name, values in logits.items():
            out["with_history"][name] = ranking_metrics(
                labels[has_history], values[has_history], groups[has_history]
            )
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    run(params, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
