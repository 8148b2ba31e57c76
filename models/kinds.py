"""The model kinds, named once: which kinds exist, which task (training set) each serves, which rank.

Every other place — the config sections, the model classes (``models/build.py``), the train step, the
evaluation, the KFP DAG, the serving bundle, the tests — takes the kinds from here; the models and
outputs of ``dvc.yaml``'s ``train`` stage are checked against it by a test.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelKind = Literal["two_tower", "multi_tower", "multi_tower_din", "dlrm"]
RankerKind = Literal["multi_tower", "multi_tower_din", "dlrm"]
Task = Literal["retrieval", "ranking"]

MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
RANKERS: tuple[str, ...] = get_args(RankerKind)
RETRIEVAL_MODEL = "two_tower"
# the training set (Feast feature service) each kind trains and is evaluated on
TASK_OF: dict[str, Task] = {kind: "ranking" if kind in RANKERS else "retrieval" for kind in MODEL_KINDS}
