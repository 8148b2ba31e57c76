"""Assembling a bundle: members copied and hashed into a staging folder, a manifest, one rename into place.

Used by the bundle step (the trained models, embeddings and index) and by the index-refresh step (the
same models with a grown index), so both write bundles the same way: the manifest records the SHA-256
and size of every file, the params and git revision it came from and its evaluation metrics, and the
embedding dim of every index and embedding table in it (which must agree); a half-built bundle never
appears under its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import yaml
from safetensors import SafetensorError, safe_open

from recsys.bundle_manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    BundleIntegrityError,
    check_dims_agree,
    check_member_name,
    content_sha256,
)

log = logging.getLogger(__name__)

EMBEDDINGS_TENSOR = "embeddings"


def assemble_bundle(
    files: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    params_text: str,
    metrics: Mapping[str, Any],
    git_revision: str | None = None,
    embedding_dims: Mapping[str, int] | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Copy ``files`` (bundle name -> source) into ``out_dir`` with a manifest; all or nothing.

    ``embedding_dims`` declares the output dim of members the bundle cannot read a dim from (e.g. the user
    tower); it is checked against every index (``*.faiss``) and ``embeddings`` tensor in the bundle.
    ``lineage`` (JSON) records where the bundle came from when it is not a training run's (an index
    refresh: the version it grew from and what was added), as the manifest's ``lineage``.
    """
    out_dir = Path(out_dir)
    names = {name: check_member_name(name, out_dir) for name in files}
    for name, source in files.items():
        if not Path(source).is_file():
            raise BundleIntegrityError(f"{out_dir}: bundle member '{name}' source {source} is not a file")
        if name.endswith(".faiss") and name + ".json" not in files:
            raise BundleIntegrityError(
                f"{out_dir}: index '{name}' needs its sidecar '{name}.json' (search parameter, metric) too"
            )
    try:
        metrics_json = json.loads(json.dumps(metrics, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BundleIntegrityError(f"{out_dir}: metrics are not plain JSON: {exc}") from exc
    try:
        params = yaml.safe_load(params_text) or {}
    except yaml.YAMLError as exc:
        raise BundleIntegrityError(f"{out_dir}: params_text is not valid YAML: {exc}") from exc

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        entries: dict[str, dict[str, Any]] = {}
        for name, source in sorted(files.items()):
            target = staging / names[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            sha, size = _copy_and_hash(Path(source), target)
            entries[name] = {"sha256": sha, "bytes": size}
        dims = _read_dims(staging, sorted(files), out_dir)
        dims.update({f"declared:{name}": int(dim) for name, dim in (embedding_dims or {}).items()})
        check_dims_agree(dims, out_dir)
        params_sha = hashlib.sha256(params_text.encode()).hexdigest()
        content_sha = content_sha256(entries, params_sha)
        created = datetime.now(UTC)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": f"{created:%Y%m%dT%H%M%SZ}-{content_sha[:12]}",
            "content_sha256": content_sha,
            "created_at": created.isoformat(),
            "git_revision": git_revision if git_revision is not None else _git_revision(),
            "params": params,
            "params_sha256": params_sha,
            "metrics": metrics_json,
            "dims": dims,
            "files": entries,
        }
        if lineage is not None:
            manifest["lineage"] = json.loads(json.dumps(lineage, allow_nan=False))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle: %s (%d files) -> %s", manifest["version"], len(entries), out_dir)
    return out_dir


def _read_dims(staging: Path, names: list[str], out_dir: Path) -> dict[str, int]:
    """The vector dim of every FAISS index and every safetensors file holding an ``embeddings`` tensor."""
    dims: dict[str, int] = {}
    for name in names:
        member = staging / name
        if name.endswith(".faiss"):
            try:
                index = faiss.read_index(str(member))
            except RuntimeError as exc:
                raise BundleIntegrityError(f"{out_dir}: index '{name}' is not readable: {exc}") from exc
            dims[name] = int(index.d)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(str(member), framework="numpy") as fh:
                    if EMBEDDINGS_TENSOR in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        shape = fh.get_slice(EMBEDDINGS_TENSOR).get_shape()
                        dims[name] = int(shape[-1])
            except (SafetensorError, OSError) as exc:
                raise BundleIntegrityError(f"{out_dir}: '{name}' is not a readable safetensors file") from exc
    return dims


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished bundle onto ``out_dir``; an old bundle moves aside first and is then removed."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_and_hash(source: Path, target: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest(), size


def _git_revision() -> str | None:
    """HEAD's commit when run inside a git checkout with commits; None otherwise (best effort)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    revision = done.stdout.strip()
    return revision or None
