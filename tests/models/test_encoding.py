"""Feature encoding (models/encoding.py): vocabularies, sequences, dense statistics, JSON state."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from models.batch import FIRST_ID, OOV_ID, PAD_ID
from models.config import DenseFeature, FeatureSpec, SequenceFeature
from models.encoding import SMALL_BATCH, FeatureEncoder
from tests.models.conftest import make_frame, sparse_feature


def test_encode_shapes_and_dtypes(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    batch = encoder.encode(frame)
    n = len(frame)
    for name in ("user_id", "item_id", "gender", "category"):
        assert batch[name].shape == (n,) and batch[name].dtype == torch.int64
    assert batch["hist_item_ids"].shape == (n, 30) and batch["hist_item_ids"].dtype == torch.int64
    assert torch.equal(batch["hist_item_ids__length"], torch.from_numpy(frame["hist_length"].to_numpy()))
    assert (
        batch["dense"].shape == (n, len(models_config.features.dense))
        and batch["dense"].dtype == torch.float32
    )
    assert batch["label"].dtype == torch.float32
    assert torch.equal(batch["group"], torch.from_numpy(frame["user_id"].to_numpy()))


def test_vocabulary_is_fitted_on_train_only():
    spec = FeatureSpec(
        sparse=[sparse_feature("brand"), sparse_feature("user_id", min_count=2)], sequence=[], dense=[]
    )
    train = pd.DataFrame({"brand": ["a", "b", "b", ""], "user_id": [1, 1, 2, 3]})
    valid = pd.DataFrame({"brand": ["b", "zzz", "", "a"], "user_id": [1, 2, 9, 1]})
    encoder = FeatureEncoder.fit(spec, train)
    assert encoder.num_embeddings("brand") == FIRST_ID + 2  # "" (missing) never gets a row
    brand = encoder.encode(valid)["brand"].tolist()
    assert brand[1] == OOV_ID and brand[2] == OOV_ID  # unseen in train / missing
    assert brand[0] != brand[3] and min(brand[0], brand[3]) >= FIRST_ID
    # min_count=2: only user 1 made the vocabulary; user 2 (seen once) and 9 (unseen) share OOV
    assert encoder.encode(valid)["user_id"].tolist() == [FIRST_ID, OOV_ID, OOV_ID, FIRST_ID]


def test_small_batch_lookup_matches_the_hash_index_for_every_row():
    """Serving encodes a few rows by binary search, training millions by a hash index: same ids."""
    rng = np.random.default_rng(3)
    spec = FeatureSpec(sparse=[sparse_feature("user_id"), sparse_feature("brand")], sequence=[], dense=[])
    train = pd.DataFrame(
        {"user_id": rng.integers(1, 400, 600), "brand": [f"b{i}" for i in rng.integers(0, 50, 600)]}
    )
    encoder = FeatureEncoder.fit(spec, train)
    # unsorted vocabularies too (state written by hand or by an older fit): the search sorts its own copy
    encoder.vocabs["brand"] = encoder.vocabs["brand"][::-1].copy()
    probe = pd.DataFrame(
        {"user_id": rng.integers(-5, 450, 1000), "brand": [f"b{i}" for i in rng.integers(-5, 60, 1000)]}
    )
    probe.loc[::7, "brand"] = ""
    for name in ("user_id", "brand"):
        whole = encoder.encode_ids(name, probe[name])  # 1000 values: the hash index
        assert len(probe) > SMALL_BATCH
        pieces = np.concatenate(
            [encoder.encode_ids(name, probe[name].iloc[i : i + 10]) for i in range(0, len(probe), 10)]
        )
        assert np.array_equal(whole, pieces)
        assert (whole == OOV_ID).any() and (whole >= FIRST_ID).any()
    assert (encoder.encode_ids("brand", probe["brand"].iloc[:7])[0]) == OOV_ID  # "" is missing


def test_sequences_share_vocab_keep_most_recent_and_pad_with_zero():
    spec = FeatureSpec(
        sparse=[sparse_feature("item_id")],
        sequence=[SequenceFeature(name="hist", shares="item_id", max_length=3)],
        dense=[],
    )
    train = pd.DataFrame({"item_id": [10, 20, 30, 40], "hist": [[10], [], [10, 20], [30]]})
    encoder = FeatureEncoder.fit(spec, train)
    frame = pd.DataFrame(
        {"item_id": [10, 20, 30], "hist": [[10, 20, 30, 40, 99], [], [40]]}, dtype=object
    ).astype({"item_id": np.int64})
    batch = encoder.encode(frame)
    code = dict(zip([10, 20, 30, 40], encoder.encode_ids("item_id", np.array([10, 20, 30, 40])), strict=True))
    # the last 3 of 5 (most recent last), left-aligned; 99 is unseen -> OOV, still a valid position
    assert batch["hist"][0].tolist() == [code[30], code[40], OOV_ID]
    assert batch["hist"][1].tolist() == [PAD_ID] * 3
    assert batch["hist"][2].tolist() == [code[40], PAD_ID, PAD_ID]
    assert batch["hist__length"].tolist() == [3, 0, 1]
    assert batch["item_id"].tolist() == [code[10], code[20], code[30]]


def test_list_columns_from_pyarrow_and_pandas_agree(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    from_pandas = encoder.encode(frame)
    from_arrow = encoder.encode(pa.Table.from_pandas(frame, preserve_index=False))
    assert from_pandas.keys() == from_arrow.keys()
    for key in from_pandas:
        assert torch.equal(from_pandas[key], from_arrow[key]), key


def test_dense_statistics_come_from_train_and_state_round_trips_through_json(models_config):
    train, valid = make_frame(seed=1), make_frame(seed=2)
    encoder = FeatureEncoder.fit(models_config.features, train)
    dense = encoder.encode(train)["dense"]
    assert torch.allclose(dense.mean(0), torch.zeros(dense.shape[1]), atol=1e-4)
    assert torch.allclose(dense.std(0, unbiased=False), torch.ones(dense.shape[1]), atol=1e-3)
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    a, b = encoder.encode(valid), restored.encode(valid)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log_price = np.log1p(valid["price"].to_numpy())
    mean, std = encoder.dense_stats["price"]
    expected = torch.tensor((log_price - mean) / std, dtype=torch.float32)
    assert torch.allclose(a["dense"][:, encoder.dense_index("price")], expected)


def test_hashing_is_deterministic_and_in_range():
    spec = FeatureSpec(
        sparse=[sparse_feature("zip_prefix", hash_buckets=7)],
        sequence=[],
        dense=[DenseFeature(name="x", transform="none")],
    )
    train = pd.DataFrame({"zip_prefix": ["001", "002"], "x": [1.0, 2.0]})
    encoder = FeatureEncoder.fit(spec, train)
    frame = pd.DataFrame({"zip_prefix": ["001", "999", "001", ""], "x": [0.0] * 4})
    ids = encoder.encode(frame)["zip_prefix"]
    assert ids[0] == ids[2] and ids[3] == OOV_ID
    assert ((ids[:3] >= FIRST_ID) & (ids[:3] < FIRST_ID + 7)).all()
    restored = FeatureEncoder.from_dict(json.loads(json.dumps(encoder.to_dict())))
    assert torch.equal(restored.encode(frame)["zip_prefix"], ids)


def test_encode_subset_and_id_counts(frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    users = encoder.encode(frame, features=["user_id", "hist_item_ids", "user_ctr_7d"])
    assert "item_id" not in users and "hist_item_ids__length" in users
    assert users["dense"][:, encoder.dense_index("price")].abs().sum() == 0
    counts = encoder.id_counts(frame, "item_id")
    assert counts.shape == (encoder.num_embeddings("item_id"),) and counts.sum() == len(frame)
    assert counts[PAD_ID] == 0 and counts[OOV_ID] == 0


def test_non_finite_dense_values_encode_as_zero_before_the_transform():
    spec = FeatureSpec(
        sparse=[],
        sequence=[],
        dense=[DenseFeature(name="price", transform="log1p"), DenseFeature(name="ctr", transform="none")],
    )
    encoder = FeatureEncoder.fit(spec, pd.DataFrame({"price": [1.0, 3.0], "ctr": [0.1, 0.3]}))
    raw = pd.DataFrame({"price": [np.nan, np.inf, 3.0], "ctr": [-np.inf, 0.3, np.nan]})
    dense = encoder.encode(raw)["dense"].numpy()
    zero = encoder.encode(pd.DataFrame({"price": [0.0, 0.0, 3.0], "ctr": [0.0, 0.3, 0.0]}))["dense"].numpy()
    assert np.isfinite(dense).all() and np.array_equal(dense, zero)
    assert raw["price"].isna().iloc[0]  # the caller's frame is left as it was


def _write_row_groups(frame: pd.DataFrame, path, rows: int) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=rows)


def test_a_fit_streamed_by_row_group_is_the_in_memory_fit_of_the_same_rows(tmp_path, models_config):
    """Two files in row groups of 37 rows: the same vocabularies (min_count counted over all row groups,
    missing strings never in a vocabulary, hashed features without one), kinds and dense statistics."""
    train, valid = make_frame(n_rows=600, seed=1), make_frame(n_rows=250, seed=2)
    for part in (train, valid):  # strings reaching min_count only across row groups, and missing ones
        part["brand"] = [None if i % 11 == 0 else f"b{i % 9}" for i in range(len(part))]
    changes = {"item_id": {"min_count": 11}, "brand": {"min_count": 2}, "zip_prefix": {"hash_buckets": 5}}
    declared = models_config.features.model_dump()
    for feature in declared["sparse"]:
        feature.update(changes.get(feature["name"], {}))
    spec = FeatureSpec.model_validate(declared)
    paths = [tmp_path / "train.parquet", tmp_path / "valid.parquet"]
    _write_row_groups(train, paths[0], 37)
    _write_row_groups(valid, paths[1], 37)

    streamed = FeatureEncoder.fit_parquet(spec, paths)
    whole = FeatureEncoder.fit(spec, pd.concat([train, valid], ignore_index=True))
    assert streamed.value_kinds == whole.value_kinds
    for name, vocab in whole.vocabs.items():
        if vocab is None:
            assert streamed.vocabs[name] is None, name
        else:
            assert vocab.dtype == streamed.vocabs[name].dtype and (vocab == streamed.vocabs[name]).all(), name
    assert whole.vocabs["zip_prefix"] is None
    assert "" not in whole.vocabs["brand"] and len(whole.vocabs["brand"]) == 9
    # min_count=11 dropped some items: the row-group counts were summed, not judged per row group
    counts = pd.concat([train, valid])["item_id"].value_counts()
    assert sorted(whole.vocabs["item_id"].tolist()) == sorted(counts[counts >= 11].index.tolist())
    assert 0 < len(whole.vocabs["item_id"]) < len(counts)
    for name, (mean, std) in whole.dense_stats.items():
        assert np.allclose(streamed.dense_stats[name], (mean, std), rtol=1e-12, atol=0), name
    both = pd.concat([train, valid], ignore_index=True)
    a, b = whole.encode(both), streamed.encode(both)
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-6), key


def test_the_in_memory_fit_keeps_numpys_mean_and_std_exactly(models_config):
    frame = make_frame(n_rows=500, seed=4)
    encoder = FeatureEncoder.fit(models_config.features, frame)
    for feature in models_config.features.dense:
        values = frame[feature.name].to_numpy().astype(np.float64)
        if feature.transform == "log1p":
            values = np.log1p(np.maximum(values, 0.0))
        assert encoder.dense_stats[feature.name] == (float(values.mean()), float(values.std())), feature.name


def test_a_streamed_fit_rejects_a_sparse_column_whose_kind_changes_between_files(tmp_path):
    import pytest

    spec = FeatureSpec(sparse=[sparse_feature("brand")], sequence=[], dense=[])
    _write_row_groups(pd.DataFrame({"brand": [1, 2]}), tmp_path / "a.parquet", 1)
    _write_row_groups(pd.DataFrame({"brand": ["x", "y"]}), tmp_path / "b.parquet", 1)
    with pytest.raises(ValueError, match="sparse feature 'brand': str values after int"):
        FeatureEncoder.fit_parquet(spec, [tmp_path / "a.parquet", tmp_path / "b.parquet"])


def test_arrow_string_columns_get_the_ids_of_the_object_path(models_config):
    """Row groups read from Parquet are looked up by Arrow (no Python strings): same ids as pandas
    object columns, with nulls, "" and unseen values (flat and in sequences) all OOV."""
    train, other = make_frame(n_rows=400, seed=1), make_frame(n_rows=900, seed=2, n_categories=12)
    other["category"] = [
        None if i % 13 == 0 else "" if i % 17 == 0 else c for i, c in enumerate(other["category"])
    ]
    other["hist_categories"] = [
        [None if j == 1 else c for j, c in enumerate(h)] if i % 5 == 0 else h
        for i, h in enumerate(other["hist_categories"])
    ]
    encoder = FeatureEncoder.fit(models_config.features, train)
    table = pa.Table.from_pandas(other, preserve_index=False)
    assert pa.types.is_string(table.column("category").type)
    from_arrow, from_pandas = encoder.encode(table), encoder.encode(other)
    for key in from_pandas:
        assert torch.equal(from_arrow[key], from_pandas[key]), key
    oov = from_arrow["category"] == OOV_ID
    assert oov[::13].all() and 0 < int(oov.sum()) < len(other)
    assert (from_arrow["hist_categories"] == OOV_ID).any()
