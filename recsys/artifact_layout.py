"""Where every model artifact lives: the local (DVC) folders under ``artifacts/`` and the bundle's members.

The steps' defaults, the bundle step's member list, the Kubeflow wrappers (which put each folder's files
into a KFP artifact instead) and serving's bundle reader all take their paths from here. dvc.yaml spells
the same folders for DVC; a test checks it against this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from models.registry import MODEL_KINDS
from recsys.ann_index import SIDECAR_SUFFIX

ARTIFACTS = Path("artifacts")
MODELS_DIR = ARTIFACTS / "models"  # <kind>/{model.safetensors,config.json,history.csv}
EMBEDDINGS_DIR = ARTIFACTS / "embeddings"  # export: item and validation-user embeddings
EXPORT_DIR = ARTIFACTS / "export"  # export: the cold-start popular items
INDEX_DIR = ARTIFACTS / "index"  # build_index: the FAISS index and its sidecar
BUNDLE_DIR = ARTIFACTS / "bundle"  # bundle: what serving loads, with its manifest

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_FILES = (MODEL_WEIGHTS, MODEL_CONFIG)  # what serving needs of a trained model
ITEM_EMBEDDINGS = "item_embeddings.safetensors"
QUERY_EMBEDDINGS = "user_embeddings_valid.safetensors"  # tunes the index's search parameter
POPULAR_ITEMS = "popular_items.json"
INDEX = "items.faiss"
INDEX_SIDECAR = INDEX + SIDECAR_SUFFIX
BUNDLE_MODELS = "models"  # a bundle holds each model under models/<kind>/


def model_dir(kind: str, models_dir: str | Path = MODELS_DIR) -> Path:
    """Where the train step writes model ``kind``."""
    return Path(models_dir) / kind


def bundle_model_file(kind: str, name: str) -> str:
    """The bundle member name of one of a model's files."""
    return f"{BUNDLE_MODELS}/{kind}/{name}"


def bundle_members(
    *,
    model_dirs: Mapping[str, str | Path] | None = None,
    embeddings_dir: str | Path = EMBEDDINGS_DIR,
    export_dir: str | Path = EXPORT_DIR,
    index_dir: str | Path = INDEX_DIR,
) -> dict[str, Path]:
    """Bundle member name -> the file to copy: every model's files, the item embeddings, the index and
    its sidecar, the popular items. ``model_dirs`` maps kind -> folder (default: the local layout)."""
    model_dirs = model_dirs or {kind: model_dir(kind) for kind in MODEL_KINDS}
    missing = set(MODEL_KINDS) - set(model_dirs)
    if missing:
        raise ValueError(f"bundle: no model folder for {sorted(missing)}")
    members = {
        bundle_model_file(kind, name): Path(model_dirs[kind]) / name
        for kind in MODEL_KINDS
        for name in MODEL_FILES
    }
    members[ITEM_EMBEDDINGS] = Path(embeddings_dir) / ITEM_EMBEDDINGS
    members[POPULAR_ITEMS] = Path(export_dir) / POPULAR_ITEMS
    members[INDEX] = Path(index_dir) / INDEX
    members[INDEX_SIDECAR] = Path(index_dir) / INDEX_SIDECAR
    return members
