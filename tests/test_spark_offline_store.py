"""The Spark offline store (feature_repo/feature_store.spark.yaml) for feature tables that outgrow one
machine: the training-set join on the tiny preset, through a local Spark session, gives the same rows and
values as the default DuckDB store."""

from __future__ import annotations

import functools
import shutil

import pytest

from components import training_set
from recsys import feature_store, point_in_time
from recsys.contracts import FEATURE_TABLE_KEYS
from tests.conftest import revalidated, shipped_params
from tests.feast_fixtures import copy_feature_repo

pytest.importorskip(
    "pyspark", reason="the Spark offline store needs the spark extra: pip install -e '.[spark]'"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime (17)"),
]


@pytest.fixture
def spark_session_stopped_after():
    yield
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


def test_spark_store_gives_the_duckdb_training_set(
    tiny_params, tiny_raw, tiny_features_dir, tmp_path, spark_session_stopped_after
):
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    ranking = training_set.entity_frames(tiny_raw["events"])["ranking"]  # every view, every event
    sources = {name: feature_store.read_feature_table(tiny_features_dir, name) for name in FEATURE_TABLE_KEYS}
    config = tiny_params.training_set
    shipped = shipped_params().feast
    ttl = revalidated(shipped.ttl_days, user_stats=0.5)  # 00:00 snapshots: afternoon events get defaults
    frames, stats = {}, {}
    for kind, config_file in (("spark", "feature_store.spark.yaml"), ("duckdb", None)):
        feast = revalidated(
            shipped, repo_path=copy_feature_repo(tmp_path / kind), config_file=config_file, ttl_days=ttl
        )
        store = feature_store.open_feature_store(feast)
        assert store.config.offline_store.type == kind
        build = functools.partial(feature_store.feature_repo, feast, tiny_params.features)
        repo = build(tiny_features_dir)
        assert all(isinstance(s, SparkSource) == (kind == "spark") for s in repo.sources.values())
        store.apply(repo.objects())
        frames[kind], stats[kind] = point_in_time.historical_features(
            store, ranking, "ranking", sources, build, config.chunk_rows, config.call_rows
        )
    spark, duckdb = frames["spark"], frames["duckdb"]
    assert len(spark) == len(duckdb) == len(ranking)
    assert list(spark.columns) == list(duckdb.columns)
    for column in duckdb.columns:
        left, right = spark[column].tolist(), duckdb[column].tolist()
        if column in ("hist_item_ids", "hist_categories"):
            left, right = [list(v) for v in left], [list(v) for v in right]
        assert left == right, column
    assert stats["spark"].defaulted_rows == stats["duckdb"].defaulted_rows
    assert 0 < stats["duckdb"].defaulted_rows["user_stats"] < len(ranking)  # the TTL is compared too
