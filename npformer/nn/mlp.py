"""Feed-forward blocks: GPT's GELU MLP and LLaMA's SwiGLU MLP.

Each forward keeps its activation cache on the block's stack (one per call, see
``Module``); the linear layers keep their own.
"""

from __future__ import annotations

import numpy as np

from ..ops._checks import check_real
from ..ops.activations import gelu_backward, gelu_forward, swiglu_backward, swiglu_forward
from .layers import Linear, check_layer_options
from .module import Module


class MLP(Module):
    """x -> fc (D -> 4D) -> GELU -> proj (4D -> D), as GPT-2 (``approximate="tanh"``)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = True, approximate: str = "tanh", *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32):
        super().__init__()
        check_layer_options("MLP", d_model=d_model, d_hidden=d_hidden)
        check_real("MLP", "proj_std", proj_std, lo=0.0)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"MLP: argument 'approximate' expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.fc = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.proj = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.fc.forward(x)
        a, cache = gelu_forward(h, approximate=self.approximate)
        self.save_cache(cache)
        self.record("act", a)
        return self.proj.forward(a)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        da = self.proj.backward(dy)
        dh = gelu_backward(da, cache)
        self.record("dact", dh)
        dx = self.fc.backward(dh)
        return dx


class SwiGLUMLP(Module):
    """x -> (silu(gate(x)) * up(x)) -> down, as LLaMA (no biases by default)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32):
        super().__init__()
        check_layer_options("SwiGLUMLP", d_model=d_model, d_hidden=d_hidden)
        check_real("SwiGLUMLP", "proj_std", proj_std, lo=0.0)
        self.gate = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.up = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.down = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        g = self.gate.forward(x)
        u = self.up.forward(x)
        a, cache = swiglu_forward(g, u)
        self.save_cache(cache)
        self.record("act", a)
        return self.down.forward(a)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        da = self.down.backward(dy)
        dgate, dup = swiglu_backward(da, cache)
        dx_up = self.up.backward(dup)  # reverse order of the forward: up ran after gate
        dx_gate = self.gate.backward(dgate)
        return dx_gate + dx_up
