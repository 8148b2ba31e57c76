"""The events source streamed: batches read and spilled, DuckDB's global pass (duplicates across files,
the order, the same-µs spreading), the same tables whatever the batch size, errors still naming file, row
(in its file) and column with the count over the whole log, and the spill folder removed.

``tests/fixtures/events_log`` is a messy log (two CSV and two Parquet parts, shuffled, 30% duplicates with
their own labels, µs ties) with the tables the whole-log implementation produced for it before the source
streamed (``expected_*.csv``, timestamps as µs since the epoch): the oracle is that output, not code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from recsys.config.schema import EventsSource
from recsys.contracts import DataContractError
from sources import STREAMS, events
from sources.events import read_events, stream_events
from tests.conftest import shipped_params
from tests.sources.test_events import COLUMNS, ITEM_COLUMNS, NOW, T0, USER_COLUMNS, _csv, _log, _parquet

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "events_log"
S = 1_000_000  # µs per second


def _cfg(**changes: Any) -> EventsSource:
    base = shipped_params().data.events.model_dump()
    base |= {"columns": COLUMNS, "items": {"paths": [], "columns": ITEM_COLUMNS}}
    base["users"] = {"paths": [], "columns": USER_COLUMNS}
    return EventsSource.model_validate(base | changes)


def _fixture_cfg(tmp_path: Path, **changes: Any) -> EventsSource:
    logs = FIXTURE / "logs"
    none = dict.fromkeys(["category", "brand", "price", "created_timestamp"])
    items = {"paths": [], "columns": {"item_id": "sku", **none}}
    users_none = dict.fromkeys(["gender", "age_bucket", "occupation", "zip_prefix", "signup_timestamp"])
    users = {"paths": [], "columns": {"user_id": "uid", **users_none}}
    paths = [str(logs / "c*.csv"), str(logs / "p*.parquet")]  # CSV parts first: "last" follows this order
    base = {"paths": paths, "items": items, "users": users, "spill_dir": str(tmp_path / "spill")}
    return _cfg(**(base | changes))


def _as_micros(events: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": events["user_id"],
        "item_id": events["item_id"],
        "event_us": events["event_timestamp"].astype("int64") // 1000,
        "label": events["label"],
    })  # fmt: skip


@pytest.mark.parametrize("duplicate_label", ["any", "last"])
@pytest.mark.parametrize("batch_rows", [7, 1_000])
def test_a_messy_log_gives_the_tables_the_whole_log_reader_gave(tmp_path, duplicate_label, batch_rows):
    cfg = _fixture_cfg(tmp_path, duplicate_label=duplicate_label, batch_rows=batch_rows)
    tables = read_events(cfg, now=NOW)
    expected = pd.read_csv(FIXTURE / f"expected_{duplicate_label}.csv")
    pd.testing.assert_frame_equal(_as_micros(tables["events"]), expected)
    assert list(tables["events"]["event_type"]) == [
        "click" if label else "impression" for label in expected["label"]
    ]
    for name, key, since in (
        ("users", "user_id", "signup_timestamp"),
        ("items", "item_id", "created_timestamp"),
    ):
        known = pd.read_csv(FIXTURE / f"expected_{name}.csv")
        assert list(tables[name][key]) == list(known[key])
        assert list(tables[name][since].astype("int64") // 1000) == list(known["since_us"])
    assert list((tmp_path / "spill").iterdir()) == []  # the spill folder is gone once read


def test_the_fixture_exercises_duplicates_and_ties():
    """The oracle is worth comparing to: copies with other labels, and events the rule had to move."""
    logs = FIXTURE / "logs"
    rows = sum(len(pd.read_csv(p)) for p in logs.glob("*.csv"))
    rows += sum(len(pd.read_parquet(p)) for p in logs.glob("*.parquet"))
    any_, last = (pd.read_csv(FIXTURE / f"expected_{rule}.csv") for rule in ("any", "last"))
    assert rows > len(any_) and (any_["label"] != last["label"]).any()
    assert ((any_["event_us"] % S) > 2).any()  # logged at +0..2 µs: these were spread further


def test_small_batches_across_files_follow_the_stated_rules(tmp_path):
    """Explicit values: copies in other files and batches, ``last`` by listed order, spreading a user's
    same-µs events by item id, later events moved only as far as needed, ordered by time then user."""
    a = _parquet(tmp_path / "a.parquet", _log([(1, 12, 5, 1), (2, 10, 5, 0), (1, 10, 5, 0), (1, 11, 5, 1)]))
    b = _csv(
        tmp_path / "b.csv", [(1, 10, T0 + 5, 1), (1, 13, T0 + 5, 0), (1, 14, T0 + 6, 1), (1, 12, T0 + 5, 0)]
    )
    at = [T0 * S + 5 * S + k for k in range(4)]
    for rule, labels in (("any", [1, 0, 1, 1, 0, 1]), ("last", [1, 0, 1, 0, 0, 1])):
        cfg = _cfg(paths=[str(a), str(b)], duplicate_label=rule, batch_rows=2, spill_dir=str(tmp_path / "s"))
        got = _as_micros(read_events(cfg, now=NOW)["events"])
        assert list(zip(got["user_id"], got["item_id"], strict=True)) == [
            (1, 10), (2, 10), (1, 11), (1, 12), (1, 13), (1, 14)
        ]  # fmt: skip
        # user 1 at T0+5: items 10..13 at +0..3 µs; item 14 logged at T0+6 is not moved (6 s > +4 µs)
        assert list(got["event_us"]) == [at[0], at[0], at[1], at[2], at[3], T0 * S + 6 * S]
        assert list(got["label"]) == labels, rule


def test_a_dense_burst_pushes_later_events_only_as_far_as_needed(tmp_path):
    """Three events at the same µs then one 1 µs later: the last one moves to +3 µs, not further."""
    base = pd.Timestamp(T0, unit="s", tz="UTC")
    df = pd.DataFrame({
        "uid": [1, 1, 1, 1, 1],
        "sku": [30, 20, 10, 40, 50],
        "ts": [base, base, base, base + pd.Timedelta(microseconds=1), base + pd.Timedelta(microseconds=9)],
        "clicked": [0, 0, 0, 0, 0],
    })  # fmt: skip
    path = _parquet(tmp_path / "burst.parquet", df)
    got = _as_micros(read_events(_cfg(paths=[str(path)], batch_rows=2), now=NOW)["events"])
    assert list(got["item_id"]) == [10, 20, 30, 40, 50]
    assert list(got["event_us"] - T0 * S) == [0, 1, 2, 3, 9]


def test_the_stream_is_registered_and_yields_batch_rows_at_a_time(tmp_path):
    cfg = _fixture_cfg(tmp_path, batch_rows=50)
    assert STREAMS["events"] is events.stream
    raw = stream_events(cfg, now=NOW)
    assert len(list((tmp_path / "spill").iterdir())) == 1  # the ordered spill waits for the reader
    batches = list(raw.events)
    assert [len(b) for b in batches] == [50, 50, 20]
    whole = read_events(cfg, now=NOW)
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), whole["events"])
    pd.testing.assert_frame_equal(raw.users, whole["users"])
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_bad_value_in_a_later_batch_names_its_row_in_the_file_and_counts_the_file(tmp_path):
    rows = [(1, 10, T0 + k, 0) for k in range(6)]
    rows[4], rows[5] = (1, "x", T0 + 4, 0), (1, "y", T0 + 5, 0)
    path = _csv(tmp_path / "log.csv", rows)
    cfg = _cfg(paths=[str(path)], batch_rows=2, spill_dir=str(tmp_path / "spill"))
    message = rf"{path}: row 5, column 'sku' \(item_id\): expected an integer, found 'x' \(2 bad row\(s\)\)"
    with pytest.raises(DataContractError, match=message):
        read_events(cfg, now=NOW)
    assert list((tmp_path / "spill").iterdir()) == []  # removed on the error too


def test_future_events_and_unknown_ids_are_counted_over_every_file_and_batch(tmp_path):
    future = T0 + 400 * 86_400  # after NOW
    a = _csv(tmp_path / "a.csv", [(1, 10, T0, 0), (1, 11, T0 + 1, 0), (2, 10, future, 0)])
    b = _csv(tmp_path / "b.csv", [(3, 10, future + 1, 1), (3, 11, T0, 1)])
    cfg = _cfg(paths=[str(a), str(b)], batch_rows=1)
    with pytest.raises(
        DataContractError, match=rf"{a}: row 3, column 'ts' \(timestamp\): .* is in the future .*\(2 bad"
    ):
        read_events(cfg, now=NOW)

    users = _csv(tmp_path / "users.csv", [(1, "F", 30, T0 - 10)], header="uid,sex,age,joined")
    c = _csv(tmp_path / "c.csv", [(1, 10, T0, 0), (2, 10, T0, 0), (1, 11, T0 - 20, 0), (3, 11, T0, 0)])
    cfg = _cfg(paths=[str(c)], batch_rows=1, users={"paths": [str(users)], "columns": USER_COLUMNS})
    with pytest.raises(
        DataContractError,
        match=rf"{c}: row 2, column 'uid' \(user_id\): 2 is not in the user table .*\(2 bad",
    ):
        read_events(cfg, now=NOW)
    ok = _csv(tmp_path / "ok.csv", [(1, 10, T0, 0), (1, 11, T0 - 20, 0), (1, 12, T0 - 30, 0)])
    cfg = cfg.model_copy(update={"paths": [str(ok)]})
    early = rf"{ok}: row 2, column 'ts' \(timestamp\): .* is before its user 1 signed up "
    early += rf"\(.*{users} row 1\) \(2 bad"
    with pytest.raises(DataContractError, match=early):
        read_events(cfg, now=NOW)


def test_the_batch_size_does_not_change_the_tables(tmp_path):
    got = [read_events(_fixture_cfg(tmp_path, batch_rows=n), now=NOW) for n in (1, 13, 10_000)]
    for other in got[1:]:
        for name in ("users", "items", "events"):
            pd.testing.assert_frame_equal(other[name], got[0][name])
    assert np.all(np.diff(got[0]["events"]["event_timestamp"].astype("int64")) >= 0)
