"""Where the shared Feast registry's FileSources point: a published, content-addressed copy of the run's
feature tables in the object store, not a path inside one pod.

On a cluster every Feast task (training set, online store, monitor) and every serving replica shares one
SQL registry. A FileSource registered with the task's local artifact path (``/minio/...``, ``/tmp/...``)
names a file that exists in that pod only, for as long as the pod lives: a later ``feast materialize``,
``get_historical_features`` or ``feast feature-views describe`` from any other pod finds nothing. So the
tasks that register the views first copy the tables to ``feast.source_uri``:

```
s3://recsys-models/feature-tables/
  tables-3f9a0c1b2d4e5f60/   item_profile.parquet ... user_stats.parquet, then _PUBLISHED.json
```

The folder is named by the SHA-256 of the tables, so a re-run (or a cached step) publishes nothing new and
two runs never write into each other's folder. ``_PUBLISHED.json`` (each table's SHA-256 and size, read
back from the store) is written last: a folder without it is an interrupted copy that is never
registered, so the registry only ever names complete tables. The point-in-time joins and the online
backfill keep reading the task's local copy (the same bytes); only what is registered changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from recsys.artifact_io import file_sha256
from recsys.contracts import FEATURE_TABLE_KEYS, DataContractError
from recsys.object_store import ObjectStore, ObjectStoreError, open_store

PUBLISHED = "_PUBLISHED.json"


class FeatureSourceError(RuntimeError):
    """The feature tables could not be published where ``feast.source_uri`` says; nothing was registered."""


def published_location(features_dir: str | Path, source_uri: str) -> str:
    """Copy the feature tables in ``features_dir`` to ``<source_uri>/tables-<digest>/`` (once) and return
    that folder as the registry's FileSources should name it: ``s3://bucket/key`` or a local path."""
    features_dir = Path(features_dir)
    digests = {name: _file_digest(features_dir / f"{name}.parquet") for name in sorted(FEATURE_TABLE_KEYS)}
    folder = "tables-" + hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    try:
        store = open_store(source_uri.rstrip("/"))
        if not _complete(store, folder, digests):
            for name in digests:
                store.put_file(f"{folder}/{name}.parquet", features_dir / f"{name}.parquet")
            read_back = {name: store.sha256(f"{folder}/{name}.parquet") for name in digests}
            wrong = [name for name, digest in digests.items() if read_back[name] != digest]
            if wrong:
                raise FeatureSourceError(
                    f"feast.source_uri: {source_uri}: {folder}/{wrong[0]}.parquet reads back different "
                    "bytes than were written; the registry was not changed"
                )
            marker = {name: {"sha256": d[0], "bytes": d[1]} for name, d in digests.items()}
            store.put_bytes(f"{folder}/{PUBLISHED}", json.dumps(marker, indent=2).encode())
    except ObjectStoreError as exc:
        raise FeatureSourceError(f"feast.source_uri: {source_uri}: {exc}") from exc
    uri = store.uri(folder)
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _complete(store: ObjectStore, folder: str, digests: dict[str, tuple[str, int]]) -> bool:
    """The folder was published before, from the same bytes (its marker names the same digests)."""
    marker = store.get_bytes(f"{folder}/{PUBLISHED}")
    if marker is None:
        return False
    recorded: dict[str, Any] = json.loads(marker)
    return all(
        recorded.get(name, {}).get("sha256") == digest and recorded[name].get("bytes") == size
        for name, (digest, size) in digests.items()
    )


def _file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, bytes) of a feature table, as ``ObjectStore.sha256`` reads one back."""
    if not path.is_file():
        raise DataContractError(f"{path}: feature table not found (run the features step first)")
    return file_sha256(path), path.stat().st_size
