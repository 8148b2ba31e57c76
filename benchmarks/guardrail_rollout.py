"""Guardrails decide two canary rollouts, with real servers, a real Prometheus and simulated users.

``python -m benchmarks.guardrail_rollout`` builds the tiny pipeline in a temporary folder with the real
steps (benchmarks/feedback_loop.py's ``build``: ingest, features, Feast training sets + online store, every
model, evaluate, export, index, bundle): that bundle is the **champion**. Two canaries are derived from it:

- **bad**: a broken export that still loads: the item ids of ``item_embeddings.safetensors`` shuffled
  (each index row now names another item) and the default ranker's weights permuted within each tensor,
  the manifest re-hashed (shuffling the item ids alone hardly matters on the tiny preset: retrieval keeps
  200 of its 300 items and the ranker re-orders them; measured 0.143 vs 0.148 CTR in a first run);
- **good**: a byte-identical copy of the champion under a new version.

For each canary: ``python -m serving`` for the champion and the canary on loopback (one shared request
log folder), Debian's Prometheus scraping both every second, and components/simulate.py's day
(``simulate_day``: activity-weighted arrivals, the generator's click model with position bias) driving
traffic through a canary split (``--canary_share`` of the 64-user requests to the canary, each request
with its own ``x-request-id``); every simulated day's clicks are written as click feedback (request id,
user, item, label). Meanwhile ``components.deploy.roll_out`` runs the real rollout with
``deploy.guardrails`` enabled against tests/test_rollout.py's simulated KServe 0.15.2 cluster (no cluster
here: its status frames report the canary Ready), so promotion or rollback is decided by the guardrails
alone: Prometheus' error rate, p99 latency and empty-answer rate per version, and the served CTR from the
request log joined with the clicks.

Results: benchmarks/results/guardrail_rollout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import string
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import yaml
from safetensors.numpy import load_file, save_file

from benchmarks.feedback_loop import build, tiny_workdir
from components import deploy, simulate
from recsys import artifact_layout as layout
from recsys import guardrails
from recsys import isvc_rollout as rollout
from recsys.artifact_io import file_sha256
from recsys.bundle_manifest import MANIFEST, content_sha256
from recsys.contracts import read_raw_tables
from recsys.manifest_schemas import render_kustomization
from serving.local_server import free_port, start_server, stop_server
from serving.workers import METRICS_DIR_ENV
from sources.synthetic import world
from tests.local_prometheus import running_prometheus, wait_for_scrapes
from tests.test_rollout import FIXTURES, NEW_IMAGE, Frames, SimulatedCluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
KSERVE_VERSION = "v0.15.2"
BATCH = 64  # users per recommend request (components/simulate.py's server_policy batches as many)
log = logging.getLogger("guardrail_rollout")


def derive_bundle(source: Path, target: Path, version: str, corrupt_seed: int | None, ranker: str) -> Path:
    """A copy of ``source`` as ``version``. With ``corrupt_seed``, a broken export that still loads: the
    item ids of the item embeddings permuted (each index row now answers for another item) and every
    weight tensor of ``ranker`` permuted within itself (same shapes and value ranges, no learned order);
    the manifest re-hashed, so the server verifies and serves it."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    if corrupt_seed is not None:
        rng = np.random.default_rng(corrupt_seed)
        ranker_file = layout.bundle_model_file(ranker, "model.safetensors")
        for name in (layout.ITEM_EMBEDDINGS, ranker_file):
            path = target / name
            tensors = load_file(str(path))
            if name == layout.ITEM_EMBEDDINGS:
                tensors["item_ids"] = rng.permutation(tensors["item_ids"])
            else:
                tensors = {k: rng.permutation(v.reshape(-1)).reshape(v.shape) for k, v in tensors.items()}
            save_file(tensors, str(path))
            entry = manifest["files"][name]
            entry["sha256"], entry["bytes"] = file_sha256(path), path.stat().st_size
    manifest["version"] = version
    manifest["content_sha256"] = content_sha256(manifest["files"], manifest.get("params_sha256", ""))
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return target


def start_own_metrics(bundle: Path, params_file: Path, port: int, request_log: Path, work: Path):
    """``python -m serving`` with its own prometheus_client multiprocess directory: this process imported
    Feast, which sets $PROMETHEUS_MULTIPROC_DIR, and two servers inheriting one directory would export
    each other's counters (and the second would delete the first's files), as two pods never do."""
    metrics_dir = work / f"metrics-{port}"
    metrics_dir.mkdir(exist_ok=True)  # prometheus_client writes there from its import on
    previous = os.environ.get(METRICS_DIR_ENV)
    os.environ[METRICS_DIR_ENV] = str(metrics_dir)
    try:
        return start_server(bundle, params_file, port, extra=["--request_log", str(request_log)])
    finally:
        if previous is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = previous


class CanarySplit:
    """The ``served`` policy of a canary rollout: each 64-user request goes to the canary with
    probability ``share``, else the champion, with an ``x-request-id``; remembers both per user row."""

    def __init__(self, urls: dict[str, str], share: float, list_size: int, seed: int) -> None:
        self.clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
        self.share, self.list_size = share, list_size
        self.rng = np.random.default_rng(seed)
        self.request_ids: np.ndarray = np.empty(0, dtype=object)
        self.versions: np.ndarray = np.empty(0, dtype=object)

    def __call__(self, users: np.ndarray) -> tuple[np.ndarray, str]:
        out = np.zeros((len(users), self.list_size), dtype=np.int64)
        self.request_ids = np.empty(len(users), dtype=object)
        self.versions = np.empty(len(users), dtype=object)
        for lo in range(0, len(users), BATCH):
            name = "canary" if self.rng.random() < self.share else "champion"
            request_id = uuid.uuid4().hex
            instances = [{"user_id": int(u), "n": self.list_size} for u in users[lo : lo + BATCH]]
            answer = self.clients[name].post(
                "/v1/models/recommend:predict",
                json={"instances": instances},
                headers={"x-request-id": request_id},
            )
            answer.raise_for_status()
            for i, prediction in enumerate(answer.json()["predictions"]):
                items = prediction["item_ids"][: self.list_size]
                out[lo + i, : len(items)] = items
                self.request_ids[lo + i] = request_id
                self.versions[lo + i] = prediction.get("bundle_version", "")
        return out, "split"

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class Traffic(threading.Thread):
    """Simulated days of ``requests`` arrivals through the split until stopped; each day's clicks go to
    ``clicks_dir`` as click feedback (request_id, user_id, item_id, label, bundle_version)."""

    def __init__(self, sim, raw: dict[str, pd.DataFrame], split: CanarySplit, clicks_dir: Path, args) -> None:
        super().__init__(daemon=True)
        self.sim, self.raw, self.split, self.clicks_dir, self.args = sim, raw, split, clicks_dir, args
        self.stop = threading.Event()
        self.start_s = simulate.first_day_start(raw["events"])
        self.days: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            day = 0
            while not self.stop.is_set():
                traffic = simulate.Traffic(self.start_s, self.args.requests, self.args.list_size, seed=day)
                result = simulate.simulate_day(
                    self.sim, self.raw["events"], self.raw["items"], {"served": self.split}, traffic
                )
                self._write_clicks(result, day)
                day += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _write_clicks(self, result: simulate.Day, day: int) -> None:
        served, clicked = result.lists["served"], result.clicks["served"]
        row, slot = np.nonzero(served > 0)
        frame = pd.DataFrame(
            {
                "request_id": self.split.request_ids[row].astype(str),
                "user_id": result.user_ids[row],
                "item_id": served[row, slot],
                "label": clicked[row, slot].astype(np.int64),
                "bundle_version": self.split.versions[row].astype(str),
            }
        )
        tmp = self.clicks_dir / f".day-{day:05d}.parquet.tmp"
        frame.to_parquet(tmp)
        tmp.rename(self.clicks_dir / f"day-{day:05d}.parquet")  # a reader never sees half a file
        by_version = frame.groupby("bundle_version")["label"].agg(["size", "sum"])
        self.days.append({v: [int(r["size"]), int(r["sum"])] for v, r in by_version.iterrows()})


def production_isvc(champion_uri: str) -> dict[str, Any]:
    """The production overlay's InferenceService serving ``champion_uri``, generation 3."""
    (isvc,) = [
        o
        for o in render_kustomization(ROOT / "manifests/overlays/production")
        if o["kind"] == "InferenceService"
    ]
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "STORAGE_URI")["value"] = champion_uri
    return isvc | {"metadata": isvc["metadata"] | {"generation": 3}}


class CanaryFrames(Frames):
    """tests/test_rollout.py's frames for one KServe version, the new model being ``image``/``uri``."""

    def __init__(self, version: str, isvc: dict[str, Any], image: str, uri: str) -> None:
        self.version = version
        self.statuses = yaml.safe_load((FIXTURES / f"{version}.yaml").read_text())
        old = rollout.model_fields(isvc)
        models = {"OLD_IMAGE": old.image, "OLD_URI": old.storage_uri, "NEW_IMAGE": image, "NEW_URI": uri}
        for attr, name in (("ksvcs", "knative_service.yaml"), ("deployments", "deployment.yaml")):
            text = string.Template((FIXTURES / name).read_text()).substitute(models)
            setattr(self, attr, yaml.safe_load(text))


def simulated_cluster(isvc: dict[str, Any], image: str, uri: str) -> SimulatedCluster:
    """KServe 0.15.2 in Knative mode: the canary Ready throughout the soak, promotion and rollback
    completing (tests/fixtures/kserve_status/)."""
    k = CanaryFrames(KSERVE_VERSION, isvc, image, uri)
    return SimulatedCluster(
        isvc,
        {
            3: [k.kn("rolled_out")],
            4: [k.kn("canary_pending"), k.kn("canary_ready")],
            5: [k.kn("canary_ready", "promoted"), k.kn("promoted")],
            6: [k.kn("restored_pinned")],
            7: [k.kn("unpinned")],
        },
    )


def one_rollout(
    name: str, canary_bundle: Path, champion: dict[str, Any], setup: dict[str, Any], args
) -> dict[str, Any]:
    """Serve the canary beside the champion, drive traffic, run the guarded rollout; what happened."""
    work, params = setup["work"], setup["params"]
    port = setup["canary_port"]
    canary_version = json.loads((canary_bundle / MANIFEST).read_text())["version"]
    process = start_own_metrics(canary_bundle, setup["serving_params"], port, setup["request_log"], work)
    clicks_dir = work / f"clicks-{name}"
    clicks_dir.mkdir()
    urls = {"champion": champion["url"], "canary": f"http://127.0.0.1:{port}"}
    split = CanarySplit(urls, args.canary_share, args.list_size, seed=args.seed)
    traffic = Traffic(setup["sim"], setup["raw"], split, clicks_dir, args)
    config = params.deploy.model_copy(deep=True)
    guard_config = config.guardrails.model_dump() | {
        "enabled": True,
        "prometheus_url": setup["prometheus_url"],
        "window": args.window,
        "interval_s": args.interval_s,
        "min_requests": args.min_requests,
        "max_p99_latency_s": args.max_p99_latency_s,
        "ctr": {
            "request_log_uri": str(setup["request_log"]),
            "clicks_uri": str(clicks_dir),
            "min_impressions": args.min_impressions,
            "min_ctr_ratio": args.min_ctr_ratio,
        },
    }
    config = type(config).model_validate(
        config.model_dump() | {"guardrails": guard_config, "canary_soak_s": args.soak_s}
    )
    canary_uri = f"s3://recsys-models/bundles/{canary_version}/"
    cluster = simulated_cluster(production_isvc(champion["uri"]), NEW_IMAGE, canary_uri)
    isvc = deploy.build_inference_service(config, NEW_IMAGE, canary_uri)
    verdicts: list[tuple[float, guardrails.Verdict]] = []
    evaluate = guardrails.evaluate
    t0 = time.monotonic()

    def recorded(*a: Any, **kw: Any) -> guardrails.Verdict:  # the same call, kept for the report
        verdict = evaluate(*a, **kw)
        verdicts.append((time.monotonic() - t0, verdict))
        return verdict

    outcome: dict[str, Any] = {"canary": name, "canary_version": canary_version}
    guardrails.evaluate = recorded
    traffic.start()
    try:
        rollbacks: list[str] = []
        try:
            deploy.roll_out(isvc, config, cluster, rollbacks.append)
            outcome["decision"] = "promoted"
        except deploy.DeployError as exc:
            outcome["decision"] = "rolled back"
            outcome["error"] = str(exc)
        outcome["reason"] = rollbacks[0] if rollbacks else None
    finally:
        guardrails.evaluate = evaluate
        traffic.stop.set()
        traffic.join(timeout=120)
        split.close()
        stop_server(process)
    if traffic.error is not None:
        raise RuntimeError(f"traffic failed: {traffic.error}") from traffic.error
    outcome["elapsed_s"] = round(time.monotonic() - t0, 1)
    outcome["final_spec_storage_uri"] = _storage_uri(cluster.stored)
    outcome["evaluations"] = [_verdict_row(t, v, canary_version, champion["version"]) for t, v in verdicts]
    totals: dict[str, list[int]] = {}
    for day in traffic.days:
        for version, (shown, clicks) in day.items():
            totals.setdefault(version, [0, 0])
            totals[version] = [totals[version][0] + shown, totals[version][1] + clicks]
    outcome["simulated"] = {
        v: {"impressions": s, "clicks": c, "ctr": round(c / s, 4) if s else None}
        for v, (s, c) in totals.items()
    }
    return outcome


def _storage_uri(isvc: dict[str, Any]) -> str:
    env = isvc["spec"]["predictor"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "STORAGE_URI")


def _verdict_row(t: float, verdict: guardrails.Verdict, canary: str, champion: str) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(t, 1), "status": verdict.status}
    for check in verdict.checks:
        row[check.name] = {
            "status": check.status,
            "canary": _round(check.canary),
            "champion": _round(check.champion),
            "threshold": _round(check.threshold),
        }
    row["answers"] = {
        "canary": _round(verdict.values["canary"].get("answers")),
        "champion": _round(verdict.values["champion"].get("answers")),
    }
    ctr = verdict.values.get("ctr", {})
    row["impressions"] = {
        "canary": ctr.get(f"{canary}.impressions"),
        "champion": ctr.get(f"{champion}.impressions"),
    }
    return row


def _round(value: float | None) -> float | None:
    return None if value is None or value != value else round(float(value), 5)


def serving_params(params_file: Path, out: Path) -> Path:
    """``params_file`` for a loopback server: Feast's repo as an absolute path (the server runs from the
    checkout), a patient online-store timeout, and request-log files every second (the CTR guardrail
    reads them during the soak)."""
    raw = yaml.safe_load(params_file.read_text())
    raw["feast"]["repo_path"] = str((params_file.parent / raw["feast"]["repo_path"]).resolve())
    raw["serving"]["feast_timeout_s"] = 10.0
    raw["serving"]["request_log"]["flush_interval_s"] = 1.0
    out.write_text(yaml.safe_dump(raw))
    return out


def run(args) -> dict[str, Any]:
    processes = []
    with tiny_workdir(args.preset, args.epochs, args.keep) as params:
        work = Path.cwd()
        t0 = time.perf_counter()
        built = build(params)
        build_s = time.perf_counter() - t0
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        bundles = work / "canary-bundles"
        ranker = params.serving.default_ranker
        champion_dir = derive_bundle(built, bundles / f"{stamp}-champion", f"{stamp}-champion", None, ranker)
        bad = derive_bundle(built, bundles / f"{stamp}-broken", f"{stamp}-broken", args.seed, ranker)
        good = derive_bundle(built, bundles / f"{stamp}-copy", f"{stamp}-copy", None, ranker)
        served = serving_params(work / "params.yaml", work / "serving-params.yaml")
        request_log = work / "request_log"
        champion_port, canary_port, prom_port = free_port(), free_port(), free_port()
        try:
            processes.append(start_own_metrics(champion_dir, served, champion_port, request_log, work))
            champion = {
                "url": f"http://127.0.0.1:{champion_port}",
                "version": f"{stamp}-champion",
                "uri": f"s3://recsys-models/bundles/{stamp}-champion/",
            }
            targets = {"champion": f"127.0.0.1:{champion_port}", "canary": f"127.0.0.1:{canary_port}"}
            with running_prometheus(work / "prometheus", prom_port, targets, scrape_s=1.0) as prom_url:
                wait_for_scrapes(prom_url, jobs=1)
                setup = {
                    "work": work,
                    "params": params,
                    "serving_params": served,
                    "request_log": request_log,
                    "canary_port": canary_port,
                    "prometheus_url": prom_url,
                    "sim": world(params.data.synthetic, params.seed),
                    "raw": read_raw_tables(layout.RAW_DIR),
                }
                rollouts = [
                    one_rollout(
                        "broken export (item ids shuffled, ranker scrambled)", bad, champion, setup, args
                    ),
                    one_rollout("copy of the champion", good, champion, setup, args),
                ]
        finally:
            for process in processes:
                stop_server(process)
    return {
        "preset": args.preset,
        "epochs": args.epochs,
        "build_s": round(build_s, 1),
        "kserve_status_frames": KSERVE_VERSION,
        "canary_share": args.canary_share,
        "soak_s": args.soak_s,
        "requests_per_simulated_day": args.requests,
        "list_size": args.list_size,
        "guardrails": {
            "window": args.window,
            "interval_s": args.interval_s,
            "min_requests": args.min_requests,
            "max_error_rate": params.deploy.guardrails.max_error_rate,
            "max_p99_latency_s": args.max_p99_latency_s,
            "max_empty_rate": params.deploy.guardrails.max_empty_rate,
            "min_impressions": args.min_impressions,
            "min_ctr_ratio": args.min_ctr_ratio,
        },
        "champion_version": champion["version"],
        "rollouts": rollouts,
    }


def write_results(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guardrail_rollout.json").write_text(json.dumps(report, indent=2) + "\n")
    g = report["guardrails"]
    lines = [
        f"Guarded canary rollouts, preset {report['preset']}: champion and canary served by `python -m "
        f"serving` on loopback, {report['canary_share']:.0%} of the simulated requests to the canary, "
        f"Prometheus scraping both every 1 s, soak {report['soak_s']:.0f} s (KServe "
        f"{report['kserve_status_frames']} status frames). Thresholds: error rate <= {g['max_error_rate']}, "
        f"p99 <= {g['max_p99_latency_s']} s, empty answers <= {g['max_empty_rate']} over {g['window']} "
        f"(>= {g['min_requests']} answers), served CTR >= {g['min_ctr_ratio']} x the champion's "
        f"(>= {g['min_impressions']} impressions each).",
        "",
        "| canary | decision | at | error rate | p99 latency (s) | empty rate | served CTR | impressions |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for r in report["rollouts"]:
        last = r["evaluations"][-1] if r["evaluations"] else {}

        def pair(metric: str, last: dict[str, Any] = last) -> str:
            c = last.get(metric, {})
            return f"{_show(c.get('canary'))} vs {_show(c.get('champion'))} ({c.get('status', 'n/a')})"

        imp = last.get("impressions", {})
        lines.append(
            f"| {r['canary']} | **{r['decision']}** | {last.get('t_s', 'n/a')} s | {pair('error_rate')} | "
            f"{pair('p99_latency_s')} | {pair('empty_rate')} | {pair('served_ctr')} | "
            f"{_count(imp.get('canary'))} vs {_count(imp.get('champion'))} |"
        )
    lines += ["", "Values: canary vs champion at the deciding evaluation. Reasons:", ""]
    for r in report["rollouts"]:
        lines.append(f"- {r['canary']}: {r['reason'] or 'promoted, every guardrail within its threshold'}")
    lines += [
        "",
        "The simulator's own count over each rollout's whole run (clicks / impressions, by version):",
        "",
    ]
    for r in report["rollouts"]:
        sim = ", ".join(
            f"{v}: {m['ctr']} ({m['impressions']} impressions)" for v, m in r["simulated"].items()
        )
        lines.append(f"- {r['canary']}: {sim}")
    lines.append("")
    (RESULTS / "guardrail_rollout.md").write_text("\n".join(lines))


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _show(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.guardrail_rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canary_share", type=float, default=0.2, help="share of requests to the canary")
    parser.add_argument("--soak_s", type=float, default=60.0)
    parser.add_argument("--window", default="60s")
    parser.add_argument("--interval_s", type=float, default=10.0)
    parser.add_argument("--min_requests", type=int, default=200)
    parser.add_argument("--max_p99_latency_s", type=float, default=1.0)
    parser.add_argument("--min_impressions", type=int, default=2000)
    parser.add_argument("--min_ctr_ratio", type=float, default=0.8)
    parser.add_argument("--requests", type=int, default=256, help="arrivals per simulated day")
    parser.add_argument("--list_size", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("FEAST_USAGE", "False")
    report = run(args)
    write_results(report)
    for r in report["rollouts"]:
        log.info("%s: %s (%s)", r["canary"], r["decision"], r["reason"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
