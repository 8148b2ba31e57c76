"""Several server processes on one port: ``serving.workers`` KServe REST servers forked from a parent
that loaded the bundle once.

One process answers at most what one core computes (prediction runs in its executor threads, but the
GIL and one torch thread per request keep it near one core), so throughput scales with cores only with
more processes. KServe's own ``ModelServer(workers=N)`` spawns fresh interpreters and hands each the
parent's data plane, loaded models included, by pickle; its readiness and ``/metrics`` stay per
process. Here instead:

- the parent verifies and loads the bundle (a bad checksum still stops start-up before a port is
  opened), reserves the port, freezes its heap for the collector (``gc.freeze``), and forks the workers:
  each inherits the loaded models copy-on-write (weights, index and imported modules stay shared pages),
  then opens what does not survive a fork (online-store connections, thread pools) and serves KServe's
  app on its own socket bound to the same port with ``SO_REUSEPORT``, so the kernel spreads new
  connections over the workers that listen. (On one shared listening socket, asyncio accepts every
  pending connection in one wake-up: a burst of keep-alive clients all landed on one worker.) The
  parent's socket is bound but never listens: it holds the port (and tells it, for port 0) and takes no
  connections;
- readiness: a worker sets its flag in a shared anonymous page once its models are registered;
  ``/v2/health/ready`` (serving/routes.py) is 200 only when every worker's flag is set; the parent
  clears a worker's flag when it exits, and all of them when it is told to stop;
- metrics: prometheus_client's multiprocess mode in ``$PROMETHEUS_MULTIPROC_DIR`` (the environment's,
  emptied of old ``*.db`` files, else a fresh temporary directory removed at exit), so ``/metrics`` sums
  every worker's counters and histograms, also those of a worker that was replaced;
- a worker that exits after it was ready is forked again; one that exits before stops the server with
  exit code 1, as a failed start does with one process;
- SIGTERM / SIGINT: the parent passes SIGTERM to every worker (uvicorn finishes the requests in flight),
  waits up to the grace period, then kills what is left; exit code 0 when every worker ended cleanly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
GRACE_S = 35.0  # KServe's uvicorn drains for up to 30 s (ModelServer.grace_period), then a margin
_REAP_EVERY_S = 0.1


class WorkerSlots:
    """Each worker's readiness flag, in one anonymous shared page that every forked process sees."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.slot = 0  # this process's slot; set in each worker after the fork
        self._flags = mmap.mmap(-1, max(count, 1))  # MAP_SHARED | MAP_ANONYMOUS: shared across fork

    def set_ready(self, slot: int, ready: bool) -> None:
        self._flags[slot] = int(ready)

    def is_ready(self, slot: int) -> bool:
        return bool(self._flags[slot])

    def not_ready(self) -> list[str]:
        """The workers that have not registered their models (or have exited), as ``worker <slot>``."""
        return [f"worker {slot}" for slot in range(self.count) if not self._flags[slot]]


def serve_workers(
    run_worker: Callable[[list[socket.socket], WorkerSlots], None],
    host: str,
    port: int,
    workers: int,
    grace_s: float = GRACE_S,
) -> int:
    """Fork ``workers`` processes that each call ``run_worker(sockets, slots)`` (with ``slots.slot`` set)
    with their own socket on ``host:port``; supervise them until SIGTERM / SIGINT; the exit code."""
    try:
        reservation = _bind(host, port)
    except OSError as exc:
        print(f"serving: cannot start: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        return 1
    port = reservation.getsockname()[1]
    metrics_dir, made_dir = use_multiprocess_metrics()
    slots = WorkerSlots(workers)
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: stopping.append(s)) for sig in _STOP_SIGNALS}
    gc.collect()
    gc.freeze()  # the collector would otherwise write to every shared object's page in every worker
    pids: dict[int, int] = {}  # pid -> slot
    clean = True
    try:
        for slot in range(workers):
            pids[_fork_worker(run_worker, reservation, host, port, slots, slot)] = slot
        log.info("serving: %d workers on %s:%d, pids %s", workers, host, port, sorted(pids))
        while not stopping:
            for pid, code in _reap(pids):
                slot = pids.pop(pid)
                was_ready = slots.is_ready(slot)
                slots.set_ready(slot, False)
                _mark_dead(pid)
                if not was_ready:
                    log.error(
                        "serving: worker %d (pid %d) exited with %s before it was ready", slot, pid, code
                    )
                    print(f"serving: cannot start: worker {slot} exited with {code}", file=sys.stderr)
                    clean = False
                    stopping.append(signal.SIGTERM)
                    break
                log.warning("serving: worker %d (pid %d) exited with %s; starting it again", slot, pid, code)
                pids[_fork_worker(run_worker, reservation, host, port, slots, slot)] = slot
            time.sleep(_REAP_EVERY_S)
        clean = _stop(pids, slots, grace_s) and clean
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reservation.close()
        if made_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("serving: stopped (%s)", "clean" if clean else "not clean")
    return 0 if clean else 1


def use_multiprocess_metrics() -> tuple[Path, bool]:
    """Switch prometheus_client to its multiprocess mode; (the directory, whether it was made here).

    prometheus_client picks its value class from ``$PROMETHEUS_MULTIPROC_DIR`` when it is imported, which
    the serving package does (through KServe) before the command line is read. Every metric the server
    exports has labels, so no value exists until a worker answers its first request: switching the class
    here, before the fork, puts every value of every worker in the directory; the few without labels are
    moved there (:func:`_rebind_unlabelled_metrics`).
    """
    from prometheus_client import values

    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        # a previous run's values would be summed into this one's; this process's own files stay: with the
        # variable set before prometheus_client was imported (by the deployment, or inherited from a
        # process that imported Feast's metrics module, which sets it), values made at import already live
        # there, and unlinking them would leave this process writing to deleted files
        own = f"_{os.getpid()}.db"
        for stale in path.glob("*.db"):
            if not stale.name.endswith(own):
                stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="recsys-metrics-"))
        os.environ[METRICS_DIR_ENV] = str(path)
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()
        _rebind_unlabelled_metrics()
    return path, not given


def _rebind_unlabelled_metrics() -> None:
    """Give every metric without labels a value of the multiprocess class.

    A labelled metric makes its values on first use, after the switch; one without labels made its value
    when it was declared, at import, in memory, where the multiprocess collector never looks: such a
    counter (``recsys_request_log_rows``) or gauge (``recsys_online_store_ready``) was missing from
    ``/metrics``. Re-initialising it (prometheus_client's own ``_metric_init``) moves it into the
    directory; nothing has been counted yet, before the server starts."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    for collector in list(REGISTRY._collector_to_names):
        if isinstance(collector, MetricWrapperBase) and collector._is_observable():
            collector._metric_init()


def multiprocess_metrics_dir() -> str | None:
    """The multiprocess metrics directory when prometheus_client writes values there, else None."""
    from prometheus_client import values

    directory = os.environ.get(METRICS_DIR_ENV)
    return directory if directory and values.ValueClass is not values.MutexValue else None


# --------------------------------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (and SO_REUSEADDR, as uvicorn binds).

    The protocol is named, not left 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto is
    IPPROTO_TCP, and without it Nagle's algorithm and delayed ACKs add ~40 ms to a keep-alive response.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _fork_worker(
    run_worker: Callable[[list[socket.socket], WorkerSlots], None],
    reservation: socket.socket,
    host: str,
    port: int,
    slots: WorkerSlots,
    slot: int,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # KServe and uvicorn install their own while serving
        reservation.close()
        slots.slot = slot
        run_worker([_bind(host, port)], slots)  # uvicorn makes it listen once the app is ready
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("serving: worker %d failed", slot)
    finally:
        slots.set_ready(slot, False)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)  # never return into the parent's code (its finally blocks, atexit handlers)


def _reap(pids: dict[int, int]) -> list[tuple[int, int]]:
    """(pid, exit code; -signal when killed) of the workers that have exited, without blocking."""
    done = []
    for pid in list(pids):
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited:
            done.append((pid, os.waitstatus_to_exitcode(status)))
    return done


def _stop(pids: dict[int, int], slots: WorkerSlots, grace_s: float) -> bool:
    """SIGTERM every worker, wait up to ``grace_s``, kill the rest; whether all ended cleanly."""
    for slot in range(slots.count):
        slots.set_ready(slot, False)  # readiness turns false at once: the pod leaves the endpoints
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    clean = True
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        for pid, code in _reap(pids):
            slot = pids.pop(pid)
            _mark_dead(pid)
            if code not in (0, -signal.SIGTERM):  # -SIGTERM: stopped before its handlers were set
                log.error("serving: worker %d (pid %d) exited with %s", slot, pid, code)
                clean = False
        time.sleep(_REAP_EVERY_S / 2)
    for pid, slot in pids.items():
        log.error("serving: worker %d (pid %d) still running after %.0f s: killed", slot, pid, grace_s)
        _signal(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _mark_dead(pid)
        clean = False
    pids.clear()
    return clean


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, sig)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
