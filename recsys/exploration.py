"""The exploration policies' probabilities (``serving.exploration``), shared by the server that samples
with them (serving/exploration.py) and the off-policy estimates that weight by them (components/ope.py),
so the two cannot disagree about what a policy does.

A policy fills the ``n`` slots of a ranked list one at a time from the candidates not yet placed:

- ``none``: the highest-scored remaining candidate (the ranked top-n, ties by rank order); propensity 1;
- ``epsilon_greedy``: that candidate with probability ``1 - epsilon``, else a uniform pick among the
  remaining ``m`` (the greedy one included): ``(1 - epsilon) * [greedy] + epsilon / m``;
- ``softmax``: Plackett-Luce sampling without replacement, ``exp(s / T) / sum over the remaining``.

The logged propensity of a slot is that conditional probability: the chance the policy put the item in
that slot given the scores and the items placed before it. The product over the first ``k`` slots is the
probability of the served prefix, which is what components/ope.py weights by.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("none", "epsilon_greedy", "softmax")


def slot_distribution(
    policy: str, scores: np.ndarray, remaining: np.ndarray, *, epsilon: float, temperature: float
) -> np.ndarray:
    """The probability of each candidate (0 for those not ``remaining``) for the next slot; ``scores`` and
    ``remaining`` are [M] for one list or [B, M] for B lists at once."""
    scores = np.asarray(scores, dtype=np.float64)
    remaining = np.asarray(remaining, dtype=bool)
    left = remaining.sum(axis=-1, keepdims=True)
    if policy == "softmax":
        logits = np.where(remaining, scores / temperature, -np.inf)
        top = np.max(logits, axis=-1, keepdims=True)
        weights = np.where(remaining, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
        return weights / np.maximum(weights.sum(axis=-1, keepdims=True), 1e-300)
    if policy not in POLICIES:
        raise ValueError(f"serving.exploration.policy: unknown policy {policy!r}; expected one of {POLICIES}")
    # the first of the highest remaining: rank order breaks ties, as the ranked list does
    greedy = np.argmax(np.where(remaining, scores, -np.inf), axis=-1)
    out = np.zeros(scores.shape)
    np.put_along_axis(out, np.expand_dims(greedy, -1), 1.0, axis=-1)
    out *= left > 0
    if policy == "epsilon_greedy":
        out = (1.0 - epsilon) * out + np.where(remaining, epsilon / np.maximum(left, 1), 0.0)
    return out


def sample_slots(
    policy: str,
    scores: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    epsilon: float,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``scores``) of the ``min(n, len(scores))`` served candidates in slot order, and each
    slot's propensity."""
    scores = np.asarray(scores, dtype=np.float64)
    remaining = np.ones(len(scores), dtype=bool)
    chosen, propensities = [], []
    for _ in range(min(n, len(scores))):
        p = slot_distribution(policy, scores, remaining, epsilon=epsilon, temperature=temperature)
        pick = int(rng.choice(len(scores), p=p)) if policy != "none" else int(np.argmax(p))
        chosen.append(pick)
        propensities.append(float(p[pick]))
        remaining[pick] = False
    return np.asarray(chosen, dtype=np.int64), np.asarray(propensities)


def prefix_probabilities(
    policy: str,
    scores: np.ndarray,
    served: np.ndarray,
    *,
    epsilon: float,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """For B served lists (``served``: [B, K] positions into ``scores`` [B, M], slot order): per slot, the
    policy's conditional probability of the served item given the served prefix [B, K], and its whole
    next-slot distribution [B, K, M]. What a target policy would have done on the logged prefixes."""
    scores = np.asarray(scores, dtype=np.float64)
    served = np.asarray(served, dtype=np.int64)
    rows = np.arange(len(served))
    remaining = np.ones(scores.shape, dtype=bool)
    dists = np.zeros((*served.shape, scores.shape[-1]))
    for k in range(served.shape[1]):
        dists[:, k] = slot_distribution(policy, scores, remaining, epsilon=epsilon, temperature=temperature)
        remaining[rows, served[:, k]] = False
    return np.take_along_axis(dists, served[..., None], axis=2)[..., 0], dists
