"""Embedding size x index type: what each two-tower output dimension and ANN index costs and keeps.

Run after `dvc repro` (needs data/training and data/features): ``python -m benchmarks.embedding_tradeoff
[--dims 16 32 64 128 256] [--indexes flat hnsw ivf_pq sq8] [--seeds 42] [--workdir DIR]``.

For each output dimension (``models.two_tower.embedding_dim``; every other setting from params.yaml) the
two-tower is trained by the train step (``components.train.run``; ``training.refit`` off unless
``--refit``, to save time), exported by the export step (its validation-user vectors tune the index, as in
the DAG) and scored on the evaluate step's retrieval task (test users as of their first test event, full
catalogue as of the test start, items seen before the test window excluded). Each index is built and
tuned by the build-index step's own code (``components.build_index``: HNSW ``efSearch`` / IVF ``nprobe``
raised until recall@``index.k`` against exact search reaches ``index.recall_target`` on the validation
users); the int8 scalar quantiser (faiss ``ScalarQuantizer.QT_8bit``, exact scan over 1-byte codes) is not
a type the build step offers, so it is built here with faiss directly. IVF-PQ is codes only (no exact
re-ranking: the compressed point; ``ivf_pq_refine`` is the build step's IVF-PQ with re-ranking).

Per (dim, index): model Recall@K (K = ``evaluation.headline_k``) of the top K the index returns after the
user's seen items are dropped; ANN recall@K against exact search on the same test users; bytes per item
(serialised index / items); p50 / p99 latency of one query per call on one thread; build seconds. The
Pareto fronts (Recall@K vs bytes per item, vs p99 latency) and a recommended default (the fewest bytes per
item whose Recall@K is not below the best setting's by a paired bootstrap over users) go to
``benchmarks/results/embedding_tradeoff.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from components import build_index as bi
from components import evaluate, export, train
from components.build_index import Embeddings
from models.metrics import ItemSets
from recsys import artifact_layout as layout
from recsys import training_data
from recsys.catalogue import item_catalogue
from recsys.config import IndexConfig, Params, load_params
from recsys.step_contract import STEPS

RESULTS = Path(__file__).parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "embedding_tradeoff"
DIMS = (16, 32, 64, 128, 256)
# index name -> (label, build_index type or "sq8", IndexConfig overrides on params.yaml's index section)
INDEXES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "flat": ("Flat (exact)", "flat", {}),
    "hnsw": ("HNSW", "hnsw", {}),
    "ivf_pq": ("IVF-PQ", "ivf_pq", {"refine_k_factor": None}),
    "ivf_pq_refine": ("IVF-PQ + refine", "ivf_pq", {}),
    "sq8": ("SQ8 (int8)", "sq8", {}),
}
DEFAULT_INDEXES = ("flat", "hnsw", "ivf_pq", "sq8")
SEARCH_PARAM = {"hnsw": "efSearch", "ivf_pq": "nprobe"}
LATENCY_BUDGET = (2_000, 5.0)  # at most this many one-query calls per index, or this many seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embedding_tradeoff", description=__doc__)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--indexes", nargs="+", default=list(DEFAULT_INDEXES), choices=sorted(INDEXES))
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="training.seed(s); default: params"
    )
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--data-dir", type=Path, default=layout.DATA, help="holds training/ and features/")
    parser.add_argument("--workdir", type=Path, default=None, help="models and exports (default: a temp dir)")
    parser.add_argument("--reuse-models", action="store_true", help="keep models already in --workdir")
    parser.add_argument("--refit", action="store_true", help="keep training.refit (train + valid refit)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix=f"{NAME}-") as tmp:
            report = sweep(args, Path(tmp))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = sweep(args, args.workdir)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_results(report, args.results)
    print(markdown(report))
    return 0


def sweep(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train, export, index and measure every (seed, dim, index); summarise over seeds."""
    # one snapshot of --params for the whole sweep: every variant differs from it only where overridden
    params_file = workdir / "params.yaml"
    params_file.write_text(args.params.read_text())
    base = load_params(params_file)
    seeds = args.seeds or [base.training.seed]
    training_dir, features_dir = args.data_dir / "training", args.data_dir / "features"
    k, cfg = base.evaluation.headline_k, base.evaluation
    task = evaluate.retrieval_task(
        training_dir,
        training_data.read_split(training_dir, "ranking", "test"),
        item_catalogue(
            features_dir, training_data.test_start_of(training_dir), base.feast.ttl_days.item_stats
        ),
        [k],
        cfg.exclude_seen,
    )
    runs: list[dict[str, Any]] = []
    per_user: dict[tuple[int, str], list[np.ndarray]] = {}
    training: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for dim in args.dims:
            params = load_params(
                params_file,
                overrides={
                    "models.two_tower.embedding_dim": dim,
                    "training.seed": seed,
                    "training.refit": bool(args.refit and base.training.refit),
                },
            )
            model_dir = workdir / f"seed{seed}" / f"d{dim}"
            print(f"== seed {seed}, dim {dim}: training in {model_dir}", flush=True)
            fitted = train_model(params, training_dir, features_dir, model_dir, args.reuse_models)
            training.setdefault(str(dim), []).append(fitted | {"seed": seed})
            for row, users in measure_dim(model_dir, task, params.index, args.indexes, k, seed):
                runs.append(row | {"seed": seed, "dim": dim})
                per_user.setdefault((dim, row["index"]), []).append(users)
                print(f"  {json.dumps(row)}", flush=True)
    rows = summarise(runs, k)
    mean_per_user = {f"d{dim}/{name}": np.mean(v, axis=0) for (dim, name), v in per_user.items()}
    default = f"d{base.models.two_tower.embedding_dim}/flat"
    recommended = recommend(
        rows, mean_per_user, k, cfg.bootstrap_samples, cfg.confidence, seeds[0], default=default
    )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "faiss": faiss.__version__,
        "settings": {
            "dims": args.dims,
            "indexes": args.indexes,
            "seeds": seeds,
            "k": k,
            "refit": bool(args.refit and base.training.refit),
            "data_dir": str(args.data_dir),
            "test_users": len(task.users),
            "catalogue_items": len(task.catalogue),
            "exclude_seen": task.exclude is not None,
            "default_embedding_dim": base.models.two_tower.embedding_dim,
            "latency_queries_max": LATENCY_BUDGET[0],
        },
        "index_config": json.loads(base.index.model_dump_json()),
        "training": training,
        "runs": runs,
        "rows": rows,
        "pareto": {
            "bytes_per_item": [r["setting"] for r in rows if r["pareto_bytes"]],
            "p99_ms": [r["setting"] for r in rows if r["pareto_p99"]],
            "both": [r["setting"] for r in rows if r["pareto_joint"]],
        },
        "recommended": recommended,
    }


def train_model(
    params: Params, training_dir: Path, features_dir: Path, model_dir: Path, reuse: bool
) -> dict[str, Any]:
    """The train step, then the export step (its validation-user vectors tune the index) into
    ``model_dir``; with ``reuse``, a model already there is kept."""
    metrics = model_dir / "train.json"
    if not (reuse and metrics.exists()):
        train.run(
            "two_tower",
            STEPS["train"].scope(params),
            training_dir,
            model_dir,
            metrics,
            model_dir / "history.png",
        )
        export.run(
            STEPS["export"].scope(params),
            training_dir,
            model_dir,
            features_dir,
            model_dir / "export",
            model_dir / "export" / layout.POPULAR_ITEMS,
        )
    fitted = json.loads(metrics.read_text())
    keys = ("epochs", "best_epoch", "best_valid_metric", "train_seconds", "parameters", "refit")
    return {key: fitted.get(key) for key in keys}


def measure_dim(
    model_dir: Path,
    task: evaluate.RetrievalTask,
    config: IndexConfig,
    indexes: Sequence[str],
    k: int,
    seed: int,
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """One trained two-tower through every index: a row of measurements and each user's Recall@K."""
    from models import load_model, retrieval_metrics
    from models.metrics import per_user_retrieval_metrics

    model, encoder = load_model(model_dir)
    users = model.user_embeddings(encoder.encode(task.users, features=model.user_feature_names()))
    vectors = model.item_embeddings(encoder.encode(task.catalogue, features=model.item_feature_names()))
    queries = np.ascontiguousarray(users.float().cpu().numpy())
    # catalogue row numbers as ids: what the index returns is what the evaluate step ranks
    items = Embeddings(np.arange(len(vectors), dtype=np.int64), vectors.float().cpu().numpy(), str(model_dir))
    valid = bi.read_embeddings(
        model_dir / "export" / layout.QUERY_EMBEDDINGS, "user_ids", config.norm_tolerance
    )
    order = np.random.default_rng(seed).permutation(len(valid))
    tune_q = valid.vectors[order[: config.tune_queries]]
    exact = faiss.IndexFlatIP(items.dim)
    exact.add(items.vectors)
    tune_k, test_k = min(config.k, len(items)), min(k, len(items))
    exact_tune, exact_test = exact.search(tune_q, tune_k)[0], exact.search(queries, test_k)[0]
    evaluate_step = evaluate.model_retrieval_metrics(model_dir, task)[f"recall@{k}"]

    out = []
    for name in indexes:
        label, kind, overrides = INDEXES[name]
        index_config = config.model_copy(update={"k": tune_k, **overrides})
        t0 = time.perf_counter()
        index = build(items, kind, index_config, seed)
        build_seconds = time.perf_counter() - t0
        param, reached = tune(index, kind, items, tune_q, exact_tune, index_config)
        topk = index_topk(index, queries, test_k, task.exclude, len(items))
        found, _ = bi.search(index, queries, test_k)
        latency = latency_summary(single_query_seconds(index, queries, test_k, *LATENCY_BUDGET))
        row = {
            "index": name,
            "label": label,
            "search_param": None if param is None else {"name": SEARCH_PARAM[kind], "value": int(param)},
            "recall_target_reached": reached,
            f"recall@{k}": retrieval_metrics(topk, task.relevant, [k])[f"recall@{k}"],
            f"ann_recall@{k}": bi.recall_at_k(found, queries, items, exact_test),
            "bytes_per_item": bytes_per_item(index),
            **latency,
            "build_seconds": round(build_seconds, 3),
            f"evaluate_step_recall@{k}": evaluate_step,
        }
        out.append((row, per_user_retrieval_metrics(topk, task.relevant, [k])[f"recall@{k}"]))
    return out


def build(items: Embeddings, kind: str, config: IndexConfig, seed: int) -> faiss.Index:
    """The build step's index of ``kind``, or the int8 scalar-quantised one (``sq8``), which it lacks."""
    return build_sq8(items) if kind == "sq8" else bi.build_index(items, kind, config, seed)


def tune(
    index: faiss.Index,
    kind: str,
    items: Embeddings,
    queries: np.ndarray,
    exact_scores: np.ndarray,
    config: IndexConfig,
) -> tuple[int | None, bool]:
    """The build step's tuning of ``index`` (None for exact search) and whether it met the recall
    target; when it cannot, the index is left at the value of the best recall it measured."""
    ceiling = config.ef_search_max if kind == "hnsw" else None
    margin = config.tune_margin_sigmas
    try:
        return bi.tune_search_param(
            index, kind, items, queries, exact_scores, config.recall_target, ceiling, margin
        ).value, True
    except bi.RecallTargetError as err:
        curve = err.curve
    best = max(curve, key=curve.__getitem__)
    faiss.ParameterSpace().set_index_parameter(index, SEARCH_PARAM[kind], best)
    return best, False


def build_sq8(items: Embeddings) -> faiss.Index:
    """Inner-product exact scan over 8-bit scalar-quantised vectors (one byte per dimension, the per-
    dimension range trained on ``items``), under the item ids like the build step's indexes."""
    base = faiss.IndexScalarQuantizer(items.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    base.train(items.vectors)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(items.vectors, items.ids)
    return index


def index_topk(
    index: faiss.Index, queries: np.ndarray, k: int, exclude: ItemSets | None, pad: int
) -> np.ndarray:
    """Each query's top ``k`` item ids from ``index`` after its ``exclude`` items are dropped (the
    index is asked for k + that user's exclusions, as the evaluate step ranks the catalogue without
    them); a slot left empty holds ``pad`` (an id no user has as relevant)."""
    out = np.full((len(queries), k), pad, dtype=np.int64)
    sizes = np.zeros(len(queries), np.int64) if exclude is None else exclude.sizes()
    for extra in np.unique(sizes):
        rows = np.flatnonzero(sizes == extra)
        found, _ = bi.search(index, queries[rows], k + int(extra))
        drop = found < 0
        if exclude is not None and extra:
            width = np.int64(max(pad, int(found.max())) + 1)
            keys = rows[:, None] * width + found
            seen = np.concatenate(
                [r * width + exclude.items[exclude.offsets[r] : exclude.offsets[r + 1]] for r in rows]
            )
            drop |= np.isin(keys, seen)
        first = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept ids first, in rank order
        kept = np.take_along_axis(found, first, axis=1)
        width_k = kept.shape[1]
        out[rows, :width_k] = np.where(np.take_along_axis(drop, first, axis=1), pad, kept)
    return out


def bytes_per_item(index: faiss.Index) -> float:
    """Serialised index size (what serving loads) over the items it holds."""
    return round(int(faiss.serialize_index(index).nbytes) / max(int(index.ntotal), 1), 2)


def single_query_seconds(
    index: faiss.Index, queries: np.ndarray, k: int, limit: int, budget_s: float, warmup: int = 50
) -> np.ndarray:
    """Seconds of each one-query search on one thread (online serving), at most ``limit`` queries or
    ``budget_s`` seconds, after ``warmup`` untimed ones (first calls allocate: ms-long outliers that
    a serving process pays once); the thread count is restored afterwards."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for row in queries[:warmup]:
            index.search(row[None, :], k)
        times, started = [], time.perf_counter()
        for row in queries[:limit]:
            t0 = time.perf_counter()
            index.search(row[None, :], k)
            times.append(time.perf_counter() - t0)
            if t0 - started > budget_s:
                break
    finally:
        faiss.omp_set_num_threads(threads)
    return np.asarray(times)


def latency_summary(seconds: np.ndarray) -> dict[str, float]:
    """p50 / p99 in milliseconds (linear interpolation) and the number of timed queries."""
    p50, p99 = np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, [50, 99])
    return {"p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4), "latency_queries": len(seconds)}


def pareto_front(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` [n, m]: no other row is at least as good
    in every column (``maximize[j]``: larger is better) and strictly better in one."""
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    v = np.asarray(values, dtype=np.float64) * signs
    at_least = (v[:, None, :] >= v[None, :, :]).all(axis=2)  # [j, i]: j at least as good as i everywhere
    better = (v[:, None, :] > v[None, :, :]).any(axis=2)
    return ~(at_least & better).any(axis=0)


def summarise(runs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """One row per (dim, index): the mean over seeds of every measurement, and its Pareto flags."""
    metrics = (f"recall@{k}", f"ann_recall@{k}", "bytes_per_item", "p50_ms", "p99_ms", "build_seconds")
    rows = []
    for dim, name in dict.fromkeys((r["dim"], r["index"]) for r in runs):
        group = [r for r in runs if (r["dim"], r["index"]) == (dim, name)]
        rows.append(
            {
                "setting": f"d{dim}/{name}",
                "dim": dim,
                "index": name,
                "label": group[0]["label"],
                "search_param": group[0]["search_param"],
                "recall_target_reached": all(r["recall_target_reached"] for r in group),
                **{m: float(np.mean([r[m] for r in group])) for m in metrics},
                "seeds": len(group),
            }
        )
    recall = np.array([r[f"recall@{k}"] for r in rows])
    size = np.array([r["bytes_per_item"] for r in rows])
    p99 = np.array([r["p99_ms"] for r in rows])
    fronts = {
        "pareto_bytes": pareto_front(np.c_[recall, size], [True, False]),
        "pareto_p99": pareto_front(np.c_[recall, p99], [True, False]),
        "pareto_joint": pareto_front(np.c_[recall, size, p99], [True, False, False]),
    }
    for i, row in enumerate(rows):
        row.update({flag: bool(mask[i]) for flag, mask in fronts.items()})
    return rows


def recommend(
    rows: list[dict[str, Any]],
    per_user: dict[str, np.ndarray],
    k: int,
    samples: int,
    confidence: float,
    seed: int,
    default: str | None = None,
) -> dict[str, Any]:
    """Which settings' Recall@K is not below the best setting's (the upper end of the paired bootstrap
    interval over users, as the evaluate step's intervals, of the difference to the best reaches 0); of
    those, the smallest dimension with the exact index (the recommended ``embedding_dim``) and the
    setting with the fewest bytes per item, then the lowest p99. ``default`` (a setting): every setting's
    paired difference to it too."""
    from models.bootstrap import user_mean_intervals

    metric = f"recall@{k}"
    best = max(rows, key=lambda r: r[metric])["setting"]
    intervals = user_mean_intervals(per_user, best, samples=samples, confidence=confidence, seed=seed)
    zero = {"value": 0.0, "low": 0.0, "high": 0.0}
    diff = intervals[f"difference_to_{best}"] | {best: zero}
    to_default = None
    if default in per_user:
        to_default = user_mean_intervals(
            per_user, default, samples=samples, confidence=confidence, seed=seed
        )[f"difference_to_{default}"] | {default: zero}
    tied = [r for r in rows if diff[r["setting"]]["high"] >= 0]
    chosen = min(tied, key=lambda r: (r["bytes_per_item"], r["p99_ms"], -r[metric]))
    flat = [r["dim"] for r in tied if r["index"] == "flat"]
    return {
        "embedding_dim": min(flat) if flat else chosen["dim"],  # the params.yaml decision, exact index
        "setting": chosen["setting"],  # the cheapest (dim, index) not worse than the best
        "best_setting": best,
        "tied_with_best": [r["setting"] for r in tied],
        "difference_to_best": diff,
        "default_setting": default if to_default is not None else None,
        "difference_to_default": to_default,
        "confidence": confidence,
        "bootstrap_samples": samples,
    }


def write_results(report: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / f"{NAME}.md").write_text(markdown(report))
    plot(report, results / f"{NAME}.png")


def plot(report: dict[str, Any], path: Path) -> None:
    """Recall@K against bytes per item (left) and p99 latency (right); Pareto-optimal points ringed and
    joined by the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows, k = report["rows"], report["settings"]["k"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = dict(zip(INDEXES, plt.get_cmap("tab10").colors, strict=False))
    for ax, x_key, flag, x_label in (
        (axes[0], "bytes_per_item", "pareto_bytes", "bytes per item (serialised index / items)"),
        (axes[1], "p99_ms", "pareto_p99", "p99 latency, 1 query, 1 thread (ms)"),
    ):
        for name in dict.fromkeys(r["index"] for r in rows):
            group = [r for r in rows if r["index"] == name]
            ax.scatter(
                [r[x_key] for r in group],
                [r[f"recall@{k}"] for r in group],
                color=colours[name],
                label=INDEXES[name][0],
                s=30,
            )
            for r in group:
                ax.annotate(
                    str(r["dim"]),
                    (r[x_key], r[f"recall@{k}"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        front = sorted((r for r in rows if r[flag]), key=lambda r: r[x_key])
        ax.plot(
            [r[x_key] for r in front],
            [r[f"recall@{k}"] for r in front],
            "k--",
            lw=0.8,
            drawstyle="steps-post",
        )
        ax.scatter(
            [r[x_key] for r in front],
            [r[f"recall@{k}"] for r in front],
            s=140,
            facecolors="none",
            edgecolors="k",
            label="Pareto-optimal",
        )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"test Recall@{k} through the index")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Two-tower output dim (labels) x index: Recall@{k} vs cost ({report['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    s, rec, k = report["settings"], report["recommended"], report["settings"]["k"]
    rows = {r["setting"]: r for r in report["rows"]}
    best = rows[rec["best_setting"]]
    default = rows.get(f"d{s['default_embedding_dim']}/flat")
    lines = [
        "# Two-tower embedding size x ANN index: quality, bytes, latency",
        "",
        f"`python -m benchmarks.embedding_tradeoff`; machine: {report['machine']}; faiss {report['faiss']}; "
        f"wall {report.get('wall_seconds', 0) / 60:.1f} min. The two-tower trained by the train step with "
        f"params.yaml except `models.two_tower.embedding_dim`, seed(s) {s['seeds']}, "
        + (
            "`training.refit` on"
            if s["refit"]
            else "`training.refit` off (train split only, to save time: "
            "absolute recalls sit below metrics/evaluation.json's refitted model)"
        )
        + f". Recall@{k}: the evaluate step's test users ({s['test_users']:,}) and full catalogue "
        f"({s['catalogue_items']:,} items), seen items excluded, through the index. ANN recall: vs exact "
        "search, same queries. HNSW efSearch / IVF nprobe tuned by `components.build_index` to "
        f"recall@{report['index_config']['k']} >= {report['index_config']['recall_target']} on validation "
        "users (IVF-PQ codes only cannot reach it: its best nprobe). SQ8 = faiss `ScalarQuantizer.QT_8bit` "
        "(built here, the build step has no such type). Latency: one query per call, one thread, on a "
        "shared 2-core machine (read to ~10-20%).",
        "",
        f"| dim | index | search param | Recall@{k} | ANN recall@{k} | bytes/item | p50 ms | p99 ms | "
        "build s | Pareto (bytes / p99) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        front = " / ".join("yes" if r[f] else "no" for f in ("pareto_bytes", "pareto_p99"))
        lines.append(
            f"| {r['dim']} | {r['label']} | {_param_cell(r)} | {r[f'recall@{k}']:.4f} | "
            f"{r[f'ann_recall@{k}']:.4f} | {r['bytes_per_item']:,.0f} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['build_seconds']:.2f} | {front} |"
        )
    pareto = report["pareto"]
    lines += [
        "",
        f"Pareto front, Recall@{k} vs bytes/item: {', '.join(pareto['bytes_per_item'])}. "
        f"Vs p99 latency: {', '.join(pareto['p99_ms'])}. "
        f"On both (3 objectives): {', '.join(pareto['both'])}. At {s['catalogue_items']:,} items every "
        f"p99 is <= {max(r['p99_ms'] for r in report['rows']):.2f} ms on one thread, within the machine's "
        f"noise, so latency hardly separates the settings here; Recall@{k} and bytes/item (which grow with "
        "the catalogue) do.",
        "",
        f"Best Recall@{k}: {best['setting']} ({best[f'recall@{k}']:.4f}, {best['bytes_per_item']:,.0f} "
        f'bytes/item). "Not worse" below: the {rec["confidence"]:.0%} paired bootstrap interval over users '
        f"({rec['bootstrap_samples']} resamples, as the evaluate step's) of the difference to the best "
        "reaches 0.",
        "",
    ]
    exact = rows.get(f"d{rec['embedding_dim']}/flat")
    if exact is not None:
        lines.append(
            f"**Recommended default: `models.two_tower.embedding_dim: {rec['embedding_dim']}`** with the "
            f"exact index (`index.type: auto` picks Flat below {report['index_config']['flat_max_items']:,} "
            f"items): the smallest dimension not worse than the best: {_versus(exact, rec, k)}."
        )
    if default is not None:
        verdict = "not worse than the best" if default["setting"] in rec["tied_with_best"] else "worse"
        lines.append(
            f"The current default, {s['default_embedding_dim']} (Flat): {_versus(default, rec, k)}: "
            f"{verdict}."
        )
    to_default = rec.get("difference_to_default") or {}
    if exact is not None and default is not None and exact is not default and exact["setting"] in to_default:
        d = to_default[exact["setting"]]
        lines.append(
            f"Switching {s['default_embedding_dim']} -> {rec['embedding_dim']}: Recall@{k} {d['value']:+.4f} "
            f"([{d['low']:+.4f}, {d['high']:+.4f}], paired), bytes/item x"
            f"{exact['bytes_per_item'] / default['bytes_per_item']:.2f}, p99 x"
            f"{exact['p99_ms'] / default['p99_ms']:.2f}. One training seed: the seed-to-seed spread is not "
            "in these intervals (`--seeds 42 43 44` for more)."
        )
    cheapest = rows[rec["setting"]]
    lines += [
        "",
        f"Cheapest setting not worse than the best: {cheapest['setting']} ({cheapest['label']}): "
        f"{_versus(cheapest, rec, k)}"
        + (
            "; SQ8 is not an `index.type` of components/build_index.py yet, so it would have to be added "
            "there first."
            if cheapest["index"] == "sq8"
            else "."
        ),
    ]
    hnsw = [(r, rows.get(f"d{r['dim']}/flat")) for r in report["rows"] if r["index"] == "hnsw"]
    hnsw = [(r, f) for r, f in hnsw if f is not None]
    if hnsw:
        ann = [r[f"ann_recall@{k}"] for r, _ in hnsw]
        loss = [f[f"recall@{k}"] - r[f"recall@{k}"] for r, f in hnsw]
        lines += [
            "",
            f"Note: HNSW tuned as the build step tunes it (recall@{report['index_config']['k']} >= "
            f"{report['index_config']['recall_target']}) finds only {min(ann):.2f}-{max(ann):.2f} of the "
            f"exact top {k} and loses {min(loss):.4f}-{max(loss):.4f} Recall@{k} against Flat at the same "
            f"dim: tuning at `index.k` = {report['index_config']['k']} under-serves a top-{k} (or "
            "`serving.retrieve_k`) retrieval.",
        ]
    return "\n".join(lines) + "\n"


def _param_cell(row: dict[str, Any]) -> str:
    param = row["search_param"]
    text = f"{param['name']}={param['value']}" if param else "-"
    return text if row["recall_target_reached"] else f"{text} (target unreachable)"


def _versus(row: dict[str, Any], rec: dict[str, Any], k: int) -> str:
    diff = rec["difference_to_best"][row["setting"]]
    return (
        f"Recall@{k} {row[f'recall@{k}']:.4f} (vs best {diff['value']:+.4f}, "
        f"[{diff['low']:+.4f}, {diff['high']:+.4f}]), {row['bytes_per_item']:,.0f} bytes/item, "
        f"p99 {row['p99_ms']:.3f} ms"
    )


if __name__ == "__main__":
    raise SystemExit(main())
