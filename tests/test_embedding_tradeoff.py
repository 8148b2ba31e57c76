"""benchmarks/embedding_tradeoff.py's pure parts: Pareto fronts, bookkeeping, the SQ8 index, exclusions."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from benchmarks import embedding_tradeoff as et
from components.build_index import Embeddings, build_index, recall_at_k, search
from models.metrics import ItemSets, full_catalogue_topk
from tests.conftest import shipped_params


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def items() -> Embeddings:
    rng = np.random.default_rng(3)
    # sparse, shuffled ids: a row-number-for-id bug cannot pass
    ids = rng.permutation(np.arange(2_000, dtype=np.int64) * 11 + 5)
    return Embeddings(ids=ids, vectors=unit_vectors(2_000, 32, rng), source="memory")


def test_pareto_front_two_and_three_objectives() -> None:
    # recall (higher better), bytes (lower better)
    points = np.array([[0.30, 64], [0.32, 128], [0.29, 256], [0.32, 512], [0.25, 16], [0.30, 64]])
    mask = et.pareto_front(points, [True, False])
    # [2] dominated by [0]; [3] by [1] (same recall, more bytes); duplicates [0]/[5] both stay
    assert mask.tolist() == [True, True, False, False, True, True]
    # a third objective can rescue a point: [2] has the lowest latency
    latency = np.array([1.0, 1.0, 0.1, 1.0, 1.0, 1.0])
    joint = et.pareto_front(np.c_[points, latency], [True, False, False])
    assert joint.tolist() == [True, True, True, False, True, True]
    # the direction matters: maximising bytes flips which of the equal-recall pair survives
    assert et.pareto_front(points[[1, 3]], [True, True]).tolist() == [False, True]


def test_latency_summary_percentiles_in_ms() -> None:
    seconds = np.arange(1, 101) / 1e3  # 1 .. 100 ms
    out = et.latency_summary(seconds)
    assert out["latency_queries"] == 100
    assert out["p50_ms"] == pytest.approx(50.5)
    assert out["p99_ms"] == pytest.approx(99.01)


def test_single_query_seconds_counts_and_restores_threads(items: Embeddings) -> None:
    index = build_index(items, "flat", shipped_params().index)
    before = faiss.omp_get_max_threads()
    times = et.single_query_seconds(index, items.vectors[:50], 10, limit=30, budget_s=60.0)
    assert times.shape == (30,) and (times > 0).all()
    assert faiss.omp_get_max_threads() == before


def test_sq8_round_trip_recall_and_bytes(items: Embeddings) -> None:
    config = shipped_params().index
    flat, sq8 = build_index(items, "flat", config), et.build_sq8(items)
    queries = unit_vectors(300, items.dim, np.random.default_rng(4))
    exact_scores = flat.search(queries, 10)[0]
    found, _ = search(sq8, queries, 10)
    assert set(np.unique(found)) <= set(items.ids.tolist())  # ids, not row numbers
    assert recall_at_k(found, queries, items, exact_scores) >= 0.9
    # serialised and read back: the same answers
    again = faiss.deserialize_index(faiss.serialize_index(sq8))
    assert np.array_equal(search(again, queries, 10)[0], found)
    # one byte per dimension (+ the id): about a quarter of float32
    sq8_bytes, flat_bytes = et.bytes_per_item(sq8), et.bytes_per_item(flat)
    assert items.dim <= sq8_bytes < items.dim + 24
    assert 4 * items.dim <= flat_bytes < 4 * items.dim + 24
    assert sq8_bytes < flat_bytes / 3


def test_index_topk_matches_full_catalogue_with_exclusions() -> None:
    rng = np.random.default_rng(5)
    n_items, n_users, k = 500, 40, 20
    catalogue = Embeddings(np.arange(n_items, dtype=np.int64), unit_vectors(n_items, 16, rng), "memory")
    users = unit_vectors(n_users, 16, rng)
    # a varying number of seen items per user, some of them in each user's exact top k
    exact = users @ catalogue.vectors.T
    top = np.argsort(-exact, axis=1)
    pairs = [(u, int(i)) for u in range(n_users) for i in top[u, : u % 7] if u % 3]
    pairs += [(u, int(rng.integers(n_items))) for u in range(0, n_users, 2)]
    exclude = ItemSets.from_pairs(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), n_users)
    index = build_index(catalogue, "flat", shipped_params().index)
    got = et.index_topk(index, users, k, exclude, pad=n_items)
    want = full_catalogue_topk(torch.from_numpy(users), torch.from_numpy(catalogue.vectors), k, exclude)
    assert np.array_equal(got, want)
    for u in range(n_users):
        assert not set(got[u]) & set(exclude.items[exclude.offsets[u] : exclude.offsets[u + 1]].tolist())
    # fewer items than asked for: the rest is padding, never a real id
    small = Embeddings(np.arange(5, dtype=np.int64), catalogue.vectors[:5], "memory")
    padded = et.index_topk(build_index(small, "flat", shipped_params().index), users[:3], 8, None, pad=5)
    assert (padded[:, 5:] == 5).all() and sorted(padded[0, :5].tolist()) == list(range(5))


def test_summarise_means_over_seeds_and_recommend_cheapest_tied() -> None:
    def run(dim: int, index: str, seed: int, recall: float, size: float, p99: float) -> dict:
        return {
            "dim": dim,
            "index": index,
            "seed": seed,
            "label": index,
            "search_param": None,
            "recall_target_reached": True,
            "recall@50": recall,
            "ann_recall@50": 1.0,
            "bytes_per_item": size,
            "p50_ms": p99 / 2,
            "p99_ms": p99,
            "build_seconds": 0.1,
        }

    runs = [
        run(16, "flat", 1, 0.20, 40, 0.05),
        run(16, "flat", 2, 0.22, 40, 0.07),
        run(64, "flat", 1, 0.30, 264, 0.10),
        run(64, "sq8", 1, 0.30, 72, 0.08),
        run(128, "flat", 1, 0.30, 520, 0.20),
    ]
    rows = et.summarise(runs, 50)
    by = {r["setting"]: r for r in rows}
    assert by["d16/flat"]["recall@50"] == pytest.approx(0.21) and by["d16/flat"]["seeds"] == 2
    assert by["d16/flat"]["p99_ms"] == pytest.approx(0.06)
    assert by["d128/flat"]["pareto_bytes"] is False  # d64/sq8: as good for fewer bytes
    assert by["d64/sq8"]["pareto_bytes"] and by["d16/flat"]["pareto_bytes"]

    rng = np.random.default_rng(0)
    n = 4_000
    good = (rng.random(n) < 0.3).astype(float)
    per_user = {
        "d16/flat": np.where(rng.random(n) < 0.3, 0.0, good),  # clearly worse
        "d64/flat": good,
        "d64/sq8": good,
        "d128/flat": good,
    }
    rec = et.recommend(rows, per_user, 50, samples=200, confidence=0.95, seed=0)
    assert "d16/flat" not in rec["tied_with_best"]
    assert rec["embedding_dim"] == 64  # smallest exact-index dim not worse than the best
    assert rec["setting"] == "d64/sq8"  # fewest bytes among the tied
    assert rec["difference_to_best"]["d16/flat"]["high"] < 0
