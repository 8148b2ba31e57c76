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

Every pointer write is a compare-and-swap against the pointer its writer read (``read_pointer_state``):
two promotions (a training run and the index refresh, two pipeline runs) or a promotion and a rollback
that interleave cannot both win, so no promotion is lost and ``previous`` always names the version that
was really replaced. The loser gets ``PointerConflict`` and nothing of it was written. S3: the read's ETag
goes into ``If-Match`` (``If-None-Match: *`` when there was no pointer) of the PUT, and into ``If-Match``
of the DELETE that undoes a first promotion (AWS S3 conditional writes and deletes; a store that ignores
those headers gives no such protection, one that rejects them fails loudly). Local folders: a SHA-256 of
the pointer's bytes, compared and replaced under an exclusive ``flock`` on ``.current.json.lock`` beside
it (a local file system: ``flock`` over NFS is not to be trusted).

Two backends behind one small interface: S3 (anything that speaks the S3 API: AWS, MinIO, Ceph, ...),
configured the way KServe's storage initializer is, from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` or KServe's ``S3_ENDPOINT`` + ``S3_USE_HTTPS``,
``AWS_DEFAULT_REGION``, ``S3_VERIFY_SSL``, ``S3_USER_VIRTUAL_BUCKET``), and ``file://`` folders for local
runs (``kfp.local``), written with temp file + rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from recsys.bundle_manifest import MANIFEST

POINTER = "current.json"
POINTER_FORMAT = 1
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20
RESTORE_ATTEMPTS = 3  # restore_previous re-reads after a conflict: the pointer moved on, or is still ours


class ObjectStoreError(RuntimeError):
    """The store cannot be reached or read, or holds something that is not what promote writes."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write or delete found the object changed since the token it was given was read."""


class PointerConflict(ObjectStoreError):
    """The pointer changed between reading it and the conditional write: another promotion or rollback
    came in between, and nothing of this one was written. ``current`` is the pointer now (None: none)."""

    def __init__(self, uri: str, current: dict[str, Any] | None, detail: str = "") -> None:
        self.current = current
        if detail:
            now = detail
        elif current is None:
            now = "there is no pointer now"
        else:
            now = f"it now points to {current.get('version')!r}, promoted at {current.get('promoted_at')}"
        super().__init__(
            f"{uri} changed since it was read ({now}: another promotion or rollback wrote it in between); "
            "nothing was changed"
        )


@dataclass(frozen=True)
class PointerState:
    """The pointer as read and the store's version token of the object it came from (S3: its ETag; a
    local folder: the SHA-256 of its bytes); both None when there was no pointer. A write passes it back,
    so it only lands if the pointer is still the one read."""

    pointer: dict[str, Any] | None
    token: str | None


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
    """The current pointer, or None when nothing was promoted yet (for readers; writers use
    ``read_pointer_state``, whose token the conditional write needs)."""
    return read_pointer_state(store).pointer


def read_pointer_state(store: ObjectStore) -> PointerState:
    """The current pointer with its version token; ``PointerState(None, None)`` when nothing was promoted."""
    found = store.get_with_token(POINTER)
    if found is None:
        return PointerState(None, None)
    data, token = found
    return PointerState(_parse_pointer(store, data), token)


def _parse_pointer(store: ObjectStore, data: bytes) -> dict[str, Any]:
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
    store: ObjectStore, version: str, manifest: dict[str, Any], expected: PointerState
) -> dict[str, Any]:
    """Make ``version`` (holding ``manifest``) current, by one atomic object write, only if the pointer is
    still ``expected`` (what the caller read; it becomes ``previous``); returns the pointer written.

    Raises PointerConflict, writing nothing, when another writer changed the pointer since.
    """
    check_version(version)
    previous = expected.pointer
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
    _put_pointer(store, pointer, expected)
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
    replaced, or is removed when ``version`` was the first. Only if ``version`` is still current when the
    conditional write (or delete) lands: a newer promotion, even one that comes in between the read and
    the write, is left alone. Returns the pointer now current."""
    for _ in range(RESTORE_ATTEMPTS - 1):
        try:
            return _restore_once(store, version)
        except PointerConflict:
            continue  # re-read: a newer promotion is then left alone
    return _restore_once(store, version)  # the pointer kept changing and naming ``version``: raise


def _restore_once(store: ObjectStore, version: str) -> dict[str, Any] | None:
    state = read_pointer_state(store)
    if state.pointer is None or state.pointer["version"] != version:
        return state.pointer
    assert state.token is not None
    previous = state.pointer.get("previous")
    if previous is None:
        try:
            store.delete_if(POINTER, state.token)
        except PreconditionFailed as exc:
            _raise_unless_landed(store, exc, None)
        return None
    restored = dict(previous) | {"previous": None, "restored_at": datetime.now(UTC).isoformat()}
    _put_pointer(store, restored, state)
    return restored


def _put_pointer(store: ObjectStore, pointer: dict[str, Any], expected: PointerState) -> None:
    data = json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"
    try:
        store.put_if(POINTER, data, expected.token)
    except PreconditionFailed as exc:
        _raise_unless_landed(store, exc, data)


def _raise_unless_landed(store: ObjectStore, exc: PreconditionFailed, intended: bytes | None) -> None:
    """PointerConflict naming what the pointer is now, unless it is exactly what this write intended
    (``None``: no pointer): a request retried after its response was lost fails its own precondition."""
    try:
        found = store.get_with_token(POINTER)
    except ObjectStoreError as reread:
        raise PointerConflict(store.uri(POINTER), None, f"re-reading it failed: {reread}") from exc
    data = None if found is None else found[0]
    if data == intended:
        return
    try:
        current = None if data is None else _parse_pointer(store, data)
    except ObjectStoreError as bad:
        raise PointerConflict(store.uri(POINTER), None, str(bad)) from exc
    raise PointerConflict(store.uri(POINTER), current) from exc


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

    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        """(content, version token) of a small object, or None when it does not exist."""
        raise NotImplementedError

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write ``data`` only if the object's token is still ``token`` (None: only if it does not exist);
        else PreconditionFailed, the object untouched."""
        raise NotImplementedError

    def delete_if(self, key: str, token: str) -> None:
        """Delete the object only if its token is still ``token``; else PreconditionFailed."""
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

    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except self._errors as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise ObjectStoreError(_explain(exc, self.uri(key))) from exc

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json", **condition
            )
        except self._errors as exc:
            raise _conditional_error(exc, self.uri(key)) from exc

    def delete_if(self, key: str, token: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=token)
        except self._errors as exc:
            raise _conditional_error(exc, self.uri(key)) from exc

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

    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        data = self.get_bytes(key)  # replaced by rename only: whole, without taking the lock
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        with self._locked(key):
            self._check_token(key, token)
            self._write(key, iter([data]))

    def delete_if(self, key: str, token: str) -> None:
        with self._locked(key):
            self._check_token(key, token)
            (self.root / key).unlink()

    def _check_token(self, key: str, token: str | None) -> None:
        found = self.get_with_token(key)
        if (None if found is None else found[1]) != token:
            raise PreconditionFailed(f"{self.uri(key)}: changed since it was read (token {token})")

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """An exclusive lock on ``.<name>.lock`` beside ``key`` (never replaced or removed, so every
        process locks the same inode): compare and replace are then one step for every writer."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "ab") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            yield

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


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment: ``AWS_ENDPOINT_URL``, else KServe's annotation-derived
    ``S3_ENDPOINT`` + ``S3_USE_HTTPS``; None for AWS itself."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is None and os.environ.get("S3_ENDPOINT"):
        scheme = "http" if os.environ.get("S3_USE_HTTPS", "1") == "0" else "https"
        endpoint = f"{scheme}://{os.environ['S3_ENDPOINT']}"
    return endpoint


def s3_client() -> Any:
    """A boto3 S3 client configured from the environment the way KServe's storage initializer is."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
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
    # a session of its own: boto3's shared default session is not safe to make clients from in threads
    return boto3.session.Session().client("s3", **kwargs)


def _conditional_error(exc: Exception, where: str) -> ObjectStoreError:
    """412: the ETag no longer matches; 404 on If-Match: the object is gone; 409: a concurrent
    conditional write won (AWS asks to re-read and retry)."""
    if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"):
        return PreconditionFailed(_explain(exc, where))
    return ObjectStoreError(_explain(exc, where))


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
