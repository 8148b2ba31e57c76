"""The training-set file layout: two sets (one Feast feature service each), three time splits, a manifest.

``<training_dir>/{retrieval,ranking}_{train,valid,test}.parquet`` + ``manifest.json`` (cut points,
history length, entity row counts, feature columns), written by the training_set step and read by
validation, training, evaluation and export.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys.artifact_io import read_json
from recsys.contracts import TIMESTAMP

TRAINING_SETS = ("retrieval", "ranking")  # one Feast FeatureService each


SPLITS = ("train", "valid", "test")


ENTITY_COLUMNS = ["row_id", "user_id", "item_id", TIMESTAMP, "label"]


MANIFEST = "manifest.json"


def read_split(training_dir: str | Path, training_set: str, split: str) -> pd.DataFrame:
    """One split of a training set; a missing file names the step that makes it."""
    path = Path(training_dir) / f"{training_set}_{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: training set not found (run the training_set step first)")
    return pd.read_parquet(path)


def test_start_of(training_dir: str | Path) -> pd.Timestamp:
    """Where the training sets' test window begins (their manifest)."""
    return pd.Timestamp(read_json(Path(training_dir) / MANIFEST)["test_start"])
