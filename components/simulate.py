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

``--days N`` runs the loop for N days in a built project folder (``--workdir``, default the current one:
``data/raw``, ``artifacts/bundle``, its Feast repo and params.yaml), each day (:func:`run_days`):

1. **serve**: the promote store's current version (``<workdir>/promoted``, a ``file://`` store written
   by ``python -m components.promote``; day 0 promotes the folder's bundle) as ``served`` and the day-0
   version as ``frozen``, each ``python -m serving`` on loopback (``--exploration`` sets the served
   one's ``serving.exploration``; its request log goes to ``<workdir>/artifacts/request_log``);
2. **log**: the day above, its feedback appended to ``data/raw`` tagged with the served version;
3. **retrain** (not after the last day): dvc.yaml's own commands for ``features``, ``training_set``,
   ``train``, ``evaluate``, ``export``, ``build_index`` and ``bundle``, run as subprocesses in the folder
   (ingest, validation and search are skipped: the raw data is the generated period plus the feedback);
4. **gate, promote, deploy**: ``python -m components.gate`` against the promote store; passed (or
   ``--always_promote``), ``python -m components.promote`` makes the new bundle current, and the next
   day's server is started on it (locally, deploying is restarting the loopback server on the store's
   current version: what the cluster's rollout reads too).

Other steps and the server run as subprocesses: a step never imports another (tests/test_layers.py).
benchmarks/feedback_loop.py runs this loop on the tiny preset and plots it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from recsys import artifact_layout as layout
from recsys.artifact_io import write_json, write_parquet, write_tables
from recsys.config import ConfigError, load_params
from recsys.contracts import RAW_COLUMNS, DataContractError, check_raw_table, read_raw_tables
from recsys.object_store import POINTER
from recsys.ranking_client import RankingClientError, bundle_server
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


def serving_params(params_file: Path, out: Path, **serving: Any) -> Path:
    """``params_file`` for a loopback server, written to ``out``: Feast's repo as an absolute path (the
    server runs from the checkout), a patient online-store timeout (a shared CI machine), and the
    ``serving`` section's keys given (a section's dict is merged into it)."""
    raw = yaml.safe_load(Path(params_file).read_text())
    raw["feast"]["repo_path"] = str((Path(params_file).parent / raw["feast"]["repo_path"]).resolve())
    raw["serving"]["feast_timeout_s"] = 10.0
    for key, value in serving.items():
        current = raw["serving"].get(key)
        raw["serving"][key] = current | value if isinstance(current, dict) else value
    Path(out).write_text(yaml.safe_dump(raw))
    return Path(out)


def first_day_start(events: pd.DataFrame) -> int:
    """The simulation's first day: midnight after the last event of the raw data."""
    last_s = int(events["event_timestamp"].max().timestamp())
    return (last_s // DAY_S + 1) * DAY_S


# ---- the multi-day loop ---------------------------------------------------------------------------

RETRAIN_STAGES = ("features", "training_set", "train", "evaluate", "export", "build_index", "bundle")
PROMOTE_STORE = "promoted"  # under the working folder: the loop's promote store (file://)
ROOT = Path(__file__).resolve().parents[1]


class LoopError(RuntimeError):
    """A step of the loop failed: names the step and ends with its output's tail."""


def stage_commands(
    stages: tuple[str, ...] = RETRAIN_STAGES, dvc_file: Path = ROOT / "dvc.yaml"
) -> list[list[str]]:
    """The ``cmd`` of each of dvc.yaml's ``stages``, as argv: the loop retrains as ``dvc repro`` would."""
    declared = yaml.safe_load(Path(dvc_file).read_text())["stages"]
    missing = [s for s in stages if s not in declared]
    if missing:
        raise LoopError(f"{dvc_file}: no stage(s) {missing}")
    return [shlex.split(str(declared[s]["cmd"])) for s in stages]


def run_step(argv: list[str], workdir: Path) -> str:
    """``python -m ...`` in ``workdir`` with this interpreter and the checkout importable; its stdout."""
    if argv[:2] != ["python", "-m"]:
        raise LoopError(f"{argv}: expected a 'python -m <module>' command")
    env = os.environ | {"PYTHONPATH": str(ROOT), "FEAST_USAGE": "False"}
    done = subprocess.run(
        [sys.executable, *argv[1:]], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise LoopError(
            f"{' '.join(argv)} exited with {done.returncode}: {(done.stdout + done.stderr)[-3000:]}"
        )
    return done.stdout


def promote(workdir: Path) -> tuple[str, Path]:
    """``python -m components.promote`` of the folder's bundle into the loop's store: its version, folder."""
    store = (workdir / PROMOTE_STORE).resolve()
    store.mkdir(exist_ok=True)
    run_step(["python", "-m", "components.promote", "--uri", store.as_uri()], workdir)
    version = str(json.loads((store / POINTER).read_text())["version"])
    return version, store / version


def run_days(
    workdir: Path,
    sim: World,
    days: int,
    traffic: Traffic,
    exploration: dict[str, Any] | None = None,
    always_promote: bool = False,
    on_day: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``days`` days of serve, log, retrain, gate, promote and deploy in the built project ``workdir``
    (module docstring); per day its served version, every policy's metrics and the gate's verdict."""
    workdir = Path(workdir).resolve()
    raw_dir = workdir / layout.RAW_DIR
    version, served = promote(workdir)
    frozen = served
    params = {
        name: serving_params(workdir / "params.yaml", workdir / f"serving-{name}.yaml", exploration=changes)
        for name, changes in (("served", exploration or {}), ("frozen", {}))
    }
    start = first_day_start(read_raw_tables(raw_dir)["events"])
    out = []
    for day in range(days):
        with (
            bundle_server(
                served, params["served"], request_log=str(workdir / "artifacts" / "request_log")
            ) as url,
            bundle_server(frozen, params["frozen"]) as frozen_url,
        ):
            today = replace(traffic, day_start_s=start + day * DAY_S)
            result = run_day(sim, raw_dir, raw_dir, {"served": url, "frozen": frozen_url}, today)
        row: dict[str, Any] = {"day": day, "served_version": version, "metrics": result.metrics}
        if result.versions["served"] != version:
            raise LoopError(f"day {day}: answered by {result.versions['served']!r}, {version!r} was deployed")
        if day < days - 1:
            for argv in stage_commands():
                run_step(argv, workdir)
            store = (workdir / PROMOTE_STORE).resolve().as_uri()
            run_step(["python", "-m", "components.gate", "--deployed-bundle", store], workdir)
            decision = json.loads((workdir / layout.GATE_DECISION).read_text())
            row["gate_passed"] = bool(decision["passed"])
            row["promoted"] = row["gate_passed"] or always_promote
            if row["promoted"]:
                version, served = promote(workdir)
            row["next_version"] = version
        out.append(row)
        if on_day is not None:
            on_day(row)
    return out


def _log_metrics(metrics: dict[str, dict[str, float]], prefix: str = "") -> None:
    for name, m in metrics.items():
        log.info(
            "simulate: %s%-8s ctr=%.4f coverage=%.3f gini=%.3f top10=%.3f",
            prefix,
            name,
            m["ctr"],
            m["coverage"],
            m["gini"],
            m["top10_share"],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", default=None, help="the project configuration (default: <workdir>/params.yaml)"
    )
    parser.add_argument("--preset", default=None, help="override data.synthetic.preset (e.g. tiny)")
    parser.add_argument(
        "--raw_dir", type=Path, default=Path("data/raw"), help="the raw tables the day starts from"
    )
    parser.add_argument(
        "--out_raw_dir",
        type=Path,
        default=None,
        help="one day: where the raw tables with the day's feedback appended go (may equal --raw_dir)",
    )
    parser.add_argument("--url", default=None, help="one day: the running server answering as 'served'")
    parser.add_argument("--frozen_url", default=None, help="a server that is never retrained ('frozen')")
    parser.add_argument("--requests", type=int, default=2000, help="arrivals in the day (default 2000)")
    parser.add_argument("--list_size", type=int, default=10, help="items served per request (default 10)")
    parser.add_argument(
        "--day", type=int, default=0, help="day index after the raw data's last day (default 0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals and click draws (default 0)")
    parser.add_argument("--report", type=Path, default=None, help="the day's (or days') metrics as JSON")
    loop = parser.add_argument_group("the loop (--days N: serve, log, retrain, gate, promote, deploy)")
    loop.add_argument("--days", type=int, default=None, help="run the loop for this many days")
    loop.add_argument("--workdir", type=Path, default=Path("."), help="the built project folder (default .)")
    loop.add_argument("--exploration", default=None, help="the served server's serving.exploration.policy")
    loop.add_argument("--epsilon", type=float, default=None, help="its serving.exploration.epsilon")
    loop.add_argument("--always_promote", action="store_true", help="promote every retrain, gate or not")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.days is None and (args.url is None or args.out_raw_dir is None):
            raise ConfigError("--url and --out_raw_dir: both needed for one day (or --days N for the loop)")
        if args.days is not None and args.days < 1:
            raise ConfigError(f"--days: at least 1, got {args.days}")
        params_file = args.params or (args.workdir / "params.yaml" if args.days else "params.yaml")
        overrides = {"data.synthetic.preset": args.preset} if args.preset else None
        params = load_params(params_file, overrides=overrides)
        if params.data.source != "synthetic":
            raise ConfigError(
                f"data.source: the simulator needs the synthetic source, not {params.data.source!r}"
            )
        sim = world(params.data.synthetic, params.seed)
        if args.days is not None:
            exploration = {"policy": args.exploration} if args.exploration else {}
            exploration |= {"epsilon": args.epsilon} if args.epsilon is not None else {}
            traffic = Traffic(0, args.requests, args.list_size, args.seed)
            rows = run_days(
                args.workdir,
                sim,
                args.days,
                traffic,
                exploration,
                args.always_promote,
                on_day=lambda row: _log_metrics(row["metrics"], f"day {row['day']} "),
            )
            if args.report:
                write_json({"days": rows}, args.report)
            return 0
        start = first_day_start(read_raw_tables(args.raw_dir)["events"]) + args.day * DAY_S
        urls = {"served": args.url} | ({"frozen": args.frozen_url} if args.frozen_url else {})
        traffic = Traffic(start, args.requests, args.list_size, args.seed)
        day = run_day(sim, args.raw_dir, args.out_raw_dir, urls, traffic)
    except (ConfigError, DataContractError, LoopError, RankingClientError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    _log_metrics(day.metrics)
    if args.report:
        write_json({"day": args.day, "versions": day.versions, "metrics": day.metrics}, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
