"""Several server processes (``serving.workers``, serving/workers.py): ``python -m serving --workers 2``
on 127.0.0.1 answers from both processes, ``/metrics`` sums what both answered, readiness needs every
worker, a worker that dies is replaced, a worker that cannot start stops the server with exit 1, and
SIGTERM stops every worker with exit code 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pyarrow.parquet as pq
import pytest

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from recsys.config import load_params
from serving.local_server import free_port, start_server, stop_server
from serving.routes import ServingSurface
from serving.workers import WorkerSlots, _bind
from tests.conftest import small_serving_bundle

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    params = load_params(ROOT / "params.yaml")
    return small_serving_bundle(params, tmp_path_factory.mktemp("serving_workers"))


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory) -> Path:
    """The server's multiprocess metrics directory, with a stale file a previous run left behind."""
    path = tmp_path_factory.mktemp("metrics")
    (path / "counter_999999.db").write_bytes(b"stale")
    return path


@pytest.fixture(scope="module")
def server(bundle_dir, metrics_dir, monkeypatch_module, tmp_path_factory):
    monkeypatch_module.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    port = free_port()
    from tests.conftest import write_params

    request_log = tmp_path_factory.mktemp("request_log")
    # files only at shutdown: what the workers answered is all in their buffers when SIGTERM comes
    params_file = write_params(
        tmp_path_factory.mktemp("params") / "params.yaml",
        {"serving.request_log.flush_interval_s": 3600, "serving.request_log.flush_rows": 50_000},
    )
    extra = ["--no_online_store", "--workers", str(WORKERS), "--request_log", str(request_log)]
    process = start_server(bundle_dir, params_file, port, extra)
    yield SimpleNamespace(base=f"http://127.0.0.1:{port}", process=process, request_log=request_log)
    if process.poll() is None:
        stop_server(process)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_every_worker_answers_and_metrics_sum_over_them(server, metrics_dir):
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == WORKERS
    assert not (metrics_dir / "counter_999999.db").exists()  # cleaned at start
    sent = 0
    for _ in range(20):  # the kernel picks the worker per connection: a few rounds reach both
        sent += _concurrent_recommends(server.base, clients=8, each=5)
        if (
            all(count > 0 for count in _worker_requests(server.base).values())
            and len(_worker_requests(server.base)) == WORKERS
        ):
            break
    per_worker = _worker_requests(server.base)
    assert sorted(per_worker) == [str(slot) for slot in range(WORKERS)], per_worker
    assert all(count > 0 for count in per_worker.values()), per_worker
    metrics = httpx.get(f"{server.base}/metrics").text
    # KServe's predict histogram, summed over the workers: every request, not one process's share
    assert _metric(metrics, 'request_predict_seconds_count{model_name="recommend"}') == sent
    assert {p.name for p in metrics_dir.glob("*.db")} >= {f"counter_{w.pid}.db" for w in workers}


def test_readiness_is_false_until_every_worker_is_ready():
    slots = WorkerSlots(2)
    dataplane = SimpleNamespace(
        model_registry=SimpleNamespace(get_model=lambda _: SimpleNamespace(ready=True))
    )
    surface = ServingSurface(_never_called, dataplane, ["recommend"], slots=slots)
    slots.set_ready(0, True)
    status, body = _get(surface, "/v2/health/ready")
    assert status == 503 and body == {"ready": False, "not_ready": ["worker 1"]}
    slots.set_ready(1, True)
    assert _get(surface, "/v2/health/ready") == (200, {"ready": True})


def test_a_worker_that_dies_is_replaced(server):
    parent = psutil.Process(server.process.pid)
    victim = parent.children()[0]
    victim.kill()
    seen_not_ready = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = httpx.get(f"{server.base}/v2/health/ready", timeout=5)
        if answer.status_code == 503:
            seen_not_ready.append(answer.json()["not_ready"])
        pids = {child.pid for child in parent.children()}
        if answer.status_code == 200 and len(pids) == WORKERS and victim.pid not in pids:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the killed worker was not replaced within 60 s")
    assert all(
        not_ready and all(name.startswith("worker ") for name in not_ready) for not_ready in seen_not_ready
    )
    assert _concurrent_recommends(server.base, clients=4, each=3) == 12


def test_sigterm_stops_every_worker_with_exit_code_0_and_no_logged_answer_is_lost(server):
    """Every answer is still in the workers' request-log buffers (a file every 2,000 rows or 10 s): SIGTERM
    must write them all, each worker its own files."""
    from recsys.request_records import read_request_log

    workers = psutil.Process(server.process.pid).children()
    sent = [f"sigterm-{i}" for i in range(40)]
    with httpx.Client(timeout=30) as http:
        for request_id in sent:
            body = {"instances": [{"user_id": 7, "n": 3}]}
            headers = {"x-request-id": request_id, "connection": "close"}  # a new connection each
            answer = http.post(f"{server.base}/v1/models/recommend:predict", json=body, headers=headers)
            assert answer.status_code == 200
    server.process.terminate()
    assert server.process.wait(timeout=60) == 0
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    rows = read_request_log(str(server.request_log)).to_pylist()
    logged = [r["request_id"] for r in rows if r["request_id"].startswith("sigterm-")]
    assert sorted(logged) == sorted(sent)
    writers = {  # each worker writes files named by its pid
        int(path.name.split("-")[-2])
        for path in server.request_log.rglob("*.parquet")
        if any(r.startswith("sigterm-") for r in pq.read_table(path).column("request_id").to_pylist())
    }
    assert writers and writers <= {w.pid for w in workers}


def test_a_worker_that_cannot_start_stops_the_server_with_exit_code_1(bundle_dir, tmp_path):
    from tests.conftest import write_params
    from tests.feast_fixtures import copy_feature_repo

    repo = copy_feature_repo(tmp_path)  # nothing registered: no registry, which each worker's store needs
    params_file = write_params(tmp_path / "params.yaml", {"feast.repo_path": str(repo)})
    command = [sys.executable, "-m", "serving", "--model_dir", str(bundle_dir), "--params", str(params_file)]
    done = subprocess.run(
        [*command, "--http_port", "0", "--host", "127.0.0.1", "--workers", str(WORKERS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "serving: cannot start:" in done.stderr and str(repo / "data" / "registry.db") in done.stderr


def test_each_worker_socket_is_tcp_and_shares_the_port():
    """proto IPPROTO_TCP: asyncio sets TCP_NODELAY only then (without it a keep-alive answer waited ~40
    ms for a delayed ACK); SO_REUSEPORT: every worker listens on the port, the kernel spreads clients."""
    first = _bind("127.0.0.1", 0)
    second = _bind("127.0.0.1", first.getsockname()[1])
    try:
        for sock in (first, second):
            assert sock.proto == socket.IPPROTO_TCP
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        first.close()
        second.close()


def test_more_workers_than_the_pods_cpu_limit_is_refused():
    from recsys.config import ConfigError

    with pytest.raises(ConfigError, match=r"serving.workers 3 exceeds deploy.resources.cpu_limit 2"):
        load_params(ROOT / "params.yaml", {"serving.workers": 3, "deploy.resources.cpu_limit": "2"})
    with pytest.raises(ConfigError, match=r"serving.workers"):
        load_params(ROOT / "params.yaml", {"serving.workers": 0})


# --------------------------------------------------------------------------------------------------


def _concurrent_recommends(base: str, clients: int, each: int) -> int:
    """``clients`` threads each posting ``each`` recommends, a new connection per request; all 200."""
    statuses: list[int] = []

    def client(offset: int) -> None:
        for i in range(each):
            body = {"instances": [{"user_id": offset * each + i, "n": 5}]}
            with httpx.Client(timeout=30) as http:  # a new connection: the kernel picks the worker
                statuses.append(http.post(f"{base}/v1/models/recommend:predict", json=body).status_code)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(statuses)
    return len(statuses)


def _worker_requests(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^recsys_worker_requests_total\{worker="(\d+)"\} (\S+)$', text, re.M)
    }


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


async def _never_called(scope, receive, send) -> None:
    raise AssertionError("readiness is answered by the middleware")


def _get(surface: ServingSurface, path: str) -> tuple[int, dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    asyncio.run(surface({"type": "http", "path": path, "headers": []}, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_values_made_before_start_survive_the_metrics_dir_cleaning(tmp_path):
    """$PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported (by the deployment, or inherited
    from a process that imported Feast's metrics module, which sets it): a metric without labels (Feast
    has some) gets its value file at import. Cleaning the directory at start used to unlink this process's
    own file too, so every later value went to a deleted file and /metrics answered an empty page (the
    e2e server with the online store on); only other processes' files are stale."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")
    script = """
import sys
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
made_at_import = Counter("made_at_import", "a value file exists from here on")
from serving.workers import use_multiprocess_metrics
use_multiprocess_metrics()
made_at_import.inc(3)
Counter("made_later", "after the cleaning", ["worker"]).labels(worker="0").inc(2)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=sys.argv[1])
print(generate_latest(registry).decode())
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert _metric(out.stdout, "made_at_import_total") == 3
    assert _metric(out.stdout, 'made_later_total{worker="0"}') == 2
    assert not (directory / "counter_999999.db").exists()


def test_metrics_without_labels_reach_the_multiprocess_metrics(tmp_path):
    """The server always switches prometheus_client to its multiprocess mode after import. A metric with no
    labels made its value at import, in memory, where the multiprocess collector never looks: the
    request-log counters (so the RecsysRequestLogWriteErrors alert could never fire) and the online-store
    readiness gauge were missing from /metrics (found by benchmarks/dashboard_snapshot.py)."""
    directory = tmp_path / "metrics"
    script = """
import sys
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from serving.online_features import ONLINE_STORE_READY
from serving.request_log import LOGGED_ROWS, WRITE_ERRORS
from serving.workers import use_multiprocess_metrics
use_multiprocess_metrics()
LOGGED_ROWS.inc(5)
WRITE_ERRORS.inc()
ONLINE_STORE_READY.set(1)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=sys.argv[1])
print(generate_latest(registry).decode())
"""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    script = script.replace(
        "use_multiprocess_metrics()",
        "import os; os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]; use_multiprocess_metrics()",
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert _metric(out.stdout, "recsys_request_log_rows_total") == 5
    assert _metric(out.stdout, "recsys_request_log_write_errors_total") == 1
    assert _metric(out.stdout, "recsys_online_store_ready") == 1
