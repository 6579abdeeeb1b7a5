"""A torch Transformer ("Attention Is All You Need") with the same structure and parameter names as
``npformer.models.transformer``, and the post-norm encoder and decoder layers the BART twin shares.

Used as the whole-model oracle (float64, same weights, same dropout masks) and as the reference of
npformer's divergence finder (``start_recording`` records what npformer records, under the same
names). The math is spelled out in torch: attention with explicit softmax (causal and key-padding
masks, cross attention), LayerNorm from mean and variance, ReLU or exact GELU, the sinusoidal
table by the formula sin/cos(p * 10000**(-2i/D)) in float64, label-smoothed cross entropy.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel
from .encoder import Calls, Table, TwinLayerNorm, drop, gelu, record, record_common, store_grad


class TwinSeq2SeqAttention(nn.Module):
    """q, k, v, o projections; self or cross attention; records ``<path>.probs``."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x, context=None, *, causal=False, key_padding_mask=None):
        B, T, C = x.shape
        src = x if context is None else context
        S, H = src.shape[1], self.n_head
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)
        k = self.k_proj(src).view(B, S, H, C // H).transpose(1, 2)
        v = self.v_proj(src).view(B, S, H, C // H).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)  # (B, H, T, S)
        if causal:
            scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1)
        record(self.recorder if probs.requires_grad else None, f"{self.path}.probs", probs)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, C))


class TwinFeedForward(nn.Module):
    """Base of the two layers: fc1 -> ReLU or exact GELU -> fc2; records ``<path>.act`` and the
    pre-activation's gradient ``<path>.dact``."""

    def ffn(self, h):
        z = self.fc1(h)
        a = F.relu(z) if self.activation == "relu" else gelu(z)
        rec = self.recorder if a.requires_grad else None
        record(rec, f"{self.path}.act", a)
        if rec is not None:
            z.register_hook(store_grad(rec, f"{self.path}.dact"))
        return self.fc2(a)


class TwinEncoderLayer(TwinFeedForward):
    def __init__(self, d_model, n_head, d_ff, eps, activation, p):
        super().__init__()
        self.self_attn = TwinSeq2SeqAttention(d_model, n_head)
        self.self_attn_layer_norm = TwinLayerNorm(d_model, eps)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.final_layer_norm = TwinLayerNorm(d_model, eps)
        self.activation, self.p = activation, p
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""
        self.masks, self.pad = None, None  # set by the model before each call

    def forward(self, x):
        pre = self.path
        a = self.self_attn(x, key_padding_mask=self.pad)
        h = self.self_attn_layer_norm(x + drop(a, self.masks, f"{pre}.drop_1", self.p, self.training))
        out = self.final_layer_norm(h + drop(self.ffn(h), self.masks, f"{pre}.drop_2", self.p, self.training))
        record(self.recorder if out.requires_grad else None, f"{pre}.out", out)
        return out


class TwinDecoderLayer(TwinFeedForward):
    def __init__(self, d_model, n_head, d_ff, eps, activation, p):
        super().__init__()
        self.self_attn = TwinSeq2SeqAttention(d_model, n_head)
        self.self_attn_layer_norm = TwinLayerNorm(d_model, eps)
        self.encoder_attn = TwinSeq2SeqAttention(d_model, n_head)
        self.encoder_attn_layer_norm = TwinLayerNorm(d_model, eps)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.final_layer_norm = TwinLayerNorm(d_model, eps)
        self.activation, self.p = activation, p
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""
        self.masks, self.pad = None, None

    def forward(self, x, memory):
        pre, m, p = self.path, self.masks, self.p
        a = self.self_attn(x, causal=True)
        h1 = self.self_attn_layer_norm(x + drop(a, m, f"{pre}.drop_1", p, self.training))
        c = self.encoder_attn(h1, memory, key_padding_mask=self.pad)
        h2 = self.encoder_attn_layer_norm(h1 + drop(c, m, f"{pre}.drop_2", p, self.training))
        out = self.final_layer_norm(h2 + drop(self.ffn(h2), m, f"{pre}.drop_3", p, self.training))
        record(self.recorder if out.requires_grad else None, f"{pre}.out", out)
        return out


def set_call(layers, masks, pad) -> None:
    """Hand each layer this call's dropout masks and source padding mask."""
    for layer in layers:
        layer.masks, layer.pad = masks, pad


def seq2seq_loss(logits, targets, label_smoothing: float):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


class TwinSeq2Seq(TwinModel):
    """What the Transformer and BART twins share: recording under npformer's names."""

    recording_modules = (TwinSeq2SeqAttention, TwinEncoderLayer, TwinDecoderLayer)

    def name_layers(self) -> None:
        """Each layer's path (``decoder_layers.1``): its dropout masks and recordings are named by it."""
        for path, m in self.named_modules():
            if isinstance(m, self.recording_modules):
                m.path = path

    def start_recording(self) -> Dict[str, np.ndarray]:
        self.stop_recording()
        rec = Calls()
        self.recorder = rec
        record_common(self, rec, (TwinEncoderLayer, TwinDecoderLayer))
        return rec


def sinusoidal(T: int, D: int) -> np.ndarray:
    """PE[p, 2i] = sin(p 10000**(-2i/D)), PE[p, 2i+1] = cos(...), in float64."""
    angle = np.arange(T, dtype=np.float64)[:, None] * 10000.0 ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    pe = np.empty((T, D))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angle), np.cos(angle)
    return pe


class TwinTransformer(TwinSeq2Seq):
    def __init__(self, vocab_size, max_position, n_layer, n_head, d_model, n_decoder_layer=None, d_ff=None,
                 dropout=0.0, label_smoothing=0.1, layer_norm_eps=1e-5, **_):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        n_decoder_layer = n_layer if n_decoder_layer is None else n_decoder_layer
        args = (d_model, n_head, d_ff, layer_norm_eps, "relu", dropout)
        self.embed_tokens = Table(vocab_size, d_model)
        self.encoder_layers = nn.ModuleList(TwinEncoderLayer(*args) for _ in range(n_layer))
        self.decoder_layers = nn.ModuleList(TwinDecoderLayer(*args) for _ in range(n_decoder_layer))
        self.register_buffer("pe", torch.from_numpy(sinusoidal(max_position, d_model)))
        self.scale, self.p, self.label_smoothing = math.sqrt(d_model), dropout, label_smoothing
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []

    def forward(self, src_ids, tgt_ids, targets=None, src_padding_mask=None, masks=None):
        E, rec = self.embed_tokens.weight, self.recorder if torch.is_grad_enabled() else None
        self.name_layers()
        set_call(list(self.encoder_layers) + list(self.decoder_layers), masks, src_padding_mask)
        x = E[src_ids] * self.scale + self.pe[:src_ids.shape[1]].to(E.dtype)
        x = drop(x, masks, "encoder_drop", self.p, self.training)
        for layer in self.encoder_layers:
            x = layer(x)
        record(rec, "memory", x)
        y = E[tgt_ids] * self.scale + self.pe[:tgt_ids.shape[1]].to(E.dtype)
        y = drop(y, masks, "decoder_drop", self.p, self.training)
        for layer in self.decoder_layers:
            y = layer(y, x)
        logits = y @ E.T
        record(rec, "logits", logits, "dlogits")
        loss = None if targets is None else seq2seq_loss(logits, targets, self.label_smoothing)
        return logits, loss
