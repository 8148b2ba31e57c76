"""The three KServe models: ``retrieval``, ``ranking`` and ``recommend``, each speaking V1 and V2.

V1 (``/v1/models/<name>:predict``) takes ``{"instances": [...]}`` with one object per user and answers
``{"predictions": [...]}``. V2 (``/v2/models/<name>/infer``, the Open Inference Protocol) takes named
tensors: ``user_id`` INT64 [B] (ranking: [1] plus ``item_ids`` INT64 [C]), retrieval feature tensors
by feature name ([B] each), and ``k`` / ``n`` / ``ranker`` as request parameters; it answers
``item_ids`` INT64 [B, W] and ``scores`` FP32 [B, W] (rows shorter than W padded with -1 / 0, the true
length in ``counts`` INT64 [B]) with ``bundle_version`` in the response parameters. Both protocols are
turned into the same validated instances (serving/schemas.py): a bad field is an HTTP 400 naming it.

The bundle can be swapped while the server runs (serving/index_swap.py): each request takes one
snapshot of it (``Recommender.snapshot``) and computes its answers from that snapshot only; each answer
carries the snapshot's version, which is what the counters, the request log and the response report.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InferenceError, InvalidInput
from prometheus_client import Counter

from serving.recommender import Recommender, Result
from serving.request_log import RequestLog
from serving.schemas import RequestError, RequestSchemas

if TYPE_CHECKING:
    from serving.index_swap import IndexSwap

V2_PARAMETERS = ("k", "n", "ranker")
V2_INTEGER_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
V2_DATATYPES = V2_INTEGER_TYPES | {"BOOL", "FP16", "FP32", "FP64", "BYTES"}  # the protocol's tensor types
ID_INPUTS = ("user_id", "item_ids")
REQUEST_ID_HEADER = "x-request-id"  # set by Istio / Knative's activator, or by the client

_BY_VERSION = ["endpoint", "bundle_version"]
ANSWERS = Counter("recsys_answers", "Users answered, by endpoint and bundle version.", _BY_VERSION)
EMPTY_ANSWERS = Counter("recsys_empty_answers", "Users answered with no items.", _BY_VERSION)
DEGRADED_ANSWERS = Counter(
    "recsys_degraded_answers", "Users answered on default features: the online store was down.", _BY_VERSION
)


class RecsysModel(Model):
    """Shared protocol handling; subclasses turn validated instances into predictions."""

    endpoint: ClassVar[str]
    v2_outputs: ClassVar[tuple[str, ...]] = ("item_ids", "scores", "counts", "cold_start")

    def __init__(
        self,
        recommender: Recommender,
        schemas: RequestSchemas,
        request_log: RequestLog | None = None,
        index_swap: IndexSwap | None = None,
    ) -> None:
        super().__init__(self.endpoint)
        self.recommender = recommender
        self.schemas = schemas
        self.request_log = request_log
        self.index_swap = index_swap  # the poller swapping the recommender's bundle, shared by the models
        self.ready = True

    @property
    def version(self) -> str:
        """The version of the bundle answering new requests (it changes when an index is swapped in)."""
        return self.recommender.bundle.version

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def stop(self) -> None:
        """KServe's stop handler (SIGTERM, after uvicorn drained): no more swaps, and the request log
        writes what it holds."""
        super().stop()
        self.close()

    def close(self) -> None:
        """Stop the index poller and the registry retry, close the request log (idempotent, shared by the
        models)."""
        self.recommender.features.close()
        if self.index_swap is not None:
            self.index_swap.stop()
        if self.request_log is not None:
            self.request_log.close()

    async def predict(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> dict[str, Any] | InferResponse:
        """Answer off the event loop (the default executor's threads; torch and FAISS release the GIL), so
        health probes and light requests keep being answered while a heavy one runs."""
        request_id = (headers or {}).get(REQUEST_ID_HEADER)
        if request_id is not None:
            request_id = request_id[: self.schemas.request_id_max_length]
        return await asyncio.get_running_loop().run_in_executor(None, self.answer, payload, request_id)

    def answer(
        self, payload: dict[str, Any] | InferRequest, request_id: str | None = None
    ) -> dict[str, Any] | InferResponse:
        """The V1 or V2 response to ``payload``; a bad request raises ``InvalidInput`` naming the field.
        ``request_id`` (the V2 request's id before it, else a new one) names the answer in the request log."""
        try:
            if isinstance(payload, InferRequest):
                instances, locate = self._v2_instances(payload)
                parsed = self.schemas.parse(self.endpoint, instances, locate=locate)
                request_id = str(payload.id) if payload.id is not None else request_id or _new_id()
                results = self._served(request_id, self._checked(self.run(parsed)))
                return self._v2_response(request_id, results)
            if not isinstance(payload, dict):
                raise RequestError('request body: expected a JSON object {"instances": [...]}')
            unknown = sorted(set(payload) - {"instances"})
            if unknown:
                raise RequestError(f"request body: unknown field(s) {unknown}; expected only 'instances'")
            if "instances" not in payload:
                raise RequestError("instances: field required")
            parsed = self.schemas.parse(self.endpoint, payload["instances"])
        except RequestError as exc:
            raise InvalidInput(str(exc)) from None
        results = self._served(request_id or _new_id(), self._checked(self.run(parsed)))
        return {"predictions": [self._v1_prediction(r) for r in results]}

    def run(self, instances: list[Any]) -> list[Result]:
        """The answers to validated ``instances``, all computed from one snapshot of the bundle (each
        ``Result.bundle_version`` is its version)."""
        raise NotImplementedError

    def _version_of(self, results: list[Result]) -> str:
        """The version the answers were computed from (one snapshot per request: one version)."""
        return results[0].bundle_version if results else self.version

    def _checked(self, results: list[Result]) -> list[Result]:
        """Never a success with a NaN or infinite score: that is the model failing, not an answer."""
        for result in results:
            if not all(math.isfinite(score) for score in result.scores):
                raise InferenceError(
                    f"{self.endpoint}: the model produced non-finite scores for user {result.user_id}; "
                    "no answer is given rather than a wrong one"
                )
        return results

    def _served(self, request_id: str, results: list[Result]) -> list[Result]:
        """Count the answers and hand them to the request log (a buffer append: no I/O here), under the
        version of the bundle they were computed from."""
        labels = {"endpoint": self.endpoint, "bundle_version": self._version_of(results)}
        ANSWERS.labels(**labels).inc(len(results))
        if empty := sum(not r.item_ids for r in results):
            EMPTY_ANSWERS.labels(**labels).inc(empty)
        if degraded := sum(r.degraded for r in results):
            DEGRADED_ANSWERS.labels(**labels).inc(degraded)
        if self.request_log is not None:
            now = time.time()
            self.request_log.record(
                [
                    {
                        "request_id": request_id,
                        "time": now,
                        "endpoint": self.endpoint,
                        "user_id": r.user_id,
                        "model": self._served_model(r),
                        "bundle_version": r.bundle_version,
                        "item_ids": r.item_ids,
                        "scores": r.scores,
                        "candidates": r.candidates,
                        "source": r.source,
                        "cold_start": r.cold_start,
                        "degraded": r.degraded,
                        "features": r.features,
                        # deterministic answers (no exploration) are logged with propensity 1 per slot
                        "propensities": r.propensities
                        if r.propensities is not None
                        else [1.0] * len(r.item_ids),
                        "candidate_ids": r.candidate_ids,
                    }
                    for r in results
                ]
            )
        return results

    def _served_model(self, result: Result) -> str:
        if result.source != "model":
            return result.source
        return str(result.extra.get("ranker", "two_tower"))

    # ---- V1 -------------------------------------------------------------------------------------

    def _v1_prediction(self, result: Result) -> dict[str, Any]:
        return {
            "user_id": result.user_id,
            "item_ids": result.item_ids,
            "scores": result.scores,
            "source": result.source,
            "cold_start": result.cold_start,
            "degraded": result.degraded,
            "bundle_version": result.bundle_version,
            **result.extra,
        }

    # ---- V2 -------------------------------------------------------------------------------------

    def _v2_instances(self, request: InferRequest) -> tuple[list[dict[str, Any]], Callable[[list[str]], str]]:
        if request.id is not None and len(str(request.id)) > self.schemas.request_id_max_length:
            raise RequestError(
                f"id: {len(str(request.id))} characters, at most {self.schemas.request_id_max_length} "
                "(serving.request_id_max_length)"
            )
        wanted = [output.name for output in request.request_outputs or []]
        unknown_outputs = sorted(set(wanted) - set(self.v2_outputs))
        if unknown_outputs:
            raise RequestError(
                f"outputs: unknown output(s) {unknown_outputs}; this model returns {list(self.v2_outputs)}"
            )
        inputs = {}
        for tensor in request.inputs:
            if tensor.name in inputs:
                raise RequestError(f"inputs.{tensor.name}: given twice")
            _check_datatype(tensor)
            inputs[tensor.name] = _flat_values(tensor)
        parameters = dict(request.parameters or {})
        unknown = sorted(set(parameters) - set(V2_PARAMETERS))
        if unknown:
            raise RequestError(f"parameters: unknown parameter(s) {unknown}; expected {list(V2_PARAMETERS)}")
        instances = self._v2_rows(inputs, parameters)

        def locate(loc: list[str]) -> str:
            row, rest = (loc[0], loc[1:]) if loc and loc[0].isdigit() else ("0", loc)
            if not rest:
                return f"inputs[{row}]"
            if rest[0] in V2_PARAMETERS:
                return f"parameters.{rest[0]}"
            if rest[0] == "features" and len(rest) > 1:
                return f"inputs.{rest[1]}[{row}]"
            if rest[0] == "item_ids" and len(rest) > 1:
                return f"inputs.item_ids[{rest[1]}]"
            return f"inputs.{rest[0]}" + (f"[{row}]" if rest[0] == "user_id" else "")

        return instances, locate

    def _v2_rows(self, inputs: dict[str, list[Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        if "user_id" not in inputs:
            raise RequestError("inputs.user_id: required (INT64 [B])")
        extra = sorted(set(inputs) - {"user_id"})
        if extra:
            raise RequestError(f"inputs: unknown input(s) {extra}; this model takes 'user_id'")
        return [{"user_id": u, **parameters} for u in inputs["user_id"]]

    def _v2_response(self, request_id: str, results: list[Result]) -> InferResponse:
        width = max((len(r.item_ids) for r in results), default=0)
        ids = np.full((len(results), width), -1, dtype=np.int64)
        scores = np.zeros((len(results), width), dtype=np.float32)
        for i, r in enumerate(results):
            ids[i, : len(r.item_ids)] = r.item_ids
            scores[i, : len(r.scores)] = r.scores
        counts = np.asarray([len(r.item_ids) for r in results], dtype=np.int64)
        outputs = [
            InferOutput("item_ids", list(ids.shape), "INT64", data=ids),
            InferOutput("scores", list(scores.shape), "FP32", data=scores),
            InferOutput("counts", [len(results)], "INT64", data=counts),
            InferOutput(
                "cold_start", [len(results)], "BOOL", data=np.asarray([r.cold_start for r in results])
            ),
        ]
        parameters: dict[str, Any] = {
            "bundle_version": self._version_of(results),
            "degraded": any(r.degraded for r in results),
        }
        ranker = next((r.extra["ranker"] for r in results if "ranker" in r.extra), None)
        if ranker is not None:
            parameters["ranker"] = ranker
        return InferResponse(
            response_id=request_id,
            model_name=self.name,
            infer_outputs=outputs,
            parameters=parameters,
        )


class RetrievalModel(RecsysModel):
    """User features (or a user id: its features come from the online store) -> top-K items."""

    endpoint = "retrieval"

    def run(self, instances: list[Any]) -> list[Result]:
        rec = self.recommender
        served = rec.snapshot()
        users = rec.user_features(
            [x.user_id for x in instances],
            [x.features.model_dump(exclude_none=True) if x.features is not None else None for x in instances],
        )
        retrieved = rec.retrieve(users, [x.k for x in instances], served=served)
        results = []
        for i, x in enumerate(instances):
            ids, scores = retrieved[i]
            cold = not users.found[i] and x.features is None
            results.append(
                Result(
                    user_id=x.user_id,
                    item_ids=ids.tolist(),
                    scores=scores.astype(float).tolist(),
                    source="model",
                    degraded=users.degraded,
                    cold_start=cold,
                    candidates=len(ids),
                    features=users.row(i),
                    bundle_version=served.version,
                )
            )
        return results

    def _v2_rows(self, inputs: dict[str, list[Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        names = self.recommender.user_feature_names
        unknown = sorted(set(inputs) - {"user_id", *names})
        if unknown:
            raise RequestError(f"inputs: unknown input(s) {unknown}; expected 'user_id' and/or user features")
        sizes = {name: len(values) for name, values in inputs.items()}
        if not sizes:
            raise RequestError("inputs: give 'user_id' (INT64 [B]) and/or user feature tensors ([B] each)")
        if len(set(sizes.values())) > 1:
            raise RequestError(f"inputs: every input needs the same batch size, got {sizes}")
        rows = []
        for i in range(next(iter(sizes.values()))):
            row: dict[str, Any] = dict(parameters)
            if "user_id" in inputs:
                row["user_id"] = inputs["user_id"][i]
            features = {name: inputs[name][i] for name in inputs if name != "user_id"}
            if features:
                row["features"] = features
            rows.append(row)
        return rows


class RankingModel(RecsysModel):
    """A user + candidate item ids -> one score (logit) per candidate, in the given order."""

    endpoint = "ranking"
    v2_outputs = ("scores",)

    def run(self, instances: list[Any]) -> list[Result]:
        rec = self.recommender
        served = rec.snapshot()
        results: list[Result | None] = [None] * len(instances)
        for ranker in sorted({x.ranker for x in instances}):
            rows = [i for i, x in enumerate(instances) if x.ranker == ranker]
            chosen = [instances[i] for i in rows]
            users = rec.user_features(
                [x.user_id for x in chosen],
                [x.user_features.model_dump(exclude_none=True) if x.user_features else None for x in chosen],
            )
            overrides = [
                [f.model_dump(exclude_none=True) for f in x.item_features] if x.item_features else None
                for x in chosen
            ]
            candidates = [np.asarray(x.item_ids, dtype=np.int64) for x in chosen]
            scores, found = rec.rank(users, candidates, ranker, overrides, served)
            for j, i in enumerate(rows):
                x = chosen[j]
                given = np.asarray([bool(f) for f in (overrides[j] or [])] or [False] * len(x.item_ids))
                results[i] = Result(
                    user_id=x.user_id,
                    item_ids=list(x.item_ids),
                    scores=scores[j].astype(float).tolist(),
                    source="model",
                    degraded=users.degraded,
                    cold_start=not bool(users.found[j]) and x.user_features is None,
                    candidates=len(x.item_ids),
                    features=users.row(j),
                    bundle_version=served.version,
                    extra={
                        "ranker": ranker,
                        "default_item_ids": [
                            int(item) for item, ok in zip(x.item_ids, found[j] | given, strict=True) if not ok
                        ],
                    },
                )
        return [r for r in results if r is not None]

    def _v2_rows(self, inputs: dict[str, list[Any]], parameters: dict[str, Any]) -> list[dict[str, Any]]:
        unknown = sorted(set(inputs) - {"user_id", "item_ids"})
        if unknown:
            raise RequestError(
                f"inputs: unknown input(s) {unknown}; expected 'user_id' [1] and 'item_ids' [C]"
            )
        for name in ("user_id", "item_ids"):
            if name not in inputs:
                raise RequestError(f"inputs.{name}: required")
        if len(inputs["user_id"]) != 1:
            raise RequestError(
                f"inputs.user_id: one user per V2 ranking request, got {len(inputs['user_id'])}"
            )
        return [{"user_id": inputs["user_id"][0], "item_ids": inputs["item_ids"], **parameters}]

    def _v2_response(self, request_id: str, results: list[Result]) -> InferResponse:
        response = super()._v2_response(request_id, results)
        scores = np.asarray(results[0].scores, dtype=np.float32)
        response.outputs = [InferOutput("scores", [len(scores)], "FP32", data=scores)]
        return response


class RecommendModel(RecsysModel):
    """A user id (+ context) -> top-N items after retrieval and ranking, with the bundle version."""

    endpoint = "recommend"

    def run(self, instances: list[Any]) -> list[Result]:
        contexts = [
            None
            if x.context is None
            else {
                "exclude_item_ids": x.context.exclude_item_ids,
                "features": x.context.features.model_dump(exclude_none=True) if x.context.features else None,
            }
            for x in instances
        ]
        return self.recommender.recommend(
            [x.user_id for x in instances],
            [x.n for x in instances],
            [x.ranker for x in instances],
            contexts,
        )


def _new_id() -> str:
    return uuid.uuid4().hex


def _check_datatype(tensor: Any) -> None:
    """The declared datatype is an Open Inference Protocol type, and an integer one for ids."""
    datatype = str(tensor.datatype)
    if datatype not in V2_DATATYPES:
        raise RequestError(
            f"inputs.{tensor.name}.datatype: unknown datatype {datatype[:20]!r}; "
            f"expected one of {sorted(V2_DATATYPES)}"
        )
    if tensor.name in ID_INPUTS and datatype not in V2_INTEGER_TYPES:
        raise RequestError(
            f"inputs.{tensor.name}.datatype: ids are INT64 (or another integer type), not {datatype}"
        )


def _flat_values(tensor: Any) -> list[Any]:
    """A V2 input's values as a flat Python list, checked against its declared shape."""
    try:
        if tensor._raw_data is not None:
            values = tensor.as_numpy().ravel().tolist()
        else:
            values = np.asarray(tensor.data, dtype=object).ravel().tolist()
    except (ValueError, TypeError) as exc:
        raise RequestError(f"inputs.{tensor.name}: data does not form a tensor: {exc}") from None
    expected = int(np.prod(tensor.shape)) if tensor.shape else 1
    if any(d < 0 for d in tensor.shape) or expected != len(values):
        raise RequestError(
            f"inputs.{tensor.name}: shape {list(tensor.shape)} does not match {len(values)} value(s)"
        )
    return values
