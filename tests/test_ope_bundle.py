"""``python -m components.ope --challenger-bundle``: a bundle's ranker scores the champion's logged
candidates through ``python -m serving``'s ranking endpoint, so its scores are the ones serving samples
with. The check: the champion's own bundle and ranker as the challenger gives prefix weights of exactly 1
(its recomputed softmax probabilities are the logged propensities), hence IPS = the on-policy CTR."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from components import ope
from recsys.request_records import read_request_log


@pytest.mark.slow
def test_a_bundle_challenger_is_scored_as_serving_scores(tiny_pipeline, tmp_path):
    from serving.local_server import free_port, start_server, stop_server

    raw = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    raw["data"]["synthetic"]["preset"] = "tiny"
    raw["feast"]["repo_path"] = str(tiny_pipeline / "feature_repo")
    raw["serving"]["feast_timeout_s"] = 10.0
    raw["serving"]["exploration"] = {"policy": "softmax", "epsilon": 0.1, "temperature": 1.0, "seed": 0}
    raw["gate"]["ope"]["min_requests"] = 50
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    bundle = tiny_pipeline / "artifacts" / "bundle"
    events = pd.read_parquet(tiny_pipeline / "data" / "raw" / "events.parquet")
    users = events["user_id"].drop_duplicates().to_numpy()[:120]
    log_dir = tmp_path / "log"
    port = free_port()
    process = start_server(bundle, params_file, port, extra=["--request_log", str(log_dir)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for lo in range(0, len(users), 40):
                instances = [{"user_id": int(u), "n": 5} for u in users[lo : lo + 40]]
                http.post("/v1/models/recommend:predict", json={"instances": instances}).raise_for_status()
    finally:
        stop_server(process)  # flushes the request log
    logged = read_request_log(str(log_dir)).to_pandas()
    served = logged.loc[logged["source"] == "model"]
    assert len(served) >= 50 and served["candidate_ids"].notna().all()
    # clicks: every answer's first item, a minute later; one event far on closes the attribution window
    now = datetime.now(UTC)
    minute = now + timedelta(minutes=1)
    clicks = [(int(r.user_id), int(r.item_ids[0]), minute, 1) for r in served.itertuples()]
    clicks.append((int(users[0]), 1, now + timedelta(hours=raw["monitor"]["attribution_hours"] + 1), 0))
    (tmp_path / "raw").mkdir()
    columns = ["user_id", "item_id", "event_timestamp", "label"]
    pd.DataFrame(clicks, columns=columns).to_parquet(tmp_path / "raw" / "events.parquet")
    common = ["--params", str(params_file), "--request-log", str(log_dir), "--raw-dir", str(tmp_path / "raw")]

    def estimate(ranker: str) -> dict:
        out = tmp_path / f"ope-{ranker}.json"
        argv = [*common, "--challenger-bundle", str(bundle), "--challenger-ranker", ranker]
        assert ope.main([*argv, "--output", str(out)]) == 0
        return json.loads(out.read_text())

    same = estimate(raw["serving"]["default_ranker"])
    assert same["requests"] == len(served)
    assert same["champion"]["ctr"] == pytest.approx(0.2)  # one click in five slots
    assert same["estimates"]["ips"]["ctr"] == pytest.approx(same["champion"]["ctr"], abs=1e-6)
    assert same["effective_sample_size"] == pytest.approx([len(served)] * 5, rel=1e-6)
    other = estimate("dlrm" if raw["serving"]["default_ranker"] != "dlrm" else "multi_tower")
    assert min(other["effective_sample_size"]) < 0.9 * len(served)  # another ranker: other weights
    assert np.isfinite([e["ctr"] for e in other["estimates"].values()]).all()
    assert len(read_request_log(str(log_dir))) == len(logged)  # the scoring server logged nothing
