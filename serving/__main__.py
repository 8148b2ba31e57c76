"""``python -m serving --model_dir artifacts/bundle [--http_port 8080] [--host 127.0.0.1] [--workers N]``.

Loads and verifies the bundle first: a file whose checksum differs from the manifest stops start-up
with exit code 1 and a message naming the file, before any port is opened. So does a missing Feast
registry file when the online store is on (serving/online_features.py checks it before Feast would
create an empty one). With ``serving.workers`` (or ``--workers``) above 1, the bundle is loaded and
checked here once and the server processes are forked from this one (serving/workers.py); a worker that
cannot start (the online store, say) ends the server with exit code 1 too. Every answer goes to the
request log (``serving.request_log``; ``--request_log URI|off``), one set of files per process. With
``serving.index_swap.store_uri`` (or ``--index_swap_from URI``), each process polls that promote store
and takes up a refreshed index (same models, more items) without a restart (serving/index_swap.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from recsys.ann_index import IndexContractError
from recsys.bundle_manifest import BundleIntegrityError
from recsys.config import ConfigError, load_params


def parser() -> argparse.ArgumentParser:
    """The server's command line (components/deploy.py renders a pod's args for it)."""
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument("--model_dir", "--model-dir", required=True, help="the bundle directory")
    parser.add_argument("--params", default="params.yaml", help="the project configuration file")
    parser.add_argument("--http_port", "--http-port", type=int, default=8080, help="REST port")
    parser.add_argument("--host", default=None, help="bind address (default: serving.host)")
    parser.add_argument(
        "--workers", type=int, default=None, help="server processes (default: serving.workers)"
    )
    parser.add_argument(
        "--no_online_store",
        action="store_true",
        help="serve without Feast (features from requests / defaults)",
    )
    parser.add_argument(
        "--request_log",
        "--request-log",
        default=None,
        help="answers logged to a folder or s3://bucket/prefix, or 'off' (default: serving.request_log)",
    )
    parser.add_argument(
        "--index_swap_from",
        "--index-swap-from",
        default=None,
        help="promote store (s3://... or file:///...) polled for refreshed indexes, '' for off "
        "(default: serving.index_swap.store_uri)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        overrides = {"serving.workers": args.workers} if args.workers is not None else None
        params = load_params(args.params, overrides)
        if args.no_online_store:
            params.serving.online_store = False
        if args.request_log is not None:
            params.serving.request_log.enabled = args.request_log != "off"
            if args.request_log != "off":
                params.serving.request_log.uri = args.request_log
        if args.index_swap_from is not None:
            params.serving.index_swap.store_uri = args.index_swap_from
        from serving.request_log import open_request_log
        from serving.server import load_serving_bundle, models_from_bundle, serve, serve_forked

        bundle = load_serving_bundle(args.model_dir, params.serving)
        host = args.host or params.serving.host
        if params.serving.workers > 1:
            return serve_forked(bundle, params.serving, params.feast, host, args.http_port)
        models = models_from_bundle(
            bundle, params.serving, params.feast, open_request_log(params.serving.request_log)
        )
    except (BundleIntegrityError, IndexContractError, ConfigError, FileNotFoundError) as exc:
        print(f"serving: cannot start: {exc}", file=sys.stderr)
        return 1
    serve(models, host=host, http_port=args.http_port, max_request_bytes=params.serving.max_request_bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
