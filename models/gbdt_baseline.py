"""Gradient-boosted-tree (LightGBM) CTR baseline, reported next to the neural rankers
(components/evaluate.py).

It gets the same features the rankers get (``models.features`` in params.yaml):

- the **sparse** features (user_id, item_id, gender, ...) become pandas ``category`` columns whose
  categories are learnt from the TRAIN frame only; a value never seen in train (a new user, a new
  category) is missing (NaN) and takes the missing-value branch of every categorical split, exactly like
  a NaN in that column;
- the **dense** features are float64 columns, untransformed (trees do not need log1p or standardising);
- the **sequence** features (list columns) are not used directly: they enter through their target-free
  numeric summaries that are already dense features (``hist_length``).

:meth:`GBDTBaseline.fit` trains a binary-logloss booster with early stopping on the validation logloss;
:meth:`GBDTBaseline.fit_tuned` picks one of a few tree-size settings by validation logloss;
:meth:`GBDTBaseline.logits` gives raw scores (log-odds) at the best iteration; :meth:`GBDTBaseline.refit`
retrains on train + valid with the chosen parameters and the best iteration count. Training is
deterministic for a given seed and thread count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

LABEL = "label"

# Defaults for ~300k impressions with two high-cardinality id columns (user_id, item_id: thousands of
# values). A categorical split on an id sorts its values by gradient statistics, which overfits rare ids:
# cat_smooth / cat_l2 shrink a value's statistics towards the prior, min_data_per_group and
# max_cat_threshold bound how many (and how rare) values one split may group; low-cardinality columns
# (gender) are one-hot split.
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "lambda_l2": 1.0,
    "max_bin": 255,
    "max_cat_to_onehot": 4,
    "max_cat_threshold": 16,
    "cat_smooth": 50.0,
    "cat_l2": 10.0,
    "min_data_per_group": 200,
    "num_threads": 2,
    "deterministic": True,
    "force_col_wise": True,
    "verbosity": -1,
}

# fit_tuned's default grid: the default tree and two larger ones with larger leaves (on the project's
# ~300k training impressions the last one had the best validation logloss; each fit takes 5-15 s)
DEFAULT_GRID: tuple[dict[str, Any], ...] = (
    {"num_leaves": 31, "min_data_in_leaf": 50},
    {"num_leaves": 63, "min_data_in_leaf": 100},
    {"num_leaves": 63, "min_data_in_leaf": 200},
)


def feature_columns(spec: Any) -> tuple[list[str], list[str]]:
    """``(sparse, dense)`` column names of a :class:`models.config.FeatureSpec` (``params.models.features``).
    Sequence features are left out: their numeric summaries (hist_length) are dense features already."""
    return [f.name for f in spec.sparse], [f.name for f in spec.dense]


@dataclass
class GBDTBaseline:
    """A LightGBM binary classifier on the rankers' sparse (categorical) and dense features."""

    booster: lgb.Booster
    sparse: tuple[str, ...]
    dense: tuple[str, ...]
    categories: dict[str, pd.Index]  # per sparse column: the values seen in the training frame
    params: dict[str, Any]  # every LightGBM parameter the booster was trained with
    best_iteration: int  # trees kept and used by logits(): the best validation round
    valid_logloss: float | None  # validation logloss at best_iteration; None after refit (no holdout)
    rounds_trained: int  # rounds boosted before early stopping (the trees after best_iteration are dropped)
    tuning: list[dict[str, Any]] = field(default_factory=list)  # fit_tuned: one entry per grid point

    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        valid: pd.DataFrame,
        sparse: Sequence[str],
        dense: Sequence[str],
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        max_rounds: int = 2000,
        early_stopping: int = 50,
    ) -> GBDTBaseline:
        """Train on ``train`` for at most ``max_rounds`` rounds, stopping when the logloss on ``valid`` has
        not improved for ``early_stopping`` rounds. ``params`` override :data:`DEFAULT_PARAMS`."""
        sparse, dense = _feature_lists(sparse, dense)
        _check_columns(train, [*sparse, *dense, LABEL], "train")
        _check_columns(valid, [*sparse, *dense, LABEL], "valid")
        if max_rounds < 1 or early_stopping < 1:
            raise ValueError(f"max_rounds ({max_rounds}) and early_stopping ({early_stopping}) must be >= 1")
        full = _params(params, seed)
        categories = _learn_categories(train, sparse)
        train_set = _dataset(train, sparse, dense, categories, "train", full)
        valid_set = _dataset(valid, sparse, dense, categories, "valid", full, reference=train_set)
        rounds = [0]

        def count_rounds(env: Any) -> None:
            rounds[0] = env.iteration + 1

        booster = lgb.train(
            full,
            train_set,
            num_boost_round=max_rounds,
            valid_sets=[valid_set],
            valid_names=["valid"],
            callbacks=[
                count_rounds,
                lgb.early_stopping(early_stopping, first_metric_only=True, verbose=False),
            ],
        )
        best = int(booster.best_iteration) or booster.current_iteration()
        loss = float(booster.best_score["valid"]["binary_logloss"])
        return cls(booster, sparse, dense, categories, full, best, loss, rounds[0])

    @classmethod
    def fit_tuned(
        cls,
        train: pd.DataFrame,
        valid: pd.DataFrame,
        sparse: Sequence[str],
        dense: Sequence[str],
        grid: Sequence[Mapping[str, Any]] = DEFAULT_GRID,
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        max_rounds: int = 2000,
        early_stopping: int = 50,
    ) -> GBDTBaseline:
        """The :meth:`fit` with the lowest validation logloss over ``grid`` (each entry overrides ``params``);
        ties go to the earlier grid entry. Every grid point's result is kept in ``tuning``."""
        if not grid:
            raise ValueError("fit_tuned: the grid is empty")
        best: GBDTBaseline | None = None
        tuning: list[dict[str, Any]] = []
        for point in grid:
            model = cls.fit(
                train,
                valid,
                sparse,
                dense,
                params={**(params or {}), **point},
                seed=seed,
                max_rounds=max_rounds,
                early_stopping=early_stopping,
            )
            assert model.valid_logloss is not None
            tuning.append(
                {
                    "params": dict(point),
                    "valid_logloss": model.valid_logloss,
                    "best_iteration": model.best_iteration,
                }
            )
            if best is None or model.valid_logloss < best.valid_logloss:  # type: ignore[operator]
                best = model
        assert best is not None
        best.tuning = tuning
        return best

    def refit(self, train_and_valid: pd.DataFrame) -> GBDTBaseline:
        """A new model trained on ``train_and_valid`` with the same parameters for ``best_iteration``
        rounds (no early stopping: there is no holdout left). Categories are learnt from this frame."""
        _check_columns(train_and_valid, [*self.sparse, *self.dense, LABEL], "train_and_valid")
        categories = _learn_categories(train_and_valid, self.sparse)
        data = _dataset(train_and_valid, self.sparse, self.dense, categories, "train_and_valid", self.params)
        booster = lgb.train(self.params, data, num_boost_round=self.best_iteration)
        return replace(
            self,
            booster=booster,
            categories=categories,
            valid_logloss=None,
            rounds_trained=self.best_iteration,
        )

    def encode(self, rows: pd.DataFrame, frame: str = "rows") -> pd.DataFrame:
        """The model's input frame: sparse columns as ``category`` with the training categories (unseen
        values -> NaN), dense columns as float64, in the training column order."""
        _check_columns(rows, [*self.sparse, *self.dense], frame)
        return _features(rows, self.sparse, self.dense, self.categories)

    def logits(self, rows: pd.DataFrame) -> np.ndarray:
        """Raw scores (log-odds, float64 [N]) at ``best_iteration``."""
        scores = self.booster.predict(self.encode(rows), num_iteration=self.best_iteration, raw_score=True)
        return np.asarray(scores, dtype=np.float64)

    def feature_importance(self, kind: str = "gain") -> pd.Series:
        """Per-feature importance (``gain`` or ``split``) over the trees logits() uses, largest first."""
        values = self.booster.feature_importance(kind, iteration=self.best_iteration)
        return pd.Series(values, index=self.booster.feature_name()).sort_values(ascending=False)


def _feature_lists(sparse: Sequence[str], dense: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(sparse, str) or isinstance(dense, str):
        raise TypeError("sparse and dense are sequences of column names, not a single string")
    sparse, dense = tuple(sparse), tuple(dense)
    names = [*sparse, *dense]
    if not names:
        raise ValueError("GBDTBaseline needs at least one feature")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"features listed more than once (sparse and dense together): {duplicated}")
    if LABEL in names:
        raise ValueError(f"'{LABEL}' is the target, not a feature")
    return sparse, dense


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"GBDTBaseline: the {name} frame has no column(s) {missing}")


def _params(overrides: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    full = {**DEFAULT_PARAMS, **(overrides or {})}
    full["seed"] = seed
    if full.get("objective") != "binary":
        raise ValueError(f"GBDTBaseline is a binary (CTR) model; objective {full.get('objective')!r}")
    return full


def _learn_categories(train: pd.DataFrame, sparse: Sequence[str]) -> dict[str, pd.Index]:
    categories = {}
    for name in sparse:
        values = pd.Index(pd.unique(train[name].dropna()))
        with suppress(TypeError):  # sorted, so the encoding does not depend on row order (mixed types: not)
            values = values.sort_values()
        categories[name] = values
    return categories


def _features(
    rows: pd.DataFrame, sparse: Sequence[str], dense: Sequence[str], categories: Mapping[str, pd.Index]
) -> pd.DataFrame:
    columns: dict[str, Any] = {}
    for name in sparse:
        columns[name] = pd.Categorical(rows[name].to_numpy(), categories=categories[name])
    for name in dense:
        columns[name] = pd.to_numeric(rows[name]).to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(rows)))


def _dataset(
    frame: pd.DataFrame,
    sparse: Sequence[str],
    dense: Sequence[str],
    categories: Mapping[str, pd.Index],
    name: str,
    params: Mapping[str, Any],
    reference: lgb.Dataset | None = None,
) -> lgb.Dataset:
    labels = frame[LABEL].to_numpy()
    if len(labels) == 0:
        raise ValueError(f"GBDTBaseline: the {name} frame is empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"GBDTBaseline: the {name} frame's '{LABEL}' must be 0/1")
    return lgb.Dataset(
        _features(frame, sparse, dense, categories),
        label=labels.astype(np.float64),
        categorical_feature=list(sparse),
        reference=reference,
        params=dict(params),
        free_raw_data=True,
    )
