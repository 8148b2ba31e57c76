"""Off-policy evaluation: a challenger's CTR estimated from the champion's request log, before a canary.

The champion serves with ``serving.exploration`` on (serving/exploration.py): each logged ``recommend``
answer carries its ranked candidates (``candidate_ids``) and, per served slot, the probability the policy
put that item there given the items before it (``propensities``). Clicks are attributed to served items
as the monitor does (recsys/request_records.py: a click within ``monitor.attribution_hours``). The
challenger scores the same candidates; the target policy is the challenger served the way the champion
is (``serving.exploration`` applied to its scores: its probabilities come from the same function the
server samples with, recsys/exploration.py).

Every slot is weighted by its prefix ratio ``w_k = prod_{j<=k} pi(a_j | a_<j) / mu(a_j | a_<j)`` (the
cascade model: a slot's click may depend on the items above it, not below), and the list CTR is the mean
over requests of the clicks per served slot (the monitor's served CTR when lists are equally long):

- ``ips``: ``mean_i 1/K_i sum_k w_ik r_ik`` (unbiased; high variance deep in the list);
- ``snips``: each slot's weights normalised by their mean over requests (a little bias, less variance);
- ``dr``: the cascade doubly robust estimator with a per-item CTR reward model ``q`` fitted on the log:
  ``1/K_i sum_k [w_ik (r_ik - q(a_ik)) + w_i,k-1 E_{a ~ pi(.|a_<k)} q(a)]``.

Intervals (``gate.ope.confidence``) are normal approximations over requests: per-request terms for IPS
and DR, the delta method (influence function) for SNIPS. Each estimate also has the interval of its
difference with the champion's on-policy CTR, paired by request (the same log): that is what the gate
judges (``gate.ope``). A log without propensities or candidates, or one served without exploration
(propensity 1 everywhere) that the challenger would not reproduce, has no support for the challenger:
refused, naming the key.

The challenger is a bundle (``--challenger-bundle DIR``: started as ``python -m serving`` on loopback for
the scoring, request log off), a running server (``--challenger-url URL``: a canary pod, say), both
scored through the server's ``ranking`` endpoint (recsys/ranking_client.py), so the logged candidates get
the very scores the challenger would serve with; ``--challenger-ranker`` picks one of its rankers (default:
its ``serving.default_ranker``). ``--challenger module:function`` takes any callable
``(user_ids, candidate_id_arrays) -> score_arrays``. Params are read as a whole params.yaml (this tool is
not a DAG step: components.gate reads its output when ``gate.ope.enabled``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from recsys import artifact_layout as layout
from recsys.artifact_io import write_json
from recsys.config import ExplorationConfig, load_params
from recsys.config.loading import DEFAULT_PARAMS
from recsys.exploration import prefix_probabilities
from recsys.ranking_client import RankingClientError, bundle_server

log = logging.getLogger(__name__)

OPE_REPORT = layout.OPE_REPORT
ESTIMATORS = ("ips", "snips", "dr")
INTERVAL_METHOD = "normal approximation over requests (delta method for snips)"
_BATCH = 1_000  # lists scored together (the next-slot distributions: batch x slots x candidates floats)
_PRIOR_IMPRESSIONS = 1.0  # the reward model's per-item CTR is shrunk to the log's CTR by this many views
_THIN_SUPPORT = 100  # a slot's effective sample size below this is warned about (benchmarks/ope_accuracy.py)

Challenger = Callable[[Sequence[int | None], Sequence[np.ndarray]], Sequence[np.ndarray]]


class OPEError(ValueError):
    """The estimate cannot be made (no support, too few requests, unreadable input): not a bad estimate."""


@dataclass
class LoggedRequests:
    """Logged ``recommend`` answers usable for off-policy evaluation, one entry per request."""

    user_ids: list[int | None]
    candidates: list[np.ndarray]  # the ranked candidates' item ids
    served: list[np.ndarray]  # positions into ``candidates``, slot order
    propensities: list[np.ndarray]  # the logging policy's conditional probability per slot
    clicks: list[np.ndarray]  # 0/1 per slot

    def __len__(self) -> int:
        return len(self.served)


def logged_requests(answers: pd.DataFrame, clicked: np.ndarray) -> LoggedRequests:
    """The request log's rows (RECORD_SCHEMA's columns) as :class:`LoggedRequests`; ``clicked`` per
    served slot in :func:`recsys.request_records.served_slots` order."""
    out = LoggedRequests([], [], [], [], [])
    offset = 0
    for row in answers.itertuples(index=False):
        items = np.asarray(row.item_ids, dtype=np.int64)
        candidates = np.asarray(row.candidate_ids, dtype=np.int64)
        clicks = clicked[offset : offset + len(items)].astype(np.float64)
        offset += len(items)
        at = {int(item): p for p, item in enumerate(candidates)}
        missing = [int(i) for i in items if int(i) not in at]
        if missing:
            raise OPEError(f"candidate_ids: served items {missing[:5]} are not among the logged candidates")
        if len(row.propensities) != len(items):
            raise OPEError(
                f"propensities: {len(row.propensities)} for {len(items)} served items "
                f"(request {row.request_id})"
            )
        out.user_ids.append(None if pd.isna(row.user_id) else int(row.user_id))
        out.candidates.append(candidates)
        out.served.append(np.asarray([at[int(i)] for i in items], dtype=np.int64))
        out.propensities.append(np.asarray(row.propensities, dtype=np.float64))
        out.clicks.append(clicks)
    return out


def estimate(
    logs: LoggedRequests,
    challenger_scores: Sequence[np.ndarray],
    target: ExplorationConfig,
    confidence: float,
) -> dict[str, Any]:
    """IPS, SNIPS and DR estimates of the target policy's CTR (clicks per served slot, averaged over
    requests), the champion's on-policy CTR, and each one's interval at ``confidence``."""
    n = len(logs)
    if n < 2:
        raise OPEError(f"{n} logged request(s) with propensities: at least 2 are needed for an interval")
    if len(challenger_scores) != n:
        raise OPEError(f"the challenger scored {len(challenger_scores)} requests, the log has {n}")
    slots = _slot_terms(logs, challenger_scores, target)
    w, r, present = slots["w"], slots["r"], slots["present"]
    before = np.concatenate([np.ones((n, 1)), w[:, :-1]], axis=1)
    lengths = present.sum(axis=1)
    lists = lengths > 0
    w, r, q, expected, before = (a[lists] for a in (w, r, slots["q"], slots["expected"], before))
    present, lengths = present[lists], lengths[lists]
    depth = present.shape[1]
    on_i = (r * present).sum(axis=1) / lengths
    ips_i = (w * r * present).sum(axis=1) / lengths
    dr_i = ((w * (r - q) + before * expected) * present).sum(axis=1) / lengths
    # SNIPS: each slot's weights over their mean; its influence function gives the interval
    w_sum = (w * present).sum(axis=0)
    mean_w = w_sum / present.sum(axis=0)
    per_slot_snips = (w * r * present).sum(axis=0) / np.where(w_sum > 0, w_sum, 1.0)
    safe = np.where(mean_w > 0, mean_w, 1.0)
    snips_i = (w * r / safe * present).sum(axis=1) / lengths
    snips_psi = (w * (r - per_slot_snips) / safe * present).sum(axis=1) / lengths
    z = float(norm.ppf(0.5 + confidence / 2))
    champion = float(on_i.mean())
    report: dict[str, Any] = {
        "requests": int(lists.sum()),
        "slots": int(present.sum()),
        "confidence": confidence,
        "interval": INTERVAL_METHOD,
        "target_policy": target.model_dump(exclude={"seed"}),
        "champion": {"ctr": champion, **_interval(on_i, z, champion)},
        "estimates": {},
        # per slot, (sum w)^2 / sum w^2: how many logged requests the slot's estimate is worth
        "effective_sample_size": [
            float((w[present[:, k], k].sum() ** 2) / max((w[present[:, k], k] ** 2).sum(), 1e-300))
            for k in range(depth)
        ],
    }
    snips = float(snips_i.mean())
    terms = {"ips": (ips_i, ips_i), "snips": (snips_i, snips_psi + snips), "dr": (dr_i, dr_i)}
    per_slot = {
        "ips": (w * r * present).sum(axis=0) / present.sum(axis=0),
        "snips": per_slot_snips,
        "dr": ((w * (r - q) + before * expected) * present).sum(axis=0) / present.sum(axis=0),
    }
    for name in ESTIMATORS:
        values, spread = terms[name]
        point = float(values.mean())
        difference = _interval(spread - on_i, z, point - champion)
        report["estimates"][name] = {
            "ctr": point,
            **_interval(spread, z, point),
            "delta": point - champion,
            "delta_low": difference["low"],
            "delta_high": difference["high"],
            "per_slot": [float(v) for v in per_slot[name]],
        }
    return report


def _slot_terms(
    logs: LoggedRequests, challenger_scores: Sequence[np.ndarray], target: ExplorationConfig
) -> dict[str, np.ndarray]:
    """Per request and slot [n, depth]: the prefix weight ``w``, the click ``r``, the reward model's
    value of the served item ``q`` and its expectation under the target's next-slot distribution
    ``expected``; ``present``: the list has that slot. Lists of one shape are computed together."""
    n, depth = len(logs), max(len(s) for s in logs.served)
    out = {name: np.zeros((n, depth)) for name in ("w", "r", "q", "expected")}
    out["present"] = np.zeros((n, depth), dtype=bool)
    reward_model = _item_ctr(logs)
    deterministic = all(bool(np.all(p == 1.0)) for p in logs.propensities)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if len(challenger_scores[i]) != len(logs.candidates[i]):
            raise OPEError(
                f"request {i}: the challenger gave {len(challenger_scores[i])} scores "
                f"for {len(logs.candidates[i])} candidates"
            )
        if len(logs.served[i]):
            groups.setdefault((len(logs.candidates[i]), len(logs.served[i])), []).append(i)
    for (_, k), members in groups.items():
        for start in range(0, len(members), _BATCH):
            idx = np.asarray(members[start : start + _BATCH])
            served = np.stack([logs.served[i] for i in idx])
            candidates = np.stack([logs.candidates[i] for i in idx])
            scores = np.stack([np.asarray(challenger_scores[i], dtype=np.float64) for i in idx])
            pi, dists = prefix_probabilities(
                target.policy, scores, served, epsilon=target.epsilon, temperature=target.temperature
            )
            if deterministic and bool(np.any(pi < 1.0)):
                raise OPEError(
                    "propensities: 1.0 everywhere (served with serving.exploration.policy: none) and the "
                    "challenger would serve other items: the log has no support for it; serve the champion "
                    "with serving.exploration.policy epsilon_greedy or softmax first"
                )
            mu = np.stack([logs.propensities[i] for i in idx])
            q_all = reward_model(candidates.ravel()).reshape(candidates.shape)
            out["w"][idx, :k] = np.cumprod(pi / mu, axis=1)
            out["r"][idx, :k] = np.stack([logs.clicks[i] for i in idx])
            out["q"][idx, :k] = np.take_along_axis(q_all, served, axis=1)
            out["expected"][idx, :k] = np.einsum("bkm,bm->bk", dists, q_all)
            out["present"][idx, :k] = True
    return out


def _interval(values: np.ndarray, z: float, center: float) -> dict[str, float]:
    """``center`` +- z standard errors of the mean of the per-request terms ``values``."""
    half = z * float(values.std(ddof=1)) / float(np.sqrt(len(values)))
    return {"low": center - half, "high": center + half, "half_width": half}


def _item_ctr(logs: LoggedRequests) -> Callable[[np.ndarray], np.ndarray]:
    """The DR reward model: each item's logged CTR (any slot), shrunk toward the log's overall CTR."""
    items = np.concatenate([c[s] for c, s in zip(logs.candidates, logs.served, strict=True)])
    clicks = np.concatenate(logs.clicks)
    overall = float(clicks.mean()) if len(clicks) else 0.0
    table = pd.DataFrame({"item": items, "click": clicks}).groupby("item")["click"].agg(["sum", "count"])
    rates = (table["sum"] + _PRIOR_IMPRESSIONS * overall) / (table["count"] + _PRIOR_IMPRESSIONS)

    def model(item_ids: np.ndarray) -> np.ndarray:
        return rates.reindex(item_ids, fill_value=overall).to_numpy(dtype=np.float64)

    return model


# ---- the CLI's input ---------------------------------------------------------------------------


def load_logged(
    uri: str, events: pd.DataFrame, attribution_hours: float, since: datetime | None
) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """The request log's ``recommend`` answers by the model that carry propensities and candidates, the
    attributed click of every served slot, and how many rows were left out and why."""
    from recsys.request_records import attribute_clicks, read_request_log, served_slots

    answers = read_request_log(uri, since=since).to_pandas()
    answers = answers.loc[(answers["endpoint"] == "recommend") & (answers["source"] == "model")]
    no_propensities = answers["propensities"].isna()
    no_candidates = answers["candidate_ids"].isna() & ~no_propensities
    left_out = {
        "without_propensities": int(no_propensities.sum()),
        "without_candidates": int(no_candidates.sum()),
    }
    if len(answers) and bool((no_propensities | no_candidates).all()):
        if bool(no_propensities.all()):
            raise OPEError(
                f"{uri}: no logged answer has propensities (request log column 'propensities'): the log "
                "predates serving.exploration; serve with serving.exploration.policy "
                "epsilon_greedy or softmax"
            )
        raise OPEError(
            f"{uri}: no logged answer has candidate_ids: served with serving.exploration.policy: none "
            "(propensity 1 everywhere), so no other policy has support; serve with epsilon_greedy or softmax"
        )
    usable = answers.loc[~(no_propensities | no_candidates)].reset_index(drop=True)
    usable = usable.loc[usable["user_id"].notna()]
    # an answer whose attribution window the events do not reach yet would count unseen clicks as none
    settled = usable["time"] + pd.Timedelta(hours=attribution_hours) <= events["event_timestamp"].max()
    left_out["attribution_window_open"] = int((~settled).sum())
    usable = usable.loc[settled].reset_index(drop=True)
    slots = served_slots(usable[["user_id", "time", "item_ids"]])
    clicked = attribute_clicks(slots, events, attribution_hours)
    return usable, clicked, left_out


def _challenger(spec: str) -> Challenger:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise OPEError(f"--challenger: expected module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OPEError(f"--challenger {spec}: {exc}") from exc


def server_challenger(url: str, ranker: str | None = None) -> Challenger:
    """The challenger as the server at ``url`` ranks: its ``ranking`` endpoint's logits (``ranker``: the
    server's default when None)."""
    from recsys.ranking_client import ranking_scores

    def score(user_ids: Sequence[int | None], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return ranking_scores(url, user_ids, candidates, ranker)

    return score


def run(
    params_file: str | Path,
    challenger: Challenger,
    *,
    raw_dir: Path,
    output: Path,
    request_log_uri: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Estimate ``challenger``'s CTR from the request log's last ``monitor.window_hours`` and write it."""
    params = load_params(params_file)
    ope, serving, monitor = params.gate.ope, params.serving, params.monitor
    uri = request_log_uri or serving.request_log.uri
    events_file = Path(raw_dir) / "events.parquet"
    if not events_file.is_file():
        raise OPEError(f"{events_file}: the raw events (clicks) not found (--raw-dir)")
    events = pd.read_parquet(events_file, columns=["user_id", "item_id", "event_timestamp", "label"])
    now = now or datetime.now(UTC)
    answers, clicked, left_out = load_logged(
        uri, events, monitor.attribution_hours, now - timedelta(hours=monitor.window_hours)
    )
    if len(answers) < ope.min_requests:
        raise OPEError(
            f"{uri}: {len(answers)} logged requests with propensities and candidates, fewer than "
            f"gate.ope.min_requests {ope.min_requests}"
        )
    logs = logged_requests(answers, clicked)
    scores = challenger(logs.user_ids, logs.candidates)
    report = estimate(logs, scores, serving.exploration, ope.confidence)
    report |= {"request_log": uri, "left_out": left_out, "gate_metric": ope.metric}
    write_json(report, output)
    thin = [k for k, size in enumerate(report["effective_sample_size"]) if size < _THIN_SUPPORT]
    if thin:
        log.warning(
            "ope: slot(s) %s have an effective sample size under %d: the challenger is rarely what the "
            "champion served there; the intervals there are unreliable (more exploration or more log)",
            thin,
            _THIN_SUPPORT,
        )
    for name in ESTIMATORS:
        e = report["estimates"][name]
        log.info(
            "ope %-5s %.5f [%.5f, %.5f]  vs champion %+.5f", name, e["ctr"], e["low"], e["high"], e["delta"]
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.ope", description=__doc__)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="the project configuration file")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--challenger-bundle", type=Path, help="a bundle folder, served on loopback")
    which.add_argument("--challenger-url", help="a running model server (its ranking endpoint scores)")
    which.add_argument("--challenger", help="module:function scoring the logged candidates")
    parser.add_argument("--challenger-ranker", default=None, help="default: the challenger's default ranker")
    parser.add_argument(
        "--challenger-params", type=Path, default=None, help="its server's params (default: --params)"
    )
    parser.add_argument("--raw-dir", type=Path, default=layout.RAW_DIR, help=f"default: {layout.RAW_DIR}")
    parser.add_argument("--request-log", default=None, help="default: serving.request_log.uri")
    parser.add_argument("--output", type=Path, default=OPE_REPORT, help=f"default: {OPE_REPORT}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with ExitStack() as stack:
            if args.challenger:
                challenger = _challenger(args.challenger)
            else:
                url = args.challenger_url or stack.enter_context(
                    bundle_server(args.challenger_bundle, args.challenger_params or Path(args.params))
                )
                challenger = server_challenger(url, args.challenger_ranker)
            run(
                args.params,
                challenger,
                raw_dir=args.raw_dir,
                output=args.output,
                request_log_uri=args.request_log,
            )
    except (OPEError, RankingClientError) as exc:
        print(f"ope: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
