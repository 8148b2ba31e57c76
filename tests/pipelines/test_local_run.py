"""The whole DAG through kfp.local (pipelines/local_run.py) on the tiny preset (slow)."""

from __future__ import annotations

import json

import pytest

from models.registry import MODEL_KINDS
from recsys.config import load_params
from tests.conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_run_local_end_to_end_on_the_tiny_preset(tmp_path):
    from pipelines.local_run import run_local
    from recsys.bundle_manifest import load_manifest
    from serving.bundle import load_bundle

    overrides = {"training.epochs": 1, "search.enabled": True, "search.trials": 1}  # the optional branch too
    own_store = _feast_files()
    bundle = run_local(REPO_ROOT / "params.yaml", preset="tiny", pipeline_root=tmp_path, overrides=overrides)
    # the run had its own Feast store: the one `dvc repro` filled and serving reads is untouched (a tiny
    # run used to overwrite users 1-400 there, which the monitor's skew check found)
    assert _feast_files() == own_store
    assert (tmp_path / "feast" / "online_store.db").is_file()
    manifest = load_manifest(bundle)  # every checksum verified
    assert manifest["metrics"]["retrieval"] and manifest["metrics"]["ranking"]  # evaluation travelled along
    served = load_bundle(bundle, load_params(REPO_ROOT / "params.yaml").serving.default_ranker)
    assert served.version == manifest["version"]  # the serving code loads what the DAG produced
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "feast"]
    rendered = list(run_dir.rglob("manifest"))  # deploy's dry-run InferenceService, when the gate passed
    gate = json.loads(next(run_dir.rglob("gate/decision")).read_text())
    assert bool(rendered) == gate["passed"]
    search = json.loads(next(run_dir.rglob("search/search")).read_text())
    assert search["enabled"] is True and set(search["studies"]) == set(MODEL_KINDS)


def _feast_files() -> dict[str, tuple[int, int]]:
    """(mtime ns, size) of each file of the repository's own Feast store (registry, online store)."""
    folder = REPO_ROOT / "feature_repo" / "data"
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*") if p.is_file()}
