"""The model server's start-up against a real Feast store (file registry, SQLite online store, the
hand-made tables of tests/feast_fixtures.py): the item-cache warm-up is bound by its own, start-up sized
limit and not by the per-request ``serving.feast_timeout_s``, retries a failed read once, and says how
many items it left cold when it cannot read them."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
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


def test_a_registry_without_views_starts_degraded_and_serves_features_once_they_are_applied(tmp_path, caplog):
    """Issue: a fresh cluster's registry has no feature views until the first run applies them; the server
    crash-looped on Feast's FeatureServiceNotFoundException. It now starts, answers with defaults flagged
    degraded, says so, and reads the store once another process has applied and materialised the views."""
    from components import online_store
    from serving.online_features import ONLINE_STORE_READY

    params = shipped_params()
    feast = revalidated(params.feast, repo_path=copy_feature_repo(tmp_path))
    open_feature_store(feast).apply([])  # the registry exists, with the project and nothing in it
    with caplog.at_level(logging.WARNING, logger="serving.online_features"):
        features = OnlineFeatures(
            open_feature_store(feast),
            USER_DEFAULTS,
            ITEM_DEFAULTS,
            timeout_s=10,
            item_cache_ttl_s=0,  # the views appear before materialisation ends: read what is there now
            registry_retry_s=0.2,
        )
    try:
        assert not features.ready and ONLINE_STORE_READY._value.get() == 0
        assert "online store not ready" in caplog.text and "FeatureService" in caplog.text
        assert features.warm(CATALOGUE) == len(CATALOGUE)  # left for when the registry is ready
        rows = features.items(CATALOGUE)
        assert rows.degraded and not rows.found.any() and rows.columns["category"] == ["", "", ""]
        assert features.users([1]).degraded
        _, features_dir = handmade_dataset(tmp_path / "data")
        online_store.run(feast, params.features, features_dir)  # the first pipeline run, another process
        deadline = time.monotonic() + 30
        while not features.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        assert features.ready and ONLINE_STORE_READY._value.get() == 1
        rows = features.items(CATALOGUE)
        assert not rows.degraded and rows.found.tolist() == [True, True, False]
        assert rows.columns["category"] == ["cat_a", "cat_b", ""]
        users = features.users([1])
        assert not users.degraded and users.found.tolist() == [True]
    finally:
        features.close()


TTL = pd.Timedelta(days=2)  # params.yaml feast.ttl_days.user_stats


def test_online_values_past_their_views_ttl_are_served_as_offline_training_sees_them(tmp_path):
    """Feast's online store keeps an entity's last row forever; its offline point-in-time join drops a row
    older than the view's TTL (user_stats: 2 days). User 2's only stats row is 8 days older than the end
    of the data: training saw defaults for such a user, serving used to send the stale statistics."""
    import pyarrow.parquet as pq

    from components import online_store

    params = shipped_params()
    feast = revalidated(params.feast, repo_path=copy_feature_repo(tmp_path))
    _, features_dir = handmade_dataset(tmp_path / "data")
    stats = pq.read_table(features_dir / "user_stats.parquet").to_pandas()
    stale = stats[~((stats["user_id"] == 2) & (stats["user_impressions_7d"] == 4))]  # keeps its day-1 row
    newest = max(
        pq.read_table(features_dir / f"{name}.parquet").column("event_timestamp").to_pandas().max()
        for name in ("user_profile", "user_history", "user_stats", "item_profile", "item_stats")
    )
    exactly_ttl_old = stale.iloc[[0]].assign(user_id=3, user_impressions_7d=9, event_timestamp=newest - TTL)
    stale = pd.concat([stale, exactly_ttl_old], ignore_index=True)  # Feast's join keeps it (age == TTL)
    pq.write_table(pa.Table.from_pandas(stale, preserve_index=False), features_dir / "user_stats.parquet")
    online_store.run(feast, params.features, features_dir)
    store = open_feature_store(feast)
    wanted = {"user_impressions_7d": 0, "gender": ""}
    features = OnlineFeatures(store, wanted, ITEM_DEFAULTS, timeout_s=10, item_cache_ttl_s=600)
    try:
        rows = features.users([1, 2, 3])
    finally:
        features.close()
    raw = store.get_online_features(
        features=["user_stats:user_impressions_7d"], entity_rows=[{"user_id": 2}]
    ).to_dict()
    assert raw["user_impressions_7d"] == [3]  # the online store still holds user 2's day-1 row
    assert rows.columns["user_impressions_7d"] == [8, 0, 9]  # user 1's day-8 row is within the TTL
    assert rows.columns["gender"] == ["F", "M", "F"] and rows.found.tolist() == [True, True, True]
    entities = pd.DataFrame({"user_id": [1, 2, 3], "event_timestamp": [newest] * 3})
    offline = store.get_historical_features(entities, ["user_stats:user_impressions_7d"]).to_df()
    offline = offline.sort_values("user_id")["user_impressions_7d"].fillna(0).astype(int).tolist()
    assert offline == rows.columns["user_impressions_7d"]  # what a training row at that time holds
