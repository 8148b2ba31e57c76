"""Save and load a trained model as ``model.safetensors`` + ``config.json``, without pickle.

``config.json`` holds everything needed to rebuild the exact ``nn.Module``: the model kind, its config,
the feature encoder's state (vocabularies, dense statistics) and the two-tower's item frequencies.
Both files are staged as temporary siblings and renamed into place only once both are complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.encoding import FeatureEncoder
from models.model import RecModel
from models.registry import build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def save_model(
    model: RecModel,
    encoder: FeatureEncoder,
    model_config: Any,
    out_dir: str | Path,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; ``extra`` is stored as is
    (e.g. training metadata) under ``"extra"``."""
    if model_config != model.config:
        raise ValueError(
            f"save_model: the {model.kind} config given differs from the one the model was built with; "
            "config.json must describe the saved weights"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "kind": model.kind,
        "model_config": model_config.model_dump(mode="json"),
        "features": encoder.to_dict(),
        "item_counts": model.item_counts.tolist() if hasattr(model, "item_counts") else None,
        "extra": dict(extra or {}),
    }
    weights = state_tensors(model)
    with staged_files([out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE]) as (weights_tmp, config_tmp):
        save_file(
            weights, str(weights_tmp), metadata={"kind": model.kind, "format_version": str(FORMAT_VERSION)}
        )
        config_tmp.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return out_dir


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[RecModel, FeatureEncoder]:
    """Rebuild the model from ``config.json`` and load its weights (safetensors, strict); eval mode."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    weights_path = model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: not found (a saved model directory holds {WEIGHTS_FILE} and {CONFIG_FILE})"
            )
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format_version {config.get('format_version')!r}")
    encoder = FeatureEncoder.from_dict(config["features"])
    counts = config.get("item_counts")
    model = build_model(
        config["kind"],
        config["model_config"],
        encoder,
        **({} if counts is None else {"item_counts": np.asarray(counts, dtype=np.int64)}),
    )
    state = load_file(str(weights_path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: weights do not match the config: missing {missing}, unexpected {unexpected}"
        )
    return model.to(device).eval(), encoder


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent state as contiguous CPU tensors (safetensors refuses views)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


@contextmanager
def staged_files(finals: list[Path]) -> Iterator[list[Path]]:
    """Temporary siblings of ``finals``; all are renamed into place only if the block succeeds."""
    temps = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            temps.append(Path(name))
        yield temps
        for tmp, final in zip(temps, finals, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
