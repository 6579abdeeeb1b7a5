"""Root-mean-square normalisation (LLaMA, T5): forward and hand-derived backward.

Derivation: ``proofs/rmsnorm.md``. Shapes: ``x: (..., D)``, ``weight: (D,)``; the
statistic is taken over the last axis and every leading axis is a "row". Unlike
LayerNorm there is no centring and no bias, so the backward loses the mean term.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import check_float, check_ndim, check_same_dtype, check_shape

OP = "rmsnorm"


class RMSNormCache(NamedTuple):
    xhat: np.ndarray  # (..., D)  normalised input, (RMS.3)
    rstd: np.ndarray  # (..., 1)  reciprocal root mean square, (RMS.2)
    weight: np.ndarray  # (D,)    scale, needed by (RMS.6)


def rmsnorm_forward(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> Tuple[np.ndarray, RMSNormCache]:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last axis.

    x: (..., D), weight: (D,)  ->  y: (..., D)
    """
    check_float(f"{OP}_forward", "x", x)
    check_ndim(f"{OP}_forward", "x", x, 1, at_least=True)
    check_shape(f"{OP}_forward", "weight", weight, (x.shape[-1],))
    check_same_dtype(f"{OP}_forward", "x", x, weight=weight)

    ms = np.mean(x * x, axis=-1, keepdims=True)  # (RMS.1)
    rstd = 1.0 / np.sqrt(ms + eps)  # (RMS.2)
    xhat = x * rstd  # (RMS.3)
    y = xhat * weight  # (RMS.4)
    return y, RMSNormCache(xhat=xhat, rstd=rstd, weight=weight)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients with respect to x and weight.

    dy: (..., D)  ->  dx: (..., D), dweight: (D,)
    """
    xhat, rstd, weight = cache
    check_shape(f"{OP}_backward", "dy", dy, xhat.shape)
    check_same_dtype(f"{OP}_backward", "xhat", xhat, dy=dy)
    rows = tuple(range(dy.ndim - 1))

    dweight = (dy * xhat).sum(axis=rows)  # (RMS.5)
    dxhat = dy * weight  # (RMS.6)
    # (RMS.8): dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    mean_dxhat_xhat = np.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx = dxhat
    dx -= xhat * mean_dxhat_xhat
    dx *= rstd
    return dx, dweight


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck rmsnorm``."""
    from ..gradcheck import Case

    D = 6
    inputs = {"x": rng.standard_normal((2, 3, D)), "weight": rng.standard_normal(D)}
    yield Case("rmsnorm", rmsnorm_forward, rmsnorm_backward, inputs, wrt=("x", "weight"))
