"""The component wrappers (pipelines/steps.py), called in-process on the real steps; artifacts are plain
directories, as kfp.local makes them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from models.registry import MODEL_KINDS
from recsys import artifact_layout as layout


class FakeArtifact(SimpleNamespace):
    """What a KFP executor hands a component: a local ``path``, a ``uri``, and ``log_metric``."""

    def __init__(self, path: Path):
        super().__init__(path=str(path), uri=str(path), metadata={})

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


def _unit_rows(rng, n: int, dim: int):
    import numpy as np

    rows = rng.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_downstream_wrappers_drive_the_real_steps_on_artifact_paths(tmp_path, params, s3_env):
    """export's artifact -> build_index -> bundle -> gate -> promote -> deploy (dry run), as the DAG wires
    them."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipelines import steps
    from pipelines.recsys_training import params_as_text
    from recsys.bundle_manifest import load_manifest

    rng = np.random.default_rng(0)
    exported = tmp_path / "export" / "exported"
    exported.mkdir(parents=True)
    names = {layout.ITEM_EMBEDDINGS: "item_ids", layout.QUERY_EMBEDDINGS: "user_ids"}
    for file, id_key in names.items():
        save_file(
            {id_key: np.arange(500, dtype=np.int64), "embeddings": _unit_rows(rng, 500, 16)},
            str(exported / file),
        )
    evaluation = tmp_path / "evaluate" / "evaluation"
    evaluation.parent.mkdir()
    metrics: dict[str, Any] = {}
    for dotted in params.gate.metrics:  # a value for every metric the gate judges, wherever config puts it
        *parents, leaf = dotted.split(".")
        node = metrics
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = 0.7
    evaluation.write_text(json.dumps(metrics))
    (exported / layout.POPULAR_ITEMS).write_text(json.dumps({"item_ids": [1, 2], "scores": [2.0, 1.0]}))
    params = params.model_copy(deep=True)
    store = params.promote.uri = s3_env.uri("bundles")
    # what configure hands each task: its step's sections of the run's configuration
    config = steps.configure(
        params_as_text(params), params.data.source, params.pipeline.accelerator_type, params.deploy.namespace
    )
    art = {
        name: FakeArtifact(tmp_path / name / name)
        for name in ("index", "index_metrics", "bundle", "decision", "pointer", "isvc")
    }
    models = {kind: FakeArtifact(tmp_path / "train" / kind) for kind in MODEL_KINDS}
    for model in models.values():  # stand-ins for trained models: training is run-local's business
        Path(model.path).mkdir(parents=True)
        save_file({"weight": _unit_rows(rng, 4, 4)}, str(Path(model.path) / layout.MODEL_WEIGHTS))
        (Path(model.path) / layout.MODEL_CONFIG).write_text(json.dumps({"kind": "stand-in"}))

    steps.build_index(
        config.build_index, exported=FakeArtifact(exported), index=art["index"], metrics=art["index_metrics"]
    )
    assert (Path(art["index"].path) / layout.INDEX).is_file()
    assert art["index_metrics"].metadata  # the index metrics reach the UI
    steps.bundle(
        config.bundle,
        FakeArtifact(exported),
        art["index"],
        evaluation=FakeArtifact(evaluation),
        bundle=art["bundle"],
        **models,
    )
    manifest = load_manifest(art["bundle"].path)  # verifies every checksum
    assert set(manifest["files"]) == set(layout.bundle_members())  # each member from its task's artifact
    assert manifest["metrics"] == metrics  # the evaluation travels with the bundle
    # gate -> promote -> deploy against the object store (a real S3 server on loopback)
    assert steps.gate(config.gate, evaluation=FakeArtifact(evaluation), decision=art["decision"]) is True
    assert art["decision"].metadata["passed"] == 1.0
    assert json.loads(Path(art["decision"].path).read_text())["first_deploy"] is True  # nothing promoted
    uri = steps.promote(config.promote, bundle=art["bundle"], pointer=art["pointer"])
    assert uri == f"{store}/{manifest['version']}/"
    assert json.loads(Path(art["pointer"].path).read_text())["uri"] == uri
    assert steps.deploy(config.deploy, promoted=art["pointer"], dry_run=True, manifest=art["isvc"]) == ""
    isvc = yaml.safe_load(Path(art["isvc"].path).read_text())
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == uri  # the InferenceService serves the promoted version
    # the next run is gated against the promoted bundle: a worse model is refused
    evaluation.write_text(json.dumps(json.loads(json.dumps(metrics).replace("0.7", "0.5"))))
    assert steps.gate(config.gate, evaluation=FakeArtifact(evaluation), decision=art["decision"]) is False
