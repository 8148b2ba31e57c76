"""Two-tower candidates blended with a recent-popularity list: what retrieval serves when the model alone
loses to popularity (issue 22: "let recommend use what wins").

The blend gives a fixed ``share`` of the slots of every prefix of the list to the popularity list: after
``m`` slots, ``floor(share * m)`` of them came from popularity (share 0: pure two-tower, 1: pure
popularity; 0.5 alternates model, popular, model, ...), so the same share holds at every K a metric or
the server cuts the list at. Each slot takes the next item of its source not already in the list; when
one source runs out the other fills the rest. The evaluate step picks the share on the validation split
(:func:`choose_share`) and serving applies it to the ANN results (serving/recommender.py), both through
:func:`blend_lists`, so what was measured is what is served.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.metrics import ItemSets, retrieval_metrics

__all__ = ["BlendChoice", "blend_lists", "blend_topk", "choose_share", "popular_slots"]

_EPS = 1e-9  # share * m is computed in floating point: 0.1 * 10 must count as 1 slot


def popular_slots(share: float, k: int) -> np.ndarray:
    """bool [k]: which of the first ``k`` slots belong to the popularity list at ``share``."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"blend share must lie in [0, 1], got {share}")
    counts = np.floor(share * np.arange(1, k + 1) + _EPS).astype(np.int64)
    return np.diff(np.concatenate([[0], counts])) > 0


def blend_lists(model: Sequence[int], popular: Sequence[int], share: float, k: int) -> list[int]:
    """Up to ``k`` distinct items: ``model`` (best first) and ``popular`` (most popular first) interleaved
    by :func:`popular_slots`; both lists must already leave out what the user must not get."""
    slots = popular_slots(share, k)
    out: list[int] = []
    taken: set[int] = set()
    sources = (iter(model), iter(popular))
    exhausted = [False, False]
    for slot in slots.tolist():
        first = int(slot)  # 0: model, 1: popular
        for which in (first, 1 - first):
            if exhausted[which]:
                continue
            item = _next_new(sources[which], taken)
            if item is None:
                exhausted[which] = True
                continue
            out.append(item)
            taken.add(item)
            break
        else:
            break  # both sources are used up
    return out


def _next_new(source, taken: set[int]) -> int | None:
    for item in source:
        item = int(item)
        if item not in taken:
            return item
    return None


def blend_topk(model: np.ndarray, popular: np.ndarray, share: float) -> np.ndarray:
    """[U, k] blends of each user's row of ``model`` and ``popular`` (both [U, k] catalogue indices, best
    first, the user's excluded items last or absent), k = ``model``'s width."""
    if model.shape != popular.shape:
        raise ValueError(f"blend_topk: model {model.shape} and popular {popular.shape} lists differ")
    if share == 0.0:
        return model
    if share == 1.0:
        return popular
    k = model.shape[1]
    return np.array(
        [blend_lists(m, p, share, k) for m, p in zip(model.tolist(), popular.tolist(), strict=True)],
        dtype=np.int64,
    ).reshape(model.shape)


@dataclass(frozen=True)
class BlendChoice:
    """The share chosen on validation and the validation recall@k of every candidate share."""

    share: float
    k: int
    valid_recall: dict[str, float] = field(default_factory=dict)


def choose_share(
    model: np.ndarray, popular: np.ndarray, relevant: ItemSets, shares: Sequence[float], k: int
) -> BlendChoice:
    """The share of ``shares`` whose blend of ``model`` and ``popular`` (validation users' top lists) has
    the best recall@k on ``relevant`` (their validation clicks); ties go to the smaller share (the
    model's list unless popularity strictly helps)."""
    if not shares:
        raise ValueError("choose_share: no candidate shares")
    recall: dict[str, float] = {}
    best_share, best = None, -math.inf
    for share in sorted(set(float(s) for s in shares)):
        value = retrieval_metrics(blend_topk(model, popular, share), relevant, [k])[f"recall@{k}"]
        recall[f"{share:g}"] = value
        if best_share is None or (np.isfinite(value) and value > best):
            best_share, best = share, value if np.isfinite(value) else -math.inf
    assert best_share is not None
    return BlendChoice(best_share, k, recall)
