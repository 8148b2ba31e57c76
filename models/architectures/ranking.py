"""Rankers with TorchEasyRec semantics: MultiTower, MultiTowerDIN and DLRM on one base contract.

Every ranker turns a batch into one logit per row (``predict``), trains with binary cross-entropy on
``batch["label"]`` (``loss``) and reports AUC, GAUC and logloss (``metrics``). Configuration mistakes
(unknown group, DIN on a deep group, DLRM dims that cannot interact) raise :class:`ModelConfigError`
at construction, naming the offending group or feature, as TorchEasyRec does.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.batch import DENSE_KEY, GROUP_KEY, LABEL_KEY, PAD_ID
from models.config import (
    DLRMConfig,
    ModelConfigError,
    MultiTowerConfig,
    MultiTowerDINConfig,
    RankerSection,
    check_model_config,
)
from models.embedding import EmbeddingGroup, WideLinear
from models.encoding import FeatureEncoder
from models.layers import MLP, DINAttention, DotInteraction
from models.metrics import ranking_metrics
from models.model import RecModel, eval_batches, model_device


class Ranker(RecModel):
    """Base of the rankers: ``predict`` -> logits [B]; BCE ``loss``; AUC / GAUC / logloss ``metrics``."""

    def __init__(self, encoder: FeatureEncoder, config: RankerSection) -> None:
        super().__init__(encoder, config)
        check_model_config(self.kind, config, encoder.spec)  # names the group or feature before any build
        self.wide = WideLinear(encoder, config.wide_features)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.predict(batch)

    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B] (apply a sigmoid for click probabilities): the deep part plus the wide part."""
        deep = self.deep_logit(batch)
        return deep + self.wide(batch).to(deep.dtype)

    @abstractmethod
    def deep_logit(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The deep part's logits [B]."""

    def prepare(self, train: Mapping[str, torch.Tensor]) -> None:
        """With ``wide_prefit_l2``: start the wide part's sparse weights (and the output bias) at the
        one-hot logistic regression on the training split, so joint training starts from the strong
        bias-only model instead of reaching it while the deep part already overfits."""
        l2 = self.config.wide_prefit_l2
        if l2 is None or not self.wide.sparse:
            return
        from models.baselines import fit_one_hot_logistic

        tables = [self.wide.weights[name] for name in self.wide.sparse]
        bias, weights = fit_one_hot_logistic(
            [train[name].cpu().numpy() for name in self.wide.sparse],
            [table.num_embeddings for table in tables],
            train[LABEL_KEY].cpu().numpy(),
            l2,
        )
        with torch.no_grad():
            for table, values in zip(tables, weights, strict=True):
                table.weight.copy_(torch.from_numpy(values).unsqueeze(-1))
                table.weight[PAD_ID].zero_()
            self.output.bias.add_(bias)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if LABEL_KEY not in batch:
            raise KeyError("ranker loss: the batch has no 'label' (encode a frame with a label column)")
        logits = self.predict(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch[LABEL_KEY].float())
        if self.config.embedding_l2 > 0:
            penalty = self.embedding.squared_norm(batch) + self.wide.squared_norm(batch)
            loss = loss + self.config.embedding_l2 * penalty
        return loss

    @staticmethod
    def metrics(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
        """AUC, logloss and (with per-row user groups) GAUC."""
        return ranking_metrics(labels, logits, groups)

    @classmethod
    def default_metric(cls, k: int) -> str:
        return "auc"

    def feature_names(self) -> list[str]:
        names = self.embedding.feature_names()
        return names + [n for n in self.wide.feature_names if n not in names]

    def predict_for_users(
        self,
        user_batch: Mapping[str, torch.Tensor],
        item_batch: Mapping[str, torch.Tensor],
        user_index: torch.Tensor,
        user_features: set[str],
    ) -> torch.Tensor:
        """Logits of candidate rows whose user-side features sit once per user in ``user_batch``
        (row ``user_index[i]`` for candidate ``i``) and item-side features in ``item_batch``; equal to
        ``predict`` on the merged batch. Rankers with towers that read only ``user_features`` compute
        them once per user instead of once per candidate (serving ranks hundreds per user)."""
        return self.predict(merge_user_items(user_batch, item_batch, user_index))

    @torch.no_grad()
    def predict_split(self, data: Mapping[str, torch.Tensor], batch_size: int) -> np.ndarray:
        """Logits of a whole encoded split, in eval mode, as float64 numpy."""
        was_training = self.training
        self.eval()
        try:
            device = model_device(self)
            keys = [k for k in self.input_keys() if k in data and k not in (LABEL_KEY, GROUP_KEY)]
            parts = [
                self.predict(b).float().cpu()
                for b in eval_batches({k: data[k] for k in keys}, batch_size, device)
            ]
        finally:
            self.train(was_training)
        return torch.cat(parts).numpy().astype(np.float64)

    def validation_metrics(
        self, data: Mapping[str, torch.Tensor], batch_size: int, k: int = 50
    ) -> dict[str, float]:
        logits = self.predict_split(data, batch_size)
        labels = data[LABEL_KEY].numpy()
        groups = data[GROUP_KEY].numpy() if GROUP_KEY in data else None
        out = self.metrics(logits, labels, groups)
        out["loss"] = out["logloss"]
        return out


class MultiTower(Ranker):
    """One MLP tower per deep feature group -> concat -> final MLP -> linear logit."""

    kind = "multi_tower"
    config_class = MultiTowerConfig
    task = "ranking"

    def __init__(self, encoder: FeatureEncoder, config: MultiTowerConfig | MultiTowerDINConfig) -> None:
        super().__init__(encoder, config)
        check_model_config(self.kind, config, encoder.spec)
        # DIN reads only the valid history positions: no padded lookups for the sequence groups
        self.embedding = EmbeddingGroup(
            encoder, config.feature_groups, jagged_sequences=isinstance(config, MultiTowerDINConfig)
        )
        self.towers = nn.ModuleDict(
            {t.input: MLP.from_config(self._group_dim(t.input), t.mlp) for t in config.towers}
        )
        head_dim = sum(t.output_dim for t in self.towers.values()) + self._build_sequence_towers()
        self.final = MLP.from_config(head_dim, config.final)
        self.output = nn.Linear(self.final.output_dim, 1)

    def deep_logit(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        groups = self.embedding(batch)
        outputs = [tower(groups[name]) for name, tower in self.towers.items()]
        return self._head(outputs + self._sequence_outputs(groups))

    def predict_for_users(
        self,
        user_batch: Mapping[str, torch.Tensor],
        item_batch: Mapping[str, torch.Tensor],
        user_index: torch.Tensor,
        user_features: set[str],
    ) -> torch.Tensor:
        per_user = [n for n in self.towers if set(self.embedding.groups[n].features) <= user_features]
        if not per_user:
            return super().predict_for_users(user_batch, item_batch, user_index, user_features)
        user_groups = self.embedding(user_batch, per_user)
        groups = self.embedding(
            merge_user_items(user_batch, item_batch, user_index),
            [g for g in self.embedding.groups if g not in per_user],
        )
        outputs = [
            tower(user_groups[name]).index_select(0, user_index) if name in per_user else tower(groups[name])
            for name, tower in self.towers.items()
        ]
        deep = self._head(outputs + self._sequence_outputs(groups))
        wide_keys = [*self.wide.feature_names, DENSE_KEY]
        wide_batch = merge_user_items(
            {k: v for k, v in user_batch.items() if k in wide_keys},
            {k: v for k, v in item_batch.items() if k in wide_keys},
            user_index,
        )
        return deep + self.wide(wide_batch).to(deep.dtype)

    def _head(self, tower_outputs: list[torch.Tensor]) -> torch.Tensor:
        return self.output(self.final(torch.cat(tower_outputs, dim=-1))).squeeze(-1)

    def _build_sequence_towers(self) -> int:
        """Hook for MultiTowerDIN: build the sequence towers, return their total output width."""
        return 0

    def _sequence_outputs(self, groups: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Hook for MultiTowerDIN: the sequence towers' outputs."""
        return []

    def _group_dim(self, name: str) -> int:
        dim = self.embedding.group_dim(name)
        if dim == 0:
            raise ModelConfigError(f"{self.kind}: feature group '{name}' is empty")
        return dim


class MultiTowerDIN(MultiTower):
    """MultiTower plus one DIN attention tower per sequence group (target item attends to history)."""

    kind = "multi_tower_din"
    config_class = MultiTowerDINConfig

    def _build_sequence_towers(self) -> int:
        self.din_towers = nn.ModuleDict()
        for tower in self.config.din_towers:
            query_dim = self.embedding.query_dim(tower.input)
            seq_dim = self.embedding.sequence_dim(tower.input)
            if query_dim != seq_dim:
                raise ModelConfigError(
                    f"multi_tower_din: din tower '{tower.input}': query dim {query_dim} "
                    f"!= sequence dim {seq_dim}"
                )
            self.din_towers[tower.input] = DINAttention.from_config(seq_dim, tower.attn_mlp)
        return sum(t.output_dim for t in self.din_towers.values())

    def _sequence_outputs(self, groups: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for name, din in self.din_towers.items():
            query, lengths = groups[name + ".query"], groups[name + ".sequence_length"]
            outputs.append(din.forward_jagged(query, groups[name + ".sequence_values"], lengths))
        return outputs


class DLRM(Ranker):
    """Dense MLP -> one vector; pairwise dots of [dense vector, sparse embeddings...] -> top MLP -> logit.

    The top MLP reads the interactions, the dense vector and (``arch_with_sparse``) the raw sparse
    embeddings. All sparse widths must be equal and equal to the dense MLP's output width.
    """

    kind = "dlrm"
    config_class = DLRMConfig
    task = "ranking"

    def __init__(self, encoder: FeatureEncoder, config: DLRMConfig) -> None:
        super().__init__(encoder, config)
        check_model_config(self.kind, config, encoder.spec)
        self.embedding = EmbeddingGroup(encoder, config.feature_groups)
        groups = {g.name: g for g in config.feature_groups}
        self._num_sparse = len(groups["sparse"].features)
        self._sparse_dim = encoder.spec.embedding_dim(groups["sparse"].features[0])
        self.dense_mlp = (
            MLP.from_config(self.embedding.group_dim("dense"), config.dense_mlp)
            if "dense" in groups
            else None
        )
        num_vectors = self._num_sparse + (1 if self.dense_mlp is not None else 0)
        if num_vectors < 2:
            raise ModelConfigError(
                "dlrm: the interaction needs at least two vectors (dense + sparse features)"
            )
        self.interaction = DotInteraction(num_vectors)
        top_dim = self.interaction.output_dim
        if self.dense_mlp is not None:
            top_dim += self.dense_mlp.output_dim
        if config.arch_with_sparse:
            top_dim += self._num_sparse * self._sparse_dim
        self.final = MLP.from_config(top_dim, config.final)
        self.output = nn.Linear(self.final.output_dim, 1)

    def deep_logit(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        groups = self.embedding(batch)
        sparse = groups["sparse"]
        vectors = sparse.view(-1, self._num_sparse, self._sparse_dim)
        parts = []
        if self.dense_mlp is not None:
            dense = self.dense_mlp(groups["dense"])
            vectors = torch.cat([dense.unsqueeze(1).to(vectors.dtype), vectors], dim=1)
            parts.append(dense)
        interactions = self.interaction(vectors)
        parts.insert(0, interactions)
        if self.config.arch_with_sparse:
            parts.append(sparse)
        top = torch.cat([p.to(interactions.dtype) for p in parts], dim=-1)
        return self.output(self.final(top)).squeeze(-1)


def merge_user_items(
    user_batch: Mapping[str, torch.Tensor], item_batch: Mapping[str, torch.Tensor], user_index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One batch row per candidate: user tensors repeated by ``user_index``, item tensors as they are.
    Only the dense matrix is in both; each side fills its own columns and leaves 0 in the other's."""
    batch = {key: tensor.index_select(0, user_index) for key, tensor in user_batch.items()}
    for key, tensor in item_batch.items():
        batch[key] = batch[key] + tensor if key == DENSE_KEY and key in batch else tensor
    return batch
