"""The contract every model of the package keeps, so one trainer, one saver and one evaluator fit all.

A model is built from ``(encoder, config)`` alone (``models.build.build_model``), which is what lets
``load_model`` rebuild it from ``config.json`` without pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import nn

from models.batch import DENSE_KEY, GROUP_KEY, LABEL_KEY, LENGTH_SUFFIX, Batch
from models.config import ModelSection
from models.encoding import FeatureEncoder


class RecModel(nn.Module, ABC):
    """Base of the two-tower and the rankers: a training loss and validation metrics on a batch."""

    kind: ClassVar[str]

    def __init__(self, encoder: FeatureEncoder, config: ModelSection) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config

    @abstractmethod
    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch."""

    @abstractmethod
    def validation_metrics(
        self, data: Mapping[str, torch.Tensor], batch_size: int, k: int = 50
    ) -> dict[str, float]:
        """Metrics on a whole encoded split (eval mode, no gradients), used for early stopping; ``k`` is
        the cut-off of retrieval metrics."""

    @abstractmethod
    def default_metric(self, k: int) -> str:
        """The early-stopping metric when the config says ``auto``."""

    @abstractmethod
    def feature_names(self) -> list[str]:
        """The features the model reads (what an encoder must produce for it)."""

    def prepare(self, train: Mapping[str, torch.Tensor]) -> None:
        """Called by the trainer once with the encoded training set before the first epoch."""

    def input_keys(self) -> list[str]:
        """Batch keys the model reads: its features, their lengths, dense, label and group."""
        spec = self.encoder.spec
        keys = []
        for name in self.feature_names():
            kind = spec.kind_of(name)
            if kind == "sparse":
                keys.append(name)
            elif kind == "sequence":
                keys += [name, name + LENGTH_SUFFIX]
        return [*keys, DENSE_KEY, LABEL_KEY, GROUP_KEY]


def eval_batches(data: Mapping[str, torch.Tensor], batch_size: int, device: torch.device) -> Iterator[Batch]:
    """Consecutive slices of an encoded split, moved to ``device``."""
    n = int(next(iter(data.values())).shape[0])
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size].to(device, non_blocking=True) for k, v in data.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
