"""Feed-forward blocks: GPT's GELU MLP and LLaMA's SwiGLU MLP."""

from __future__ import annotations

import numpy as np

from ..ops.activations import gelu_backward, gelu_forward, swiglu_backward, swiglu_forward
from .layers import Linear
from .module import Module


class MLP(Module):
    """x -> fc (D -> 4D) -> GELU -> proj (4D -> D), as GPT-2 (``approximate="tanh"``)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = True, approximate: str = "tanh", *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.approximate = approximate
        self.fc = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.proj = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = self.fc.forward(x)
        a, self.act_cache = gelu_forward(h, approximate=self.approximate)
        self.record("act", a)
        return self.proj.forward(a)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        da = self.proj.backward(dy)
        dh = gelu_backward(da, self.act_cache)
        self.record("dact", dh)
        return self.fc.backward(dh)


class SwiGLUMLP(Module):
    """x -> (silu(gate(x)) * up(x)) -> down, as LLaMA (no biases by default)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = False, *,
                 rng: np.random.Generator, proj_std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.gate = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.up = Linear(d_model, d_hidden, bias, rng=rng, dtype=dtype)
        self.down = Linear(d_hidden, d_model, bias, rng=rng, std=proj_std, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        a, self.act_cache = swiglu_forward(self.gate.forward(x), self.up.forward(x))
        self.record("act", a)
        return self.down.forward(a)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dgate, dup = swiglu_backward(self.down.backward(dy), self.act_cache)
        return self.gate.backward(dgate) + self.up.backward(dup)
