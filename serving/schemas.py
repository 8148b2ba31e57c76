"""Request validation: pydantic models built from the bundle's features and the ``serving`` limits.

Every request, V1 or V2, becomes a list of instances validated here before any model runs, so a bad
request is answered with HTTP 400 and a message naming the field (``instances[0].k: ...``) instead of a
tensor error deep in a model. Feature values are typed from the bundle's encoder (the types the models
were trained on): ids and categories as strict ints or strings, sequences as lists of those, dense
values as finite numbers; unknown feature names are refused.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictStr,
    ValidationError,
    create_model,
    model_validator,
)

from models import FeatureEncoder
from recsys.config import ServingConfig

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Strict(), Field(ge=INT64_MIN, le=INT64_MAX)]
# a dense value further than this many training standard deviations from the training mean (after its
# transform) is refused: the models never saw anything like it, and extreme values overflow to inf/NaN
MAX_DENSE_SIGMAS = 50.0
MAX_SEQUENCE = 10_000  # longest list feature accepted in a request (the encoder keeps the last max_length)


class RequestError(ValueError):
    """A request that cannot be served; the message names the field (becomes HTTP 400)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestSchemas:
    """The instance models of the three endpoints for one bundle and one ``serving`` config."""

    retrieval: type[BaseModel]
    ranking: type[BaseModel]
    recommend: type[BaseModel]
    max_batch: int
    request_id_max_length: int

    def parse(
        self, endpoint: str, instances: Any, locate: Callable[[list[str]], str] | None = None
    ) -> list[Any]:
        """Validate a list of instances; raises :class:`RequestError` naming the bad fields.

        ``locate`` turns an error location (``["0", "k"]``) into the field name the caller sent (V2
        requests name inputs and parameters, not instances); the default is ``instances[0].k``.
        """
        model = getattr(self, endpoint)
        wrapper = _batch_model(model, self.max_batch)
        try:
            return list(wrapper.model_validate({"instances": instances}).instances)
        except ValidationError as exc:
            raise RequestError(describe(exc, locate)) from None


def build_schemas(
    config: ServingConfig,
    encoder: FeatureEncoder,
    user_features: Iterable[str],
    item_features: Iterable[str],
    rankers: Iterable[str],
) -> RequestSchemas:
    """Instance models: feature types from ``encoder``, limits from ``config``, rankers in the bundle."""
    user_model = _features_model("UserFeatures", encoder, user_features, exclude="user_id")
    item_model = _features_model("ItemFeatures", encoder, item_features, exclude="item_id")
    ranker_type = Literal[tuple(rankers)]  # type: ignore[valid-type]
    k_type = Annotated[int, Strict(), Field(ge=1, le=config.max_k)]
    n_type = Annotated[int, Strict(), Field(ge=1, le=config.max_n)]
    item_ids_type = Annotated[list[Int64], Field(min_length=1, max_length=config.max_candidates)]

    class RetrievalInstance(_Strict):
        """A user id (features from the online store) and/or the user's features; top-``k`` items."""

        user_id: Int64 | None = None
        features: user_model | None = None  # type: ignore[valid-type]
        k: k_type = config.default_k  # type: ignore[valid-type]

        @model_validator(mode="after")
        def _who(self) -> "RetrievalInstance":
            if self.user_id is None and self.features is None:
                raise ValueError("give 'user_id' or 'features' (or both)")
            return self

    class RankingInstance(_Strict):
        """A user and candidate items; item features (parallel to ``item_ids``) override the store's."""

        user_id: Int64
        item_ids: item_ids_type  # type: ignore[valid-type]
        ranker: ranker_type = config.default_ranker  # type: ignore[valid-type]
        user_features: user_model | None = None  # type: ignore[valid-type]
        item_features: list[item_model] | None = None  # type: ignore[valid-type]

        @model_validator(mode="after")
        def _parallel(self) -> "RankingInstance":
            if self.item_features is not None and len(self.item_features) != len(self.item_ids):
                raise ValueError(
                    f"item_features has {len(self.item_features)} entries for {len(self.item_ids)} item_ids; "
                    "give one per candidate, in the same order"
                )
            return self

    class Context(_Strict):
        """What the caller knows now: items not to show, user features fresher than the store's."""

        exclude_item_ids: Annotated[list[Int64], Field(max_length=config.max_candidates)] = []
        features: user_model | None = None  # type: ignore[valid-type]

    class RecommendInstance(_Strict):
        """A user id (+ context); the top-``n`` items after retrieval and ranking."""

        user_id: Int64
        n: n_type = config.default_n  # type: ignore[valid-type]
        ranker: ranker_type = config.default_ranker  # type: ignore[valid-type]
        context: Context | None = None

    return RequestSchemas(
        RetrievalInstance, RankingInstance, RecommendInstance, config.max_batch, config.request_id_max_length
    )


def describe(exc: ValidationError, locate: Callable[[list[str]], str] | None = None) -> str:
    """``field.path: message`` for each error (at most 5), e.g. ``instances[0].k: Input should be ...``."""
    parts = []
    for error in exc.errors()[:5]:
        loc = [str(p) for p in error["loc"]]
        if loc and loc[0] == "instances":
            loc = loc[1:]
        if locate is not None:
            where = locate(loc)
        else:
            where = "instances" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc)
        parts.append(f"{where}: {error['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _batch_model(instance: type[BaseModel], max_batch: int) -> type[BaseModel]:
    key = (instance, max_batch)
    if key not in _BATCH_MODELS:
        _BATCH_MODELS[key] = create_model(
            f"{instance.__name__}Batch",
            __config__=ConfigDict(extra="forbid"),
            instances=(Annotated[list[instance], Field(min_length=1, max_length=max_batch)], ...),  # type: ignore[valid-type]
        )
    return _BATCH_MODELS[key]


_BATCH_MODELS: dict[tuple[type[BaseModel], int], type[BaseModel]] = {}


def _features_model(
    name: str, encoder: FeatureEncoder, features: Iterable[str], exclude: str
) -> type[BaseModel]:
    """A model with one optional field per feature, typed as the encoder was fitted."""
    fields: dict[str, Any] = {}
    spec = encoder.spec
    for feature in features:
        if feature == exclude:  # the entity id is given once, outside the features
            continue
        kind = spec.kind_of(feature)
        if kind == "sparse":
            value: Any = StrictStr if encoder.value_kinds[feature] == "str" else Int64
        elif kind == "sequence":
            shared = spec.sequence_feature(feature).shares
            item = StrictStr if encoder.value_kinds[shared] == "str" else Int64
            value = Annotated[list[item], Field(max_length=MAX_SEQUENCE)]  # type: ignore[valid-type]
        else:
            value = Annotated[
                float, Strict(), AllowInfNan(False), AfterValidator(_trained_range(encoder, feature))
            ]
        fields[feature] = (value | None, None)
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def _trained_range(encoder: FeatureEncoder, feature: str) -> Callable[[float], float]:
    """A validator refusing values the encoder would map further than MAX_DENSE_SIGMAS from its training
    mean (or to a non-finite number: a negative count under log1p)."""

    def check(value: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the answer here, not a warning
            standardised = float(encoder.standardise(feature, [value])[0])
        if not math.isfinite(standardised) or abs(standardised) > MAX_DENSE_SIGMAS:
            raise ValueError(
                f"{value!r} is outside the range the model was trained on (more than {MAX_DENSE_SIGMAS:g} "
                f"training standard deviations from the mean after the feature's transform)"
            )
        return value

    return check
