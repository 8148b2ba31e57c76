"""Rollout guardrails (recsys/guardrails.py) and the deploy step's soak with them (components/deploy.py).

The PromQL is evaluated by a real Prometheus (/usr/bin/prometheus on loopback) scraping two exporters that
export the server's own metric names (serving/endpoints.py's counters, KServe's histograms), one per
bundle version, as two pods would. The soak runs against tests/test_rollout.py's simulated cluster (KServe
0.14.1 / 0.15.2 / 0.20.0 status frames).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from components import deploy
from recsys import guardrails
from recsys import isvc_rollout as rollout
from recsys.request_records import records_table
from serving.local_server import free_port
from tests.conftest import revalidated
from tests.local_prometheus import prometheus_binary, running_prometheus, wait_for_scrapes
from tests.test_rollout import (
    CANARY,
    NEW_IMAGE,
    NEW_URI,
    PARAMS,
    VERSIONS,
    FakeClock,
    Frames,
    SimulatedCluster,
)

CANARY_V = guardrails.version_of(NEW_URI)
CHAMPION_V = "bootstrap"  # the production overlay's s3://recsys-models/bundles/bootstrap/
GOOD = {"answers": 900.0, "error_rate": 0.0, "p99_latency_s": 0.05, "empty_rate": 0.01}


def config(**changes: Any) -> guardrails.GuardrailsConfig:
    ctr = changes.pop("ctr", {})
    base = PARAMS.deploy.guardrails
    return revalidated(base, enabled=True, ctr=base.ctr.model_dump() | ctr, **changes)


# ------------------------------------------------------------------------------------------------
# Prometheus JSON -> values


def _vector(*values: str) -> dict[str, Any]:
    result = [{"metric": {}, "value": [1765000000.0, v]} for v in values]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def test_prometheus_answers_become_values_or_none():
    assert guardrails.scalar_value(_vector("0.25")) == 0.25
    assert guardrails.scalar_value(_vector()) is None  # no series: no traffic in the window
    assert guardrails.scalar_value(_vector("NaN")) is None  # 0 / 0
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "3"]}}
    assert guardrails.scalar_value(scalar) == 3.0
    with pytest.raises(guardrails.GuardrailUnavailable, match=r"bad_data.*parse error"):
        guardrails.scalar_value(
            {"status": "error", "errorType": "bad_data", "error": "parse error"}, "rate(x[5m)"
        )
    with pytest.raises(guardrails.GuardrailUnavailable, match="2 series"):
        guardrails.scalar_value(_vector("1", "2"), "q")


def test_the_queries_name_the_version_and_the_window():
    queries = guardrails.promql(config(window="90s"), 'v"1')
    assert set(queries) == set(guardrails.METRICS)
    for text in queries.values():
        assert 'bundle_version="v\\"1"' in text and "[90s]" in text  # escaped, never a broken selector
    assert "request_predict_seconds_bucket" in queries["p99_latency_s"]
    assert "histogram_quantile(0.99" in queries["p99_latency_s"]


# ------------------------------------------------------------------------------------------------
# values -> decision


def test_within_thresholds_passes():
    verdict = guardrails.decide(config(), GOOD, GOOD)
    assert verdict.status == "pass"
    assert {c.name for c in verdict.checks} == {"error_rate", "p99_latency_s", "empty_rate"}


@pytest.mark.parametrize(
    ("metric", "value", "threshold"),
    [("error_rate", 0.2, "0.01"), ("p99_latency_s", 1.7, "0.5"), ("empty_rate", 0.3, "0.05")],
)
def test_a_breach_names_the_guardrail_its_value_and_threshold(metric, value, threshold):
    verdict = guardrails.decide(config(), GOOD | {metric: value}, GOOD)
    assert verdict.status == "breach"
    assert f"{metric} {value:.4g} (threshold {threshold}, champion" in verdict.reason()


def test_too_few_answers_neither_breach_nor_pass():
    canary = GOOD | {"answers": 50.0, "error_rate": 0.5}  # terrible, but on 50 answers
    verdict = guardrails.decide(config(min_requests=200), canary, GOOD)
    assert verdict.status == "insufficient"
    assert "50 answers in 2m, fewer than min_requests 200" in verdict.reason()
    assert guardrails.decide(config(), GOOD | {"p99_latency_s": None}, GOOD).status == "insufficient"


def _ctr(impressions: float, clicks: float) -> dict[str, float]:
    return {"impressions": impressions, "clicks": clicks, "ctr": clicks / impressions}


def test_served_ctr_against_the_champions():
    cfg = config(ctr={"min_impressions": 1000, "min_ctr_ratio": 0.8})
    low = {CANARY_V: _ctr(3000, 150), CHAMPION_V: _ctr(20000, 2400)}  # 0.05 vs 0.12
    verdict = guardrails.decide(cfg, GOOD, GOOD, low)
    assert verdict.status == "breach"
    assert "served_ctr 0.05 (threshold 0.096, champion 0.12)" in verdict.reason()
    close = {CANARY_V: _ctr(3000, 330), CHAMPION_V: _ctr(20000, 2400)}  # 0.11 >= 0.096
    assert guardrails.decide(cfg, GOOD, GOOD, close).status == "pass"
    few = {CANARY_V: _ctr(500, 1), CHAMPION_V: _ctr(20000, 2400)}
    assert guardrails.decide(cfg, GOOD, GOOD, few).status == "insufficient"


def test_served_ctr_joins_the_request_log_with_clicks_on_request_user_and_item(tmp_path):
    now = datetime.now(UTC).timestamp()
    rows = [
        _row("r1", 1, [10, 11, 12], CANARY_V, now),
        _row("r1", 2, [10, 13], CANARY_V, now),  # same request, another user
        _row("r2", 1, [10, 11], CHAMPION_V, now),
        _row("r2", 1, [10, 11], CHAMPION_V, now),  # the same user twice in one request
        _row("old", 1, [10], CHAMPION_V, now - 7200),  # before the rollout: not counted
    ]
    day = tmp_path / "log" / f"date={datetime.now(UTC):%Y-%m-%d}"
    day.mkdir(parents=True)
    pq.write_table(records_table(rows), day / "part-000001.parquet")
    clicks = pd.DataFrame(
        {
            "request_id": ["r1", "r1", "r1", "r2", "r2", "r2", "old"],
            "user_id": [1, 2, 1, 1, 1, 1, 1],
            "item_id": [11, 10, 13, 10, 10, 10, 10],  # (r1, 1, 13): user 1 was not served 13
            "label": [1, 0, 1, 1, 1, 1, 1],  # (r2, 1, 10): 3 clicks, 2 impressions: 2 count
        }
    )
    clicks.to_parquet(tmp_path / "clicks.parquet")
    cfg = config(
        ctr={"request_log_uri": str(tmp_path / "log"), "clicks_uri": str(tmp_path / "clicks.parquet")}
    )
    since = datetime.now(UTC) - timedelta(minutes=5)
    ctr = guardrails.measure_ctr(cfg, [CANARY_V, CHAMPION_V], since)
    assert ctr[CANARY_V] == {"impressions": 5.0, "clicks": 1.0, "ctr": 0.2}
    assert ctr[CHAMPION_V] == {"impressions": 4.0, "clicks": 2.0, "ctr": 0.5}
    pd.DataFrame({"request_id": ["r1"], "label": [1]}).to_parquet(tmp_path / "bad.parquet")
    broken = config(
        ctr={"request_log_uri": str(tmp_path / "log"), "clicks_uri": str(tmp_path / "bad.parquet")}
    )
    with pytest.raises(guardrails.GuardrailUnavailable, match=r"columns \['user_id', 'item_id'\] missing"):
        guardrails.measure_ctr(broken, [CANARY_V, CHAMPION_V], since)


def test_a_kept_click_reader_reads_each_feedback_file_once(tmp_path):
    """The soak evaluates every interval_s: a reader kept across evaluations reads new click files only,
    and the CTR still counts every click, old files and new."""
    now = datetime.now(UTC).timestamp()
    day = tmp_path / "log" / f"date={datetime.now(UTC):%Y-%m-%d}"
    day.mkdir(parents=True)
    rows = [_row("r1", 1, [10, 11], CANARY_V, now), _row("r2", 1, [10, 11], CHAMPION_V, now)]
    pq.write_table(records_table(rows), day / "part-000001.parquet")
    feedback = tmp_path / "clicks"
    feedback.mkdir()

    def click(name: str, request_id: str, item: int) -> None:
        frame = pd.DataFrame({"request_id": [request_id], "user_id": [1], "item_id": [item], "label": [1]})
        frame.to_parquet(feedback / f"{name}.parquet")

    cfg = config(ctr={"request_log_uri": str(tmp_path / "log"), "clicks_uri": str(feedback)})
    since = datetime.now(UTC) - timedelta(minutes=5)
    reader = guardrails.ParquetObjects(str(feedback))
    click("a", "r1", 10)
    first = guardrails.measure_ctr(cfg, [CANARY_V, CHAMPION_V], since, reader)
    read_keys: list[str] = []
    get_bytes = reader._store.get_bytes
    reader._store.get_bytes = lambda key: read_keys.append(key) or get_bytes(key)
    click("b", "r2", 11)
    click("c", "r1", 11)
    second = guardrails.measure_ctr(cfg, [CANARY_V, CHAMPION_V], since, reader)
    assert read_keys == ["b.parquet", "c.parquet"]  # a.parquet was not read again
    assert (first[CANARY_V]["clicks"], first[CHAMPION_V]["clicks"]) == (1.0, 0.0)
    assert (second[CANARY_V]["clicks"], second[CHAMPION_V]["clicks"]) == (2.0, 1.0)
    assert second == guardrails.measure_ctr(cfg, [CANARY_V, CHAMPION_V], since)  # a fresh read agrees


def _row(request_id: str, user: int, items: list[int], version: str, t: float) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "time": t,
        "endpoint": "recommend",
        "user_id": user,
        "model": "dcn",
        "bundle_version": version,
        "item_ids": items,
        "scores": [0.5] * len(items),
        "candidates": 50,
        "source": "model",
        "cold_start": False,
        "degraded": False,
    }


def test_the_config_needs_clicks_with_a_request_log():
    with pytest.raises(ValueError, match="clicks_uri is empty"):
        config(ctr={"request_log_uri": "s3://logs/requests/", "clicks_uri": ""})
    with pytest.raises(ValueError, match="window"):
        config(window="5 minutes")


def test_the_version_is_read_from_the_promoted_storage_uri():
    assert (
        guardrails.version_of("s3://recsys-models/bundles/20261203T101500Z-3f9a/") == "20261203T101500Z-3f9a"
    )
    with pytest.raises(ValueError, match="no <prefix>/<version>/"):
        guardrails.version_of("s3://bucket/")


# ------------------------------------------------------------------------------------------------
# the PromQL on a real Prometheus


class _Pod:
    """One serving pod's metrics under the server's own names, on its own loopback port."""

    def __init__(self, version: str):
        from serving.endpoints import ANSWERS, EMPTY_ANSWERS

        self.registry = CollectorRegistry()
        assert (ANSWERS._name, EMPTY_ANSWERS._name) == ("recsys_answers", "recsys_empty_answers")
        self.answers = Counter("recsys_answers", "", ["endpoint", "bundle_version"], registry=self.registry)
        self.empty = Counter(
            "recsys_empty_answers", "", ["endpoint", "bundle_version"], registry=self.registry
        )
        # kserve/metrics.py's histograms, default buckets
        self.predict = Histogram("request_predict_seconds", "", ["model_name"], registry=self.registry)
        self.post = Histogram("request_postprocess_seconds", "", ["model_name"], registry=self.registry)
        self.version = version
        self.port = free_port()
        self.server, _ = start_http_server(self.port, "127.0.0.1", self.registry)

    def serve(self, n: int, empty: int = 0, failed: int = 0, slow: int = 0) -> None:
        """``n`` predict calls: ``failed`` raise (no postprocess, no answer), ``slow`` take 0.8 s, the rest
        10 ms; ``empty`` of the answered ones have no items (the empty counter exists only then)."""
        for i in range(n):
            self.predict.labels("recommend").observe(0.8 if i < slow else 0.008)
            if i >= n - failed:
                continue
            self.post.labels("recommend").observe(0.0001)
            self.answers.labels("recommend", self.version).inc()
            if i < empty:
                self.empty.labels("recommend", self.version).inc()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.skipif(prometheus_binary() is None, reason="prometheus not installed")
def test_the_promql_on_a_real_prometheus_tells_a_bad_canary_from_its_champion(tmp_path):
    canary, champion = _Pod(CANARY_V), _Pod(CHAMPION_V)
    try:
        # as a server does: a version's series appears with its first answer
        canary.serve(1), champion.serve(1)
        targets = {"canary": f"127.0.0.1:{canary.port}", "champion": f"127.0.0.1:{champion.port}"}
        with running_prometheus(tmp_path / "prom", free_port(), targets, scrape_s=0.5) as url:
            wait_for_scrapes(url, jobs=2)
            time.sleep(1.0)
            canary.serve(400, empty=80, failed=20, slow=40)  # 5% errors, 20% empty of 380, 10% slow
            champion.serve(400)
            time.sleep(2.0)  # a few scrapes with the new counts
            cfg = config(prometheus_url=url, window="30s", min_requests=100)
            verdict = guardrails.evaluate(cfg, CANARY_V, CHAMPION_V, datetime.now(UTC))
            time.sleep(1.0)
            canary.serve(200), champion.serve(200)  # the canary recovers
            time.sleep(2.5)
            recent = config(prometheus_url=url, window="4s", min_requests=100)
            later = guardrails.evaluate(recent, CANARY_V, CHAMPION_V, datetime.now(UTC))
    finally:
        canary.stop(), champion.stop()
    bad, good = verdict.values["canary"], verdict.values["champion"]
    # every series was born in the window: counted whole, so the counts are exact
    assert bad["answers"] == 381 and good["answers"] == 401
    assert bad["error_rate"] == pytest.approx(20 / 401)
    assert bad["empty_rate"] == pytest.approx(80 / 381)  # the empty counter was born at 80
    assert 0.75 < bad["p99_latency_s"] <= 1.0  # the 0.75-1.0 bucket: the canary's slow calls
    # the champion's values are its own: its pod's histograms are not mixed into the canary's
    assert good["error_rate"] == 0.0 and good["empty_rate"] == 0.0  # `or vector(0)`: no empty series
    assert 0.005 < good["p99_latency_s"] <= 0.01
    assert verdict.status == "breach"
    breached = {c.name for c in verdict.checks if c.status == "breach"}
    assert breached == {"error_rate", "p99_latency_s", "empty_rate"}
    # a window after the bad calls: series older than it count by increase(), the bad calls drop out
    recovered = later.values["canary"]
    assert recovered["answers"] == pytest.approx(200, rel=0.5)  # increase() extrapolates
    assert recovered["error_rate"] == 0.0 and recovered["empty_rate"] == 0.0
    assert recovered["p99_latency_s"] <= 0.01
    assert later.status == "pass"


# ------------------------------------------------------------------------------------------------
# the soak on the simulated cluster


@pytest.fixture(params=VERSIONS)
def kserve(request, production_isvc) -> Frames:
    return Frames(request.param, production_isvc)


def _frames(kserve_frames, isvc):
    return SimulatedCluster(
        isvc,
        {
            3: [kserve_frames.kn("rolled_out")],
            4: [kserve_frames.kn("canary_pending")] + [kserve_frames.kn("canary_ready")] * 30,
            5: [kserve_frames.kn("canary_ready", "promoted"), kserve_frames.kn("promoted")],
            6: [kserve_frames.kn("restored_pinned")],
            7: [kserve_frames.kn("unpinned")],
        },
    )


def _answers(cfg: guardrails.GuardrailsConfig, values: dict[str, dict[str, float | None]], asked: list[str]):
    """Prometheus' JSON for each version's queries, as ``/api/v1/query`` answers them."""
    table = {}
    for version, metrics in values.items():
        for name, text in guardrails.promql(cfg, version).items():
            value = metrics[name]
            table[text] = _vector() if value is None else _vector(repr(value))

    def query(text: str) -> dict[str, Any]:
        asked.append(text)
        return json.loads(json.dumps(table[text]))

    return query


def _soak(cluster, cfg, query=None, **deploy_changes):
    config_ = revalidated(PARAMS.deploy, guardrails=cfg.model_dump(), canary_soak_s=60, **deploy_changes)
    isvc = deploy.build_inference_service(config_, NEW_IMAGE, NEW_URI)
    clock, rollbacks = FakeClock(), []
    url = deploy.roll_out(
        isvc, config_, cluster, rollbacks.append, sleep=clock.sleep, clock=clock, guardrail_query=query
    )
    return url, rollbacks, clock.now


def test_a_canary_within_its_guardrails_is_promoted_after_the_soak(production_isvc, kserve):
    cluster, asked, cfg = _frames(kserve, production_isvc), [], config(interval_s=15)
    url, rollbacks, _ = _soak(cluster, cfg, _answers(cfg, {CANARY_V: GOOD, CHAMPION_V: GOOD}, asked))
    assert url and rollbacks == []
    assert rollout.promote_patch(CANARY) in cluster.patches
    evaluations = len(asked) / (2 * len(guardrails.METRICS))
    assert evaluations >= 60 / 15  # asked through the soak, not once


def test_a_canary_breaching_a_guardrail_is_rolled_back_with_the_reason(production_isvc, kserve):
    cluster, asked, cfg = _frames(kserve, production_isvc), [], config()
    bad = GOOD | {"error_rate": 0.12}
    query = _answers(cfg, {CANARY_V: bad, CHAMPION_V: GOOD}, asked)
    with pytest.raises(deploy.DeployError, match=r"rolled back to s3://recsys-models/bundles/bootstrap/"):
        _soak(cluster, cfg, query)
    assert rollout.promote_patch(CANARY) not in cluster.patches
    assert cluster.stored["spec"] == production_isvc["spec"]  # the champion's model back
    assert len(asked) == 2 * len(guardrails.METRICS)  # the first evaluation decided
    # the pipeline's on_rollback hook gets the same reason
    cluster = _frames(kserve, production_isvc)
    config_ = revalidated(PARAMS.deploy, guardrails=cfg.model_dump())
    reasons: list[str] = []
    with pytest.raises(deploy.DeployError):
        deploy.roll_out(
            deploy.build_inference_service(config_, NEW_IMAGE, NEW_URI),
            config_,
            cluster,
            reasons.append,
            sleep=lambda s: None,
            guardrail_query=query,
        )
    assert f"canary {CANARY_V} vs champion {CHAMPION_V}: guardrails breach: error_rate 0.12 " in reasons[0]
    assert "(threshold 0.01, champion 0)" in reasons[0]


@pytest.mark.parametrize("rule", ["rollback", "promote"])
def test_too_little_traffic_waits_for_the_soak_then_follows_the_rule(production_isvc, kserve, rule):
    cluster, asked, cfg = _frames(kserve, production_isvc), [], config(on_insufficient_data=rule)
    thin = GOOD | {"answers": 12.0, "error_rate": 0.5}
    query = _answers(cfg, {CANARY_V: thin, CHAMPION_V: GOOD}, asked)
    if rule == "promote":
        url, _, _ = _soak(cluster, cfg, query)
        assert url and rollout.promote_patch(CANARY) in cluster.patches
    else:
        with pytest.raises(deploy.DeployError, match="on_insufficient_data: rollback"):
            _soak(cluster, cfg, query)
        assert rollout.promote_patch(CANARY) not in cluster.patches
    # not decided early either way: the soak ran its length first
    assert len(asked) / (2 * len(guardrails.METRICS)) >= 60 / cfg.interval_s


def test_an_unreachable_prometheus_rolls_the_canary_back_naming_it(production_isvc, kserve):
    port = free_port()  # nothing listens there
    cluster, cfg = _frames(kserve, production_isvc), config(prometheus_url=f"http://127.0.0.1:{port}")
    with pytest.raises(
        deploy.DeployError,
        match=rf"GuardrailUnavailable: Prometheus at http://127.0.0.1:{port} is unreachable",
    ):
        _soak(cluster, cfg)
    assert rollout.promote_patch(CANARY) not in cluster.patches
    assert cluster.stored["spec"] == production_isvc["spec"]


def test_guardrails_off_by_default_leave_the_rollout_as_it_was(production_isvc, kserve):
    assert PARAMS.deploy.guardrails.enabled is False
    cluster = _frames(kserve, production_isvc)
    config_ = revalidated(PARAMS.deploy, canary_soak_s=60)

    def never(text: str) -> dict[str, Any]:
        raise AssertionError("guardrails asked while disabled")

    clock = FakeClock()
    url = deploy.roll_out(
        deploy.build_inference_service(config_, NEW_IMAGE, NEW_URI),
        config_,
        cluster,
        sleep=clock.sleep,
        clock=clock,
        guardrail_query=never,
    )
    assert url and rollout.promote_patch(CANARY) in cluster.patches


def test_a_canary_of_the_same_version_is_refused_before_anything_is_patched(production_isvc, kserve):
    cluster, cfg = _frames(kserve, production_isvc), config()
    config_ = revalidated(PARAMS.deploy, guardrails=cfg.model_dump())
    same = "s3://recsys-models/bundles/bootstrap/"  # the champion's version, another image
    with pytest.raises(deploy.DeployError, match="both serve bundle version 'bootstrap'"):
        deploy.roll_out(
            deploy.build_inference_service(config_, NEW_IMAGE, same), config_, cluster, sleep=lambda s: None
        )
    assert cluster.patches == []
