"""What the model server exposes: KServe's inference, health and metadata routes, without its model
repository extension, and a readiness that means every model is loaded.

KServe registers ``POST /v2/repository/models/{name}/load|unload`` with no authentication: anyone who
reaches the port could unload every model while ``/v2/health/ready`` kept answering ready (it only says
the process is up). A pod that cannot answer predictions must leave the Service's endpoints, so readiness
here checks each of the server's models, and with several worker processes (serving/workers.py) that
every worker has registered them. Both are answered by an ASGI middleware in front of KServe's routers,
so no route table internals are edited; the repository routes are also left out of the OpenAPI
document. When prometheus_client writes to a multiprocess directory, the same middleware answers
``/metrics`` with every process's values summed (KServe's handler shows its own process's only), and
``recsys_worker_requests_total{worker}`` counts the model requests each worker answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, exposition, multiprocess

from serving.request_limits import ASGIApp, Receive, Scope, Send, answer
from serving.workers import WorkerSlots, multiprocess_metrics_dir

REPOSITORY_PREFIX = "/v2/repository/"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
MODEL_PREFIXES = ("/v1/models/", "/v2/models/")  # predict / infer (and a model's metadata, readiness)

WORKER_REQUESTS = Counter(
    "recsys_worker_requests",
    "Model requests (V1 /v1/models/*, V2 /v2/models/*) answered by each server worker process "
    "(serving.workers; slot 0 with one process).",
    ["worker"],
)


class ServingSurface:
    """ASGI middleware: 404 for the model repository routes; readiness over ``model_names`` and the
    worker ``slots``; ``/metrics`` summed over processes in prometheus_client's multiprocess mode."""

    def __init__(
        self, app: ASGIApp, dataplane: Any, model_names: list[str], slots: WorkerSlots | None = None
    ) -> None:
        self.app = app
        self.dataplane = dataplane
        self.model_names = model_names
        self.slots = slots
        self.worker = str(slots.slot if slots is not None else 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(MODEL_PREFIXES):
                WORKER_REQUESTS.labels(worker=self.worker).inc()
            if path.startswith(REPOSITORY_PREFIX):
                await answer(send, 404, "the model repository (load/unload) is not served")
                return
            if path == READY_PATH:
                not_ready = self.not_ready()
                body = {"ready": not not_ready} | ({"not_ready": not_ready} if not_ready else {})
                await answer(send, 503 if not_ready else 200, body=json.dumps(body))
                return
            if path == METRICS_PATH and (directory := multiprocess_metrics_dir()) is not None:
                await _answer_metrics(scope, send, directory)
                return
        await self.app(scope, receive, send)

    def not_ready(self) -> list[str]:
        """The models that are not registered or not loaded, and the workers that are not serving."""
        registry = self.dataplane.model_registry
        models = [name for name in self.model_names if not getattr(registry.get_model(name), "ready", False)]
        return models + (self.slots.not_ready() if self.slots is not None else [])


async def _answer_metrics(scope: Scope, send: Send, directory: str) -> None:
    """Every process's metrics from ``directory`` (counters and histograms summed), in the exposition
    format the scraper asks for, as KServe's handler does for one process."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    headers = dict(scope.get("headers") or [])
    encoder, content_type = exposition.choose_encoder(headers.get(b"accept", b"").decode("latin-1"))
    body = encoder(registry)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def hide_repository_routes(app: FastAPI) -> None:
    """Leave the repository routes out of ``/openapi.json`` (they answer 404 anyway)."""
    for prefix, route in _routes(app.router.routes, ""):
        if (prefix + getattr(route, "path", "")).startswith(REPOSITORY_PREFIX):
            route.include_in_schema = False
    app.openapi_schema = None


def _routes(routes: list[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """Every route with the prefix it is served under, through included routers."""
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            context = getattr(route, "include_context", None)
            yield from _routes(nested.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix, route
