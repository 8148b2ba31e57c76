"""The building blocks of the models: MLP, DIN attention and DLRM's dot interaction.

Every module exposes ``output_dim`` so a model can size the next layer from config alone (as in
TorchEasyRec) instead of running a dummy forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MLPConfig

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


_IN_PLACE = frozenset({"relu", "leaky_relu", "silu"})


class MLP(nn.Module):
    """Linear -> [batch/layer norm] -> activation -> [dropout] for each hidden unit count."""

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"MLP: input dim must be positive, got {in_dim}")
        if not hidden_units:
            raise ValueError("MLP: hidden_units must not be empty")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation '{activation}' (one of {sorted(_ACTIVATIONS)})")
        layers: list[nn.Module] = []
        dim = in_dim
        for units in hidden_units:
            layers.append(nn.Linear(dim, units))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(units))
            elif norm == "layer":
                layers.append(nn.LayerNorm(units))
            elif norm != "none":
                raise ValueError(f"MLP: unknown norm '{norm}' (none, batch, layer)")
            # in place where possible: neither Linear nor the norms need their output for backward
            layers.append(
                _ACTIVATIONS[activation](inplace=True)
                if activation in _IN_PLACE
                else _ACTIVATIONS[activation]()
            )
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            dim = units
        self.layers = nn.Sequential(*layers)
        self.output_dim = dim

    @classmethod
    def from_config(cls, in_dim: int, config: MLPConfig) -> MLP:
        return cls(in_dim, config.hidden_units, config.activation, config.norm, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DINAttention(nn.Module):
    """Deep Interest Network attention: the target item (query) weights the behaviour sequence (keys).

    score_l = linear(MLP([q, k_l, q - k_l, q * k_l])), softmax over the valid positions only, output
    = sum_l w_l k_l. Everything after the gather of the valid positions runs on those alone, so padded
    positions never change the output (whatever they hold), not even through batch-norm statistics in
    training mode. A row with an empty sequence gets a zero vector.
    """

    def __init__(
        self,
        dim: int,
        hidden_units: Sequence[int],
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden_units, activation, norm, dropout)
        # no bias: the softmax over positions is shift-invariant, so a bias would get no gradient
        self.score = nn.Linear(self.mlp.output_dim, 1, bias=False)
        self.output_dim = dim

    @classmethod
    def from_config(cls, dim: int, config: MLPConfig) -> DINAttention:
        return cls(dim, config.hidden_units, config.activation, config.norm, config.dropout)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query [B, D], keys [B, L, D] (left-aligned), lengths [B] -> [B, D]."""
        max_len = keys.shape[1]
        lengths = lengths.clamp(max=max_len)
        mask = torch.arange(max_len, device=keys.device).unsqueeze(0) < lengths.unsqueeze(1)
        return self.forward_jagged(query, keys[mask], lengths)

    def forward_jagged(
        self, query: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """query [B, D], values [N, D] = the valid positions row by row (N = lengths.sum()) -> [B, D].

        The padded positions never exist here, which is what makes the layer padding-invariant and
        saves the embedding lookups and gathers of a padded [B, L, D] tensor.
        """
        batch = query.shape[0]
        rows = torch.repeat_interleave(torch.arange(batch, device=query.device), lengths)
        scores = self.score(self.mlp.layers[1:](self._first_layer(query, values, rows))).squeeze(-1).float()
        # softmax within each row's valid positions, on the flat [N] scores (no padded [B, L] grid)
        row_max = torch.full((batch,), -torch.inf, device=query.device)
        row_max = row_max.scatter_reduce(0, rows, scores.detach(), reduce="amax")
        exp = torch.exp(scores - row_max[rows])
        weights = exp / torch.zeros(batch, device=query.device).index_add(0, rows, exp)[rows]
        out = torch.zeros(batch, values.shape[-1], device=query.device, dtype=torch.float32)
        return out.index_add(0, rows, weights.unsqueeze(-1) * values.float()).to(values.dtype)

    def _first_layer(self, query: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The MLP's first Linear applied to [q, k, q - k, q * k] without building that [N, 4D] input:
        W [q, k, q - k, q * k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q * k), and the q term is computed
        once per row instead of once per position. Same result, about half the work of the widest
        matmul of the model."""
        linear = self.mlp.layers[0]
        w_q, w_k, w_d, w_p = linear.weight.split(k.shape[-1], dim=1)
        per_row = F.linear(query, w_q + w_d, linear.bias)  # [B, H]
        hidden = torch.mm(query[rows] * k, w_p.T)
        # accumulate in place: no matmul keeps its output for the backward pass
        hidden.addmm_(k, (w_k - w_d).T)
        return hidden.add_(per_row[rows])


class DotInteraction(nn.Module):
    """DLRM's interaction: pairwise dot products of N feature vectors, strict upper triangle only.

    [B, N, D] -> [B, N(N-1)/2]; self-dots and the mirrored lower triangle carry no extra information.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        if num_features < 2:
            raise ValueError(f"DotInteraction needs at least 2 feature vectors, got {num_features}")
        self.num_features = num_features
        rows, cols = torch.triu_indices(num_features, num_features, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.output_dim = num_features * (num_features - 1) // 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"DotInteraction: expected {self.num_features} feature vectors, got {features.shape[1]}"
            )
        gram = torch.bmm(features, features.transpose(1, 2))
        return gram[:, self._rows, self._cols]
