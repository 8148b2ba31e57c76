"""Time the training-set step (Feast point-in-time joins on the DuckDB offline store) end to end.

Run: ``python -m benchmarks.feast_offline_stores [--presets default movielens_shaped large]``.
Results go to ``benchmarks/results/feast_offline_stores.{json,md}`` (a run of some presets keeps the
others' previous results).

Each preset is generated (ingest + features), then ``components.training_set.run`` runs as ``dvc repro``
runs it: apply, both training sets (ranking: every event; retrieval: the positives), the atomic writes,
the online-store backfill (``materialize``). Recorded: the step's seconds per set and per feature view
(the join is one Feast call per view and batch of time chunks, see recsys/point_in_time.py), the
materialize seconds, the rows, and the generation time.

Presets: ``default`` and ``large`` are the synthetic presets (400k and 10M events);
``movielens_shaped`` is the synthetic generator at the ml-100k shape (943 users, 1,682 items, 100k
events), a stand-in for the real ratings, which the project does not use for its own measurements.

The baseline is the step before the DuckDB store (the dask file store, one call per chunk of 8,000 entity
rows over all views): measured once, by this machine, on the same data and recorded in ``BASELINE``
(``benchmarks/results/training_set_validate.json`` for the default preset; the same entity frames and
feature tables for the MovieLens-shaped one, where both implementations also gave identical frames).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.training_set_validate import generate_dataset, timed_training_set
from recsys.config import Params, load_params

RESULTS = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]

PRESETS: dict[str, dict[str, Any]] = {
    "default": {"data.synthetic.preset": "default"},
    "movielens_shaped": {
        "data.synthetic.preset": "default",
        "data.synthetic.n_users": 943,
        "data.synthetic.n_items": 1682,
        "data.synthetic.n_events": 100_000,
    },
    "large": {"data.synthetic.preset": "large"},
}
TARGETS_S = {"default": 30, "movielens_shaped": 15, "large": 20 * 60}
# The step before this change (dask file store), seconds, measured once on this 2-core machine.
BASELINE: dict[str, dict[str, Any]] = {
    "default": {
        "retrieval": 58.83,
        "ranking": 150.46,
        "materialize": 10.77,
        "total": 222.7,
        "source": "benchmarks/results/training_set_validate.json (same preset, same step)",
    },
    "movielens_shaped": {
        "retrieval": 183.7,
        "ranking": 267.5,
        "source": "the previous recsys/point_in_time.py on the same tables (identical frames), join only",
    },
    "large": {
        "total": 4649,
        "source": "estimate of benchmarks/results/training_set_validate.json (200k-row slice, linear)",
    },
}


def measure(preset: str, params: Params, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"preset": preset, "events": params.data.synthetic.sizes().n_events}
    t0 = time.perf_counter()
    raw, feats, feast = generate_dataset(params, root)
    out["generate_s"] = _since(t0)
    report, out["training_set_s"] = timed_training_set(params, raw, feats, feast, root)
    out["parts_s"] = report["seconds"]
    out["view_seconds"] = report["view_seconds"]
    out["rows"] = {name: info["rows"] for name, info in report["sets"].items()}
    out["load_average_1m"] = round(os.getloadavg()[0], 2)  # the 2 cores are shared: context for the times
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    out["target_s"] = TARGETS_S[preset]
    out["baseline_s"] = BASELINE[preset]
    if preset == "large":
        out["end_to_end_s"] = round(out["generate_s"] + out["training_set_s"], 2)
    return out


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Training sets through Feast's DuckDB offline store",
        "",
        f"Machine: {report['machine']}. Command: `python -m benchmarks.feast_offline_stores`. "
        "Seconds of `components.training_set.run` (both training sets, writes, materialize); the baseline "
        "is the previous step (dask file store), measured once on the same machine.",
        "",
        "| preset | events | retrieval s | ranking s | materialize s | step s | target s | baseline s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"].values():
        parts, base = run["parts_s"], run["baseline_s"]
        baseline = base.get("total") or " + ".join(
            f"{k} {base[k]}" for k in ("retrieval", "ranking") if base.get(k) is not None
        )
        lines.append(
            f"| {run['preset']} | {run['events']:,} | {parts['retrieval']} | {parts['ranking']} | "
            f"{parts.get('materialize', '-')} | {run['training_set_s']} | {run['target_s']} | {baseline} |"
        )
    lines += ["", "Point-in-time join, seconds per feature view:", ""]
    views = ["user_profile", "item_profile", "user_stats", "item_stats", "user_history"]
    lines += ["| preset | set | " + " | ".join(views) + " |", "|---|---|" + "---:|" * len(views)]
    for run in report["runs"].values():
        for name, per_view in run["view_seconds"].items():
            cells = " | ".join(str(per_view.get(v, "-")) for v in views)
            lines.append(f"| {run['preset']} | {name} | {cells} |")
    lines += ["", "Notes:", ""]
    for run in report["runs"].values():
        extra = f"; end to end (generate + step) {run['end_to_end_s']} s" if "end_to_end_s" in run else ""
        load = f"; load average {run['load_average_1m']} at the end" if "load_average_1m" in run else ""
        load += f"; peak RSS {run['peak_rss_gb']} GB" if "peak_rss_gb" in run else ""
        lines.append(
            f"- {run['preset']}: generate (ingest + features) {run['generate_s']} s{extra}{load}; "
            f"baseline from {run['baseline_s']['source']}."
        )
    lines.append(
        "- The first view of the first set also pays the one-off imports of the DuckDB backend (~1-2 s)."
    )
    lines.append(
        "- The 2 cores were shared with other jobs during these runs (the load average is recorded); "
        "repeated runs of the same step varied by up to 2x."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["default", "movielens_shaped"], choices=PRESETS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)
    path = RESULTS / "feast_offline_stores.json"
    runs = {}
    for preset in args.presets:
        params = load_params(REPO_ROOT / "params.yaml", overrides=PRESETS[preset])
        with tempfile.TemporaryDirectory(prefix=f"bench-feast-{preset}-") as tmp:
            runs[preset] = measure(preset, params, Path(tmp))
        print(json.dumps(runs[preset], indent=2, default=str), flush=True)
    previous = json.loads(path.read_text())["runs"] if path.exists() else {}  # read late: runs may overlap
    runs = previous | runs
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "runs": {name: runs[name] for name in PRESETS if name in runs},
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "feast_offline_stores.md").write_text(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
