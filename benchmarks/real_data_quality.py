"""Models on real ratings: the DAG's steps on a real dataset, each number next to its baselines.

Run: ``python -m benchmarks.real_data_quality --source movietweetings|ciao --dataset PATH [--workdir DIR]``.

The project's params.yaml (``--params``) with ``data.source: <source>`` and every output path inside
``--workdir`` (its own Feast registry too) is written to ``<workdir>/params.yaml``; the split is one
global time split 80/10/10 by rating time: ``training_set.valid_start`` / ``test_start`` are the 80% and
90% quantiles of the event times. Then the steps run as ``dvc repro`` runs them, each its own CLI in the
work directory: ingest, features, validate raw, training_set, validate training, train (four models),
evaluate, export, build_index. The online store is not materialized (``feast.materialize: false``).
``--search-trials N`` also runs the hyper-parameter search step on the same training sets first.
``--seeds 1 2 ...`` then trains and evaluates the four models again with each ``training.seed`` (same
training sets, configuration and split) and reports every quality bar per seed: how robust each margin is.

The overrides (``benchmarks/real_data_params.yaml``) are the one real-data configuration, chosen by the
search step on MovieTweetings' validation window; every other dataset runs with them unchanged (nothing is
tuned on its test window).

Results: ``benchmarks/results/real_data_quality.{json,md}`` (MovieTweetings) and
``real_data_quality_<source>.{json,md}`` (any other source) with the quality bars:
- against the strongest baselines (issue 22): the two-tower's full-catalogue Recall@50 >= 1.15 x the best
  retrieval baseline's (popularity, recent popularity, item-kNN, EASE^R); each ranker's AUC >= the best
  ranking baseline's (item CTR, tuned logistic regression, LightGBM) + 0.005;
- the earlier ones (issue 16): each ranker's AUC >= item CTR + 0.02 and > the logistic regression;
  MultiTowerDIN >= MultiTower on users with a history; the two-tower >= 1.3 x popularity.
With ``--seeds``, every margin is also reported as mean +- sd over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from recsys import artifact_layout as layout

RESULTS = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
RANKERS = ("multi_tower", "multi_tower_din", "dlrm")
AUC_MARGIN = 0.02
RECALL_LIFT = 1.3
BEST_RECALL_LIFT = 1.15  # over the best retrieval baseline
BEST_AUC_MARGIN = 0.005  # over the best ranking baseline
BLEND = "two_tower_blend"  # components/evaluate.py's name for the two-tower blended with popularity/item-kNN


@dataclass(frozen=True)
class Dataset:
    """What the report says of a source's data: its name, licence and rating scale."""

    name: str
    licence: str
    scale: str


DATASETS = {
    "movietweetings": Dataset("MovieTweetings", "MIT", "0-10"),
    "ciao": Dataset(
        "Ciao", "none stated; a research release (cite mTrust, WSDM 2012; eTrust, KDD 2012)", "0-5"
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_data_quality", description=__doc__)
    parser.add_argument("--source", choices=sorted(DATASETS), default="movietweetings")
    parser.add_argument("--dataset", required=True, type=Path, help="the source's directory or zip")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/real_data_quality"))
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument(
        "--overrides",
        type=Path,
        default=Path(__file__).parent / "real_data_params.yaml",
        help="dotted params keys (the committed real-data configuration, chosen on MovieTweetings)",
    )
    parser.add_argument("--search-trials", type=int, default=0, help="run the search step first (0: no)")
    parser.add_argument("--skip-data", action="store_true", help="reuse the work directory's training sets")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[], help="retrain with each training.seed; bars per seed"
    )
    parser.add_argument(
        "--retrieval-seeds",
        type=int,
        nargs="*",
        default=[],
        help="only retrain the two-tower with each training.seed on the work directory's training sets "
        "and evaluate retrieval (blend included); writes <workdir>/retrieval_seeds.json",
    )
    parser.add_argument(
        "--blend-sources",
        nargs="*",
        choices=["popularity", "item_knn"],
        default=None,
        help="with --retrieval-seeds: evaluation.blend_sources for those runs (default: params.yaml's)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="with --report: add these retrieval_seeds.json files to that report and rewrite the results",
    )
    parser.add_argument("--report", type=Path, default=None, help="a results JSON written by a full run")
    parser.add_argument(
        "--retrieval-from",
        type=Path,
        default=None,
        help="with --report: the retrieval evaluation (JSON) of a later run of the same training sets and "
        "two-tower seed (--base-seed), replacing the report's; its ranking numbers stay the report's",
    )
    parser.add_argument("--base-seed", type=int, default=None, help="the training seed of --retrieval-from")
    parser.add_argument(
        "--index-metrics", type=Path, default=None, help="with --report: that run's metrics/index.json"
    )
    args = parser.parse_args(argv)
    if args.retrieval_seeds:
        return retrieval_seeds(args)
    if args.report is not None:
        report = json.loads(args.report.read_text())
        if args.retrieval_from is not None:
            report["evaluation"]["retrieval"] = json.loads(args.retrieval_from.read_text())
            report["retrieval_rerun"] = True
            report["training_seed"] = args.base_seed
            retrieval_bars(report)
        if args.index_metrics is not None:
            report["index"] = json.loads(args.index_metrics.read_text())
        merge_retrieval_seeds(report, [json.loads(p.read_text()) for p in args.merge])
        write_results(report, args.results, args.source)
        print(json.dumps(report["retrieval_margins_over_seeds"], indent=1))
        return 0

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    params_file = workdir / "params.yaml"
    seconds: dict[str, float] = {}
    overrides = yaml.safe_load(args.overrides.read_text()) if args.overrides else {}
    dataset = args.dataset.resolve()
    if not args.skip_data:
        write_params(args.params, params_file, workdir, args.source, dataset, None, overrides)
        seconds["ingest"] = step(workdir, "ingest")
        cuts = time_cuts(workdir / layout.RAW_DIR / "events.parquet")
        write_params(args.params, params_file, workdir, args.source, dataset, cuts, overrides)
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
        write_params(args.params, params_file, workdir, args.source, dataset, cuts, overrides)
    if args.search_trials:
        search = {"search.enabled": True, "search.trials": args.search_trials}
        write_params(args.params, params_file, workdir, args.source, dataset, cuts, overrides | search)
        seconds["search"] = step(workdir, "search")
        found = json.loads((workdir / layout.SEARCH_REPORT).read_text())["studies"]
        best = {key: value for study in found.values() for key, value in study["best_params"].items()}
        overrides = overrides | search | best
        write_params(args.params, params_file, workdir, args.source, dataset, cuts, overrides)
    for kind in ("two_tower", *RANKERS):
        seconds[f"train {kind}"] = step(workdir, "train", "--model", kind)
    seconds["evaluate"] = step(workdir, "evaluate")
    seconds["export"] = step(workdir, "export")
    seconds["build_index"] = step(workdir, "build_index")

    report = summarise(workdir, seconds, args.source, args.dataset, overrides)
    report["data_steps_run"] = not args.skip_data
    if args.seeds:
        seed = yaml.safe_load(params_file.read_text())["training"]["seed"]
        report["bars_per_seed"] = {str(seed): report["bars"]}
        report["margins_per_seed"] = {str(seed): report["margins"]}
        for seed in args.seeds:
            write_params(
                args.params,
                params_file,
                workdir,
                args.source,
                dataset,
                cuts,
                overrides | {"training.seed": seed},
            )
            step(workdir, "train", "--model", *RANKERS, "two_tower")  # side by side: only the bars count here
            step(workdir, "evaluate")
            again = summarise(workdir, {}, args.source, args.dataset, overrides)
            report["bars_per_seed"][str(seed)] = again["bars"]
            report["margins_per_seed"][str(seed)] = again["margins"]
        report["margins_over_seeds"] = margins_over_seeds(report["margins_per_seed"])
    write_results(report, args.results, args.source)
    print(json.dumps(report["bars"], indent=1))
    return 0


def retrieval_seeds(args: argparse.Namespace) -> int:
    """Retrain the two-tower with each of ``args.retrieval_seeds`` on the work directory's training sets
    (made by an earlier full run) and evaluate retrieval only, the blend chosen on validation included."""
    workdir = args.workdir.resolve()
    params_file = workdir / "params.yaml"
    overrides = yaml.safe_load(args.overrides.read_text()) if args.overrides else {}
    if args.blend_sources:
        overrides = overrides | {"evaluation.blend_sources": list(args.blend_sources)}
    cuts = {
        k: yaml.safe_load(params_file.read_text())["training_set"][k] for k in ("valid_start", "test_start")
    }
    out: dict[str, Any] = {}
    for seed in args.retrieval_seeds:
        write_params(
            args.params,
            params_file,
            workdir,
            args.source,
            args.dataset.resolve(),
            cuts,
            overrides | {"training.seed": seed},
        )
        started = time.perf_counter()
        step(workdir, "train", "--model", "two_tower")
        out[str(seed)] = retrieval_summary(evaluate_retrieval_only(workdir))
        out[str(seed)]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(out[str(seed)], indent=1), flush=True)
    (workdir / "retrieval_seeds.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def evaluate_retrieval_only(workdir: Path) -> dict[str, Any]:
    """The evaluate step's retrieval report (models, baselines, blend) for the work directory's models."""
    from components.evaluate import BlendSource, evaluate_retrieval, retrieval_task
    from models.registry import RETRIEVAL_MODEL
    from recsys.bundle_blend import NEIGHBOURS_MEMBER
    from recsys.catalogue import item_catalogue
    from recsys.step_contract import STEPS
    from recsys.training_data import read_split, test_start_of

    params = STEPS["evaluate"].load(workdir / "params.yaml")
    cfg, training_dir, features_dir = (
        params.evaluation,
        workdir / layout.TRAINING_DIR,
        workdir / layout.FEATURES_DIR,
    )
    ttl = params.feast.ttl_days.item_stats
    catalogue = item_catalogue(features_dir, test_start_of(training_dir), ttl)
    ranking_test = read_split(training_dir, "ranking", "test")
    task = retrieval_task(training_dir, ranking_test, catalogue, cfg.ks, cfg.exclude_seen)
    return evaluate_retrieval(
        layout.model_dir(RETRIEVAL_MODEL, workdir / layout.MODELS_DIR),
        training_dir,
        task,
        cfg,
        refit=params.training.refit,
        seed=params.training.seed,
        blend=BlendSource(features_dir, params.training, ttl) if cfg.blend_shares else None,
        neighbours_file=workdir / layout.METRICS_DIR / NEIGHBOURS_MEMBER,
    )


def retrieval_summary(retrieval: dict[str, Any]) -> dict[str, Any]:
    """Recall@50 of the two-tower, its blend and the best baseline, the blend's share and the ratios."""
    best = retrieval["best_baseline"]
    recall = {name: retrieval[name]["recall@50"] for name in ("two_tower", BLEND, best) if name in retrieval}
    summary: dict[str, Any] = {"best_baseline": best, "recall@50": recall}
    if BLEND in retrieval:
        summary["share"] = retrieval["blend"]["share"]
        summary["source"] = retrieval["blend"].get("source", "popularity")
        summary["valid_recall@50"] = retrieval["blend"]["valid_recall"]
    for name in ("two_tower", BLEND):
        if name in recall:
            summary[f"{name} / best baseline"] = recall[name] / recall[best] if recall[best] > 0 else None
    return summary


def retrieval_bars(report: dict[str, Any]) -> None:
    """The report's retrieval bars and margin recomputed from its (replaced) retrieval evaluation."""
    retrieval = report["evaluation"]["retrieval"]
    best = retrieval["best_baseline"]
    tt, best_recall = retrieval["two_tower"]["recall@50"], retrieval[best]["recall@50"]
    ratio = tt / best_recall if best_recall > 0 else float("inf")
    report["margins"]["two_tower recall@50 / best baseline"] = round(ratio, 4)
    report["best_baselines"]["retrieval"] = best
    report["bars"][f"two_tower recall@50 >= {BEST_RECALL_LIFT} x best baseline"] = _bar(
        tt, BEST_RECALL_LIFT * best_recall, ratio >= BEST_RECALL_LIFT
    )
    pop = retrieval["popularity"]["recall@50"]
    report["bars"][f"two_tower recall@50 >= {RECALL_LIFT} x popularity"] = _bar(
        tt, RECALL_LIFT * pop, tt >= RECALL_LIFT * pop
    )
    if BLEND in retrieval:
        blend = retrieval[BLEND]["recall@50"]
        report["bars"][f"{BLEND} recall@50 >= {BEST_RECALL_LIFT} x best baseline"] = _bar(
            blend, BEST_RECALL_LIFT * best_recall, blend >= BEST_RECALL_LIFT * best_recall
        )


def merge_retrieval_seeds(report: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """``report`` (a full run) with the retrieval of more two-tower seeds, and each ratio to the best
    baseline as mean +- sd over all the seeds (the full run's first)."""
    seed = str(report.get("training_seed", "base"))
    per_seed = {seed: retrieval_summary(report["evaluation"]["retrieval"])}
    for run in runs:
        per_seed.update(run)
    report["retrieval_per_seed"] = per_seed
    ratios = {
        name: {s: {name: r[name]} for s, r in per_seed.items() if r.get(name) is not None}
        for name in ("two_tower / best baseline", f"{BLEND} / best baseline")
    }
    report["retrieval_margins_over_seeds"] = {
        name: margins_over_seeds(values)[name] for name, values in ratios.items() if values
    }


def write_params(
    base: Path,
    target: Path,
    workdir: Path,
    source: str,
    dataset: Path,
    cuts: dict[str, str] | None,
    overrides: dict[str, Any],
) -> None:
    """``base`` with ``source`` read from ``dataset``, its Feast store under ``workdir``, (once known) the
    time cuts and ``overrides`` (dotted keys) applied."""
    raw = yaml.safe_load(base.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    raw["data"]["source"] = source
    raw["data"][source]["path"] = str(dataset)
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
    workdir: Path, seconds: dict[str, float], source: str, dataset: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    evaluation = json.loads((workdir / layout.EVALUATION).read_text())
    training_set = json.loads((workdir / layout.TRAINING_SET_STATS).read_text())
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    ranking, retrieval = evaluation["ranking"], evaluation["retrieval"]
    ctr, lr = ranking["item_ctr_baseline"]["auc"], ranking["logistic_regression_baseline"]["auc"]
    margins = best_baseline_margins(evaluation)
    bars: dict[str, Any] = {}
    best_retrieval = retrieval["best_baseline"]
    bars[f"two_tower recall@50 >= {BEST_RECALL_LIFT} x best baseline"] = _bar(
        retrieval["two_tower"]["recall@50"],
        BEST_RECALL_LIFT * retrieval[best_retrieval]["recall@50"],
        margins["two_tower recall@50 / best baseline"] >= BEST_RECALL_LIFT,
    )
    if BLEND in retrieval:  # what recommend serves: the two-tower blended with recent popularity
        blend, best_recall = retrieval[BLEND]["recall@50"], retrieval[best_retrieval]["recall@50"]
        bars[f"{BLEND} recall@50 >= {BEST_RECALL_LIFT} x best baseline"] = _bar(
            blend, BEST_RECALL_LIFT * best_recall, blend >= BEST_RECALL_LIFT * best_recall
        )
    best_ranking = ranking["best_baseline"]
    for kind in RANKERS:
        bars[f"{kind} auc >= best baseline + {BEST_AUC_MARGIN}"] = _bar(
            ranking[kind]["auc"],
            ranking[best_ranking]["auc"] + BEST_AUC_MARGIN,
            margins[f"{kind} auc - best baseline"] >= BEST_AUC_MARGIN,
        )
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
    meta = DATASETS[source]
    return {
        "dataset": {"name": meta.name, "source": source, "path": str(dataset), "licence": meta.licence},
        "split": {k: params["training_set"][k] for k in ("valid_start", "test_start")},
        "training_seed": params["training"]["seed"],
        "positive_rating": params["data"][source]["positive_rating"],
        "best_baselines": {"retrieval": best_retrieval, "ranking": best_ranking},
        "margins": margins,
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


def best_baseline_margins(evaluation: dict[str, Any]) -> dict[str, float]:
    """The two-tower's Recall@50 over the best retrieval baseline's (a ratio) and each ranker's AUC minus
    the best ranking baseline's: the margins issue 22's bars are set on."""
    retrieval, ranking = evaluation["retrieval"], evaluation["ranking"]
    best_recall = retrieval[retrieval["best_baseline"]]["recall@50"]
    margins = {
        "two_tower recall@50 / best baseline": (
            retrieval["two_tower"]["recall@50"] / best_recall if best_recall > 0 else float("inf")
        )
    }
    best_auc = ranking[ranking["best_baseline"]]["auc"]
    margins |= {f"{kind} auc - best baseline": ranking[kind]["auc"] - best_auc for kind in RANKERS}
    return {name: round(value, 4) for name, value in margins.items()}


def margins_over_seeds(per_seed: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each margin's mean, sample standard deviation, min and max over the training seeds."""
    out = {}
    for name in next(iter(per_seed.values())):
        values = np.array([margins[name] for margins in per_seed.values()], dtype=np.float64)
        sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[name] = {
            "mean": round(float(values.mean()), 4),
            "sd": round(sd, 4),
            "min": round(float(values.min()), 4),
            "max": round(float(values.max()), 4),
            "seeds": len(values),
        }
    return out


def _bar(value: float, threshold: float, passed: bool) -> dict[str, Any]:
    return {"value": round(value, 4), "threshold": round(threshold, 4), "passed": bool(passed)}


def write_results(report: dict[str, Any], results: Path, source: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    stem = "real_data_quality" if source == "movietweetings" else f"real_data_quality_{source}"
    blend = report.get("evaluation", {}).get("retrieval", {}).get("blend", {})
    if isinstance(blend.get("popular_item_ids"), list):  # the dataset's item ids: their count is enough
        blend["popular_item_ids"] = len(blend["popular_item_ids"])
    (results / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (results / f"{stem}.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    ranking, retrieval = ev["ranking"], ev["retrieval"]
    data = report["dataset"]
    source = data.get("source", "movietweetings")
    scale = DATASETS[source].scale
    lines = [
        f"# Models on real ratings: {data['name']}",
        "",
        f"`python -m benchmarks.real_data_quality --source {source} --dataset <{source}>` (params.yaml + "
        "benchmarks/real_data_params.yaml, chosen on MovieTweetings' validation window);",
        f"licence: {data['licence']}; fitted on {ev.get('fitted_on', 'train')};",
        f"label = rating >= {report['positive_rating']} on {scale}; global time split: valid from "
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
    ranking_baselines = [
        n for n in ("gbdt_baseline", "logistic_regression_baseline", "item_ctr_baseline") if n in ranking
    ]
    for kind in (*RANKERS, *ranking_baselines):
        m = ranking[kind]
        with_history = hist.get(kind, {}).get("auc")
        cells = [f"{m['auc']:.4f}", _fmt(m.get("gauc")), f"{m['logloss']:.4f}", _fmt(with_history)]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Retrieval (full catalogue, {retrieval['users']} test users)",
        "",
        *(
            [
                "Re-run with the retrieval blend (`--retrieval-seeds`, same training sets and two-tower "
                f"seed {report.get('training_seed')}); the ranking section above is the earlier full run's.",
                "",
            ]
            if report.get("retrieval_rerun")
            else []
        ),
        "| model | " + " | ".join(k for k in retrieval["two_tower"]) + " |",
        "|---|" + "---:|" * len(retrieval["two_tower"]),
    ]
    metrics = list(retrieval["two_tower"])
    for name in ("two_tower", BLEND, "popularity", "recent_popularity", "item_knn", "ease"):
        if name in retrieval and metrics[0] in retrieval[name]:
            lines.append(f"| {name} | " + " | ".join(f"{retrieval[name][m]:.4f}" for m in metrics) + " |")
        elif name in retrieval:
            lines.append(f"| {name} | skipped: {retrieval[name].get('skipped', '')} |")
    if "best_baseline" in retrieval:
        lines += [
            "",
            f"Best retrieval baseline: {retrieval['best_baseline']}; best ranking baseline: "
            f"{ranking['best_baseline']}.",
        ]
    if "blend" in retrieval:
        blend, best = retrieval["blend"], retrieval["best_baseline"]
        by_source = blend.get("valid_recall_by_source") or {
            blend.get("source", "popularity"): blend["valid_recall"]
        }
        valid = "; ".join(
            f"{source}: " + ", ".join(f"{share}: {value:.4f}" for share, value in recall.items())
            for source, recall in by_source.items()
        )
        second = (
            "item-kNN's list over the user's history feature (the bundle's item_neighbours.npz, "
            f"{blend.get('item_neighbours', {}).get('neighbours')} neighbours per item)"
            if blend.get("source") == "item_knn"
            else f"recent popularity (window {blend['window_days']} days; None = all time)"
        )
        lines += [
            "",
            f"{BLEND}: the two-tower's list with a share {blend['share']:g} of every prefix given to "
            f"{second}, the source and share chosen on validation recall@50 with a two-tower fitted on "
            f"{blend['two_tower_fitted_on']} ({valid}); what `recommend` serves (the bundle's "
            "retrieval_blend.json).",
        ]
        intervals = retrieval["intervals"]
        lines += ["", "| recall@50, bootstrap interval over users | value | low | high |"]
        lines += ["|---|---:|---:|---:|"]
        for name, interval in intervals["mean"].items():
            lines.append(
                f"| {name} | {interval['value']:.4f} | {interval['low']:.4f} | {interval['high']:.4f} |"
            )
        for name, interval in intervals.get(f"difference_to_{best}", {}).items():
            cells = f"{interval['value']:.4f} | {interval['low']:.4f} | {interval['high']:.4f}"
            lines.append(f"| {name} - {best} | {cells} |")
    lines += [
        "",
        "## Quality bars (issue 22: the best baselines; issue 16: the earlier ones)",
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
    if report.get("margins_over_seeds"):
        lines += ["", "## Margins over the best baselines, over the training seeds", ""]
        lines += ["| margin | mean | sd | min | max | seeds |", "|---|---:|---:|---:|---:|---:|"]
        for name, m in report["margins_over_seeds"].items():
            cells = [f"{m[k]:.4f}" for k in ("mean", "sd", "min", "max")] + [str(m["seeds"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("retrieval_per_seed"):
        lines += [
            "",
            "## Retrieval per two-tower training seed (same training sets; `--retrieval-seeds`)",
            "",
            f"| seed | two_tower | {BLEND} | second list, share | best baseline | two_tower / best | "
            f"{BLEND} / best |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for seed, run in report["retrieval_per_seed"].items():
            recall, best = run["recall@50"], run["best_baseline"]
            cells = [
                seed,
                f"{recall['two_tower']:.4f}",
                _fmt(recall.get(BLEND)),
                f"{run.get('source', 'popularity')} {run.get('share', 0):g}",
                f"{best} {recall[best]:.4f}",
                _fmt(run.get("two_tower / best baseline")),
                _fmt(run.get(f"{BLEND} / best baseline")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| ratio to the best baseline (recall@50) | mean | sd | min | max | seeds |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        for name, m in report["retrieval_margins_over_seeds"].items():
            cells = [f"{m[k]:.4f}" for k in ("mean", "sd", "min", "max")] + [str(m["seeds"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("index"):
        index = report["index"]
        fallback = index.get("fallback")
        lines += ["", "## Index (build_index)", ""]
        text = (
            f"{index['type']} over {index['count']:,} items (d={index['dim']}), recall@{index['k']} "
            f"{index['recall_at_k']:.4f} against exact search (ties with the K-th score counted), "
            f"{index['memory_bytes']:,} bytes, {index['qps_single_query']} queries/s one at a time, "
            f"{index['qps_batched']} batched"
        )
        if fallback:
            best = max(fallback["curve"], key=lambda point: point["recall"])
            text += (
                f"; the tuned {fallback['from']} reached only {best['recall']:.4f} (at {best['value']}), "
                "so the step fell back to exact search (index.flat_fallback_max_items)"
            )
        lines.append(text + ".")
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
