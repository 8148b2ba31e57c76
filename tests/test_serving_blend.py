"""The retrieval blend served: a bundle whose evaluation chose a share of popular items (the bundle step
writes retrieval_blend.json from metrics' retrieval.blend) is answered by ``python -m serving`` on
loopback with that share of every retrieved list taken by the popular items, in retrieve and in
recommend's candidates; a bundle without the blend (or with share 0) serves the two-tower alone."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from models.blend import blend_lists
from recsys.bundle_blend import BLEND_MEMBER, read_blend
from recsys.bundle_manifest import BundleIntegrityError
from recsys.config import load_params
from serving.local_server import free_port, start_server, stop_server
from tests.conftest import small_serving_bundle

ROOT = Path(__file__).resolve().parents[1]
USER = 5
RETRIEVE_K = 10


@pytest.fixture(scope="module")
def params():
    params = load_params(ROOT / "params.yaml")
    # recommend ranks exactly the retrieved candidates; no online store (features from the request)
    serving_section = params.serving.model_copy(
        update={"online_store": False, "retrieve_k": RETRIEVE_K, "max_n": RETRIEVE_K, "default_n": 4}
    )
    return params.model_copy(update={"serving": serving_section})


@pytest.fixture(scope="module")
def params_file(params, tmp_path_factory) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["serving"].update(
        {"online_store": False, "retrieve_k": RETRIEVE_K, "max_n": RETRIEVE_K, "default_n": 4}
    )
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def plain_bundle(params, tmp_path_factory) -> Path:
    return small_serving_bundle(params, tmp_path_factory.mktemp("blend"))


def _in_process_retrieve(params, bundle_dir: Path, k: int) -> list[int]:
    """The user's top ``k`` by the recommender of ``bundle_dir`` in this process (no HTTP)."""
    from serving.server import build_models

    rec = build_models(bundle_dir, params.serving, params.feast)[0].recommender
    ((ids, _),) = rec.retrieve(rec.user_features([USER], [None]), [k])
    return ids.tolist()


@pytest.fixture(scope="module")
def model_ranking(params, plain_bundle) -> list[int]:
    """The two-tower's ranking of the whole catalogue (80 items) for the user, without a blend."""
    return _in_process_retrieve(params, plain_bundle, 80)


@pytest.fixture(scope="module")
def popular(model_ranking) -> list[int]:
    """The popular list: the items the two-tower ranks last for the user, so none is retrieved anyway."""
    return model_ranking[::-1][:20]


def _blended_bundle(plain_bundle: Path, out: Path, share: float, popular: list[int]) -> Path:
    from components import bundle as step

    manifest = json.loads((plain_bundle / "manifest.json").read_text())
    files = {name: plain_bundle / name for name in manifest["files"]}
    metrics = out.parent / f"evaluation_{share:g}.json"
    blend = {"share": share, "window_days": 7, "popular_item_ids": popular, "valid_recall": {}}
    metrics.write_text(json.dumps({"retrieval": {"blend": blend}}))
    return step.run(ROOT / "params.yaml", metrics, out, files)


@pytest.fixture(scope="module")
def blended(plain_bundle, popular, params_file, tmp_path_factory):
    """The blended bundle (share 0.5) served by ``python -m serving`` on loopback."""
    bundle_dir = _blended_bundle(plain_bundle, tmp_path_factory.mktemp("b") / "bundle", 0.5, popular)
    port = free_port()
    process = start_server(bundle_dir, params_file, port)
    yield f"http://127.0.0.1:{port}", bundle_dir
    stop_server(process)


def _post(url: str, model: str, body: dict) -> dict:
    out = httpx.post(f"{url}/v1/models/{model}:predict", json=body, timeout=30)
    assert out.status_code == 200, out.text
    return out.json()["predictions"][0]


def test_the_bundle_step_writes_the_chosen_blend(blended, popular):
    _, bundle_dir = blended
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert BLEND_MEMBER in manifest["files"]  # checksummed like every member
    blend = read_blend(bundle_dir / BLEND_MEMBER)
    assert blend.share == 0.5 and blend.item_ids.tolist() == popular and blend.window_days == 7


def test_retrieve_serves_the_share_of_popular_items_measured_offline(blended, model_ranking, popular):
    url, _ = blended
    got = _post(url, "retrieval", {"instances": [{"user_id": USER, "k": RETRIEVE_K}]})
    model = model_ranking[:RETRIEVE_K]
    assert got["item_ids"] == blend_lists(model, popular, 0.5, RETRIEVE_K)
    assert got["item_ids"][0::2] == model[:5]  # model, popular, model, ... (share 0.5)
    assert got["item_ids"][1::2] == popular[:5]
    # popular items are scored by the two-tower too: the scores of the plain ranking
    full = _post(url, "retrieval", {"instances": [{"user_id": USER, "k": 80}]})
    assert set(full["item_ids"]) == set(model_ranking)
    score_of = dict(zip(full["item_ids"], full["scores"], strict=True))
    assert got["scores"] == pytest.approx([score_of[i] for i in got["item_ids"]], abs=1e-5)
    assert got["scores"][1] < got["scores"][2]  # a popular item the model ranks last, before a model item


def test_recommend_ranks_the_blended_candidates(blended, model_ranking, popular):
    url, _ = blended
    served = _post(url, "recommend", {"instances": [{"user_id": USER, "n": RETRIEVE_K}]})
    expected = blend_lists(model_ranking[:RETRIEVE_K], popular, 0.5, RETRIEVE_K)
    assert served["source"] == "model" and set(served["item_ids"]) == set(expected)
    assert len(set(served["item_ids"]) & set(popular)) == RETRIEVE_K // 2


def test_excluded_items_are_not_blended_in(blended, popular):
    url, _ = blended
    body = {"instances": [{"user_id": USER, "n": RETRIEVE_K, "context": {"exclude_item_ids": popular[:3]}}]}
    got = _post(url, "recommend", body)["item_ids"]
    assert not set(popular[:3]) & set(got)
    assert set(popular[3:8]) <= set(got)  # the next popular items take their slots


def test_share_zero_serves_the_two_tower_alone(params, plain_bundle, model_ranking, popular, tmp_path):
    out = _blended_bundle(plain_bundle, tmp_path / "bundle", 0.0, popular)
    assert _in_process_retrieve(params, out, RETRIEVE_K) == model_ranking[:RETRIEVE_K]


def test_a_malformed_blend_member_names_the_file_and_field(tmp_path):
    path = tmp_path / BLEND_MEMBER
    path.write_text(json.dumps({"format": 1, "share": 1.5, "item_ids": [1]}))
    with pytest.raises(BundleIntegrityError, match=rf"{BLEND_MEMBER}: 'share'"):
        read_blend(path)
    path.write_text(json.dumps({"format": 1, "share": 0.2, "item_ids": [1, 1]}))
    with pytest.raises(BundleIntegrityError, match="more than once"):
        read_blend(path)
    path.write_text(json.dumps({"format": 1, "share": 0.2, "item_ids": np.arange(3).tolist()}))
    assert read_blend(path).share == 0.2


# ---- the item-kNN blend: item-kNN's list over the user's history feature takes the share

HISTORY = "hist_item_ids"


@pytest.fixture(scope="module")
def knn_table(model_ranking):
    """A neighbour table whose one history item (the model's last) lists the model's next-to-last items,
    best first, so none of them is retrieved by the model anyway."""
    from models.blend import NeighbourTable

    neighbours = np.asarray(model_ranking[::-1][1:13], dtype=np.int64)
    weights = np.linspace(1.0, 0.1, len(neighbours)).astype(np.float32)
    return NeighbourTable(
        np.asarray([model_ranking[-1]], dtype=np.int64), np.asarray([0, len(neighbours)]), neighbours, weights
    )


def _knn_bundle(plain_bundle: Path, out: Path, table, share: float, popular: list[int]) -> Path:
    from components import bundle as step
    from recsys.bundle_blend import NEIGHBOURS_MEMBER

    manifest = json.loads((plain_bundle / "manifest.json").read_text())
    files = {name: plain_bundle / name for name in manifest["files"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = out.parent / "evaluation.json"
    blend = {"source": "item_knn", "share": share, "popular_item_ids": popular, "valid_recall": {}}
    metrics.write_text(json.dumps({"retrieval": {"blend": blend}}))
    table.save(metrics.with_name(NEIGHBOURS_MEMBER))  # where the evaluate step writes it
    return step.run(ROOT / "params.yaml", metrics, out, files)


@pytest.fixture(scope="module")
def knn_blended(plain_bundle, popular, knn_table, params_file, tmp_path_factory):
    bundle_dir = _knn_bundle(plain_bundle, tmp_path_factory.mktemp("k") / "bundle", knn_table, 0.5, popular)
    port = free_port()
    process = start_server(bundle_dir, params_file, port)
    yield f"http://127.0.0.1:{port}", bundle_dir
    stop_server(process)


def test_retrieve_serves_item_knn_over_the_users_history_as_measured(
    params, plain_bundle, knn_blended, knn_table, model_ranking
):
    from recsys.bundle_blend import NEIGHBOURS_MEMBER
    from serving.server import build_models

    url, bundle_dir = knn_blended
    assert NEIGHBOURS_MEMBER in json.loads((bundle_dir / "manifest.json").read_text())["files"]
    assert read_blend(bundle_dir / BLEND_MEMBER).source == "item_knn"
    history = [model_ranking[-1]]
    rec = build_models(plain_bundle, params.serving, params.feast)[0].recommender
    ((plain, plain_scores),) = rec.retrieve(rec.user_features([USER], [{HISTORY: history}]), [80])
    model = plain.tolist()[:RETRIEVE_K]
    knn = knn_table.ranked(history, RETRIEVE_K)
    assert knn == model_ranking[::-1][1:11]  # what evaluate scores for this history
    body = {"instances": [{"user_id": USER, "k": RETRIEVE_K, "features": {HISTORY: history}}]}
    got = _post(url, "retrieval", body)
    assert got["item_ids"] == blend_lists(model, knn, 0.5, RETRIEVE_K)
    assert got["item_ids"][1::2] == knn[:5]
    score_of = dict(zip(plain.tolist(), plain_scores.tolist(), strict=True))  # two-tower scores throughout
    assert got["scores"] == pytest.approx([score_of[i] for i in got["item_ids"]], abs=1e-5)
    # a user without a history (or none the table knows) gets the two-tower alone: nothing to blend in
    none = _post(
        url, "retrieval", {"instances": [{"user_id": USER, "k": RETRIEVE_K, "features": {HISTORY: []}}]}
    )
    assert none["item_ids"] == _in_process_retrieve(params, plain_bundle, RETRIEVE_K)


def test_recommend_blends_item_knn_candidates_without_the_excluded(knn_blended, knn_table, model_ranking):
    url, _ = knn_blended
    history, knn = [model_ranking[-1]], model_ranking[::-1][1:13]
    context = {"features": {HISTORY: history}, "exclude_item_ids": knn[:2]}
    got = _post(url, "recommend", {"instances": [{"user_id": USER, "n": RETRIEVE_K, "context": context}]})
    assert got["source"] == "model"
    assert not set(knn[:2]) & set(got["item_ids"]) and history[0] not in got["item_ids"]
    assert set(knn[2:7]) <= set(got["item_ids"])  # the next neighbours take the share


def test_an_item_knn_blend_without_its_table_is_refused(plain_bundle, popular, tmp_path):
    from components import bundle as step

    manifest = json.loads((plain_bundle / "manifest.json").read_text())
    metrics = tmp_path / "evaluation.json"
    blend = {"source": "item_knn", "share": 0.5, "popular_item_ids": popular}
    metrics.write_text(json.dumps({"retrieval": {"blend": blend}}))
    files = {name: plain_bundle / name for name in manifest["files"]}
    with pytest.raises(
        BundleIntegrityError, match=r"item_neighbours\.npz: the evaluation chose the item-kNN"
    ):
        step.run(ROOT / "params.yaml", metrics, tmp_path / "bundle", files)
    path = tmp_path / BLEND_MEMBER
    path.write_text(json.dumps({"format": 1, "share": 0.2, "source": "ease", "item_ids": []}))
    with pytest.raises(BundleIntegrityError, match="'source' must be one of"):
        read_blend(path)
