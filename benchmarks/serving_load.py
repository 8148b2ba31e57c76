"""Serving under load: light and heavy requests at 1, 4 and 16 concurrent clients, on one server process
and on two (``serving.workers``), with liveness probed throughout and the servers' memory before and after.

A server whose event loop is blocked by prediction fails its liveness probe under load and is restarted
by Kubernetes although it is healthy; one that keeps request bodies or caches growing runs out of its
memory limit; one process answers at most what one core computes. So each level records, next to
requests / errors / throughput / p50 / p99, the latency of ``/v2/health/live`` probed every 100 ms
during the load, the memory of the server's processes after it (RSS and PSS summed over the parent and
its workers, psutil), the cores the server kept busy, and how the requests spread over the workers
(``recsys_worker_requests_total``; each client keeps one connection, which the kernel gives to one
worker). Loads:

- ``light``: V1 ``recommend`` of one user (retrieve, rank, return 20);
- ``heavy``: V1 ``ranking`` of 64 users x 1000 candidates with MultiTowerDIN (the largest request the
  default limits admit).

Both servers run at once (idle, a server costs no CPU) and each level runs on one, then at once on the
other, so the ratio workers=2 / workers=1 compares runs a few seconds apart: this machine's speed drifts
with what else runs on it, absolute numbers less reliably than the ratio. The clients are threads of
this process on the same cores as the servers.

``python -m benchmarks.serving_load [--seconds 10] [--workers 1 2]``; results go to
benchmarks/results/serving_load.{json,md}. The bundle is built here from a synthetic training frame
(untrained models: cost, not quality), served without the online store, on 127.0.0.1 only.
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

from benchmarks.load_client import run_load
from benchmarks.model_server import (
    free_port,
    server_cpu_seconds,
    server_memory_mb,
    start_server,
    stop_server,
    worker_requests,
)
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
    parser.add_argument("--seconds", type=float, default=10.0, help="light: per level and server")
    parser.add_argument("--heavy-seconds", type=float, default=20.0, help="heavy: per level and server")
    parser.add_argument("--max-requests", type=int, default=5_000, help="per load, level and server")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server processes to compare")
    parser.add_argument("--out", default=str(RESULTS / "serving_load"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    results: dict[str, Any] = {
        "seconds_per_level": {"light": args.seconds, "heavy": args.heavy_seconds},
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": params.serving.torch_threads,
        "max_batch": params.serving.max_batch,
        "max_candidates": params.serving.max_candidates,
        "workers": args.workers,
        "servers": {},
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
        servers: dict[int, tuple[Any, str]] = {}
        try:
            for workers in args.workers:
                port = free_port()
                process = start_server(
                    bundle, Path(args.params), port, ["--no_online_store", "--workers", str(workers)]
                )
                base = f"http://127.0.0.1:{port}"
                servers[workers] = (process, base)
                results["servers"][str(workers)] = {"memory_at_start": server_memory_mb(process)}
            for workers, (_, base) in servers.items():  # warm-up: lazy imports and caches in every worker
                run_load(
                    f"{base}/v1/models/recommend:predict", bodies["light"][1][:50], 2 * workers, 2.0, 200
                )
            seconds = results["seconds_per_level"]
            for load, (model, payloads) in bodies.items():
                runs: list[dict[str, Any]] = []
                for i, level in enumerate(LEVELS):
                    order = list(servers.items())
                    for workers, (process, base) in order if i % 2 == 0 else order[::-1]:  # ABAB -> ABBA
                        runs.append(
                            {"workers": workers}
                            | _level(process, base, model, payloads, level, seconds[load], args.max_requests)
                        )
                results["loads"][load] = {"model": model, "runs": runs}
            for workers, (process, _) in servers.items():
                results["servers"][str(workers)]["memory_at_end"] = server_memory_mb(process)
        finally:
            for process, _ in servers.values():
                stop_server(process)
            for workers, (process, _) in servers.items():
                results["servers"][str(workers)]["exit_code"] = process.returncode
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["ratios"] = _ratios(results, args.workers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _level(
    process: Any, base: str, model: str, payloads: list[dict], level: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """One load level on one server: the client's numbers, liveness, memory and the per-worker split."""
    before = server_memory_mb(process)
    served_before = worker_requests(base)
    load_average = os.getloadavg()[0]
    cpu_before = server_cpu_seconds(process)
    run, probes = _with_liveness_probes(
        base, lambda: run_load(f"{base}/v1/models/{model}:predict", payloads, level, seconds, max_requests)
    )
    cpu = server_cpu_seconds(process) - cpu_before
    after = server_memory_mb(process)
    served = worker_requests(base)
    return run | {
        "load_average_1m": round(load_average, 2),
        # cores the server's processes kept busy during the level (CPU seconds / wall seconds)
        "server_cores": round(cpu / run["seconds"], 2),
        "rss_mb_before": before["rss_mb"],
        "rss_mb_after": after["rss_mb"],
        "pss_mb_before": before["pss_mb"],
        "pss_mb_after": after["pss_mb"],
        # model requests each worker answered during the level
        "per_worker": {w: int(served[w] - served_before.get(w, 0)) for w in sorted(served)},
        "live_probes": len(probes),
        "live_p50_ms": round(float(np.percentile(probes, 50)), 1) if probes else None,
        "live_max_ms": round(max(probes), 1) if probes else None,
        "live_failures": sum(p > 1000 for p in probes),
    }


def _ratios(results: dict[str, Any], workers: list[int]) -> dict[str, dict[str, float]]:
    """Throughput of the most workers over that of the fewest, per load and level."""
    if len(workers) < 2:
        return {}
    low, high = min(workers), max(workers)
    ratios: dict[str, dict[str, float]] = {}
    for load, entry in results["loads"].items():
        by = {(r["workers"], r["concurrency"]): r["throughput_rps"] for r in entry["runs"]}
        ratios[load] = {
            str(level): round(by[high, level] / by[low, level], 2) for level in LEVELS if by.get((low, level))
        }
    return ratios


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


def _markdown(results: dict[str, Any]) -> str:
    workers = results["workers"]
    start = results["servers"]
    lines = [
        f"# Serving under load: workers {' vs '.join(map(str, workers))}, light and heavy requests at 1, 4 "
        "and 16 clients",
        "",
        f"{results['cpu_count']} CPU cores, shared by the servers, the load clients (threads of the "
        "benchmark) and whatever else ran on the machine (other jobs did: load average "
        f"{results['load_average_at_start'][0]} at start, {results['load_average_at_end'][0]} at end, and "
        "per level in the JSON); absolute numbers are noisy, the ratio compares runs seconds apart. Torch "
        f"threads {results['torch_threads']} per process; {results['seconds_per_level']['light']:g} s "
        f"(light) and {results['seconds_per_level']['heavy']:g} s (heavy) per level and server. light = "
        f"recommend of one user; heavy = ranking of {results['max_batch']} users x "
        f"{results['max_candidates']} candidates with MultiTowerDIN. Liveness probed every "
        f"{PROBE_EVERY_S * 1000:g} ms during the load; a probe over 1 s counts as failed. Memory is summed "
        "over the server's processes (parent and workers): RSS counts pages the workers share with the "
        "parent once per process, PSS splits them. Server cores = CPU seconds of the server's processes / "
        "wall seconds: what the machine gave the server; req/s per core is the throughput per core it got.",
        "",
        "Memory at start (idle, before the warm-up requests): "
        + "; ".join(
            f"workers={w}: RSS {start[str(w)]['memory_at_start']['rss_mb']} MB, "
            f"PSS {start[str(w)]['memory_at_start']['pss_mb']} MB"
            for w in workers
        )
        + ". At the end: "
        + "; ".join(
            f"workers={w}: RSS {start[str(w)]['memory_at_end']['rss_mb']} MB, "
            f"PSS {start[str(w)]['memory_at_end']['pss_mb']} MB"
            for w in workers
            if "memory_at_end" in start[str(w)]
        )
        + ".",
        "",
    ]
    if results.get("ratios"):
        lines += [
            f"Throughput ratio workers={max(workers)} / workers={min(workers)}:",
            "",
            "| load | " + " | ".join(f"{level} clients" for level in LEVELS) + " |",
            "|---|" + "---:|" * len(LEVELS),
        ]
        for load, by_level in results["ratios"].items():
            lines.append(f"| {load} | " + " | ".join(str(by_level.get(str(lv), "")) for lv in LEVELS) + " |")
        lines.append("")
    lines += [
        "| load | workers | clients | requests | errors | req/s | p50 ms | p99 ms | server cores "
        "| req/s per core | per worker | live p50 ms | live max ms | live failures | RSS before MB "
        "| RSS after MB | PSS after MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for load, entry in results["loads"].items():
        for run in entry["runs"]:
            split = " / ".join(str(n) for n in run["per_worker"].values())
            per_core = round(run["throughput_rps"] / run["server_cores"], 1) if run["server_cores"] else ""
            lines.append(
                f"| {load} | {run['workers']} | {run['concurrency']} | {run['requests']:,} | "
                f"{run['errors']} | {run['throughput_rps']} | {run['p50_ms']} | {run['p99_ms']} | "
                f"{run['server_cores']} | {per_core} | {split} | "
                f"{run['live_p50_ms']} | {run['live_max_ms']} | {run['live_failures']} | "
                f"{run['rss_mb_before']} | {run['rss_mb_after']} | {run['pss_mb_after']} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
