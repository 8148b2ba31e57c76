"""Rollout guardrails: what the canary does to users, per bundle version, decides its promotion.

During the deploy step's soak (components/deploy.py) the canary's bundle version is compared with the
champion's on

- **error rate**, **p99 latency**: KServe's own histograms (``request_predict_seconds``, and
  ``request_postprocess_seconds`` whose count misses the predict calls that raised: the Grafana
  dashboard's "Failed predict calls"). They carry ``model_name`` only, so a version's series are those
  of the scrape targets (``instance``) that answered with it: ``and on (instance)
  recsys_answers_total{bundle_version=...}``;
- **empty-result rate**: ``recsys_empty_answers_total / recsys_answers_total`` (serving/endpoints.py,
  labelled by version), as the dashboard's "Empty answers" panel;
- **served CTR**: the request log's served items (recsys/request_records.py) joined on request id, user
  and item with the click feedback (rows ``request_id, user_id, item_id, label``: the front end echoes
  the ``x-request-id`` it sent), canary CTR against ``min_ctr_ratio`` x champion CTR.

Everything is read through Prometheus' HTTP API (``/api/v1/query``, instant queries over
``deploy.guardrails.window``). A version with fewer than ``min_requests`` answers (or ``min_impressions``
impressions, for CTR) in the window has *insufficient data*: it neither breaches nor passes; at the end
of the soak ``on_insufficient_data`` decides. An unreachable Prometheus (or one that answers an error) is
:class:`GuardrailUnavailable`: the deploy step rolls the canary back naming it, never promotes blind.

This module is pure apart from :func:`query_prometheus` and :func:`read_clicks`: config -> queries,
Prometheus JSON -> values, values -> :class:`Verdict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import pandas as pd

from recsys.config.schema import GuardrailsConfig
from recsys.object_store import ObjectStoreError
from recsys.request_records import ParquetObjects, read_request_log, served_slots

Status = Literal["pass", "breach", "insufficient"]
METRICS = ("answers", "error_rate", "p99_latency_s", "empty_rate")
CLICK_COLUMNS = ("request_id", "user_id", "item_id", "label")


class GuardrailUnavailable(RuntimeError):
    """A guardrail's source (Prometheus, the request log, the click feedback) could not be read."""


@dataclass(frozen=True)
class Check:
    """One guardrail's outcome: the canary's value against its threshold, the champion's for context."""

    name: str
    status: Status
    canary: float | None
    champion: float | None
    threshold: float
    detail: str

    def describe(self) -> str:
        return f"{self.name} {_fmt(self.canary)} (threshold {_fmt(self.threshold)}, champion " + (
            f"{_fmt(self.champion)}): {self.detail}"
        )


@dataclass(frozen=True)
class Verdict:
    """Every guardrail's :class:`Check`; ``status``: breach if any breached, else insufficient if any
    lacked data, else pass."""

    checks: tuple[Check, ...]
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        statuses = {c.status for c in self.checks}
        return "breach" if "breach" in statuses else "insufficient" if "insufficient" in statuses else "pass"

    def reason(self) -> str:
        """The breached (else the undecided, else all) guardrails, each with value and threshold."""
        status = self.status
        chosen = [c for c in self.checks if c.status == status] if status != "pass" else list(self.checks)
        return f"guardrails {status}: " + "; ".join(c.describe() for c in chosen)


# ------------------------------------------------------------------------------------------------
# config -> PromQL


def _selector(config: GuardrailsConfig, version: str) -> str:
    return f'endpoint="{config.endpoint}",bundle_version="{_escape(version)}"'


def promql(config: GuardrailsConfig, version: str) -> dict[str, str]:
    """The instant queries of one bundle version: answers in the window and the three rates."""
    w, sel = config.window, _selector(config, version)
    # the scrape targets that answered with this version: KServe's histograms have no version label
    targets = f" and on (instance) recsys_answers_total{{{sel}}}"
    model = f'model_name="{config.endpoint}"'
    answers = in_window(f"recsys_answers_total{{{sel}}}", w)
    predicted = in_window(f"request_predict_seconds_count{{{model}}}", w, scope=targets)
    completed = in_window(f"request_postprocess_seconds_count{{{model}}}", w, scope=targets)
    buckets = in_window(f"request_predict_seconds_bucket{{{model}}}", w, by="le", scope=targets)
    return {
        "answers": answers,
        # completed < predicted: the predict calls that raised (postprocess never ran)
        "error_rate": f"({predicted} - {completed}) / {predicted}",
        "p99_latency_s": f"histogram_quantile(0.99, {buckets})",
        "empty_rate": f"{in_window(f'recsys_empty_answers_total{{{sel}}}', w)} / {answers}",
    }


def in_window(series: str, window: str, by: str = "", scope: str = "") -> str:
    """PromQL for how much the counters ``series`` grew in the last ``window``, summed (``by`` kept).

    ``increase()`` alone misses the first sample of a series born inside the window, and the server's
    labelled counters are born at their first count: a canary's first answers, an empty answer's first
    occurrence (a fresh counter seen once at 80 "increased" by 0). So series that existed a window ago
    contribute their ``increase()``, series born since their whole value (a counter starts at 0)."""
    grouping = f" by ({by})" if by else ""
    old = f"sum{grouping} ((increase({series}[{window}]) and {series} offset {window}){scope})"
    new = f"sum{grouping} (({series} unless {series} offset {window}){scope})"
    if by:  # per bucket: a side with no series must not drop the other
        return f"(({old} + {new}) or {old} or {new})"
    return f"(({old} or vector(0)) + ({new} or vector(0)))"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


# ------------------------------------------------------------------------------------------------
# Prometheus JSON -> values


def scalar_value(response: Mapping[str, Any], query: str = "") -> float | None:
    """The single value of an instant query's JSON answer; None for no series or NaN (no traffic)."""
    if response.get("status") != "success":
        raise GuardrailUnavailable(
            f"Prometheus answered {response.get('errorType', 'an error')} for {query!r}: "
            f"{response.get('error', response)}"
        )
    data = response.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        values = [result]
    elif kind == "vector" and isinstance(result, list):
        values = [series.get("value") for series in result]
    else:
        raise GuardrailUnavailable(
            f"Prometheus answered resultType {kind!r} for {query!r}; expected a vector"
        )
    if not values:
        return None
    if len(values) > 1:
        raise GuardrailUnavailable(f"{query!r} returned {len(values)} series; a guardrail needs one")
    value = float(values[0][1])
    return None if math.isnan(value) or math.isinf(value) else value


def query_prometheus(url: str, query: str, timeout_s: float) -> dict[str, Any]:
    """``GET <url>/api/v1/query?query=...``: the JSON answer, or :class:`GuardrailUnavailable` naming the
    URL when Prometheus cannot be reached or does not answer JSON."""
    import httpx

    try:
        answer = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout_s)
        return answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise GuardrailUnavailable(
            f"Prometheus at {url} is unreachable: {type(exc).__name__}: {exc}"
        ) from exc


Query = Callable[[str], Mapping[str, Any]]


def measure(config: GuardrailsConfig, version: str, query: Query) -> dict[str, float | None]:
    """Every Prometheus guardrail value of ``version`` (None: no data in the window)."""
    return {name: scalar_value(query(text), text) for name, text in promql(config, version).items()}


# ------------------------------------------------------------------------------------------------
# served CTR: the request log joined with the click feedback


def read_clicks(uri: str, objects: ParquetObjects | None = None) -> pd.DataFrame:
    """Every Parquet file under ``uri`` (a file, folder or s3:// prefix) as click-feedback rows; with
    ``objects`` (a reader kept across calls, for the same ``uri``) files read before are not read again."""
    if uri.endswith(".parquet") and "://" not in uri:
        frames = [pd.read_parquet(uri)]
    else:
        frames = [table.to_pandas() for table in (objects or ParquetObjects(uri)).tables()]
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype="object") for name in CLICK_COLUMNS})
    clicks = pd.concat(frames, ignore_index=True)
    missing = [name for name in CLICK_COLUMNS if name not in clicks.columns]
    if missing:
        raise GuardrailUnavailable(f"click feedback {uri}: columns {missing} missing (needs {CLICK_COLUMNS})")
    return clicks


def served_ctr(
    answers: pd.DataFrame, clicks: pd.DataFrame, versions: list[str]
) -> dict[str, dict[str, float]]:
    """Per version: impressions (served items of the logged ``answers``), clicks (``label`` 1 rows of
    ``clicks`` with the answer's request id, user and item; a key served twice, the same user twice in
    one request, counts at most as many clicks as impressions) and CTR."""
    out = {v: {"impressions": 0.0, "clicks": 0.0, "ctr": math.nan} for v in versions}
    answers = answers[answers["bundle_version"].isin(versions)]
    if answers.empty:
        return out
    keys = ["request_id", "user_id", "item_id"]
    slots = served_slots(answers[["request_id", "user_id", "bundle_version", "time", "item_ids"]])
    shown = slots.groupby([*keys, "bundle_version"]).size().rename("shown").reset_index()
    clicked = clicks.loc[clicks["label"] == 1, keys].astype(
        {"request_id": str, "user_id": "int64", "item_id": "int64"}
    )
    hits = clicked.groupby(keys).size().rename("hits").reset_index()
    shown = shown.merge(hits, on=keys, how="left").fillna({"hits": 0})
    shown["hits"] = shown[["hits", "shown"]].min(axis=1)
    for version, group in shown.groupby("bundle_version"):
        n, k = float(group["shown"].sum()), float(group["hits"].sum())
        out[str(version)] = {"impressions": n, "clicks": k, "ctr": k / n if n else math.nan}
    return out


def measure_ctr(
    config: GuardrailsConfig,
    versions: list[str],
    since: datetime,
    clicks_objects: ParquetObjects | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`served_ctr` over the request log rows from ``since`` on (``clicks_objects``: see
    :func:`read_clicks`)."""
    try:
        log = read_request_log(config.ctr.request_log_uri, since=since).to_pandas()
        clicks = read_clicks(config.ctr.clicks_uri, clicks_objects)
    except (OSError, ValueError, ObjectStoreError) as exc:
        raise GuardrailUnavailable(f"served CTR: {type(exc).__name__}: {exc}") from exc
    return served_ctr(log, clicks, versions)


# ------------------------------------------------------------------------------------------------
# values -> verdict


def decide(
    config: GuardrailsConfig,
    canary: Mapping[str, float | None],
    champion: Mapping[str, float | None],
    ctr: Mapping[str, Mapping[str, float]] | None = None,
) -> Verdict:
    """Each guardrail's status: the canary's value against the absolute threshold (rates, latency) or
    against ``min_ctr_ratio`` x the champion's (CTR); too few answers or impressions: insufficient."""
    answers = canary.get("answers") or 0.0
    enough = answers >= config.min_requests
    short = f"{answers:.0f} answers in {config.window}, fewer than min_requests {config.min_requests}"
    checks = []
    for name, threshold in (
        ("error_rate", config.max_error_rate),
        ("p99_latency_s", config.max_p99_latency_s),
        ("empty_rate", config.max_empty_rate),
    ):
        value = canary.get(name)
        if not enough or value is None:
            status, detail = "insufficient", short if not enough else "no data in the window"
        elif value > threshold:
            status, detail = "breach", f"above the maximum over {answers:.0f} answers"
        else:
            status, detail = "pass", f"within the maximum over {answers:.0f} answers"
        checks.append(Check(name, status, value, champion.get(name), threshold, detail))
    values = {"canary": dict(canary), "champion": dict(champion)}
    if ctr is not None:
        checks.append(_ctr_check(config, ctr))
        values["ctr"] = {f"{v}.{k}": x for v, row in ctr.items() for k, x in row.items()}
    return Verdict(tuple(checks), values)


def _ctr_check(config: GuardrailsConfig, ctr: Mapping[str, Mapping[str, float]]) -> Check:
    rows = list(ctr.values())  # canary first, champion second
    canary, champion = rows[0], rows[1]
    need = config.ctr.min_impressions
    threshold = config.ctr.min_ctr_ratio * champion["ctr"] if champion["impressions"] else math.nan
    if min(canary["impressions"], champion["impressions"]) < need:
        detail = (
            f"{canary['impressions']:.0f} canary / {champion['impressions']:.0f} champion impressions, "
            f"fewer than min_impressions {need}"
        )
        return Check(
            "served_ctr",
            "insufficient",
            _nan_none(canary["ctr"]),
            _nan_none(champion["ctr"]),
            threshold,
            detail,
        )
    status: Status = "breach" if canary["ctr"] < threshold else "pass"
    detail = (
        f"{'below' if status == 'breach' else 'at least'} min_ctr_ratio {config.ctr.min_ctr_ratio} x the "
        f"champion's, over {canary['impressions']:.0f} / {champion['impressions']:.0f} impressions"
    )
    return Check("served_ctr", status, canary["ctr"], champion["ctr"], threshold, detail)


def evaluate(
    config: GuardrailsConfig,
    canary: str,
    champion: str,
    since: datetime,
    query: Query | None = None,
    clicks_objects: ParquetObjects | None = None,
) -> Verdict:
    """Measure both versions (Prometheus; the CTR when ``ctr.request_log_uri`` is set) and decide.
    ``clicks_objects``, kept by the caller across evaluations, reads each click file once."""
    if query is None:

        def query(text: str) -> Mapping[str, Any]:
            return query_prometheus(config.prometheus_url, text, config.query_timeout_s)

    values = {version: measure(config, version, query) for version in (canary, champion)}
    ctr = None
    if config.ctr.request_log_uri:
        ctr = measure_ctr(config, [canary, champion], since, clicks_objects)
    if ctr is not None:
        ctr = {canary: ctr[canary], champion: ctr[champion]}
    return decide(config, values[canary], values[champion], ctr)


def version_of(storage_uri: str) -> str:
    """The bundle version a promoted ``STORAGE_URI`` serves: promote writes ``<promote.uri>/<version>/``
    (components/promote.py), and the server labels its answers with that manifest version."""
    parts = [part for part in storage_uri.split("://", 1)[-1].split("/") if part]
    if len(parts) < 2:
        raise ValueError(f"{storage_uri!r}: no <prefix>/<version>/ path to read a bundle version from")
    return parts[-1]


def _nan_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}"
