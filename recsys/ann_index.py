"""The ANN index file format and its search: a FAISS inner-product index plus a JSON sidecar.

The two-tower scores a (user, item) pair by the dot product of unit vectors, so the index must use
``METRIC_INNER_PRODUCT``; an L2 index is refused on load. The sidecar carries the tuned search parameter
(HNSW ``efSearch``, IVF ``nprobe``), so serving searches exactly as the build step measured, and the
index file's SHA-256, so a mismatched pair is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.artifact_io import file_sha256, staged_path, write_json

log = logging.getLogger(__name__)


METRIC = "inner_product"


SIDECAR_SUFFIX = ".json"


SIDECAR_FORMAT = 1


_METRIC_NAMES = {faiss.METRIC_INNER_PRODUCT: METRIC, faiss.METRIC_L2: "L2"}


class IndexContractError(ValueError):
    """Embeddings or an index file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TuningResult:
    """The tuned search parameter (None for exact search) and recall@K measured at each value tried."""

    name: str | None
    value: int | None
    recall: float
    curve: dict[int, float]


def write_index(
    index: faiss.Index,
    path: str | Path,
    *,
    index_type: str,
    k: int,
    recall_target: float,
    tuned: TuningResult,
    item_embeddings: str | Path | None = None,
) -> dict[str, Any]:
    """Write the index and then its sidecar atomically; the sidecar's SHA-256 pins the pair together."""
    path = Path(path)
    with staged_path(path) as tmp:
        faiss.write_index(index, str(tmp))
        index_sha, index_bytes = file_sha256(tmp), tmp.stat().st_size
    meta = {
        "format": SIDECAR_FORMAT,
        "type": index_type,
        "faiss_class": type(_unwrap(index)).__name__,
        "metric": METRIC,
        "dim": int(index.d),
        "count": int(index.ntotal),
        "k": int(k),
        "recall_target": recall_target,
        "recall_at_k": tuned.recall,
        "search_param": None if tuned.name is None else {"name": tuned.name, "value": tuned.value},
        "index_sha256": index_sha,
        "index_bytes": index_bytes,
        "item_embeddings": None if item_embeddings is None else str(item_embeddings),
        "item_embeddings_sha256": None if item_embeddings is None else file_sha256(Path(item_embeddings)),
        "faiss_version": faiss.__version__,
    }
    write_json(meta, sidecar_path(path))
    return meta


def load_index(
    path: str | Path, *, expected_dim: int | None = None, verify_checksum: bool = True
) -> tuple[faiss.Index, dict[str, Any]]:
    """Read an index + sidecar, refuse a non-inner-product or mismatched one, apply the tuned parameter."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if not path.exists():
        raise IndexContractError(f"{path}: index file not found")
    if not sidecar.exists():
        raise IndexContractError(
            f"{path}: sidecar {sidecar.name} missing; rebuild with components.build_index"
        )
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise IndexContractError(f"{sidecar}: not valid JSON: {exc}") from exc
    missing = [key for key in ("metric", "dim", "count", "search_param") if key not in meta]
    if missing:
        raise IndexContractError(f"{sidecar}: missing keys {missing}")
    if verify_checksum and meta.get("index_sha256") and file_sha256(path) != meta["index_sha256"]:
        raise IndexContractError(
            f"{path}: SHA-256 differs from {sidecar.name}; index and sidecar are not a pair"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexContractError(f"{path}: not a readable FAISS index: {exc}") from exc
    metric = _METRIC_NAMES.get(index.metric_type, f"metric code {index.metric_type}")
    if metric != METRIC or meta["metric"] != METRIC:
        raise IndexContractError(
            f"{path}: index metric is {metric} (sidecar says {meta['metric']}); the two-tower scores by "
            f"{METRIC}, so the index must use METRIC_INNER_PRODUCT (rebuild with components.build_index)"
        )
    if index.d != meta["dim"]:
        raise IndexContractError(
            f"{path}: index dim {index.d} != sidecar dim {meta['dim']} in {sidecar.name}"
        )
    if expected_dim is not None and index.d != expected_dim:
        raise IndexContractError(
            f"{path}: index dim {index.d} != query dim {expected_dim}; index and user tower come from "
            "different exports"
        )
    if index.ntotal != meta["count"]:
        raise IndexContractError(f"{path}: index holds {index.ntotal} vectors, sidecar says {meta['count']}")
    param = meta["search_param"]
    if param is not None:
        faiss.ParameterSpace().set_index_parameter(index, param["name"], int(param["value"]))
    return index, meta


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` item ids (int64, -1 where fewer were found) and inner-product scores for each query row."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != index.d:
        raise IndexContractError(f"queries of shape {tuple(queries.shape)} do not match index dim {index.d}")
    if k <= 0:
        raise IndexContractError(f"k must be positive, got {k}")
    scores, ids = index.search(q, min(k, index.ntotal))
    return ids, scores


def sidecar_path(index_path: str | Path) -> Path:
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + SIDECAR_SUFFIX)


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index doing the work under the id map (and refine stage), for naming it in metadata."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexRefine):
        return faiss.downcast_index(inner.base_index)
    return inner
