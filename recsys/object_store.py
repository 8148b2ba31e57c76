"""The promoted-bundle store: ``<uri>/<version>/`` holds each promoted bundle, ``<uri>/current.json`` names
the one serving.

```
s3://recsys-models/bundles/
  20261203T101500Z-3f9a0c1b2d4e/   manifest.json + every member, exactly as in the local bundle
  current.json                      {"version", "uri", "content_sha256", "metrics", "promoted_at", "previous"}
```

A version folder is complete once its ``manifest.json`` is there (promote writes it last, after every
member's SHA-256 was read back from the store); the pointer is flipped only after that, by one object
write, which S3 makes visible atomically. So a reader of ``current.json`` always finds a whole, verified
bundle, and a failed promote leaves the previous version current.

Two backends behind one small interface: S3 (anything that speaks the S3 API: AWS, MinIO, Ceph, ...),
configured the way KServe's storage initializer is, from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or KServe's ``S3_ENDPOINT`` + ``S3_USE_HTTPS``,
``AWS_DEFAULT_REGION``, ``S3_VERIFY_SSL``, ``S3_USER_VIRTUAL_BUCKET``), and ``file://`` folders for local
runs (``kfp.local``), written with temp file + rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from recsys.bundle_manifest import MANIFEST

POINTER = "current.json"
POINTER_FORMAT = 1
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


class ObjectStoreError(RuntimeError):
    """The store cannot be reached or read, or holds something that is not what promote writes."""


def open_store(uri: str) -> ObjectStore:
    """The store rooted at ``uri`` (``s3://bucket[/prefix]`` or ``file:///folder``)."""
    parsed = urlparse(uri.strip())
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ObjectStoreError(f"{uri!r}: no bucket in the S3 URI")
        return S3Store(parsed.netloc, parsed.path.strip("/"))
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    raise ObjectStoreError(f"{uri!r}: the promote store must be an s3:// or file:/// URI")


def check_version(version: str) -> str:
    if not VERSION_NAME.fullmatch(version) or version == POINTER:
        raise ObjectStoreError(
            f"bundle version {version!r}: use letters, digits, '.', '_', '-' (at most 128), not {POINTER!r}"
        )
    return version


def read_pointer(store: ObjectStore) -> dict[str, Any] | None:
    """The current pointer, or None when nothing was promoted yet."""
    data = store.get_bytes(POINTER)
    if data is None:
        return None
    try:
        pointer = json.loads(data)
    except ValueError as exc:
        raise ObjectStoreError(f"{store.uri(POINTER)}: not JSON ({exc})") from exc
    if not isinstance(pointer, dict):
        raise ObjectStoreError(f"{store.uri(POINTER)}: not a promote pointer (not a JSON object)")
    missing = [key for key in ("format", "version", "uri", "content_sha256") if key not in pointer]
    if missing:
        raise ObjectStoreError(f"{store.uri(POINTER)}: not a promote pointer (missing {missing})")
    if pointer["format"] != POINTER_FORMAT:
        raise ObjectStoreError(f"{store.uri(POINTER)}: pointer format {pointer['format']}, expected 1")
    return pointer


def write_pointer(
    store: ObjectStore, version: str, manifest: dict[str, Any], previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Make ``version`` (holding ``manifest``) current, by one atomic object write; returns the pointer."""
    check_version(version)
    pointer = {
        "format": POINTER_FORMAT,
        "version": version,
        # the slash: KServe downloads everything under the prefix, and "v1/" must not also match "v10/"
        "uri": store.uri(f"{version}/"),
        "bundle_version": manifest["version"],
        "content_sha256": manifest["content_sha256"],
        "metrics": manifest["metrics"],
        "promoted_at": datetime.now(UTC).isoformat(),
        # one step of history: what a rollback restores (its own "previous" is dropped, not chained)
        "previous": None if previous is None else {k: v for k, v in previous.items() if k != "previous"},
    }
    _put_pointer(store, pointer)
    return pointer


def promoted_manifest(store: ObjectStore) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(pointer, the pointed-to version's manifest) or None when nothing was promoted yet.

    The manifest is read from the version folder, not trusted from the pointer, and must be the one the
    pointer was written for (same content digest).
    """
    pointer = read_pointer(store)
    if pointer is None:
        return None
    key = f"{check_version(pointer['version'])}/{MANIFEST}"
    data = store.get_bytes(key)
    if data is None:
        raise ObjectStoreError(
            f"{store.uri(POINTER)} names {pointer['version']}, but {store.uri(key)} is missing"
        )
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ObjectStoreError(f"{store.uri(key)}: not JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("content_sha256") != pointer["content_sha256"]:
        raise ObjectStoreError(
            f"{store.uri(key)}: content digest differs from the one {store.uri(POINTER)} was written for"
        )
    return pointer, manifest


def fetch_promoted(store: ObjectStore, dest: Path) -> Path | None:
    """Download the current version's bundle into ``dest`` (each member as the manifest lists it); None
    when nothing was promoted yet. The caller verifies it (serving.bundle.load_bundle checks every digest)."""
    promoted = promoted_manifest(store)
    if promoted is None:
        return None
    pointer, manifest = promoted
    version = check_version(pointer["version"])
    for member in [*manifest["files"], MANIFEST]:
        data = store.get_bytes(f"{version}/{member}")
        if data is None:
            raise ObjectStoreError(f"{store.uri(f'{version}/{member}')}: missing from the promoted bundle")
        target = dest / member
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


def restore_previous(store: ObjectStore, version: str) -> dict[str, Any] | None:
    """Undo the promotion of ``version`` (a rollout that failed): the pointer goes back to the version it
    replaced, or is removed when ``version`` was the first. Only if ``version`` is still current (a newer
    promotion is left alone). Returns the pointer now current."""
    pointer = read_pointer(store)
    if pointer is None or pointer["version"] != version:
        return pointer
    previous = pointer.get("previous")
    if previous is None:
        store.delete(POINTER)
        return None
    restored = dict(previous) | {"previous": None, "restored_at": datetime.now(UTC).isoformat()}
    _put_pointer(store, restored)
    return restored


def _put_pointer(store: ObjectStore, pointer: dict[str, Any]) -> None:
    store.put_bytes(POINTER, json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n")


class ObjectStore:
    """Keys are relative to the store's root (``<version>/<member>``, ``current.json``)."""

    def uri(self, key: str = "") -> str:
        raise NotImplementedError

    def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        raise NotImplementedError

    def keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted; temp files of unfinished writes left out."""
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when it does not exist."""
        raise NotImplementedError

    def stream(self, key: str) -> Iterator[bytes] | None:
        """The object's content in chunks, or None when it does not exist."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def sha256(self, key: str) -> tuple[str, int] | None:
        """(SHA-256 hex, bytes) of the object as the store returns it (read back in full), or None."""
        chunks = self.stream(key)
        if chunks is None:
            return None
        digest, size = hashlib.sha256(), 0
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix
        self._client = s3_client()
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        try:
            self._client.head_bucket(Bucket=bucket)
        except self._errors as exc:
            raise ObjectStoreError(_explain(exc, f"s3://{bucket}")) from exc

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, key: str, path: Path) -> None:
        try:
            self._client.upload_file(str(path), self.bucket, self._key(key))
        except (*self._errors, OSError) as exc:
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except self._errors as exc:
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc

    def keys(self, prefix: str = "") -> list[str]:
        root = self._key("")
        found = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                found.extend(item["Key"][len(root) :] for item in page.get("Contents", []))
        except self._errors as exc:
            raise ObjectStoreError(_explain(exc, self.uri(prefix))) from exc
        return sorted(found)

    def get_bytes(self, key: str) -> bytes | None:
        chunks = self.stream(key)
        return None if chunks is None else b"".join(chunks)

    def stream(self, key: str) -> Iterator[bytes] | None:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._errors as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc
        return iter(lambda: body.read(_CHUNK), b"")

    def sha256(self, key: str) -> tuple[str, int] | None:
        try:
            return super().sha256(key)
        except self._errors as exc:  # a connection lost mid-read
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as exc:
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


class LocalStore(ObjectStore):
    """A folder laid out like the bucket; for local runs (``kfp.local``, tests without a cluster)."""

    def __init__(self, root: Path) -> None:
        self.root = root  # created by the first write: a reader (the gate) never creates folders

    def uri(self, key: str = "") -> str:
        uri = self.root.resolve().as_uri()
        return f"{uri}/{key}" if key else uri

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as source:
            self._write(key, iter(lambda: source.read(_CHUNK), b""))

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        self._write(key, iter([data]))

    def keys(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in found if k.startswith(prefix) and not Path(k).name.startswith("."))

    def get_bytes(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def stream(self, key: str) -> Iterator[bytes] | None:
        path = self.root / key
        if not path.is_file():
            return None

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                yield from iter(lambda: fh.read(_CHUNK), b"")

        return chunks()

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def _write(self, key: str, chunks: Iterator[bytes]) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment the way KServe's storage initializer is."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is None and os.environ.get("S3_ENDPOINT"):  # KServe's annotation-derived pair
        scheme = "http" if os.environ.get("S3_USE_HTTPS", "1") == "0" else "https"
        endpoint = f"{scheme}://{os.environ['S3_ENDPOINT']}"
    virtual = os.environ.get("S3_USER_VIRTUAL_BUCKET", "false").lower() == "true"
    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        "config": Config(
            s3={"addressing_style": "virtual" if virtual else "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=15,
            read_timeout=60,
        ),
    }
    verify = os.environ.get("S3_VERIFY_SSL")
    if verify is not None and verify.lower() in ("0", "false"):
        kwargs["verify"] = False
    elif os.environ.get("AWS_CA_BUNDLE"):
        kwargs["verify"] = os.environ["AWS_CA_BUNDLE"]
    return boto3.client("s3", **kwargs)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _explain(exc: Exception, where: str) -> str:
    from botocore.exceptions import NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return (
            f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (in the cluster: the "
            "promote.secret Secret) and AWS_ENDPOINT_URL for a non-AWS store"
        )
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT") or "AWS S3"
    return f"{where} (endpoint {endpoint}): {_code(exc) or type(exc).__name__}: {exc}"
