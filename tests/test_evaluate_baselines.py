"""The evaluate step's ranking report: every ranker next to the item-CTR, the tuned one-hot logistic
regression and the LightGBM baselines, the best of them named with each ranker's paired bootstrap margin,
overall and on the rows of users with a history (what DIN attends over); baselines refitted on train +
valid when the models are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.evaluate import RANKING_BASELINES, evaluate_rankers
from models import FeatureEncoder, build_model, save_model
from models.registry import RANKERS
from tests.conftest import shipped_params
from tests.models.conftest import make_frame, small_models_config

EVALUATION = shipped_params().evaluation.model_copy(update={"bootstrap_samples": 50})


def _planted_user_bias(
    tmp_path: Path, users_by_split: dict[str, int] | None = None
) -> dict[str, pd.DataFrame]:
    """Ranking splits whose label follows a per-user bias (even ids click, odd ones do not), saved with
    rankers trained briefly on the train split. ``users_by_split`` offsets a split's user ids."""
    rng = np.random.default_rng(0)
    frames = {}
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        frame = make_frame(n_rows=1500, n_users=60, seed=seed)
        frame["user_id"] += (users_by_split or {}).get(split, 0)
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
    return frames


def test_rankers_are_reported_next_to_every_baseline_and_on_users_with_history(tmp_path):
    frames = _planted_user_bias(tmp_path)
    report = evaluate_rankers(tmp_path, tmp_path, frames["test"], 512, EVALUATION, refit=False, seed=0)
    for name in (*RANKERS, *RANKING_BASELINES):
        assert {"auc", "gauc", "logloss"} <= set(report[name]), name
    regression = report["logistic_regression_baseline"]
    assert regression["auc"] > 0.75  # the planted user bias, which the item CTR cannot see
    assert report["item_ctr_baseline"]["auc"] < 0.6
    assert regression["l2"] > 0 and report["gbdt_baseline"]["rounds"] >= 1
    best = report["best_baseline"]
    assert best == max(RANKING_BASELINES, key=lambda name: report[name]["auc"])
    for kind in RANKERS:
        assert report["auc_over_best_baseline"][kind] == report[kind]["auc"] - report[best]["auc"]
        interval = report["intervals"][f"difference_to_{best}"][kind]
        assert interval["low"] <= interval["value"] <= interval["high"]
    with_history = report["with_history"]
    assert with_history["test_rows"] == int((frames["test"]["hist_length"] > 0).sum()) < len(frames["test"])
    for name in (*RANKERS, *RANKING_BASELINES):
        assert 0 <= with_history[name]["auc"] <= 1


def test_with_refit_the_baselines_learn_from_the_validation_window_too(tmp_path):
    """The test users first appear in the validation window: fitted on train only, the one-hot regression
    knows nothing of them; refitted on train + valid (as the models are), it knows their bias."""
    frames = _planted_user_bias(tmp_path, {"train": 1000, "valid": 0, "test": 0})
    alone = evaluate_rankers(tmp_path, tmp_path, frames["test"], 512, EVALUATION, refit=False, seed=0)
    refit = evaluate_rankers(tmp_path, tmp_path, frames["test"], 512, EVALUATION, refit=True, seed=0)
    assert alone["logistic_regression_baseline"]["auc"] < 0.6
    assert refit["logistic_regression_baseline"]["auc"] > 0.75
    assert refit["item_ctr_baseline"]["auc"] != alone["item_ctr_baseline"]["auc"]
