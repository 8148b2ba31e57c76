"""The bundle members that tell serving how to blend two-tower candidates with a second list: recent
popularity, or item-kNN over the user's history.

The evaluate step chooses the share on the validation split and lists the popular items (refitted on
train + valid, like the models) in ``metrics/evaluation.json`` (``retrieval.blend``); the bundle step
writes them as ``retrieval_blend.json``, checksummed with the rest, and serving applies the share in
retrieval (serving/recommender.py, through models/blend.py). A bundle without the member serves the
two-tower alone (share 0), as bundles did before it. When the evaluate step chose item-kNN
(``"source": "item_knn"``), its neighbour table (``item_neighbours.npz``, written beside the evaluation
metrics, :class:`models.blend.NeighbourTable`) joins the bundle too and serving scores each user's history
feature with it; a document without ``source`` (written before it existed) means popularity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bundle_manifest import BundleIntegrityError

BLEND_MEMBER = "retrieval_blend.json"
NEIGHBOURS_MEMBER = "item_neighbours.npz"
BLEND_FORMAT = 1
SOURCES = ("popularity", "item_knn")
HISTORY_FEATURE = "hist_item_ids"  # the user feature item-kNN scores, offline and served alike


@dataclass(frozen=True)
class RetrievalBlend:
    """The share of retrieval slots for the popular items, and those items (most popular first)."""

    share: float
    item_ids: np.ndarray  # int64
    window_days: int | None = None
    source: str = "popularity"  # or "item_knn": the second list is item-kNN's (NEIGHBOURS_MEMBER)


def blend_of_metrics(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluate step's ``retrieval.blend`` (None when the blend was not evaluated)."""
    retrieval = metrics.get("retrieval")
    blend = retrieval.get("blend") if isinstance(retrieval, Mapping) else None
    return dict(blend) if isinstance(blend, Mapping) else None


def write_blend(blend: Mapping[str, Any], path: str | Path) -> Path:
    """``retrieval_blend.json`` from the evaluate step's ``retrieval.blend``."""
    missing = [key for key in ("share", "popular_item_ids") if key not in blend]
    if missing:
        raise BundleIntegrityError(f"evaluation metrics: retrieval.blend lacks {missing}")
    document = {
        "format": BLEND_FORMAT,
        "share": float(blend["share"]),
        "source": str(blend.get("source", "popularity")),
        "window_days": blend.get("window_days"),
        "item_ids": [int(i) for i in blend["popular_item_ids"]],
    }
    _check(document, Path(path))
    path = Path(path)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def read_blend(path: str | Path) -> RetrievalBlend:
    """Read and check ``retrieval_blend.json``; errors name the file and the field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleIntegrityError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != BLEND_FORMAT:
        raise BundleIntegrityError(f"{path}: expected format {BLEND_FORMAT}, got {document!r:.80}")
    _check(document, path)
    window = document.get("window_days")
    return RetrievalBlend(
        float(document["share"]),
        np.asarray(document["item_ids"], dtype=np.int64),
        None if window is None else int(window),
        str(document.get("source", "popularity")),
    )


def _check(document: Mapping[str, Any], path: Path) -> None:
    share = document.get("share")
    if not isinstance(share, int | float) or not 0.0 <= float(share) <= 1.0:
        raise BundleIntegrityError(f"{path}: 'share' must be a number in [0, 1], got {share!r}")
    ids = document.get("item_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BundleIntegrityError(f"{path}: 'item_ids' must be a list of integer item ids")
    if len(set(ids)) != len(ids):
        raise BundleIntegrityError(f"{path}: 'item_ids' lists an item more than once")
    source = document.get("source", "popularity")
    if source not in SOURCES:
        raise BundleIntegrityError(f"{path}: 'source' must be one of {list(SOURCES)}, got {source!r}")
    if float(share) > 0 and source == "popularity" and not ids:
        raise BundleIntegrityError(f"{path}: share {share} needs popular 'item_ids' to blend in")
