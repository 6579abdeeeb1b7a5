"""The pieces the encoder twins (BERT/RoBERTa, ALBERT, ELECTRA, DeBERTa) share, spelled out in torch.

LayerNorm from its mean and variance, the exact GELU from erf, a bare parameter table, dropout that
reuses npformer's recorded mask, the GELU MLP and the tied MLM head (both recording their GELU
activation), a recording that keeps a name set again as ``<name>@2``, ... (npformer's Recorder),
and the hooks every encoder twin places to record what npformer records, under its names.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel


def store_grad(recorder: Dict[str, np.ndarray], name: str):
    """A tensor hook that records the gradient it is called with as ``recorder[name]``."""

    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


def active_recorder(module: nn.Module) -> Optional[Dict[str, np.ndarray]]:
    """The module's ``recorder`` while one is set and gradients are enabled (a no-grad pass records nothing)."""
    return module.recorder if module.recorder is not None and torch.is_grad_enabled() else None


def record(rec: Optional[Dict[str, np.ndarray]], name: str, t: torch.Tensor, grad_name: Optional[str] = None):
    """With a recording: ``rec[name]`` = t's value now, and with ``grad_name`` t's gradient when backward
    reaches it. Without one (``rec`` None): nothing."""
    if rec is not None:
        rec[name] = t.detach().numpy().copy()
        if grad_name is not None:
            t.register_hook(store_grad(rec, grad_name))


def drop(x, masks: Optional[Dict[str, np.ndarray]], name: str, p: float, training: bool):
    """Dropout with npformer's recorded mask ``<name>.mask`` (to mirror it exactly), else torch's own."""
    if masks is not None and f"{name}.mask" in masks:
        return x * torch.from_numpy(np.asarray(masks[f"{name}.mask"])).to(x.dtype) / (1.0 - p)
    return F.dropout(x, p, training)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, x Phi(x), from erf."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of (B, T, V) logits over the (B, T) labels that are not -100."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def pretraining_loss(mlm_logits, mlm_labels, pair_logits, pair_labels):
    """The MLM loss where there are MLM labels, plus the (B, 2) sentence-pair classifier's cross entropy
    where there are pair labels (BERT's NSP, ALBERT's SOP); None with neither."""
    loss = None
    if mlm_labels is not None:
        loss = mlm_loss(mlm_logits, mlm_labels)
    if pair_labels is not None:
        pair_loss = F.cross_entropy(pair_logits, pair_labels)
        loss = pair_loss if loss is None else loss + pair_loss
    return loss


class TwinLayerNorm(nn.Module):
    """LayerNorm over the last axis from its mean and biased variance."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased variance
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Table(nn.Module):
    """A (rows, dim) parameter named ``weight``, read by ``F.embedding`` or directly."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, dim))


class TwinMLP(nn.Module):
    """fc -> exact GELU -> proj; records the activation as ``<path>.act``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = gelu(self.fc(x))
        if self.recorder is not None and a.requires_grad:
            self.recorder[f"{self.path}.act"] = a.detach().numpy().copy()
        return self.proj(a)


class TwinMLMHead(nn.Module):
    """dense -> exact GELU -> LayerNorm -> the tied word table's transpose + bias; records ``<path>.act``."""

    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["d_model"], c["d_model"])
        self.layer_norm = TwinLayerNorm(c["d_model"], c["layer_norm_eps"])
        self.bias = nn.Parameter(torch.zeros(c["vocab_size"]))
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, h, word_weight):
        g = gelu(self.dense(h))
        if self.recorder is not None and g.requires_grad:
            self.recorder[f"{self.path}.act"] = g.detach().numpy().copy()
        return self.layer_norm(g) @ word_weight.T + self.bias


def narrow_mlm_head(c: dict, embed_dim: int) -> TwinMLMHead:
    """The MLM head with dense D -> E and its LayerNorm E wide (ALBERT's, ELECTRA's generator's)."""
    head = TwinMLMHead(c)
    head.dense = nn.Linear(c["d_model"], embed_dim)
    head.layer_norm = TwinLayerNorm(embed_dim, c["layer_norm_eps"])
    return head


class Calls(OrderedDict):
    """A recording in which a name set again is kept as ``<name>@2``, ``<name>@3``, ... (npformer's Recorder)."""

    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __setitem__(self, name, value):
        n = self.calls[name] = self.calls.get(name, 0) + 1
        super().__setitem__(name if n == 1 else f"{name}@{n}", value)


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == s or path.startswith(s + ".") for s in prefixes)


def record_common(model: TwinModel, rec: Dict[str, np.ndarray], layer_types: tuple, *, skip_grads=(),
                  skip_dx=()) -> None:
    """The hooks every encoder twin places, module by module in ``named_modules`` order: the recording
    modules' ``recorder``/``path``; ``<path>.out`` of every Linear and TwinLayerNorm and their parameter
    gradients (``.dW``/``.db``, ``.dweight``/``.dbias``), except under a path in ``skip_grads``; the input
    gradient ``<path>.dx`` of every TwinLayerNorm and every module of ``layer_types``, except at a path in
    ``skip_dx``."""
    save = lambda name: (lambda mod, inp, out: rec.__setitem__(name, out.detach().numpy().copy()))  # noqa: E731
    save_dx = lambda name: (  # noqa: E731
        lambda mod, gin, gout: rec.__setitem__(name, gin[0].detach().numpy().copy()))
    for path, m in model.named_modules():
        if isinstance(m, model.recording_modules):
            m.recorder, m.path = rec, path
        if isinstance(m, (nn.Linear, TwinLayerNorm)):
            model._hooks.append(m.register_forward_hook(save(f"{path}.out")))
            if not _under(path, skip_grads):
                names = ("dW", "db") if isinstance(m, nn.Linear) else ("dweight", "dbias")
                for prm, gname in zip((m.weight, m.bias), names):
                    model._hooks.append(prm.register_hook(store_grad(rec, f"{path}.{gname}")))
        if isinstance(m, (TwinLayerNorm,) + tuple(layer_types)) and path not in skip_dx:
            model._hooks.append(m.register_full_backward_hook(save_dx(f"{path}.dx")))


def record_table_grads(model: TwinModel, rec: Dict[str, np.ndarray], embeddings: nn.Module) -> None:
    """Hooks recording ``embeddings.<table>.dW`` of the position and token-type tables the embeddings have
    (the word table is tied to the decoder: its gradient is not the lookup's alone, so not compared)."""
    for name in ("position_embeddings", "token_type_embeddings"):
        if hasattr(embeddings, name):
            model._hooks.append(getattr(embeddings, name).weight.register_hook(
                store_grad(rec, f"embeddings.{name}.dW")))
