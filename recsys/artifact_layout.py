"""The one layout: where every local file of the DAG lives (data, metrics, reports, plots, models, the
bundle, local pipeline runs), relative to the project root, and the bundle's member names.

Steps take their paths as arguments (no defaults); their CLIs default to these, through the step
contracts (recsys/step_contract.py), whose ``reads``/``writes`` dvc.yaml is checked against. The Kubeflow
wrappers put the same files into KFP artifacts instead; serving's bundle reader uses the member names.
params.yaml holds no local path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from models.registry import MODEL_KINDS
from recsys.ann_index import SIDECAR_SUFFIX

DATA = Path("data")
RAW_DIR = DATA / "raw"  # ingest: {users,items,events}.parquet
FEATURES_DIR = DATA / "features"  # features: the Feast file sources' tables
TRAINING_DIR = DATA / "training"  # training_set: {retrieval,ranking}_{train,valid,test}.parquet + manifest
METRICS_DIR = Path("metrics")  # every DVC metrics file
REPORTS_DIR = Path("reports")
VALIDATION_DIR = REPORTS_DIR / "validation"  # validate: Data Docs per target, <target>_summary.json
PLOTS_DIR = Path("plots")  # train: a PNG of each model's history

TRAINING_SET_STATS = METRICS_DIR / "training_set.json"
TRAINING_SET_REPORT = REPORTS_DIR / "training_set.md"
SEARCH_REPORT = METRICS_DIR / "search.json"
OPE_REPORT = METRICS_DIR / "ope.json"  # components/ope.py writes it, the gate reads it (gate.ope)
EVALUATION = METRICS_DIR / "evaluation.json"
INDEX_METRICS = METRICS_DIR / "index.json"
GATE_DECISION = METRICS_DIR / "gate.json"
MONITOR_REPORT = METRICS_DIR / "monitor.json"  # monitor: checks of the served traffic
MONITOR_GAUGES = METRICS_DIR / "monitor.prom"  # ... as Prometheus gauges (textfile collector format)
INDEX_REFRESH_REPORT = METRICS_DIR / "index_refresh.json"  # index_refresh: what joined the index
MONITOR_PAGE = REPORTS_DIR / "monitor.html"
MONITOR_DOCS = REPORTS_DIR / "monitor_expectations"  # the served-feature suite's Data Docs

ARTIFACTS = Path("artifacts")
MODELS_DIR = ARTIFACTS / "models"  # <kind>/{model.safetensors,config.json,history.csv}
EMBEDDINGS_DIR = ARTIFACTS / "embeddings"  # export: item and validation-user embeddings
EXPORT_DIR = ARTIFACTS / "export"  # export: the cold-start popular items
INDEX_DIR = ARTIFACTS / "index"  # build_index: the FAISS index and its sidecar
BUNDLE_DIR = ARTIFACTS / "bundle"  # bundle: what serving loads, with its manifest
REFRESHED_BUNDLE_DIR = ARTIFACTS / "bundle-refreshed"  # index_refresh: the bundle grown by new items
KFP_LOCAL_DIR = ARTIFACTS / "kfp-local"  # run-local: the pipeline root of kfp.local runs
INFERENCE_SERVICE = ARTIFACTS / "deploy" / "inferenceservice.yaml"  # deploy --dry-run: the rendered YAML

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


def model_metrics(kind: str) -> Path:
    """The train step's metrics file of model ``kind``."""
    return METRICS_DIR / f"{kind}.json"


def model_plot(kind: str) -> Path:
    """The train step's history plot of model ``kind``."""
    return PLOTS_DIR / f"{kind}.png"


def validation_summary(target: str) -> Path:
    """The validate step's summary of ``target`` (``raw`` or ``training``)."""
    return VALIDATION_DIR / f"{target}_summary.json"


def validation_docs(target: str) -> Path:
    """The validate step's Data Docs folder of ``target``."""
    return VALIDATION_DIR / target


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
