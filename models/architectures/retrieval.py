"""Two-tower retrieval: user tower and item tower map to L2-normalised d-vectors scored by dot product.

The item tower runs offline over the catalogue (exported to a FAISS index), the user tower online, so
the two towers never see each other's features. Training follows the production recipe: in-batch
sampled softmax with log-Q correction, accidental-hit masking, a fixed or learned temperature,
optional uniform negatives from the catalogue, and item-id dropout so items unseen in training are
embedded from their content (see models/losses.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from models.batch import DENSE_KEY, LENGTH_SUFFIX, Batch
from models.config import ModelConfigError, TwoTowerConfig, check_model_config
from models.embedding import EmbeddingGroup
from models.encoding import FeatureEncoder
from models.layers import MLP, DINAttention
from models.losses import (
    bce_retrieval_loss,
    clamp_temperature,
    expected_log_counts,
    retrieval_logits,
    sampled_softmax_loss,
)
from models.metrics import ItemSets, full_catalogue_topk, retrieval_metrics
from models.model import RecModel, eval_batches, model_device


class TwoTower(RecModel):
    """User tower (id, profile, pooled history, stats) and item tower (id, content, stats) -> R^d.

    ``item_counts`` [num item-id rows] are the training-set occurrences of each encoded item id
    (``FeatureEncoder.id_counts``); they define the sampling probabilities of the log-Q correction
    and are saved with the model.
    """

    kind = "two_tower"
    config_class = TwoTowerConfig
    task = "retrieval"
    fit_inputs = ("item_counts",)

    def __init__(
        self, encoder: FeatureEncoder, config: TwoTowerConfig, item_counts: np.ndarray | None = None
    ) -> None:
        super().__init__(encoder, config)
        check_model_config(self.kind, config, encoder.spec)
        self.embedding = EmbeddingGroup(
            encoder,
            config.feature_groups,
            share_sequence_tables=config.share_item_id_embedding,
            pool_sequences=config.history_pooling == "mean",
            id_dropout=config.id_dropout,
            id_dropout_features=config.id_dropout_features,
        )
        user_dim = self.embedding.group_dim(config.user_group)
        self.history_attention: DINAttention | None = None
        if config.history_pooling == "attention":
            seq_dim = self.embedding.sequence_dim(config.user_group)
            if seq_dim == 0:
                raise ModelConfigError(
                    f"two_tower.history_pooling: 'attention' needs sequence features in the user group "
                    f"'{config.user_group}'"
                )
            # the query is a projection of the rest of the user's features (the target item is unknown
            # to the user tower); a group holding only sequences uses a learned query vector
            self.history_query = nn.Linear(user_dim, seq_dim) if user_dim else None
            self.history_query_vector = (
                nn.Parameter(torch.randn(seq_dim) * seq_dim**-0.5) if not user_dim else None
            )
            self.history_attention = DINAttention.from_config(seq_dim, config.attention_mlp)
            user_dim += seq_dim
        item_dim = self.embedding.group_dim(config.item_group)
        self.user_mlp = MLP.from_config(user_dim, config.user_tower)
        self.user_projection = nn.Linear(self.user_mlp.output_dim, config.embedding_dim)
        self.item_mlp = MLP.from_config(item_dim, config.item_tower)
        self.item_projection = nn.Linear(self.item_mlp.output_dim, config.embedding_dim)
        self.output_dim = config.embedding_dim

        log_t = torch.tensor(math.log(config.temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)

        n_ids = encoder.num_embeddings(config.item_id_feature)
        if item_counts is None:
            if config.logq_correction:
                raise ModelConfigError(
                    "two_tower.logq_correction needs the training item frequencies: pass "
                    "item_counts=encoder.id_counts(train_frame, 'item_id')"
                )
            item_counts = np.ones(n_ids, dtype=np.int64)
        item_counts = np.asarray(item_counts, dtype=np.int64)
        if item_counts.shape != (n_ids,):
            raise ModelConfigError(
                f"two_tower: item_counts has shape {item_counts.shape}, expected ({n_ids},) "
                "(one count per item-id row)"
            )
        self.item_counts = item_counts
        # an item never seen in training counts once, so its log-probability stays finite
        smoothed = torch.from_numpy(np.maximum(item_counts, 1)).double()
        self.register_buffer("item_probability", (smoothed / smoothed.sum()).float(), persistent=False)
        self._pool: Batch = {}

    # ---- towers ---------------------------------------------------------------------------------

    def user_embedding(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised user vectors [B, d] from the user group's features only."""
        group = self.config.user_group
        out = self.embedding(batch, [group])
        x = out[group]
        if self.history_attention is not None:
            if self.history_query is not None:
                query = self.history_query(x)
            else:
                query = self.history_query_vector.unsqueeze(0).expand(x.shape[0], -1)
            pooled = self.history_attention(query, out[group + ".sequence"], out[group + ".sequence_length"])
            x = torch.cat([x, pooled.to(x.dtype)], dim=-1)
        return F.normalize(self.user_projection(self.user_mlp(x)).float(), dim=-1)

    def item_embedding(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised item vectors [B, d] from the item group's features only."""
        group = self.config.item_group
        x = self.embedding(batch, [group])[group]
        return F.normalize(self.item_projection(self.item_mlp(x)).float(), dim=-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Score of each (user, item) row: the dot product of the two towers' vectors."""
        return (self.user_embedding(batch) * self.item_embedding(batch)).sum(dim=-1)

    def user_feature_names(self) -> list[str]:
        return self.embedding.feature_names([self.config.user_group])

    def item_feature_names(self) -> list[str]:
        return self.embedding.feature_names([self.config.item_group])

    def feature_names(self) -> list[str]:
        return self.embedding.feature_names()

    def temperature(self) -> torch.Tensor:
        return clamp_temperature(self.log_temperature)

    # ---- training -------------------------------------------------------------------------------

    def prepare(self, train: Mapping[str, torch.Tensor]) -> None:
        self.set_item_pool(train)

    def set_item_pool(self, batch: Mapping[str, torch.Tensor]) -> None:
        """The catalogue that uniform (mixed) negatives are drawn from: one row per distinct item id of
        ``batch`` (its last occurrence, i.e. the most recent features in a time-ordered frame)."""
        keys = self._item_keys()
        ids = batch[self.config.item_id_feature]
        self._pool = {k: batch[k][_last_occurrence(ids)] for k in keys}

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(batch, use_negatives=True)

    def _loss(self, batch: Mapping[str, torch.Tensor], use_negatives: bool) -> torch.Tensor:
        cfg = self.config
        user = self.user_embedding(batch)
        item = self.item_embedding(batch)
        ids = batch[cfg.item_id_feature]
        neg_emb = neg_ids = None
        num_neg = cfg.mixed_negatives if use_negatives and self._pool else 0
        catalogue = 0
        if num_neg:
            pool = self._pool_on(ids.device)
            catalogue = int(pool[cfg.item_id_feature].shape[0])
            pick = torch.randint(catalogue, (num_neg,), device=ids.device)
            negatives = {k: v[pick] for k, v in pool.items()}
            neg_emb = self.item_embedding(negatives)
            neg_ids = negatives[cfg.item_id_feature]
        item_log_q = neg_log_q = None
        if cfg.logq_correction:
            item_log_q = expected_log_counts(self.item_probability[ids], ids.shape[0], num_neg, catalogue)
            if neg_ids is not None:
                neg_log_q = expected_log_counts(
                    self.item_probability[neg_ids], ids.shape[0], num_neg, catalogue
                )
        logits = retrieval_logits(
            user,
            item,
            ids,
            temperature=self.temperature(),
            item_log_q=item_log_q,
            negative_emb=neg_emb,
            negative_ids=neg_ids,
            negative_log_q=neg_log_q,
            remove_accidental_hits=cfg.remove_accidental_hits,
        )
        return sampled_softmax_loss(logits) if cfg.loss == "softmax" else bce_retrieval_loss(logits)

    # ---- validation -----------------------------------------------------------------------------

    @classmethod
    def default_metric(cls, k: int) -> str:
        return f"recall@{k}"

    @classmethod
    def fitted_inputs(cls, encoder: FeatureEncoder, train_df: pd.DataFrame) -> dict[str, np.ndarray]:
        """The log-Q correction's item frequencies: training occurrences per encoded item id."""
        return {"item_counts": encoder.id_counts(train_df, "item_id")}

    @torch.no_grad()
    def item_embeddings(self, items: Mapping[str, torch.Tensor], batch_size: int = 8192) -> torch.Tensor:
        """Item vectors [N, d] of an encoded item table (export to the ANN index), in eval mode."""
        return self._embed_split({k: items[k] for k in self._item_keys()}, batch_size, self.item_embedding)

    @torch.no_grad()
    def user_embeddings(self, users: Mapping[str, torch.Tensor], batch_size: int = 8192) -> torch.Tensor:
        """User vectors [N, d] of an encoded user frame, in eval mode."""
        keys = self._keys_for(self.user_feature_names())
        return self._embed_split({k: users[k] for k in keys}, batch_size, self.user_embedding)

    @torch.no_grad()
    def validation_metrics(
        self, data: Mapping[str, torch.Tensor], batch_size: int, k: int = 50
    ) -> dict[str, float]:
        """In-batch loss (no extra negatives) and Recall/NDCG/HitRate@k of each row's item against the
        catalogue of training-pool plus validation items (ids unseen in training share the OOV row)."""
        was_training = self.training
        self.eval()
        try:
            device = model_device(self)
            keys = [key for key in self.input_keys() if key in data]
            total, rows = 0.0, 0
            for batch in eval_batches({key: data[key] for key in keys}, batch_size, device):
                n = int(batch[self.config.item_id_feature].shape[0])
                total += float(self._loss(batch, use_negatives=False)) * n
                rows += n
            item_keys = self._item_keys()
            ids = data[self.config.item_id_feature]
            if self._pool:
                catalogue = {key: torch.cat([self._pool[key].cpu(), data[key]]) for key in item_keys}
            else:
                catalogue = {key: data[key] for key in item_keys}
            catalogue = {
                key: v[_last_occurrence(catalogue[self.config.item_id_feature])]
                for key, v in catalogue.items()
            }
            catalogue_ids = catalogue[self.config.item_id_feature]
            order = torch.argsort(catalogue_ids)
            targets = order[torch.searchsorted(catalogue_ids[order], ids)].numpy()
            item_vectors = self.item_embeddings(catalogue, batch_size)
            user_vectors = self.user_embeddings(data, batch_size)
            topk = full_catalogue_topk(user_vectors, item_vectors, k)
            relevant = ItemSets.from_pairs(np.arange(len(targets)), targets, len(targets))
            # a catalogue smaller than k is ranked whole; the metric keeps the requested name
            cut = topk.shape[1]
            out = {
                name.replace(f"@{cut}", f"@{k}"): v
                for name, v in retrieval_metrics(topk, relevant, [cut]).items()
            }
        finally:
            self.train(was_training)
        out["loss"] = total / max(rows, 1)
        return out

    def _embed_split(
        self, data: Mapping[str, torch.Tensor], batch_size: int, tower: Callable[[Batch], torch.Tensor]
    ) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            device = model_device(self)
            return torch.cat([tower(batch) for batch in eval_batches(data, batch_size, device)])
        finally:
            self.train(was_training)

    def _item_keys(self) -> list[str]:
        return self._keys_for(self.item_feature_names())

    def _keys_for(self, names: list[str]) -> list[str]:
        """Batch keys holding the given features (ids, sequences with lengths, the dense matrix)."""
        spec = self.encoder.spec
        keys = []
        for name in names:
            kind = spec.kind_of(name)
            if kind == "sparse":
                keys.append(name)
            elif kind == "sequence":
                keys += [name, name + LENGTH_SUFFIX]
        if any(spec.kind_of(n) == "dense" for n in names):
            keys.append(DENSE_KEY)
        return keys

    def _pool_on(self, device: torch.device) -> Batch:
        first = next(iter(self._pool.values()))
        if first.device != device:
            self._pool = {k: v.to(device) for k, v in self._pool.items()}
        return self._pool


def _last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Row index of the last occurrence of each distinct id, in ascending id order (vectorised)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = torch.full((unique.shape[0],), -1, dtype=torch.long, device=ids.device)
    return last.scatter_reduce(0, inverse, rows, reduce="amax")
