"""The throughput benchmark compares like with like: its per-row reference (tests/models/row_reference.py)
builds exactly the encoder's tensors, and a model trains on its batches."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from models.batch import OOV_ID
from models.encoding import FeatureEncoder
from models.registry import build_model
from tests.models.conftest import make_frame, shipped_models_config
from tests.models.row_reference import RowDataset


def test_reference_rows_equal_the_vectorised_encoding():
    config = shipped_models_config()
    train = make_frame(200, n_users=50, n_items=40, seed=4)
    frame = make_frame(300, n_users=100, n_items=80, seed=5)  # users and items beyond train's: OOV
    encoder = FeatureEncoder.fit(config.features, train)
    encoded = encoder.encode(frame)
    assert (encoded["item_id"] == OOV_ID).any() and (encoded["item_id"] != OOV_ID).any()
    rows = RowDataset(frame, encoder)
    collated = default_collate([rows[i] for i in range(len(frame))])
    assert collated.keys() == {k for k in encoded if k != "group"}
    for key, value in collated.items():
        assert torch.allclose(value.to(encoded[key].dtype), encoded[key], atol=1e-5), key
    torch.manual_seed(0)
    model = build_model("dlrm", config.dlrm, encoder)
    loss = model.loss(default_collate([rows[i] for i in range(64)]))  # the benchmark's reference batches
    loss.backward()
    assert torch.isfinite(loss)
