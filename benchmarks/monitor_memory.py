"""The monitor step's peak memory and seconds at scale (issue 26), each run in its own process.

Inputs per size: the scaled data of benchmarks/step_memory.py (``--scale-dir``: raw/ and features/), and
a work folder (``--work-dir``) with the training set of that data (the training-set step is run into it
when missing, by the code under test) and the Feast repo it applied. Traffic: ``--answers`` users of the
reference split, each asking the small serving bundle (tests/conftest.py's, built once) for a retrieval
with their features as the split has them and for a ``recommend`` (10 items), logged, then dated inside
the events' last day (the monitor's ``now`` is the events' end + 1 h), so every check does its work:
drift and expectations against the reference, the skew join, online recall, index coverage over the
recent events and served CTR from the clicks after the answers.

``python -m benchmarks.monitor_memory --scale-dir /work/scale/1M --work-dir /tmp/m1M --label after``;
``--root`` runs another copy of the code (``git archive`` of an older commit) as the ``before``.
Results: benchmarks/results/monitor_memory.{json,md} (runs merged by label and size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.child_runs import merge_run, timed_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# the child: one monitor run, as the step runs it, at a given ``now`` (the dated traffic's)
_CHILD = """
import json, sys
from datetime import datetime
from pathlib import Path
from components import monitor
from recsys.config import load_params
a = json.loads(sys.argv[1])
p = load_params(a["params"])
out = Path(a["out"])
offline = monitor.OfflineFeatures(p.feast, p.features, p.training_set, Path(a["features_dir"]))
monitor.run(p.monitor, p.serving, Path(a["raw_dir"]), Path(a["training_dir"]), Path(a["bundle_dir"]),
    out / "monitor.json", out / "monitor.prom", out / "monitor.html", now=datetime.fromisoformat(a["now"]),
    request_log_uri=a["log"], offline=offline, docs_dir=out / "docs")
"""


def sized_params(root: Path, scale_dir: Path, work_dir: Path, label: str) -> Path:
    """``root``'s params.yaml with the scaled data's sizes and the work folder's Feast repo."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    synthetic = yaml.safe_load((scale_dir / "params.yaml").read_text())["data"]["synthetic"]
    sizes = ("preset", "n_events", "n_users", "n_items")
    params["data"]["synthetic"].update({k: synthetic[k] for k in sizes})
    repo = work_dir / "feature_repo"
    if not repo.is_dir():
        shutil.copytree(root / "feature_repo", repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    params["feast"]["repo_path"] = str(repo)
    path = work_dir / f"params_{label}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed(command: list[str], root: Path) -> tuple[float, float]:
    """Run ``command`` under ``/usr/bin/time -v`` in ``root``: its wall seconds and peak RSS (GB)."""
    result = timed_process(command, root, " ".join(command[:4]))
    return result["seconds"], result["peak_rss_gb"]


def ensure_training_set(params: Path, scale_dir: Path, work_dir: Path, root: Path) -> Path:
    """The scaled data's training set (and the Feast registry it applies), built once."""
    out = work_dir / "training"
    if not (out / "manifest.json").is_file():
        paths = ["--raw-dir", scale_dir / "raw", "--features-dir", scale_dir / "features"]
        paths += ["--output-dir", out, "--metrics-file", work_dir / "training_set.json"]
        paths += ["--report-file", work_dir / "training_set.md"]
        command = [sys.executable, "-m", "components.training_set", "--params", str(params), *map(str, paths)]
        print("training set:", timed(command, root), flush=True)
    return out


def ensure_bundle(directory: Path) -> Path:
    """The serving tests' small bundle (every model trained briefly on synthetic rows), built once."""
    from tests.conftest import offline_serving_params, small_serving_bundle

    bundle = directory / "bundle"
    if not (bundle / "manifest.json").is_file():
        small_serving_bundle(offline_serving_params(), directory)
    return bundle


def ensure_traffic(work_dir: Path, scale_dir: Path, bundle: Path, answers: int) -> tuple[Path, str]:
    """A request log of a retrieval (with features) and a recommend answer for each of ``answers``
    reference users, dated inside the events' last day; and the monitor's ``now`` (the events' end + 1 h)."""
    import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
    from components.monitor import EventLog, reference_sample
    from recsys.request_records import PARTITION, RECORD_SCHEMA, read_request_log
    from serving.request_log import RequestLog
    from serving.server import build_models
    from tests.conftest import offline_serving_params, request_log_config

    end = EventLog(scale_dir / "raw" / "events.parquet").end()
    now = (end + timedelta(hours=1)).isoformat()
    log_dir = work_dir / "request_log"
    if log_dir.is_dir():
        return log_dir, now
    params = offline_serving_params()
    models = {m.name: m for m in build_models(bundle, params.serving, params.feast)}
    rows = reference_sample(work_dir / "training" / "ranking_test.parquet", answers).to_pandas()
    names = [n for n in models["retrieval"].recommender.user_feature_names if n in rows and n != "user_id"]
    with tempfile.TemporaryDirectory(prefix="monitor-memory-") as scratch:
        log = RequestLog(request_log_config(scratch))
        for model in models.values():
            model.request_log = log
        features = [{n: _plain(row[n]) for n in names} for _, row in rows.iterrows()]
        users = rows["user_id"].astype(int).tolist()
        for start in range(0, len(users), 8):  # each user: a retrieval with its features, a recommend
            batch = list(zip(users[start : start + 8], features[start : start + 8], strict=True))
            models["retrieval"].answer({"instances": [{"user_id": u, "features": f} for u, f in batch]})
            models["recommend"].answer({"instances": [{"user_id": u, "n": 10} for u, _ in batch]})
        log.flush()
        table = read_request_log(scratch)
    rng = np.random.default_rng(0)
    times = (end - pd.to_timedelta(np.sort(rng.uniform(0, 20 * 3600, table.num_rows)), unit="s")).floor("ms")
    table = table.set_column(
        table.schema.get_field_index("time"), "time", pa.array(times, RECORD_SCHEMA.field("time").type)
    )
    folder = log_dir / f"{PARTITION}{end:%Y-%m-%d}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "T000000Z-benchmark-0-000001.parquet")
    return log_dir, now


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def measure(scale_dir: Path, work_dir: Path, root: Path, label: str, bundle: Path, answers: int) -> dict:
    """The monitor step at one size with ``root``'s code: seconds, peak RSS and each check's result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    params = sized_params(root, scale_dir, work_dir, label)
    training = ensure_training_set(params, scale_dir, work_dir, root)
    log_dir, now = ensure_traffic(work_dir, scale_dir, bundle, answers)
    out = work_dir / f"out_{label}"
    shutil.rmtree(out, ignore_errors=True)
    args = {
        "params": str(params),
        "raw_dir": str(scale_dir / "raw"),
        "features_dir": str(scale_dir / "features"),
        "training_dir": str(training),
        "bundle_dir": str(bundle),
        "out": str(out),
        "now": now,
        "log": str(log_dir),
    }
    seconds, peak = timed([sys.executable, "-c", _CHILD, json.dumps(args)], root)
    report = json.loads((out / "monitor.json").read_text())
    events = pq.ParquetFile(scale_dir / "raw" / "events.parquet").metadata.num_rows
    return {
        "label": label,
        "events": events,
        "reference_rows": pq.ParquetFile(training / "ranking_test.parquet").metadata.num_rows,
        "answers": report["answers"],
        "seconds": seconds,
        "peak_rss_gb": peak,
        "checks": {n: {"status": c["status"], "value": c["value"]} for n, c in report["checks"].items()},
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Monitor step memory",
        "",
        f"The monitor step in its own process (`/usr/bin/time -v`), {report['machine']}, on the scaled data "
        "of benchmarks/step_memory.py (users = events / 10, items = events / 100), its training set's test "
        "split as the reference, and logged answers of the small serving bundle dated in the events' last "
        "day (every check runs). Command: `python -m benchmarks.monitor_memory --scale-dir ... --work-dir "
        "... --label ...`.",
        "",
        "| code | events | reference rows | answers | seconds | peak RSS (GB) | ok/warn/fail/skipped |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in sorted(report["runs"], key=lambda r: (r["label"], r["events"])):
        statuses = [c["status"] for c in run["checks"].values()]
        counts = "/".join(str(statuses.count(s)) for s in ("ok", "warn", "fail", "skipped"))
        lines.append(
            f"| {run['label']} | {run['events']:,} | {run['reference_rows']:,} | {run['answers']} | "
            f"{run['seconds']:.1f} | {run['peak_rss_gb']:.2f} | {counts} |"
        )
    return "\n".join([*lines, "", report.get("note", ""), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_memory", description=__doc__)
    parser.add_argument("--scale-dir", type=Path, required=True, help="raw/, features/, params.yaml")
    parser.add_argument("--work-dir", type=Path, required=True, help="training set, traffic, outputs")
    parser.add_argument("--bundle-dir", type=Path, default=None, help="default: <work-dir>/../bundle")
    parser.add_argument("--root", type=Path, default=ROOT, help="the code to measure")
    parser.add_argument("--label", default="after")
    parser.add_argument("--answers", type=int, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS / "monitor_memory")
    parser.add_argument("--note", default=None, help="the markdown's closing paragraph")
    args = parser.parse_args(argv)
    bundle = ensure_bundle(args.bundle_dir or args.work_dir.parent / "shared")
    run = measure(args.scale_dir, args.work_dir, args.root.resolve(), args.label, bundle, args.answers)
    print(json.dumps(run), flush=True)
    json_path = args.out.with_suffix(".json")
    if args.note is not None:
        report = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": []}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**report, "note": args.note}, indent=2) + "\n")
    merge_run(json_path, run, _markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
