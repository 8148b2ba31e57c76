"""Streaming training input: a Parquet training split read in row-group shards through a DataLoader.

The in-memory path (models/trainer.py) encodes the whole split once and slices it; this one keeps only
the row groups in flight and a bounded shuffle buffer, so memory does not grow with the split:

- a split is one file or several read as one (the refit's train + valid): their row groups are pooled;
- every epoch the split's row groups are permuted with the seed (``seed * 100_003 + epoch``, the
  in-memory path's epoch seed), then dealt round-robin to ``world_size * workers`` shards: DDP rank
  ``r``'s DataLoader worker ``w`` reads shard ``r * workers + w`` (disjoint, and together complete);
- each row group is read with only the columns the encoder declares and encoded by
  :meth:`FeatureEncoder.encode`, the function the in-memory path uses, so a row's tensors are the same;
- encoded rows collect in a buffer of ``shuffle_buffer_rows``; when it is full it is permuted and
  batches are cut from it, the remainder mixing with the next row groups (a seeded generator per epoch,
  rank and worker: an epoch's order is reproducible, and differs between epochs);
- a worker yields chunks of whole batches (about :data:`CHUNK_ROWS` rows: one inter-process transfer per
  chunk, not per batch) that :func:`split_batches` cuts into ``batch_size`` rows in the training process
  (a worker's last batch is shorter, never a single row); the DataLoader adds worker processes, pinned
  memory on CUDA, prefetch and persistent workers.

Under DDP every rank must run the same number of steps: :meth:`ParquetStream.steps` computes each shard's
batch count from the Parquet metadata alone, and the trainer stops every rank after the smallest rank's
count (the few rows past it wait for another epoch's order).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from models.batch import Batch
from models.config import LoaderConfig
from models.encoding import FeatureEncoder

ROW_INDEX_KEY = "row_index"  # the row's position in the file, yielded on request (tests, checks)
EPOCH_SEED = 100_003  # the in-memory path's epoch permutation seed is seed * EPOCH_SEED + epoch
CHUNK_ROWS = 8192  # rows a worker hands over at once (whole batches; at least one)


@dataclass(frozen=True)
class ParquetSplit:
    """A training split left on disk: what ``fit`` streams instead of an encoded mapping. ``path``: one
    Parquet file, or several read as one split (the refit's train + valid) without concatenating them."""

    path: Path | tuple[Path, ...]
    encoder: FeatureEncoder

    @property
    def paths(self) -> tuple[Path, ...]:
        return (Path(self.path),) if isinstance(self.path, str | Path) else tuple(map(Path, self.path))

    @property
    def num_rows(self) -> int:
        return sum(parquet_rows(p) for p in self.paths)

    def pieces(self) -> list[tuple[int, int, int]]:
        """(file index, row group, rows) of every row group, in file order (from the footers)."""
        out = []
        for index, path in enumerate(self.paths):
            metadata = pq.ParquetFile(path).metadata
            out += [(index, g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
        return out


def parquet_rows(path: str | Path) -> int:
    """Rows of a Parquet file, from its footer (the file is not read)."""
    return int(pq.ParquetFile(path).metadata.num_rows)


def choose_mode(config: LoaderConfig, num_rows: int) -> Literal["memory", "stream"]:
    """``training.loader.mode`` resolved for a split of ``num_rows`` rows."""
    if config.mode == "auto":
        return "stream" if num_rows > config.stream_above_rows else "memory"
    return config.mode


def encoded_columns(encoder: FeatureEncoder, available: Sequence[str]) -> list[str]:
    """The columns of a file that encoding reads: the declared features and the label."""
    wanted = {*encoder.spec.names, encoder.label_column}
    return [c for c in available if c in wanted]


class ParquetStream(IterableDataset):
    """Encoded, shuffled batches of one Parquet split; one instance per rank (see the module docstring).

    ``keys``: the batch keys to keep (the model's inputs); ``with_row_index`` adds
    :data:`ROW_INDEX_KEY`. Call :meth:`set_epoch` before iterating; the epoch lives in shared memory so
    persistent workers see it.
    """

    def __init__(
        self,
        split: ParquetSplit,
        keys: Sequence[str],
        batch_size: int,
        shuffle_buffer_rows: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        with_row_index: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.split = split
        self.keys = list(keys)
        self.batch_size = batch_size
        self.chunk_rows = max(CHUNK_ROWS // batch_size, 1) * batch_size
        self.buffer_rows = max(shuffle_buffer_rows, batch_size)
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.workers = max(workers, 1)  # the main process is the one reader when there are no workers
        self.with_row_index = with_row_index
        self.pieces = [(index, group) for index, group, _ in split.pieces()]
        self.group_rows = [rows for _, _, rows in split.pieces()]
        self.group_starts = [sum(self.group_rows[:i]) for i in range(len(self.group_rows))]
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def shard_groups(self, epoch: int, rank: int, worker: int) -> list[int]:
        """The row groups that ``rank``'s ``worker`` reads in ``epoch``, in reading order."""
        order = torch.randperm(
            len(self.group_rows), generator=torch.Generator().manual_seed(self.seed * EPOCH_SEED + epoch)
        ).tolist()
        return order[rank * self.workers + worker :: self.world_size * self.workers]

    def steps(self, epoch: int) -> list[int]:
        """Batches each rank yields in ``epoch`` (from the metadata): what keeps DDP ranks in step."""
        per_rank = []
        for rank in range(self.world_size):
            batches = 0
            for worker in range(self.workers):
                rows = sum(self.group_rows[g] for g in self.shard_groups(epoch, rank, worker))
                batches += rows // self.batch_size + (rows % self.batch_size >= 2)
            per_rank.append(batches)
        return per_rank

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        epoch = int(self._epoch[0])
        generator = torch.Generator().manual_seed(
            ((self.seed * EPOCH_SEED + epoch) * 1_000 + self.rank) * 1_000 + worker
        )
        reader = _GroupReader(self.split)
        buffer: list[Batch] = []
        buffered = 0
        for group in self.shard_groups(epoch, self.rank, worker):
            part = reader.encoded(*self.pieces[group], self.keys)
            if self.with_row_index:
                start = self.group_starts[group]
                part[ROW_INDEX_KEY] = torch.arange(start, start + self.group_rows[group])
            buffer.append(part)
            buffered += self.group_rows[group]
            if buffered >= self.buffer_rows:
                rows = _shuffled(buffer, generator)
                cut = (buffered - self.buffer_rows // 2) // self.batch_size * self.batch_size
                yield from _chunks({k: v[:cut] for k, v in rows.items()}, self.chunk_rows)
                buffer, buffered = [{k: v[cut:] for k, v in rows.items()}], buffered - cut
        if buffered > 1:  # a lone last row is dropped: it would make a 1-row batch
            yield from _chunks(_shuffled(buffer, generator), self.chunk_rows)


def stream_loader(dataset: ParquetStream, workers: int, prefetch: int, pin_memory: bool) -> DataLoader:
    """The DataLoader over ``dataset``: its chunks as they are (:func:`split_batches` cuts them), ``workers``
    processes, pinned on CUDA."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=workers > 0,
    )


def sample_rows(split: ParquetSplit, keys: Sequence[str], max_rows: int, seed: int) -> Batch:
    """Whole row groups in a seeded order, encoded, until ``max_rows`` rows (at least one row group):
    what a streamed model's one-off ``prepare`` sees instead of the whole split."""
    pieces = split.pieces()
    reader = _GroupReader(split)
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    parts: list[Batch] = []
    rows = 0
    for piece in order:
        if rows >= max_rows:
            break
        index, group, group_rows = pieces[piece]
        parts.append(reader.encoded(index, group, keys))
        rows += group_rows
    return _concatenated(parts)


class _GroupReader:
    """Row groups of a split's files, read with the encoded columns only and encoded (files opened once)."""

    def __init__(self, split: ParquetSplit) -> None:
        self.split = split
        self.files: dict[int, tuple[pq.ParquetFile, list[str]]] = {}

    def encoded(self, index: int, group: int, keys: Sequence[str]) -> Batch:
        if index not in self.files:
            file = pq.ParquetFile(self.split.paths[index])
            self.files[index] = (file, encoded_columns(self.split.encoder, file.schema_arrow.names))
        file, columns = self.files[index]
        encoded = self.split.encoder.encode(file.read_row_group(group, columns=columns))
        return {k: encoded[k] for k in keys}


def _concatenated(parts: list[Batch]) -> Batch:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _shuffled(parts: list[Batch], generator: torch.Generator) -> Batch:
    rows = _concatenated(parts)
    order = torch.randperm(len(next(iter(rows.values()))), generator=generator)
    return {k: v.index_select(0, order) for k, v in rows.items()}


def split_batches(chunks: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """The batches of the stream's chunks, in order; a 1-row batch (it breaks batch norm and in-batch
    negatives) is left out."""
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        for start in range(0, n, batch_size):
            if n - start >= 2:
                yield {k: v[start : start + batch_size] for k, v in chunk.items()}


def _chunks(rows: Batch, chunk_rows: int) -> Iterator[Batch]:
    n = len(next(iter(rows.values())))
    for start in range(0, n, chunk_rows):
        # clones: a chunk sent to the training process must not carry the whole buffer's storage
        yield {k: v[start : start + chunk_rows].clone() for k, v in rows.items()}
