"""A torch T5 (v1.0 and v1.1) with the same structure and parameter names as ``npformer.models.t5``.

The whole-model oracle (float64, same weights) and the reference of npformer's divergence finder
(``start_recording`` records what npformer records, under the same names). Its math is spelled out
in torch: the RMS norm without a bias, attention without 1/sqrt(d) scaling, the bucketed relative
position of each (query, key) pair (computed here with a float32 logarithm, as the T5 reference
does), the relative bias looked up once per stack and added in every layer's self attention, the
ReLU or gated tanh-GELU feed forward, and the tied head's d_model^-1/2 scaling. Dropout reuses
npformer's recorded masks (``masks=``), so a training step with dropout can be mirrored exactly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel
from .llama import TwinRMSNorm


def _store(recorder: Dict[str, np.ndarray], name: str):
    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each relative position r = key - query: exact for small |r|, log-spaced up to max_distance."""
    n = num_buckets // 2 if bidirectional else num_buckets
    if bidirectional:
        base = (relative > 0).long() * n  # keys after the query: the upper half
        a = relative.abs()
    else:
        base = torch.zeros_like(relative)
        a = (-relative).clamp(min=0)  # one-way: only the past has distances
    exact = n // 2
    logs = torch.log(a.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (n - exact)
    large = (exact + logs.long()).clamp(max=n - 1)
    return base + torch.where(a < exact, a, large)


class Drop:
    """Dropout by npformer's recorded masks: each name's calls in order (``name``, ``name@2``, ...)."""

    def __init__(self, masks: Optional[Dict[str, np.ndarray]]):
        self.masks, self.calls = masks, {}

    def __call__(self, x: torch.Tensor, name: str, p: float) -> torch.Tensor:
        if self.masks is None or p == 0:
            return x
        n = self.calls[name] = self.calls.get(name, 0) + 1
        key = f"{name}.mask" if n == 1 else f"{name}.mask@{n}"
        if key not in self.masks:
            return x
        return x * torch.from_numpy(np.asarray(self.masks[key])).to(x.dtype) / (1.0 - p)


class TwinAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_kv: int):
        super().__init__()
        self.n_head, self.d_kv = n_head, d_kv
        self.q_proj = nn.Linear(d_model, n_head * d_kv, bias=False)
        self.k_proj = nn.Linear(d_model, n_head * d_kv, bias=False)
        self.v_proj = nn.Linear(d_model, n_head * d_kv, bias=False)
        self.o_proj = nn.Linear(n_head * d_kv, d_model, bias=False)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x, context=None, bias=None, pad=None, causal=False):
        B, T, _ = x.shape
        src = x if context is None else context
        S = src.shape[1]
        q = self.q_proj(x).view(B, T, self.n_head, self.d_kv).transpose(1, 2)
        k = self.k_proj(src).view(B, S, self.n_head, self.d_kv).transpose(1, 2)
        v = self.v_proj(src).view(B, S, self.n_head, self.d_kv).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)  # no 1/sqrt(d_kv): T5 folds it into the weights
        if bias is not None:
            scores = scores + bias
        hidden = torch.zeros(B, 1, T, S, dtype=torch.bool)
        if pad is not None:
            hidden = hidden | pad[:, None, None, :]
        if causal:
            hidden = hidden | (torch.arange(S)[None, :] > torch.arange(T)[:, None])
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        if self.recorder is not None and probs.requires_grad:
            self.recorder[f"{self.path}.probs"] = probs.detach().numpy().copy()
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, self.n_head * self.d_kv))


class TwinTable(nn.Module):
    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols))


class TwinDense(nn.Module):
    """v1.0: wi -> relu -> dropout -> wo; v1.1: gelu_tanh(wi_0 x) * wi_1 x -> dropout -> wo."""

    def __init__(self, d_model: int, d_ff: int, gated: bool):
        super().__init__()
        self.gated = gated
        if gated:
            self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
            self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        else:
            self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x, drop: Drop, p: float):
        if self.gated:
            a = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            a = torch.relu(self.wi(x))
        if self.recorder is not None and a.requires_grad:
            self.recorder[f"{self.path}.act"] = a.detach().numpy().copy()
        return self.wo(drop(a, f"{self.path}.dropout", p))


class TwinSublayer(nn.Module):
    """layer_norm + one of SelfAttention / EncDecAttention / DenseReluDense, under Hugging Face's names."""

    def __init__(self, c: dict, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_norm = TwinRMSNorm(c["d_model"], c["layer_norm_epsilon"])
        if kind == "self":
            self.SelfAttention = TwinAttention(c["d_model"], c["n_head"], c["d_kv"])
        elif kind == "cross":
            self.EncDecAttention = TwinAttention(c["d_model"], c["n_head"], c["d_kv"])
        else:
            self.DenseReluDense = TwinDense(c["d_model"], c["d_ff"], c["feed_forward_proj"] == "gated-gelu")
        self.path = ""


class TwinBlock(nn.Module):
    def __init__(self, c: dict, is_decoder: bool):
        super().__init__()
        kinds = ["self", "cross", "ff"] if is_decoder else ["self", "ff"]
        self.layer = nn.ModuleList(TwinSublayer(c, k) for k in kinds)


class TwinStack(nn.Module):
    def __init__(self, c: dict, n_blocks: int, is_decoder: bool):
        super().__init__()
        self.is_decoder, self.c = is_decoder, c
        self.block = nn.ModuleList(TwinBlock(c, is_decoder) for _ in range(n_blocks))
        self.block[0].layer[0].SelfAttention.relative_attention_bias = TwinTable(c["relative_attention_num_buckets"],
                                                                                 c["n_head"])
        self.final_layer_norm = TwinRMSNorm(c["d_model"], c["layer_norm_epsilon"])
        self.path = ""
        self.recorder: Optional[Dict[str, np.ndarray]] = None

    def forward(self, x, drop: Drop, pad=None, memory=None, memory_pad=None):
        c, p, T = self.c, self.c["dropout"], x.shape[1]
        pos = torch.arange(T)
        buckets = relative_bucket(pos[None, :] - pos[:, None], not self.is_decoder,
                                  c["relative_attention_num_buckets"], c["relative_attention_max_distance"])
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        bias = table[buckets].permute(2, 0, 1)[None]  # (1, H, T, T)
        h = drop(x, f"{self.path}.dropout", p)
        for i, blk in enumerate(self.block):
            sa = blk.layer[0]
            h = h + drop(sa.SelfAttention(sa.layer_norm(h), bias=bias, pad=pad, causal=self.is_decoder),
                         f"{sa.path}.dropout", p)
            if self.is_decoder:
                ca = blk.layer[1]
                h = h + drop(ca.EncDecAttention(ca.layer_norm(h), context=memory, pad=memory_pad),
                             f"{ca.path}.dropout", p)
            ff = blk.layer[-1]
            h = h + drop(ff.DenseReluDense(ff.layer_norm(h), drop, p), f"{ff.path}.dropout", p)
            if self.recorder is not None and h.requires_grad:
                self.recorder[f"{self.path}.block.{i}.out"] = h.detach().numpy().copy()
        return drop(self.final_layer_norm(h), f"{self.path}.dropout", p)


class TwinT5(TwinModel):
    recording_modules = (TwinAttention, TwinDense, TwinStack)

    def __init__(self, vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=None,
                 n_head=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="relu", tie_word_embeddings=True, scale_decoder_outputs=None,
                 layer_norm_epsilon=1e-6, dropout=0.0, **_):
        super().__init__()
        c = dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, n_head=n_head, feed_forward_proj=feed_forward_proj,
                 relative_attention_num_buckets=relative_attention_num_buckets,
                 relative_attention_max_distance=relative_attention_max_distance,
                 layer_norm_epsilon=layer_norm_epsilon, dropout=dropout)
        self.tied = tie_word_embeddings
        self.scale = (d_model ** -0.5) if (tie_word_embeddings if scale_decoder_outputs is None
                                           else scale_decoder_outputs) else 1.0
        self.shared = TwinTable(vocab_size, d_model)
        self.encoder = TwinStack(c, num_layers, False)
        self.decoder = TwinStack(c, num_layers if num_decoder_layers is None else num_decoder_layers, True)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        for name, m in self.named_modules():
            m.path = name
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []
        for name, prm in self.named_parameters():  # an init of its own; tests load npformer's weights
            nn.init.ones_(prm) if name.endswith("norm.weight") else nn.init.normal_(prm, std=0.05)

    def forward(self, src_ids, tgt_ids, targets=None, src_padding_mask=None, masks=None):
        drop = Drop(masks if self.training else None)
        E = self.shared.weight
        memory = self.encoder(E[src_ids], drop, pad=src_padding_mask)
        h = self.decoder(E[tgt_ids], drop, memory=memory, memory_pad=src_padding_mask) * self.scale
        logits = h @ E.T if self.tied else self.lm_head(h)
        rec = self.recorder
        if rec is not None and logits.requires_grad:
            rec["logits"] = logits.detach().numpy().copy()
            logits.register_hook(_store(rec, "dlogits"))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                            ignore_index=-100)
        return logits, loss

    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer's layers record: ``<path>.out`` and ``.dW`` of every linear layer, ``.out`` and
        ``.dweight`` of the norms, attention probabilities, feed-forward activations, each block's output,
        logits and their gradient."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        save = lambda name: (lambda mod, inp, out: rec.__setitem__(name, out.detach().numpy().copy()))  # noqa: E731
        for path, m in self.named_modules():
            if isinstance(m, self.recording_modules):
                m.recorder = rec
            if isinstance(m, (nn.Linear, TwinRMSNorm)):
                self._hooks.append(m.register_forward_hook(save(f"{path}.out")))
            if isinstance(m, nn.Linear):
                self._hooks.append(m.weight.register_hook(_store(rec, f"{path}.dW")))
            if isinstance(m, TwinRMSNorm):
                self._hooks.append(m.weight.register_hook(_store(rec, f"{path}.dweight")))
        return rec
