"""Popularity (all-time and recent window), item-kNN and EASE^R retrieval baselines, checked on hand-made
data with known answers and against independent dense numpy computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.metrics import ItemSets, full_catalogue_topk, retrieval_metrics
from models.retrieval_baselines import (
    EASE,
    CatalogueTooLarge,
    ItemKNN,
    ValidationSplit,
    _topk_rows,
    choose_recent_window,
    history_sets,
    popularity_scores,
)

END = pd.Timestamp("2024-03-01", tz="UTC")


def _clicks(rows: list[tuple[int, int, float]]) -> pd.DataFrame:
    """(user_id, item_id, days before END) -> a clicks frame."""
    users, items, days = zip(*rows, strict=True) if rows else ((), (), ())
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "event_timestamp": END - pd.to_timedelta(np.asarray(days, dtype=float), unit="D"),
        }
    )


def _random_clicks(seed: int, n_users: int = 40, n_items: int = 15, density: float = 0.25):
    """Clicks of a random binary matrix, catalogue ids shuffled and non-contiguous, one catalogue item never
    clicked (index n_items) and clicks on an item outside the catalogue (must be dropped)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < density).astype(np.float64)
    catalogue = rng.permutation(np.arange(n_items + 1, dtype=np.int64) * 7 + 1000)
    users, cols = np.nonzero(x)
    clicks = _clicks(
        [(int(u) + 500, int(catalogue[c]), 1.0) for u, c in zip(users, cols, strict=True)]
        + [(500, 9, 1.0), (501, 9, 2.0)]  # item 9 is not in the catalogue
        + [(int(users[0]) + 500, int(catalogue[cols[0]]), 3.0)]  # a repeated click: the matrix is binary
    )
    x_full = np.zeros((n_users, n_items + 1))
    x_full[:, :n_items] = x
    return clicks, catalogue, x_full


def _sets(rows: list[list[int]]) -> ItemSets:
    users = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    items = np.asarray([i for r in rows for i in r], dtype=np.int64)
    return ItemSets.from_pairs(users, items, len(rows))


def _reference_topk(scores: np.ndarray, k: int, popularity: np.ndarray, exclude: ItemSets | None = None):
    """Sort each row by (score desc, popularity desc, index asc): the documented tie rule."""
    scores = scores.astype(np.float64).copy()
    if exclude is not None:
        for u in range(scores.shape[0]):
            scores[u, exclude.items[exclude.offsets[u] : exclude.offsets[u + 1]]] = -np.inf
    n = scores.shape[1]
    return np.stack([np.lexsort((np.arange(n), -popularity, -row))[: min(k, n)] for row in scores])


def _dense_cosine(x: np.ndarray, shrink: float) -> np.ndarray:
    dots = x.T @ x
    norms = np.sqrt(x.sum(axis=0))
    sim = dots / (np.outer(norms, norms) + shrink + 1e-300)
    np.fill_diagonal(sim, 0.0)
    return sim


def _dense_ease(x: np.ndarray, l2: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + l2 * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p / np.diag(p)  # B = I - P diag(1/diag(P)): zero diagonal


# ------------------------------------------------------------------------------------------- history_sets


def test_history_sets_keeps_user_order_and_drops_items_outside_the_catalogue():
    clicks = _clicks([(1, 10, 1), (1, 30, 1), (2, 20, 1), (2, 99, 1), (3, 10, 1), (1, 10, 2)])
    sets = history_sets(clicks, np.array([2, 4, 1]), np.array([30, 10, 20]))
    assert sets.num_users == 3
    got = [sorted(sets.items[sets.offsets[u] : sets.offsets[u + 1]].tolist()) for u in range(3)]
    assert got == [[2], [], [0, 1]]  # user 2: item 20 (99 dropped); user 4: none; user 1: 30 and 10 once


# --------------------------------------------------------------------------------------------- popularity


def test_popularity_window_counts_only_recent_clicks_and_never_clicks_at_or_after_end():
    catalogue = np.array([1, 2, 3, 4])
    clicks = _clicks(
        [(u, 1, 20.0) for u in range(10)]  # item 1: long-run popular, 20 days ago
        + [(u, 2, 1.5) for u in range(4)]  # item 2: hot in the last 2 days
        + [(u, 3, 0.0) for u in range(50)]  # item 3: clicked exactly at `end` ...
        + [(u, 3, -1.0) for u in range(50)]  # ... and after it: leakage if counted
    )
    recent = popularity_scores(clicks, catalogue, END, pd.Timedelta(days=3))
    all_time = popularity_scores(clicks, catalogue, END, None)
    assert recent.dtype == np.float32 and recent.shape == (4,)
    assert np.argmax(recent) == 1 and np.argmax(all_time) == 0
    assert np.floor(recent).tolist() == [0, 4, 0, 0] and np.floor(all_time).tolist() == [10, 4, 0, 0]
    assert recent[2] == 0 and all_time[2] == 0 and all_time[3] == 0  # only post-end clicks / none: zero


def test_popularity_ties_in_the_window_are_broken_by_all_time_counts():
    catalogue = np.array([5, 6, 7])
    clicks = _clicks([(0, 5, 1.0), (0, 6, 1.0), (1, 6, 30.0), (2, 6, 40.0), (3, 7, 50.0)])
    scores = popularity_scores(clicks, catalogue, END, pd.Timedelta(days=7))
    assert np.floor(scores).tolist() == [1, 1, 0]  # the tie-break term never changes the window count
    assert scores[1] > scores[0] > scores[2] > 0  # 6 clicked 3 times overall, 5 once; 7 only long ago


def test_choose_recent_window_follows_the_trend_or_the_long_run():
    catalogue = np.array([1, 2, 3, 4])
    train = _clicks(
        [(100 + u, 1, 20.0) for u in range(10)]  # A: 10 clicks 20 days ago
        + [(200 + u, 3, 5.0) for u in range(8)]  # C: 8 clicks 5 days ago
        + [(300 + u, 2, 0.5) for u in range(5)]  # B: 5 clicks in the last day
    )
    # validation users click B (the trend): only the 1- and 3-day windows rank B first; ties -> 3 days
    trend = choose_recent_window(train, _clicks([(1, 2, -1.0), (2, 2, -2.0)]), catalogue, END, k=1)
    assert trend.days == 3 and trend.window == pd.Timedelta(days=3)
    assert trend.valid_recall == {"all": 0.0, "30d": 0.0, "14d": 0.0, "7d": 0.0, "3d": 1.0, "1d": 1.0}
    # they click A (long-run popular): 30 days and all-time tie -> all-time
    long_run = choose_recent_window(train, _clicks([(1, 1, -1.0), (2, 1, -2.0)]), catalogue, END, k=1)
    assert long_run.days is None and long_run.window is None
    assert long_run.valid_recall["all"] == long_run.valid_recall["30d"] == 1.0
    assert long_run.valid_recall["1d"] == 0.0


def test_choose_recent_window_excludes_the_users_train_items():
    catalogue = np.array([1, 2])
    train = _clicks([(u, 1, 1.0) for u in range(5)] + [(9, 2, 1.0)])
    valid = _clicks([(0, 2, -1.0)])  # user 0 clicked item 1 in train, item 2 in valid
    seen = choose_recent_window(train, valid, catalogue, END, windows_days=(7,), k=1, exclude_seen=True)
    unseen = choose_recent_window(train, valid, catalogue, END, windows_days=(7,), k=1, exclude_seen=False)
    assert seen.valid_recall == {"all": 1.0, "7d": 1.0}
    assert unseen.valid_recall == {"all": 0.0, "7d": 0.0}


# ------------------------------------------------------------------------------------------ ranking core


def test_topk_rows_is_exact_with_many_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (50, 30)).astype(np.float64)
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    popularity = rng.integers(0, 5, 30).astype(np.float64)
    order = np.lexsort((np.arange(30), -popularity))
    for k in (1, 7, 30):
        assert np.array_equal(_topk_rows(scores, k, order), _reference_topk(scores, k, popularity))


# --------------------------------------------------------------------------------------------------- kNN


def test_itemknn_recommends_the_co_clicked_item():
    catalogue = np.array([10, 20, 30, 40])
    # 20 is the most popular item, but users who clicked 10 also clicked 30
    clicks = _clicks(
        [(u, 10, 1.0) for u in range(3)]
        + [(u, 30, 1.0) for u in range(3)]
        + [(u, 20, 1.0) for u in range(3, 9)]
    )
    knn = ItemKNN.fit(clicks, catalogue)
    top = knn.topk(_sets([[0]]), k=2, exclude=_sets([[0]]))
    assert top[0].tolist() == [2, 1]  # 30 by similarity, then 20 by popularity


def test_itemknn_matches_a_dense_brute_force_cosine():
    clicks, catalogue, x = _random_clicks(seed=0)
    rng = np.random.default_rng(1)
    history = _sets([list(rng.choice(x.shape[1], size=s, replace=False)) for s in (0, 1, 2, 4, 6, 3)])
    for shrink in (0.0, 5.0):
        knn = ItemKNN.fit(clicks, catalogue, neighbours=1000, shrink=shrink)
        sim = _dense_cosine(x, shrink)
        assert np.allclose(knn.similarity.toarray(), sim)
        h = np.zeros((history.num_users, x.shape[1]))
        for u in range(history.num_users):
            h[u, history.items[history.offsets[u] : history.offsets[u + 1]]] = 1
        assert np.allclose(knn.scores(history), h @ sim)
        assert np.array_equal(knn.popularity, x.sum(axis=0))
        # the ranking itself: scores rounded as the model sums them, ties by popularity then index
        expected = _reference_topk(knn.scores(history), 8, x.sum(axis=0), history)
        assert np.array_equal(knn.topk(history, 8, exclude=history), expected)


def test_itemknn_keeps_only_the_top_neighbours_per_item():
    clicks, catalogue, x = _random_clicks(seed=2, n_users=60, n_items=20, density=0.4)
    full = _dense_cosine(x, 0.0)
    knn = ItemKNN.fit(clicks, catalogue, neighbours=3)
    pruned = knn.similarity.tocsr()
    assert np.diff(pruned.indptr).max() == 3
    for i in range(x.shape[1]):
        kept = np.sort(pruned[i].data)[::-1]
        assert np.allclose(kept, np.sort(full[i])[::-1][: len(kept)])  # the largest ones
        assert len(kept) == min(3, int((full[i] > 0).sum()))


def test_itemknn_empty_history_gets_the_popularity_order():
    clicks, catalogue, x = _random_clicks(seed=4)
    popularity = x.sum(axis=0)
    top = ItemKNN.fit(clicks, catalogue).topk(_sets([[], []]), k=len(catalogue))
    expected = np.lexsort((np.arange(len(catalogue)), -popularity))
    assert np.array_equal(top, np.stack([expected, expected]))
    assert top[0, -1] == x.shape[1] - 1  # the never-clicked catalogue item comes last
    custom = np.arange(len(catalogue), dtype=np.float64)  # a passed-in popularity (e.g. a recent window)
    top = ItemKNN.fit(clicks, catalogue, popularity=custom).topk(_sets([[]]), k=3)
    assert top[0].tolist() == [len(catalogue) - 1, len(catalogue) - 2, len(catalogue) - 3]


def test_itemknn_fit_tuned_picks_the_best_grid_point():
    clicks, catalogue, _ = _random_clicks(seed=5, n_users=80, n_items=25)
    rng = np.random.default_rng(0)
    history = _sets([list(rng.choice(25, size=3, replace=False)) for _ in range(30)])
    relevant = _sets([list(rng.choice(25, size=2, replace=False)) for _ in range(30)])
    grid = ((1, 0.0), (5, 0.0), (5, 10.0), (50, 0.0))
    model = ItemKNN.fit_tuned(
        clicks,
        validation=ValidationSplit(history, relevant, history, 5),
        catalogue_items=catalogue,
        grid=grid,
    )
    recalls = {}
    for n, s in grid:
        top = ItemKNN.fit(clicks, catalogue, n, s).topk(history, 5, history)
        recalls[f"{n}/{s:g}"] = retrieval_metrics(top, relevant, [5])["recall@5"]
    assert model.valid_recall == pytest.approx(recalls)
    best = max(recalls.values())
    first_best = next(g for g in grid if recalls[f"{g[0]}/{g[1]:g}"] == best)
    assert (model.neighbours, model.shrink) == first_best


# -------------------------------------------------------------------------------------------------- EASE


def test_ease_matches_the_closed_form_with_a_zero_diagonal():
    clicks, catalogue, x = _random_clicks(seed=6)
    ease = EASE.fit(clicks, catalogue, l2=3.0)
    trained = np.flatnonzero(x.sum(axis=0) > 0)
    assert np.array_equal(ease.trained_items, trained)  # the never-clicked item is left out
    reference = _dense_ease(x[:, trained], 3.0)
    assert np.all(np.diag(ease.weights) == 0)
    assert np.allclose(ease.weights, reference, atol=1e-5)
    rng = np.random.default_rng(2)
    history = _sets([list(rng.choice(x.shape[1], size=s, replace=False)) for s in (1, 3, 5, 2)])
    h = np.zeros((history.num_users, x.shape[1]))
    for u in range(history.num_users):
        h[u, history.items[history.offsets[u] : history.offsets[u + 1]]] = 1
    scores = ease.scores(history)
    assert np.allclose(scores[:, trained], h[:, trained] @ reference, atol=1e-5)
    untrained = x.shape[1] - 1
    assert np.all(scores[:, untrained] < scores[:, trained].min(axis=1))  # ranks after every trained item
    top = ease.topk(history, k=len(catalogue))
    assert np.all(top[:, -1] == untrained)


def test_ease_recommends_co_occurring_items():
    catalogue = np.array([10, 20, 30, 40, 50])  # 50 is never clicked
    clicks = _clicks(
        [(u, 10, 1.0) for u in range(4)]
        + [(u, 30, 1.0) for u in range(4)]
        + [(u, 20, 1.0) for u in range(4, 12)]
        + [(u, 40, 1.0) for u in range(12, 14)]
    )
    top = EASE.fit(clicks, catalogue, l2=1.0).topk(_sets([[0], [2], []]), k=5, exclude=_sets([[0], [2], []]))
    assert top[0, 0] == 2 and top[1, 0] == 0  # 10 <-> 30
    assert top[2].tolist() == [1, 0, 2, 3, 4]  # empty history: popularity, ties by index, 50 last
    assert top[0, -1] == 0 and top[1, -1] == 2  # excluded history item only where k exceeds the rest


def test_ease_refuses_a_catalogue_over_the_limit_with_the_params_key():
    clicks, catalogue, x = _random_clicks(seed=7)
    n_trained = int((x.sum(axis=0) > 0).sum())
    with pytest.raises(CatalogueTooLarge) as err:
        EASE.fit(clicks, catalogue, l2=10.0, max_items=n_trained - 1)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "evaluation.ease_max_items" in message
    assert str(n_trained) in message and str(n_trained - 1) in message
    with pytest.raises(CatalogueTooLarge):
        EASE.fit_tuned(
            clicks, ValidationSplit(_sets([[0]]), _sets([[1]]), None, 2), catalogue, max_items=n_trained - 1
        )
    assert EASE.fit(clicks, catalogue, l2=10.0, max_items=n_trained).weights.shape == (n_trained, n_trained)


def test_ease_fit_tuned_reports_the_chosen_l2():
    clicks, catalogue, _ = _random_clicks(seed=8, n_users=80, n_items=25)
    rng = np.random.default_rng(4)
    history = _sets([list(rng.choice(25, size=4, replace=False)) for _ in range(40)])
    relevant = _sets([list(rng.choice(25, size=2, replace=False)) for _ in range(40)])
    grid = (0.5, 10.0, 200.0, 5000.0)
    model = EASE.fit_tuned(clicks, ValidationSplit(history, relevant, history, 5), catalogue, l2_grid=grid)
    recalls = {
        f"{l2:g}": retrieval_metrics(
            EASE.fit(clicks, catalogue, l2).topk(history, 5, history), relevant, [5]
        )["recall@5"]
        for l2 in grid
    }
    assert model.valid_recall == pytest.approx(recalls)
    assert model.l2 in grid
    assert model.l2 == next(l2 for l2 in grid if recalls[f"{l2:g}"] == max(recalls.values()))
    assert np.allclose(model.weights, EASE.fit(clicks, catalogue, model.l2).weights)


# ------------------------------------------------------------------------- same semantics as the two-tower


def test_topk_has_the_shape_and_semantics_of_full_catalogue_topk():
    clicks, catalogue, x = _random_clicks(seed=9, n_items=12)
    x_trained = x[:, :12]
    clicks_all = clicks[clicks["item_id"] != catalogue[12]]
    catalogue = catalogue[:12]  # every catalogue item trained: EASE scores are all distinct
    ease = EASE.fit(clicks_all, catalogue, l2=2.0)
    assert ease.weights.shape == (12, 12) and x_trained.shape == (40, 12)
    rng = np.random.default_rng(5)
    history = _sets([list(rng.choice(12, size=s, replace=False)) for s in (1, 2, 3, 4, 5, 6, 0)])
    exclude = _sets([list(rng.choice(12, size=s, replace=False)) for s in (0, 1, 2, 3, 4, 5, 6)])
    scores = torch.from_numpy(ease.scores(history).astype(np.float32))
    # scores as user embeddings against the identity catalogue: the two-tower ranking of the same scores
    expected = full_catalogue_topk(scores, torch.eye(12), 6, exclude)
    got = ease.topk(history, 6, exclude, batch_users=3)
    assert got.shape == expected.shape == (7, 6)
    # the last user's history is empty: all scores tie, and torch.topk's order of ties is unspecified
    assert np.array_equal(got[:6], expected[:6])
    excluded_6 = set(exclude.items[exclude.offsets[6] :].tolist())
    by_popularity = np.lexsort((np.arange(12), -ease.popularity))
    assert got[6].tolist() == [i for i in by_popularity if i not in excluded_6][:6]
    for u in range(7):
        assert not set(got[u]) & set(exclude.items[exclude.offsets[u] : exclude.offsets[u + 1]])
    # k above the catalogue: capped like full_catalogue_topk, every item once, excluded ones at the end
    knn = ItemKNN.fit(clicks_all, catalogue)
    for model in (ease, knn):
        capped = model.topk(history, 50, exclude)
        assert capped.shape == full_catalogue_topk(scores, torch.eye(12), 50, exclude).shape == (7, 12)
        assert all(sorted(row) == list(range(12)) for row in capped.tolist())
        for u in range(7):
            excluded = exclude.items[exclude.offsets[u] : exclude.offsets[u + 1]]
            assert set(capped[u, 12 - len(excluded) :]) == set(excluded)
    with pytest.raises(ValueError, match="exclusions for"):
        knn.topk(history, 3, _sets([[0]]))


def test_topk_does_not_depend_on_the_batch_size():
    clicks, catalogue, _ = _random_clicks(seed=10, n_users=50, n_items=30)
    rng = np.random.default_rng(6)
    history = _sets([list(rng.choice(30, size=rng.integers(0, 6), replace=False)) for _ in range(23)])
    for model in (ItemKNN.fit(clicks, catalogue, neighbours=5), EASE.fit(clicks, catalogue, 20.0)):
        assert np.array_equal(
            model.topk(history, 10, history, batch_users=4), model.topk(history, 10, history)
        )
