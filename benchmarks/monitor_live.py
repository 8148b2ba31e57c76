"""The monitor on live traffic: the default bundle served on loopback with its Feast online store, the
test window's users asking ``recommend``, every answer in the request log, then the monitor step.

Scenarios, each on its own server and request-log folder:

- ``clean``: the users as they are (features from the online store), drawn by their test-window events
  as real traffic would come: no check may fail (warnings are reported with their reasons: this replay
  serves today from data that ended months ago);
- ``drift``: the same users, with a client sending one user feature far from what training saw
  (``recommend``'s ``context.features``: ``--feature`` set to ``--value`` for every user): the drift check
  must fail and name that feature.

``python -m benchmarks.monitor_live`` after ``dvc repro`` (it reads data/raw, data/training and
artifacts/bundle with the Feast repo the repro filled). Results: benchmarks/results/monitor_live.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from components import monitor
from recsys import artifact_layout as layout
from recsys.config import load_params
from serving.local_server import free_port, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_live", description=__doc__)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--users", type=int, default=600, help="requests, users drawn by test-window events")
    parser.add_argument("--feature", default="user_ctr_30d", help="the feature the drift scenario shifts")
    parser.add_argument("--value", type=float, default=0.9)
    parser.add_argument("--out", default=str(RESULTS / "monitor_live"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    test = pd.read_parquet(ROOT / layout.TRAINING_DIR / "ranking_test.parquet", columns=["user_id"])
    # as real traffic comes: a user asks as often as the test window shows them active
    users = test["user_id"].sample(n=args.users, random_state=0).astype(int).tolist()
    scenarios = {"clean": None, "drift": {args.feature: args.value}}
    results: dict[str, Any] = {"users": len(users), "shifted": {args.feature: args.value}, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="monitor-live-") as scratch:
        for name, features in scenarios.items():
            log_dir = Path(scratch) / name
            started = time.perf_counter()
            answered = _serve(Path(args.params), log_dir, users, features)
            served_s = time.perf_counter() - started
            started = time.perf_counter()
            report = monitor.run(
                params.monitor,
                params.serving,
                ROOT / layout.RAW_DIR,
                ROOT / layout.TRAINING_DIR,
                ROOT / layout.BUNDLE_DIR,
                output=Path(scratch) / f"{name}.json",
                textfile=Path(scratch) / f"{name}.prom",
                report_file=Path(scratch) / f"{name}.html",
                request_log_uri=str(log_dir),
                offline=monitor.OfflineFeatures(
                    params.feast, params.features, params.training_set, ROOT / layout.FEATURES_DIR
                ),
            )
            results["scenarios"][name] = {
                "answered": answered,
                "serve_seconds": round(served_s, 1),
                "monitor_seconds": round(time.perf_counter() - started, 1),
                "status": report["status"],
                "checks": {
                    check: {k: v for k, v in body.items() if k in ("status", "value", "message", "feature")}
                    for check, body in report["checks"].items()
                },
            }
    drift = results["scenarios"]["drift"]["checks"]["drift"]
    clean = results["scenarios"]["clean"]["checks"]
    results["clean_has_no_failure"] = all(check["status"] != "fail" for check in clean.values())
    results["clean_warnings"] = sorted(name for name, check in clean.items() if check["status"] == "warn")
    results["drift_found_and_named"] = drift["status"] == "fail" and drift.get("feature") == args.feature
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))
    return 0 if results["clean_has_no_failure"] and results["drift_found_and_named"] else 1


def _serve(params_file: Path, log_dir: Path, users: list[int], features: dict[str, float] | None) -> int:
    """Start the server logging to ``log_dir``, ask ``recommend`` for each user, stop it (the log is
    written on SIGTERM); the number of answers."""
    port = free_port()
    process = start_server(ROOT / layout.BUNDLE_DIR, params_file, port, ["--request_log", str(log_dir)])
    answered = 0
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for start in range(0, len(users), 8):
                instances = [
                    {"user_id": u, **({"context": {"features": features}} if features else {})}
                    for u in users[start : start + 8]
                ]
                answer = http.post("/v1/models/recommend:predict", json={"instances": instances})
                answer.raise_for_status()
                answered += len(answer.json()["predictions"])
    finally:
        stop_server(process)
    return answered


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The monitor on live traffic (default bundle, Feast online store, loopback)",
        "",
        f"{results['users']} requests per scenario, users drawn by their test-window events; `drift` sends "
        f"{results['shifted']} as every user's context features. Clean traffic without a failed check: "
        f"{results['clean_has_no_failure']} (warnings: {', '.join(results['clean_warnings']) or 'none'}); "
        f"the drift found and named: {results['drift_found_and_named']}.",
        "",
        "| scenario | check | status | value | detail |",
        "|---|---|---|---:|---|",
    ]
    for name, scenario in results["scenarios"].items():
        for check, body in scenario["checks"].items():
            value = "" if body["value"] is None else f"{body['value']:.4g}"
            lines.append(f"| {name} | {check} | {body['status']} | {value} | {body['message']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
