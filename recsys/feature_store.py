"""The project's Feast store: opening it (local or production config), building its objects over a
folder of feature tables, reading those tables, and backfilling the online store."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("FEAST_USAGE", "False")  # no usage telemetry, set before Feast is imported

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from feast import FeatureStore, RepoConfig
from feast.constants import FEAST_FS_YAML_FILE_PATH_ENV_NAME

from recsys.config import FeastConfig, FeaturesConfig
from recsys.contracts import (
    FEATURE_TABLE_KEYS,
    TIMESTAMP,
    DataContractError,
)

log = logging.getLogger(__name__)


PROJECT_ROOT = Path(__file__).resolve().parents[1]
NEWEST_BATCH_ROWS = 1 << 20  # rows of a feature table read at a time when only each entity's newest is kept
MATERIALIZE_ROWS = 100_000  # entities per Feast materialize call of the online backfill


def open_feature_store(feast: FeastConfig) -> FeatureStore:
    """The project's Feast store: ``feast.config_file``, else $FEAST_FS_YAML_FILE_PATH, else the local yaml.

    Relative paths in the yaml (registry, SQLite) resolve against the repo folder, not the working dir.
    """
    repo_path = resolve_repo_path(feast.repo_path)
    config_file = store_config_file(feast)
    _check_variables(config_file)
    if feast.config_file is None:
        return FeatureStore(repo_path=str(repo_path))
    return FeatureStore(repo_path=str(repo_path), fs_yaml_file=config_file)


def _check_variables(config_file: Path) -> None:
    """Every ``${VAR}`` the store yaml uses is set: Feast would keep the literal text and fail later on a
    project named "${FEAST_PROJECT}" or a registry at "${FEAST_REGISTRY_PATH}", naming neither."""
    if not config_file.is_file():
        return  # Feast's own error names the missing file
    body = "\n".join(line.split("#", 1)[0] for line in config_file.read_text().splitlines())
    unset = sorted({name for name in re.findall(r"\$\{(\w+)\}", body) if name not in os.environ})
    if unset:
        raise FeatureStoreConfigError(
            f"{config_file} uses ${{{unset[0]}}}"
            + (f" (and {', '.join(unset[1:])})" if unset[1:] else "")
            + ", not set in the environment: on a cluster FEAST_PROJECT comes from the Feast ConfigMap and "
            "the credentials from the Feast Secret (manifests/README.md)"
        )


class FeatureStoreConfigError(RuntimeError):
    """The store's yaml cannot be resolved in this environment; the message names the file and variable."""


def store_config_file(feast: FeastConfig) -> Path:
    """The yaml ``open_feature_store`` reads: ``feast.config_file`` (relative: inside the repo), else
    $FEAST_FS_YAML_FILE_PATH, else ``<repo>/feature_store.yaml``."""
    repo_path = resolve_repo_path(feast.repo_path)
    if feast.config_file is None:
        return Path(os.environ.get(FEAST_FS_YAML_FILE_PATH_ENV_NAME, repo_path / "feature_store.yaml"))
    config_file = feast.config_file if feast.config_file.is_absolute() else repo_path / feast.config_file
    if not config_file.exists():
        raise FileNotFoundError(f"feast.config_file: {config_file} does not exist")
    return config_file


def offline_store_type(feast: FeastConfig) -> str:
    """``offline_store.type`` of the store config (Feast's default, dask, when the yaml names none)."""
    config = yaml.safe_load(store_config_file(feast).read_text()) or {}
    offline = config.get("offline_store", "dask")
    return str(offline.get("type", "dask") if isinstance(offline, dict) else offline)


def resolve_repo_path(repo_path: Path) -> Path:
    """``repo_path`` against the working directory if it exists there, else against the project root."""
    if repo_path.is_absolute():
        candidates = [repo_path]
    else:
        candidates = [Path.cwd() / repo_path, PROJECT_ROOT / repo_path]
    for candidate in candidates:
        if (candidate / "definitions.py").exists():
            return candidate.resolve()
    raise FileNotFoundError(
        f"feast.repo_path: no Feast repo (definitions.py) at {' or '.join(str(c) for c in candidates)}"
    )


def feature_repo(
    feast: FeastConfig, features: FeaturesConfig, features_dir: str | Path, s3_endpoint: str | None = None
) -> Any:
    """The repo's Feast objects (``definitions.FeatureRepo``) over the tables in ``features_dir`` (a
    local folder, or an ``s3://`` one read through ``s3_endpoint``), with the data-source kind the
    configured offline store reads."""
    definitions = _definitions_module(resolve_repo_path(feast.repo_path))
    ttl = {name: timedelta(days=days) for name, days in feast.ttl_days.model_dump().items()}
    location = str(features_dir) if str(features_dir).startswith("s3://") else Path(features_dir).resolve()
    return definitions.build_feature_repo(
        location, features.stats_windows_days, ttl, offline_store_type(feast), s3_endpoint
    )


def registered_repo(feast: FeastConfig, features: FeaturesConfig, features_dir: str | Path) -> Any:
    """The objects to apply to the project's registry: over ``feast.source_uri``'s published copy of the
    tables when it is set (a registry shared by pods: recsys/feature_sources.py), else over
    ``features_dir`` itself (one machine: ``dvc repro``, run-local)."""
    if feast.source_uri is None:
        return feature_repo(feast, features, features_dir)
    from recsys.feature_sources import published_location
    from recsys.object_store import s3_endpoint

    location = published_location(features_dir, feast.source_uri)
    log.info("feast: registering the feature views over %s", location)
    return feature_repo(feast, features, location, s3_endpoint())


def materialize_online_store(
    store: FeatureStore, sources: Mapping[str, pa.Table | Path], build_repo: Callable[[Path], Any]
) -> tuple[datetime, datetime]:
    """Backfill the online store with every view's latest row up to the end of the data.

    ``materialize_incremental`` would start at now - TTL and skip the history, so the window is explicit:
    from the oldest feature row to one second past the newest (Feast's end bound is exclusive).

    Feast's ``materialize`` reads every row of a view in the window and keeps each entity's newest, the
    only row the online store holds. It runs over a copy of the tables pruned to those newest rows
    (``build_repo(folder)``: the definitions over it, in a staging registry whose online store is this
    store's), so the whole history is not read, converted and sorted just to be dropped; the online store
    gets the same rows, and this store's registry records the window as its own ``materialize`` would.
    A source given as a Parquet path is read a record batch at a time (memory: one row per entity), and
    each view is materialized ``MATERIALIZE_ROWS`` entities at a time (Feast converts a view's rows to
    Python protos at once): each entity is in one slice, so the online store gets the same rows.
    """
    scans = {name: _scan_newest(source, FEATURE_TABLE_KEYS[name]) for name, source in sources.items()}
    spans = [(first, last) for _, first, last in scans.values() if first is not None]
    start = min(first for first, _ in spans)
    end = max(last for _, last in spans) + timedelta(seconds=1)
    with tempfile.TemporaryDirectory(prefix="feast-materialize-") as tmp:
        staging_dir = Path(tmp)
        for name, (newest, _, _) in scans.items():  # the staged sources exist (their schema) before apply
            pq.write_table(newest.schema.empty_table(), staging_dir / f"{name}.parquet")
        staging = FeatureStore(config=_staging_config(store, staging_dir))
        repo = build_repo(staging_dir)
        staging.apply(repo.objects())
        for name, (newest, _, _) in scans.items():
            for first in range(0, newest.num_rows, MATERIALIZE_ROWS):
                part = newest.slice(first, MATERIALIZE_ROWS)
                pq.write_table(part, staging_dir / f"{name}.parquet", coerce_timestamps="us")
                staging.materialize(start_date=start, end_date=end, feature_views=[name])
    for name in repo.views:
        store.registry.apply_materialization(store.get_feature_view(name), store.project, start, end)
    return start, end


def _scan_newest(source: pa.Table | Path, key: str) -> tuple[pa.Table, datetime | None, datetime | None]:
    """Each entity's newest row of ``source`` and its first and last timestamps (None: no rows)."""
    if isinstance(source, pa.Table):
        batches: Iterable[pa.Table] = [source]
    else:
        parquet = pq.ParquetFile(source)
        batches = (pa.Table.from_batches([b]) for b in parquet.iter_batches(batch_size=NEWEST_BATCH_ROWS))
    newest, first, last = None, None, None
    for batch in batches:
        if not batch.num_rows:
            continue
        low, high = (v.as_py() for v in pc.min_max(batch.column(TIMESTAMP)).values())
        first = low if first is None else min(first, low)
        last = high if last is None else max(last, high)
        newest = _newest_rows(batch if newest is None else pa.concat_tables([newest, batch]), key)
    if newest is None:
        newest = source if isinstance(source, pa.Table) else pq.read_schema(source).empty_table()
    return newest, first, last


def _newest_rows(table: pa.Table, key: str) -> pa.Table:
    """Each entity's newest row (timestamps are unique per entity: the data contract)."""
    if not table.num_rows:
        return table
    keys = table.column(key).to_numpy()
    order = np.lexsort((table.column(TIMESTAMP).cast(pa.int64()).to_numpy(), keys))
    keys = keys[order]
    last = np.flatnonzero(np.append(keys[1:] != keys[:-1], True))
    return table.take(pa.array(order[last]))


def _staging_config(store: FeatureStore, staging_dir: Path) -> RepoConfig:
    """This store's project, online and offline stores, with a registry of its own in ``staging_dir``."""
    config = store.config
    online = config.online_store.model_dump()
    if online.get("type") == "sqlite" and not Path(online["path"]).is_absolute():
        online["path"] = str(Path(store.repo_path) / online["path"])  # as Feast resolves it for the store
    return staging_config(config, staging_dir, online, config.provider)


def staging_config(
    config: RepoConfig, staging_dir: Path, online_store: dict[str, Any], provider: str
) -> RepoConfig:
    """``config``'s project and offline store with a registry of its own in ``staging_dir``: objects applied
    there (pruned sources, staged views) never reach the project's registry."""
    return RepoConfig(
        project=config.project,
        provider=provider,
        registry=str(staging_dir / "registry.db"),
        online_store=online_store,
        offline_store=config.offline_store.model_dump(),
        entity_key_serialization_version=config.entity_key_serialization_version,
        repo_path=staging_dir,
    )


def _definitions_module(repo_path: Path) -> ModuleType:
    """Import ``<repo_path>/definitions.py`` (the Feast repo folder is not a Python package)."""
    path = repo_path / "definitions.py"
    name = f"_feast_definitions_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the Feast definitions from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module while the file runs
    spec.loader.exec_module(module)
    return module


def read_feature_table(features_dir: Path, name: str) -> pa.Table:
    return pq.read_table(feature_table_path(features_dir, name))


def feature_table_path(features_dir: Path, name: str) -> Path:
    """Feature table ``name``'s file in ``features_dir``, checked to exist with its key and timestamp."""
    path = features_dir / f"{name}.parquet"
    if not path.exists():
        raise DataContractError(f"{path}: feature table '{name}' not found (run the features step first)")
    columns = pq.read_schema(path).names
    for column in (FEATURE_TABLE_KEYS[name], TIMESTAMP):
        if column not in columns:
            raise DataContractError(f"{path}: feature table '{name}' has no column '{column}'")
    return path
