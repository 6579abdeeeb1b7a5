"""Feed-forward blocks: GPT's GELU MLP (or ReLU, as the original Transformer, or Mish), LLaMA's SwiGLU MLP and
T5 v1.1's gated-GELU MLP (``GatedMLP``).

Each forward keeps its activation cache on the block's stack (one per call, see
``Module``); the linear layers keep their own.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ..ops._checks import check_bool, check_real
from ..ops.activations import (GELU_APPROXIMATIONS, geglu_backward, geglu_forward, gelu_backward, gelu_forward,
                               mish_backward, mish_forward, relu_backward, relu_forward, swiglu_backward,
                               swiglu_forward)
from .layers import Dropout, Linear, check_dout, check_layer_options
from .module import Module, atomic


class MLPCache(NamedTuple):
    """One forward call of an MLP: the activation's op cache and the output's shape (checks dy)."""

    act: object  # GeluCache, ReluCache or MishCache (MLP), SwiGLUCache (SwiGLUMLP) or GegluCache (GatedMLP)
    out_shape: Tuple[int, ...]


MLP_ACTIVATIONS = ("gelu", "relu", "mish")


class MLP(Module):
    """x -> fc (D -> 4D) -> GELU -> proj (4D -> D), as GPT-2 (``approximate="tanh"``).

    GELU's form is ``approximate``: "tanh" (ACT.8), "none" (exact, ACT.6) or "sigmoid",
    x sigmoid(1.702 x) (ACT.22). ``activation="relu"`` puts ReLU (ACT.4) in GELU's place (the
    original Transformer, T5 v1.0), ``activation="mish"`` Mish (ACT.14); ``approximate`` then
    plays no part.
    """

    def __init__(self, d_model: int, d_hidden: int, bias: bool = True, approximate: str = "tanh", *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32, activation: str = "gelu"):
        super().__init__()
        check_layer_options("MLP", d_model=d_model, d_hidden=d_hidden)
        check_real("MLP", "proj_std", proj_std, lo=0.0)
        check_bool("MLP", "bias", bias)
        if not isinstance(approximate, str) or approximate not in GELU_APPROXIMATIONS:
            raise ValueError(f"MLP: argument 'approximate' expected 'none', 'tanh' or 'sigmoid', got {approximate!r}")
        if not isinstance(activation, str) or activation not in MLP_ACTIVATIONS:
            raise ValueError(f"MLP: argument 'activation' expected 'gelu', 'relu' or 'mish', got {activation!r}")
        self.approximate, self.activation = approximate, activation
        self.fc = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.proj = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.fc.forward(x)
        if self.activation == "relu":
            a, act = relu_forward(h)  # (ACT.4)
        elif self.activation == "mish":
            a, act = mish_forward(h)  # (ACT.14)
        else:
            a, act = gelu_forward(h, approximate=self.approximate)  # (ACT.6), (ACT.8) or (ACT.22)
        self.record("act", a)
        y = self.proj.forward(a)
        self.save_cache(MLPCache(act=act, out_shape=y.shape))
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        check_dout(self, "MLP.backward", "dy", dy, self.proj.weight.shape[0], self.proj.weight.data.dtype)
        cache = self.pop_cache()
        da = self.proj.backward(dy)
        if self.activation == "relu":
            dh = relu_backward(da, cache.act)  # (ACT.5)
        elif self.activation == "mish":
            dh = mish_backward(da, cache.act)  # (ACT.15)
        else:
            dh = gelu_backward(da, cache.act)  # (ACT.7), (ACT.9) or (ACT.23)
        self.record("dact", dh)
        dx = self.fc.backward(dh)
        return dx


class SwiGLUMLP(Module):
    """x -> silu(gate_proj(x)) * up_proj(x) -> down_proj, as LLaMA (no biases by default).

    The sublayers carry Hugging Face's LLaMA names, so the state dict reads
    ``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight``.
    """

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32):
        super().__init__()
        check_layer_options("SwiGLUMLP", d_model=d_model, d_hidden=d_hidden)
        check_real("SwiGLUMLP", "proj_std", proj_std, lo=0.0)
        check_bool("SwiGLUMLP", "bias", bias)
        self.gate_proj = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.up_proj = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.down_proj = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        g = self.gate_proj.forward(x)
        u = self.up_proj.forward(x)
        a, act = swiglu_forward(g, u)
        self.record("act", a)
        y = self.down_proj.forward(a)
        self.save_cache(MLPCache(act=act, out_shape=y.shape))
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        down = self.down_proj.weight
        check_dout(self, "SwiGLUMLP.backward", "dy", dy, down.shape[0], down.data.dtype)
        cache = self.pop_cache()
        da = self.down_proj.backward(dy)
        dgate, dup = swiglu_backward(da, cache.act)
        dx_up = self.up_proj.backward(dup)  # reverse order of the forward: up_proj ran after gate_proj
        dx_gate = self.gate_proj.backward(dgate)
        return dx_gate + dx_up



class GatedMLP(Module):
    """x -> gelu(wi_0(x)) * wi_1(x) -> dropout -> wo, as T5 v1.1 (gated-gelu, no biases by default).

    The GELU is the tanh form (Hugging Face's ``gelu_new``, ``approximate="tanh"``) unless
    ``approximate="none"``; the gate's product is GeGLU (ACT.19), its backward (ACT.20), (ACT.21).
    ``dropout`` acts on the gated product before ``wo``, as T5's ``DenseGatedActDense``. The sublayers
    carry Hugging Face's T5 names, so the state dict reads ``wi_0.weight``, ``wi_1.weight``, ``wo.weight``.
    """

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, approximate: str = "tanh", *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32, dropout: float = 0.0):
        super().__init__()
        check_layer_options("GatedMLP", rng=rng, d_model=d_model, d_hidden=d_hidden)
        check_real("GatedMLP", "proj_std", proj_std, lo=0.0)
        check_bool("GatedMLP", "bias", bias)
        if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
            raise ValueError(f"GatedMLP: argument 'approximate' expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.wi_0 = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.wi_1 = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.wo = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., d_model) -> (..., d_model)."""
        g = self.wi_0.forward(x)
        u = self.wi_1.forward(x)
        a, act = geglu_forward(g, u, approximate=self.approximate)  # (ACT.19)
        self.record("act", a)
        y = self.wo.forward(self.dropout.forward(a))
        self.save_cache(MLPCache(act=act, out_shape=y.shape))
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        wo = self.wo.weight
        check_dout(self, "GatedMLP.backward", "dy", dy, wo.shape[0], wo.data.dtype)
        cache = self.pop_cache()
        da = self.dropout.backward(self.wo.backward(dy))
        dgate, dup = geglu_backward(da, cache.act)  # (ACT.20), (ACT.21)
        dx_up = self.wi_1.backward(dup)  # reverse order of the forward: wi_1 ran after wi_0
        dx_gate = self.wi_0.backward(dgate)
        return dx_gate + dx_up
