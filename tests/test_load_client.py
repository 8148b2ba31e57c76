"""serving/load_client.py: the load client counts what it sends, times each request and counts failures."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from serving.load_client import run_load


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the model server
    status = 200
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        payload = b"{}"
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Echo.seen, _Echo.status = [], 200
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/models/recommend:predict"
    httpd.shutdown()


def test_load_sends_bodies_in_turn_and_respects_max_requests(server):
    bodies = [{"instances": [{"user_id": u}]} for u in (1, 2, 3)]
    stats = run_load(server, bodies, concurrency=3, seconds=30.0, max_requests=40)
    assert stats["requests"] == 40 and stats["errors"] == 0
    sent = Counter(b["instances"][0]["user_id"] for b in _Echo.seen)
    assert sent == {1: 14, 2: 13, 3: 13}  # the bodies in turn, each request once
    assert 0 < stats["p50_ms"] <= stats["p99_ms"]


def test_failed_requests_are_errors(server):
    _Echo.status = 500
    stats = run_load(server, [{"instances": []}], concurrency=1, seconds=30.0, max_requests=5)
    assert stats["errors"] == stats["requests"] == 5
