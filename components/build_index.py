"""Build index step: a FAISS inner-product index over the exported item embeddings, tuned to a recall target.

The two-tower scores a (user, item) pair by the dot product of unit vectors, so the index uses
``METRIC_INNER_PRODUCT``; an L2 index ranks the same unit vectors identically only in theory and silently
breaks the moment an embedding is not exactly normalised, so one is refused on load. The approximate
index's search parameter (HNSW ``efSearch``, IVF ``nprobe``) is raised until recall@K against exact search
on real query vectors (validation-split user embeddings) reaches ``index.recall_target``; the tuned value
travels with the index in a JSON sidecar so serving searches exactly as it was measured.

Recall counts ties: a returned item whose exact score equals the K-th exact score is a correct answer
(items with coinciding vectors, e.g. cold items sharing their category's embedding, are interchangeable).
Many coinciding vectors still break an HNSW graph (their neighbour lists fill with copies of one point):
when the approximate index cannot reach the target, the step falls back to exact search (``flat``) up
to ``index.flat_fallback_max_items`` items, and says so in its metrics (``fallback``); above it, it fails.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from recsys.ann_index import METRIC, IndexContractError, TuningResult, search, write_index
from recsys.artifact_io import write_json
from recsys.config import IndexConfig
from recsys.step_contract import STEPS

CONTRACT = STEPS["build_index"]

log = logging.getLogger(__name__)

# a returned item whose exact score ties the K-th exact score within float32 noise is a correct answer
TIE_TOLERANCE = 1e-5
_SEARCH_PARAM = {"hnsw": "efSearch", "ivf_pq": "nprobe"}
_SINGLE_QUERY_TIMING = (1_000, 3.0)  # at most this many one-at-a-time queries, or this many seconds


class RecallTargetError(RuntimeError):
    """The search parameter reached its ceiling without the recall target; carries the curve measured."""

    def __init__(self, message: str, curve: dict[int, float]) -> None:
        super().__init__(message)
        self.curve = curve


@dataclass(frozen=True)
class Embeddings:
    """Rows of unit vectors with their entity ids, as read from a safetensors file."""

    ids: np.ndarray  # int64 [N]
    vectors: np.ndarray  # float32 [N, d], C-contiguous
    source: str
    _order: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_order", np.argsort(self.ids, kind="stable"))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row index of each id (same shape), -1 where the id is unknown (FAISS pads misses with -1)."""
        sorted_ids = self.ids[self._order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        return np.where(found, self._order[pos], -1)


def run(
    config: IndexConfig,
    seed: int,
    *,
    item_embeddings: str | Path,
    query_embeddings: str | Path,
    output: str | Path,
    metrics_file: str | Path,
) -> dict[str, Any]:
    """Build, tune and write the index (+ sidecar) and its metrics."""
    item_path, query_path = Path(item_embeddings), Path(query_embeddings)
    output, metrics_file = Path(output), Path(metrics_file)

    items = read_embeddings(item_path, "item_ids", config.norm_tolerance, unique_ids=True)
    queries = read_embeddings(query_path, "user_ids", config.norm_tolerance)
    if queries.dim != items.dim:
        raise IndexContractError(
            f"{query_path}: query dim {queries.dim} != item embedding dim {items.dim} in {item_path}; "
            "both must come from the same two-tower export"
        )
    index_type = choose_index_type(len(items), config)
    k = min(config.k, len(items))

    started = time.perf_counter()
    index = build_index(items, index_type, config, seed)
    build_seconds = time.perf_counter() - started

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(queries))
    tune_q = queries.vectors[order[: config.tune_queries]]
    holdout_q = queries.vectors[order[config.tune_queries : 2 * config.tune_queries]]
    exact = _exact_index(items)
    exact_tune, _ = exact.search(tune_q, k)

    started = time.perf_counter()
    fallback = None
    try:
        limits = tuning_limits(index_type, config)
        tuned = tune_search_param(
            index, index_type, items, tune_q, exact_tune, config.recall_target, **limits
        )
    except RecallTargetError as exc:
        if len(items) > config.flat_fallback_max_items:
            raise
        log.warning("build_index: %s; falling back to exact search (flat)", exc)
        fallback = {"from": index_type, "reason": str(exc), "curve": exc.curve}
        index_type = "flat"
        index = build_index(items, index_type, config, seed)
        tuned = tune_search_param(index, index_type, items, tune_q, exact_tune, config.recall_target)
    tune_seconds = time.perf_counter() - started
    holdout_recall = None
    if len(holdout_q):
        found, _ = search(index, holdout_q, k)
        holdout_recall = recall_at_k(found, holdout_q, items, exact.search(holdout_q, k)[0])
    qps_single, qps_batched = measure_qps(index, tune_q, k)

    meta = write_index(
        index,
        output,
        index_type=index_type,
        k=k,
        recall_target=config.recall_target,
        tuned=tuned,
        item_embeddings=item_path,
    )
    metrics = {
        "type": index_type,
        "faiss_class": meta["faiss_class"],
        "metric": METRIC,
        "count": len(items),
        "dim": items.dim,
        "k": k,
        "recall_target": config.recall_target,
        "tune_margin_sigmas": config.tune_margin_sigmas,
        "recall_at_k": tuned.recall,
        "recall_at_k_holdout": holdout_recall,
        "search_param": meta["search_param"],
        # the approximate index that missed the target, when exact search replaced it (else None)
        "fallback": None
        if fallback is None
        else fallback | {"curve": [{"value": v, "recall": r} for v, r in sorted(fallback["curve"].items())]},
        "tuning_curve": [{"value": v, "recall": r} for v, r in sorted(tuned.curve.items())],
        "qps_single_query": qps_single,
        "qps_batched": qps_batched,
        "build_seconds": round(build_seconds, 3),
        "tune_seconds": round(tune_seconds, 3),
        "memory_bytes": meta["index_bytes"],
        "n_tune_queries": len(tune_q),
        "n_holdout_queries": len(holdout_q),
        "threads": faiss.omp_get_max_threads(),
    }
    write_json(metrics, metrics_file)
    log.info(
        "build_index: %s over %s items (d=%d) recall@%d=%.4f %s, %.0f QPS single / %.0f batched -> %s",
        index_type,
        f"{len(items):,}",
        items.dim,
        k,
        tuned.recall,
        meta["search_param"],
        qps_single,
        qps_batched,
        output,
    )
    return metrics


def read_embeddings(
    path: str | Path, id_key: str, norm_tolerance: float = 1e-3, *, unique_ids: bool = False
) -> Embeddings:
    """Read ``id_key`` int64 [N] + ``embeddings`` float [N, d] and check they are finite unit vectors."""
    path = Path(path)
    if not path.exists():
        raise IndexContractError(f"{path}: embeddings file not found (run python -m components.export)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise IndexContractError(f"{path}: not a readable safetensors file: {exc}") from exc
    for key in (id_key, "embeddings"):
        if key not in tensors:
            raise IndexContractError(f"{path}: missing tensor '{key}' (has {sorted(tensors)})")
    ids, vectors = tensors[id_key], tensors["embeddings"]
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise IndexContractError(
            f"{path}: '{id_key}' must be a 1-D integer tensor, got {ids.dtype} {ids.shape}"
        )
    if vectors.ndim != 2 or vectors.dtype.kind != "f":
        raise IndexContractError(
            f"{path}: 'embeddings' must be a 2-D float tensor [N, d], got {vectors.dtype} {vectors.shape}"
        )
    if vectors.shape[0] != ids.shape[0]:
        raise IndexContractError(
            f"{path}: {ids.shape[0]} '{id_key}' but {vectors.shape[0]} embedding rows; they must pair up"
        )
    if vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise IndexContractError(f"{path}: no embeddings (shape {vectors.shape})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors).all(axis=1)).sum())
        raise IndexContractError(f"{path}: {bad} embedding row(s) contain NaN or inf")
    norms = np.linalg.norm(vectors, axis=1)
    off = np.abs(norms - 1.0) > norm_tolerance
    if off.any():
        first = int(np.argmax(off))
        raise IndexContractError(
            f"{path}: {int(off.sum())} of {len(norms)} embeddings are not unit-norm (|norm - 1| > "
            f"{norm_tolerance}), e.g. {id_key}={int(ids[first])} has norm {norms[first]:.6f}; the two-tower "
            "scores by the dot product of L2-normalised vectors, so export must normalise them"
        )
    ids = ids.astype(np.int64, copy=False)
    if unique_ids and len(np.unique(ids)) != len(ids):
        uniq, counts = np.unique(ids, return_counts=True)
        raise IndexContractError(f"{path}: duplicate {id_key}, e.g. {uniq[counts > 1][:5].tolist()}")
    return Embeddings(ids=ids, vectors=vectors, source=str(path))


def choose_index_type(n_items: int, config: IndexConfig) -> str:
    """``config.type``, or for ``auto`` exact search below ``flat_max_items``, IVF-PQ for very large."""
    if config.type != "auto":
        return config.type
    if n_items < config.flat_max_items:
        return "flat"
    return "ivf_pq" if n_items >= config.ivf_pq_min_items else "hnsw"


def build_index(items: Embeddings, index_type: str, config: IndexConfig, seed: int = 0) -> faiss.Index:
    """An inner-product index of ``index_type`` holding ``items`` under their item ids (IndexIDMap2)."""
    d, n = items.dim, len(items)
    if index_type == "flat":
        base = faiss.IndexFlatIP(d)
    elif index_type == "hnsw":
        base = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = config.hnsw_ef_construction
    elif index_type == "ivf_pq":
        base = _train_ivf_pq(items, config, seed)
    else:
        raise IndexContractError(f"index.type: unknown index type {index_type!r}")
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(items.vectors, items.ids)
    if index.ntotal != n:
        raise IndexContractError(f"{items.source}: index holds {index.ntotal} vectors after adding {n}")
    return index


def tuning_limits(index_type: str, config: IndexConfig) -> dict[str, Any]:
    """:func:`tune_search_param`'s ceiling (efSearch's ``index.ef_search_max``; nprobe's is nlist) and
    safety margin from the ``index`` section: the step and the ANN benchmark tune alike."""
    return {
        "max_value": config.ef_search_max if index_type == "hnsw" else None,
        "margin_sigmas": config.tune_margin_sigmas,
    }


def tune_search_param(
    index: faiss.Index,
    index_type: str,
    items: Embeddings,
    queries: np.ndarray,
    exact_scores: np.ndarray,
    recall_target: float,
    max_value: int | None = None,
    margin_sigmas: float = 0.0,
) -> TuningResult:
    """Smallest efSearch / nprobe whose recall@K reaches the target: doubling, then bisection.

    ``exact_scores`` are the exact top-K inner products of ``queries`` (K = its width). A value passes when
    mean recall minus ``margin_sigmas`` standard errors reaches the target, so the tuned value does not
    fall short on unseen queries half of the time. Raises :class:`RecallTargetError` if the parameter's
    ceiling (``max_value``: the configured ``index.ef_search_max`` for efSearch; default nlist for nprobe)
    does not reach the target.
    """
    k = exact_scores.shape[1]
    if len(queries) == 0:
        raise IndexContractError("no query vectors to tune the index on")
    name = _SEARCH_PARAM.get(index_type)
    if name is None:  # exact search: nothing to tune, but measure so the metric is real
        found, _ = search(index, queries, k)
        return TuningResult(None, None, recall_at_k(found, queries, items, exact_scores), {})
    if max_value is None:
        if name != "nprobe":
            raise ValueError("tuning efSearch needs its ceiling (index.ef_search_max) as max_value")
        max_value = faiss.extract_index_ivf(index).nlist
    params = faiss.ParameterSpace()
    curve: dict[int, float] = {}
    lower_bounds: dict[int, float] = {}

    def reaches_target(value: int) -> bool:
        if value not in curve:
            params.set_index_parameter(index, name, value)
            found, _ = search(index, queries, k)
            per_query = recall_per_query(found, queries, items, exact_scores)
            curve[value] = float(per_query.mean())
            sem = float(per_query.std(ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
            lower_bounds[value] = curve[value] - margin_sigmas * sem
        return lower_bounds[value] >= recall_target

    # HNSW searches with max(efSearch, k), so efSearch below k is never worth trying
    value = min(k if name == "efSearch" else 1, max_value)
    failed = value - 1
    while not reaches_target(value):
        failed = value
        if value >= max_value:
            best = max(curve, key=curve.__getitem__)
            raise RecallTargetError(
                f"recall@{k} target {recall_target} not reachable with {index_type}: best {curve[best]:.4f} "
                f"at {name}={best} (ceiling {max_value}, margin {margin_sigmas:g} standard errors); raise "
                "the ceiling or index quality (hnsw_m / hnsw_ef_construction, pq_m / refine_k_factor) or "
                "use type flat",
                curve,
            )
        value = min(2 * value, max_value)
    passed = value
    while passed - failed > max(1, passed // 16):  # bisect to within ~6% of the smallest passing value
        mid = (failed + passed) // 2
        if reaches_target(mid):
            passed = mid
        else:
            failed = mid
    params.set_index_parameter(index, name, passed)
    return TuningResult(name, passed, curve[passed], dict(sorted(curve.items())))


def recall_at_k(
    found_ids: np.ndarray, queries: np.ndarray, items: Embeddings, exact_scores: np.ndarray
) -> float:
    """Mean share of the exact top-K found; an item tying the K-th exact score counts (duplicate vectors)."""
    return float(recall_per_query(found_ids, queries, items, exact_scores).mean())


def recall_per_query(
    found_ids: np.ndarray, queries: np.ndarray, items: Embeddings, exact_scores: np.ndarray
) -> np.ndarray:
    """Recall@K of each query row (K = ``exact_scores``' width); see :func:`recall_at_k`."""
    k = exact_scores.shape[1]
    found_ids = found_ids[:, :k]
    rows = items.rows_of(found_ids)
    valid = rows >= 0
    true_scores = np.einsum("qd,qkd->qk", queries, items.vectors[np.where(valid, rows, 0)])
    hits = valid & (true_scores >= exact_scores[:, -1:] - TIE_TOLERANCE)
    return np.minimum(hits.sum(axis=1), k) / k


def measure_qps(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """Queries per second one query per call (online serving) and all queries in one call (offline)."""
    limit, seconds = _SINGLE_QUERY_TIMING
    done, started = 0, time.perf_counter()
    for row in queries[:limit]:
        index.search(row[None, :], k)
        done += 1
        if time.perf_counter() - started > seconds:
            break
    single = done / max(time.perf_counter() - started, 1e-9)
    started = time.perf_counter()
    index.search(queries, k)
    batched = len(queries) / max(time.perf_counter() - started, 1e-9)
    return round(single, 1), round(batched, 1)


def _train_ivf_pq(items: Embeddings, config: IndexConfig, seed: int) -> faiss.Index:
    """IVF-PQ trained on a sample, optionally under an exact re-ranking stage (IndexRefineFlat)."""
    d, n = items.dim, len(items)
    nlist = config.ivf_nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    pq_m = config.pq_m or max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)
    if d % pq_m:
        raise IndexContractError(f"index.pq_m: {pq_m} must divide the embedding dim {d}")
    # enough points for both k-means: the coarse one (nlist) and each PQ sub-quantizer's (2**nbits)
    n_train = min(n, max(nlist, 2**config.pq_nbits) * config.ivf_train_per_list)
    if n_train < max(nlist, 2**config.pq_nbits):
        raise IndexContractError(
            f"{items.source}: {n} items are too few to train IVF-PQ (nlist={nlist}, pq_nbits="
            f"{config.pq_nbits} need at least {max(nlist, 2**config.pq_nbits)}); use type flat or hnsw"
        )
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, config.pq_nbits, faiss.METRIC_INNER_PRODUCT)
    base = ivf
    if config.refine_k_factor is not None:
        base = faiss.IndexRefineFlat(ivf)
        base.k_factor = config.refine_k_factor
    sample = np.random.default_rng(seed).choice(n, size=n_train, replace=False)
    base.train(items.vectors[np.sort(sample)])
    return base


def _exact_index(items: Embeddings) -> faiss.Index:
    exact = faiss.IndexFlatIP(items.dim)
    exact.add(items.vectors)
    return exact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.build_index", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    run(params.index, params.seed, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
