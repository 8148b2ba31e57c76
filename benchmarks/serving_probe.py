"""``python -m benchmarks.serving_probe --url http://127.0.0.1:8080``: serving/probe.py's table of bad and
hostile requests against a live server (loopback only); prints every case, exit 1 when one got the wrong
answer or left the server dead."""

from __future__ import annotations

import argparse
import sys

import httpx

from serving.probe import cases, probe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="a server on this machine")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's serving.max_batch")
    parser.add_argument("--max-request-bytes", type=int, default=4_194_304, help="serving.max_request_bytes")
    args = parser.parse_args(argv)
    if httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url: probe only a server on loopback")
    outcomes = probe(args.url, cases(args.max_batch, args.max_request_bytes))
    for outcome in outcomes:
        mark = "ok " if outcome.ok else "BAD"
        print(f"{mark} {outcome.status} {outcome.case.name}: {outcome.text[:120]!r}")
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
