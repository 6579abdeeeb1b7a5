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
    rstd_z = 1.0 / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps_s)  # (RMS.10)
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

    with np.errstate(over="ignore", invalid="ignore"):  # a row that overflows is redone by (RMS.10)
        ms = np.mean(x * x, axis=-1, keepdims=True)  # (RMS.1)
        rstd = 1.0 / np.sqrt(ms + eps)  # (RMS.2)
        xhat = x * rstd  # (RMS.3)
        huge = ~np.isfinite(ms[..., 0])  # (rows holding inf or nan stay nan)
        if huge.any():
            xhat[huge], rstd[huge] = _normalise_huge_rows(x[huge], eps)  # (RMS.10)
    y = xhat * gamma  # (RMS.4)
    return y, RMSNormCache(xhat=xhat, rstd=rstd, gamma=gamma)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients with respect to x and gamma.

    dy: (..., D)  ->  dx: (..., D), dgamma: (D,)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, RMSNormCache)
    xhat, rstd, gamma = cache
    check_same_dtype_as(op, "dy", dy, xhat.dtype, "x")
    check_shape(op, "dy", dy, xhat.shape)
    rows = tuple(range(dy.ndim - 1))

    dgamma = (dy * xhat).sum(axis=rows)  # (RMS.5)
    dxhat = dy * gamma  # (RMS.6)
    # (RMS.8): dx = r (dxhat - xhat mean(dxhat xhat))
    mean_dxhat_xhat = np.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx = xhat * -mean_dxhat_xhat  # dx is built in one buffer, term by term
    dx += dxhat
    dx *= rstd
    return dx, dgamma


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck rmsnorm``."""
    from ..gradcheck import Case

    D = 6
    inputs = {"x": rng.standard_normal((2, 3, D)), "gamma": rng.standard_normal(D)}
    yield Case("rmsnorm", rmsnorm_forward, rmsnorm_backward, inputs, wrt=("x", "gamma"))
