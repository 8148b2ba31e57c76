"""The throughput benchmark compares like with like: its per-row reference builds the encoder's tensors."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from benchmarks.train_throughput import RowDataset, make_training_frame, reference_samples_per_second
from models.build import build_model
from models.encoding import FeatureEncoder
from tests.models.conftest import shipped_models_config


def test_reference_rows_equal_the_vectorised_encoding():
    config = shipped_models_config()
    frame = make_training_frame(300, seed=4, n_users=50, n_items=40)
    encoder = FeatureEncoder.fit(config.features, frame.iloc[:200])  # rows 200+ hold unseen values
    encoded = encoder.encode(frame)
    rows = RowDataset(frame, encoder)
    collated = default_collate([rows[i] for i in range(len(frame))])
    assert collated.keys() == {k for k in encoded if k != "group"}
    for key, value in collated.items():
        assert torch.allclose(value.to(encoded[key].dtype), encoded[key], atol=1e-5), key
    torch.manual_seed(0)
    model = build_model("dlrm", config.dlrm, encoder)
    assert reference_samples_per_second(model, rows, batch_size=64, batches=2) > 0
