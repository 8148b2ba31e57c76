"""Debian's Prometheus (/usr/bin/prometheus) on loopback, scraping given targets: the guardrail tests and
benchmarks/guardrail_rollout.py evaluate their PromQL on the real thing."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from recsys.local_process import stop_process, wait_ready


def prometheus_binary() -> str | None:
    """Prometheus from PATH, else Debian's /usr/bin/prometheus; None when not installed."""
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )


@contextmanager
def running_prometheus(
    folder: Path,
    port: int,
    targets: dict[str, str],
    scrape_s: float = 1.0,
    honor_labels: Collection[str] = (),
) -> Iterator[str]:
    """Prometheus on 127.0.0.1:``port`` scraping ``targets`` (job name -> host:port) every ``scrape_s``,
    storage in ``folder``; yields its base URL once ready and stops it on exit. The jobs in
    ``honor_labels`` keep their samples' own labels (a textfile exporter's ``job``/``instance``)."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus not installed (`apt-get install prometheus`)")
    folder.mkdir(parents=True, exist_ok=True)
    every = f"{round(scrape_s * 1000)}ms"  # Prometheus durations are integers with a unit
    config = {
        "global": {"scrape_interval": every, "scrape_timeout": every},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            | ({"honor_labels": True} if job in honor_labels else {})
            for job, target in targets.items()
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(folder / "prometheus.log", "w")  # noqa: SIM115 (lives with the process)
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/-/ready", folder / "prometheus.log", 60, "prometheus")
        yield url
    finally:
        stop_process(process, timeout_s=20)
        log.close()


def wait_for_scrapes(url: str, jobs: int, timeout_s: float = 30) -> None:
    """Until ``jobs`` targets report ``up == 1``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(f"{url}/api/v1/query", params={"query": "sum(up)"}, timeout=5).json()
        result = answer["data"]["result"]
        if result and float(result[0]["value"][1]) >= jobs:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{url}: fewer than {jobs} targets up after {timeout_s}s")
