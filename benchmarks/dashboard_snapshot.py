"""The Grafana dashboard's panels drawn from a real local run, without Grafana.

Grafana is not packaged here, Prometheus is (``apt-get install prometheus``): this starts the default
bundle's server on loopback (request log on, into a temp folder), a Prometheus scraping its ``/metrics``
and the monitor step's textfile (served at ``/metrics`` as node-exporter's textfile collector exposes it)
every second, and drives traffic through four phases:

- ``clean``: ``recommend``, ``ranking`` and ``retrieval`` for test-window users, a few bad requests, unknown
  users (cold starts) and unknown users excluding every popular item (empty answers); then the monitor;
- ``outage``: the same traffic while the server's copy of the SQLite online store is moved away (degraded
  answers, online-store failures), then ``clean`` again;
- ``drift``: ``recommend`` with one user feature shifted by the client (as benchmarks/monitor_live.py
  does); then the monitor again, on the request-log files written since its first run;
- ``tail``: clean traffic, so the panels show what follows.

Each panel of manifests/monitoring/grafana-dashboard.json is then queried with its own PromQL (Grafana's
variables substituted: ``$__rate_interval`` -> ``[30s]``, multi-value variables -> ``.*``) and drawn with
matplotlib in the dashboard's grid. A panel whose queries return nothing is drawn as "no data" and listed.

``python -m benchmarks.dashboard_snapshot`` after ``dvc repro``. Results:
benchmarks/results/dashboard_snapshot.{png,json}.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import yaml

from recsys import artifact_layout as layout
from serving.load_client import run_load
from serving.local_server import free_port, start_server, stop_server
from tests.local_prometheus import prometheus_binary, running_prometheus

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DASHBOARD = ROOT / "manifests" / "monitoring" / "grafana-dashboard.json"
FEAST_DATA = ROOT / "feature_repo" / "data"
SCRAPE_S = 1
STEP_S = 2  # query_range resolution (Grafana's $__interval for this width)
RATE_WINDOW = "30s"  # $__rate_interval: many scrapes per window, so a rate is smooth and never empty
NEEDED = (layout.BUNDLE_DIR, layout.RAW_DIR, layout.FEATURES_DIR, layout.TRAINING_DIR)
UNITS = {"reqps": "req/s", "ops": "/s", "s": "s", "h": "h", "percentunit": "share", "short": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_snapshot", description=__doc__)
    parser.add_argument("--out", default=str(RESULTS / "dashboard_snapshot"), help="<out>.png, <out>.json")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--phase-seconds", type=float, default=60.0, help="clean and drift phase length")
    parser.add_argument("--feature", default="user_ctr_30d", help="the feature the drift phase shifts")
    parser.add_argument("--value", type=float, default=0.9, help="its value in every drifted request")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the monitor's INFO logging: no line per scrape
    _require_artifacts()
    _prometheus_binary()  # fail before building anything when it is not installed
    dashboard = json.loads(DASHBOARD.read_text())
    with tempfile.TemporaryDirectory(prefix="dashboard-snapshot-") as scratch:
        run = _record(Path(scratch), Path(args.params), args, dashboard)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_summary(run), indent=2) + "\n")
    _draw(dashboard, run, out.with_suffix(".png"))
    empty = [p["title"] for p in run["panels"] if not p["has_data"]]
    print(f"{len(run['panels']) - len(empty)} panels with data, {len(empty)} without: {empty}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    """The run without the series' points: per panel its queries, how many series each returned and
    their last values."""
    panels = [
        {
            **panel,
            "queries": [
                {**{k: v for k, v in q.items() if k != "series"}, "series": len(q["series"])}
                for q in panel["queries"]
            ],
        }
        for panel in run["panels"]
    ]
    return {**run, "panels": panels}


def _require_artifacts() -> None:
    """The run serves the default bundle with the Feast store ``dvc repro`` fills: stop early without."""
    missing = [str(p) for p in (*NEEDED, FEAST_DATA / "online_store.db") if not (ROOT / p).exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `dvc repro` first (the default artifacts)")


def _prometheus_binary() -> str:
    """Prometheus from PATH (Debian's package installs /usr/bin/prometheus)."""
    found = prometheus_binary()
    if found is None:
        raise SystemExit("prometheus not found: `apt-get install prometheus` (only the binary is used)")
    return found


# --- the run: server, textfile exporter, Prometheus, traffic, monitor --------------------------------------


def _record(
    scratch: Path, params_file: Path, args: argparse.Namespace, dashboard: dict[str, Any]
) -> dict[str, Any]:
    """Serve, scrape and drive the phases; the panels' query results and the run's timeline."""
    store = _outage_store(scratch / "feast")
    server_params = _server_params(params_file, store.config, scratch / "params.yaml")
    log_dir, prom_file = scratch / "request_log", scratch / "monitor.prom"
    port = free_port()
    server = start_server(ROOT / layout.BUNDLE_DIR, server_params, port, ["--request_log", str(log_dir)])
    try:
        with _textfile_exporter(prom_file) as textfile_port:
            prom_port = free_port()
            targets = {"recsys-serving": f"127.0.0.1:{port}", "recsys-monitor": f"127.0.0.1:{textfile_port}"}
            with running_prometheus(
                scratch / "prometheus", prom_port, targets, SCRAPE_S, honor_labels={"recsys-monitor"}
            ):
                driver = Driver(port, _traffic(args.feature, args.value))
                timeline = _phases(driver, store, log_dir, prom_file, scratch, args)
                panels = _query_panels(dashboard, prom_port, timeline["start"], timeline["end"])
                version = _prometheus_version(prom_port)
    finally:
        stop_server(server)
    return {
        "prometheus": version,
        "scrape_interval_s": SCRAPE_S,
        "step_s": STEP_S,
        "substituted": _variables(dashboard, timeline["end"] - timeline["start"]),
        "timeline": timeline,
        "requests": driver.counts,
        "panels": panels,
        "panels_with_data": sum(p["has_data"] for p in panels),
        "panels_without_data": [p["title"] for p in panels if not p["has_data"]],
    }


@dataclass
class OutageStore:
    """A copy of the SQLite online store that the run can take away (the server reads it, nothing else)."""

    config: Path
    db: Path

    def down(self) -> None:
        self.db.rename(self.db.with_suffix(".down"))

    def up(self) -> None:
        self.db.with_suffix(".down").rename(self.db)


def _outage_store(folder: Path) -> OutageStore:
    """A Feast config over the repository's registry and a private copy of its online store: the outage
    phase moves that copy away, never the store other runs use."""
    folder.mkdir(parents=True)
    db = folder / "online_store.db"
    shutil.copy2(FEAST_DATA / "online_store.db", db)
    config = folder / "feature_store.yaml"
    local = yaml.safe_load((ROOT / "feature_repo" / "feature_store.yaml").read_text())
    local["registry"] = str(FEAST_DATA / "registry.db")
    local["online_store"] = {"type": "sqlite", "path": str(db)}
    config.write_text(yaml.safe_dump(local))
    return OutageStore(config, db)


def _server_params(params_file: Path, feast_config: Path, out: Path) -> Path:
    """The run's params: the outage-able store, and a request log flushed every second (so a monitor run
    sees a phase's rows as soon as it ends)."""
    raw = yaml.safe_load(params_file.read_text())
    raw["feast"]["config_file"] = str(feast_config)
    raw["feast"]["repo_path"] = str(ROOT / raw["feast"]["repo_path"])
    raw["serving"]["request_log"]["flush_interval_s"] = 1
    out.write_text(yaml.safe_dump(raw))
    return out


@contextmanager
def _textfile_exporter(prom_file: Path) -> Iterator[int]:
    """``prom_file`` served at ``/metrics`` on a free loopback port (empty until the monitor writes it), as
    node-exporter's textfile collector would expose it; the port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = prom_file.read_bytes() if prom_file.exists() and self.path == "/metrics" else b""
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # one line per scrape is noise
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _prometheus_version(port: int) -> str:
    info = httpx.get(f"http://127.0.0.1:{port}/api/v1/status/buildinfo", timeout=10).json()
    return str(info["data"]["version"])


@dataclass
class Traffic:
    """Request bodies by kind: (endpoint, bodies, concurrency, seconds, max requests) of one round."""

    kinds: dict[str, tuple[str, list[dict[str, Any]], int, float, int]]
    drifted: list[dict[str, Any]]  # recommend bodies carrying the shifted feature


def _traffic(feature: str, value: float) -> Traffic:
    """The rounds' requests: test-window users (drawn by their events, as real traffic comes), unknown
    users, unknown users excluding every popular item (their answer is empty) and malformed bodies."""
    test = pd.read_parquet(ROOT / layout.TRAINING_DIR / "ranking_test.parquet", columns=["user_id"])
    users = test["user_id"].sample(n=2_000, replace=True, random_state=0).astype(int).tolist()
    popular = json.loads((ROOT / layout.BUNDLE_DIR / layout.POPULAR_ITEMS).read_text())["item_ids"]
    rng = np.random.default_rng(0)
    unknown = [10**9 + i for i in range(200)]
    bad = [
        {"instances": [{"user_id": "not-a-number"}]},
        {"instances": []},
        {"instances": [{"user_id": 1, "n": 0}]},
        {"users": [1]},
    ]
    return Traffic(
        kinds={
            "recommend": ("recommend", [_one({"user_id": u}) for u in users], 2, 2.0, 10**6),
            "ranking": (
                "ranking",
                [
                    _one({"user_id": u, "item_ids": rng.choice(popular, 100, replace=False).tolist()})
                    for u in users
                ],
                1,
                0.7,
                10**6,
            ),
            "retrieval": ("retrieval", [_one({"user_id": u, "k": 100}) for u in users], 1, 0.7, 10**6),
            "cold_start": ("recommend", [_one({"user_id": u}) for u in unknown], 1, 2.0, 3),
            "empty": (
                "recommend",
                [_one({"user_id": u, "context": {"exclude_item_ids": popular}}) for u in unknown],
                1,
                2.0,
                1,
            ),
            "bad_request": ("recommend", bad, 1, 2.0, 2),
        },
        drifted=[_one({"user_id": u, "context": {"features": {feature: value}}}) for u in users],
    )


def _one(instance: dict[str, Any]) -> dict[str, Any]:
    return {"instances": [instance]}


@dataclass
class Driver:
    """Rounds of every kind of request on a thread, in the phase the main thread sets."""

    port: int
    traffic: Traffic
    phase: str = "idle"
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _resting: threading.Event = field(default_factory=threading.Event)
    _turn: int = 0

    def run(self) -> None:
        while not self._stop.is_set():
            if self.phase == "idle":
                self._resting.set()
                time.sleep(0.1)
                continue
            self._resting.clear()
            self._round(self.phase)

    def pause(self) -> None:
        """No new round; returns once the round in flight is done."""
        self.phase = "idle"
        self._resting.clear()
        if not self._resting.wait(timeout=120):
            raise RuntimeError("the traffic thread stopped answering (see its traceback above)")

    def _round(self, phase: str) -> None:
        """One request load per kind; recommend takes the shifted bodies in the drift phase."""
        self._turn += 1
        for kind, (endpoint, bodies, concurrency, seconds, most) in self.traffic.kinds.items():
            if kind == "recommend" and phase == "drift":
                bodies = self.traffic.drifted
            start = (self._turn * 97) % len(bodies)  # other users each round
            url = f"http://127.0.0.1:{self.port}/v1/models/{endpoint}:predict"
            result = run_load(url, bodies[start:] + bodies[:start], concurrency, seconds, most)
            tally = self.counts.setdefault(phase, {}).setdefault(kind, {"requests": 0, "errors": 0})
            tally["requests"] += result["requests"]
            tally["errors"] += result["errors"]

    @contextmanager
    def running(self) -> Iterator[Driver]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def _phases(
    driver: Driver,
    store: OutageStore,
    log_dir: Path,
    prom_file: Path,
    scratch: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Drive the phases; after the clean and the drift phase, the monitor on the request-log files written
    since its last run (traffic goes on meanwhile). The timeline, in Unix seconds."""
    seconds = args.phase_seconds
    marks: list[dict[str, Any]] = []
    monitored: set[Path] = set()
    runs: list[threading.Thread] = []
    start = time.time()

    def phase(name: str, length: float) -> None:
        marks.append({"phase": name, "start": time.time()})
        driver.phase = name
        time.sleep(length)
        marks[-1]["end"] = time.time()

    def monitor(name: str) -> None:
        driver.pause()  # the phase's last rows written (the log flushes every second) before files are taken
        time.sleep(2.5)
        folder = scratch / name
        _take_new_files(log_dir, monitored, folder / "request_log")
        mark: dict[str, Any] = {"monitor": name}
        marks.append(mark)
        runs.append(threading.Thread(target=lambda: mark.update(_monitor(folder, prom_file), at=time.time())))
        runs[-1].start()

    with driver.running():
        phase("clean", seconds)
        monitor("after_clean")
        phase("clean", seconds / 4)
        store.down()
        try:
            phase("outage", seconds / 2)
        finally:
            store.up()
        phase("clean", seconds / 4)
        phase("drift", seconds)
        monitor("after_drift")
        phase("tail", seconds / 2)
        for run in runs:
            run.join()
        driver.pause()
    if any("at" not in mark for mark in marks if "monitor" in mark):
        raise RuntimeError("a monitor run failed: see its traceback above")
    time.sleep(2 * SCRAPE_S)  # the last scrapes
    return {"start": start, "end": time.time(), "marks": marks}


def _take_new_files(log_dir: Path, taken: set[Path], folder: Path) -> None:
    """Copy the request-log files not taken yet into ``folder`` (same layout): one monitor run's input."""
    new = sorted(set(log_dir.rglob("*.parquet")) - taken)
    for path in new:
        target = folder / path.relative_to(log_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    taken.update(new)


def _monitor(folder: Path, prom_file: Path) -> dict[str, Any]:
    """The monitor step (its CLI, every output under ``folder``) on ``folder``'s request log; its gauges
    then replace ``prom_file``. Each check's status."""
    from components import monitor

    monitor.main(
        [
            *(f"--{name}={ROOT / path}" for name, path in _monitor_reads().items()),
            f"--request-log={folder / 'request_log'}",
            f"--output={folder / 'monitor.json'}",
            f"--textfile={folder / 'monitor.prom'}",
            f"--report-file={folder / 'monitor.html'}",
            f"--docs-dir={folder / 'docs'}",
            "--exit-zero",
        ]
    )
    shutil.copy2(folder / "monitor.prom", prom_file.with_suffix(".tmp"))
    prom_file.with_suffix(".tmp").replace(prom_file)  # the exporter never serves half a file
    report = json.loads((folder / "monitor.json").read_text())
    return {
        "answers": report["gauges"]["recsys_monitor_logged_answers"][0][1],
        "checks": {name: check["status"] for name, check in report["checks"].items()},
    }


def _monitor_reads() -> dict[str, Path]:
    return {
        "raw-dir": layout.RAW_DIR,
        "features-dir": layout.FEATURES_DIR,
        "training-dir": layout.TRAINING_DIR,
        "bundle-dir": layout.BUNDLE_DIR,
    }


# --- the panels' queries -----------------------------------------------------------------------------------


def _variables(dashboard: dict[str, Any], range_s: float) -> dict[str, str]:
    """What Grafana would put for each variable: the built-in intervals, ``.*`` (or the variable's
    ``allValue``) for the dashboard's template variables."""
    values = {"__rate_interval": RATE_WINDOW, "__interval": f"{STEP_S}s", "__range": f"{int(range_s)}s"}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "datasource":
            values[variable["name"]] = variable.get("allValue") or ".*"
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    """``$name``, ``${name}`` and ``${name:format}`` replaced; an unknown variable is an error."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value here: {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def _query_panels(dashboard: dict[str, Any], port: int, start: float, end: float) -> list[dict[str, Any]]:
    """Every non-row panel's targets as Grafana would send them: range queries over the run, instant
    queries (a table's) at its end."""
    values = _variables(dashboard, end - start)
    panels = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        for panel in _panels(dashboard):
            queries = [_query(http, target, values, start, end) for target in panel.get("targets", [])]
            panels.append(
                {
                    "id": panel["id"],
                    "title": panel["title"],
                    "type": panel["type"],
                    "queries": queries,
                    "has_data": any(q["series"] for q in queries),
                }
            )
    return panels


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's panels, those inside collapsed rows included, rows left out."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def _query(
    http: httpx.Client, target: dict[str, Any], values: dict[str, str], start: float, end: float
) -> dict[str, Any]:
    """One target's result: its series as (legend, times, values) and their last values."""
    promql = _substitute(target["expr"], values)
    if target.get("instant"):
        answer = http.get("/api/v1/query", params={"query": promql, "time": end})
    else:
        answer = http.get(
            "/api/v1/query_range", params={"query": promql, "start": start, "end": end, "step": STEP_S}
        )
    body = answer.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{promql}: {body.get('error', answer.text)}")
    series = []
    for item in body["data"]["result"]:
        points = item.get("values") or [item["value"]]
        times = [float(t) for t, _ in points]
        vals = [float(v) for _, v in points]
        if any(math.isfinite(v) for v in vals):
            series.append(
                {"legend": _legend(target.get("legendFormat"), item["metric"]), "t": times, "v": vals}
            )
    return {
        "refId": target["refId"],
        "expr": target["expr"],
        "promql": promql,
        "instant": bool(target.get("instant")),
        "series": series,
        "last": {s["legend"]: _last(s["v"]) for s in series},
    }


def _legend(template: str | None, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend; without one, the series' labels."""
    if not template or template == "__auto":
        return "{" + ", ".join(f"{k}={v}" for k, v in labels.items()) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def _last(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(f"{finite[-1]:.4g}") if finite else None


# --- the picture -----------------------------------------------------------------------------------------

GRID_COLUMNS = 24  # Grafana's grid width
UNIT_IN = 0.42  # inches per grid row
BACKGROUND, PANEL, TEXT, MUTED = "#111217", "#181b1f", "#ccccdc", "#8e8e8e"
STATUS_COLORS = {"green": "#56a64b", "orange": "#ff9830", "red": "#e02f44"}
PHASE_COLORS = {"outage": "#e02f44", "drift": "#ff9830"}
Box = tuple[float, float, float, float]  # left, bottom, width, height in figure fractions


def _draw(dashboard: dict[str, Any], run: dict[str, Any], path: Path) -> None:
    """Every panel at its ``gridPos``, Grafana-dark, the phases shaded on the time axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {p["id"]: p for p in run["panels"]}
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    top_in = 0.9  # the figure's own title
    fig = plt.figure(figsize=(20, height * UNIT_IN + top_in), facecolor=BACKGROUND)
    fig_h = height * UNIT_IN + top_in
    fig.text(0.01, 1 - 0.35 / fig_h, _caption(dashboard, run), color=TEXT, fontsize=9, va="center")
    for panel in dashboard["panels"]:
        box = _box(panel["gridPos"], fig_h)
        if panel["type"] == "row":
            fig.text(
                box[0] + 0.003,
                box[1] + box[3] / 2,
                panel["title"],
                color=TEXT,
                fontsize=12,
                weight="bold",
                va="center",
            )
            continue
        _draw_panel(Canvas(fig, run["timeline"]), box, panel, results[panel["id"]])
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=72, facecolor=BACKGROUND)
    plt.close(fig)
    _save_small(buffer, path)


def _save_small(png: io.BytesIO, path: Path) -> None:
    """The PNG in a 128-colour palette: a third of the bytes, no visible change on flat panels."""
    from PIL import Image

    png.seek(0)
    Image.open(png).convert("RGB").quantize(colors=128).save(path, optimize=True)


def _caption(dashboard: dict[str, Any], run: dict[str, Any]) -> str:
    minutes = (run["timeline"]["end"] - run["timeline"]["start"]) / 60
    return (
        f"{dashboard['title']}: each panel's own PromQL against Prometheus {run['prometheus']} scraping "
        f"a local server and the monitor's textfile every {run['scrape_interval_s']} s ({minutes:.1f} min "
        "run; drawn with matplotlib, not Grafana).   Shaded: red = online store down, orange = "
        "client-shifted feature; dashed = monitor runs."
    )


def _box(grid: dict[str, int], fig_h: float) -> Box:
    """A ``gridPos`` as a figure rectangle (left, bottom, width, height), a small gap around it."""
    unit = UNIT_IN / fig_h
    left = grid["x"] / GRID_COLUMNS + 0.002
    width = grid["w"] / GRID_COLUMNS - 0.004
    bottom = 1 - (0.9 / fig_h) - (grid["y"] + grid["h"]) * unit + 0.1 * unit
    return left, bottom, width, grid["h"] * unit - 0.2 * unit


@dataclass(frozen=True)
class Canvas:
    """The figure and the run's timeline (the time axes' origin and the phases they shade)."""

    fig: Any
    timeline: dict[str, Any]


def _draw_panel(canvas: Canvas, box: Box, panel: dict[str, Any], result: dict[str, Any]) -> None:
    """The panel's frame and title, then its content by type."""
    frame = canvas.fig.add_axes(box, facecolor=PANEL)
    frame.set_xticks([])
    frame.set_yticks([])
    for spine in frame.spines.values():
        spine.set_color("#2c3235")
    frame.set_title(panel["title"], loc="left", color=TEXT, fontsize=10, pad=-13, x=0.01)
    series = [s for q in result["queries"] for s in q["series"]]
    if not series:
        frame.text(
            0.5,
            0.45,
            "no data",
            color=MUTED,
            fontsize=14,
            ha="center",
            va="center",
            transform=frame.transAxes,
        )
        return
    if panel["type"] == "stat":
        _draw_stat(frame, panel, series)
    elif panel["type"] == "table":
        _draw_table(frame, panel, series)
    else:
        _draw_timeseries(canvas, box, panel, series)


def _draw_stat(frame: Any, panel: dict[str, Any], series: list[dict[str, Any]]) -> None:
    value = _last(series[0]["v"])
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    frame.text(
        0.5,
        0.5,
        _format(value, unit),
        color=STATUS_COLORS["green"],
        fontsize=26,
        ha="center",
        va="center",
        transform=frame.transAxes,
    )
    frame.text(0.5, 0.2, series[0]["legend"], color=MUTED, fontsize=8, ha="center", transform=frame.transAxes)


def _draw_table(frame: Any, panel: dict[str, Any], series: list[dict[str, Any]]) -> None:
    """One line per series: its legend and its last value through the panel's value mappings."""
    mapping = {}
    for entry in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if entry.get("type") == "value":
            mapping.update(entry["options"])
    rows = sorted(series, key=lambda s: s["legend"])
    step = 0.8 / max(len(rows), 1)
    for i, s in enumerate(rows):
        y = 0.84 - (i + 0.5) * step
        value = _last(s["v"])
        shown = mapping.get(f"{value:g}", {}) if value is not None else {}
        frame.text(0.04, y, s["legend"], color=TEXT, fontsize=8, va="center", transform=frame.transAxes)
        frame.text(
            0.7,
            y,
            shown.get("text", _format(value, None)),
            color="white",
            fontsize=8,
            va="center",
            transform=frame.transAxes,
            bbox={
                "facecolor": STATUS_COLORS.get(shown.get("color", ""), PANEL),
                "edgecolor": "none",
                "pad": 1.5,
            },
        )


def _draw_timeseries(canvas: Canvas, box: Box, panel: dict[str, Any], series: list[dict[str, Any]]) -> None:
    """Lines against minutes into the run, the legend below as Grafana puts it; an override's series
    (``byName``, a unit and a right axis) on a twin axis."""
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    right = _right_axis_series(panel)
    fig, timeline = canvas.fig, canvas.timeline
    columns = _legend_columns(panel["gridPos"]["w"], [s["legend"] for s in series])
    legend_rows = math.ceil(len(series) / columns)
    left, bottom, width, height = box
    row = height / (panel["gridPos"]["h"] - 0.2)  # one grid row, in figure height
    pad_bottom = row * (0.75 + 0.36 * legend_rows)
    ax = fig.add_axes(
        [left + 0.032, bottom + pad_bottom, width - 0.04, height - pad_bottom - 0.9 * row], facecolor=PANEL
    )
    twin = None
    start = timeline["start"]
    for i, s in enumerate(series):
        target = ax
        if s["legend"] in right:
            twin = twin or ax.twinx()
            target = twin
        minutes = (np.asarray(s["t"]) - start) / 60
        target.plot(minutes, s["v"], lw=1.2, color=f"C{i % 10}", label=s["legend"])
    _shade_phases(ax, timeline)
    _style_axis(ax, unit)
    if twin is not None:
        _style_axis(twin, right[next(iter(right))])
    handles = [
        line
        for a in (ax, twin)
        if a is not None
        for line in a.get_lines()
        if not line.get_label().startswith("_")
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(left + 0.004, bottom + pad_bottom - 0.55 * row),
        bbox_transform=fig.transFigure,
        ncol=columns,
        fontsize=6.5,
        frameon=False,
        labelcolor=TEXT,
        handlelength=1.2,
        columnspacing=1.0,
    )


def _legend_columns(width: int, labels: list[str]) -> int:
    """As many legend columns as the longest label lets fit in the panel's width (20 in / 24 columns)."""
    column_in = (max(len(label) for label in labels) + 5) * 0.055  # 6.5 pt characters, the line, spacing
    return max(1, min(len(labels), int(width * 20 / GRID_COLUMNS / column_in)))


def _right_axis_series(panel: dict[str, Any]) -> dict[str, str | None]:
    """Series the panel's ``byName`` overrides put on the right axis, with their unit."""
    found: dict[str, str | None] = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"]["id"] != "byName":
            continue
        props = {p["id"]: p["value"] for p in override["properties"]}
        if props.get("custom.axisPlacement") == "right":
            found[override["matcher"]["options"]] = props.get("unit")
    return found


def _shade_phases(ax: Any, timeline: dict[str, Any]) -> None:
    start = timeline["start"]
    for mark in timeline["marks"]:
        if mark.get("phase") in PHASE_COLORS:
            ax.axvspan(
                (mark["start"] - start) / 60,
                (mark["end"] - start) / 60,
                color=PHASE_COLORS[mark["phase"]],
                alpha=0.13,
                lw=0,
            )
        if "monitor" in mark:
            ax.axvline((mark["at"] - start) / 60, color="#73bfb8", lw=0.9, ls="--")
    ax.set_xlim(0, (timeline["end"] - start) / 60)


def _style_axis(ax: Any, unit: str | None) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.tick_params(colors=MUTED, labelsize=7, length=2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.grid(True, color="#2c3235", lw=0.6)
    ax.yaxis.set_major_locator(MaxNLocator(4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format(v, unit, short=True)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} min"))


def _format(value: float | None, unit: str | None, short: bool = False) -> str:
    """A value in a Grafana unit: shares as %, seconds as ms/s/min, rates with their suffix."""
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "s":
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value / 60:.1f} min" if abs(value) >= 60 else f"{value:.3g} s"
    suffix = UNITS.get(unit or "", unit or "")
    text = f"{value:.3g}"
    return text if short or not suffix else f"{text} {suffix}"


if __name__ == "__main__":
    raise SystemExit(main())
