"""The feedback simulator (components/simulate.py): its click model is the generator's, its feedback is
raw data tagged with the serving bundle, and a day ranks policies by what the planted structure says."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components import simulate
from recsys.contracts import read_raw_tables
from sources import synthetic


@pytest.fixture(scope="module")
def sim(tiny_params):
    return synthetic.world(tiny_params.data.synthetic, tiny_params.seed)


def test_world_is_the_generators(sim, tiny_params):
    tables = synthetic.generate(tiny_params.data.synthetic, tiny_params.seed)
    pd.testing.assert_frame_equal(sim.user_table, tables["users"])
    pd.testing.assert_frame_equal(sim.item_table, tables["items"])


def _replayed_probabilities(sim, events: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each generated event's click probability, from the user's last clicked categories before it."""
    events = events.sort_values(["user_id", "event_timestamp"], kind="stable")
    category = sim.item_category(events["item_id"].to_numpy())
    recent = np.full((len(events), synthetic.HISTORY_DEPTH), -1, dtype=np.int64)
    state: dict[int, list[int]] = {}
    for i, (user, label) in enumerate(
        zip(events["user_id"].to_numpy(), events["label"].to_numpy(), strict=True)
    ):
        last = state.setdefault(int(user), [-1] * synthetic.HISTORY_DEPTH)
        recent[i] = last
        if label == 1:
            state[int(user)] = [int(category[i]), *last[:-1]]
    p = sim.click_probability(events["user_id"].to_numpy(), events["item_id"].to_numpy(), recent)
    return p, events["label"].to_numpy()


def test_click_model_is_the_one_the_labels_were_drawn_from(sim, tiny_raw):
    """Replayed over the generated events (same user, item and click history), the simulator's
    probabilities are calibrated against the generator's labels, overall and per decile."""
    p, label = _replayed_probabilities(sim, tiny_raw["events"])
    se = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(p.mean() - label.mean()) < 4 * se
    bins = np.quantile(p, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 9)
    for b in range(10):
        sel = which == b
        gap = abs(p[sel].mean() - label[sel].mean())
        assert gap < 4 * np.sqrt(p[sel].mean() * (1 - p[sel].mean()) / sel.sum()) + 0.01, b
    # and the probabilities carry signal: a shuffled pairing is worse
    assert np.corrcoef(p, label)[0, 1] > 0.15


def _quality_policy(sim, existing, list_size):
    top = existing[np.argsort(-sim.items.quality[existing], kind="stable")[:list_size]]
    return lambda users: (np.tile(top, (len(users), 1)), "quality")


def _day(sim, raw, policies=None, requests=1500, list_size=10, seed=3):
    start = simulate.first_day_start(raw["events"])
    existing = simulate.existing_items(raw["items"], start)
    recent = simulate.recent_clicked_categories(raw["events"], sim, len(sim.activity()))
    rng = np.random.default_rng(0)
    policies = policies or {
        "random": simulate.random_policy(existing, list_size, rng),
        "popular": simulate.popular_policy(raw["events"], existing, list_size),
        "quality": _quality_policy(sim, existing, list_size),
        "oracle": simulate.oracle_policy(sim, existing, recent, list_size),
    }
    traffic = simulate.Traffic(start, requests, list_size, seed)
    return simulate.simulate_day(sim, raw["events"], raw["items"], policies, traffic)


def test_planted_quality_and_the_oracle_beat_random(sim, tiny_raw):
    day = _day(sim, tiny_raw)
    m = day.metrics
    assert m["quality"]["expected_ctr"] > 1.3 * m["random"]["expected_ctr"]
    assert m["oracle"]["expected_ctr"] > m["quality"]["expected_ctr"]
    assert m["oracle"]["ctr"] > m["random"]["ctr"]
    # concentration: one list for everyone covers a sliver; random covers the catalogue
    assert m["popular"]["coverage"] < 0.1 and m["popular"]["top10_share"] == pytest.approx(1.0)
    assert m["random"]["coverage"] > 0.9 and m["random"]["gini"] < 0.3
    # every policy answered the same users with the same click draws
    assert {name: lists.shape for name, lists in day.lists.items()} == dict.fromkeys(day.lists, (1500, 10))


def test_position_bias_and_common_draws(sim, tiny_raw):
    """The same list at the top and the bottom of the page: fewer clicks below (examination), and two
    identical policies get identical clicks (the draws are shared)."""
    exam = simulate.examination(10)
    assert exam[0] == 1.0 and np.all(np.diff(exam) < 0)
    existing = simulate.existing_items(tiny_raw["items"], simulate.first_day_start(tiny_raw["events"]))
    same = _quality_policy(sim, existing, 10)
    day = _day(sim, tiny_raw, {"a": same, "b": same}, requests=500)
    np.testing.assert_array_equal(day.clicks["a"], day.clicks["b"])
    assert day.clicks["a"][:, 0].mean() > day.clicks["a"][:, -1].mean()


def test_feedback_is_raw_data_tagged_with_the_bundle(sim, tiny_raw_dir, tiny_raw, tmp_path):
    existing = simulate.existing_items(tiny_raw["items"], simulate.first_day_start(tiny_raw["events"]))
    quality = _quality_policy(sim, existing, 10)

    def served(users):
        return quality(users)[0], "v-test-1"

    day = _day(sim, tiny_raw, {"served": served}, requests=300)
    out = tmp_path / "raw"
    side = simulate.append_feedback(tiny_raw_dir, out, day)
    tables = read_raw_tables(out)  # the raw contract, checked on read as the features step does
    assert len(tables["events"]) == len(tiny_raw["events"]) + 300 * 10
    assert (side["bundle_version"] == "v-test-1").all() and len(side) == 3000
    assert side["label"].sum() == day.clicks["served"].sum()
    assert not tables["events"].duplicated(["user_id", "event_timestamp"]).any()
    assert tables["events"]["event_timestamp"].max() > tiny_raw["events"]["event_timestamp"].max()
    # a second day appends to the first's side table
    day2 = _day(sim, tables, {"served": served}, requests=100, seed=4)
    assert len(simulate.append_feedback(out, out, day2)) == 3000 + 100 * 10


@pytest.mark.slow
def test_a_day_against_a_real_server(tiny_pipeline, tiny_params, tmp_path):
    """``python -m components.simulate`` against ``python -m serving`` on loopback: every policy scored on
    the same users, the served one's feedback logged with the bundle's version."""
    import yaml

    from serving.local_server import free_port, start_server, stop_server

    raw = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    raw["data"]["synthetic"]["preset"] = "tiny"
    raw["feast"]["repo_path"] = str(tiny_pipeline / "feature_repo")
    raw["serving"]["feast_timeout_s"] = 10.0
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    bundle = tiny_pipeline / "artifacts" / "bundle"
    port = free_port()
    process = start_server(bundle, params_file, port)
    try:
        rc = simulate.main(
            [
                "--params",
                str(params_file),
                "--raw_dir",
                str(tiny_pipeline / "data" / "raw"),
                "--out_raw_dir",
                str(tmp_path / "raw"),
                "--url",
                f"http://127.0.0.1:{port}",
                "--frozen_url",
                f"http://127.0.0.1:{port}",
                "--requests",
                "300",
                "--report",
                str(tmp_path / "day.json"),
            ]
        )
    finally:
        stop_server(process)
    assert rc == 0
    report = json.loads((tmp_path / "day.json").read_text())
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    assert report["versions"]["served"] == version
    assert set(report["metrics"]) == {"served", "frozen", "popular", "random", "oracle"}
    for m in report["metrics"].values():
        assert 0 <= m["ctr"] <= 1 and 0 < m["coverage"] <= 1
    assert report["metrics"]["served"] == report["metrics"]["frozen"]  # the same server, the same draws
    assert report["metrics"]["served"]["expected_ctr"] > report["metrics"]["random"]["expected_ctr"]
    side = pd.read_parquet(tmp_path / "raw" / simulate.FEEDBACK_TABLE)
    assert (side["bundle_version"] == version).all() and len(side) == 300 * 10
