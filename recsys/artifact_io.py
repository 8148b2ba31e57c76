"""Atomic artifact writes: a crash never leaves a half-written file that a later step would trust.

Every output goes to a temporary sibling first and is renamed into place (``os.replace`` is atomic on
one filesystem). Multi-file outputs are staged completely before the first rename, so a failure while
*building* them leaves whatever was stored before untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def staged_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed (indexes and weights can be large); bundles and indexes record it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path, error: type[Exception] = ValueError, missing: str = "not found") -> Any:
    """Parse a JSON artifact; a missing or malformed file raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON: {exc}") from exc


def write_parquet(df: pd.DataFrame | pa.Table, path: str | Path) -> Path:
    """Write a table atomically; deterministic bytes for the same data (no wall-clock metadata)."""
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    with staged_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    with staged_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def write_text(text: str, path: str | Path) -> Path:
    with staged_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_tables(tables: Mapping[str, pd.DataFrame | pa.Table], directory: str | Path) -> dict[str, Path]:
    """Write several tables as ``<name>.parquet`` all-or-nothing: all are staged before any is renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: dict[Path, Path] = {}
    try:
        for name, df in tables.items():
            final = directory / f"{name}.parquet"
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged[final] = Path(tmp_name)
            table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
            pq.write_table(table, staged[final], compression="zstd")
        for final, tmp in staged.items():
            os.replace(tmp, final)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return {final.stem: final for final in staged}


@contextmanager
def staged_files(directory: str | Path, names: list[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths for several ``<name>.parquet`` files, all renamed into ``directory`` only once the
    block succeeds (all-or-nothing, as :func:`write_tables`); a failure leaves the stored files untouched."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name in names:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.parquet.", suffix=".tmp", dir=directory)
            os.close(fd)
            staged[name] = Path(tmp_name)
        yield dict(staged)
        for name, tmp in staged.items():
            os.replace(tmp, directory / f"{name}.parquet")
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


@contextmanager
def staged_parquet_writers(
    directory: str | Path, schemas: Mapping[str, pa.Schema]
) -> Iterator[dict[str, pq.ParquetWriter]]:
    """Writers for several ``<name>.parquet`` files filled batch by batch (a row group per write), so a
    large output never sits whole in memory; all-or-nothing (:func:`staged_files`): every file is
    closed before the first rename."""
    with staged_files(directory, list(schemas)) as paths:
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            for name, schema in schemas.items():
                writers[name] = pq.ParquetWriter(paths[name], schema, compression="zstd")
            yield writers
        finally:
            while writers:
                writers.popitem()[1].close()
