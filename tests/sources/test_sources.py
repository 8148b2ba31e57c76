"""The table of sources: it lists exactly what the config accepts, and load_source dispatches on it."""

from __future__ import annotations

import typing

import pytest

from recsys.config import DataConfig
from recsys.contracts import DataContractError
from sources import SOURCES, load_source, synthetic


def test_the_table_lists_exactly_the_sources_the_config_accepts():
    """A source added to the schema but not to the table (or the reverse) would fail only at run time."""
    accepted = typing.get_args(DataConfig.model_fields["source"].annotation)
    assert sorted(SOURCES) == sorted(accepted)


def test_load_source_calls_the_selected_reader(tiny_params):
    tables = load_source(tiny_params.data, tiny_params.seed)
    expected = synthetic.generate(tiny_params.data.synthetic, tiny_params.seed)
    assert tables.keys() == {"users", "items", "events"}
    for name, table in expected.items():
        assert tables[name].equals(table), name


def test_an_unknown_source_fails_naming_it_and_the_known_ones(tiny_params):
    # the schema rejects an unknown name on load; a programmatic copy skips validation and reaches here
    data = tiny_params.data.model_copy(update={"source": "kaggle"})
    with pytest.raises(DataContractError, match=r"data\.source") as err:
        load_source(data, tiny_params.seed)
    assert "'kaggle'" in str(err.value)
    assert all(name in str(err.value) for name in SOURCES)
