"""Ingest of a streamed source: each event batch cut, checked and written as row groups, all or nothing."""

from __future__ import annotations

import functools
import hashlib

import pandas as pd
import pyarrow.parquet as pq
import pytest

from components import ingest
from recsys.contracts import DataContractError, read_raw_tables
from sources import synthetic

SMALL_BLOCK = {"block_events": 8_000, "block_users": 60}  # tiny (30k events, 400 users) in several blocks


@pytest.fixture
def small_blocks(monkeypatch):
    """The synthetic source streamed in small blocks; returns the blocks it streams for a params' seed."""
    real = synthetic.event_blocks
    monkeypatch.setattr(synthetic, "event_blocks", functools.partial(real, **SMALL_BLOCK))

    def blocks(params) -> list[pd.DataFrame]:
        world = synthetic.world(params.data.synthetic, params.seed)
        return list(real(world, params.seed, **SMALL_BLOCK))

    return blocks


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_each_block_is_written_as_row_groups(tiny_params, tiny_raw, small_blocks, tmp_path):
    blocks = small_blocks(tiny_params)
    ingest.run(tiny_params.data, tiny_params.seed, tmp_path)
    events = pq.ParquetFile(tmp_path / "events.parquet")
    sizes = [events.metadata.row_group(i).num_rows for i in range(events.num_row_groups)]
    assert sizes == [len(block) for block in blocks] and len(sizes) > 3
    back = read_raw_tables(tmp_path)
    pd.testing.assert_frame_equal(back["events"], pd.concat(blocks, ignore_index=True))
    for name in ("users", "items"):  # the entity tables do not depend on the blocks
        pd.testing.assert_frame_equal(back[name], tiny_raw[name])


def test_a_large_batch_is_cut_into_row_groups_of_batch_rows(tiny_raw, tmp_path):
    entities = {name: tiny_raw[name] for name in ("users", "items")}
    events = tiny_raw["events"]
    ingest.write_raw_tables(
        entities, [events.iloc[:10_000], events.iloc[10_000:]], tmp_path, batch_rows=7_000
    )
    parquet = pq.ParquetFile(tmp_path / "events.parquet")
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sizes == [7_000, 3_000, 7_000, 7_000, 6_000]
    pd.testing.assert_frame_equal(read_raw_tables(tmp_path)["events"], events)


def _bad_label(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.assign(label=batch["label"] * 2)


def _unknown_item(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.assign(item_id=batch["item_id"] + 10**9)


def _no_column(batch: pd.DataFrame) -> pd.DataFrame:
    return batch.drop(columns=["event_type"])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_bad_label, "column 'label' of table 'events' must be 0 or 1"),
        (_unknown_item, "refer to item_id values missing from table 'items'"),
        (_no_column, "missing column(s) ['event_type']"),
    ],
    ids=["label", "reference", "column"],
)
def test_a_bad_later_batch_fails_naming_its_rows_and_writes_nothing(
    tiny_params, tiny_raw_dir, small_blocks, tmp_path, monkeypatch, corrupt, message
):
    for p in tiny_raw_dir.glob("*.parquet"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    before = _digests(tmp_path)
    blocks = small_blocks(tiny_params)
    blocked = synthetic.event_blocks

    def third_bad(world, seed):
        for index, block in enumerate(blocked(world, seed)):
            yield corrupt(block) if index == 2 else block

    monkeypatch.setattr(synthetic, "event_blocks", third_bad)
    with pytest.raises(DataContractError) as err:
        ingest.run(tiny_params.data, tiny_params.seed, tmp_path)
    first = len(blocks[0]) + len(blocks[1]) + 1
    rows = f"(events rows {first:,}-{first + len(blocks[2]) - 1:,})"
    assert str(err.value).startswith("source 'synthetic': ") and str(err.value).endswith(rows)
    assert message in str(err.value)
    assert _digests(tmp_path) == before  # the earlier batches were staged only: nothing replaced, no temp


def test_data_until_cuts_every_batch_as_the_whole_log(tiny_params, small_blocks, tmp_path):
    events = pd.concat(small_blocks(tiny_params), ignore_index=True)
    times = events["event_timestamp"]
    day = times.min().normalize() + (times.max() - times.min()).ceil("D") / 2
    data = tiny_params.data.model_copy(update={"until": day.to_pydatetime()})
    ingest.run(data, tiny_params.seed, tmp_path / "raw")
    raw = read_raw_tables(tmp_path / "raw")
    expected = events[times < day].reset_index(drop=True)
    assert 0 < len(expected) < len(events)
    pd.testing.assert_frame_equal(raw["events"], expected)
    assert (raw["users"]["signup_timestamp"] < day).all() and (raw["items"]["created_timestamp"] < day).all()
    before_anything = data.model_copy(update={"until": (times.min() - pd.Timedelta(days=1)).to_pydatetime()})
    with pytest.raises(DataContractError, match=r"data\.until: .* keeps no events \(the first is at "):
        ingest.run(before_anything, tiny_params.seed, tmp_path / "none")
    assert not (tmp_path / "none").exists()  # a failed first run leaves no folder either
