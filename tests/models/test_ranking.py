from __future__ import annotations

import pandas as pd
import pytest
import torch

from models.architectures.ranking import DLRM, MultiTower, MultiTowerDIN, Ranker
from models.config import FeatureGroup, FeatureSpec, ModelConfigError
from models.encoding import FeatureEncoder
from models.registry import build_model
from tests.conftest import revalidated
from tests.models.conftest import mlp_config, shipped_models_config, sparse_feature


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
    # DIN holds every MultiTower tower and adds the attention: the final MLP reads user + item + history
    # towers (16 each in the small config) + the DIN output (query dim 32)
    assert list(din.towers) == list(plain.towers) == ["user", "item", "history"]
    assert din.final.layers[0].in_features == 16 + 16 + 16 + 32


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
        sparse=[sparse_feature("a", embedding_dim=8), sparse_feature("b", embedding_dim=4)],
        sequence=[],
        dense=[],
    )
    encoder = FeatureEncoder.fit(spec, pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    # the spec declares only a and b: no wide part (the shipped one reads user_id and item_id)
    shipped = revalidated(shipped_models_config().dlrm, wide_features=[])
    config = revalidated(
        shipped, feature_groups=[FeatureGroup(name="sparse", type="deep", features=["a", "b"])]
    )
    with pytest.raises(
        ModelConfigError, match=r"sparse group feature dims must be the same.*\{'a': 8, 'b': 4\}"
    ):
        DLRM(encoder, config)
    one = revalidated(
        shipped,
        feature_groups=[FeatureGroup(name="sparse", type="deep", features=["a"])],
        dense_mlp=mlp_config([8]),
    )
    with pytest.raises(ModelConfigError, match="interaction needs at least two vectors"):
        DLRM(encoder, one)
    missing = revalidated(
        shipped, feature_groups=[FeatureGroup(name="sparse", type="deep", features=["a", "c"])]
    )
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


@pytest.mark.parametrize("kind", ["multi_tower", "multi_tower_din", "dlrm"])
def test_predict_for_users_equals_predict_on_the_merged_rows(frame, models_config, kind):
    """Serving ranks many candidates per user: user-only towers run once per user, same logits."""
    torch.manual_seed(0)
    encoder = FeatureEncoder.fit(models_config.features, frame)
    model = build_model(kind, models_config.model(kind), encoder).eval()
    names = model.feature_names()
    item_features = {"item_id", "category", "brand", "price"} | {n for n in names if n.startswith("item_")}
    user_names = [n for n in names if n not in item_features]
    item_names = [n for n in names if n in item_features]
    users = frame.iloc[:5].reset_index(drop=True)  # one row per user: their features at one time
    user_index = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4])
    items = frame.iloc[100 : 100 + len(user_index)].reset_index(drop=True)
    merged = pd.concat(
        [users.iloc[user_index.numpy()].reset_index(drop=True)[user_names], items[item_names]], axis=1
    )
    calls: list[int] = []
    if kind != "dlrm":
        model.towers["user"].register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    with torch.inference_mode():
        expected = model.predict(encoder.encode(merged, features=names))
        calls.clear()
        got = model.predict_for_users(
            encoder.encode(users, features=user_names),
            encoder.encode(items, features=item_names),
            user_index,
            set(user_names),
        )
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    if kind != "dlrm":
        assert calls == [len(users)]  # the user tower ran once per user, not once per candidate
