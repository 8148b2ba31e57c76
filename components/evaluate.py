"""Evaluate step: every model on the test window, next to the strongest simple baselines fitted on the
same rows and split.

- **Retrieval** (two-tower): full-catalogue Recall@K, NDCG@K and HitRate@K over every item, not a sampled
  candidate set. Each test user is embedded with the features as of their first test event (point in
  time); the relevant items are the ones they click in the test window; items they clicked before it
  are excluded (``evaluation.exclude_seen``). Baselines: all-time popularity, recent popularity (window
  chosen on the validation split), item-kNN and EASE^R over the user's past clicks (their settings
  chosen on the validation split; EASE^R skipped, saying so, above ``evaluation.ease_max_items``).
- **Ranking**: AUC, GAUC (per-user AUC weighted by impressions) and logloss on every test impression.
  Baselines: the item's smoothed CTR, a logistic regression on user + item one-hot (L2 chosen on
  validation) and LightGBM on the rankers' own features (tree size and rounds chosen on validation);
  the same on the rows of users with a click history (``with_history``).
- **Blend** (what ``recommend`` serves when the two-tower alone loses): the two-tower's list with a share
  of every prefix given to recent popularity or to item-kNN over the user's history feature, source and
  share chosen on validation (``evaluation.blend_sources`` / ``blend_shares``), scored on test as served.

Settings are chosen by fitting on the train split and scoring the validation split; with
``training.refit`` the baselines are then refitted on train + validation, the rows the models were
refitted on, so neither side sees more data than the other. Headline numbers come with percentile
bootstrap intervals over users (``evaluation.bootstrap_samples``, ``evaluation.confidence``), paired
with the best baseline of their kind.

The item catalogue is taken as of the test start: profiles plus the latest statistics snapshot before
it (within the stats TTL), so no test-window click leaks into the item features.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.blend import NeighbourTable
from models.metrics import ItemSets
from models.registry import RANKERS, RETRIEVAL_MODEL
from recsys import artifact_layout as layout
from recsys.artifact_io import read_json, write_json
from recsys.bundle_blend import HISTORY_FEATURE, NEIGHBOURS_MEMBER
from recsys.catalogue import item_catalogue
from recsys.config import EvaluationConfig
from recsys.contracts import TIMESTAMP
from recsys.step_contract import STEPS, StepParams
from recsys.training_data import MANIFEST, read_split, test_start_of

CONTRACT = STEPS["evaluate"]

RETRIEVAL_BASELINES = ("popularity", "recent_popularity", "item_knn", "ease")
BLEND = "two_tower_blend"  # the two-tower blended with recent popularity or item-kNN (models/blend.py)
RANKING_BASELINES = ("item_ctr_baseline", "logistic_regression_baseline", "gbdt_baseline")

log = logging.getLogger(__name__)


def run(
    params: StepParams,
    training_dir: str | Path,
    models_dir: str | Path,
    features_dir: str | Path,
    output: str | Path,
) -> dict[str, Any]:
    """Write ``output`` (metrics/evaluation.json) with retrieval and ranking metrics next to their
    baselines."""
    training_dir, models_dir, features_dir = Path(training_dir), Path(models_dir), Path(features_dir)
    cfg, refit, seed = params.evaluation, params.training.refit, params.training.seed
    ranking_test = read_split(training_dir, "ranking", "test")
    test_start = test_start_of(training_dir)
    catalogue = item_catalogue(features_dir, test_start, params.feast.ttl_days.item_stats)

    report: dict[str, Any] = {
        "test_start": test_start.isoformat(),
        "catalogue_items": len(catalogue),
        "fitted_on": "train+valid" if refit else "train",
    }
    task = retrieval_task(training_dir, ranking_test, catalogue, cfg.ks, cfg.exclude_seen)
    blend = BlendSource(features_dir, params.training, params.feast.ttl_days.item_stats)
    report["retrieval"] = evaluate_retrieval(
        layout.model_dir(RETRIEVAL_MODEL, models_dir),
        training_dir,
        task,
        cfg,
        refit=refit,
        seed=seed,
        blend=blend if cfg.blend_shares else None,
        neighbours_file=Path(output).with_name(NEIGHBOURS_MEMBER),
    )
    report["ranking"] = evaluate_rankers(
        models_dir, training_dir, ranking_test, params.training.eval_batch_size, cfg, refit=refit, seed=seed
    )
    report["intervals_by_metric"] = intervals_by_metric(report)
    write_json(report, output)
    log.info("evaluate: %s", json.dumps(report, indent=1))
    return report


def intervals_by_metric(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The bootstrap intervals keyed by the dotted metric path the gate reads (``gate.metrics``):
    ``retrieval.<model>.recall@<headline_k>`` and ``ranking.<model>.auc``."""
    retrieval, ranking = report["retrieval"]["intervals"], report["ranking"]["intervals"]
    return {
        **{f"retrieval.{name}.{retrieval['metric']}": value for name, value in retrieval["mean"].items()},
        **{f"ranking.{name}.auc": value for name, value in ranking["auc"].items()},
    }


# ---- retrieval -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalTask:
    """The test-window retrieval problem every retriever is scored on: the test users (features as of
    their first test event), the catalogue, their test clicks (``relevant``), their clicks before the
    test window (``history``, what item-kNN and EASE^R score from) and the items not to rank for them."""

    users: pd.DataFrame
    catalogue: pd.DataFrame
    relevant: ItemSets
    history: ItemSets
    exclude: ItemSets | None
    ks: list[int]


def retrieval_task(
    training_dir: Path, ranking_test: pd.DataFrame, catalogue: pd.DataFrame, ks: list[int], exclude_seen: bool
) -> RetrievalTask:
    from models.retrieval_baselines import history_sets

    positives = read_split(training_dir, "retrieval", "test")
    past = pd.concat(
        [read_split(training_dir, "retrieval", s)[["user_id", "item_id"]] for s in ("train", "valid")]
    )
    first_rows = ranking_test.sort_values([TIMESTAMP, "row_id"]).drop_duplicates("user_id")
    users = first_rows[first_rows["user_id"].isin(positives["user_id"])].reset_index(drop=True)
    items = catalogue["item_id"].to_numpy()
    user_ids = users["user_id"].to_numpy()
    relevant = history_sets(positives, user_ids, items)
    history = history_sets(past, user_ids, items)
    return RetrievalTask(users, catalogue, relevant, history, history if exclude_seen else None, list(ks))


def two_tower_topk(model_dir: Path, task: RetrievalTask) -> np.ndarray:
    """The two-tower's full-catalogue top max(ks) for every test user."""
    from models import full_catalogue_topk, load_model

    model, encoder = load_model(model_dir)
    user_emb = model.user_embeddings(encoder.encode(task.users, features=model.user_feature_names()))
    item_emb = model.item_embeddings(encoder.encode(task.catalogue, features=model.item_feature_names()))
    return full_catalogue_topk(user_emb, item_emb, max(task.ks), task.exclude)


def model_retrieval_metrics(model_dir: Path, task: RetrievalTask) -> dict[str, float]:
    """One two-tower's full-catalogue metrics on ``task`` (e.g. an ablation's variant)."""
    from models import retrieval_metrics

    return retrieval_metrics(two_tower_topk(model_dir, task), task.relevant, task.ks)


def evaluate_retrieval(
    model_dir: Path,
    training_dir: Path,
    task: RetrievalTask,
    cfg: EvaluationConfig,
    *,
    refit: bool,
    seed: int,
    blend: BlendSource | None = None,
    neighbours_file: Path | None = None,
) -> dict[str, Any]:
    """The two-tower and every retrieval baseline on ``task``, the best baseline at ``headline_k``, the
    two-tower's lift over it and over popularity, bootstrap intervals, and the users with and without
    clicks before the test window separately. With ``blend``, also the two-tower blended with the second
    list (``evaluation.blend_sources``: recent popularity or item-kNN) and share chosen on validation
    (``two_tower_blend``), and what serving needs to apply it (``blend``: source, share, the popularity
    list, refitted like the models). When item_knn is a configured source, the neighbour table of the
    refitted item-kNN is written to ``neighbours_file`` (chosen or not); the bundle step ships it when
    chosen, and the blend is scored with it, so what is measured is what is served."""
    from models import retrieval_metrics
    from models.blend import blend_topk
    from models.bootstrap import user_mean_intervals
    from models.metrics import per_user_retrieval_metrics

    topk = {RETRIEVAL_MODEL: two_tower_topk(model_dir, task)}
    baselines, settings, knn = retrieval_baselines(training_dir, task, cfg, refit=refit)
    topk.update(baselines)
    served = None
    if blend is not None:
        window = settings["recent_popularity"]["window_days"]
        items = task.catalogue["item_id"].to_numpy()
        with_knn = "item_knn" in cfg.blend_sources
        train_table = knn.train.neighbour_table(items, cfg.blend_neighbours) if with_knn else None
        served = choose_blend(model_dir, training_dir, blend, cfg, window, refit=refit, table=train_table)
        if with_knn:  # written whenever configured, chosen or not: the step's outputs follow its config
            if neighbours_file is None:
                raise ValueError("evaluate: evaluation.blend_sources names item_knn but no neighbours_file")
            table = knn.served.neighbour_table(items, cfg.blend_neighbours)
            table.save(neighbours_file)
            served["item_neighbours"] = {
                "items": len(table.item_ids),
                "neighbours": cfg.blend_neighbours,
                "fitted_on": "train+valid" if refit else "train",
            }
        if served["source"] == "item_knn":
            second: Any = knn_lists(table, task.users, task.exclude, items, max(task.ks))
        else:
            second = topk["recent_popularity"]
        topk[BLEND] = blend_topk(topk[RETRIEVAL_MODEL], second, served["share"])
        served["popular_item_ids"] = served_popular_list(training_dir, task, window, cfg.blend_popular_items)
    out: dict[str, Any] = {
        name: retrieval_metrics(ranked, task.relevant, task.ks) for name, ranked in topk.items()
    }
    for name, chosen in settings.items():
        out[name] = out.get(name, {}) | chosen
    metric = f"recall@{cfg.headline_k}"
    best = max(baselines, key=lambda name: out[name][metric])
    if served is not None:
        out[BLEND] |= {
            "source": served["source"],
            "share": served["share"],
            f"valid_recall@{cfg.headline_k}": served["valid_recall"],
        }
        out[BLEND]["lift_over_best_baseline"] = _ratio(out[BLEND][metric], out[best][metric])
        out["blend"] = served
    out["best_baseline"] = best
    out["lift_over_best_baseline"] = {
        f"recall@{k}": _ratio(out[RETRIEVAL_MODEL][f"recall@{k}"], out[best][f"recall@{k}"]) for k in task.ks
    }
    out["lift_over_popularity"] = {
        f"recall@{k}": _ratio(out[RETRIEVAL_MODEL][f"recall@{k}"], out["popularity"][f"recall@{k}"])
        for k in task.ks
    }
    per_user = {
        name: per_user_retrieval_metrics(topk[name], task.relevant, [cfg.headline_k])[metric]
        for name in (RETRIEVAL_MODEL, best, *([BLEND] if BLEND in topk else []))
    }
    out["intervals"] = {
        "metric": metric,
        **user_mean_intervals(
            per_user, best, samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed
        ),
    }
    out["segments"] = user_segments(per_user, task.history)
    head = head_items(training_dir, task.catalogue["item_id"].to_numpy(), cfg.head_item_share)
    for segment, keep in (("head_items", head), ("tail_items", ~head)):
        relevant = task.relevant.restricted_to(keep)
        scores = {
            name: per_user_retrieval_metrics(topk[name], relevant, [cfg.headline_k])[metric]
            for name in per_user
        }
        out["segments"][segment] = {"items": int(keep.sum()), **_segment_means(scores)}
    out["users"] = len(task.users)
    out["exclude_seen"] = task.exclude is not None
    return out


@dataclass(frozen=True)
class BlendSource:
    """What choosing the blend on validation needs besides the evaluation section: the item features (the
    validation catalogue), the training section (to train the two-tower's train-only twin when the
    evaluated one was refitted on train + valid) and the item statistics' TTL."""

    features_dir: Path
    training: Any  # models.config.TrainingConfig
    stats_ttl_days: float


def choose_blend(
    model_dir: Path,
    training_dir: Path,
    source: BlendSource,
    cfg: EvaluationConfig,
    window_days: int | None,
    *,
    refit: bool,
    table: NeighbourTable | None = None,
) -> dict[str, Any]:
    """The second list (``evaluation.blend_sources``) and the share of retrieval slots given to it
    (``evaluation.blend_shares``) with the best validation recall@headline_k (ties: the earlier source,
    the smaller share): the two-tower trained on the train split only (the saved one when it was not
    refitted, else its train-only twin, :func:`train_only_two_tower`) ranks the validation catalogue for
    every validation user; the recent-popularity list (the chosen window, counted on train at the
    validation start) or item-kNN's list (``table``, fitted on train, over the user's history feature as
    of their first validation event, as serving scores it) fills the share; none of them lists the
    user's train clicks when ``exclude_seen``."""
    from models import full_catalogue_topk, load_model
    from models.blend import choose_share, choose_source
    from models.retrieval_baselines import history_sets, popularity_scores

    train, valid = (read_split(training_dir, "retrieval", s) for s in ("train", "valid"))
    valid_start = pd.Timestamp(read_json(training_dir / MANIFEST)["valid_start"])
    catalogue = item_catalogue(source.features_dir, valid_start, source.stats_ttl_days)
    items = catalogue["item_id"].to_numpy()
    ranking_valid = read_split(training_dir, "ranking", "valid")
    first_rows = ranking_valid.sort_values([TIMESTAMP, "row_id"]).drop_duplicates("user_id")
    users = first_rows[first_rows["user_id"].isin(valid["user_id"])].reset_index(drop=True)
    user_ids = users["user_id"].to_numpy()
    relevant = history_sets(valid, user_ids, items)
    exclude = history_sets(train, user_ids, items) if cfg.exclude_seen else None
    k = min(cfg.headline_k, len(items))

    model, encoder = (
        train_only_two_tower(model_dir, train, source.training) if refit else load_model(model_dir)
    )
    user_emb = model.user_embeddings(encoder.encode(users, features=model.user_feature_names()))
    item_emb = model.item_embeddings(encoder.encode(catalogue, features=model.item_feature_names()))
    model_topk = full_catalogue_topk(user_emb, item_emb, k, exclude)
    window = None if window_days is None else pd.Timedelta(days=window_days)
    popularity = torch.from_numpy(popularity_scores(train, items, valid_start, window))
    popular_topk = full_catalogue_topk(torch.ones(len(users), 1), popularity[:, None], k, exclude)
    choices = {}
    for name in cfg.blend_sources:
        if name == "popularity":
            choices[name] = choose_share(model_topk, popular_topk, relevant, cfg.blend_shares, k)
        else:
            if table is None:
                raise ValueError("choose_blend: evaluation.blend_sources names item_knn but no table given")
            lists = knn_lists(table, users, exclude, items, k)
            choices[name] = choose_share(model_topk, lists, relevant, cfg.blend_shares, k)
    best = choose_source(choices)
    choice = choices[best]
    log.info(
        "evaluate: blend %s share %g chosen on validation (recall@%d %s)",
        best,
        choice.share,
        k,
        {n: c.valid_recall for n, c in choices.items()},
    )
    return {
        "source": best,
        "share": choice.share,
        "window_days": window_days,
        "valid_users": len(users),
        "valid_recall": choice.valid_recall,
        "valid_recall_by_source": {n: c.valid_recall for n, c in choices.items()},
        "two_tower_fitted_on": "train (twin of the refitted model)" if refit else "train",
    }


def knn_lists(
    table: NeighbourTable, users: pd.DataFrame, exclude: ItemSets | None, items: np.ndarray, k: int
) -> list[np.ndarray]:
    """Each user's item-kNN list (catalogue indices of ``items``, best first, up to ``k``) from ``table``
    over their history feature, without their ``exclude`` items: what serving computes per request."""
    if HISTORY_FEATURE not in users.columns:
        raise ValueError(f"the item-kNN blend scores the user feature {HISTORY_FEATURE!r}, absent here")
    index = pd.Index(np.asarray(items, dtype=np.int64))
    out = []
    for row, history in enumerate(users[HISTORY_FEATURE].tolist()):
        excluded = (
            items[exclude.items[exclude.offsets[row] : exclude.offsets[row + 1]]]
            if exclude is not None
            else ()
        )
        ids = table.ranked([] if history is None else history, k, excluded)
        positions = index.get_indexer(np.asarray(ids, dtype=np.int64))
        out.append(positions[positions >= 0])
    return out


def train_only_two_tower(model_dir: Path, train: pd.DataFrame, training: Any) -> tuple[Any, Any]:
    """The saved two-tower's train-only twin: the same architecture, features and training settings,
    trained from its seed on the train split for the epochs its refit used (the early-stopped count), so
    the validation split it is scored on was never trained on; the refitted model has seen it."""
    from models import FeatureEncoder, fit
    from models.registry import seeded_model

    config = json.loads((model_dir / layout.MODEL_CONFIG).read_text())
    refit = (config.get("extra", {}).get("training") or {}).get("refit") or {}
    if "epochs" not in refit:
        raise ValueError(
            f"{model_dir}: the two-tower records no refit epochs; it cannot be re-trained on train"
        )
    spec = FeatureEncoder.from_dict(config["features"]).spec
    encoder, model, settings = seeded_model(config["kind"], spec, config["model_config"], training, train)
    fit(
        model,
        encoder.encode(train),
        None,
        settings.model_copy(update={"epochs": int(refit["epochs"])}),
        progress=False,
    )
    return model.eval(), encoder


def served_popular_list(
    training_dir: Path, task: RetrievalTask, window_days: int | None, n: int
) -> list[int]:
    """Item ids of the ``n`` most popular catalogue items in the chosen window before the test start,
    counted on train + valid (what the models were refitted on): the list serving blends in."""
    from models.retrieval_baselines import popularity_scores

    clicks = pd.concat([read_split(training_dir, "retrieval", s) for s in ("train", "valid")])
    items = task.catalogue["item_id"].to_numpy()
    window = None if window_days is None else pd.Timedelta(days=window_days)
    scores = popularity_scores(clicks, items, test_start_of(training_dir), window)
    order = np.argsort(-scores, kind="stable")[:n]
    return items[order[scores[order] > 0]].astype(np.int64).tolist()


def user_segments(per_user: dict[str, np.ndarray], history: ItemSets) -> dict[str, dict[str, Any]]:
    """Each entry's mean per-user value over the users with and without clicks before the test window."""
    has_history = history.sizes() > 0
    return {
        segment: _segment_means({name: values[mask] for name, values in per_user.items()})
        for segment, mask in (("with_history", has_history), ("without_history", ~has_history))
    }


def head_items(training_dir: Path, items: np.ndarray, share: float) -> np.ndarray:
    """bool [n_items]: the catalogue's most-clicked ``share`` of items before the test window (the head);
    the rest, items never clicked included, is the tail. Ties at the cut are broken by catalogue order."""
    from models.retrieval_baselines import popularity_scores

    past = pd.concat([read_split(training_dir, "retrieval", s) for s in ("train", "valid")])
    clicks = popularity_scores(past, items, test_start_of(training_dir), None)
    head = np.zeros(len(items), dtype=bool)
    head[np.argsort(-clicks, kind="stable")[: round(share * len(items))]] = True
    return head


def _segment_means(per_user: dict[str, np.ndarray]) -> dict[str, Any]:
    """``users`` with a value (NaN = no relevant item in the segment) and each entry's mean over them."""
    counted = np.isfinite(next(iter(per_user.values())))
    return {
        "users": int(counted.sum()),
        **{name: float(v[counted].mean()) if counted.any() else None for name, v in per_user.items()},
    }


@dataclass(frozen=True)
class FittedKNN:
    """Item-kNN with the settings chosen on validation: fitted on train (what the blend is chosen with)
    and the one scored on test (refitted on train + valid when ``training.refit``; what is served)."""

    train: Any  # models.retrieval_baselines.ItemKNN
    served: Any


def retrieval_baselines(
    training_dir: Path, task: RetrievalTask, cfg: EvaluationConfig, *, refit: bool
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], FittedKNN]:
    """Each retrieval baseline's top max(ks) for the test users, and the settings each one chose on the
    validation split (fitted on train, scored on the validation clicks), then refitted on train + valid
    when ``refit``; and the fitted item-kNN models."""
    from models import full_catalogue_topk
    from models.retrieval_baselines import (
        EASE,
        CatalogueTooLarge,
        ItemKNN,
        ValidationSplit,
        choose_recent_window,
        history_sets,
        popularity_scores,
    )

    train, valid = (read_split(training_dir, "retrieval", s) for s in ("train", "valid"))
    items = task.catalogue["item_id"].to_numpy()
    valid_start = pd.Timestamp(read_json(training_dir / MANIFEST)["valid_start"])
    test_start = test_start_of(training_dir)
    fit_clicks = pd.concat([train, valid], ignore_index=True) if refit else train
    k, hk = max(task.ks), cfg.headline_k
    ones = torch.ones(len(task.users), 1)

    def by_score(scores: np.ndarray) -> np.ndarray:
        return full_catalogue_topk(ones, torch.from_numpy(scores)[:, None], k, task.exclude)

    popularity = popularity_scores(fit_clicks, items, test_start, None)
    topk = {"popularity": by_score(popularity)}
    window = choose_recent_window(
        train, valid, items, valid_start, cfg.recent_windows_days, hk, cfg.exclude_seen
    )
    topk["recent_popularity"] = by_score(popularity_scores(fit_clicks, items, test_start, window.window))
    settings: dict[str, dict[str, Any]] = {
        "recent_popularity": {"window_days": window.days, f"valid_recall@{hk}": window.valid_recall}
    }

    valid_users = np.unique(valid.loc[valid["item_id"].isin(items), "user_id"].to_numpy())
    valid_history = history_sets(train, valid_users, items)
    validation = ValidationSplit(
        valid_history,
        history_sets(valid, valid_users, items),
        valid_history if cfg.exclude_seen else None,
        hk,
    )
    valid_popularity = popularity_scores(train, items, valid_start, None)

    knn = ItemKNN.fit_tuned(train, validation=validation, catalogue_items=items, popularity=valid_popularity)
    train_knn = knn
    if refit:
        knn_recall = knn.valid_recall
        knn = ItemKNN.fit(fit_clicks, items, knn.neighbours, knn.shrink, popularity=popularity)
        knn.valid_recall = knn_recall
    topk["item_knn"] = knn.topk(task.history, k, task.exclude)
    settings["item_knn"] = {
        "neighbours": knn.neighbours,
        "shrink": knn.shrink,
        f"valid_recall@{hk}": knn.valid_recall,
    }
    try:
        ease = EASE.fit_tuned(
            train, validation, items, max_items=cfg.ease_max_items, popularity=valid_popularity
        )
        if refit:
            ease_recall = ease.valid_recall
            ease = EASE.fit(fit_clicks, items, ease.l2, cfg.ease_max_items, popularity=popularity)
            ease.valid_recall = ease_recall
    except CatalogueTooLarge as exc:
        log.warning("evaluate: %s", exc)
        settings["ease"] = {"skipped": str(exc)}
    else:
        topk["ease"] = ease.topk(task.history, k, task.exclude)
        settings["ease"] = {"l2": ease.l2, f"valid_recall@{hk}": ease.valid_recall}
    return topk, settings, FittedKNN(train_knn, knn)


# ---- ranking ---------------------------------------------------------------------------------------


def evaluate_rankers(
    models_dir: Path,
    training_dir: Path,
    ranking_test: pd.DataFrame,
    batch_size: int,
    cfg: EvaluationConfig,
    *,
    refit: bool,
    seed: int,
) -> dict[str, Any]:
    """Each ranker next to the ranking baselines, the best baseline by AUC, each ranker's AUC margin over
    it with a paired bootstrap interval over users; ``with_history`` repeats the AUCs on the test rows
    whose user has a click history (what DIN attends over)."""
    from models import load_model, ranking_metrics
    from models.bootstrap import user_auc_intervals

    labels = ranking_test["label"].to_numpy()
    groups = ranking_test["user_id"].to_numpy()
    out: dict[str, Any] = {"test_rows": len(ranking_test), "test_positive_rate": float(labels.mean())}
    logits: dict[str, np.ndarray] = {}
    spec = None
    for kind in RANKERS:
        model, encoder = load_model(models_dir / kind)
        logits[kind] = model.predict_split(encoder.encode(ranking_test), batch_size)
        spec = encoder.spec
    baseline_logits, settings = ranking_baselines(training_dir, ranking_test, spec, refit=refit, seed=seed)
    logits.update(baseline_logits)
    for name, values in logits.items():
        out[name] = ranking_metrics(labels, values, groups) | settings.get(name, {})
    best = max(baseline_logits, key=lambda name: out[name]["auc"])
    out["best_baseline"] = best
    out["auc_over_best_baseline"] = {kind: out[kind]["auc"] - out[best]["auc"] for kind in RANKERS}
    out["intervals"] = user_auc_intervals(
        labels,
        {name: logits[name] for name in (*RANKERS, best)},
        groups,
        best,
        samples=cfg.bootstrap_samples,
        confidence=cfg.confidence,
        seed=seed,
    )

    has_history = ranking_test["hist_length"].to_numpy() > 0
    out["with_history"] = {"test_rows": int(has_history.sum())}
    if 0 < labels[has_history].sum() < has_history.sum():
        for name, values in logits.items():
            out["with_history"][name] = ranking_metrics(
                labels[has_history], values[has_history], groups[has_history]
            )
    return out


def ranking_baselines(
    training_dir: Path, rows: pd.DataFrame, spec: Any, *, refit: bool, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Each ranking baseline's logits on ``rows`` and the settings it chose on the validation split;
    refitted on train + valid with those settings when ``refit``. ``spec`` is the rankers' feature
    declaration (the trees get the same features)."""
    from models.baselines import OneHotLogisticRegression, item_ctr_logits
    from models.gbdt_baseline import GBDTBaseline, feature_columns

    train, valid = (read_split(training_dir, "ranking", s) for s in ("train", "valid"))
    fit_rows = pd.concat([train, valid], ignore_index=True) if refit else train
    regression = OneHotLogisticRegression.fit_tuned(train, valid)
    if refit:
        regression = OneHotLogisticRegression.fit(fit_rows, regression.l2)
    sparse, dense = feature_columns(spec)
    trees = GBDTBaseline.fit_tuned(train, valid, sparse, dense, seed=seed)
    tuning = trees.tuning
    if refit:
        trees = trees.refit(fit_rows)
    logits = {
        "item_ctr_baseline": item_ctr_logits(fit_rows, rows),
        "logistic_regression_baseline": regression.logits(rows),
        "gbdt_baseline": trees.logits(rows),
    }
    settings = {
        "logistic_regression_baseline": {"l2": regression.l2},
        "gbdt_baseline": {
            "rounds": trees.best_iteration,
            "num_leaves": trees.params["num_leaves"],
            "min_data_in_leaf": trees.params["min_data_in_leaf"],
            "valid_logloss": min(point["valid_logloss"] for point in tuning),
        },
    }
    return logits, settings


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    run(params, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
