"""Serving under load: light and heavy requests at 1, 4 and 16 concurrent clients, on one server process,
on two forked by serving/workers.py (``serving.workers``) and on two of KServe's own multi-process server
(benchmarks/kserve_workers.py), with liveness probed throughout and the servers' memory before and after.

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

All servers run at once (idle, a server costs no CPU) and each level runs on one after the other (the
order rotates per level), so the ratio of each server's throughput to the single process's compares runs
seconds apart: this machine's speed drifts with what else runs on it, absolute numbers less reliably than
the ratio. The clients are threads of this process on the same cores as the servers.

``python -m benchmarks.serving_load [--seconds 10] [--workers 1 2] [--kserve-workers 2]``; results go to
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

from recsys.config import load_params
from serving.load_client import run_load
from serving.local_server import (
    free_port,
    server_cpu_seconds,
    server_memory_mb,
    start_server,
    stop_server,
    worker_requests,
)
from tests.synthetic_bundle import build_serving_bundle, item_catalogue, synthetic_training_frame

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
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="serving.workers to compare")
    parser.add_argument(
        "--kserve-workers", type=int, nargs="*", default=[2], help="KServe multi-process servers to compare"
    )
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
        "servers_compared": [*map(str, args.workers), *(f"kserve-{n}" for n in args.kserve_workers)],
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
        launchers = [(str(n), "serving", n) for n in args.workers]
        launchers += [(f"kserve-{n}", "benchmarks.kserve_workers", n) for n in args.kserve_workers]
        servers: dict[str, tuple[Any, str]] = {}
        try:
            for name, module, workers in launchers:
                port = free_port()
                extra = ["--no_online_store", "--workers", str(workers)]
                process = start_server(bundle, Path(args.params), port, extra, module=module)
                base = f"http://127.0.0.1:{port}"
                servers[name] = (process, base)
                results["servers"][name] = {"workers": workers, "memory_at_start": server_memory_mb(process)}
            for name, (_, base) in servers.items():  # warm-up: lazy imports and caches in every worker
                clients = 2 * results["servers"][name]["workers"]
                run_load(f"{base}/v1/models/recommend:predict", bodies["light"][1][:50], clients, 2.0, 200)
            seconds = results["seconds_per_level"]
            for load, (model, payloads) in bodies.items():
                runs: list[dict[str, Any]] = []
                for i, level in enumerate(LEVELS):
                    order = list(servers.items())
                    for name, (process, base) in order[i % len(order) :] + order[: i % len(order)]:
                        runs.append(
                            {"server": name}
                            | _level(process, base, model, payloads, level, seconds[load], args.max_requests)
                        )
                results["loads"][load] = {"model": model, "runs": runs}
            for name, (process, _) in servers.items():
                results["servers"][name]["memory_at_end"] = server_memory_mb(process)
        finally:
            for process, _ in servers.values():
                stop_server(process)
            for name, (process, _) in servers.items():
                results["servers"][name]["exit_code"] = process.returncode
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["ratios"] = _ratios(results)
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


def _ratios(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Throughput of each server over that of the first (the single process), per load and level."""
    names = results["servers_compared"]
    if len(names) < 2:
        return {}
    base = names[0]
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for load, entry in results["loads"].items():
        by = {(r["server"], r["concurrency"]): r["throughput_rps"] for r in entry["runs"]}
        ratios[load] = {
            name: {str(lv): round(by[name, lv] / by[base, lv], 2) for lv in LEVELS if by.get((base, lv))}
            for name in names[1:]
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
    names = results["servers_compared"]
    start = results["servers"]
    lines = [
        f"# Serving under load: servers {' vs '.join(names)}, light and heavy requests at 1, 4 and 16 "
        "clients",
        "",
        "Servers: a number is `python -m serving --workers N` (N > 1: serving/workers.py forks N workers "
        "from the process that loaded the bundle, each on its own SO_REUSEPORT socket); `kserve-N` is "
        "KServe's own multi-process server (`RESTServerMultiProcess`, what `ModelServer(workers=N)` runs: "
        "N spawned interpreters on one shared socket, each with its own copy of the models, the parent "
        "keeping one too; benchmarks/kserve_workers.py), serving the same app.",
        "",
        f"{results['cpu_count']} CPU cores, shared by the servers, the load clients (threads of the "
        "benchmark) and whatever else ran on the machine (other jobs did: load average "
        f"{results['load_average_at_start'][0]} at start, {results['load_average_at_end'][0]} at end, and "
        "per level in the JSON); absolute numbers are noisy, the ratios compare runs seconds apart. Torch "
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
            f"{n}: RSS {start[n]['memory_at_start']['rss_mb']} MB, "
            f"PSS {start[n]['memory_at_start']['pss_mb']} MB"
            for n in names
        )
        + ". At the end: "
        + "; ".join(
            f"{n}: RSS {start[n]['memory_at_end']['rss_mb']} MB, PSS {start[n]['memory_at_end']['pss_mb']} MB"
            for n in names
            if "memory_at_end" in start[n]
        )
        + ".",
        "",
    ]
    if results.get("ratios"):
        lines += [
            f"Throughput ratio to server {names[0]}:",
            "",
            "| load | server | " + " | ".join(f"{level} clients" for level in LEVELS) + " |",
            "|---|---|" + "---:|" * len(LEVELS),
        ]
        for load, by_server in results["ratios"].items():
            for name, by_level in by_server.items():
                cells = " | ".join(str(by_level.get(str(lv), "")) for lv in LEVELS)
                lines.append(f"| {load} | {name} | {cells} |")
        lines.append("")
    lines += [
        "| load | server | clients | requests | errors | req/s | p50 ms | p99 ms | server cores "
        "| req/s per core | per worker | live p50 ms | live max ms | live failures | RSS before MB "
        "| RSS after MB | PSS after MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for load, entry in results["loads"].items():
        for run in entry["runs"]:
            split = " / ".join(str(n) for n in run["per_worker"].values())
            per_core = round(run["throughput_rps"] / run["server_cores"], 1) if run["server_cores"] else ""
            lines.append(
                f"| {load} | {run['server']} | {run['concurrency']} | {run['requests']:,} | "
                f"{run['errors']} | {run['throughput_rps']} | {run['p50_ms']} | {run['p99_ms']} | "
                f"{run['server_cores']} | {per_core} | {split} | "
                f"{run['live_p50_ms']} | {run['live_max_ms']} | {run['live_failures']} | "
                f"{run['rss_mb_before']} | {run['rss_mb_after']} | {run['pss_mb_after']} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
