"""The Spark offline store (feature_repo/feature_store.spark.yaml) for feature tables that outgrow one
machine: the training-set join on the tiny preset, through a local Spark session, gives the same rows and
values as the default DuckDB store (tests/test_spark_features.py repeats it on the default preset's shape,
over tables the Spark features engine wrote)."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
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
    pytest.mark.spark,
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
    ranking = training_set.entity_frames(tiny_raw["events"])["ranking"]  # every view, every event
    tables = {"spark": tiny_features_dir, "duckdb": tiny_features_dir}
    assert_same_training_sets(*training_sets(tiny_params, ranking, tables, tmp_path), len(ranking))


def training_sets(
    params: Any, entity_rows: pd.DataFrame, tables: dict[str, Path], tmp_path: Path
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The ranking training set of ``entity_rows`` through each offline store (``spark``, ``duckdb``)
    over that store's folder of feature tables, with a TTL short enough that some rows get defaults."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    config = params.training_set
    shipped = shipped_params().feast
    ttl = revalidated(shipped.ttl_days, user_stats=0.5)  # 00:00 snapshots: afternoon events get defaults
    frames, stats = {}, {}
    for kind, config_file in (("spark", "feature_store.spark.yaml"), ("duckdb", None)):
        sources = {name: feature_store.read_feature_table(tables[kind], name) for name in FEATURE_TABLE_KEYS}
        feast = revalidated(
            shipped, repo_path=copy_feature_repo(tmp_path / kind), config_file=config_file, ttl_days=ttl
        )
        store = feature_store.open_feature_store(feast)
        assert store.config.offline_store.type == kind
        build = functools.partial(feature_store.feature_repo, feast, params.features)
        repo = build(tables[kind])
        assert all(isinstance(s, SparkSource) == (kind == "spark") for s in repo.sources.values())
        store.apply(repo.objects())
        frames[kind], stats[kind] = point_in_time.historical_features(
            store, entity_rows, "ranking", sources, build, config.chunk_rows, config.call_rows
        )
    return frames, stats


def assert_same_training_sets(frames: dict[str, pd.DataFrame], stats: dict[str, Any], rows: int) -> None:
    """Row for row, column for column (lists element by element), and the same rows defaulted."""
    spark, duckdb = frames["spark"], frames["duckdb"]
    assert len(spark) == len(duckdb) == rows
    assert list(spark.columns) == list(duckdb.columns)
    for column in duckdb.columns:
        left, right = spark[column].tolist(), duckdb[column].tolist()
        if column in ("hist_item_ids", "hist_categories"):
            left, right = [list(v) for v in left], [list(v) for v in right]
        assert left == right, column
    assert stats["spark"].defaulted_rows == stats["duckdb"].defaulted_rows
    assert 0 < stats["duckdb"].defaulted_rows["user_stats"] < rows  # the TTL is compared too
