"""Layer normalisation: forward and hand-derived backward.

Derivation: ``proofs/layernorm.md``; each line of the backward cites the
equation it implements. Shapes: ``x: (..., D)``, ``gamma, beta: (D,)``; the
statistics are taken over the last axis, every leading axis is a "row".
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import check_float, check_ndim, check_same_dtype, check_shape

OP = "layernorm"


class LayerNormCache(NamedTuple):
    xhat: np.ndarray  # (..., D)  normalised input, (LN.4)
    rstd: np.ndarray  # (..., 1)  reciprocal standard deviation, (LN.3)
    gamma: np.ndarray  # (D,)      scale, needed by (LN.8)


def layernorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5
) -> Tuple[np.ndarray, LayerNormCache]:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis.

    x: (..., D), gamma: (D,), beta: (D,)  ->  y: (..., D)
    """
    check_float(f"{OP}_forward", "x", x)
    check_ndim(f"{OP}_forward", "x", x, 1, at_least=True)
    D = x.shape[-1]
    check_shape(f"{OP}_forward", "gamma", gamma, (D,))
    check_shape(f"{OP}_forward", "beta", beta, (D,))
    check_same_dtype(f"{OP}_forward", "x", x, gamma=gamma, beta=beta)

    mu = x.mean(axis=-1, keepdims=True)  # (LN.1)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)  # (LN.2)
    rstd = 1.0 / np.sqrt(var + eps)  # (LN.3)
    xhat = xc
    xhat *= rstd  # (LN.4)  (in place: xc is not needed again)
    y = xhat * gamma + beta  # (LN.5)
    return y, LayerNormCache(xhat=xhat, rstd=rstd, gamma=gamma)


def layernorm_backward(
    dy: np.ndarray, cache: LayerNormCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a scalar loss with respect to x, gamma and beta.

    dy: (..., D)  ->  dx: (..., D), dgamma: (D,), dbeta: (D,)
    """
    xhat, rstd, gamma = cache
    check_shape(f"{OP}_backward", "dy", dy, xhat.shape)
    check_same_dtype(f"{OP}_backward", "xhat", xhat, dy=dy)
    rows = tuple(range(dy.ndim - 1))

    dbeta = dy.sum(axis=rows)  # (LN.6)
    dgamma = (dy * xhat).sum(axis=rows)  # (LN.7)
    dxhat = dy * gamma  # (LN.8)
    # (LN.10): dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)
    mean_dxhat_xhat = np.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx = dxhat
    dx -= mean_dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    return dx, dgamma, dbeta


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck layernorm``."""
    from ..gradcheck import Case

    D = 7
    inputs = {"x": rng.standard_normal((2, 3, D)), "gamma": rng.standard_normal(D), "beta": rng.standard_normal(D)}
    yield Case("layernorm", layernorm_forward, layernorm_backward, inputs, wrt=("x", "gamma", "beta"))
