"""The raw events contract checked a batch at a time (recsys.contracts.EventBatches): one definition, used
by ingest, the features step and the training-set step, each error naming the source, the batch's rows
and the column."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import features, ingest, training_set
from recsys.contracts import DataContractError, EventBatches, open_events

BATCH = 10_000  # rows per batch and per row group: the tiny preset's 30,000 events are three batches
BAD_ROW = 15_000  # in the middle batch: rows 10,001-20,000


def _frame(rows: int = 25) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.arange(rows, dtype=np.int64),
            "item_id": np.arange(rows, dtype=np.int64) % 7,
            "event_timestamp": pd.to_datetime(np.arange(rows) * 10**9 + 5 * 10**9, utc=True),
            "label": np.arange(rows) % 2,
            "event_type": "impression",
        }
    )


def test_batches_are_counted_timed_and_named_by_their_rows():
    checker = EventBatches("log")
    checker.check(_frame(25))
    checker.check(pa.RecordBatch.from_pandas(_frame(10).assign(label=1), preserve_index=False))
    assert (checker.rows, checker.first_time, checker.last_time) == (
        35,
        pd.Timestamp(5 * 10**9, tz="UTC"),
        pd.Timestamp(29 * 10**9, tz="UTC"),
    )
    label = r"^log: column 'label' .* found \[3\] \(events rows 36-40\)$"
    with pytest.raises(DataContractError, match=label):
        checker.check(_frame(5).assign(label=3))
    assert str(checker.error).endswith("(events rows 36-40)")
    missing = r"^log: table 'events' is missing column\(s\) \['label'\]; .* \(events rows 101-103\)$"
    with pytest.raises(DataContractError, match=missing):
        checker.check(_frame(3).drop(columns=["label"]), range(100, 103))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda df: df.assign(user_id=df["user_id"].astype(float)), "column 'user_id' .* expected integer"),
        (
            lambda df: df.assign(event_timestamp=df["event_timestamp"].dt.tz_localize(None)),
            "column 'event_timestamp' .* expected UTC timestamp",
        ),
        (lambda df: df.assign(event_type=1), "column 'event_type' .* expected string"),
    ],
)
def test_dtypes_are_checked_on_frames_and_on_arrow_schemas(change, message):
    bad = change(_frame())
    for batch in (bad, pa.RecordBatch.from_pandas(bad, preserve_index=False)):
        with pytest.raises(DataContractError, match=rf"^src: {message}.* \(events rows 1-25\)$"):
            EventBatches("src").check(batch)


def test_a_subset_of_columns_is_checked_and_strings_may_be_null():
    frame = _frame().assign(event_type=None)
    checker = EventBatches("src", ["user_id", "label"])
    checker.check(pa.RecordBatch.from_pandas(frame[["user_id", "label"]], preserve_index=False))
    EventBatches("src").check(frame)  # a null event_type is allowed, as in check_raw_table
    assert checker.rows == 25 and checker.first_time is None  # no timestamp column read: no times


def test_an_empty_pass_and_an_empty_file_name_the_source(tmp_path):
    with pytest.raises(DataContractError, match=r"^src: table 'events' is empty"):
        EventBatches("src").finish()
    path = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pandas(_frame().iloc[:0], preserve_index=False), path)
    with pytest.raises(DataContractError, match=r"events\.parquet: table 'events' is empty"):
        open_events(path)


def _bad_events_file(tiny_raw_dir, tmp_path, column: str, bad: object):
    """The tiny raw tables with ``column`` broken at row ``BAD_ROW`` of events written as row groups of
    ``BATCH`` rows (the first batch is clean)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("users", "items"):
        shutil.copy(tiny_raw_dir / f"{name}.parquet", raw / f"{name}.parquet")
    table = pq.read_table(tiny_raw_dir / "events.parquet")
    assert table.num_rows == 3 * BATCH
    values = table.column(column).to_pylist()
    values[BAD_ROW] = bad
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, raw / "events.parquet", row_group_size=BATCH)
    return raw


def _ingest(params, raw, features_dir, out):
    """Ingest's check of a source's batches (here: the file's, as pandas frames, as a source yields)."""
    entities = {name: pd.read_parquet(raw / f"{name}.parquet") for name in ("users", "items")}
    batches = (b.to_pandas() for b in pq.ParquetFile(raw / "events.parquet").iter_batches(BATCH))
    list(ingest.checked_events(batches, entities, str(raw / "events.parquet")))


def _features(params, raw, features_dir, out):
    config = params.features.model_copy(update={"batch_rows": BATCH})
    features.run(config, raw, out)


def _training_set(params, raw, features_dir, out):
    training_set.run(
        params.training_set,
        features_dir,
        raw,
        out,
        feast=params.feast,
        features=params.features,
        metrics_file=out / "training_set.json",
        report_file=out / "training_set.md",
    )


@pytest.mark.parametrize("step", [_ingest, _features, _training_set], ids=lambda step: step.__name__[1:])
@pytest.mark.parametrize(
    ("column", "bad", "problem"),
    [
        ("label", 2, r"must be 0 or 1, found \[2\]"),
        ("event_timestamp", None, r"has 1 null value\(s\)"),
    ],
)
def test_a_bad_middle_batch_names_file_rows_and_column_in_every_step(
    tiny_params, tiny_raw_dir, tiny_features_dir, tmp_path, monkeypatch, step, column, bad, problem
):
    """The training-set step fails inside its one read (DuckDB's sort), before Feast is touched."""
    monkeypatch.setattr(training_set, "ENTITY_BATCH_ROWS", BATCH)
    raw = _bad_events_file(tiny_raw_dir, tmp_path, column, bad)
    with pytest.raises(DataContractError) as err:
        step(tiny_params, raw, tiny_features_dir, tmp_path / "out")
    rows = r"\(events rows 10,001-20,000\)"
    expected = rf"^{raw}/events\.parquet: column '{column}' of table 'events' {problem} {rows}$"
    assert re.match(expected, str(err.value)), str(err.value)
    assert not list(tmp_path.glob("out/**/*.*"))  # no output table, no report
