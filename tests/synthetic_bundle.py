"""A real serving bundle from synthetic data, built with the project's own steps (index, bundle).

The serving tests and the serving benchmarks need a bundle before a pipeline run has made one: the frame
has the training contract's columns and types, so the models, the index and the manifest are the ones a
run would produce, only with random values (untrained models are enough to time and exercise serving).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models.registry import MODEL_KINDS, RETRIEVAL_MODEL, model_class
from recsys.config import Params

ROOT = Path(__file__).resolve().parents[1]


def build_serving_bundle(
    train: pd.DataFrame,
    catalogue: pd.DataFrame,
    params: Params,
    out_dir: Path,
    work_dir: Path,
    train_steps: int = 0,
) -> Path:
    """Encoder fitted on ``train``, the two-tower and the three rankers (``train_steps`` Adam steps each,
    0 = initial weights), item embeddings of ``catalogue``, the index step, the bundle step."""
    import torch
    from safetensors.numpy import save_file

    from components import build_index
    from components.bundle import assemble_bundle
    from models import FeatureEncoder, build_model, save_model

    torch.manual_seed(params.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    encoder = FeatureEncoder.fit(params.models.features, train)
    batch = encoder.encode(train)
    files: dict[str, Path] = {}
    two_tower = None
    for kind in MODEL_KINDS:
        fitted = model_class(kind).fitted_inputs(encoder, train)
        model = build_model(kind, params.models.model(kind), encoder, **fitted)
        model.prepare(batch)
        if train_steps:
            optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
            model.train()
            for step in range(train_steps):
                rows = torch.randint(
                    0, len(train), (min(256, len(train)),), generator=torch.Generator().manual_seed(step)
                )
                loss = model.loss({k: v[rows] for k, v in batch.items()})
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        save_model(model, encoder, params.models.model(kind), work_dir / "models" / kind)
        for name in ("model.safetensors", "config.json"):
            files[f"models/{kind}/{name}"] = work_dir / "models" / kind / name
        if kind == RETRIEVAL_MODEL:
            two_tower = model
    assert two_tower is not None
    with torch.inference_mode():
        item_batch = encoder.encode(catalogue, features=two_tower.item_feature_names())
        vectors = torch.cat(
            [
                two_tower.item_embedding({k: v[s : s + 8192] for k, v in item_batch.items()})
                for s in range(0, len(catalogue), 8192)
            ]
        ).numpy()
        users = train.drop_duplicates("user_id", keep="last")
        user_vectors = two_tower.user_embedding(
            encoder.encode(users, features=two_tower.user_feature_names())
        ).numpy()
    save_file(
        {"item_ids": catalogue["item_id"].to_numpy(np.int64), "embeddings": vectors.astype(np.float32)},
        str(work_dir / "item_embeddings.safetensors"),
    )
    save_file(
        {"user_ids": users["user_id"].to_numpy(np.int64), "embeddings": user_vectors.astype(np.float32)},
        str(work_dir / "user_embeddings.safetensors"),
    )
    build_index.run(
        params.index,
        params.seed,
        item_embeddings=work_dir / "item_embeddings.safetensors",
        query_embeddings=work_dir / "user_embeddings.safetensors",
        output=work_dir / "items.faiss",
        metrics_file=work_dir / "index_metrics.json",
    )
    clicks = train[train["label"] == 1]["item_id"].value_counts().head(1000)
    popular = {"item_ids": clicks.index.astype(int).tolist(), "scores": [float(c) for c in clicks.to_numpy()]}
    (work_dir / "popular_items.json").write_text(json.dumps(popular))
    files.update(
        {
            "item_embeddings.safetensors": work_dir / "item_embeddings.safetensors",
            "items.faiss": work_dir / "items.faiss",
            "items.faiss.json": work_dir / "items.faiss.json",
            "popular_items.json": work_dir / "popular_items.json",
        }
    )
    return assemble_bundle(
        files,
        out_dir,
        params_text=(ROOT / "params.yaml").read_text(),
        metrics={},
        embedding_dims={f"models/{RETRIEVAL_MODEL}": int(two_tower.output_dim)},
    )


def synthetic_training_frame(
    n_users: int, n_items: int, n_rows: int, windows: list[int], history: int = 30, seed: int = 0
) -> pd.DataFrame:
    """A ranking training frame with the contract's columns and types (random values, some clicks)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, n_users + 1, n_rows)
    items = rng.integers(1, n_items + 1, n_rows)
    categories = np.array([f"cat_{i:02d}" for i in range(12)], dtype=object)
    item_category = categories[np.arange(n_items + 1) % len(categories)]
    lengths = rng.integers(0, history + 1, n_rows)
    hist_ids = [rng.integers(1, n_items + 1, n).astype(np.int64) for n in lengths]
    frame = pd.DataFrame(
        {
            "row_id": np.arange(n_rows, dtype=np.int64),
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "event_timestamp": pd.Timestamp("2026-06-01", tz="UTC")
            + pd.to_timedelta(np.sort(rng.integers(0, 86400 * 30, n_rows)), unit="s"),
            "label": (rng.random(n_rows) < 0.2).astype(np.int64),
            "gender": np.array(["F", "M", ""], dtype=object)[users % 3],
            "age_bucket": (18 + 7 * (users % 6)).astype(np.int64),
            "occupation": np.array([f"occ_{i}" for i in range(10)], dtype=object)[users % 10],
            "zip_prefix": np.array([f"{i:03d}" for i in range(50)], dtype=object)[users % 50],
            "hist_item_ids": hist_ids,
            "hist_categories": [item_category[h] for h in hist_ids],
            "hist_length": lengths.astype(np.int64),
            "category": item_category[items],
            "brand": np.array([f"brand_{i}" for i in range(20)], dtype=object)[items % 20],
            "price": np.round(rng.lognormal(3, 1, n_rows), 2),
        }
    )
    for prefix, _ids in (("user", users), ("item", items)):
        for days in windows:
            impressions = rng.poisson(days, n_rows).astype(np.int64)
            clicks = rng.binomial(impressions, 0.2).astype(np.int64)
            frame[f"{prefix}_impressions_{days}d"] = impressions
            frame[f"{prefix}_clicks_{days}d"] = clicks
            frame[f"{prefix}_ctr_{days}d"] = np.where(
                impressions > 0, clicks / np.maximum(impressions, 1), 0.0
            )
    return frame


def item_catalogue(train: pd.DataFrame, item_columns: list[str], n_items: int | None = None) -> pd.DataFrame:
    """One row per item: its latest training row's item features; ``n_items`` extends it with new items
    (ids after the largest, content copied from existing rows: the cold-start path of the item tower)."""
    latest = train.sort_values("event_timestamp").groupby("item_id").tail(1)
    catalogue = latest[["item_id", *[c for c in item_columns if c != "item_id"]]].reset_index(drop=True)
    if n_items is not None and n_items > len(catalogue):
        extra = catalogue.sample(n_items - len(catalogue), replace=True, random_state=0).reset_index(
            drop=True
        )
        extra["item_id"] = np.arange(len(extra), dtype=np.int64) + int(catalogue["item_id"].max()) + 1
        catalogue = pd.concat([catalogue, extra], ignore_index=True)
    return catalogue
