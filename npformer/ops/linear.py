"""Affine map y = x W^T + b: forward and hand-derived backward.

Derivation: ``proofs/linear.md``. Shapes: ``x: (..., Din)``, ``W: (Dout, Din)``
(the torch / Hugging Face layout, so checkpoints load unchanged), ``b: (Dout,)``
or ``None``, all of one float dtype. Every leading axis of ``x`` is a "row"; the
backward flattens them into one axis of N rows so each gradient is a single matrix
product. Any size may be zero: an empty sum is 0, so ``Din = 0`` gives ``y = b``
and ``N = 0`` gives an empty ``y`` with zero ``dW`` and ``db``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import check_cache_type, check_float, check_ndim, check_same_dtype_as, check_shape
from .fastpath import row_parallel

OP = "linear"


class LinearCache(NamedTuple):
    x: np.ndarray  # (..., Din)   input, needed by (LIN.4)
    W: np.ndarray  # (Dout, Din)  weight, needed by (LIN.3)
    has_bias: bool  # whether (LIN.5) applies


def _rows(a: np.ndarray) -> np.ndarray:
    """(..., K) -> (N, K): the leading axes as one (a copy only where a view cannot do it)."""
    return a.reshape(int(np.prod(a.shape[:-1])), a.shape[-1])


def linear_forward(
    x: np.ndarray, W: np.ndarray, b: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, LinearCache]:
    """y = x W^T + b.

    x: (..., Din), W: (Dout, Din), b: (Dout,) or None  ->  y: (..., Dout)
    """
    op = f"{OP}_forward"
    check_float(op, "x", x)
    check_ndim(op, "x", x, 1, at_least=True)
    check_same_dtype_as(op, "W", W, x.dtype, "x")
    check_shape(op, "W", W, (None, x.shape[-1]))
    if b is not None:
        check_same_dtype_as(op, "b", b, x.dtype, "x")
        check_shape(op, "b", b, (W.shape[0],))

    # (LIN.1) as one (N, Din) x (Din, Dout) product: a single BLAS call rather than one per leading index.
    y = _rows(x) @ W.T  # (N, Dout)
    if b is not None:
        row_parallel(lambda r: np.add(y[r], b, out=y[r]), len(y), W.shape[0])  # (LIN.1), broadcast over rows
    return y.reshape(x.shape[:-1] + (W.shape[0],)), LinearCache(x=x, W=W, has_bias=b is not None)


def linear_backward(
    dy: np.ndarray, cache: LinearCache
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients with respect to x, W and b (``None`` when the forward had no bias).

    dy: (..., Dout)  ->  dx: (..., Din), dW: (Dout, Din), db: (Dout,) or None
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, LinearCache)
    x, W, has_bias = cache
    check_same_dtype_as(op, "dy", dy, x.dtype, "x")
    check_shape(op, "dy", dy, x.shape[:-1] + (W.shape[0],))
    dy2 = _rows(dy)  # (N, Dout): all rows at once
    x2 = _rows(x)  # (N, Din)

    dx = (dy2 @ W).reshape(x.shape)  # (LIN.3)
    dW = dy2.T @ x2  # (LIN.4)
    db = np.ones(len(dy2), dy.dtype) @ dy2 if has_bias else None  # (LIN.5): the sum over rows as one BLAS call
    return dx, dW, db


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck linear``."""
    from ..gradcheck import Case

    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    yield Case("linear", linear_forward, linear_backward, {"x": x, "W": W, "b": b}, wrt=("x", "W", "b"))
    yield Case("linear (no bias)", linear_forward, linear_backward, {"x": x, "W": W}, wrt=("x", "W", None))
