"""Models on real ratings: the DAG's steps on a MovieTweetings snapshot, each number next to its baseline.

Run: ``python -m benchmarks.real_data_quality --dataset /path/to/movietweetings [--workdir DIR]``.

The project's params.yaml (``--params``) with ``data.source: movietweetings`` and every output path inside
``--workdir`` (its own Feast registry too) is written to ``<workdir>/params.yaml``; the split is one
global time split 80/10/10 by rating time: ``training_set.valid_start`` / ``test_start`` are the 80% and
90% quantiles of the event times. Then the steps run as ``dvc repro`` runs them, each its own CLI in the
work directory: ingest, features, validate raw, training_set, validate training, train (four models),
evaluate, export, build_index. The online store is not materialized (``feast.materialize: false``).
``--search-trials N`` also runs the hyper-parameter search step on the same training sets first.
``--seeds 1 2 ...`` then trains and evaluates the four models again with each ``training.seed`` (same
training sets, configuration and split) and reports every quality bar per seed: how robust each margin is.

Results: ``benchmarks/results/real_data_quality.{json,md}`` with the quality bars of issue 16:
- each ranker's test AUC >= the item-CTR baseline's + 0.02 and > the logistic regression on user + item
  one-hot;
- MultiTowerDIN's AUC >= MultiTower's on the test rows whose user has a history;
- the two-tower's full-catalogue Recall@50 >= 1.3 x the popularity baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from recsys import artifact_layout as layout

RESULTS = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
RANKERS = ("multi_tower", "multi_tower_din", "dlrm")
AUC_MARGIN = 0.02
RECALL_LIFT = 1.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_data_quality", description=__doc__)
    parser.add_argument("--dataset", required=True, type=Path, help="MovieTweetings directory or zip")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/real_data_quality"))
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument(
        "--overrides",
        type=Path,
        default=Path(__file__).parent / "real_data_params.yaml",
        help="dotted params keys for this dataset (the committed MovieTweetings configuration)",
    )
    parser.add_argument("--search-trials", type=int, default=0, help="run the search step first (0: no)")
    parser.add_argument("--skip-data", action="store_true", help="reuse the work directory's training sets")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="retrain with each training.seed; bars per seed"
    )
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params_file = workdir / "params.yaml"
    seconds: dict[str, float] = {}
    overrides = yaml.safe_load(args.overrides.read_text()) if args.overrides else {}
    dataset = args.dataset.resolve()
    if not args.skip_data:
        write_params(args.params, params_file, workdir, dataset, None, overrides)
        seconds["ingest"] = step(workdir, "ingest")
        cuts = time_cuts(workdir / layout.RAW_DIR / "events.parquet")
        write_params(args.params, params_file, workdir, dataset, cuts, overrides)
        for name, extra in (
            ("features", []),
            ("validate", ["--target", "raw"]),
            ("training_set", []),
            ("validate", ["--target", "training"]),
        ):
            seconds[f"{name} {' '.join(extra)}".strip()] = step(workdir, name, *extra)
    else:
        cuts = {
            k: yaml.safe_load(params_file.read_text())["training_set"][k]
            for k in ("valid_start", "test_start")
        }
        write_params(args.params, params_file, workdir, dataset, cuts, overrides)
    if args.search_trials:
        search = {"search.enabled": True, "search.trials": args.search_trials}
        write_params(args.params, params_file, workdir, dataset, cuts, overrides | search)
        seconds["search"] = step(workdir, "search")
        found = json.loads((workdir / layout.SEARCH_REPORT).read_text())["studies"]
        best = {key: value for study in found.values() for key, value in study["best_params"].items()}
        overrides = overrides | search | best
        write_params(args.params, params_file, workdir, dataset, cuts, overrides)
    for kind in ("two_tower", *RANKERS):
        seconds[f"train {kind}"] = step(workdir, "train", "--model", kind)
    seconds["evaluate"] = step(workdir, "evaluate")
    seconds["export"] = step(workdir, "export")
    seconds["build_index"] = step(workdir, "build_index")

    report = summarise(workdir, seconds, args.dataset, overrides)
    report["data_steps_run"] = not args.skip_data
    if args.seeds:
        seed = yaml.safe_load(params_file.read_text())["training"]["seed"]
        report["bars_per_seed"] = {str(seed): report["bars"]}
        for seed in args.seeds:
            write_params(
                args.params, params_file, workdir, dataset, cuts, overrides | {"training.seed": seed}
            )
            step(workdir, "train", "--model", *RANKERS, "two_tower")  # side by side: only the bars count here
            step(workdir, "evaluate")
            report["bars_per_seed"][str(seed)] = summarise(workdir, {}, args.dataset, overrides)["bars"]
    write_results(report, args.results)
    print(json.dumps(report["bars"], indent=1))
    return 0


def write_params(
    base: Path,
    target: Path,
    workdir: Path,
    dataset: Path,
    cuts: dict[str, str] | None,
    overrides: dict[str, Any],
) -> None:
    """``base`` with the MovieTweetings source, its Feast store under ``workdir``, (once known) the time
    cuts and ``overrides`` (dotted keys) applied."""
    raw = yaml.safe_load(base.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    raw["data"]["source"] = "movietweetings"
    raw["data"]["movietweetings"]["path"] = str(dataset)
    raw["data"]["until"] = None
    feast_dir = workdir / "feast"
    feast_dir.mkdir(exist_ok=True)
    store = yaml.safe_load((REPO_ROOT / "feature_repo/feature_store.yaml").read_text())
    store["registry"] = str(feast_dir / "registry.db")
    store["online_store"]["path"] = str(feast_dir / "online_store.db")
    (feast_dir / "feature_store.yaml").write_text(yaml.safe_dump(store))
    raw["feast"]["repo_path"] = str(REPO_ROOT / "feature_repo")
    raw["feast"]["config_file"] = str(feast_dir / "feature_store.yaml")
    raw["feast"]["materialize"] = False
    if cuts:
        raw["training_set"].update(cuts)
    target.write_text(yaml.safe_dump(raw, sort_keys=False))


def time_cuts(events_file: Path) -> dict[str, str]:
    """The 80% and 90% quantiles of the event times: one global 80/10/10 split by time."""
    stamps = pd.read_parquet(events_file, columns=["event_timestamp"])["event_timestamp"]
    return {
        "valid_start": stamps.quantile(0.8).isoformat(),
        "test_start": stamps.quantile(0.9).isoformat(),
    }


def step(workdir: Path, name: str, *args: str) -> float:
    """Run ``python -m components.<name> --params params.yaml ...`` in ``workdir``; seconds taken."""
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "FEAST_USAGE": "False", "GX_ANALYTICS_ENABLED": "False"}
    started = time.perf_counter()
    command = [sys.executable, "-m", f"components.{name}", "--params", "params.yaml", *args]
    print("+", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=workdir, env=env, check=True)
    return round(time.perf_counter() - started, 1)


def summarise(
    workdir: Path, seconds: dict[str, float], dataset: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    evaluation = json.loads((workdir / layout.EVALUATION).read_text())
    training_set = json.loads((workdir / layout.TRAINING_SET_STATS).read_text())
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    ranking, retrieval = evaluation["ranking"], evaluation["retrieval"]
    ctr, lr = ranking["item_ctr_baseline"]["auc"], ranking["logistic_regression_baseline"]["auc"]
    bars: dict[str, Any] = {}
    for kind in RANKERS:
        auc = ranking[kind]["auc"]
        bars[f"{kind} auc >= item_ctr + {AUC_MARGIN}"] = _bar(auc, ctr + AUC_MARGIN, auc >= ctr + AUC_MARGIN)
        bars[f"{kind} auc > logistic_regression"] = _bar(auc, lr, auc > lr)
    with_history = ranking["with_history"]
    bars["multi_tower_din auc >= multi_tower (users with history)"] = _bar(
        with_history["multi_tower_din"]["auc"],
        with_history["multi_tower"]["auc"],
        with_history["multi_tower_din"]["auc"] >= with_history["multi_tower"]["auc"],
    )
    tt, pop = retrieval["two_tower"]["recall@50"], retrieval["popularity"]["recall@50"]
    bars[f"two_tower recall@50 >= {RECALL_LIFT} x popularity"] = _bar(
        tt, RECALL_LIFT * pop, tt >= RECALL_LIFT * pop
    )
    models = {
        kind: json.loads((workdir / layout.model_metrics(kind)).read_text())
        for kind in ("two_tower", *RANKERS)
    }
    search_file = workdir / layout.SEARCH_REPORT
    return {
        "dataset": {"name": "MovieTweetings", "path": str(dataset), "licence": "MIT"},
        "split": {k: params["training_set"][k] for k in ("valid_start", "test_start")},
        "positive_rating": params["data"]["movietweetings"]["positive_rating"],
        "overrides": overrides,
        "training_set_rows": training_set.get("sets", training_set),
        "evaluation": evaluation,
        "training": {
            kind: {k: m.get(k) for k in ("epochs", "best_epoch", "best_valid_metric", "train_seconds")}
            for kind, m in models.items()
        },
        "search": json.loads(search_file.read_text()) if search_file.exists() else None,
        "bars": bars,
        "seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def _bar(value: float, threshold: float, passed: bool) -> dict[str, Any]:
    return {"value": round(value, 4), "threshold": round(threshold, 4), "passed": bool(passed)}


def write_results(report: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "real_data_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / "real_data_quality.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    ranking, retrieval = ev["ranking"], ev["retrieval"]
    lines = [
        "# Models on real ratings: MovieTweetings",
        "",
        "`python -m benchmarks.real_data_quality --dataset <movietweetings>` (params.yaml + "
        "benchmarks/real_data_params.yaml);",
        f"label = rating >= {report['positive_rating']} of 10; global time split: valid from "
        f"{report['split']['valid_start']}, test from {report['split']['test_start']}; "
        f"full catalogue ({ev['catalogue_items']} items).",
        "",
        f"## Ranking (test: {ranking['test_rows']} ratings, "
        f"positive rate {ranking['test_positive_rate']:.3f})",
        "",
        "| model | AUC | GAUC | logloss | AUC, users with history |",
        "|---|---:|---:|---:|---:|",
    ]
    hist = ranking["with_history"]
    for kind in (*RANKERS, "logistic_regression_baseline", "item_ctr_baseline"):
        m = ranking[kind]
        cells = [f"{m['auc']:.4f}", _fmt(m.get("gauc")), f"{m['logloss']:.4f}", _fmt(hist[kind]["auc"])]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Retrieval (full catalogue, {retrieval['users']} test users)",
        "",
        "| model | " + " | ".join(k for k in retrieval["two_tower"]) + " |",
        "|---|" + "---:|" * len(retrieval["two_tower"]),
    ]
    for name in ("two_tower", "popularity"):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in retrieval[name].values()) + " |")
    lines += [
        "",
        "## Quality bars (issue 16)",
        "",
        "| bar | value | threshold | passed |",
        "|---|---:|---:|---|",
    ]
    for name, bar in report["bars"].items():
        lines.append(
            f"| {name} | {bar['value']:.4f} | {bar['threshold']:.4f} | {'yes' if bar['passed'] else 'no'} |"
        )
    if report.get("search"):
        lines += ["", "## Search (validation split, components/search.py)", ""]
        lines += ["| model | metric | starting configuration | best found |", "|---|---|---:|---:|"]
        for kind, study in report["search"]["studies"].items():
            row = [kind, study["metric"], f"{study['default_value']:.4f}", f"{study['best_value']:.4f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "Each study starts from the configuration the search ran with (`default_params` in the JSON);",
            "its best values are in benchmarks/real_data_params.yaml, which this run used.",
        ]
    if report.get("bars_per_seed"):
        seeds = list(report["bars_per_seed"])
        extra = " ".join(seeds[1:])
        lines += [
            "",
            f"## The bars per training seed (`--seeds {extra}`: same training sets and configuration)",
            "",
        ]
        lines += ["| bar | " + " | ".join(f"seed {s}" for s in seeds) + " | passed |"]
        lines += ["|---|" + "---:|" * len(seeds) + "---|"]
        for name in report["bars"]:
            per_seed = [report["bars_per_seed"][s][name] for s in seeds]
            cells = [f"{b['value']:.4f} vs {b['threshold']:.4f}" for b in per_seed]
            passed = sum(b["passed"] for b in per_seed)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {passed} of {len(seeds)} |")
    lines += ["", "## Steps (seconds)", ""]
    if not report.get("data_steps_run", True):
        lines += ["Training sets reused from the work directory's earlier run (`--skip-data`).", ""]
    lines += ["| step | s |", "|---|---:|"]
    lines += [f"| {name} | {s} |" for name, s in report["seconds"].items()]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    raise SystemExit(main())
