"""Feast definitions of the recommender's features: entities, file sources, feature views, services.

Everything is built by :func:`build_feature_repo` from its inputs (where the feature tables live, the
statistics windows, the TTL of each view, the offline store that reads the tables) so that the
``feast`` CLI (through ``repo.py``) and the training-set step (``components/training_set.py``)
register exactly the same objects from params.yaml. This module defines no Feast object at import
time: ``feast apply`` imports every .py in the repo and would otherwise register a second copy.

Feature views mirror the feature tables of ``components/features.py`` one to one (see
``recsys/contracts.py``): the view name is the table name and every feature keeps its bare column
name, so training sets and online reads use the contract's names without a view prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_source import DataSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, Float64, Int64, String

TIMESTAMP = "event_timestamp"
USER_VIEWS = ("user_profile", "user_history", "user_stats")
ITEM_VIEWS = ("item_profile", "item_stats")
FEATURE_VIEWS = USER_VIEWS + ITEM_VIEWS

# Which views each model family consumes. Retrieval: the user tower reads the user views, the item
# tower the item views. Ranking: every feature (profiles, behaviour sequence for DIN attention,
# activity statistics as dense inputs). They are the same today; two services let them diverge
# without touching the training-set or serving code, which only name the service.
_VIEW_ORDER = ("user_profile", "user_stats", "item_profile", "item_stats", "user_history")
SERVICE_VIEWS: dict[str, tuple[str, ...]] = {
    "retrieval": _VIEW_ORDER,
    "ranking": _VIEW_ORDER,
}


@dataclass
class FeatureRepo:
    """The Feast objects of the project, by name."""

    entities: dict[str, Entity]
    sources: dict[str, DataSource]
    views: dict[str, FeatureView]
    services: dict[str, FeatureService]
    feature_names: dict[str, list[str]] = field(default_factory=dict)

    def objects(self) -> list[Entity | DataSource | FeatureView | FeatureService]:
        """Every object, in the order ``FeatureStore.apply`` accepts them."""
        return [
            *self.entities.values(),
            *self.sources.values(),
            *self.views.values(),
            *self.services.values(),
        ]


def build_feature_repo(
    features_dir: str | Path,
    stats_windows_days: list[int],
    ttl: dict[str, timedelta],
    offline_store: str = "duckdb",
    s3_endpoint: str | None = None,
) -> FeatureRepo:
    """Build the entities, sources, views and services over ``features_dir/<view>.parquet``.

    ``features_dir`` is used as given: pass an absolute path so the repo works from any working
    directory (a relative one is resolved by Feast against the repo folder), or an ``s3://`` folder (the
    published tables a shared registry names: recsys/feature_sources.py) read through ``s3_endpoint``
    (None: AWS). ``offline_store`` is the ``offline_store.type`` of the store config: the Spark store
    reads parquet through ``SparkSource`` (``s3a://`` for S3), every other (duckdb, file) through
    ``FileSource``; the tables and their meaning are the same.
    """
    missing = [name for name in FEATURE_VIEWS if name not in ttl]
    if missing:
        raise ValueError(f"build_feature_repo: no TTL for feature view(s) {missing}")
    user = Entity(
        name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A person shown items."
    )
    item = Entity(
        name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A recommendable item."
    )
    schemas = _schemas(stats_windows_days)
    entity_of = {name: user if name in USER_VIEWS else item for name in FEATURE_VIEWS}
    sources = {name: _source(name, str(features_dir), offline_store, s3_endpoint) for name in FEATURE_VIEWS}
    views = {
        name: FeatureView(
            name=name,
            entities=[entity_of[name]],
            ttl=ttl[name],
            schema=schemas[name],
            source=sources[name],
            online=True,
            description=_VIEW_DESCRIPTIONS[name],
        )
        for name in FEATURE_VIEWS
    }
    services = {
        name: FeatureService(
            name=name,
            features=[views[view] for view in view_names],
            description=f"Features consumed by the {name} models.",
        )
        for name, view_names in SERVICE_VIEWS.items()
    }
    return FeatureRepo(
        entities={"user": user, "item": item},
        sources=sources,
        views=views,
        services=services,
        feature_names={name: [f.name for f in schemas[name]] for name in FEATURE_VIEWS},
    )


def _source(name: str, features_dir: str, offline_store: str, s3_endpoint: str | None) -> DataSource:
    remote = features_dir.startswith("s3://")
    path = (
        f"{features_dir.rstrip('/')}/{name}.parquet"
        if remote
        else str(Path(features_dir) / f"{name}.parquet")
    )
    description = f"Feature table '{name}' written by components/features.py."
    if offline_store == "spark":
        return SparkSource(
            name=f"{name}_source",
            path="s3a://" + path[len("s3://") :] if remote else path,  # Hadoop's S3 file system
            file_format="parquet",
            timestamp_field=TIMESTAMP,
            description=description,
        )
    return FileSource(
        name=f"{name}_source",
        path=path,
        timestamp_field=TIMESTAMP,
        description=description,
        s3_endpoint_override=s3_endpoint if remote else None,
    )


_VIEW_DESCRIPTIONS = {
    "user_profile": "Static user attributes, valid from sign-up.",
    "user_history": "Last N clicked items and their categories, strictly before the row's timestamp.",
    "user_stats": "Daily 00:00 UTC snapshot of the user's impressions, clicks and CTR over past windows.",
    "item_profile": "Static item content attributes, valid from creation.",
    "item_stats": "Daily 00:00 UTC snapshot of the item's impressions, clicks and CTR over past windows.",
}


def _schemas(windows: list[int]) -> dict[str, list[Field]]:
    return {
        "user_profile": [
            Field(name="gender", dtype=String),
            Field(name="age_bucket", dtype=Int64),
            Field(name="occupation", dtype=String),
            Field(name="zip_prefix", dtype=String),
        ],
        "user_history": [
            Field(name="hist_item_ids", dtype=Array(Int64)),
            Field(name="hist_categories", dtype=Array(String)),
            Field(name="hist_length", dtype=Int64),
        ],
        "user_stats": _stats_fields("user", windows),
        "item_profile": [
            Field(name="category", dtype=String),
            Field(name="brand", dtype=String),
            Field(name="price", dtype=Float64),
        ],
        "item_stats": _stats_fields("item", windows),
    }


def _stats_fields(prefix: str, windows: list[int]) -> list[Field]:
    # The names of recsys.contracts.stats_features (a test checks they agree); spelled out so this
    # file depends on Feast only.
    fields: list[Field] = []
    for days in windows:
        fields += [
            Field(name=f"{prefix}_impressions_{days}d", dtype=Int64),
            Field(name=f"{prefix}_clicks_{days}d", dtype=Int64),
            Field(name=f"{prefix}_ctr_{days}d", dtype=Float64),
        ]
    return fields
