"""The raw events split into user and item key ranges: every row once, in file order, ranges sized and
disjoint, the raw contract checked in every batch (recsys/event_partitions.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys import event_partitions
from recsys.contracts import DataContractError
from recsys.event_partitions import Events, EventsFile, KeyCounts, key_ranges, partition_events


def _events(n: int, seed: int = 0, users: int = 50, items: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": rng.integers(1, users + 1, n),
            "item_id": rng.integers(100, 100 + items, n),
            "event_timestamp": pd.to_datetime(rng.integers(1.7e18, 1.71e18, n), utc=True),
            "label": rng.integers(0, 2, n),
            "event_type": rng.choice(["view", "click"], n),
        }
    )


def _write(df: pd.DataFrame, path, row_group_size: int) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)


def test_counts_merged_batch_by_batch_equal_the_counts_of_all_keys():
    rng = np.random.default_rng(1)
    batches = [rng.integers(-5, 40, size) for size in (0, 17, 300, 1, 90)]
    counts = KeyCounts(np.zeros(0, np.int64), np.zeros(0, np.int64))
    for keys in batches:
        counts = counts.merge(keys)
    keys, expected = np.unique(np.concatenate(batches), return_counts=True)
    np.testing.assert_array_equal(counts.keys, keys)
    np.testing.assert_array_equal(counts.counts, expected)


def test_key_ranges_hold_about_target_rows_and_a_heavy_key_alone():
    counts = KeyCounts(np.array([3, 5, 8, 9, 20, 21, 40]), np.array([4, 4, 4, 50, 1, 1, 7]))
    edges = key_ranges(counts, target_rows=10)
    parts = np.searchsorted(edges, counts.keys, side="right") - 1
    assert edges[0] == 3 and (np.diff(edges) > 0).all()  # starts at the smallest key, contiguous ranges
    weight = pd.Series(counts.counts).groupby(parts).sum()
    assert (weight <= 10 + counts.counts.max()).all()  # a range closes once it reaches the target
    assert parts[3] not in np.delete(parts, 3)  # the heavy key (50 events) has a range of its own
    # extra rows per key (the history's trailing row) count towards the target
    assert len(key_ranges(counts, target_rows=10, extra_per_key=5)) > len(edges)


def test_key_ranges_never_exceed_the_partition_cap(monkeypatch):
    monkeypatch.setattr(event_partitions, "MAX_PARTITIONS", 4)
    counts = KeyCounts(np.arange(100), np.full(100, 3))
    assert len(key_ranges(counts, target_rows=1)) <= 4
    assert len(key_ranges(counts, target_rows=1_000)) == 1


def test_every_row_lands_once_in_its_key_range_in_file_order(tmp_path):
    df = _events(5_000)
    path = tmp_path / "events.parquet"
    _write(df, path, row_group_size=700)
    events = EventsFile(path, batch_rows=512)
    counts = events.count_keys()
    edges = {"user_id": key_ranges(counts["user_id"], 600, 1), "item_id": key_ranges(counts["item_id"], 900)}
    assert len(edges["user_id"]) > 4 and len(edges["item_id"]) > 4
    parts = partition_events(events, edges, tmp_path)
    whole = Events.from_frame(df)
    for key, ranges in edges.items():
        seen = []
        for index, part in enumerate(parts[key]):
            ids = getattr(part, key)
            upper = ranges[index + 1] if index + 1 < len(ranges) else np.inf
            assert ((ids >= ranges[index]) & (ids < upper)).all()
            mine = np.flatnonzero((getattr(whole, key) >= ranges[index]) & (getattr(whole, key) < upper))
            for column, got in zip(Events._fields, part, strict=True):  # file order within the range
                np.testing.assert_array_equal(got, getattr(whole, column)[mine])
            seen.append(mine)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(df)))


def test_by_user_is_the_stable_sort_of_the_frame():
    df = _events(2_000, seed=3)
    expected = Events.from_frame(df.sort_values(["user_id", "event_timestamp"], kind="stable"))
    for got, want in zip(Events.from_frame(df).by_user(), expected, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("column", "bad", "message"),
    [
        ("label", 2, r"events\.parquet: column 'label' of table 'events' must be 0 or 1, found \[2\]"),
        ("item_id", None, r"events\.parquet: column 'item_id' of table 'events' has 1 null value\(s\)"),
        ("event_timestamp", None, r"column 'event_timestamp' of table 'events' has 1 null value\(s\)"),
    ],
)
def test_a_bad_value_in_a_later_row_group_is_named(tmp_path, column, bad, message):
    """The dtypes are checked on the footer; every batch for nulls and labels, its rows named."""
    message += r" \(events rows 2,001-3,000\)$"
    table = pa.Table.from_pandas(_events(3_000), preserve_index=False)
    values = table.column(column).to_pylist()
    values[2_500] = bad
    table = table.set_column(
        table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type)
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path, row_group_size=1_000)
    events = EventsFile(path, batch_rows=1_000)  # the first row group is clean
    with pytest.raises(DataContractError, match=message):
        counts = events.count_keys()
        partition_events(events, {"user_id": key_ranges(counts["user_id"], 500)}, tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda df: df.drop(columns=["event_type"]),
            r"events\.parquet: table 'events' is missing .*'event_type'",
        ),
        (lambda df: df.iloc[:0], r"events\.parquet: table 'events' is empty"),
        (lambda df: df.assign(user_id=df["user_id"].astype(str)), r"column 'user_id' .* expected integer"),
        (
            lambda df: df.assign(event_timestamp=df["event_timestamp"].dt.tz_convert("Europe/Paris")),
            r"column 'event_timestamp' .* expected UTC timestamp",
        ),
    ],
)
def test_the_raw_contract_is_checked_before_any_row_is_read(tmp_path, change, message):
    path = tmp_path / "events.parquet"
    _write(change(_events(100)), path, row_group_size=50)
    with pytest.raises(DataContractError, match=message):
        EventsFile(path, batch_rows=10)


def test_a_missing_or_damaged_events_file_is_named(tmp_path):
    with pytest.raises(DataContractError, match=r"events\.parquet: raw table 'events' not found"):
        EventsFile(tmp_path / "events.parquet", batch_rows=10)
    _write(_events(4_000), tmp_path / "events.parquet", row_group_size=1_000)
    data = bytearray((tmp_path / "events.parquet").read_bytes())
    data[200:20_000] = bytes(19_800)  # the first pages zeroed: the footer still opens, the pages do not
    (tmp_path / "events.parquet").write_bytes(bytes(data))
    with pytest.raises(DataContractError, match=r"events\.parquet: not a readable parquet file"):
        EventsFile(tmp_path / "events.parquet", batch_rows=1_000).count_keys()
