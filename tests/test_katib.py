"""The Katib Experiments of manifests/katib/search.yaml can run on a cluster: each trial Job reads the
params and training sets ``components.search stage`` put on the training volume, holds the training tasks'
GPUs on their nodes, is never retried, and uses only what Katib 0.17 (the oldest supported) knows."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import search
from components.launch_training import TRAINING_VOLUME_PATH
from recsys import manifest_schemas
from recsys.config import SearchParameter, load_params
from recsys.step_contract import STEPS
from tests.conftest import REPO_ROOT, write_params
from tests.models.conftest import make_frame

KATIB_MANIFEST = REPO_ROOT / "manifests" / "katib" / "search.yaml"
# Katib v0.17.0's FeasibleSpace (pkg/apis/controller/experiments/v1beta1/experiment_types.go): no
# `distribution`, which arrived in v0.18.0
KATIB_017_FEASIBLE_SPACE = {"min", "max", "list", "step"}


def _experiments() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KATIB_MANIFEST.read_text()) if doc]


def _pod(experiment: dict[str, Any]) -> dict[str, Any]:
    return experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_manifest_is_what_its_header_command_prints(capsys):
    assert search.main(["katib"]) == 0
    assert capsys.readouterr().out == KATIB_MANIFEST.read_text(), (
        "manifests/katib/search.yaml is stale: run `python -m components.search katib > "
        "manifests/katib/search.yaml`"
    )


def test_a_trial_reads_the_staged_params_and_training_sets_from_the_training_volume():
    params = load_params(REPO_ROOT / "params.yaml")
    staged_params, staged_sets = search.staged_paths(TRAINING_VOLUME_PATH)
    for experiment in _experiments():
        pod = _pod(experiment)
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TRAINING_VOLUME_PATH]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == params.pipeline.training_volume  # the multi-node training's ReadWriteMany PVC
        assert mount["readOnly"] is True  # a trial cannot damage what the other trials read
        assert _option(container["command"], "--params") == str(staged_params)
        assert _option(container["command"], "--training-dir") == str(staged_sets)
        assert Path(_option(container["command"], "--params")).is_relative_to(TRAINING_VOLUME_PATH)


def test_a_trial_holds_the_training_tasks_gpus_on_the_gpu_nodes():
    cfg = load_params(REPO_ROOT / "params.yaml").pipeline
    for experiment in _experiments():
        pod = _pod(experiment)
        (container,) = pod["containers"]
        gpus = str(cfg.accelerator_limit)
        assert container["resources"]["limits"][cfg.accelerator_type] == gpus
        assert container["resources"]["requests"][cfg.accelerator_type] == gpus
        assert container["image"] == cfg.training_image
        assert _option(container["command"], "--require-gpu") == gpus  # never silently on CPU
        expected = [{k: v for k, v in t.model_dump().items() if v is not None} for t in cfg.gpu_tolerations]
        assert pod["tolerations"] == expected and expected
        assert pod["nodeSelector"] == cfg.gpu_node_selector


def test_a_failed_trial_is_not_retried_by_the_job_controller():
    for experiment in _experiments():
        job = experiment["spec"]["trialTemplate"]["trialSpec"]
        assert job["spec"]["backoffLimit"] == 0
        assert _pod(experiment)["restartPolicy"] == "Never"


def test_parameters_use_only_the_fields_katib_0_17_knows_and_log_ranges_are_exponents():
    space = load_params(REPO_ROOT / "params.yaml").search.space
    for experiment, (kind, keys) in zip(_experiments(), space.items(), strict=True):
        parameters = {p["name"]: p for p in experiment["spec"]["parameters"]}
        for key, spec in keys.items():
            feasible = parameters[search.katib_name(key, spec)]["feasibleSpace"]
            assert set(feasible) <= KATIB_017_FEASIBLE_SPACE, f"{kind} {key}: {feasible}"
            if spec.type != "categorical" and spec.log:
                assert float(feasible["min"]) == pytest.approx(math.log10(spec.low))
                assert float(feasible["max"]) == pytest.approx(math.log10(spec.high))


def test_the_experiments_validate_against_the_katib_017_schema_and_their_trial_jobs_against_kubernetes():
    for experiment in _experiments():
        report = manifest_schemas.validate_object(experiment)
        assert report.endswith("ok (CRD schema kubeflow.org_experiments.json)"), report
        job = experiment["spec"]["trialTemplate"]["trialSpec"]
        named = job | {"metadata": {"name": "trial"}}
        assert manifest_schemas.validate_object(named).startswith("Job/trial: ok (Kubernetes")
    # what Katib 0.17 would drop without a word fails here instead
    bad = _experiments()[0]
    bad["spec"]["parameters"][0]["feasibleSpace"]["distribution"] = "logUniform"
    with pytest.raises(manifest_schemas.ManifestError, match="distribution"):
        manifest_schemas.validate_object(bad)


# ---- trial values ---------------------------------------------------------------------------------


def _spec(**fields: Any) -> SearchParameter:
    return SearchParameter(**({"low": None, "high": None, "log": False, "choices": None} | fields))


def test_trial_values_take_exponents_back_to_the_range_and_keep_the_drawn_types():
    space = {
        "training.lr": _spec(type="float", low=3e-4, high=3e-3, log=True),
        "models.x.units": _spec(type="int", low=8, high=512, log=True),
        "models.x.dropout": _spec(type="float", low=0.0, high=0.5),
        "models.x.negatives": _spec(type="categorical", choices=[0, 256]),
    }
    top = repr(math.log10(3e-3))  # 10**x of the emitted bound may land a hair above the range
    values = search.trial_values(
        space,
        ["models.x.dropout=0.25", "models.x.negatives=256", "training.seed=7"],
        [f"training.lr={top}", "models.x.units=1.4"],
    )
    assert values == {
        "models.x.dropout": 0.25,
        "models.x.negatives": 256,
        "training.seed": 7,
        "training.lr": 3e-3,
        "models.x.units": 25,
    }
    with pytest.raises(ValueError, match="not one of the choices"):
        search.trial_values(space, ["models.x.negatives=7"], [])
    with pytest.raises(ValueError, match="not a log-scale range"):
        search.trial_values(space, [], ["models.x.dropout=-1"])


# ---- staging ------------------------------------------------------------------------------------


@pytest.fixture
def training_sets(tmp_path) -> Path:
    """Every split the shipped search reads (rankers and two-tower), real ranking rows for a trial."""
    directory = tmp_path / "training"
    directory.mkdir()
    for split, seed in (("train", 0), ("valid", 1)):
        make_frame(n_rows=600, seed=seed, label="history_match").to_parquet(
            directory / f"ranking_{split}.parquet"
        )
        (directory / f"retrieval_{split}.parquet").write_bytes(b"not read here")
    return directory


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_stage_puts_the_search_params_and_training_sets_on_the_volume_and_a_trial_reads_them(
    training_sets, tmp_path, capsys
):
    params_file = write_params(tmp_path / "params.yaml", {"training.epochs": 1})
    volume = tmp_path / "volume"
    volume.mkdir()
    code = search.main([
        "stage", "--params", str(params_file),
        "--training-dir", str(training_sets), "--volume-dir", str(volume),
    ])  # fmt: skip
    assert code == 0
    staged_params, staged_sets = search.staged_paths(volume)
    assert sorted(p.name for p in volume.iterdir()) == ["search"]  # no temporary leftovers
    assert _tree(staged_sets) == _tree(training_sets)
    assert list(yaml.safe_load(staged_params.read_text())) == list(STEPS["search"].sections)
    code = search.main([
        "trial", "--model", "multi_tower", "--params", str(staged_params), "--training-dir", str(staged_sets),
        "--set-log10=training.lr=-2.7", "--set=models.multi_tower.final.dropout=0.1",
    ])  # fmt: skip
    assert code == 0
    name, value = capsys.readouterr().out.strip().splitlines()[-1].split("=")
    assert name == "auc" and 0 < float(value) <= 1


def test_staging_again_replaces_the_staged_copy_whole(training_sets, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", {})
    volume = tmp_path / "volume"
    volume.mkdir()
    search.stage(params_file, training_sets, volume)
    first = _tree(volume)
    search.stage(params_file, training_sets, volume)
    assert _tree(volume) == first  # idempotent
    (training_sets / "retrieval_valid.parquet").write_bytes(b"a newer run")
    (volume / "search" / "training_sets" / "stray.parquet").write_bytes(b"from an older stage")
    search.stage(params_file, training_sets, volume)
    assert _tree(volume / "search" / "training_sets") == _tree(training_sets)
    assert sorted(p.name for p in volume.iterdir()) == ["search"]


def test_a_failed_stage_leaves_the_previous_copy_and_no_half_copy(training_sets, tmp_path, monkeypatch):
    params_file = write_params(tmp_path / "params.yaml", {})
    volume = tmp_path / "volume"
    volume.mkdir()
    search.stage(params_file, training_sets, volume)
    before = _tree(volume)

    def copy_half(source: Path, target: Path) -> None:
        Path(target).mkdir()
        (Path(target) / "ranking_train.parquet").write_bytes(b"half")
        raise OSError("volume full")

    monkeypatch.setattr(search.shutil, "copytree", copy_half)
    with pytest.raises(OSError, match="volume full"):
        search.stage(params_file, training_sets, volume)
    assert _tree(volume) == before
    assert sorted(p.name for p in volume.iterdir()) == ["search"]


def test_stage_refuses_a_missing_or_incomplete_training_dir_naming_it(training_sets, tmp_path):
    params_file = write_params(tmp_path / "params.yaml", {})
    volume = tmp_path / "volume"
    volume.mkdir()
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        search.stage(params_file, missing, volume)
    (training_sets / "retrieval_valid.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"retrieval_valid\.parquet"):
        search.stage(params_file, training_sets, volume)
    assert list(volume.iterdir()) == []
    (training_sets / "retrieval_valid.parquet").write_bytes(b"back")
    with pytest.raises(FileNotFoundError, match="training_volume"):
        search.stage(params_file, training_sets, tmp_path / "not-mounted")


def test_the_runbook_stages_before_it_applies_the_experiments():
    text = (REPO_ROOT / "manifests" / "README.md").read_text()
    runbook = text[text.index("<!-- runbook:start -->") : text.index("<!-- runbook:end -->")]
    stage = runbook.index("python -m components.search stage")
    assert stage < runbook.index("kubectl -n recsys apply -f manifests/katib/search.yaml")
    assert "python -m components.search katib > manifests/katib/search.yaml" in runbook


def test_trial_pods_pull_the_training_image_by_digest_with_the_pull_secrets():
    digest = "sha256:" + "ef" * 32
    params = load_params(
        REPO_ROOT / "params.yaml",
        overrides={"pipeline.training_image_digest": digest, "pipeline.image_pull_secrets": ["regcred"]},
    )
    experiments = search.katib_experiments(STEPS["search"].scope(params))
    assert all("imagePullSecrets" not in _pod(experiment) for experiment in _experiments())  # default
    for experiment in experiments:
        pod = _pod(experiment)
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["containers"][0]["image"] == f"{params.pipeline.training_image_repo}@{digest}"
        job = experiment["spec"]["trialTemplate"]["trialSpec"]
        named = job | {"metadata": {"name": "trial"}}
        assert manifest_schemas.validate_object(named).startswith("Job/trial: ok (Kubernetes")
        assert manifest_schemas.validate_object(experiment).endswith(
            "ok (CRD schema kubeflow.org_experiments.json)"
        )


def test_trial_containers_run_restricted_as_the_images_user():
    """Only the trial's own container is pinned to the images' uid: Katib's injected metrics collector
    keeps its own user; the pod gets the runtime's seccomp profile."""
    uid = load_params(REPO_ROOT / "params.yaml").pipeline.run_as_user
    for experiment in _experiments():
        pod = _pod(experiment)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "runAsUser" not in pod["securityContext"]
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"]) == (True, uid, uid)
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
