"""Limits applied to a request before KServe parses it: its size, and the V2 envelope.

KServe reads the whole body into memory and parses it before any model code runs, so a 200 MB body
costs gigabytes of memory and seconds of event-loop time whatever the model then says. This ASGI
middleware answers 413 as soon as the declared (``Content-Length``) or received size passes
``serving.max_request_bytes``, without buffering more than that. For V2 inference requests it also
checks what KServe would otherwise turn into a 500 or silently ignore: the binary extension's
``Inference-Header-Content-Length`` header, and unknown top-level fields of a JSON body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

V2_INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
V2_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})  # the Open Inference Protocol's
BINARY_HEADER = b"inference-header-content-length"
ELEMENT_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "INT32": 4}
ELEMENT_BYTES |= {"UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}  # BYTES: length-prefixed


class RequestLimits:
    """ASGI middleware: 413 past ``max_bytes``; 400 for a malformed V2 envelope (naming the field)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await answer(send, 400, "Content-Length: not a byte count")
                return
            if int(declared) > self.max_bytes:
                await answer(send, 413, self._too_large(int(declared)))
                return
        body = await self._read(receive)
        if body is None:
            await answer(send, 413, self._too_large(None))
            return
        problem = _v2_envelope_problem(scope, headers, body) if V2_INFER_PATH.match(scope["path"]) else None
        if problem is not None:
            await answer(send, 400, problem)
            return
        await self.app(scope, _replay(body), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (nothing more is read then)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int | None) -> str:
        got = f" ({size:,} bytes)" if size is not None else ""
        return f"request body too large{got}: at most {self.max_bytes:,} bytes (serving.max_request_bytes)"


def _v2_envelope_problem(scope: Scope, headers: dict[bytes, bytes], body: bytes) -> str | None:
    binary = headers.get(BINARY_HEADER)
    if binary is not None:
        if not binary.isdigit() or int(binary) > len(body):
            return (
                f"Inference-Header-Content-Length: {binary.decode(errors='replace')[:40]!r} is not a byte "
                f"count within the body's {len(body)} bytes"
            )
        header = body[: int(binary)]
    else:
        header = body
    if scope.get("method") != "POST":
        return None
    try:
        envelope = json.loads(header) if header else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"request body: not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]})"
    if not isinstance(envelope, dict):
        return "request body: expected a JSON object with 'inputs'"
    if binary is not None:
        problem = _binary_sizes_problem(envelope, len(body) - len(header))
        if problem is not None:
            return problem
    unknown = sorted(set(envelope) - V2_REQUEST_FIELDS)
    if unknown:
        expected = sorted(V2_REQUEST_FIELDS)
        return f"request body: unknown field(s) {unknown[:5]}; an inference request has {expected}"
    return None


def _binary_sizes_problem(envelope: dict[str, Any], binary_bytes: int) -> str | None:
    """Each binary input's size fits its datatype, and the sizes add up to the bytes after the header."""
    inputs = envelope.get("inputs")
    if not isinstance(inputs, list):
        return None  # KServe's own parsing names it
    total = 0
    for position, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            continue
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        name = tensor.get("name", f"[{position}]")
        if not isinstance(size, int) or size < 0:
            return f"inputs.{name}.parameters.binary_data_size: not a byte count"
        element = ELEMENT_BYTES.get(str(tensor.get("datatype")))
        if element is not None and size % element:
            return (
                f"inputs.{name}: binary_data_size {size} is not a multiple of {tensor.get('datatype')}'s "
                f"{element} bytes"
            )
        total += size
    if total > binary_bytes:
        return (
            f"inputs: binary_data_size adds up to {total} bytes; the body has {binary_bytes} after the header"
        )
    return None


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the already-read body on, then whatever the client does next."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def answer(send: Send, status: int, error: str = "", body: str | None = None) -> None:
    """A complete JSON response: ``{"error": error}``, or ``body`` as given."""
    payload = (body if body is not None else json.dumps({"error": error})).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
