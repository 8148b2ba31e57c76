"""Assemble the models from a bundle and run them on KServe's ``ModelServer``.

KServe's REST server always binds 0.0.0.0 (``RESTServer`` hard-codes uvicorn's host), which is right in
a pod and wrong on a laptop or in tests; :class:`RecsysModelServer` sets the bind address on KServe's
own uvicorn config just before it starts serving. FastAPI's 422 for a V2 body that is not an inference
request (malformed JSON, a missing ``inputs``) becomes a 400 naming the field, like every other bad
request. With ``serving.workers`` > 1 the same server runs in each of several forked processes on one
port (serving/workers.py): the bundle is loaded once, before the fork; the rest of the models per worker.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import FastAPIDeprecationWarning, RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.protocol.rest.server import RESTServer

from recsys.config import ConfigError, FeastConfig, ServingConfig
from serving.bundle import ServingBundle, load_bundle
from serving.endpoints import RankingModel, RecommendModel, RecsysModel, RetrievalModel
from serving.online_features import OnlineFeatures, feature_defaults
from serving.recommender import Recommender
from serving.request_limits import RequestLimits
from serving.routes import ServingSurface, hide_repository_routes
from serving.schemas import build_schemas
from serving.workers import METRICS_DIR_ENV, WorkerSlots, serve_workers, use_multiprocess_metrics

log = logging.getLogger(__name__)
MODEL_NAMES = tuple(model.endpoint for model in (RetrievalModel, RankingModel, RecommendModel))


def silence_kserve_deprecations() -> None:
    """KServe's V1 endpoints answer with FastAPI's ORJSONResponse, which FastAPI now deprecates; without
    this filter every V1 answer logs the same warning (KServe's to change, not a deployment's)."""
    warnings.filterwarnings(
        "ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning
    )


silence_kserve_deprecations()


def build_models(bundle_dir: str | Path, serving: ServingConfig, feast: FeastConfig) -> list[RecsysModel]:
    """Verify and load the bundle, connect the online store, warm the item cache; the three models."""
    return models_from_bundle(load_serving_bundle(bundle_dir, serving), serving, feast)


def load_serving_bundle(bundle_dir: str | Path, serving: ServingConfig) -> ServingBundle:
    """Verify and load the bundle (what worker processes share: loaded once, before they are forked)."""
    torch.set_num_threads(serving.torch_threads)
    return load_bundle(bundle_dir, serving.default_ranker)


def models_from_bundle(
    bundle: ServingBundle, serving: ServingConfig, feast: FeastConfig
) -> list[RecsysModel]:
    """Connect the online store, warm the item cache; the three models over ``bundle`` (per process:
    store connections and thread pools do not survive a fork)."""
    torch.set_num_threads(serving.torch_threads)
    store = _feature_store(feast) if serving.online_store else None
    encoder = bundle.two_tower_encoder
    features = OnlineFeatures(
        store,
        feature_defaults(encoder, bundle.user_features),
        feature_defaults(encoder, bundle.item_features),
        timeout_s=serving.feast_timeout_s,
        item_cache_ttl_s=serving.item_cache_ttl_s,
    )
    features.warm(bundle.catalogue)
    recommender = Recommender(bundle, features, serving)
    schemas = build_schemas(
        serving, encoder, bundle.user_features, bundle.item_features, sorted(bundle.rankers)
    )
    log.info(
        "serving bundle %s: %d items, rankers %s, online store %s",
        bundle.version,
        len(bundle.catalogue),
        sorted(bundle.rankers),
        "on" if store is not None else "off",
    )
    return [
        RetrievalModel(recommender, schemas),
        RankingModel(recommender, schemas),
        RecommendModel(recommender, schemas),
    ]


class RecsysModelServer(ModelServer):
    """KServe's ModelServer (REST only by default) listening on ``host`` instead of always 0.0.0.0, with
    the project's HTTP surface: no model repository routes, readiness over every model (and every worker
    process), request limits.

    In a worker process (``sockets`` and ``slots`` given) it serves on the socket serving/workers.py bound
    for it (``SO_REUSEPORT``, the port shared with the other workers) and marks its slot ready once its
    models are registered.
    """

    def __init__(
        self,
        host: str,
        http_port: int,
        max_request_bytes: int,
        enable_grpc: bool = False,
        sockets: list[socket.socket] | None = None,
        slots: WorkerSlots | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("enable_latency_logging", False)  # a log line per request; Prometheus has it
        super().__init__(http_port=http_port, enable_grpc=enable_grpc, workers=1, **kwargs)
        self.host = host
        self.max_request_bytes = max_request_bytes
        self.sockets = sockets
        self.slots = slots

    def setup_event_loop(self) -> None:
        # called by start() after the models are registered and the REST server (and its uvicorn config)
        # exists, before it binds and before it adds KServe's routes to the app (in its own start): the
        # app is finished right after
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
            add_kserve_routes = self._rest_server.create_application

            def create_application() -> None:
                add_kserve_routes()
                _finish_app(_kserve_app(), self.dataplane, self.max_request_bytes, self.slots)

            self._rest_server.create_application = create_application  # type: ignore[method-assign]
            if self.sockets is not None:  # a worker: its SO_REUSEPORT socket, not one uvicorn would bind
                uvicorn_server = self._rest_server._server
                uvicorn_server.serve = functools.partial(uvicorn_server.serve, sockets=self.sockets)  # type: ignore[method-assign]
        if self.slots is not None:
            self.slots.set_ready(self.slots.slot, True)
        super().setup_event_loop()


def serve(models: list[RecsysModel], host: str, http_port: int, max_request_bytes: int) -> None:
    """Serve the models in this process until SIGTERM / SIGINT."""
    if os.environ.get(METRICS_DIR_ENV):  # set by the deployment: prometheus_client writes there already
        use_multiprocess_metrics()  # made and emptied, as with several workers
    server = RecsysModelServer(host=host, http_port=http_port, max_request_bytes=max_request_bytes)
    server.start(models)


def serve_forked(
    bundle: ServingBundle, serving: ServingConfig, feast: FeastConfig, host: str, http_port: int
) -> int:
    """Serve ``bundle`` from ``serving.workers`` forked processes until SIGTERM / SIGINT; the exit code."""

    def run_worker(sockets: list[socket.socket], slots: WorkerSlots) -> None:
        try:
            models = models_from_bundle(bundle, serving, feast)
        except (ConfigError, FileNotFoundError) as exc:  # the online store: said as one process says it
            print(f"serving: cannot start: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        server = RecsysModelServer(
            host=host,
            http_port=http_port,
            max_request_bytes=serving.max_request_bytes,
            sockets=sockets,
            slots=slots,
        )
        server.start(models)

    return serve_workers(run_worker, host, http_port, serving.workers)


def create_app(server: ModelServer, max_request_bytes: int) -> FastAPI:
    """KServe's FastAPI app with its routes and handlers over ``server``'s models, without listening.

    For in-process clients (tests). KServe's app is a process-wide singleton, so the routes are added
    once; register further models on the same ``server`` to change what they answer.
    """
    app = _kserve_app()
    if not getattr(app.state, "recsys_routes", False):
        RESTServer(
            FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, 0
        ).create_application()
        _finish_app(app, server.dataplane, max_request_bytes)
    return app


def _finish_app(
    app: FastAPI, dataplane: Any, max_request_bytes: int, slots: WorkerSlots | None = None
) -> None:
    """The project's HTTP surface on KServe's app: 400s naming the field, no repository routes,
    readiness over every model (and worker), request limits before parsing. Once per app."""
    if getattr(app.state, "recsys_routes", False):
        return
    _install_bad_request_handler(app)
    from serving.request_log import install_bad_request_log  # a 400 logs one line, not KServe's traceback

    install_bad_request_log(app)
    hide_repository_routes(app)
    app.add_middleware(RequestLimits, max_bytes=max_request_bytes)
    app.add_middleware(  # outermost
        ServingSurface, dataplane=dataplane, model_names=list(MODEL_NAMES), slots=slots
    )
    app.state.recsys_routes = True


def _kserve_app() -> FastAPI:
    from kserve.model_server import app

    return app


def _install_bad_request_handler(app: FastAPI) -> None:
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors()[:5]:
            loc = [str(p) for p in error.get("loc", ()) if p != "body"]
            parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
        return JSONResponse(status_code=400, content={"error": "; ".join(parts)})

    app.add_exception_handler(RequestValidationError, bad_request)  # type: ignore[arg-type]


def _feature_store(feast: FeastConfig) -> Any:
    from recsys.feature_store import open_feature_store  # feast is heavy: import only when used

    return open_feature_store(feast)
