"""The whole train step's peak RSS and seconds, streaming vs in-memory input, as the rows grow (CPU).

``python -m components.train --model multi_tower`` as DVC runs it (fit the encoder, train with early
stopping on the validation split, refit on train + valid, save), each run in its own process, on
training sets of ``--rows`` generated rows replicated to each ``--sizes`` multiple (the same learnable
rows as benchmarks/streaming_loader.py, Parquet row groups of ``--row-group``) and one validation set of
``--valid-rows`` separate rows (the same for every size: what grows is the training split).

- **memory**: ``training.loader.mode: memory``: the split read into pandas, the encoder fitted on it,
  encoded whole; the refit concatenates train + valid;
- **stream**: ``mode: stream``: the encoder fitted one row group at a time, the split streamed by
  ``training.loader.workers`` DataLoader worker(s), the refit streaming both files.

Peak RSS is ``ru_maxrss`` of the step's process and, separately, of its largest child (a DataLoader
worker). A size whose in-memory run would not fit next to the other processes on this machine is skipped
with ``--memory-up-to``. Run: ``python -m benchmarks.train_step_memory``; writes
``benchmarks/results/train_step_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.child_runs import add_child_option, child_or_parent, cpu_run_header, peak_rss_mib, run_child
from benchmarks.streaming_loader import learnable_frame
from benchmarks.train_throughput import PARAMS_FILE, RESULTS_DIR

KIND = "multi_tower"
TASK = "ranking"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the base training set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10], help="multiples of --rows")
    parser.add_argument("--memory-up-to", type=int, default=10, help="largest multiple run in memory too")
    parser.add_argument("--row-group", type=int, default=16_384)
    parser.add_argument("--valid-rows", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    add_child_option(parser)
    args = parser.parse_args(argv)
    return child_or_parent(args, "train_step_memory", child_run, run, markdown_table)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Write the sets and a params file per mode, then run the step once per (size, mode)."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train_step_memory_") as tmp:
        tmp_dir = Path(tmp)
        base = pa.Table.from_pandas(learnable_frame(args.rows, seed=0), preserve_index=False)
        valid = pa.Table.from_pandas(learnable_frame(args.valid_rows, seed=1), preserve_index=False)
        params_files = {mode: _params_file(args, mode, tmp_dir) for mode in ("memory", "stream")}
        for times in sorted(args.sizes):
            data_dir = tmp_dir / f"x{times}"
            data_dir.mkdir()
            pq.write_table(valid, data_dir / f"{TASK}_valid.parquet", row_group_size=args.row_group)
            with pq.ParquetWriter(data_dir / f"{TASK}_train.parquet", base.schema) as writer:
                for _ in range(times):
                    writer.write_table(base, row_group_size=args.row_group)
            modes = ["stream", "memory"] if times <= args.memory_up_to else ["stream"]
            for mode in modes:
                spec = {"params": str(params_files[mode]), "data": str(data_dir), "out": str(tmp_dir / mode)}
                result = run_child("benchmarks.train_step_memory", spec)
                result |= {"train_rows": args.rows * times, "mode": mode}
                runs.append(result)
                print(result, flush=True)
            for path in data_dir.iterdir():
                path.unlink()
    return {
        **cpu_run_header("train_step_memory", KIND, args),
        "refit": args.refit,
        "runs": runs,
    }


def _params_file(args: argparse.Namespace, mode: str, tmp_dir: Path) -> Path:
    """The train step's sections of ``--params`` with this run's loader mode, epochs and refit."""
    params = yaml.safe_load(args.params.read_text())
    training = params["training"]
    training.update({"epochs": args.epochs, "refit": args.refit, "device": "cpu", "patience": 0})
    training["loader"]["mode"] = mode
    training["per_model"] = {}
    path = tmp_dir / f"params_{mode}.yaml"
    path.write_text(yaml.safe_dump({k: params[k] for k in ("pipeline", "models", "training")}))
    return path


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """The step's ``main`` in this fresh process: its peak RSS is the step's."""
    from components import train

    out = Path(spec["out"])
    started = time.perf_counter()
    paths = {"--model-dir": out / "model", "--metrics": out / "metrics.json", "--plot": out / "curves.png"}
    argv = ["--model", KIND, "--params", spec["params"], "--training-dir", spec["data"]]
    train.main(argv + [str(x) for item in paths.items() for x in item])
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    history = pd.read_csv(out / "model" / "history.csv")
    return {
        "seconds": round(seconds, 1),
        "train_seconds": metrics["train_seconds"],
        "refit_seconds": (metrics["refit"] or {}).get("seconds"),
        "train_samples_per_s": metrics["train_samples_per_s"],
        "valid_auc": round(float(history["valid_auc"].iloc[-1]), 4),
        **peak_rss_mib(),
    }


def markdown_table(results: dict[str, Any]) -> str:
    refit = "then the refit on train + valid" if results["refit"] else "no refit"
    lines = [
        "# The train step's peak RSS as the training rows grow (CPU)",
        "",
        f"`python -m components.train --model {results['model']}`, {results['epochs']} epoch(s), {refit}; "
        f"training sets of {results['base_rows']:,} generated rows replicated, Parquet row groups of "
        f"{results['row_group_rows']:,}, validation {results['valid_rows']:,} separate rows. torch "
        f"{results['torch']}, {results['cpu']} ({results['cpu_count']} cores, shared with other jobs). "
        "Each run in its own process.",
        "",
        "| train rows | loader | step seconds | train samples/s | valid AUC | peak RSS (MiB) "
        "| worker peak RSS (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['train_rows']:,} | {r['mode']} | {r['seconds']:,} | {r['train_samples_per_s']:,} "
            f"| {r['valid_auc']:.4f} | {r['peak_rss_mib']:,} | {r['worker_peak_rss_mib']:,} |"
        )
    note = (
        "Step seconds include the encoder fit, the training epoch(s), validation, the refit and saving. "
        "Worker RSS is the largest child process's peak (a DataLoader worker; it shares the parent's "
        "pages at fork). The stream's peak still holds the validation split encoded in memory and the "
        "`prepare_rows` sample; neither grows with the training rows here."
    )
    regenerate = "Regenerate: `python -m benchmarks.train_step_memory` (see its docstring for the method)."
    return "\n".join([*lines, "", note, "", regenerate, ""])


if __name__ == "__main__":
    raise SystemExit(main())
