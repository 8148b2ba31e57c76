from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.config import (
    FeatureGroup,
    FeatureSpec,
    ModelConfigError,
    SequenceFeature,
    TowerConfig,
    check_model_config,
)
from models.registry import ModelsConfig
from tests.conftest import revalidated, shipped_params
from tests.models.conftest import mlp_config, shipped_models_config, sparse_feature


def test_shipped_features_cover_the_data_contract_and_round_trip():
    config = shipped_models_config()
    assert [f.name for f in config.features.sparse] == [
        "user_id",
        "item_id",
        "gender",
        "age_bucket",
        "occupation",
        "zip_prefix",
        "category",
        "brand",
    ]
    assert {s.name: s.shares for s in config.features.sequence} == {
        "hist_item_ids": "item_id",
        "hist_categories": "category",
    }
    assert "user_ctr_30d" in [d.name for d in config.features.dense]
    assert ModelsConfig.model_validate(config.model_dump(mode="json")) == config


def _with_dlrm(**changes) -> dict:
    raw = shipped_models_config().model_dump(mode="json")
    raw["dlrm"].update(changes)
    return raw


def test_dlrm_dense_mlp_must_end_at_the_sparse_dim():
    raw = _with_dlrm(dense_mlp=mlp_config([32, 8]).model_dump())
    with pytest.raises(
        ValidationError, match=r"dense_mlp last hidden_unit \(8\) must equal .* embedding_dim \(16\)"
    ):
        ModelsConfig.model_validate(raw)


def test_dlrm_sparse_dims_must_be_equal():
    raw = shipped_models_config().model_dump(mode="json")
    raw["features"]["sparse"][0]["embedding_dim"] = 32  # user_id
    with pytest.raises(ValidationError, match=r"sparse group feature dims must be the same.*'user_id': 32"):
        ModelsConfig.model_validate(raw)


def test_dlrm_rejects_sequences_in_sparse_group_and_odd_group_names():
    with pytest.raises(ValidationError, match="sparse group must hold sparse id features only"):
        ModelsConfig.model_validate(
            _with_dlrm(
                feature_groups=[{"name": "sparse", "type": "deep", "features": ["item_id", "hist_item_ids"]}]
            )
        )
    dlrm = shipped_models_config().dlrm
    with pytest.raises(ValidationError, match="a group named 'sparse' is required"):
        revalidated(dlrm, feature_groups=[FeatureGroup(name="dense", type="deep", features=["price"])])
    with pytest.raises(
        ValidationError, match=r"only 'dense' and 'sparse' groups are allowed, got \['wide'\]"
    ):
        revalidated(
            dlrm,
            feature_groups=[
                FeatureGroup(name="sparse", type="deep", features=["item_id"]),
                FeatureGroup(name="wide", type="deep", features=["x"]),
            ],
        )


def test_unknown_feature_in_a_group_is_named():
    raw = shipped_models_config().model_dump(mode="json")
    raw["multi_tower"]["feature_groups"][0]["features"].append("user_favourite_colour")
    with pytest.raises(
        ValidationError, match=r"multi_tower.feature_groups 'user': unknown feature 'user_favourite_colour'"
    ):
        ModelsConfig.model_validate(raw)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        revalidated(mlp_config([8]), hiden_units=[4])
    with pytest.raises(ValidationError, match="early-stopping metric 'accuracy'"):
        revalidated(shipped_params().training, early_stopping_metric="accuracy")


@pytest.mark.parametrize(
    ("towers", "message"),
    [
        (["items"], r"multi_tower.towers: input 'items' is not a feature group \(\['seq', 'user'\]\)"),
        (["seq"], "multi_tower.towers: input 'seq' is a sequence group; towers need deep"),
        (["user", "user"], "multi_tower.towers: two towers read the same group"),
    ],
)
def test_tower_inputs_must_name_a_deep_group_once(towers, message):
    groups = [
        FeatureGroup(name="user", type="deep", features=["user_id"]),
        FeatureGroup(name="seq", type="sequence", features=["item_id", "hist_item_ids"]),
    ]
    mlp = mlp_config([4])
    towers = [TowerConfig(input=t, mlp=mlp) for t in towers]
    with pytest.raises(ValidationError, match=message):
        revalidated(shipped_models_config().multi_tower, feature_groups=groups, towers=towers)


def test_din_needs_a_sequence_group_with_matching_query_dim():
    groups = [
        FeatureGroup(name="user", type="deep", features=["user_id"]),
        FeatureGroup(name="seq", type="sequence", features=["item_id", "category", "hist_item_ids"]),
    ]
    spec = FeatureSpec(
        sparse=[sparse_feature(n) for n in ("user_id", "item_id", "category")],
        sequence=[SequenceFeature(name="hist_item_ids", shares="item_id", max_length=30)],
        dense=[],
    )
    shipped = shipped_models_config().multi_tower_din
    din_tower = shipped.din_towers[0]  # attention MLP [64, 32]
    with pytest.raises(ValidationError, match="DIN needs a sequence group"):
        revalidated(
            shipped, feature_groups=groups, towers=[], din_towers=[revalidated(din_tower, input="user")]
        )
    config = revalidated(
        shipped,
        feature_groups=groups,
        towers=[TowerConfig(input="user", mlp=mlp_config([4]))],
        din_towers=[revalidated(din_tower, input="seq")],
    )
    with pytest.raises(ModelConfigError, match=r"query dim 32 .* must equal sequence dim 16"):
        check_model_config("multi_tower_din", config, spec)


def test_sequence_must_share_a_declared_sparse_feature():
    with pytest.raises(ValidationError, match="shares 'items', which is not a sparse feature"):
        FeatureSpec(
            sparse=[sparse_feature("item_id")],
            sequence=[SequenceFeature(name="h", shares="items", max_length=30)],
            dense=[],
        )
    with pytest.raises(ValidationError, match="reserved"):
        sparse_feature("label")


def test_per_model_training_overrides_apply_to_their_model_only():
    training = revalidated(
        shipped_params().training,
        epochs=4,
        lr=1e-3,
        batch_size=1024,
        per_model={"two_tower": {"epochs": 30, "batch_size": 256}},
    )
    two_tower, dlrm = training.for_model("two_tower"), training.for_model("dlrm")
    assert (two_tower.epochs, two_tower.batch_size, two_tower.lr) == (30, 256, 1e-3)
    assert (dlrm.epochs, dlrm.batch_size) == (4, 1024)


@pytest.mark.parametrize(
    ("per_model", "message"),
    [
        ({"towtower": {"epochs": 3}}, "per_model: unknown model 'towtower'"),
        ({"dlrm": {"epochs": 0}}, "per_model.dlrm.epochs: Input should be greater than 0"),
        ({"dlrm": {"epoch": 3}}, "per_model.dlrm.epoch: Extra inputs are not permitted"),
        ({"dlrm": {"per_model": {}}}, "per_model.dlrm: per_model cannot be nested"),
    ],
)
def test_per_model_training_overrides_are_validated_naming_the_key(per_model, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        revalidated(shipped_params().training, per_model=per_model)
