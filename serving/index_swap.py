"""Index swap: a running server takes up a refreshed index (same models, more items) without a restart.

The index refresh (components/index_refresh.py) embeds items that appeared after training with the
bundle's own item tower and promotes a new bundle version: the same model files, a grown index and item
embeddings. Rolling out a pod for that would reload every model to change one file; instead a poller
thread in each server process (threads do not survive a fork: one per worker) reads the promote store's
``current.json`` (recsys/object_store.py) every ``serving.index_swap.interval_s``. When it names a
bundle other than the one served:

- its models differ (any ``models/`` file's SHA-256 in the manifests; a ``refresh`` or ``lineage`` key
  is not trusted): that is a new model, which a rollout (redeploy) serves. Logged once per version,
  counted ``skipped_new_model``, never swapped here;
- else the version is downloaded into a fresh temp dir and verified by the loader serving starts with
  (``serving.bundle.load_bundle``: every checksum, the index against the tower and the item embeddings);
  its models are the served model objects, not loaded again (byte-identical by digest; in forked workers
  they stay pages shared with the parent), the rankers' catalogue is encoded and new items' features are read
  into the cache, all in this thread, and then the recommender's bundle is replaced by one assignment
  (``Recommender.swap``): a request in flight finishes on the bundle it took, the next takes the new one;
- a download or verification failure leaves the old bundle serving, is logged with its reason and
  counted ``failed``; the same version is tried again with backoff (a download may work next time, and
  promoting a damaged version again repairs it).

The temp dir of a replaced bundle is removed once it is replaced (what is served is in memory), the last
one when the server stops. The original ``--model_dir`` is never touched. Every process downloads and
holds its own copy of the index: with N workers, N copies.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from prometheus_client import Counter

from recsys.bundle_manifest import BundleIntegrityError, load_manifest
from recsys.config import ConfigError, IndexSwapConfig
from recsys.object_store import (
    ObjectStore,
    ObjectStoreError,
    fetch_promoted,
    open_store,
    promoted_manifest,
    read_pointer,
)
from serving.bundle import ServingBundle, load_bundle, model_digests
from serving.recommender import Recommender

log = logging.getLogger(__name__)

SWAPPED, FAILED, SKIPPED_NEW_MODEL = "swapped", "failed", "skipped_new_model"
SWAPS = Counter(
    "recsys_index_swaps",
    "Promoted bundle versions taken up without a restart (swapped), refused by the download or the "
    "checks (failed: the served one stays), or left to a rollout because their models differ.",
    ["outcome"],
)
BACKOFF_MAX_S = 600.0  # a failing version is tried again at most this far apart
STOP_WAIT_S = 10.0  # how long stop() waits for a swap in progress


class IndexSwap:
    """Polls a promote store and swaps a refreshed index into ``recommender`` (one per process)."""

    def __init__(self, recommender: Recommender, config: IndexSwapConfig, default_ranker: str) -> None:
        scheme = urlparse(config.store_uri.strip()).scheme
        if scheme not in ("s3", "file"):
            raise ConfigError(
                f"serving.index_swap.store_uri {config.store_uri!r}: an s3:// or file:/// URI, or '' (off)"
            )
        self.recommender = recommender
        self.store_uri = config.store_uri
        self.interval_s = float(config.interval_s)
        self.default_ranker = default_ranker
        self._store: ObjectStore | None = None  # opened in the thread: S3's constructor calls the store
        self._dir: Path | None = None  # the temp dir of the bundle served, when a swap brought it
        self._skipped: set[str] = set()  # content digests of versions with other models (logged once)
        self._failures: dict[str, tuple[int, float]] = {}  # content digest -> (failures, next try)
        self._store_error: str | None = None  # the last pointer read error, logged once until it changes
        self._lock = threading.Lock()  # one poll at a time (the thread's, or a caller's)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IndexSwap:
        """Poll every ``interval_s`` in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="index-swap", daemon=True)
        self._thread.start()
        log.info("index swap: polling %s every %g s", self.store_uri, self.interval_s)
        return self

    def stop(self) -> None:
        """End the thread (waiting for a swap in progress) and remove the temp dir; idempotent."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_WAIT_S)
            if thread.is_alive():
                log.warning("index swap: still busy after %.0f s at stop; leaving it", STOP_WAIT_S)
                return
        with self._lock:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def poll_once(self) -> str | None:
        """Read the pointer and act on it; the outcome (``swapped``, ``failed``, ``skipped_new_model``),
        or None when there was nothing to do."""
        with self._lock:
            if self._stopping.is_set():
                return None
            store, pointer = self._read_pointer()
            served = self.recommender.bundle
            if store is None or pointer is None or not self._is_news(pointer["content_sha256"], served):
                return None
            try:
                _, manifest = promoted_manifest(store) or (None, None)
                if manifest is None:  # unpromoted since the pointer was read
                    return None
                if model_digests(manifest) != model_digests(served.manifest):
                    return self._skip(manifest)
            except (ObjectStoreError, BundleIntegrityError, KeyError, TypeError) as exc:
                return self._failed(pointer["content_sha256"], str(pointer["version"]), exc)
            return self._take_up(store, str(pointer["version"]), manifest["content_sha256"])

    # ---- steps ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # never end the thread: the next poll may succeed
                log.exception("index swap: poll failed; the served bundle is unchanged")

    def _read_pointer(self) -> tuple[ObjectStore | None, dict[str, Any] | None]:
        """The store and its pointer, or (None, None) with a warning (once per distinct error)."""
        try:
            if self._store is None:
                self._store = open_store(self.store_uri)
            pointer = read_pointer(self._store)
        except ObjectStoreError as exc:
            if str(exc) != self._store_error:
                log.warning("index swap: cannot read %s, serving on: %s", self.store_uri, exc)
            self._store_error = str(exc)
            return None, None
        self._store_error = None
        return self._store, pointer

    def _is_news(self, content: str, served: ServingBundle) -> bool:
        """Whether the promoted content is neither served, nor left to a rollout, nor in backoff."""
        if content == served.manifest.get("content_sha256") or content in self._skipped:
            return False
        failures = self._failures.get(content)
        return failures is None or time.monotonic() >= failures[1]

    def _skip(self, manifest: dict[str, Any]) -> str:
        self._skipped.add(manifest["content_sha256"])
        SWAPS.labels(outcome=SKIPPED_NEW_MODEL).inc()
        log.info(
            "index swap: bundle %s is current and has a new model (model files differ from the served "
            "%s's): a rollout (redeploy) serves it; serving %s until then",
            manifest.get("version"),
            self.recommender.bundle.version,
            self.recommender.bundle.version,
        )
        return SKIPPED_NEW_MODEL

    def _take_up(self, store: ObjectStore, version: str, content: str) -> str | None:
        """Download, verify, prepare and swap in the promoted bundle; the outcome."""
        workdir = Path(tempfile.mkdtemp(prefix="recsys-index-swap-"))
        try:
            bundle = self._load(store, workdir)
            if bundle is None:  # the pointer moved on to other models meanwhile: decided next poll
                shutil.rmtree(workdir, ignore_errors=True)
                return None
            old = self.recommender.bundle
            self._warm_new_items(bundle, old)
            replaced = self.recommender.swap(self.recommender.prepare(bundle))
        except Exception as exc:  # any failure to download, verify or prepare leaves the old bundle serving
            shutil.rmtree(workdir, ignore_errors=True)
            return self._failed(content, version, exc)
        previous, self._dir = self._dir, workdir
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        self._failures.pop(content, None)
        SWAPS.labels(outcome=SWAPPED).inc()
        log.info(
            "index swap: serving bundle %s (%d items), was %s (%d items)",
            bundle.version,
            len(bundle.catalogue),
            replaced.version,
            len(replaced.catalogue),
        )
        return SWAPPED

    def _load(self, store: ObjectStore, workdir: Path) -> ServingBundle | None:
        """The promoted bundle downloaded and verified, with the served model objects; None when its
        models are not the served ones (the pointer moved on between reads)."""
        if fetch_promoted(store, workdir) is None:
            raise ObjectStoreError(f"{self.store_uri}: nothing is promoted any more")
        served = self.recommender.bundle
        if model_digests(load_manifest(workdir, verify=False)) != model_digests(served.manifest):
            return None
        return load_bundle(workdir, self.default_ranker, models_of=served)  # verified; no model reloaded

    def _warm_new_items(self, bundle: ServingBundle, old: ServingBundle) -> None:
        """Read the new items' features into the cache now, not in the requests that first rank them."""
        added = np.setdiff1d(bundle.catalogue, old.catalogue)
        if len(added):
            self.recommender.features.warm(added.tolist())

    def _failed(self, content: str, version: str, exc: BaseException) -> str:
        count = self._failures.get(content, (0, 0.0))[0] + 1
        wait_s = min(self.interval_s * 2 ** min(count - 1, 20), max(BACKOFF_MAX_S, self.interval_s))
        self._failures[content] = (count, time.monotonic() + wait_s)
        SWAPS.labels(outcome=FAILED).inc()
        log.warning(
            "index swap: bundle %s not taken up (%s: %s); serving %s, next try in %.0f s",
            version,
            type(exc).__name__,
            exc,
            self.recommender.bundle.version,
            wait_s,
        )
        return FAILED


def start_index_swap(
    recommender: Recommender, config: IndexSwapConfig, default_ranker: str
) -> IndexSwap | None:
    """The running poller for ``config``, or None when ``store_uri`` is empty (off)."""
    if not config.store_uri.strip():
        return None
    return IndexSwap(recommender, config, default_ranker).start()
