"""Thin layers over the op pairs: each keeps one op cache per forward call and its Parameters.

``forward`` returns the output and pushes the op's cache (``self.save_cache``, training
mode only); ``backward(dy)`` pops the cache of the latest unmatched forward
(``cache = self.pop_cache()``), adds parameter gradients into ``.grad`` (``+=``, so
shared layers, tied weights and accumulation work) and returns the input gradient.

Recorded names (when recording is on): ``<path>.out`` in the forward, and in the
backward ``<path>.dW``/``.db`` (Linear, Embedding), ``.dweight``/``.dbias``/``.dx`` (norms).
"""

from __future__ import annotations


import numpy as np

from ..ops._checks import check_bool, check_count, check_dtype_option, check_float, check_int, check_real, check_shape
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.embedding import embedding_backward, embedding_forward
from ..ops.groupnorm import check_num_groups, groupnorm_backward, groupnorm_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.linear import linear_backward, linear_forward
from ..ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from .module import Module, Parameter, atomic


def normal(rng: np.random.Generator, shape, std: float, dtype) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(dtype)


def check_features(layer: str, name: str, x: object, dim: int, dtype: np.dtype) -> None:
    """A layer input, or the gradient of its output, (..., dim) of the layer's float dtype, named by the layer."""
    check_float(layer, name, x)
    check_shape(layer, name, x, (None,) * (x.ndim - 1) + (dim,) if x.ndim else (dim,))
    if x.dtype != dtype:
        raise ValueError(f"{layer}: argument '{name}' expected dtype {dtype} (the parameters'), got {x.dtype}")


def check_dout(layer: Module, op: str, name: str, dout: object, dim: int, dtype: np.dtype) -> None:
    """The gradient of a layer's output, checked before any gradient is added: a float array (..., dim)
    of the layer's dtype, shaped as the output of the forward it will be matched with
    (``layer.peek_cache().out_shape``)."""
    check_features(op, name, dout, dim, dtype)
    check_shape(op, name, dout, layer.peek_cache().out_shape)


_UNSET = object()


def check_layer_options(layer: str, *, rng=_UNSET, dtype=None, std=None, eps=None, **counts) -> np.dtype:
    """Constructor options of a layer: sizes >= 1, a Generator, a float dtype, std >= 0, eps >= 0."""
    for name, n in counts.items():
        check_count(layer, name, n, 1)
    if rng is not _UNSET and not isinstance(rng, np.random.Generator):
        raise TypeError(f"{layer}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
    if std is not None:
        check_real(layer, "std", std, lo=0.0)
    if eps is not None:
        check_real(layer, "eps", eps, lo=0.0)
    return check_dtype_option(layer, "dtype", np.float32 if dtype is None else dtype)


class Linear(Module):
    """y = x W^T + b with W (out, in), as torch.nn.Linear (weights load from torch/HF unchanged)."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, *, rng: np.random.Generator,
                 std: float = 0.02, dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("Linear", rng=rng, dtype=dtype, std=std, d_in=d_in, d_out=d_out)
        check_bool("Linear", "bias", bias)
        self.weight = Parameter(normal(rng, (d_out, d_in), std, dtype))
        self.bias = Parameter(np.zeros(d_out, dtype)) if bias else None

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., in) -> y (..., out)."""
        check_features("Linear.forward", "x", x, self.weight.shape[1], self.weight.data.dtype)
        y, cache = linear_forward(x, self.weight.data, None if self.bias is None else self.bias.data)
        self.save_cache(cache)
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        dx, dW, db = linear_backward(dy, cache)
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
        dtype = check_layer_options("Embedding", rng=rng, dtype=dtype, std=std, num=num, dim=dim)
        self.weight = Parameter(normal(rng, (num, dim), std, dtype))

    @atomic
    def forward(self, ids: np.ndarray) -> np.ndarray:
        """ids (...) int in [0, V) -> rows (..., D)."""
        check_int("Embedding.forward", "ids", ids)
        out, cache = embedding_forward(ids, self.weight.data)
        self.save_cache(cache)
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> None:
        cache = self.pop_cache()
        dW = embedding_backward(dout, cache)
        self.weight.grad += dW
        self.record("dW", dW)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("LayerNorm", dtype=dtype, eps=eps, dim=dim)
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype))

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., D) -> y (..., D)."""
        check_features("LayerNorm.forward", "x", x, self.weight.shape[0], self.weight.data.dtype)
        y, cache = layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        self.save_cache(cache)
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        dx, dweight, dbias = layernorm_backward(dy, cache)
        self.weight.grad += dweight
        self.bias.grad += dbias
        self.record("dweight", dweight)
        self.record("dbias", dbias)
        self.record("dx", dx)
        return dx


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("RMSNorm", dtype=dtype, eps=eps, dim=dim)
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, dtype))

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., D) -> y (..., D)."""
        check_features("RMSNorm.forward", "x", x, self.weight.shape[0], self.weight.data.dtype)
        y, cache = rmsnorm_forward(x, self.weight.data, self.eps)
        self.save_cache(cache)
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        dx, dweight = rmsnorm_backward(dy, cache)
        self.weight.grad += dweight
        self.record("dweight", dweight)
        self.record("dx", dx)
        return dx


class GroupNorm(Module):
    """Group normalisation of each position's C channels in ``num_groups`` groups (GN.1)-(GN.6),
    with a per-channel gain ``weight`` and shift ``bias`` (none when ``bias=False``: shift 0).

    ``num_groups=1`` is LayerNorm over the channels (GN.11). Recorded names as LayerNorm's.
    """

    def __init__(self, dim: int, num_groups: int, eps: float = 1e-5, *, bias: bool = True, dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("GroupNorm", dtype=dtype, eps=eps, dim=dim)
        self.num_groups = check_num_groups("GroupNorm", num_groups, dim)
        check_bool("GroupNorm", "bias", bias)
        self.eps = float(eps)
        self.weight = Parameter(np.ones(dim, dtype))
        self.bias = Parameter(np.zeros(dim, dtype)) if bias else None

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., C) -> y (..., C)."""
        check_features("GroupNorm.forward", "x", x, self.weight.shape[0], self.weight.data.dtype)
        beta = np.zeros_like(self.weight.data) if self.bias is None else self.bias.data
        y, cache = groupnorm_forward(x, self.weight.data, beta, self.num_groups, self.eps)  # (GN.6)
        self.save_cache(cache)
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        dx, dweight, dbias = groupnorm_backward(dy, cache)  # (GN.7)-(GN.10)
        self.weight.grad += dweight
        self.record("dweight", dweight)
        if self.bias is not None:  # without a bias the shift's gradient has no parameter to go to
            self.bias.grad += dbias
            self.record("dbias", dbias)
        self.record("dx", dx)
        return dx


class Dropout(Module):
    """Inverted dropout drawing its masks from the generator it is given (reproducible from a seed).

    Each training forward's mask is kept for its own backward and recorded as
    ``<path>.mask``, so a twin can reuse it. In eval mode the layer is the identity.
    """

    def __init__(self, p: float, *, rng: np.random.Generator):
        super().__init__()
        check_layer_options("Dropout", rng=rng)
        self.p = check_real("Dropout", "p", p, lo=0.0, hi=1.0, hi_open=True)
        self.rng = rng

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        check_float("Dropout.forward", "x", x)
        y, cache = dropout_forward(x, self.p, self.rng, training=self.training)
        self.save_cache(cache)
        if cache.mask is not None:
            self.record("mask", cache.mask)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        return dropout_backward(dy, cache)
