"""Group normalisation over the channels of each position: forward and hand-derived backward.

Derivation: ``proofs/groupnorm.md``; each line of the backward cites the equation it
implements. Shapes: ``x: (..., C)`` (in a transformer ``(B, T, C)``), ``gamma, beta: (C,)`` of
x's dtype, ``G = num_groups`` a divisor of ``C`` and ``C_g = C / G`` channels per group. Every
leading index (every token) is a row on its own; within a row, channels
``g C_g .. (g + 1) C_g - 1`` form group ``g`` and are normalised together (GN.1)-(GN.5), and
each channel has its own gain and shift (GN.6). Nothing is shared along T, so the op is
causal: a token's output depends on that token alone. ``G = 1`` is LayerNorm over the channels
(GN.11); ``G = C`` normalises every channel by itself (each output is its shift, GN.12).

This is ``torch.nn.functional.group_norm`` applied to the rows as samples of C channels and
no spatial extent: ``group_norm(x.reshape(-1, C), G, gamma, beta, eps)``.

Floating point: each group is normalised by ``layernorm_forward`` with unit gain and zero
shift, so the care of ``proofs/layernorm.md`` (centring on an entry of the group, (LN.12);
rescaling groups whose squares overflow, (LN.13)) carries over unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import _fail, check_cache_type, check_count, check_real, check_rows, check_same_dtype_as, check_shape
from .layernorm import layernorm_forward, row_mean

OP = "groupnorm"


class GroupNormCache(NamedTuple):
    xhat: np.ndarray  # (..., G, C_g)  normalised input, (GN.5)
    rstd: np.ndarray  # (..., G, 1)    reciprocal standard deviation r_g of each group, (GN.4)
    gamma: np.ndarray  # (C,)          per-channel gain, needed by (GN.9)


def check_num_groups(op: str, num_groups: object, C: int) -> int:
    """G: an integer in [1, C] that divides the channel count C."""
    G = check_count(op, "num_groups", num_groups, 1)
    if C % G:
        _fail(op, "num_groups", f"a divisor of the channel count C = {C}", G)
    return G


def groupnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, num_groups: int,
                      eps: float = 1e-5) -> Tuple[np.ndarray, GroupNormCache]:
    """y = gamma * (x - mu_g) / sqrt(var_g + eps) + beta, the statistics per group of C / G channels.

    x: (..., C), gamma: (C,), beta: (C,), num_groups G dividing C, eps >= 0  ->  y: (..., C)
    """
    op = f"{OP}_forward"
    C = check_rows(op, "x", x)
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_same_dtype_as(op, name, p, x.dtype, "x")
        check_shape(op, name, p, (C,))
    G = check_num_groups(op, num_groups, C)
    eps = check_real(op, "eps", eps, lo=0.0)

    xg = x.reshape(*x.shape[:-1], G, C // G)  # (..., G, C_g): group g holds channels g C_g .. (GN.1)
    one, zero = np.ones(C // G, x.dtype), np.zeros(C // G, x.dtype)
    xhat, ln = layernorm_forward(xg, one, zero, eps)  # (GN.2), (GN.3), (GN.4), (GN.5): LayerNorm of each group
    y = xhat.reshape(x.shape) * gamma
    y += beta  # (GN.6)  per-channel affine
    return y, GroupNormCache(xhat=xhat, rstd=ln.rstd, gamma=gamma)


def groupnorm_backward(dy: np.ndarray, cache: GroupNormCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a scalar loss with respect to x, gamma and beta.

    dy: (..., C)  ->  dx: (..., C), dgamma: (C,), dbeta: (C,)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, GroupNormCache)
    xhat, rstd, gamma = cache
    shape = xhat.shape[:-2] + (xhat.shape[-2] * xhat.shape[-1],)  # (..., C)
    check_same_dtype_as(op, "dy", dy, xhat.dtype, "x")
    check_shape(op, "dy", dy, shape)
    rows = tuple(range(dy.ndim - 1))
    xhat_c = xhat.reshape(shape)  # (..., C)

    dbeta = dy.sum(axis=rows)  # (GN.7)
    dgamma = (dy * xhat_c).sum(axis=rows)  # (GN.8)
    dxhat = (dy * gamma).reshape(xhat.shape)  # (GN.9), grouped (..., G, C_g)
    # (GN.10): dx = r_g (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), each group on its own, built over
    # dxhat term by term as layer norm's (LN.10)
    mean_dxhat = dxhat.mean(axis=-1, keepdims=True)  # (..., G, 1)
    scratch = np.empty_like(dxhat)
    mean_dxhat_xhat = row_mean(dxhat, xhat, scratch)  # (..., G, 1)
    dx = dxhat
    dx -= mean_dxhat
    dx -= np.multiply(xhat, mean_dxhat_xhat, out=scratch)
    dx *= rstd
    return dx.reshape(shape), dgamma, dbeta


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck groupnorm``."""
    from ..gradcheck import Case

    C = 6
    for G in (1, 2, 3):
        inputs = {"x": rng.standard_normal((2, 3, C)), "gamma": rng.standard_normal(C),
                  "beta": rng.standard_normal(C)}
        yield Case(f"groupnorm[G={G}]", groupnorm_forward, groupnorm_backward, inputs, wrt=("x", "gamma", "beta"),
                   options={"num_groups": G})
