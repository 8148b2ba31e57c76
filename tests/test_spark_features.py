"""``features.engine: spark`` (recsys/spark_features.py) writes the same feature tables as the local path,
row for row: values, list order, Arrow types, row order, on a generated dataset of the default preset's
shape (in local mode, as CI runs it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import features as features_step
from components import ingest, training_set
from recsys.config import load_params
from recsys.contracts import FEATURE_TABLE_KEYS, DataContractError
from tests.conftest import REPO_ROOT, revalidated
from tests.test_spark_offline_store import assert_same_training_sets, training_sets

pytest.importorskip(
    "pyspark", reason="features.engine: spark needs the spark extra: pip install -e '.[spark]'"
)
pytestmark = [
    pytest.mark.spark,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs a Java runtime (17)"),
]

# the default preset's shape at half its events: the same users, items, days and per-user history depth
# (so histories fill their 30 slots and 30-day windows span gaps), in about a minute on 2 CPU cores
PRESET = {"data.synthetic.preset": "default", "data.synthetic.n_events": 200_000}
JOIN_ROWS = 10_000  # entity rows of the Feast join test, every 20th event in time order


def _spark(params, **changes):
    spark = params.features.spark.model_dump() | {"master": "local[2]"} | changes
    return revalidated(params.features, engine="spark", spark=spark)


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory) -> tuple[Path, Path, object]:
    params = load_params(REPO_ROOT / "params.yaml", overrides=PRESET)
    root = tmp_path_factory.mktemp("spark-features")
    ingest.run(params.data, params.seed, root / "raw")
    features_step.run(params.features, root / "raw", root / "local")
    paths = features_step.run(_spark(params, shuffle_partitions=4), root / "raw", root / "spark")
    assert sorted(paths) == sorted(FEATURE_TABLE_KEYS)
    assert all(path == root / "spark" / f"{name}.parquet" for name, path in paths.items())
    return root, root / "raw", params


@pytest.mark.parametrize("name", sorted(FEATURE_TABLE_KEYS))
def test_spark_tables_equal_the_local_tables_row_for_row(both_engines, name):
    root, _, _ = both_engines
    local = pq.read_table(root / "local" / f"{name}.parquet").replace_schema_metadata(None)
    spark = pq.read_table(root / "spark" / f"{name}.parquet").replace_schema_metadata(None)
    assert spark.schema.equals(local.schema), f"{spark.schema}\n!=\n{local.schema}"
    assert spark.num_rows == local.num_rows > 0
    for column in local.column_names:  # one column at a time: a failure names it
        assert spark.column(column).equals(local.column(column)), column
    if name == "user_history":  # the lists really are non-trivial: full windows and empty ones
        lengths = local.column("hist_length").to_numpy()
        assert lengths.max() == 30 and (lengths == 0).any()


def test_spark_writes_only_the_tables(both_engines):
    root, _, _ = both_engines
    assert sorted(p.name for p in (root / "spark").iterdir()) == sorted(
        f"{n}.parquet" for n in FEATURE_TABLE_KEYS
    )


def test_spark_names_the_raw_file_and_missing_column(both_engines, tmp_path):
    _, raw_dir, params = both_engines
    shutil.copytree(raw_dir, tmp_path / "raw")
    events = pq.read_table(raw_dir / "events.parquet").drop_columns(["label"])
    pq.write_table(events, tmp_path / "raw" / "events.parquet")
    with pytest.raises(
        DataContractError, match=r"events\.parquet: table 'events' is missing column\(s\) \['label'\]"
    ):
        features_step.run(_spark(params), tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.parquet"))


def test_spark_rejects_a_timestamp_that_is_not_nanoseconds(both_engines, tmp_path):
    _, raw_dir, params = both_engines
    shutil.copytree(raw_dir, tmp_path / "raw")
    users = pq.read_table(raw_dir / "users.parquet")
    column = users.column("signup_timestamp").cast(pa.timestamp("us", tz="UTC"))
    users = users.set_column(users.schema.get_field_index("signup_timestamp"), "signup_timestamp", column)
    pq.write_table(users, tmp_path / "raw" / "users.parquet")
    with pytest.raises(
        DataContractError, match=r"users\.parquet: column 'signup_timestamp' .* timestamp\[ns\]"
    ):
        features_step.run(_spark(params), tmp_path / "raw", tmp_path / "out")


def test_engine_spark_needs_its_section(both_engines):
    _, _, params = both_engines
    with pytest.raises(ValueError, match=r"features\.spark section is missing"):
        revalidated(params.features, engine="spark", spark=None)


def test_feast_spark_store_over_spark_tables_gives_the_duckdb_training_set(both_engines, tmp_path):
    """End to end on Spark: the tables the Spark engine wrote, joined by Feast's Spark offline store, give
    the training set that the local tables give through the DuckDB store (a sample of entity rows from
    every day, against the full tables)."""
    root, raw_dir, params = both_engines
    events = pq.read_table(raw_dir / "events.parquet").to_pandas()
    ranking = training_set.entity_frames(events)["ranking"]
    ranking = ranking.iloc[:: len(ranking) // JOIN_ROWS].reset_index(drop=True)
    tables = {"spark": root / "spark", "duckdb": root / "local"}
    try:
        assert_same_training_sets(*training_sets(params, ranking, tables, tmp_path), len(ranking))
    finally:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
