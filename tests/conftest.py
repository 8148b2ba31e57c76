"""Shared fixtures: a tiny generated dataset, built once per session in a temp directory."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest
import yaml
from pydantic import BaseModel

from models.registry import MODEL_KINDS
from tests.docker_images import docker_client, images  # noqa: F401  (fixtures: Docker, the built images)
from tests.s3_server import s3_env, s3_server  # noqa: F401  (fixtures: a real S3 server on loopback)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FEAST_USAGE", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]

_Model = TypeVar("_Model", bound=BaseModel)


@functools.cache
def _shipped():
    from recsys.config import load_params

    return load_params(REPO_ROOT / "params.yaml")


def shipped_params():
    """A fresh copy of the shipped params.yaml: tests start from it and override only what they test (the
    schema has no defaults, so there is no other configuration to start from)."""
    return _shipped().model_copy(deep=True)


def offline_serving_params():
    """The shipped params with the online store off: the serving tests answer from the bundle alone."""
    params = shipped_params()
    params.serving.online_store = False
    return params


def request_log_config(uri: Path | str, **changes: Any):
    """A request log into ``uri`` that writes only when told (flush) unless ``changes`` say otherwise."""
    from recsys.config import RequestLogConfig

    values = {
        "enabled": True,
        "uri": str(uri),
        "flush_rows": 1000,
        "flush_interval_s": 60.0,
        "max_buffer_rows": 10_000,
        "feature_sample": 1.0,
        "retention_days": 0,
    }
    return RequestLogConfig(**(values | changes))


def write_params(path: Path, changes: dict[str, Any]) -> Path:
    """The shipped params.yaml with ``changes`` (dotted key -> value; a section's key replaces the whole
    section) written to ``path``, for the CLIs that read a params file."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def revalidated(section: _Model, **changes: Any) -> _Model:
    """``section`` with ``changes`` applied and validated again (``model_copy(update=...)`` does not
    validate), e.g. ``revalidated(shipped_params().index, hnsw_m=16)``."""
    return type(section).model_validate(section.model_dump() | changes)


@pytest.fixture(scope="session")
def tiny_params():
    """The project's params.yaml with the tiny synthetic preset (seconds to generate)."""
    from recsys.config import load_params

    return load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "tiny"})


@pytest.fixture(scope="session")
def tiny_raw_dir(tiny_params, tmp_path_factory) -> Path:
    from components import ingest

    raw_dir = tmp_path_factory.mktemp("raw")
    ingest.run(tiny_params.data, tiny_params.seed, raw_dir)
    return raw_dir


@pytest.fixture(scope="session")
def tiny_raw(tiny_raw_dir) -> dict[str, pd.DataFrame]:
    from recsys.contracts import read_raw_tables

    return read_raw_tables(tiny_raw_dir)


@pytest.fixture(scope="session")
def tiny_features_dir(tiny_params, tiny_raw_dir, tmp_path_factory) -> Path:
    from components import features

    out = tmp_path_factory.mktemp("features")
    features.run(tiny_params.features, tiny_raw_dir, out)
    return out


@contextmanager
def pipeline_workdir(root: Path) -> Iterator[None]:
    """Run steps in ``root`` with the project's Feast repo copied in, so the registry and the SQLite online
    store live there and never touch the checkout's."""
    shutil.copytree(REPO_ROOT / "feature_repo", root / "feature_repo", ignore=shutil.ignore_patterns("data"))
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(previous)


def build_training_sets(params, validate: bool = False) -> None:
    """The real data steps in the current directory, on the layout's paths: ingest, features and the
    Feast training sets, with the great-expectations gates on the raw tables and the training sets when
    ``validate``."""
    from components import features, ingest, training_set
    from components import validate as validation
    from recsys import artifact_layout as layout

    ingest.run(params.data, params.seed, layout.RAW_DIR)
    features.run(params.features, layout.RAW_DIR, layout.FEATURES_DIR)
    if validate:
        validate_target(validation, params, "raw", layout.RAW_DIR)
    training_set.run(
        params.training_set,
        layout.FEATURES_DIR,
        layout.RAW_DIR,
        layout.TRAINING_DIR,
        feast=params.feast,
        features=params.features,
        metrics_file=layout.TRAINING_SET_STATS,
        report_file=layout.TRAINING_SET_REPORT,
    )
    if validate:
        validate_target(validation, params, "training", layout.TRAINING_DIR)


def validate_target(validation, params, target: str, data_dir: Path) -> dict[str, Any]:
    """The validate step on ``target`` with the layout's report folder and summary file."""
    from recsys import artifact_layout as layout

    return validation.run(
        params.validation,
        target,
        data_dir,
        report_dir=layout.validation_docs(target),
        summary_file=layout.validation_summary(target),
    )


def train_and_evaluate(params) -> dict[str, Any]:
    """Every model trained and evaluated in the current directory, on the layout's paths; returns the
    evaluation report."""
    from components import evaluate, train
    from recsys import artifact_layout as layout
    from recsys.step_contract import STEPS

    for kind in MODEL_KINDS:
        train.run(
            kind,
            STEPS["train"].scope(params),
            layout.TRAINING_DIR,
            layout.model_dir(kind),
            layout.model_metrics(kind),
            layout.model_plot(kind),
        )
    return evaluate.run(
        STEPS["evaluate"].scope(params),
        layout.TRAINING_DIR,
        layout.MODELS_DIR,
        layout.FEATURES_DIR,
        layout.EVALUATION,
    )


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The whole local DAG on the tiny preset, run step by step in its own working directory.

    Returns the working directory; the bundle is in ``artifacts/bundle``. Steps are the real ones: Feast,
    great-expectations, torch training, FAISS.
    """
    from components import build_index, bundle, export, gate
    from models.registry import RETRIEVAL_MODEL
    from recsys import artifact_layout as layout
    from recsys.config import load_params
    from recsys.step_contract import STEPS

    root = tmp_path_factory.mktemp("pipeline")
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    with pipeline_workdir(root):
        params = load_params(
            "params.yaml",
            overrides={"data.synthetic.preset": "tiny", "training.epochs": 3, "index.tune_queries": 200},
        )
        build_training_sets(params, validate=True)
        train_and_evaluate(params)
        export.run(
            STEPS["export"].scope(params),
            layout.TRAINING_DIR,
            layout.model_dir(RETRIEVAL_MODEL),
            layout.FEATURES_DIR,
            layout.EMBEDDINGS_DIR,
            layout.EXPORT_DIR / layout.POPULAR_ITEMS,
        )
        index_paths = STEPS["build_index"].reads | STEPS["build_index"].writes
        build_index.run(params.index, params.seed, **index_paths)
        bundle.run("params.yaml", layout.EVALUATION, layout.BUNDLE_DIR, layout.bundle_members())
        gate.run(params.gate, metrics_file=layout.EVALUATION, output=layout.GATE_DECISION)
    return root


def small_serving_bundle(params, directory: Path) -> Path:
    """The serving tests' bundle: 60 users, 80 items, 1,000 events of tests/synthetic_bundle.py's
    synthetic frame, every model trained on it briefly."""
    from tests.synthetic_bundle import build_serving_bundle, item_catalogue, synthetic_training_frame

    train = synthetic_training_frame(60, 80, 1_000, params.features.stats_windows_days, seed=1)
    item_cols = ["item_id", "category", "brand", "price"] + [
        c for c in train.columns if c.startswith("item_") and c != "item_id"
    ]
    catalogue = item_catalogue(train, item_cols)
    return build_serving_bundle(train, catalogue, params, directory / "bundle", directory / "work")


@pytest.fixture(scope="module")
def production_isvc() -> dict[str, Any]:
    """The InferenceService as the operator applied it: the production overlay, generation 3 (the rollout
    and guardrail tests patch it on their simulated clusters)."""
    from recsys.manifest_schemas import render_kustomization

    try:
        objects = render_kustomization(REPO_ROOT / "manifests" / "overlays" / "production")
    except FileNotFoundError:
        pytest.skip("kubectl not installed (renders the production overlay)")
    (isvc,) = [o for o in objects if o["kind"] == "InferenceService"]
    return isvc | {"metadata": isvc["metadata"] | {"generation": 3}}
