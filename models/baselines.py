"""Simple baselines every ranker is reported next to (components/evaluate.py).

- :func:`item_ctr_logits`: the item's smoothed training click-through rate (a prior-weighted mean).
- :class:`OneHotLogisticRegression`: logistic regression on user + item one-hot, i.e.
  ``logit = b + w_user + w_item``, with an L2 penalty chosen on the validation split. It is the strong
  "bias-only" model of collaborative filtering: a ranker that cannot beat it has learnt no interaction.
  Ids never seen in training get weight 0 (the global bias and the other side's weight remain).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

CTR_PRIOR_WEIGHT = 20  # pseudo-impressions at the global rate added to every item's counts


def item_ctr_logits(
    train: pd.DataFrame, rows: pd.DataFrame, prior_weight: float = CTR_PRIOR_WEIGHT
) -> np.ndarray:
    """Logit of each row's item's smoothed training CTR (unseen items: the global rate)."""
    prior = float(train["label"].mean())
    per_item = train.groupby("item_id")["label"].agg(["sum", "count"])
    smoothed = (per_item["sum"] + prior_weight * prior) / (per_item["count"] + prior_weight)
    ctr = smoothed.reindex(rows["item_id"]).fillna(prior).to_numpy().clip(1e-6, 1 - 1e-6)
    return np.log(ctr / (1 - ctr))


@dataclass
class OneHotLogisticRegression:
    """``logit = bias + user_weight[user] + item_weight[item]``, fitted by full-batch L-BFGS."""

    users: pd.Index
    items: pd.Index
    bias: float
    user_weight: np.ndarray
    item_weight: np.ndarray
    l2: float

    @classmethod
    def fit(cls, train: pd.DataFrame, l2: float, max_iter: int = 200) -> OneHotLogisticRegression:
        """Minimise mean logloss + ``l2`` * (sum of squared user and item weights) / rows."""
        users = pd.Index(np.unique(train["user_id"].to_numpy()))
        items = pd.Index(np.unique(train["item_id"].to_numpy()))
        bias, (wu, wi) = fit_one_hot_logistic(
            [users.get_indexer(train["user_id"]), items.get_indexer(train["item_id"])],
            [len(users), len(items)],
            train["label"].to_numpy(),
            l2,
            max_iter,
        )
        return cls(users, items, bias, wu, wi, l2)

    @classmethod
    def fit_tuned(
        cls,
        train: pd.DataFrame,
        valid: pd.DataFrame,
        l2_grid: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
    ) -> OneHotLogisticRegression:
        """The fit whose L2 strength gives the lowest validation logloss."""
        from models.metrics import ranking_metrics

        best, best_loss = None, np.inf
        labels = valid["label"].to_numpy()
        for l2 in l2_grid:
            model = cls.fit(train, l2)
            loss = ranking_metrics(labels, model.logits(valid))["logloss"]
            if loss < best_loss:
                best, best_loss = model, loss
        assert best is not None
        return best

    def logits(self, rows: pd.DataFrame) -> np.ndarray:
        u = self.users.get_indexer(rows["user_id"])
        i = self.items.get_indexer(rows["item_id"])
        wu = np.where(u >= 0, self.user_weight[np.maximum(u, 0)], 0.0)
        wi = np.where(i >= 0, self.item_weight[np.maximum(i, 0)], 0.0)
        return self.bias + wu + wi


def fit_one_hot_logistic(
    codes: Sequence[np.ndarray], sizes: Sequence[int], labels: np.ndarray, l2: float, max_iter: int = 200
) -> tuple[float, list[np.ndarray]]:
    """Logistic regression on the one-hot encoding of integer columns (``codes[k]`` in ``[0, sizes[k])``):
    ``logit = bias + sum_k w_k[codes[k]]``, minimising mean logloss + ``l2`` * sum of squared weights / rows
    by full-batch L-BFGS. Returns the bias and one weight vector per column (float64)."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.float64))
    index = [torch.from_numpy(np.asarray(c, dtype=np.int64)) for c in codes]
    rate = float(y.mean().clamp(1e-6, 1 - 1e-6))
    bias = torch.tensor(np.log(rate / (1 - rate)), dtype=torch.float64, requires_grad=True)
    weights = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
    optimizer = torch.optim.LBFGS(
        [bias, *weights], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )
    n = len(y)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = bias + sum(w[i] for w, i in zip(weights, index, strict=True))
        penalty = sum(w.square().sum() for w in weights)
        loss = F.binary_cross_entropy_with_logits(logits, y) + l2 * penalty / n
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(bias.detach()), [w.detach().numpy() for w in weights]
