"""A torch GPT-2 with the same structure and parameter names as ``npformer.models.gpt``.

Used as the whole-model oracle (float64, same weights, same dropout masks), as the
reference of npformer's divergence finder (``start_recording`` records the values
npformer records, under the same names), and as the CPU baseline of ``npformer bench``.
Parameter names match npformer's ``state_dict`` one to one (``load_npformer_state``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel, hidden_keys, make_training_step as _make_step, time_training_step as _time_step


class TwinAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor, prefix_len=None) -> torch.Tensor:
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if self.recorder is None and prefix_len is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the explicit form, so the probabilities can be recorded (and a prefix LM's mask given)
            scores = (q @ k.transpose(-2, -1)) / (C // self.n_head) ** 0.5
            probs = scores.masked_fill(hidden_keys(T, prefix_len), float("-inf")).softmax(-1)
            if self.recorder is not None:
                self.recorder[f"{self.path}.probs"] = probs.detach().numpy().copy()
            y = probs @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class TwinMLP(nn.Module):
    def __init__(self, d_model: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        a = F.gelu(h, approximate="tanh")
        if self.recorder is not None and h.requires_grad:
            self.recorder[f"{self.path}.act"] = a.detach().numpy().copy()
            h.register_hook(_store(self.recorder, f"{self.path}.dact"))
        return self.proj(a)


class TwinBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = TwinAttention(d_model, n_head, bias)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = TwinMLP(d_model, bias)
        self.p = dropout

    def forward(self, x, masks, prefix, prefix_len=None):
        x = x + _drop(self.attn(self.ln_1(x), prefix_len), masks, f"{prefix}.drop_1", self.p, self.training)
        return x + _drop(self.mlp(self.ln_2(x)), masks, f"{prefix}.drop_2", self.p, self.training)


def _drop(x, masks: Optional[Dict[str, np.ndarray]], name: str, p: float, training: bool):
    """Dropout with npformer's recorded mask ``<name>.mask`` (to mirror it exactly), else torch's own."""
    if masks is not None and f"{name}.mask" in masks:
        return x * torch.from_numpy(np.asarray(masks[f"{name}.mask"])).to(x.dtype) / (1.0 - p)
    return F.dropout(x, p, training)


def _store(recorder: Dict[str, np.ndarray], name: str):
    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


class TwinGPT(TwinModel):
    recording_modules = (TwinAttention, TwinMLP)  # the submodules that record into self.recorder

    def __init__(self, vocab_size, block_size, n_layer, n_head, d_model, dropout=0.0, bias=True, **_):
        super().__init__()
        self.wte = nn.Module()
        self.wte.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.wpe = nn.Module()
        self.wpe.weight = nn.Parameter(torch.empty(block_size, d_model))
        self.blocks = nn.ModuleList(TwinBlock(d_model, n_head, bias, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.p = dropout
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []
        for prm in self.parameters():  # an init for benchmarking; tests load npformer's weights
            nn.init.normal_(prm, std=0.02) if prm.dim() > 1 else nn.init.zeros_(prm)

    def forward(self, ids, targets=None, masks=None, prefix_len=None):
        rec = self.recorder
        T = ids.shape[1]
        x = self.wte.weight[ids] + self.wpe.weight[:T]
        x = _drop(x, masks, "drop", self.p, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, masks, f"blocks.{i}", prefix_len)
            if rec is not None and x.requires_grad:
                rec[f"blocks.{i}.out"] = x.detach().numpy().copy()
        logits = self.ln_f(x) @ self.wte.weight.T
        if rec is not None and logits.requires_grad:
            rec["logits"] = logits.detach().numpy().copy()
            logits.register_hook(_store(rec, "dlogits"))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # -- recording, under npformer's names ----------------------------------------------------------
    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer's layers record (``<path>.out``, ``.dW``, ``.db``, ``.dweight``, ``.dbias``,
        ``.dx``, attention probabilities, MLP activations, block outputs and input gradients)."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        grad_names = {nn.Linear: ("dW", "db"), nn.LayerNorm: ("dweight", "dbias")}
        for path, m in self.named_modules():
            if isinstance(m, (TwinAttention, TwinMLP)):
                m.recorder, m.path = rec, path
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                self._hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, path=path: rec.__setitem__(f"{path}.out", out.detach().numpy().copy())))
                for prm, gname in zip((m.weight, m.bias), grad_names[type(m)]):
                    if prm is not None:
                        self._hooks.append(prm.register_hook(_store(rec, f"{path}.{gname}")))
            if isinstance(m, nn.LayerNorm):
                self._hooks.append(m.register_full_backward_hook(
                    lambda mod, gin, gout, path=path: rec.__setitem__(f"{path}.dx", gin[0].detach().numpy().copy())))
            if isinstance(m, TwinBlock):
                self._hooks.append(m.register_full_backward_hook(
                    lambda mod, gin, gout, path=path: rec.__setitem__(f"{path}.dx", gin[0].detach().numpy().copy())))
        return rec


def time_training_step(config: Dict[str, object], batch: int, steps: int, *, warmup: int = 1,
                       threads: int = 1) -> Dict[str, object]:
    """Median seconds of one training step of the twin of ``config``, in its dtype (see ``common.py``)."""
    return _time_step(TwinGPT, config, batch, steps, warmup=warmup, threads=threads)


def make_training_step(config: Dict[str, object], batch: int, *, threads: int = 1):
    """One training step of the twin of ``config``, in its dtype, as a function (see ``common.py``)."""
    return _make_step(TwinGPT, config, batch, threads=threads)
