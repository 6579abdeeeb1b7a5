"""Layer normalisation: forward and hand-derived backward.

Derivation: ``proofs/layernorm.md``; each line of the backward cites the
equation it implements. Shapes: ``x: (..., D)`` with ``D >= 1``, ``gamma, beta: (D,)``
of x's dtype; the statistics are taken over the last axis, every leading axis is a
"row". Any number of rows works, zero included: an empty ``x`` gives an empty ``y``,
and its backward zero parameter gradients.

Floating point (``proofs/layernorm.md``, "Floating point"): the row is centred on one
of its own entries before the mean is taken (LN.12), so a float32 row far from zero
(10000.3 in every entry) is centred exactly instead of carrying the rounding error of
its mean into ``xhat``; a row whose squares overflow is scaled by powers of two (exact),
centred, and scaled again by its centred maximum before the variance is taken (LN.13).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    check_cache_type,
    check_real,
    check_rows,
    check_same_dtype_as,
    check_shape,
)
from .fastpath import row_parallel

OP = "layernorm"


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., D)  normalised input, (LN.4)
    rstd: np.ndarray  # (..., 1)  reciprocal standard deviation r, (LN.3)
    gamma: np.ndarray  # (D,)      scale, needed by (LN.8)


def row_mean(a: np.ndarray, b: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """mean_i a_i b_i over the last axis, kept as an axis of size 1: (..., D), (..., D) -> (..., 1);
    ``scratch`` (a's shape) is overwritten with the products.

    Each row summed pairwise by ``np.mean``: accurate to a few units in the last place at any D (for a
    mean of squares, a sum of non-negative terms), where a long running total (a plain loop, or each
    lane of a dot product) rounds away every term below half a unit of the total, an error growing with
    D (about D / 100 units of r for one large entry among small ones). And each row's sum is the same
    whichever block of rows holds it and whatever the BLAS's threads: a BLAS dot product of a long row
    splits it among the BLAS's threads, and ``np.einsum`` buffers a long row in pieces that depend on
    the number of rows.
    """
    products = np.square(a, out=scratch) if a is b else np.multiply(a, b, out=scratch)  # a * a: the same bits
    return products.mean(axis=-1, keepdims=True)


def _centred(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """x - mu per row (LN.1), computed as (LN.12): shifted by the row's first entry first.

    A new array, or ``out``. Every subtraction here is between numbers of the row's own spread,
    so the result is accurate relative to that spread however far the row is from zero.
    """
    shifted = np.subtract(x, x[..., :1], out=out)  # x_j - x_1
    shifted -= shifted.mean(axis=-1, keepdims=True)  # (LN.12)  x_j - x_1 - (mu - x_1)
    return shifted


def _scaled_by_power_of_two(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(a / 2^k, k) per row, with 2^k the power of two just above max|a|: |a / 2^k| < 1.

    Dividing by a power of two only moves the exponent, so it is exact (short of the
    subnormal range, far below the row's largest entry); dividing by max|a| itself would
    round every entry, relative to its own size.
    """
    _, k = np.frexp(np.max(np.abs(a), axis=-1, keepdims=True))  # max|a| = m 2^k, m in [1/2, 1)
    return np.ldexp(a, -k), k


def _normalise_huge_rows(x: np.ndarray, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """xhat and r of rows whose variance overflows (LN.13): centre first, then scale.

    z = x / 2^a (exact, |z| < 1), centred on its first entry by (LN.12), which cannot
    overflow now; then w = (z - mu_z) / 2^b (exact, max|w| in [1/2, 1)), so that the
    variance of w is a sum of squares of order one whatever the row's offset and spread.
    With s = 2^(a+b): xhat = w / sqrt(var(w) + eps/s^2) and r = 1/(s sqrt(var(w) + eps/s^2)).
    """
    z, a = _scaled_by_power_of_two(x)  # x / 2^a
    w, b = _scaled_by_power_of_two(_centred(z))  # (LN.12), then (x - mu) / s with s = 2^(a+b)
    k = a + b  # (..., 1)  s = 2^k
    eps_s = np.ldexp(np.float64(eps), -2 * k).astype(x.dtype)  # eps / s^2 (0 once below the dtype's range)
    rstd_w = 1.0 / np.sqrt(row_mean(w, w, np.empty_like(w)) + eps_s)  # (LN.13)
    return w * rstd_w, np.ldexp(rstd_w, -k)  # (LN.13)  xhat is the same for x and w; r(x) = r_w / s


def layernorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> Tuple[np.ndarray, LayerNormCache]:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis.

    x: (..., D), gamma: (D,), beta: (D,), eps >= 0  ->  y: (..., D)
    """
    op = f"{OP}_forward"
    D = check_rows(op, "x", x)
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_same_dtype_as(op, name, p, x.dtype, "x")
        check_shape(op, name, p, (D,))
    eps = check_real(op, "eps", eps, lo=0.0)

    x2 = np.ascontiguousarray(x.reshape(-1, D))  # (N, D): the rows, C-ordered (a copy only for other layouts),
    # so that a row's sums run in the same order whichever block of rows holds it
    y, xhat, rstd = np.empty(x2.shape, x.dtype), np.empty(x2.shape, x.dtype), np.empty((len(x2), 1), x.dtype)

    def rows(r: slice) -> None:  # rows are independent: blocks of them run on several cores
        _normalise(x2[r], eps, xhat[r], rstd[r], scratch=y[r])  # (LN.1) - (LN.4), (LN.13)
        np.multiply(xhat[r], gamma, out=y[r])
        y[r] += beta  # (LN.5)

    row_parallel(rows, len(x2), D, blocked=True)
    return y.reshape(x.shape), LayerNormCache(xhat=xhat.reshape(x.shape), rstd=rstd.reshape(x.shape[:-1] + (1,)),
                                              gamma=gamma)


def _normalise(x: np.ndarray, eps: float, xhat: np.ndarray, rstd: np.ndarray, scratch: np.ndarray) -> None:
    """xhat = (x - mu) r and r = 1 / sqrt(var + eps) of rows x (N, D) (LN.1) - (LN.4), written into
    ``xhat`` (N, D) and ``rstd`` (N, 1); ``scratch`` (N, D) is overwritten."""
    with np.errstate(over="ignore", invalid="ignore"):  # a row that overflows is redone by (LN.13)
        xc = _centred(x, out=xhat)  # x - mu, (LN.1), (LN.12)
        var = row_mean(xc, xc, scratch)  # (LN.2)
        rstd[...] = 1.0 / np.sqrt(var + eps)  # (LN.3)
        xc *= rstd  # (LN.4), written over x - mu, which is not needed again
        huge = ~np.isfinite(var[..., 0])  # (rows holding inf or nan stay nan)
        if huge.any():
            xhat[huge], rstd[huge] = _normalise_huge_rows(x[huge], eps)  # (LN.13)


def layernorm_backward(
    dy: np.ndarray, cache: LayerNormCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a scalar loss with respect to x, gamma and beta.

    dy: (..., D)  ->  dx: (..., D), dgamma: (D,), dbeta: (D,)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, LayerNormCache)
    xhat, rstd, gamma = cache
    check_same_dtype_as(op, "dy", dy, xhat.dtype, "x")
    check_shape(op, "dy", dy, xhat.shape)
    D = xhat.shape[-1]
    dy2 = np.ascontiguousarray(dy.reshape(-1, D))  # (N, D), C-ordered as in the forward
    xhat2, rstd2 = xhat.reshape(-1, D), rstd.reshape(-1, 1)  # (N, D), (N, 1): the forward's own arrays
    ones = np.ones(len(dy2), dy.dtype)
    dbeta = ones @ dy2  # (LN.6): a sum over rows, as one matrix-vector product
    dx = np.empty(dy2.shape, dy.dtype)
    dy_xhat = np.empty(dy2.shape, dy.dtype)

    def rows(r: slice) -> None:  # rows are independent: blocks of them run on several cores
        np.multiply(dy2[r], xhat2[r], out=dy_xhat[r])  # summed over rows for (LN.7)
        # (LN.10): dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), built over dxhat term by term
        dxhat = np.multiply(dy2[r], gamma, out=dx[r])  # (LN.8)
        mean_dxhat = dxhat.mean(axis=-1, keepdims=True)
        scratch = np.empty_like(dxhat)
        mean_dxhat_xhat = row_mean(dxhat, xhat2[r], scratch)
        dx_r = dxhat  # dxhat is not needed once the means are taken: dx is built over it
        dx_r -= mean_dxhat
        dx_r -= np.multiply(xhat2[r], mean_dxhat_xhat, out=scratch)
        dx_r *= rstd2[r]

    row_parallel(rows, len(dy2), D, blocked=True)
    dgamma = ones @ dy_xhat  # (LN.7)
    return dx.reshape(dy.shape), dgamma, dbeta


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck layernorm``."""
    from ..gradcheck import Case

    D = 7
    inputs = {"x": rng.standard_normal((2, 3, D)), "gamma": rng.standard_normal(D), "beta": rng.standard_normal(D)}
    yield Case("layernorm", layernorm_forward, layernorm_backward, inputs, wrt=("x", "gamma", "beta"))
