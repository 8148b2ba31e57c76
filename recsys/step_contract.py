"""The step contract: what each step of the DAG reads of params.yaml and which named artifacts it takes
and makes, declared once in its own module as ``CONTRACT``.

From it come the configuration each step gets (:class:`StepParams`: only its sections, locally and in a
Kubeflow task, so a change to ``serving.*`` leaves the training tasks' inputs, and KFP's cache keys,
untouched) and the step CLIs' ``--params`` loading; tests check that ``dvc.yaml`` lists, per stage, the
same ``params`` sections and that each Kubeflow wrapper's artifacts are the named inputs and outputs
(tests/recsys/test_step_contract.py).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from models.registry import RETRIEVAL_MODEL
from recsys import artifact_layout as layout
from recsys.config import ConfigError, Params, load_params, parse_params
from recsys.config.loading import DEFAULT_PARAMS

ALL_SECTIONS: tuple[str, ...] = tuple(Params.model_fields)


@dataclass(frozen=True)
class StepContract:
    """One step: its name (the module ``components.<name>``), the params.yaml sections it reads, the
    names of the artifacts it takes and makes (its Kubeflow task's ``Input``/``Output`` parameters), and
    the local files it ``reads`` and ``writes`` (its ``run`` argument -> the layout's path: the CLI's
    defaults, and what dvc.yaml lists as the stage's deps and outs)."""

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    reads: Mapping[str, Path] = field(default_factory=dict)
    writes: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in ALL_SECTIONS]
        if unknown:
            raise ValueError(
                f"step '{self.name}': unknown params section(s) {unknown}; known: {ALL_SECTIONS}"
            )

    def add_path_options(self, parser: argparse.ArgumentParser) -> None:
        """``--params`` and one ``--<name>`` option per file the step reads or writes, defaulting to the
        layout (what DVC runs)."""
        parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="the project configuration file")
        for name, path in {**self.reads, **self.writes}.items():
            role = "reads" if name in self.reads else "writes"
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                type=Path,
                default=path,
                help=f"{role} (default: {path})",
            )

    def paths(self, args: argparse.Namespace) -> dict[str, Path]:
        """The files of a parsed command line, by ``run`` argument name."""
        return {name: getattr(args, name) for name in {**self.reads, **self.writes}}

    def scope(self, params: Params) -> StepParams:
        """The sections of a whole, validated configuration this step reads."""
        return StepParams(self.name, {name: getattr(params, name) for name in self.sections})

    def load(self, path: str | Path, overrides: Mapping[str, Any] | None = None) -> StepParams:
        """This step's configuration from a file: a whole params.yaml (validated whole, then scoped) or
        a file holding just this step's sections (what a Kubeflow task hands a subprocess);
        ``overrides`` (dotted keys) apply to a whole params.yaml."""
        path = Path(path)
        if overrides:
            return self.scope(load_params(path, dict(overrides)))
        if not path.is_file():
            raise ConfigError(f"{path}: no such params file (cwd {Path.cwd()})")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
            )
        if set(ALL_SECTIONS) <= set(raw):
            return self.scope(parse_params(raw, source=str(path)))
        return self.from_raw(raw, source=str(path))

    def from_raw(self, raw: Mapping[str, Any], source: str) -> StepParams:
        """Validate this step's sections of ``raw`` (other keys are ignored); a missing or invalid section
        is an error naming it."""
        missing = [name for name in self.sections if name not in raw]
        if missing:
            raise ConfigError(f"{source}: step '{self.name}' reads section(s) {missing}, which are missing")
        sections = {}
        for name in self.sections:
            try:
                sections[name] = _section_type(name).validate_python(raw[name])
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in (name, *error["loc"]))
                raise ConfigError(f"{source}: invalid configuration:\n  {where}: {error['msg']}") from None
        return StepParams(self.name, sections)


class StepParams:
    """The params.yaml sections one step reads, as the same typed objects ``Params`` holds.

    Reading a section the step did not declare is an error naming the step and the section, so a
    contract cannot silently fall behind its code.
    """

    def __init__(self, step: str, sections: Mapping[str, Any]) -> None:
        self._step = step
        self._sections = dict(sections)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        if name.startswith("_") or name not in ALL_SECTIONS:
            raise AttributeError(name)
        raise AttributeError(
            f"step '{self.__dict__.get('_step')}' does not declare params section '{name}' in its CONTRACT "
            f"(it reads {sorted(sections)})"
        )

    @property
    def step(self) -> str:
        return self._step

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(self._sections)

    def dump(self) -> dict[str, Any]:
        """The sections as JSON-compatible data (what a task receives, what a step writes for a child)."""
        return {
            name: _section_type(name).dump_python(value, mode="json")
            for name, value in self._sections.items()
        }

    def to_json(self) -> str:
        """One line of JSON: the ``config`` argument of the step's Kubeflow task."""
        return json.dumps({"step": self._step, "sections": self.dump()}, sort_keys=True)

    def to_yaml(self) -> str:
        """The sections as a params file that :meth:`StepContract.load` reads back."""
        return yaml.safe_dump(self.dump(), sort_keys=False)


@functools.cache
def _section_type(name: str) -> TypeAdapter[Any]:
    """The validator of one params section, built once (every task parses and dumps its sections)."""
    return TypeAdapter(Params.model_fields[name].annotation)


def step_params_from_json(text: str, contract: StepContract) -> StepParams:
    """A task's ``config`` argument (:meth:`StepParams.to_json`) back into typed sections."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"step '{contract.name}': its config argument is not JSON: {exc}") from exc
    if payload.get("step") != contract.name:
        raise ConfigError(f"step '{contract.name}': got the configuration of step '{payload.get('step')}'")
    return contract.from_raw(payload["sections"], source=f"the config of step '{contract.name}'")


def scoped_configs(params: Params, contracts: Iterable[StepContract]) -> dict[str, str]:
    """Step name -> that step's configuration as its task argument."""
    return {contract.name: contract.scope(params).to_json() for contract in contracts}


def _steps(*contracts: StepContract) -> dict[str, StepContract]:
    return {contract.name: contract for contract in contracts}


# Every step of the DAG, in DAG order. A step module reads its configuration through its entry here
# (``STEPS[<name>].load(...)`` in its CLI, the task's ``config`` argument in Kubeflow), so a section it
# reads without declaring it here fails at once. ``train`` includes ``pipeline``: its launcher
# (components/launch_training.py) reads the GPU and node counts from it. ``bundle`` reads every section:
# the bundle records the whole configuration it was built with.
STEPS: dict[str, StepContract] = _steps(
    StepContract("ingest", ("seed", "data"), outputs=("raw",), writes={"raw_dir": layout.RAW_DIR}),
    StepContract(
        "features",
        ("features",),
        inputs=("raw",),
        outputs=("features",),
        reads={"raw_dir": layout.RAW_DIR},
        writes={"features_dir": layout.FEATURES_DIR},
    ),
    # one step, two DVC stages (--target raw | training): its files are the layout's per target
    StepContract(
        "validate", ("validation",), inputs=("data",), outputs=("data_docs", "data_docs_site", "summary")
    ),
    StepContract(
        "training_set",
        ("features", "feast", "training_set"),
        inputs=("features", "raw"),
        outputs=("training_sets", "report", "stats"),
        reads={"features_dir": layout.FEATURES_DIR, "raw_dir": layout.RAW_DIR},
        writes={
            "output_dir": layout.TRAINING_DIR,
            "metrics_file": layout.TRAINING_SET_STATS,
            "report_file": layout.TRAINING_SET_REPORT,
        },
    ),
    # before training: the served traffic against the training set the next model learns from
    StepContract(
        "monitor",
        ("monitor", "serving", "promote", "feast", "features", "training_set"),
        inputs=("raw", "features", "training_sets"),
        outputs=("report", "checks"),
        reads={
            "raw_dir": layout.RAW_DIR,
            "features_dir": layout.FEATURES_DIR,
            "training_dir": layout.TRAINING_DIR,
            "bundle_dir": layout.BUNDLE_DIR,
        },
        writes={
            "output": layout.MONITOR_REPORT,
            "textfile": layout.MONITOR_GAUGES,
            "report_file": layout.MONITOR_PAGE,
            "docs_dir": layout.MONITOR_DOCS,
        },
    ),
    StepContract(
        "online_store",
        ("features", "feast"),
        inputs=("features",),
        reads={"features_dir": layout.FEATURES_DIR},
    ),
    StepContract(
        "search",
        ("seed", "search", "pipeline", "models", "training"),
        inputs=("training_sets",),
        outputs=("search",),
        reads={"training_dir": layout.TRAINING_DIR},
        writes={"output": layout.SEARCH_REPORT},
    ),
    # train's files are per model (layout.model_dir / model_metrics / model_plot)
    StepContract(
        "train",
        ("pipeline", "models", "training"),
        inputs=("training_sets",),
        outputs=("model", "metrics", "curves"),
        reads={"training_dir": layout.TRAINING_DIR},
    ),
    StepContract(
        "evaluate",
        ("evaluation", "feast", "training"),
        inputs=("features", "training_sets", "models"),
        outputs=("evaluation",),
        reads={
            "training_dir": layout.TRAINING_DIR,
            "models_dir": layout.MODELS_DIR,
            "features_dir": layout.FEATURES_DIR,
        },
        writes={"output": layout.EVALUATION},
    ),
    StepContract(
        "export",
        ("feast", "export", "training"),
        inputs=("features", "training_sets", "two_tower"),
        outputs=("exported",),
        reads={
            "training_dir": layout.TRAINING_DIR,
            "model_dir": layout.model_dir(RETRIEVAL_MODEL),
            "features_dir": layout.FEATURES_DIR,
        },
        writes={"out_dir": layout.EMBEDDINGS_DIR, "popular_file": layout.EXPORT_DIR / layout.POPULAR_ITEMS},
    ),
    StepContract(
        "build_index",
        ("seed", "index"),
        inputs=("exported",),
        outputs=("index", "metrics"),
        reads={
            "item_embeddings": layout.EMBEDDINGS_DIR / layout.ITEM_EMBEDDINGS,
            "query_embeddings": layout.EMBEDDINGS_DIR / layout.QUERY_EMBEDDINGS,
        },
        writes={"output": layout.INDEX_DIR / layout.INDEX, "metrics_file": layout.INDEX_METRICS},
    ),
    StepContract(
        "bundle",
        ALL_SECTIONS,
        inputs=("exported", "index", "models", "evaluation"),
        outputs=("bundle",),
        reads={"metrics_file": layout.EVALUATION},
        writes={"out_dir": layout.BUNDLE_DIR},
    ),
    StepContract(
        "gate",
        ("gate", "promote"),
        inputs=("evaluation",),
        outputs=("decision",),
        reads={"metrics_file": layout.EVALUATION},
        writes={"output": layout.GATE_DECISION},
    ),
    StepContract(
        "promote",
        ("promote",),
        inputs=("bundle",),
        outputs=("pointer",),
        reads={"bundle_dir": layout.BUNDLE_DIR},
    ),
    StepContract("deploy", ("pipeline", "promote", "deploy"), inputs=("promoted",), outputs=("manifest",)),
    # the short-cycle pipeline's step (pipelines/index_refresh.py): the promoted bundle grown by new items
    StepContract(
        "index_refresh",
        ("feast", "promote"),
        inputs=("features",),
        outputs=("report",),
        reads={"bundle_dir": layout.BUNDLE_DIR, "features_dir": layout.FEATURES_DIR},
        writes={"out_dir": layout.REFRESHED_BUNDLE_DIR, "metrics_file": layout.INDEX_REFRESH_REPORT},
    ),
)
