"""The model registry: every model kind, derived from the model classes' own declarations.

A model class declares its kind, config class, task, default metric and fitted inputs once
(``models/model.py``); importing every module of ``models/architectures/`` registers them. Everything that
needs to know which models exist (the ``models:`` section of params.yaml, the train, search, evaluate and
export steps, the Kubeflow DAG, the bundle, serving) reads it from here, so adding a model is one module
in ``models/architectures/`` plus its ``models.<kind>`` section in params.yaml.

The kinds are ordered retrieval first, then in declaration order (module name, then class order).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import create_model

import models.architectures
from models.config import ModelConfigError, ModelSection, ModelsSection, TrainingConfig
from models.encoding import FeatureEncoder
from models.model import DECLARED, RecModel, Task


def _discover() -> dict[str, type[RecModel]]:
    for module in sorted(pkgutil.iter_modules(models.architectures.__path__), key=lambda m: m.name):
        importlib.import_module(f"{models.architectures.__name__}.{module.name}")
    if not DECLARED:
        raise RuntimeError("models/architectures/ declares no model class")
    # stable: retrieval first, each task's kinds in declaration order
    return {kind: DECLARED[kind] for kind in sorted(DECLARED, key=lambda k: DECLARED[k].task != "retrieval")}


MODELS: dict[str, type[RecModel]] = _discover()
MODEL_KINDS: tuple[str, ...] = tuple(MODELS)
TASK_OF: dict[str, Task] = {kind: cls.task for kind, cls in MODELS.items()}
RANKERS: tuple[str, ...] = tuple(kind for kind, task in TASK_OF.items() if task == "ranking")
_RETRIEVAL = [kind for kind, task in TASK_OF.items() if task == "retrieval"]
if len(_RETRIEVAL) != 1:  # export, the index and serving embed items with the one retrieval model
    raise RuntimeError(f"exactly one retrieval model is supported, declared: {_RETRIEVAL}")
RETRIEVAL_MODEL: str = _RETRIEVAL[0]

# the ``models:`` section of params.yaml: the features plus one section per kind, typed by its config class
ModelsConfig: type[ModelsSection] = create_model(  # type: ignore[call-overload]
    "ModelsConfig",
    __base__=ModelsSection,
    __doc__="The ``models:`` section: the shared feature declarations and one config per model kind.",
    **{kind: (cls.config_class, ...) for kind, cls in MODELS.items()},
)


def model_class(kind: str) -> type[RecModel]:
    """The class of ``kind``; an unknown kind is an error naming the known ones."""
    if kind not in MODELS:
        raise ModelConfigError(f"unknown model kind '{kind}'; expected one of {list(MODEL_KINDS)}")
    return MODELS[kind]


def default_metric(kind: str, training: TrainingConfig) -> str:
    """The metric a model of ``kind`` is early-stopped and searched on under this training section."""
    if training.early_stopping_metric != "auto":
        return training.early_stopping_metric
    return model_class(kind).default_metric(training.eval_k)


def build_model(
    kind: str,
    config: ModelSection | Mapping[str, Any],
    encoder: FeatureEncoder,
    **fitted: np.ndarray | None,
) -> RecModel:
    """A fresh model of ``kind``; ``config`` is its config object or a mapping of it (from JSON).

    ``fitted`` holds the class's ``fit_inputs`` (e.g. the two-tower's ``item_counts``, the training
    occurrences per encoded item id for log-Q correction); None stands for not given; a name the class
    does not fit is an error.
    """
    cls = model_class(kind)
    fitted = {name: value for name, value in fitted.items() if value is not None}
    unknown = set(fitted) - set(cls.fit_inputs)
    if unknown:
        raise ModelConfigError(
            f"model kind '{kind}' fits no input(s) {sorted(unknown)}; it fits {list(cls.fit_inputs)}"
        )
    if not isinstance(config, cls.config_class):
        if isinstance(config, ModelSection):
            raise ModelConfigError(
                f"model kind '{kind}' needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        config = cls.config_class.model_validate(dict(config))
    return cls(encoder, config, **fitted)  # type: ignore[call-arg]


def initial_model(
    kind: str, models: ModelsSection, training: TrainingConfig, train_df: pd.DataFrame
) -> tuple[FeatureEncoder, RecModel, TrainingConfig]:
    """What a training run of ``kind`` starts from: the encoder fitted on ``train_df``, the model seeded
    with its training section's seed (the initial weights too, not just the batches: same seed, same
    model) and that section. Shared by the train step and the search step's trials, so a trial of
    params.yaml's own configuration is the model the train step trains."""
    return seeded_model(kind, models.features, models.model(kind), training, train_df)


def seeded_model(
    kind: str,
    features: Any,
    config: ModelSection | Mapping[str, Any],
    training: TrainingConfig,
    train_df: pd.DataFrame,
) -> tuple[FeatureEncoder, RecModel, TrainingConfig]:
    """:func:`initial_model` from a feature spec and a model config given directly (params.yaml's, or a
    saved model's ``config.json``: the evaluate step re-trains the two-tower's train-only twin from it)."""
    import torch

    encoder = FeatureEncoder.fit(features, train_df)
    training = training.for_model(kind)
    fitted = model_class(kind).fitted_inputs(encoder, train_df)
    torch.manual_seed(training.seed)
    return encoder, build_model(kind, config, encoder, **fitted), training


def initial_model_streamed(
    kind: str, models: ModelsSection, training: TrainingConfig, paths: Sequence[str | Path]
) -> tuple[FeatureEncoder, RecModel, TrainingConfig]:
    """:func:`initial_model` for a split left in the Parquet files ``paths`` (the streaming loader):
    the encoder is fitted one row group at a time (``FeatureEncoder.fit_parquet``: the same encoder as
    the in-memory fit of those rows) and the model's fitted inputs, counts per id (the two-tower's log-Q
    item frequencies), are summed over the row groups, so memory does not grow with the rows."""
    import torch

    from models.encoding import iter_row_groups

    encoder = FeatureEncoder.fit_parquet(models.features, paths)
    training = training.for_model(kind)
    fitted: dict[str, np.ndarray] = {}
    for part in iter_row_groups(paths, [*models.features.names, encoder.label_column]):
        for name, value in model_class(kind).fitted_inputs(encoder, part).items():
            fitted[name] = value if name not in fitted else fitted[name] + value
    torch.manual_seed(training.seed)
    return encoder, build_model(kind, models.model(kind), encoder, **fitted), training
