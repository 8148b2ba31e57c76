"""The contract every model of the package keeps, so one trainer, one saver and one evaluator fit all.

A model is built from ``(encoder, config)`` alone (``models.registry.build_model``), which is what lets
``load_model`` rebuild it from ``config.json`` without pickle.

A concrete model class declares, once, what the rest of the project needs to know of it: its ``kind``
(the params.yaml key under ``models:`` and the artifact folder name), its ``config_class``, its ``task``
(which training set it learns from: ``retrieval`` or ``ranking``), its default early-stopping metric and
the extra inputs it fits from the training rows (``fit_inputs``). Defining the class registers it
(``models/registry.py`` derives the kinds, the ``models:`` section and the builders from these).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from models.batch import DENSE_KEY, GROUP_KEY, LABEL_KEY, LENGTH_SUFFIX, Batch
from models.config import ModelSection
from models.encoding import FeatureEncoder

Task = Literal["retrieval", "ranking"]
TASKS: tuple[Task, ...] = ("retrieval", "ranking")  # the training sets (Feast feature services)

# kind -> class, in definition order; filled by RecModel.__init_subclass__, read by models/registry.py
DECLARED: dict[str, type[RecModel]] = {}


class RecModel(nn.Module, ABC):
    """Base of the two-tower and the rankers: a training loss and validation metrics on a batch."""

    kind: ClassVar[str]  # set on concrete classes only: the params.yaml section and artifact name
    config_class: ClassVar[type[ModelSection]]
    task: ClassVar[Task]
    fit_inputs: ClassVar[tuple[str, ...]] = ()  # constructor arguments fitted on the training rows

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:  # an abstract base (Ranker) declares no kind
            return
        for attr in ("config_class", "task"):
            if not hasattr(cls, attr):
                raise TypeError(f"model class {cls.__name__} (kind '{cls.kind}') must declare {attr}")
        if cls.task not in TASKS:
            raise TypeError(f"model class {cls.__name__}: task '{cls.task}' is not one of {list(TASKS)}")
        other = DECLARED.get(cls.kind)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"model kind '{cls.kind}' is declared twice: {other.__name__} and {cls.__name__}")
        DECLARED[cls.kind] = cls

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

    @classmethod
    @abstractmethod
    def default_metric(cls, k: int) -> str:
        """The early-stopping (and search) metric when the config says ``auto``; ``k``: ``eval_k``."""

    @classmethod
    def fitted_inputs(cls, encoder: FeatureEncoder, train_df: pd.DataFrame) -> dict[str, np.ndarray]:
        """The ``fit_inputs`` constructor arguments computed from the training rows (none by default)."""
        return {}

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
