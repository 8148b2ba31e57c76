"""Train, evaluate, export, index, bundle and gate on the tiny preset, through the real steps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from recsys import artifact_layout as layout
from tests.conftest import MODEL_KINDS

pytestmark = pytest.mark.slow


def test_every_model_is_trained_and_saved_with_history_metrics_and_plot(tiny_pipeline):
    for kind in MODEL_KINDS:
        model_dir = tiny_pipeline / layout.model_dir(kind)
        assert (model_dir / "model.safetensors").stat().st_size > 0
        config = json.loads((model_dir / "config.json").read_text())
        assert config["kind"] == kind and config["features"]  # encoders travel with the weights
        history = pd.read_csv(model_dir / "history.csv")
        assert len(history) >= 1 and "train_loss" in history
        metrics = json.loads((tiny_pipeline / layout.model_metrics(kind)).read_text())
        assert metrics["model"] == kind and metrics["train_rows"] > 0
        assert (tiny_pipeline / layout.model_plot(kind)).read_bytes()[:4] == b"\x89PNG"


def test_saved_models_are_refit_on_train_and_valid_for_the_best_epoch_count(tiny_pipeline):
    """The deployed model learns from the validation window too: its encoder knows the items first seen
    there, and it trained for the early-stopped run's best epoch count on train + valid rows."""
    from models import load_model
    from models.batch import OOV_ID
    from models.registry import TASK_OF
    from recsys.training_data import read_split

    training_dir = tiny_pipeline / layout.TRAINING_DIR
    for kind in MODEL_KINDS:
        train, valid = (read_split(training_dir, TASK_OF[kind], s) for s in ("train", "valid"))
        metrics = json.loads((tiny_pipeline / layout.model_metrics(kind)).read_text())
        assert metrics["refit"] == {
            "rows": len(train) + len(valid),
            "epochs": metrics["best_epoch"],
            "seconds": metrics["refit"]["seconds"],
            "streamed": False,  # the tiny sets are far below training.loader.stream_above_rows
        }
        _, encoder = load_model(tiny_pipeline / layout.model_dir(kind))
        only_in_valid = np.setdiff1d(valid["item_id"].unique(), train["item_id"].unique())
        assert len(only_in_valid), kind  # the tiny data has new items in its validation window
        assert (encoder.encode_ids("item_id", only_in_valid) != OOV_ID).all(), kind


def test_evaluation_reports_models_next_to_baselines(tiny_pipeline):
    report = json.loads((tiny_pipeline / layout.EVALUATION).read_text())
    retrieval = report["retrieval"]
    for k in (10, 50, 100):
        assert 0 <= retrieval["two_tower"][f"recall@{k}"] <= 1
        assert 0 <= retrieval["popularity"][f"ndcg@{k}"] <= 1
    # recall grows with K: a full-catalogue ranking, not a fixed candidate list
    assert retrieval["two_tower"]["recall@100"] >= retrieval["two_tower"]["recall@10"]
    assert retrieval["users"] > 0
    assert report["fitted_on"] == "train+valid"
    # every retrieval baseline on the same users, the best of them named, the lift and its interval
    from components.evaluate import RETRIEVAL_BASELINES

    for name in RETRIEVAL_BASELINES:
        assert 0 <= retrieval[name]["recall@50"] <= 1, name
    assert retrieval["recent_popularity"]["window_days"] in (None, 1, 3, 7, 14, 30)
    assert set(retrieval["recent_popularity"]["valid_recall@50"]) == {"all", "1d", "3d", "7d", "14d", "30d"}
    best = retrieval["best_baseline"]
    assert best == max(RETRIEVAL_BASELINES, key=lambda name: retrieval[name]["recall@50"])
    lift = retrieval["two_tower"]["recall@50"] / retrieval[best]["recall@50"]
    assert retrieval["lift_over_best_baseline"]["recall@50"] == pytest.approx(lift, abs=1e-3)
    interval = retrieval["intervals"]["mean"]["two_tower"]
    assert interval["low"] <= retrieval["two_tower"]["recall@50"] <= interval["high"]
    segments = retrieval["segments"]
    assert segments["with_history"]["users"] + segments["without_history"]["users"] == retrieval["users"]
    # head and tail items split the catalogue; a user counts in each segment they have test clicks in
    head, tail = segments["head_items"], segments["tail_items"]
    assert head["items"] + tail["items"] == report["catalogue_items"]
    assert head["items"] == round(0.2 * report["catalogue_items"])
    assert max(head["users"], tail["users"]) <= retrieval["users"] <= head["users"] + tail["users"]
    for segment in (head, tail):
        assert 0 <= segment["two_tower"] <= 1 and 0 <= segment[best] <= 1
    # popularity-like baselines live in the head: the best baseline scores higher there than in the tail
    assert head[best] > tail[best]
    ranking = report["ranking"]
    for kind in ("multi_tower", "multi_tower_din", "dlrm", "item_ctr_baseline"):
        assert {"auc", "gauc", "logloss"} <= set(ranking[kind])
    # every ranker learns something beyond chance on the planted structure
    for kind in ("multi_tower", "multi_tower_din", "dlrm"):
        assert ranking[kind]["auc"] > 0.6, kind


def test_the_blend_is_chosen_on_validation_evaluated_on_test_and_bundled(tiny_pipeline):
    """Two-tower candidates blended with recent popularity: the share chosen on validation recall@50 among
    evaluation.blend_shares, the blend scored on test next to the models with its interval, and the
    share and the popular list (refitted on train + valid) in the bundle, where serving loads them."""
    from components.evaluate import BLEND
    from recsys.bundle_blend import BLEND_MEMBER, read_blend
    from recsys.config import load_params
    from serving.bundle import load_bundle

    params = load_params(tiny_pipeline / "params.yaml")
    retrieval = json.loads((tiny_pipeline / layout.EVALUATION).read_text())["retrieval"]
    blend = retrieval["blend"]
    shares = {f"{s:g}" for s in params.evaluation.blend_shares}
    assert set(blend["valid_recall"]) == shares and f"{blend['share']:g}" in shares
    assert blend["valid_recall"][f"{blend['share']:g}"] == max(blend["valid_recall"].values())
    assert blend["window_days"] == retrieval["recent_popularity"]["window_days"]
    assert blend["two_tower_fitted_on"].startswith("train (twin")  # the refitted model saw validation
    for k in (10, 50, 100):
        assert 0 <= retrieval[BLEND][f"recall@{k}"] <= 1
    if blend["share"] == 0:
        assert retrieval[BLEND]["recall@50"] == retrieval["two_tower"]["recall@50"]
    if blend["share"] == 1:
        assert retrieval[BLEND]["recall@50"] == retrieval["recent_popularity"]["recall@50"]
    interval = retrieval["intervals"]["mean"][BLEND]
    assert interval["low"] <= retrieval[BLEND]["recall@50"] <= interval["high"]
    popular = blend["popular_item_ids"]
    assert 0 < len(popular) <= params.evaluation.blend_popular_items and len(set(popular)) == len(popular)
    bundle_dir = tiny_pipeline / layout.BUNDLE_DIR
    assert read_blend(bundle_dir / BLEND_MEMBER).item_ids.tolist() == popular
    served = load_bundle(bundle_dir, params.serving.default_ranker)
    assert served.blend_share == blend["share"]
    assert set(served.blend_ids.tolist()) <= set(served.catalogue.tolist())


def test_the_blend_is_chosen_with_a_two_tower_that_never_saw_the_validation_window(tiny_pipeline):
    from components.evaluate import train_only_two_tower
    from models.batch import OOV_ID
    from recsys.config import load_params
    from recsys.training_data import read_split

    params = load_params(tiny_pipeline / "params.yaml")
    training_dir = tiny_pipeline / layout.TRAINING_DIR
    train, valid = (read_split(training_dir, "retrieval", s) for s in ("train", "valid"))
    model, encoder = train_only_two_tower(
        tiny_pipeline / layout.model_dir("two_tower"), train, params.training
    )
    only_in_valid = np.setdiff1d(valid["item_id"].unique(), train["item_id"].unique())
    assert len(only_in_valid) and (encoder.encode_ids("item_id", only_in_valid) == OOV_ID).all()
    assert not model.training


def test_exported_embeddings_equal_the_item_tower_and_are_unit_norm(tiny_pipeline):
    from models import load_model
    from recsys.catalogue import item_catalogue
    from recsys.config import load_params

    tensors = load_file(str(tiny_pipeline / layout.EMBEDDINGS_DIR / layout.ITEM_EMBEDDINGS))
    ids, emb = tensors["item_ids"], tensors["embeddings"]
    assert emb.dtype == torch.float32 and len(ids) == len(emb)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-4)
    params = load_params(tiny_pipeline / "params.yaml")
    model, encoder = load_model(tiny_pipeline / layout.model_dir("two_tower"))
    items = pd.read_parquet(tiny_pipeline / layout.FEATURES_DIR / "item_stats.parquet")
    catalogue = item_catalogue(
        tiny_pipeline / layout.FEATURES_DIR, items["event_timestamp"].max(), params.feast.ttl_days.item_stats
    )
    assert catalogue["item_id"].tolist() == ids.tolist()
    again = model.item_embeddings(encoder.encode(catalogue, features=model.item_feature_names()))
    assert torch.allclose(again, emb, atol=1e-5)


def test_index_search_returns_item_ids_and_bundle_verifies(tiny_pipeline):
    from recsys.ann_index import load_index, search
    from recsys.bundle_manifest import load_manifest

    bundle = tiny_pipeline / layout.BUNDLE_DIR
    manifest = load_manifest(bundle)
    assert "models/multi_tower_din/model.safetensors" in manifest["files"]
    index, _ = load_index(bundle / "items.faiss")
    tensors = load_file(str(bundle / "item_embeddings.safetensors"))
    ids, _scores = search(index, tensors["embeddings"][:5].numpy(), 1)
    assert ids[:, 0].tolist() == tensors["item_ids"][:5].tolist()  # each item is its own nearest neighbour


def test_gate_first_deploy_passes_with_the_evaluated_metrics(tiny_pipeline):
    decision = json.loads((tiny_pipeline / layout.GATE_DECISION).read_text())
    assert decision["passed"] is True and decision["first_deploy"] is True


def test_every_shipped_gate_metric_has_an_interval_for_the_gate(tiny_pipeline):
    """The gate compares intervals only where evaluate writes one under the gate's own metric path."""
    from components.gate import INTERVALS, metric_at
    from recsys.config import load_params

    report = json.loads((tiny_pipeline / layout.EVALUATION).read_text())
    for path in load_params(tiny_pipeline / "params.yaml").gate.metrics:
        interval = report[INTERVALS][path]
        assert interval["low"] <= metric_at(report, path) <= interval["high"], path
        assert interval["value"] == pytest.approx(metric_at(report, path)), path


def test_training_is_deterministic_for_a_seed(tiny_pipeline, tmp_path):
    """Same seed, same data: the same weights, whatever ran in the process before (initial weights
    included, not only the batch order)."""
    from safetensors.torch import load_file

    from components import train
    from recsys.config import load_params

    params = load_params(
        tiny_pipeline / "params.yaml", overrides={"data.synthetic.preset": "tiny", "training.epochs": 1}
    )
    weights = []
    for run in ("a", "b"):
        torch.rand(7)  # moves the global RNG between the runs, as any earlier work in a process would
        out = tmp_path / run
        train.run("dlrm", params, tiny_pipeline / layout.TRAINING_DIR, out, out / "m.json", out / "p.png")
        weights.append(load_file(str(out / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _train_cli_workdir(tiny_pipeline, tmp_path, changes):
    """A working directory with the tiny training sets and a params file, as the DVC stage sees them."""
    from tests.conftest import write_params

    (tmp_path / layout.TRAINING_DIR).parent.mkdir(parents=True)
    (tmp_path / layout.TRAINING_DIR).symlink_to(tiny_pipeline / layout.TRAINING_DIR)
    write_params(tmp_path / "params.yaml", {"training.epochs": 1, **changes})
    return tmp_path


def test_models_trained_side_by_side_equal_lone_runs(tiny_pipeline, tmp_path, monkeypatch):
    """The DVC stage's several --model values in parallel processes give each model exactly the weights
    a lone run of it gives (same seeds, own process), with the default paths."""
    from components import train
    from recsys.config import load_params

    work = _train_cli_workdir(tiny_pipeline, tmp_path, {})
    monkeypatch.chdir(work)
    assert train.main(["--model", "dlrm", "two_tower", "--jobs", "2"]) == 0
    params = load_params("params.yaml")
    for kind in ("dlrm", "two_tower"):
        alone = tmp_path / "alone" / kind
        train.run(kind, params, layout.TRAINING_DIR, alone, alone / "m.json", alone / "p.png")
        parallel = load_file(str(work / layout.model_dir(kind) / layout.MODEL_WEIGHTS))
        reference = load_file(str(alone / "model.safetensors"))
        assert parallel.keys() == reference.keys()
        assert all(torch.equal(parallel[k], reference[k]) for k in parallel), kind
        assert json.loads((work / layout.model_metrics(kind)).read_text())["model"] == kind


def test_a_failed_model_is_named_and_later_ones_do_not_start(tiny_pipeline, tmp_path, monkeypatch):
    from components import train

    # rankers report auc/gauc/logloss, so stopping on ndcg fails after dlrm's first epoch
    changes = {"training.per_model": {"dlrm": {"early_stopping_metric": "ndcg@10"}}}
    monkeypatch.chdir(_train_cli_workdir(tiny_pipeline, tmp_path, changes))
    with pytest.raises(
        RuntimeError, match=r"dlrm: ValueError: early_stopping_metric .*not started: multi_tower"
    ):
        train.main(["--model", "dlrm", "multi_tower", "--jobs", "1"])
    assert not (tmp_path / layout.model_dir("multi_tower")).exists()


def test_per_model_paths_need_a_single_model(capsys):
    from components import train

    with pytest.raises(SystemExit):
        train.main(["--model", "dlrm", "two_tower", "--metrics", "m.json"])
    assert "--metrics: one model's paths" in capsys.readouterr().err


def test_the_item_knn_blend_is_scored_with_the_table_the_bundle_serves(tiny_pipeline, tmp_path):
    """With evaluation.blend_sources [item_knn], the blend's second list is item-kNN's, from the neighbour
    table of the item-kNN refitted like the baseline, over each test user's history feature; that table
    is what the evaluate step writes and the bundle step ships, so the served blend is the measured one."""
    from components import bundle as bundle_step
    from components.evaluate import (
        BLEND,
        BlendSource,
        evaluate_retrieval,
        knn_lists,
        retrieval_task,
        two_tower_topk,
    )
    from models.blend import NeighbourTable, blend_topk
    from models.metrics import retrieval_metrics
    from models.retrieval_baselines import ItemKNN
    from recsys.bundle_blend import NEIGHBOURS_MEMBER
    from recsys.catalogue import item_catalogue
    from recsys.config import load_params
    from recsys.training_data import read_split, test_start_of
    from serving.bundle import load_bundle

    params = load_params(tiny_pipeline / "params.yaml")
    cfg = params.evaluation.model_copy(update={"blend_sources": ["item_knn"], "blend_neighbours": 7})
    training_dir, features_dir = tiny_pipeline / layout.TRAINING_DIR, tiny_pipeline / layout.FEATURES_DIR
    model_dir = tiny_pipeline / layout.model_dir("two_tower")
    ttl = params.feast.ttl_days.item_stats
    catalogue = item_catalogue(features_dir, test_start_of(training_dir), ttl)
    task = retrieval_task(
        training_dir, read_split(training_dir, "ranking", "test"), catalogue, cfg.ks, cfg.exclude_seen
    )
    table_file = tmp_path / NEIGHBOURS_MEMBER
    out = evaluate_retrieval(
        model_dir,
        training_dir,
        task,
        cfg,
        refit=True,
        seed=params.training.seed,
        blend=BlendSource(features_dir, params.training, ttl),
        neighbours_file=table_file,
    )
    blend = out["blend"]
    assert blend["source"] == out[BLEND]["source"] == "item_knn"
    assert set(blend["valid_recall_by_source"]) == {"item_knn"}
    assert blend["valid_recall"][f"{blend['share']:g}"] == max(blend["valid_recall"].values())
    table = NeighbourTable.load(table_file)
    assert table.width == 7 and blend["item_neighbours"]["fitted_on"] == "train+valid"
    # the table is the baseline's item-kNN (its chosen settings) refitted on train + valid, cut to 7
    items = catalogue["item_id"].to_numpy()
    clicks = pd.concat([read_split(training_dir, "retrieval", s) for s in ("train", "valid")])
    knn = ItemKNN.fit(clicks, items, out["item_knn"]["neighbours"], out["item_knn"]["shrink"])
    again = knn.neighbour_table(items, 7)
    assert np.array_equal(again.neighbours, table.neighbours) and np.array_equal(again.offsets, table.offsets)
    # the test blend: the two-tower's list with the table's lists over the history feature
    lists = knn_lists(table, task.users, task.exclude, items, max(cfg.ks))
    assert any(len(row) for row in lists)
    expected = blend_topk(two_tower_topk(model_dir, task), lists, blend["share"])
    assert out[BLEND]["recall@50"] == retrieval_metrics(expected, task.relevant, [50])["recall@50"]
    # and the bundle step ships that table; serving loads it as the blend's second list
    metrics = tmp_path / "evaluation.json"
    metrics.write_text(json.dumps({"retrieval": out}, default=float))
    bundle_dir = tmp_path / "bundle"
    manifest = json.loads((tiny_pipeline / layout.BUNDLE_DIR / "manifest.json").read_text())
    files = {n: tiny_pipeline / layout.BUNDLE_DIR / n for n in manifest["files"] if n != NEIGHBOURS_MEMBER}
    bundle_step.run(tiny_pipeline / "params.yaml", metrics, bundle_dir, files)
    served = load_bundle(bundle_dir, params.serving.default_ranker)
    assert served.blend_share == blend["share"] and served.blend_table is not None
    assert served.blend_table.ranked(table.item_ids[:3], 20) == table.ranked(table.item_ids[:3], 20)
