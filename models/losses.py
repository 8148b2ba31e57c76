"""Retrieval losses: in-batch sampled softmax with log-Q correction, accidental-hit masking, mixed
negatives, and a BCE alternative.

With in-batch negatives, popular items appear as negatives far more often than rare ones, so an
uncorrected softmax learns to push popular items down. The log-Q correction (Yi et al., RecSys 2019)
subtracts the log of each candidate's expected count in the sampled candidate set from its logit:
``B * q_j`` for in-batch candidates, plus ``M / N`` when M uniform negatives from an N-item catalogue
are mixed in (Yang et al., WWW 2020). A constant shift does not change the softmax, so only the
relative popularity matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_MASKED = -1e9  # logit of a masked candidate: finite, so rows and gradients stay free of NaN


def retrieval_logits(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    item_ids: torch.Tensor,
    *,
    temperature: torch.Tensor | float,
    item_log_q: torch.Tensor | None = None,
    negative_emb: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
) -> torch.Tensor:
    """Logits [B, B + M] of each user against every in-batch item and M extra negatives, in float32.

    Row i's positive is column i. ``item_log_q`` [B] / ``negative_log_q`` [M] are the log expected
    counts subtracted from each candidate's column (None: no correction). With
    ``remove_accidental_hits``, a column holding the same item id as row i's positive (another user
    clicked the same item, or a uniform negative drew it) is masked instead of treated as a negative.
    """
    candidates, ids, log_q = item_emb, item_ids, item_log_q
    if negative_emb is not None:
        if negative_ids is None:
            raise ValueError("retrieval_logits: negative_ids are required with negative_emb")
        candidates = torch.cat([item_emb, negative_emb])
        ids = torch.cat([item_ids, negative_ids])
        if log_q is not None:
            if negative_log_q is None:
                raise ValueError("retrieval_logits: negative_log_q is required with item_log_q and negatives")
            log_q = torch.cat([log_q, negative_log_q])
    # bf16 logits would round a 1/temperature-scaled score by ~0.1: keep this product in float32
    with torch.autocast(device_type=user_emb.device.type, enabled=False):
        users = user_emb.float() / temperature  # scale [B, d], not the [B, B + M] logits
        candidates = candidates.float()
        if log_q is not None:
            # [u / t, 1] . [v_j, -log q_j] = u . v_j / t - log q_j: the correction rides along in the
            # same matmul instead of a pass over the [B, B + M] logits
            users = torch.cat([users, torch.ones_like(users[:, :1])], dim=1)
            candidates = torch.cat([candidates, -log_q.float().unsqueeze(1)], dim=1)
        logits = users @ candidates.T
    if remove_accidental_hits:
        rows, cols = same_item_pairs(item_ids, ids)
        # in place: neither matmul keeps its output for the backward pass
        logits.index_put_((rows, cols), torch.tensor(_MASKED, device=logits.device))
    return logits


def same_item_pairs(row_ids: torch.Tensor, candidate_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) with ``row_ids[r] == candidate_ids[c]`` and ``r != c``: the accidental hits.

    Found by sorting the candidates and a binary search per row, so the cost grows with B plus the
    number of hits rather than with the B x (B + M) logit matrix.
    """
    sorted_ids, order = torch.sort(candidate_ids)
    lo = torch.searchsorted(sorted_ids, row_ids, side="left")
    counts = torch.searchsorted(sorted_ids, row_ids, side="right") - lo
    rows = torch.repeat_interleave(torch.arange(row_ids.shape[0], device=row_ids.device), counts)
    first_slot = torch.cumsum(counts, 0) - counts
    cols = order[
        torch.arange(rows.shape[0], device=row_ids.device) + torch.repeat_interleave(lo - first_slot, counts)
    ]
    keep = rows != cols
    return rows[keep], cols[keep]


def sampled_softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against its positive at column i (logits from :func:`retrieval_logits`)."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def bce_retrieval_loss(logits: torch.Tensor) -> torch.Tensor:
    """Pointwise logistic loss: the diagonal is positive, every unmasked other column negative.

    Positives and negatives are averaged separately, so the B positives are not drowned out by the
    B * (B + M - 1) negatives.
    """
    batch = logits.shape[0]
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[:, :batch].fill_diagonal_(True)
    valid = logits > _MASKED / 2
    pos_loss = F.softplus(-logits[positive]).mean()
    neg = valid & ~positive
    neg_loss = F.softplus(logits[neg]).sum() / neg.sum().clamp(min=1)
    return pos_loss + neg_loss


def expected_log_counts(
    item_probability: torch.Tensor, batch_size: int, num_negatives: int = 0, catalogue_size: int = 1
) -> torch.Tensor:
    """log(B * q_j + M / N): each candidate's expected count in a candidate set of B in-batch items
    (drawn with probability q) and M uniform negatives from N items."""
    expected = batch_size * item_probability
    if num_negatives > 0:
        expected = expected + num_negatives / max(catalogue_size, 1)
    return torch.log(expected.clamp(min=1e-12))


def clamp_temperature(log_temperature: torch.Tensor) -> torch.Tensor:
    """A learned temperature, kept in [0.01, 10] so the softmax neither saturates nor flattens out."""
    return log_temperature.clamp(math.log(0.01), math.log(10.0)).exp()
