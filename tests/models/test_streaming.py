"""The streaming loader (models/streaming.py): complete, disjoint shards, seeded order, the in-memory
path's tensors, ``auto`` by the Parquet row count, and a streamed fit that learns like an in-memory one."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from models.batch import GROUP_KEY
from models.encoding import FeatureEncoder
from models.registry import build_model, model_class
from models.streaming import ROW_INDEX_KEY, ParquetSplit, ParquetStream, choose_mode, stream_loader
from models.trainer import fit, train_input
from recsys.config import ConfigError, load_params
from tests.conftest import revalidated, shipped_params, write_params
from tests.models.conftest import make_frame, small_models_config
from tests.models.test_distributed import _free_port

ROW_GROUP = 100


@pytest.fixture
def split(tmp_path, models_config):
    frame = make_frame(n_rows=1_050, label="history_match")
    path = tmp_path / "ranking_train.parquet"
    _write(frame, path)
    return ParquetSplit(path, FeatureEncoder.fit(models_config.features, frame)), frame


def _write(frame, path) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=ROW_GROUP)


def _keys(split: ParquetSplit, frame) -> list[str]:
    return [k for k in split.encoder.encode(frame.head(2)) if k != GROUP_KEY]


def _stream(split, frame, **changes) -> ParquetStream:
    args = {"batch_size": 64, "shuffle_buffer_rows": 256, "seed": 3, "with_row_index": True} | changes
    return ParquetStream(split, _keys(split, frame), **args)


def _row_order(dataset: ParquetStream, epoch: int, workers: int = 0) -> list[int]:
    dataset.set_epoch(epoch)
    loader = stream_loader(dataset, workers, prefetch=2, pin_memory=False)
    return [i for batch in loader for i in batch[ROW_INDEX_KEY].tolist()]


def test_every_row_once_per_epoch_across_workers_and_ranks(split):
    split, frame = split
    world = 3
    for workers in (0, 2):
        rows = []
        for rank in range(world):
            dataset = _stream(split, frame, rank=rank, world_size=world, workers=workers)
            mine = _row_order(dataset, epoch=1, workers=workers)
            # the batch count the trainer stops at is what the rank really yields
            assert len(mine) // 64 <= dataset.steps(1)[rank] <= len(mine) // 64 + workers + 1
            rows += mine
        # disjoint and complete (no worker's shard ends in a lone row here, the one row a worker may drop)
        assert sorted(rows) == list(range(len(frame)))


def test_order_is_seeded_and_changes_between_epochs(split):
    split, frame = split
    first = _row_order(_stream(split, frame), epoch=1)
    assert first == _row_order(_stream(split, frame), epoch=1)
    assert first != _row_order(_stream(split, frame), epoch=2)
    assert first != _row_order(_stream(split, frame, seed=4), epoch=1)
    # rows of one row group are spread over the epoch by the shuffle buffer, not kept together
    assert first[:ROW_GROUP] != sorted(first[:ROW_GROUP])


def test_batches_hold_the_in_memory_encoding_of_their_rows(split):
    split, frame = split
    whole = split.encoder.encode(frame)
    dataset = _stream(split, frame)
    dataset.set_epoch(1)
    for batch in stream_loader(dataset, 2, prefetch=2, pin_memory=False):
        rows = batch.pop(ROW_INDEX_KEY)
        assert set(batch) == set(_keys(split, frame))
        for key, values in batch.items():
            assert torch.equal(values, whole[key][rows]), key


def test_auto_streams_by_the_parquet_row_count(split):
    split, frame = split
    loader = shipped_params().training.loader
    assert choose_mode(revalidated(loader, mode="auto", stream_above_rows=len(frame)), len(frame)) == "memory"
    assert (
        choose_mode(revalidated(loader, mode="auto", stream_above_rows=len(frame) - 1), len(frame))
        == "stream"
    )
    assert choose_mode(revalidated(loader, mode="memory", stream_above_rows=0), len(frame)) == "memory"
    config = revalidated(shipped_params().training, loader=revalidated(loader, stream_above_rows=10))
    assert isinstance(train_input(split.path, split.encoder, config), ParquetSplit)
    config = revalidated(shipped_params().training, loader=revalidated(loader, stream_above_rows=10**6))
    assert torch.equal(
        train_input(split.path, split.encoder, config)["label"], split.encoder.encode(frame)["label"]
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("training.loader.mode", "fast"),
        ("training.loader.stream_above_rows", -1),
        ("training.loader.shuffle_buffer_rows", 0),
        ("training.loader.workers", -1),
        ("training.loader.prefetch", 0),
        ("training.loader.prepare_rows", 0),
        ("training.loader.buffer", 5),
    ],
)
def test_bad_loader_settings_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(write_params(tmp_path / "params.yaml", {key: value}))


def _fit_auc(split, frame, models_config, mode: str, workers: int = 1, shuffle_labels: bool = False) -> float:
    torch.manual_seed(0)
    kind = "multi_tower"
    model = build_model(
        kind,
        models_config.model(kind),
        split.encoder,
        **model_class(kind).fitted_inputs(split.encoder, frame),
    )
    training = shipped_params().training
    loader = revalidated(training.loader, mode=mode, workers=workers, shuffle_buffer_rows=256)
    config = revalidated(
        training,
        batch_size=64,
        epochs=3,
        lr=3e-3,
        seed=5,
        device="cpu",
        patience=0,
        num_workers=0,
        per_model={},
        loader=loader,
    )
    train = train_input(split.path, split.encoder, config, frame)
    if shuffle_labels:
        assert isinstance(train, ParquetSplit)
        shuffled = frame.assign(label=frame["label"].sample(frac=1.0, random_state=0).to_numpy())
        _write(shuffled, split.path)
    valid = split.encoder.encode(make_frame(n_rows=600, seed=1, label="history_match"))
    return fit(model, train, valid, config, progress=False).history[-1]["valid_auc"]


def test_a_streamed_fit_learns_like_the_in_memory_one(split, models_config):
    split, frame = split
    memory = _fit_auc(split, frame, models_config, "memory")
    stream = _fit_auc(split, frame, models_config, "stream")
    assert memory > 0.62  # (0.676 when written; the label follows the history, so this learns)
    assert abs(stream - memory) < 0.04  # (0.003 when written)
    assert _fit_auc(split, frame, models_config, "stream", shuffle_labels=True) < memory - 0.1


@pytest.mark.slow  # two spawned gloo ranks, each with a DataLoader worker (~30 s on 2 cores)
def test_ddp_ranks_stream_disjoint_shards_in_step(split, tmp_path):
    """Two gloo ranks on uneven row-group shards run the same number of steps and end equal."""
    split, frame = split
    assert len(frame) % ROW_GROUP  # 11 row groups: the ranks' shards differ in size
    mp.spawn(_ddp_worker, args=(split, str(tmp_path), _free_port()), nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / f"weights{r}.safetensors")) for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def _ddp_worker(rank: int, split: ParquetSplit, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    kind = "dlrm"
    models_config = small_models_config()
    torch.manual_seed(0)
    model = build_model(kind, models_config.model(kind), split.encoder)
    training = shipped_params().training
    loader = revalidated(training.loader, mode="stream", workers=1, shuffle_buffer_rows=128)
    config = revalidated(
        training, batch_size=32, epochs=2, seed=1, device="cpu", num_workers=0, per_model={}, loader=loader
    )
    result = fit(model, split, None, config, progress=False)
    assert result.world_size == 2
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out_dir) / f"weights{rank}.safetensors"))
    dist.destroy_process_group()


def test_the_train_step_streams_the_split_the_loader_setting_picks(tmp_path, monkeypatch):
    """components/train.py hands the Parquet file to the trainer when training.loader streams it."""
    import models
    from components import train as train_step

    for split, seed in (("train", 0), ("valid", 1)):
        _write(
            make_frame(n_rows=700, seed=seed, label="history_match"), tmp_path / f"ranking_{split}.parquet"
        )
    changes = {"training.epochs": 1, "training.device": "cpu", "training.refit": False}
    seen = []
    real_fit = models.fit

    def spy(model, train, *args, **kwargs):
        seen.append(type(train))
        return real_fit(model, train, *args, **kwargs)

    monkeypatch.setattr("models.fit", spy)
    for mode in ("stream", "memory"):
        params_file = write_params(tmp_path / "params.yaml", changes | {"training.loader.mode": mode})
        metrics = train_step.run(
            "dlrm",
            train_step.CONTRACT.load(params_file),
            tmp_path,
            tmp_path / mode / "model",
            tmp_path / mode / "metrics.json",
            tmp_path / mode / "curves.png",
        )
        assert metrics["train_rows"] == 700
    assert seen == [ParquetSplit, dict]


def test_a_split_of_two_files_streams_every_row_of_both_once(tmp_path, models_config):
    """The streamed refit's input: train + valid read as one split, rows numbered across the files."""
    first, second = make_frame(n_rows=430, seed=0), make_frame(n_rows=270, seed=1)
    _write(first, tmp_path / "a.parquet")
    _write(second, tmp_path / "b.parquet")
    both = pa.concat_tables([pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")])
    encoder = FeatureEncoder.fit(models_config.features, both)
    split = ParquetSplit((tmp_path / "a.parquet", tmp_path / "b.parquet"), encoder)
    assert split.num_rows == 700
    dataset = _stream(split, first, workers=2)
    dataset.set_epoch(1)
    rows: dict[int, float] = {}
    for batch in stream_loader(dataset, 2, prefetch=2, pin_memory=False):
        rows.update(zip(batch[ROW_INDEX_KEY].tolist(), batch["label"].tolist(), strict=True))
    assert sorted(rows) == list(range(700))
    labels = encoder.encode(both)["label"].tolist()
    assert [rows[i] for i in range(700)] == labels


def test_the_streamed_train_step_fits_and_refits_without_a_frame_of_the_rows(tmp_path, monkeypatch):
    """training.loader streaming: the encoder is fitted row group by row group (the in-memory fit's
    encoder), the refit streams train + valid as one split, and no whole split is read into pandas."""
    import models
    from components import train as train_step
    from models.serialization import load_model

    frames = {}
    for split_name, seed, n in (("train", 0, 700), ("valid", 1, 300)):
        frames[split_name] = make_frame(n_rows=n, seed=seed, label="history_match")
        _write(frames[split_name], tmp_path / f"ranking_{split_name}.parquet")
    changes = {"training.epochs": 1, "training.device": "cpu", "training.refit": True}
    params_file = write_params(tmp_path / "params.yaml", changes | {"training.loader.mode": "stream"})
    params = train_step.CONTRACT.load(params_file)
    seen = []
    real_fit, real_read = models.fit, pd.read_parquet

    def spy(model, train, *args, **kwargs):
        seen.append(train.paths if isinstance(train, ParquetSplit) else type(train))
        return real_fit(model, train, *args, **kwargs)

    def read_parquet(path, *args, **kwargs):
        assert Path(path).name != "ranking_train.parquet", f"{path} read whole"
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr("models.fit", spy)
    monkeypatch.setattr(pd, "read_parquet", read_parquet)
    metrics = train_step.run(
        "dlrm", params, tmp_path, tmp_path / "model", tmp_path / "metrics.json", tmp_path / "curves.png"
    )
    train_file, valid_file = tmp_path / "ranking_train.parquet", tmp_path / "ranking_valid.parquet"
    assert seen == [(train_file,), (train_file, valid_file)]
    assert metrics["train_rows"] == 700 and metrics["refit"]["rows"] == 1_000 and metrics["refit"]["streamed"]
    _, saved = load_model(tmp_path / "model")
    whole = FeatureEncoder.fit(params.models.features, pd.concat(frames.values(), ignore_index=True))
    for name, vocab in whole.vocabs.items():
        assert (vocab is None and saved.vocabs[name] is None) or list(vocab) == list(saved.vocabs[name]), name
    for name, stats in whole.dense_stats.items():
        assert saved.dense_stats[name] == pytest.approx(stats, rel=1e-12), name


def test_the_two_towers_streamed_item_counts_are_the_in_memory_ones(tmp_path, models_config):
    from models.registry import initial_model, initial_model_streamed

    training = shipped_params().training
    frames = [make_frame(n_rows=n, seed=s) for n, s in ((430, 0), (270, 1))]
    paths = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    for frame, path in zip(frames, paths, strict=True):
        _write(frame, path)
    _, streamed, _ = initial_model_streamed("two_tower", models_config, training, paths)
    _, whole, _ = initial_model("two_tower", models_config, training, pd.concat(frames))
    assert (streamed.item_counts == whole.item_counts).all() and int(whole.item_counts.sum()) == 700
