"""The model server on KServe's own multi-process option, for benchmarks/serving_load.py to compare with
serving/workers.py's fork supervisor: ``python -m benchmarks.kserve_workers`` takes ``python -m
serving``'s command line.

KServe 0.21's ``ModelServer(workers=N).start(models)`` runs ``RESTServerMultiProcess``: the parent binds
the port once, starts N fresh interpreters (multiprocessing "spawn") and hands each, by pickle, its REST
server with the data plane and every registered model; the children accept on the one shared socket,
and the parent restarts a child that stops answering its pipe. The project's models do not pickle
(thread pools and locks: ``TypeError: cannot pickle '_queue.SimpleQueue' object``), so here each model
pickles as "build the models from the bundle": every child loads the bundle itself, as a KServe model
that loads in ``load()`` would, and the parent keeps the copy it registered. The children serve the
project's HTTP surface (serving.server.SurfaceRESTServer), so both variants answer with the same app;
what KServe does not carry across processes stays per process: readiness (there are no worker slots
across a spawn) and ``recsys_worker_requests_total`` (every child counts as worker 0). ``/metrics`` sums
the children through ``$PROMETHEUS_MULTIPROC_DIR``, set before they start.
"""

from __future__ import annotations

import argparse
import asyncio
import copyreg
import signal
from typing import Any

from recsys.config import FeastConfig, ServingConfig, load_params
from serving.endpoints import RecsysModel
from serving.server import EVENT_LOOP, SurfaceRESTServer, build_models, new_model_server
from serving.workers import use_multiprocess_metrics

_MODELS: dict[str, dict[str, RecsysModel]] = {}  # per process: bundle directory -> name -> model


def rebuilt_model(bundle_dir: str, config: ServingConfig, feast: FeastConfig, name: str) -> RecsysModel:
    """The model ``name`` of the bundle, built once per process (what an unpickled model becomes)."""
    if bundle_dir not in _MODELS:
        _MODELS[bundle_dir] = {m.name: m for m in build_models(bundle_dir, config, feast)}
    return _MODELS[bundle_dir][name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kserve_workers", description=__doc__)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--http_port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no_online_store", action="store_true")
    args = parser.parse_args(argv)
    # after serving (imported above), which imports KServe with a clean argv
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess

    params = load_params(args.params)
    if args.no_online_store:
        params.serving.online_store = False
    use_multiprocess_metrics()  # in the environment before the spawn: the children start in that mode
    models = build_models(args.model_dir, params.serving, params.feast)
    rebuild = (args.model_dir, params.serving, params.feast)
    for kind in {type(model) for model in models}:
        copyreg.pickle(kind, lambda m: (rebuilt_model, (*rebuild, m.name)))
    server = new_model_server(args.http_port)
    for model in models:  # what ModelServer.start registers before it starts the processes
        server.register_model(model)
    multi = RESTServerMultiProcess(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        args.http_port,
        workers=args.workers,
        grace_period=server.grace_period,
        event_loop=EVENT_LOOP,
        timeout_keep_alive=server.timeout_keep_alive,
    )
    # KServe offers no hook for the children's app or bind address: its REST server is swapped for the
    # project's (same constructor arguments) so that both variants serve the same app on loopback
    multi._rest_server = SurfaceRESTServer(server, args.host, params.serving.max_request_bytes)
    asyncio.run(_serve(multi))
    return 0


async def _serve(multi: Any) -> None:
    """``multi.start()`` until SIGTERM / SIGINT, which stop it as ``ModelServer.stop`` does."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(multi.stop()))
    await multi.start()


if __name__ == "__main__":
    raise SystemExit(main())
