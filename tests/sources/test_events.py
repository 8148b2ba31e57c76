"""The events source: generated Parquet and CSV logs (globs, a column mapping, label or rating threshold),
item and user tables, the duplicate and ordering rules, every check naming file and column, the same logs
read from s3:// on the loopback S3 server, and the ingest step selecting the source by params."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from recsys.config import DataConfig, load_params
from recsys.config.schema import EventsSource
from recsys.contracts import DataContractError, check_raw_table, read_raw_tables
from sources import SOURCES
from sources.events import read_events
from tests.conftest import REPO_ROOT, shipped_params

T0 = 1_709_251_200  # 2024-03-01T00:00:00Z
NOW = pd.Timestamp("2024-06-01", tz="UTC")
# the team's own column names
COLUMNS = {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "label": "clicked", "rating": None}
ITEM_COLUMNS = {
    "item_id": "sku",
    "category": "cat",
    "brand": None,
    "price": "price",
    "created_timestamp": "listed",
}
USER_COLUMNS = {
    "user_id": "uid",
    "gender": "sex",
    "age_bucket": "age",
    "occupation": None,
    "zip_prefix": None,
    "signup_timestamp": "joined",
}


def _cfg(**changes: Any) -> EventsSource:
    """The shipped data.events with the team's mapping and ``changes`` (nested sections as dicts)."""
    base = shipped_params().data.events.model_dump()
    base["columns"] = COLUMNS
    base["items"] = {"paths": [], "columns": ITEM_COLUMNS}
    base["users"] = {"paths": [], "columns": USER_COLUMNS}
    return EventsSource.model_validate(base | changes)


def _log(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    """(uid, sku, seconds after T0, clicked) rows as a typed frame: timestamps as a timestamp type."""
    df = pd.DataFrame(rows, columns=["uid", "sku", "ts", "clicked"])
    df["ts"] = pd.to_datetime(T0 + df["ts"], unit="s", utc=True)
    return df


def _csv(path: Path, rows: list[tuple[Any, ...]], header: str = "uid,sku,ts,clicked") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def _parquet(path: Path, df: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


@pytest.fixture()
def logs(tmp_path) -> Path:
    """Two Parquet parts and one CSV part (unix seconds, out of order), plus a Spark marker file."""
    root = tmp_path / "logs"
    _parquet(root / "day=1" / "part-0.parquet", _log([(1, 10, 0, 0), (1, 11, 60, 1), (2, 10, 30, 1)]))
    _parquet(root / "day=2" / "part-0.parquet", _log([(2, 12, 86_400, 0)]))
    _csv(root / "late.csv", [(3, 11, T0 + 200, "true"), (1, 12, T0 + 100, "false")])
    (root / "day=1" / "_SUCCESS").write_text("")
    return root


def test_parquet_and_csv_parts_by_glob_become_one_ordered_log(logs):
    cfg = _cfg(paths=[f"{logs}/**/*.parquet", f"{logs}/*.csv"])
    tables = read_events(cfg, now=NOW)
    events = tables["events"]
    assert list(zip(events["user_id"], events["item_id"], events["label"], strict=True)) == [
        (1, 10, 0), (2, 10, 1), (1, 11, 1), (1, 12, 0), (3, 11, 1), (2, 12, 0),
    ]  # fmt: skip
    assert events["event_timestamp"].is_monotonic_increasing
    assert events["event_timestamp"].iloc[-1] == pd.Timestamp(T0 + 86_400, unit="s", tz="UTC")
    assert list(events["event_type"]) == ["impression", "click", "click", "impression", "click", "impression"]
    # no item or user table: the catalogue is the ids seen, known from their first event
    items = tables["items"].set_index("item_id")
    assert list(items.index) == [10, 11, 12] and set(items["category"]) == {"unknown"}
    assert items.loc[11, "created_timestamp"] == pd.Timestamp(T0 + 60, unit="s", tz="UTC")
    assert list(tables["users"]["user_id"]) == [1, 2, 3]
    for name, table in tables.items():
        check_raw_table(name, table, name)


def test_a_rating_column_is_labelled_by_its_threshold(tmp_path):
    path = _csv(
        tmp_path / "r.csv", [(1, 10, T0, 5), (1, 11, T0 + 1, 3.5), (2, 10, T0 + 2, 4)], "uid,sku,ts,stars"
    )
    cfg = _cfg(paths=[str(path)], columns=COLUMNS | {"label": None, "rating": "stars"}, positive_rating=4)
    events = read_events(cfg, now=NOW)["events"]
    assert list(events["label"]) == [1, 0, 1]


def test_millisecond_and_iso_timestamps(tmp_path):
    ms = _csv(tmp_path / "ms.csv", [(1, 10, T0 * 1000 + 5, 1)])
    iso = _csv(tmp_path / "iso.csv", [(2, 10, "2024-03-01T01:00:00+01:00", 0)])
    events = read_events(_cfg(paths=[str(ms)], timestamp_unit="ms"), now=NOW)["events"]
    assert events["event_timestamp"].iloc[0] == pd.Timestamp(T0 * 1000 + 5, unit="ms", tz="UTC")
    events = read_events(_cfg(paths=[str(iso)]), now=NOW)["events"]
    assert events["event_timestamp"].iloc[0] == pd.Timestamp(T0, unit="s", tz="UTC")  # 01:00+01:00 = 00:00Z


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"columns": COLUMNS | {"rating": "stars"}, "positive_rating": 4}, "exactly one of label"),
        ({"positive_rating": 4}, "positive_rating is set exactly when"),
        ({"bounds": {"numeric": {"height": [0, 1]}, "categories": {}}}, "unknown column"),
        ({"bounds": {"numeric": {"price": [5, 1]}, "categories": {}}}, "low 5.0 exceeds high 1.0"),
    ],
)
def test_the_config_rejects_an_ambiguous_mapping_or_bounds(changes, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(**changes)


def _catalogue(tmp_path: Path) -> tuple[Path, Path]:
    items = pd.DataFrame({
        "sku": [10, 11, 12],
        "cat": ["shoes", None, "hats"],
        "price": [49.5, 10.0, 0.0],
        "listed": pd.to_datetime([T0 - 10, T0 - 10, T0 + 50], unit="s", utc=True),
    })  # fmt: skip
    users = pd.DataFrame({
        "uid": [1, 2, 3, 4],
        "sex": ["F", "M", None, "F"],
        "age": [25, 35, 45, 18],
        "joined": pd.to_datetime([T0 - 5, T0 - 5, T0 - 5, T0 + 500], unit="s", utc=True),
    })  # fmt: skip
    return _parquet(tmp_path / "items.parquet", items), _parquet(tmp_path / "users.parquet", users)


def test_item_and_user_tables_bring_content_and_profiles(logs, tmp_path):
    items_at, users_at = _catalogue(tmp_path)
    cfg = _cfg(
        paths=[f"{logs}/**/*.parquet", f"{logs}/*.csv"],
        items={"paths": [str(items_at)], "columns": ITEM_COLUMNS},
        users={"paths": [str(users_at)], "columns": USER_COLUMNS},
    )
    tables = read_events(cfg, now=NOW)
    items, users = tables["items"].set_index("item_id"), tables["users"].set_index("user_id")
    assert list(items["category"]) == ["shoes", "unknown", "hats"]  # a null category is "unknown"
    assert list(items["brand"]) == ["unknown"] * 3  # brand not mapped
    assert items.loc[10, "price"] == 49.5
    assert items.loc[12, "created_timestamp"] == pd.Timestamp(T0 + 50, unit="s", tz="UTC")
    assert list(users.index) == [1, 2, 3, 4]  # user 4 has no event yet: still a user
    assert list(users["gender"]) == ["F", "M", "unknown", "F"] and users.loc[2, "age_bucket"] == 35
    assert set(users["occupation"]) == {"unknown"}


def test_duplicates_and_simultaneous_events_follow_the_stated_rule(tmp_path):
    rows = [(1, 11, 5, 0), (1, 10, 5, 1), (1, 10, 5, 0), (1, 12, 5, 0), (2, 10, 3, 0), (1, 13, 0, 1)]
    path = _parquet(tmp_path / "d.parquet", _log(rows))  # out of order, one exact duplicate (1, 10, 5)
    events = read_events(_cfg(paths=[str(path)]), now=NOW)["events"]
    assert len(events) == 5  # the duplicate is one event
    ones = events[events["user_id"] == 1].set_index("item_id")
    assert ones.loc[10, "label"] == 1  # "any": a positive copy wins
    # user 1's three events at T0+5 are spread 1 µs apart by item id; the earlier event stays where it was
    t5 = pd.Timestamp(T0 + 5, unit="s", tz="UTC")
    assert [ones.loc[i, "event_timestamp"] - t5 for i in (10, 11, 12)] == [
        pd.Timedelta(microseconds=k) for k in range(3)
    ]
    assert ones.loc[13, "event_timestamp"] == pd.Timestamp(T0, unit="s", tz="UTC")
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    assert events["event_timestamp"].is_monotonic_increasing

    last = read_events(_cfg(paths=[str(path)], duplicate_label="last"), now=NOW)["events"]
    assert last.set_index(["user_id", "item_id"]).loc[(1, 10), "label"] == 0  # the last copy read


def _messy(tmp_path: Path, case: str) -> tuple[dict[str, Any], str, str]:
    """A config whose data breaks one check, the file it must name and the column (or phrase)."""
    good = [(1, 10, T0, 1), (2, 11, T0 + 1, 0)]
    items_at, users_at = _catalogue(tmp_path)
    tables = {
        "items": {"paths": [str(items_at)], "columns": ITEM_COLUMNS},
        "users": {"paths": [str(users_at)], "columns": USER_COLUMNS},
    }
    if case == "missing column":
        path = _csv(tmp_path / "a.csv", [(1, 10, T0)], "uid,sku,ts")
        return {"paths": [str(path)]}, str(path), r"'clicked' \(label\) not found"
    if case == "bad id":
        path = _csv(tmp_path / "a.csv", [*good, ("u3", 10, T0, 1)])
        return {"paths": [str(path)]}, str(path), r"row 3, column 'uid' \(user_id\): expected an integer"
    if case == "bad timestamp":
        path = _csv(tmp_path / "a.csv", [*good, (3, 10, "yesterday", 1)])
        return {"paths": [str(path)]}, str(path), r"row 3, column 'ts' \(timestamp\): expected a timestamp"
    if case == "bad label":
        path = _csv(tmp_path / "a.csv", [*good, (3, 10, T0, 2)])
        return {"paths": [str(path)]}, str(path), r"row 3, column 'clicked' \(label\): expected 0/1"
    if case == "future":
        path = _csv(tmp_path / "a.csv", [*good, (3, 10, int(NOW.timestamp()) + 1, 1)])
        return {"paths": [str(path)]}, str(path), r"row 3, column 'ts' \(timestamp\): .* is in the future"
    if case == "before the item exists":
        path = _csv(tmp_path / "a.csv", [*good, (3, 12, T0 + 49, 1)])  # item 12 is listed at T0+50
        return (
            {"paths": [str(path)], **tables},
            str(path),
            r"row 3, column 'ts' .* before its item 12 created \(.*items\.parquet row 3\)",
        )
    if case == "before the user signed up":
        path = _csv(tmp_path / "a.csv", [*good, (4, 10, T0 + 499, 1)])  # user 4 joined at T0+500
        return (
            {"paths": [str(path)], **tables},
            str(path),
            r"row 3, column 'ts' .* before its user 4 signed up \(.*users\.parquet row 4\)",
        )
    if case == "unknown item":
        path = _csv(tmp_path / "a.csv", [*good, (3, 99, T0, 1)])
        return (
            {"paths": [str(path)], **tables},
            str(path),
            "row 3, column 'sku' .*99 is not in the item table",
        )
    if case == "rating out of range":
        path = _csv(tmp_path / "a.csv", [(1, 10, T0, 4), (2, 11, T0, 11)], "uid,sku,ts,stars")
        changes = {"paths": [str(path)], "columns": COLUMNS | {"label": None, "rating": "stars"}}
        return (
            changes | {"positive_rating": 4},
            str(path),
            r"row 2, column 'stars' \(rating\): 11.0 is outside \[0, 10\]",
        )
    if case == "price out of range":
        bounds = {"numeric": {"price": [0, 40]}, "categories": {}}
        return (
            {"paths": [str(_csv(tmp_path / "a.csv", good))], **tables, "bounds": bounds},
            str(items_at),
            (r"row 1, column 'price' \(price\): 49.5 is outside \[0, 40\]"),
        )
    if case == "unknown category":
        bounds = {"numeric": {}, "categories": {"category": ["shoes", "bags"]}}
        return (
            {"paths": [str(_csv(tmp_path / "a.csv", good))], **tables, "bounds": bounds},
            str(items_at),
            (r"row 3, column 'cat' \(category\): 'hats' is not one of"),
        )
    if case == "duplicate item":
        again = _parquet(tmp_path / "more_items.parquet", pd.read_parquet(items_at).iloc[[1]])
        tables["items"]["paths"].append(str(again))
        return (
            {"paths": [str(_csv(tmp_path / "a.csv", good))], **tables},
            str(again),
            "row 1: item_id 11 is listed again",
        )
    raise AssertionError(case)


CASES = [
    "missing column", "bad id", "bad timestamp", "bad label", "future", "before the item exists",
    "before the user signed up", "unknown item", "rating out of range", "price out of range",
    "unknown category", "duplicate item",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_each_check_names_the_file_and_the_column(tmp_path, case):
    changes, file, message = _messy(tmp_path, case)
    with pytest.raises(DataContractError, match=message) as err:
        read_events(_cfg(**changes), now=NOW)
    assert str(err.value).startswith(f"{file}: ")


def test_large_ids_stay_exact_and_an_empty_log_is_an_error(tmp_path):
    big = 2**60 + 1  # beyond float64's exact integers
    path = _parquet(tmp_path / "big.parquet", _log([(big, big, 0, 1)]))
    tables = read_events(_cfg(paths=[str(path)]), now=NOW)
    assert tables["events"]["user_id"].iloc[0] == big and tables["items"]["item_id"].iloc[0] == big
    empty = _parquet(tmp_path / "empty.parquet", _log([(1, 1, 0, 1)]).iloc[:0])
    with pytest.raises(DataContractError, match=r"data\.events\.paths: .* hold no events"):
        read_events(_cfg(paths=[str(empty)]), now=NOW)


def test_paths_that_match_nothing_or_have_an_unknown_format_are_named(tmp_path):
    with pytest.raises(
        DataContractError, match=r"data\.events\.paths: '.*/none/\*\.parquet' matches no file"
    ):
        read_events(_cfg(paths=[f"{tmp_path}/none/*.parquet"]), now=NOW)
    odd = tmp_path / "log.json"
    odd.write_text("{}")
    with pytest.raises(DataContractError, match=r"log\.json: unknown format"):
        read_events(_cfg(paths=[str(odd)]), now=NOW)
    torn = tmp_path / "torn.parquet"
    torn.write_bytes(b"PAR1 not really")
    with pytest.raises(DataContractError, match=r"torn\.parquet: not a readable parquet file"):
        read_events(_cfg(paths=[str(torn)]), now=NOW)


def test_gzipped_csv_is_read_by_its_suffix(tmp_path):
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(b"uid,sku,ts,clicked,extra\n7,70,1709251200,1,ignored\n"))
    events = read_events(_cfg(paths=[str(path)]), now=NOW)["events"]
    assert list(zip(events["user_id"], events["item_id"], events["label"], strict=True)) == [(7, 70, 1)]


def test_the_same_logs_read_from_s3(logs, tmp_path, s3_env):
    client = s3_env.client()
    for path in sorted(p for p in logs.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_env.name, f"team/logs/{path.relative_to(logs)}")
    items_at, _ = _catalogue(tmp_path)
    client.upload_file(str(items_at), s3_env.name, "team/items.parquet")
    local = _cfg(
        paths=[f"{logs}/**/*.parquet", f"{logs}/*.csv"],
        items={"paths": [str(items_at)], "columns": ITEM_COLUMNS},
    )
    remote = _cfg(
        paths=[s3_env.uri("team/logs/**/*.parquet"), s3_env.uri("team/logs/*.csv")],
        items={"paths": [s3_env.uri("team/items.parquet")], "columns": ITEM_COLUMNS},
    )
    expected, got = read_events(local, now=NOW), read_events(remote, now=NOW)
    for name in ("users", "items", "events"):
        pd.testing.assert_frame_equal(got[name], expected[name])
    assert len(got["events"]) == 6

    missing = s3_env.uri("team/nothing.parquet")
    with pytest.raises(DataContractError, match=f"{missing}: file not found"):
        read_events(_cfg(paths=[missing]), now=NOW)


def test_ingest_writes_the_raw_tables_from_an_events_config(logs, tmp_path):
    from components import ingest

    overrides = {
        "data.source": "events",
        "data.events.paths": [f"{logs}/**/*.parquet", f"{logs}/*.csv"],
        "data.events.columns": COLUMNS,
    }
    params = load_params(REPO_ROOT / "params.yaml", overrides=overrides)
    assert "events" in SOURCES
    ingest.run(params.data, params.seed, tmp_path / "raw")
    raw = read_raw_tables(tmp_path / "raw")
    assert len(raw["events"]) == 6 and np.array_equal(raw["users"]["user_id"], [1, 2, 3])
    assert raw["events"]["label"].sum() == 3


def test_the_shipped_params_keep_the_synthetic_default():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.data.events.columns.label is not None and params.data.events.positive_rating is None


def test_the_readme_example_is_a_valid_events_config():
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Your own events", 1)[1]
    example = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])["data"]
    shipped = shipped_params().data.model_dump(mode="json")
    merged = shipped | {"source": example["source"], "events": shipped["events"] | example["events"]}
    data = DataConfig.model_validate(merged)
    assert data.source == "events" and data.events.paths[0].startswith("s3://")
    assert data.events.items.columns.created_timestamp == "listed_at"
