"""Offline metrics: AUC, GAUC and logloss for rankers; full-catalogue Recall/NDCG/HitRate@K for retrieval.

Everything is vectorised (numpy sorts and bincounts, torch matrix products and top-k) so the evaluate
step can score every test user against the whole catalogue instead of a sampled subset, which would
overstate retrieval quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); NaN when only one class is present."""
    labels = np.asarray(labels).astype(np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels > 0.5].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Group AUC: per-group (per-user) AUC weighted by the group's impressions.

    Groups with a single class have no AUC and are skipped (weights renormalised over the rest).
    NaN when no group has both classes.
    """
    labels = np.asarray(labels).astype(np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    _, group = np.unique(np.asarray(groups).ravel(), return_inverse=True)
    order = np.lexsort((scores, group))
    g, s, y = group[order], scores[order], labels[order]
    n = len(g)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.arange(n) - group_start + 1.0
    # ties inside a group share the mean of their ranks
    new_run = new_group.copy()
    new_run[1:] |= s[1:] != s[:-1]
    run = np.cumsum(new_run) - 1
    run_rank = np.bincount(run, weights=rank) / np.bincount(run)
    rank = run_rank[run]
    n_groups = int(g.max()) + 1 if n else 0
    size = np.bincount(g, minlength=n_groups).astype(np.float64)
    pos = np.bincount(g, weights=y, minlength=n_groups)
    neg = size - pos
    pos_rank_sum = np.bincount(g, weights=rank * y, minlength=n_groups)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    group_auc = (pos_rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return float(np.average(group_auc, weights=size[ok]))


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1 - 1e-7])."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def ranking_metrics(
    labels: np.ndarray, logits: np.ndarray, groups: np.ndarray | None = None
) -> dict[str, float]:
    """AUC, GAUC (when groups are given) and logloss of ranker logits."""
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    out = {"auc": auc(labels, logits), "logloss": logloss(labels, probabilities)}
    if groups is not None:
        out["gauc"] = gauc(labels, logits, groups)
    return out


@dataclass(frozen=True)
class ItemSets:
    """One set of catalogue indices per user, stored as CSR: user u's items are
    ``items[offsets[u]:offsets[u + 1]]``. Used for the relevant (test) items and the excluded (seen) ones."""

    offsets: np.ndarray  # int64 [U + 1]
    items: np.ndarray  # int64 [nnz]

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, num_users: int) -> ItemSets:
        """Build from parallel arrays of user rows (0..num_users-1) and item indices; duplicates dropped."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if len(users) and (users.min() < 0 or users.max() >= num_users):
            raise ValueError(f"ItemSets.from_pairs: user rows must lie in [0, {num_users})")
        pairs = (
            np.unique(np.stack([users, items], axis=1), axis=0) if len(users) else np.zeros((0, 2), np.int64)
        )
        counts = np.bincount(pairs[:, 0], minlength=num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, pairs[:, 1].astype(np.int64))

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def restricted_to(self, keep: np.ndarray) -> ItemSets:
        """The same users' sets with only the items where ``keep`` (bool, indexed by item) is true: e.g.
        the relevant items among the head or the tail of the catalogue."""
        kept = np.asarray(keep, dtype=bool)[self.items]
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), self.sizes())
        counts = np.bincount(users[kept], minlength=self.num_users)
        return ItemSets(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), self.items[kept])


def full_catalogue_topk(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    k: int,
    exclude: ItemSets | None = None,
    chunk_size: int = 4096,
) -> np.ndarray:
    """Indices [U, k] of each user's k highest-scoring items over the WHOLE catalogue (dot product),
    skipping each user's ``exclude`` items (e.g. already clicked in training)."""
    if exclude is not None and exclude.num_users != user_emb.shape[0]:
        raise ValueError(
            f"full_catalogue_topk: exclusions for {exclude.num_users} users, {user_emb.shape[0]} given"
        )
    k = min(k, item_emb.shape[0])
    out = np.empty((user_emb.shape[0], k), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, user_emb.shape[0], chunk_size):
            stop = min(start + chunk_size, user_emb.shape[0])
            scores = user_emb[start:stop].float() @ item_emb.float().T
            if exclude is not None:
                lo, hi = exclude.offsets[start], exclude.offsets[stop]
                rows = np.repeat(np.arange(stop - start), np.diff(exclude.offsets[start : stop + 1]))
                cols = exclude.items[lo:hi]
                scores[
                    torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)
                ] = -torch.inf
            out[start:stop] = torch.topk(scores, k, dim=1).indices.cpu().numpy()
    return out


def retrieval_metrics(topk: np.ndarray, relevant: ItemSets, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K (hits / |relevant|), NDCG@K (binary gains) and HitRate@K, averaged over users with at
    least one relevant item. ``topk`` [U, >= max(ks)] holds catalogue indices, best first."""
    per_user = per_user_retrieval_metrics(topk, relevant, ks)
    has_relevant = relevant.sizes() > 0
    if not has_relevant.any():
        return {name: float("nan") for name in per_user}
    return {name: float(values[has_relevant].mean()) for name, values in per_user.items()}


def per_user_retrieval_metrics(
    topk: np.ndarray, relevant: ItemSets, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Each user's Recall@K, NDCG@K and HitRate@K (NaN for users without a relevant item): what
    :func:`retrieval_metrics` averages, and what a bootstrap over users resamples."""
    if relevant.num_users != topk.shape[0]:
        raise ValueError(f"retrieval_metrics: {topk.shape[0]} ranked lists for {relevant.num_users} users")
    max_k = max(ks)
    if topk.shape[1] < max_k:
        raise ValueError(f"retrieval_metrics: top-k lists have {topk.shape[1]} items, K={max_k} requested")
    topk = topk[:, :max_k]
    n_users = topk.shape[0]
    sizes = relevant.sizes()
    users = np.repeat(np.arange(n_users, dtype=np.int64), sizes)
    width = np.int64(max(int(topk.max(initial=0)), int(relevant.items.max(initial=0))) + 1)
    relevant_keys = users * width + relevant.items
    ranked_keys = np.arange(n_users, dtype=np.int64)[:, None] * width + topk
    hits = np.isin(ranked_keys, relevant_keys)
    has_relevant = sizes > 0
    discounts = 1.0 / np.log2(np.arange(2, max_k + 2))
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit_k = hits[:, :k]
        n_hits = hit_k.sum(axis=1)
        dcg = (hit_k * discounts[:k]).sum(axis=1)
        ideal = np.cumsum(discounts[:k])[np.maximum(np.minimum(sizes, k) - 1, 0)]
        safe = np.maximum(sizes, 1)
        out[f"recall@{k}"] = np.where(has_relevant, n_hits / safe, np.nan)
        out[f"ndcg@{k}"] = np.where(has_relevant, dcg / ideal, np.nan)
        out[f"hitrate@{k}"] = np.where(has_relevant, (n_hits > 0).astype(np.float64), np.nan)
    return out


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (vectorised, like scipy's rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    new_run = np.ones(len(values), dtype=bool)
    new_run[1:] = sorted_values[1:] != sorted_values[:-1]
    run = np.cumsum(new_run) - 1
    positions = np.arange(1, len(values) + 1, dtype=np.float64)
    run_mean = np.bincount(run, weights=positions) / np.bincount(run)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_mean[run]
    return ranks
