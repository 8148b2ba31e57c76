"""The objects ``feast apply`` registers from this folder, built from the project's params.yaml.

``feast -c feature_repo apply`` (or ``cd feature_repo && feast apply``) imports this module; the
training-set step registers the same objects programmatically (components/training_set.py), so both
agree on sources, TTLs and services. Source paths are absolute (the layout's feature tables resolved
against the project root), so the repo works from any working directory.
"""

from pathlib import Path

from recsys.artifact_layout import FEATURES_DIR
from recsys.config import load_params
from recsys.feature_store import feature_repo

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_params = load_params(_PROJECT_ROOT / "params.yaml")
_repo = feature_repo(_params.feast, _params.features, _PROJECT_ROOT / FEATURES_DIR)

user = _repo.entities["user"]
item = _repo.entities["item"]

user_profile = _repo.views["user_profile"]
user_history = _repo.views["user_history"]
user_stats = _repo.views["user_stats"]
item_profile = _repo.views["item_profile"]
item_stats = _repo.views["item_stats"]

retrieval = _repo.services["retrieval"]
ranking = _repo.services["ranking"]
