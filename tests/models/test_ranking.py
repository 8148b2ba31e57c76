from __future__ import annotations

import pandas as pd
import pytest
import torch

from models.build import build_model
from models.config import DLRMConfig, FeatureGroup, FeatureSpec, MLPConfig, ModelConfigError, SparseFeature
from models.features import FeatureEncoder
from models.ranking import DLRM, MultiTower, MultiTowerDIN, Ranker


@pytest.mark.parametrize("kind", ["multi_tower", "multi_tower_din", "dlrm"])
def test_rankers_predict_one_logit_per_row_and_train(frame, models_config, kind):
    torch.manual_seed(0)
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    model = build_model(kind, models_config.model(kind), encoder)
    assert isinstance(model, Ranker)
    logits = model.predict(batch)
    assert logits.shape == (len(frame),)
    loss = model.loss(batch)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part (needed for DDP)"
    metrics = model.validation_metrics(batch, batch_size=128)
    assert set(metrics) == {"auc", "gauc", "logloss", "loss"}
    assert 0 <= metrics["auc"] <= 1


def test_multi_tower_din_adds_a_din_tower(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    din = build_model("multi_tower_din", models_config.multi_tower_din, encoder)
    plain = build_model("multi_tower", models_config.multi_tower, encoder)
    assert isinstance(din, MultiTowerDIN) and isinstance(plain, MultiTower)
    assert list(din.din_towers) == ["seq"]
    # final MLP input = user tower + item tower + DIN output (query dim 32)
    assert din.final.layers[0].in_features == 16 + 16 + 32


def test_dlrm_interaction_and_top_mlp_dims(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    model = build_model("dlrm", models_config.dlrm, encoder)
    assert isinstance(model, DLRM)
    n_vectors = 8 + 1  # 8 sparse features + the dense MLP output
    assert model.interaction.output_dim == n_vectors * (n_vectors - 1) // 2
    assert model.final.layers[0].in_features == 36 + 16
    with_sparse = build_model(
        "dlrm", models_config.dlrm.model_copy(update={"arch_with_sparse": True}), encoder
    )
    assert with_sparse.final.layers[0].in_features == 36 + 16 + 8 * 16


def test_dlrm_construction_errors_name_the_problem():
    spec = FeatureSpec(
        sparse=[SparseFeature(name="a", embedding_dim=8), SparseFeature(name="b", embedding_dim=4)]
    )
    encoder = FeatureEncoder.fit(spec, pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    config = DLRMConfig(feature_groups=[FeatureGroup(name="sparse", features=["a", "b"])])
    with pytest.raises(
        ModelConfigError, match=r"sparse group feature dims must be the same.*\{'a': 8, 'b': 4\}"
    ):
        DLRM(encoder, config)
    one = DLRMConfig(
        feature_groups=[FeatureGroup(name="sparse", features=["a"])], dense_mlp=MLPConfig(hidden_units=[8])
    )
    with pytest.raises(ModelConfigError, match="interaction needs at least two vectors"):
        DLRM(encoder, one)
    missing = DLRMConfig(feature_groups=[FeatureGroup(name="sparse", features=["a", "c"])])
    with pytest.raises(ModelConfigError, match="unknown feature 'c'"):
        DLRM(encoder, missing)


def test_build_model_validates_kind_and_config(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    with pytest.raises(ModelConfigError, match="unknown model kind 'deepfm'"):
        build_model("deepfm", models_config.dlrm, encoder)
    with pytest.raises(ModelConfigError, match="needs a DLRMConfig, got MultiTowerConfig"):
        build_model("dlrm", models_config.multi_tower, encoder)
    from_json = build_model("dlrm", models_config.dlrm.model_dump(mode="json"), encoder)
    assert isinstance(from_json, DLRM)


@pytest.mark.parametrize("kind", ["multi_tower", "multi_tower_din"])
def test_history_padding_never_changes_a_prediction(frame, models_config, kind):
    torch.manual_seed(0)
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    model = build_model(kind, models_config.model(kind), encoder).train()  # training mode too
    before = model.predict(batch)
    noisy = dict(batch)
    for name in ("hist_item_ids", "hist_categories"):
        ids = batch[name].clone()
        pad = torch.arange(ids.shape[1]).unsqueeze(0) >= batch[name + "__length"].unsqueeze(1)
        ids[pad] = torch.randint(2, encoder.num_embeddings(name), (int(pad.sum()),))
        noisy[name] = ids
    assert torch.equal(model.predict(noisy), before)
    valid = dict(batch, hist_item_ids=batch["hist_item_ids"].roll(1, dims=0))
    assert not torch.allclose(model.predict(valid), before)  # the valid positions do matter
