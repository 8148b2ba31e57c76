"""FAISS index build: inner-product metric, id mapping, recall tuning against exact search, rejections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from components import build_index as bi
from recsys import ann_index
from recsys import artifact_layout as layout
from recsys.config import IndexConfig
from tests.conftest import revalidated, shipped_params, write_params

DIM = 32
N_ITEMS = 20_000
N_CLUSTERS = 100

EF_SEARCH_MAX = shipped_params().index.ef_search_max


def _index(**changes) -> IndexConfig:
    """The shipped index section with the test's changes."""
    return revalidated(shipped_params().index, **changes)


def clustered_unit_vectors(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """A gaussian mixture around unit centres, normalised: near neighbours are hard to tell apart."""
    which = rng.integers(0, len(centers), n)
    x = centers[which] + 0.15 * rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[bi.Embeddings, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((N_CLUSTERS, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # ids deliberately sparse and shuffled, so a row-number-for-id bug cannot pass
    ids = rng.permutation(np.arange(N_ITEMS, dtype=np.int64) * 13 + 1_000_003)
    items = bi.Embeddings(ids=ids, vectors=clustered_unit_vectors(N_ITEMS, rng, centers), source="memory")
    tune_q = clustered_unit_vectors(600, rng, centers)
    holdout_q = clustered_unit_vectors(600, rng, centers)
    return items, tune_q, holdout_q


@pytest.fixture(scope="module")
def built(data) -> dict[str, faiss.Index]:
    items, _, _ = data
    config = _index(hnsw_m=16, hnsw_ef_construction=64, ivf_nlist=64, pq_m=8)
    return {kind: bi.build_index(items, kind, config, seed=0) for kind in ("flat", "hnsw", "ivf_pq")}


def exact_top_k(items: bi.Embeddings, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute-force numpy (independent of FAISS): item ids and scores."""
    scores = queries @ items.vectors.T
    top = np.argsort(-scores, axis=1)[:, :k]
    return items.ids[top], np.take_along_axis(scores, top, axis=1)


def overlap_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_pq"])
def test_ids_map_back_to_the_right_items(data, built, kind):
    items, _, _ = data
    index = built[kind]
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    if kind != "flat":
        faiss.ParameterSpace().set_index_parameter(index, bi._SEARCH_PARAM[kind], 64)
    rows = np.arange(0, N_ITEMS, 97)
    ids, scores = ann_index.search(index, items.vectors[rows], k=1)
    # an item's own vector is its nearest neighbour (score 1), reported under its item id, not its row
    assert (ids[:, 0] == items.ids[rows]).mean() >= 0.98
    assert np.allclose(scores[ids[:, 0] == items.ids[rows], 0], 1.0, atol=1e-3 if kind != "ivf_pq" else 1e-2)


def test_flat_matches_numpy_exact_search(data, built):
    items, tune_q, _ = data
    ids, scores = ann_index.search(built["flat"], tune_q[:50], k=10)
    truth_ids, truth_scores = exact_top_k(items, tune_q[:50], 10)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)
    assert overlap_recall(ids, truth_ids) == 1.0


def test_tuning_efsearch_needs_the_configured_ceiling(data, built):
    items, tune_q, _ = data
    exact_scores = exact_top_k(items, tune_q, 10)[1]
    with pytest.raises(ValueError, match=r"index\.ef_search_max"):  # never a default of the code's own
        bi.tune_search_param(built["hnsw"], "hnsw", items, tune_q, exact_scores, recall_target=0.95)


@pytest.mark.parametrize("kind", ["hnsw", "ivf_pq"])
def test_tuned_approximate_search_agrees_with_exact_to_the_target(data, built, kind):
    items, tune_q, holdout_q = data
    index = built[kind]
    exact_scores = exact_top_k(items, tune_q, 10)[1]
    ceiling = EF_SEARCH_MAX if kind == "hnsw" else None
    tuned = bi.tune_search_param(
        index, kind, items, tune_q, exact_scores, recall_target=0.95, max_value=ceiling
    )

    assert tuned.name == bi._SEARCH_PARAM[kind]
    assert min(tuned.curve) >= (10 if kind == "hnsw" else 1)  # HNSW never searches below ef = k anyway
    assert tuned.recall >= 0.95
    # the tuner keeps the smallest passing value it saw: every smaller value tried fell short
    assert tuned.curve[tuned.value] == tuned.recall
    assert all(r < 0.95 for v, r in tuned.curve.items() if v < tuned.value)
    # the index is left at the tuned value
    if kind == "hnsw":
        assert faiss.downcast_index(index.index).hnsw.efSearch == tuned.value
    else:
        assert faiss.extract_index_ivf(index).nprobe == tuned.value
    # asking for a safety margin of standard errors never tunes to a smaller value
    careful = bi.tune_search_param(index, kind, items, tune_q, exact_scores, 0.95, ceiling, margin_sigmas=2.0)
    assert careful.value >= tuned.value - max(1, tuned.value // 16)  # bisection stops within ~6%
    assert careful.recall >= 0.95
    # on queries the tuner never saw, by an independent recall computation
    found, _ = ann_index.search(index, holdout_q, k=10)
    assert overlap_recall(found, exact_top_k(items, holdout_q, 10)[0]) >= 0.93


def test_unreachable_recall_target_fails_clearly(data):
    items, tune_q, _ = data
    # 4-byte PQ codes without exact re-ranking cannot separate near neighbours, whatever nprobe
    config = _index(ivf_nlist=16, pq_m=4, refine_k_factor=None)
    index = bi.build_index(items, "ivf_pq", config, seed=0)
    exact_scores = exact_top_k(items, tune_q, 10)[1]
    with pytest.raises(bi.RecallTargetError, match=r"not reachable with ivf_pq.*nprobe") as err:
        bi.tune_search_param(index, "ivf_pq", items, tune_q, exact_scores, recall_target=0.99)
    assert max(err.value.curve) == 16  # it tried up to nprobe = nlist
    assert max(err.value.curve.values()) < 0.99


def test_recall_counts_ties_with_the_kth_score_as_hits():
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]  # items 10 and 11 are the same vector
    items = bi.Embeddings(ids=np.array([10, 11, 12, 13]), vectors=vectors, source="memory")
    query = np.eye(4, dtype=np.float32)[[0]]
    exact = np.array([[1.0]], dtype=np.float32)
    assert bi.recall_at_k(np.array([[11]]), query, items, exact) == 1.0
    assert bi.recall_at_k(np.array([[12]]), query, items, exact) == 0.0
    assert bi.recall_at_k(np.array([[-1]]), query, items, exact) == 0.0


def test_auto_type_by_catalogue_size():
    config = _index(flat_max_items=1_000, ivf_pq_min_items=100_000)
    assert bi.choose_index_type(999, config) == "flat"
    assert bi.choose_index_type(1_000, config) == "hnsw"
    assert bi.choose_index_type(100_000, config) == "ivf_pq"
    assert bi.choose_index_type(10, config.model_copy(update={"type": "hnsw"})) == "hnsw"


def _write_embeddings(path, ids, vectors, id_key="item_ids"):
    save_file({id_key: np.asarray(ids, dtype=np.int64), "embeddings": np.asarray(vectors)}, str(path))
    return path


@pytest.fixture()
def exported(tmp_path, data):
    """The export contract on disk: 3k items and 400 validation users."""
    items, tune_q, _ = data
    item_file = _write_embeddings(
        tmp_path / "item_embeddings.safetensors", items.ids[:3000], items.vectors[:3000]
    )
    query_file = _write_embeddings(
        tmp_path / "user_embeddings_valid.safetensors", np.arange(400), tune_q[:400], "user_ids"
    )
    return item_file, query_file


def test_run_writes_index_sidecar_and_metrics_and_load_restores_it(tmp_path, exported):
    item_file, query_file = exported
    config = _index(
        type="hnsw",
        hnsw_m=16,
        hnsw_ef_construction=64,
        tune_queries=200,
    )
    output = tmp_path / "index" / "items.faiss"
    metrics = bi.run(
        config,
        seed=0,
        item_embeddings=item_file,
        query_embeddings=query_file,
        output=output,
        metrics_file=tmp_path / "metrics" / "index.json",
    )

    on_disk = json.loads((tmp_path / "metrics" / "index.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert metrics["recall_at_k"] >= 0.95 and metrics["n_tune_queries"] == 200
    assert metrics["n_holdout_queries"] == 200 and metrics["recall_at_k_holdout"] is not None
    assert metrics["qps_single_query"] > 0 and metrics["qps_batched"] > 0
    assert metrics["memory_bytes"] == (tmp_path / "index" / "items.faiss").stat().st_size
    assert metrics["search_param"]["name"] == "efSearch"

    index, meta = ann_index.load_index(tmp_path / "index" / "items.faiss", expected_dim=DIM)
    assert meta["metric"] == "inner_product" and meta["dim"] == DIM and meta["count"] == 3000
    assert meta["k"] == config.k and meta["type"] == "hnsw" and meta["faiss_class"] == "IndexHNSWFlat"
    assert faiss.downcast_index(index.index).hnsw.efSearch == meta["search_param"]["value"]
    ids, scores = ann_index.search(index, _read(query_file)["embeddings"][:5], k=10)
    assert ids.shape == (5, 10) and scores.shape == (5, 10)
    assert set(ids.ravel()) <= set(_read(item_file)["item_ids"].tolist())
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def _built(config: Any, tmp_path: Path, exported: tuple[Path, Path]) -> dict[str, Any]:
    """build_index.run on the exported embeddings, index and metrics under ``tmp_path``."""
    item_file, query_file = exported
    return bi.run(
        config,
        seed=0,
        item_embeddings=item_file,
        query_embeddings=query_file,
        output=tmp_path / "items.faiss",
        metrics_file=tmp_path / "index.json",
    )


def test_auto_small_catalogue_is_exact(tmp_path, exported):
    metrics = _built(_index(), tmp_path, exported)
    assert metrics["type"] == "flat" and metrics["search_param"] is None
    assert metrics["recall_at_k"] == 1.0


def test_non_unit_embeddings_are_rejected(tmp_path, data):
    items, _, _ = data
    vectors = items.vectors[:100].copy()
    vectors[3] *= 2.0
    path = _write_embeddings(tmp_path / "items.safetensors", items.ids[:100], vectors)
    with pytest.raises(
        ann_index.IndexContractError, match=r"items\.safetensors: 1 of 100 embeddings are not unit-norm"
    ):
        bi.read_embeddings(path, "item_ids")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"item_ids": np.arange(3), "vectors": np.eye(3, dtype=np.float32)}, "missing tensor 'embeddings'"),
        ({"item_ids": np.arange(2), "embeddings": np.eye(3, dtype=np.float32)}, "must pair up"),
        ({"item_ids": np.array([1, 1, 2]), "embeddings": np.eye(3, dtype=np.float32)}, "duplicate item_ids"),
        ({"item_ids": np.arange(3), "embeddings": np.full((3, 3), np.nan, np.float32)}, "NaN or inf"),
    ],
)
def test_malformed_embeddings_are_rejected(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ann_index.IndexContractError, match=message):
        bi.read_embeddings(path, "item_ids", unique_ids=True)


def test_query_dim_mismatch_is_rejected(tmp_path, exported):
    item_file, _ = exported
    rng = np.random.default_rng(0)
    q = rng.standard_normal((50, DIM + 8)).astype(np.float32)
    query_file = _write_embeddings(
        tmp_path / "users.safetensors",
        np.arange(50),
        q / np.linalg.norm(q, axis=1, keepdims=True),
        "user_ids",
    )
    with pytest.raises(
        ann_index.IndexContractError, match=r"users\.safetensors: query dim 40 != item embedding dim 32"
    ):
        bi.run(
            _index(),
            seed=0,
            item_embeddings=item_file,
            query_embeddings=query_file,
            output=tmp_path / "x.faiss",
            metrics_file=tmp_path / "x.json",
        )
    assert not (tmp_path / "x.faiss").exists()


def test_search_rejects_wrong_query_dim(built):
    with pytest.raises(ann_index.IndexContractError, match="do not match index dim 32"):
        ann_index.search(built["flat"], np.zeros((2, 16), np.float32), k=5)


@pytest.fixture()
def saved_index(tmp_path, exported):
    item_file, query_file = exported
    output = tmp_path / "idx" / "items.faiss"
    bi.run(
        _index(type="flat"),
        seed=0,
        item_embeddings=item_file,
        query_embeddings=query_file,
        output=output,
        metrics_file=tmp_path / "index.json",
    )
    return tmp_path / "idx" / "items.faiss"


def test_load_rejects_dim_mismatch_naming_the_file(saved_index):
    with pytest.raises(ann_index.IndexContractError, match=r"items\.faiss: index dim 32 != query dim 64"):
        ann_index.load_index(saved_index, expected_dim=64)


def test_load_rejects_an_l2_index_naming_the_file(saved_index):
    # a peer's bug: the same vectors in an L2 index, with a sidecar that claims inner product
    items = _read(saved_index.parent.parent / "item_embeddings.safetensors")
    l2 = faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))
    l2.add_with_ids(items["embeddings"], items["item_ids"])
    faiss.write_index(l2, str(saved_index))
    with pytest.raises(
        ann_index.IndexContractError, match=r"items\.faiss: index metric is L2 .*METRIC_INNER_PRODUCT"
    ):
        ann_index.load_index(saved_index, verify_checksum=False)
    # with the checksum on, the swapped file is caught even before its metric is read
    with pytest.raises(
        ann_index.IndexContractError, match=r"items\.faiss: SHA-256 differs from items\.faiss\.json"
    ):
        ann_index.load_index(saved_index)


def test_load_requires_the_sidecar(saved_index):
    ann_index.sidecar_path(saved_index).unlink()
    with pytest.raises(ann_index.IndexContractError, match=r"sidecar items\.faiss\.json missing"):
        ann_index.load_index(saved_index)


def test_cli_builds_from_params(tmp_path, exported, monkeypatch):
    item_file, query_file = exported
    params = write_params(tmp_path / "params.yaml", {"index.k": 5})
    output = tmp_path / "out" / "items.faiss"
    arguments = [
        *("--item-embeddings", str(item_file)),
        *("--query-embeddings", str(query_file)),
        *("--output", str(output)),
        *("--metrics-file", str(tmp_path / "out" / "index.json")),
    ]
    assert bi.main(["--params", str(params), *arguments]) == 0
    index, meta = ann_index.load_index(output)
    assert meta["k"] == 5 and index.ntotal == 3000
    assert json.loads((tmp_path / "out" / "index.json").read_text())["count"] == 3000


def test_cli_reads_the_artifact_layout_by_default(tmp_path, exported, monkeypatch):
    item_file, query_file = exported
    monkeypatch.chdir(tmp_path)
    layout.EMBEDDINGS_DIR.mkdir(parents=True)
    shutil.copyfile(item_file, layout.EMBEDDINGS_DIR / layout.ITEM_EMBEDDINGS)
    shutil.copyfile(query_file, layout.EMBEDDINGS_DIR / layout.QUERY_EMBEDDINGS)
    write_params(tmp_path / "params.yaml", {})
    assert bi.main([]) == 0
    index, _ = ann_index.load_index(layout.INDEX_DIR / layout.INDEX)
    assert index.ntotal == 3000 and layout.INDEX_METRICS.is_file()


def _read(path):
    return load_file(str(path))


def _coinciding_catalogue(tmp_path):
    """4,280 items of which 4,000 share 20 vectors (cold items taking their category's embedding, as on
    Ciao), and 300 validation users: an HNSW graph over it misses about half the exact top 50."""
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((300, 16)).astype(np.float32)
    vectors = distinct[np.concatenate([rng.integers(0, 20, 4000), np.arange(20, 300)])]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 5
    item_file = _write_embeddings(tmp_path / "item_embeddings.safetensors", ids, vectors)
    query_file = _write_embeddings(
        tmp_path / "user_embeddings_valid.safetensors", np.arange(300), queries, "user_ids"
    )
    return item_file, query_file


def test_coinciding_vectors_fall_back_to_exact_search(tmp_path):
    item_file, query_file = _coinciding_catalogue(tmp_path)
    config = _index(type="hnsw", hnsw_m=8, hnsw_ef_construction=32, k=50, ef_search_max=256, tune_queries=150)
    paths = {
        "item_embeddings": item_file,
        "query_embeddings": query_file,
        "output": tmp_path / "items.faiss",
        "metrics_file": tmp_path / "index.json",
    }
    with pytest.raises(bi.RecallTargetError, match="not reachable with hnsw"):
        bi.run(config.model_copy(update={"flat_fallback_max_items": 0}), seed=0, **paths)
    with pytest.raises(bi.RecallTargetError):  # more items than the fallback allows
        bi.run(config.model_copy(update={"flat_fallback_max_items": 4279}), seed=0, **paths)

    metrics = bi.run(config.model_copy(update={"flat_fallback_max_items": 4280}), seed=0, **paths)
    assert metrics["type"] == "flat" and metrics["faiss_class"] == "IndexFlatIP"
    assert metrics["recall_at_k"] == 1.0 and metrics["recall_at_k_holdout"] == 1.0
    assert metrics["fallback"]["from"] == "hnsw" and "not reachable" in metrics["fallback"]["reason"]
    assert max(point["recall"] for point in metrics["fallback"]["curve"]) < config.recall_target
    assert json.loads((tmp_path / "index.json").read_text())["fallback"]["from"] == "hnsw"
    index, meta = ann_index.load_index(tmp_path / "items.faiss")
    assert meta["type"] == "flat" and meta["search_param"] is None
    # what serving gets back is the exact top 50, ties with the 50th score counted
    items = bi.read_embeddings(item_file, "item_ids")
    queries = _read(query_file)["embeddings"]
    found, _ = ann_index.search(index, queries, 50)
    assert bi.recall_at_k(found, queries, items, exact_top_k(items, queries, 50)[1]) == 1.0


def test_approximate_index_reaching_its_target_records_no_fallback(tmp_path, exported):
    metrics = _built(
        _index(type="hnsw", hnsw_m=16, hnsw_ef_construction=64, tune_queries=200), tmp_path, exported
    )
    assert metrics["type"] == "hnsw" and metrics["fallback"] is None
