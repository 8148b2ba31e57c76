"""Training throughput: the models package's trainer vs a seed-style per-row DataLoader, on CPU.

Both paths train the same model (each kind as ``params.yaml`` configures it) with the same optimizer and
batch size on the same generated frame, in the same process:

- **trainer**: ``FeatureEncoder.encode`` turns the frame into tensors once (vectorised), then
  ``models.trainer.fit`` slices a random permutation of them for each batch;
- **reference**: a ``torch.utils.data.Dataset`` (tests/models/row_reference.py, the per-row oracle the
  encoder's test checks) whose ``__getitem__`` builds one row's tensors in Python
  (vocabulary dict lookups, history padding, dense normalisation) and a default ``DataLoader`` that
  collates them, the way a first version of a recommender training script usually looks. It builds the
  exact tensors the encoder builds (checked before timing), so only the input path differs.

Reported: steady-state training samples/s of each (the trainer's figure excludes the one-off encoding,
which is reported separately and folded into an end-to-end figure), best of ``--repeats`` alternating
runs because other work on a shared machine can only slow a run down. The reference is timed on a
fixed number of batches to bound the runtime. Run: ``python -m benchmarks.train_throughput``; writes
``benchmarks/results/train_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from models.batch import LABEL_KEY
from models.config import TrainingConfig
from models.encoding import FeatureEncoder
from models.registry import MODEL_KINDS, build_model, model_class
from models.trainer import TrainingObjective, fit
from recsys.config import load_params
from tests.models.row_reference import RowDataset

RESULTS_DIR = Path(__file__).parent / "results"
PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=131_072, help="rows of the generated training frame")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--reference-batches", type=int, default=32, help="batches timed on the reference path"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both paths")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per path; the best counts")
    parser.add_argument("--models", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the models and training config")
    args = parser.parse_args(argv)

    results = run(
        args.rows,
        args.batch_size,
        args.reference_batches,
        args.threads,
        args.models,
        args.repeats,
        args.params,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "train_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / "train_throughput.md").write_text(markdown_table(results))
    print(markdown_table(results))
    return 0


def run(
    rows: int,
    batch_size: int,
    reference_batches: int,
    threads: int,
    kinds: list[str],
    repeats: int = 2,
    params_path: Path = PARAMS_FILE,
) -> dict[str, Any]:
    """Measure every model kind on one generated frame; returns the JSON-able results."""
    torch.set_num_threads(threads)
    params = load_params(params_path)
    config = params.models
    frame = make_training_frame(rows, seed=0)
    started = time.perf_counter()
    encoder = FeatureEncoder.fit(config.features, frame)
    train = encoder.encode(frame)
    encode_seconds = time.perf_counter() - started
    reference_data = RowDataset(frame, encoder)
    _check_same_tensors(reference_data, train)

    per_model = {}
    for kind in kinds:
        ours, reference = 0.0, 0.0
        for _ in range(repeats):  # alternate the two paths; best of each (a shared machine only slows down)
            torch.manual_seed(0)
            model = build_model(
                kind, config.model(kind), encoder, **model_class(kind).fitted_inputs(encoder, frame)
            )
            timed = {"epochs": 1, "batch_size": batch_size, "device": "cpu", "patience": 0, "seed": 0}
            training = TrainingConfig.model_validate(
                params.training.for_model(kind).model_dump() | timed | {"num_workers": threads}
            )
            history = fit(model, train, None, training, progress=False).history
            ours = max(ours, history[0]["samples_per_second"])
            torch.manual_seed(0)
            model = build_model(
                kind, config.model(kind), encoder, **model_class(kind).fitted_inputs(encoder, frame)
            )
            reference = max(
                reference, reference_samples_per_second(model, reference_data, batch_size, reference_batches)
            )
        per_model[kind] = {
            "trainer_samples_per_s": round(ours),
            "reference_samples_per_s": round(reference),
            "speedup": round(ours / reference, 1),
            "trainer_end_to_end_samples_per_s": round(rows / (encode_seconds + rows / ours)),
        }
        print(f"{kind}: {per_model[kind]}", flush=True)
    return {
        "benchmark": "train_throughput",
        "device": "cpu",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads,
        "rows": rows,
        "batch_size": batch_size,
        "reference_batches_timed": reference_batches,
        "repeats_best_of": repeats,
        "encode_seconds": round(encode_seconds, 3),
        "models": per_model,
    }


def reference_samples_per_second(
    model: torch.nn.Module, data: Dataset, batch_size: int, batches: int
) -> float:
    """Train through a default DataLoader over the per-row Dataset; samples/s over ``batches`` steps
    after one warm-up step."""
    objective = TrainingObjective(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = 0
    started = 0.0
    for step, batch in enumerate(loader):
        if step == 1:
            started, seen = time.perf_counter(), 0
        loss = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(batch[LABEL_KEY])
        if step == batches:
            break
    return seen / (time.perf_counter() - started)


def make_training_frame(
    n_rows: int, seed: int = 0, n_users: int = 20_000, n_items: int = 5_000
) -> pd.DataFrame:
    """A ranking training set with every column of the data contract (vectorised generation)."""
    rng = np.random.default_rng(seed)
    n_categories, history_length = 24, 30
    item_category = rng.integers(0, n_categories, n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    item_ids = rng.choice(n_items, n_rows, p=popularity / popularity.sum())
    lengths = rng.integers(0, history_length + 1, n_rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = rng.choice(n_items, int(lengths.sum()), p=popularity / popularity.sum())
    categories = np.array([f"c{c}" for c in range(n_categories)], dtype=object)
    frame = pd.DataFrame(
        {
            "row_id": np.arange(n_rows, dtype=np.int64),
            "user_id": rng.integers(0, n_users, n_rows).astype(np.int64),
            "item_id": item_ids.astype(np.int64),
            "gender": rng.choice(np.array(["F", "M", ""], dtype=object), n_rows),
            "age_bucket": rng.choice([1, 18, 25, 35, 45, 50, 56], n_rows).astype(np.int64),
            "occupation": rng.choice(np.array([f"o{i}" for i in range(21)], dtype=object), n_rows),
            "zip_prefix": rng.choice(np.array([f"{i:03d}" for i in range(300)], dtype=object), n_rows),
            "category": categories[item_category[item_ids]],
            "brand": np.array([f"b{i % 60}" for i in range(n_items)], dtype=object)[item_ids],
            "price": rng.gamma(2.0, 25.0, n_rows),
            "hist_item_ids": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(flat, pa.int64())
            ).to_pandas(),
            "hist_categories": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(categories[item_category[flat]])
            ).to_pandas(),
            "hist_length": lengths.astype(np.int64),
            "label": (rng.random(n_rows) < 0.1).astype(np.int64),
        }
    )
    for prefix in ("user", "item"):
        for days in (7, 30):
            impressions = rng.poisson(days, n_rows)
            clicks = rng.binomial(impressions, 0.1)
            frame[f"{prefix}_impressions_{days}d"] = impressions
            frame[f"{prefix}_clicks_{days}d"] = clicks
            frame[f"{prefix}_ctr_{days}d"] = clicks / np.maximum(impressions, 1)
    return frame


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "# Training throughput (CPU)",
        "",
        f"{results['rows']} rows, batch {results['batch_size']}, {results['threads']} torch thread(s), "
        f"torch {results['torch']}, {results['cpu']} ({results['cpu_count']} cores, shared); default "
        "`params.yaml` model configs. "
        f"One-off vectorised encoding of the frame: {results['encode_seconds']} s.",
        "",
        "| model | trainer samples/s | reference samples/s (per-row Dataset + DataLoader) | speedup "
        "| trainer incl. encoding |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, r in results["models"].items():
        lines.append(
            f"| {kind} | {r['trainer_samples_per_s']:,} | {r['reference_samples_per_s']:,} | {r['speedup']}x "
            f"| {r['trainer_end_to_end_samples_per_s']:,} |"
        )
    lines += [
        "",
        "The speedup is (model step + per-row input) / (model step + slicing): it is largest where the "
        "model itself is cheap (DLRM, MultiTower) and smallest where its own compute dominates (DIN "
        "attention over every history position, the two-tower's B x B in-batch softmax).",
        "",
        "Regenerate: `python -m benchmarks.train_throughput` (see its docstring for the method).",
        "",
    ]
    return "\n".join(lines)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _check_same_tensors(data: RowDataset, encoded: dict[str, torch.Tensor]) -> None:
    """The reference must feed the model exactly what the encoder does, or the comparison is moot."""
    rows = [0, 1, len(data) // 2, len(data) - 1]
    collated = torch.utils.data.default_collate([data[i] for i in rows])
    for key, value in collated.items():
        expected = encoded[key][rows]
        if not torch.allclose(value.to(expected.dtype), expected, atol=1e-5):
            raise AssertionError(
                f"reference path builds different '{key}' tensors than FeatureEncoder.encode"
            )


if __name__ == "__main__":
    raise SystemExit(main())
