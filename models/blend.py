"""Two-tower candidates blended with a second list, recent popularity or item-kNN over the user's history:
what retrieval serves when the model alone loses to a baseline (issue 22: "let recommend use what wins").

The blend gives a fixed ``share`` of the slots of every prefix of the list to the popularity list: after
``m`` slots, ``floor(share * m)`` of them came from popularity (share 0: pure two-tower, 1: pure
popularity; 0.5 alternates model, popular, model, ...), so the same share holds at every K a metric or
the server cuts the list at. Each slot takes the next item of its source not already in the list; when
one source runs out the other fills the rest. The evaluate step picks the share on the validation split
(:func:`choose_share`) and serving applies it to the ANN results (serving/recommender.py), both through
:func:`blend_lists`, so what was measured is what is served. The item-kNN list comes from a
:class:`NeighbourTable` (each item's top neighbours and weights, a bundle member) scored over the user's
history feature by :meth:`NeighbourTable.ranked`, in the evaluation and in the server alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.metrics import ItemSets, retrieval_metrics

__all__ = [
    "BlendChoice",
    "NeighbourTable",
    "blend_lists",
    "blend_topk",
    "choose_share",
    "choose_source",
    "popular_slots",
]

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


def blend_topk(model: np.ndarray, popular: np.ndarray | Sequence[Sequence[int]], share: float) -> np.ndarray:
    """[U, k] blends of each user's row of ``model`` and ``popular`` ([U, k] catalogue indices, best first,
    the user's excluded items last or absent; or one list per user of any length, e.g. item-kNN's
    neighbours), k = ``model``'s width. A short second list is filled in by the model."""
    ragged = not isinstance(popular, np.ndarray)
    if (ragged and len(popular) != len(model)) or (not ragged and model.shape != popular.shape):
        shape = (len(popular),) if ragged else popular.shape
        raise ValueError(f"blend_topk: model {model.shape} and popular {shape} lists differ")
    if share == 0.0:
        return model
    if share == 1.0 and not ragged:
        return popular
    k = model.shape[1]
    return np.array(
        [blend_lists(m, list(p), share, k) for m, p in zip(model.tolist(), popular, strict=True)],
        dtype=np.int64,
    ).reshape(model.shape)


@dataclass(frozen=True)
class BlendChoice:
    """The share chosen on validation and the validation recall@k of every candidate share."""

    share: float
    k: int
    valid_recall: dict[str, float] = field(default_factory=dict)


def choose_share(
    model: np.ndarray,
    popular: np.ndarray | Sequence[Sequence[int]],
    relevant: ItemSets,
    shares: Sequence[float],
    k: int,
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


def choose_source(choices: Mapping[str, BlendChoice]) -> str:
    """The second list (``choices``: source name -> its chosen share) whose blend has the best validation
    recall; ties go to the earlier one (the configured order)."""
    if not choices:
        raise ValueError("choose_source: no blend source")

    def recall(name: str) -> float:
        value = choices[name].valid_recall.get(f"{choices[name].share:g}", -math.inf)
        return value if np.isfinite(value) else -math.inf

    best = next(iter(choices))
    for name in choices:
        if recall(name) > recall(best):
            best = name
    return best


@dataclass(frozen=True)
class NeighbourTable:
    """Each item's top neighbours, best first, and their weights (item-kNN's similarities), as CSR rows:
    row ``r`` (item ``item_ids[r]``; ascending, unique) holds ``neighbours[offsets[r]:offsets[r + 1]]``
    (item ids) with ``weights`` (float32, > 0). Items without neighbours have no row."""

    item_ids: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n + 1] int64
    neighbours: np.ndarray  # [nnz] int64
    weights: np.ndarray  # [nnz] float32

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.offsets.shape != (n + 1,) or (n + 1 and int(self.offsets[0]) != 0):
            raise ValueError(f"neighbour table: offsets must have {n + 1} entries starting at 0")
        if int(self.offsets[-1]) != len(self.neighbours) or len(self.neighbours) != len(self.weights):
            raise ValueError("neighbour table: offsets, neighbours and weights disagree in length")
        if np.any(np.diff(self.offsets) < 0) or np.any(np.diff(self.item_ids) <= 0):
            raise ValueError("neighbour table: item_ids must ascend and offsets must not decrease")

    @property
    def width(self) -> int:
        """The most neighbours any item keeps."""
        return int(np.diff(self.offsets).max(initial=0))

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Each id's row, -1 where the item has no neighbours."""
        rows = np.searchsorted(self.item_ids, item_ids)
        inside = rows < len(self.item_ids)
        found = np.zeros(len(rows), dtype=bool)
        found[inside] = self.item_ids[rows[inside]] == item_ids[inside]
        return np.where(found, rows, -1)

    def ranked(
        self, history: Sequence[int] | np.ndarray, k: int, exclude: Sequence[int] | np.ndarray = ()
    ) -> list[int]:
        """Up to ``k`` item ids by item-kNN score, ``score(j) = sum of the weights of j over the rows of
        the (distinct) ``history`` items``, best first, ties by lower id; history items, ``exclude`` and
        items scoring 0 are left out (so the list may be shorter than ``k``; the blend fills it in)."""
        hist = np.unique(np.asarray(history, dtype=np.int64))
        rows = self.rows_of(hist)
        rows = rows[rows >= 0]
        if not len(rows) or k <= 0:
            return []
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        take = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)])
        ids, weights = self.neighbours[take], self.weights[take].astype(np.float64)
        keep = ~np.isin(ids, hist)
        if len(exclude):
            keep &= ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
        unique, inverse = np.unique(ids[keep], return_inverse=True)
        scores = np.bincount(inverse, weights=weights[keep], minlength=len(unique))
        order = np.lexsort((unique, -scores))[:k]
        return unique[order][scores[order] > 0].tolist()

    def save(self, path: Path) -> Path:
        """``path`` (.npz) with the four arrays."""
        np.savez_compressed(
            path,
            item_ids=self.item_ids,
            offsets=self.offsets,
            neighbours=self.neighbours,
            weights=self.weights,
        )
        return path

    @classmethod
    def load(cls, path: Path) -> NeighbourTable:
        """The table saved at ``path``; a file that is no such table raises ValueError naming it."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in ("item_ids", "offsets", "neighbours", "weights")}
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(
                f"{path}: not a neighbour table (item_ids, offsets, neighbours, weights): {exc}"
            ) from exc
        try:
            return cls(
                arrays["item_ids"].astype(np.int64),
                arrays["offsets"].astype(np.int64),
                arrays["neighbours"].astype(np.int64),
                arrays["weights"].astype(np.float32),
            )
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
