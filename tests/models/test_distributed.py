"""DistributedDataParallel on CPU (gloo): two processes, each on half the global batch, must produce
the gradients (and, through the trainer, the weights) of one process on the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from models.config import TrainingConfig
from models.encoding import FeatureEncoder
from models.registry import build_model
from models.trainer import TrainingObjective, fit, shard_indices
from tests.conftest import revalidated, shipped_params
from tests.models.conftest import make_frame, small_models_config

WORLD_SIZE = 2
GLOBAL_BATCH = 128
KIND = "multi_tower_din"


def test_two_process_gloo_gradients_and_training_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD_SIZE, join=True)

    model, batch = _model_and_data()
    TrainingObjective(model)({k: v[:GLOBAL_BATCH] for k, v in batch.items()}).backward()
    for rank in range(WORLD_SIZE):
        grads = load_file(str(tmp_path / f"grads{rank}.safetensors"))
        assert grads.keys() == {n for n, p in model.named_parameters()}
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name], param.grad, rtol=1e-4, atol=1e-7), name

    model, batch = _model_and_data()
    fit(model, batch, batch, _training(batch_size=GLOBAL_BATCH))
    rank0 = load_file(str(tmp_path / "weights0.safetensors"))
    rank1 = load_file(str(tmp_path / "weights1.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        assert torch.allclose(rank0[name], value, atol=1e-5), name


def _worker(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE
    )
    model, batch = _model_and_data()
    mine = shard_indices(torch.arange(GLOBAL_BATCH), rank, WORLD_SIZE)
    assert len(mine) == GLOBAL_BATCH // WORLD_SIZE
    ddp = DistributedDataParallel(TrainingObjective(model), forward_sync_buffers=False)
    ddp({k: v[mine] for k, v in batch.items()}).backward()
    grads = {n: p.grad.contiguous() for n, p in model.named_parameters()}
    save_file(grads, str(Path(out_dir) / f"grads{rank}.safetensors"))
    dist.destroy_process_group()

    # what torchrun sets: fit() must join the process group itself (gloo on CPU)
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    model, batch = _model_and_data()
    result = fit(model, batch, batch, _training(batch_size=GLOBAL_BATCH // WORLD_SIZE))
    assert result.world_size == WORLD_SIZE and dist.get_backend() == "gloo"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out_dir) / f"weights{rank}.safetensors"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model_and_data():
    config = small_models_config()
    frame = make_frame(n_rows=512, seed=3)
    encoder = FeatureEncoder.fit(config.features, frame)
    torch.manual_seed(0)
    return build_model(KIND, config.model(KIND), encoder), encoder.encode(frame)


def _training(batch_size: int) -> TrainingConfig:
    # written for torch's own thread count and no per-model overrides (params.yaml: 1 thread, more epochs)
    values = {"batch_size": batch_size, "epochs": 1, "lr": 1e-3, "seed": 1, "device": "cpu", "patience": 0}
    return revalidated(shipped_params().training, **values, num_workers=0, per_model={})
