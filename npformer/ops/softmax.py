"""Softmax and log-softmax along any axis: forward and hand-derived backward.

Derivation: ``proofs/softmax.md``; each line of the backward cites the equation
it implements. Shapes: ``x: (..., V, ...)``, the op acts along ``axis`` (size V);
every other index is an independent "row" (any number of rows, zero included:
empty in, empty out); the axis itself must hold at least one entry. Both forwards
subtract the row's maximum first, so logits of any finite size (up to float32's
3.4e38 either way) give finite probabilities, and a row of equal logits, however
large, gives exactly 1/V.

The returned output is the caller's: writing to it (``y *= 3``) never changes what the
backward returns. The softmax cache keeps its own copy of ``y``; the
log-softmax cache keeps the softmax ``p`` (which its backward needs) instead of ``y``.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import _fail, check_cache_type, check_float, check_like, check_ndim, check_range

OP = "softmax"
LOG_OP = "log_softmax"


class SoftmaxCache(NamedTuple):
    y: np.ndarray  # (..., V, ...)  softmax output, (SM.1), the cache's own copy; (SM.2) needs only y
    axis: int  # the softmax axis, normalised to 0 <= axis < ndim


class LogSoftmaxCache(NamedTuple):
    p: np.ndarray  # (..., V, ...)  softmax of x, (LSM.2): what (LSM.3) needs (the output y is the caller's)
    axis: int  # the normalisation axis, normalised to 0 <= axis < ndim


def _check_input(op: str, x: np.ndarray, axis: int) -> int:
    """Validate ``x`` and ``axis``; return ``axis`` as a non-negative index."""
    check_float(op, "x", x)
    check_ndim(op, "x", x, 1, at_least=True)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        _fail(op, "axis", "an int", type(axis).__name__)
    check_range(op, "axis", int(axis), -x.ndim, x.ndim)
    axis = int(axis) % x.ndim
    if x.shape[axis] == 0:
        _fail(op, "x", f"at least one entry along axis {axis}", f"shape {tuple(x.shape)}")
    return axis


def _exp_shifted(x: np.ndarray, axis: int) -> np.ndarray:
    """e = exp(x - max(x)) along ``axis`` (SM.1): a new array with entries in [0, 1], a 1 in every row."""
    buf = _shifted(x, axis)
    return np.exp(buf, out=buf)


def _shifted(x: np.ndarray, axis: int) -> np.ndarray:
    """z = x - max(x) along ``axis``: a new array, max(z) = 0 in every row (SM.1).

    Where two logits lie more than float max apart the difference rounds to -inf, whose
    exponential is the correctly rounded 0: that overflow is expected and not reported.
    """
    with np.errstate(over="ignore"):
        return x - x.max(axis=axis, keepdims=True)


def softmax_forward(x: np.ndarray, axis: int = -1) -> Tuple[np.ndarray, SoftmaxCache]:
    """y = exp(x - max x) / sum(exp(x - max x)) along ``axis``.

    x: (..., V, ...)  ->  y: same shape and dtype, every row along ``axis`` sums to 1.
    """
    axis = _check_input(f"{OP}_forward", x, axis)
    e = _exp_shifted(x, axis)  # e_i = exp(x_i - m), in [0, 1]; the row maximum gives exactly 1
    s = e.sum(axis=axis, keepdims=True)  # s >= 1: no division by zero
    y = np.divide(e, s, out=e)  # (SM.1), written over e, which is not needed again
    del e  # (its buffer is y's now)
    # The caller may write to y (y *= 3): the cache keeps its own copy, so the backward cannot change.
    return y, SoftmaxCache(y=y.copy(), axis=axis)


def softmax_backward(dy: np.ndarray, cache: SoftmaxCache) -> np.ndarray:
    """Gradient of a scalar loss with respect to x.

    dy: (..., V, ...)  ->  dx: same shape
    """
    check_cache_type(f"{OP}_backward", cache, SoftmaxCache)
    y, axis = cache
    check_like(f"{OP}_backward", "dy", dy, y)
    dot = np.sum(dy * y, axis=axis, keepdims=True)  # <dy, y> per row
    dx = dy - dot
    dx *= y  # (SM.3)  dx = y * (dy - <dy, y>) = (diag(y) - y y^T) dy
    return dx


def log_softmax_forward(x: np.ndarray, axis: int = -1) -> Tuple[np.ndarray, LogSoftmaxCache]:
    """y = x - max x - log(sum(exp(x - max x))) along ``axis``.

    x: (..., V, ...)  ->  y: same shape and dtype, every entry <= 0.
    """
    axis = _check_input(f"{LOG_OP}_forward", x, axis)
    z = _shifted(x, axis)  # x - m
    e = np.exp(z)  # e^(x - m), in [0, 1]
    s = e.sum(axis=axis, keepdims=True)  # in [1, V]: z has a 0 in every row
    y = np.subtract(z, np.log(s), out=z)  # (LSM.1), written over x - m, which is not needed again
    del z  # (its buffer is y's now)
    p = np.divide(e, s, out=e)  # (LSM.2)  the softmax, which the backward needs: kept instead of y
    return y, LogSoftmaxCache(p=p, axis=axis)


def log_softmax_backward(dy: np.ndarray, cache: LogSoftmaxCache) -> np.ndarray:
    """Gradient of a scalar loss with respect to x.

    dy: (..., V, ...)  ->  dx: same shape
    """
    check_cache_type(f"{LOG_OP}_backward", cache, LogSoftmaxCache)
    p, axis = cache  # p: the softmax, (LSM.2)
    check_like(f"{LOG_OP}_backward", "dy", dy, p)
    dx = p * -dy.sum(axis=axis, keepdims=True)  # (LSM.3)  dx = dy - softmax * sum(dy), in one buffer
    dx += dy
    return dx


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck softmax``."""
    from ..gradcheck import Case

    x = {"x": 3.0 * rng.standard_normal((2, 5, 3))}
    yield Case("softmax (axis=-1)", softmax_forward, softmax_backward, x, wrt=("x",))
    yield Case("softmax (axis=1)", softmax_forward, softmax_backward, x, wrt=("x",), options={"axis": 1})
    yield Case("log_softmax (axis=-1)", log_softmax_forward, log_softmax_backward, x, wrt=("x",))
    yield Case("log_softmax (axis=0)", log_softmax_forward, log_softmax_backward, x, wrt=("x",), options={"axis": 0})
