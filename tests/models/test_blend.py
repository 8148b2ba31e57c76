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
