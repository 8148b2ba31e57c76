from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models.encoding import FeatureEncoder
from models.registry import MODEL_KINDS, build_model, model_class
from models.serialization import CONFIG_FILE, WEIGHTS_FILE, load_model, save_model
from tests.models.conftest import make_frame


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_save_then_load_gives_identical_outputs(tmp_path, frame, models_config, kind):
    torch.manual_seed(0)
    config = models_config.model(kind)
    if kind == "two_tower":
        config = config.model_copy(update={"history_pooling": "attention", "learn_temperature": True})
    encoder = FeatureEncoder.fit(models_config.features, frame)
    model = build_model(kind, config, encoder, **model_class(kind).fitted_inputs(encoder, frame))
    model.loss(encoder.encode(frame)).backward()  # touch the weights so they differ from a fresh init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    save_model(model, encoder, config, tmp_path / kind)

    assert sorted(p.name for p in (tmp_path / kind).iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    saved = json.loads((tmp_path / kind / CONFIG_FILE).read_text())
    assert saved["kind"] == kind and saved["features"]["spec"]["sparse"][0]["name"] == "user_id"
    assert load_file(str(tmp_path / kind / WEIGHTS_FILE)).keys() == model.state_dict().keys()

    loaded, loaded_encoder = load_model(tmp_path / kind)
    assert not loaded.training and type(loaded) is type(model)
    unseen = make_frame(seed=7)  # new values too: the encoders must map them the same way
    batch, loaded_batch = encoder.encode(unseen), loaded_encoder.encode(unseen)
    for key in batch:
        assert torch.equal(batch[key], loaded_batch[key])
    with torch.no_grad():
        if kind == "two_tower":
            assert torch.equal(model.user_embedding(batch), loaded.user_embedding(loaded_batch))
            assert torch.equal(model.item_embedding(batch), loaded.item_embedding(loaded_batch))
            assert torch.equal(model.loss(batch), loaded.loss(loaded_batch))  # log-Q counts restored
        else:
            assert torch.equal(model.predict(batch), loaded.predict(loaded_batch))


def test_load_rejects_mismatched_weights(tmp_path, frame, models_config):
    encoder = FeatureEncoder.fit(models_config.features, frame)
    model = build_model("dlrm", models_config.dlrm, encoder)
    save_model(model, encoder, models_config.dlrm, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["model_config"]["final"]["hidden_units"] = [7]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(tmp_path / "missing")
