"""manifests/monitoring/: the alerts and the dashboard watch metrics that exist, as they exist.

The PrometheusRule validates against prometheus-operator's CRD schema (manifests/crds/); every PromQL
expression parses (promql-parser: the Rust parser's bindings); every metric and label the expressions use
is one the model server exports (its exposition after it answered requests) or the monitor step writes
(``recsys.monitor_metrics.GAUGES``), and every label an alert annotation or a legend prints survives the
expression's aggregations. The dashboard's layout is well-formed, and the kustomization ships it as the
ConfigMap kube-prometheus-stack's Grafana sidecar loads.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from recsys import manifest_schemas
from recsys.config import load_params
from recsys.monitor_metrics import GAUGES
from tests.conftest import REPO_ROOT, small_serving_bundle

try:
    import promql_parser as promql
except ImportError:  # the dev extra's; without it the schema, layout and kustomization tests still run
    promql = None
needs_promql = pytest.mark.skipif(promql is None, reason="promql-parser (the dev extra) not installed")

MONITORING = REPO_ROOT / "manifests" / "monitoring"
RULE_FILE = MONITORING / "prometheus-rule.yaml"
DASHBOARD_FILE = MONITORING / "grafana-dashboard.json"
RULE_KEY = ("monitoring.coreos.com/v1", "PrometheusRule")
RULE_CRD = "monitoring.coreos.com_prometheusrules.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# what Grafana substitutes before Prometheus sees a query; an unknown variable fails the test
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "bundle_version": ".*"}
# functions whose result carries no label of their arguments
LABEL_FREE_CALLS = {"time", "vector", "scalar", "absent", "absent_over_time", "pi"}
KEEP_LABELS_AGGREGATIONS = {"topk", "bottomk", "limitk", "limit_ratio"}
# the metrics the alerts must watch: each serving counter, the latency histogram, each monitor signal
ALERTED = {
    "request_predict_seconds_bucket",
    "request_predict_seconds_count",
    "recsys_answers_total",
    "recsys_empty_answers_total",
    "recsys_degraded_answers_total",
    "recsys_online_store_failures_total",
    "recsys_request_log_dropped_rows_total",
    "recsys_request_log_write_errors_total",
    "recsys_cold_start_answers_total",
    "recsys_monitor_check_status",
    "recsys_monitor_feature_psi",
    "recsys_monitor_online_recall",
    "recsys_monitor_index_missing_share",
    "recsys_monitor_embedding_age_seconds",
    "recsys_monitor_last_run_timestamp_seconds",
    "recsys_monitor_served_ctr",
}
# monitor gauges the dashboard leaves out: the check table and the serving panels show them already
NOT_ON_DASHBOARD = {
    "recsys_monitor_empty_rate",
    "recsys_monitor_degraded_rate",
    "recsys_monitor_logged_answers",
}

Series = Mapping[str, frozenset[str]]


def _rule() -> dict[str, Any]:
    (rule,) = [doc for doc in yaml.safe_load_all(RULE_FILE.read_text()) if doc]
    return rule


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in _rule()["spec"]["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def _query_panels() -> list[dict[str, Any]]:
    return [panel for panel in _dashboard()["panels"] if panel["type"] != "row"]


def _grafana_expr(expr: str) -> str:
    """A dashboard query as Prometheus receives it (Grafana's variables substituted)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: GRAFANA_VARIABLES[m.group(1) or m.group(2)], expr)


def _expressions() -> Iterator[tuple[str, str, set[str]]]:
    """(where, PromQL, labels the alert's annotations or the target's legend print) of every query."""
    for alert in _alerts():
        printed = set(re.findall(r"\$labels\.(\w+)", json.dumps(alert.get("annotations", {}))))
        yield f"alert {alert['alert']} ({alert['labels']['severity']})", alert["expr"], printed
    for panel in _query_panels():
        for target in panel["targets"]:
            printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            yield (
                f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                _grafana_expr(target["expr"]),
                printed,
            )


# ---- what exists ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Any]:
    """The server's three models over a small bundle, as ``python -m serving`` builds them."""
    from serving.server import build_models

    params = load_params(REPO_ROOT / "params.yaml")
    params.serving.online_store = False
    bundle_dir = small_serving_bundle(params, tmp_path_factory.mktemp("monitoring"))
    return {model.name: model for model in build_models(bundle_dir, params.serving, params.feast)}


@pytest.fixture(scope="module")
def served(models) -> Series:
    """Series name -> labels, from the exposition of a server process that answered requests.

    The models are called as KServe's routes call them (``Model.__call__``, which observes the
    ``request_*_seconds`` histograms) and the exposition is what KServe's ``/metrics`` returns in one
    process (``REGISTRY`` through the scraper's encoder). No TestClient: KServe's app is a process-wide
    singleton whose routes bind to the first ModelServer, so a second one here would answer
    tests/test_serving.py's requests. A metric with no value yet (no empty answer, no store failure)
    is listed by its HELP/TYPE lines; its labels are then the ones its collector declares.
    """
    from prometheus_client import REGISTRY, exposition
    from prometheus_client.parser import text_string_to_metric_families

    async def answer() -> None:
        await models["recommend"]({"instances": [{"user_id": 5}, {"user_id": 10**9}]}, headers={})
        await models["ranking"]({"instances": [{"user_id": 5, "item_ids": [1, 2]}]}, headers={})
        await models["retrieval"]({"instances": [{"user_id": 5, "k": 3}]}, headers={})

    asyncio.run(answer())
    encoder, _ = exposition.choose_encoder("text/plain")
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(encoder(REGISTRY).decode()):
        declared = _declared_labels(REGISTRY, family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        for suffix in suffixes:
            bucket = {"le"} if suffix == "_bucket" else set()
            series.setdefault(family.name + suffix, set()).update(declared | bucket)
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


def _declared_labels(registry: Any, name: str) -> set[str]:
    """The label names the collector of ``name`` declares (prometheus_client keeps them privately; a
    labelled metric has no sample, so no label in the exposition, until a value exists)."""
    collector = registry._names_to_collectors.get(name)
    return set(getattr(collector, "_labelnames", ()))


@pytest.fixture(scope="module")
def series(served) -> Series:
    """Every series the alerts and the dashboard may use: the server's and the monitor's gauges."""
    monitor = {name: frozenset(labels) for name, (_, labels) in GAUGES.items()}
    assert not served.keys() & monitor.keys()
    return {**served, **monitor}


# ---- the label checker ----------------------------------------------------------------------------


def _scalar(node: Any) -> bool:
    if isinstance(node, promql.NumberLiteral):
        return True
    if isinstance(node, promql.ParenExpr | promql.UnaryExpr):
        return _scalar(node.expr)
    if isinstance(node, promql.Call):
        return node.func.return_type == promql.ValueType.Scalar
    if isinstance(node, promql.BinaryExpr):
        return _scalar(node.lhs) and _scalar(node.rhs)
    return False


def result_labels(node: Any, series: Series, problems: list[str]) -> frozenset[str]:
    """The labels ``node``'s result carries, as Prometheus computes them; every unknown metric, and every
    label a matcher, ``by``, ``on`` or ``group_left`` names that its input does not carry, is added to
    ``problems``."""

    def walk(child: Any) -> frozenset[str]:
        return result_labels(child, series, problems)

    def need(labels: set[str], have: frozenset[str], what: str) -> None:
        if missing := labels - have:
            problems.append(f"{what} {sorted(missing)} not among {sorted(have)}")

    if isinstance(node, promql.VectorSelector):
        if node.name not in series:
            problems.append(f"unknown metric {node.name!r}")
            return frozenset()
        need(
            {m.name for m in node.matchers.matchers} - {"__name__"},
            series[node.name],
            f"{node.name} matchers",
        )
        return series[node.name]
    if isinstance(node, promql.MatrixSelector):
        return walk(node.vector_selector)
    if isinstance(node, promql.ParenExpr | promql.UnaryExpr | promql.SubqueryExpr):
        return walk(node.expr)
    if isinstance(node, promql.NumberLiteral | promql.StringLiteral):
        return frozenset()
    if isinstance(node, promql.Call):
        args = [walk(arg) for arg in node.args]
        name = node.func.name
        if name in LABEL_FREE_CALLS:
            return frozenset()
        if name == "histogram_quantile":
            return args[1] - {"le"}
        if name in ("label_replace", "label_join"):
            return args[0] | {node.args[1].val}
        return frozenset().union(*args)
    if isinstance(node, promql.AggregateExpr):
        inner = walk(node.expr)
        if node.param is not None:
            walk(node.param)
        modifier = node.modifier
        labels = set(modifier.labels) if modifier is not None else set()
        need(labels, inner, f"{node.op} by/without")
        if str(node.op) in KEEP_LABELS_AGGREGATIONS:
            return inner
        if modifier is None:
            return frozenset()
        return frozenset(labels) if modifier.type == promql.AggModifierType.By else inner - labels
    if isinstance(node, promql.BinaryExpr):
        lhs, rhs = walk(node.lhs), walk(node.rhs)
        if _scalar(node.lhs):
            return rhs
        if _scalar(node.rhs):
            return lhs
        modifier = node.modifier
        matching = modifier.matching if modifier is not None else None
        on = matching is not None and matching.type == promql.LabelModifierType.Include
        keys = set(matching.labels) if matching is not None else set()
        need(keys, lhs & rhs if on else lhs | rhs, "on/ignoring")
        if str(node.op) == "or":
            return lhs | rhs
        if str(node.op) in ("and", "unless"):
            return lhs
        card = modifier.card if modifier is not None else promql.VectorMatchCardinality.OneToOne
        group = set(modifier.group_labels or []) if modifier is not None else set()
        if card == promql.VectorMatchCardinality.ManyToOne:
            need(group, rhs, "group_left")
            return lhs | group
        if card == promql.VectorMatchCardinality.OneToMany:
            need(group, lhs, "group_right")
            return rhs | group
        return lhs & keys if on else lhs - keys
    problems.append(f"unhandled PromQL node {type(node).__name__}")
    return frozenset()


def check_expression(expr: str, printed: set[str], series: Series) -> list[str]:
    """Problems of one expression: unknown metrics or labels, and printed labels it does not carry."""
    problems: list[str] = []
    labels = result_labels(promql.parse(expr), series, problems)
    if missing := printed - labels:
        problems.append(f"prints {sorted(missing)}, the result carries {sorted(labels)}")
    return problems


@needs_promql
def test_the_label_checker_catches_what_prometheus_would_leave_empty(series):
    """The checker is not vacuous: a typo'd metric, a label the metric lacks, a label aggregated away."""
    ok = "sum by (endpoint, bundle_version) (rate(recsys_answers_total[5m]))"
    assert check_expression(ok, {"endpoint"}, series) == []
    broken = {
        "sum(rate(recsys_answer_total[5m]))": "unknown metric",
        'sum(rate(recsys_answers_total{model_name="x"}[5m]))': "matchers",
        "sum by (model) (rate(recsys_answers_total[5m]))": "by/without",
        "recsys_monitor_served_ctr < on (check) group_left () max(recsys_monitor_served_ctr)": "on/ignoring",
    }
    for expr, problem in broken.items():
        assert any(problem in p for p in check_expression(expr, set(), series)), expr
    assert check_expression(ok, {"worker"}, series) == [
        "prints ['worker'], the result carries ['bundle_version', 'endpoint']"
    ]
    quantile = "histogram_quantile(0.99, sum by (le) (rate(request_predict_seconds_bucket[5m])))"
    assert "prints ['model_name']" in check_expression(quantile, {"model_name"}, series)[0]


# ---- the PrometheusRule ----------------------------------------------------------------------------


def test_prometheus_rule_validates_against_the_operator_crd_schema():
    assert manifest_schemas.CUSTOM_RESOURCES[RULE_KEY] == RULE_CRD  # `manifest_schemas validate` knows it
    rule = _rule()
    assert manifest_schemas.custom_resource_errors(rule) == []
    # no namespace written: `kubectl apply -k manifests/monitoring -n <namespace>` places it
    assert "namespace" not in rule["metadata"] and rule["metadata"]["labels"]["release"]
    bad_duration = copy.deepcopy(rule)
    bad_duration["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"
    misplaced = copy.deepcopy(rule)
    misplaced["spec"]["groups"][1]["rules"][0]["severity"] = "critical"  # belongs under labels
    for broken in (bad_duration, misplaced):
        with pytest.raises(manifest_schemas.ManifestError, match="PrometheusRule/recsys"):
            manifest_schemas.validate_object(broken)
    shipped = json.loads((manifest_schemas.CRDS_DIR / RULE_CRD).read_text())
    assert (f"{shipped['group']}/{shipped['version']}", shipped["kind"]) == RULE_KEY
    assert re.fullmatch(
        r"https://github\.com/prometheus-operator/.+/blob/[0-9a-f]{40}/.+\.yaml", shipped["source"]
    )
    assert RULE_CRD in (manifest_schemas.CRDS_DIR / "README.md").read_text()


def test_every_alert_is_actionable_and_the_signals_are_covered():
    groups = {group["name"]: group["rules"] for group in _rule()["spec"]["groups"]}
    assert set(groups) == {"recsys-serving", "recsys-monitor"}
    seen = set()
    for alert in _alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Recsys[A-Za-z]+", name) and "record" not in alert
        assert alert["for"] and alert["labels"]["severity"] in {"warning", "critical"}, name
        assert (name, alert["labels"]["severity"]) not in seen, f"{name} twice at one severity"
        seen.add((name, alert["labels"]["severity"]))
        annotations = alert["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"].startswith("https://"), name
    used = {m for alert in _alerts() for m in re.findall(r"[a-z_:][a-z0-9_:]*", alert["expr"])}
    assert used >= ALERTED, f"no alert on {sorted(ALERTED - used)}"


@needs_promql
def test_every_expression_parses():
    expressions = list(_expressions())
    assert len(expressions) > 30
    for where, expr, _ in expressions:
        try:
            promql.parse(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


@needs_promql
def test_every_metric_and_label_used_exists(series):
    problems = [
        f"{where}: {p}"
        for where, expr, printed in _expressions()
        for p in check_expression(expr, printed, series)
    ]
    assert problems == []


def test_failed_predict_calls_are_predict_minus_postprocess(models, served):
    """The error alert's assumption about KServe's timers: a predict that raises (here a 400) is timed by
    request_predict_seconds but never reaches request_postprocess_seconds; an answer reaches both."""
    from kserve.errors import InvalidInput
    from prometheus_client import REGISTRY

    assert {"request_predict_seconds_count", "request_postprocess_seconds_count"} <= served.keys()

    def counts() -> list[float]:
        return [
            REGISTRY.get_sample_value(f"request_{step}_seconds_count", {"model_name": "retrieval"}) or 0.0
            for step in ("predict", "postprocess")
        ]

    before = counts()
    with pytest.raises(InvalidInput):
        asyncio.run(models["retrieval"]({"instances": [{"user_id": "seven"}]}, headers={}))
    asyncio.run(models["retrieval"]({"instances": [{"user_id": 5}]}, headers={}))
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [2.0, 1.0]


# ---- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_model_is_well_formed(series):
    dashboard = _dashboard()
    assert dashboard["uid"] == "recsys-serving" and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    version = variables["bundle_version"]
    assert version["datasource"] == DATASOURCE
    query = version["query"]["query"] if isinstance(version["query"], dict) else version["query"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
    assert (metric, label) == ("recsys_answers_total", "bundle_version") and label in series[metric]
    assert set(GRAFANA_VARIABLES) - {"__rate_interval", "__interval", "__range"} <= set(variables)
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in _query_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target.get("datasource", DATASOURCE) == DATASOURCE, panel[
                "title"
            ]
    boxes = []
    for panel in panels:
        box = panel["gridPos"]
        assert box["w"] > 0 and box["h"] > 0 and box["x"] >= 0 and box["y"] >= 0, panel["title"]
        assert box["x"] + box["w"] <= 24, f"{panel['title']} is wider than the 24-column grid"
        for other_title, other in boxes:
            apart = (
                box["x"] + box["w"] <= other["x"]
                or other["x"] + other["w"] <= box["x"]
                or box["y"] + box["h"] <= other["y"]
                or other["y"] + other["h"] <= box["y"]
            )
            assert apart, f"{panel['title']!r} overlaps {other_title!r}"
        boxes.append((panel["title"], box))


def test_dashboard_shows_every_server_and_monitor_metric(served):
    used = {m for _, expr, _ in _expressions() for m in re.findall(r"[a-z_:][a-z0-9_:]*", expr)}
    recsys = {name for name in served if name.startswith("recsys_") and name.endswith("_total")}
    wanted = recsys | (GAUGES.keys() - NOT_ON_DASHBOARD) | {"request_predict_seconds_bucket"}
    assert len(recsys) >= 9 and wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"


# ---- the kustomization -----------------------------------------------------------------------------


def test_kustomization_ships_the_dashboard_for_grafanas_sidecar():
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "prometheus-rule.yaml" in kustomization["resources"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    for entry in generator["files"]:
        assert (MONITORING / entry.split("=")[-1]).is_file(), entry
    assert "kubectl apply -k manifests/monitoring" in (MONITORING / "kustomization.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: kustomize not rendered")
def test_kustomization_renders_the_rule_and_the_dashboard_configmap():
    objects = {obj["kind"]: obj for obj in manifest_schemas.render_kustomization(MONITORING)}
    assert set(objects) == {"PrometheusRule", "ConfigMap"}
    reports = manifest_schemas.validate_objects(list(objects.values()))
    assert any("CRD schema" in r for r in reports) and any("Kubernetes" in r for r in reports)
    config_map = objects["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "namespace" not in config_map["metadata"]
    assert "namespace" not in objects["PrometheusRule"]["metadata"]
    (content,) = config_map["data"].values()
    assert json.loads(content) == _dashboard()
