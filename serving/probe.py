"""A probe of a running model server: a table of bad and hostile requests, each with the status it must get.

The e2e tests run the table against the server built from the tiny pipeline; ``python -m
benchmarks.serving_probe --url http://127.0.0.1:8080`` sends it to any live server on loopback. After every
case the server must still answer its liveness probe: a probe that kills or wedges the server fails however
the case itself was answered.

The table covers what a client can get wrong or try on purpose: malformed JSON, wrong types, missing and
unknown fields, oversized batches and bodies, non-finite and extreme numbers, V2 envelope faults (datatype,
shape, binary extension, unknown outputs, a huge id) and the model repository routes KServe would expose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Case:
    """One request and the status range it must be answered with."""

    name: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    expected: tuple[int, int] = (400, 400)  # inclusive range of acceptable statuses
    mentions: str = ""  # a word the error must contain (the field it names)


def cases(max_batch: int, max_request_bytes: int) -> list[Case]:
    """The probe table for a server with these ``serving`` limits."""
    v1 = "/v1/models/{}:predict"
    v2 = "/v2/models/{}/infer"
    user = {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]}

    def body(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    table = [
        Case("v1 not json", v1.format("recommend"), b"{not json"),
        Case("v1 list body", v1.format("recommend"), body([1, 2])),
        Case("v1 no instances", v1.format("recommend"), body({}), mentions="instances"),
        Case("v1 unknown field", v1.format("recommend"), body({"instances": [], "x": 1}), mentions="x"),
        Case("v1 empty batch", v1.format("recommend"), body({"instances": []}), mentions="instances"),
        Case(
            "v1 string user",
            v1.format("recommend"),
            body({"instances": [{"user_id": "a"}]}),
            mentions="user_id",
        ),
        Case(
            "v1 float user",
            v1.format("recommend"),
            body({"instances": [{"user_id": 1.5}]}),
            mentions="user_id",
        ),
        Case(
            "v1 huge user",
            v1.format("recommend"),
            body({"instances": [{"user_id": 2**70}]}),
            mentions="user_id",
        ),
        Case(
            "v1 n zero", v1.format("recommend"), body({"instances": [{"user_id": 1, "n": 0}]}), mentions="n"
        ),
        Case("v1 bad ranker", v1.format("recommend"), body({"instances": [{"user_id": 1, "ranker": "x"}]})),
        Case(
            "v1 batch over max",
            v1.format("recommend"),
            body({"instances": [{"user_id": i} for i in range(max_batch + 1)]}),
            mentions=str(max_batch),
        ),
        Case(
            "v1 nan feature", v1.format("retrieval"), b'{"instances": [{"features": {"user_ctr_7d": NaN}}]}'
        ),
        Case(
            "v1 extreme feature",
            v1.format("recommend"),
            body({"instances": [{"user_id": 1, "context": {"features": {"user_ctr_7d": 1e308}}}]}),
            mentions="user_ctr_7d",
        ),
        Case(
            "v1 ranking no items",
            v1.format("ranking"),
            body({"instances": [{"user_id": 1}]}),
            mentions="item_ids",
        ),
        Case(
            "v1 unknown model", v1.format("nope"), body({"instances": [{"user_id": 1}]}), expected=(404, 404)
        ),
        Case(
            "body over the limit",
            v1.format("recommend"),
            b'{"instances": [' + b" " * max_request_bytes + b"]}",
            expected=(413, 413),
        ),
        Case("v2 no inputs", v2.format("recommend"), body({}), mentions="inputs"),
        Case("v2 unknown field", v2.format("recommend"), body({"inputs": [user], "x": 1}), mentions="x"),
        Case("v2 bad datatype", v2.format("recommend"), body({"inputs": [{**user, "datatype": "WHAT"}]})),
        Case("v2 float ids", v2.format("recommend"), body({"inputs": [{**user, "datatype": "FP32"}]})),
        Case("v2 shape mismatch", v2.format("recommend"), body({"inputs": [{**user, "shape": [3]}]})),
        Case(
            "v2 unknown output", v2.format("recommend"), body({"inputs": [user], "outputs": [{"name": "x"}]})
        ),
        Case(
            "v2 huge id", v2.format("recommend"), body({"id": "x" * 100_000, "inputs": [user]}), mentions="id"
        ),
        Case(
            "v2 binary header not a number",
            v2.format("recommend"),
            body({"inputs": [user]}),
            headers={**JSON, "Inference-Header-Content-Length": "abc"},
        ),
        Case("repository unload", "/v2/repository/models/recommend/unload", b"", expected=(404, 404)),
        Case("repository load", "/v2/repository/models/recommend/load", b"", expected=(404, 404)),
        Case("ready", "/v2/health/ready", method="GET", expected=(200, 200)),
        Case("metrics", "/metrics", method="GET", expected=(200, 200)),
        Case(
            "good request", v1.format("recommend"), body({"instances": [{"user_id": 1}]}), expected=(200, 200)
        ),
    ]
    return table


@dataclass(frozen=True)
class Outcome:
    """What one case got: its status, whether it was acceptable, and whether the server stayed alive."""

    case: Case
    status: int
    text: str
    alive: bool

    @property
    def ok(self) -> bool:
        low, high = self.case.expected
        named = self.case.mentions in self.text if self.case.mentions else True
        return low <= self.status <= high and named and self.alive


def probe(base_url: str, table: list[Case], timeout_s: float = 30.0) -> list[Outcome]:
    """Send every case to ``base_url`` (a loopback server) in order; liveness is checked after each."""
    outcomes = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        for case in table:
            response = http.request(case.method, case.path, content=case.body, headers=case.headers)
            alive = http.get("/v2/health/live").status_code == 200
            outcomes.append(Outcome(case, response.status_code, response.text[:500], alive))
    return outcomes
