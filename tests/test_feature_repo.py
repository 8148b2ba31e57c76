"""The Feast repo: definitions mirror the feature tables, services name the models' features, configs load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from feast import FeatureStore
from feast.repo_config import RegistryConfig, load_repo_config

from recsys import feature_store
from recsys.config import load_params
from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    HISTORY_FEATURES,
    ITEM_PROFILE_FEATURES,
    USER_PROFILE_FEATURES,
    stats_features,
)
from tests.conftest import revalidated
from tests.feast_fixtures import REPO_ROOT, copy_feature_repo

PARAMS = load_params(REPO_ROOT / "params.yaml")
CONTRACT_FEATURES = {
    "user_profile": USER_PROFILE_FEATURES,
    "user_history": HISTORY_FEATURES,
    "user_stats": stats_features("user", PARAMS.features.stats_windows_days),
    "item_profile": ITEM_PROFILE_FEATURES,
    "item_stats": stats_features("item", PARAMS.features.stats_windows_days),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return feature_store.feature_repo(PARAMS.feast, PARAMS.features, tmp_path_factory.mktemp("features"))


def test_views_mirror_the_feature_tables_with_ttls_from_params(repo):
    assert set(repo.views) == set(FEATURE_TABLE_KEYS) == set(CONTRACT_FEATURES)
    for name, view in repo.views.items():
        assert [f.name for f in view.features] == CONTRACT_FEATURES[name]
        assert view.entities == [FEATURE_TABLE_KEYS[name].removesuffix("_id")]
        assert view.ttl == timedelta(days=getattr(PARAMS.feast.ttl_days, name))
        assert view.batch_source.timestamp_field == "event_timestamp"
        assert (
            view.batch_source.path.endswith(f"{name}.parquet") and Path(view.batch_source.path).is_absolute()
        )
    assert {e.name: e.join_key for e in repo.entities.values()} == {"user": "user_id", "item": "item_id"}
    assert repo.views["user_stats"].ttl < timedelta(days=3) < repo.views["user_history"].ttl


def test_services_name_exactly_the_features_the_models_consume(repo):
    """Every non-id feature in the models' config comes from the service, and nothing else does."""
    spec = PARAMS.models.features
    model_features = {f.name for f in [*spec.sparse, *spec.sequence, *spec.dense]} - {"user_id", "item_id"}
    all_features = {name for names in CONTRACT_FEATURES.values() for name in names}
    for name in ("retrieval", "ranking"):
        refs = {f.name for p in repo.services[name].feature_view_projections for f in p.features}
        assert refs == all_features == model_features, name
    two_tower = {f for g in PARAMS.models.two_tower.feature_groups for f in g.features} - {
        "user_id",
        "item_id",
    }
    assert two_tower <= all_features


def test_stats_features_follow_the_configured_windows(tmp_path):
    features = PARAMS.features.model_copy(update={"stats_windows_days": [1, 14]})
    built = feature_store.feature_repo(PARAMS.feast, features, tmp_path)
    assert [f.name for f in built.views["item_stats"].features] == stats_features("item", [1, 14])


def test_store_opens_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
    store = feature_store.open_feature_store(PARAMS.feast)
    assert Path(store.repo_path) == REPO_ROOT / "feature_repo"
    assert store.config.project == "recsys" and store.config.online_store.type == "sqlite"
    with pytest.raises(FileNotFoundError, match=r"feast\.repo_path"):
        feature_store.open_feature_store(revalidated(PARAMS.feast, repo_path=tmp_path / "nowhere"))


def test_feast_cli_applies_the_repo(tmp_path):
    """`feast -c feature_repo apply` registers the same objects as the step (repo.py reads params.yaml)."""
    repo_dir = copy_feature_repo(tmp_path)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    feast_cli = Path(sys.executable).with_name("feast")
    env = {**os.environ, "FEAST_USAGE": "False"}
    env.pop("FEAST_FS_YAML_FILE_PATH", None)
    done = subprocess.run(
        [str(feast_cli), "-c", str(repo_dir), "apply"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    store = FeatureStore(repo_path=str(repo_dir))
    assert sorted(v.name for v in store.list_feature_views()) == sorted(FEATURE_TABLE_KEYS)
    assert sorted(s.name for s in store.list_feature_services()) == ["ranking", "retrieval"]
    source = store.get_feature_view("user_stats").batch_source.path
    assert source == str(tmp_path / "data" / "features" / "user_stats.parquet")


def test_production_config_differs_only_by_its_stores_and_holds_no_secret(monkeypatch):
    local = yaml.safe_load((REPO_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    text = (REPO_ROOT / "feature_repo" / "feature_store.production.yaml").read_text()
    production = yaml.safe_load(text)
    stores = ("registry", "online_store", "project")
    assert {k: v for k, v in local.items() if k not in stores} == {
        k: v for k, v in production.items() if k not in stores
    }
    assert (
        production["project"] == "${FEAST_PROJECT}"
    )  # the environment's (dev, production), from the ConfigMap
    assert production["online_store"]["type"] == "redis"
    assert production["online_store"]["connection_string"] == "${REDIS_CONNECTION_STRING}"
    assert production["registry"]["registry_type"] == "sql"
    assert production["registry"]["path"] == "${FEAST_REGISTRY_PATH}"
    body = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments document the format
    assert not re.search(r"password=\w|://[^$\s]+:[^$\s]+@", body)
    RegistryConfig(**{**production["registry"], "path": "postgresql+psycopg://u:p@db:5432/feast"})
    pytest.importorskip("redis", reason="the redis online store needs feast[redis] (the serving image)")
    monkeypatch.setenv("FEAST_REGISTRY_PATH", "postgresql+psycopg://u:p@db:5432/feast")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379")
    monkeypatch.setenv("FEAST_PROJECT", "recsys_production")
    config = load_repo_config(
        REPO_ROOT / "feature_repo", REPO_ROOT / "feature_repo/feature_store.production.yaml"
    )
    assert config.online_store.connection_string == "redis:6379"
