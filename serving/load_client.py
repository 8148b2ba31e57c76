"""The serving benchmarks' load client: V1 requests over loopback, timed per request.

``measure`` warms the server up and runs one load per concurrency level; ``in_process_latency`` times the
same recommender without HTTP, so a run can tell the machine's speed from what HTTP and KServe add.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from recsys.config import Params


def measure(
    port: int, user_ids: list[int], seconds: float, max_requests: int, concurrency: list[int]
) -> list[dict[str, Any]]:
    """One ``run_load`` per ``concurrency`` level on the server at ``port``, after a short warm-up
    (first requests pay for lazy imports and caches, not for serving)."""
    url = f"http://127.0.0.1:{port}/v1/models/recommend:predict"
    bodies = [{"instances": [{"user_id": int(u), "n": 20}]} for u in user_ids]
    run_load(url, bodies[:50], 1, 2.0, 200)  # warm-up
    return [run_load(url, bodies, c, seconds, max_requests) for c in concurrency]


def run_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """Requests, errors, throughput and p50/p95/p99 of ``concurrency`` clients posting ``bodies`` in turn,
    until ``seconds`` pass or ``max_requests`` are sent (whichever first keeps a run bounded)."""
    latencies, errors, elapsed = _send(url, bodies, concurrency, seconds, max_requests)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        **_percentiles(latencies),
    }


def in_process_latency(
    bundle: Path, params: Params, user_ids: list[int], online_store: bool, seconds: float
) -> dict[str, Any]:
    """``Recommender.recommend`` called directly (no HTTP, no server), one user at a time, for ``seconds``.

    Taken in the same run as the HTTP numbers, it tells how fast the machine was at the time (this
    VM's speed varies by 30-50% within an hour) and how much of a request HTTP and KServe add.
    """
    from serving.server import build_models

    config = params.serving.model_copy(update={"online_store": online_store})
    recommender = build_models(bundle, config, params.feast)[-1].recommender  # type: ignore[attr-defined]
    ranker = config.default_ranker

    def one(user_id: int) -> None:
        recommender.recommend([user_id], [20], [ranker], [None])

    for user_id in user_ids[:50]:  # warm-up
        one(user_id)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        one(user_ids[len(latencies) % len(user_ids)])
        latencies.append((time.perf_counter() - t0) * 1000)
    return {"requests": len(latencies), **_percentiles(latencies)}


def _send(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float, max_requests: int
) -> tuple[list[float], int, float]:
    """(latencies in ms, errors, elapsed seconds) of ``concurrency`` clients posting ``bodies`` in turn.

    Each client is a thread with one keep-alive ``http.client`` connection: on a 2-core machine shared
    with the server, an async httpx client added 3-5 ms of its own to every request it timed.
    """
    parsed = urlsplit(url)
    payloads = [json.dumps(body).encode() for body in bodies]
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    sent = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal errors, sent
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if sent >= max_requests:
                        return
                    payload = payloads[sent % len(payloads)]
                    sent += 1
                t0 = time.perf_counter()
                try:
                    connection.request("POST", parsed.path, payload, headers)
                    response = connection.getresponse()
                    response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException):
                    connection.close()  # reconnects on the next request
                    ok = False
                elapsed_ms = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(elapsed_ms)
                    errors += not ok
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def _percentiles(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies)
    return {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)}
