"""The schema of ``params.yaml``: one typed, validated pydantic section per top-level key.

Types, constraints and cross-checks only: no field has a default, params.yaml holds every value (the
one source; tests/recsys/test_config_source.py keeps the two in step)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from models.config import TrainingConfig
from models.registry import MODEL_KINDS, RANKERS, ModelsConfig
from recsys.config.cron import kfp_cron
from recsys.config.kubernetes import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DNS_SUBDOMAIN_MAX,
    IMAGE_DIGEST,
    IMAGE_REPO,
    IMAGE_TAG,
    QUANTITY,
    image_reference,
)
from recsys.config.presets import SYNTHETIC_PRESETS, SyntheticSizes
from recsys.config.section import Section

KfpCron = Annotated[str, AfterValidator(kfp_cron)]  # KFP's 6-field cron, checked before a server sees it
ImageDigest = Annotated[str, Field(pattern=IMAGE_DIGEST)]  # sha256:<64 hex>, a pushed image's manifest
# a Kubernetes Secret's name (an image pull secret)
SecretName = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=DNS_SUBDOMAIN_MAX)]
Namespace = Annotated[str, Field(pattern=DNS_LABEL)]  # a DNS-1123 label, as Kubernetes names namespaces

# --------------------------------------------------------------------------------------------------
# data


class SyntheticSource(Section):
    """The embedded deterministic generator with planted structure (see sources/synthetic.py)."""

    preset: Literal["tiny", "small", "default", "large"]
    # explicit sizes override the preset's, field by field
    n_users: int | None = Field(gt=0)
    n_items: int | None = Field(gt=0)
    n_events: int | None = Field(gt=0)
    n_categories: int | None = Field(gt=1)
    n_brands: int | None = Field(gt=0)
    days: int | None = Field(gt=1)
    max_events_per_user: int | None = Field(gt=1)
    start_date: datetime
    # structure knobs: how strongly each planted signal drives clicks
    taste_concentration: float = Field(gt=0)  # Dirichlet: smaller = fewer favourite categories
    popularity_exponent: float = Field(gt=0)  # Zipf exponent of item exposure
    sequential_prob: float = Field(ge=0, le=1)  # impressions from a successor of the last click
    explore_prob: float = Field(ge=0, le=1)  # impressions from a uniformly drawn category
    cold_start_fraction: float = Field(ge=0, lt=1)
    base_ctr_logit: float

    def sizes(self) -> SyntheticSizes:
        """The preset's sizes with any explicit override applied."""
        base = SYNTHETIC_PRESETS[self.preset].model_dump()
        overrides = {k: v for k, v in self.model_dump().items() if k in base and v is not None}
        return SyntheticSizes(**(base | overrides))

    @model_validator(mode="after")
    def _policy_sums_to_one(self) -> SyntheticSource:
        if self.sequential_prob + self.explore_prob > 1.0:
            raise ValueError(
                f"sequential_prob + explore_prob must be at most 1 (the rest of the impressions follow the "
                f"user's taste), got {self.sequential_prob} + {self.explore_prob}"
            )
        return self

    @model_validator(mode="after")
    def _start_is_aware(self) -> SyntheticSource:
        if self.start_date.tzinfo is None:
            self.start_date = self.start_date.replace(tzinfo=UTC)
        return self


class MovieLensSource(Section):
    """MovieLens ml-100k / ml-1m: a local directory or zip (``path``), else a checksummed download.

    ``url`` defaults to the GroupLens archive of the variant; ``sha256`` defaults to the published
    digest of that archive (sources/movielens.py), so a download is never used unverified.
    """

    variant: Literal["ml-100k", "ml-1m"]
    path: Path | None
    url: str | None = Field(pattern=r"^(https?|file)://")
    sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    cache_dir: Path
    download_timeout_s: float = Field(gt=0)
    positive_rating: int = Field(ge=1, le=5)


class MovieTweetingsSource(Section):
    """MovieTweetings (IMDb ratings 0-10 from tweets; sources/movietweetings.py): a local snapshot."""

    path: Path  # a directory or zip holding ratings.dat, movies.dat, users.dat (never downloaded)
    positive_rating: int = Field(ge=1, le=10)  # label 1 when rating >= this (8: the median, ~50% positive)


class CiaoSource(Section):
    """Ciao product reviews (ratings 0-5 with dates, Tang et al.; sources/ciao.py): a local snapshot."""

    path: Path  # a directory or zip holding rating_with_timestamp.mat (never downloaded)
    positive_rating: int = Field(ge=1, le=5)  # label 1 when rating >= this (5: the median, ~49% positive)


class EventColumns(Section):
    """The events files' column names for the contract's (sources/events.py): exactly one of ``label`` (0/1
    or true/false) and ``rating`` (a number; label 1 when it is >= ``EventsSource.positive_rating``)."""

    user_id: str
    item_id: str
    timestamp: str  # unix time in ``EventsSource.timestamp_unit``, ISO-8601 text or a timestamp type
    label: str | None
    rating: str | None

    @model_validator(mode="after")
    def _label_or_rating(self) -> EventColumns:
        if (self.label is None) == (self.rating is None):
            raise ValueError("set exactly one of label (a 0/1 column) and rating (a numeric column)")
        return self


class ItemColumns(Section):
    """The item table's column names; null: the column is absent (category/brand "unknown", price 0,
    created at the item's first event)."""

    item_id: str
    category: str | None
    brand: str | None
    price: str | None
    created_timestamp: str | None


class UserColumns(Section):
    """The user table's column names; null: the column is absent ("unknown", age_bucket 0, signed up at
    the user's first event)."""

    user_id: str
    gender: str | None
    age_bucket: str | None
    occupation: str | None
    zip_prefix: str | None
    signup_timestamp: str | None


class ItemTable(Section):
    paths: list[str]  # paths or globs (local or s3://), .parquet / .csv / .csv.gz; [] = no item table
    columns: ItemColumns


class UserTable(Section):
    paths: list[str]  # as ItemTable.paths; [] = no user table
    columns: UserColumns


NUMERIC_BOUNDED = ("rating", "price", "age_bucket")
CATEGORICAL_BOUNDED = ("gender", "occupation", "zip_prefix", "category", "brand")


class EventBounds(Section):
    """Plausible values, keyed by the contract's column names: a value outside fails naming file, row and
    column. A key whose column is not mapped is not checked."""

    numeric: dict[str, tuple[float, float]]  # rating / price / age_bucket -> [low, high], inclusive
    categories: dict[str, list[str]]  # gender / occupation / zip_prefix / category / brand -> allowed values

    @model_validator(mode="after")
    def _known_columns(self) -> EventBounds:
        for name, known in (("numeric", NUMERIC_BOUNDED), ("categories", CATEGORICAL_BOUNDED)):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ValueError(f"{name}: unknown column(s) {unknown}; bounded columns: {list(known)}")
        for column, (low, high) in self.numeric.items():
            if low > high:
                raise ValueError(f"numeric.{column}: low {low} exceeds high {high}")
        return self


class EventsSource(Section):
    """Your own event logs (sources/events.py): files or globs, local or ``s3://`` (the promote store's
    environment: AWS_ENDPOINT_URL, credentials), mapped onto the contract by column name."""

    paths: list[str] = Field(min_length=1)  # paths or globs; the format follows the suffix
    columns: EventColumns
    positive_rating: float | None  # with columns.rating: label 1 when rating >= this
    timestamp_unit: Literal["s", "ms", "us", "ns"]  # of numeric timestamps
    # exact duplicates of (user, item, timestamp): one row is kept; its label is 1 if any copy is 1
    # ("any") or the last copy read's ("last": the files in the order listed, rows in file order)
    duplicate_label: Literal["any", "last"]
    # the log is streamed: files read, checked and spilled this many rows at a time, merged, deduplicated
    # and ordered on disk by DuckDB under its memory limit, in the spill folder (null: system temp folder)
    batch_rows: int = Field(gt=0)
    duckdb_memory_limit: str = Field(pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    spill_dir: Path | None
    items: ItemTable
    users: UserTable
    bounds: EventBounds

    @model_validator(mode="after")
    def _threshold_with_rating(self) -> EventsSource:
        if (self.columns.rating is None) != (self.positive_rating is None):
            raise ValueError("positive_rating is set exactly when columns.rating is (the label threshold)")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "movielens", "movietweetings", "ciao", "events"]
    # the data as known before this instant (exclusive): events, users and items created before it;
    # null = everything. A scheduled Kubeflow run sets it to the start of its scheduled day
    until: datetime | None
    synthetic: SyntheticSource
    movielens: MovieLensSource
    movietweetings: MovieTweetingsSource
    ciao: CiaoSource
    events: EventsSource

    @model_validator(mode="after")
    def _until_is_aware(self) -> DataConfig:
        if self.until is not None and self.until.tzinfo is None:
            self.until = self.until.replace(tzinfo=UTC)
        return self


# --------------------------------------------------------------------------------------------------
# features


SPARK_MEMORY = r"^[0-9]+([kmgtp]b?)?$"  # Spark's JVM memory strings: 512m, 4g (JavaUtils.byteStringAs)


class SparkApplicationConfig(Section):
    """``features.engine: spark`` on a cluster: the Kubeflow Spark Operator ``SparkApplication`` the
    features task creates and waits for (recsys/spark_application.py)."""

    image: str = Field(min_length=1)  # a Spark 4 Python image with this project installed (spark_features)
    # recsys/spark_features.py inside that image, as spark-submit names it (local:// = in the image)
    main_application_file: str = Field(pattern=r"^local:///\S+\.py$")
    spark_version: str = Field(pattern=r"^\d+\.\d+\.\d+$")
    service_account: str = Field(pattern=DNS_SUBDOMAIN)  # the driver's: it creates the executor pods
    driver_cores: int = Field(ge=1)
    driver_memory: str = Field(pattern=SPARK_MEMORY)
    executor_instances: int = Field(ge=1)
    executor_cores: int = Field(ge=1)
    executor_memory: str = Field(pattern=SPARK_MEMORY)
    timeout_s: int = Field(gt=0)  # the task's wait for COMPLETED / FAILED


class SparkFeaturesConfig(Section):
    """The Spark session of ``features.engine: spark`` (recsys/spark_features.py)."""

    master: str = Field(min_length=1)  # local[*] on one machine; a cluster's SparkApplication sets its own
    driver_memory: str = Field(pattern=SPARK_MEMORY)
    shuffle_partitions: int = Field(ge=1)
    conf: dict[str, str]  # any other spark.* setting, e.g. spark.hadoop.fs.s3a.* for s3a:// paths
    application: SparkApplicationConfig


class FeaturesConfig(Section):
    """Feature tables computed from the raw tables for Feast file sources."""

    history_length: int = Field(gt=0, le=512)
    stats_windows_days: list[int] = Field(min_length=1)
    # events per user / item key range computed at a time (recsys/event_partitions.py) and rows per row
    # group of the history and statistics tables: memory follows it, not the number of events
    batch_rows: int = Field(gt=0)
    # local: this process (components/features.py); spark: the same tables on Spark (recsys/spark_features.py)
    engine: Literal["local", "spark"]
    spark: SparkFeaturesConfig | None  # required by engine: spark

    @model_validator(mode="after")
    def _windows_positive_and_unique(self) -> FeaturesConfig:
        if any(w <= 0 for w in self.stats_windows_days):
            raise ValueError("stats_windows_days: every window must be a positive number of days")
        if len(set(self.stats_windows_days)) != len(self.stats_windows_days):
            raise ValueError("stats_windows_days: windows must be unique")
        if self.engine == "spark" and self.spark is None:
            raise ValueError("spark: engine is spark but the features.spark section is missing")
        return self


# --------------------------------------------------------------------------------------------------
# feast, training_set, validation (components/training_set.py, components/validate.py)


class FeatureViewTTLs(Section):
    """Days a feature row stays valid for the as-of join (and online reads); older rows give defaults."""

    user_profile: float = Field(gt=0)
    item_profile: float = Field(gt=0)
    user_history: float = Field(gt=0)
    user_stats: float = Field(gt=0)
    item_stats: float = Field(gt=0)


class FeastConfig(Section):
    """The Feast feature repo (feature_repo/): where it lives, which store config, the views' TTLs."""

    # resolved against the working directory, else against the project root (so any cwd works)
    repo_path: Path
    # null: $FEAST_FS_YAML_FILE_PATH when set (the cluster's production config), else
    # <repo_path>/feature_store.yaml; a relative path is taken inside repo_path
    config_file: Path | None
    ttl_days: FeatureViewTTLs
    materialize: bool  # backfill the online store up to the end of the data after the training sets
    # null: the views' FileSources name the step's own feature-table folder (one machine); s3://... (or
    # file:///...): the tables are published there first and the registry names that copy, which every
    # pod sharing the registry can read (recsys/feature_sources.py). A Kubeflow run sets it from
    # pipeline.feature_tables_uri
    source_uri: str | None

    @field_validator("source_uri")
    @classmethod
    def _source_uri(cls, uri: str | None) -> str | None:
        if uri is None or re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?|file:///.*", uri):
            return uri
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix or file:///folder URI")


class TrainingSetConfig(Section):
    """Point-in-time training sets from Feast, split by event time into train < valid < test."""

    # the last test_fraction of the days is test, the valid_fraction before it valid (whole UTC days)
    valid_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    # explicit cut points (both or neither) override the fractions: valid = [valid_start, test_start)
    valid_start: datetime | None
    test_start: datetime | None
    # candidate (entity row, feature row) pairs per time chunk of one view's point-in-time join: each
    # chunk reads only the feature rows it can use (recsys/point_in_time.py)
    chunk_rows: int = Field(gt=0)
    # entity rows per get_historical_features call: the chunks of a call share it (partitioned keys).
    # Also the step's batch: a batch is joined, filled and written (one row group) before the next
    call_rows: int = Field(gt=0)
    # DuckDB offline store and the step's time-sorted copies (its own connection): memory limit (DuckDB
    # syntax, "4GB"; null: DuckDB's 80% of RAM) and the folder a join or sort spills to beyond it (null:
    # DuckDB's default, <database>.tmp / the working directory; the sorted copies: the system temp folder)
    duckdb_memory_limit: str | None = Field(pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    duckdb_spill_dir: Path | None

    @model_validator(mode="after")
    def _consistent_splits(self) -> TrainingSetConfig:
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError("valid_fraction + test_fraction must leave some days for training (< 1)")
        if (self.valid_start is None) != (self.test_start is None):
            raise ValueError("valid_start and test_start: give both cut points or neither")
        for name in ("valid_start", "test_start"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                setattr(self, name, value.replace(tzinfo=UTC))
        both = self.valid_start is not None and self.test_start is not None
        if both and self.valid_start >= self.test_start:
            raise ValueError("valid_start must be before test_start")
        return self


class RowCountBounds(Section):
    """Inclusive row-count bounds per raw table; null max = unbounded."""

    users_min: int = Field(ge=1)
    users_max: int | None = Field(ge=1)
    items_min: int = Field(ge=1)
    items_max: int | None = Field(ge=1)
    events_min: int = Field(ge=1)
    events_max: int | None = Field(ge=1)


class ValidationConfig(Section):
    """great-expectations gates on the raw tables and the training sets (components/validate.py)."""

    # event times must lie in [earliest_timestamp, now]
    earliest_timestamp: datetime
    row_counts: RowCountBounds
    # share of positive labels in the raw events and in each ranking split
    positive_rate_min: float = Field(ge=0, le=1)
    positive_rate_max: float = Field(ge=0, le=1)
    max_null_fraction: float = Field(ge=0, lt=1)  # per training-set column
    unexpected_examples: int = Field(ge=1, le=200)  # bad values shown per failure

    @model_validator(mode="after")
    def _ordered_bounds(self) -> ValidationConfig:
        if self.positive_rate_min > self.positive_rate_max:
            raise ValueError("positive_rate_min must not exceed positive_rate_max")
        if self.earliest_timestamp.tzinfo is None:
            self.earliest_timestamp = self.earliest_timestamp.replace(tzinfo=UTC)
        return self


# --------------------------------------------------------------------------------------------------
# evaluation (components/evaluate.py)


class EvaluationConfig(Section):
    """Test-window evaluation: full-catalogue retrieval metrics at each K, ranker metrics vs baselines."""

    ks: list[int] = Field(min_length=1)
    exclude_seen: bool  # drop items the user clicked before the test window from their ranking
    headline_k: int  # the K of the best retrieval baseline, the lifts and the intervals; one of ks
    # recent-popularity baseline: its window is chosen on the validation split among these (and all time)
    recent_windows_days: list[int] = Field(min_length=1)
    # EASE^R inverts an items x items matrix: above this many trained items it is skipped, saying so
    ease_max_items: int = Field(gt=0)
    # the most-clicked share of catalogue items before the test window: the "head" segment (the rest: tail)
    head_item_share: float = Field(gt=0, lt=1)
    bootstrap_samples: int = Field(ge=10)  # user resamples behind each confidence interval
    confidence: float = Field(gt=0, lt=1)  # of the intervals (percentile bootstrap)
    # shares of the retrieval slots given to recent popularity (models/blend.py), one chosen on validation
    # recall@headline_k and served; 0 = the two-tower alone, 1 = popularity alone; [] = no blend
    blend_shares: list[float]
    blend_popular_items: int = Field(gt=0)  # length of the popularity list the bundle carries for it
    # the blend's second list, chosen on validation among these: recent popularity, or item-kNN over the
    # user's history feature (its neighbour table, blend_neighbours per item, joins the bundle)
    blend_sources: list[Literal["popularity", "item_knn"]] = Field(min_length=1)
    blend_neighbours: int = Field(gt=0)  # neighbours per item in that table (item_neighbours.npz)

    @model_validator(mode="after")
    def _positive_ks(self) -> EvaluationConfig:
        if any(not 0.0 <= share <= 1.0 for share in self.blend_shares):
            raise ValueError(f"blend_shares: every share must lie in [0, 1], got {self.blend_shares}")
        if any(k <= 0 for k in self.ks):
            raise ValueError("ks: every K must be positive")
        if self.headline_k not in self.ks:
            raise ValueError(f"headline_k: {self.headline_k} is not one of ks {self.ks}")
        if any(d <= 0 for d in self.recent_windows_days):
            raise ValueError("recent_windows_days: every window must be positive")
        return self


# --------------------------------------------------------------------------------------------------
# search (components/search.py): Optuna locally, the same space as Katib Experiments on the cluster


class SearchParameter(Section):
    """One searched value: a float or int range (log-uniform when ``log``) or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None
    high: float | None
    log: bool
    choices: list[Any] | None

    @model_validator(mode="after")
    def _complete(self) -> SearchParameter:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical: give the choices (low/high null)")
            return self
        if self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"{self.type}: give low < high, got {self.low} and {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log: low must be positive")
        return self


class KatibSearchConfig(Section):
    """The Katib Experiments of manifests/katib/search.yaml. Their trials read the params and training
    sets that ``python -m components.search stage`` put on ``pipeline.training_volume``, and run on the
    training tasks' GPUs (``pipeline.accelerator_*``, ``gpu_tolerations``, ``gpu_node_selector``)."""

    parallel_trials: int = Field(ge=1)
    max_failed_trials: int = Field(ge=0)


class SearchConfig(Section):
    """Hyper-parameter search per model on the validation split; off unless ``enabled``."""

    enabled: bool
    trials: int = Field(ge=1)  # per model
    # model kind -> dotted params key (models.<kind>.* or training.*) -> distribution
    space: dict[str, dict[str, SearchParameter]]
    katib: KatibSearchConfig

    @field_validator("space")
    @classmethod
    def _known_models(
        cls, space: dict[str, dict[str, SearchParameter]]
    ) -> dict[str, dict[str, SearchParameter]]:
        for kind, keys in space.items():
            if kind not in MODEL_KINDS:
                raise ValueError(f"space: unknown model '{kind}'; expected one of {list(MODEL_KINDS)}")
            for key in keys:
                if not (key.startswith(f"models.{kind}.") or key.startswith("training.")):
                    raise ValueError(f"space.{kind}: '{key}' must be a models.{kind}.* or training.* key")
        return space


# --------------------------------------------------------------------------------------------------
# index, bundle, gate


class IndexConfig(Section):
    """The FAISS index over the item embeddings (components/build_index.py); always inner product."""

    type: Literal["auto", "flat", "hnsw", "ivf_pq"]
    # auto: exact IndexFlatIP below flat_max_items, IVF-PQ from ivf_pq_min_items, HNSW in between
    flat_max_items: int = Field(gt=0)
    ivf_pq_min_items: int = Field(gt=0)
    k: int = Field(gt=0)
    recall_target: float = Field(gt=0, le=1)
    tune_queries: int = Field(gt=0)
    tune_margin_sigmas: float = Field(ge=0)
    norm_tolerance: float = Field(gt=0, lt=1)
    hnsw_m: int = Field(ge=4, le=256)
    hnsw_ef_construction: int = Field(gt=0)
    ef_search_max: int = Field(gt=0)
    # an approximate index missing recall_target is replaced by exact search up to this many items (0: never)
    flat_fallback_max_items: int = Field(ge=0)
    ivf_nlist: int | None = Field(gt=0)
    ivf_train_per_list: int = Field(ge=39)
    pq_m: int | None = Field(gt=0)
    pq_nbits: int = Field(ge=4, le=12)
    refine_k_factor: float | None = Field(ge=1)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> IndexConfig:
        if self.flat_max_items > self.ivf_pq_min_items:
            raise ValueError("flat_max_items must not exceed ivf_pq_min_items")
        return self


class ExportConfig(Section):
    """What the export step writes besides the embeddings (components/export.py)."""

    popular_items: int = Field(gt=0)  # the cold-start list serving falls back to


class OpeGateConfig(Section):
    """Off-policy estimate of a challenger's CTR from the champion's request log (components/ope.py), and
    whether the gate requires it (``enabled``). The estimates' intervals are normal approximations over
    requests (the delta method for SNIPS)."""

    enabled: bool  # the gate reads metrics/ope.json and judges the challenger by it
    metric: Literal["ips", "snips", "dr"]  # the estimator the gate judges by
    # not_worse: reject when the challenger-minus-champion interval lies wholly below -margin;
    # better: reject unless it lies wholly above +margin
    require: Literal["not_worse", "better"]
    margin: float = Field(ge=0)  # absolute CTR
    confidence: float = Field(gt=0, lt=1)  # of every interval components/ope.py reports
    min_requests: int = Field(ge=1)  # fewer usable logged requests: components/ope.py refuses


class GateConfig(Section):
    """Deploy gate (components/gate.py): new metrics vs the deployed bundle's, per metric direction."""

    deployed_bundle: str | None
    tolerance: float = Field(ge=0, lt=1)
    # interval: reject only when the difference's bootstrap interval lies beyond the tolerance; point: values
    compare: Literal["interval", "point"]
    metrics: dict[str, Literal["higher", "lower"]] = Field(min_length=1)
    ope: OpeGateConfig


class PromoteConfig(Section):
    """Where components/promote.py puts the gated bundle: ``<uri>/<version>/`` + the ``<uri>/current.json``
    pointer; ``secret`` holds the store's endpoint and credentials (KFP tasks and KServe both read it)."""

    uri: str = Field(pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/]+)*/?|file:///.+)$")
    version: str | None = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    secret: str = Field(pattern=DNS_LABEL)


# --------------------------------------------------------------------------------------------------
# pipeline (Kubeflow) and deploy (KServe)


class Resources(Section):
    """Kubernetes requests and limits of one container (quantities as Kubernetes writes them)."""

    cpu_request: str = Field(pattern=QUANTITY)
    cpu_limit: str = Field(pattern=QUANTITY)
    memory_request: str = Field(pattern=QUANTITY)
    memory_limit: str = Field(pattern=QUANTITY)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        from kubernetes.utils.quantity import parse_quantity

        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if parse_quantity(request) > parse_quantity(limit):
                raise ValueError(f"{kind}_request {request} exceeds {kind}_limit {limit}")
        return self

    def requests(self) -> dict[str, str]:
        return {"cpu": self.cpu_request, "memory": self.memory_request}

    def limits(self) -> dict[str, str]:
        return {"cpu": self.cpu_limit, "memory": self.memory_limit}


class Toleration(Section):
    """A Kubernetes toleration (core/v1 Toleration, without tolerationSeconds)."""

    key: str | None
    operator: Literal["Equal", "Exists"]
    value: str | None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key must use operator Exists")
        return self


class RefreshPipelineConfig(Section):
    """The second, short-cycle pipeline (pipelines/index_refresh.py): new catalogue items into the served
    index between trainings. Same images, namespace, experiment and service account as the training one."""

    name: str = Field(pattern=DNS_LABEL)
    cron: KfpCron  # 6 fields: hourly by default, so a new item waits at most an hour (plus the poll)


class PipelineConfig(Section):
    """The Kubeflow pipeline (pipelines/): its image, cluster settings, resources and schedule.

    These are compile-time defaults; the image tag, GPU type, namespace and data source are also
    pipeline parameters, so a run can override them without recompiling.
    """

    name: str = Field(pattern=DNS_LABEL)
    image_repo: str = Field(pattern=IMAGE_REPO)
    # the four training tasks: the same Dockerfile with CUDA torch (images/build.py training)
    training_image_repo: str = Field(pattern=IMAGE_REPO)
    # one release tag for both images (pipeline and serving); pinned, never "latest"
    image_tag: str = Field(pattern=IMAGE_TAG)
    # the images pinned by digest (compile --images images/pushed.json sets them); None: repo:image_tag
    image_digest: ImageDigest | None
    training_image_digest: ImageDigest | None
    # Secrets (type kubernetes.io/dockerconfigjson) every pod of the pipelines pulls its image with
    image_pull_secrets: list[SecretName]
    # the profile namespace that owns runs and the schedule; None: the kfp client's own (its context file,
    # or the pod's namespace in-cluster), and a task's pod namespace for what the tasks create
    namespace: Namespace | None
    service_account: str = Field(pattern=DNS_LABEL)
    run_as_user: int = Field(ge=1)  # the pipeline images' non-root uid and gid (images/pipeline.Dockerfile)
    # every task's container runs as run_as_user, runAsNonRoot, all capabilities dropped (kfp-kubernetes
    # set_security_context): a KFP backend >= 2.17 only (2.15 refuses the run, 2.4.1's driver drops it)
    task_security_context: bool
    experiment: str = Field(min_length=1)
    cron: KfpCron
    max_concurrency: int = Field(ge=1)
    accelerator_type: str = Field(min_length=1)
    accelerator_limit: int = Field(ge=1)
    train_resources: Resources
    step_resources: Resources
    retries: int = Field(ge=0, le=5)
    # the Feast tasks get deploy.feast_config_map as a volume and these keys of deploy.feast_secret as env
    feast_secret_keys: list[str] = Field(min_length=1)
    # a run's feast.source_uri: where the Feast tasks publish the feature tables the registry names
    feature_tables_uri: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?$")
    gpu_tolerations: list[Toleration]  # the training tasks' (and PyTorchJob pods') tolerations
    gpu_node_selector: dict[str, str]  # ... and node selector
    training_nodes: int = Field(ge=1)  # >1: a PyTorchJob (Kubeflow Training Operator) per training task
    training_volume: str = Field(pattern=DNS_LABEL)  # RWX PVC shared with the PyTorchJob pods (multi-node)
    training_job_timeout_s: int = Field(gt=0)
    index_refresh: RefreshPipelineConfig

    @model_validator(mode="after")
    def _two_pipelines(self) -> PipelineConfig:
        if self.index_refresh.name == self.name:
            raise ValueError(f"index_refresh.name must differ from the training pipeline's {self.name!r}")
        return self

    @field_validator("feast_secret_keys")
    @classmethod
    def _env_names(cls, keys: list[str]) -> list[str]:
        bad = [key for key in keys if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return keys

    @field_validator("image_tag")
    @classmethod
    def _tag_pinned(cls, tag: str) -> str:
        if tag == "latest":
            raise ValueError("pin a release tag; 'latest' makes runs unreproducible")
        return tag

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets_unique(cls, names: list[str]) -> list[str]:
        return _unique_secrets(names)

    @property
    def image(self) -> str:
        """The CPU steps' image reference, as the compiled pipeline names it (by digest when pinned)."""
        return image_reference(self.image_repo, self.image_tag, self.image_digest)

    @property
    def training_image(self) -> str:
        """The GPU training tasks' image reference (by digest when pinned)."""
        return image_reference(self.training_image_repo, self.image_tag, self.training_image_digest)


class RequestLogConfig(Section):
    """Every answer the server gives, as Parquet rows (serving/request_log.py); read by the monitor."""

    enabled: bool
    uri: str = Field(min_length=1)  # a folder, file:///folder or s3://bucket/prefix
    flush_rows: int = Field(gt=0)  # a file is written when this many rows are buffered ...
    flush_interval_s: float = Field(gt=0)  # ... or this often
    max_buffer_rows: int = Field(gt=0)  # rows beyond this are dropped and counted (a slow or dead sink)
    feature_sample: float = Field(ge=0, le=1)  # share of rows that carry the user features used
    retention_days: int = Field(ge=0)  # local folders: day partitions older than this go (0: keep all)

    @model_validator(mode="after")
    def _buffer_holds_a_file(self) -> RequestLogConfig:
        if self.flush_rows > self.max_buffer_rows:
            raise ValueError(
                f"flush_rows {self.flush_rows} exceeds max_buffer_rows {self.max_buffer_rows}: "
                "the buffer must hold a whole file"
            )
        return self


class IndexSwapConfig(Section):
    """A running server takes up a refreshed index (same models, more items) without a restart."""

    store_uri: str  # the promote store whose current.json is polled (s3://... or file:///...); "" = off
    interval_s: float = Field(gt=0)  # how often current.json is read


class ExplorationConfig(Section):
    """Exploration on the ``recommend`` answers (serving/exploration.py): each slot is sampled from the ranked
    candidates, and the probability it had is logged (``propensities``) for off-policy evaluation
    (components/ope.py). ``none`` serves the ranked top-n unchanged (propensity 1 everywhere)."""

    policy: Literal["none", "epsilon_greedy", "softmax"]
    epsilon: float = Field(gt=0, le=1)  # epsilon_greedy: per slot, a uniform pick among the rest this often
    temperature: float = Field(gt=0)  # softmax: Plackett-Luce sampling over scores / temperature
    seed: int | None = Field(ge=0)  # null: fresh entropy; else each request's generator derives from it


class ServingConfig(Section):
    """The model server (``python -m serving``): request limits, defaults and online-feature behaviour."""

    host: str  # bind address of the REST server; tests and benchmarks use 127.0.0.1
    max_batch: int = Field(gt=0, le=10_000)  # users (V1 instances / V2 rows) per request
    max_candidates: int = Field(gt=0, le=100_000)  # item ids per ranking request
    default_k: int = Field(gt=0)  # retrieval: items returned when the request names no k
    max_k: int = Field(gt=0)
    retrieve_k: int = Field(gt=0)  # recommend: candidates retrieved, then ranked
    default_n: int = Field(gt=0)  # recommend: items returned when the request names no n
    max_n: int = Field(gt=0)
    default_ranker: str  # one of the registry's ranking models
    online_store: bool  # false: features only from the request, else the contract's defaults
    feast_timeout_s: float = Field(gt=0)  # an online read slower than this counts as down
    item_cache_ttl_s: float = Field(ge=0)  # item features are cached this long (0: never)
    exclude_history: bool  # recommend leaves out items in the user's click history
    torch_threads: int = Field(ge=1)  # intra-op threads per server process
    # server processes on the one port (serving/workers.py); each holds the models and its own requests
    workers: int = Field(ge=1, le=64)
    # a request body larger than this is refused with 413 before it is read (serving/request_limits.py)
    max_request_bytes: int = Field(ge=1_024)
    request_id_max_length: int = Field(ge=1)  # a V2 request's id is echoed back: bounded
    request_log: RequestLogConfig
    index_swap: IndexSwapConfig
    exploration: ExplorationConfig

    @model_validator(mode="after")
    def _ranges_consistent(self) -> ServingConfig:
        if self.default_k > self.max_k:
            raise ValueError("default_k must not exceed max_k")
        if self.retrieve_k > self.max_k:
            raise ValueError("retrieve_k must not exceed max_k")
        if self.default_n > self.max_n:
            raise ValueError("default_n must not exceed max_n")
        if self.max_n > self.retrieve_k:
            raise ValueError("max_n must not exceed retrieve_k (recommend ranks retrieve_k candidates)")
        return self

    @field_validator("default_ranker")
    @classmethod
    def _known_ranker(cls, kind: str) -> str:
        if kind not in RANKERS:
            raise ValueError(f"unknown ranker '{kind}'; expected one of {list(RANKERS)}")
        return kind


class Limits(Section):
    """A monitored value's warn and fail thresholds (which side is bad is the check's: see monitor)."""

    warn: float
    fail: float


class MonitorConfig(Section):
    """The monitor step (components/monitor.py): what the served traffic is checked against, and when a
    check warns or fails."""

    window_hours: float = Field(gt=0)  # the request log's last hours are checked
    min_answers: int = Field(ge=1)  # fewer logged answers: the traffic checks are skipped
    reference_split: Literal["train", "valid", "test"]  # the training set's split served features face
    reference_rows: int = Field(ge=1)  # a larger split is sampled (every k-th row) to this many rows
    psi: Limits  # population stability index per user feature, served vs the training set (higher: worse)
    psi_bins: int = Field(ge=2, le=100)  # quantile bins of a numeric feature; top categories + "other"
    skew_match_rate: (
        Limits  # served feature values equal to Feast's offline point-in-time ones (lower: worse)
    )
    skew_sample: int = Field(ge=1)  # logged answers whose features are recomputed offline
    empty_rate: Limits  # answers with no items (higher: worse)
    degraded_rate: Limits  # answers on default features, online store down (higher: worse)
    online_recall: Limits  # the served ANN index's recall@recall_k vs exact search (lower: worse)
    recall_k: int = Field(ge=1)
    recall_sample: int = Field(ge=1)  # logged queries re-run exactly
    index_missing_share: Limits  # catalogue items with recent events missing from the index (higher: worse)
    recent_item_days: int = Field(ge=1)  # an item is available when it had an event in this many days
    embedding_age_hours: Limits  # age of the served item embeddings (higher: worse)
    attribution_hours: float = Field(gt=0)  # a click this soon after an answer counts for the served item
    stop_on_fail: bool  # a failed check exits 1: the scheduled run stops before training
    pushgateway: str  # host:port of a Prometheus Pushgateway ("" = only the text file)


class CtrGuardrailConfig(Section):
    """Served CTR per bundle version during the soak: the request log joined with the click feedback."""

    request_log_uri: str  # where the pods log their answers (deploy.request_log_uri); "" = no CTR guardrail
    clicks_uri: str  # click feedback (request_id, user_id, item_id, label): Parquet file, folder or s3://
    min_impressions: int = Field(ge=1)  # per version: fewer, the CTR guardrail has insufficient data
    min_ctr_ratio: float = Field(gt=0, le=1)  # breach: canary CTR below this x the champion's

    @model_validator(mode="after")
    def _clicks_with_log(self) -> CtrGuardrailConfig:
        if self.request_log_uri and not self.clicks_uri:
            raise ValueError("clicks_uri is empty: the CTR guardrail needs the click feedback to join")
        return self


class GuardrailsConfig(Section):
    """What the canary does to users decides its promotion during the soak (recsys/guardrails.py)."""

    enabled: bool
    prometheus_url: str = Field(pattern=r"^https?://[^/\s]+")  # its HTTP API (/api/v1/query)
    window: str = Field(pattern=r"^[1-9][0-9]*[smh]$")  # PromQL range the rates are taken over
    interval_s: float = Field(gt=0)  # how often the guardrails are evaluated during the soak
    query_timeout_s: float = Field(gt=0)
    endpoint: Literal["recommend", "retrieval", "ranking"]  # the model whose answers are judged
    min_requests: int = Field(ge=1)  # canary answers in the window before a rate may decide
    max_error_rate: float = Field(ge=0, le=1)  # failed predict calls / predict calls
    max_p99_latency_s: float = Field(gt=0)  # KServe's request_predict_seconds, 99th percentile
    max_empty_rate: float = Field(ge=0, le=1)  # answers with no items / answers
    # still too little data when the soak ends: roll back (safe) or promote (trust readiness alone)
    on_insufficient_data: Literal["rollback", "promote"]
    ctr: CtrGuardrailConfig


class DeployConfig(Section):
    """The KServe InferenceService that components/deploy.py creates or updates."""

    isvc_name: str = Field(pattern=DNS_LABEL)
    # None: the deploy task's own namespace (the run's profile); the rendered manifest names none, so the
    # kustomize overlay's `namespace:` places it (manifests/overlays)
    namespace: Namespace | None
    image_repo: str = Field(pattern=IMAGE_REPO)
    image_digest: ImageDigest | None  # the serving image pinned by digest; None: repo:pipeline.image_tag
    image_pull_secrets: list[SecretName]  # the predictor pods pull the serving image with these Secrets
    # the bundle to serve when deploying by hand / from the manifests; the pipeline passes its own bundle
    storage_uri: str = Field(pattern=r"^[a-z][a-z0-9+.-]*://.+")
    service_account: str = Field(pattern=DNS_LABEL)
    http_port: int = Field(ge=1024, le=65535)
    min_replicas: int = Field(ge=0)
    max_replicas: int = Field(ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"]
    scale_target: int = Field(gt=0)
    resources: Resources
    run_as_user: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    # a pipeline rollout: the new model gets this share of traffic until it is Ready and healthy
    canary_traffic_percent: int = Field(ge=1, le=99)
    canary_soak_s: float = Field(ge=0)
    # where the production Feast config lives in the cluster (names only: values are never committed)
    feast_config_map: str = Field(pattern=DNS_LABEL)
    feast_secret: str = Field(pattern=DNS_LABEL)
    # the served pods' request log (their root filesystem is read-only): an s3:// prefix, "" = off; a
    # Kubeflow run's monitor task reads it there
    request_log_uri: str = Field(pattern=r"^(s3://[^/]+.*)?$")
    index_swap: bool  # the pods poll promote.uri and take up the hourly index refresh without a restart
    # the pods' own object-store credentials (AWS_* keys + KServe's s3 annotations): read promote.uri, write
    # only under request_log_uri; never the pipeline's promote.secret, which can replace bundles
    storage_secret: str = Field(pattern=DNS_LABEL)
    guardrails: GuardrailsConfig  # error rate, p99, empty answers, served CTR: checked during the soak

    @model_validator(mode="after")
    def _replicas_ordered(self) -> DeployConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return self

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets_unique(cls, names: list[str]) -> list[str]:
        return _unique_secrets(names)

    def image(self, tag: str) -> str:
        """The serving image reference: ``image_repo@image_digest`` when pinned, else ``image_repo:tag``
        (``tag``: pipeline.image_tag)."""
        return image_reference(self.image_repo, tag, self.image_digest)


def _unique_secrets(names: list[str]) -> list[str]:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"image pull secrets named more than once: {repeated}")
    return names


# --------------------------------------------------------------------------------------------------
# the whole file


class Params(Section):
    seed: int = Field(ge=0)
    data: DataConfig
    features: FeaturesConfig
    evaluation: EvaluationConfig
    search: SearchConfig
    feast: FeastConfig
    training_set: TrainingSetConfig
    validation: ValidationConfig
    export: ExportConfig
    index: IndexConfig
    gate: GateConfig
    promote: PromoteConfig
    pipeline: PipelineConfig
    deploy: DeployConfig
    serving: ServingConfig
    monitor: MonitorConfig
    # the models package's own sections (models/config.py): features, feature groups, the four models
    models: ModelsConfig
    training: TrainingConfig

    @model_validator(mode="after")
    def _serving_workers_fit_the_pod(self) -> Params:
        # a server worker computes on about one core (serving/workers.py): workers beyond the pod's CPU
        # limit add memory (the models and a request's working set each), not throughput
        from kubernetes.utils.quantity import parse_quantity

        cpu_limit = self.deploy.resources.cpu_limit
        if self.serving.workers > parse_quantity(cpu_limit):
            raise ValueError(
                f"serving.workers {self.serving.workers} exceeds deploy.resources.cpu_limit {cpu_limit}: "
                "more server processes than cores add memory, not throughput"
            )
        return self
