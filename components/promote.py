"""Promote step: copy the gated bundle to its stable, versioned object-store place and make it current.

``<promote.uri>/<version>/`` receives every member and, last, ``manifest.json``; each object is read back
from the store and its SHA-256 and size compared with the manifest before ``<promote.uri>/current.json``
is flipped to the new version (recsys/object_store.py). Any failure on the way (a changed local file, an
upload error, a checksum that does not come back) raises before the flip, so the previous version stays
current and serving. Versions are immutable: promoting different content under an existing version
name is refused; promoting the same bundle again repairs missing or damaged objects and is otherwise a
no-op.

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
    ObjectStore,
    ObjectStoreError,
    check_version,
    open_store,
    read_pointer,
    write_pointer,
)
from recsys.step_contract import STEPS

CONTRACT = STEPS["promote"]

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
) -> dict[str, Any]:
    """Upload ``bundle_dir`` to ``<store_uri>/<version>/``, verify it there, flip the pointer to it.

    ``store_uri`` defaults to ``config.uri``; ``version`` to ``config.version``, else the bundle
    manifest's own version. Returns the pointer now current (also written to ``output`` when given).
    """
    bundle_dir = Path(bundle_dir)
    try:
        manifest = load_manifest(bundle_dir, verify=True)
        version = check_version(version or config.version or manifest["version"])
        store = open_store(store_uri or config.uri)
        _upload_verified(store, bundle_dir, manifest, version)
        previous = read_pointer(store)
        if (
            previous
            and previous["version"] == version
            and previous["content_sha256"] == manifest["content_sha256"]
        ):
            pointer = previous
            log.info("promote: %s is already current", pointer["uri"])
        else:
            pointer = write_pointer(store, version, manifest, previous)
            log.info(
                "promote: %s is current (was %s)",
                pointer["uri"],
                previous["version"] if previous else "nothing: first promotion",
            )
    except (BundleIntegrityError, ObjectStoreError) as exc:
        raise PromoteError(f"promote {bundle_dir}: {exc}; the current version is unchanged") from exc
    if output is not None:
        write_json(pointer, output)
    return pointer


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = CONTRACT.load(args.params)
        pointer = run(
            params.promote, args.bundle_dir, store_uri=args.uri, version=args.version, output=args.output
        )
    except (ConfigError, PromoteError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 1
    print(pointer["uri"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
