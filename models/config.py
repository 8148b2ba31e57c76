"""Typed configuration of the models package: features, feature groups, the models' configs and training.

The classes mirror TorchEasyRec's model config: features are declared once, each model lists named
``feature_groups`` (so adding a feature to a group is a config change, not a code change) and names the
groups its towers read. The package keeps its own pydantic base class so it does not depend on the
pipeline's ``components`` package; ``recsys/config/`` embeds ``ModelsConfig`` (built in
``models/registry.py`` from the declared model classes) and :class:`TrainingConfig` as the ``models:``
and ``training:`` sections of ``params.yaml``.

Cross-references (a group naming an unknown feature, a tower reading an unknown group, DLRM dimension
rules) are checked by :class:`ModelsConfig` at load time and again when a model is built, with messages
that name the model, the group and the feature.

No field has a default: every value, the feature declarations and groups included, comes from
``params.yaml``; tests build from it too.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# Keys of an encoded batch that are not feature names (see models/batch.py).
RESERVED_NAMES = frozenset({"dense", "label", "group"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelConfigError(ValueError):
    """A model configuration that cannot be built; the message names the model, group and feature."""


class ModelSection(BaseModel):
    """Base of every models config class: unknown keys are errors (a typo must not become a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def check_features(self, kind: str, features: FeatureSpec) -> None:
        """Model-specific checks against the declared features (after the groups' own); raise
        :class:`ModelConfigError` naming the field. None by default."""


# --------------------------------------------------------------------------------------------------
# features


class SparseFeature(ModelSection):
    """A categorical id feature -> one embedding table (vocabulary with an OOV bucket, or hashing)."""

    name: str
    embedding_dim: int = Field(gt=0)
    # vocabulary: values seen at least min_count times in TRAIN get their own row, the rest share OOV
    min_count: int = Field(ge=1)
    # hashing instead of a vocabulary: value -> one of hash_buckets rows (no OOV, collisions accepted)
    hash_buckets: int | None = Field(gt=0)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _check_name(name)


class SequenceFeature(ModelSection):
    """A behaviour sequence (list column, most recent LAST) -> padded ids [B, L] + lengths [B].

    ``shares`` names the sparse feature whose vocabulary and embedding table the sequence uses
    (hist_item_ids shares item_id), so the history and the target item live in one embedding space.
    """

    name: str
    shares: str
    max_length: int = Field(gt=0, le=1024)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _check_name(name)


class DenseFeature(ModelSection):
    """A numeric feature -> one float column, standardised with mean/std fitted on train."""

    name: str
    # log1p before standardising: right for non-negative counts and prices with heavy tails
    transform: Literal["none", "log1p"]

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _check_name(name)


class FeatureSpec(ModelSection):
    """Every feature a model may read, declared once and shared by all models."""

    sparse: list[SparseFeature]
    sequence: list[SequenceFeature]
    dense: list[DenseFeature]
    # name -> (kind, declaration), rebuilt by the validator (which also runs on assignment): encoding asks
    # for a feature's kind per column per request, too often for a scan of the three lists
    _by_name: dict[str, tuple[str, Any]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        names = [f.name for f in self.sparse] + [f.name for f in self.sequence] + [f.name for f in self.dense]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"features: feature name(s) declared twice: {dupes}")
        sparse = {f.name for f in self.sparse}
        for seq in self.sequence:
            if seq.shares not in sparse:
                raise ValueError(
                    f"features.sequence '{seq.name}': shares '{seq.shares}', which is not a sparse feature "
                    f"(sparse features: {sorted(sparse)})"
                )
        self._by_name = {
            f.name: (kind, f) for kind in ("sparse", "sequence", "dense") for f in getattr(self, kind)
        }
        return self

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.sparse] + [f.name for f in self.sequence] + [f.name for f in self.dense]

    def kind_of(self, name: str) -> Literal["sparse", "sequence", "dense"] | None:
        """Which list declares ``name`` (None when it is not declared)."""
        entry = self._by_name.get(name)
        return None if entry is None else entry[0]  # type: ignore[return-value]

    def sparse_feature(self, name: str) -> SparseFeature:
        return self._declared(name, "sparse")

    def sequence_feature(self, name: str) -> SequenceFeature:
        return self._declared(name, "sequence")

    def dense_feature(self, name: str) -> DenseFeature:
        return self._declared(name, "dense")

    def _declared(self, name: str, kind: str) -> Any:
        entry = self._by_name.get(name)
        if entry is None or entry[0] != kind:
            raise KeyError(f"features: '{name}' is not a declared {kind} feature")
        return entry[1]

    def embedding_dim(self, name: str) -> int:
        """Embedding width of a sparse or sequence feature (a sequence uses its shared table's width)."""
        if self.kind_of(name) == "sequence":
            name = self.sequence_feature(name).shares
        return self.sparse_feature(name).embedding_dim


class FeatureGroup(ModelSection):
    """A named list of features, TorchEasyRec-style.

    ``deep``: sparse embeddings, mean-pooled sequences and dense columns concatenated into [B, D].
    ``sequence``: for DIN; the sparse features are the query (the target item), the sequence features
    the keys; the query and the sequence must have the same total embedding width.
    """

    name: str
    type: Literal["deep", "sequence"]
    features: list[str] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"'{name}' is not a valid group name (letters, digits and underscores)")
        return name


# --------------------------------------------------------------------------------------------------
# layers


class MLPConfig(ModelSection):
    """Linear -> [norm] -> activation -> [dropout], once per entry of hidden_units."""

    hidden_units: list[int] = Field(min_length=1)
    activation: Literal["relu", "leaky_relu", "prelu", "gelu", "silu", "tanh", "sigmoid"]
    norm: Literal["none", "batch", "layer"]
    dropout: float = Field(ge=0.0, lt=1.0)

    @field_validator("hidden_units")
    @classmethod
    def _positive_units(cls, units: list[int]) -> list[int]:
        if any(u <= 0 for u in units):
            raise ValueError(f"hidden_units must all be positive, got {units}")
        return units


class TowerConfig(ModelSection):
    """An MLP over one deep feature group."""

    input: str
    mlp: MLPConfig


class DINTowerConfig(ModelSection):
    """A DIN attention over one sequence feature group (query = target item, keys = history)."""

    input: str
    attn_mlp: MLPConfig


# --------------------------------------------------------------------------------------------------
# models


class TwoTowerConfig(ModelSection):
    """Retrieval: user tower and item tower -> L2-normalised d-vectors, trained with in-batch softmax."""

    feature_groups: list[FeatureGroup]
    user_group: str
    item_group: str
    user_tower: MLPConfig
    item_tower: MLPConfig
    embedding_dim: int = Field(gt=0)  # output width d of both towers
    history_pooling: Literal["mean", "attention"]
    attention_mlp: MLPConfig
    # history sequences use the item tower's id table (False: a separate table with the same vocabulary)
    share_item_id_embedding: bool
    # cold start: during training each listed id is replaced by the OOV row with this probability, so
    # the tower learns to work from content alone for ids it has never seen
    id_dropout: float = Field(ge=0.0, lt=1.0)
    id_dropout_features: list[str]
    loss: Literal["softmax", "bce"]
    temperature: float = Field(gt=0.0, le=10.0)
    learn_temperature: bool
    logq_correction: bool
    remove_accidental_hits: bool
    mixed_negatives: int = Field(ge=0)  # extra uniform negatives per batch from the catalogue
    item_id_feature: str  # the id that defines "the same item" (hits, log-Q, catalogue)

    @model_validator(mode="after")
    def _groups(self) -> TwoTowerConfig:
        _check_group_names(self.feature_groups, "two_tower")
        names = {g.name for g in self.feature_groups}
        for role, group in (("user_group", self.user_group), ("item_group", self.item_group)):
            if group not in names:
                raise ValueError(
                    f"two_tower.{role}: no feature group named '{group}' (groups: {sorted(names)})"
                )
        for g in self.feature_groups:
            if g.type != "deep":
                raise ValueError(f"two_tower.feature_groups '{g.name}': towers read deep groups only")
        return self

    def check_features(self, kind: str, features: FeatureSpec) -> None:
        sparse = {f.name for f in features.sparse}
        for name in self.id_dropout_features:
            if name not in sparse:
                raise ModelConfigError(
                    f"{kind}.id_dropout_features: '{name}' is not a sparse feature (sparse: {sorted(sparse)})"
                )
        if self.item_id_feature not in sparse:
            raise ModelConfigError(
                f"{kind}.item_id_feature: '{self.item_id_feature}' is not a sparse feature"
            )
        item = next(g for g in self.feature_groups if g.name == self.item_group)
        if self.item_id_feature not in item.features:
            raise ModelConfigError(
                f"{kind}: the item group '{item.name}' must contain the item id '{self.item_id_feature}'"
            )
        if any(features.kind_of(n) == "sequence" for n in item.features):
            raise ModelConfigError(f"{kind}: the item group '{item.name}' cannot hold sequence features")


class RankerSection(ModelSection):
    """What every ranker has besides its deep part: the wide part and the embedding regularisation."""

    # the wide part: a weight per value of each sparse feature (user / item bias) and a linear term per
    # dense feature, added to the deep logit (Wide & Deep); [] = none
    wide_features: list[str]
    # L2 on the embedding rows (and wide weights) each batch looks up, times this, added to the loss
    embedding_l2: float = Field(ge=0.0)
    # null: the wide weights start at zero; else they start at the one-hot logistic regression on the
    # training split with this L2 (sum of squared weights / rows), the output bias at its intercept
    wide_prefit_l2: float | None = Field(ge=0.0)


class MultiTowerConfig(RankerSection):
    """Ranking: one MLP tower per deep group -> concat -> final MLP -> logit (TorchEasyRec MultiTower)."""

    feature_groups: list[FeatureGroup]
    towers: list[TowerConfig] = Field(min_length=1)
    final: MLPConfig

    @model_validator(mode="after")
    def _groups(self) -> MultiTowerConfig:
        _check_towers(self.feature_groups, self.towers, [], "multi_tower")
        return self


class MultiTowerDINConfig(RankerSection):
    """MultiTower plus DIN towers over sequence groups (TorchEasyRec MultiTowerDIN)."""

    feature_groups: list[FeatureGroup]
    towers: list[TowerConfig]
    din_towers: list[DINTowerConfig] = Field(min_length=1)
    final: MLPConfig

    @model_validator(mode="after")
    def _groups(self) -> MultiTowerDINConfig:
        _check_towers(self.feature_groups, self.towers, self.din_towers, "multi_tower_din")
        return self


class DLRMConfig(RankerSection):
    """DLRM: dense MLP + pairwise dot interaction of [dense, sparse...] + top MLP (TorchEasyRec DLRM).

    Groups are named ``dense`` (dense features only, optional) and ``sparse`` (sparse id features whose
    embedding widths are all equal to the dense MLP's last hidden unit).
    """

    feature_groups: list[FeatureGroup]
    dense_mlp: MLPConfig
    arch_with_sparse: bool
    final: MLPConfig

    @model_validator(mode="after")
    def _groups(self) -> DLRMConfig:
        _check_group_names(self.feature_groups, "dlrm")
        names = {g.name for g in self.feature_groups}
        if "sparse" not in names:
            raise ValueError(
                f"dlrm.feature_groups: a group named 'sparse' is required (groups: {sorted(names)})"
            )
        extra = names - {"dense", "sparse"}
        if extra:
            raise ValueError(
                f"dlrm.feature_groups: only 'dense' and 'sparse' groups are allowed, got {sorted(extra)}"
            )
        return self

    def check_features(self, kind: str, features: FeatureSpec) -> None:
        _check_dlrm(self, features)


class ModelsSection(ModelSection):
    """Base of the ``models:`` section: the shared feature declarations; ``models/registry.py`` adds one
    field per declared model kind, typed by that model's ``config_class``."""

    features: FeatureSpec

    @field_validator("*")
    @classmethod
    def _model_fits_features(cls, config: Any, info: ValidationInfo) -> Any:
        """Check each model against the declared features, so the error's key path names the model."""
        features = info.data.get("features")
        if info.field_name != "features" and features is not None:  # else features failed and are reported
            try:
                check_model_config(str(info.field_name), config, features)
            except ModelConfigError as exc:
                raise ValueError(str(exc)) from None
        return config

    def model(self, kind: str) -> ModelSection:
        """The config of one model kind."""
        kinds = [name for name in type(self).model_fields if name != "features"]
        if kind not in kinds:
            raise ModelConfigError(f"unknown model kind '{kind}'; expected one of {kinds}")
        return getattr(self, kind)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------------
# training


class LoaderConfig(ModelSection):
    """``training.loader``: how the trainer reads the training split (models/streaming.py).

    ``memory`` encodes the whole split into tensors once and slices them (fastest while it fits);
    ``stream`` reads the Parquet file in row-group shards through a DataLoader (memory bounded by the
    row groups in flight and the shuffle buffer, not by the split); ``auto`` streams when the split has
    more than ``stream_above_rows`` rows (read from the Parquet metadata, without loading the file).
    """

    mode: Literal["auto", "memory", "stream"]
    stream_above_rows: int = Field(ge=0)
    shuffle_buffer_rows: int = Field(gt=0)  # rows mixed across row groups before batches are cut
    workers: int = Field(ge=0)  # DataLoader worker processes (0: read and encode in the training process)
    prefetch: int = Field(gt=0)  # batches each worker keeps ready (DataLoader prefetch_factor)
    # rows (whole row groups, seeded) that the model's one-off prepare() sees when streaming: the wide
    # part's logistic prefit, the two-tower's item pool; bounded so memory does not grow with the split
    prepare_rows: int = Field(gt=0)


class TrainingConfig(ModelSection):
    """The ``training:`` section: one loop for every model (models/trainer.py)."""

    batch_size: int = Field(gt=1)  # per process; the global batch is batch_size * world size
    eval_batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    grad_clip_norm: float | None = Field(gt=0.0)
    # "auto": auc for rankers, recall@<eval_k> for two_tower; else any key of the validation metrics
    # (auc, gauc, logloss, loss, recall@K, ndcg@K, hitrate@K); loss/logloss are minimised
    early_stopping_metric: str
    patience: int = Field(ge=0)  # epochs without improvement before stopping; 0 disables
    restore_best: bool  # end with the weights of the best validation epoch
    # after early stopping on the validation split, train afresh on train + validation for the best epoch
    # count: the deployed model learns from the most recent data, as a scheduled run would
    refit: bool
    eval_k: int = Field(gt=0)  # K of the two-tower validation recall
    seed: int = Field(ge=0)
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool  # bf16 autocast on CUDA (ignored on CPU)
    # torch intra-op CPU threads (0 keeps torch's default); the streaming loader's processes: loader.workers
    num_workers: int = Field(ge=0)
    # CUDA: hold the encoded training set in GPU memory (fastest); false keeps it in pinned host memory
    data_on_device: bool
    checkpoint_every: int = Field(ge=1)  # epochs between checkpoints when a directory is given
    loader: LoaderConfig  # in-memory tensors or a streaming Parquet DataLoader (models/streaming.py)
    # per model kind, fields that differ from the above: the two-tower learns from the clicks only (a tenth
    # of the ranking rows) and needs more, smaller steps than the rankers
    per_model: dict[str, dict[str, Any]]

    def for_model(self, kind: str) -> TrainingConfig:
        """This section with ``per_model[kind]`` applied (validated like the section itself)."""
        override = self.per_model.get(kind)
        if not override:
            return self
        return TrainingConfig.model_validate(self.model_dump() | override | {"per_model": {}})

    @field_validator("per_model")
    @classmethod
    def _known_overrides(
        cls, per_model: dict[str, dict[str, Any]], info: ValidationInfo
    ) -> dict[str, dict[str, Any]]:
        # an override is checked as the section it becomes (the other fields, validated before this last one)
        base = {name: info.data[name] for name in cls.model_fields if name in info.data}
        complete = len(base) == len(cls.model_fields) - 1  # else another field failed and is reported
        from models.registry import MODEL_KINDS  # the registry imports the model classes, which import this

        for kind, override in per_model.items():
            if kind not in MODEL_KINDS:
                raise ValueError(f"per_model: unknown model '{kind}'; expected one of {list(MODEL_KINDS)}")
            if "per_model" in override:
                raise ValueError(f"per_model.{kind}: per_model cannot be nested")
            if not complete:
                continue
            try:
                TrainingConfig.model_validate(base | override | {"per_model": {}})
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"])
                raise ValueError(f"per_model.{kind}.{where}: {error['msg']}") from None
        return per_model

    @field_validator("early_stopping_metric")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        if name in ("auto", "auc", "gauc", "logloss", "loss") or re.fullmatch(
            r"(recall|ndcg|hitrate)@\d+", name
        ):
            return name
        raise ValueError(
            f"unknown early-stopping metric '{name}'; use auto, auc, gauc, logloss, loss, recall@K, ndcg@K "
            "or hitrate@K"
        )


# --------------------------------------------------------------------------------------------------
# cross-checks shared by the config and the model constructors


def check_model_config(kind: str, config: ModelSection, features: FeatureSpec) -> None:
    """Raise :class:`ModelConfigError` unless ``config`` (of model ``kind``) can be built on ``features``."""
    groups: list[FeatureGroup] = config.feature_groups  # type: ignore[attr-defined]
    for group in groups:
        _check_group_features(kind, group, features)
    config.check_features(kind, features)
    for name in getattr(config, "wide_features", []):
        if features.kind_of(name) not in ("sparse", "dense"):
            raise ModelConfigError(
                f"{kind}.wide_features: '{name}' is not a declared sparse or dense feature "
                f"(known: {features.names})"
            )


def _check_group_features(kind: str, group: FeatureGroup, features: FeatureSpec) -> None:
    where = f"{kind}.feature_groups '{group.name}'"
    for name in group.features:
        if features.kind_of(name) is None:
            raise ModelConfigError(
                f"{where}: unknown feature '{name}'; declare it under models.features "
                f"(known: {features.names})"
            )
    if len(set(group.features)) != len(group.features):
        raise ModelConfigError(f"{where}: a feature is listed twice: {group.features}")
    if group.type == "sequence":
        query = [n for n in group.features if features.kind_of(n) == "sparse"]
        seqs = [n for n in group.features if features.kind_of(n) == "sequence"]
        dense = [n for n in group.features if features.kind_of(n) == "dense"]
        if dense:
            raise ModelConfigError(f"{where}: a sequence group cannot hold dense features {dense}")
        if not query or not seqs:
            raise ModelConfigError(
                f"{where}: a sequence group needs query (sparse) and sequence features, got query={query} "
                f"sequence={seqs}"
            )
        query_dim = sum(features.embedding_dim(n) for n in query)
        seq_dim = sum(features.embedding_dim(n) for n in seqs)
        if query_dim != seq_dim:
            raise ModelConfigError(
                f"{where}: query dim {query_dim} ({query}) must equal sequence dim {seq_dim} ({seqs})"
            )
        lengths = {features.sequence_feature(n).max_length for n in seqs}
        if len(lengths) > 1:
            raise ModelConfigError(
                f"{where}: sequence features must share one max_length, got {sorted(lengths)}"
            )


def _check_dlrm(config: DLRMConfig, features: FeatureSpec) -> None:
    groups = {g.name: g for g in config.feature_groups}
    sparse = groups["sparse"]
    not_sparse = [n for n in sparse.features if features.kind_of(n) != "sparse"]
    if not_sparse:
        kinds = {n: features.kind_of(n) for n in not_sparse}
        raise ModelConfigError(f"dlrm: the sparse group must hold sparse id features only, got {kinds}")
    dims = {n: features.embedding_dim(n) for n in sparse.features}
    if len(set(dims.values())) > 1:
        raise ModelConfigError(f"dlrm: sparse group feature dims must be the same, but found {dims}")
    if "dense" in groups:
        not_dense = [n for n in groups["dense"].features if features.kind_of(n) != "dense"]
        if not_dense:
            raise ModelConfigError(f"dlrm: the dense group must hold dense features only, got {not_dense}")
        last = config.dense_mlp.hidden_units[-1]
        sparse_dim = next(iter(dims.values()))
        if last != sparse_dim:
            raise ModelConfigError(
                f"dlrm: dense_mlp last hidden_unit ({last}) must equal the sparse feature embedding_dim "
                f"({sparse_dim})"
            )


def _check_group_names(groups: list[FeatureGroup], kind: str) -> None:
    names = [g.name for g in groups]
    if not names:
        raise ValueError(f"{kind}.feature_groups: at least one group is required")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{kind}.feature_groups: group name(s) used twice: {dupes}")


def _check_tower_inputs(
    by_name: dict[str, FeatureGroup], inputs: list[str], field: str, group_type: str, need: str
) -> None:
    """Each tower input names a declared group of the type that tower reads."""
    for name in inputs:
        group = by_name.get(name)
        if group is None:
            raise ValueError(f"{field}: input '{name}' is not a feature group ({sorted(by_name)})")
        if group.type != group_type:
            raise ValueError(f"{field}: input '{name}' is a {group.type} group; {need}")


def _check_towers(
    groups: list[FeatureGroup], towers: list[TowerConfig], din_towers: list[DINTowerConfig], kind: str
) -> None:
    _check_group_names(groups, kind)
    by_name = {g.name: g for g in groups}
    _check_tower_inputs(by_name, [t.input for t in towers], f"{kind}.towers", "deep", "towers need deep")
    _check_tower_inputs(
        by_name, [t.input for t in din_towers], f"{kind}.din_towers", "sequence", "DIN needs a sequence group"
    )
    if len({t.input for t in towers}) != len(towers):
        raise ValueError(f"{kind}.towers: two towers read the same group")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"'{name}' is not a valid name (letters, digits and underscores)")
    if name in RESERVED_NAMES:
        raise ValueError(f"'{name}' is reserved for the encoded batch ({sorted(RESERVED_NAMES)})")
    return name
