"""The synthetic source: contract-shaped tables whose planted structure is measurable, far above chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sources import synthetic


def test_raw_tables_follow_the_contract(tiny_raw, tiny_params):
    sizes = tiny_params.data.synthetic.sizes()
    events, users, items = tiny_raw["events"], tiny_raw["users"], tiny_raw["items"]
    assert len(events) == sizes.n_events and len(users) == sizes.n_users and len(items) == sizes.n_items
    assert str(events["event_timestamp"].dt.tz) == "UTC"
    assert set(events["label"].unique()) == {0, 1}
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    assert set(events["event_type"].unique()) == {"click", "impression"}
    assert (events["event_type"] == "click").eq(events["label"] == 1).all()
    merged = events.merge(users, on="user_id").merge(items, on="item_id")
    assert len(merged) == len(events)  # every event references a known user and item
    assert (merged["event_timestamp"] > merged["signup_timestamp"]).all()
    assert (merged["event_timestamp"] >= merged["created_timestamp"]).all()


@pytest.fixture(scope="module")
def joined(tiny_raw):
    events = tiny_raw["events"].merge(tiny_raw["items"], on="item_id").merge(tiny_raw["users"], on="user_id")
    return events.sort_values(["user_id", "event_timestamp"], ignore_index=True)


def test_clicks_concentrate_on_each_users_taste_categories(joined, tiny_params):
    n_cat = tiny_params.data.synthetic.sizes().n_categories
    clicks = joined[joined["label"] == 1]
    per_user = clicks.groupby(["user_id", "category"]).size()
    top3_share = per_user.groupby(level=0).apply(lambda s: s.nlargest(3).sum() / s.sum())[
        clicks.groupby("user_id").size() >= 20
    ]
    assert top3_share.median() > 2.5 * (3 / n_cat)  # uniform clicking would give 3 / n_categories


def test_next_click_follows_the_previous_click_far_above_chance(tiny_raw, tiny_params):
    cfg = tiny_params.data.synthetic
    n_cat = cfg.sizes().n_categories
    # rebuild the planted successor table from the generator for the same seed
    rng = np.random.default_rng(tiny_params.seed)
    synthetic._users(rng, cfg.sizes(), cfg, 0, 10 * synthetic.DAY_S)
    _, world = synthetic._items(rng, cfg.sizes(), cfg, 0, 10 * synthetic.DAY_S)
    clicks = tiny_raw["events"][tiny_raw["events"]["label"] == 1].merge(tiny_raw["items"], on="item_id")
    clicks = clicks.sort_values(["user_id", "event_timestamp"], ignore_index=True)
    cat = clicks["category"].str[4:].astype(int).to_numpy()
    same_user = clicks["user_id"].to_numpy()[1:] == clicks["user_id"].to_numpy()[:-1]
    prev, nxt = cat[:-1][same_user], cat[1:][same_user]
    follows = (world.successors[prev] == nxt[:, None]).any(axis=1).mean()
    assert follows > 3 * (2 / n_cat)


def test_item_popularity_is_heavy_tailed(tiny_raw):
    counts = tiny_raw["events"]["item_id"].value_counts()
    top = counts.iloc[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top > 0.35  # the top 10% of items get far more than 10% of impressions


def test_price_sensitivity_depends_on_age(joined):
    joined = joined.assign(
        expensive=joined["price"] > joined.groupby("category")["price"].transform("median")
    )
    young = joined[joined["age_bucket"] <= 25]
    older = joined[joined["age_bucket"] >= 45]

    def penalty(df: pd.DataFrame) -> float:
        ctr = df.groupby("expensive")["label"].mean()
        return ctr[False] / ctr[True]

    assert penalty(young) > 1.15 * penalty(older)


def test_cold_start_items_arrive_during_the_period_and_are_never_shown_early(tiny_raw, tiny_params):
    start = pd.Timestamp(tiny_params.data.synthetic.start_date)
    items = tiny_raw["items"]
    assert (items["created_timestamp"] > start).mean() > 0.1
    shown = tiny_raw["events"].merge(items, on="item_id")
    assert (shown["event_timestamp"] >= shown["created_timestamp"]).all()
    late = shown[shown["created_timestamp"] > start]
    assert late["item_id"].nunique() > 10  # new items do get impressions


def test_impressions_include_non_clicks(tiny_raw):
    ctr = tiny_raw["events"]["label"].mean()
    assert 0.03 < ctr < 0.5
