"""Index refresh: items that appeared since the bundle was trained join its ANN index, without retraining.

A new item has no interactions to learn from, but the two-tower's item tower embeds it from what it has:
its content (category, brand, price) and statistics, the same cold-start path the training data gives
items seen a few times. So the bundle's own item tower embeds every catalogue item the bundle lacks, the
vectors are added to a copy of its index (the same index type and tuned search parameter: FAISS adds to
a built HNSW, IVF or flat index without retraining it), and a NEW bundle version is assembled: the same
model files byte for byte, item embeddings and index grown, ``lineage`` naming the version it grew from
and the items added. ``python -m components.promote --bundle-dir <out>`` publishes it; running servers
with ``serving.index_swap`` take it up without a restart (serving/index_swap.py); no new item waits for
the next training run.

The catalogue is read as export reads it (recsys/catalogue.py: every item's profile with its latest
statistics within the TTL at the end of the feature tables). Each added item must find itself: its own
vector searched in the grown index returns it among the first ``SELF_RECALL_K`` (a broken add, a wrong
id map or a dim mix-up fails here, before anything is published). Nothing new: no bundle is written.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import yaml

from recsys import artifact_layout as layout
from recsys.ann_index import TuningResult, load_index, search, write_index
from recsys.artifact_io import write_json
from recsys.bundle_assembly import assemble_bundle
from recsys.bundle_manifest import BundleIntegrityError, load_manifest
from recsys.catalogue import item_catalogue
from recsys.config import ConfigError, FeastConfig, load_params
from recsys.contracts import TIMESTAMP

log = logging.getLogger(__name__)

SELF_RECALL_K = 10
TIE_TOLERANCE = 1e-5  # float32 inner products of equal unit vectors
REPLACED = (layout.ITEM_EMBEDDINGS, layout.INDEX, layout.INDEX_SIDECAR)  # what a refresh rewrites


class RefreshError(RuntimeError):
    """The refreshed index failed its check: nothing was written."""


def run(
    feast: FeastConfig,
    bundle_dir: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    metrics_file: str | Path,
) -> dict[str, Any]:
    """Grow ``bundle_dir``'s index by the catalogue items it lacks into a new bundle at ``out_dir``;
    the report (also written to ``metrics_file``). No new item: no bundle, ``version`` is the old one."""
    started = time.perf_counter()
    bundle_dir, features_dir = Path(bundle_dir), Path(features_dir)
    manifest = load_manifest(bundle_dir, verify=True)
    end = pd.read_parquet(features_dir / "item_stats.parquet", columns=[TIMESTAMP])[TIMESTAMP].max()
    catalogue = item_catalogue(features_dir, end, feast.ttl_days.item_stats)
    old_ids = _indexed_ids(bundle_dir)
    new_items = catalogue.loc[~catalogue["item_id"].isin(old_ids)].reset_index(drop=True)
    report: dict[str, Any] = {
        "from": manifest["version"],
        "catalogue_items": len(catalogue),
        "indexed_items": len(old_ids),
        "added_items": len(new_items),
        "catalogue_as_of": str(end),
    }
    if new_items.empty:
        report |= {"version": manifest["version"], "seconds": round(time.perf_counter() - started, 2)}
        write_json(report, metrics_file)
        log.info("index refresh: every catalogue item is indexed (%d); nothing written", len(old_ids))
        return report
    new_vectors = _embed_items(bundle_dir, new_items)
    new_ids = new_items["item_id"].to_numpy(np.int64)
    recall = grow_bundle(bundle_dir, new_ids, new_vectors, Path(out_dir), manifest)
    version = load_manifest(out_dir, verify=True)["version"]
    report |= {
        "version": version,
        "self_recall_at_10": recall,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(report, metrics_file)
    log.info("index refresh: %s -> %s, %d items added", manifest["version"], version, len(new_ids))
    return report


def grow_bundle(
    bundle_dir: Path,
    new_ids: np.ndarray,
    new_vectors: np.ndarray,
    out_dir: Path,
    manifest: dict[str, Any] | None = None,
) -> float:
    """``bundle_dir`` with ``new_vectors`` (under ``new_ids``) added to its item embeddings and index, as a
    new bundle at ``out_dir``: every other member and the manifest's params, metrics and declared dims as
    they are, ``lineage`` naming the origin. ``manifest``: the bundle's, already verified (else read and
    verified here). Returns the added items' self-recall; raises :class:`RefreshError` (nothing written)
    when it falls short."""
    manifest = manifest if manifest is not None else load_manifest(bundle_dir, verify=True)
    old_ids, old_vectors = _embeddings(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="index-refresh-") as scratch:
        staged = Path(scratch)
        ids = np.concatenate([old_ids, new_ids])
        vectors = np.concatenate([old_vectors, new_vectors])
        _write_embeddings(ids, vectors, staged / layout.ITEM_EMBEDDINGS)
        index, meta = load_index(bundle_dir / layout.INDEX, expected_dim=vectors.shape[1])
        index.add_with_ids(np.ascontiguousarray(new_vectors), new_ids)
        recall = _self_recall(index, new_vectors, new_ids)
        if recall < 1.0 - 1e-9 and meta["type"] == "flat":
            raise RefreshError(f"a flat index lost added items: self-recall@{SELF_RECALL_K} {recall:.3f}")
        if recall < meta["recall_target"]:
            raise RefreshError(
                f"added items find themselves in only {recall:.3f} of searches "
                f"(self-recall@{SELF_RECALL_K}, below the index's recall target {meta['recall_target']})"
            )
        param = meta["search_param"] or {}
        tuned = TuningResult(param.get("name"), param.get("value"), float(meta["recall_at_k"]), {})
        write_index(
            index,
            staged / layout.INDEX,
            index_type=meta["type"],
            k=int(meta["k"]),
            recall_target=float(meta["recall_target"]),
            tuned=tuned,
            item_embeddings=staged / layout.ITEM_EMBEDDINGS,
        )
        members = {
            name: (staged / name if name in REPLACED else bundle_dir / name) for name in manifest["files"]
        }
        declared = {
            name.split(":", 1)[1]: dim
            for name, dim in manifest["dims"].items()
            if name.startswith("declared:")
        }
        assemble_bundle(
            members,
            out_dir,
            params_text=yaml.safe_dump(manifest["params"], sort_keys=False),
            metrics=manifest["metrics"],
            git_revision=manifest.get("git_revision"),
            embedding_dims=declared,
            lineage={
                "refreshed_from": manifest["version"],
                "added_items": len(new_ids),
                "added_item_ids": new_ids[:100].tolist(),
                "self_recall_at_10": recall,
            },
        )
    return recall


def _indexed_ids(bundle_dir: Path) -> np.ndarray:
    """The item ids the bundle's embeddings (and so its index) hold, without reading the vectors."""
    from safetensors import safe_open

    with safe_open(str(bundle_dir / layout.ITEM_EMBEDDINGS), framework="numpy") as tensors:
        return tensors.get_tensor("item_ids").astype(np.int64)


def _embeddings(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(bundle_dir / layout.ITEM_EMBEDDINGS))
    return tensors["item_ids"].astype(np.int64), tensors["embeddings"].astype(np.float32)


def _embed_items(bundle_dir: Path, items: pd.DataFrame) -> np.ndarray:
    """The bundle's item tower on ``items``' content and statistics (eval mode, CPU)."""
    import torch

    from models import load_model
    from models.registry import RETRIEVAL_MODEL

    model, encoder = load_model(bundle_dir / layout.BUNDLE_MODELS / RETRIEVAL_MODEL, device="cpu")
    with torch.inference_mode():
        batch = encoder.encode(items, features=model.item_feature_names())  # type: ignore[attr-defined]
        return model.item_embeddings(batch).float().numpy()  # type: ignore[attr-defined]


def _self_recall(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> float:
    """Share of ``vectors`` whose own id is among the top ``SELF_RECALL_K`` of their search, or tied with
    it: new items with the same content get the same vector, and ``SELF_RECALL_K`` of them fill the top."""
    found, scores = search(index, vectors, SELF_RECALL_K)
    own = np.einsum("ij,ij->i", vectors, vectors)
    tied = scores[:, -1] >= own - TIE_TOLERANCE
    return float(np.mean([(item in row) or tie for item, row, tie in zip(ids, found, tied, strict=True)]))


def _write_embeddings(ids: np.ndarray, vectors: np.ndarray, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"item_ids": ids, "embeddings": np.ascontiguousarray(vectors)}, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.index_refresh", description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--bundle-dir", type=Path, default=layout.BUNDLE_DIR, help="the bundle to grow")
    parser.add_argument("--features-dir", type=Path, default=layout.FEATURES_DIR)
    parser.add_argument("--out-dir", type=Path, default=layout.ARTIFACTS / "bundle-refreshed")
    parser.add_argument("--metrics-file", type=Path, default=layout.METRICS_DIR / "index_refresh.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_params(args.params)
        run(params.feast, args.bundle_dir, args.features_dir, args.out_dir, args.metrics_file)
    except (ConfigError, BundleIntegrityError, RefreshError, FileNotFoundError) as exc:
        print(f"index refresh: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
