"""The feature-group embedding layer (models/embedding.py): dims, pooling, jagged sequences."""

from __future__ import annotations

import torch

from models.batch import FIRST_ID, OOV_ID, PAD_ID
from models.config import FeatureGroup
from models.embedding import EmbeddingGroup
from models.encoding import FeatureEncoder


def test_embedding_group_dims_match_outputs(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    groups = models_config.multi_tower_din.feature_groups
    layer = EmbeddingGroup(encoder, groups)
    out = layer(batch)
    n = len(frame)
    assert out["user"].shape == (n, layer.group_dim("user"))
    assert layer.group_dim("user") == 5 * 16 + 7  # 5 sparse ids + hist_length + 6 user stats
    assert out["seq.query"].shape == (n, 32) and out["seq.sequence"].shape == (n, 30, 32)
    assert torch.equal(out["seq.sequence_length"], batch["hist_item_ids__length"])
    # history shares the item-id table, so only one item_id table exists
    assert "hist_item_ids" not in layer.tables and "item_id" in layer.tables
    for table in layer.tables.values():  # padding and unseen ids start as zero vectors
        assert not table.weight[PAD_ID].any() and not table.weight[OOV_ID].any()
    unshared = EmbeddingGroup(
        encoder,
        [FeatureGroup(name="h", type="deep", features=["hist_item_ids"])],
        share_sequence_tables=False,
    )
    assert list(unshared.tables) == ["hist_item_ids"]
    assert unshared.tables["hist_item_ids"].num_embeddings == encoder.num_embeddings("item_id")


def test_mean_pooling_ignores_padding_and_empty_rows_are_zero(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    layer = EmbeddingGroup(encoder, [FeatureGroup(name="h", type="deep", features=["hist_item_ids"])])
    before = layer(batch)["h"]
    noisy = dict(batch)
    ids = batch["hist_item_ids"].clone()
    pad = ids == PAD_ID
    ids[pad] = torch.randint(FIRST_ID, encoder.num_embeddings("item_id"), (int(pad.sum()),))
    noisy["hist_item_ids"] = ids
    assert torch.equal(layer(noisy)["h"], before)
    empty = batch["hist_item_ids__length"] == 0
    assert empty.any() and (before[empty] == 0).all()
    row = int(torch.nonzero(~empty)[0])
    length = int(batch["hist_item_ids__length"][row])
    expected = layer.tables["item_id"].weight[batch["hist_item_ids"][row, :length]].mean(0)
    assert torch.allclose(before[row], expected, atol=1e-6)


def test_jagged_sequence_values_are_the_valid_positions_of_the_padded_ones(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    groups = models_config.multi_tower_din.feature_groups
    padded = EmbeddingGroup(encoder, groups)
    jagged = EmbeddingGroup(encoder, groups, jagged_sequences=True)
    jagged.load_state_dict(padded.state_dict())
    lengths = batch["hist_item_ids__length"]
    mask = torch.arange(30).unsqueeze(0) < lengths.unsqueeze(1)
    values = jagged(batch)["seq.sequence_values"]
    assert values.shape == (int(lengths.sum()), 32)
    assert torch.equal(values, padded(batch)["seq.sequence"][mask])
    assert "seq.sequence" not in jagged(batch)
