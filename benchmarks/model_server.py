"""The model server under test: ``python -m serving`` as a subprocess on loopback, started and stopped.

A real process (not the app in-process) so that what is measured and tested is what KServe serves:
its HTTP stack, its worker and its startup.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    bundle: Path, params_file: Path, port: int, extra: list[str] | None = None, timeout_s: float = 180
) -> subprocess.Popen:
    """``python -m serving`` on 127.0.0.1:``port``, returned once ``/v2/health/ready`` answers 200."""
    import httpx

    log = open(Path(tempfile.gettempdir()) / f"serving-{port}.log", "w")  # noqa: SIM115 (lives with the process)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "--model_dir",
            str(bundle),
            "--params",
            str(params_file),
            "--http_port",
            str(port),
            "--host",
            "127.0.0.1",
            *(extra or []),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"serving exited with {process.returncode}; log: {Path(log.name).read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise TimeoutError(f"serving not ready after {timeout_s}s; log: {log.name}")


def stop_server(process: subprocess.Popen) -> None:
    """Terminate, then kill after 30 s: a hung server must not outlive the test or benchmark."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A loopback port free now, so that parallel servers (and runs) never collide on a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
