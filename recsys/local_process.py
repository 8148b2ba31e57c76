"""A server started as a subprocess on loopback: a free port, the wait until it answers ready, the stop.

Shared by the model server's launcher (serving/local_server.py), the OPE step's bundle challenger
(recsys/ranking_client.py) and the tests' Prometheus, so every one of them fails the same way: naming
what did not start and the tail of its log, never hanging and never leaving the process behind.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


class NotReadyError(RuntimeError):
    """The process exited, or did not answer ready in time."""


def free_port() -> int:
    """A loopback port free now, so that parallel servers (and runs) never collide on a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    process: subprocess.Popen, ready_url: str, log_path: Path | str, timeout_s: float, what: str
) -> None:
    """Poll ``ready_url`` until it answers 200; :class:`NotReadyError` (with the log's tail) when the
    process exits first or ``timeout_s`` passes. The caller stops the process on error."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = Path(log_path).read_text()[-3000:]
            raise NotReadyError(f"{what} exited with {process.returncode}; log {log_path}: {tail}")
        try:
            if httpx.get(ready_url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise NotReadyError(f"{what} not ready after {timeout_s}s; log: {log_path}")
        time.sleep(0.2)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Terminate, then kill after ``timeout_s``: a hung server must not outlive its test or step."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
