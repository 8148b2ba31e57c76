"""The rankers' wide part and embedding L2, and the one-hot logistic-regression baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.baselines import OneHotLogisticRegression, item_ctr_logits
from models.encoding import FeatureEncoder
from models.registry import ModelsConfig, build_model
from models.trainer import fit
from tests.conftest import revalidated, shipped_params
from tests.models.conftest import make_frame, small_models_config
from tests.models.test_ranking import test_predict_for_users_equals_predict_on_the_merged_rows

RANKERS = ["multi_tower", "multi_tower_din", "dlrm"]
WIDE = ["user_id", "item_id", "item_ctr_30d"]


def _with(config: ModelsConfig, kind: str, **changes: object) -> ModelsConfig:
    return revalidated(config, **{kind: revalidated(config.model(kind), **changes)})


def _item_bias_frame(n_rows: int = 3000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Clicks driven by the item alone: item i is clicked with probability p[i]."""
    frame = make_frame(n_rows=n_rows, n_items=40, seed=seed)
    rng = np.random.default_rng(seed + 1)
    p = np.linspace(0.05, 0.95, 40)
    frame["label"] = (rng.random(n_rows) < p[frame["item_id"].to_numpy() - 1000]).astype(np.int64)
    return frame, p


@pytest.mark.parametrize("kind", RANKERS)
def test_the_wide_part_starts_at_zero_and_adds_to_the_deep_logit(frame, kind):
    config = _with(small_models_config(), kind, wide_features=WIDE)
    encoder = FeatureEncoder.fit(config.features, frame)
    batch = encoder.encode(frame)
    model = build_model(kind, config.model(kind), encoder)
    assert set(WIDE) <= set(model.feature_names())
    assert torch.equal(model.wide(batch), torch.zeros(len(frame)))
    with torch.no_grad():
        model.wide.weights["item_id"].weight.fill_(0.5)
        torch.testing.assert_close(model.predict(batch), model.deep_logit(batch) + 0.5)


@pytest.mark.parametrize("kind", RANKERS)
def test_predict_for_users_with_a_wide_part_equals_predict(frame, kind):
    config = _with(small_models_config(), kind, wide_features=WIDE)
    torch.manual_seed(1)
    encoder = FeatureEncoder.fit(config.features, frame)
    model = build_model(kind, config.model(kind), encoder)
    with torch.no_grad():  # non-zero wide weights, so the check sees them
        for table in model.wide.weights.values():
            table.weight.normal_()
        model.wide.dense.weight.normal_()
    test_predict_for_users_equals_predict_on_the_merged_rows(frame, config, kind)


def test_the_wide_item_weights_learn_the_item_bias():
    frame, p = _item_bias_frame()
    config = _with(small_models_config(), "multi_tower", wide_features=["item_id"])
    encoder = FeatureEncoder.fit(config.features, frame)
    torch.manual_seed(0)
    model = build_model("multi_tower", config.multi_tower, encoder)
    training = revalidated(shipped_params().training, epochs=8, lr=0.01, patience=0, device="cpu")
    fit(model, encoder.encode(frame), None, training, progress=False)
    ids = encoder.encode_ids("item_id", np.arange(1000, 1040))
    weights = model.wide.weights["item_id"].weight.detach().squeeze(-1).numpy()[ids]
    assert np.corrcoef(weights, p)[0, 1] > 0.5


def test_embedding_l2_adds_the_squared_norms_of_the_rows_a_batch_uses(frame):
    plain = _with(small_models_config(), "multi_tower", wide_features=WIDE)
    encoder = FeatureEncoder.fit(plain.features, frame)
    batch = encoder.encode(frame)
    torch.manual_seed(0)
    model = build_model("multi_tower", plain.multi_tower, encoder)
    with torch.no_grad():
        model.wide.weights["user_id"].weight.normal_()
    base = model.loss(batch)
    model.config = revalidated(plain.multi_tower, embedding_l2=0.1)
    penalty = model.embedding.squared_norm(batch) + model.wide.squared_norm(batch)
    assert penalty > 0
    torch.testing.assert_close(model.loss(batch), base + 0.1 * penalty)
    # the penalty counts each sparse lookup of the batch: here user_id + item_id (+ profile ids) rows
    user_rows = model.embedding.tables["user_id"](batch["user_id"]).square().sum(-1).mean()
    assert penalty >= user_rows


def test_a_sequence_feature_cannot_be_wide():
    base = shipped_params().models
    with pytest.raises(ValueError, match="wide_features: 'hist_item_ids'"):
        revalidated(base, multi_tower=revalidated(base.multi_tower, wide_features=["hist_item_ids"]))


# ---- baselines ----------------------------------------------------------------------------------------


def test_logistic_regression_recovers_user_and_item_biases():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 6000), rng.integers(0, 20, 6000)
    user_bias, item_bias = np.linspace(-2, 2, 30), np.linspace(-1.5, 1.5, 20)
    p = 1 / (1 + np.exp(-(user_bias[users] + item_bias[items])))
    rows = pd.DataFrame({"user_id": users, "item_id": items, "label": (rng.random(6000) < p).astype(int)})
    model = OneHotLogisticRegression.fit(rows, l2=1.0)
    assert np.corrcoef(model.user_weight, user_bias[model.users.to_numpy()])[0, 1] > 0.95
    assert np.corrcoef(model.item_weight, item_bias[model.items.to_numpy()])[0, 1] > 0.95
    unseen = pd.DataFrame({"user_id": [999], "item_id": [998]})
    assert model.logits(unseen)[0] == pytest.approx(model.bias)  # unseen ids: weight 0
    # a stronger penalty shrinks the weights
    strong = OneHotLogisticRegression.fit(rows, l2=300.0)
    assert np.abs(strong.user_weight).sum() < 0.5 * np.abs(model.user_weight).sum()


def test_logistic_regression_l2_is_chosen_on_validation():
    rng = np.random.default_rng(1)
    # pure noise: any per-id weight overfits, so the strongest penalty must win on validation
    rows = pd.DataFrame({
        "user_id": rng.integers(0, 200, 3000), "item_id": rng.integers(0, 200, 3000),
        "label": rng.integers(0, 2, 3000),
    })  # fmt: skip
    tuned = OneHotLogisticRegression.fit_tuned(rows.iloc[:2000], rows.iloc[2000:], l2_grid=(0.01, 100.0))
    assert tuned.l2 == 100.0


def test_item_ctr_logits_smooth_towards_the_global_rate():
    train = pd.DataFrame({"item_id": [1, 1, 1, 1, 2], "label": [1, 1, 1, 1, 0]})
    logits = item_ctr_logits(train, pd.DataFrame({"item_id": [1, 2, 3]}), prior_weight=1)
    ctr = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(ctr, [(4 + 0.8) / 5, 0.8 / 2, 0.8])
