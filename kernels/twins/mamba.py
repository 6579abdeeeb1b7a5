"""A torch Mamba with the same structure and parameter names as ``npformer.models.mamba``.

The whole-model oracle (float64, same weights, torch autograd for every gradient), the
reference of the divergence finder for the values it records under npformer's names, and a
CPU baseline. Its math is spelled out in torch: RMSNorm, the depthwise causal convolution
through ``F.conv1d`` with K - 1 zeros of padding, softplus, and the selective scan as a
sequential loop over the positions, h_t = exp(Delta_t A) h_(t-1) + Delta_t B_t x_t,
y_t = C_t . h_t + D x_t, written independently of npformer's op.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel, time_training_step as _time_step


def _store(recorder: Dict[str, np.ndarray], name: str):
    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


class TwinRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def selective_scan(x, delta, A, Bm, C, D):
    """x, delta (B, L, E), A (E, N), Bm, C (B, L, N), D (E,) -> y (B, L, E), a loop over L."""
    Bsz, L, E = x.shape
    h = x.new_zeros(Bsz, E, A.shape[1])
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + x * D


class TwinMixer(nn.Module):
    def __init__(self, d_model, d_inner, d_state, d_conv, dt_rank, use_bias, use_conv_bias):
        super().__init__()
        self.E, self.N, self.R, self.K = d_inner, d_state, dt_rank, d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=use_bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=use_conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=use_bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(xs.transpose(1, 2))[..., :L].transpose(1, 2))  # (B, L, E)
        dt_in, Bm, C = torch.split(self.x_proj(u), [self.R, self.N, self.N], dim=-1)
        delta = F.softplus(self.dt_proj(dt_in))
        y = selective_scan(u, delta, -torch.exp(self.A_log), Bm, C, self.D)
        if self.recorder is not None and y.requires_grad:
            self.recorder[f"{self.path}.delta"] = delta.detach().numpy().copy()
            self.recorder[f"{self.path}.y"] = y.detach().numpy().copy()
        return self.out_proj(y * F.silu(z))


class TwinBlock(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.norm = TwinRMSNorm(c["d_model"], c["eps"])
        self.mixer = TwinMixer(c["d_model"], c["d_inner"], c["d_state"], c["d_conv"], c["dt_rank"], c["use_bias"],
                               c["use_conv_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class TwinMamba(TwinModel):
    recording_modules = (TwinMixer,)

    def __init__(self, vocab_size=65, block_size=256, n_layer=4, d_model=64, d_state=16, expand=2, d_conv=4,
                 dt_rank=None, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
                 **_):
        super().__init__()
        c = dict(d_model=d_model, d_inner=expand * d_model, d_state=d_state, d_conv=d_conv,
                 dt_rank=dt_rank if dt_rank is not None else math.ceil(d_model / 16), use_bias=use_bias,
                 use_conv_bias=use_conv_bias, eps=layer_norm_epsilon)
        self.block_size, self.tied = block_size, tie_word_embeddings
        self.embeddings = nn.Module()
        self.embeddings.weight = nn.Parameter(torch.randn(vocab_size, d_model) * 0.02)
        self.layers = nn.ModuleList(TwinBlock(c) for _ in range(n_layer))
        self.norm_f = TwinRMSNorm(d_model, layer_norm_epsilon)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []

    def forward(self, ids, targets=None):
        rec = self.recorder
        x = self.embeddings.weight[ids]  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if rec is not None and x.requires_grad:
                rec[f"layers.{i}.out"] = x.detach().numpy().copy()
        h = self.norm_f(x)
        logits = h @ self.embeddings.weight.T if self.tied else self.lm_head(h)
        if rec is not None and logits.requires_grad:
            rec["logits"] = logits.detach().numpy().copy()
            logits.register_hook(_store(rec, "dlogits"))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                            ignore_index=-100)
        return logits, loss

    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer's layers record under the same names: ``<path>.out`` of every linear and
        norm, ``.dW``/``.db`` of the linears, ``.dweight`` of the norms, each block's ``out``, each mixer's
        ``delta`` and ``y``, the logits and their gradient."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        save = lambda name: (lambda mod, inp, out: rec.__setitem__(name, out.detach().numpy().copy()))  # noqa: E731
        for path, m in self.named_modules():
            if isinstance(m, TwinMixer):
                m.recorder, m.path = rec, path
            if isinstance(m, (nn.Linear, TwinRMSNorm)):
                self._hooks.append(m.register_forward_hook(save(f"{path}.out")))
            if isinstance(m, nn.Linear):
                for prm, gname in ((m.weight, "dW"), (m.bias, "db")):
                    if prm is not None:
                        self._hooks.append(prm.register_hook(_store(rec, f"{path}.{gname}")))
            if isinstance(m, TwinRMSNorm):
                self._hooks.append(m.weight.register_hook(_store(rec, f"{path}.dweight")))
        return rec


def time_training_step(config: Dict[str, object], batch: int, steps: int, *, warmup: int = 1,
                       threads: int = 1) -> Dict[str, object]:
    """Median seconds of one float32 training step of the twin of ``config`` (see ``common.py``)."""
    return _time_step(TwinMamba, config, batch, steps, warmup=warmup, threads=threads)
