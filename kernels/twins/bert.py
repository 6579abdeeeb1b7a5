"""A torch BERT/RoBERTa with the same structure and parameter names as ``npformer.models.bert``.

Used as the whole-model oracle (float64, same weights, same dropout masks) and as the
reference of npformer's divergence finder (``start_recording`` records the values npformer
records, under the same names). Its math is spelled out in torch: the embeddings' sum with
RoBERTa's padding-aware positions, LayerNorm from its mean and variance, attention with
padded keys at -inf, the exact GELU from erf, the tied decoder, tanh pooling. A lookup of a
frozen row (``pad_token_id``, ``position_padding_idx``) adds nothing to its gradient, as
``F.embedding(..., padding_idx=...)`` does. Parameter names match npformer's ``state_dict``.
The pieces every encoder twin shares (LayerNorm, GELU, the MLP and the MLM head, dropout with
npformer's masks, the recording hooks) are in ``encoder.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel
from .encoder import (Table, TwinLayerNorm, TwinMLMHead, TwinMLP, active_recorder, drop, pretraining_loss,
                      record, record_common, record_table_grads, store_grad)


class TwinAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, C = x.shape
        H, Dh = self.n_head, C // self.n_head
        split = lambda t: t.view(B, T, H, Dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) / Dh**0.5  # (B, H, T, T)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))  # padded keys
        probs = scores.softmax(-1)
        if self.recorder is not None and probs.requires_grad:
            self.recorder[f"{self.path}.probs"] = probs.detach().numpy().copy()
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, C))


class TwinEncoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = TwinAttention(c["d_model"], c["n_head"])
        self.attention_norm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.mlp = TwinMLP(c["d_model"], c["d_ff"])
        self.output_norm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.p = c["dropout"]

    def forward(self, x, pad, masks, prefix):
        h = self.attention_norm(x + drop(self.attention(x, pad), masks, f"{prefix}.drop_1", self.p, self.training))
        return self.output_norm(h + drop(self.mlp(h), masks, f"{prefix}.drop_2", self.p, self.training))


class TwinEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = Table(c["vocab_size"], c["d_model"])
        self.position_embeddings = Table(c["max_position"], c["d_model"])
        if c["type_vocab_size"]:
            self.token_type_embeddings = Table(c["type_vocab_size"], c["d_model"])
        self.LayerNorm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.pad, self.position_pad, self.p = c["pad_token_id"], c["position_padding_idx"], c["dropout"]

    def forward(self, ids, types, masks, rec):
        B, T = ids.shape
        if self.position_pad is None:
            positions = torch.arange(T).expand(B, T)
        else:  # RoBERTa: p + (k-th token), p at padding
            token = (ids != self.position_pad).long()
            positions = self.position_pad + torch.cumsum(token, dim=1) * token
        word = F.embedding(ids, self.word_embeddings.weight, padding_idx=self.pad)
        pos = F.embedding(positions, self.position_embeddings.weight, padding_idx=self.position_pad)
        parts = [("word_embeddings", word), ("position_embeddings", pos)]
        x = word + pos
        if hasattr(self, "token_type_embeddings"):
            tt = F.embedding(torch.zeros_like(ids) if types is None else types, self.token_type_embeddings.weight)
            parts.append(("token_type_embeddings", tt))
            x = x + tt
        record(rec, "embeddings.position_ids", positions)
        for name, value in parts:
            record(rec, f"embeddings.{name}.out", value)
        return drop(self.LayerNorm(x), masks, "embeddings.dropout", self.p, self.training)


class TwinPooler(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class TwinBert(TwinModel):
    recording_modules = (TwinAttention, TwinMLP, TwinMLMHead)

    def __init__(self, vocab_size=65, max_position=128, type_vocab_size=2, n_layer=2, n_head=4, d_model=128,
                 d_ff=512, dropout=0.1, layer_norm_eps=1e-12, pad_token_id=0, position_padding_idx=None,
                 nsp_head=True, **_):
        super().__init__()
        c = dict(vocab_size=vocab_size, max_position=max_position, type_vocab_size=type_vocab_size,
                 d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, layer_norm_eps=layer_norm_eps,
                 pad_token_id=pad_token_id, position_padding_idx=position_padding_idx)
        self.embeddings = TwinEmbeddings(c)
        self.layers = nn.ModuleList(TwinEncoderLayer(c) for _ in range(n_layer))
        self.mlm_head = TwinMLMHead(c)
        self.nsp = nsp_head
        if nsp_head:
            self.pooler = TwinPooler(d_model)
            self.seq_relationship = nn.Linear(d_model, 2)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []

    def forward(self, ids, token_type_ids=None, attention_mask=None, mlm_labels=None, nsp_labels=None, masks=None):
        """-> (mlm_logits (B, T, V), nsp_logits (B, 2) or None, loss or None), as ``Bert.forward``."""
        rec = active_recorder(self)
        pad = None if attention_mask is None else attention_mask == 0
        x = self.embeddings(ids, token_type_ids, masks, rec)
        record(rec, "embeddings.out", x)
        for i, layer in enumerate(self.layers):
            x = layer(x, pad, masks, f"layers.{i}")
            record(rec, f"layers.{i}.out", x)
        mlm_logits = self.mlm_head(x, self.embeddings.word_embeddings.weight)
        record(rec, "mlm_head.logits", mlm_logits, "dmlm_logits")
        nsp_logits = None
        if self.nsp:
            pooled = self.pooler(x)
            nsp_logits = self.seq_relationship(pooled)
            record(rec, "pooler.out", pooled)
            record(rec, "nsp_logits", nsp_logits, "dnsp_logits")
        return mlm_logits, nsp_logits, pretraining_loss(mlm_logits, mlm_labels, nsp_logits, nsp_labels)

    # -- recording, under npformer's names ----------------------------------------------------------
    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer's layers record: ``<path>.out`` of the linear and norm layers, their ``.dW``,
        ``.db``, ``.dweight``, ``.dbias``, ``.dx``, attention probabilities, GELU activations, layer outputs
        and input gradients, both heads' logits and their gradients, the untied tables' gradients."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        record_common(self, rec, (TwinEncoderLayer,))
        self._hooks.append(self.mlm_head.bias.register_hook(store_grad(rec, "mlm_head.dbias")))
        record_table_grads(self, rec, self.embeddings)
        return rec
