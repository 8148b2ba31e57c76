"""One log line per bad request.

KServe answers an ``InvalidInput`` (HTTP 400) with a handler that logs it at ERROR with the whole
traceback: ~25 lines per malformed request, with the client's text (which can hold newlines and terminal
escapes, forging log lines) written raw. A bad request is the client's fault, not the server's, so the
project's handler answers exactly as KServe's does (400, ``{"error": message}``) and logs one INFO line:
the method and path, the status and the message, escaped and cut to ``LOGGED_CHARS`` characters.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput

log = logging.getLogger(__name__)

LOGGED_CHARS = 300  # of the escaped message; a client can send megabytes of it


def install_bad_request_log(app: FastAPI) -> None:
    """Replace KServe's ``InvalidInput`` handler on ``app`` (call after KServe added its handlers)."""
    app.add_exception_handler(InvalidInput, _invalid_input)  # type: ignore[arg-type]


def loggable(text: str, limit: int = LOGGED_CHARS) -> str:
    """``text`` with control and non-ASCII characters escaped (``\\n``, ``\\x1b``, ``\\u2028``) and cut to
    about ``limit`` characters (its head and its last fifth, where a message says what is wrong), so one
    client value stays on one log line and cannot pass for another."""
    escaped = text.encode("unicode_escape").decode("ascii")
    if len(escaped) <= limit:
        return escaped
    tail = limit // 5
    cut = len(escaped) - limit
    return f"{escaped[: limit - tail]}...[{cut} chars]...{escaped[-tail:]}"


async def _invalid_input(request: Request, exc: InvalidInput) -> JSONResponse:
    status = HTTPStatus.BAD_REQUEST
    log.info(
        "%s %s -> %d: %s", request.method, loggable(request.url.path, 120), status.value, loggable(str(exc))
    )
    return JSONResponse(status_code=status, content={"error": str(exc)})
