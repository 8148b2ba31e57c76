"""User-level bootstrap intervals: they cover the truth at about their level, they are paired, and they
resample users with all their rows."""

from __future__ import annotations

import numpy as np
import pytest

from models.bootstrap import user_auc_intervals, user_mean_intervals
from models.metrics import ItemSets, auc, per_user_retrieval_metrics, retrieval_metrics


def test_mean_interval_covers_the_population_mean_at_about_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        values = rng.binomial(1, 0.3, size=150).astype(float)
        result = user_mean_intervals({"a": values}, "a", samples=300, confidence=0.9, seed=trial)
        interval = result["mean"]["a"]
        assert interval["value"] == pytest.approx(values.mean())
        covered += interval["low"] <= 0.3 <= interval["high"]
    assert 0.83 <= covered / 200 <= 0.96  # nominal 0.90


def test_paired_difference_is_tighter_than_the_two_marginals():
    """Two models on the same users: their per-user scores are strongly correlated, so the difference's
    interval is far narrower than either mean's, and a consistent small lead excludes zero."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=400)
    better = np.clip(base + 0.02 + rng.normal(0, 0.01, size=400), 0, None)
    result = user_mean_intervals(
        {"baseline": base, "model": better}, "baseline", samples=500, confidence=0.95, seed=0
    )
    diff = result["difference_to_baseline"]["model"]
    width = result["mean"]["model"]["high"] - result["mean"]["model"]["low"]
    assert diff["low"] > 0 and (diff["high"] - diff["low"]) < width / 5
    assert "baseline" not in result["difference_to_baseline"]


def test_users_without_a_value_are_left_out_and_bad_arguments_are_named():
    values = {"a": np.array([1.0, np.nan, 0.0]), "b": np.array([0.0, 1.0, np.nan])}
    assert user_mean_intervals(values, "a", samples=10, confidence=0.9, seed=0)["mean"]["a"]["value"] == 1.0
    with pytest.raises(ValueError, match="reference 'c'"):
        user_mean_intervals(values, "c", samples=10, confidence=0.9, seed=0)
    with pytest.raises(ValueError, match="confidence"):
        user_mean_intervals(values, "a", samples=10, confidence=1.5, seed=0)


def test_auc_interval_resamples_users_with_all_their_rows():
    """The interval brackets the real AUC, a clearly better scorer's paired lead excludes zero, and the
    draws depend on which users are picked, not on row positions (a row bootstrap's would)."""
    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(50), 20)
    labels = rng.binomial(1, 0.3, size=len(users))
    good = labels + rng.normal(0, 0.8, size=len(users))
    noise = rng.normal(0, 1, size=len(users))
    result = user_auc_intervals(
        labels, {"noise": noise, "model": good}, users, "noise", samples=200, confidence=0.95, seed=0
    )
    assert result["auc"]["model"]["value"] == pytest.approx(auc(labels, good))
    assert result["auc"]["model"]["low"] < result["auc"]["model"]["value"] < result["auc"]["model"]["high"]
    assert result["difference_to_noise"]["model"]["low"] > 0.1
    # rows of one user are kept together: shuffling labels within users leaves the draws unchanged
    within = np.concatenate([rng.permutation(np.arange(u * 20, u * 20 + 20)) for u in range(50)])
    again = user_auc_intervals(
        labels[within],
        {"noise": noise[within], "model": good[within]},
        users,
        "noise",
        samples=200,
        confidence=0.95,
        seed=0,
    )
    assert again["auc"]["model"] == pytest.approx(result["auc"]["model"])


def test_per_user_retrieval_metrics_average_to_the_reported_ones():
    topk = np.array([[0, 1, 2], [2, 1, 0], [0, 2, 1]])
    relevant = ItemSets.from_pairs(np.array([0, 0, 1]), np.array([1, 3, 2]), 3)  # user 2: nothing
    per_user = per_user_retrieval_metrics(topk, relevant, [1, 3])
    assert per_user["recall@3"][:2].tolist() == [0.5, 1.0] and np.isnan(per_user["recall@3"][2])
    assert per_user["hitrate@1"][:2].tolist() == [0.0, 1.0]
    means = retrieval_metrics(topk, relevant, [1, 3])
    assert means == {name: pytest.approx(np.nanmean(v)) for name, v in per_user.items()}
