"""Small random training frames with the data contract's columns, built in memory for the model tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from models.config import FeatureGroup, MLPConfig, SparseFeature
from models.registry import ModelsConfig
from tests.conftest import revalidated, shipped_params

STAT_COLUMNS = [
    f"{prefix}_{stat}_{days}d"
    for prefix in ("user", "item")
    for days in (7, 30)
    for stat in ("impressions", "clicks", "ctr")
]


def make_frame(
    n_rows: int = 600,
    n_users: int = 50,
    n_items: int = 80,
    n_categories: int = 8,
    max_history: int = 12,
    seed: int = 0,
    label: str = "random",
) -> pd.DataFrame:
    """A ranking/retrieval training-set frame with every contract column.

    ``label``: "random" (coin flips), or "history_match" (clicked iff the target item's category is
    among the categories of the user's history: a planted item x history interaction).
    """
    rng = np.random.default_rng(seed)
    item_category = rng.integers(0, n_categories, n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    item_ids = rng.choice(n_items, size=n_rows, p=popularity / popularity.sum())
    user_ids = rng.integers(0, n_users, n_rows)
    lengths = rng.integers(0, max_history + 1, n_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat_items = rng.integers(0, n_items, int(lengths.sum()))
    categories = np.array([f"cat{c}" for c in range(n_categories)], dtype=object)
    hist_items = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_items + 1000, type=pa.int64()))
    hist_cats = pa.ListArray.from_arrays(pa.array(offsets), pa.array(categories[item_category[flat_items]]))
    frame = pd.DataFrame(
        {
            "row_id": np.arange(n_rows, dtype=np.int64),
            "user_id": user_ids.astype(np.int64) + 1,
            "item_id": item_ids.astype(np.int64) + 1000,
            "event_timestamp": pd.date_range("2026-06-01", periods=n_rows, freq="min", tz="UTC"),
            "gender": rng.choice(np.array(["F", "M", ""], dtype=object), n_rows),
            "age_bucket": rng.choice([18, 25, 35, 45, 0], n_rows).astype(np.int64),
            "occupation": rng.choice(np.array([f"occ{i}" for i in range(6)], dtype=object), n_rows),
            "zip_prefix": rng.choice(np.array([f"{i:03d}" for i in range(20)], dtype=object), n_rows),
            "category": categories[item_category[item_ids]],
            "brand": np.array([f"brand{i % 7}" for i in range(n_items)], dtype=object)[item_ids],
            "price": rng.gamma(2.0, 20.0, n_rows),
            "hist_item_ids": hist_items.to_pandas(),
            "hist_categories": hist_cats.to_pandas(),
            "hist_length": lengths.astype(np.int64),
        }
    )
    for column in STAT_COLUMNS:
        frame[column] = (
            rng.random(n_rows) if column.endswith(("ctr_7d", "ctr_30d")) else rng.poisson(5, n_rows)
        )
    if label == "random":
        frame["label"] = rng.integers(0, 2, n_rows).astype(np.int64)
    elif label == "history_match":
        target = item_category[item_ids]
        row_of_flat = np.repeat(np.arange(n_rows), lengths)
        match = np.zeros(n_rows, dtype=bool)
        hit = item_category[flat_items] == target[row_of_flat]
        match[row_of_flat[hit]] = True
        noise = rng.random(n_rows) < 0.05
        frame["label"] = (match ^ noise).astype(np.int64)
    else:
        raise ValueError(label)
    return frame


def shipped_models_config() -> ModelsConfig:
    """The ``models:`` section of the shipped params.yaml."""
    return shipped_params().models


def mlp_config(hidden_units: list[int]) -> MLPConfig:
    """An MLP of the given widths, otherwise (activation, norm, dropout) as the shipped two-tower's."""
    return revalidated(shipped_models_config().two_tower.user_tower, hidden_units=hidden_units)


def sparse_feature(name: str, **values: object) -> SparseFeature:
    """A sparse feature declared like the shipped item_id (width, min_count, vocabulary), renamed."""
    return revalidated(shipped_models_config().features.sparse_feature("item_id"), name=name, **values)


def small_models_config(**overrides: object) -> ModelsConfig:
    """The shipped features and models with small towers, so a test trains in a second."""
    base = shipped_models_config()
    mlp = mlp_config([16])
    # the model tests were written for a two-tower whose user group also reads user_id and the id history
    # (params.yaml leaves both out for the default data) and for temperature 0.05 (params.yaml: 0.1)
    user = revalidated(
        base.two_tower.feature_groups[0],
        features=[
            *("user_id", "gender", "age_bucket", "occupation", "zip_prefix", "hist_item_ids"),
            *("hist_categories", "hist_length", *(c for c in STAT_COLUMNS if c.startswith("user_"))),
        ],
    )
    two_tower = revalidated(
        base.two_tower,
        feature_groups=[user, *base.two_tower.feature_groups[1:]],
        user_tower=mlp,
        item_tower=mlp,
        embedding_dim=8,
        temperature=0.05,
    )
    multi_tower = revalidated(
        base.multi_tower,
        towers=[revalidated(t, mlp=mlp) for t in base.multi_tower.towers],
        final=mlp_config([8]),
    )
    din = revalidated(
        base.multi_tower_din,
        towers=[revalidated(t, mlp=mlp) for t in base.multi_tower_din.towers],
        din_towers=[revalidated(t, attn_mlp=mlp_config([16])) for t in base.multi_tower_din.din_towers],
        final=mlp_config([8]),
    )
    dlrm = revalidated(base.dlrm, dense_mlp=mlp_config([16]), final=mlp_config([16]))
    values = {"two_tower": two_tower, "multi_tower": multi_tower, "multi_tower_din": din, "dlrm": dlrm}
    values.update(overrides)  # type: ignore[arg-type]
    return revalidated(base, **values)


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture
def models_config() -> ModelsConfig:
    return small_models_config()


__all__ = ["FeatureGroup", "make_frame", "small_models_config"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CI machine, OpenMP threads fighting for cores make tiny
    models tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
