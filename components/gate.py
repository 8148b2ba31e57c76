"""Gate step: deploy a new bundle only if none of the chosen metrics got worse than the deployed bundle's.

Worse means, with ``gate.compare: interval`` (the default), worse beyond the noise of the two
evaluations: the evaluate step writes a bootstrap interval over users for each headline metric
(``intervals_by_metric``); the difference new - deployed gets the interval whose half-width combines both
half-widths (independent test windows: sqrt(h_new^2 + h_old^2)), and the gate rejects only when all of it
lies beyond the tolerance on the wrong side. A retrain that moves Recall@50 by less than its own sampling
noise is not a regression, and a point comparison would reject every other such run. A metric without an
interval on either side (an older bundle) is compared by its point value, and the decision says so.
``gate.compare: point`` compares point values only.

With ``gate.ope.enabled`` the gate also reads the off-policy estimate of the new model's CTR from the
deployed model's request log (components/ope.py, ``--ope-file``, default metrics/ope.json): the estimate
``gate.ope.metric`` (ips | snips | dr) minus the champion's on-policy CTR has an interval (paired over the
same logged requests); ``require: not_worse`` rejects when all of it lies below ``-margin``, ``better``
rejects unless all of it lies above ``+margin``. A missing or unusable estimate is an error, never a pass.

The decision is data, not an exception: ``metrics/gate.json`` says ``passed`` and why, and the pipeline
branches on it (KFP ``dsl.If``), so the step exits 0 either way unless ``--fail-on-reject``. A metric
that cannot be compared (absent on either side, not a finite number) fails the gate: a deploy must never
pass because evaluation silently stopped writing the number it was judged by.

The deployed bundle is ``gate.deployed_bundle`` (or ``--deployed-bundle``): a local bundle folder (path or
``file://``), or a promote store (``s3://...`` or ``file://`` holding ``current.json``, see
recsys/object_store.py), whose current version's manifest is read from the store. The pipeline always
compares with ``promote.uri``, the store its promote step writes: no pointer there is a first deploy,
said so in the decision; an unreachable store is an error, never a pass.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from recsys import artifact_layout as layout
from recsys.artifact_io import read_json, write_json
from recsys.bundle_manifest import MANIFEST, load_manifest
from recsys.config import GateConfig, OpeGateConfig
from recsys.object_store import POINTER, ObjectStoreError, open_store, promoted_manifest
from recsys.step_contract import STEPS

CONTRACT = STEPS["gate"]

log = logging.getLogger(__name__)

# where the evaluate step writes each headline metric's bootstrap interval, keyed by its dotted path
INTERVALS = "intervals_by_metric"
OPE_FILE = layout.OPE_REPORT  # components/ope.py's output (gate.ope)
# absolute slack on top of the relative tolerance so "exactly at the tolerance" is not lost to float error
_FLOAT_SLACK = 1e-12


class GateError(ValueError):
    """The gate cannot run (unreadable metrics, unusable deployed-bundle reference); not a rejection."""


def run(
    config: GateConfig,
    *,
    metrics_file: str | Path,
    output: str | Path,
    deployed_bundle: str | None = None,
    ope_file: str | Path | None = None,
) -> dict[str, Any]:
    """Compare ``metrics_file`` with the deployed bundle's manifest metrics and write the decision to
    ``output``; ``deployed_bundle`` overrides ``gate.deployed_bundle``. With ``gate.ope.enabled`` the
    off-policy estimate in ``ope_file`` (default metrics/ope.json) is judged too."""
    metrics_path, output = Path(metrics_file), Path(output)
    reference = deployed_bundle if deployed_bundle is not None else config.deployed_bundle
    new = _read_metrics(metrics_path)
    deployed, old, version = _deployed_metrics(reference)
    decision = decide(new, old, config.metrics, config.tolerance, compare=config.compare)
    if old is None and deployed is not None:  # a promote store with nothing promoted yet
        decision["reasons"] = [f"first deploy: nothing promoted yet at {deployed}"]
    if config.ope.enabled:
        path = Path(ope_file) if ope_file is not None else OPE_FILE
        decision = with_ope(
            decision, read_json(path, GateError, "off-policy estimate not found (gate.ope)"), config.ope
        )
    decision |= {
        "metrics_file": str(metrics_path),
        "deployed_bundle": None if old is None else deployed,
        "deployed_version": version,
    }
    write_json(decision, output)
    log.info("gate: %s — %s", "PASSED" if decision["passed"] else "REJECTED", "; ".join(decision["reasons"]))
    return decision


def decide(
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    rules: Mapping[str, str],
    tolerance: float,
    *,
    compare: str = "point",
) -> dict[str, Any]:
    """Per-metric comparison: ``old is None`` is a first deploy (only the new metrics must be present);
    ``compare="interval"`` judges the difference's interval where both sides have one."""
    results: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    for path, direction in rules.items():
        if direction not in ("higher", "lower"):
            raise GateError(f"gate.metrics.{path}: direction must be 'higher' or 'lower', got {direction!r}")
        new_value, new_problem = _number_at(new, path)
        old_value, old_problem = (None, None) if old is None else _number_at(old, path)
        row: dict[str, Any] = {"direction": direction, "new": new_value, "old": old_value, "delta": None}
        if new_problem:
            row["ok"], row["reason"] = False, f"{path}: {new_problem} in the new metrics"
        elif old is None:
            row["ok"], row["reason"] = True, f"{path}: {new_value:.6g} (first deploy, nothing to compare)"
        elif old_problem:
            row["ok"], row["reason"] = False, f"{path}: {old_problem} in the deployed bundle's metrics"
        else:
            spread = _spread(new, old, path) if compare == "interval" else None
            row |= _compare(path, new_value, old_value, direction, tolerance, spread)
            if compare == "interval" and spread is None:
                row["reason"] += " (no interval on both sides: point values compared)"
        results[path] = row
        if not row["ok"]:
            reasons.append(row["reason"])
    passed = not reasons
    if passed:
        reasons = (
            ["first deploy: no deployed bundle to compare against"]
            if old is None
            else [f"all {len(rules)} metric(s) within tolerance {tolerance:g} of the deployed bundle"]
        )
    return {
        "passed": passed,
        "first_deploy": old is None,
        "compare": compare,
        "tolerance": tolerance,
        "metrics": results,
        "reasons": reasons,
    }


def ope_check(report: Mapping[str, Any], ope: OpeGateConfig) -> dict[str, Any]:
    """The off-policy check: the challenger's ``ope.metric`` estimate against the champion's on-policy
    CTR, by the interval of their difference (components/ope.py's ``delta_low``/``delta_high``)."""
    where = f"gate.ope.metric {ope.metric}"
    estimate = (report.get("estimates") or {}).get(ope.metric) if isinstance(report, Mapping) else None
    if not isinstance(estimate, Mapping):
        raise GateError(f"{where}: no such estimate in the off-policy result (components/ope.py)")
    numbers = {key: _finite(estimate.get(key)) for key in ("ctr", "delta", "delta_low", "delta_high")}
    champion = _finite((report.get("champion") or {}).get("ctr"))
    if champion is None or any(v is None for v in numbers.values()):
        raise GateError(
            f"{where}: the off-policy result lacks finite ctr/delta/delta_low/delta_high/champion"
        )
    low, high, margin = numbers["delta_low"], numbers["delta_high"], ope.margin
    if ope.require == "not_worse":
        ok = high >= -margin - _FLOAT_SLACK
        verdict = "ok" if ok else f"worse beyond the noise and the margin {margin:g}"
    else:
        ok = low > margin
        verdict = "better beyond the noise" if ok else f"not better than the champion by more than {margin:g}"
    reason = (
        f"ope.{ope.metric}: challenger CTR {numbers['ctr']:.6g} vs champion {champion:.6g}, difference "
        f"interval [{low:+.4g}, {high:+.4g}] (require {ope.require}): {verdict}"
    )
    return {
        "metric": ope.metric,
        "require": ope.require,
        "margin": margin,
        "new": numbers["ctr"],
        "old": champion,
        "delta": numbers["delta"],
        "delta_interval": [low, high],
        "ok": ok,
        "reason": reason,
    }


def with_ope(decision: dict[str, Any], report: Any, ope: OpeGateConfig) -> dict[str, Any]:
    """``decision`` with the off-policy check added (and failed by it when it fails)."""
    row = ope_check(report, ope)
    passed = decision["passed"]
    # a rejection's reasons are its failures; a pass lists what was checked
    if passed and not row["ok"]:
        reasons = [row["reason"]]
    elif passed or not row["ok"]:
        reasons = [*decision["reasons"], row["reason"]]
    else:
        reasons = decision["reasons"]
    return decision | {"passed": decision["passed"] and row["ok"], "ope": row, "reasons": reasons}


def metric_at(metrics: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path; a key may itself contain dots (``recall@0.5``): longest key wins."""
    parts, node, i = dotted.split("."), metrics, 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            raise KeyError(dotted)
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(dotted)
    return node


def _compare(
    path: str, new: float, old: float, direction: str, tolerance: float, spread: float | None = None
) -> dict[str, Any]:
    """``spread``: the half-width of the difference's interval; None compares the point values."""
    delta = new - old
    allowed = tolerance * abs(old) + _FLOAT_SLACK
    worse_by = -delta if direction == "higher" else delta
    # the least the new model can be worse by, given the noise: the near end of the difference's interval
    ok = worse_by - (spread or 0.0) <= allowed
    relative = None if old == 0 else delta / abs(old)
    shown = "" if relative is None else f" ({relative:+.2%})"
    row: dict[str, Any] = {"delta": delta, "relative_delta": relative, "ok": ok}
    if spread is None:
        verdict = "ok" if ok else f"worse than the tolerance {tolerance:g} allows"
    else:
        row["delta_interval"] = [delta - spread, delta + spread]
        verdict = f"difference interval [{delta - spread:+.4g}, {delta + spread:+.4g}]: " + (
            "ok" if ok else f"worse beyond the noise and the tolerance {tolerance:g}"
        )
    row["reason"] = f"{path}: {new:.6g} vs deployed {old:.6g}{shown}, {direction} is better: {verdict}"
    return row


def _spread(new: Mapping[str, Any], old: Mapping[str, Any], path: str) -> float | None:
    """Half-width of the interval of new - old: both sides' interval half-widths combined as independent
    errors; None when either side has no usable interval for ``path``."""
    halves = []
    for metrics in (new, old):
        interval = (metrics.get(INTERVALS) or {}).get(path)
        if not isinstance(interval, Mapping):
            return None
        low, high = (_finite(interval.get(end)) for end in ("low", "high"))
        if low is None or high is None or high < low:
            return None
        halves.append((high - low) / 2)
    return math.hypot(*halves)


def _finite(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _number_at(metrics: Mapping[str, Any], path: str) -> tuple[float | None, str | None]:
    try:
        value = metric_at(metrics, path)
    except KeyError:
        return None, "missing"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"not a number ({value!r})"
    if not math.isfinite(value):
        return None, f"not finite ({value})"
    return float(value), None


def _read_metrics(path: Path) -> dict[str, Any]:
    metrics = read_json(path, GateError, "new metrics file not found (gate.metrics_file)")
    if not isinstance(metrics, dict):
        raise GateError(f"{path}: the top level must be an object of metrics")
    return metrics


def _deployed_metrics(reference: str | None) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(where, metrics, version) of the deployed bundle; metrics None = first deploy.

    A local bundle folder (path or ``file://``) is read directly; a promote store (``s3://``, or a
    ``file://`` folder without a manifest) through its ``current.json`` pointer.
    """
    if reference is None or not str(reference).strip():
        return None, None, None
    reference = str(reference).strip()
    parsed = urlparse(reference)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else reference)
        if (path / MANIFEST).is_file():
            # only the recorded metrics are needed: a full checksum pass over the serving bundle is not
            manifest = load_manifest(path, verify=False)
            return str(path), manifest["metrics"], manifest["version"]
        if not parsed.scheme and not (path / POINTER).is_file():
            raise GateError(
                f"gate.deployed_bundle: {path} is not a bundle directory (null means first deploy)"
            )
    elif parsed.scheme != "s3":
        raise GateError(
            f"gate.deployed_bundle: {reference!r}: a local bundle, or a promote store (s3:// or file://)"
        )
    try:
        store = open_store(reference if parsed.scheme else Path(reference).resolve().as_uri())
        promoted = promoted_manifest(store)
    except ObjectStoreError as exc:
        raise GateError(f"gate.deployed_bundle: cannot read the promoted bundle: {exc}") from exc
    if promoted is None:
        return store.uri(POINTER), None, None
    pointer, manifest = promoted
    return pointer["uri"], manifest["metrics"], pointer["version"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.gate", description=__doc__)
    CONTRACT.add_path_options(parser)
    parser.add_argument("--deployed-bundle", default=None, help="default: gate.deployed_bundle")
    parser.add_argument("--fail-on-reject", action="store_true", help="exit 1 when the gate rejects")
    parser.add_argument(
        "--ope-file", type=Path, default=OPE_FILE, help=f"read when gate.ope.enabled (default: {OPE_FILE})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    decision = run(
        params.gate, deployed_bundle=args.deployed_bundle, ope_file=args.ope_file, **CONTRACT.paths(args)
    )
    return 1 if args.fail_on_reject and not decision["passed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
