"""What the model server exposes: KServe's inference, health and metadata routes, without its model
repository extension, and a readiness that means every model is loaded.

KServe registers ``POST /v2/repository/models/{name}/load|unload`` with no authentication: anyone who
reaches the port could unload every model while ``/v2/health/ready`` kept answering ready (it only says
the process is up). A pod that cannot answer predictions must leave the Service's endpoints, so readiness
here checks each of the server's models. Both are answered by an ASGI middleware in front of KServe's
routers, so no route table internals are edited; the repository routes are also left out of the
OpenAPI document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

from serving.request_limits import ASGIApp, Receive, Scope, Send, answer

REPOSITORY_PREFIX = "/v2/repository/"
READY_PATH = "/v2/health/ready"


class ServingSurface:
    """ASGI middleware: 404 for the model repository routes; readiness over ``model_names``."""

    def __init__(self, app: ASGIApp, dataplane: Any, model_names: list[str]) -> None:
        self.app = app
        self.dataplane = dataplane
        self.model_names = model_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith(REPOSITORY_PREFIX):
                await answer(send, 404, "the model repository (load/unload) is not served")
                return
            if path == READY_PATH:
                not_ready = self.not_ready()
                body = {"ready": not not_ready} | ({"not_ready": not_ready} if not_ready else {})
                await answer(send, 503 if not_ready else 200, body=json.dumps(body))
                return
        await self.app(scope, receive, send)

    def not_ready(self) -> list[str]:
        """The models that are not registered or not loaded."""
        registry = self.dataplane.model_registry
        return [name for name in self.model_names if not getattr(registry.get_model(name), "ready", False)]


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
