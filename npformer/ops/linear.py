"""Affine map y = x W^T + b: forward and hand-derived backward.

Derivation: ``proofs/linear.md``. Shapes: ``x: (..., Din)``, ``W: (Dout, Din)``
(the torch / Hugging Face layout, so checkpoints load unchanged), ``b: (Dout,)``
or ``None``. Every leading axis of ``x`` is a "row"; the backward flattens them
into one axis of N rows so each gradient is a single matrix product.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import check_float, check_ndim, check_same_dtype, check_shape

OP = "linear"


class LinearCache(NamedTuple):
    x: np.ndarray  # (..., Din)   input, needed by (LIN.4)
    W: np.ndarray  # (Dout, Din)  weight, needed by (LIN.3)
    has_bias: bool  # whether (LIN.5) applies


def linear_forward(
    x: np.ndarray, W: np.ndarray, b: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, LinearCache]:
    """y = x W^T + b.

    x: (..., Din), W: (Dout, Din), b: (Dout,) or None  ->  y: (..., Dout)
    """
    check_float(f"{OP}_forward", "x", x)
    check_ndim(f"{OP}_forward", "x", x, 1, at_least=True)
    check_float(f"{OP}_forward", "W", W)
    check_shape(f"{OP}_forward", "W", W, (None, x.shape[-1]))
    if b is not None:
        check_shape(f"{OP}_forward", "b", b, (W.shape[0],))
    check_same_dtype(f"{OP}_forward", "x", x, W=W, b=b)

    # (LIN.1) as one (N, Din) x (Din, Dout) product: a single BLAS call rather than one per leading index.
    y = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(x.shape[:-1] + (W.shape[0],))
    if b is not None:
        y += b  # (LIN.1), broadcast over rows
    return y, LinearCache(x=x, W=W, has_bias=b is not None)


def linear_backward(
    dy: np.ndarray, cache: LinearCache
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients with respect to x, W and b (``None`` when the forward had no bias).

    dy: (..., Dout)  ->  dx: (..., Din), dW: (Dout, Din), db: (Dout,) or None
    """
    x, W, has_bias = cache
    check_shape(f"{OP}_backward", "dy", dy, x.shape[:-1] + (W.shape[0],))
    check_same_dtype(f"{OP}_backward", "x", x, dy=dy)
    Din, Dout = W.shape[1], W.shape[0]
    dy2 = dy.reshape(-1, Dout)  # (N, Dout): all rows at once
    x2 = x.reshape(-1, Din)  # (N, Din)

    dx = (dy2 @ W).reshape(x.shape)  # (LIN.3)
    dW = dy2.T @ x2  # (LIN.4)
    db = dy2.sum(axis=0) if has_bias else None  # (LIN.5)
    return dx, dW, db


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck linear``."""
    from ..gradcheck import Case

    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    yield Case("linear", linear_forward, linear_backward, {"x": x, "W": W, "b": b}, wrt=("x", "W", "b"))
    yield Case("linear (no bias)", linear_forward, linear_backward, {"x": x, "W": W}, wrt=("x", "W", None))
