"""Exploration on the ranked list (``serving.exploration``): one random generator per request, and the
policy's sampling of the slots with the propensity of each (recsys/exploration.py holds the policies'
probabilities, which components/ope.py weights by). ``none`` is never sampled: the server keeps its ranked
top-n path unchanged.
"""

from __future__ import annotations

import threading

import numpy as np

from recsys.config import ExplorationConfig
from recsys.exploration import sample_slots


class Explorer:
    """``serving.exploration`` for a server: one generator per request, derived from ``seed`` (or fresh
    entropy), safe to call from the request threads."""

    def __init__(self, config: ExplorationConfig) -> None:
        self.config = config
        self._seeds = np.random.SeedSequence(config.seed)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.policy != "none"

    def generator(self) -> np.random.Generator:
        with self._lock:  # spawn counts its children: one request at a time
            (child,) = self._seeds.spawn(1)
        return np.random.default_rng(child)

    def choose(self, scores: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        return sample_slots(
            config.policy, scores, n, rng, epsilon=config.epsilon, temperature=config.temperature
        )
