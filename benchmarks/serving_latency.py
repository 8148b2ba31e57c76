"""Serving latency of ``recommend``: p50/p95/p99 and throughput, one worker, loopback only.

Starts ``python -m serving`` as a subprocess on 127.0.0.1 for each bundle, then sends V1 ``recommend``
requests (retrieve ``serving.retrieve_k``, rank with the default ranker, return 20) sequentially and with
concurrent clients, each setting bounded by ``--seconds`` and ``--max-requests``. Bundles:

- ``default``: a given bundle directory (``--bundle``, e.g. artifacts/bundle with its Feast store), or
  without one a bundle built here from a synthetic training frame (models untrained: latency only);
- ``catalogue_100k``: the same models over a 100,000-item catalogue (HNSW index from ``index.*``), served
  without the online store (user and item features are defaults; the model path is the same).

``python -m benchmarks.serving_latency --seconds 60`` is the 60 s load run of the issue (the default,
15 s per setting, keeps a local run short). Results go to benchmarks/results/serving_latency.{json,md}.
The bundle builder below is also what the serving tests use until the pipeline's export step exists.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from recsys.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RANKERS = ("multi_tower", "multi_tower_din", "dlrm")
TARGET_P99_MS = 15.0
LATENCY_INDEX_RECALL = 0.90  # recall@10 the 100k bundle's HNSW is tuned to (its towers are untrained)


# ---- bundle building (tests and benchmark) ---------------------------------------------------------


def synthetic_training_frame(
    n_users: int, n_items: int, n_rows: int, windows: list[int], history: int = 30, seed: int = 0
) -> pd.DataFrame:
    """A ranking training frame with the contract's columns and types (random values, some clicks)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users + 1, n_rows)
    items = rng.integers(1, n_items + 1, n_rows)
    categories = np.array([f"cat_{i:02d}" for i in range(12)], dtype=object)
    item_category = categories[np.arange(n_items + 1) % len(categories)]
    lengths = rng.integers(0, history + 1, n_rows)
    hist_ids = [rng.integers(1, n_items + 1, n).astype(np.int64) for n in lengths]
    frame = pd.DataFrame(
        {
            "row_id": np.arange(n_rows, dtype=np.int64),
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "event_timestamp": pd.Timestamp("2026-06-01", tz="UTC")
            + pd.to_timedelta(np.sort(rng.integers(0, 86400 * 30, n_rows)), unit="s"),
            "label": (rng.random(n_rows) < 0.2).astype(np.int64),
            "gender": np.array(["F", "M", ""], dtype=object)[users % 3],
            "age_bucket": (18 + 7 * (users % 6)).astype(np.int64),
            "occupation": np.array([f"occ_{i}" for i in range(10)], dtype=object)[users % 10],
            "zip_prefix": np.array([f"{i:03d}" for i in range(50)], dtype=object)[users % 50],
            "hist_item_ids": hist_ids,
            "hist_categories": [item_category[h] for h in hist_ids],
            "hist_length": lengths.astype(np.int64),
            "category": item_category[items],
            "brand": np.array([f"brand_{i}" for i in range(20)], dtype=object)[items % 20],
            "price": np.round(rng.lognormal(3, 1, n_rows), 2),
        }
    )
    for prefix, _ids in (("user", users), ("item", items)):
        for days in windows:
            impressions = rng.poisson(days, n_rows).astype(np.int64)
            clicks = rng.binomial(impressions, 0.2).astype(np.int64)
            frame[f"{prefix}_impressions_{days}d"] = impressions
            frame[f"{prefix}_clicks_{days}d"] = clicks
            frame[f"{prefix}_ctr_{days}d"] = np.where(
                impressions > 0, clicks / np.maximum(impressions, 1), 0.0
            )
    return frame


def item_catalogue(train: pd.DataFrame, item_columns: list[str], n_items: int | None = None) -> pd.DataFrame:
    """One row per item: its latest training row's item features; ``n_items`` extends it with new items
    (ids after the largest, content copied from existing rows: the cold-start path of the item tower)."""
    latest = train.sort_values("event_timestamp").groupby("item_id").tail(1)
    catalogue = latest[["item_id", *[c for c in item_columns if c != "item_id"]]].reset_index(drop=True)
    if n_items is not None and n_items > len(catalogue):
        extra = catalogue.sample(n_items - len(catalogue), replace=True, random_state=0).reset_index(
            drop=True
        )
        extra["item_id"] = np.arange(len(extra), dtype=np.int64) + int(catalogue["item_id"].max()) + 1
        catalogue = pd.concat([catalogue, extra], ignore_index=True)
    return catalogue


def build_serving_bundle(
    train: pd.DataFrame,
    catalogue: pd.DataFrame,
    params: Params,
    out_dir: Path,
    work_dir: Path,
    train_steps: int = 0,
) -> Path:
    """Encoder fitted on ``train``, the two-tower and the three rankers (``train_steps`` Adam steps each,
    0 = initial weights), item embeddings of ``catalogue``, the index step, the bundle step."""
    import torch
    from safetensors.numpy import save_file

    from components import build_index
    from components.bundle import assemble_bundle
    from models import FeatureEncoder, build_model, save_model

    torch.manual_seed(params.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    encoder = FeatureEncoder.fit(params.models.features, train)
    batch = encoder.encode(train)
    files: dict[str, Path] = {}
    two_tower = None
    for kind in ("two_tower", *RANKERS):
        counts = encoder.id_counts(train, "item_id") if kind == "two_tower" else None
        model = build_model(kind, params.models.model(kind), encoder, item_counts=counts)
        model.prepare(batch)
        if train_steps:
            optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
            model.train()
            for step in range(train_steps):
                rows = torch.randint(
                    0, len(train), (min(256, len(train)),), generator=torch.Generator().manual_seed(step)
                )
                loss = model.loss({k: v[rows] for k, v in batch.items()})
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        save_model(model, encoder, params.models.model(kind), work_dir / "models" / kind)
        for name in ("model.safetensors", "config.json"):
            files[f"models/{kind}/{name}"] = work_dir / "models" / kind / name
        if kind == "two_tower":
            two_tower = model
    assert two_tower is not None
    with torch.inference_mode():
        item_batch = encoder.encode(catalogue, features=two_tower.item_feature_names())
        vectors = torch.cat(
            [
                two_tower.item_embedding({k: v[s : s + 8192] for k, v in item_batch.items()})
                for s in range(0, len(catalogue), 8192)
            ]
        ).numpy()
        users = train.drop_duplicates("user_id", keep="last")
        user_vectors = two_tower.user_embedding(
            encoder.encode(users, features=two_tower.user_feature_names())
        ).numpy()
    save_file(
        {"item_ids": catalogue["item_id"].to_numpy(np.int64), "embeddings": vectors.astype(np.float32)},
        str(work_dir / "item_embeddings.safetensors"),
    )
    save_file(
        {"user_ids": users["user_id"].to_numpy(np.int64), "embeddings": user_vectors.astype(np.float32)},
        str(work_dir / "user_embeddings.safetensors"),
    )
    build_index.run(
        params.index,
        params.seed,
        item_embeddings=work_dir / "item_embeddings.safetensors",
        query_embeddings=work_dir / "user_embeddings.safetensors",
        output=work_dir / "items.faiss",
        metrics_file=work_dir / "index_metrics.json",
    )
    clicks = train[train["label"] == 1]["item_id"].value_counts().head(1000)
    popular = {"item_ids": clicks.index.astype(int).tolist(), "scores": [float(c) for c in clicks.to_numpy()]}
    (work_dir / "popular_items.json").write_text(json.dumps(popular))
    files.update(
        {
            "item_embeddings.safetensors": work_dir / "item_embeddings.safetensors",
            "items.faiss": work_dir / "items.faiss",
            "items.faiss.json": work_dir / "items.faiss.json",
            "popular_items.json": work_dir / "popular_items.json",
        }
    )
    return assemble_bundle(
        files,
        out_dir,
        params_text=(ROOT / "params.yaml").read_text(),
        metrics={},
        embedding_dims={"models/two_tower": int(two_tower.output_dim)},
    )


# ---- the server under test -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    bundle: Path, params_file: Path, port: int, extra: list[str] | None = None, timeout_s: float = 180
) -> subprocess.Popen:
    """``python -m serving`` on 127.0.0.1:``port``, returned once ``/v2/health/ready`` answers 200."""
    import httpx

    log = open(Path(tempfile.gettempdir()) / f"serving-{port}.log", "w")  # noqa: SIM115 (lives with the process)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--model_dir",
            str(bundle),
            "--params",
            str(params_file),
            "--http_port",
            str(port),
            "--host",
            "127.0.0.1",
            *(extra or []),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"serving exited with {process.returncode}; log: {Path(log.name).read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise TimeoutError(f"serving not ready after {timeout_s}s; log: {log.name}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---- load generation -------------------------------------------------------------------------------


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


def _load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    latencies, errors, elapsed = _send(url, bodies, concurrency, seconds, max_requests)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        **_percentiles(latencies),
    }


def _percentiles(latencies: list[float]) -> dict[str, float]:
    lat = np.asarray(latencies)
    return {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)}


def measure(
    port: int, user_ids: list[int], seconds: float, max_requests: int, concurrency: list[int]
) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/v1/models/recommend:predict"
    bodies = [{"instances": [{"user_id": int(u), "n": 20}]} for u in user_ids]
    _load(url, bodies[:50], 1, 2.0, 200)  # warm-up
    return [_load(url, bodies, c, seconds, max_requests) for c in concurrency]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_latency", description=__doc__)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--bundle", default=None, help="a real bundle for the 'default' setting")
    parser.add_argument("--seconds", type=float, default=15.0, help="per setting (the issue's load run: 60)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per setting")
    parser.add_argument("--concurrency", default="1,8", help="client concurrency levels (1 = sequential)")
    parser.add_argument("--catalogue-items", type=int, default=100_000)
    parser.add_argument("--out", default=str(RESULTS / "serving_latency"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, Any] = {
        "settings": {},
        "target_p99_ms": TARGET_P99_MS,
        "seconds_per_setting": args.seconds,
        "retrieve_k": params.serving.retrieve_k,
        "n": 20,
        "ranker": params.serving.default_ranker,
        "cpu_count": os.cpu_count(),
        "torch_threads": params.serving.torch_threads,
    }
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        tmp_path = Path(tmp)
        windows = params.features.stats_windows_days
        train = synthetic_training_frame(3_000, 2_000, 60_000, windows, params.features.history_length)
        item_cols = [
            c
            for c in train.columns
            if c == "item_id" or c in ("category", "brand", "price") or c.startswith("item_")
        ]
        bundles: dict[str, tuple[Path, list[str]]] = {}
        if args.bundle:
            bundles["default"] = (Path(args.bundle), [])
        else:
            bundles["default"] = (
                build_serving_bundle(
                    train, item_catalogue(train, item_cols), params, tmp_path / "b1", tmp_path / "w1"
                ),
                ["--no_online_store"],
            )
        t0 = time.perf_counter()
        # the untrained towers' near-random vectors are the hardest case for HNSW: recall@10 tops out near
        # 0.93, so this latency-only bundle is tuned to 0.90 (trained embeddings reach index.recall_target)
        latency_params = params.model_copy(
            update={"index": params.index.model_copy(update={"recall_target": LATENCY_INDEX_RECALL})}
        )
        bundles["catalogue_100k"] = (
            build_serving_bundle(
                train,
                item_catalogue(train, item_cols, args.catalogue_items),
                latency_params,
                tmp_path / "b2",
                tmp_path / "w2",
            ),
            ["--no_online_store"],
        )
        results["build_100k_seconds"] = round(time.perf_counter() - t0, 1)
        users = train["user_id"].drop_duplicates().sample(500, random_state=0).tolist()
        for name, (bundle, extra) in bundles.items():
            in_process = in_process_latency(bundle, params, users, online_store=not extra, seconds=10.0)
            port = free_port()
            t0 = time.perf_counter()
            process = start_server(bundle, Path(args.params), port, extra)
            startup = time.perf_counter() - t0
            try:
                runs = measure(port, users, args.seconds, args.max_requests, levels)
            finally:
                stop_server(process)
            manifest = json.loads((bundle / "manifest.json").read_text())
            index_meta = json.loads((bundle / "items.faiss.json").read_text())
            results["settings"][name] = {
                "items": index_meta["count"],
                "index": index_meta["type"],
                "search_param": index_meta["search_param"],
                "online_store": not extra,
                "bundle_version": manifest["version"],
                "startup_seconds": round(startup, 1),
                "in_process": in_process,
                "runs": runs,
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


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


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Serving latency: recommend (V1, one worker, loopback)",
        "",
        f"retrieve {results['retrieve_k']}, rank with {results['ranker']}, return {results['n']}; "
        f"{results['seconds_per_setting']:g} s per setting; {results['cpu_count']} CPU cores shared "
        f"with other work; torch threads {results['torch_threads']}. "
        f"Target p99 <= {results['target_p99_ms']:g} ms.",
        "",
        "| bundle | items | index | online store | clients | requests | errors | req/s "
        "| p50 ms | p95 ms | p99 ms |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, setting in results["settings"].items():
        for run in setting["runs"]:
            lines.append(
                f"| {name} | {setting['items']:,} | {setting['index']} | "
                f"{'yes' if setting['online_store'] else 'no'} | "
                f"{run['concurrency']} | {run['requests']:,} | {run['errors']} | {run['throughput_rps']} | "
                f"{run['p50_ms']} | {run['p95_ms']} | {run['p99_ms']} |"
            )
    lines += [
        "",
        "Latency is measured by the client (includes HTTP and JSON on loopback): one thread per concurrent "
        "client, each with a keep-alive http.client connection.",
        "",
        "The same bundles in the same run, `Recommender.recommend` called in-process (no HTTP), one user "
        "at a time: how fast the machine was at the time, and what HTTP and KServe add.",
        "",
        "| bundle | requests | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, setting in results["settings"].items():
        if "in_process" in setting:
            run = setting["in_process"]
            lines.append(f"| {name} | {run['requests']:,} | {run['p50_ms']} | {run['p99_ms']} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
