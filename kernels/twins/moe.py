"""A torch mixture of experts with the structure and parameter names of ``npformer.nn.moe.MoEMLP``.

The oracle of the layer's and the Mixtral model's gradients: the same routing written the direct way
in torch (softmax, a stable descending sort for the top k, ties to the lowest expert index, each
expert's queue counted token by token against its capacity), autograd for every gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TwinSwiGLUExpert(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TwinGeluExpert(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden, bias=bias)
        self.proj = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def route(logits: torch.Tensor, top_k: int, normalize_topk: bool, capacity_factor: Optional[float]):
    """probs (N, E), selected experts (N, k), gate weights (N, k), kept (N, k) bool."""
    N, E = logits.shape
    probs = torch.softmax(logits, dim=-1)
    order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices  # ties: lowest index first
    expert = order[:, :top_k]
    gate = torch.gather(probs, 1, expert)
    if normalize_topk:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    kept = torch.ones(N, top_k, dtype=torch.bool)
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * N * top_k / E)
        used = [0] * E
        for n in range(N):  # token order: an earlier token keeps its place
            for j in range(top_k):
                e = int(expert[n, j])
                kept[n, j] = used[e] < capacity
                used[e] += 1
    return probs, expert, gate, kept


def load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e: f_e the selections of e per token (not differentiated), P_e the mean probability."""
    N, E = probs.shape
    f = torch.zeros(E, dtype=probs.dtype)
    for e in expert.reshape(-1).tolist():
        f[e] += 1.0 / N
    return E * torch.sum(f * probs.mean(dim=0))


class TwinMoE(nn.Module):
    def __init__(self, d_model, d_hidden, n_experts, top_k=2, capacity_factor=None, expert="swiglu",
                 aux_loss_coef=0.0, z_loss_coef=0.0, normalize_topk=None, bias=False):
        super().__init__()
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.normalize_topk = top_k > 1 if normalize_topk is None else normalize_topk
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        make = TwinSwiGLUExpert if expert == "swiglu" else TwinGeluExpert
        self.experts = nn.ModuleList(make(d_model, d_hidden, bias) for _ in range(n_experts))
        self.probs = self.expert = self.kept = None
        self.aux_loss = self.z_loss = None

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        if noise is not None:
            xf = xf * noise
        logits = self.gate(xf)
        probs, expert, gate, kept = route(logits, self.top_k, self.normalize_topk, self.capacity_factor)
        self.probs, self.expert, self.kept = probs, expert, kept
        y = torch.zeros_like(xf)
        for e, mlp in enumerate(self.experts):
            n, j = torch.nonzero((expert == e) & kept, as_tuple=True)
            if n.numel():
                y = y.index_add(0, n, gate[n, j, None] * mlp(xf[n]))
        self.aux_loss = load_balancing_loss(probs, expert)
        self.z_loss = torch.mean(torch.logsumexp(logits, dim=-1) ** 2)
        return y.reshape(shape)

    @property
    def loss(self) -> torch.Tensor:
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss
