"""Streaming vs in-memory training input (``training.loader``): throughput, AUC and peak RSS, on CPU.

One ranking training set (``benchmarks.train_throughput.make_training_frame``, with a learnable label:
1 when the item's category is in the user's category history, 5% flipped) is written as Parquet with
small row groups at two sizes: ``--rows`` and ``--scale`` times as many (the same rows replicated, so the
encoder fitted on the base rows is the encoder of both). For each size, one model (MultiTower as
``params.yaml`` configures it) trains ``--epochs`` epoch(s) with the same seed through each path, each
run in a fresh subprocess:

- **memory**: ``pd.read_parquet`` + ``FeatureEncoder.encode`` of the whole split, then the trainer's
  permutation slices;
- **stream**: ``models.streaming``: row groups shuffled per epoch, read, encoded and shuffled in a
  bounded buffer by ``training.loader.workers`` DataLoader worker(s).

Reported per run: the trainer's samples/s (the training loop; the stream's includes its reading and
encoding, done concurrently by the worker), end-to-end samples/s (plus the memory path's one-off read and
encode), validation AUC (a separate generated split, in memory) and peak RSS: ``ru_maxrss`` of the run's
process and of its largest child (a DataLoader worker). Run: ``python -m benchmarks.streaming_loader``;
writes ``benchmarks/results/streaming_loader.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from benchmarks.child_runs import add_child_option, child_or_parent, cpu_run_header, peak_rss_mib, run_child
from benchmarks.train_throughput import PARAMS_FILE, RESULTS_DIR, make_training_frame

KIND = "multi_tower"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the base training set")
    parser.add_argument("--scale", type=int, default=10, help="the larger set replicates the base this often")
    parser.add_argument("--row-group", type=int, default=16_384, help="Parquet row-group size")
    parser.add_argument("--valid-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per path and size (averaged)")
    parser.add_argument("--workers", type=int, default=1, help="training.loader.workers of the stream runs")
    parser.add_argument(
        "--prepare-rows", type=int, default=None, help="training.loader.prepare_rows (default: params.yaml's)"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the models and training config")
    add_child_option(parser)
    args = parser.parse_args(argv)
    return child_or_parent(args, "streaming_loader", child_run, run, markdown_table)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the sets, then train each (size, path) in a subprocess; returns the JSON-able results."""
    from models.encoding import FeatureEncoder
    from recsys.config import load_params

    params = load_params(args.params)
    args.prepare_rows = args.prepare_rows or params.training.loader.prepare_rows
    sizes = {"1x": 1, f"{args.scale}x": args.scale}
    seeds = args.seeds
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="streaming_loader_") as tmp:
        tmp_dir = Path(tmp)
        base = pa.Table.from_pandas(learnable_frame(args.rows, seed=0), preserve_index=False)
        encoder = FeatureEncoder.fit(params.models.features, base)
        (tmp_dir / "encoder.json").write_text(json.dumps(encoder.to_dict()))
        pq.write_table(
            pa.Table.from_pandas(learnable_frame(args.valid_rows, seed=1), preserve_index=False),
            tmp_dir / "valid.parquet",
        )
        for name, times in sizes.items():
            path = tmp_dir / f"train_{name}.parquet"
            with pq.ParquetWriter(path, base.schema) as writer:
                for _ in range(times):
                    writer.write_table(base, row_group_size=args.row_group)
            for offset in range(seeds):  # the two paths alternate: a shared machine's noise hits both
                for mode in ("memory", "stream"):
                    spec = {
                        "train": str(path),
                        "valid": str(tmp_dir / "valid.parquet"),
                        "encoder": str(tmp_dir / "encoder.json"),
                        "params": str(args.params),
                        "mode": mode,
                        "epochs": args.epochs,
                        "workers": args.workers,
                        "prepare_rows": args.prepare_rows,
                        "seed_offset": offset,
                    }
                    result = run_child("benchmarks.streaming_loader", spec)
                    runs.setdefault(f"{name} {mode}", []).append(result)
                    print(f"{name} {mode} seed+{offset}: {result}", flush=True)
            path.unlink()
    per_size = {}
    for name, times in sizes.items():
        memory, stream = (_summary(runs[f"{name} {mode}"]) for mode in ("memory", "stream"))
        per_size[name] = {
            "train_rows": args.rows * times,
            "memory": memory,
            "stream": stream,
            "throughput_ratio": round(stream["samples_per_s"] / memory["samples_per_s"], 3),
            "end_to_end_ratio": round(
                stream["end_to_end_samples_per_s"] / memory["end_to_end_samples_per_s"], 3
            ),
            "auc_diff": round(stream["valid_auc"] - memory["valid_auc"], 4),
            # how far apart two seeds of the same path land: the scale the difference is read against
            "memory_auc_seed_range": round(max(memory["valid_aucs"]) - min(memory["valid_aucs"]), 4),
        }
    return {
        **cpu_run_header("streaming_loader", KIND, args),
        "seeds": args.seeds,
        "stream_workers": args.workers,
        "prepare_rows": args.prepare_rows,
        "sizes": per_size,
    }


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run (this process's peak RSS is the run's): the split through ``spec['mode']``."""
    from models.encoding import FeatureEncoder
    from models.registry import build_model
    from models.trainer import fit, train_input
    from recsys.config import load_params

    params = load_params(spec["params"])
    training = params.training.for_model(KIND)
    loader = training.loader.model_copy(
        update={"mode": spec["mode"], "workers": spec["workers"], "prepare_rows": spec["prepare_rows"]}
    )
    training = training.model_copy(
        update={"loader": loader, "epochs": spec["epochs"], "device": "cpu", "patience": 0}
        | {"seed": training.seed + spec["seed_offset"]}
    )
    encoder = FeatureEncoder.from_dict(json.loads(Path(spec["encoder"]).read_text()))
    valid = encoder.encode(pd.read_parquet(spec["valid"]))
    torch.manual_seed(0)
    model = build_model(KIND, params.models.model(KIND), encoder)
    started = time.perf_counter()
    train = train_input(spec["train"], encoder, training)
    prepared = time.perf_counter() - started
    history = fit(model, train, valid, training, progress=False).history
    del train
    trained = sum(row["train_seconds"] for row in history)
    rows = pq.ParquetFile(spec["train"]).metadata.num_rows * len(history)
    return {
        "samples_per_s": round(rows / trained),
        "end_to_end_samples_per_s": round(rows / (prepared + trained)),
        "input_seconds": round(prepared, 2),
        "valid_auc": round(history[-1]["valid_auc"], 4),
        **peak_rss_mib(),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's runs over the seeds: mean speeds and AUC, the highest peak RSS."""
    return {
        "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in runs]))),
        "end_to_end_samples_per_s": round(float(np.mean([r["end_to_end_samples_per_s"] for r in runs]))),
        "valid_auc": round(float(np.mean([r["valid_auc"] for r in runs])), 4),
        "valid_aucs": [r["valid_auc"] for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in runs),
    }


def learnable_frame(rows: int, seed: int) -> pd.DataFrame:
    """``make_training_frame`` with a label the models can learn: the item's category appears in the
    user's category history (5% of labels flipped)."""
    frame = make_training_frame(rows, seed=seed)
    history = pa.array(frame["hist_categories"])
    row_of = pc.list_parent_indices(history).to_numpy()
    hit = pc.equal(pc.list_flatten(history), pa.array(frame["category"].to_numpy()[row_of])).to_numpy(
        zero_copy_only=False
    )
    match = np.zeros(rows, dtype=bool)
    match[row_of[hit]] = True
    noise = np.random.default_rng(seed + 7).random(rows) < 0.05
    frame["label"] = (match ^ noise).astype(np.int64)
    return frame


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "# Streaming vs in-memory training input (CPU)",
        "",
        f"{results['model']} as `params.yaml` configures it, {results['epochs']} epoch(s), means over "
        f"{results['seeds']} training seeds (the shipped one and the next); "
        f"training sets of {results['base_rows']:,} generated rows and that replicated, Parquet row "
        f"groups of {results['row_group_rows']:,}; stream: {results['stream_workers']} DataLoader worker(s), "
        f"prepare_rows {results['prepare_rows']:,}. torch {results['torch']}, {results['cpu']} "
        f"({results['cpu_count']} cores, shared). Each run in its own process; validation AUC on "
        f"{results['valid_rows']:,} separate rows.",
        "",
        "| rows | path | train samples/s | end-to-end samples/s | mean valid AUC | peak RSS (MiB) "
        "| worker peak RSS (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"].values():
        for mode in ("memory", "stream"):
            r = size[mode]
            lines.append(
                f"| {size['train_rows']:,} | {mode} | {r['samples_per_s']:,} "
                f"| {r['end_to_end_samples_per_s']:,} | {r['valid_auc']:.4f} | {r['peak_rss_mib']:,} "
                f"| {r['worker_peak_rss_mib']:,} |"
            )
    lines += [
        "",
        "| rows | stream / memory samples/s | end-to-end ratio | AUC stream - memory "
        "| memory AUC range over seeds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size in results["sizes"].values():
        lines.append(
            f"| {size['train_rows']:,} | {size['throughput_ratio']} | {size['end_to_end_ratio']} "
            f"| {size['auc_diff']:+.4f} | {size['memory_auc_seed_range']:.4f} |"
        )
    lines += [
        "",
        "The memory path's samples/s is its training loop only (slices of tensors already encoded); its "
        "one-off read + encode is in the end-to-end figure. The stream's loop includes reading and encoding, "
        "done by the worker process alongside training. Worker RSS is the largest child process's peak "
        "(it shares the parent's pages at fork). The stream's peak grows with the rows only up to "
        "`prepare_rows` (the sample the model's one-off `prepare` sees: all rows of the small set, "
        "`prepare_rows` of the large one) and not beyond. Samples/s on a shared 2-core machine vary by "
        "tens of percent between runs of the same path; the AUC range over seeds is the scale for the AUC "
        "difference.",
        "",
        "Regenerate: `python -m benchmarks.streaming_loader` (see its docstring for the method).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
