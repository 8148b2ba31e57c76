"""Retrieval, ranking and the two-stage recommendation on a loaded bundle, independent of the protocol.

Inputs are assembled into Arrow tables with the training sets' column types and encoded by the model's
own saved encoder, so a served score is computed from exactly the representation the model was trained
and evaluated on (tests/test_serving_e2e.py checks it to 1e-5). Encoding is column by column, which is
what keeps ranking cheap: each ranker's item columns are encoded once for the whole catalogue and
gathered by row, and only the request's users are encoded per request, then repeated over their
candidates. Users are batched: one user-tower call, one FAISS search and one ranker call per request.

The bundle can change while the server runs (serving/index_swap.py takes up a refreshed index: same
models, more items): the recommender holds it, with what it derives from it, in one :class:`Served`
that is replaced by one assignment. Each request takes one snapshot (:meth:`Recommender.snapshot`) and
passes it to every step, so an answer is computed from, and reports, exactly one bundle.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import torch
from prometheus_client import Counter

from models import FeatureEncoder
from models.blend import blend_lists
from recsys.ann_index import search
from recsys.bundle_blend import HISTORY_FEATURE
from recsys.config import ServingConfig
from serving.bundle import IdPositions, ServingBundle
from serving.exploration import Explorer
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

    def row(self, i: int) -> dict[str, Any]:
        """User ``i``'s feature values, as the answer used them (for the request log)."""
        return {name: column[i] for name, column in self.columns.items()}


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
    candidates: int = 0  # items the answer was chosen from (retrieved and ranked, or given)
    features: dict[str, Any] | None = None  # the user feature values used
    bundle_version: str = ""  # the bundle the answer was computed from (``Served.version``)
    # per served item, the probability the serving policy put it in its slot (serving/exploration.py);
    # None: a deterministic answer (logged as 1.0 each)
    propensities: list[float] | None = None
    candidate_ids: list[int] | None = None  # the candidates exploration sampled from, as retrieved


@dataclass(frozen=True)
class Served:
    """A bundle and each ranker's encoded catalogue of it: what one request uses from start to end.

    Replaced whole (never mutated into another bundle's), so a request holding one keeps a consistent
    set of index, catalogue and encoded items while the recommender moves on to the next.
    """

    bundle: ServingBundle
    items: dict[str, _EncodedItems]

    @property
    def version(self) -> str:
        return self.bundle.version


class Recommender:
    """The bundle's models behind three operations: ``retrieve``, ``rank`` and ``recommend``."""

    def __init__(self, bundle: ServingBundle, features: OnlineFeatures, config: ServingConfig) -> None:
        self.features = features
        self.config = config
        self.user_feature_names = list(features.user_defaults)
        self.item_feature_names = list(features.item_defaults)
        # derived from the models, which a swap keeps (the same objects: see ``swap``)
        encoder = bundle.two_tower_encoder
        self._types = {name: _arrow_type(encoder, name) for name in bundle.feature_names}
        self._user_tower_features = bundle.two_tower.user_feature_names()  # type: ignore[attr-defined]
        self._item_feature_set = set(self.item_feature_names)
        self.explorer = Explorer(config.exploration)
        self._served = self.prepare(bundle)  # encode the catalogue now, not in the first request

    # ---- the bundle served ----------------------------------------------------------------------

    @property
    def bundle(self) -> ServingBundle:
        """The bundle answering new requests (a request in flight may still use the one before)."""
        return self._served.bundle

    def snapshot(self) -> Served:
        """The bundle a request uses for all its steps: take it once per request."""
        return self._served

    def prepare(self, bundle: ServingBundle) -> Served:
        """``bundle`` with each ranker's catalogue encoded (seconds for a large one: done before a swap,
        in the swapping thread, so no request pays for it)."""
        _pin_threads(self.config.torch_threads)
        items = {}
        for ranker, (model, encoder) in bundle.rankers.items():
            names = [n for n in model.feature_names() if n in self._item_feature_set]
            items[ranker] = _EncodedItems.build(self, encoder, names, bundle.catalogue)
        return Served(bundle, items)

    def swap(self, served: Served) -> ServingBundle:
        """Serve ``served`` from the next request on (one assignment); returns the bundle it replaces.

        Only the index side may change: the models must be the very objects served now, since what is
        derived from them here (column types, tower inputs) is kept.
        """
        current = self._served.bundle
        new = served.bundle
        same_models = new.two_tower is current.two_tower and new.rankers.keys() == current.rankers.keys()
        if not same_models or any(new.rankers[r][0] is not m for r, (m, _) in current.rankers.items()):
            raise ValueError(f"bundle {new.version}: not the served models; a new model needs a rollout")
        self._served = served
        return current

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
    def user_vectors(self, users: UserFeatures, served: Served | None = None) -> np.ndarray:
        """The user tower's L2-normalised vectors [B, d]."""
        _pin_threads(self.config.torch_threads)
        bundle = (served or self._served).bundle
        table = self._table({n: users.columns[n] for n in self._user_tower_features})
        batch = bundle.two_tower_encoder.encode(table, features=self._user_tower_features)
        return bundle.two_tower.user_embedding(batch).numpy()  # type: ignore[attr-defined]

    def retrieve(
        self,
        users: UserFeatures,
        k: Sequence[int],
        exclude: Sequence[set[int]] | None = None,
        served: Served | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-``k[i]`` catalogue items of each user by inner product, leaving out ``exclude[i]``.

        When the bundle carries a retrieval blend (share > 0), that share of every prefix of the list is
        the popular items, or item-kNN's list over the user's history feature, instead (models/blend.py,
        as the evaluate step measured it); they are scored by the two-tower too, so the scores are the
        model's but the order is the blend's."""
        served = served or self._served
        bundle = served.bundle
        vectors = self.user_vectors(users, served)
        exclude = exclude or [set() for _ in range(len(users))]
        width = max(k) + max(len(e) for e in exclude)
        ids, scores = search(bundle.index, vectors, width)
        out = []
        for row in range(len(users)):
            keep = ids[row] >= 0
            excluded = np.fromiter(exclude[row], dtype=np.int64) if exclude[row] else None
            if excluded is not None:
                keep &= ~np.isin(ids[row], excluded)
            chosen = np.flatnonzero(keep)[: k[row]]
            if bundle.blend_share > 0:
                history = _history(users, row) if bundle.blend_table is not None else None
                out.append(
                    _blended(
                        bundle, ids[row][chosen], scores[row][chosen], vectors[row], excluded, k[row], history
                    )
                )
            else:
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
        served: Served | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Logits of ``ranker`` for every (user, candidate) pair, one ranker call for the whole batch.

        Users are encoded once each, and towers that read only user features run once per user;
        candidates are gathered from the ranker's encoded catalogue (``_EncodedItems``) and only items it
        lacks, whose cached features were refreshed, or that the request overrides are encoded now.
        Encoding is per column, so the batch is the one encoding the whole (user, item) table would give.

        Returns the scores per user and, per user, whether each candidate's features came from the store
        (False: content unknown, defaults used).
        """
        _pin_threads(self.config.torch_threads)
        served = served or self._served
        model, encoder = served.bundle.rankers[ranker]
        counts = [len(c) for c in candidates]
        all_items = np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates])
        flat_overrides = _flat_overrides(item_overrides, counts)
        item_batch, found = served.items[ranker].gather(self, all_items, flat_overrides)
        user_names = [n for n in model.feature_names() if n not in self._item_feature_set]
        user_batch = encoder.encode(
            self._table({n: users.columns[n] for n in user_names}), features=user_names
        )
        repeat = torch.repeat_interleave(torch.arange(len(users)), torch.as_tensor(counts, dtype=torch.int64))
        # towers that read only user features run once per user, not once per candidate
        logits = (
            model.predict_for_users(  # type: ignore[attr-defined]
                user_batch, item_batch, repeat, set(user_names)
            )
            .float()
            .numpy()
        )
        bounds = np.cumsum([0, *counts])
        scores = [logits[bounds[i] : bounds[i + 1]] for i in range(len(counts))]
        found_per_user = [found[bounds[i] : bounds[i + 1]] for i in range(len(counts))]
        return scores, found_per_user

    # ---- two stages -----------------------------------------------------------------------------

    def recommend(
        self,
        user_ids: Sequence[int],
        n: Sequence[int],
        ranker: Sequence[str],
        contexts: Sequence[dict[str, Any] | None],
        served: Served | None = None,
    ) -> list[Result]:
        """Online features -> retrieval (``retrieve_k``) -> candidate features -> ranking -> top-n."""
        served = served or self._served
        bundle = served.bundle
        users = self.user_features(user_ids, [(c or {}).get("features") for c in contexts])
        exclude = []
        for i, context in enumerate(contexts):
            excluded = {int(x) for x in (context or {}).get("exclude_item_ids", [])}
            if self.config.exclude_history and "hist_item_ids" in users.columns:
                excluded.update(int(x) for x in users.columns["hist_item_ids"][i])
            exclude.append(excluded)
        cold = [
            not users.found[i] and not bundle.knows_user(u) and not (contexts[i] or {}).get("features")
            for i, u in enumerate(user_ids)
        ]
        results: list[Result | None] = [None] * len(user_ids)
        rng = self.explorer.generator() if self.explorer.enabled else None  # one per request
        for i in np.flatnonzero(cold):
            results[i] = _popular(bundle, user_ids[i], n[i], exclude[i], users.degraded)
            results[i].features = users.row(i)
        warm = [i for i in range(len(user_ids)) if not cold[i]]
        if warm:
            subset = UserFeatures(
                {name: [col[i] for i in warm] for name, col in users.columns.items()},
                users.found[warm],
                users.degraded,
            )
            retrieved = self.retrieve(
                subset, [self.config.retrieve_k] * len(warm), [exclude[i] for i in warm], served
            )
            for name in sorted({ranker[i] for i in warm}):
                rows = [j for j, i in enumerate(warm) if ranker[i] == name]
                part = UserFeatures(
                    {c: [v[j] for j in rows] for c, v in subset.columns.items()},
                    subset.found[rows],
                    users.degraded,
                )
                scores, _ = self.rank(part, [retrieved[j][0] for j in rows], name, served=served)
                for j, row_scores in zip(rows, scores, strict=True):
                    i = warm[j]
                    if rng is None:
                        top = np.argsort(-row_scores, kind="stable")[: n[i]]
                        propensities, candidate_ids = [1.0] * len(top), None
                    else:
                        top, chosen_p = self.explorer.choose(row_scores, n[i], rng)
                        propensities, candidate_ids = chosen_p.tolist(), retrieved[j][0].tolist()
                    results[i] = Result(
                        user_id=int(user_ids[i]),
                        item_ids=retrieved[j][0][top].tolist(),
                        scores=row_scores[top].astype(float).tolist(),
                        source="model",
                        degraded=users.degraded,
                        # a store outage hides every user's features: degraded, not a cold start
                        cold_start=not bool(users.found[i]) and not users.degraded,
                        extra={"ranker": name},
                        candidates=len(row_scores),
                        features=users.row(i),
                        bundle_version=served.version,
                        propensities=propensities,
                        candidate_ids=candidate_ids,
                    )
        for r in results:
            if r is not None and r.cold_start:
                COLD_STARTS.labels(model="recommend").inc()
        return [r for r in results if r is not None]

    def _table(self, columns: dict[str, list[Any]]) -> pa.Table:
        return pa.table({name: pa.array(values, type=self._types[name]) for name, values in columns.items()})


def _blended(
    bundle: ServingBundle,
    model_ids: np.ndarray,
    model_scores: np.ndarray,
    user_vector: np.ndarray,
    excluded: np.ndarray | None,
    k: int,
    history: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``model_ids`` (ANN order) blended with the bundle's popular items (or, with a neighbour table,
    item-kNN's list over ``history``) not in ``excluded``, at the bundle's share; each item's two-tower
    score (the blended-in ones: their embedding . the user's vector)."""
    if bundle.blend_table is not None:
        ranked = bundle.blend_table.ranked(history or [], k, () if excluded is None else excluded)
        assert bundle.blend_positions is not None  # set with blend_table by load_bundle
        rows = bundle.blend_positions.positions(np.asarray(ranked, dtype=np.int64))
        popular = np.asarray(ranked, dtype=np.int64)[rows >= 0]  # only items the index holds
        vectors, keep = bundle.blend_vectors[rows[rows >= 0]], np.ones(len(popular), dtype=bool)
    else:
        popular, vectors = bundle.blend_ids, bundle.blend_vectors
        keep = np.ones(len(popular), dtype=bool) if excluded is None else ~np.isin(popular, excluded)
    items = np.asarray(
        blend_lists(model_ids.tolist(), popular[keep].tolist(), bundle.blend_share, k), dtype=np.int64
    )
    score_of = dict(zip(model_ids.tolist(), model_scores.astype(np.float32).tolist(), strict=True))
    popular_scores = vectors[keep] @ user_vector.astype(np.float32)
    score_of.update(
        (item, score)
        for item, score in zip(popular[keep].tolist(), popular_scores.tolist(), strict=True)
        if item not in score_of
    )
    return items, np.asarray([score_of[i] for i in items.tolist()], dtype=np.float32)


def _history(users: UserFeatures, row: int) -> list[int]:
    """The user's history feature (item ids), what the item-kNN blend scores; none known: empty."""
    column = users.columns.get(HISTORY_FEATURE)
    value = None if column is None else column[row]
    return [] if value is None else [int(i) for i in value]


def _popular(bundle: ServingBundle, user_id: int, n: int, exclude: set[int], degraded: bool) -> Result:
    ids, scores = bundle.popular_ids, bundle.popular_scores
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
        candidates=len(ids),
        bundle_version=bundle.version,
    )


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


_PINNED = threading.local()


def _pin_threads(n: int) -> None:
    """Give FAISS and torch ``n`` OpenMP threads in the calling thread (once per thread).

    OpenMP's thread count is per calling thread, so ``torch.set_num_threads`` at start-up does not
    reach the thread the server predicts on; there FAISS would search one query with every core's
    threads, which on a shared 2-core machine costs ~8 ms instead of ~0.05 ms.
    """
    if getattr(_PINNED, "threads", None) != n:
        faiss.omp_set_num_threads(n)
        torch.set_num_threads(n)
        _PINNED.threads = n


class _EncodedItems:
    """One ranker's encoded item features for the whole catalogue, gathered by row per request.

    Each row remembers the online-feature cache entry it was encoded from; an entry is replaced when the
    item cache refreshes it, so a row whose entry is no longer the current one is re-encoded (and
    stored) when next asked for. Rows encoded from an outage's defaults or from a request's overrides
    are used for that request only.
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        names: list[str],
        ids: np.ndarray,
        batch: dict[str, torch.Tensor],
        entries: list[tuple[Any, ...] | None],
    ) -> None:
        self.encoder = encoder  # the ranker's
        self.names = names
        self.index = IdPositions(ids)
        self.batch = batch
        self.entries: list[tuple[Any, ...] | None] = entries

    @classmethod
    def build(
        cls, rec: Recommender, encoder: FeatureEncoder, names: list[str], ids: np.ndarray
    ) -> _EncodedItems:
        entries, degraded = rec.features.item_entries([int(i) for i in ids])
        batch = _encode_items(rec, encoder, names, entries, None)
        return cls(encoder, names, ids, batch, [None] * len(ids) if degraded else list(entries))

    def gather(
        self,
        rec: Recommender,
        item_ids: np.ndarray,
        overrides: list[dict[str, Any] | None],
    ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """The encoded features of ``item_ids`` (``overrides`` parallel) and whether the store knew each."""
        n = len(item_ids)
        overridden = np.fromiter(
            (bool(o) and any(v is not None for v in o.values()) for o in overrides), bool, n
        )
        entries, degraded = rec.features.item_entries(item_ids.tolist())
        found = np.fromiter((e[-1] for e in entries), dtype=bool, count=n)
        if not len(self.index):  # an empty catalogue: nothing to gather from
            return _encode_items(rec, self.encoder, self.names, entries, overrides), found
        positions = self.index.positions(item_ids)
        known = self.entries
        changed = np.fromiter(
            (known[p] is not e for p, e in zip(positions.tolist(), entries, strict=True)), bool, n
        )
        fresh = np.flatnonzero(changed | overridden | (positions < 0)).tolist()
        rows = torch.from_numpy(np.maximum(positions, 0))
        batch = {key: tensor.index_select(0, rows) for key, tensor in self.batch.items()}
        if fresh:
            encoded = _encode_items(
                rec, self.encoder, self.names, [entries[j] for j in fresh], [overrides[j] for j in fresh]
            )
            at = torch.as_tensor(fresh, dtype=torch.int64)
            for key, tensor in encoded.items():
                batch[key][at] = tensor
            if not degraded:  # keep refreshed catalogue rows for the next requests
                keep = [k for k, j in enumerate(fresh) if positions[j] >= 0 and not overridden[j]]
                if keep:
                    rows_at = torch.as_tensor([positions[fresh[k]] for k in keep], dtype=torch.int64)
                    src = torch.as_tensor(keep, dtype=torch.int64)
                    for key, tensor in encoded.items():
                        self.batch[key][rows_at] = tensor[src]
                    for k in keep:
                        known[positions[fresh[k]]] = entries[fresh[k]]
        return batch, found


def _encode_items(
    rec: Recommender,
    encoder: FeatureEncoder,
    names: list[str],
    entries: Sequence[tuple[Any, ...]],
    overrides: Sequence[dict[str, Any] | None] | None,
) -> dict[str, torch.Tensor]:
    """A ranker's encoding of item features ``names`` from cache entries, request overrides applied."""
    order = list(rec.features.item_defaults)
    columns = {name: [e[order.index(name)] for e in entries] for name in names}
    for j, override in enumerate(overrides or []):
        for name, value in (override or {}).items():
            if value is not None and name in columns:
                columns[name][j] = value
    return encoder.encode(rec._table(columns), features=names)


def _flat_overrides(
    overrides: Sequence[Sequence[dict[str, Any] | None] | None] | None, counts: Sequence[int]
) -> list[dict[str, Any] | None]:
    """Per-candidate item feature overrides, flattened over users (None: the store's values)."""
    if overrides is None:
        return [None] * sum(counts)
    flat: list[dict[str, Any] | None] = []
    for per_user, count in zip(overrides, counts, strict=True):
        given = list(per_user or [])
        flat.extend(given + [None] * (count - len(given)))
    return flat
