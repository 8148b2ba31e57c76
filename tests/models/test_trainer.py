from __future__ import annotations

import csv

import pytest
import torch

from models.config import (
    DINTowerConfig,
    FeatureGroup,
    FeatureSpec,
    MultiTowerConfig,
    MultiTowerDINConfig,
    SequenceFeature,
    TowerConfig,
    TrainingConfig,
)
from models.encoding import FeatureEncoder
from models.registry import build_model, model_class
from models.trainer import BEST_WEIGHTS, LAST_WEIGHTS, TRAINER_STATE, fit, shard_indices, write_history_csv
from tests.conftest import revalidated, shipped_params
from tests.models.conftest import make_frame, mlp_config, sparse_feature


def _setup(models_config, kind="multi_tower", seed=0, **frame_args):
    frame = make_frame(**frame_args)
    encoder = FeatureEncoder.fit(models_config.features, frame)
    torch.manual_seed(seed)
    model = build_model(
        kind, models_config.model(kind), encoder, **model_class(kind).fitted_inputs(encoder, frame)
    )
    return model, encoder, frame


def _config(**changes) -> TrainingConfig:
    values = {"batch_size": 64, "epochs": 1, "lr": 3e-3, "seed": 5, "device": "cpu", "patience": 0}
    # the tests were written for torch's own thread count and no per-model overrides (params.yaml: 1 thread,
    # more epochs for the two-tower)
    values |= {"num_workers": 0, "per_model": {}}
    values.update(changes)
    return revalidated(shipped_params().training, **values)


@pytest.mark.parametrize("kind", ["two_tower", "dlrm"])
def test_same_seed_gives_the_same_weights(models_config, kind):
    runs = []
    for _ in range(2):
        model, encoder, frame = _setup(models_config, kind)
        fit(model, encoder.encode(frame), None, _config(epochs=2))
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    model, encoder, frame = _setup(models_config, kind)
    fit(model, encoder.encode(frame), None, _config(epochs=2, seed=6))
    assert not all(torch.equal(runs[0][k], model.state_dict()[k]) for k in runs[0])


def test_early_stopping_restores_the_best_epoch(models_config):
    model, encoder, frame = _setup(models_config, "multi_tower", n_rows=1500, label="history_match")
    train = encoder.encode(frame)
    valid = encoder.encode(frame)
    valid["label"] = 1.0 - valid["label"]  # the better the model fits, the worse it does here
    result = fit(model, train, valid, _config(epochs=12, patience=2))
    assert result.stopped_early
    assert result.metric == "auc"
    assert len(result.history) == result.best_epoch + 2 < 12
    best_auc = max(row["valid_auc"] for row in result.history)
    assert result.best_metric == pytest.approx(best_auc)
    assert model.validation_metrics(valid, 512)["auc"] == pytest.approx(best_auc)  # best weights are back


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, models_config):
    model, encoder, frame = _setup(models_config, "two_tower")
    train = encoder.encode(frame)
    fit(model, train, train, _config(epochs=3, restore_best=False))
    reference = model.state_dict()

    model, _, _ = _setup(models_config, "two_tower")
    first = fit(model, train, train, _config(epochs=2, restore_best=False), checkpoint_dir=tmp_path)
    assert len(first.history) == 2
    assert {p.name for p in tmp_path.iterdir()} >= {LAST_WEIGHTS, BEST_WEIGHTS, TRAINER_STATE, "optimizer.pt"}
    model, _, _ = _setup(models_config, "two_tower", seed=123)  # a different init: the checkpoint wins
    resumed = fit(model, train, train, _config(epochs=3, restore_best=False), checkpoint_dir=tmp_path)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    for key, value in reference.items():
        assert torch.allclose(model.state_dict()[key], value, atol=1e-6), key


def test_history_csv_has_one_row_per_epoch(tmp_path, models_config):
    model, encoder, frame = _setup(models_config, "dlrm")
    batch = encoder.encode(frame)
    result = fit(model, batch, batch, _config(epochs=2))
    path = write_history_csv(result.history, tmp_path / "history.csv")
    rows = list(csv.DictReader(path.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "valid_auc", "valid_gauc", "valid_logloss", "samples_per_second"} <= set(rows[0])
    assert float(rows[1]["train_loss"]) > 0


def test_shards_cover_the_permutation_evenly():
    permutation = torch.randperm(11)
    shards = [shard_indices(permutation, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(torch.cat(shards).tolist()) == set(range(11))
    assert torch.equal(shard_indices(permutation, 0, 1), permutation)


def test_din_learns_the_item_history_interaction_better_than_multi_tower():
    """The label is 1 iff the target's category is in the user's history (5% noise): an item x history
    interaction that DIN's target attention reads directly and mean pooling only blurs."""
    spec, configs = _interaction_models()
    frame_args = {"n_rows": 4000, "n_users": 200, "n_items": 60, "n_categories": 12, "max_history": 6}
    train = make_frame(seed=0, label="history_match", **frame_args)
    valid = make_frame(seed=1, label="history_match", **frame_args)
    encoder = FeatureEncoder.fit(spec, train)
    train_batch, valid_batch = encoder.encode(train), encoder.encode(valid)
    scores = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        model = build_model(kind, config, encoder)
        result = fit(model, train_batch, valid_batch, _config(epochs=10, batch_size=128, lr=1e-2))
        scores[kind] = result.best_metric
    assert scores["multi_tower_din"] > 0.75, scores
    assert scores["multi_tower_din"] > scores["multi_tower"] + 0.1, scores


def _interaction_models() -> tuple[FeatureSpec, dict[str, MultiTowerConfig | MultiTowerDINConfig]]:
    """Ids, target category and the history only: no distractor features, so the test is about the
    history interaction."""
    spec = FeatureSpec(
        sparse=[sparse_feature(n) for n in ("user_id", "item_id", "category")],
        sequence=[
            SequenceFeature(name="hist_item_ids", shares="item_id", max_length=8),
            SequenceFeature(name="hist_categories", shares="category", max_length=8),
        ],
        dense=[],
    )
    mlp, final = mlp_config([32]), mlp_config([64, 32])
    user = FeatureGroup(name="user", type="deep", features=["user_id"])
    item = FeatureGroup(name="item", type="deep", features=["item_id", "category"])
    history = ["hist_item_ids", "hist_categories"]
    no_wide = {"wide_features": [], "embedding_l2": 0.0, "wide_prefit_l2": None}  # the deep parts only
    multi_tower = MultiTowerConfig(
        feature_groups=[user, item, FeatureGroup(name="history", type="deep", features=history)],
        towers=[TowerConfig(input=g, mlp=mlp) for g in ("user", "item", "history")],
        final=final,
        **no_wide,
    )
    din = MultiTowerDINConfig(
        feature_groups=[
            user,
            item,
            FeatureGroup(name="seq", type="sequence", features=["item_id", "category", *history]),
        ],
        towers=[TowerConfig(input=g, mlp=mlp) for g in ("user", "item")],
        din_towers=[DINTowerConfig(input="seq", attn_mlp=mlp)],
        final=final,
        **no_wide,
    )
    return spec, {"multi_tower": multi_tower, "multi_tower_din": din}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_runs_on_the_gpu(models_config):
    for on_device in (True, False):
        model, encoder, frame = _setup(models_config, "multi_tower_din")
        batch = encoder.encode(frame)
        result = fit(
            model, batch, batch, _config(device="cuda", bf16=True, epochs=2, data_on_device=on_device)
        )
        assert result.device.startswith("cuda")
        assert next(model.parameters()).is_cuda
        assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
