"""Feedback simulator for the synthetic source: one simulated day of traffic answered by the generator's
own click model, with the served model compared to baselines on the same users and the same draws.

A day (:func:`simulate_day`):

- **arrivals**: ``requests`` users drawn with replacement, each with probability proportional to their
  activity in the generated period (``n_events``, as the generator spreads its events), among users who
  have signed up; request ``r`` arrives at ``day start + r * (86400 // requests)`` seconds;
- **policies**: each arrival is answered by every policy with a list of ``list_size`` items:
  ``served`` (the running server's ``recommend``, over HTTP), ``frozen`` (a second server that is never
  retrained; ``--frozen_url``), ``popular`` (the most clicked items of the raw events the day starts
  from), ``random`` (uniform among the items that exist) and ``oracle`` (each user's top items by the
  true click probability: the ceiling);
- **clicks**: slot ``k`` (0-based) is examined with probability ``1 / log2(k + 2)`` (the DCG position
  bias) and an examined item is clicked with the generator's probability
  (:meth:`sources.synthetic.World.click_probability`: taste, sequence, price, hidden quality,
  popularity), given the user's last three clicked categories as of the day's start. The uniform draws
  are per (request, slot) and shared by every policy (common random numbers), so a difference between
  policies is theirs, not the dice's;
- **feedback**: the ``served`` policy's impressions and clicks are appended to a copy of the raw tables
  (``--out_raw_dir``: ``users``, ``items``, ``events`` in the raw contract, so the next run of the
  features/training steps trains on them) and to a side table ``feedback.parquet`` that tags each row
  with the ``bundle_version`` that served it, the request id and the slot. Only the served policy's
  traffic is logged: the others are counterfactual arms, scored and not recorded.

Per policy the day reports CTR (clicks / impressions), the expected CTR (mean true click probability
times examination, free of the click noise), catalogue coverage (share of the existing items served at
least once) and concentration (Gini of impressions over the existing items, share of impressions on the
10% most-shown items).

The multi-day loop (serve, log, retrain, bundle, restart) drives servers and other steps, which a step
may not import (tests/test_layers.py): it is benchmarks/feedback_loop.py, built on :func:`simulate_day`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.artifact_io import write_json, write_parquet, write_tables
from recsys.config import ConfigError, load_params
from recsys.contracts import RAW_COLUMNS, DataContractError, check_raw_table, read_raw_tables
from sources.synthetic import DAY_S, HISTORY_DEPTH, SECOND_NS, World, world

log = logging.getLogger(__name__)

FEEDBACK_TABLE = "feedback.parquet"
Policy = Callable[[np.ndarray], tuple[np.ndarray, str]]  # user ids -> ([n, list_size] item ids, version)


def examination(list_size: int) -> np.ndarray:
    """The position bias: the probability that slot ``k`` (0-based) is looked at, ``1 / log2(k + 2)``."""
    return 1.0 / np.log2(np.arange(list_size) + 2.0)


@dataclass(frozen=True)
class Traffic:
    """A day's traffic: when it starts, how many arrivals, how long the lists, which random draws."""

    day_start_s: int
    requests: int = 2000
    list_size: int = 10
    seed: int = 0


@dataclass
class Day:
    """One simulated day: the arrivals, every policy's lists, clicks and metrics."""

    user_ids: np.ndarray  # [R]
    times_s: np.ndarray  # [R] arrival (unix seconds)
    lists: dict[str, np.ndarray]  # policy -> [R, L] item ids (0: an empty slot)
    clicks: dict[str, np.ndarray]  # policy -> [R, L] bool
    metrics: dict[str, dict[str, float]]  # policy -> metric -> value
    versions: dict[str, str]  # policy -> bundle version (or the policy's name)


def recent_clicked_categories(events: pd.DataFrame, sim: World, n_users: int) -> np.ndarray:
    """[n_users + 1, HISTORY_DEPTH] each user's last clicked categories (most recent first, -1: none), from
    ``events``; row ``user_id`` is that user's (row 0 unused)."""
    clicks = events.loc[events["label"] == 1, ["user_id", "item_id", "event_timestamp"]]
    clicks = clicks.sort_values(["user_id", "event_timestamp"], kind="stable")
    last = clicks.groupby("user_id", sort=False).tail(HISTORY_DEPTH)
    recent = np.full((n_users + 1, HISTORY_DEPTH), -1, dtype=np.int64)
    users = last["user_id"].to_numpy()
    category = sim.item_category(last["item_id"].to_numpy())
    # position from the end within each user's block: 0 = the latest click
    rank = last.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    recent[users, rank] = category
    return recent


def arrivals(sim: World, n: int, day_start_s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` arriving users (activity-weighted, among those signed up by the day's start) and their times."""
    spacing = DAY_S // n
    weight = sim.activity().astype(np.float64) * (sim.users.first_event_s <= day_start_s)
    users = rng.choice(len(weight), size=n, p=weight / weight.sum()) + 1
    return users.astype(np.int64), day_start_s + np.arange(n, dtype=np.int64) * spacing


def popular_policy(events: pd.DataFrame, existing: np.ndarray, list_size: int) -> Policy:
    """The ``list_size`` most clicked items of ``events`` that exist, for everyone."""
    clicks = events.loc[events["label"] == 1, "item_id"].value_counts()
    known = set(existing.tolist())
    top = [int(i) for i in clicks.index if i in known][:list_size]
    top = np.asarray(top + [0] * (list_size - len(top)), dtype=np.int64)
    return lambda users: (np.tile(top, (len(users), 1)), "popular")


def random_policy(existing: np.ndarray, list_size: int, rng: np.random.Generator) -> Policy:
    """``list_size`` distinct existing items uniformly at random per request."""

    def serve(users: np.ndarray) -> tuple[np.ndarray, str]:
        keys = rng.random((len(users), len(existing)))
        return existing[np.argsort(keys, axis=1)[:, :list_size]], "random"

    return serve


def oracle_policy(sim: World, existing: np.ndarray, recent: np.ndarray, list_size: int) -> Policy:
    """Each user's ``list_size`` existing items of the highest true click probability: the ceiling."""

    def serve(users: np.ndarray) -> tuple[np.ndarray, str]:
        n, m = len(users), len(existing)
        p = sim.click_probability(
            np.repeat(users, m), np.tile(existing, n), np.repeat(recent[users], m, axis=0)
        ).reshape(n, m)
        return existing[np.argsort(-p, axis=1, kind="stable")[:, :list_size]], "oracle"

    return serve


def server_policy(url: str, list_size: int, batch: int = 64, timeout_s: float = 60.0) -> Policy:
    """The running server's ``recommend`` (V1, ``batch`` users per request) at ``url``."""
    import httpx

    def serve(users: np.ndarray) -> tuple[np.ndarray, str]:
        out = np.zeros((len(users), list_size), dtype=np.int64)
        versions: set[str] = set()
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            for lo in range(0, len(users), batch):
                instances = [{"user_id": int(u), "n": list_size} for u in users[lo : lo + batch]]
                answer = http.post("/v1/models/recommend:predict", json={"instances": instances})
                answer.raise_for_status()
                for i, prediction in enumerate(answer.json()["predictions"]):
                    items = prediction["item_ids"][:list_size]
                    out[lo + i, : len(items)] = items
                    versions.add(prediction.get("bundle_version", ""))
        return out, ",".join(sorted(versions))

    return serve


def concentration(impressions: np.ndarray, existing: np.ndarray) -> dict[str, float]:
    """Coverage, Gini and top-10% share of the impression counts over the ``existing`` items."""
    served = impressions[impressions > 0]
    counts = pd.Series(served).value_counts().reindex(existing, fill_value=0).to_numpy(dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {"coverage": 0.0, "gini": 0.0, "top10_share": 0.0}
    ordered = np.sort(counts)
    n = len(ordered)
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ ordered / (n * total))
    top = max(1, int(np.ceil(0.1 * n)))
    return {
        "coverage": float((counts > 0).mean()),
        "gini": gini,
        "top10_share": float(ordered[-top:].sum() / total),
    }


def simulate_day(
    sim: World,
    events: pd.DataFrame,
    items: pd.DataFrame,
    policies: dict[str, Policy],
    traffic: Traffic,
) -> Day:
    """One day of ``traffic.requests`` arrivals answered by every policy, with clicks from the click
    model; every policy's users start the day from the same click history (that of ``events``)."""
    requests, list_size = traffic.requests, traffic.list_size
    rng = np.random.default_rng([traffic.seed, traffic.day_start_s])
    users, times = arrivals(sim, requests, traffic.day_start_s, rng)
    history = recent_clicked_categories(events, sim, len(sim.activity()))[users]
    examine_draw = rng.random((requests, list_size))
    click_draw = rng.random((requests, list_size))
    exam = examination(list_size)
    existing = existing_items(items, traffic.day_start_s)
    lists, clicks, metrics, versions = {}, {}, {}, {}
    for name, policy in policies.items():
        served, versions[name] = policy(users)
        flat = served.reshape(-1)
        p = sim.click_probability(
            np.repeat(users, list_size), np.maximum(flat, 1), np.repeat(history, list_size, axis=0)
        ).reshape(served.shape) * (served > 0)
        clicked = (examine_draw < exam) & (click_draw < p)
        shown = served > 0
        lists[name], clicks[name] = served, clicked
        metrics[name] = {
            "ctr": float(clicked.sum() / max(shown.sum(), 1)),
            "expected_ctr": float((p * exam).sum() / max(shown.sum(), 1)),
            "clicks_per_request": float(clicked.sum() / requests),
            **concentration(flat, existing),
        }
    return Day(users, times, lists, clicks, metrics, versions)


def existing_items(items: pd.DataFrame, at_s: int) -> np.ndarray:
    """Ids of the items created before ``at_s``."""
    created = items["created_timestamp"].astype("int64") // SECOND_NS
    return items.loc[created.to_numpy() < at_s, "item_id"].to_numpy(dtype=np.int64)


def feedback_events(day: Day, policy: str = "served") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``policy``'s impressions and clicks as raw ``events`` rows and as the side table (with the bundle
    version, request id and slot). Slot ``k`` of a request is logged ``k`` seconds after its arrival, so
    event times stay unique per user (the raw contract's ordering)."""
    served, clicked = day.lists[policy], day.clicks[policy]
    request, slot = np.nonzero(served > 0)
    label = clicked[request, slot].astype(np.int64)
    ts = pd.to_datetime((day.times_s[request] + slot) * SECOND_NS, utc=True)
    events = pd.DataFrame(
        {
            "user_id": day.user_ids[request],
            "item_id": served[request, slot],
            "event_timestamp": ts,
            "label": label,
            "event_type": np.where(label == 1, "click", "impression").astype(object),
        }
    )
    side = events.assign(
        bundle_version=day.versions[policy], request=request.astype(np.int64), slot=slot.astype(np.int64)
    )
    return events, side


def append_feedback(raw_dir: Path, out_raw_dir: Path, day: Day, policy: str = "served") -> pd.DataFrame:
    """The raw tables of ``raw_dir`` with ``policy``'s feedback appended, written to ``out_raw_dir``
    (checked against the raw contract first), with the tagged rows added to its ``feedback.parquet``."""
    tables = read_raw_tables(raw_dir)
    new_events, side = feedback_events(day, policy)
    tables["events"] = pd.concat([tables["events"], new_events], ignore_index=True)[
        list(RAW_COLUMNS["events"])
    ]
    for name, table in tables.items():
        check_raw_table(name, table, out_raw_dir / f"{name}.parquet")
    if (Path(raw_dir) / FEEDBACK_TABLE).exists():  # the earlier days' feedback
        side = pd.concat([pd.read_parquet(Path(raw_dir) / FEEDBACK_TABLE), side], ignore_index=True)
    out_raw_dir.mkdir(parents=True, exist_ok=True)
    write_tables(tables, out_raw_dir)
    write_parquet(side, out_raw_dir / FEEDBACK_TABLE)
    return side


def run_day(
    sim: World,
    raw_dir: Path,
    out_raw_dir: Path,
    urls: dict[str, str],
    traffic: Traffic,
) -> Day:
    """A day from the raw tables of ``raw_dir``: the servers at ``urls`` (policy name -> base URL; the one
    named ``served`` is logged) and the popular, random and oracle baselines answer the same arrivals;
    the served feedback is appended into ``out_raw_dir`` (:func:`append_feedback`)."""
    raw = read_raw_tables(raw_dir)
    n = traffic.list_size
    existing = existing_items(raw["items"], traffic.day_start_s)
    recent = recent_clicked_categories(raw["events"], sim, len(sim.activity()))
    rng = np.random.default_rng([traffic.seed, traffic.day_start_s, 1])
    policies = {name: server_policy(url, n) for name, url in urls.items()}
    policies |= {
        "popular": popular_policy(raw["events"], existing, n),
        "random": random_policy(existing, n, rng),
        "oracle": oracle_policy(sim, existing, recent, n),
    }
    day = simulate_day(sim, raw["events"], raw["items"], policies, traffic)
    append_feedback(Path(raw_dir), Path(out_raw_dir), day)
    return day


def first_day_start(events: pd.DataFrame) -> int:
    """The simulation's first day: midnight after the last event of the raw data."""
    last_s = int(events["event_timestamp"].max().timestamp())
    return (last_s // DAY_S + 1) * DAY_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", default="params.yaml", help="the project configuration (data.synthetic, seed)"
    )
    parser.add_argument("--preset", default=None, help="override data.synthetic.preset (e.g. tiny)")
    parser.add_argument(
        "--raw_dir", type=Path, default=Path("data/raw"), help="the raw tables the day starts from"
    )
    parser.add_argument(
        "--out_raw_dir",
        type=Path,
        required=True,
        help="where the raw tables with the day's feedback appended go (may equal --raw_dir)",
    )
    parser.add_argument("--url", required=True, help="the running server answering as 'served'")
    parser.add_argument("--frozen_url", default=None, help="a server that is never retrained ('frozen')")
    parser.add_argument("--requests", type=int, default=2000, help="arrivals in the day (default 2000)")
    parser.add_argument("--list_size", type=int, default=10, help="items served per request (default 10)")
    parser.add_argument(
        "--day", type=int, default=0, help="day index after the raw data's last day (default 0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals and click draws (default 0)")
    parser.add_argument("--report", type=Path, default=None, help="the day's metrics as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        overrides = {"data.synthetic.preset": args.preset} if args.preset else None
        params = load_params(args.params, overrides=overrides)
        if params.data.source != "synthetic":
            raise ConfigError(
                f"data.source: the simulator needs the synthetic source, not {params.data.source!r}"
            )
        sim = world(params.data.synthetic, params.seed)
        start = first_day_start(read_raw_tables(args.raw_dir)["events"]) + args.day * DAY_S
        urls = {"served": args.url} | ({"frozen": args.frozen_url} if args.frozen_url else {})
        traffic = Traffic(start, args.requests, args.list_size, args.seed)
        day = run_day(sim, args.raw_dir, args.out_raw_dir, urls, traffic)
    except (ConfigError, DataContractError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    report = {"day": args.day, "versions": day.versions, "metrics": day.metrics}
    for name, m in day.metrics.items():
        log.info(
            "simulate: %-8s ctr=%.4f coverage=%.3f gini=%.3f top10=%.3f",
            name,
            m["ctr"],
            m["coverage"],
            m["gini"],
            m["top10_share"],
        )
    if args.report:
        write_json(report, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
