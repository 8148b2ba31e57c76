"""Index refresh (components/index_refresh.py): catalogue items a bundle lacks are embedded by its own item
tower and added to its index as a new bundle version with the same model files; the grown bundle loads
and serves them; nothing new writes nothing; a bundle that fails its checksums is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import serving  # noqa: F401  (imports kserve with a clean argv before anything else does)
from components import index_refresh
from recsys.ann_index import search
from recsys.bundle_manifest import BundleIntegrityError, load_manifest
from tests.conftest import offline_serving_params
from tests.synthetic_bundle import build_serving_bundle, item_catalogue, synthetic_training_frame

NEW = 12  # items that appear after the bundle was built


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A bundle over 80 items, and feature tables whose catalogue holds ``NEW`` items more."""
    params = offline_serving_params()
    root = tmp_path_factory.mktemp("index_refresh")
    train = synthetic_training_frame(60, 80, 1_000, params.features.stats_windows_days, seed=1)
    columns = ["item_id", "category", "brand", "price"] + [c for c in train if c.startswith("item_")]
    indexed = item_catalogue(train, columns)
    bundle = build_serving_bundle(train, indexed, params, root / "bundle", root / "work")
    catalogue = item_catalogue(train, columns, len(indexed) + NEW)
    new = catalogue["item_id"] > indexed["item_id"].max()  # content copied from old items: prices made apart
    catalogue.loc[new, "price"] = 5.0 + 7.5 * np.arange(NEW)
    features = root / "features"
    features.mkdir()
    stamp = pd.Timestamp("2026-07-01", tz="UTC")
    profile = catalogue[["item_id", "category", "brand", "price"]].assign(event_timestamp=stamp)
    profile.to_parquet(features / "item_profile.parquet")
    stats = catalogue[[c for c in catalogue if c.startswith("item_") and c != "item_id"]]
    stats.assign(item_id=catalogue["item_id"], event_timestamp=stamp).to_parquet(
        features / "item_stats.parquet"
    )
    return {"params": params, "root": root, "bundle": bundle, "features": features, "catalogue": catalogue}


def refresh(world, name: str, bundle: Path | None = None) -> dict:
    return index_refresh.run(
        world["params"].feast,
        world["bundle"] if bundle is None else bundle,
        world["features"],
        world["root"] / name,
        world["root"] / f"{name}.json",
    )


def test_new_items_join_the_index_as_a_new_version_with_the_same_models(world):
    from safetensors.numpy import load_file

    from serving.bundle import load_bundle

    report = refresh(world, "grown")
    old, new = load_manifest(world["bundle"]), load_manifest(world["root"] / "grown", verify=True)
    assert report["added_items"] == NEW and report["version"] == new["version"] != old["version"]
    assert report["self_recall_at_10"] == 1.0
    models = {name: entry for name, entry in old["files"].items() if name.startswith("models/")}
    assert models and all(new["files"][name] == entry for name, entry in models.items())
    assert new["files"]["items.faiss"] != old["files"]["items.faiss"]
    assert new["lineage"]["refreshed_from"] == old["version"] and new["lineage"]["added_items"] == NEW
    assert new["params"] == old["params"] and new["metrics"] == old["metrics"]
    assert new["dims"] == old["dims"]  # the declared user-tower dim included
    served = load_bundle(world["root"] / "grown", world["params"].serving.default_ranker)
    added = sorted(
        set(world["catalogue"]["item_id"])
        - set(load_file(str(world["bundle"] / "item_embeddings.safetensors"))["item_ids"])
    )
    assert served.index.ntotal == len(world["catalogue"]) and set(added) <= set(served.catalogue.tolist())
    # each added item's vector is the item tower's, and search finds the item by it
    tensors = load_file(str(world["root"] / "grown" / "item_embeddings.safetensors"))
    rows = {int(i): v for i, v in zip(tensors["item_ids"], tensors["embeddings"], strict=True)}
    queries = np.stack([rows[i] for i in added])
    found, _ = search(served.index, queries, 5)
    assert all(item in row for item, row in zip(added, found, strict=True))
    expected = index_refresh._embed_items(
        world["bundle"], world["catalogue"].set_index("item_id").loc[added].reset_index()
    )
    assert np.allclose(queries, expected, atol=1e-6)
    assert json.loads((world["root"] / "grown.json").read_text())["added_items"] == NEW


def test_nothing_new_writes_no_bundle(world):
    refresh(world, "complete")
    report = refresh(world, "again", bundle=world["root"] / "complete")
    assert report["added_items"] == 0 and not (world["root"] / "again").exists()
    assert report["version"] == load_manifest(world["root"] / "complete")["version"]


def test_a_bundle_that_fails_its_checksums_is_refused(world, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(world["bundle"], broken)
    (broken / "items.faiss").write_bytes(b"not the index")
    with pytest.raises(BundleIntegrityError, match=r"items\.faiss"):
        refresh(world, "never", bundle=broken)
    assert not (world["root"] / "never").exists()
