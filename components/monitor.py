"""Monitor step: what the deployed model did, from the request log, checked before the next training.

Reads the request log's last ``monitor.window_hours`` (serving/request_log.py), the raw events, the
training set the next model will learn from and the served bundle. The reference distribution is the
training set's most recent split (``monitor.reference_split``: ``test`` by default, the latest period the
offline pipeline saw; the deployed model was refit on the splits before it): users' histories and
activity move with time, so the first months of the training data would show drift in clean traffic.
It checks:

- ``traffic``: enough logged answers to judge (else the traffic checks are skipped, and say so);
- ``drift``: per user feature, the population stability index (PSI) of the values the server used
  against the training set's (numeric features and list lengths in the training set's quantile bins,
  categories as the most frequent ones + "other"), and the Kolmogorov-Smirnov statistic of dense ones.
  Rows answered on defaults (degraded, or users the store does not know) are left out: they are counted
  by their own checks. A shifted feature or a stale online store shows here, named;
- ``skew``: for a sample of answers, the user features recomputed offline by Feast's point-in-time join
  (``get_historical_features``, as the training set is built) against the values the server used:
  the match rate per feature and its largest error. The join is asked as of the request time, or as of
  the end of the offline data when the request came later (a replayed dataset, a late pipeline): what is
  compared is the online store against the offline store on the same data; how old that data is shows
  separately (``data_lag_hours``). A stale online store (not materialized after new rows arrived) shows
  here, named;
- ``expectations``: a great-expectations suite on the served features (recsys/expectations.py, the
  validate step's machinery, with Data Docs): no nulls, numbers inside the reference's range, categories
  among the reference's, sequences no longer than its longest;
- ``empty_answers`` and ``degraded_answers``: their rates by bundle version;
- ``online_recall``: logged queries (the user features of the answers) re-run through the bundle's user
  tower, the served ANN index against exact search over the same item embeddings: recall@``recall_k``;
- ``index_coverage``: the share of items with events in the last ``recent_item_days`` days that the served
  index lacks (new items that wait for the next index);
- ``embedding_age``: hours since the bundle's item embeddings were made (its manifest's ``created_at``);
- ``outcomes``: per bundle version, served CTR (a click on a served item within ``attribution_hours`` of
  the answer, from the raw events) and catalogue coverage; skipped while the events end before the
  answers (a local run serves today on data from the past).

Memory follows the window and the samples, not the data (issue 26): the raw events are read through
pyarrow filters (the recent days, the answered users' clicks; :class:`EventLog`), the reference split as
at most ``monitor.reference_rows`` rows (every k-th: :func:`reference_sample`), and the skew join reads
the sampled users' and items' feature rows only (:func:`entity_rows`).

Each check is ok, warn or fail by the thresholds in params.yaml (``monitor``), or skipped with the reason.
Writes ``metrics/monitor.json`` (checks and values), ``metrics/monitor.prom`` (the same as Prometheus
gauges, recsys/monitor_metrics.py; pushed to ``monitor.pushgateway`` when set) and an HTML report.
With ``monitor.stop_on_fail`` a failed check exits 1, so a scheduled run stops before training.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.stats import ks_2samp

from recsys.artifact_io import write_json
from recsys.config import FeastConfig, FeaturesConfig, Limits, MonitorConfig, ServingConfig, TrainingSetConfig
from recsys.monitor_metrics import export
from recsys.request_records import attribute_clicks, served_slots
from recsys.step_contract import STEPS

CONTRACT = STEPS["monitor"]
log = logging.getLogger(__name__)

OTHER = "\x00other"  # the bucket of categories outside the reference's most frequent
_EPS = 1e-4  # a bin's share floor in the PSI: an empty bin on one side is large, not infinite
TRAFFIC_CHECKS = (
    "drift",
    "skew",
    "expectations",
    "empty_answers",
    "degraded_answers",
)  # skipped without enough answers
EVENT_COLUMNS = ["user_id", "item_id", "event_timestamp", "label"]  # what index coverage and outcomes read
Gauges = dict[str, list[tuple[dict[str, str], float]]]  # name -> [(labels, value)]
_GX_EXAMPLES = 5  # unexpected values shown per failed expectation
_GX_MAX_CATEGORIES = 2_000  # larger vocabularies (ids, zip codes at scale) are left to the PSI
_RANK = {"ok": 0, "skipped": 0, "warn": 1, "fail": 2}


def run(
    monitor: MonitorConfig,
    serving: ServingConfig,
    raw_dir: Path,
    training_dir: Path,
    bundle_dir: Path | None,
    output: Path,
    textfile: Path,
    report_file: Path,
    now: datetime | None = None,
    request_log_uri: str | None = None,
    offline: OfflineFeatures | None = None,
    docs_dir: Path | None = None,
) -> dict[str, Any]:
    """Check the logged traffic; write the report files; the report. ``offline`` (the Feast store and
    feature tables) enables the skew check."""
    from recsys.request_records import read_request_log

    now = now or datetime.now(UTC)
    uri = request_log_uri or serving.request_log.uri
    answers = read_request_log(uri, since=now - timedelta(hours=monitor.window_hours)).to_pandas()
    checks: dict[str, dict[str, Any]] = {}
    gauges: Gauges = {}
    checks["traffic"] = _check_traffic(answers, monitor, uri)
    enough = checks["traffic"]["status"] == "ok"
    gauges["recsys_monitor_logged_answers"] = [({}, float(len(answers)))]
    reference_path = training_dir / f"ranking_{monitor.reference_split}.parquet"
    reference = reference_sample(reference_path, monitor.reference_rows).to_pandas()
    events = EventLog(raw_dir / "events.parquet")
    bundle = _load_bundle(bundle_dir) if bundle_dir is not None else None
    served_features = _served_features(answers) if enough else pd.DataFrame()
    docs = docs_dir if docs_dir is not None else report_file.parent / "monitor_expectations"
    if enough:
        checks["drift"] = _check_drift(served_features, reference, monitor, gauges)
        checks["skew"] = _check_skew(answers, served_features, offline, monitor, gauges)
        checks["expectations"] = _check_expectations(served_features, reference, docs)
        for name, column in (("empty_answers", "empty"), ("degraded_answers", "degraded")):
            checks[name] = _check_rate(answers, column, monitor, gauges)
    else:
        checks |= {name: _skipped("too few answers") for name in TRAFFIC_CHECKS}
    checks["online_recall"] = _check_online_recall(
        served_features, pq.read_schema(reference_path), bundle, monitor, gauges
    )
    checks["index_coverage"] = _check_index_coverage(events, bundle, monitor, gauges, now)
    checks["embedding_age"] = _check_embedding_age(bundle, monitor, gauges, now)
    checks["outcomes"] = (
        _check_outcomes(answers, events, bundle, monitor, gauges) if enough else _skipped("too few answers")
    )
    worst = max(checks.values(), key=lambda c: _RANK[c["status"]])["status"]
    report = {
        "status": "ok" if worst == "skipped" else worst,
        "window": {"from": (now - timedelta(hours=monitor.window_hours)).isoformat(), "to": now.isoformat()},
        "request_log": uri,
        "answers": len(answers),
        "bundle_version": None if bundle is None else bundle.version,
        "checks": checks,
        "gauges": gauges,
        "finished_at": datetime.now(UTC).timestamp(),
    }
    write_json(report, output)
    if not (docs / "index.html").is_file():  # the Data Docs' place says why there are none this time
        docs.mkdir(parents=True, exist_ok=True)
        reason = html.escape(checks["expectations"]["message"])
        (docs / "index.html").write_text(f"<!doctype html><p>No expectations ran: {reason}</p>\n")
    export(report, textfile, monitor.pushgateway or None)
    _write_html(report, report_file)
    for name, check in checks.items():
        log.info("monitor %-16s %-7s %s", name, check["status"], check["message"])
    return report


# ---- checks -------------------------------------------------------------------------------------


def _check_traffic(answers: pd.DataFrame, monitor: MonitorConfig, uri: str) -> dict[str, Any]:
    if len(answers) < monitor.min_answers:
        return _skipped(
            f"{len(answers)} answers logged in the last {monitor.window_hours:g} h under {uri}, "
            f"fewer than monitor.min_answers {monitor.min_answers}: traffic checks skipped"
        )
    return {"status": "ok", "value": len(answers), "message": f"{len(answers)} answers logged"}


def _check_drift(
    served: pd.DataFrame,
    reference: pd.DataFrame,
    monitor: MonitorConfig,
    gauges: Gauges,
) -> dict[str, Any]:
    if served.empty:
        return _skipped("no logged answer carries its features (serving.request_log.feature_sample)")
    names = [n for n in served.columns if n in reference.columns and n != "user_id"]
    psi: dict[str, float] = {}
    for name in names:
        ref, cur = reference[name], served[name]
        psi[name] = population_stability(ref, cur, monitor.psi_bins)
        if _kind(ref) == "dense":  # KS on the values themselves
            stat = ks_2samp(ref.to_numpy(float), cur.to_numpy(float)).statistic
            gauges.setdefault("recsys_monitor_feature_ks", []).append(({"feature": name}, float(stat)))
    gauges["recsys_monitor_feature_psi"] = [({"feature": n}, v) for n, v in psi.items()]
    if not psi:
        return _skipped("no user feature is both logged and in the training set")
    worst = max(psi, key=lambda n: psi[n])
    status = _higher_is_worse(psi[worst], monitor.psi)
    shifted = sorted((n for n, v in psi.items() if v >= monitor.psi.warn), key=lambda n: -psi[n])
    message = (
        f"features past PSI {monitor.psi.warn:g}: "
        + ", ".join(f"{n} {psi[n]:.3f}" for n in shifted)
        + f" (of {len(psi)}, {len(served)} answers)"
        if shifted
        else f"largest PSI {psi[worst]:.3f} ({worst}) over {len(psi)} features, {len(served)} answers"
    )
    return {"status": status, "value": psi[worst], "feature": worst, "psi": psi, "message": message}


@dataclass(frozen=True)
class OfflineFeatures:
    """What the skew check recomputes features with: the Feast store and repo, and the feature tables."""

    feast: FeastConfig
    features: FeaturesConfig
    training_set: TrainingSetConfig
    features_dir: Path


def _check_skew(
    answers: pd.DataFrame,
    served_features: pd.DataFrame,
    offline: OfflineFeatures | None,
    monitor: MonitorConfig,
    gauges: Gauges,
) -> dict[str, Any]:
    if offline is None:
        return _skipped("no Feast store and feature tables given")
    usable = served_features.loc[answers.loc[served_features.index, "user_id"].notna()]
    if usable.empty:
        return _skipped("no logged answer with its features and a known user")
    served = usable.sample(n=min(len(usable), monitor.skew_sample), random_state=0)
    sample = answers.loc[served.index].reset_index(drop=True)
    served = served.reset_index(drop=True)
    recomputed, data_end = _point_in_time(sample, offline)
    names = [n for n in served.columns if n in recomputed.columns and n != "user_id"]
    rates: dict[str, float] = {}
    errors: dict[str, float] = {}
    for name in names:
        same, error = _agreement(served[name], recomputed[name])
        rates[name], errors[name] = float(same.mean()), error
    gauges["recsys_monitor_skew_match_rate"] = [({"feature": n}, r) for n, r in rates.items()]
    if not rates:
        return _skipped("no logged user feature is a Feast feature")
    worst = min(rates, key=lambda n: rates[n])
    lag_h = max((sample["time"].max() - data_end).total_seconds() / 3600, 0.0)
    below = sorted((n for n, r in rates.items() if r <= monitor.skew_match_rate.warn), key=lambda n: rates[n])
    detail = ", ".join(f"{n} {rates[n]:.1%} (largest error {errors[n]:.4g})" for n in below)
    return {
        "status": _lower_is_worse(rates[worst], monitor.skew_match_rate),
        "value": rates[worst],
        "feature": worst,
        "match_rate": rates,
        "largest_error": errors,
        "data_lag_hours": round(lag_h, 1),
        "message": (
            f"features served unlike the offline store: {detail}"
            if below
            else f"every feature matches the offline store in at least {rates[worst]:.1%}"
        )
        + f" of {len(sample)} answers; the offline data ends {lag_h:.0f} h before the last answer",
    }


def _point_in_time(
    sample: pd.DataFrame, offline: OfflineFeatures, sources: Mapping[str, pa.Table] | None = None
) -> tuple[pd.DataFrame, pd.Timestamp]:
    """The answers' user features as Feast's offline join gives them, as of each answer's time (or the
    end of the offline data, when later), in ``sample``'s row order; and that end. The join reads only
    the sampled users' and items' rows (:func:`entity_rows`), unless ``sources`` gives the tables: an
    as-of join picks each entity's value from its own rows, so the answer is the whole tables' one."""
    import functools

    from recsys.contracts import FEATURE_TABLE_KEYS
    from recsys.feature_store import feature_repo, feature_table_path, open_feature_store
    from recsys.point_in_time import historical_features

    users = sample["user_id"].astype(np.int64).to_numpy()
    items = np.asarray([int(ids[0]) if len(ids) else 0 for ids in sample["item_ids"]], dtype=np.int64)
    if sources is None:
        sources = entity_rows(offline.features_dir, {"user_id": users, "item_id": items})
    data_end = max(table_end(feature_table_path(offline.features_dir, name)) for name in FEATURE_TABLE_KEYS)
    entity_df = pd.DataFrame(
        {
            "row_id": np.arange(len(sample), dtype=np.int64),
            "user_id": users,
            "item_id": items,
            "event_timestamp": sample["time"].clip(upper=data_end).to_numpy(),
            "label": np.zeros(len(sample), dtype=np.int64),
        }
    )
    build_repo = functools.partial(feature_repo, offline.feast, offline.features)
    frame, _ = historical_features(
        open_feature_store(offline.feast),
        entity_df,
        "retrieval",
        sources,
        build_repo,
        offline.training_set.chunk_rows,
        offline.training_set.call_rows,
    )
    return frame.sort_values("row_id", ignore_index=True), data_end


def entity_rows(features_dir: Path, keys: Mapping[str, np.ndarray]) -> dict[str, pa.Table]:
    """Every feature table's rows of the given entities (``keys``: entity key -> ids), in the table's
    order, read through a pyarrow filter on the key a row group at a time, never the table whole."""
    from recsys.contracts import FEATURE_TABLE_KEYS
    from recsys.feature_store import feature_table_path

    tables = {}
    for name, key in FEATURE_TABLE_KEYS.items():
        ids = pa.array(np.unique(np.asarray(keys[key], dtype=np.int64)), pa.int64())
        path = feature_table_path(features_dir, name)
        tables[name] = pq.read_table(path, filters=pc.field(key).isin(ids), schema=pq.read_schema(path))
    return tables


def table_end(path: Path) -> pd.Timestamp:
    """A feature table's latest ``event_timestamp`` (the end of the offline data)."""
    latest = _latest(path)
    if latest is None:
        raise ValueError(f"{path}: no feature rows, no offline data end")
    return latest


def _latest(path: Path) -> pd.Timestamp | None:
    """The latest ``event_timestamp`` in a Parquet file (None when empty): the column alone, a batch at
    a time."""
    values = [
        pc.max(batch.column(0)).as_py()
        for batch in pq.ParquetFile(path).iter_batches(_BATCH_ROWS, columns=["event_timestamp"])
    ]
    values = [v for v in values if v is not None]
    return pd.Timestamp(max(values)) if values else None


def _agreement(served: pd.Series, offline: pd.Series) -> tuple[np.ndarray, float]:
    """Whether each served value equals the offline one (numbers to 1e-6 relative, lists element-wise,
    the rest as text), and the largest absolute difference of numbers (lists: of lengths)."""
    pairs = list(zip(served.tolist(), offline.tolist(), strict=True))
    same = np.fromiter((_equal(a, b) for a, b in pairs), dtype=bool, count=len(pairs))
    differences = [_difference(a, b) for a, b in pairs]
    return same, float(max(differences, default=0.0))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        return [str(x) for x in list(a if a is not None else [])] == [
            str(x) for x in list(b if b is not None else [])
        ]
    if isinstance(a, int | float) and isinstance(b, int | float | np.number):
        return bool(abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b))))
    return str(a) == str(b)


def _difference(a: Any, b: Any) -> float:
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        return float(abs(len(a if a is not None else []) - len(b if b is not None else [])))
    if isinstance(a, int | float) and isinstance(b, int | float | np.number):
        return abs(float(a) - float(b))
    return 0.0


def _check_expectations(served: pd.DataFrame, reference: pd.DataFrame, docs_dir: Path) -> dict[str, Any]:
    """The served features through a great-expectations suite built from the reference split."""
    import tempfile

    from recsys.expectations import TableChecks, run_suites, summarise

    if served.empty:
        return _skipped("no logged answer carries its features")
    names = [n for n in served.columns if n in reference.columns and n != "user_id"]
    expectations = [e for name in names for e in _feature_expectations(name, reference[name])]
    with tempfile.TemporaryDirectory(prefix="monitor-gx-") as scratch:
        data_dir = Path(scratch)
        served[names].to_parquet(data_dir / "served_features.parquet", index=False)
        table = TableChecks("served_features", "served_features.parquet", expectations)
        results = run_suites("monitor", data_dir, [table], docs_dir, _GX_EXAMPLES)
        summary = summarise("monitor", data_dir, results, _GX_EXAMPLES, docs_dir)
    failed = [f"{f['column']}: {f['expectation']} (e.g. {f['examples'][:3]})" for f in summary["failures"]]
    return {
        "status": "ok" if summary["success"] else "fail",
        "value": summary["failed"],
        "evaluated": summary["evaluated"],
        "failures": summary["failures"],
        "data_docs": summary["data_docs"],
        "message": (
            f"{summary['failed']} of {summary['evaluated']} expectations failed: " + "; ".join(failed)
            if failed
            else f"{summary['evaluated']} expectations met on {len(served)} served rows"
        ),
    }


def _feature_expectations(name: str, reference: pd.Series) -> list[Any]:
    """No nulls; numbers inside the reference's range, categories among its values (up to
    ``_GX_MAX_CATEGORIES`` of them), sequences no longer than its longest; 1% of rows may stray."""
    import great_expectations.expectations as gxe

    from recsys.expectations import ExpectColumnValueListLengthsToBeBetween

    checks: list[Any] = [gxe.ExpectColumnValuesToNotBeNull(column=name)]
    kind = _kind(reference)
    if kind == "sequence":
        longest = int(reference.map(_length).max())
        checks.append(ExpectColumnValueListLengthsToBeBetween(column=name, min_value=0, max_value=longest))
    elif kind == "dense":
        low, high = float(reference.min()), float(reference.max())
        checks.append(
            gxe.ExpectColumnValuesToBeBetween(column=name, min_value=low, max_value=high, mostly=0.99)
        )
    elif reference.nunique() <= _GX_MAX_CATEGORIES:
        values = sorted(reference.dropna().astype(str).unique().tolist())
        checks.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=values, mostly=0.99))
    return checks


def _check_rate(
    answers: pd.DataFrame,
    kind: str,
    monitor: MonitorConfig,
    gauges: Gauges,
) -> dict[str, Any]:
    flags = answers["item_ids"].map(len) == 0 if kind == "empty" else answers["degraded"]
    by_version = flags.groupby(answers["bundle_version"]).mean()
    gauges[f"recsys_monitor_{kind}_rate"] = [({"bundle_version": v}, float(r)) for v, r in by_version.items()]
    limits: Limits = getattr(monitor, f"{kind}_rate")
    rate = float(flags.mean())
    return {
        "status": _higher_is_worse(rate, limits),
        "value": rate,
        "by_version": {str(v): float(r) for v, r in by_version.items()},
        "message": f"{rate:.2%} of {len(answers)} answers {kind}",
    }


def _check_online_recall(
    served: pd.DataFrame, types: pa.Schema, bundle: _Bundle | None, monitor: MonitorConfig, gauges: Gauges
) -> dict[str, Any]:
    if bundle is None:
        return _skipped("no served bundle given")
    if served.empty:
        return _skipped("no logged query with its features")
    missing = [n for n in bundle.user_features if n not in served.columns or n not in types.names]
    if missing:
        return _skipped(f"the user tower reads {missing}, which the logged features or training set lack")
    from recsys.ann_index import search

    sample = served.sample(n=min(len(served), monitor.recall_sample), random_state=0)
    vectors = bundle.user_vectors(sample, types)
    k = min(monitor.recall_k, len(bundle.item_ids))
    ann, _ = search(bundle.index, vectors, k)
    exact_ids = bundle.item_ids[np.argsort(-(vectors @ bundle.item_vectors.T), axis=1, kind="stable")[:, :k]]
    recall = float(np.mean([len(set(a[a >= 0]) & set(e)) / k for a, e in zip(ann, exact_ids, strict=True)]))
    gauges["recsys_monitor_online_recall"] = [({"k": str(k)}, recall)]
    return {
        "status": _lower_is_worse(recall, monitor.online_recall),
        "value": recall,
        "message": f"ANN recall@{k} {recall:.3f} against exact search on {len(sample)} logged queries",
    }


def _check_index_coverage(
    events: EventLog,
    bundle: Any,
    monitor: MonitorConfig,
    gauges: Gauges,
    now: datetime,
) -> dict[str, Any]:
    if bundle is None:
        return _skipped("no served bundle given")
    last = events.end()
    if last is None:
        return _skipped(f"no events in {events.path}")
    end = min(pd.Timestamp(now), last)
    recent = events.rows(["item_id"], since=end - pd.Timedelta(days=monitor.recent_item_days))
    available = np.unique(recent["item_id"].to_numpy(np.int64))
    missing = np.setdiff1d(available, bundle.item_ids)
    share = float(len(missing) / len(available)) if len(available) else 0.0
    gauges["recsys_monitor_index_missing_share"] = [({}, share)]
    return {
        "status": _higher_is_worse(share, monitor.index_missing_share),
        "value": share,
        "missing_items": len(missing),
        "message": f"{len(missing)} of {len(available)} items with events in the last "
        f"{monitor.recent_item_days} days (to {end:%Y-%m-%d}) are not in the served index",
    }


def _check_embedding_age(
    bundle: Any, monitor: MonitorConfig, gauges: Gauges, now: datetime
) -> dict[str, Any]:
    if bundle is None:
        return _skipped("no served bundle given")
    made = datetime.fromisoformat(bundle.manifest["created_at"])
    hours = max((now - made).total_seconds() / 3600, 0.0)
    gauges["recsys_monitor_embedding_age_seconds"] = [({}, hours * 3600)]
    return {
        "status": _higher_is_worse(hours, monitor.embedding_age_hours),
        "value": hours,
        "message": f"item embeddings of bundle {bundle.version} made {hours:.1f} h ago",
    }


def _check_outcomes(
    answers: pd.DataFrame,
    events: EventLog,
    bundle: Any,
    monitor: MonitorConfig,
    gauges: Gauges,
) -> dict[str, Any]:
    catalogue = len(bundle.item_ids) if bundle is not None else None
    coverage = (
        {
            str(v): len({i for items in group for i in items}) / catalogue
            for v, group in answers.groupby("bundle_version")["item_ids"]
        }
        if catalogue
        else {}
    )
    gauges["recsys_monitor_catalogue_coverage"] = [({"bundle_version": v}, c) for v, c in coverage.items()]
    served = served_slots(
        answers.loc[answers["endpoint"] == "recommend", ["user_id", "time", "bundle_version", "item_ids"]]
    )
    last = events.end()
    if served.empty or last is None or last < served["time"].min():
        return _skipped(
            "the events end before the first served answer: no outcome to attribute yet"
            + (f" (coverage {coverage})" if coverage else ""),
            coverage=coverage,
        )
    window = pd.Timedelta(hours=monitor.attribution_hours)  # the clicks that can count, no others read
    clicks = events.rows(
        EVENT_COLUMNS,
        since=served["time"].min(),
        until=served["time"].max() + window,
        users=served["user_id"].to_numpy(np.int64),
        label=1,
    )
    per_item = served.assign(clicked=attribute_clicks(served, clicks, monitor.attribution_hours))
    ctr = per_item.groupby("bundle_version")["clicked"].mean()
    gauges["recsys_monitor_served_ctr"] = [({"bundle_version": str(v)}, float(c)) for v, c in ctr.items()]
    return {
        "status": "ok",
        "value": float(per_item["clicked"].mean()),
        "ctr_by_version": {str(v): float(c) for v, c in ctr.items()},
        "coverage": coverage,
        "message": "served CTR " + ", ".join(f"{v}: {c:.4f}" for v, c in ctr.items()),
    }


# ---- bounded reads ------------------------------------------------------------------------------

_BATCH_ROWS = 1 << 16  # rows decoded at a time from a Parquet file


class EventLog:
    """The raw events, never whole: the checks ask for their end and for the rows they can use (a time
    window, some users, clicks), read a row group at a time through a pyarrow filter, so memory follows
    what is asked for, not the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        schema = pq.read_schema(path)
        missing = sorted(set(EVENT_COLUMNS) - set(schema.names))
        if missing:
            raise ValueError(f"{path}: the monitor reads columns {missing}, which the events lack")
        self._type = schema.field("event_timestamp").type
        self._end: pd.Timestamp | None = None
        self._ended = False

    def end(self) -> pd.Timestamp | None:
        """The latest event's time (None without events): one column, a batch at a time."""
        if not self._ended:
            self._end, self._ended = _latest(self.path), True
        return self._end

    def rows(
        self,
        columns: list[str],
        since: pd.Timestamp | None = None,
        until: pd.Timestamp | None = None,
        users: np.ndarray | None = None,
        label: int | None = None,
    ) -> pd.DataFrame:
        """``columns`` of the events at or after ``since``, at or before ``until``, of ``users``, with
        ``label``: each condition given narrows what is kept."""
        time = pc.field("event_timestamp")
        conditions = []
        if since is not None:
            conditions.append(time >= self._bound(since))
        if until is not None:
            conditions.append(time <= self._bound(until))
        if users is not None:
            conditions.append(pc.field("user_id").isin(pa.array(np.unique(users), pa.int64())))
        if label is not None:
            conditions.append(pc.field("label") == label)
        expression = None
        for condition in conditions:
            expression = condition if expression is None else expression & condition
        return pq.read_table(self.path, columns=columns, filters=expression).to_pandas()

    def _bound(self, moment: pd.Timestamp) -> pa.Scalar:
        """``moment`` as a scalar of the column's type (tz-aware or not, either way in UTC)."""
        moment = pd.Timestamp(moment)
        zone = getattr(self._type, "tz", None)
        if zone is not None and moment.tzinfo is None:
            moment = moment.tz_localize("UTC")
        elif zone is None and moment.tzinfo is not None:
            moment = moment.tz_convert("UTC").tz_localize(None)
        return pa.scalar(moment, type=self._type)


def reference_sample(path: Path, rows: int) -> pa.Table:
    """The reference split, or at most ``rows`` of it when larger: every k-th row (k = ceil(total /
    rows)), read a batch at a time, so the sample spans the whole split (its time order included) and
    is the same on every run. A split within ``rows`` is read whole, unchanged."""
    parquet = pq.ParquetFile(path)
    total = parquet.metadata.num_rows
    if total <= rows:
        return parquet.read()
    step = -(-total // rows)
    kept, start = [], 0
    for batch in parquet.iter_batches(_BATCH_ROWS):
        first = (-start) % step  # the batch's first row at a multiple of step
        kept.append(batch.take(pa.array(np.arange(first, batch.num_rows, step, dtype=np.int64))))
        start += batch.num_rows
    return pa.Table.from_batches(kept, schema=parquet.schema_arrow)


# ---- drift --------------------------------------------------------------------------------------


def population_stability(reference: pd.Series, current: pd.Series, bins: int) -> float:
    """PSI = sum over bins of (cur - ref) * ln(cur / ref), shares floored at 1e-4. Numeric values and list
    lengths in the reference's quantile bins; categories as the reference's ``bins`` most frequent + other."""
    kind = _kind(reference)
    if kind == "sequence":
        reference, current = reference.map(len), current.map(_length)
        kind = "dense"
    if kind == "dense":
        ref = reference.to_numpy(float)
        edges = np.unique(np.quantile(ref[np.isfinite(ref)], np.linspace(0, 1, bins + 1)[1:-1]))
        ref_bins = np.searchsorted(edges, ref, side="right")
        cur_bins = np.searchsorted(edges, current.to_numpy(float), side="right")
        labels = np.arange(len(edges) + 1)
        ref_share = np.bincount(ref_bins, minlength=len(labels)) / len(ref_bins)
        cur_share = np.bincount(cur_bins, minlength=len(labels)) / max(len(cur_bins), 1)
    else:
        top = reference.astype(str).value_counts().index[:bins]
        ref_share = _shares(reference.astype(str), top)
        cur_share = _shares(current.astype(str), top)
    ref_share, cur_share = np.maximum(ref_share, _EPS), np.maximum(cur_share, _EPS)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def _shares(values: pd.Series, top: pd.Index) -> np.ndarray:
    bucketed = values.where(values.isin(top), OTHER)
    counts = bucketed.value_counts()
    return np.asarray([counts.get(v, 0) for v in [*top, OTHER]], dtype=float) / max(len(values), 1)


def _kind(column: pd.Series) -> str:
    sample = column.dropna()
    if len(sample) and isinstance(sample.iloc[0], list | np.ndarray | tuple):
        return "sequence"
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    return "dense" if numeric else "categorical"  # counts and buckets too: served JSON may make 3 into 3.0


def _length(value: Any) -> int:
    return len(value) if isinstance(value, list | np.ndarray | tuple) else 0


def _served_features(answers: pd.DataFrame) -> pd.DataFrame:
    """The user features of answers made on the user's own stored (or given) features, indexed as
    ``answers`` (the skew check looks the answers' users and times up by it)."""
    usable = answers.loc[answers["features"].notna() & ~answers["degraded"] & ~answers["cold_start"]]
    if usable.empty:
        return pd.DataFrame()
    return pd.DataFrame([json.loads(text) for text in usable["features"]], index=usable.index)


# ---- the served bundle --------------------------------------------------------------------------


class _Bundle:
    """What the checks need of the served bundle, verified: its two-tower (user tower and encoder), the
    ANN index and the item embeddings the index was built from."""

    def __init__(self, bundle_dir: Path) -> None:
        from safetensors.numpy import load_file

        from models import load_model
        from models.registry import RETRIEVAL_MODEL
        from recsys import artifact_layout as layout
        from recsys.ann_index import load_index
        from recsys.bundle_manifest import load_manifest

        self.manifest: dict[str, Any] = load_manifest(bundle_dir, verify=True)
        self.version = str(self.manifest["version"])
        self.model, self.encoder = load_model(bundle_dir / layout.BUNDLE_MODELS / RETRIEVAL_MODEL)
        self.user_features: list[str] = list(self.model.user_feature_names())  # type: ignore[attr-defined]
        self.index, _ = load_index(bundle_dir / layout.INDEX, expected_dim=int(self.model.output_dim))  # type: ignore[arg-type]
        embeddings = load_file(str(bundle_dir / layout.ITEM_EMBEDDINGS))
        self.item_ids = embeddings["item_ids"].astype(np.int64)
        self.item_vectors = embeddings["embeddings"].astype(np.float32)

    def user_vectors(self, frame: pd.DataFrame, types: pa.Schema) -> np.ndarray:
        """The user tower's vectors for ``frame``'s rows, each feature typed as the training set has it."""
        import torch

        names = self.user_features
        table = pa.table({n: pa.array(frame[n].tolist(), type=types.field(n).type) for n in names})
        with torch.inference_mode():
            batch = self.encoder.encode(table, features=names)
            return self.model.user_embeddings(batch).float().numpy()  # type: ignore[attr-defined]


def _load_bundle(bundle_dir: Path) -> _Bundle | None:
    if not (bundle_dir / "manifest.json").is_file():
        log.warning("monitor: no bundle at %s: retrieval checks skipped", bundle_dir)
        return None
    return _Bundle(bundle_dir)


# ---- status and report --------------------------------------------------------------------------


def _higher_is_worse(value: float, limits: Limits) -> str:
    return "fail" if value >= limits.fail else "warn" if value >= limits.warn else "ok"


def _lower_is_worse(value: float, limits: Limits) -> str:
    return "fail" if value <= limits.fail else "warn" if value <= limits.warn else "ok"


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "value": None, "message": reason, **extra}


def _write_html(report: Mapping[str, Any], path: Path) -> None:
    """One page: each check's status and message, and the PSI of every feature."""
    colour = {"ok": "#2e7d32", "skipped": "#757575", "warn": "#ef6c00", "fail": "#c62828"}
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td style='color:{colour[c['status']]}'><b>{c['status']}</b></td>"
        f"<td>{_shown(c['value'])}</td><td>{html.escape(c['message'])}</td></tr>"
        for name, c in report["checks"].items()
    )
    psi = report["checks"]["drift"].get("psi", {})
    bars = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{v:.4f}</td><td><div style='background:#1565c0;height:10px;"
        f"width:{min(v, 1.0) * 400:.0f}px'></div></td></tr>"
        for n, v in sorted(psi.items(), key=lambda kv: -kv[1])
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>recsys monitor</title>"
        f"<h1>Monitor: {report['status']}</h1><p>{report['answers']} answers, "
        f"{html.escape(report['window']['from'])} to {html.escape(report['window']['to'])}, "
        f"bundle {html.escape(str(report['bundle_version']))}</p>"
        f"<table border=1 cellpadding=4><tr><th>check</th><th>status</th><th>value</th><th>detail</th></tr>"
        f"{rows}</table><h2>Feature drift (PSI, served vs training set)</h2>"
        f"<table cellpadding=2>{bars}</table>\n"
    )


def _shown(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.monitor", description=__doc__)
    CONTRACT.add_path_options(parser)
    parser.add_argument("--request-log", default=None, help="default: serving.request_log.uri")
    parser.add_argument("--no-bundle", action="store_true", help="skip the checks that need the bundle")
    parser.add_argument(
        "--exit-zero",
        action="store_true",
        help="exit 0 whatever the checks say (the report still does): dvc repro reports, the scheduled "
        "Kubeflow run stops (monitor.stop_on_fail)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    paths = CONTRACT.paths(args)
    if args.no_bundle:
        paths["bundle_dir"] = None
    features_dir = paths.pop("features_dir")
    offline = (
        OfflineFeatures(params.feast, params.features, params.training_set, features_dir)
        if features_dir.is_dir()
        else None
    )
    report = run(params.monitor, params.serving, request_log_uri=args.request_log, offline=offline, **paths)
    failed = [name for name, check in report["checks"].items() if check["status"] == "fail"]
    if failed and params.monitor.stop_on_fail:
        print(f"monitor: failed checks {failed} (monitor.stop_on_fail): see {args.output}")
        return 0 if args.exit_zero else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
