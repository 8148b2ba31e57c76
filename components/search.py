"""Search step (optional): Optuna hyper-parameter search per model on the validation split.

``search.space`` maps a model kind to its search space: dotted params keys (``models.<kind>.*`` or
``training.*``) and the distribution each is drawn from. A trial trains that model on the training split
with the drawn values and scores the early-stopping metric on the validation split (AUC for the rankers,
Recall@K for the two-tower), so the test window is never looked at. ``training.*`` keys apply to that
model only: they are recorded as ``training.per_model.<kind>.*``. params.yaml's own configuration is
trained first as the reference, so the best reported is never worse on validation than the default.

The step is a params switch: with ``search.enabled: false`` (the shipped default) it writes a one-line
``search.output`` saying so and trains nothing. Enabled, the output records per model the best value and
configuration (empty when no trial beat params.yaml's own), the default's value and every trial; copy
``best_params`` into params.yaml to adopt them.

The same search runs on a cluster as Kubeflow Katib Experiments (one per model, ``python -m
components.search katib``: manifests/katib/search.yaml); each Katib trial runs ``python -m
components.search trial`` with the drawn values and prints ``<metric>=<value>`` for Katib's StdOut collector.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from models.registry import TASK_OF
from recsys.artifact_io import write_json
from recsys.config import SearchParameter
from recsys.step_contract import STEPS, StepParams
from recsys.training_data import read_split

CONTRACT = STEPS["search"]

log = logging.getLogger(__name__)

KATIB_API = "kubeflow.org/v1beta1"


def run(
    params: StepParams, raw_params: dict[str, Any], training_dir: str | Path, output: str | Path
) -> dict[str, Any]:
    """Run every study of ``params.search.space`` (when enabled) and write the report to ``output``."""
    cfg = params.search
    output = Path(output)
    if not cfg.enabled:
        report: dict[str, Any] = {"enabled": False}
        write_json(report, output)
        log.info("search: disabled (search.enabled: false)")
        return report
    report = {"enabled": True, "trials_per_model": cfg.trials, "studies": {}}
    for kind, space in cfg.space.items():
        report["studies"][kind] = search_model(
            kind, space, raw_params, Path(training_dir), cfg.trials, params.seed
        )
        write_json(report, output)  # a long search leaves its finished studies behind
    log.info("search: %s", json.dumps(report, indent=1)[:4000])
    return report


def search_model(
    kind: str,
    space: dict[str, SearchParameter],
    raw_params: dict[str, Any],
    training_dir: Path,
    trials: int,
    seed: int,
) -> dict[str, Any]:
    """One Optuna study (TPE, seeded) over ``space`` for model ``kind``, next to params.yaml's own
    configuration (trained first, as the reference: its values may lie outside the space, e.g. 0 on a
    log scale). The best configuration is the default's when no trial beats it on validation."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frames = [read_split(training_dir, TASK_OF[kind], s) for s in ("train", "valid")]
    started = time.perf_counter()
    default_value = evaluate_trial(kind, raw_params, {}, *frames)
    log.info("search %s: params.yaml's configuration %.4f", kind, default_value)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))

    def objective(trial: optuna.Trial) -> float:
        values = {key: suggest(trial, key, spec) for key, spec in space.items()}
        value = evaluate_trial(kind, raw_params, values, *frames)
        log.info("search %s trial %d: %.4f %s", kind, trial.number, value, values)
        return value

    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    improved = best.value is not None and best.value > default_value
    return {
        "metric": "valid " + _metric_name(kind, raw_params),
        "default_value": default_value,
        "default_params": {recorded_key(kind, k): _current(raw_params, kind, k) for k in space},
        "best_value": best.value if improved else default_value,
        "best_is_default": not improved,
        "best_params": {recorded_key(kind, k): v for k, v in best.params.items()} if improved else {},
        "trials": [{"number": t.number, "value": t.value, "params": t.params} for t in study.trials],
        "seconds": round(time.perf_counter() - started, 1),
    }


def evaluate_trial(
    kind: str,
    raw_params: dict[str, Any],
    values: dict[str, Any],
    train_df: pd.DataFrame,
    valid_df: pd.DataFrame,
) -> float:
    """Train ``kind`` with ``values`` applied; the best validation value of its early-stopping metric."""
    from models import fit, initial_model

    params = trial_params(kind, raw_params, values)
    encoder, model, training = initial_model(kind, params.models, params.training, train_df)
    result = fit(model, encoder.encode(train_df), encoder.encode(valid_df), training, progress=False)
    return float(result.best_metric) if result.best_metric is not None else float("nan")


def trial_params(kind: str, raw_params: dict[str, Any], values: dict[str, Any]) -> StepParams:
    """``raw_params`` with a trial's values set (``training.*`` keys for ``kind`` only), validated."""
    raw = yaml.safe_load(yaml.safe_dump(raw_params))  # a deep copy
    for key, value in values.items():
        node = raw
        *parents, leaf = recorded_key(kind, key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return CONTRACT.from_raw(raw, source=f"search trial of {kind}")


def recorded_key(kind: str, key: str) -> str:
    """``training.lr`` -> ``training.per_model.<kind>.lr`` (a study tunes one model); others unchanged."""
    if key.startswith("training.") and not key.startswith("training.per_model."):
        return f"training.per_model.{kind}.{key.removeprefix('training.')}"
    return key


def suggest(trial: Any, key: str, spec: SearchParameter) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(key, spec.choices)
    if spec.type == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, log=spec.log)


def katib_experiments(params: StepParams) -> list[dict[str, Any]]:
    """One Katib Experiment per model of ``search.space``: the same parameters, ranges and objective."""
    cfg, pipeline = params.search, params.pipeline
    experiments = []
    for kind, space in cfg.space.items():
        names = {key: katib_name(key) for key in space}
        spec = {
            "objective": {
                "type": "maximize",
                "objectiveMetricName": katib_metric(_metric_name(kind, None, params)),
            },
            "algorithm": {
                "algorithmName": "tpe",
                "algorithmSettings": [{"name": "random_state", "value": str(params.seed)}],
            },
            "maxTrialCount": cfg.trials,
            "parallelTrialCount": cfg.katib.parallel_trials,
            "maxFailedTrialCount": cfg.katib.max_failed_trials,
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
            "parameters": [katib_parameter(names[key], spec) for key, spec in space.items()],
            "trialTemplate": {
                "primaryContainerName": "training",
                "trialParameters": [
                    {"name": name, "reference": name, "description": key} for key, name in names.items()
                ],
                "trialSpec": _katib_trial_job(params, kind, names),
            },
        }
        name = f"{pipeline.name}-search-{kind.replace('_', '-')}"
        experiments.append({
            "apiVersion": KATIB_API,
            "kind": "Experiment",
            "metadata": {"name": name, "namespace": pipeline.namespace},
            "spec": spec,
        })  # fmt: skip
    return experiments


def _katib_trial_job(params: StepParams, kind: str, names: dict[str, str]) -> dict[str, Any]:
    """The batch Job of one Katib trial: ``components.search trial`` in the training image."""
    cfg, pipeline = params.search.katib, params.pipeline
    command = ["python", "-m", "components.search", "trial", "--model", kind]
    command += ["--params", cfg.params_file, "--training-dir", cfg.training_dir]
    command += [f"--set={key}=${{trialParameters.{name}}}" for key, name in names.items()]
    container = {
        "name": "training",
        "image": pipeline.training_image,
        "command": command,
        "resources": {
            "requests": pipeline.train_resources.requests(),
            "limits": pipeline.train_resources.limits(),
        },
        "volumeMounts": [{"name": "training-data", "mountPath": cfg.mount_path}],
    }
    pod = {
        "serviceAccountName": pipeline.service_account,
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "training-data", "persistentVolumeClaim": {"claimName": cfg.volume_claim}}],
    }
    template = {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}}, "spec": pod}
    return {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": template}}


def katib_parameter(name: str, spec: SearchParameter) -> dict[str, Any]:
    """A Katib parameter (``double`` / ``int`` / ``categorical``) with the same range or choices."""
    if spec.type == "categorical":
        return {
            "name": name,
            "parameterType": "categorical",
            "feasibleSpace": {"list": [str(c) for c in spec.choices]},
        }
    space = {"min": str(spec.low if spec.type == "float" else int(spec.low)),
             "max": str(spec.high if spec.type == "float" else int(spec.high)),
             "distribution": "logUniform" if spec.log else "uniform"}  # fmt: skip
    return {
        "name": name,
        "parameterType": "double" if spec.type == "float" else "int",
        "feasibleSpace": space,
    }


def katib_name(key: str) -> str:
    """A Katib parameter name for a params key: ``models.dlrm.embedding_l2`` -> ``dlrm-embedding-l2``."""
    parts = key.split(".")[1:] if key.startswith(("models.", "training.")) else key.split(".")
    return "-".join(parts).replace("_", "-")


def katib_metric(name: str) -> str:
    """The metric as Katib's StdOut collector can parse it: ``recall@50`` -> ``recall-at-50``."""
    return name.replace("@", "-at-")


def _current(raw: dict[str, Any], kind: str, key: str) -> Any:
    """The value params.yaml gives ``key`` for ``kind`` (a per-model training override first)."""
    for dotted in (recorded_key(kind, key), key):
        node: Any = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    raise KeyError(f"search.space.{kind}: '{key}' is not a key of params.yaml")


def _metric_name(kind: str, raw: dict[str, Any] | None, params: StepParams | None = None) -> str:
    params = params or CONTRACT.from_raw(raw or {}, source="search")
    from models.registry import default_metric

    return default_metric(kind, params.training.for_model(kind))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.search", description=__doc__)
    parser.add_argument(
        "mode",
        nargs="?",
        default="run",
        choices=["run", "trial", "katib"],
        help="run: every study (default); trial: one training run (Katib); katib: print the manifests",
    )
    CONTRACT.add_path_options(parser)
    parser.add_argument("--model", choices=sorted(TASK_OF), help="trial: the model to train")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="trial: a drawn value"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = yaml.safe_load(Path(args.params).read_text())
    params = CONTRACT.load(args.params)
    training_dir = args.training_dir
    if args.mode == "katib":
        yaml.safe_dump_all(katib_experiments(params), sys.stdout, sort_keys=False)
        return 0
    if args.mode == "trial":
        if args.model is None:
            parser.error("trial needs --model")
        values = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
        frames = [read_split(training_dir, TASK_OF[args.model], s) for s in ("train", "valid")]
        value = evaluate_trial(args.model, raw, values, *frames)
        # Katib's StdOut collector reads `name=value` lines (names of word characters and '-')
        print(f"{katib_metric(_metric_name(args.model, raw))}={value}")
        return 0
    run(params, raw, training_dir, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
