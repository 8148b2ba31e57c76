"""The artifact layout and the model kinds are said once: dvc.yaml, the model registry, the config
sections and the bundle agree with recsys/artifact_layout.py and the model registry."""

from __future__ import annotations

import pytest
import yaml

from models.registry import MODEL_KINDS, MODELS, RANKERS, RETRIEVAL_MODEL, TASK_OF, ModelsConfig
from recsys import artifact_layout as layout
from tests.conftest import REPO_ROOT

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_the_models_section_is_derived_from_the_model_classes():
    assert list(ModelsConfig.model_fields) == ["features", *MODEL_KINDS]
    for kind, cls in MODELS.items():
        assert cls.kind == kind and ModelsConfig.model_fields[kind].annotation is cls.config_class
    assert set(RANKERS) | {RETRIEVAL_MODEL} == set(MODEL_KINDS)
    assert {kind for kind, task in TASK_OF.items() if task == "ranking"} == set(RANKERS)


def test_dvc_trains_every_kind_into_the_layout():
    train = DVC["train"]
    named = train["cmd"].split("--model", 1)[1].split("--")[0].split()
    assert sorted(named) == sorted(MODEL_KINDS)
    declared = [
        next(iter(out)) if isinstance(out, dict) else out
        for key in ("outs", "plots", "metrics")
        for out in train[key]
    ]
    for kind in MODEL_KINDS:
        for name in layout.MODEL_FILES:
            assert str(layout.model_dir(kind) / name) in declared, (kind, name)
        assert f"metrics/{kind}.json" in declared and f"plots/{kind}.png" in declared


@pytest.mark.parametrize(
    ("stage", "folders"),
    [
        ("export", [layout.EMBEDDINGS_DIR, layout.EXPORT_DIR / layout.POPULAR_ITEMS]),
        ("build_index", [layout.INDEX_DIR]),
        ("bundle", [layout.BUNDLE_DIR]),
    ],
)
def test_dvc_outputs_are_the_layouts(stage, folders):
    outs = [next(iter(out)) if isinstance(out, dict) else out for out in DVC[stage]["outs"]]
    assert [str(folder) for folder in folders] == outs


def test_bundle_members_hold_every_model_and_name_a_missing_one():
    members = layout.bundle_members()
    for kind in MODEL_KINDS:
        for name in layout.MODEL_FILES:
            assert members[layout.bundle_model_file(kind, name)] == layout.model_dir(kind) / name
    assert members[layout.INDEX_SIDECAR].parent == layout.INDEX_DIR
    with pytest.raises(ValueError, match="no model folder for"):
        layout.bundle_members(model_dirs={RETRIEVAL_MODEL: "x"})
