"""Strong simple retrieval baselines reported next to the two-tower model (components/evaluate.py).

A learnt retriever is only worth serving if it beats what needs no training:

- :func:`popularity_scores` / :func:`choose_recent_window`: most-clicked items, over all time or over a
  recent window chosen on the validation split (trends move fast; all-time popularity is a weak straw man).
- :class:`ItemKNN`: item-item cosine similarity on the binary user x item click matrix, top neighbours kept
  (sparse), scored as the sum of the similarities to the user's history.
- :class:`EASE`: EASE^R (Steck 2019), the closed-form linear item-item autoencoder, usually the strongest
  simple baseline on implicit feedback.

Everything works on catalogue indices (position in ``catalogue_items``) and :class:`~models.metrics.ItemSets`,
and every ``topk`` returns what :func:`~models.metrics.full_catalogue_topk` returns: ``[U, min(k, n_items)]``
catalogue indices, best first, each user's excluded items ranked last (so they appear only when fewer than
``k`` items are left). Ties are broken deterministically: higher popularity first, then lower catalogue
index (``torch.topk`` gives no such guarantee, and with sparse scores most of the catalogue ties at 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from models.blend import NeighbourTable
from models.metrics import ItemSets, full_catalogue_topk, retrieval_metrics

__all__ = [
    "EASE",
    "CatalogueTooLarge",
    "ItemKNN",
    "RecentWindowChoice",
    "ValidationSplit",
    "choose_recent_window",
    "history_sets",
    "popularity_scores",
]

EASE_MAX_ITEMS = 20_000  # default of ``max_items``: a float64 Gram matrix of 20k items is 3.2 GB
_MAX_BLOCK_CELLS = 1 << 24  # users x items scores per ranking block (~128 MB of float64)
_SIM_BLOCK_ITEMS = 2048  # rows of the item-item co-occurrence computed at once in ItemKNN.fit


def _catalogue_index(catalogue_items: np.ndarray) -> pd.Index:
    index = pd.Index(np.asarray(catalogue_items, dtype=np.int64))
    if not index.is_unique:
        raise ValueError("catalogue_items must hold each item id once")
    return index


def history_sets(clicks: pd.DataFrame, users: np.ndarray, catalogue_items: np.ndarray) -> ItemSets:
    """Each of ``users``' (in their row order) set of catalogue indices clicked in ``clicks``.

    Clicks by other users, or on items outside the catalogue, are dropped; users without clicks get an
    empty set. The evaluate step uses it for the train history and the seen-item exclusions.
    """
    user_index = pd.Index(np.asarray(users, dtype=np.int64))
    if not user_index.is_unique:
        raise ValueError("history_sets: users must be unique")
    rows = user_index.get_indexer(clicks["user_id"].to_numpy())
    cols = _catalogue_index(catalogue_items).get_indexer(clicks["item_id"].to_numpy())
    keep = (rows >= 0) & (cols >= 0)
    return ItemSets.from_pairs(rows[keep], cols[keep], len(user_index))


# ---------------------------------------------------------------------------------------------- popularity


def popularity_scores(
    clicks: pd.DataFrame,
    catalogue_items: np.ndarray,
    end: pd.Timestamp,
    window: pd.Timedelta | None = None,
) -> np.ndarray:
    """float32 [n_items]: each catalogue item's click count in ``[end - window, end)`` (all clicks before
    ``end`` when ``window`` is None); items without clicks get exactly 0.

    Clicks at or after ``end`` never count, so scores taken at a split start do not leak it. Ties in the
    window count are broken by the all-time (before ``end``) count: the score is
    ``window_count + all_time_count / (2 * (max_all_time_count + 1))``, a term below 0.5 that never reorders
    different window counts (exact while counts stay below 2^23, float32's integer range). Items equal on
    both still tie; rank them with a stable order (lower catalogue index first) where that matters.
    """
    index = _catalogue_index(catalogue_items)
    ts = clicks["event_timestamp"]
    before = (ts < end).to_numpy()
    cols = index.get_indexer(clicks["item_id"].to_numpy())
    in_catalogue = cols >= 0
    all_time = np.bincount(cols[before & in_catalogue], minlength=len(index)).astype(np.float64)
    if window is None:
        counts = all_time
    else:
        recent = before & (ts >= end - window).to_numpy()
        counts = np.bincount(cols[recent & in_catalogue], minlength=len(index)).astype(np.float64)
    tie_break = all_time / (2.0 * (all_time.max(initial=0.0) + 1.0))
    return (counts + tie_break).astype(np.float32)


@dataclass(frozen=True)
class RecentWindowChoice:
    """The popularity window chosen on validation: ``days`` (None = all-time popularity) and the
    validation recall@k of every candidate, keyed ``"<days>d"`` and ``"all"``."""

    days: int | None
    valid_recall: dict[str, float] = field(default_factory=dict)

    @property
    def window(self) -> pd.Timedelta | None:
        return None if self.days is None else pd.Timedelta(days=self.days)


def choose_recent_window(
    train_clicks: pd.DataFrame,
    valid_clicks: pd.DataFrame,
    catalogue_items: np.ndarray,
    valid_start: pd.Timestamp,
    windows_days: Sequence[int] = (1, 3, 7, 14, 30),
    k: int = 50,
    exclude_seen: bool = True,
) -> RecentWindowChoice:
    """Pick the popularity window with the best validation recall@k.

    For each candidate (every ``windows_days`` and all-time), popularity at ``valid_start`` from the train
    clicks ranks the whole catalogue for every user with validation clicks (their train items excluded
    when ``exclude_seen``); recall@k is measured on their validation clicks. Ties go to the longer window,
    all-time being the longest: prefer the more stable estimate unless a shorter one is strictly better.
    """
    index = _catalogue_index(catalogue_items)
    valid_in_catalogue = valid_clicks[valid_clicks["item_id"].isin(index)]
    users = np.unique(valid_in_catalogue["user_id"].to_numpy(dtype=np.int64))
    relevant = history_sets(valid_in_catalogue, users, catalogue_items)
    exclude = history_sets(train_clicks, users, catalogue_items) if exclude_seen else None
    k = min(k, len(index))
    candidates: list[tuple[str, int | None]] = [("all", None)] + [
        (f"{d}d", int(d)) for d in sorted(set(windows_days), reverse=True)
    ]  # longest first: the first best one wins ties
    ones = torch.ones(len(users), 1)
    recall: dict[str, float] = {}
    best: tuple[float, int | None] | None = None
    for name, days in candidates:
        window = None if days is None else pd.Timedelta(days=days)
        scores = torch.from_numpy(popularity_scores(train_clicks, catalogue_items, valid_start, window))
        topk = full_catalogue_topk(ones, scores[:, None], k, exclude)
        recall[name] = retrieval_metrics(topk, relevant, [k])[f"recall@{k}"]
        value = recall[name] if np.isfinite(recall[name]) else -np.inf
        if best is None or value > best[0]:
            best = (value, days)
    return RecentWindowChoice(days=None if best is None else best[1], valid_recall=recall)


# ------------------------------------------------------------------------------------- item-item rankers


def _click_matrix(clicks: pd.DataFrame, index: pd.Index) -> sp.csr_matrix:
    """Binary float64 CSR [n_click_users, n_items] over catalogue columns (other items dropped)."""
    cols = index.get_indexer(clicks["item_id"].to_numpy())
    keep = cols >= 0
    rows, _ = pd.factorize(clicks["user_id"].to_numpy()[keep], sort=True)
    x = sp.csr_matrix(
        (np.ones(int(keep.sum())), (rows, cols[keep])), shape=(int(rows.max(initial=-1)) + 1, len(index))
    )
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _history_matrix(history: ItemSets, start: int, stop: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR [stop - start, n_items] of users start..stop-1 of ``history``."""
    lo, hi = history.offsets[start], history.offsets[stop]
    indptr = history.offsets[start : stop + 1] - lo
    m = sp.csr_matrix(
        (np.ones(hi - lo), history.items[lo:hi], indptr), shape=(stop - start, n_items), copy=True
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _tie_order(popularity: np.ndarray) -> np.ndarray:
    """Catalogue indices by tie-break priority: higher popularity first, then lower index."""
    return np.lexsort((np.arange(len(popularity)), -np.asarray(popularity, dtype=np.float64)))


def _topk_rows(scores: np.ndarray, k: int, order: np.ndarray) -> np.ndarray:
    """[B, k] column indices of each row's k highest ``scores``, best first; equal scores are taken in
    ``order`` (a permutation of the columns, highest priority first). Exact and deterministic: only the
    k-th largest value comes from ``torch.topk`` (its order among ties is unspecified, the value is not);
    the items above it are all taken, and the ties at it are filled in ``order``."""
    n_rows, n = scores.shape
    if k == 0:
        return np.empty((n_rows, 0), dtype=np.int64)
    kth = torch.topk(torch.from_numpy(scores), k, dim=1).values[:, -1:].numpy()
    take = scores > kth
    tied = scores == kth
    need = k - take.sum(axis=1)
    partial = np.flatnonzero(tied.sum(axis=1) > need)  # rows where only some of the ties fit
    if len(partial):
        tied_in_order = tied[partial][:, order]
        first = tied_in_order & (np.cumsum(tied_in_order, axis=1, dtype=np.int32) <= need[partial, None])
        rows, positions = np.nonzero(first)
        tied[partial] = False  # keep only the first ``need`` ties of those rows, in ``order``
        tied[partial[rows], order[positions]] = True
    take |= tied
    cols = np.nonzero(take)[1].reshape(n_rows, k)  # exactly k per row
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    best_first = np.lexsort((rank[cols], -np.take_along_axis(scores, cols, axis=1)), axis=-1)
    return np.take_along_axis(cols, best_first, axis=1)


class _ScoreRanker:
    """Ranks the whole catalogue by ``_score_block`` scores, in user blocks, like full_catalogue_topk."""

    n_items: int
    popularity: np.ndarray
    valid_recall: dict[str, float]  # fit_tuned: every candidate's validation recall@k

    def _score_block(self, history: sp.csr_matrix) -> np.ndarray:
        raise NotImplementedError

    def scores(self, history: ItemSets) -> np.ndarray:
        """Dense [U, n_items] scores of every catalogue item for each user (for small U: tests, debugging)."""
        return self._score_block(_history_matrix(history, 0, history.num_users, self.n_items))

    def topk(
        self, history: ItemSets, k: int, exclude: ItemSets | None = None, batch_users: int = 1024
    ) -> np.ndarray:
        """[U, min(k, n_items)] catalogue indices of each user's best items, best first, excluded items
        last; ties by popularity then index. At most ``batch_users`` users are scored at once (fewer when
        the catalogue is large, so a block stays around 16M scores): memory is bounded whatever U is."""
        n_users = history.num_users
        if exclude is not None and exclude.num_users != n_users:
            raise ValueError(f"topk: exclusions for {exclude.num_users} users, {n_users} given")
        k = min(k, self.n_items)
        order = _tie_order(self.popularity)
        block = max(1, min(batch_users, _MAX_BLOCK_CELLS // max(self.n_items, 1)))
        out = np.empty((n_users, k), dtype=np.int64)
        for start in range(0, n_users, block):
            stop = min(start + block, n_users)
            scores = self._score_block(_history_matrix(history, start, stop, self.n_items))
            if exclude is not None:
                lo, hi = exclude.offsets[start], exclude.offsets[stop]
                rows = np.repeat(np.arange(stop - start), np.diff(exclude.offsets[start : stop + 1]))
                scores[rows, exclude.items[lo:hi]] = -np.inf
            out[start:stop] = _topk_rows(scores, k, order)
        return out


@dataclass(frozen=True)
class ValidationSplit:
    """What a setting is chosen on: each validation user's clicks before the validation window
    (``history``), in it (``relevant``), the items not to rank for them, and the K of the recall."""

    history: ItemSets
    relevant: ItemSets
    exclude: ItemSets | None
    k: int

    def recall(self, model: _ScoreRanker) -> float:
        k = min(self.k, model.n_items)
        return retrieval_metrics(model.topk(self.history, k, self.exclude), self.relevant, [k])[f"recall@{k}"]


_Ranker = TypeVar("_Ranker", bound=_ScoreRanker)


def _best_on_validation(
    candidates: dict[str, Callable[[], _Ranker]],
    validation: ValidationSplit,
    name: str,
) -> _Ranker:
    """Build each candidate in turn and keep the one with the best validation recall@k (ties: the earlier
    one; NaN never wins); every candidate's recall goes to the winner's ``valid_recall``."""
    if not candidates:
        raise ValueError(f"{name}.fit_tuned: empty grid")
    best, best_recall = None, -np.inf
    recall: dict[str, float] = {}
    for key, build in candidates.items():
        model = build()
        recall[key] = validation.recall(model)
        if best is None or (np.isfinite(recall[key]) and recall[key] > best_recall):
            best, best_recall = model, recall[key] if np.isfinite(recall[key]) else -np.inf
    assert best is not None
    best.valid_recall = recall
    return best


class ItemKNN(_ScoreRanker):
    """Item-based k-nearest-neighbours: ``score(u, j) = sum_{i in history(u)} sim(i, j)``.

    ``sim(i, j) = |users(i) & users(j)| / (sqrt|users(i)| * sqrt|users(j)| + shrink)``: cosine on the binary
    user x item click matrix, with ``shrink`` damping similarities backed by few users; ``sim(i, i) = 0``.
    Row i of ``similarity`` keeps only item i's ``neighbours`` largest similarities (ties: lower index), so
    memory is O(items x neighbours). ``popularity`` (default: training click counts of distinct users)
    orders equal scores, so users with an empty history get the popularity ranking.
    """

    def __init__(
        self, similarity: sp.csr_matrix, popularity: np.ndarray, neighbours: int, shrink: float
    ) -> None:
        self.similarity = similarity
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.neighbours = neighbours
        self.shrink = shrink
        self.n_items = similarity.shape[0]
        self.valid_recall: dict[str, float] = {}

    @classmethod
    def fit(
        cls,
        clicks: pd.DataFrame,
        catalogue_items: np.ndarray,
        neighbours: int = 100,
        shrink: float = 0.0,
        popularity: np.ndarray | None = None,
    ) -> ItemKNN:
        """Similarities from ``clicks`` (user_id, item_id; clicks outside the catalogue dropped), computed
        ``_SIM_BLOCK_ITEMS`` rows at a time and pruned per row, never as a dense items x items matrix."""
        if neighbours < 1:
            raise ValueError("ItemKNN: neighbours must be >= 1")
        x = _click_matrix(clicks, _catalogue_index(catalogue_items))
        n = x.shape[1]
        norms = np.sqrt(np.asarray(x.sum(axis=0), dtype=np.float64).ravel())
        xt = x.T.tocsr()
        rows_out, cols_out, sims_out = [], [], []
        for start in range(0, n, _SIM_BLOCK_ITEMS):
            co = (xt[start : start + _SIM_BLOCK_ITEMS] @ x).tocsr()
            rows = np.repeat(np.arange(co.shape[0], dtype=np.int64), np.diff(co.indptr)) + start
            cols = co.indices.astype(np.int64)
            off_diagonal = cols != rows
            rows, cols, dots = rows[off_diagonal], cols[off_diagonal], co.data[off_diagonal]
            sims = dots / (norms[rows] * norms[cols] + shrink)
            order = np.lexsort((cols, -sims, rows))  # by row, then similarity desc, then column
            rows, cols, sims = rows[order], cols[order], sims[order]
            first = np.searchsorted(rows, rows, side="left")
            keep = np.arange(len(rows)) - first < neighbours
            rows_out.append(rows[keep])
            cols_out.append(cols[keep])
            sims_out.append(sims[keep])
        similarity = sp.csr_matrix(
            (
                np.concatenate(sims_out) if sims_out else np.zeros(0),
                (
                    np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64),
                    np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64),
                ),
            ),
            shape=(n, n),
        )
        pop = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() if popularity is None else popularity
        return cls(similarity, _check_popularity(pop, n), neighbours, float(shrink))

    @classmethod
    def fit_tuned(
        cls,
        train_clicks: pd.DataFrame,
        *,
        validation: ValidationSplit,
        catalogue_items: np.ndarray,
        grid: Sequence[tuple[int, float]] = ((50, 0.0), (200, 0.0), (200, 10.0)),
        popularity: np.ndarray | None = None,
    ) -> ItemKNN:
        """The model fitted on ``train_clicks`` with the ``(neighbours, shrink)`` of ``grid`` that has the
        best validation recall@k (ties: the earlier grid entry); every candidate's recall is kept in
        ``valid_recall`` (keys ``"<neighbours>/<shrink>"``). Refit on more data with ``fit`` if wanted."""
        candidates = {
            f"{neighbours}/{float(shrink):g}": lambda n=neighbours, s=shrink: cls.fit(
                train_clicks, catalogue_items, n, s, popularity
            )
            for neighbours, shrink in grid
        }
        return _best_on_validation(candidates, validation, "ItemKNN")

    def _score_block(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray((history @ self.similarity).toarray(), dtype=np.float64)

    def neighbour_table(self, catalogue_items: np.ndarray, neighbours: int) -> NeighbourTable:
        """Each item's ``neighbours`` largest similarities (ties: lower item id), in item ids: the
        table the retrieval blend scores a user's history with, in the evaluation and at serving
        (models/blend.py). Keeping every neighbour of the fit, its scores are this model's, in float32."""
        if neighbours < 1:
            raise ValueError("neighbour_table: neighbours must be >= 1")
        items = np.asarray(catalogue_items, dtype=np.int64)
        if len(items) != self.n_items:
            raise ValueError(f"neighbour_table: {len(items)} catalogue items, the model has {self.n_items}")
        coo = self.similarity.tocoo()
        keep = coo.data > 0
        rows, cols, sims = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
        rows, cols, sims = items[rows], items[cols], sims  # item ids from here on
        order = np.lexsort((cols, -sims, rows))  # by item, then similarity desc, then neighbour id
        rows, cols, sims = rows[order], cols[order], sims[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
        keep = rank < neighbours
        rows, cols, sims = rows[keep], cols[keep], sims[keep]
        item_ids, counts = np.unique(rows, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return NeighbourTable(item_ids, offsets, cols, sims.astype(np.float32))


class CatalogueTooLarge(ValueError):
    """EASE needs a dense items x items inverse; raised when the trained items exceed the limit, so the
    caller can skip EASE and report why."""


class EASE(_ScoreRanker):
    """EASE^R (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data").

    Over the ``trained_items`` (catalogue indices with at least one training click; the rest would only
    add empty rows to a dense matrix): ``G = X^T X + l2 I``, ``P = G^-1``, ``B = -P / diag(P)`` column-wise
    with ``diag(B) = 0`` (``weights``, float32), and ``score(u) = X_u B``. Catalogue items without training
    clicks have no score: they rank after every trained item, among themselves by ``popularity`` then
    index. ``popularity`` (default: training click counts of distinct users) also orders equal scores,
    so users with an empty history get the popularity ranking.
    """

    def __init__(
        self, weights: np.ndarray, trained_items: np.ndarray, n_items: int, popularity: np.ndarray, l2: float
    ) -> None:
        self.weights = weights
        self.trained_items = trained_items
        self.n_items = n_items
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self.l2 = l2
        self.valid_recall: dict[str, float] = {}

    @staticmethod
    def _gram(
        clicks: pd.DataFrame, catalogue_items: np.ndarray, max_items: int
    ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        x = _click_matrix(clicks, _catalogue_index(catalogue_items))
        counts = np.asarray(x.sum(axis=0)).ravel()
        trained = np.flatnonzero(counts > 0)
        if len(trained) > max_items:
            raise CatalogueTooLarge(
                f"EASE skipped: {len(trained)} catalogue items have training clicks, more than the limit of "
                f"{max_items} (it inverts a dense {len(trained)} x {len(trained)} matrix); raise "
                f"evaluation.ease_max_items to run it anyway"
            )
        xt = x[:, trained]
        gram = np.asarray((xt.T @ xt).toarray(), dtype=np.float64)
        return gram, trained, x.shape[1], counts

    @staticmethod
    def _weights(gram: np.ndarray, l2: float) -> np.ndarray:
        """float32 ``B`` from the Gram matrix: a float64 dense inverse (torch: threaded LAPACK, several
        times faster than scipy.linalg.inv here), divided in place to bound memory."""
        g = torch.from_numpy(gram).clone()
        g.diagonal().add_(l2)
        p = torch.linalg.inv(g)
        del g
        p.div_(-p.diagonal().clone()[None, :])
        p.diagonal().zero_()
        return p.to(torch.float32).numpy()

    @classmethod
    def fit(
        cls,
        clicks: pd.DataFrame,
        catalogue_items: np.ndarray,
        l2: float = 500.0,
        max_items: int = EASE_MAX_ITEMS,
        popularity: np.ndarray | None = None,
    ) -> EASE:
        """Closed-form fit on ``clicks`` (user_id, item_id; clicks outside the catalogue dropped). Peak
        memory is about 24 bytes x trained_items^2 (float64 Gram matrix and inverse, float32 weights);
        :class:`CatalogueTooLarge` when the trained items exceed ``max_items``."""
        if l2 <= 0:
            raise ValueError("EASE: l2 must be > 0 (G must be invertible)")
        gram, trained, n_items, counts = cls._gram(clicks, catalogue_items, max_items)
        pop = counts.astype(np.float64) if popularity is None else popularity
        return cls(cls._weights(gram, l2), trained, n_items, _check_popularity(pop, n_items), float(l2))

    @classmethod
    def fit_tuned(
        cls,
        train_clicks: pd.DataFrame,
        validation: ValidationSplit,
        catalogue_items: np.ndarray,
        *,
        popularity: np.ndarray | None = None,
        l2_grid: Sequence[float] = (10, 50, 200, 500, 2000),
        max_items: int = EASE_MAX_ITEMS,
    ) -> EASE:
        """The model fitted on ``train_clicks`` with the ``l2`` of ``l2_grid`` that has the best validation
        recall@k (ties: the earlier grid value), as attribute ``l2``; every candidate's recall is kept in
        ``valid_recall`` (keys ``f"{l2:g}"``, e.g. "500"). The Gram matrix is built once."""
        gram, trained, n_items, counts = cls._gram(train_clicks, catalogue_items, max_items)
        pop = _check_popularity(counts.astype(np.float64) if popularity is None else popularity, n_items)
        if any(l2 <= 0 for l2 in l2_grid):
            raise ValueError("EASE: l2 must be > 0 (G must be invertible)")
        candidates = {
            f"{float(l2):g}": lambda l2=l2: cls(cls._weights(gram, l2), trained, n_items, pop, float(l2))
            for l2 in l2_grid
        }
        return _best_on_validation(candidates, validation, "EASE")

    def _score_block(self, history: sp.csr_matrix) -> np.ndarray:
        trained_scores = np.asarray(history[:, self.trained_items] @ self.weights, dtype=np.float64)
        if len(self.trained_items) == self.n_items:
            return trained_scores
        # untrained items: below every trained item of the row (ties among them: popularity, index)
        floor = trained_scores.min(axis=1, initial=0.0) - 1.0
        out = np.repeat(floor[:, None], self.n_items, axis=1)
        out[:, self.trained_items] = trained_scores
        return out


def _check_popularity(popularity: np.ndarray, n_items: int) -> np.ndarray:
    popularity = np.asarray(popularity, dtype=np.float64)
    if popularity.shape != (n_items,):
        raise ValueError(f"popularity: {popularity.shape} given, ({n_items},) expected")
    return popularity
