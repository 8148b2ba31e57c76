"""The feature-group embedding layer: an encoded batch -> one tensor per feature group (TorchEasyRec).

A deep group ``g`` -> ``out[g]`` [B, D_g]; a sequence group ``g`` -> ``out[g + ".query"]`` [B, Dq],
``out[g + ".sequence"]`` [B, L, Ds] and ``out[g + ".sequence_length"]`` [B]. Sparse and sequence
features share embedding tables where the config says so (``shares``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.batch import DENSE_KEY, LENGTH_SUFFIX, OOV_ID, PAD_ID, Batch, sequence_mask
from models.config import FeatureGroup, ModelConfigError
from models.encoding import FeatureEncoder


class EmbeddingGroup(nn.Module):
    """Embedding tables for the features of ``groups`` and the per-group tensors built from a batch.

    Only the tables the groups read are created (unused parameters would break DDP). Sequence
    features look up the table of the sparse feature they share unless ``share_sequence_tables`` is
    False. With ``pool_sequences`` False, a deep group's sequences are not mean-pooled but returned as
    ``g.sequence`` / ``g.sequence_length`` for the caller to pool (the two-tower's attention pooling).
    With ``jagged_sequences``, ``g.sequence`` is replaced by ``g.sequence_values``: the valid positions
    only, [N, Ds] (what DIN consumes, without padded lookups).
    ``id_dropout`` replaces each id of ``id_dropout_features`` by the OOV row with that probability
    while training (cold start: the rest of the group must carry the signal).
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        groups: list[FeatureGroup],
        *,
        share_sequence_tables: bool = True,
        pool_sequences: bool = True,
        jagged_sequences: bool = False,
        id_dropout: float = 0.0,
        id_dropout_features: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.spec = encoder.spec
        self.groups = {g.name: g for g in groups}
        self.pool_sequences = pool_sequences
        self.jagged_sequences = jagged_sequences
        self.id_dropout = id_dropout
        self.id_dropout_features = frozenset(id_dropout_features)
        self._share = share_sequence_tables
        # per-group feature lists by kind and each feature's table, resolved once (forward runs per request)
        self._by_kind = {
            g.name: {k: [f for f in g.features if self.spec.kind_of(f) == k] for k in ("sparse", "sequence")}
            for g in groups
        }
        self._tables_of = {
            f: self.spec.sequence_feature(f).shares
            if self.spec.kind_of(f) == "sequence" and share_sequence_tables
            else f
            for g in groups
            for f in g.features
        }
        self.tables = nn.ModuleDict()
        for group in groups:
            for name in group.features:
                kind = self.spec.kind_of(name)
                if kind is None:
                    raise ModelConfigError(f"feature group '{group.name}': unknown feature '{name}'")
                if kind == "dense":
                    continue
                table = self._table_name(name)
                if table not in self.tables:
                    emb = nn.Embedding(
                        encoder.num_embeddings(name), self.spec.embedding_dim(name), padding_idx=PAD_ID
                    )
                    nn.init.normal_(emb.weight, std=self.spec.embedding_dim(name) ** -0.5)
                    with torch.no_grad():
                        # padding contributes nothing; OOV starts neutral, so an id never seen in training
                        # (a cold user or item at evaluation) adds no random noise unless OOV was trained
                        emb.weight[PAD_ID].zero_()
                        emb.weight[OOV_ID].zero_()
                    self.tables[table] = emb
        self._dense_columns = {
            g.name: [encoder.dense_index(n) for n in g.features if self.spec.kind_of(n) == "dense"]
            for g in groups
        }
        for g in groups:
            seqs = self._sequences(g)
            if seqs and (g.type == "sequence" or not pool_sequences):
                lengths = {self.spec.sequence_feature(n).max_length for n in seqs}
                if len(lengths) > 1:
                    raise ModelConfigError(
                        f"feature group '{g.name}': sequence features must share one max_length, "
                        f"got {sorted(lengths)}"
                    )
        for g, cols in self._dense_columns.items():
            self.register_buffer(f"_dense_idx_{g}", torch.tensor(cols, dtype=torch.long), persistent=False)

    # ---- dimensions -----------------------------------------------------------------------------

    def group_dim(self, name: str) -> int:
        """Width of ``out[name]`` for a deep group (pooled sequences included only when pooled)."""
        group = self.groups[name]
        dim = len(self._dense_columns[name])
        for f in group.features:
            kind = self.spec.kind_of(f)
            if kind == "sparse" or (kind == "sequence" and self.pool_sequences):
                dim += self.spec.embedding_dim(f)
        return dim

    def query_dim(self, name: str) -> int:
        return sum(
            self.spec.embedding_dim(f) for f in self.groups[name].features if self.spec.kind_of(f) == "sparse"
        )

    def sequence_dim(self, name: str) -> int:
        return sum(self.spec.embedding_dim(f) for f in self._sequences(self.groups[name]))

    def feature_names(self, group_names: Iterable[str] | None = None) -> list[str]:
        """The features the given groups (default: all) read, in first-seen order."""
        names: list[str] = []
        for g in group_names if group_names is not None else self.groups:
            names += [f for f in self.groups[g].features if f not in names]
        return names

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor], group_names: Iterable[str] | None = None) -> Batch:
        """Tensors of the named groups (default: all), keyed as in the module docstring."""
        out: Batch = {}
        for name in group_names if group_names is not None else self.groups:
            group = self.groups[name]
            if group.type == "sequence":
                out[name + ".query"] = torch.cat(
                    [self._lookup(f, batch) for f in self._sparse(group)], dim=-1
                )
                self._sequence_outputs(group, batch, out)
                continue
            parts = [self._lookup(f, batch) for f in self._sparse(group)]
            if self.pool_sequences:
                parts += [self._mean_pooled(f, batch) for f in self._sequences(group)]
            elif self._sequences(group):
                self._sequence_outputs(group, batch, out)
            if self._dense_columns[name]:
                dense = _required(batch, DENSE_KEY)
                parts.append(dense.index_select(1, getattr(self, f"_dense_idx_{name}")))
            out[name] = torch.cat(parts, dim=-1) if parts else _required(batch, DENSE_KEY)[:, :0]
        return out

    def squared_norm(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the batch rows of the squared norms of the sparse embeddings they look up (each
        sparse feature of every group once; sequences are left out): the embedding L2 penalty, which
        only touches the rows a batch uses, unlike weight decay on the whole table."""
        names = {f for g in self.groups.values() for f in self._sparse(g)}
        total = torch.zeros((), device=next(self.tables.parameters()).device)
        for name in sorted(names):
            vectors = self.tables[self._table_name(name)](_required(batch, name))
            total = total + vectors.float().square().sum(-1).mean()
        return total

    def _lookup(self, name: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ids = _required(batch, name)
        if self.training and self.id_dropout > 0 and name in self.id_dropout_features:
            drop = torch.rand(ids.shape, device=ids.device) < self.id_dropout
            ids = torch.where(drop & (ids != PAD_ID), torch.full_like(ids, OOV_ID), ids)
        return self.tables[self._table_name(name)](ids)

    def _sequence_outputs(self, group: FeatureGroup, batch: Mapping[str, torch.Tensor], out: Batch) -> None:
        """Padded ``g.sequence`` [B, L, Ds], or with ``jagged_sequences`` ``g.sequence_values`` [N, Ds]:
        only the valid positions, row by row, looked up without touching the padding. The group's
        first sequence feature's lengths apply to all of its sequences (they are parallel lists)."""
        seqs = self._sequences(group)
        max_length = _required(batch, seqs[0]).shape[1]
        lengths = _required(batch, seqs[0] + LENGTH_SUFFIX).clamp(max=max_length)
        out[group.name + ".sequence_length"] = lengths
        if self.jagged_sequences:
            mask = sequence_mask(lengths, max_length)
            parts = [self.tables[self._table_name(f)](_required(batch, f)[mask]) for f in seqs]
            out[group.name + ".sequence_values"] = torch.cat(parts, dim=-1)
            return
        parts = [self.tables[self._table_name(f)](self._valid_ids(f, batch)) for f in seqs]
        out[group.name + ".sequence"] = torch.cat(parts, dim=-1)

    def _mean_pooled(self, name: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the valid positions' embeddings (zeros for an empty sequence); one fused
        embedding_bag, with positions past the length forced to the padding row it skips."""
        ids = self._valid_ids(name, batch)
        table = self.tables[self._table_name(name)]
        return F.embedding_bag(ids, table.weight, mode="mean", padding_idx=PAD_ID)

    def _valid_ids(self, name: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sequence ids with every position past the row's length set to PAD, so whatever a caller
        left in the padding can never reach the output."""
        ids = _required(batch, name)
        mask = sequence_mask(_required(batch, name + LENGTH_SUFFIX), ids.shape[1])
        return torch.where(mask, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))

    def _table_name(self, name: str) -> str:
        return self._tables_of[name]

    def _sparse(self, group: FeatureGroup) -> list[str]:
        return self._by_kind[group.name]["sparse"]

    def _sequences(self, group: FeatureGroup) -> list[str]:
        return self._by_kind[group.name]["sequence"]


def _required(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return batch[key]
    except KeyError:
        raise KeyError(
            f"the batch has no '{key}' (keys: {sorted(batch)}); encode the feature with FeatureEncoder.encode"
        ) from None


class WideLinear(nn.Module):
    """The wide part of a ranker: one learned weight per value of each sparse feature (a linear model on
    their one-hot encoding, e.g. user and item bias) plus a linear map of the listed dense features.

    Weights start at zero, so the part adds nothing until training finds a signal; an id never seen in
    training (the OOV row) keeps weight 0 unless OOV rows were trained.
    """

    def __init__(self, encoder: FeatureEncoder, features: Iterable[str]) -> None:
        super().__init__()
        spec = encoder.spec
        features = list(features)
        self.sparse = [f for f in features if spec.kind_of(f) == "sparse"]
        dense = [f for f in features if spec.kind_of(f) == "dense"]
        other = [f for f in features if f not in self.sparse and f not in dense]
        if other:
            raise ModelConfigError(f"wide_features: {other} are not sparse or dense features")
        self.weights = nn.ModuleDict()
        for name in self.sparse:
            table = nn.Embedding(encoder.num_embeddings(name), 1, padding_idx=PAD_ID)
            nn.init.zeros_(table.weight)
            self.weights[name] = table
        self.register_buffer(
            "_dense_idx",
            torch.tensor([encoder.dense_index(f) for f in dense], dtype=torch.long),
            persistent=False,
        )
        self.dense = nn.Linear(len(dense), 1, bias=False) if dense else None
        if self.dense is not None:
            nn.init.zeros_(self.dense.weight)
        self.feature_names = self.sparse + dense

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The wide logit [B] (zeros when no feature is listed)."""
        out: torch.Tensor | None = None
        for name, table in self.weights.items():
            term = table(_required(batch, name)).squeeze(-1)
            out = term if out is None else out + term
        if self.dense is not None:
            term = self.dense(_required(batch, DENSE_KEY).index_select(1, self._dense_idx)).squeeze(-1)
            out = term if out is None else out + term.to(out.dtype)
        if out is None:
            return torch.zeros(next(iter(batch.values())).shape[0], device=self._dense_idx.device)
        return out

    def squared_norm(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean over the batch rows of the squared weights they look up (for embedding L2)."""
        total = torch.zeros((), device=self._dense_idx.device)
        for name, table in self.weights.items():
            total = total + table(_required(batch, name)).float().square().sum(-1).mean()
        return total
