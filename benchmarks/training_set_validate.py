"""Time the Feast training-set step and the great-expectations gates on the synthetic presets.

Run: ``python -m benchmarks.training_set_validate [--presets default large] [--large-slice 200000]``.
Results go to ``benchmarks/results/training_set_validate.{json,md}``.

``default``: the whole step as ``dvc repro`` runs it (both training sets, materialize), then both gates,
plus the point-in-time join at several ``training_set.chunk_rows`` on a 40k-row slice (the choice of the
default) and Feast's plain unpruned join of the same slice for comparison.

``large`` (10 M events): generating it takes ~3 min here; the raw gate runs on all of it, the Feast join on
a time slice of ``--large-slice`` ranking rows, extrapolated linearly (the chunked join is linear in the
entity rows: each chunk reads only the feature rows it can use). A full run is that estimate plus the
online backfill; see the Markdown report for the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from components import features, ingest, training_set, validate
from recsys import feature_store, point_in_time
from recsys.config import FeastConfig, Params, load_params
from recsys.contracts import FEATURE_TABLE_KEYS

RESULTS = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def measure_default(params: Params, root: Path) -> dict[str, Any]:
    raw, feats, feast = generate_dataset(params, root)
    out: dict[str, Any] = {"preset": "default", "events": params.data.synthetic.sizes().n_events}
    t0 = time.perf_counter()
    validate.run(params.validation, "raw", raw, report_dir=root / "docs_raw", summary_file=root / "raw.json")
    out["validate_raw_s"] = _since(t0)
    report, out["training_set_s"] = timed_training_set(params, raw, feats, feast, root)
    out["training_set_parts_s"] = report["seconds"]
    out["rows"] = {name: info["rows"] for name, info in report["sets"].items()}
    t0 = time.perf_counter()
    validate.run(
        params.validation,
        "training",
        root / "training",
        report_dir=root / "docs_training",
        summary_file=root / "training.json",
    )
    out["validate_training_s"] = _since(t0)
    out["chunk_rows_sweep"] = _chunk_sweep(
        params, raw, feats, feast, rows=40_000, sizes=[12_500, 50_000, 200_000]
    )
    return out


def measure_large(params: Params, root: Path, slice_rows: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    raw, feats, feast = generate_dataset(params, root)
    out: dict[str, Any] = {"preset": "large", "events": params.data.synthetic.sizes().n_events}
    out["generate_s"] = _since(t0)
    t0 = time.perf_counter()
    validate.run(params.validation, "raw", raw, report_dir=root / "docs_raw", summary_file=root / "raw.json")
    out["validate_raw_s"] = _since(t0)
    join = _chunked_join(
        params, raw, feats, feast, rows=slice_rows, chunk_rows=params.training_set.chunk_rows
    )
    out["join_slice_rows"] = slice_rows
    out["join_slice_s"] = join["seconds"]
    out["join_rows_per_s"] = round(slice_rows / join["seconds"])
    positives = int(pq.read_table(raw / "events.parquet", columns=["label"]).column("label").to_numpy().sum())
    out["join_estimate_both_sets_s"] = round((out["events"] + positives) / out["join_rows_per_s"])
    return out


def generate_dataset(params: Params, root: Path) -> tuple[Path, Path, FeastConfig]:
    """Raw and feature tables of ``params.data`` under ``root``, and a feature_repo/ copy to register in."""
    raw, feats = root / "raw", root / "features"
    ingest.run(params.data, params.seed, raw)
    features.run(params.features, raw, feats)
    repo = root / "feature_repo"
    repo.mkdir()
    for path in (REPO_ROOT / "feature_repo").glob("*"):
        if path.is_file():
            (repo / path.name).write_bytes(path.read_bytes())
    return raw, feats, FeastConfig.model_validate(params.feast.model_dump() | {"repo_path": repo})


def timed_training_set(
    params: Params, raw: Path, feats: Path, feast: FeastConfig, root: Path
) -> tuple[dict[str, Any], float]:
    """The training-set step on the tables, its outputs under ``root``: (its report, seconds)."""
    t0 = time.perf_counter()
    report = training_set.run(
        params.training_set,
        feats,
        raw,
        root / "training",
        feast=feast,
        features=params.features,
        metrics_file=root / "ts.json",
        report_file=root / "ts.md",
    )
    return report, _since(t0)


def _chunked_join(
    params: Params, raw: Path, feats: Path, feast: FeastConfig, rows: int, chunk_rows: int
) -> dict[str, Any]:
    """The step's point-in-time join on ``rows`` ranking rows from the middle of the time range."""
    store = feature_store.open_feature_store(feast)
    build = functools.partial(feature_store.feature_repo, feast, params.features)
    store.apply(build(feats.resolve()).objects())
    sources = {name: feature_store.read_feature_table(feats, name) for name in FEATURE_TABLE_KEYS}
    events = pd.read_parquet(raw / "events.parquet")
    ranking = training_set.entity_frames(events)["ranking"]
    start = max(0, len(ranking) // 2 - rows // 2)
    entity = ranking.iloc[start : start + rows]
    t0 = time.perf_counter()
    frame, _ = point_in_time.historical_features(
        store, entity, "ranking", sources, build, chunk_rows, params.training_set.call_rows
    )
    return {"seconds": _since(t0), "rows": len(frame), "store": store, "entity": entity, "build": build}


def _chunk_sweep(
    params: Params, raw: Path, feats: Path, feast: FeastConfig, rows: int, sizes: list[int]
) -> dict[str, Any]:
    sweep: dict[str, Any] = {"slice_rows": rows}
    last: dict[str, Any] = {}
    for size in sizes:
        last = _chunked_join(params, raw, feats, feast, rows=rows, chunk_rows=size)
        sweep[f"chunk_rows_{size}_s"] = last["seconds"]
    # Feast's own join over the full tables, one call, for the same rows (bounded: it is quadratic per user)
    store, entity, build = last["store"], last["entity"], last["build"]
    small = entity.iloc[: rows // 4]
    t0 = time.perf_counter()
    whole = store.get_historical_features(entity_df=small, features=store.get_feature_service("ranking"))
    point_in_time.complete_training_rows(small, whole.to_df(), build(feats.resolve()))
    sweep["unpruned_single_call_rows"] = len(small)
    sweep["unpruned_single_call_s"] = _since(t0)
    t0 = time.perf_counter()
    sources = {name: feature_store.read_feature_table(feats, name) for name in FEATURE_TABLE_KEYS}
    point_in_time.historical_features(
        store, small, "ranking", sources, build, params.training_set.chunk_rows, params.training_set.call_rows
    )
    sweep["chunked_same_rows_s"] = _since(t0)
    return sweep


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Training sets (Feast) and validation (great-expectations)",
        "",
        f"Machine: {report['machine']}; peak RSS {report['peak_rss_gb']} GB. "
        "Command: `python -m benchmarks.training_set_validate`.",
        "",
    ]
    for run in report["runs"]:
        lines += [f"## {run['preset']} ({run['events']:,} events)", ""]
        for key, value in run.items():
            if key in ("preset", "events"):
                continue
            shown = json.dumps(value) if isinstance(value, dict) else value
            lines.append(f"- {key}: {shown}")
        lines.append("")
    lines += [
        "Notes:",
        "",
        "- `training_set_s` is the whole step: apply, both training sets (chunked point-in-time join with "
        "Feast), the atomic writes and the online-store backfill (`materialize`).",
        "- `chunk_rows_sweep`: the join of the same 40k ranking rows at several `training_set.chunk_rows`; "
        "`unpruned_single_call_*` is one plain `get_historical_features` call over the full feature tables "
        "for a quarter of them, `chunked_same_rows_s` the step's join of those same rows.",
        "- large: the Feast join runs on a time slice and is extrapolated (`join_estimate_both_sets_s`); "
        "a full large run is that plus the online backfill of 1 M users, which does not fit the few minutes "
        "this benchmark may take on 2 cores.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["default", "large"])
    parser.add_argument("--large-slice", type=int, default=200_000, help="ranking rows joined on large")
    args = parser.parse_args(argv)
    runs = []
    for preset in args.presets:
        params = load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": preset})
        with tempfile.TemporaryDirectory(prefix=f"bench-{preset}-") as tmp:
            if preset == "large":
                runs.append(measure_large(params, Path(tmp), args.large_slice))
            else:
                runs.append(measure_default(params, Path(tmp)))
        print(json.dumps(runs[-1], indent=2, default=str), flush=True)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_set_validate.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "training_set_validate.md").write_text(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
