"""Shared fixtures: a tiny generated dataset, built once per session in a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("FEAST_USAGE", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_params():
    """The project's params.yaml with the tiny synthetic preset (seconds to generate)."""
    from components.config import load_params

    return load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "tiny"})


@pytest.fixture(scope="session")
def tiny_raw_dir(tiny_params, tmp_path_factory) -> Path:
    from components import ingest

    raw_dir = tmp_path_factory.mktemp("raw")
    ingest.run(tiny_params.data, tiny_params.seed, raw_dir)
    return raw_dir


@pytest.fixture(scope="session")
def tiny_raw(tiny_raw_dir) -> dict[str, pd.DataFrame]:
    from components.contracts import read_raw_tables

    return read_raw_tables(tiny_raw_dir)


@pytest.fixture(scope="session")
def tiny_features_dir(tiny_params, tiny_raw_dir, tmp_path_factory) -> Path:
    from components import features

    out = tmp_path_factory.mktemp("features")
    features.run(tiny_params.features, tiny_raw_dir, out)
    return out
