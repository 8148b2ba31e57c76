"""The features step on Spark (``features.engine: spark``): the same five feature tables as the local
path (components/features.py), as Spark DataFrames, for raw tables that outgrow one machine.

The definitions are the local path's, restated as joins and window frames:

- ``user_history``: each event's row holds the last N clicks *strictly before* it. The user's clicks are
  collected once, in time order, and each row slices its window out of them by its count of earlier
  clicks (a running sum), so the work is O(events x N), not a frame per row. One trailing row per user,
  one second after the last event, holds the history serving reads.
- ``user_stats`` / ``item_stats``: daily snapshots at 00:00 UTC of day D over ``[D - w, D)``: a range
  frame ``rangeBetween(-w, -1)`` over the key's active days, plus the day after the last active day.
- profiles: the raw attributes, valid from sign-up / creation.

Times stay integer nanoseconds throughout (``spark.sql.legacy.parquet.nanosAsLong`` reads the raw
``timestamp[ns]`` columns as longs), so day boundaries and the trailing second are exact and equal the
local path's; Spark's own timestamps are microseconds.

Outputs: a local ``features_dir`` gets ``<name>.parquet`` single files with the local path's exact Arrow
schema (Spark writes sorted part files, which are streamed into the file batch by batch, so the driver
never holds a table); an ``s3a://`` one gets a Parquet dataset folder ``<name>.parquet/`` per table
(timestamps as Spark timestamps), which Feast's SparkSource reads. The cluster runs this module as a
``SparkApplication`` (recsys/spark_application.py).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    ITEM_PROFILE_FEATURES,
    RAW_COLUMNS,
    RAW_TABLES,
    TIMESTAMP,
    USER_PROFILE_FEATURES,
    DataContractError,
    check_raw_columns,
    parquet_schema,
    stats_features,
)

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from recsys.config import FeaturesConfig

log = logging.getLogger(__name__)
DAY_NS = 86_400 * 1_000_000_000
TRAILING_NS = 1_000_000_000  # as components/features.py: the trailing history row, 1 s after the last event
# read raw timestamp[ns] columns as exact int64 nanoseconds (Spark's timestamps are microseconds)
BASE_CONF = {
    "spark.sql.legacy.parquet.nanosAsLong": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.parquet.compression.codec": "zstd",
}
_ARROW_TYPES = {"i": pa.int64(), "f": pa.float64(), "s": pa.string(), "t": pa.timestamp("ns", tz="UTC")}


def feature_schemas(windows: list[int]) -> dict[str, pa.Schema]:
    """The Arrow schema of each feature table as the local path writes it (the parity tests compare)."""
    ts = pa.timestamp("ns", tz="UTC")

    def raw(table: str, key: str, columns: list[str]) -> pa.Schema:
        kinds = RAW_COLUMNS[table]
        return pa.schema(
            [(key, pa.int64()), *((c, _ARROW_TYPES[kinds[c]]) for c in columns), (TIMESTAMP, ts)]
        )

    def stats(key: str, prefix: str) -> pa.Schema:
        names = stats_features(prefix, windows)
        return pa.schema(
            [(key, pa.int64()), (TIMESTAMP, ts)]
            + [(n, pa.float64() if "_ctr_" in n else pa.int64()) for n in names]
        )

    return {
        "user_profile": raw("users", "user_id", USER_PROFILE_FEATURES),
        "item_profile": raw("items", "item_id", ITEM_PROFILE_FEATURES),
        "user_history": pa.schema(
            [
                ("user_id", pa.int64()),
                (TIMESTAMP, ts),
                ("hist_item_ids", pa.list_(pa.field("element", pa.int64()))),
                ("hist_categories", pa.list_(pa.field("element", pa.string()))),
                ("hist_length", pa.int64()),
            ]
        ),
        "user_stats": stats("user_id", "user"),
        "item_stats": stats("item_id", "item"),
    }


@contextmanager
def spark_session(master: str, conf: Mapping[str, str]) -> Iterator[SparkSession]:
    """A Spark session with :data:`BASE_CONF` and ``conf``; stopped afterwards unless one was running."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    builder = SparkSession.builder.master(master).appName("recsys-features")
    for key, value in {**BASE_CONF, **conf}.items():
        builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    for key in ("spark.sql.legacy.parquet.nanosAsLong", "spark.sql.session.timeZone"):
        session.conf.set(key, BASE_CONF[key])  # a reused session gets what the definitions rely on
    try:
        yield session
    finally:
        if active is None:
            session.stop()


def read_raw(spark: SparkSession, raw_dir: str) -> dict[str, DataFrame]:
    """The three raw tables; a local folder's files are checked for the contract's columns first."""
    tables = {}
    for name in RAW_TABLES:
        path = f"{raw_dir.rstrip('/')}/{name}.parquet"
        if "://" not in raw_dir:
            check_raw_columns(name, parquet_schema(path).names, path)
        df = spark.read.parquet(path)
        check_raw_columns(name, df.columns, path)
        wrong = [
            c
            for c, kind in RAW_COLUMNS[name].items()
            if kind == "t" and df.schema[c].dataType.typeName() != "long"
        ]
        if wrong:
            raise DataContractError(
                f"{path}: column '{wrong[0]}' of table '{name}' is not a timestamp[ns] (UTC) column; "
                f"Spark read it as {df.schema[wrong[0]].dataType.simpleString()}"
            )
        tables[name] = df
    return tables


def build_feature_tables(
    raw: Mapping[str, DataFrame], history_length: int, windows: list[int]
) -> dict[str, DataFrame]:
    """Every feature table as a DataFrame (times as int64 nanoseconds), keyed by table name."""
    users, items, events = raw["users"], raw["items"], raw["events"]
    return {
        "user_profile": _profile(users, "user_id", USER_PROFILE_FEATURES, "signup_timestamp"),
        "item_profile": _profile(items, "item_id", ITEM_PROFILE_FEATURES, "created_timestamp"),
        "user_history": user_history(events, items, history_length),
        "user_stats": activity_snapshots(events, "user_id", "user", sorted(windows)),
        "item_stats": activity_snapshots(events, "item_id", "item", sorted(windows)),
    }


def user_history(events: DataFrame, items: DataFrame, length: int) -> DataFrame:
    """Last ``length`` clicked item ids and categories strictly before each event time (and one trailing
    row per user): rows slice the user's time-ordered clicks by their running count of earlier clicks."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ev = events.select("user_id", "item_id", F.col(TIMESTAMP).alias("ts"), F.col("label").cast("long"))
    before = Window.partitionBy("user_id").orderBy("ts").rowsBetween(Window.unboundedPreceding, -1)
    rows = ev.select("user_id", "ts", F.coalesce(F.sum("label").over(before), F.lit(0)).alias("n"))
    totals = ev.groupBy("user_id").agg(F.max("ts").alias("last"), F.sum("label").alias("total"))
    trailing = totals.select("user_id", (F.col("last") + TRAILING_NS).alias("ts"), F.col("total").alias("n"))
    category = items.select("item_id", "category")
    clicks = (
        ev.where(F.col("label") == 1)
        .join(F.broadcast(category), "item_id", "left")
        .groupBy("user_id")
        .agg(F.sort_array(F.collect_list(F.struct("ts", "item_id", "category"))).alias("clicks"))
    )
    hist_len = F.least(F.col("n"), F.lit(length))
    window = F.slice("clicks", F.col("n") - hist_len + 1, hist_len)  # null for a user without clicks
    no_clicks = {"long": F.array().cast("array<bigint>"), "string": F.array().cast("array<string>")}
    return (
        rows.unionByName(trailing)
        .join(clicks, "user_id", "left")
        .select(
            "user_id",
            F.col("ts").alias(TIMESTAMP),
            F.coalesce(F.transform(window, lambda c: c["item_id"]), no_clicks["long"]).alias("hist_item_ids"),
            F.coalesce(F.transform(window, lambda c: c["category"]), no_clicks["string"]).alias(
                "hist_categories"
            ),
            hist_len.cast("long").alias("hist_length"),
        )
    )


def activity_snapshots(events: DataFrame, key: str, prefix: str, windows: list[int]) -> DataFrame:
    """Daily snapshots (00:00 UTC of every active day and of the day after the last) of impressions,
    clicks and CTR over ``[D - w, D)`` for each window ``w``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    day = F.expr(f"({TIMESTAMP} - pmod({TIMESTAMP}, {DAY_NS})) div {DAY_NS}")  # floor, in integers
    daily = events.groupBy(key, day.alias("d")).agg(
        F.count(F.lit(1)).alias("imp"), F.sum(F.col("label").cast("long")).alias("clk")
    )
    after_last = daily.groupBy(key).agg((F.max("d") + 1).alias("d"))
    snaps = daily.select(key, "d").unionByName(after_last).distinct().join(daily, [key, "d"], "left")
    columns = [F.col(key), (F.col("d") * F.lit(DAY_NS)).alias(TIMESTAMP)]
    names = iter(stats_features(prefix, windows))
    for w in windows:
        frame = Window.partitionBy(key).orderBy("d").rangeBetween(-w, -1)
        imp = F.coalesce(F.sum("imp").over(frame), F.lit(0)).cast("long")
        clk = F.coalesce(F.sum("clk").over(frame), F.lit(0)).cast("long")
        ctr = F.when(imp > 0, clk.cast("double") / imp.cast("double")).otherwise(F.lit(0.0))
        columns += [imp.alias(next(names)), clk.alias(next(names)), ctr.alias(next(names))]
    return snaps.select(*columns)


def _profile(df: DataFrame, key: str, columns: list[str], valid_from: str) -> DataFrame:
    return df.select(key, *columns, df[valid_from].alias(TIMESTAMP))


def write_feature_tables(
    tables: Mapping[str, DataFrame], features_dir: str, windows: list[int]
) -> dict[str, str]:
    """Write each table sorted by (key, time): local folder -> ``<name>.parquet`` files with the local
    path's schema, all staged before any is renamed; ``s3a://`` -> one dataset folder per table."""
    from pyspark.sql import functions as F

    schemas = feature_schemas(windows)
    written: dict[str, str] = {}
    if "://" in features_dir:
        for name, df in tables.items():
            uri = f"{features_dir.rstrip('/')}/{name}.parquet"
            out = df.withColumn(TIMESTAMP, F.expr(f"timestamp_micros({TIMESTAMP} div 1000)"))
            out.orderBy(FEATURE_TABLE_KEYS[name], TIMESTAMP).write.mode("overwrite").parquet(uri)
            written[name] = uri
        return written
    out_dir = Path(features_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spark-features-", dir=out_dir) as tmp:
        staged = {}
        for name, df in tables.items():
            parts = Path(tmp) / name
            df.orderBy(FEATURE_TABLE_KEYS[name], TIMESTAMP).write.parquet(str(parts))
            staged[name] = Path(tmp) / f"{name}.parquet"
            _concatenate_parts(parts, staged[name], schemas[name])
            shutil.rmtree(parts)
        for name, path in staged.items():
            final = out_dir / f"{name}.parquet"
            path.replace(final)
            written[name] = str(final)
    return written


def _concatenate_parts(parts: Path, target: Path, schema: pa.Schema) -> None:
    """Spark's sorted part files (range partitions, named in order) as one file with ``schema``, one
    record batch at a time; int64 nanosecond times become ``timestamp[ns, UTC]``."""
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        for part in sorted(parts.glob("part-*.parquet")):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=256 * 1024):
                arrays = [_cast(batch.column(field.name), field.type) for field in schema]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))


def _cast(column: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_timestamp(target) and pa.types.is_integer(column.type):
        return column.view(target) if column.type == pa.int64() else column.cast(pa.int64()).view(target)
    return column.cast(target)


def run(
    raw_dir: str | Path,
    features_dir: str | Path,
    history_length: int,
    windows: list[int],
    master: str = "local[*]",
    conf: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Compute and write every feature table on Spark; returns each table's written path or URI."""
    started = time.perf_counter()
    with spark_session(master, {k: str(v) for k, v in (conf or {}).items()}) as spark:
        raw = read_raw(spark, str(raw_dir))
        tables = build_feature_tables(raw, history_length, windows)
        written = write_feature_tables(tables, str(features_dir), sorted(windows))
    log.info("features (spark, %s): %s in %.1fs", master, ", ".join(written), time.perf_counter() - started)
    return written


def run_configured(features: FeaturesConfig, raw_dir: str | Path, features_dir: str | Path) -> dict[str, str]:
    """:func:`run` with ``features.spark``'s session settings (the features step's ``engine: spark``)."""
    if features.spark is None:
        raise ValueError("features.spark: engine is spark but the section is missing")
    spark = features.spark
    conf = {
        "spark.driver.memory": spark.driver_memory,
        "spark.sql.shuffle.partitions": str(spark.shuffle_partitions),
        **spark.conf,
    }
    windows = features.stats_windows_days
    return run(raw_dir, features_dir, features.history_length, windows, spark.master, conf)


def argument_parser() -> argparse.ArgumentParser:
    """The driver's command line (the SparkApplication's ``arguments``)."""
    parser = argparse.ArgumentParser(prog="python -m recsys.spark_features", description=__doc__)
    parser.add_argument("--raw-dir", required=True, help="folder or s3a:// prefix of the raw tables")
    parser.add_argument("--features-dir", required=True, help="folder or s3a:// prefix for the tables")
    parser.add_argument("--history-length", type=int, required=True)
    parser.add_argument("--windows", required=True, help="comma-separated days, e.g. 7,30")
    parser.add_argument("--master", default=None, help="default: the submitter's (spark-submit, operator)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The SparkApplication's entry point: every input is an argument (no params.yaml in the driver)."""
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    windows = [int(w) for w in args.windows.split(",") if w.strip()]
    if args.master is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.appName("recsys-features").getOrCreate()
        master = spark.conf.get("spark.master", "local[*]")
    else:
        master = args.master
    run(args.raw_dir, args.features_dir, args.history_length, windows, master)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
