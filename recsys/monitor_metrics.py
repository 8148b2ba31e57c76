"""The monitor's results as Prometheus gauges: a text file next to ``metrics/monitor.json`` (for the node
exporter's textfile collector) and, when ``monitor.pushgateway`` is set, pushed to a Pushgateway under
job ``recsys-monitor``, which is how a batch task's results reach Prometheus. The alerts
(manifests/monitoring/) and the dashboard read these names and the server's own ``recsys_*`` metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

JOB = "recsys-monitor"
STATUS_VALUES = {"ok": 0, "skipped": 0, "warn": 1, "fail": 2}

# name -> (help, labels)
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "recsys_monitor_check_status": ("Each check's outcome: 0 ok (or skipped), 1 warn, 2 fail.", ("check",)),
    "recsys_monitor_feature_psi": (
        "Population stability index of a feature: served values against the training set.",
        ("feature",),
    ),
    "recsys_monitor_feature_ks": (
        "Kolmogorov-Smirnov statistic of a dense feature: served values against the training set.",
        ("feature",),
    ),
    "recsys_monitor_skew_match_rate": (
        "Share of sampled served rows whose feature value equals the point-in-time offline value.",
        ("feature",),
    ),
    "recsys_monitor_online_recall": (
        "Recall@K of the served ANN index against exact search, on logged users' queries.",
        ("k",),
    ),
    "recsys_monitor_index_missing_share": (
        "Share of the available catalogue (items with events or content) missing from the served index.",
        (),
    ),
    "recsys_monitor_embedding_age_seconds": ("Age of the served item embeddings (bundle build time).", ()),
    "recsys_monitor_served_ctr": (
        "Clicks on served items within the attribution window per served item, by bundle version.",
        ("bundle_version",),
    ),
    "recsys_monitor_catalogue_coverage": (
        "Share of the catalogue served at least once, by bundle version.",
        ("bundle_version",),
    ),
    "recsys_monitor_empty_rate": ("Share of answers with no items, by bundle version.", ("bundle_version",)),
    "recsys_monitor_degraded_rate": (
        "Share of answers made on default features (online store down), by bundle version.",
        ("bundle_version",),
    ),
    "recsys_monitor_logged_answers": ("Answers in the monitored request-log window.", ()),
    "recsys_monitor_last_run_timestamp_seconds": ("When the monitor last ran (Unix time).", ()),
}


def registry_from(report: dict[str, Any]) -> CollectorRegistry:
    """The gauges of one monitor report (``metrics/monitor.json``'s content)."""
    registry = CollectorRegistry()
    gauges = {name: Gauge(name, text, labels, registry=registry) for name, (text, labels) in GAUGES.items()}
    for name, check in report["checks"].items():
        gauges["recsys_monitor_check_status"].labels(check=name).set(STATUS_VALUES[check["status"]])
    for name, samples in report["gauges"].items():
        for labels, value in samples:
            gauge = gauges[name]
            (gauge.labels(**labels) if labels else gauge).set(value)
    gauges["recsys_monitor_last_run_timestamp_seconds"].set(report["finished_at"])
    return registry


def export(report: dict[str, Any], textfile: Path, pushgateway: str | None) -> None:
    """Write the report's gauges to ``textfile`` and push them to ``pushgateway`` when one is set."""
    registry = registry_from(report)
    textfile.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(textfile), registry)
    if pushgateway:
        push_to_gateway(pushgateway, job=JOB, registry=registry)
