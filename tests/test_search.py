"""The hyper-parameter search step: off by default, Optuna studies on the validation split when enabled, and
the committed Katib Experiments expressing the same search space as params.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components import search
from recsys.config import ConfigError, load_params, params_from_yaml_text
from recsys.step_contract import STEPS
from tests.conftest import REPO_ROOT, write_params
from tests.models.conftest import make_frame

KATIB_MANIFEST = REPO_ROOT / "manifests" / "katib" / "search.yaml"


def _raw(directory: Path, **changes) -> dict:
    """The shipped params.yaml as a mapping, with ``changes`` (dotted keys) applied."""
    return yaml.safe_load(write_params(directory / "params-raw.yaml", changes).read_text())


def test_the_shipped_search_is_off_and_writes_only_that(tmp_path):
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.search.enabled is False
    report = search.run(
        params, _raw(tmp_path), tmp_path / "no-training-sets-needed", tmp_path / "search.json"
    )
    assert report == {"enabled": False}
    assert json.loads((tmp_path / "search.json").read_text()) == {"enabled": False}


@pytest.fixture
def training_dir(tmp_path) -> Path:
    for split, seed in (("train", 0), ("valid", 1)):
        make_frame(n_rows=800, seed=seed, label="history_match").to_parquet(
            tmp_path / f"ranking_{split}.parquet"
        )
    return tmp_path


def test_a_study_records_the_default_and_the_best_configuration(training_dir, tmp_path):
    log_range = {"type": "float", "log": True, "choices": None}
    space = {
        "models.multi_tower.embedding_l2": log_range | {"low": 1e-4, "high": 1e-1},
        "training.lr": log_range | {"low": 1e-3, "high": 1e-2},
    }
    raw = _raw(tmp_path, **{"training.epochs": 2, "search.space": {"multi_tower": space}})
    params = search.trial_params("multi_tower", raw, {})
    study = search.search_model(
        "multi_tower", params.search.space["multi_tower"], raw, training_dir, trials=2, seed=0
    )
    assert study["metric"] == "valid auc"
    assert len(study["trials"]) == 2 and all(0 < t["value"] <= 1 for t in study["trials"])
    assert study["default_params"] == {
        "models.multi_tower.embedding_l2": 0.0,
        "training.per_model.multi_tower.lr": raw["training"]["lr"],
    }
    best_trial = max(study["trials"], key=lambda t: t["value"])
    if study["best_is_default"]:
        assert (
            study["best_params"] == {}
            and study["best_value"] == study["default_value"] >= best_trial["value"]
        )
    else:
        assert study["best_value"] == best_trial["value"] > study["default_value"]
        # training keys are recorded for the studied model only, ready to paste into params.yaml
        assert set(study["best_params"]) == {
            "models.multi_tower.embedding_l2",
            "training.per_model.multi_tower.lr",
        }
        assert 1e-3 <= study["best_params"]["training.per_model.multi_tower.lr"] <= 1e-2


def test_the_pipeline_task_searches_even_when_params_say_off_and_logs_the_best(training_dir, tmp_path):
    """The KFP task runs only under the run's ``run_search`` parameter, so it searches whatever
    ``search.enabled`` says, and publishes the report as its Metrics artifact."""
    from pipelines import steps
    from tests.pipelines.test_steps import FakeArtifact

    drawn = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "choices": None}
    text = write_params(
        tmp_path / "params.yaml",
        {
            "training.epochs": 1,
            "search.trials": 1,
            "search.space": {"multi_tower": {"models.multi_tower.embedding_l2": drawn}},
        },
    ).read_text()
    assert yaml.safe_load(text)["search"]["enabled"] is False
    artifact = FakeArtifact(tmp_path / "search" / "search")
    config = STEPS["search"].scope(params_from_yaml_text(text)).to_json()  # what configure hands the task
    steps.search(
        config=config, gpu_type="nvidia.com/gpu", training_sets=FakeArtifact(training_dir), search=artifact
    )
    report = json.loads(Path(artifact.path).read_text())
    assert report["enabled"] is True and set(report["studies"]) == {"multi_tower"}
    assert report["accelerator_type"] == "nvidia.com/gpu"
    study = report["studies"]["multi_tower"]
    assert len(study["trials"]) == 1
    assert artifact.metadata["studies.multi_tower.best_value"] == study["best_value"]
    assert artifact.metadata["studies.multi_tower.default_value"] == study["default_value"]


def test_trial_values_reach_the_model_and_training_keys_only_the_studied_model(tmp_path):
    raw = _raw(tmp_path)
    params = search.trial_params(
        "dlrm",
        raw,
        {"models.dlrm.embedding_l2": 0.05, "training.weight_decay": 0.1, "models.dlrm.final.dropout": 0.3},
    )
    assert params.models.dlrm.embedding_l2 == 0.05 and params.models.dlrm.final.dropout == 0.3
    assert params.training.for_model("dlrm").weight_decay == 0.1
    assert params.training.for_model("multi_tower").weight_decay == raw["training"]["weight_decay"]


def test_a_search_key_outside_the_models_keys_is_refused():
    bad = {"multi_tower": {"seed": {"type": "int", "low": 1, "high": 5, "log": False, "choices": None}}}
    with pytest.raises(ConfigError, match=r"search\.space"):
        load_params(REPO_ROOT / "params.yaml", overrides={"search.space": bad})


def test_an_empty_float_range_is_refused():
    bad = {
        "dlrm": {"training.lr": {"type": "float", "low": 0.01, "high": 0.001, "log": True, "choices": None}}
    }
    with pytest.raises(ConfigError, match="low < high"):
        load_params(REPO_ROOT / "params.yaml", overrides={"search.space": bad})


# ---- Katib ------------------------------------------------------------------------------------------


def test_the_katib_manifest_is_the_builders_output():
    params = load_params(REPO_ROOT / "params.yaml")
    committed = [doc for doc in yaml.safe_load_all(KATIB_MANIFEST.read_text()) if doc]
    assert committed == search.katib_experiments(params), (
        "manifests/katib/search.yaml is stale: run `python -m components.search katib` (see its header)"
    )


def test_the_katib_experiments_search_the_space_in_params():
    params = load_params(REPO_ROOT / "params.yaml")
    experiments = [doc for doc in yaml.safe_load_all(KATIB_MANIFEST.read_text()) if doc]
    assert len(experiments) == len(params.search.space)
    for experiment, (kind, space) in zip(experiments, params.search.space.items(), strict=True):
        assert experiment["kind"] == "Experiment" and experiment["apiVersion"] == "kubeflow.org/v1beta1"
        spec = experiment["spec"]
        assert spec["maxTrialCount"] == params.search.trials
        assert spec["objective"]["type"] == "maximize"
        assert spec["objective"]["objectiveMetricName"] == ("recall-at-50" if kind == "two_tower" else "auc")
        trial_parameters = spec["trialTemplate"]["trialParameters"]
        by_key = {p["description"].removeprefix("log10 of "): p for p in trial_parameters}
        assert set(by_key) == set(space)
        parameters = {p["name"]: p for p in spec["parameters"]}
        command = spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:6] == ["python", "-m", "components.search", "trial", "--model", kind]
        for key, distribution in space.items():
            name = by_key[key]["name"]
            parameter = parameters[name]
            feasible = parameter["feasibleSpace"]
            assert "distribution" not in feasible  # Katib 0.17 has no such field (tests/test_katib.py)
            if distribution.type == "categorical":
                assert f"--set={key}=${{trialParameters.{name}}}" in command
                assert parameter["parameterType"] == "categorical"
                assert feasible["list"] == [str(c) for c in distribution.choices]
                continue
            low, high = float(feasible["min"]), float(feasible["max"])
            if distribution.log:  # searched uniformly over the base-10 exponents: log-uniform
                assert f"--set-log10={key}=${{trialParameters.{name}}}" in command
                assert name.startswith("log10-") and parameter["parameterType"] == "double"
                assert 10**low == pytest.approx(distribution.low)
                assert 10**high == pytest.approx(distribution.high)
                continue
            assert f"--set={key}=${{trialParameters.{name}}}" in command
            assert parameter["parameterType"] == ("double" if distribution.type == "float" else "int")
            assert low == distribution.low and high == distribution.high


def test_a_katib_trial_prints_the_metric_line_katib_collects(training_dir, tmp_path, capsys):
    raw = _raw(tmp_path, **{"training.epochs": 1})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    code = search.main([
        "trial", "--model", "multi_tower", "--params", str(params_file), "--training-dir", str(training_dir),
        "--set=models.multi_tower.embedding_l2=0.01", "--set=training.lr=0.002",
    ])  # fmt: skip
    assert code == 0
    name, value = capsys.readouterr().out.strip().splitlines()[-1].split("=")
    assert name == "auc" and 0 < float(value) <= 1


def test_every_katib_trial_job_validates_against_the_kubernetes_schema():
    from recsys import manifest_schemas

    for experiment in yaml.safe_load_all(KATIB_MANIFEST.read_text()):
        job = experiment["spec"]["trialTemplate"]["trialSpec"]
        named = job | {"metadata": {"name": "trial"}}
        (report,) = manifest_schemas.validate_objects([named])
        assert report.startswith("Job/trial: ok"), report
