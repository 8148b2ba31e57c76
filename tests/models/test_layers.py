from __future__ import annotations

import pytest
import torch

from models.layers import MLP, DINAttention, DotInteraction


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_output_dim(norm):
    mlp = MLP(12, [32, 7], activation="gelu", norm=norm, dropout=0.1)
    assert mlp.output_dim == 7
    assert mlp(torch.randn(5, 12)).shape == (5, 7)


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        MLP(4, [4], activation="swishy")
    with pytest.raises(ValueError, match="input dim must be positive"):
        MLP(0, [4])


def test_din_padding_never_changes_the_output():
    torch.manual_seed(0)
    din = DINAttention(8, [16, 8], norm="batch")  # batch norm: padding must not leak through batch stats
    din.train()
    query, keys = torch.randn(6, 8), torch.randn(6, 5, 8)
    lengths = torch.tensor([5, 3, 1, 0, 2, 4])
    out = din(query, keys, lengths)
    assert out.shape == (6, din.output_dim) and din.output_dim == 8
    changed = keys.clone()
    pad = torch.arange(5).unsqueeze(0) >= lengths.unsqueeze(1)
    changed[pad] = torch.randn(int(pad.sum()), 8) * 100
    assert torch.equal(din(query, changed, lengths), out)
    assert torch.equal(out[3], torch.zeros(8))  # empty history -> zeros
    # one valid position gets all the weight
    assert torch.allclose(out[2], keys[2, 0], atol=1e-6)
    # a valid position does matter
    changed[0, 0] += 1.0
    assert not torch.allclose(din(query, changed, lengths)[0], out[0])


def test_din_weights_depend_on_the_query():
    torch.manual_seed(1)
    din = DINAttention(4, [8])
    keys = torch.randn(1, 3, 4)
    lengths = torch.tensor([3])
    a = din(torch.randn(1, 4), keys, lengths)
    b = din(torch.randn(1, 4), keys, lengths)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("n", [2, 3, 9])
def test_dot_interaction_counts_and_values(n):
    layer = DotInteraction(n)
    assert layer.output_dim == n * (n - 1) // 2
    x = torch.randn(4, n, 5)
    out = layer(x)
    assert out.shape == (4, n * (n - 1) // 2)
    expected = torch.stack([(x[:, i] * x[:, j]).sum(-1) for i in range(n) for j in range(i + 1, n)], dim=1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_dot_interaction_checks_the_feature_count():
    with pytest.raises(ValueError, match="at least 2"):
        DotInteraction(1)
    with pytest.raises(ValueError, match="expected 3 feature vectors, got 4"):
        DotInteraction(3)(torch.randn(2, 4, 5))


def test_din_first_layer_shortcut_equals_the_concatenated_input():
    """The attention MLP's first layer is computed without materialising [q, k, q - k, q * k]."""
    torch.manual_seed(2)
    din = DINAttention(6, [10, 4], norm="layer")
    query, keys, lengths = torch.randn(4, 6), torch.randn(4, 5, 6), torch.tensor([5, 2, 0, 3])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    q, k = query.unsqueeze(1).expand(4, 5, 6)[mask], keys[mask]
    scores = din.score(din.mlp(torch.cat([q, k, q - k, q * k], dim=-1))).squeeze(-1)
    full = torch.full((4, 5), -torch.inf).masked_scatter(mask, scores)
    weights = torch.nan_to_num(torch.softmax(full, dim=1))
    expected = torch.einsum("bl,bld->bd", weights, keys)
    assert torch.allclose(din(query, keys, lengths), expected, atol=1e-6)
