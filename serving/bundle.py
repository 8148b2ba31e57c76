"""The bundle as serving holds it in memory: verified files, the towers, the rankers, the index.

Everything is checked before the server answers anything: the manifest's SHA-256 of every file
(``recsys.bundle_manifest.load_manifest``, which names the offending file), the index's metric and dim
against the user tower, and the presence of the default ranker. A bundle that fails any check stops
start-up; serving a model whose index drifted from it would return plausible but wrong items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import load_file

from models import FeatureEncoder, RecModel, load_model
from models.blend import NeighbourTable
from models.registry import RANKERS, RETRIEVAL_MODEL
from recsys import artifact_layout as layout
from recsys.ann_index import load_index
from recsys.bundle_blend import BLEND_MEMBER, HISTORY_FEATURE, NEIGHBOURS_MEMBER, read_blend
from recsys.bundle_manifest import BundleIntegrityError, load_manifest


@dataclass
class ServingBundle:
    """A verified bundle: the two-tower, every ranker it holds, the item index and the cold-start list."""

    path: Path
    version: str
    manifest: dict[str, Any]
    two_tower: RecModel
    two_tower_encoder: FeatureEncoder
    rankers: dict[str, tuple[RecModel, FeatureEncoder]]
    index: faiss.Index
    catalogue: np.ndarray  # int64 item ids in the index
    popular_ids: np.ndarray  # int64, most popular first
    popular_scores: np.ndarray  # float32
    # retrieval blend (recsys/bundle_blend.py): this share of the slots goes to blend_ids, most popular
    # first (only catalogue items), scored by the two-tower with blend_vectors [len(blend_ids), d]
    blend_share: float = 0.0
    blend_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    blend_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    # item-kNN blend (source "item_knn"): the second list is blend_table's over the user's history
    # feature; blend_ids / blend_vectors are then the whole catalogue, to score what it lists
    blend_table: NeighbourTable | None = None
    blend_positions: IdPositions | None = None  # rows of blend_ids, for the item-kNN list's items

    @property
    def user_features(self) -> list[str]:
        """Features read per user: every declared feature the item tower does not read."""
        item = set(self.item_features)
        return [name for name in self.feature_names if name not in item]

    @property
    def item_features(self) -> list[str]:
        """Features read per item: the item tower's (content and item statistics)."""
        return list(self.two_tower.item_feature_names())  # type: ignore[attr-defined]

    @property
    def feature_names(self) -> list[str]:
        """Every feature some model of the bundle reads, in declaration order."""
        used: set[str] = set(self.two_tower.feature_names())
        for model, _ in self.rankers.values():
            used |= set(model.feature_names())
        return [name for name in self.two_tower_encoder.spec.names if name in used]

    def knows_user(self, user_id: int) -> bool:
        """Whether the user id has its own embedding row (it was seen in training)."""
        encoded = self.two_tower_encoder.encode_ids("user_id", np.asarray([user_id], dtype=np.int64))
        return bool(encoded[0] >= 2)


def model_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every model file of a bundle manifest: equal digests, the same models."""
    prefix = f"{layout.BUNDLE_MODELS}/"
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleIntegrityError(f"bundle {manifest.get('version')}: manifest has no 'files'")
    return {name: str(entry["sha256"]) for name, entry in files.items() if name.startswith(prefix)}


def load_bundle(
    bundle_dir: str | Path, default_ranker: str, models_of: ServingBundle | None = None
) -> ServingBundle:
    """Verify and load ``bundle_dir``; raises :class:`BundleIntegrityError` naming the file at fault.

    ``models_of``: a loaded bundle whose model objects are taken instead of loading them again when the
    model files' digests are equal (an index refresh: same models, grown index)."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    files = manifest["files"]
    for name in (layout.bundle_model_file(RETRIEVAL_MODEL, file) for file in layout.MODEL_FILES):
        if name not in files:
            raise BundleIntegrityError(f"{bundle_dir}: file '{name}' (the two-tower) is not in the bundle")
    for name in (layout.INDEX, layout.INDEX_SIDECAR, layout.ITEM_EMBEDDINGS, layout.POPULAR_ITEMS):
        if name not in files:
            raise BundleIntegrityError(f"{bundle_dir}: file '{name}' is not in the bundle")
    if models_of is not None and model_digests(manifest) == model_digests(models_of.manifest):
        two_tower, tt_encoder, rankers = models_of.two_tower, models_of.two_tower_encoder, models_of.rankers
    else:
        two_tower, tt_encoder, rankers = _load_models(bundle_dir, files)
    if default_ranker not in rankers:
        raise BundleIntegrityError(
            f"{bundle_dir}: serving.default_ranker '{default_ranker}' has no model in the bundle "
            f"(files '{layout.bundle_model_file(default_ranker, '...')}'); "
            f"it holds {sorted(rankers) or 'no ranker'}"
        )
    index, _ = load_index(bundle_dir / layout.INDEX, expected_dim=int(two_tower.output_dim))  # type: ignore[arg-type]
    tensors = load_file(str(bundle_dir / layout.ITEM_EMBEDDINGS))
    catalogue = tensors["item_ids"].astype(np.int64)
    if len(catalogue) != index.ntotal:
        raise BundleIntegrityError(
            f"{bundle_dir}: '{layout.ITEM_EMBEDDINGS}' has {len(catalogue)} items, "
            f"'{layout.INDEX}' {index.ntotal}"
        )
    popular_ids, popular_scores = _popular_items(bundle_dir / layout.POPULAR_ITEMS)
    share, blend_ids, blend_vectors = 0.0, np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    table = None
    if BLEND_MEMBER in files:
        blend = read_blend(bundle_dir / BLEND_MEMBER)
        if blend.source == "item_knn":
            table = _neighbour_table(bundle_dir, files)
            share, blend_ids = blend.share, catalogue
            blend_vectors = np.ascontiguousarray(tensors["embeddings"], dtype=np.float32)
        else:
            rows = IdPositions(catalogue).positions(blend.item_ids)
            share, blend_ids = blend.share, blend.item_ids[rows >= 0]
            blend_vectors = np.ascontiguousarray(tensors["embeddings"][rows[rows >= 0]], dtype=np.float32)
            if share > 0 and not len(blend_ids):
                raise BundleIntegrityError(f"{bundle_dir}: '{BLEND_MEMBER}' lists no item of the catalogue")
    del tensors
    bundle = ServingBundle(
        path=bundle_dir,
        version=str(manifest["version"]),
        manifest=manifest,
        two_tower=two_tower,
        two_tower_encoder=tt_encoder,
        rankers=rankers,
        index=index,
        catalogue=catalogue,
        popular_ids=popular_ids,
        popular_scores=popular_scores,
        blend_share=share,
        blend_ids=blend_ids,
        blend_vectors=blend_vectors,
        blend_table=table,
        blend_positions=IdPositions(blend_ids) if table is not None else None,
    )
    if table is not None and HISTORY_FEATURE not in bundle.user_features:
        raise BundleIntegrityError(
            f"{bundle_dir}: '{BLEND_MEMBER}' blends item-kNN over the user feature '{HISTORY_FEATURE}', "
            "which no model of the bundle reads, so serving would not fetch it"
        )
    return bundle


def _neighbour_table(bundle_dir: Path, files: dict[str, Any]) -> NeighbourTable:
    """The item-kNN blend's neighbour table; a bundle whose blend names item-kNN must carry it."""
    if NEIGHBOURS_MEMBER not in files:
        raise BundleIntegrityError(
            f"{bundle_dir}: '{BLEND_MEMBER}' blends item-kNN but '{NEIGHBOURS_MEMBER}' is not in the bundle"
        )
    try:
        return NeighbourTable.load(bundle_dir / NEIGHBOURS_MEMBER)
    except ValueError as exc:
        raise BundleIntegrityError(str(exc)) from exc


class IdPositions:
    """Positions of ids in a fixed array (-1 where absent), safe to query from many threads at once.

    Requests run in a thread pool; pandas' ``Index.get_indexer`` fills its hash table lazily on first use
    and is not thread-safe: concurrent first calls answered "Reindexing only valid with uniquely valued
    Index objects" (a 500) for a unique index. Sorted ids and ``searchsorted`` are read-only.
    """

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        if len(ids) > 1 and bool((self._sorted[1:] == self._sorted[:-1]).any()):
            raise ValueError("the catalogue has duplicate item ids")

    def __len__(self) -> int:
        return len(self._sorted)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if not len(self._sorted):
            return np.full(item_ids.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._sorted, item_ids), len(self._sorted) - 1)
        return np.where(self._sorted[at] == item_ids, self._order[at], -1)


def _load_models(
    bundle_dir: Path, files: dict[str, Any]
) -> tuple[RecModel, FeatureEncoder, dict[str, tuple[RecModel, FeatureEncoder]]]:
    """The two-tower with its encoder and every ranker the bundle holds, each checked to be its kind."""
    two_tower_dir = bundle_dir / layout.BUNDLE_MODELS / RETRIEVAL_MODEL
    two_tower, tt_encoder = load_model(two_tower_dir)
    if two_tower.kind != RETRIEVAL_MODEL:
        raise BundleIntegrityError(f"{two_tower_dir}: holds a '{two_tower.kind}' model, not a two-tower")
    rankers = {}
    for kind in RANKERS:
        if layout.bundle_model_file(kind, layout.MODEL_CONFIG) in files:
            model, encoder = load_model(bundle_dir / layout.BUNDLE_MODELS / kind)
            if model.kind != kind:
                raise BundleIntegrityError(
                    f"{bundle_dir / layout.BUNDLE_MODELS / kind}: holds a '{model.kind}' model"
                )
            rankers[kind] = (model, encoder)
    return two_tower, tt_encoder, rankers


def _popular_items(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = json.loads(path.read_text())
        ids = np.asarray(data["item_ids"], dtype=np.int64)
        scores = np.asarray(data["scores"], dtype=np.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BundleIntegrityError(
            f"{path}: expected {{'item_ids': [int...], 'scores': [float...]}}: {exc}"
        ) from exc
    if ids.ndim != 1 or ids.shape != scores.shape or len(ids) == 0:
        raise BundleIntegrityError(f"{path}: 'item_ids' and 'scores' must be equal-length, non-empty lists")
    return ids, scores
