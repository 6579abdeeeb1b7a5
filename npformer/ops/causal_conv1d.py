"""Depthwise causal 1-D convolution (Mamba's short convolution): forward and hand-derived backward.

Derivation: ``proofs/mamba.md`` (MAMBA.17 - MAMBA.20). Shapes: ``x: (B, L, D)``, ``w: (D, K)``
(one filter of K taps per channel), ``b: (D,)`` or None, ``prev: (B, K - 1, D)`` or None, all
of one float dtype. Channel d of the output at position t sees only channel d of the input
at positions t - K + 1 ... t:

    y_(t,d) = b_d + sum_k w_(d,k) xp_(t+k,d),   xp = [prev ; x]   (MAMBA.17)

``prev`` holds the K - 1 inputs before the first position (zero when None): a decoder that
continues a sequence passes the last K - 1 inputs it has seen (``cache.xp[:, -(K - 1):]`` of
the previous call), and the output is the one the whole sequence would give. This is torch's
``conv1d(x, w[:, None], b, padding=K - 1, groups=D)`` with its last K - 1 outputs dropped.
The backward returns no gradient for ``prev`` (a continued sequence is for inference).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import check_cache_type, check_float, check_ndim, check_same_dtype_as, check_shape

OP = "causal_conv1d"


class CausalConv1dCache(NamedTuple):
    xp: np.ndarray  # (B, K - 1 + L, D)  the input after the K - 1 earlier inputs, needed by (MAMBA.19)
    w: np.ndarray  # (D, K)             filters, needed by (MAMBA.18)
    has_bias: bool  # whether (MAMBA.20) applies


def causal_conv1d_forward(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray] = None,
                          prev: Optional[np.ndarray] = None) -> Tuple[np.ndarray, CausalConv1dCache]:
    """y_t = b + sum_k w_k x_(t-K+1+k) per channel (MAMBA.17).

    x: (B, L, D), w: (D, K), b: (D,) or None, prev: (B, K - 1, D) or None  ->  y: (B, L, D)
    """
    op = f"{OP}_forward"
    check_float(op, "x", x)
    check_ndim(op, "x", x, 3)
    Bsz, L, Dch = x.shape
    check_same_dtype_as(op, "w", w, x.dtype, "x")
    check_shape(op, "w", w, (Dch, None))
    K = w.shape[1]
    if K < 1:
        raise ValueError(f"{op}: argument 'w' expected at least one tap (shape (D, K) with K >= 1), got {w.shape}")
    if b is not None:
        check_same_dtype_as(op, "b", b, x.dtype, "x")
        check_shape(op, "b", b, (Dch,))
    if prev is not None:
        check_same_dtype_as(op, "prev", prev, x.dtype, "x")
        check_shape(op, "prev", prev, (Bsz, K - 1, Dch))

    xp = np.empty((Bsz, K - 1 + L, Dch), x.dtype)
    xp[:, :K - 1] = 0 if prev is None else prev  # the inputs before the first position
    xp[:, K - 1:] = x
    y = np.zeros((Bsz, L, Dch), x.dtype) if b is None else np.broadcast_to(b, (Bsz, L, Dch)).copy()
    for k in range(K):
        y += w[:, k] * xp[:, k:k + L]  # (MAMBA.17)
    return y, CausalConv1dCache(xp=xp, w=w, has_bias=b is not None)


def causal_conv1d_backward(dy: np.ndarray, cache: CausalConv1dCache
                           ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients with respect to x, w and b (None when the forward had no bias).

    dy: (B, L, D)  ->  dx: (B, L, D), dw: (D, K), db: (D,) or None
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, CausalConv1dCache)
    xp, w, has_bias = cache
    K = w.shape[1]
    L = xp.shape[1] - (K - 1)
    check_same_dtype_as(op, "dy", dy, xp.dtype, "x")
    check_shape(op, "dy", dy, (xp.shape[0], L, xp.shape[2]))

    dxp = np.zeros_like(xp)
    dw = np.empty_like(w)
    for k in range(K):
        dxp[:, k:k + L] += dy * w[:, k]  # (MAMBA.18)  input s feeds output s - k + K - 1 through tap k
        dw[:, k] = (dy * xp[:, k:k + L]).sum(axis=(0, 1))  # (MAMBA.19)
    dx = dxp[:, K - 1:]  # (MAMBA.18)  the part of xp that is x
    db = dy.sum(axis=(0, 1)) if has_bias else None  # (MAMBA.20)
    return dx, dw, db


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck causal_conv1d``."""
    from ..gradcheck import Case

    x, w, b = rng.standard_normal((2, 5, 3)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    yield Case("causal_conv1d", causal_conv1d_forward, causal_conv1d_backward, {"x": x, "w": w, "b": b},
               wrt=("x", "w", "b"))
    yield Case("causal_conv1d (no bias)", causal_conv1d_forward, causal_conv1d_backward, {"x": x, "w": w},
               wrt=("x", "w", None))
