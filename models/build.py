"""Build a model of a named kind from its config and the fitted feature encoder (no pickle needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import CONFIG_CLASSES, ModelConfigError, ModelSection
from models.encoding import FeatureEncoder
from models.kinds import MODEL_KINDS
from models.model import RecModel
from models.ranking import DLRM, MultiTower, MultiTowerDIN
from models.retrieval import TwoTower

MODEL_CLASSES: dict[str, type[RecModel]] = {
    "two_tower": TwoTower,
    "multi_tower": MultiTower,
    "multi_tower_din": MultiTowerDIN,
    "dlrm": DLRM,
}


def build_model(
    kind: str,
    config: ModelSection | Mapping[str, Any],
    encoder: FeatureEncoder,
    item_counts: np.ndarray | None = None,
) -> RecModel:
    """A fresh model of ``kind``; ``config`` is its config object or a mapping of it (from JSON).

    ``item_counts`` (training occurrences per encoded item id) is used by the two-tower's log-Q
    correction and ignored by the rankers.
    """
    if kind not in MODEL_KINDS:
        raise ModelConfigError(f"unknown model kind '{kind}'; expected one of {list(MODEL_KINDS)}")
    config_class = CONFIG_CLASSES[kind]
    if not isinstance(config, config_class):
        if isinstance(config, ModelSection):
            raise ModelConfigError(
                f"model kind '{kind}' needs a {config_class.__name__}, got {type(config).__name__}"
            )
        config = config_class.model_validate(dict(config))
    if kind == "two_tower":
        return TwoTower(encoder, config, item_counts=item_counts)  # type: ignore[arg-type]
    return MODEL_CLASSES[kind](encoder, config)  # type: ignore[call-arg]
