"""The per-row reference of ``FeatureEncoder.encode``: one row's tensors built in plain Python.

It states what the vectorised encoder must produce (vocabulary lookups with OOV, most-recent history
truncated and zero-padded, log1p and standardised dense values), so tests/models/test_train_throughput.py
checks the encoder against it; benchmarks/train_throughput.py times it as the seed-style input path the
trainer is compared with. It lives here, not in benchmarks/, because tests never import benchmarks.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from models.batch import DENSE_KEY, FIRST_ID, LABEL_KEY, LENGTH_SUFFIX, OOV_ID
from models.encoding import FeatureEncoder


class RowDataset(Dataset):
    """The seed-style input path: one row at a time, tensors built in Python per row.

    Columns are pulled out of the frame once (as plain lists / numpy arrays), the fair version of this
    pattern; the usual ``df.iloc[i]`` per row would be several times slower still.
    """

    def __init__(self, frame: pd.DataFrame, encoder: FeatureEncoder) -> None:
        spec = encoder.spec
        self.sparse = {
            f.name: (
                frame[f.name].tolist(),
                {v: i + FIRST_ID for i, v in enumerate(encoder.vocabs[f.name].tolist())},
            )
            for f in spec.sparse
        }
        self.sequences = {
            f.name: (frame[f.name].tolist(), self.sparse[f.shares][1], f.max_length) for f in spec.sequence
        }
        self.dense = [
            (frame[f.name].to_numpy(np.float64), f.transform == "log1p", *encoder.dense_stats[f.name])
            for f in spec.dense
        ]
        self.labels = frame["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row: dict[str, torch.Tensor] = {}
        for name, (values, vocab) in self.sparse.items():
            row[name] = torch.tensor(vocab.get(values[i], OOV_ID), dtype=torch.int64)
        for name, (values, vocab, max_length) in self.sequences.items():
            history = list(values[i])[-max_length:]
            ids = [vocab.get(v, OOV_ID) for v in history]
            row[name] = torch.tensor(ids + [0] * (max_length - len(ids)), dtype=torch.int64)
            row[name + LENGTH_SUFFIX] = torch.tensor(len(ids), dtype=torch.int64)
        dense = []
        for values, log1p, mean, std in self.dense:
            x = float(values[i])
            dense.append(((math.log1p(max(x, 0.0)) if log1p else x) - mean) / std)
        row[DENSE_KEY] = torch.tensor(dense, dtype=torch.float32)
        row[LABEL_KEY] = torch.tensor(float(self.labels[i]), dtype=torch.float32)
        return row
