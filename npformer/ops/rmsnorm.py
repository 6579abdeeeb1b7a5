"""Root-mean-square normalisation (LLaMA, T5): forward and hand-derived backward.

Derivation: ``proofs/rmsnorm.md``. Shapes: ``x: (..., D)`` with ``D >= 1``, ``gamma: (D,)``
of x's dtype; the statistic is taken over the last axis and every leading axis is a
"row". Any number of rows works, zero included (empty in, empty out). Unlike
LayerNorm there is no centring and no bias, so the backward loses the mean term.

The mean square is a sum of non-negative terms, so it is accurate in float32 for rows
at any offset; a row whose squares overflow is normalised from ``x / s`` (RMS.10), with s
the power of two just above max|x|, so that the scaling itself is exact.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import (
    check_cache_type,
    check_real,
    check_rows,
    check_same_dtype_as,
    check_shape,
)
from .fastpath import row_parallel
from .layernorm import row_mean

OP = "rmsnorm"


class RMSNormCache(NamedTuple):
    xhat: np.ndarray  # (..., D)  normalised input, (RMS.3)
    rstd: np.ndarray  # (..., 1)  reciprocal root mean square r, (RMS.2)
    gamma: np.ndarray  # (D,)     scale, needed by (RMS.6)


def _normalise_huge_rows(x: np.ndarray, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """xhat and r of rows whose mean square overflows, from z = x / s, s = 2^k > max|x| (RMS.10).

    s is the power of two just above max|x|, so z is x with only its exponent moved: exact
    (short of the subnormal range), where x / max|x| would round every entry once more.
    """
    _, k = np.frexp(np.max(np.abs(x), axis=-1, keepdims=True))  # max|x| = m 2^k, m in [1/2, 1)
    z = np.ldexp(x, -k)  # every entry in (-1, 1), the largest of size at least 1/2
    eps_s = np.ldexp(np.float64(eps), -2 * k).astype(x.dtype)  # eps / s^2 (0 once below the dtype's range)
    rstd_z = 1.0 / np.sqrt(row_mean(z, z, np.empty_like(z)) + eps_s)  # (RMS.10), summed as the other rows are
    return z * rstd_z, np.ldexp(rstd_z, -k)  # (RMS.10)  xhat is the same for x and z; r(x) = r_z / s


def rmsnorm_forward(x: np.ndarray, gamma: np.ndarray, eps: float = 1e-6) -> Tuple[np.ndarray, RMSNormCache]:
    """y = gamma * x / sqrt(mean(x^2) + eps) over the last axis.

    x: (..., D), gamma: (D,), eps >= 0  ->  y: (..., D)
    """
    op = f"{OP}_forward"
    D = check_rows(op, "x", x)
    check_same_dtype_as(op, "gamma", gamma, x.dtype, "x")
    check_shape(op, "gamma", gamma, (D,))
    eps = check_real(op, "eps", eps, lo=0.0)

    x2 = np.ascontiguousarray(x.reshape(-1, D))  # (N, D): the rows, C-ordered (a copy only for other layouts),
    # so that a row's sums run in the same order whichever block of rows holds it
    y, xhat, rstd = np.empty(x2.shape, x.dtype), np.empty(x2.shape, x.dtype), np.empty((len(x2), 1), x.dtype)

    def rows(r: slice) -> None:  # rows are independent: blocks of them run on several cores
        _normalise(x2[r], eps, xhat[r], rstd[r])  # (RMS.1) - (RMS.3), (RMS.10)
        np.multiply(xhat[r], gamma, out=y[r])  # (RMS.4)

    row_parallel(rows, len(x2), D, blocked=True)
    return y.reshape(x.shape), RMSNormCache(xhat=xhat.reshape(x.shape), rstd=rstd.reshape(x.shape[:-1] + (1,)),
                                            gamma=gamma)


def _normalise(x: np.ndarray, eps: float, xhat: np.ndarray, rstd: np.ndarray) -> None:
    """xhat = x r and r = 1 / sqrt(mean(x^2) + eps) of rows x (N, D) (RMS.1) - (RMS.3), written into
    ``xhat`` (N, D) and ``rstd`` (N, 1)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a row that overflows is redone by (RMS.10)
        ms = row_mean(x, x, scratch=xhat)  # (RMS.1); xhat is written by (RMS.3) below
        rstd[...] = 1.0 / np.sqrt(ms + eps)  # (RMS.2)
        np.multiply(x, rstd, out=xhat)  # (RMS.3)
        huge = ~np.isfinite(ms[..., 0])  # (rows holding inf or nan stay nan)
        if huge.any():
            xhat[huge], rstd[huge] = _normalise_huge_rows(x[huge], eps)  # (RMS.10)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients with respect to x and gamma.

    dy: (..., D)  ->  dx: (..., D), dgamma: (D,)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, RMSNormCache)
    xhat, rstd, gamma = cache
    check_same_dtype_as(op, "dy", dy, xhat.dtype, "x")
    check_shape(op, "dy", dy, xhat.shape)
    D = xhat.shape[-1]
    dy2 = np.ascontiguousarray(dy.reshape(-1, D))  # (N, D), C-ordered as in the forward
    xhat2, rstd2 = xhat.reshape(-1, D), rstd.reshape(-1, 1)  # (N, D), (N, 1): the forward's own arrays
    dx = np.empty(dy2.shape, dy.dtype)
    dy_xhat = np.empty(dy2.shape, dy.dtype)

    def rows(r: slice) -> None:  # rows are independent: blocks of them run on several cores
        np.multiply(dy2[r], xhat2[r], out=dy_xhat[r])  # summed over rows for (RMS.5)
        # (RMS.8): dx = r (dxhat - xhat mean(dxhat xhat)), built over dxhat term by term
        dxhat = np.multiply(dy2[r], gamma, out=dx[r])  # (RMS.6)
        scratch = np.empty_like(dxhat)
        mean_dxhat_xhat = row_mean(dxhat, xhat2[r], scratch)
        dxhat -= np.multiply(xhat2[r], mean_dxhat_xhat, out=scratch)
        dxhat *= rstd2[r]

    row_parallel(rows, len(dy2), D, blocked=True)
    dgamma = np.ones(len(dy2), dy.dtype) @ dy_xhat  # (RMS.5): a sum over rows, as one matrix-vector product
    return dx.reshape(dy.shape), dgamma


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck rmsnorm``."""
    from ..gradcheck import Case

    D = 6
    inputs = {"x": rng.standard_normal((2, 3, D)), "gamma": rng.standard_normal(D)}
    yield Case("rmsnorm", rmsnorm_forward, rmsnorm_backward, inputs, wrt=("x", "gamma"))
