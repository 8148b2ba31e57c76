"""The bundle manifest: what serving trusts. ``manifest.json`` lists every member with its SHA-256 and
size, the vector dims, the metrics and a content digest; :func:`load_manifest` refuses a bundle with a
missing, changed or unlisted file, or dims that disagree."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from recsys.artifact_io import file_sha256, read_json

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


MANIFEST_FORMAT = 1


# an unlisted file with one of these harmless suffixes is tolerated (with a warning); any other is refused
NON_CRITICAL_SUFFIXES = frozenset({".md", ".txt", ".log"})


class BundleIntegrityError(ValueError):
    """A bundle that must not be served; the message names the bundle and the offending file."""


def load_manifest(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The bundle's manifest; with ``verify``, refuse missing, changed or unlisted files and dim drift."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleIntegrityError(f"{bundle_dir}: no {MANIFEST}; not a bundle (or a half-copied one)")
    manifest = read_json(path, BundleIntegrityError)
    missing = [key for key in ("format", "version", "files", "dims", "metrics") if key not in manifest]
    if missing:
        raise BundleIntegrityError(f"{path}: missing keys {missing}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise BundleIntegrityError(
            f"{path}: manifest format {manifest['format']}, expected {MANIFEST_FORMAT}"
        )
    if not verify:
        return manifest
    entries: dict[str, dict[str, Any]] = manifest["files"]
    if content_sha256(entries, manifest.get("params_sha256", "")) != manifest.get("content_sha256"):
        raise BundleIntegrityError(f"{path}: file list does not match content_sha256 (manifest edited)")
    for name, entry in sorted(entries.items()):
        member = bundle_dir / check_member_name(name, bundle_dir)
        if not member.is_file():
            raise BundleIntegrityError(f"{bundle_dir}: file '{name}' listed in the manifest is missing")
        size = member.stat().st_size
        if size != entry["bytes"]:
            raise BundleIntegrityError(
                f"{bundle_dir}: file '{name}' has {size} bytes, manifest says {entry['bytes']} (changed)"
            )
        if file_sha256(member) != entry["sha256"]:
            raise BundleIntegrityError(
                f"{bundle_dir}: file '{name}' SHA-256 differs from the manifest (changed)"
            )
    for member in sorted(p for p in bundle_dir.rglob("*") if p.is_file() or p.is_symlink()):
        name = member.relative_to(bundle_dir).as_posix()
        if name == MANIFEST or name in entries:
            continue
        if member.suffix.lower() in NON_CRITICAL_SUFFIXES and not member.is_symlink():
            log.warning("bundle %s: ignoring unlisted file '%s'", bundle_dir, name)
            continue
        raise BundleIntegrityError(f"{bundle_dir}: file '{name}' is not listed in the manifest (unverified)")
    check_dims_agree(manifest["dims"], bundle_dir)
    return manifest


def check_member_name(name: str, bundle_dir: Path) -> PurePosixPath:
    """A bundle name is a relative POSIX path inside the bundle, never the manifest itself."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or str(pure) != name:
        raise BundleIntegrityError(f"{bundle_dir}: bundle name '{name}' must be a plain relative path")
    if name == MANIFEST:
        raise BundleIntegrityError(f"{bundle_dir}: '{MANIFEST}' is reserved for the bundle's manifest")
    return pure


def check_dims_agree(dims: Mapping[str, int], bundle_dir: Path) -> None:
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"'{name}'={dim}" for name, dim in sorted(dims.items()))
        raise BundleIntegrityError(
            f"{bundle_dir}: embedding dims disagree ({listing}); model and index drifted"
        )


def content_sha256(entries: Mapping[str, Mapping[str, Any]], params_sha: str) -> str:
    listing = {"files": {name: entries[name]["sha256"] for name in sorted(entries)}, "params": params_sha}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
