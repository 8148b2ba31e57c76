"""The evaluate step's ranking report: every ranker next to the item-CTR and the one-hot logistic-regression
baselines, overall and on the rows of users with a history (what DIN attends over)."""

from __future__ import annotations

import numpy as np
import torch

from components.evaluate import evaluate_rankers
from models import FeatureEncoder, build_model, save_model
from models.registry import RANKERS
from tests.models.conftest import make_frame, small_models_config


def test_rankers_are_reported_next_to_both_baselines_and_on_users_with_history(tmp_path):
    rng = np.random.default_rng(0)
    frames = {}
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        frame = make_frame(n_rows=1500, n_users=60, seed=seed)
        # a planted user bias: the logistic regression on user + item one-hot must find it
        p = np.where(frame["user_id"].to_numpy() % 2 == 0, 0.8, 0.2)
        frame["label"] = (rng.random(len(frame)) < p).astype(np.int64)
        frame.to_parquet(tmp_path / f"ranking_{split}.parquet")
        frames[split] = frame
    config = small_models_config()
    encoder = FeatureEncoder.fit(config.features, frames["train"])
    for kind in RANKERS:
        torch.manual_seed(0)
        save_model(
            build_model(kind, config.model(kind), encoder), encoder, config.model(kind), tmp_path / kind
        )

    report = evaluate_rankers(tmp_path, tmp_path, frames["test"], batch_size=512)
    for name in (*RANKERS, "item_ctr_baseline", "logistic_regression_baseline"):
        assert {"auc", "gauc", "logloss"} <= set(report[name]), name
    regression = report["logistic_regression_baseline"]
    assert regression["auc"] > 0.75  # the planted user bias, which the item CTR cannot see
    assert report["item_ctr_baseline"]["auc"] < 0.6
    assert regression["l2"] > 0
    with_history = report["with_history"]
    assert with_history["test_rows"] == int((frames["test"]["hist_length"] > 0).sum()) < len(frames["test"])
    for name in (*RANKERS, "item_ctr_baseline", "logistic_regression_baseline"):
        assert 0 <= with_history[name]["auc"] <= 1
