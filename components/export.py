"""Export step: item embeddings for the ANN index, validation query vectors, and the cold-start list.

Serving form (chosen by measurement, see README): the trained ``model.safetensors`` + ``config.json``
loaded into the same nn.Module by ``models.load_model`` — no pickle, no TorchScript tracing, and the
outputs are the training-time eval-mode outputs by construction. This step re-checks that on real rows:
the reloaded item tower must reproduce the embeddings of a fresh eval pass to 1e-5, else it fails.

The catalogue is embedded with every item's latest features (profile + the last stats snapshot within
TTL at the end of the data), which is what the online store holds after ``materialize``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from recsys import artifact_layout as layout
from recsys.artifact_io import staged_path, write_json
from recsys.catalogue import item_catalogue
from recsys.contracts import TIMESTAMP
from recsys.step_contract import STEPS, StepParams
from recsys.training_data import MANIFEST as TRAINING_MANIFEST
from recsys.training_data import read_split

CONTRACT = STEPS["export"]

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-5


def run(
    params: StepParams,
    training_dir: str | Path,
    model_dir: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    popular_file: str | Path,
) -> dict[str, Any]:
    """Write ``item_embeddings.safetensors``, ``user_embeddings_valid.safetensors`` and the popular items."""
    from models import load_model

    training_dir, out_dir = Path(training_dir), Path(out_dir)
    device = "cuda" if torch.cuda.is_available() and params.training.device != "cpu" else "cpu"
    model, encoder = load_model(model_dir, device=device)
    manifest = json.loads((training_dir / TRAINING_MANIFEST).read_text())
    features_dir = Path(features_dir)
    end = pd.read_parquet(features_dir / "item_stats.parquet", columns=[TIMESTAMP])[TIMESTAMP].max()
    catalogue = item_catalogue(features_dir, end, params.feast.ttl_days.item_stats)

    items = encoder.encode(catalogue, features=model.item_feature_names())
    item_emb = model.item_embeddings(items).float().cpu()
    _check_parity(model_dir, items, item_emb)

    valid = read_split(training_dir, "ranking", "valid")
    users = valid.sort_values([TIMESTAMP, "row_id"]).drop_duplicates("user_id").reset_index(drop=True)
    user_emb = model.user_embeddings(encoder.encode(users, features=model.user_feature_names())).float().cpu()

    item_ids = torch.tensor(catalogue["item_id"].to_numpy(), dtype=torch.int64)
    user_ids = torch.tensor(users["user_id"].to_numpy(), dtype=torch.int64)
    _write_tensors(
        {"item_ids": item_ids, "embeddings": item_emb.contiguous()}, out_dir / layout.ITEM_EMBEDDINGS
    )
    _write_tensors(
        {"user_ids": user_ids, "embeddings": user_emb.contiguous()},
        out_dir / layout.QUERY_EMBEDDINGS,
    )

    clicks = (
        read_split(training_dir, "retrieval", "train")["item_id"]
        .value_counts()
        .head(params.export.popular_items)
    )
    popular = {
        "item_ids": clicks.index.astype(int).tolist(),
        "scores": (clicks / clicks.iloc[0]).round(6).tolist() if len(clicks) else [],
        "as_of": manifest["valid_start"],
    }
    write_json(popular, popular_file)
    summary = {
        "items": len(catalogue),
        "users_valid": len(users),
        "dim": int(item_emb.shape[1]),
        "device": device,
        "catalogue_as_of": str(end),
    }
    log.info("export: %s", summary)
    return summary


def _check_parity(model_dir: Path, items: dict[str, torch.Tensor], exported: torch.Tensor) -> None:
    """The serving form (reloaded from disk on CPU) must reproduce the exported vectors to 1e-5."""
    from models import load_model

    served, _ = load_model(model_dir, device="cpu")
    sample = {k: v[:2048].cpu() for k, v in items.items()}
    again = served.item_embeddings(sample).float()
    worst = float((again - exported[: again.shape[0]]).abs().max()) if again.numel() else 0.0
    if worst > PARITY_TOLERANCE:
        raise RuntimeError(
            f"{model_dir}: the reloaded item tower differs from the exported embeddings by {worst:.2e} "
            f"(> {PARITY_TOLERANCE}); refusing to export embeddings serving would not reproduce"
        )


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with staged_path(path) as tmp:
        save_file(tensors, str(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.export", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    run(params, **CONTRACT.paths(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
