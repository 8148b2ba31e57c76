"""Deploy gate: crafted metrics that must pass or fail, against a real deployed bundle's manifest."""

from __future__ import annotations

import json
from pathlib import Path

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


def _with_interval(metrics: dict, half_width: float) -> dict:
    """``metrics`` plus an interval of +-``half_width`` around Recall@50, as evaluate writes it."""
    recall = metrics["retrieval"]["recall@50"]
    interval = {"value": recall, "low": recall - half_width, "high": recall + half_width}
    return metrics | {gate.INTERVALS: {"retrieval.recall@50": interval}}


@pytest.mark.parametrize(
    ("new_recall", "half_width", "passed"),
    [
        (0.39, 0.02, True),  # 2.5% worse: within the noise of two +-0.02 intervals (a point gate rejects)
        (0.30, 0.02, False),  # 25% worse: the whole difference interval lies past the tolerance
        (0.36, 0.02, False),  # -0.04 +- 0.028: still worse beyond noise and the 1% tolerance
        (0.36, 0.03, True),  # -0.04 +- 0.042: the interval reaches the tolerance
    ],
)
def test_interval_gate_rejects_only_regressions_beyond_the_noise(new_recall, half_width, passed):
    new = _with_interval(_metrics(new_recall, 0.50), half_width)
    old = _with_interval(OLD, half_width)
    decision = gate.decide(new, old, RULES, tolerance=0.01, compare="interval")
    row = decision["metrics"]["retrieval.recall@50"]
    assert decision["passed"] is passed and row["ok"] is passed
    spread = (2 * half_width**2) ** 0.5
    assert row["delta_interval"] == pytest.approx([new_recall - 0.40 - spread, new_recall - 0.40 + spread])
    assert "difference interval" in row["reason"]
    assert gate.decide(new, old, RULES, tolerance=0.01, compare="point")["passed"] is (new_recall >= 0.396)


@pytest.mark.parametrize(
    "old",
    [
        OLD,  # a bundle evaluated before intervals existed
        _with_interval(OLD, 0.02) | {gate.INTERVALS: {"retrieval.recall@50": {"low": float("nan")}}},
    ],
)
def test_interval_gate_without_intervals_on_both_sides_compares_points_and_says_so(old):
    new = _with_interval(_metrics(0.39, 0.50), 0.02)
    decision = gate.decide(new, old, RULES, tolerance=0.01, compare="interval")
    row = decision["metrics"]["retrieval.recall@50"]
    assert decision["passed"] is False and "delta_interval" not in row
    assert row["reason"].endswith("(no interval on both sides: point values compared)")
    # logloss has no interval either: compared by its point value, and passes at equal values
    assert decision["metrics"]["ranking.logloss"]["ok"] is True


@pytest.fixture()
def deployed(tmp_path):
    """A real deployed bundle whose manifest carries OLD as its evaluation metrics."""
    member = tmp_path / "encoders.json"
    member.write_text("{}")
    return bd.assemble_bundle(
        {"encoders.json": member}, tmp_path / "deployed", params_text="seed: 1\n", metrics=OLD
    )


def _cli(tmp_path, metrics: dict, deployed_bundle: str | None) -> list[str]:
    """The gate's command line: a params file with ``deployed_bundle``, the new metrics, the decision."""
    (tmp_path / "evaluation.json").write_text(json.dumps(metrics))
    gate_section = {
        "deployed_bundle": deployed_bundle,
        "tolerance": 0.01,
        "compare": "point",
        "metrics": RULES,
        "ope": shipped_params().gate.ope.model_dump(),
    }
    params = write_params(tmp_path / "params.yaml", {"gate": gate_section})
    return [
        *("--params", str(params)),
        *("--metrics-file", str(tmp_path / "evaluation.json")),
        *("--output", str(tmp_path / "metrics" / "gate.json")),
    ]


def test_cli_writes_the_decision_and_exits_zero_unless_asked(tmp_path, deployed):
    cli = _cli(tmp_path, _metrics(0.30, 0.50), str(deployed))
    assert gate.main(cli) == 0
    decision = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert decision["passed"] is False
    assert decision["deployed_version"] == bd.load_manifest(deployed)["version"]
    assert decision["metrics"]["retrieval.recall@50"]["old"] == 0.40
    assert decision["metrics"]["ranking.logloss"]["ok"] is True
    assert gate.main([*cli, "--fail-on-reject"]) == 1

    better = _cli(tmp_path, _metrics(0.41, 0.49), f"file://{deployed}")
    assert gate.main([*better, "--fail-on-reject"]) == 0
    assert json.loads((tmp_path / "metrics" / "gate.json").read_text())["passed"] is True


def test_cli_first_deploy_passes(tmp_path):
    assert gate.main([*_cli(tmp_path, _metrics(), None), "--fail-on-reject"]) == 0
    decision = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert decision["first_deploy"] is True and decision["deployed_bundle"] is None


@pytest.mark.parametrize(
    ("reference", "message"), [("gs://b/bundle", "a promote store"), ("nope", "not a bundle")]
)
def test_unusable_deployed_reference_is_an_error_not_a_rejection(tmp_path, reference, message):
    (tmp_path / "evaluation.json").write_text(json.dumps(_metrics()))
    config = revalidated(shipped_params().gate, metrics=RULES)
    with pytest.raises(gate.GateError, match=message):
        gate.run(
            config,
            deployed_bundle=str(tmp_path / reference) if reference == "nope" else reference,
            **_files(tmp_path),
        )
    assert not (tmp_path / "gate.json").exists()


def test_missing_new_metrics_file_is_an_error(tmp_path):
    with pytest.raises(gate.GateError, match=r"absent\.json: new metrics file not found"):
        gate.run(shipped_params().gate, metrics_file=tmp_path / "absent.json", output=tmp_path / "gate.json")


# the cluster case: the deployed bundle is the one promoted to the object store (a real S3 server here)


def _promote(tmp_path, store_uri: str, metrics: dict) -> dict:
    from components import promote

    member = tmp_path / "encoders.json"
    member.write_text(json.dumps(metrics))
    bundle = bd.assemble_bundle(
        {"encoders.json": member}, tmp_path / "promoted", params_text="seed: 1\n", metrics=metrics
    )
    return promote.run(revalidated(shipped_params().promote, uri=store_uri), bundle)


def _files(tmp_path) -> dict[str, Path]:
    """The gate's files: the new metrics it reads, the decision it writes."""
    return {"metrics_file": tmp_path / "evaluation.json", "output": tmp_path / "gate.json"}


def _gate(tmp_path, metrics: dict, deployed_bundle: str) -> dict:
    """The gate on ``metrics`` against ``deployed_bundle``."""
    (tmp_path / "evaluation.json").write_text(json.dumps(metrics))
    config = revalidated(shipped_params().gate, metrics=RULES)
    return gate.run(config, deployed_bundle=deployed_bundle, **_files(tmp_path))


def test_gate_reads_the_promoted_bundle_from_the_object_store(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    first = _gate(tmp_path, _metrics(), store_uri)
    assert first["passed"] and first["first_deploy"]  # no pointer yet: a first deploy, and it says so
    assert first["reasons"] == [f"first deploy: nothing promoted yet at {store_uri}/current.json"]

    pointer = _promote(tmp_path, store_uri, OLD)
    worse = _gate(tmp_path, _metrics(0.30, 0.50), store_uri)
    assert worse["passed"] is False and worse["first_deploy"] is False
    assert worse["deployed_version"] == pointer["version"] and worse["deployed_bundle"] == pointer["uri"]
    assert worse["metrics"]["retrieval.recall@50"]["old"] == 0.40
    better = _gate(tmp_path, _metrics(0.45, 0.45), store_uri)
    assert better["passed"] is True and better["first_deploy"] is False


def test_an_unreachable_store_is_an_error_not_a_first_deploy(tmp_path, s3_env):
    with pytest.raises(gate.GateError, match="cannot read the promoted bundle"):
        _gate(tmp_path, _metrics(), f"{s3_env.uri()}-missing/bundles")
    assert not (tmp_path / "gate.json").exists()


def test_gate_reads_a_local_promote_store_too(tmp_path):
    store_uri = (tmp_path / "store").as_uri()
    _promote(tmp_path, store_uri, OLD)
    assert _gate(tmp_path, _metrics(0.30, 0.50), store_uri)["passed"] is False


def test_a_pointer_to_a_changed_version_is_an_error(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    pointer = _promote(tmp_path, store_uri, OLD)
    key = f"bundles/{pointer['version']}/manifest.json"
    s3_env.client().put_object(Bucket=s3_env.name, Key=key, Body=b'{"content_sha256": "edited"}')
    with pytest.raises(gate.GateError, match="content digest differs"):
        _gate(tmp_path, _metrics(), store_uri)
