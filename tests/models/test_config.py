from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.config import (
    DINTowerConfig,
    DLRMConfig,
    FeatureGroup,
    FeatureSpec,
    MLPConfig,
    ModelConfigError,
    ModelsConfig,
    MultiTowerConfig,
    MultiTowerDINConfig,
    SequenceFeature,
    SparseFeature,
    TowerConfig,
    TrainingConfig,
    check_model_config,
)


def test_defaults_cover_the_data_contract_and_round_trip():
    config = ModelsConfig()
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
    raw = ModelsConfig().model_dump(mode="json")
    raw["dlrm"].update(changes)
    return raw


def test_dlrm_dense_mlp_must_end_at_the_sparse_dim():
    raw = _with_dlrm(dense_mlp={"hidden_units": [32, 8]})
    with pytest.raises(
        ValidationError, match=r"dense_mlp last hidden_unit \(8\) must equal .* embedding_dim \(16\)"
    ):
        ModelsConfig.model_validate(raw)


def test_dlrm_sparse_dims_must_be_equal():
    raw = ModelsConfig().model_dump(mode="json")
    raw["features"]["sparse"][0]["embedding_dim"] = 32  # user_id
    with pytest.raises(ValidationError, match=r"sparse group feature dims must be the same.*'user_id': 32"):
        ModelsConfig.model_validate(raw)


def test_dlrm_rejects_sequences_in_sparse_group_and_odd_group_names():
    with pytest.raises(ValidationError, match="sparse group must hold sparse id features only"):
        ModelsConfig.model_validate(
            _with_dlrm(feature_groups=[{"name": "sparse", "features": ["item_id", "hist_item_ids"]}])
        )
    with pytest.raises(ValidationError, match="a group named 'sparse' is required"):
        DLRMConfig(feature_groups=[FeatureGroup(name="dense", features=["price"])])
    with pytest.raises(
        ValidationError, match=r"only 'dense' and 'sparse' groups are allowed, got \['wide'\]"
    ):
        DLRMConfig(
            feature_groups=[
                FeatureGroup(name="sparse", features=["item_id"]),
                FeatureGroup(name="wide", features=["x"]),
            ]
        )


def test_unknown_feature_in_a_group_is_named():
    raw = ModelsConfig().model_dump(mode="json")
    raw["multi_tower"]["feature_groups"][0]["features"].append("user_favourite_colour")
    with pytest.raises(
        ValidationError, match=r"multi_tower.feature_groups 'user': unknown feature 'user_favourite_colour'"
    ):
        ModelsConfig.model_validate(raw)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MLPConfig(hidden_units=[8], hiden_units=[4])
    with pytest.raises(ValidationError, match="early-stopping metric 'accuracy'"):
        TrainingConfig(early_stopping_metric="accuracy")


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
        FeatureGroup(name="user", features=["user_id"]),
        FeatureGroup(name="seq", type="sequence", features=["item_id", "hist_item_ids"]),
    ]
    mlp = MLPConfig(hidden_units=[4])
    with pytest.raises(ValidationError, match=message):
        MultiTowerConfig(feature_groups=groups, towers=[TowerConfig(input=t, mlp=mlp) for t in towers])


def test_din_needs_a_sequence_group_with_matching_query_dim():
    groups = [
        FeatureGroup(name="user", features=["user_id"]),
        FeatureGroup(name="seq", type="sequence", features=["item_id", "category", "hist_item_ids"]),
    ]
    spec = FeatureSpec(
        sparse=[SparseFeature(name=n) for n in ("user_id", "item_id", "category")],
        sequence=[SequenceFeature(name="hist_item_ids", shares="item_id")],
    )
    with pytest.raises(ValidationError, match="DIN needs a sequence group"):
        MultiTowerDINConfig(feature_groups=groups, din_towers=[DINTowerConfig(input="user")])
    config = MultiTowerDINConfig(
        feature_groups=groups,
        towers=[TowerConfig(input="user", mlp=MLPConfig(hidden_units=[4]))],
        din_towers=[DINTowerConfig(input="seq")],
    )
    with pytest.raises(ModelConfigError, match=r"query dim 32 .* must equal sequence dim 16"):
        check_model_config("multi_tower_din", config, spec)


def test_sequence_must_share_a_declared_sparse_feature():
    with pytest.raises(ValidationError, match="shares 'items', which is not a sparse feature"):
        FeatureSpec(
            sparse=[SparseFeature(name="item_id")], sequence=[SequenceFeature(name="h", shares="items")]
        )
    with pytest.raises(ValidationError, match="reserved"):
        SparseFeature(name="label")


def test_per_model_training_overrides_apply_to_their_model_only():
    training = TrainingConfig(epochs=4, lr=1e-3, per_model={"two_tower": {"epochs": 30, "batch_size": 256}})
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
        TrainingConfig(per_model=per_model)
