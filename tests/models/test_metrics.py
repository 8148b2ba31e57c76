from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.metrics import ItemSets, auc, full_catalogue_topk, gauc, logloss, retrieval_metrics


def _pairwise_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 10, 300).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores))
    assert auc(np.ones(4), np.arange(4)) != auc(np.ones(4), np.arange(4))  # NaN: one class only


def test_gauc_weights_users_by_impressions_and_skips_single_class_users():
    labels = np.array([1, 0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.1, 0.4])
    users = np.array([5, 5, 5, 7, 7, 7, 9, 9])  # user 9 has only positives
    auc5 = _pairwise_auc(labels[:3], scores[:3])  # 1.0
    auc7 = _pairwise_auc(labels[3:6], scores[3:6])  # 0.0
    assert gauc(labels, scores, users) == pytest.approx((3 * auc5 + 3 * auc7) / 6)
    rng = np.random.default_rng(1)
    labels, scores, users = rng.integers(0, 2, 500), rng.random(500), rng.integers(0, 20, 500)
    expected_num = expected_den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            expected_num += m.sum() * _pairwise_auc(labels[m], scores[m])
            expected_den += m.sum()
    assert gauc(labels, scores, users) == pytest.approx(expected_num / expected_den)


def test_logloss():
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert np.isfinite(logloss(np.array([1]), np.array([0.0])))


def test_retrieval_metrics_on_a_hand_example():
    topk = np.array([[3, 1, 2], [0, 1, 2], [2, 0, 1]])
    relevant = ItemSets.from_pairs(np.array([0, 0, 1, 1]), np.array([1, 4, 5, 5]), num_users=3)
    out = retrieval_metrics(topk, relevant, [1, 3])
    # user 0: relevant {1, 4}, hit at rank 2; user 1: relevant {5}, no hit; user 2: no relevant -> skipped
    assert out["recall@1"] == 0.0
    assert out["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["hitrate@3"] == pytest.approx(0.5)
    idcg = 1 + 1 / np.log2(3)
    assert out["ndcg@3"] == pytest.approx(((1 / np.log2(3)) / idcg + 0) / 2)


def test_full_catalogue_topk_scores_everything_and_excludes_seen_items():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    assert full_catalogue_topk(users, items, 2).tolist() == [[0, 1], [2, 3]]
    seen = ItemSets.from_pairs(np.array([0, 1]), np.array([0, 2]), num_users=2)
    assert full_catalogue_topk(users, items, 2, exclude=seen, chunk_size=1).tolist() == [[1, 3], [3, 1]]


def test_item_sets_restricted_to_keep_each_users_items_in_the_segment():
    sets = ItemSets.from_pairs(np.array([0, 0, 0, 2, 2]), np.array([1, 3, 4, 0, 3]), num_users=3)
    head = np.array([True, False, False, True, False])  # items 0 and 3
    restricted = sets.restricted_to(head)
    assert restricted.sizes().tolist() == [1, 0, 2]
    assert restricted.items.tolist() == [3, 0, 3]
    tail = sets.restricted_to(~head)
    assert tail.sizes().tolist() == [2, 0, 0] and tail.items.tolist() == [1, 4]
