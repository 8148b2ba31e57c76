"""The streaming form of the source table: every source streams, the batches are the whole tables."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys.contracts import DataContractError
from sources import SOURCES, STREAMS, load_source, stream_source
from tests.conftest import revalidated
from tests.sources.test_movietweetings import write_snapshot


def test_every_source_streams():
    assert list(STREAMS) == list(SOURCES)


def test_the_stream_is_the_loaded_tables_in_batches(tiny_params):
    streamed = stream_source(tiny_params.data, tiny_params.seed)
    loaded = load_source(tiny_params.data, tiny_params.seed)
    pd.testing.assert_frame_equal(streamed.users, loaded["users"])
    pd.testing.assert_frame_equal(streamed.items, loaded["items"])
    pd.testing.assert_frame_equal(pd.concat(list(streamed.events), ignore_index=True), loaded["events"])


def test_a_source_without_its_own_stream_is_one_batch(tiny_params, tmp_path):
    """MovieTweetings reads whole: its stream is its tables, the events one batch."""
    section = revalidated(tiny_params.data.movietweetings, path=write_snapshot(tmp_path))
    data = revalidated(tiny_params.data, source="movietweetings", movietweetings=section.model_dump())
    streamed = stream_source(data, tiny_params.seed)
    batches = list(streamed.events)
    loaded = load_source(data, tiny_params.seed)
    assert len(batches) == 1 and len(batches[0]) == 5
    pd.testing.assert_frame_equal(batches[0], loaded["events"])
    pd.testing.assert_frame_equal(streamed.items, loaded["items"])


def test_streaming_an_unknown_source_names_the_known_ones(tiny_params):
    data = tiny_params.data.model_copy(update={"source": "kaggle"})
    with pytest.raises(DataContractError, match=r"data\.source: unknown source 'kaggle'; known sources: "):
        stream_source(data, tiny_params.seed)
