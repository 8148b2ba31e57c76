"""The training-set step's streamed inputs: time-sorted copies on disk, swept a batch at a time, give the
same rows as the tables held whole; entity rows sorted on disk equal the in-memory entity frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import training_set
from recsys import as_of_rows, feature_store, point_in_time
from recsys.as_of_rows import AsOfRows, duckdb_connection, time_sorted_copy

DAY_NS = 86_400 * 10**9


def _feature_table(rng: np.random.Generator, rows: int, users: int) -> pa.Table:
    """Feature rows in random order; timestamps unique per user (the data contract), lists per row."""
    ts = rng.choice(np.arange(30 * 24) * 3_600 * 10**9, size=rows, replace=False)
    user = rng.integers(0, users, size=rows)
    return pa.table(
        {
            "user_id": pa.array(user, pa.int64()),
            "event_timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "hist": pa.array([list(range(int(v) % 4)) for v in ts // 3_600 // 10**9], pa.list_(pa.int64())),
            "value": pa.array(np.arange(rows), pa.int64()),
        }
    )


def _expected(table: pa.Table, keys: np.ndarray, t_first: int, t_last: int, ttl: int | None) -> set[int]:
    """Brute force: per key its last row before t_first (within the TTL) and its rows in the range."""
    frame = table.to_pandas()
    frame["ns"] = point_in_time._ns(table.column("event_timestamp"))
    out: set[int] = set()
    for key in np.unique(keys):
        mine = frame[frame["user_id"] == key]
        before = mine[mine["ns"] < t_first]
        if len(before):
            last = before.loc[before["ns"].idxmax()]
            if ttl is None or last["ns"] >= t_first - ttl:
                out.add(int(last["value"]))
        out |= set(mine.loc[(mine["ns"] >= t_first) & (mine["ns"] <= t_last), "value"].tolist())
    return out


@pytest.mark.parametrize("ttl", [None, 2 * DAY_NS])
def test_a_sorted_copy_swept_in_small_batches_gives_the_rows_of_the_whole_table(tmp_path, monkeypatch, ttl):
    monkeypatch.setattr(as_of_rows, "BATCH_ROWS", 16)  # many batches and folds over 400 rows
    rng = np.random.default_rng(7)
    table = _feature_table(rng, rows=400, users=12)
    pq.write_table(table, tmp_path / "rows.parquet")
    con = duckdb_connection("200MB", tmp_path / "spill")
    source = time_sorted_copy(con, tmp_path / "rows.parquet", tmp_path / "sorted.parquet", "user_id")
    con.close()
    assert source.ids.tolist() == sorted(set(table.column("user_id").to_pylist()))
    on_disk, in_memory = AsOfRows(source, "user_id", ttl), AsOfRows(table, "user_id", ttl)
    starts = np.sort(rng.choice(np.arange(30 * 24) * 3_600 * 10**9 + 1_800 * 10**9, 40, replace=False))
    window = []
    for t_first, t_last in zip(starts[:-1], starts[1:] - 1, strict=True):
        keys = rng.integers(0, 14, size=5)  # 12, 13: entities without any feature row
        expected = _expected(table, keys, int(t_first), int(t_last), ttl)
        for rows in (on_disk, in_memory):
            got = rows.rows_for(keys, int(t_first), int(t_last))
            assert sorted(got.column("value").to_pylist()) == sorted(expected)
            assert got.column("hist").type == pa.list_(pa.int64())
        window.append(on_disk._window.num_rows)
    assert max(window) < 120  # the swept rows were folded: never the 400 rows whole


def test_feature_rows_out_of_time_order_on_disk_are_an_error(tmp_path):
    table = _feature_table(np.random.default_rng(1), rows=50, users=3)
    pq.write_table(table, tmp_path / "unsorted.parquet")
    source = as_of_rows.TimeSorted(tmp_path / "unsorted.parquet", np.unique(table.column("user_id")))
    rows = AsOfRows(source, "user_id", None)
    with pytest.raises(RuntimeError, match="not in time order"):
        rows.rows_for(np.array([0]), 0, 40 * DAY_NS)


def _events(rng: np.random.Generator, rows: int) -> pd.DataFrame:
    """Raw events in random order with ties: same time, same (time, user), even the same (time, user,
    item) with different labels, which only the file order separates."""
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 5, size=rows),
            "item_id": rng.integers(0, 4, size=rows),
            "event_timestamp": pd.to_datetime(rng.integers(0, 20, size=rows) * 10**9, utc=True),
            "label": rng.integers(0, 2, size=rows),
            "event_type": "impression",
        }
    )
    return events


@pytest.mark.parametrize("batch_rows", [1 << 20, 64])
def test_entity_rows_sorted_on_disk_equal_the_in_memory_entity_frames(tmp_path, monkeypatch, batch_rows):
    """Read once, a batch at a time (ties broken by file order across batches too), checked on the way."""
    monkeypatch.setattr(training_set, "ENTITY_BATCH_ROWS", batch_rows)
    events = _events(np.random.default_rng(3), rows=300)
    path = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), path, row_group_size=50)
    con = duckdb_connection("200MB", None)
    checked = training_set.sorted_entity_rows(con, path, tmp_path / "entity.parquet")
    con.close()
    frames = training_set.entity_frames(events)
    for name, expected in frames.items():
        batches = list(training_set.entity_batches(tmp_path / "entity.parquet", name, call_rows=7))
        assert [len(b) for b in batches[:-1]] == [7] * (len(batches) - 1) and 0 < len(batches[-1]) <= 7
        got = pd.concat(batches, ignore_index=True)
        pd.testing.assert_frame_equal(got, expected)
    times = events["event_timestamp"]
    assert (checked.first_time, checked.last_time, checked.rows) == (times.min(), times.max(), 300)


def test_events_breaking_the_contract_name_the_file(tmp_path):
    events = _events(np.random.default_rng(4), rows=20).assign(label=2)
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), tmp_path / "events.parquet")
    con = duckdb_connection("200MB", None)
    with pytest.raises(ValueError, match=r"events\.parquet: column 'label' .* \(events rows 1-20\)$"):
        training_set.sorted_entity_rows(con, tmp_path / "events.parquet", tmp_path / "entity.parquet")
    with pytest.raises(ValueError, match="not found"):
        training_set.sorted_entity_rows(con, tmp_path / "missing.parquet", tmp_path / "entity.parquet")
    con.close()


def test_entity_frames_out_of_time_order_are_an_error():
    frame = pd.DataFrame({"row_id": [0, 1], "event_timestamp": pd.to_datetime([2, 1], unit="s", utc=True)})
    with pytest.raises(ValueError, match="event-time order"):  # within a frame
        list(point_in_time._entity_batches(iter([frame]), call_rows=10))
    at_two, at_one = frame.iloc[[0]], frame.iloc[[1]]
    assert len(list(point_in_time._entity_batches(iter([at_one, at_one, at_two]), call_rows=10))) == 3
    with pytest.raises(ValueError, match="event-time order"):  # from one frame to the next
        list(point_in_time._entity_batches(iter([at_two, at_one]), call_rows=10))


def test_newest_rows_read_in_batches_equal_those_of_the_whole_table(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_store, "NEWEST_BATCH_ROWS", 9)
    table = _feature_table(np.random.default_rng(5), rows=200, users=15)
    pq.write_table(table, tmp_path / "rows.parquet")
    whole, first, last = feature_store._scan_newest(table, "user_id")
    streamed, s_first, s_last = feature_store._scan_newest(tmp_path / "rows.parquet", "user_id")
    assert whole.num_rows == 15 and streamed.equals(whole)
    assert (s_first, s_last) == (first, last)
    empty = feature_store._scan_newest(table.slice(0, 0), "user_id")
    assert empty[0].num_rows == 0 and empty[1:] == (None, None)
