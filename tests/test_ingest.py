"""Ingest: determinism, contract checks, and all-or-nothing writes."""

from __future__ import annotations

import hashlib

import pandas as pd
import pyarrow.parquet as pq
import pytest

from components import ingest
from recsys.contracts import DataContractError, check_raw_table, read_raw_tables
from tests.conftest import write_params


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*"))}


def test_same_seed_gives_byte_identical_parquet(tiny_params, tiny_raw_dir, tmp_path):
    ingest.run(tiny_params.data, tiny_params.seed, tmp_path)
    assert _digests(tmp_path) == _digests(tiny_raw_dir)
    assert set(_digests(tmp_path)) == {"users.parquet", "items.parquet", "events.parquet"}


def test_other_seed_gives_other_data(tiny_params, tiny_raw, tmp_path):
    ingest.run(tiny_params.data, tiny_params.seed + 1, tmp_path)
    other = pd.read_parquet(tmp_path / "events.parquet")
    assert not other["item_id"].equals(tiny_raw["events"]["item_id"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t["events"].drop(columns=["label"]), "missing column(s) ['label']"),
        (lambda t: t["events"].iloc[0:0], "is empty"),
        (lambda t: t["events"].assign(label=t["events"]["label"] * 2), "must be 0 or 1"),
        (lambda t: t["events"].assign(user_id=t["events"]["user_id"].astype(str)), "'user_id'"),
        (
            lambda t: t["events"].assign(event_timestamp=t["events"]["event_timestamp"].dt.tz_localize(None)),
            "UTC timestamp",
        ),
    ],
)
def test_contract_violations_name_file_and_column(tiny_raw, mutate, message):
    with pytest.raises(DataContractError) as err:
        check_raw_table("events", mutate(tiny_raw), "events.parquet")
    assert "events.parquet" in str(err.value) and message in str(err.value)


def test_failed_ingest_keeps_previous_tables_and_leaves_no_partial_file(
    tiny_params, tiny_raw_dir, tmp_path, monkeypatch
):
    for p in tiny_raw_dir.glob("*.parquet"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    before = _digests(tmp_path)
    params = tiny_params
    # fail while writing the second table: nothing may be renamed into place
    real_write = pq.write_table
    calls = {"n": 0}

    def failing_write(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ingest.run(params.data, params.seed + 7, tmp_path)
    assert _digests(tmp_path) == before  # old tables intact, no temp files left behind


def test_source_with_dangling_reference_is_rejected_before_writing(tiny_params, tmp_path, monkeypatch):
    from sources import synthetic

    real = synthetic._world

    def broken(cfg, seed):
        generated = real(cfg, seed)
        generated.item_table = generated.item_table.iloc[1:]
        return generated

    monkeypatch.setattr(synthetic, "_world", broken)
    with pytest.raises(DataContractError, match="missing from table 'items'"):
        ingest.run(tiny_params.data, tiny_params.seed, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reading_a_missing_or_corrupt_raw_file_names_it(tiny_raw_dir, tmp_path):
    with pytest.raises(DataContractError, match=r"users\.parquet.*not found"):
        read_raw_tables(tmp_path)
    for p in tiny_raw_dir.glob("*.parquet"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataContractError, match=r"items\.parquet: not a readable parquet file"):
        read_raw_tables(tmp_path)


def test_reading_a_truncated_raw_file_names_it(tiny_raw_dir, tmp_path):
    for p in tiny_raw_dir.glob("*.parquet"):
        data = p.read_bytes()
        (tmp_path / p.name).write_bytes(data[: len(data) // 2] if p.name == "events.parquet" else data)
    with pytest.raises(DataContractError, match=r"events\.parquet: not a readable parquet file"):
        read_raw_tables(tmp_path)


def _movielens_params(tmp_path, **movielens):
    changes = {"data.source": "movielens"}
    changes |= {f"data.movielens.{key}": value for key, value in movielens.items()}
    return write_params(tmp_path / "params.yaml", changes)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            lambda d: _movielens_params(d, path=str(d / "nowhere.zip")),
            "nowhere.zip: MovieLens source not found",
        ),
        (
            lambda d: _movielens_params(
                d, url=(d / "mirror.zip").as_uri(), sha256="0" * 64, cache_dir=str(d / "cache")
            ),
            "mirror.zip: SHA-256 mismatch",
        ),
        (lambda d: write_params(d / "params.yaml", {"data.source": "kaggle"}), "data.source"),
    ],
    ids=["missing_source", "checksum", "bad_params"],
)
def test_cli_prints_one_line_for_expected_errors_and_keeps_stored_tables(tmp_path, capsys, params, message):
    (tmp_path / "mirror.zip").write_bytes(b"not the published archive")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "events.parquet").write_bytes(b"previous tables")
    assert ingest.main(["--params", str(params(tmp_path)), "--raw-dir", str(raw)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ingest: ") and message in err and "Traceback" not in err
    assert [p.name for p in raw.iterdir()] == ["events.parquet"]
    assert (raw / "events.parquet").read_bytes() == b"previous tables"


def test_data_until_keeps_what_was_known_before_the_day(tiny_params, tmp_path):
    """Two scheduled runs for two days train on different data: ingest cuts every table at data.until."""
    from sources import load_source

    everything = load_source(tiny_params.data, tiny_params.seed)
    times = everything["events"]["event_timestamp"]
    day = times.min().normalize() + (times.max() - times.min()).ceil("D") / 2
    for name, until in (("earlier", day), ("later", day + pd.Timedelta(days=7))):
        data = tiny_params.data.model_copy(update={"until": until.to_pydatetime()})
        ingest.run(data, tiny_params.seed, tmp_path / name)
    earlier, later = read_raw_tables(tmp_path / "earlier"), read_raw_tables(tmp_path / "later")
    assert earlier["events"]["event_timestamp"].max() < day <= later["events"]["event_timestamp"].max()
    assert 0 < len(earlier["events"]) < len(later["events"]) < len(everything["events"])
    assert (earlier["items"]["created_timestamp"] < day).all()
    assert (earlier["users"]["signup_timestamp"] < day).all()
    before_anything = tiny_params.data.model_copy(
        update={"until": (times.min() - pd.Timedelta(days=1)).to_pydatetime()}
    )
    with pytest.raises(DataContractError, match=r"data\.until: .* keeps no events"):
        ingest.run(before_anything, tiny_params.seed, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_events_are_written_batch_rows_at_a_time(tiny_raw, tmp_path):
    """The events go to Arrow and disk a batch at a time (a row group each), never as a second whole copy;
    the file reads back as the same frame."""
    tables = {name: tiny_raw[name] for name in ("users", "items", "events")}
    ingest.write_raw_tables(
        {"users": tables["users"], "items": tables["items"]}, [tables["events"]], tmp_path, 7_000
    )
    events = pq.ParquetFile(tmp_path / "events.parquet")
    sizes = [events.metadata.row_group(i).num_rows for i in range(events.num_row_groups)]
    n = len(tables["events"])
    assert sizes == [7_000] * (n // 7_000) + [n % 7_000] * bool(n % 7_000) and len(sizes) > 3
    back = read_raw_tables(tmp_path)
    for name, df in tables.items():
        pd.testing.assert_frame_equal(back[name], df)
