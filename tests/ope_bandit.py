"""A small synthetic ranking bandit with known click probabilities, for the off-policy estimates
(tests/test_ope.py, benchmarks/ope_accuracy.py).

Eight candidates with known CTRs, three slots with a position factor (a click at slot k has probability
``ctr[item] * position[k]``). The champion logs with Plackett-Luce sampling over its scores (softmax, as
``serving.exploration.policy: softmax`` serves); the challenger ranks by other scores and is served the
same way (``EPSILON_GREEDY``: the same with epsilon-greedy exploration). The challenger's true CTR (clicks
per served slot) is exact: every ordered prefix of the three slots is enumerated.
"""

from __future__ import annotations

import itertools

import numpy as np

from components.ope import LoggedRequests
from recsys.config import ExplorationConfig

CTR = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.02])
POSITION = np.array([1.0, 0.6, 0.4])
ITEMS = np.arange(100, 100 + len(CTR), dtype=np.int64)
# the champion ranks the best items low; the challenger nearly in the true order: a real improvement
CHAMPION = np.log(CTR) + np.array([-0.9, 0.1, 0.6, -0.2, 0.5, 0.3, -0.4, 0.2])
CHALLENGER = np.log(CTR) + np.array([0.3, 0.1, -0.1, 0.2, -0.2, 0.0, 0.1, -0.3])
POLICY = ExplorationConfig(policy="softmax", epsilon=0.1, temperature=0.7, seed=None)
EPSILON_GREEDY = ExplorationConfig(policy="epsilon_greedy", epsilon=0.5, temperature=1.0, seed=None)


def prefix_probability(prefix: tuple[int, ...], scores: np.ndarray, policy: ExplorationConfig) -> float:
    """The probability that ``policy`` serves ``prefix`` first (written out here, independently of
    recsys/exploration.py, which the estimates use)."""
    left = list(range(len(scores)))
    p = 1.0
    for item in prefix:
        if policy.policy == "softmax":
            weights = np.exp(scores[left] / policy.temperature)
            p *= float(np.exp(scores[item] / policy.temperature) / weights.sum())
        else:
            greedy = max(left, key=lambda j: (scores[j], -j))
            p *= (1.0 - policy.epsilon) * (item == greedy) + policy.epsilon / len(left)
        left.remove(item)
    return p


def true_ctr(scores: np.ndarray, policy: ExplorationConfig = POLICY) -> float:
    """The exact clicks per served slot of ``policy`` over ``scores``: every ordered prefix enumerated."""
    return sum(
        prefix_probability(prefix, scores, policy) * float(np.mean(CTR[list(prefix)] * POSITION))
        for prefix in itertools.permutations(range(len(scores)), len(POSITION))
    )


def simulate(
    n: int, rng: np.random.Generator, scores: np.ndarray = CHAMPION, policy: ExplorationConfig = POLICY
) -> LoggedRequests:
    """``n`` logged requests served by ``policy`` over ``scores`` (softmax: Gumbel top-k; epsilon-greedy:
    per slot the best remaining, or a uniform pick among the remaining), with clicks drawn from the true
    click probabilities and each slot's logged propensity."""
    k = len(POSITION)
    if policy.policy == "softmax":
        logits = scores / policy.temperature
        served = np.argsort(-(logits + rng.gumbel(size=(n, len(scores)))), axis=1)[:, :k]
        weights = np.exp(logits - logits.max())
        chosen = weights[served]
        left = weights.sum() - np.concatenate([np.zeros((n, 1)), np.cumsum(chosen, axis=1)[:, :-1]], axis=1)
        propensities = chosen / left
    else:
        served, propensities = np.zeros((n, k), dtype=np.int64), np.zeros((n, k))
        remaining = np.ones((n, len(scores)), dtype=bool)
        rows = np.arange(n)
        for slot in range(k):
            greedy = np.argmax(np.where(remaining, scores, -np.inf), axis=1)
            m = len(scores) - slot
            # a uniform pick among the remaining: the j-th remaining candidate, j uniform in [0, m)
            nth = rng.integers(0, m, size=n)
            uniform = np.argmax(np.cumsum(remaining, axis=1) > nth[:, None], axis=1)
            pick = np.where(rng.random(n) < policy.epsilon, uniform, greedy)
            served[:, slot] = pick
            propensities[:, slot] = (1 - policy.epsilon) * (pick == greedy) + policy.epsilon / m
            remaining[rows, pick] = False
    clicks = (rng.random(served.shape) < CTR[served] * POSITION).astype(np.float64)
    return LoggedRequests(
        user_ids=list(range(n)),
        candidates=[ITEMS] * n,
        served=list(served),
        propensities=list(propensities),
        clicks=list(clicks),
    )
