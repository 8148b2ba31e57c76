"""``python -m components.simulate --days N``: the loop (serve, log, retrain, gate, promote, deploy) on the
tiny preset, with the real steps as subprocesses and ``python -m serving`` on loopback."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from components import simulate
from recsys import artifact_layout as layout


def test_the_retrain_commands_are_dvc_yamls():
    commands = simulate.stage_commands()
    declared = yaml.safe_load((simulate.ROOT / "dvc.yaml").read_text())["stages"]
    assert [" ".join(c) for c in commands] == [declared[s]["cmd"] for s in simulate.RETRAIN_STAGES]
    with pytest.raises(simulate.LoopError, match=r"no stage\(s\) \['nope'\]"):
        simulate.stage_commands(("features", "nope"))


def test_the_cli_names_what_a_single_day_lacks(capsys):
    assert simulate.main(["--url", "http://127.0.0.1:1"]) == 1
    assert "--url and --out_raw_dir" in capsys.readouterr().err
    assert simulate.main(["--days", "0"]) == 1
    assert "--days: at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_two_days_serve_the_retrained_bundle_on_the_second(tiny_pipeline, tmp_path):
    work = tmp_path / "project"
    shutil.copytree(tiny_pipeline, work)
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["data"]["synthetic"]["preset"] = "tiny"
    raw["training"]["epochs"] = 1
    raw["index"]["tune_queries"] = 200
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    first = json.loads((work / layout.BUNDLE_DIR / "manifest.json").read_text())["version"]
    events_before = len(pd.read_parquet(work / layout.RAW_DIR / "events.parquet"))
    report = tmp_path / "loop.json"
    argv = ["--workdir", str(work), "--days", "2", "--requests", "100", "--list_size", "5"]
    assert simulate.main([*argv, "--always_promote", "--report", str(report)]) == 0
    days = json.loads(report.read_text())["days"]
    assert [d["day"] for d in days] == [0, 1]
    assert days[0]["served_version"] == first and days[0]["promoted"] is True
    second = days[0]["next_version"]
    assert second != first and days[1]["served_version"] == second  # the retrained bundle serves day 1
    assert "gate_passed" in days[0] and "gate_passed" not in days[1]  # no retrain after the last day
    pointer = json.loads((work / simulate.PROMOTE_STORE / "current.json").read_text())
    assert pointer["version"] == second
    side = pd.read_parquet(work / layout.RAW_DIR / simulate.FEEDBACK_TABLE)
    per_day = side.groupby("bundle_version").size().to_dict()
    assert per_day == {first: 100 * 5, second: 100 * 5}  # every served slot, tagged with who served it
    day_of = pd.to_datetime(side["event_timestamp"]).dt.floor("D")
    assert (side.loc[day_of == day_of.min(), "bundle_version"] == first).all()
    assert (side.loc[day_of == day_of.max(), "bundle_version"] == second).all()
    assert len(pd.read_parquet(work / layout.RAW_DIR / "events.parquet")) == events_before + 2 * 500
    for d in days:  # the frozen day-0 model and the baselines were scored on the same arrivals
        assert set(d["metrics"]) == {"served", "frozen", "popular", "random", "oracle"}
    assert days[0]["metrics"]["served"] == days[0]["metrics"]["frozen"]  # day 0: the same bundle
