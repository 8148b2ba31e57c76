from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.architectures.retrieval import TwoTower
from models.batch import OOV_ID
from models.config import ModelConfigError
from models.encoding import FeatureEncoder
from models.losses import (
    bce_retrieval_loss,
    expected_log_counts,
    retrieval_logits,
    same_item_pairs,
    sampled_softmax_loss,
)
from models.registry import build_model


def _unit(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_logq_lowers_the_popular_items_logit():
    users, items = _unit(3), _unit(3, seed=1)
    ids = torch.tensor([10, 11, 12])
    probability = torch.tensor([0.90, 0.05, 0.05])  # item 10 is popular
    plain = retrieval_logits(users, items, ids, temperature=0.1)
    corrected = retrieval_logits(
        users, items, ids, temperature=0.1, item_log_q=expected_log_counts(probability, batch_size=3)
    )
    assert (corrected[:, 0] < plain[:, 0]).all()  # B * q = 2.7 > 1: lowered outright
    assert (corrected[:, 1] > plain[:, 1]).all()  # rare items are raised
    gap_plain = plain[:, 0] - plain[:, 1]
    gap_corrected = corrected[:, 0] - corrected[:, 1]
    assert torch.allclose(gap_plain - gap_corrected, torch.full((3,), math.log(0.90 / 0.05)), atol=1e-5)


def test_accidental_hits_are_not_negatives():
    users, items = _unit(4), _unit(4, seed=2)
    ids = torch.tensor([7, 8, 7, 9])  # rows 0 and 2 clicked the same item
    logits = retrieval_logits(users, items, ids, temperature=0.5)
    assert logits[0, 2] < -1e8 and logits[2, 0] < -1e8
    assert logits[0, 0] > -1e8 and logits[1, 3] > -1e8  # positives and real negatives kept
    unmasked = retrieval_logits(users, items, ids, temperature=0.5, remove_accidental_hits=False)
    # row 0's loss is the softmax over its positive and the two true negatives only
    keep = [0, 1, 3]
    expected = -torch.log_softmax(unmasked[0, keep], dim=0)[0]
    row0 = F.cross_entropy(logits[:1], torch.tensor([0]))
    assert torch.allclose(row0, expected, atol=1e-6)


def test_mixed_negatives_are_masked_when_they_hit_the_positive():
    users, items = _unit(2), _unit(2, seed=3)
    negatives = _unit(3, seed=4)
    logits = retrieval_logits(
        users,
        items,
        torch.tensor([1, 2]),
        temperature=1.0,
        negative_emb=negatives,
        negative_ids=torch.tensor([5, 2, 6]),
    )
    assert logits.shape == (2, 5)
    assert logits[1, 3] < -1e8 and logits[0, 3] > -1e8
    assert torch.isfinite(sampled_softmax_loss(logits))


def test_bce_loss_pushes_positives_up():
    users = _unit(4)
    good = retrieval_logits(users, users.clone(), torch.arange(4), temperature=0.1)
    bad = retrieval_logits(users, -users, torch.arange(4), temperature=0.1)
    assert bce_retrieval_loss(good) < bce_retrieval_loss(bad)


def _two_tower(frame, models_config, **changes) -> tuple[TwoTower, dict]:
    encoder = FeatureEncoder.fit(models_config.features, frame)
    config = models_config.two_tower.model_copy(update=changes)
    model = build_model("two_tower", config, encoder, item_counts=encoder.id_counts(frame, "item_id"))
    return model, encoder.encode(frame)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_towers_give_normalised_vectors_from_their_own_features(frame, models_config, pooling):
    torch.manual_seed(0)
    model, batch = _two_tower(frame, models_config, history_pooling=pooling)
    model.eval()
    users, items = model.user_embedding(batch), model.item_embedding(batch)
    assert users.shape == (len(frame), 8) and items.shape == (len(frame), 8)
    assert torch.allclose(users.norm(dim=-1), torch.ones(len(frame)), atol=1e-5)
    other = dict(batch, item_id=batch["item_id"].flip(0), category=batch["category"].flip(0))
    assert torch.equal(model.user_embedding(other), users)  # the user tower never reads item features
    assert not torch.allclose(model.item_embedding(other), items)
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_item_id_dropout_falls_back_to_the_oov_row(frame, models_config):
    torch.manual_seed(0)
    model, batch = _two_tower(frame, models_config, id_dropout=0.5)
    model.train()
    dropped = model.item_embedding(batch)
    model.eval()
    as_oov = model.item_embedding(dict(batch, item_id=torch.full_like(batch["item_id"], OOV_ID)))
    kept = model.item_embedding(batch)
    is_oov = torch.isclose(dropped, as_oov, atol=1e-6).all(dim=1)
    is_kept = torch.isclose(dropped, kept, atol=1e-6).all(dim=1)
    assert (is_oov | is_kept).all()  # each row either kept its id or fell back to the OOV row
    assert 0.4 < is_oov.float().mean() < 0.6  # at the configured rate
    assert not torch.isclose(kept, as_oov, atol=1e-6).all(dim=1).any()  # eval mode keeps every id


def test_learned_temperature_is_trained_and_fixed_is_not(frame, models_config):
    fixed, batch = _two_tower(frame, models_config)
    assert "log_temperature" not in dict(fixed.named_parameters())
    learned, _ = _two_tower(frame, models_config, learn_temperature=True)
    learned.loss(batch).backward()
    assert learned.log_temperature.grad is not None and learned.log_temperature.grad != 0


def test_mixed_negatives_come_from_the_item_pool(frame, models_config):
    torch.manual_seed(0)
    model, batch = _two_tower(frame, models_config, mixed_negatives=16)
    model.prepare(batch)
    pool_ids = model._pool["item_id"]
    assert torch.equal(pool_ids, torch.unique(batch["item_id"]))
    assert torch.isfinite(model.loss(batch))


def test_logq_needs_item_counts(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    with pytest.raises(ModelConfigError, match="logq_correction needs the training item frequencies"):
        build_model("two_tower", models_config.two_tower, encoder)
    with pytest.raises(ModelConfigError, match="item_counts has shape"):
        build_model("two_tower", models_config.two_tower, encoder, item_counts=np.ones(3))
    no_logq = models_config.two_tower.model_copy(update={"logq_correction": False})
    assert isinstance(build_model("two_tower", no_logq, encoder), TwoTower)


def test_validation_metrics_report_recall_at_k(frame, models_config):
    model, batch = _two_tower(frame, models_config)
    model.prepare(batch)
    metrics = model.validation_metrics(batch, batch_size=128, k=10)
    assert set(metrics) == {"recall@10", "ndcg@10", "hitrate@10", "loss"}
    assert 0.0 <= metrics["recall@10"] <= 1.0
    n_items = len(np.unique(frame["item_id"]))
    assert model.validation_metrics(batch, 128, k=n_items)["recall@" + str(n_items)] == pytest.approx(1.0)


def test_same_item_pairs_match_the_dense_comparison():
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 6, (40,), generator=generator)
    candidates = torch.cat([ids, torch.randint(0, 9, (7,), generator=generator)])
    rows, cols = same_item_pairs(ids, candidates)
    dense = ids.unsqueeze(1) == candidates.unsqueeze(0)
    dense[:, :40].fill_diagonal_(False)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [
        tuple(p) for p in dense.nonzero().tolist()
    ]
