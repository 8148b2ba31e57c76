"""The model server's start-up against a real Feast store (file registry, SQLite online store, the
hand-made tables of tests/feast_fixtures.py): the item-cache warm-up is bound by its own, start-up sized
limit and not by the per-request ``serving.feast_timeout_s``, retries a failed read once, and says how
many items it left cold when it cannot read them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from recsys.config import FeastConfig
from recsys.feature_store import open_feature_store
from serving.online_features import OnlineFeatures
from tests.conftest import revalidated, shipped_params
from tests.feast_fixtures import copy_feature_repo, handmade_dataset

USER_DEFAULTS = {"gender": ""}
ITEM_DEFAULTS = {"item_id": 0, "category": "", "price": 0.0}
CATALOGUE = [10, 11, 12]  # 10 and 11 are in the store, 12 is not


def handmade_online_store(root: Path) -> FeastConfig:
    """A registered and materialised Feast store under ``root``: users 1-3, items 10 and 11."""
    from components import online_store

    params = shipped_params()
    feast = revalidated(params.feast, repo_path=copy_feature_repo(root))
    _, features_dir = handmade_dataset(root / "data")
    online_store.run(feast, params.features, features_dir)
    return feast


def online_store_file(feast: FeastConfig) -> Path:
    config = open_feature_store(feast).config
    return Path(config.repo_path) / config.online_store.path


@pytest.fixture(scope="module")
def feast_config(tmp_path_factory) -> FeastConfig:
    return handmade_online_store(tmp_path_factory.mktemp("feast"))


def online_features(feast: FeastConfig, timeout_s: float) -> OnlineFeatures:
    store = open_feature_store(feast)
    return OnlineFeatures(store, USER_DEFAULTS, ITEM_DEFAULTS, timeout_s=timeout_s, item_cache_ttl_s=600)


def test_warm_up_is_not_bound_by_the_request_timeout(feast_config):
    """Before, each warm-up read had the request's 0.25 s: the first one (registry, connections) timed out
    in most starts and the server served with a cold cache."""
    features = online_features(feast_config, timeout_s=1e-9)  # no read can answer within this
    assert features.warm(CATALOGUE) == 0
    rows = features.items(CATALOGUE)  # from the cache: no read, so the request timeout does not matter
    assert not rows.degraded and rows.found.tolist() == [True, True, False]
    assert rows.columns["category"] == ["cat_a", "cat_b", ""]


def test_a_failed_warm_up_read_is_retried_once(feast_config, monkeypatch):
    features = online_features(feast_config, timeout_s=10)
    read = features.store.get_online_features
    item_reads = []

    def fails_first(**kwargs):
        if "item_id" in kwargs["entity_rows"][0]:
            item_reads.append(kwargs)
            if len(item_reads) == 1:
                raise ConnectionError("injected: the store dropped the connection")
        return read(**kwargs)

    monkeypatch.setattr(features.store, "get_online_features", fails_first)
    assert features.warm(CATALOGUE) == 0
    assert len(item_reads) == 2  # the failed read and its retry
    assert features.items(CATALOGUE).found.tolist() == [True, True, False]
    assert len(item_reads) == 2  # answered from the cache


def test_a_warm_up_that_cannot_read_says_how_many_items_are_cold(feast_config, tmp_path, caplog):
    repo = tmp_path / "feature_repo"  # a copy of the store, to delete its online store file
    shutil.copytree(feast_config.repo_path, repo)
    feast = revalidated(feast_config, repo_path=repo)
    online_store_file(feast).unlink()
    features = online_features(feast, timeout_s=10)
    with caplog.at_level(logging.WARNING, logger="serving.online_features"):
        assert features.warm(CATALOGUE) == 3
    cold = [r.getMessage() for r in caplog.records if "cold" in r.getMessage()]
    assert len(cold) == 1 and "left 3 of 3 catalogue items cold" in cold[0], caplog.text
    failed = [
        r.getMessage() for r in caplog.records if "online store read of 3 item(s) failed" in r.getMessage()
    ]
    assert len(failed) == 2  # the read and its one retry
    rows = features.items(CATALOGUE)  # requests get defaults while the store fails, flagged
    assert rows.degraded and not rows.found.any()
