"""The versioned bundle: round trip, integrity checks naming the file, all-or-nothing assembly."""

from __future__ import annotations

import json
import re
import shutil

import faiss
import numpy as np
import pytest
from safetensors.numpy import save_file

from components import bundle as bd
from recsys import artifact_layout as layout
from recsys.ann_index import TuningResult, load_index, write_index
from recsys.bundle_manifest import BundleIntegrityError, load_manifest
from tests.conftest import write_params

DIM = 8
PARAMS_TEXT = "seed: 42\nindex:\n  k: 10\n"
METRICS = {"retrieval": {"two_tower": {"recall@50": 0.31}}, "ranking": {"multitower": {"auc": 0.74}}}


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sources(directory, dim_index: int = DIM, dim_embeddings: int = DIM) -> dict[str, object]:
    """Real member files: item embeddings, an inner-product index + sidecar, tower weights, encoders."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.arange(100, 150, dtype=np.int64)
    save_file(
        {"item_ids": ids, "embeddings": _unit(rng, 50, dim_embeddings)}, str(directory / "items.safetensors")
    )
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim_index))
    index.add_with_ids(_unit(rng, 50, dim_index), ids)
    exact = TuningResult(name=None, value=None, recall=1.0, curve={})
    write_index(index, directory / "items.faiss", index_type="flat", k=10, recall_target=0.95, tuned=exact)
    save_file({"layer.weight": rng.standard_normal((4, 4)).astype(np.float32)}, str(directory / "tower.st"))
    (directory / "encoders.json").write_text(json.dumps({"category": ["a", "b"]}))
    return {
        "item_embeddings.safetensors": directory / "items.safetensors",
        "index/items.faiss": directory / "items.faiss",
        "index/items.faiss.json": directory / "items.faiss.json",
        "user_tower.safetensors": directory / "tower.st",
        "encoders.json": directory / "encoders.json",
    }


@pytest.fixture()
def bundle_dir(tmp_path):
    files = _sources(tmp_path / "src")
    return bd.assemble_bundle(
        files, tmp_path / "bundle", params_text=PARAMS_TEXT, metrics=METRICS, git_revision="abc123"
    )


def test_round_trip(tmp_path, bundle_dir):
    manifest = load_manifest(bundle_dir)

    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", manifest["version"])
    assert manifest["version"].endswith(manifest["content_sha256"][:12])
    assert manifest["created_at"].endswith("+00:00")
    assert manifest["git_revision"] == "abc123"
    assert manifest["params"] == {"seed": 42, "index": {"k": 10}}
    assert manifest["metrics"] == METRICS
    assert manifest["dims"] == {"item_embeddings.safetensors": DIM, "index/items.faiss": DIM}
    assert sorted(manifest["files"]) == [
        "encoders.json",
        "index/items.faiss",
        "index/items.faiss.json",
        "item_embeddings.safetensors",
        "user_tower.safetensors",
    ]
    src = tmp_path / "src"
    assert (bundle_dir / "encoders.json").read_bytes() == (src / "encoders.json").read_bytes()
    assert manifest["files"]["user_tower.safetensors"]["bytes"] == (src / "tower.st").stat().st_size
    # the index inside the bundle loads with its sidecar (same relative layout)
    index, meta = load_index(bundle_dir / "index" / "items.faiss", expected_dim=DIM)
    assert index.ntotal == 50 and meta["metric"] == "inner_product"
    # nothing left behind beside the bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src"]


def test_same_content_same_hash_new_content_new_version(tmp_path, bundle_dir):
    first = load_manifest(bundle_dir)
    files = _sources(tmp_path / "src")
    again = load_manifest(
        bd.assemble_bundle(files, tmp_path / "bundle", params_text=PARAMS_TEXT, metrics=METRICS)
    )
    assert again["content_sha256"] == first["content_sha256"]
    changed = load_manifest(
        bd.assemble_bundle(files, tmp_path / "bundle", params_text="seed: 7\n", metrics=METRICS)
    )
    assert changed["content_sha256"] != first["content_sha256"]
    assert changed["params"] == {"seed": 7}


def test_git_revision_is_none_outside_git(tmp_path, monkeypatch):
    files = _sources(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    out = bd.assemble_bundle(files, tmp_path / "b", params_text=PARAMS_TEXT, metrics={})
    assert load_manifest(out)["git_revision"] is None


def test_changed_file_is_detected_by_name(bundle_dir):
    member = bundle_dir / "user_tower.safetensors"
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    member.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"file 'user_tower\.safetensors' SHA-256 differs"):
        load_manifest(bundle_dir)
    load_manifest(bundle_dir, verify=False)  # reading the manifest alone still works


def test_truncated_file_is_detected_by_name(bundle_dir):
    member = bundle_dir / "index" / "items.faiss"
    member.write_bytes(member.read_bytes()[:-10])
    with pytest.raises(BundleIntegrityError, match=r"file 'index/items\.faiss' has \d+ bytes"):
        load_manifest(bundle_dir)


def test_missing_file_is_detected_by_name(bundle_dir):
    (bundle_dir / "encoders.json").unlink()
    with pytest.raises(
        BundleIntegrityError, match=r"file 'encoders\.json' listed in the manifest is missing"
    ):
        load_manifest(bundle_dir)


def test_extra_unlisted_file_is_refused_unless_harmless(bundle_dir):
    (bundle_dir / "NOTES.md").write_text("deployed by hand\n")
    load_manifest(bundle_dir)  # documentation next to the files is tolerated
    (bundle_dir / "index" / "ranker.safetensors").write_bytes(b"not checksummed")
    with pytest.raises(BundleIntegrityError, match=r"file 'index/ranker\.safetensors' is not listed"):
        load_manifest(bundle_dir)


def test_edited_manifest_is_refused(bundle_dir):
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["encoders.json"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="manifest edited"):
        load_manifest(bundle_dir)


def test_missing_manifest_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(BundleIntegrityError, match=r"half: no manifest\.json"):
        load_manifest(tmp_path / "half")


def test_dim_drift_between_model_and_index_is_refused(tmp_path):
    files = _sources(tmp_path / "src", dim_index=DIM, dim_embeddings=DIM * 2)
    with pytest.raises(BundleIntegrityError, match=r"dims disagree .*'index/items\.faiss'=8.*=16"):
        bd.assemble_bundle(files, tmp_path / "bundle", params_text=PARAMS_TEXT, metrics=METRICS)
    assert not (tmp_path / "bundle").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # staging directory removed


def test_declared_user_tower_dim_is_checked(tmp_path):
    files = _sources(tmp_path / "src")
    with pytest.raises(BundleIntegrityError, match=r"'declared:user_tower\.safetensors'=16"):
        bd.assemble_bundle(
            files, tmp_path / "b", params_text="", metrics={}, embedding_dims={"user_tower.safetensors": 16}
        )
    out = bd.assemble_bundle(
        files, tmp_path / "b", params_text="", metrics={}, embedding_dims={"user_tower.safetensors": DIM}
    )
    assert load_manifest(out)["dims"]["declared:user_tower.safetensors"] == DIM


def test_failed_assemble_keeps_the_previous_bundle(tmp_path, bundle_dir):
    before = load_manifest(bundle_dir)
    files = _sources(tmp_path / "src")
    files["rankers/dlrm.safetensors"] = tmp_path / "src" / "does-not-exist.safetensors"
    with pytest.raises(BundleIntegrityError, match=r"'rankers/dlrm\.safetensors' source .* is not a file"):
        bd.assemble_bundle(files, bundle_dir, params_text=PARAMS_TEXT, metrics=METRICS)
    assert load_manifest(bundle_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "src"]


def test_failure_while_copying_leaves_no_bundle(tmp_path, monkeypatch):
    files = _sources(tmp_path / "src")
    from recsys import bundle_assembly

    real_copy = bundle_assembly._copy_and_hash
    copied = []

    def copy_then_fail(source, target):
        if copied:
            raise OSError("disk full")
        copied.append(source)
        return real_copy(source, target)

    monkeypatch.setattr(bundle_assembly, "_copy_and_hash", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        bd.assemble_bundle(files, tmp_path / "bundle", params_text=PARAMS_TEXT, metrics=METRICS)
    assert copied and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("name", ["../escape.json", "/abs/file.json", "manifest.json", "a//b.json", ""])
def test_bad_member_names_are_refused(tmp_path, name):
    source = tmp_path / "f.json"
    source.write_text("{}")
    with pytest.raises(BundleIntegrityError, match=r"bundle name|reserved"):
        bd.assemble_bundle({name: source}, tmp_path / "b", params_text="", metrics={})


def test_index_without_its_sidecar_is_refused(tmp_path):
    files = _sources(tmp_path / "src")
    del files["index/items.faiss.json"]
    with pytest.raises(BundleIntegrityError, match=r"'index/items\.faiss' needs its sidecar"):
        bd.assemble_bundle(files, tmp_path / "b", params_text="", metrics={})


def test_non_json_metrics_are_refused(tmp_path):
    files = _sources(tmp_path / "src")
    with pytest.raises(BundleIntegrityError, match="metrics are not plain JSON"):
        bd.assemble_bundle(files, tmp_path / "b", params_text="", metrics={"auc": float("nan")})


def test_cli_verify(bundle_dir, capsys):
    assert bd.main(["verify", str(bundle_dir)]) == 0
    assert "OK version" in capsys.readouterr().out
    (bundle_dir / "encoders.json").write_text("{}")
    assert bd.main(["verify", str(bundle_dir)]) == 1
    assert "encoders.json" in capsys.readouterr().err


def test_cli_assemble_from_the_artifact_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI assembles the local layout's members (recsys/artifact_layout.py)
    sources = _sources(tmp_path / "src")
    rng = np.random.default_rng(1)
    members = layout.bundle_members()
    for name, path in members.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == layout.ITEM_EMBEDDINGS:
            shutil.copyfile(sources["item_embeddings.safetensors"], path)
        elif name in (layout.INDEX, layout.INDEX_SIDECAR):
            shutil.copyfile(sources[f"index/{name}"], path)
        elif name.endswith(".safetensors"):
            save_file({"layer.weight": rng.standard_normal((4, 4)).astype(np.float32)}, str(path))
        else:
            path.write_text(json.dumps({"member": name}))
    (tmp_path / "evaluation.json").write_text(json.dumps(METRICS))
    write_params(tmp_path / "params.yaml", {"seed": 7})
    cli = ["assemble", "--params", "params.yaml", "--metrics-file", "evaluation.json", "--out-dir", "out"]
    assert bd.main(cli) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["metrics"] == METRICS
    assert set(manifest["files"]) == set(members)  # every model of every kind, the index, the embeddings
    assert manifest["params"]["seed"] == 7  # the whole configuration it was built with
