"""The retrieval blend (models/blend.py): the share of every prefix given to popular items, no item
twice, the other source filling in when one runs out, and the share chosen on validation recall."""

from __future__ import annotations

import numpy as np
import pytest

from models.blend import blend_lists, blend_topk, choose_share, popular_slots
from models.metrics import ItemSets


def test_the_share_holds_at_every_prefix():
    for share in (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0):
        slots = popular_slots(share, 100)
        for m in (1, 10, 33, 50, 100):
            assert slots[:m].sum() == int(np.floor(share * m + 1e-9)), (share, m)
    assert popular_slots(0.5, 6).tolist() == [False, True, False, True, False, True]
    with pytest.raises(ValueError, match=r"share must lie in \[0, 1\]"):
        popular_slots(1.5, 10)


def test_blend_interleaves_without_repeating_an_item():
    model, popular = [1, 2, 3, 4, 5, 6], [3, 9, 1, 8, 7]
    # popular slots take 3 and 9; the model then skips 3, already in the list
    assert blend_lists(model, popular, 0.5, 6) == [1, 3, 2, 9, 4, 8]
    assert blend_lists(model, popular, 0.0, 4) == [1, 2, 3, 4]
    assert blend_lists(model, popular, 1.0, 4) == [3, 9, 1, 8]


def test_a_used_up_source_is_filled_in_by_the_other():
    assert blend_lists([1, 2], [7, 8, 9], 0.5, 6) == [1, 7, 2, 8, 9]  # 5 distinct items exist
    assert blend_lists([1, 2, 3, 4], [], 0.5, 3) == [1, 2, 3]
    assert blend_lists([], [], 0.5, 3) == []


def test_blend_topk_applies_the_blend_to_every_user():
    model = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    popular = np.array([[9, 8, 7, 6], [1, 9, 8, 7]])
    out = blend_topk(model, popular, 0.5)
    assert out.tolist() == [[0, 9, 1, 8], [3, 1, 2, 9]]
    assert blend_topk(model, popular, 0.0) is model and blend_topk(model, popular, 1.0) is popular
    with pytest.raises(ValueError, match="differ"):
        blend_topk(model, popular[:, :3], 0.5)


def test_the_share_is_chosen_on_validation_recall():
    # user 0 clicks popular items, user 1 the model's: half of each list is the best blend at K = 2
    model = np.array([[0, 1], [2, 3]])
    popular = np.array([[5, 6], [5, 6]])
    relevant = ItemSets.from_pairs(np.array([0, 1]), np.array([5, 2]), 2)
    choice = choose_share(model, popular, relevant, [0.0, 0.5, 1.0], 2)
    assert choice.share == 0.5 and choice.k == 2
    assert choice.valid_recall == {"0": 0.5, "0.5": 1.0, "1": 0.5}
    # ties go to the smaller share: popularity must strictly help
    only_model = ItemSets.from_pairs(np.array([0, 1]), np.array([0, 2]), 2)
    assert choose_share(model, popular, only_model, [1.0, 0.5, 0.0], 2).share == 0.0


# ---- the item-kNN blend: the neighbour table the evaluation and the server both score with


def _clicks(seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    items = 1000 + 7 * rng.permutation(40)  # item ids, not catalogue order
    rows = [(u, int(items[i])) for u in range(60) for i in rng.choice(40, rng.integers(2, 9), replace=False)]
    return pd.DataFrame(rows, columns=["user_id", "item_id"]), items


def test_the_neighbour_table_ranks_a_history_as_item_knn_scores_it():
    from models.retrieval_baselines import ItemKNN

    clicks, items = _clicks()
    knn = ItemKNN.fit(clicks, items, neighbours=10, shrink=2.0)
    table = knn.neighbour_table(items, 10)
    assert table.width == 10 and np.all(np.diff(table.item_ids) > 0)
    position = {int(item): i for i, item in enumerate(items)}
    for history in ([items[0]], [items[3], items[5], items[7]], list(items[10:20])):
        dense = np.zeros((1, len(items)))
        dense[0, [position[int(i)] for i in history]] = 1.0
        scores = (dense @ knn.similarity.toarray())[0]
        expected = [
            int(items[j])
            for j in sorted(range(len(items)), key=lambda j: (-scores[j], items[j]))
            if scores[j] > 0 and int(items[j]) not in set(map(int, history))
        ]
        got = table.ranked(history, len(items))
        assert got == expected  # every positive-score item, by score then id; the history left out
        assert table.ranked(history, 3) == expected[:3]
        assert table.ranked(history, 50, exclude=expected[:2]) == expected[2:]
    assert table.ranked([], 5) == [] and table.ranked([123456], 5) == []  # unknown history: empty list


def test_a_narrower_table_keeps_each_items_best_neighbours():
    from models.retrieval_baselines import ItemKNN

    clicks, items = _clicks(1)
    knn = ItemKNN.fit(clicks, items, neighbours=20)
    wide, narrow = knn.neighbour_table(items, 20), knn.neighbour_table(items, 3)
    assert narrow.width == 3
    for row, item in enumerate(narrow.item_ids.tolist()):
        w = wide.rows_of(np.array([item]))[0]
        best = wide.neighbours[wide.offsets[w] : wide.offsets[w] + 3]
        assert narrow.neighbours[narrow.offsets[row] : narrow.offsets[row + 1]].tolist() == best.tolist()


def test_the_neighbour_table_round_trips_and_a_bad_file_is_named(tmp_path):
    from models.blend import NeighbourTable
    from models.retrieval_baselines import ItemKNN

    clicks, items = _clicks(2)
    table = ItemKNN.fit(clicks, items, neighbours=5).neighbour_table(items, 5)
    loaded = NeighbourTable.load(table.save(tmp_path / "t.npz"))
    assert loaded.ranked(items[:4], 10) == table.ranked(items[:4], 10)
    np.savez(tmp_path / "bad.npz", item_ids=np.array([3, 1]), offsets=np.array([0, 0, 0]))
    with pytest.raises(ValueError, match=r"bad\.npz"):
        NeighbourTable.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="ascend"):
        NeighbourTable(np.array([3, 1]), np.array([0, 0, 0]), np.zeros(0, np.int64), np.zeros(0, np.float32))


def test_a_short_second_list_is_filled_in_by_the_model():
    model = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    knn = [np.array([7]), np.array([], dtype=np.int64)]
    assert blend_topk(model, knn, 0.5).tolist() == [[0, 7, 1, 2], [3, 2, 1, 0]]
    assert blend_topk(model, knn, 1.0).tolist() == [[7, 0, 1, 2], [3, 2, 1, 0]]
    relevant = ItemSets.from_pairs(np.array([0]), np.array([7]), 2)
    assert choose_share(model, knn, relevant, [0.0, 0.5], 2).share == 0.5


def test_the_source_with_the_best_validation_blend_is_chosen():
    from models.blend import BlendChoice, choose_source

    popularity = BlendChoice(0.3, 50, {"0": 0.30, "0.3": 0.31})
    knn = BlendChoice(0.6, 50, {"0": 0.30, "0.6": 0.33})
    assert choose_source({"popularity": popularity, "item_knn": knn}) == "item_knn"
    assert choose_source({"item_knn": knn, "popularity": BlendChoice(0.0, 50, {"0": 0.33})}) == "item_knn"
    assert choose_source({"popularity": BlendChoice(0.0, 50, {"0": float("nan")}), "item_knn": knn}) == (
        "item_knn"
    )
    with pytest.raises(ValueError, match="no blend source"):
        choose_source({})
