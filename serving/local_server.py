"""``python -m serving`` as a subprocess on loopback, started and stopped, and what it uses.

A real process (not the app in-process) so that what the tests check and the benchmarks measure is
what KServe serves: its HTTP stack, its workers and its startup. ``module`` runs another launcher with
the same command line (the benchmark's KServe-native multi-process variant).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from recsys.local_process import NotReadyError, stop_process, wait_ready
from recsys.local_process import free_port as free_port  # re-exported: tests and benchmarks import it here

ROOT = Path(__file__).resolve().parents[1]


def start_server(
    bundle: Path,
    params_file: Path,
    port: int,
    extra: list[str] | None = None,
    timeout_s: float = 180,
    module: str = "serving",
) -> subprocess.Popen:
    """``python -m <module>`` on 127.0.0.1:``port``, returned once ``/v2/health/ready`` answers 200.

    Its request log goes to a temporary folder unless ``extra`` names one: a server started for a test or
    a benchmark must not add its traffic to the log the monitor reads (``serving.request_log.uri``)."""

    extra = list(extra or [])
    if module == "serving" and not {"--request_log", "--request-log"} & set(extra):
        extra += ["--request_log", str(Path(tempfile.gettempdir()) / f"serving-{port}-requests")]

    log = open(Path(tempfile.gettempdir()) / f"serving-{port}.log", "w")  # noqa: SIM115 (lives with the process)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
            "--model_dir",
            str(bundle),
            "--params",
            str(params_file),
            "--http_port",
            str(port),
            "--host",
            "127.0.0.1",
            *extra,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    try:
        wait_ready(process, f"http://127.0.0.1:{port}/v2/health/ready", log.name, timeout_s, "serving")
    except NotReadyError:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """Terminate, then kill after 30 s: a hung server must not outlive the test or benchmark."""
    stop_process(process)


def server_memory_mb(process: subprocess.Popen) -> dict[str, float]:
    """The memory of the server's processes (the parent and any forked workers), summed, in MiB: RSS
    (what ``top`` shows; counts pages the workers share with the parent once per process) and PSS
    (each shared page split among its sharers: what the processes together occupy)."""
    import psutil

    root = psutil.Process(process.pid)
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return {"rss_mb": round(rss / 2**20, 1), "pss_mb": round(pss / 2**20, 1)}


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time (user + system) the server's live processes have used so far, in seconds."""
    import psutil

    root = psutil.Process(process.pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def worker_requests(base_url: str) -> dict[str, float]:
    """Requests answered so far by each worker process, from ``recsys_worker_requests_total``."""
    import re

    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    pattern = r'^recsys_worker_requests_total\{worker="(\d+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}
