"""Every answer the server gives, kept as Parquet rows: what the monitor (components/monitor.py) reads.

One row per answered user: request id, time, endpoint, user, model (the ranker, ``two_tower`` for
retrieval, ``popular`` for a cold start), bundle version, the served item ids in position order with
their scores, how many candidates there were, source, cold-start and degraded flags, the user feature
values the answer was computed from (JSON; a configured share of rows), and per served item the
probability the serving policy put it in its slot (``propensities``: 1.0 each without
``serving.exploration``; with it, also the ranked ``candidate_ids`` it sampled from, for components/ope.py).

The request path only appends a row to a bounded in-memory buffer (a dict and a deque append; no
encoding, no I/O). A writer thread per process turns the buffer into a Parquet file when it holds
``flush_rows`` rows, every ``flush_interval_s`` and on close (KServe's stop handler unloads the models on
SIGTERM after uvicorn drained the requests in flight; ``serve_models`` closes again when the server
returns). Each process writes its own files, named by host, pid and sequence, so several workers and
several pods share one folder or prefix without coordination:

```
<uri>/date=2026-12-06/T101500Z-<host>-<pid>-000001.parquet
```

A file appears whole or not at all (temp file + rename locally; one PUT on S3). When the buffer is full
the newest rows are dropped; when a write fails (a full disk, an unreachable bucket) its rows go back to
the buffer while there is room. Both are counted (``recsys_request_log_dropped_rows{reason}``,
``recsys_request_log_write_errors``) and logged at most once a minute: the log degrades, a request never
fails because of it.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow.parquet as pq
from prometheus_client import Counter

from recsys.config import RequestLogConfig
from recsys.object_store import LocalStore, ObjectStore, ObjectStoreError
from recsys.request_records import PARTITION, SUFFIX, records_table, store_for

log = logging.getLogger(__name__)

_WARN_EVERY_S = 60.0

LOGGED_ROWS = Counter("recsys_request_log_rows", "Answered users written to the request log.")
DROPPED_ROWS = Counter(
    "recsys_request_log_dropped_rows",
    "Answered users not written to the request log: buffer_full (the writer fell behind or the sink is "
    "down), closed (the server stopped before they could be written).",
    ["reason"],
)
WRITE_ERRORS = Counter(
    "recsys_request_log_write_errors", "Request-log files that could not be written (disk full, sink down)."
)


def open_request_log(config: RequestLogConfig) -> RequestLog | None:
    """The process's request log as ``serving.request_log`` configures it (None when disabled); its
    writer thread started. Call in the process that serves (threads do not survive a fork)."""
    if not config.enabled:
        return None
    request_log = RequestLog(config)
    request_log.start()
    return request_log


class RequestLog:
    """A bounded buffer of answered rows and the thread that writes it to Parquet files."""

    def __init__(self, config: RequestLogConfig, store: ObjectStore | None = None) -> None:
        self.config = config
        self._store = store
        self._rows: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._sequence = 0
        self._tag = f"{_safe(socket.gethostname())}-{os.getpid()}"
        self._last_warning = -_WARN_EVERY_S
        self._last_retention = -1.0

    # ---- the request path -----------------------------------------------------------------------

    def record(self, rows: list[dict[str, Any]]) -> None:
        """Buffer ``rows`` (RECORD_SCHEMA's fields; ``features`` a dict, kept for a sampled share).
        Never blocks on I/O; rows that do not fit are dropped and counted."""
        sample = self.config.feature_sample
        with self._lock:
            if self._closed:
                DROPPED_ROWS.labels(reason="closed").inc(len(rows))
                return
            room = self.config.max_buffer_rows - len(self._rows)
            for row in rows[: max(room, 0)]:
                if sample < 1.0 and random.random() >= sample:
                    row["features"] = None
                self._rows.append(row)
            if len(rows) > room:
                DROPPED_ROWS.labels(reason="buffer_full").inc(len(rows) - max(room, 0))
            if len(self._rows) >= self.config.flush_rows:
                self._wake.notify()

    # ---- the writer -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is buffered and stop the writer (idempotent). Rows still unwritten after
        ``timeout_s`` (the sink is down) are counted as dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self.flush()
        with self._lock:
            if self._rows:
                DROPPED_ROWS.labels(reason="closed").inc(len(self._rows))
                self._warn(f"{len(self._rows)} rows could not be written before the server stopped")
                self._rows.clear()

    def flush(self) -> int:
        """Write the buffered rows as one file; the number written (0 when the write failed)."""
        with self._lock:
            rows = list(self._rows)
            self._rows.clear()
        if not rows:
            return 0
        try:
            self._write(rows)
        except (OSError, ObjectStoreError) as exc:
            WRITE_ERRORS.inc()
            with self._lock:  # back to the front of the buffer while there is room; the rest is counted
                room = max(self.config.max_buffer_rows - len(self._rows), 0)
                kept = rows[:room]
                self._rows.extendleft(reversed(kept))
                if len(rows) > room:
                    DROPPED_ROWS.labels(reason="buffer_full").inc(len(rows) - room)
                self._warn(f"cannot write {len(rows)} rows to {self.config.uri}: {exc}")
            return 0
        LOGGED_ROWS.inc(len(rows))
        self._apply_retention()
        return len(rows)

    def _run(self) -> None:
        interval = self.config.flush_interval_s
        while True:
            with self._lock:
                if not self._closed and len(self._rows) < self.config.flush_rows:
                    self._wake.wait(interval)
                closing = self._closed
            written = self.flush()
            if closing:
                while self._rows and written:  # the rest of a backlog larger than one file
                    written = self.flush()
                return
            if not written and self._rows:
                time.sleep(min(interval, 1.0))  # the sink is failing: do not spin

    def _write(self, rows: list[dict[str, Any]]) -> None:
        store = self._store_now()
        table = records_table(rows)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        now = datetime.now(UTC)
        self._sequence += 1
        key = f"{PARTITION}{now:%Y-%m-%d}/{now:T%H%M%S}Z-{self._tag}-{self._sequence:06d}{SUFFIX}"
        store.put_bytes(key, sink.getvalue(), content_type="application/vnd.apache.parquet")

    def _store_now(self) -> ObjectStore:
        if self._store is None:  # opened by the writer: an unreachable bucket never stops start-up
            self._store = store_for(self.config.uri)
        return self._store

    def _apply_retention(self) -> None:
        """Local folders only (a bucket's lifecycle rules do this for S3): drop day partitions older than
        ``retention_days``, checked at most hourly."""
        days = self.config.retention_days
        store = self._store
        if not days or not isinstance(store, LocalStore):
            return
        now = time.monotonic()
        if self._last_retention >= 0 and now - self._last_retention < 3600:
            return
        self._last_retention = now
        oldest = f"{PARTITION}{(datetime.now(UTC) - timedelta(days=days)):%Y-%m-%d}"
        for folder in store.root.glob(f"{PARTITION}*"):
            if folder.is_dir() and folder.name < oldest:
                shutil.rmtree(folder, ignore_errors=True)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("request log: %s (counted in recsys_request_log_*)", message)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name)[:63] or "host"
