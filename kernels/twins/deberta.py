"""A torch DeBERTa-v2 masked-LM with the same structure and parameter names as ``npformer.models.deberta``.

The whole-model oracle (float64, same weights, same dropout masks) and the reference of the
divergence finder (``start_recording`` records what npformer records, under the same names).
Its math is spelled out in torch, independently of npformer: the log-bucketed relative
positions computed in float32 torch arithmetic, the three score terms as one product each
followed by ``torch.gather`` (position-to-content gathered per key and transposed), hidden
scores replaced by the dtype's lowest value before the softmax, the relative table
LayerNorm'd once and projected in every layer, LayerNorm from its mean and variance, the
exact GELU from erf, the tied decoder. A lookup of the pad word row adds nothing to its
gradient (``F.embedding(..., padding_idx=...)``). With ``emd_layers`` the enhanced mask decoder:
the query stream starts as the last layer's input plus the rows 0..T-1 of
``emd_position_embeddings``, and the last layer is applied again that many times with queries
(and the attention's residual) from the stream, keys and values from its input; autograd sums
the shared weights' gradients over the calls. The k-th decoder call reuses npformer's masks of
the last layer's (k + 1)-th call (``<name>.mask@<k + 1>``).
The pieces every encoder twin shares (LayerNorm, GELU, the MLP and the MLM head, dropout with
npformer's masks, the recording hooks) are in ``encoder.py``.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel
from .encoder import (Calls, Table, TwinLayerNorm, TwinMLMHead, TwinMLP, active_recorder, drop, mlm_loss, record,
                      record_common, record_table_grads, store_grad)


def log_bucket(r: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """Relative positions (int64) -> log buckets: exact up to mid = N // 2, logarithmic beyond, in float32."""
    mid = bucket_size // 2
    a = r.abs()
    ratio = torch.clamp(a, min=mid).to(torch.float32) / mid
    log_span = torch.log(torch.tensor((max_position - 1) / mid, dtype=torch.float32))
    far = torch.sign(r) * (mid + torch.ceil(torch.log(ratio) / log_span * (mid - 1)).to(torch.int64))
    return torch.where(a <= mid, r, far)


def relative_index(T: int, position_buckets: Optional[int], max_relative_positions: int):
    """Rows of the relative table: c2p[i, j] = clamp(S + bucket(i - j)) read by query i for key j, and
    p2c_by_key[j, i] = clamp(S - bucket(j - i)) read by key j for query i; each (T, T), clamped to [0, 2S)."""
    span = max_relative_positions if position_buckets is None else position_buckets
    idx = torch.arange(T)
    rel = idx[:, None] - idx[None, :]  # [a, b] = a - b
    if position_buckets is not None:
        rel = log_bucket(rel, position_buckets, max_relative_positions)
    return torch.clamp(span + rel, 0, 2 * span - 1), torch.clamp(span - rel, 0, 2 * span - 1)


class TwinDisentangledAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        D = c["d_model"]
        self.n_head, self.terms, self.share = c["n_head"], tuple(c["pos_att_type"]), c["share_att_key"]
        self.query_proj, self.key_proj, self.value_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        if not self.share:
            if "c2p" in self.terms:
                self.pos_key_proj = nn.Linear(D, D)
            if "p2c" in self.terms:
                self.pos_query_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        self.p = c["dropout"]
        self.head_dim = D // self.n_head
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x, rel, visible, index, masks, prefix, query_states=None):
        B, T, C = x.shape
        H, Dh = self.n_head, self.head_dim
        split = lambda t: t.view(t.shape[0], t.shape[1], H, Dh).transpose(1, 2)  # noqa: E731
        q = split(self.query_proj(x if query_states is None else query_states))  # (B, H, T, Dh)
        k, v = split(self.key_proj(x)), split(self.value_proj(x))
        rel = drop(rel, masks, f"{prefix}.rel_dropout", self.p, self.training)
        n = len(self.terms)
        scale = 1.0 / float(torch.sqrt(torch.tensor(Dh * (1 + n), dtype=torch.float32)))  # float32 root
        scores = q @ k.transpose(-2, -1)  # content-to-content, (B, H, T, T)
        rec = active_recorder(self)
        c2p_index, p2c_by_key = (i.expand(B, H, T, T) for i in index)
        if "c2p" in self.terms:
            proj = self.key_proj if self.share else self.pos_key_proj
            k_r = split(F.linear(rel, proj.weight, proj.bias)[None])[0]  # (H, 2S, Dh)
            if rec is not None:
                k_r.register_hook(store_grad(rec, f"{self.path}.dk_r"))
            c2p = q @ k_r.transpose(-2, -1)  # (B, H, T, 2S)
            scores = scores + torch.gather(c2p, -1, c2p_index)  # [i, c2p[i, j]]
        if "p2c" in self.terms:
            proj = self.query_proj if self.share else self.pos_query_proj
            q_r = split(F.linear(rel, proj.weight, proj.bias)[None])[0]
            if rec is not None:
                q_r.register_hook(store_grad(rec, f"{self.path}.dq_r"))
            p2c = k @ q_r.transpose(-2, -1)  # (B, H, T, 2S): key j against relative row r
            # gathered per key j at [j, p2c_by_key[j, i]], then transposed to (i, j)
            scores = scores + torch.gather(p2c, -1, p2c_by_key).transpose(-2, -1)
        scores = scores * scale
        if visible is not None:
            scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        if rec is not None:
            rec[f"{self.path}.probs"] = probs.detach().numpy().copy()
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, C))


def masks_of_call(masks: Optional[Dict[str, np.ndarray]], prefix: str, k: int):
    """npformer's dropout masks of the (k + 1)-th call of the layer at ``prefix`` (k = 0: the first), under the
    plain names ``drop`` reads."""
    if masks is None or k == 0:
        return masks
    out = dict(masks)
    for name in ("drop_1", "drop_2", "attention.rel_dropout"):
        key = f"{prefix}.{name}.mask@{k + 1}"
        if key in masks:
            out[f"{prefix}.{name}.mask"] = masks[key]
    return out


class TwinDebertaLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = TwinDisentangledAttention(c)
        self.attention_norm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.mlp = TwinMLP(c["d_model"], c["d_ff"])
        self.output_norm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.p = c["dropout"]

    def forward(self, x, rel, visible, index, masks, prefix, query_states=None):
        """Queries and the attention's residual from query_states when given (the decoder), else from x."""
        q = x if query_states is None else query_states
        a = self.attention(x, rel, visible, index, masks, f"{prefix}.attention", query_states)
        h = self.attention_norm(q + drop(a, masks, f"{prefix}.drop_1", self.p, self.training))
        return self.output_norm(h + drop(self.mlp(h), masks, f"{prefix}.drop_2", self.p, self.training))


class TwinDebertaEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = Table(c["vocab_size"], c["d_model"])
        if c["position_biased_input"]:
            self.position_embeddings = Table(c["max_position"], c["d_model"])
        if c["type_vocab_size"]:
            self.token_type_embeddings = Table(c["type_vocab_size"], c["d_model"])
        self.LayerNorm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.pad, self.p = c["pad_token_id"], c["dropout"]

    def forward(self, ids, types, tokens, masks):
        B, T = ids.shape
        x = F.embedding(ids, self.word_embeddings.weight, padding_idx=self.pad)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings.weight[:T][None]
        if hasattr(self, "token_type_embeddings"):
            x = x + F.embedding(torch.zeros_like(ids) if types is None else types, self.token_type_embeddings.weight)
        h = self.LayerNorm(x)
        if tokens is not None:
            h = h * tokens[..., None].to(h.dtype)
        return drop(h, masks, "embeddings.dropout", self.p, self.training)


class TwinDeberta(TwinModel):
    recording_modules = (TwinDisentangledAttention, TwinMLP, TwinMLMHead)

    def __init__(self, vocab_size=65, max_position=128, type_vocab_size=0, n_layer=2, n_head=4, d_model=128,
                 d_ff=512, dropout=0.1, layer_norm_eps=1e-7, pad_token_id=0, position_biased_input=False,
                 position_buckets=256, max_relative_positions=512, pos_att_type=("p2c", "c2p"), share_att_key=True,
                 norm_rel_ebd=True, emd_layers=0, **_):
        super().__init__()
        c = dict(vocab_size=vocab_size, max_position=max_position, type_vocab_size=type_vocab_size,
                 d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, layer_norm_eps=layer_norm_eps,
                 pad_token_id=pad_token_id, position_biased_input=position_biased_input,
                 pos_att_type=pos_att_type, share_att_key=share_att_key)
        self.buckets, self.max_rel = position_buckets, max_relative_positions
        span = max_relative_positions if position_buckets is None else position_buckets
        self.embeddings = TwinDebertaEmbeddings(c)
        self.rel_embeddings = Table(2 * span, d_model)
        if norm_rel_ebd:
            self.rel_norm = TwinLayerNorm(d_model, layer_norm_eps)
        self.layers = nn.ModuleList(TwinDebertaLayer(c) for _ in range(n_layer))
        self.emd_layers = emd_layers
        if emd_layers:
            self.emd_position_embeddings = Table(max_position, d_model)
        self.mlm_head = TwinMLMHead(c)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []

    def forward(self, ids, token_type_ids=None, attention_mask=None, mlm_labels=None, masks=None):
        """-> (mlm_logits (B, T, V), loss or None), as ``Deberta.forward``."""
        rec = active_recorder(self)
        T = ids.shape[1]
        tokens = None if attention_mask is None else attention_mask != 0
        visible = None if tokens is None else (tokens[:, None, :, None] & tokens[:, None, None, :])
        index = relative_index(T, self.buckets, self.max_rel)
        x = self.embeddings(ids, token_type_ids, tokens, masks)
        record(rec, "embeddings.out", x)
        rel = self.rel_embeddings.weight
        if hasattr(self, "rel_norm"):
            rel = self.rel_norm(rel)
        if rec is not None:
            rel.register_hook(store_grad(rec, "drel"))
        for i, layer in enumerate(self.layers):
            last_input = x
            x = layer(x, rel, visible, index, masks, f"layers.{i}")
            record(rec, f"layers.{i}.out", x)
        if self.emd_layers:  # the decoder replaces x; the last layer's ordinary output reaches no loss
            n = len(self.layers) - 1
            x = last_input + self.emd_position_embeddings.weight[:T][None]
            for k in range(1, self.emd_layers + 1):
                x = self.layers[n](last_input, rel, visible, index, masks_of_call(masks, f"layers.{n}", k),
                                      f"layers.{n}", query_states=x)
                record(rec, f"layers.{n}.out", x)
        mlm_logits = self.mlm_head(x, self.embeddings.word_embeddings.weight)
        record(rec, "mlm_head.logits", mlm_logits, "dmlm_logits")
        loss = None
        if mlm_labels is not None:
            loss = mlm_loss(mlm_logits, mlm_labels)
        return mlm_logits, loss

    # -- recording, under npformer's names ----------------------------------------------------------
    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer records: ``<path>.out`` of the linear and norm layers (the content calls of
        the attention projections), ``.dW``/``.db`` of the linear layers whose weights are used once, the
        norms' ``.dweight``, ``.dbias``, ``.dx``, attention probabilities, the gradients of the projected
        relative rows (``dq_r``, ``dk_r``), GELU activations, layer outputs and input gradients, the logits
        and their gradient, the relative table's gradient before and after its LayerNorm; with the decoder, each
        call of the last layer under ``@2``, ``@3``, ... (its weights' gradients, summed here, are not recorded)
        and the decoder's position table's gradient."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = Calls()
        self.recorder = rec
        twice = set()  # projections also applied to the relative rows: npformer records each call's dW apart
        for layer in self.layers:
            att = layer.attention
            for term, own, sep in (("c2p", "key_proj", "pos_key_proj"), ("p2c", "query_proj", "pos_query_proj")):
                if term in att.terms:
                    twice.add(getattr(att, own if att.share else sep))
        skip = [p for p, m in self.named_modules() if m in twice]
        if self.emd_layers:  # the decoder's calls of the last layer: npformer records each call's gradients apart
            skip.append(f"layers.{len(self.layers) - 1}")
            self._hooks.append(self.emd_position_embeddings.weight.register_hook(
                store_grad(rec, "emd_position_embeddings.dW")))
        record_common(self, rec, (TwinDebertaLayer,), skip_grads=skip, skip_dx=("rel_norm",))
        self._hooks.append(self.mlm_head.bias.register_hook(store_grad(rec, "mlm_head.dbias")))
        self._hooks.append(self.rel_embeddings.weight.register_hook(store_grad(rec, "rel_embeddings.dW")))
        record_table_grads(self, rec, self.embeddings)
        return rec
