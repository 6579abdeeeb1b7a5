"""Thin layers over the op pairs: each keeps its op's cache and its Parameters.

``forward`` returns the output and stores the cache on the layer; ``backward(dy)``
adds parameter gradients into ``.grad`` (``+=``, so tied weights and accumulation
work) and returns the input gradient.

Recorded names (when recording is on): ``<path>.out`` in the forward, and in the
backward ``<path>.dW``/``.db`` (Linear, Embedding), ``.dweight``/``.dbias``/``.dx`` (norms).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.embedding import embedding_backward, embedding_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.linear import linear_backward, linear_forward
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .module import Module, Parameter


def normal(rng: np.random.Generator, shape, std: float, dtype) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(dtype)


class Linear(Module):
    """y = x W^T + b with W (out, in), as torch.nn.Linear (weights load from torch/HF unchanged)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, *, rng: np.random.Generator,
                 std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.weight = Parameter(normal(rng, (d_out, d_in), std, dtype))
        self.bias = Parameter(np.zeros(d_out, dtype)) if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, self.cache = linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)
        self.record("out", y)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dx, dW, db = linear_backward(dy, self.cache)
        self.weight.grad += dW
        self.record("dW", dW)
        if self.bias is not None:
            self.bias.grad += db
            self.record("db", db)
        return dx


class Embedding(Module):
    """Rows of a (V, D) table looked up by integer ids."""

    def __init__(self, num: int, dim: int, *, rng: np.random.Generator, std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.weight = Parameter(normal(rng, (num, dim), std, dtype))

    def forward(self, ids: np.ndarray) -> np.ndarray:
        out, self.cache = embedding_forward(ids, self.weight.data)
        self.record("out", out)
        return out

    def backward(self, dout: np.ndarray) -> None:
        dW = embedding_backward(dout, self.cache)
        self.weight.grad += dW
        self.record("dW", dW)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype))

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, self.cache = layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        self.record("out", y)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = layernorm_backward(dy, self.cache)
        self.weight.grad += dgamma
        self.bias.grad += dbeta
        self.record("dweight", dgamma)
        self.record("dbias", dbeta)
        self.record("dx", dx)
        return dx


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=np.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(dim, dtype))

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, self.cache = rmsnorm_forward(x, self.weight.data, self.eps)
        self.record("out", y)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dx, dweight = rmsnorm_backward(dy, self.cache)
        self.weight.grad += dweight
        self.record("dweight", dweight)
        self.record("dx", dx)
        return dx


class Dropout(Module):
    """Inverted dropout drawing its masks from the generator it is given (reproducible from a seed).

    The mask of the last forward is recorded as ``<path>.mask``, so a twin can reuse it.
    """

    def __init__(self, p: float, *, rng: np.random.Generator):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, self.cache = dropout_forward(x, self.p, self.rng, training=self.training)
        if self.cache.mask is not None:
            self.record("mask", self.cache.mask)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        return dropout_backward(dy, self.cache)
