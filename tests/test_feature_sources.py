"""The shared registry's FileSources name feature tables in the object store, never a path inside one pod
(recsys/feature_sources.py), against a real S3 server on loopback (tests/s3_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from feast import FeatureStore
from feast.infra.offline_stores.file_source import FileSource

from components import online_store
from recsys.config import ConfigError, load_params
from recsys.contracts import FEATURE_TABLE_KEYS
from recsys.feature_sources import PUBLISHED, FeatureSourceError, published_location
from tests.conftest import REPO_ROOT, pipeline_workdir


def _feast(params, source_uri: str | None):
    return params.feast.model_copy(update={"source_uri": source_uri})


def _registered_sources(root: Path) -> dict[str, FileSource]:
    store = FeatureStore(repo_path=str(root / "feature_repo"))
    return {view.name: view.batch_source for view in store.list_feature_views()}


def test_the_registry_names_the_published_s3_copy_and_feast_reads_it_there(
    tiny_params, tiny_features_dir, s3_env, tmp_path
):
    """Before, the registry held the task's local artifact path: a file no other pod has."""
    source_uri = s3_env.uri("feature-tables")
    with pipeline_workdir(tmp_path):
        online_store.run(_feast(tiny_params, source_uri), tiny_params.features, tiny_features_dir)
        sources = _registered_sources(tmp_path)
        store = FeatureStore(repo_path=str(tmp_path / "feature_repo"))
        online = store.get_online_features(
            features=["user_stats:user_ctr_30d"], entity_rows=[{"user_id": 1}]
        ).to_dict()

    assert set(sources) == set(FEATURE_TABLE_KEYS)
    folders = {source.path.rsplit("/", 1)[0] for source in sources.values()}
    (folder,) = folders
    assert folder.startswith(f"{source_uri}/tables-")
    assert {s.s3_endpoint_override for s in sources.values()} == {s3_env.endpoint.url}
    key_prefix = folder[len(f"s3://{s3_env.name}/") :]
    objects = s3_env.client().list_objects_v2(Bucket=s3_env.name, Prefix=key_prefix)["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in objects) == sorted(
        [f"{name}.parquet" for name in FEATURE_TABLE_KEYS] + [PUBLISHED]
    )
    for name, source in sources.items():
        # Feast's own S3 file system (pyarrow, the source's endpoint) reads the registered table
        columns = dict(source.get_table_column_names_and_types(store.config))
        local = pq.read_table(tiny_features_dir / f"{name}.parquet")
        assert set(columns) == set(local.column_names)
        filesystem, path = FileSource.create_filesystem_and_path(source.path, source.s3_endpoint_override)
        assert pq.read_table(path, filesystem=filesystem).equals(local)
    assert online["user_ctr_30d"][0] is not None  # the backfill still ran, from the local copy


def test_publishing_again_writes_nothing_and_a_half_copy_is_never_registered(
    tiny_features_dir, s3_env, tmp_path
):
    source_uri = s3_env.uri("tables")
    client = s3_env.client()
    first = published_location(tiny_features_dir, source_uri)
    prefix = first[len(f"s3://{s3_env.name}/") :]
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=s3_env.name)["Contents"]}
    assert published_location(tiny_features_dir, source_uri) == first  # content-addressed, idempotent
    again = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=s3_env.name)["Contents"]}
    assert again == stamps

    # an interrupted copy (no marker) and a marker naming other bytes are both published afresh
    client.delete_object(Bucket=s3_env.name, Key=f"{prefix}/{PUBLISHED}")
    client.put_object(Bucket=s3_env.name, Key=f"{prefix}/user_stats.parquet", Body=b"truncated")
    assert published_location(tiny_features_dir, source_uri) == first
    body = client.get_object(Bucket=s3_env.name, Key=f"{prefix}/user_stats.parquet")["Body"].read()
    assert body == (tiny_features_dir / "user_stats.parquet").read_bytes()
    marker = json.loads(client.get_object(Bucket=s3_env.name, Key=f"{prefix}/{PUBLISHED}")["Body"].read())
    assert set(marker) == set(FEATURE_TABLE_KEYS)

    changed = tmp_path / "changed"
    changed.mkdir()
    for name in FEATURE_TABLE_KEYS:
        (changed / f"{name}.parquet").write_bytes((tiny_features_dir / f"{name}.parquet").read_bytes())
    pq.write_table(pq.read_table(changed / "item_stats.parquet").slice(1), changed / "item_stats.parquet")
    assert published_location(changed, source_uri) != first  # new bytes, a folder of their own


def test_an_unreachable_store_stops_the_step_naming_the_setting_and_registers_nothing(
    tiny_params, tiny_features_dir, s3_env, tmp_path
):
    with pipeline_workdir(tmp_path):
        with pytest.raises(FeatureSourceError, match=r"feast\.source_uri: s3://no-such-bucket-here"):
            online_store.run(
                _feast(tiny_params, "s3://no-such-bucket-here/t"), tiny_params.features, tiny_features_dir
            )
        assert not (tmp_path / "feature_repo" / "data" / "registry.db").exists()


def test_a_local_source_uri_publishes_to_a_folder(tiny_features_dir, tmp_path):
    location = published_location(tiny_features_dir, (tmp_path / "shared").as_uri())
    assert Path(location).parent == (tmp_path / "shared").resolve()
    assert (Path(location) / PUBLISHED).is_file()
    assert sorted(p.name for p in Path(location).glob("*.parquet")) == sorted(
        f"{name}.parquet" for name in FEATURE_TABLE_KEYS
    )


@pytest.mark.parametrize("uri", ["/data/tables", "s3://", "gs://bucket/tables", "feature-tables"])
def test_a_source_uri_that_is_not_an_object_store_folder_is_refused_naming_the_key(uri):
    with pytest.raises(ConfigError, match=r"feast\.source_uri"):
        load_params(REPO_ROOT / "params.yaml", overrides={"feast.source_uri": uri})


@pytest.mark.filterwarnings("ignore:There are some mismatches")  # entity columns: FeatureStore.apply's job
def test_dev_and_production_keep_separate_objects_in_one_shared_registry(tiny_params, monkeypatch, tmp_path):
    """feature_store.production.yaml takes its project from $FEAST_PROJECT (the environment's ConfigMap):
    two environments sharing one SQL registry (Feast's SqlRegistry, here on SQLite) never see each
    other's views or sources."""
    pytest.importorskip("redis", reason="the production yaml's redis online store needs feast[redis]")
    from feast.infra.registry.sql import SqlRegistry
    from feast.repo_config import load_repo_config

    from recsys.feature_store import feature_repo

    monkeypatch.setenv("FEAST_REGISTRY_PATH", f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379")
    tables = {"recsys_dev": "s3://dev-features/tables-a", "recsys_production": "s3://features/tables-b"}
    for project, folder in tables.items():
        monkeypatch.setenv("FEAST_PROJECT", project)
        config = load_repo_config(
            REPO_ROOT / "feature_repo", REPO_ROOT / "feature_repo" / "feature_store.production.yaml"
        )
        assert config.project == project
        registry = SqlRegistry(config.registry, config.project, None)
        repo = feature_repo(tiny_params.feast, tiny_params.features, folder, "http://minio:9000")
        for entity in repo.entities.values():
            registry.apply_entity(entity, project)
        for view in repo.views.values():
            registry.apply_feature_view(view, project)
    for project, folder in tables.items():
        views = registry.list_feature_views(project, allow_cache=False)
        assert sorted(v.name for v in views) == sorted(FEATURE_TABLE_KEYS)
        assert {v.batch_source.path.rsplit("/", 1)[0] for v in views} == {folder}


def test_an_unset_project_variable_is_named_before_feast_reads_the_yaml(tiny_params, monkeypatch):
    from recsys.feature_store import FeatureStoreConfigError, open_feature_store

    monkeypatch.delenv("FEAST_PROJECT", raising=False)
    monkeypatch.setenv("FEAST_REGISTRY_PATH", "sqlite:///unused.db")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379")
    feast = tiny_params.feast.model_copy(
        update={"config_file": REPO_ROOT / "feature_repo" / "feature_store.production.yaml"}
    )
    with pytest.raises(
        FeatureStoreConfigError, match=r"feature_store.production.yaml uses \$\{FEAST_PROJECT\}"
    ):
        open_feature_store(feast)
