"""PyTorch recommender models: feature encoding, two-tower retrieval, MultiTower / MultiTowerDIN / DLRM
rankers, one trainer, metrics and safetensors serialisation. Knows nothing of KFP, DVC, Feast or KServe.

Typical use (what components/train.py does)::

    encoder = FeatureEncoder.fit(params.models.features, train_df)    # train split only
    train, valid = encoder.encode(train_df), encoder.encode(valid_df)
    fitted = model_class(kind).fitted_inputs(encoder, train_df)        # e.g. log-Q item frequencies
    model = build_model(kind, params.models.model(kind), encoder, **fitted)
    result = fit(model, train, valid, params.training, checkpoint_dir=...)
    save_model(model, encoder, params.models.model(kind), out_dir)
    write_history_csv(result.history, out_dir / "history.csv")

The names below are loaded on first use. The model kinds and the ``models:`` section come from the model
classes (``models/registry.py``), so reading params.yaml imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "models.registry": [
        "MODELS",
        "MODEL_KINDS",
        "ModelsConfig",
        "RANKERS",
        "RETRIEVAL_MODEL",
        "TASK_OF",
        "build_model",
        "initial_model",
        "model_class",
    ],
    "models.config": [
        "DLRMConfig",
        "FeatureGroup",
        "FeatureSpec",
        "ModelConfigError",
        "MultiTowerConfig",
        "MultiTowerDINConfig",
        "TrainingConfig",
        "TwoTowerConfig",
    ],
    "models.embedding": ["EmbeddingGroup"],
    "models.encoding": ["FeatureEncoder"],
    "models.metrics": [
        "ItemSets",
        "auc",
        "full_catalogue_topk",
        "gauc",
        "logloss",
        "ranking_metrics",
        "retrieval_metrics",
    ],
    "models.model": ["RecModel"],
    "models.architectures.ranking": ["DLRM", "MultiTower", "MultiTowerDIN", "Ranker"],
    "models.architectures.retrieval": ["TwoTower"],
    "models.serialization": ["load_model", "save_model"],
    "models.trainer": ["TrainingResult", "fit", "write_history_csv"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'models' has no attribute '{name}'")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
