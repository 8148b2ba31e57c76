"""Deploy gate: crafted metrics that must pass or fail, against a real deployed bundle's manifest."""

from __future__ import annotations

import json

import pytest

from components import bundle as bd
from components import gate
from tests.conftest import revalidated, shipped_params, write_params

RULES = {"retrieval.recall@50": "higher", "ranking.logloss": "lower"}
OLD = {"retrieval": {"recall@50": 0.40}, "ranking": {"logloss": 0.50}}


def _metrics(recall: float | None = 0.40, logloss: float | None = 0.50) -> dict:
    out: dict = {"retrieval": {}, "ranking": {}}
    if recall is not None:
        out["retrieval"]["recall@50"] = recall
    if logloss is not None:
        out["ranking"]["logloss"] = logloss
    return out


@pytest.mark.parametrize(
    ("new", "passed"),
    [
        (_metrics(0.45, 0.45), True),  # better on both
        (_metrics(0.40, 0.50), True),  # equal
        (_metrics(0.396, 0.505), True),  # worse, but exactly at the 1% tolerance on both
        (_metrics(0.395, 0.50), False),  # recall worse by 1.25%
        (_metrics(0.40, 0.506), False),  # logloss (lower is better) worse by 1.2%
        (_metrics(0.40, 0.40), True),  # a lower logloss is an improvement, not a regression
    ],
)
def test_decision_on_crafted_metrics(new, passed):
    decision = gate.decide(new, OLD, RULES, tolerance=0.01)
    assert decision["passed"] is passed
    assert decision["first_deploy"] is False
    assert all(set(row) >= {"new", "old", "delta", "ok"} for row in decision["metrics"].values())
    if not passed:
        failing = [path for path, row in decision["metrics"].items() if not row["ok"]]
        assert len(decision["reasons"]) == len(failing) == 1
        assert decision["reasons"][0].startswith(failing[0])


def test_delta_and_relative_delta_are_reported():
    row = gate.decide(_metrics(0.36, 0.5), OLD, RULES, tolerance=0.05)["metrics"]["retrieval.recall@50"]
    assert row["new"] == 0.36 and row["old"] == 0.40
    assert row["delta"] == pytest.approx(-0.04)
    assert row["relative_delta"] == pytest.approx(-0.10)
    assert row["ok"] is False and "worse than the tolerance 0.05" in row["reason"]


@pytest.mark.parametrize(
    ("new", "old", "reason"),
    [
        (_metrics(recall=None), OLD, "retrieval.recall@50: missing in the new metrics"),
        (_metrics(), {"ranking": {"logloss": 0.5}}, "retrieval.recall@50: missing in the deployed bundle"),
        (_metrics(recall=float("nan")), OLD, "retrieval.recall@50: not finite"),
        ({"retrieval": {"recall@50": "0.4"}, "ranking": {"logloss": 0.5}}, OLD, "not a number"),
    ],
)
def test_unusable_metric_fails_with_a_reason(new, old, reason):
    decision = gate.decide(new, old, RULES, tolerance=0.01)
    assert decision["passed"] is False
    assert any(reason in r for r in decision["reasons"])


def test_first_deploy_passes_but_still_needs_the_metrics():
    first = gate.decide(_metrics(0.01, 9.0), None, RULES, tolerance=0.01)
    assert first["passed"] is True and first["first_deploy"] is True
    assert first["reasons"] == ["first deploy: no deployed bundle to compare against"]
    broken = gate.decide(_metrics(logloss=None), None, RULES, tolerance=0.01)
    assert broken["passed"] is False and "ranking.logloss: missing" in broken["reasons"][0]


def test_metric_path_keys_may_contain_dots():
    metrics = {"retrieval": {"recall@0.5": 1.0, "recall": {"5": 2.0}}}
    assert gate.metric_at(metrics, "retrieval.recall@0.5") == 1.0
    assert gate.metric_at(metrics, "retrieval.recall.5") == 2.0
    with pytest.raises(KeyError):
        gate.metric_at(metrics, "retrieval.recall@0.5.x")


@pytest.fixture()
def deployed(tmp_path):
    """A real deployed bundle whose manifest carries OLD as its evaluation metrics."""
    member = tmp_path / "encoders.json"
    member.write_text("{}")
    return bd.assemble_bundle(
        {"encoders.json": member}, tmp_path / "deployed", params_text="seed: 1\n", metrics=OLD
    )


def _params(tmp_path, metrics: dict, deployed_bundle: str | None) -> str:
    (tmp_path / "evaluation.json").write_text(json.dumps(metrics))
    gate_section = {
        "metrics_file": str(tmp_path / "evaluation.json"),
        "output": str(tmp_path / "metrics" / "gate.json"),
        "deployed_bundle": deployed_bundle,
        "tolerance": 0.01,
        "metrics": RULES,
    }
    return str(write_params(tmp_path / "params.yaml", {"gate": gate_section}))


def test_cli_writes_the_decision_and_exits_zero_unless_asked(tmp_path, deployed):
    params = _params(tmp_path, _metrics(0.30, 0.50), str(deployed))
    assert gate.main(["--params", params]) == 0
    decision = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert decision["passed"] is False
    assert decision["deployed_version"] == bd.load_manifest(deployed)["version"]
    assert decision["metrics"]["retrieval.recall@50"]["old"] == 0.40
    assert decision["metrics"]["ranking.logloss"]["ok"] is True
    assert gate.main(["--params", params, "--fail-on-reject"]) == 1

    better = _params(tmp_path, _metrics(0.41, 0.49), f"file://{deployed}")
    assert gate.main(["--params", better, "--fail-on-reject"]) == 0
    assert json.loads((tmp_path / "metrics" / "gate.json").read_text())["passed"] is True


def test_cli_first_deploy_passes(tmp_path):
    params = _params(tmp_path, _metrics(), None)
    assert gate.main(["--params", params, "--fail-on-reject"]) == 0
    decision = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert decision["first_deploy"] is True and decision["deployed_bundle"] is None


@pytest.mark.parametrize(
    ("reference", "message"), [("s3://b/bundle", "only local paths"), ("nope", "not a bundle")]
)
def test_unusable_deployed_reference_is_an_error_not_a_rejection(tmp_path, reference, message):
    (tmp_path / "evaluation.json").write_text(json.dumps(_metrics()))
    config = revalidated(
        shipped_params().gate,
        metrics_file=tmp_path / "evaluation.json",
        output=tmp_path / "gate.json",
        metrics=RULES,
    )
    with pytest.raises(gate.GateError, match=message):
        gate.run(config, deployed_bundle=str(tmp_path / reference) if reference == "nope" else reference)
    assert not (tmp_path / "gate.json").exists()


def test_missing_new_metrics_file_is_an_error(tmp_path):
    config = revalidated(
        shipped_params().gate, metrics_file=tmp_path / "absent.json", output=tmp_path / "gate.json"
    )
    with pytest.raises(gate.GateError, match=r"absent\.json: new metrics file not found"):
        gate.run(config)
