"""Promote step: copy the gated bundle to its stable, versioned object-store place and make it current.

``<promote.uri>/<version>/`` receives every member and, last, ``manifest.json``; each object is read back
from the store and its SHA-256 and size compared with the manifest before ``<promote.uri>/current.json``
is flipped to the new version (recsys/object_store.py). Any failure on the way (a changed local file, an
upload error, a checksum that does not come back) raises before the flip, so the previous version stays
current and serving. Versions are immutable: promoting different content under an existing version
name is refused; promoting the same bundle again repairs missing or damaged objects and is otherwise a
no-op.

The flip is a compare-and-swap against the pointer read just before it, so promotions that interleave
(two pipeline runs, a training run and the hourly index refresh) cannot lose one another: the one that
loses re-reads and tries again (``ATTEMPTS`` in all), and the ``previous`` it writes is the version it
really replaced. ``require_current`` (``--require-current``) makes the flip conditional on one version
being current at the moment of the write: the index refresh grows version V and must not replace a
newer training promotion that came in while it ran.

The store's endpoint and credentials come from the environment (the ``promote.secret`` Secret in the
cluster): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from recsys.artifact_io import file_sha256, write_json
from recsys.bundle_manifest import MANIFEST, BundleIntegrityError, load_manifest
from recsys.config import ConfigError, PromoteConfig
from recsys.object_store import (
    POINTER,
    ObjectStore,
    ObjectStoreError,
    PointerConflict,
    check_version,
    open_store,
    read_pointer_state,
    write_pointer,
)
from recsys.step_contract import STEPS

CONTRACT = STEPS["promote"]
ATTEMPTS = 3  # conditional pointer writes: the first and two retries after another writer came in between

log = logging.getLogger(__name__)


class PromoteError(RuntimeError):
    """The bundle was not promoted; the previous version (if any) is still current."""


def run(
    config: PromoteConfig,
    bundle_dir: str | Path,
    *,
    store_uri: str | None = None,
    version: str | None = None,
    output: str | Path | None = None,
    require_current: str | None = None,
) -> dict[str, Any]:
    """Upload ``bundle_dir`` to ``<store_uri>/<version>/``, verify it there, flip the pointer to it.

    ``store_uri`` defaults to ``config.uri``; ``version`` to ``config.version``, else the bundle
    manifest's own version. With ``require_current``, the pointer is flipped only if that version is
    current when the conditional write lands (checked before the upload too, to spare it); else
    PromoteError naming what is current. Returns the pointer now current (also written to ``output``).
    """
    bundle_dir = Path(bundle_dir)
    try:
        manifest = load_manifest(bundle_dir, verify=True)
        version = check_version(version or config.version or manifest["version"])
        store = open_store(store_uri or config.uri)
        _refuse_unless_required(read_pointer_state(store).pointer, version, manifest, require_current)
        _upload_verified(store, bundle_dir, manifest, version)
        pointer = _make_current(store, version, manifest, require_current)
    except (BundleIntegrityError, ObjectStoreError) as exc:
        raise PromoteError(f"promote {bundle_dir}: {exc}; the current version is unchanged") from exc
    if output is not None:
        write_json(pointer, output)
    return pointer


def _make_current(
    store: ObjectStore, version: str, manifest: dict[str, Any], require_current: str | None
) -> dict[str, Any]:
    """Read the pointer, write the new one conditionally on it; re-read and retry when another writer
    came in between, so ``previous`` is always the version replaced."""
    conflict: PointerConflict | None = None
    for attempt in range(1, ATTEMPTS + 1):
        state = read_pointer_state(store)
        previous = state.pointer
        if _already_current(previous, version, manifest):
            log.info("promote: %s is already current", previous["uri"])
            return previous
        _refuse_unless_required(previous, version, manifest, require_current)
        try:
            pointer = write_pointer(store, version, manifest, state)
        except PointerConflict as exc:
            log.warning("promote: %s (attempt %d of %d)", exc, attempt, ATTEMPTS)
            conflict = exc
            continue
        was = previous["version"] if previous else "nothing: first promotion"
        log.info("promote: %s is current (was %s)", pointer["uri"], was)
        return pointer
    raise PromoteError(
        f"{store.uri(POINTER)} kept changing while {version} was being made current ({ATTEMPTS} "
        f"attempts, the last: {conflict}); {store.uri(f'{version}/')} is uploaded but not current"
    )


def _already_current(pointer: dict[str, Any] | None, version: str, manifest: dict[str, Any]) -> bool:
    return (
        pointer is not None
        and pointer["version"] == version
        and pointer["content_sha256"] == manifest["content_sha256"]
    )


def _refuse_unless_required(
    current: dict[str, Any] | None, version: str, manifest: dict[str, Any], require_current: str | None
) -> None:
    """PromoteError unless ``require_current`` is None, is the current version, or the bundle is already
    current (a repeated run: nothing to flip)."""
    if require_current is None or _already_current(current, version, manifest):
        return
    if current is not None and current["version"] == require_current:
        return
    now = (
        "nothing is promoted"
        if current is None
        else f"{current['version']!r} is current (promoted at {current.get('promoted_at')})"
    )
    raise PromoteError(
        f"{version} may only replace {require_current!r} (require_current), but {now}; "
        "the current version is unchanged"
    )


def _upload_verified(store: ObjectStore, bundle_dir: Path, manifest: dict[str, Any], version: str) -> None:
    """Members first, each read back and compared with the manifest; the manifest last."""
    manifest_key = f"{version}/{MANIFEST}"
    existing = store.get_bytes(manifest_key)
    if existing is not None:
        try:
            existing_sha = json.loads(existing).get("content_sha256")
        except ValueError:
            existing_sha = None
        if existing_sha != manifest["content_sha256"]:
            raise PromoteError(
                f"{store.uri(f'{version}/')} already holds a different bundle (content {existing_sha}); "
                "versions are immutable: promote under a new version"
            )
    entries: dict[str, dict[str, Any]] = manifest["files"]
    verified = set()
    for name, entry in sorted(entries.items()):
        key = f"{version}/{name}"
        if existing is not None and store.sha256(key) == (entry["sha256"], entry["bytes"]):
            verified.add(name)  # the same bundle promoted before: only repair what is missing or damaged
            continue
        store.put_file(key, bundle_dir / name)
    bad = []
    for name, entry in sorted(entries.items()):
        if name in verified:  # already read back in full above
            continue
        found = store.sha256(f"{version}/{name}")
        if found != (entry["sha256"], entry["bytes"]):
            bad.append(f"'{name}' ({'missing' if found is None else f'{found[1]} bytes, sha256 {found[0]}'})")
    if bad:
        raise ObjectStoreError(
            f"{store.uri(f'{version}/')}: read back differs from the manifest for {', '.join(bad)}"
        )
    local_manifest = bundle_dir / MANIFEST
    store.put_file(manifest_key, local_manifest)
    expected = (file_sha256(local_manifest), local_manifest.stat().st_size)
    if store.sha256(manifest_key) != expected:
        raise ObjectStoreError(f"{store.uri(manifest_key)}: read back differs from the local manifest")
    log.info("promote: %d files + %s verified at %s", len(entries), MANIFEST, store.uri(f"{version}/"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.promote", description=__doc__.split("\n")[0])
    CONTRACT.add_path_options(parser)  # --bundle-dir: the bundle folder to promote
    parser.add_argument("--uri", default=None, help="the store (default: promote.uri)")
    parser.add_argument("--version", default=None, help="default: promote.version or the bundle's version")
    parser.add_argument("--output", default=None, help="write the pointer JSON here")
    parser.add_argument(
        "--require-current",
        default=None,
        metavar="VERSION",
        help="flip the pointer only if VERSION is current when it is written (the index refresh: never "
        "replace a newer promotion)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = CONTRACT.load(args.params)
        pointer = run(
            params.promote,
            args.bundle_dir,
            store_uri=args.uri,
            version=args.version,
            output=args.output,
            require_current=args.require_current,
        )
    except (ConfigError, PromoteError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 1
    print(pointer["uri"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
