"""The LightGBM CTR baseline (models/gbdt_baseline.py) on small synthetic ranking frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.baselines import OneHotLogisticRegression
from models.gbdt_baseline import GBDTBaseline, feature_columns
from models.metrics import auc
from tests.conftest import shipped_params

SPARSE = ["user_id", "item_id", "gender", "category"]
DENSE = ["price", "hist_length"]
N_USERS, N_ITEMS = 300, 60
FAST = {"max_rounds": 300, "early_stopping": 20}


def _frame(n_rows: int, seed: int, label: str = "interaction") -> pd.DataFrame:
    """Impressions of a fixed universe of users (with a gender) and items (with a category).

    ``label="interaction"``: clicks are likely iff (gender F and category c1) or (gender M and category
    c2), plus a price effect. Every gender and every category has the same click rate on its own, so
    ``logit = b + w_user + w_item`` cannot express it. ``label="noise"``: coin flips (p = 0.2).
    """
    universe = np.random.default_rng(12345)
    gender = universe.choice(["F", "M"], N_USERS)
    category = universe.choice(["c0", "c1", "c2", "c3"], N_ITEMS)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, n_rows)
    items = rng.integers(0, N_ITEMS, n_rows)
    price = rng.uniform(0, 100, n_rows)
    frame = pd.DataFrame(
        {
            "user_id": users.astype(np.int64),
            "item_id": (items + 1000).astype(np.int64),
            "gender": gender[users].astype(object),
            "category": category[items].astype(object),
            "price": price,
            "hist_length": rng.integers(0, 30, n_rows).astype(np.int64),
            "hist_item_ids": [list(rng.integers(1000, 1000 + N_ITEMS, 3)) for _ in range(n_rows)],
        }
    )
    if label == "noise":
        p = np.full(n_rows, 0.2)
    else:
        hit = ((frame["gender"] == "F") & (frame["category"] == "c1")) | (
            (frame["gender"] == "M") & (frame["category"] == "c2")
        )
        logit = -2.5 + 3.0 * hit.to_numpy() + 1.5 * (price - 50) / 50
        p = 1 / (1 + np.exp(-logit))
    frame["label"] = (rng.random(n_rows) < p).astype(np.int64)
    return frame


@pytest.fixture(scope="module")
def splits() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return _frame(4000, seed=1), _frame(1500, seed=2), _frame(1500, seed=3)


@pytest.fixture(scope="module")
def model(splits) -> GBDTBaseline:
    train, valid, _ = splits
    return GBDTBaseline.fit(train, valid, SPARSE, DENSE, **FAST)


def test_beats_one_hot_logistic_regression_on_an_interaction(splits, model):
    train, valid, test = splits
    labels = test["label"].to_numpy()
    gbdt_auc = auc(labels, model.logits(test))
    lr_auc = auc(labels, OneHotLogisticRegression.fit_tuned(train, valid).logits(test))
    assert gbdt_auc > lr_auc + 0.1, (gbdt_auc, lr_auc)
    assert gbdt_auc > 0.8
    assert model.valid_logloss is not None and np.isfinite(model.valid_logloss)


def test_logits_are_float64_log_odds_at_the_best_iteration(splits, model):
    _, _, test = splits
    logits = model.logits(test)
    assert logits.dtype == np.float64 and logits.shape == (len(test),)
    probabilities = model.booster.predict(model.encode(test), num_iteration=model.best_iteration)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), probabilities, rtol=1e-12)
    assert model.booster.current_iteration() == model.best_iteration < model.rounds_trained
    fewer_trees = model.booster.predict(
        model.encode(test), num_iteration=model.best_iteration - 1, raw_score=True
    )
    assert not np.allclose(logits, fewer_trees)


def test_unseen_users_items_and_categories_give_finite_scores(splits, model):
    _, _, test = splits
    rows = test.head(50).copy()
    rows["user_id"] = np.arange(10**6, 10**6 + 50)
    rows["item_id"] = np.arange(10**7, 10**7 + 50)
    rows["category"] = "never_seen"
    rows["gender"] = None
    logits = model.logits(rows)
    assert np.isfinite(logits).all()


def test_categories_are_learnt_from_train_only(splits):
    train, valid, test = splits
    valid = valid.copy()
    valid.loc[valid.index[:200], "category"] = "valid_only"
    fitted = GBDTBaseline.fit(train, valid, SPARSE, DENSE, **FAST)
    assert "valid_only" not in fitted.categories["category"]
    assert set(fitted.categories["category"]) == {"c0", "c1", "c2", "c3"}
    assert set(fitted.categories["user_id"]) == set(train["user_id"])

    rows = pd.concat([test.head(20)] * 3, ignore_index=True)
    rows.loc[:19, "category"] = "valid_only"
    rows.loc[20:39, "category"] = np.nan
    rows.loc[40:, "category"] = "test_only"
    encoded = fitted.encode(rows)
    assert encoded["category"].isna().all()
    logits = fitted.logits(rows)
    np.testing.assert_array_equal(logits[:20], logits[20:40])
    np.testing.assert_array_equal(logits[:20], logits[40:])
    # and a known category does change the score (the column is used)
    known = test.head(20).assign(category="c1")
    assert not np.array_equal(fitted.logits(known), logits[:20])


def test_same_seed_gives_identical_logits(splits, model):
    train, valid, test = splits
    again = GBDTBaseline.fit(train, valid, SPARSE, DENSE, **FAST)
    assert again.best_iteration == model.best_iteration
    np.testing.assert_array_equal(again.logits(test), model.logits(test))


def test_early_stopping_on_noise_labels_records_the_best_iteration():
    train, valid = _frame(3000, seed=4, label="noise"), _frame(1500, seed=5, label="noise")
    fitted = GBDTBaseline.fit(train, valid, SPARSE, DENSE, seed=7, max_rounds=500, early_stopping=20)
    assert fitted.best_iteration < 100
    assert fitted.rounds_trained == fitted.best_iteration + 20  # stopped 20 rounds after the best, not at 500
    assert fitted.booster.current_iteration() == fitted.best_iteration
    assert fitted.params["seed"] == 7 and fitted.params["deterministic"] is True
    assert fitted.params["objective"] == "binary" and fitted.params["num_threads"] == 2


def test_params_override_the_defaults(splits):
    train, valid, _ = splits
    fitted = GBDTBaseline.fit(train, valid, SPARSE, DENSE, params={"num_leaves": 7}, **FAST)
    assert fitted.params["num_leaves"] == 7
    assert fitted.booster.dump_model()["tree_info"][0]["num_leaves"] <= 7
    with pytest.raises(ValueError, match="binary"):
        GBDTBaseline.fit(train, valid, SPARSE, DENSE, params={"objective": "regression"})


@pytest.mark.parametrize("frame", ["train", "valid", "rows"])
def test_a_missing_column_raises_naming_it_and_the_frame(splits, model, frame):
    train, valid, test = splits
    if frame == "rows":
        with pytest.raises(ValueError, match=r"rows frame .*'price'"):
            model.logits(test.drop(columns="price"))
        return
    frames = {"train": train, "valid": valid}
    frames[frame] = frames[frame].drop(columns="category")
    with pytest.raises(ValueError, match=rf"{frame} frame .*'category'"):
        GBDTBaseline.fit(frames["train"], frames["valid"], SPARSE, DENSE, **FAST)


def test_a_missing_label_raises(splits):
    train, valid, _ = splits
    with pytest.raises(ValueError, match=r"train frame .*'label'"):
        GBDTBaseline.fit(train.drop(columns="label"), valid, SPARSE, DENSE, **FAST)


def test_fit_tuned_keeps_the_lowest_validation_logloss(splits):
    train, valid, _ = splits
    grid = [{"num_leaves": 4, "min_data_in_leaf": 400}, {"num_leaves": 15, "min_data_in_leaf": 20}]
    tuned = GBDTBaseline.fit_tuned(train, valid, SPARSE, DENSE, grid=grid, **FAST)
    assert [t["params"] for t in tuned.tuning] == grid
    losses = [t["valid_logloss"] for t in tuned.tuning]
    chosen = int(np.argmin(losses))
    assert tuned.valid_logloss == losses[chosen]
    assert tuned.params["num_leaves"] == grid[chosen]["num_leaves"]
    assert tuned.best_iteration == tuned.tuning[chosen]["best_iteration"]


def test_refit_on_train_and_valid_keeps_params_and_rounds(splits, model):
    train, valid, test = splits
    valid = valid.copy()
    valid.loc[valid.index[:100], "category"] = "valid_only"
    both = pd.concat([train, valid], ignore_index=True)
    refitted = model.refit(both)
    assert refitted.booster.current_iteration() == model.best_iteration == refitted.best_iteration
    assert refitted.params == model.params
    assert refitted.valid_logloss is None
    assert "valid_only" in refitted.categories["category"]
    assert "valid_only" not in model.categories["category"]
    logits = refitted.logits(test)
    assert np.isfinite(logits).all() and not np.array_equal(logits, model.logits(test))
    assert auc(test["label"].to_numpy(), logits) > 0.8


def test_feature_columns_are_the_rankers_sparse_and_dense_features():
    spec = shipped_params().models.features
    sparse, dense = feature_columns(spec)
    assert sparse == [f.name for f in spec.sparse] and {"user_id", "item_id"} <= set(sparse)
    assert dense == [f.name for f in spec.dense] and "hist_length" in dense
    assert not {f.name for f in spec.sequence} & set(sparse + dense)
