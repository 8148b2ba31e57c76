"""Online feature lookup: the user's and the candidates' latest features from the Feast online store.

Feature names are the contract's bare names (no view prefix); which Feast view serves each comes from the
project's feature service, so this module never repeats the view layout. A value the store does not hold
(unknown entity, or a view without a row for it) gets the data contract's default ("" / 0 / empty list),
the same default the training sets use, so a cold entity is encoded at serving as it was in training.

A registry without the project's feature service yet (a fresh cluster before the first run applied the
views) does not stop the server: it starts, answers with defaults flagged degraded, says so
(``recsys_online_store_ready`` 0) and looks again every ``REGISTRY_RETRY_S``.

A read that fails or takes longer than ``serving.feast_timeout_s`` is treated as the store being down:
the caller gets defaults and ``degraded=True``, a warning is logged and
``recsys_online_store_failures_total`` counts it. A local (SQLite) store's file is checked before each
read: Feast keeps one connection open on it, which would go on reading a deleted file or the old copy of
a replaced one, so a missing file is a failed read and a replaced one is reopened. Item features change
slowly (daily snapshots) and are read for hundreds of candidates per request, so they are cached for
``serving.item_cache_ttl_s``; the whole catalogue is read into the cache at start-up (:meth:`warm`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from models import FeatureEncoder
from recsys.contracts import MISSING_CATEGORY, NUMBER_DEFAULT

TIMESTAMP_POSTFIX = "__ts"  # feast.online_response: OnlineResponse.to_dict(include_event_timestamps=True)

log = logging.getLogger(__name__)

FEATURE_SERVICE = "ranking"  # feature_repo/definitions.py: the service holding every model input
ITEM_READ_CHUNK = 1_000  # entity rows per online read when warming the item cache
# The warm-up is a start-up step, not a request: its reads together may take this long (the first one loads
# the registry and opens connections), derived from the catalogue size with a wide margin (a read costs
# tens of microseconds per item); the InferenceService's startupProbe allows 300 s.
WARM_UP_BASE_S = 60.0
WARM_UP_PER_ITEM_S = 0.001

VIEW_CLOCK_REFRESH_S = 600.0  # views' materialisation ends are re-read from the (cached) registry this often
REGISTRY_RETRY_S = 30.0  # a registry without the feature service yet (no views applied): look again

ONLINE_STORE_READY = Gauge(
    "recsys_online_store_ready",
    "1 when the Feast registry holds the feature service and features are read from the online store; 0 "
    "while the server answers with default features (marked degraded) and looks for it again.",
    multiprocess_mode="min",  # one value for the pod: 0 while any worker is not ready
)
ONLINE_STORE_FAILURES = Counter(
    "recsys_online_store_failures",
    "Online feature reads that failed or timed out; the request was answered with default features.",
    ["entity"],
)


@dataclass(frozen=True)
class FeatureRows:
    """Feature values of a list of entities, column by column, plus which entities the store knew."""

    columns: dict[str, list[Any]]
    found: np.ndarray  # bool per entity: the store held at least one of its features
    degraded: bool  # the store was unreachable; every value is a default


def feature_defaults(encoder: FeatureEncoder, names: Iterable[str]) -> dict[str, Any]:
    """The contract's default of each feature: "" for strings, 0 for numbers, [] for lists."""
    spec = encoder.spec
    defaults: dict[str, Any] = {}
    for name in names:
        kind = spec.kind_of(name)
        if kind == "sequence":
            defaults[name] = []
        elif kind == "sparse":
            defaults[name] = MISSING_CATEGORY if encoder.value_kinds[name] == "str" else NUMBER_DEFAULT
        else:
            defaults[name] = float(NUMBER_DEFAULT)
    return defaults


class OnlineFeatures:
    """User and item features by id; from Feast when a store is given, else the defaults only."""

    def __init__(
        self,
        store: Any | None,
        user_defaults: dict[str, Any],
        item_defaults: dict[str, Any],
        *,
        timeout_s: float,
        item_cache_ttl_s: float,
        registry_retry_s: float = REGISTRY_RETRY_S,
    ) -> None:
        self.store = store
        self.user_defaults = user_defaults
        self.item_defaults = item_defaults
        self.timeout_s = timeout_s
        self.item_cache_ttl_s = item_cache_ttl_s
        self._item_cache: dict[int, tuple[float, tuple[Any, ...]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="feast")
        self.user_refs: list[str] = []
        self.item_refs: list[str] = []
        self._local_file: _LocalStoreFile | None = None
        self._ready = threading.Event()  # the feature references are resolved
        self._closed = threading.Event()
        self._pending_warm: list[int] = []  # the catalogue, warmed once the registry is ready
        self._view_of: dict[str, str] = {}  # feature name -> the view serving it
        self._views: dict[str, ViewClock] = {}  # view -> its TTL and the end of its materialisation
        self._views_read_at = 0.0
        if store is not None:
            _check_registry(store)
            self._local_file = _LocalStoreFile.of(store)
            if not self._resolve():
                threading.Thread(
                    target=self._keep_resolving, args=(registry_retry_s,), name="feast-registry", daemon=True
                ).start()

    @property
    def ready(self) -> bool:
        """Features come from the online store (or there is none); False while the registry lacks them."""
        return self.store is None or self._ready.is_set()

    def close(self) -> None:
        """Stop looking for the registry's feature service (a server shutting down)."""
        self._closed.set()

    def _resolve(self) -> bool:
        """Find the feature references in the registry; False (said, and the gauge at 0) when it has no
        feature service yet: a fresh cluster's registry before the first pipeline run applied the views.
        The server then starts and answers with defaults, flagged degraded, instead of crash-looping."""
        try:
            refs = _feature_refs(self.store, list(self.user_defaults), list(self.item_defaults))
            self._view_of = {ref.split(":", 1)[1]: ref.split(":", 1)[0] for ref in refs[0] + refs[1]}
            self._read_view_clocks()
        except Exception as exc:  # Feast's FeatureServiceNotFoundException, an unreachable SQL registry, ...
            ONLINE_STORE_READY.set(0)
            log.warning(
                "online store not ready, answering with default features (degraded) until it is: %r", exc
            )
            return False
        self.user_refs, self.item_refs = refs
        self._ready.set()
        ONLINE_STORE_READY.set(1)
        return True

    def _keep_resolving(self, retry_s: float) -> None:
        """Look for the feature service every ``retry_s`` (Feast caches the registry: refreshed first);
        once found, warm the item cache the start-up could not."""
        while not self._closed.wait(retry_s):
            try:
                self.store.refresh_registry()
            except Exception as exc:  # still not there: _resolve says so
                log.debug("registry refresh failed: %r", exc)
            if self._resolve():
                log.info("online store ready: the registry holds feature service '%s'", FEATURE_SERVICE)
                self.warm(self._pending_warm)
                return

    def users(self, user_ids: Sequence[int]) -> FeatureRows:
        """Latest features of each user (defaults where the store has none, or is down)."""
        return self._read("user_id", self.user_refs, self.user_defaults, user_ids, entity="user")

    def items(self, item_ids: Sequence[int]) -> FeatureRows:
        """Latest features of each item, through the in-memory cache."""
        entries, degraded = self.item_entries(item_ids)
        columns = {name: [row[k] for row in entries] for k, name in enumerate(self.item_defaults)}
        found = np.fromiter((row[-1] for row in entries), dtype=bool, count=len(entries))
        return FeatureRows(columns, found, degraded=degraded)

    def item_entries(self, item_ids: Sequence[int]) -> tuple[list[tuple[Any, ...]], bool]:
        """Each item's cache entry ``(*values in item_defaults order, found)`` and whether the store was down.

        Expired entries are re-read first; an entry is replaced, never mutated, so a caller holding
        something derived from an entry can tell by identity whether it is still current.
        """
        names = list(self.item_defaults)
        now = time.monotonic()
        missing = [
            i for i in dict.fromkeys(item_ids) if (hit := self._item_cache.get(i)) is None or hit[0] < now
        ]
        if missing:
            rows = self._read("item_id", self.item_refs, self.item_defaults, missing, entity="item")
            if rows.degraded:  # never cache defaults caused by an outage
                defaults = self._read("item_id", [], self.item_defaults, item_ids, entity="item")
                return [_entry(defaults, names, j) for j in range(len(item_ids))], True
            self._cache_items(missing, rows, now)
        cache = self._item_cache
        return [cache[i][1] for i in item_ids], False

    def warm(self, item_ids: Sequence[int]) -> int:
        """Fill the item cache for the whole catalogue (and open the store's connections) before serving;
        returns how many items were left cold.

        A start-up step, so not bound by ``serving.feast_timeout_s``: the reads together may take
        ``WARM_UP_BASE_S`` plus ``WARM_UP_PER_ITEM_S`` per item. A chunk whose read fails is read once more;
        items still unread stay cold (read per request, under the request timeout) and a warning says
        how many.
        """
        if self.store is None:
            return 0
        ids = list(dict.fromkeys(int(i) for i in item_ids))
        if not self._ready.is_set():  # warmed when the registry is ready (_keep_resolving)
            self._pending_warm = ids
            return len(ids)
        started = time.monotonic()
        bound_s = WARM_UP_BASE_S + WARM_UP_PER_ITEM_S * len(ids)
        deadline = started + bound_s
        cold = 0
        for start in range(0, len(ids), ITEM_READ_CHUNK):
            chunk = ids[start : start + ITEM_READ_CHUNK]
            if not self._warm_chunk(chunk, deadline):
                cold += len(chunk)
        if ids:  # the first user read loads the registry: keep that out of the first request
            left = max(deadline - time.monotonic(), self.timeout_s)
            self._read("user_id", self.user_refs, self.user_defaults, [0], entity="user", timeout_s=left)
        if cold:
            log.warning(
                "item cache warm-up left %d of %d catalogue items cold (the online store failed twice on "
                "their reads, or the warm-up passed its %.0f s bound): requests read them within "
                "serving.feast_timeout_s and get defaults while the store fails",
                cold,
                len(ids),
                bound_s,
            )
        else:
            log.info("item cache warm: %d items in %.1f s", len(ids), time.monotonic() - started)
        return cold

    def _warm_chunk(self, chunk: list[int], deadline: float) -> bool:
        """Read ``chunk`` into the item cache, retrying a failed read once; whether it was read."""
        for _ in range(2):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            rows = self._read(
                "item_id", self.item_refs, self.item_defaults, chunk, entity="item", timeout_s=left
            )
            if not rows.degraded:
                self._cache_items(chunk, rows, time.monotonic())
                return True
        return False

    def _cache_items(self, item_ids: list[int], rows: FeatureRows, now: float) -> None:
        names = list(self.item_defaults)
        expires = now + self.item_cache_ttl_s
        for j, item_id in enumerate(item_ids):
            self._item_cache[item_id] = (expires, _entry(rows, names, j))

    def _read(
        self,
        key: str,
        refs: list[str],
        defaults: dict[str, Any],
        ids: Sequence[int],
        entity: str,
        timeout_s: float | None = None,
    ) -> FeatureRows:
        """One online read of ``ids`` within ``timeout_s`` (default: ``serving.feast_timeout_s``)."""
        n = len(ids)
        columns = {name: [value] * n for name, value in defaults.items()}
        if key in columns:  # the entity's own id is a model feature (its embedding row)
            columns[key] = [int(i) for i in ids]
        found = np.zeros(n, dtype=bool)
        if self.store is not None and not self._ready.is_set():
            return FeatureRows(columns, found, degraded=True)  # no feature service yet: defaults, flagged
        if self.store is None or not refs or n == 0:
            return FeatureRows(columns, found, degraded=False)
        try:
            future = self._pool.submit(self._online_read, refs, [{key: int(i)} for i in ids])
            values = future.result(timeout=self.timeout_s if timeout_s is None else timeout_s)
        except Exception as exc:  # any store failure (connection, timeout, schema) degrades, never 500s
            ONLINE_STORE_FAILURES.labels(entity=entity).inc()
            log.warning("online store read of %d %s(s) failed, serving defaults: %r", n, entity, exc)
            return FeatureRows(columns, found, degraded=True)
        for name, default in defaults.items():
            column = values.get(name) if name != key else None
            if column is None:
                continue
            column = self._within_ttl(name, column, values.get(name + TIMESTAMP_POSTFIX))
            present = np.fromiter((v is not None for v in column), dtype=bool, count=n)
            found |= present
            columns[name] = [_as_default_type(v, default) if v is not None else default for v in column]
        return FeatureRows(columns, found, degraded=False)

    def _online_read(self, refs: list[str], entity_rows: list[dict[str, int]]) -> dict[str, list[Any]]:
        """Feast's answer as columns; in a pool thread, so that the caller's timeout bounds all of it."""
        if self._local_file is not None:
            self._local_file.check()
        if time.monotonic() - self._views_read_at > VIEW_CLOCK_REFRESH_S:
            self._read_view_clocks()
        response = self.store.get_online_features(features=refs, entity_rows=entity_rows)
        return response.to_dict(include_event_timestamps=True)

    def _read_view_clocks(self) -> None:
        """Each served view's TTL and where its last materialisation ended (Feast's registry)."""
        self._views = {
            view: _view_clock(self.store.get_feature_view(view)) for view in set(self._view_of.values())
        }
        self._views_read_at = time.monotonic()

    def _within_ttl(self, name: str, column: list[Any], stamps: list[int] | None) -> list[Any]:
        """``column`` with the values older than their view's TTL dropped, as Feast's offline
        point-in-time join drops them when the training sets are built: Feast's online store keeps an
        entity's last row forever, so a user inactive for longer than ``user_stats``' TTL was served its
        stale statistics while the models trained on defaults for such users (train/serve skew). The
        clock is the end of the view's last materialisation, or now if earlier: the moment the store's
        values describe (a replay of old data gets that data's clock, a daily run today's)."""
        clock = self._views.get(self._view_of.get(name, ""))
        if clock is None or stamps is None or clock.ttl_s <= 0:
            return column
        # Feast's materialisation end is exclusive (recsys/feature_store.py ends it 1 s past the newest row)
        # and its offline join keeps a row exactly TTL old: the store describes the second before the end
        cutoff = min(time.time(), clock.materialized_until - 1.0) - clock.ttl_s
        return [v if v is not None and ts >= cutoff else None for v, ts in zip(column, stamps, strict=True)]


class _LocalStoreFile:
    """The SQLite file of a local online store, checked before each read.

    Feast opens the file once and keeps the connection: after the file is deleted it goes on reading the
    deleted copy (or, not connected yet, creates an empty file and fails), and after the file is replaced
    (``dvc repro`` removes a stage's outputs before running it again) it goes on reading the old one.
    """

    def __init__(self, store: Any, path: Path) -> None:
        self.store = store
        self.path = path
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file being read
        self._lock = threading.Lock()

    @classmethod
    def of(cls, store: Any) -> _LocalStoreFile | None:
        """The store's SQLite file, or None for any other online store (Redis, ...)."""
        online = store.config.online_store
        kind = str(getattr(online, "type", ""))
        if kind != "sqlite" and not kind.endswith("SqliteOnlineStore"):
            return None
        return cls(store, _in_repo(store.config, online.path))

    def check(self) -> None:
        """Raise FileNotFoundError if the file is gone; reopen it if another file took its place."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"the online store file {self.path} does not exist") from None
        identity = (stat.st_dev, stat.st_ino)
        with self._lock:
            if self._identity is not None and identity != self._identity:
                log.warning("the online store file %s was replaced: reading the new one", self.path)
                # Feast's SqliteOnlineStore connects again when its cached connection is unset; the old
                # connection closes when the last read still using it is done
                online_store = self.store._get_provider().online_store
                if hasattr(online_store, "_conn"):
                    online_store._conn = None
            self._identity = identity


@dataclass(frozen=True)
class ViewClock:
    """A feature view's TTL and the end of its last materialisation (epoch seconds; now if never)."""

    ttl_s: float
    materialized_until: float


def _view_clock(view: Any) -> ViewClock:
    ttl = view.ttl.total_seconds() if view.ttl else 0.0
    intervals = view.materialization_intervals or []
    until = max((end.timestamp() for _, end in intervals), default=time.time())
    return ViewClock(ttl, until)


def _check_registry(store: Any) -> None:
    """A local registry file must exist: without it Feast creates an empty one and the first lookup fails
    with a message that names neither the file nor what to do."""
    config = store.config
    registry = config.registry
    path = str(getattr(registry, "path", registry))
    if getattr(registry, "registry_type", "file") != "file" or "://" in path:
        return  # a remote registry (s3://, gs://, SQL): Feast reports its own errors
    local = _in_repo(config, path)
    if not local.exists():
        raise FileNotFoundError(
            f"the Feast registry {local} does not exist: register the feature views first (dvc repro, or "
            "python -m components.online_store), or point feast.repo_path / feast.config_file at the store"
        )


def _in_repo(config: Any, path: str | Path) -> Path:
    """A path of the store's yaml as Feast resolves it: relative ones against the repo folder."""
    path = Path(path)
    return path if path.is_absolute() or config.repo_path is None else Path(config.repo_path) / path


def _entry(rows: FeatureRows, names: list[str], j: int) -> tuple[Any, ...]:
    return (*tuple(rows.columns[n][j] for n in names), bool(rows.found[j]))


def _as_default_type(value: Any, default: Any) -> Any:
    """Feast returns floats for Float64 and ints for Int64 already; lists may come as tuples."""
    if isinstance(default, list):
        return list(value)
    if isinstance(default, float):
        return float(value)
    return value


def _feature_refs(store: Any, user_names: list[str], item_names: list[str]) -> tuple[list[str], list[str]]:
    """``view:feature`` references of the wanted names, split by the view's join key (user / item)."""
    service = store.get_feature_service(FEATURE_SERVICE)
    user_refs, item_refs, served = [], [], set()
    for projection in service.feature_view_projections:
        keys = list(store.get_feature_view(projection.name).join_keys)
        for feature in projection.features:
            ref = f"{projection.name}:{feature.name}"
            if keys == ["user_id"] and feature.name in user_names:
                user_refs.append(ref)
                served.add(feature.name)
            elif keys == ["item_id"] and feature.name in item_names:
                item_refs.append(ref)
                served.add(feature.name)
    unserved = [n for n in user_names + item_names if n not in served and n not in ("user_id", "item_id")]
    if unserved:
        log.warning(
            "features %s are not in Feast feature service '%s': they are served with defaults unless the "
            "request gives them",
            unserved,
            FEATURE_SERVICE,
        )
    return user_refs, item_refs
