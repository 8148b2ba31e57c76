"""Assemble the models from a bundle and serve them with KServe's REST server.

Only KServe's public API is used: ``ModelServer`` holds the models (``register_model``) and its data
plane, and KServe's public ``RESTServer`` class serves them. KServe 0.21's ``ModelServer.start`` builds
its own ``RESTServer`` with no hook for what this project needs (the bind address: KServe hard-codes
0.0.0.0, right in a pod and wrong on a laptop or in tests; a socket from serving/workers.py; the
project's HTTP surface on the app), so :func:`serve_models` does what ``start`` does for one REST
process and :class:`SurfaceRESTServer` extends ``RESTServer`` through its public methods: the host on
its uvicorn ``config``, the surface added in ``create_application``, sockets through ``run``. FastAPI's
422 for a V2 body that is not an inference request (malformed JSON, a missing ``inputs``) becomes a 400
naming the field, like every other bad request. With ``serving.workers`` > 1 the same server runs in each
of several forked processes on one port (serving/workers.py): the bundle is loaded once, before the fork;
the rest of the models per worker, the index-swap poller (serving/index_swap.py) included.
"""

from __future__ import annotations

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
from uvicorn.importer import import_from_string

from recsys.config import ConfigError, FeastConfig, ServingConfig
from serving.bad_requests import install_bad_request_log
from serving.bundle import ServingBundle, load_bundle
from serving.endpoints import RankingModel, RecommendModel, RecsysModel, RetrievalModel
from serving.index_swap import start_index_swap
from serving.online_features import OnlineFeatures, feature_defaults
from serving.recommender import Recommender
from serving.request_limits import RequestLimits
from serving.request_log import RequestLog, open_request_log
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
    bundle: ServingBundle, serving: ServingConfig, feast: FeastConfig, request_log: RequestLog | None = None
) -> list[RecsysModel]:
    """Connect the online store, warm the item cache; the three models over ``bundle`` (per process:
    store connections and threads do not survive a fork), writing their answers to ``request_log``;
    with ``serving.index_swap.store_uri``, the poller that swaps a refreshed index in (models' ``close``
    stops it)."""
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
    index_swap = start_index_swap(recommender, serving.index_swap, serving.default_ranker)
    return [
        RetrievalModel(recommender, schemas, request_log, index_swap),
        RankingModel(recommender, schemas, request_log, index_swap),
        RecommendModel(recommender, schemas, request_log, index_swap),
    ]


EVENT_LOOP = "asyncio"  # what KServe's ModelServer.start runs uvicorn on (RESTServer.run's "auto" is uvloop)


class SurfaceRESTServer(RESTServer):
    """KServe's REST server listening on ``host`` with the project's HTTP surface: no model repository
    routes, readiness over every model (and every worker process, ``slots``), request limits, 400s
    naming the field. Picklable, like KServe's own (its multi-process server spawns ``run``)."""

    def __init__(
        self,
        server: ModelServer,
        host: str,
        max_request_bytes: int,
        slots: WorkerSlots | None = None,
        http_port: int | None = None,
    ) -> None:
        super().__init__(
            FASTAPI_APP_IMPORT_STRING,
            server.dataplane,
            server.model_repository_extension,
            server.http_port if http_port is None else http_port,
            access_log_format=server.access_log_format,
            grace_period=server.grace_period,
            event_loop=EVENT_LOOP,
            timeout_keep_alive=server.timeout_keep_alive,
        )
        self.config.host = host  # uvicorn's public Config: KServe's constructor hard-codes 0.0.0.0
        self.max_request_bytes = max_request_bytes
        self.slots = slots

    def create_application(self) -> None:
        """KServe's routes, middlewares and handlers on its app, then the project's surface over them
        (``run`` calls this once, before uvicorn loads the app)."""
        if getattr(kserve_app().state, "recsys_routes", False):
            return  # KServe's app is a process-wide singleton: its routes are added once
        super().create_application()
        _finish_app(kserve_app(), self.dataplane, self.max_request_bytes, self.slots)


def new_model_server(http_port: int = 0) -> ModelServer:
    """A REST-only ``ModelServer`` without a log line per request (Prometheus has the latencies)."""
    return ModelServer(http_port=http_port, enable_grpc=False, workers=1, enable_latency_logging=False)


def serve_models(
    models: list[RecsysModel],
    host: str,
    http_port: int,
    max_request_bytes: int,
    sockets: list[socket.socket] | None = None,
    slots: WorkerSlots | None = None,
) -> None:
    """Serve ``models`` on ``host:http_port`` (or on ``sockets``, a worker's) until SIGTERM / SIGINT.

    ``ModelServer.start``'s steps for one REST process, on public API: register and start the models,
    KServe's stop handler (uvicorn drains on the signal, then passes it on to that handler, which unloads
    the models: exit 0), serve. A worker marks its ``slots`` flag once its models are registered.
    """
    server = new_model_server(http_port)
    for model in models:
        server.register_model(model)
        model.enable_latency_logging = server.enable_latency_logging
        model.start()
    rest = SurfaceRESTServer(server, host, max_request_bytes, slots)
    if slots is not None:
        slots.set_ready(slots.slot, True)
    server.register_signal_handler()
    try:
        rest.run(sockets=sockets)
    finally:  # KServe's stop handler closed them already on SIGTERM; any other way out, here
        for model in models:
            model.close()


def serve(models: list[RecsysModel], host: str, http_port: int, max_request_bytes: int) -> None:
    """Serve the models in this process until SIGTERM / SIGINT."""
    if os.environ.get(METRICS_DIR_ENV):  # set by the deployment: prometheus_client writes there already
        use_multiprocess_metrics()  # made and emptied, as with several workers
    serve_models(models, host, http_port, max_request_bytes)


def serve_forked(
    bundle: ServingBundle, serving: ServingConfig, feast: FeastConfig, host: str, http_port: int
) -> int:
    """Serve ``bundle`` from ``serving.workers`` forked processes until SIGTERM / SIGINT; the exit code."""

    def run_worker(sockets: list[socket.socket], slots: WorkerSlots) -> None:
        try:
            models = models_from_bundle(bundle, serving, feast, open_request_log(serving.request_log))
        except (ConfigError, FileNotFoundError) as exc:  # the online store: said as one process says it
            print(f"serving: cannot start: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        serve_models(models, host, http_port, serving.max_request_bytes, sockets, slots)

    return serve_workers(run_worker, host, http_port, serving.workers)


def create_app(server: ModelServer, max_request_bytes: int) -> FastAPI:
    """KServe's FastAPI app with its routes and handlers over ``server``'s models, without listening.

    For in-process clients (tests). KServe's app is a process-wide singleton, so the routes are added
    once; register further models on the same ``server`` to change what they answer.
    """
    SurfaceRESTServer(server, "127.0.0.1", max_request_bytes).create_application()
    return kserve_app()


def kserve_app() -> FastAPI:
    """KServe's app: the public ``kserve.model_server.app`` that ``RESTServer`` adds its routes to and
    uvicorn serves (``FASTAPI_APP_IMPORT_STRING``); 0.21 takes no app of our own."""
    return import_from_string(FASTAPI_APP_IMPORT_STRING)


def _finish_app(
    app: FastAPI, dataplane: Any, max_request_bytes: int, slots: WorkerSlots | None = None
) -> None:
    """The project's HTTP surface on KServe's app: 400s naming the field, no repository routes,
    readiness over every model (and worker), request limits before parsing. Once per app."""
    _install_bad_request_handler(app)
    install_bad_request_log(app)  # a 400 logs one line, not KServe's traceback
    hide_repository_routes(app)
    app.add_middleware(RequestLimits, max_bytes=max_request_bytes)
    app.add_middleware(  # outermost
        ServingSurface, dataplane=dataplane, model_names=list(MODEL_NAMES), slots=slots
    )
    app.state.recsys_routes = True


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
