"""Linear attention with the feature map phi(x) = elu(x) + 1: forward and hand-derived backward.

Derivation: ``proofs/linear_attention.md``. Shapes (the proof's letters):

    q, k: (B, H, T, D)    v: (B, H, T, Dv)    out: (B, H, T, Dv)

Softmax attention's exp(q . k) is replaced by the kernel phi(q) . phi(k), which lets
the sum over keys be taken once (S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j)) instead
of once per query: cost O(T D Dv) instead of O(T^2 D). The causal variant keeps the
prefix sums S_i, z_i of every position (cumulative sums along T), which costs
O(T D Dv) memory per head; fine for the small sizes this engine trains.

``eps`` must be a finite number > 0 and the feature and value sizes D, Dv at least 1;
T = 0 gives an empty output. Inputs may be any views; results are C-contiguous.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import _fail, check_bool, check_cache_type, check_float, check_ndim, check_real, check_same_dtype

OP = "linear_attention"


class LinearAttentionCache(NamedTuple):
    q_feat: np.ndarray  # (B, H, T, D)   phi(q), (LINATT.1); phi'(q) = min(phi(q), 1), (LINATT.2)
    k_feat: np.ndarray  # (B, H, T, D)   phi(k)
    v: np.ndarray  # (B, H, T, Dv)
    S: np.ndarray  # (B, H, D, Dv), or (B, H, T, D, Dv) prefix sums when causal
    z: np.ndarray  # (B, H, D), or (B, H, T, D) prefix sums when causal
    den: np.ndarray  # (B, H, T, 1)   phi(q_i) . z (+ eps)
    out: np.ndarray  # (B, H, T, Dv)  the output, the cache's own copy (not the returned array)
    causal: bool


def elu_plus_one(x: np.ndarray) -> np.ndarray:
    """phi(x) = x + 1 for x > 0, exp(x) otherwise; always > 0.  (LINATT.1)"""
    check_float("elu_plus_one", "x", x)
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def _reverse_cumsum(x: np.ndarray, axis: int) -> np.ndarray:
    """y[t] = sum_{i >= t} x[i] along ``axis``."""
    return np.flip(np.cumsum(np.flip(x, axis), axis), axis)


def linear_attention_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False, eps: float = 1e-6
) -> Tuple[np.ndarray, LinearAttentionCache]:
    """out_i = phi(q_i)^T S / (phi(q_i)^T z + eps), over all keys or (causal) keys j <= i.

    q, k: (B, H, T, D), v: (B, H, T, Dv)  ->  out: (B, H, T, Dv)
    """
    op = f"{OP}_forward"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, x)
        check_ndim(op, name, x, 4)
    B, H, T, D = q.shape
    if D == 0:
        _fail(op, "q", "a feature size D >= 1 (last axis)", f"shape {tuple(q.shape)}")
    check_same_dtype(op, "q", q, k=k, v=v)
    if k.shape != q.shape:
        _fail(op, "k", f"shape {tuple(q.shape)} (same as 'q')", tuple(k.shape))
    if v.shape[:3] != (B, H, T) or v.shape[3] == 0:
        _fail(op, "v", f"shape ({B}, {H}, {T}, Dv) with Dv >= 1 (batch, heads and length of 'q')", tuple(v.shape))
    causal = check_bool(op, "causal", causal)
    eps = check_real(op, "eps", eps, lo=0.0, lo_open=True)

    # C-contiguous copies of non-contiguous inputs: every result below is then C-contiguous too
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    q_feat = elu_plus_one(q)  # (LINATT.1)
    k_feat = elu_plus_one(k)
    if causal:
        # (LINATT.4)  S_i = S_{i-1} + phi(k_i) v_i^T, z_i = z_{i-1} + phi(k_i), as prefix sums over T
        S = np.cumsum(k_feat[..., :, None] * v[..., None, :], axis=2)  # (B, H, T, D, Dv)
        z = np.cumsum(k_feat, axis=2)  # (B, H, T, D)
        num = np.matmul(q_feat[..., None, :], S)[..., 0, :]  # (B, H, T, Dv)
        den = np.sum(q_feat * z, axis=-1, keepdims=True) + eps  # (B, H, T, 1)
    else:
        # (LINATT.3)  one S and z for every query
        S = np.matmul(k_feat.swapaxes(-1, -2), v)  # (B, H, D, Dv)
        z = k_feat.sum(axis=2)  # (B, H, D)
        num = np.matmul(q_feat, S)  # (B, H, T, Dv)
        den = np.matmul(q_feat, z[..., None]) + eps  # (B, H, T, 1)
    out = num / den  # (LINATT.3) / (LINATT.4)
    out_kept = out.copy()  # the backward reads o: the cache's own copy, so a caller writing to out changes nothing
    cache = LinearAttentionCache(q_feat=q_feat, k_feat=k_feat, v=v, S=S, z=z, den=den, out=out_kept,
                                 causal=bool(causal))
    return out, cache


def linear_attention_backward(
    dout: np.ndarray, cache: LinearAttentionCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of a scalar loss with respect to q, k and v.

    dout: (B, H, T, Dv)  ->  dq, dk: (B, H, T, D), dv: (B, H, T, Dv)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, LinearAttentionCache)
    q_feat, k_feat, v, S, z, den, out, causal = cache
    check_float(op, "dout", dout)
    if dout.shape != out.shape:
        _fail(op, "dout", f"shape {tuple(out.shape)} (that of the forward's output)", tuple(dout.shape))
    if dout.dtype != out.dtype:
        _fail(op, "dout", f"dtype {out.dtype} (that of the forward's output)", dout.dtype)
    dout = np.ascontiguousarray(dout)  # C-contiguous results, whatever the layout of dout

    # (LINATT.5)  through the quotient out = num / den
    dnum = dout / den  # (B, H, T, Dv)
    dden = -np.sum(dout * out, axis=-1, keepdims=True) / den  # (B, H, T, 1)

    if causal:
        dq_feat = np.matmul(S, dnum[..., :, None])[..., 0] + dden * z  # (LINATT.6)  (B, H, T, D)
        # (LINATT.7)  reverse-time recurrence G_j = G_{j+1} + phi(q_j) dnum_j^T, g_j = g_{j+1} + dden_j phi(q_j)
        G = _reverse_cumsum(q_feat[..., :, None] * dnum[..., None, :], axis=2)  # (B, H, T, D, Dv)
        g = _reverse_cumsum(dden * q_feat, axis=2)  # (B, H, T, D)
        dk_feat = np.matmul(G, v[..., :, None])[..., 0] + g  # (LINATT.8)  (B, H, T, D)
        dv = np.matmul(k_feat[..., None, :], G)[..., 0, :]  # (LINATT.8)  (B, H, T, Dv)
    else:
        dq_feat = np.matmul(dnum, S.swapaxes(-1, -2)) + dden * z[..., None, :]  # (LINATT.6)
        dS = np.matmul(q_feat.swapaxes(-1, -2), dnum)  # (LINATT.7)  (B, H, D, Dv), the same for every j
        dz = np.sum(dden * q_feat, axis=2)  # (LINATT.7)  (B, H, D)
        dk_feat = np.matmul(v, dS.swapaxes(-1, -2)) + dz[..., None, :]  # (LINATT.8)
        dv = np.matmul(k_feat, dS)  # (LINATT.8)

    # (LINATT.9)  through the feature map, phi'(x) = min(phi(x), 1) by (LINATT.2)
    dq = dq_feat * np.minimum(q_feat, 1)
    dk = dk_feat * np.minimum(k_feat, 1)
    return dq, dk, dv


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck linear_attention`` (D != Dv, both variants)."""
    from ..gradcheck import Case

    inputs = {"q": rng.standard_normal((2, 2, 5, 3)), "k": rng.standard_normal((2, 2, 5, 3)),
              "v": rng.standard_normal((2, 2, 5, 4))}
    yield Case("linear_attention", linear_attention_forward, linear_attention_backward, inputs, wrt=("q", "k", "v"))
    yield Case("linear_attention causal", linear_attention_forward, linear_attention_backward, inputs,
               wrt=("q", "k", "v"), options={"causal": True})
