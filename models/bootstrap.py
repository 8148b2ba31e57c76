"""Confidence intervals by resampling users: how much a headline number would move on another sample of
the same population, and whether a model's lead over a baseline is larger than that.

Users, not rows, are resampled (with replacement): a user's impressions and clicks are correlated, so a
row bootstrap would give intervals that are too narrow. Comparisons are paired (the same resampled users
score both sides), which is what makes a small lead on a few hundred users distinguishable from noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.metrics import auc


@dataclass(frozen=True)
class Interval:
    """A point estimate on the real sample and the bootstrap percentile interval around it."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _percentiles(point: float, samples: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2 * 100
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return Interval(point, float("nan"), float("nan"))
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(point), float(low), float(high))


def _check(confidence: float, samples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must lie in (0, 1), got {confidence}")
    if samples < 1:
        raise ValueError(f"bootstrap: samples must be >= 1, got {samples}")


def user_mean_intervals(
    per_user: Mapping[str, np.ndarray],
    reference: str,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Intervals of the mean of per-user values (e.g. each user's Recall@K) for every entry, and of each
    entry's paired difference to ``reference``. Users with a NaN in any entry are left out."""
    _check(confidence, samples)
    if reference not in per_user:
        raise ValueError(f"bootstrap: reference '{reference}' is not among {sorted(per_user)}")
    values = np.stack([np.asarray(v, dtype=np.float64) for v in per_user.values()])
    values = values[:, np.isfinite(values).all(axis=0)]
    n_users = values.shape[1]
    if n_users == 0:
        raise ValueError("bootstrap: no user has a value for every entry")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_users, size=(samples, n_users))
    means = values[:, draws].mean(axis=2)  # [entries, samples]
    return _summary("mean", list(per_user), values.mean(axis=1), means, reference, confidence)


def user_auc_intervals(
    labels: np.ndarray,
    scores: Mapping[str, np.ndarray],
    users: np.ndarray,
    reference: str,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """Intervals of each scorer's AUC over rows, users resampled with all their rows, and of each one's
    paired AUC difference to ``reference`` on the same resamples."""
    _check(confidence, samples)
    if reference not in scores:
        raise ValueError(f"bootstrap: reference '{reference}' is not among {sorted(scores)}")
    labels = np.asarray(labels)
    order = np.argsort(np.asarray(users), kind="stable")
    _, first, counts = np.unique(np.asarray(users)[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    names = list(scores)
    sorted_scores = {name: np.asarray(scores[name], dtype=np.float64)[order] for name in names}
    sorted_labels = labels[order]
    draws = np.empty((len(names), samples))
    for s in range(samples):
        picked = rng.integers(0, len(first), size=len(first))
        rows = np.repeat(first[picked], counts[picked]) + _offsets_within(counts[picked])
        for i, name in enumerate(names):
            draws[i, s] = auc(sorted_labels[rows], sorted_scores[name][rows])
    points = np.array([auc(labels, scores[name]) for name in names])
    return _summary("auc", names, points, draws, reference, confidence)


def _summary(
    statistic: str,
    names: list[str],
    points: np.ndarray,
    draws: np.ndarray,
    reference: str,
    confidence: float,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each entry's interval (``draws`` [entries, samples]) and its paired difference to ``reference``."""
    ref = names.index(reference)
    return {
        statistic: {
            name: _percentiles(points[i], draws[i], confidence).to_dict() for i, name in enumerate(names)
        },
        f"difference_to_{reference}": {
            name: _percentiles(points[i] - points[ref], draws[i] - draws[ref], confidence).to_dict()
            for i, name in enumerate(names)
            if i != ref
        },
    }


def _offsets_within(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., c-1 for each count c, concatenated: row offsets inside each picked user's block."""
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(int(counts.sum())) - starts
