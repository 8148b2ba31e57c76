"""Serving under load: light and heavy requests at 1, 4 and 16 concurrent clients, with liveness probed
throughout and the server's memory before and after.

A server whose event loop is blocked by prediction fails its liveness probe under load and is restarted
by Kubernetes although it is healthy; one that keeps request bodies or caches growing runs out of its
memory limit. So each level records, next to requests / errors / throughput / p50 / p99, the latency of
``/v2/health/live`` probed every 100 ms during the load, and the server's RSS (psutil)
after it. Loads:

- ``light``: V1 ``recommend`` of one user (retrieve, rank, return 20);
- ``heavy``: V1 ``ranking`` of 64 users x 1000 candidates with MultiTowerDIN (the largest request the
  default limits admit).

``python -m benchmarks.serving_load [--seconds 10]``; results go to benchmarks/results/serving_load.{json,md}.
The bundle is built here from a synthetic training frame (untrained models: cost, not quality), served
without the online store, on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks.load_client import run_load
from benchmarks.model_server import free_port, start_server, stop_server
from benchmarks.serving_bundle import build_serving_bundle, item_catalogue, synthetic_training_frame
from recsys.config import load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LEVELS = (1, 4, 16)
PROBE_EVERY_S = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--seconds", type=float, default=10.0, help="per load and level")
    parser.add_argument("--max-requests", type=int, default=5_000, help="per load and level")
    parser.add_argument("--out", default=str(RESULTS / "serving_load"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    results: dict[str, Any] = {
        "seconds_per_level": args.seconds,
        "cpu_count": os.cpu_count(),
        "torch_threads": params.serving.torch_threads,
        "max_batch": params.serving.max_batch,
        "max_candidates": params.serving.max_candidates,
        "loads": {},
    }
    with tempfile.TemporaryDirectory(prefix="serving-load-") as tmp:
        windows = params.features.stats_windows_days
        train = synthetic_training_frame(3_000, 2_000, 60_000, windows, params.features.history_length)
        item_cols = [
            c
            for c in train.columns
            if c in ("item_id", "category", "brand", "price") or c.startswith("item_")
        ]
        catalogue = item_catalogue(train, item_cols)
        bundle = build_serving_bundle(train, catalogue, params, Path(tmp) / "bundle", Path(tmp) / "work")
        users = train["user_id"].drop_duplicates().sample(500, random_state=0).astype(int).tolist()
        items = catalogue["item_id"].astype(int).tolist()
        bodies = {
            "light": ("recommend", [{"instances": [{"user_id": u, "n": 20}]} for u in users]),
            "heavy": (
                "ranking",
                [
                    _heavy_body(users, items, params.serving.max_batch, params.serving.max_candidates, s)
                    for s in range(4)
                ],
            ),
        }
        port = free_port()
        process = start_server(bundle, Path(args.params), port, ["--no_online_store"])
        try:
            base = f"http://127.0.0.1:{port}"
            results["rss_mb_at_start"] = _rss_mb(process.pid)
            run_load(f"{base}/v1/models/recommend:predict", bodies["light"][1][:50], 1, 2.0, 100)  # warm-up
            for load, (model, payloads) in bodies.items():
                runs = []
                for level in LEVELS:
                    before = _rss_mb(process.pid)
                    run, probes = _with_liveness_probes(
                        base,
                        lambda m=model, p=payloads, c=level: run_load(
                            f"{base}/v1/models/{m}:predict", p, c, args.seconds, args.max_requests
                        ),
                    )
                    runs.append(
                        run
                        | {
                            "rss_mb_before": before,
                            "rss_mb_after": _rss_mb(process.pid),
                            "live_probes": len(probes),
                            "live_p50_ms": round(float(np.percentile(probes, 50)), 1) if probes else None,
                            "live_max_ms": round(max(probes), 1) if probes else None,
                            "live_failures": sum(p > 1000 for p in probes),
                        }
                    )
                results["loads"][load] = {"model": model, "runs": runs}
        finally:
            stop_server(process)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _heavy_body(users: list[int], items: list[int], max_batch: int, max_candidates: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    chosen = rng.choice(users, size=max_batch, replace=False).tolist()
    return {
        "instances": [
            {
                "user_id": int(user),
                "item_ids": rng.choice(items, size=min(max_candidates, len(items)), replace=False).tolist(),
                "ranker": "multi_tower_din",
            }
            for user in chosen
        ]
    }


def _with_liveness_probes(base: str, load: Any) -> tuple[dict[str, Any], list[float]]:
    """Run ``load()`` while a thread probes ``/v2/health/live``; (the load's result, probe latencies ms).
    A probe that fails or takes over a second counts as 1000+ ms (the manifests' probe would fail)."""
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=base, timeout=1.0) as http:
            while not done.is_set():
                started = time.perf_counter()
                try:
                    ok = http.get("/v2/health/live").status_code == 200
                except httpx.HTTPError:
                    ok = False
                probes.append((time.perf_counter() - started) * 1000 if ok else 1001.0)
                done.wait(PROBE_EVERY_S)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        result = load()
    finally:
        done.set()
        prober.join()
    return result, probes


def _rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Serving under load: light and heavy requests at 1, 4 and 16 clients",
        "",
        f"One server process, {results['cpu_count']} CPU cores shared with the clients, torch threads "
        f"{results['torch_threads']}; {results['seconds_per_level']:g} s per level. light = recommend of "
        f"one user; heavy = ranking of {results['max_batch']} users x {results['max_candidates']} candidates "
        f"with MultiTowerDIN. Liveness probed every {PROBE_EVERY_S * 1000:g} ms during the load; a probe "
        "over 1 s counts as failed. RSS at start: "
        f"{results['rss_mb_at_start']} MB.",
        "",
        "| load | clients | requests | errors | req/s | p50 ms | p99 ms | live p50 ms | live max ms "
        "| live failures | RSS before MB | RSS after MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for load, entry in results["loads"].items():
        for run in entry["runs"]:
            lines.append(
                f"| {load} | {run['concurrency']} | {run['requests']:,} | {run['errors']} | "
                f"{run['throughput_rps']} | {run['p50_ms']} | {run['p99_ms']} | {run['live_p50_ms']} | "
                f"{run['live_max_ms']} | {run['live_failures']} | "
                f"{run['rss_mb_before']} | {run['rss_mb_after']} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
