"""A torch twin of ``npformer.models.variant``: every option of ``VariantConfig`` spelled out in torch.

Used as the whole-model oracle (float64, same weights, same dropout masks) over every combination
of norm, norm position, activation, positions, key/value heads, bias, head tying, parallel blocks
and Mixture of Depths. Its math is written here rather than taken from a library: LayerNorm and
GroupNorm (the statistics of each group of a token's channels, each with or without a bias) and
RMSNorm, the sinusoidal table and the rotate-half RoPE angles computed in float64 from their
formulas, ALiBi's slopes from the paper's rule, grouped-query attention by repeating each
key/value head over its group of query heads, GELU (tanh, erf and x sigmoid(1.702 x)), ReLU, Mish
and SwiGLU MLPs; a parallel block's two branches read one norm; a routed block (every other block
under ``mod_capacity``) gathers each row's top-k tokens by router scalar, runs its branches on
them with the mask's routed rows and columns, and scatters x + r f(x) back, all in autograd. Parameter names match
npformer's ``state_dict`` one to one (``load_npformer_state``); ``start_recording`` records block
outputs, attention probabilities, MLP activations, logits and their gradient under npformer's names.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel, hidden_keys


def _store(recorder: Dict[str, np.ndarray], name: str):
    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


def resolved_d_ff(d_model: int, d_ff: Optional[int], activation: str) -> int:
    """4 D for GELU and ReLU; for SwiGLU the nearest integer to 8 D / 3 (the same weights as 4 D GELU)."""
    if d_ff is not None:
        return d_ff
    return round(8 * d_model / 3) if activation == "swiglu" else 4 * d_model


def sinusoidal(T: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, D): sin(p w_i) in column 2i, cos(p w_i) in column 2i + 1, w_i = 10000^(-2i / D), in float64."""
    p = np.arange(T, dtype=np.float64)[:, None]
    w = 10000.0 ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    table = np.stack([np.sin(p * w), np.cos(p * w)], axis=-1).reshape(T, D)  # interleave sin, cos
    return torch.from_numpy(table).to(dtype)


def alibi_slopes(n_head: int) -> np.ndarray:
    """2^(-8h/n) for h = 1..n with n the largest power of two <= n_head; the rest from 2n's every other."""
    n = 2 ** int(math.floor(math.log2(n_head)))
    base = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    extra = [2.0 ** (-8.0 * h / (2 * n)) for h in range(1, 2 * n + 1)][0::2][: n_head - n]
    return np.array(base + extra)


def rope(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) with each pair (x[..., i], x[..., i + Dh/2]) rotated by t * 10000^(-2i / Dh)."""
    T, Dh = x.shape[2], x.shape[3]
    angles = np.arange(T, dtype=np.float64)[:, None] * 10000.0 ** (-np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    cos, sin = (torch.from_numpy(f(angles)).to(x.dtype) for f in (np.cos, np.sin))
    x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TwinNorm(nn.Module):
    def __init__(self, dim: int, kind: str, bias: bool, num_groups: int = 1):
        super().__init__()
        self.kind, self.num_groups = kind, num_groups
        self.weight = nn.Parameter(torch.ones(dim))
        if kind in ("layernorm", "groupnorm") and bias:
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.bias = None
        self.eps = 1e-6 if kind == "rmsnorm" else 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        if self.kind == "groupnorm":  # each token's C channels in G groups of C / G, normalised group by group
            G = self.num_groups
            xg = x.reshape(*x.shape[:-1], G, x.shape[-1] // G)
            mu = xg.mean(-1, keepdim=True)
            var = (xg - mu).pow(2).mean(-1, keepdim=True)
            y = ((xg - mu) * torch.rsqrt(var + self.eps)).reshape(x.shape) * self.weight
            return y if self.bias is None else y + self.bias
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TwinAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int, bias: bool, position: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.position = position
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor, prefix_len=None, hidden=None) -> torch.Tensor:
        """``hidden`` (B, 1, T, T) bool, True where a query may not see a key, replaces the causal/prefix mask."""
        B, T, C = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
        if self.position == "rope":
            q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // Hkv, dim=1)  # query head h reads key/value head h // (H / Hkv)
        v = v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-2, -1)) / Dh**0.5  # (B, H, T, T)
        if self.position == "alibi":
            distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().to(x.dtype)  # (T, T)
            slopes = torch.from_numpy(alibi_slopes(H)).to(x.dtype)[:, None, None]  # (H, 1, 1)
            scores = scores - slopes * distance
        hidden = hidden_keys(T, prefix_len) if hidden is None else hidden
        probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
        if self.recorder is not None:
            self.recorder[f"{self.path}.probs"] = probs.detach().numpy().copy()
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, C))


class TwinMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
            self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
            self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        else:
            self.fc = nn.Linear(d_model, d_ff, bias=bias)
            self.proj = nn.Linear(d_ff, d_model, bias=bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            a = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.activation == "relu":
            a = F.relu(self.fc(x))
        elif self.activation == "mish":
            a = F.mish(self.fc(x))
        elif self.activation == "gelu_erf":
            a = F.gelu(self.fc(x), approximate="none")
        elif self.activation == "gelu_sigmoid":
            h = self.fc(x)
            a = h * torch.sigmoid(1.702 * h)
        else:
            a = F.gelu(self.fc(x), approximate="tanh")
        if self.recorder is not None:
            self.recorder[f"{self.path}.act"] = a.detach().numpy().copy()
        return self.down_proj(a) if self.activation == "swiglu" else self.proj(a)


def _drop(x, masks: Optional[Dict[str, np.ndarray]], name: str, p: float, training: bool):
    """Dropout with npformer's recorded mask ``<name>.mask`` (to mirror it exactly), else torch's own."""
    if masks is not None and f"{name}.mask" in masks:
        return x * torch.from_numpy(np.asarray(masks[f"{name}.mask"])).to(x.dtype) / (1.0 - p)
    return F.dropout(x, p, training)


class TwinBlock(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head, d_ff, norm, norm_position, activation, position, bias, dropout,
                 num_groups=1, parallel=False, mod_capacity=None):
        super().__init__()
        self.pre, self.parallel, self.mod_capacity = norm_position == "pre", parallel, mod_capacity
        self.ln_1 = TwinNorm(d_model, norm, bias, num_groups)
        self.attn = TwinAttention(d_model, n_head, n_kv_head, bias, position)
        if not parallel:
            self.ln_2 = TwinNorm(d_model, norm, bias, num_groups)
        self.mlp = TwinMLP(d_model, d_ff, activation, bias)
        if mod_capacity is not None:
            self.router = nn.Linear(d_model, 1, bias=False)
        self.p = dropout

    def branches(self, x, drop, prefix_len=None, hidden=None):
        """f(x) of a pre-norm block: the block's output is x + f(x)."""
        h = self.ln_1(x)
        a = drop(self.attn(h, prefix_len, hidden), "drop_1")
        if self.parallel:
            return a + drop(self.mlp(h), "drop_2")
        return a + drop(self.mlp(self.ln_2(x + a)), "drop_2")

    def forward(self, x, masks, prefix, prefix_len=None):
        drop = lambda y, n: _drop(y, masks, f"{prefix}.{n}", self.p, self.training)  # noqa: E731
        if self.mod_capacity is not None:
            return self.routed(x, drop, prefix_len)
        if self.pre:
            return x + self.branches(x, drop, prefix_len)
        x = self.ln_1(x + drop(self.attn(x, prefix_len), "drop_1"))
        return self.ln_2(x + drop(self.mlp(x), "drop_2"))

    def routed(self, x, drop, prefix_len):
        """Each row's k = ceil(c T) tokens of largest r = x w through the block as x + r f(x); the rest unchanged."""
        B, T, D = x.shape
        r = self.router(x)[..., 0]  # (B, T)
        k = min(T, max(1, math.ceil(self.mod_capacity * T)))
        order = torch.argsort(-r.detach(), dim=1, stable=True)[:, :k]  # ties to the earlier position
        idx = order.sort(dim=1).values  # (B, k) ascending
        rows = torch.arange(B)[:, None]
        hidden = hidden_keys(T, prefix_len)
        hidden = (hidden if hidden.dim() == 4 else hidden.expand(B, 1, T, T))
        hidden = hidden[rows[..., None], 0, idx[:, :, None], idx[:, None, :]][:, None]  # (B, 1, k, k)
        gather = idx[..., None].expand(B, k, D)
        x_k, r_k = x.gather(1, gather), r.gather(1, idx)[..., None]
        f = self.branches(x_k, drop, hidden=hidden)
        return x.scatter(1, gather, x_k + r_k * f)


class TwinVariant(TwinModel):
    recording_modules = (TwinAttention, TwinMLP)  # the submodules that record into self.recorder

    def __init__(self, vocab_size, block_size, n_layer, n_head, d_model, n_kv_head=None, d_ff=None,
                 norm="layernorm", norm_position="pre", activation="gelu", position="learned", dropout=0.0,
                 bias=True, tie_head=True, num_groups=1, parallel_block=False, mod_capacity=None, **_):
        super().__init__()
        self.position, self.tie_head, self.pre = position, tie_head, norm_position == "pre"
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        d_ff = resolved_d_ff(d_model, d_ff, activation)
        self.wte = nn.Module()
        self.wte.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        if position == "learned":
            self.wpe = nn.Module()
            self.wpe.weight = nn.Parameter(torch.empty(block_size, d_model))
        self.blocks = nn.ModuleList(TwinBlock(d_model, n_head, n_kv_head, d_ff, norm, norm_position, activation,
                                              position, bias, dropout, num_groups, parallel_block,
                                              mod_capacity if i % 2 == 1 else None)  # every other block routed
                                    for i in range(n_layer))
        if self.pre:
            self.ln_f = TwinNorm(d_model, norm, bias, num_groups)
        if not tie_head:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.p = dropout
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []
        for name, prm in self.named_parameters():  # an init for benchmarking; tests load npformer's weights
            if prm.dim() > 1:
                nn.init.normal_(prm, std=0.02)

    def forward(self, ids, targets=None, masks=None, prefix_len=None):
        rec = self.recorder
        T = ids.shape[1]
        x = self.wte.weight[ids]
        if self.position == "learned":
            x = x + self.wpe.weight[:T]
        elif self.position == "sinusoidal":  # unit-scale embeddings beside the table, as the original Transformer
            x = x * x.shape[-1] ** 0.5 + sinusoidal(T, x.shape[-1], x.dtype)
        x = _drop(x, masks, "drop", self.p, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, masks, f"blocks.{i}", prefix_len)
            if rec is not None:
                rec[f"blocks.{i}.out"] = x.detach().numpy().copy()
        h = self.ln_f(x) if self.pre else x
        logits = h @ self.wte.weight.T if self.tie_head else self.lm_head(h)
        if rec is not None and logits.requires_grad:
            rec["logits"] = logits.detach().numpy().copy()
            logits.register_hook(_store(rec, "dlogits"))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record block outputs, attention probabilities, MLP activations, logits and dlogits under npformer's names."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        for path, m in self.named_modules():
            if isinstance(m, self.recording_modules):
                m.recorder, m.path = rec, path
        return rec
