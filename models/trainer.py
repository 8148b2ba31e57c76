"""One training loop for all four models, on CPU, one GPU, or many under ``torchrun``.

Speed comes from never touching single rows in Python: the caller encodes each split into tensors
once (``FeatureEncoder.encode``); an epoch is a seeded random permutation whose slices index those
tensors directly. On CUDA the encoded split lives in GPU memory (or in pinned host memory with
non-blocking copies), and the forward pass runs under bf16 autocast.

A split too large for memory is passed as a :class:`~models.streaming.ParquetSplit` instead (the caller
picks with ``training.loader``, see :func:`train_input`): batches then come from a DataLoader over the
Parquet file's row groups (models/streaming.py), shuffled per epoch with the same seed; validation stays
in memory.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the loop initialises the process
group (NCCL on GPU, gloo on CPU), shards every epoch's permutation across ranks like
``DistributedSampler`` and wraps the model in ``DistributedDataParallel``; ``batch_size`` is per
process. In-batch negatives of the two-tower are drawn from each rank's own batch.

Checkpoints are ``last.safetensors`` (+ ``best.safetensors``), ``optimizer.pt`` (tensors only, loaded
with ``weights_only=True``) and ``trainer_state.json``; ``fit`` resumes from them when present.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from models.batch import GROUP_KEY, Batch, batch_size_of
from models.config import TrainingConfig
from models.model import RecModel
from models.serialization import staged_files, state_tensors
from models.streaming import (
    EPOCH_SEED,
    ParquetSplit,
    ParquetStream,
    choose_mode,
    sample_rows,
    split_batches,
    stream_loader,
)

log = logging.getLogger(__name__)

LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
_MINIMISED = ("loss", "logloss")


@dataclass
class TrainingResult:
    """What ``fit`` did: the per-epoch history (one dict per epoch, ready for a CSV) and the best epoch."""

    history: list[dict[str, float]]
    metric: str
    best_epoch: int | None
    best_metric: float | None
    stopped_early: bool
    device: str
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class TrainingObjective(nn.Module):
    """``forward(batch) -> model.loss(batch)``: what DDP wraps, so its gradient hooks see every step."""

    def __init__(self, model: RecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(batch)


def fit(
    model: RecModel,
    train: Mapping[str, torch.Tensor] | ParquetSplit,
    valid: Mapping[str, torch.Tensor] | None,
    config: TrainingConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> TrainingResult:
    """Train ``model`` in place on the encoded ``train`` split (or one streamed from Parquet), early-stopping
    on ``valid``.

    ``progress`` None shows a bar only on an interactive terminal (and only on rank 0). With
    ``checkpoint_dir``, state is saved every ``config.checkpoint_every`` epochs and an interrupted run
    resumes where it stopped. With ``config.restore_best`` the model ends with its best weights.
    """
    ctx = init_distributed(config.device)
    device = resolve_device(config.device, ctx)
    if config.num_workers > 0:
        torch.set_num_threads(config.num_workers)
    torch.manual_seed(config.seed + ctx.rank)
    metric = (
        model.default_metric(config.eval_k)
        if config.early_stopping_metric == "auto"
        else config.early_stopping_metric
    )
    minimise = metric in _MINIMISED
    if isinstance(train, ParquetSplit):
        keys = [k for k in model.input_keys() if k != GROUP_KEY]
        n_rows = train.num_rows
    else:
        keys = [k for k in model.input_keys() if k in train and k != GROUP_KEY]
        n_rows = int(train[keys[0]].shape[0])
    if n_rows < 2:
        raise ValueError(f"fit: the training split has {n_rows} row(s); at least 2 are needed")

    model.to(device)
    if isinstance(train, ParquetSplit):
        model.prepare(sample_rows(train, keys, config.loader.prepare_rows, config.seed))
        epochs = _StreamEpochs(train, keys, config, ctx, device)
    else:
        model.prepare(train)
        epochs = _MemoryEpochs({k: train[k] for k in keys}, n_rows, config, ctx, device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )
    objective: nn.Module = TrainingObjective(model)
    if ctx.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # buffers are synced from rank 0 once at wrap time; batch-norm running stats then stay per rank
        # instead of being re-broadcast before every forward
        objective = DistributedDataParallel(objective, device_ids=device_ids, forward_sync_buffers=False)
    use_bf16 = config.bf16 and device.type == "cuda"
    show = (sys.stderr.isatty() if progress is None else progress) and ctx.is_main

    state = _TrainerState(metric=metric)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and resume and (ckpt / TRAINER_STATE).exists():
        state = _load_checkpoint(ckpt, model, optimizer, metric)
        log.info("resuming from %s after epoch %d", ckpt, state.epoch)

    while state.epoch < config.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        model.train()
        total, batches = epochs.batches(epoch)
        loss_sum = torch.zeros((), device=device)
        steps, seen = 0, 0
        started = time.perf_counter()
        bar = tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", disable=not show, leave=False)
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext():
                loss = objective(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            loss_sum += loss.detach().float()
            steps += 1
            seen += batch_size_of(batch)
            bar.update(1)
            if show and steps % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - started
        train_loss = _mean_over_ranks(loss_sum, steps, ctx, device)
        row: dict[str, float] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_seconds": train_seconds,
            "samples_per_second": seen * ctx.world_size / max(train_seconds, 1e-9),
        }
        if valid is not None:
            scores = model.validation_metrics(valid, config.eval_batch_size, k=config.eval_k)
            if ctx.world_size > 1:  # every rank must take the same early-stopping decision
                shared = [scores]
                dist.broadcast_object_list(shared, src=0)
                scores = shared[0]
            row.update({f"valid_{k}": v for k, v in scores.items()})
            if metric not in scores:
                raise ValueError(
                    f"early_stopping_metric '{metric}' is not among the validation metrics {sorted(scores)}"
                )
            _update_best(state, model, scores[metric], minimise, config.patience)
        else:
            state.best_epoch, state.best_metric = epoch, None
            state.best_weights = None
        state.epoch = epoch
        state.history.append(row)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        last = state.epoch >= config.epochs or state.stopped_early
        if ckpt is not None and (epoch % config.checkpoint_every == 0 or last):
            if ctx.is_main:
                _save_checkpoint(ckpt, model, optimizer, state)
            if ctx.world_size > 1:
                dist.barrier()

    if config.restore_best and state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    model.eval()
    return TrainingResult(
        history=state.history,
        metric=metric,
        best_epoch=state.best_epoch,
        best_metric=state.best_metric,
        stopped_early=state.stopped_early,
        device=str(device),
        world_size=ctx.world_size,
    )


def train_input(
    path: str | Path, encoder: Any, config: TrainingConfig, frame: Any = None
) -> Mapping[str, torch.Tensor] | ParquetSplit:
    """What ``fit`` gets for the Parquet training split at ``path`` under ``config.loader``: the split
    encoded in memory (``frame`` when the caller has it loaded, else the file), or the file itself to
    stream; ``auto`` decides by the row count in the Parquet footer, without loading the file."""
    split = ParquetSplit(Path(path), encoder)
    if choose_mode(config.loader, split.num_rows) == "stream":
        return split
    return encoder.encode(frame if frame is not None else pd.read_parquet(path))


def resolve_device(setting: str, ctx: DistributedContext | None = None) -> torch.device:
    """``auto`` -> CUDA when present (this rank's GPU under torchrun), else CPU; ``cuda`` with no GPU
    fails instead of silently training on CPU."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    index = ctx.local_rank if ctx is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device_setting: str = "auto") -> DistributedContext:
    """The process group of this run: joins the one ``torchrun`` describes in the environment (NCCL when
    this rank trains on a GPU, gloo on CPU), reuses one already initialised, or is a single process."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(0, 1, 0)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    on_gpu = device_setting != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    return DistributedContext(rank, world, local)


def shard_indices(permutation: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of an epoch's permutation, like ``DistributedSampler``: the permutation is
    padded by wrapping to a multiple of ``world_size`` so every rank runs the same number of steps."""
    if world_size == 1:
        return permutation
    total = math.ceil(len(permutation) / world_size) * world_size
    padded = torch.cat([permutation, permutation[: total - len(permutation)]])
    return padded[rank::world_size]


def write_history_csv(history: list[Mapping[str, float]], path: str | Path) -> Path:
    """Write the per-epoch history as CSV (atomically); columns are the union of all epochs' keys."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    path = Path(path)
    with staged_files([path]) as (tmp,):
        tmp.write_text(buffer.getvalue())
    return path


# ---- private --------------------------------------------------------------------------------------


@dataclass
class _TrainerState:
    metric: str
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    best_weights: dict[str, torch.Tensor] | None = None


class _BatchSource:
    """Row slices of the encoded split on the training device.

    CPU: plain indexing. CUDA: the split is copied to GPU memory once (``on_device``), or kept in
    pinned host memory and each gathered batch copied with ``non_blocking``.
    """

    def __init__(self, data: Mapping[str, torch.Tensor], device: torch.device, on_device: bool) -> None:
        self.device = device
        self.resident = device.type == "cpu" or on_device
        if self.resident:
            self.data = {k: v.to(device) for k, v in data.items()}
        else:
            self.data = {k: v.pin_memory() for k, v in data.items()}

    def batch(self, idx: torch.Tensor) -> Batch:
        if self.resident:
            idx = idx.to(self.device, non_blocking=True)
            return {k: v.index_select(0, idx) for k, v in self.data.items()}
        return {
            k: v.index_select(0, idx).pin_memory().to(self.device, non_blocking=True)
            for k, v in self.data.items()
        }


class _MemoryEpochs:
    """Batches of the encoded split: a seeded permutation per epoch, sharded across ranks, sliced."""

    def __init__(
        self,
        data: Mapping[str, torch.Tensor],
        n_rows: int,
        config: TrainingConfig,
        ctx: DistributedContext,
        device: torch.device,
    ) -> None:
        self.source = _BatchSource(data, device, config.data_on_device)
        self.n_rows, self.config, self.ctx = n_rows, config, ctx

    def batches(self, epoch: int) -> tuple[int, Iterator[Batch]]:
        permutation = torch.randperm(
            self.n_rows, generator=torch.Generator().manual_seed(self.config.seed * EPOCH_SEED + epoch)
        )
        shard = shard_indices(permutation, self.ctx.rank, self.ctx.world_size)
        starts = range(0, len(shard), self.config.batch_size)
        # a 1-row batch breaks batch norm and in-batch negatives
        slices = (shard[s : s + self.config.batch_size] for s in starts)
        return len(starts), (self.source.batch(idx) for idx in slices if len(idx) >= 2)


class _StreamEpochs:
    """Batches of a Parquet split through the streaming DataLoader; every rank stops after the smallest
    rank's batch count, so DDP ranks stay in step."""

    def __init__(
        self,
        split: ParquetSplit,
        keys: list[str],
        config: TrainingConfig,
        ctx: DistributedContext,
        device: torch.device,
    ) -> None:
        loader = config.loader
        self.dataset = ParquetStream(
            split,
            keys,
            config.batch_size,
            loader.shuffle_buffer_rows,
            config.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            workers=loader.workers,
        )
        cuda = device.type == "cuda"
        self.loader = stream_loader(self.dataset, loader.workers, loader.prefetch, pin_memory=cuda)
        self.device = device
        self.ranks = ctx.world_size

    def batches(self, epoch: int) -> tuple[int, Iterator[Batch]]:
        self.dataset.set_epoch(epoch)
        per_rank = self.dataset.steps(epoch)
        steps = min(per_rank)
        if steps == 0:
            raise ValueError(
                f"training.loader: a rank gets no batch in epoch {epoch} ({len(self.dataset.group_rows)} "
                f"row groups over {self.ranks} rank(s) x {self.dataset.workers} worker(s)); write the "
                "training set with smaller row groups or use fewer training.loader.workers"
            )
        moved = (
            {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            for batch in itertools.islice(split_batches(self.loader, self.dataset.batch_size), steps)
        )
        return steps, moved


def _update_best(state: _TrainerState, model: nn.Module, value: float, minimise: bool, patience: int) -> None:
    epoch = state.epoch + 1
    improved = not math.isnan(value) and (
        state.best_metric is None or (value < state.best_metric if minimise else value > state.best_metric)
    )
    if improved:
        state.best_metric, state.best_epoch, state.bad_epochs = float(value), epoch, 0
        state.best_weights = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    else:
        state.bad_epochs += 1
        if patience > 0 and state.bad_epochs >= patience:
            state.stopped_early = True


def _mean_over_ranks(
    loss_sum: torch.Tensor, steps: int, ctx: DistributedContext, device: torch.device
) -> float:
    totals = torch.stack([loss_sum.float(), torch.tensor(float(steps), device=device)])
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def _save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: _TrainerState
) -> None:
    finals = [directory / LAST_WEIGHTS, directory / OPTIMIZER_STATE, directory / TRAINER_STATE]
    if state.best_weights is not None:
        finals.append(directory / BEST_WEIGHTS)
    meta = {
        "epoch": state.epoch,
        "metric": state.metric,
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_metric": state.best_metric,
        "bad_epochs": state.bad_epochs,
        "stopped_early": state.stopped_early,
    }
    with staged_files(finals) as temps:
        save_file(state_tensors(model), str(temps[0]))
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, temps[1])
        temps[2].write_text(json.dumps(meta, indent=1) + "\n")
        if state.best_weights is not None:
            save_file({k: v.contiguous() for k, v in state.best_weights.items()}, str(temps[3]))


def _load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, metric: str
) -> _TrainerState:
    meta = json.loads((directory / TRAINER_STATE).read_text())
    if meta["metric"] != metric:
        raise ValueError(
            f"{directory}: the checkpoint early-stops on '{meta['metric']}', this run on '{metric}'; "
            "use another checkpoint directory or the same metric"
        )
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(directory / LAST_WEIGHTS), device=str(device)))
    saved = torch.load(directory / OPTIMIZER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"].cpu())
    best = None
    if (directory / BEST_WEIGHTS).exists():
        best = load_file(str(directory / BEST_WEIGHTS), device="cpu")
    return _TrainerState(
        metric=metric,
        epoch=int(meta["epoch"]),
        history=list(meta["history"]),
        best_epoch=meta["best_epoch"],
        best_metric=meta["best_metric"],
        bad_epochs=int(meta["bad_epochs"]),
        stopped_early=bool(meta["stopped_early"]),
        best_weights=best,
    )
