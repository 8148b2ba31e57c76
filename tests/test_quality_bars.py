"""The models' quality bars on the ``small`` preset (the default's shape at about a third of its size),
through the real steps: ingest, features, Feast training sets, training, evaluate.

- the two-tower's full-catalogue Recall@50 is at least 2x the popularity baseline's;
- log-Q correction beats plain in-batch softmax on the skewed catalogue;
- every ranker's AUC is clearly above the item-CTR baseline's, and MultiTowerDIN's above MultiTower's
  (the planted sequential dependence is what DIN attention is for).

``dvc repro`` reports the same numbers in full for the default preset (metrics/evaluation.json).
"""

from __future__ import annotations

import pytest

from models.registry import RANKERS
from tests.conftest import REPO_ROOT, build_training_sets, pipeline_workdir, train_and_evaluate

pytestmark = pytest.mark.slow


AUC_MARGIN = 0.01  # "clearly above": at least this much AUC over the item-CTR baseline


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> dict:
    from components import evaluate, train
    from recsys import artifact_layout as layout
    from recsys import catalogue, training_data
    from recsys.config import load_params
    from recsys.step_contract import STEPS
    from recsys.training_data import read_split

    with pipeline_workdir(tmp_path_factory.mktemp("small")):
        params = load_params(REPO_ROOT / "params.yaml", overrides={"data.synthetic.preset": "small"})
        build_training_sets(params)
        report = train_and_evaluate(params)
        # the same two-tower without log-Q correction, evaluated on the same split and catalogue
        plain = load_params(
            REPO_ROOT / "params.yaml",
            overrides={"data.synthetic.preset": "small", "models.two_tower.logq_correction": False},
        )
        plain_dir = layout.model_dir("plain")
        train.run(
            "two_tower",
            STEPS["train"].scope(plain),
            layout.TRAINING_DIR,
            plain_dir,
            layout.model_metrics("plain"),
            layout.model_plot("plain"),
        )
        training_dir = layout.TRAINING_DIR
        catalogue = catalogue.item_catalogue(
            layout.FEATURES_DIR,
            training_data.test_start_of(training_dir),
            params.feast.ttl_days.item_stats,
        )
        task = evaluate.retrieval_task(
            training_dir,
            read_split(training_dir, "ranking", "test"),
            catalogue,
            params.evaluation.ks,
            params.evaluation.exclude_seen,
        )
        report["plain_in_batch"] = evaluate.model_retrieval_metrics(plain_dir, task)
    return report


def test_two_tower_recall_at_50_is_at_least_twice_popularity(small_run):
    retrieval = small_run["retrieval"]
    two_tower, popularity = retrieval["two_tower"]["recall@50"], retrieval["popularity"]["recall@50"]
    assert two_tower >= 2.0 * popularity, (two_tower, popularity)


def test_logq_correction_beats_plain_in_batch_softmax(small_run):
    corrected = small_run["retrieval"]["two_tower"]["recall@50"]
    plain = small_run["plain_in_batch"]["recall@50"]
    assert corrected > 1.1 * plain, (corrected, plain)  # measured: 0.326 vs 0.276 (benchmarks: logq_ablation)


@pytest.mark.parametrize("ranker", RANKERS)
def test_each_ranker_is_clearly_above_the_item_ctr_baseline(small_run, ranker):
    ranking = small_run["ranking"]
    assert ranking[ranker]["auc"] >= ranking["item_ctr_baseline"]["auc"] + AUC_MARGIN, ranking


def test_din_attention_beats_multi_tower(small_run):
    ranking = small_run["ranking"]
    assert ranking["multi_tower_din"]["auc"] > ranking["multi_tower"]["auc"], ranking
    assert ranking["multi_tower_din"]["gauc"] > ranking["multi_tower"]["gauc"], ranking
