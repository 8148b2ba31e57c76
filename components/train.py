"""Train step: one registered model (models/registry.py) on the point-in-time sets.

A model learns from its task's training set: the two-tower from positive events (``retrieval_*``), the
rankers from every impression (``ranking_*``). The feature encoder is fitted on the rows the model
learns from and saved with the weights, so validation, test and serving see exactly the vocabularies and
normalisation the model was trained with.

With ``training.refit`` (the default) the epochs are chosen by early stopping on the validation split,
then the model is trained afresh on train + validation for that many epochs, and that model is saved:
the deployed model knows the most recent window, and the test window stays unseen.

When ``training.loader`` streams a split (models/streaming.py), no frame of its rows is built: the
encoder is fitted one Parquet row group at a time (the same encoder as the in-memory fit), batches come
from the row groups, and the refit streams the train and valid files as one split. Validation is read
with only the encoded columns and kept in memory.

Several ``--model`` values train side by side, ``--jobs`` at a time, each in its own process (the local
DAG's one ``train`` stage; Kubeflow runs one task per model instead).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pandas as pd

from models.registry import TASK_OF
from models.streaming import choose_mode, parquet_rows
from recsys import artifact_layout as layout
from recsys.artifact_io import staged_path, write_json
from recsys.gpu_pods import GpuUnavailableError, require_gpus  # noqa: F401  (the CLI checks; tests use it)
from recsys.step_contract import STEPS, StepParams

CONTRACT = STEPS["train"]

log = logging.getLogger(__name__)


def run(
    kind: str,
    params: StepParams,
    training_dir: str | Path,
    model_dir: str | Path,
    metrics_file: str | Path,
    plot_file: str | Path,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit model ``kind``; writes ``model.safetensors``, ``config.json``, ``history.csv`` and its metrics."""
    import torch

    from models import fit, save_model, write_history_csv

    if kind not in TASK_OF:
        raise ValueError(f"--model: unknown model '{kind}'; expected one of {sorted(TASK_OF)}")
    model_dir, metrics_file, plot_file = Path(model_dir), Path(metrics_file), Path(plot_file)
    paths = [split_path(training_dir, TASK_OF[kind], s) for s in ("train", "valid")]
    rows = [parquet_rows(p) for p in paths]
    loader = params.training.for_model(kind).loader
    # training.loader: the encoded split in memory, or the Parquet file streamed in row groups (then the
    # encoder is fitted one row group at a time too, and no frame of the training rows is ever built)
    stream = choose_mode(loader, rows[0]) == "stream"
    encoder, model, training, train = _start(kind, params, paths[:1], stream)
    valid = encoder.encode(_read_encoded_columns(paths[1], encoder))

    started = time.perf_counter()
    result = fit(model, train, valid, training, checkpoint_dir=checkpoint_dir)
    seconds = time.perf_counter() - started
    epochs = len(result.history)
    del train, valid  # the refit starts afresh: the first run's tensors are not needed any more
    refit = None
    if training.refit:
        stream = choose_mode(loader, sum(rows)) == "stream"
        best = result.best_epoch or epochs
        encoder, model, refit = _refit(kind, params, paths, stream, best, checkpoint_dir)
    metrics = {
        "model": kind,
        "train_rows": rows[0],
        "valid_rows": rows[1],
        "epochs": epochs,
        "best_epoch": result.best_epoch,
        "early_stopping_metric": result.metric,
        "best_valid_metric": result.best_metric,
        "stopped_early": result.stopped_early,
        "device": str(result.device),
        "train_seconds": round(seconds, 2),
        "train_samples_per_s": round(rows[0] * epochs / seconds, 1) if seconds > 0 else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "world_size": result.world_size,  # processes that trained (torchrun: components/launch_training.py)
        "refit": refit,  # the saved model: trained afresh on train + valid (None: the early-stopped one)
    }
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return metrics  # under torchrun every rank holds the same weights; rank 0 writes them
    save_model(model.cpu(), encoder, params.models.model(kind), model_dir, extra={"training": metrics})
    write_history_csv(result.history, model_dir / "history.csv")
    write_json(metrics, metrics_file)
    plot_history(result.history, plot_file, title=kind)
    log.info("train %s: %s", kind, metrics)
    return metrics


def _start(kind: str, params: StepParams, paths: list[Path], stream: bool) -> tuple[Any, Any, Any, Any]:
    """(encoder, model, training config, what ``fit`` trains on) for the rows of the Parquet ``paths``
    together: with ``stream``, the encoder fitted row group by row group and the files themselves
    (:class:`~models.streaming.ParquetSplit`); else the rows read into one frame, fitted and encoded."""
    from models import initial_model
    from models.registry import initial_model_streamed
    from models.streaming import ParquetSplit

    if stream:
        encoder, model, training = initial_model_streamed(kind, params.models, params.training, paths)
        return encoder, model, training, ParquetSplit(tuple(paths), encoder)
    frames = [pd.read_parquet(p) for p in paths]
    rows = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    del frames
    encoder, model, training = initial_model(kind, params.models, params.training, rows)
    return encoder, model, training, encoder.encode(rows)


def _refit(
    kind: str,
    params: StepParams,
    paths: list[Path],
    stream: bool,
    epochs: int,
    checkpoint_dir: str | Path | None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Model ``kind`` trained from scratch on train + valid for ``epochs`` (the early-stopped run's best
    epoch count), with the same seed and settings: what a scheduled run deploys learns from the most recent
    window too. The encoder is refitted, so ids first seen in the validation window get embeddings. With
    ``stream`` both files are streamed as one split (no concatenated frame)."""
    from models import fit

    encoder, model, training, rows = _start(kind, params, paths, stream)
    n_rows = sum(parquet_rows(p) for p in paths)
    started = time.perf_counter()
    fit(
        model,
        rows,
        None,
        training.model_copy(update={"epochs": epochs}),
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / "refit",
    )
    seconds = time.perf_counter() - started
    log.info("refit %s on %d rows for %d epoch(s) in %.1f s", kind, n_rows, epochs, seconds)
    summary = {"rows": n_rows, "epochs": epochs, "seconds": round(seconds, 2), "streamed": stream}
    return encoder, model, summary


def split_path(training_dir: str | Path, training_set: str, split: str) -> Path:
    """The Parquet file of one split; a missing file names the step that makes it."""
    path = Path(training_dir) / f"{training_set}_{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: training set not found (run the training_set step first)")
    return path


def _read_encoded_columns(path: Path, encoder: Any) -> pd.DataFrame:
    """The split at ``path`` with only the columns encoding reads (features, label, group)."""
    import pyarrow.parquet as pq

    wanted = {*encoder.spec.names, encoder.label_column, encoder.group_column}
    return pd.read_parquet(path, columns=[c for c in pq.ParquetFile(path).schema_arrow.names if c in wanted])


def plot_history(history: list[dict[str, float]], path: str | Path, title: str) -> Path:
    """PNG of the losses (left) and validation metrics (right) per epoch; DVC plots show the CSV too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(history)
    losses = [c for c in frame if "loss" in c]
    scores = [c for c in frame if c.startswith("valid_") and "loss" not in c]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, columns, label in ((axes[0], losses, "loss"), (axes[1], scores, "validation metric")):
        for column in columns:
            ax.plot(frame["epoch"], frame[column], marker="o", label=column)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if columns:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with staged_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def default_jobs(kinds: Sequence[str], params: StepParams) -> int:
    """How many models train at once when ``--jobs`` is 0: the cores over each run's torch threads.

    Why: these models are small, and more torch threads make them slower, not faster (one thread is the
    default), so sequential runs leave cores idle. On CUDA one at a time, as each run may fill the GPU.
    """
    configs = [params.training.for_model(kind) for kind in kinds]
    if any(c.device != "cpu" for c in configs):
        import torch

        if torch.cuda.is_available():
            return 1
    threads = max(c.num_workers for c in configs)
    cores = len(os.sched_getaffinity(0))
    return max(1, min(len(kinds), cores // threads if threads > 0 else 1))


def run_many(kinds: Sequence[str], params_file: str | Path, training_dir: str | Path, jobs: int) -> None:
    """Train ``kinds`` (in this order, ``jobs`` at a time), each in a fresh process with the layout's paths.

    A process trains exactly as a lone ``--model`` run does (same seeds, one process per model), so the
    weights are the same bit for bit. After a failure no further model starts; the error names every
    failed model (each one's traceback is logged under its name).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--model: one model per torchrun launch (components/launch_training.py)")
    failed: dict[str, BaseException] = {}
    waiting = list(kinds)
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in the children
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[Future[None], str] = {}
        while running or (waiting and not failed):
            # submitted only when a worker is free: the pool would queue a call ahead, past a failure
            while waiting and not failed and len(running) < jobs:
                kind = waiting.pop(0)
                running[pool.submit(_train_in_process, kind, str(params_file), str(training_dir))] = kind
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                kind = running.pop(future)
                if future.exception() is not None:
                    failed[kind] = future.exception()  # type: ignore[assignment]
    if failed:
        detail = "; ".join(f"{kind}: {type(error).__name__}: {error}" for kind, error in failed.items())
        skipped = f"; not started: {', '.join(waiting)}" if waiting else ""
        raise RuntimeError(f"train: {len(failed)} model(s) failed ({detail}){skipped}")


def _train_in_process(kind: str, params_file: str, training_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"{kind}: %(message)s", force=True)
    log.info("training %s (pid %d)", kind, os.getpid())
    try:
        run(
            kind,
            CONTRACT.load(params_file),
            training_dir,
            layout.model_dir(kind),
            layout.model_metrics(kind),
            layout.model_plot(kind),
        )
    except BaseException:
        log.exception("training %s failed", kind)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.train", description=__doc__)
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        choices=sorted(TASK_OF),
        help="one or more; trained in this order",
    )
    parser.add_argument(
        "--jobs", type=int, default=0, help="models trained at once (0: cores / training.num_workers)"
    )
    CONTRACT.add_path_options(parser)
    parser.add_argument("--model-dir", default=None, help=f"default: {layout.MODELS_DIR}/<model>")
    parser.add_argument("--metrics", default=None, help=f"default: {layout.model_metrics('<model>')}")
    parser.add_argument("--checkpoint-dir", default=None, help="resume from / save checkpoints here")
    parser.add_argument("--plot", default=None, help=f"default: {layout.model_plot('<model>')}")
    parser.add_argument(
        "--require-gpu",
        type=int,
        default=0,
        metavar="N",
        help="fail before training unless CUDA shows at least N GPUs (the pipeline's GPU pods; 0: no check)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    require_gpus(args.require_gpu, params.pipeline.accelerator_type)  # before any data is read
    training_dir = args.training_dir
    kinds: list[str] = args.model
    if len(set(kinds)) != len(kinds):
        parser.error(f"--model: a model is named twice in {kinds}")
    if args.jobs < 0:
        parser.error(f"--jobs: must be >= 0, got {args.jobs}")
    if len(kinds) > 1:
        per_model = {
            "--model-dir": args.model_dir,
            "--metrics": args.metrics,
            "--plot": args.plot,
            "--checkpoint-dir": args.checkpoint_dir,
        }
        given = [flag for flag, value in per_model.items() if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: one model's paths; name a single --model with them")
        jobs = args.jobs or default_jobs(kinds, params)
        log.info("training %s, %d at a time", ", ".join(kinds), jobs)
        run_many(kinds, args.params, training_dir, jobs)
        return 0
    kind = kinds[0]
    run(
        kind,
        params,
        training_dir,
        args.model_dir or layout.model_dir(kind),
        args.metrics or layout.model_metrics(kind),
        args.plot or layout.model_plot(kind),
        checkpoint_dir=args.checkpoint_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
