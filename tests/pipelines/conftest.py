"""Shared by the pipeline tests: the project's params.yaml, loaded once per module."""

from __future__ import annotations

import pytest

from recsys.config import load_params
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def params():
    return load_params(REPO_ROOT / "params.yaml")
