"""Retrieval, ranking and the two-stage recommendation on a loaded bundle, independent of the protocol.

Inputs are assembled into one Arrow table per model call with the training sets' column types and
encoded by the model's own saved encoder, so a served score is computed from exactly the
representation the model was trained and evaluated on (tests/test_serving_skew.py checks it to 1e-5).
Users are batched: one user-tower call, one FAISS search and one ranker call per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from prometheus_client import Counter

from components.build_index import search
from components.config import ServingConfig
from models import FeatureEncoder
from serving.bundle import ServingBundle
from serving.online_features import FeatureRows, OnlineFeatures

COLD_STARTS = Counter(
    "recsys_cold_start_answers",
    "Users answered without their own features or embedding (popular items or the tower on defaults).",
    ["model"],
)


@dataclass
class UserFeatures:
    """Feature columns of a batch of users, with which ones the store knew and whether it was down."""

    columns: dict[str, list[Any]]
    found: np.ndarray
    degraded: bool

    def __len__(self) -> int:
        return len(self.found)


@dataclass
class Result:
    """Items and scores for one user, with how they were obtained."""

    user_id: int | None
    item_ids: list[int]
    scores: list[float]
    source: str  # "model" | "popular" (cold start)
    degraded: bool = False
    cold_start: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Recommender:
    """The bundle's models behind three operations: ``retrieve``, ``rank`` and ``recommend``."""

    def __init__(self, bundle: ServingBundle, features: OnlineFeatures, config: ServingConfig) -> None:
        self.bundle = bundle
        self.features = features
        self.config = config
        self.user_feature_names = list(features.user_defaults)
        self.item_feature_names = list(features.item_defaults)
        encoder = bundle.two_tower_encoder
        self._types = {name: _arrow_type(encoder, name) for name in bundle.feature_names}
        self._user_tower_features = bundle.two_tower.user_feature_names()  # type: ignore[attr-defined]

    # ---- users ----------------------------------------------------------------------------------

    def user_features(
        self,
        user_ids: Sequence[int | None],
        overrides: Sequence[dict[str, Any] | None],
    ) -> UserFeatures:
        """Latest stored features of each user (defaults for ``None`` ids), then the request's values."""
        known = [i for i, u in enumerate(user_ids) if u is not None]
        columns = {name: [value] * len(user_ids) for name, value in self.features.user_defaults.items()}
        found = np.zeros(len(user_ids), dtype=bool)
        degraded = False
        if known:
            ids = [int(user_ids[i]) for i in known]  # type: ignore[arg-type]
            rows: FeatureRows = self.features.users(ids)
            degraded = rows.degraded
            for name, values in rows.columns.items():
                column = columns[name]
                for j, i in enumerate(known):
                    column[i] = values[j]
            found[known] = rows.found
        for i, override in enumerate(overrides):
            for name, value in (override or {}).items():
                if value is not None:
                    columns[name][i] = value
        return UserFeatures(columns, found, degraded)

    # ---- retrieval ------------------------------------------------------------------------------

    @torch.inference_mode()
    def user_vectors(self, users: UserFeatures) -> np.ndarray:
        """The user tower's L2-normalised vectors [B, d]."""
        table = self._table({n: users.columns[n] for n in self._user_tower_features})
        batch = self.bundle.two_tower_encoder.encode(table, features=self._user_tower_features)
        return self.bundle.two_tower.user_embedding(batch).numpy()  # type: ignore[attr-defined]

    def retrieve(
        self, users: UserFeatures, k: Sequence[int], exclude: Sequence[set[int]] | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k[i]`` catalogue items of each user by inner product, leaving out ``exclude[i]``."""
        vectors = self.user_vectors(users)
        exclude = exclude or [set() for _ in range(len(users))]
        width = max(k) + max(len(e) for e in exclude)
        ids, scores = search(self.bundle.index, vectors, width)
        out = []
        for row in range(len(users)):
            keep = ids[row] >= 0
            if exclude[row]:
                keep &= ~np.isin(ids[row], np.fromiter(exclude[row], dtype=np.int64))
            chosen = np.flatnonzero(keep)[: k[row]]
            out.append((ids[row][chosen], scores[row][chosen]))
        return out

    # ---- ranking --------------------------------------------------------------------------------

    @torch.inference_mode()
    def rank(
        self,
        users: UserFeatures,
        candidates: Sequence[np.ndarray],
        ranker: str,
        item_overrides: Sequence[Sequence[dict[str, Any] | None] | None] | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Logits of ``ranker`` for every (user, candidate) pair, one ranker call for the whole batch.

        Returns the scores per user and, per user, whether each candidate's features came from the store
        (False: content unknown, defaults used).
        """
        model, encoder = self.bundle.rankers[ranker]
        counts = [len(c) for c in candidates]
        all_items = [int(i) for c in candidates for i in c]
        items = self.features.items(all_items)
        item_columns = {name: list(values) for name, values in items.columns.items()}
        if item_overrides is not None:
            position = 0
            for per_user, count in zip(item_overrides, counts, strict=True):
                for j, override in enumerate(per_user or []):
                    for name, value in (override or {}).items():
                        if value is not None:
                            item_columns[name][position + j] = value
                position += count
        repeat = np.repeat(np.arange(len(users)), counts)
        columns: dict[str, list[Any]] = {
            name: [users.columns[name][r] for r in repeat] for name in self.user_feature_names
        }
        columns.update(item_columns)
        names = model.feature_names()
        table = self._table({n: columns[n] for n in names})
        logits = model.predict(encoder.encode(table, features=names)).float().numpy()  # type: ignore[attr-defined]
        bounds = np.cumsum([0, *counts])
        scores = [logits[bounds[i] : bounds[i + 1]] for i in range(len(counts))]
        found = [items.found[bounds[i] : bounds[i + 1]] for i in range(len(counts))]
        return scores, found

    # ---- two stages -----------------------------------------------------------------------------

    def recommend(
        self,
        user_ids: Sequence[int],
        n: Sequence[int],
        ranker: Sequence[str],
        contexts: Sequence[dict[str, Any] | None],
    ) -> list[Result]:
        """Online features -> retrieval (``retrieve_k``) -> candidate features -> ranking -> top-n."""
        users = self.user_features(user_ids, [(c or {}).get("features") for c in contexts])
        exclude = []
        for i, context in enumerate(contexts):
            excluded = {int(x) for x in (context or {}).get("exclude_item_ids", [])}
            if self.config.exclude_history and "hist_item_ids" in users.columns:
                excluded.update(int(x) for x in users.columns["hist_item_ids"][i])
            exclude.append(excluded)
        cold = [
            not users.found[i] and not self.bundle.knows_user(u) and not (contexts[i] or {}).get("features")
            for i, u in enumerate(user_ids)
        ]
        results: list[Result | None] = [None] * len(user_ids)
        for i in np.flatnonzero(cold):
            results[i] = self._popular(user_ids[i], n[i], exclude[i], users.degraded)
        warm = [i for i in range(len(user_ids)) if not cold[i]]
        if warm:
            subset = UserFeatures(
                {name: [col[i] for i in warm] for name, col in users.columns.items()},
                users.found[warm],
                users.degraded,
            )
            retrieved = self.retrieve(
                subset, [self.config.retrieve_k] * len(warm), [exclude[i] for i in warm]
            )
            for name in sorted({ranker[i] for i in warm}):
                rows = [j for j, i in enumerate(warm) if ranker[i] == name]
                part = UserFeatures(
                    {c: [v[j] for j in rows] for c, v in subset.columns.items()},
                    subset.found[rows],
                    users.degraded,
                )
                scores, _ = self.rank(part, [retrieved[j][0] for j in rows], name)
                for j, row_scores in zip(rows, scores, strict=True):
                    i = warm[j]
                    top = np.argsort(-row_scores, kind="stable")[: n[i]]
                    results[i] = Result(
                        user_id=int(user_ids[i]),
                        item_ids=retrieved[j][0][top].tolist(),
                        scores=row_scores[top].astype(float).tolist(),
                        source="model",
                        degraded=users.degraded,
                        cold_start=not bool(users.found[i]),
                        extra={"ranker": name},
                    )
        for r in results:
            if r is not None and r.cold_start:
                COLD_STARTS.labels(model="recommend").inc()
        return [r for r in results if r is not None]

    def _popular(self, user_id: int, n: int, exclude: set[int], degraded: bool) -> Result:
        ids, scores = self.bundle.popular_ids, self.bundle.popular_scores
        if exclude:
            keep = ~np.isin(ids, np.fromiter(exclude, dtype=np.int64))
            ids, scores = ids[keep], scores[keep]
        return Result(
            user_id=int(user_id),
            item_ids=ids[:n].tolist(),
            scores=scores[:n].astype(float).tolist(),
            source="popular",
            degraded=degraded,
            cold_start=True,
        )

    def _table(self, columns: dict[str, list[Any]]) -> pa.Table:
        return pa.table({name: pa.array(values, type=self._types[name]) for name, values in columns.items()})


def _arrow_type(encoder: FeatureEncoder, name: str) -> pa.DataType:
    """The training sets' column type of a feature (ints and strings as fitted, lists of them, floats)."""
    spec = encoder.spec
    kind = spec.kind_of(name)
    if kind == "sparse":
        return pa.string() if encoder.value_kinds[name] == "str" else pa.int64()
    if kind == "sequence":
        shared = spec.sequence_feature(name).shares
        return pa.list_(pa.string() if encoder.value_kinds[shared] == "str" else pa.int64())
    return pa.float64()
