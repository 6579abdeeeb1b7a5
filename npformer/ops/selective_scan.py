"""The selective state-space scan of Mamba: forward, hand-derived backward (a reverse scan), parallel scan.

Derivation: ``proofs/mamba.md``. Shapes, in the proof's letters: B batch, L sequence length,
D channels, N state size.

    x: (B, L, D)      the input sequence (one scalar signal per channel)
    delta: (B, L, D)  the step Delta > 0 of every position and channel (softplus of a projection)
    A: (D, N)         the continuous-time decay of every state (negative: -exp(A_log))
    Bm: (B, L, N)     the input matrix of every position (``B`` in the paper, shared by all channels)
    C: (B, L, N)      the output matrix of every position
    D: (D,)           the skip connection of every channel
    h0: (B, D, N)     the state before the first position (None: zero)

    Abar_t = exp(Delta_t A)                        (MAMBA.1)   zero-order hold for A
    u_t    = Delta_t B_t x_t                       (MAMBA.2)   Euler step for B (Mamba's approximation)
    h_t    = Abar_t * h_(t-1) + u_t                (MAMBA.3)
    y_t    = C_t . h_t + D x_t                     (MAMBA.4)

The exact zero-order hold of the input would be (Delta A)^-1 (exp(Delta A) - 1) Delta B x;
like Mamba, this op takes its first-order term Delta B x (the two agree to O(Delta^2 A)).

``selective_scan_forward`` runs (MAMBA.3) as a sequential loop over L, vectorised over B, D
and N; ``selective_scan_backward`` runs the adjoint state backwards over L (MAMBA.5).
``selective_scan_parallel`` computes the same states with the associative operator of
(MAMBA.13) in ceil(log2 L) Hillis-Steele steps and returns the same cache, so the one
backward serves both. Every state h is kept for the backward: B L D N numbers.

Delta > 0 and A < 0 are the caller's responsibility and are not checked (the hot path stays a plain
loop): Mamba's mixer produces them by construction, Delta = softplus(...) and A = -exp(A_log), so that
every Abar = exp(Delta A) lies in (0, 1) and the recurrence is stable. The ops compute the same formulas
for any finite values; with Delta <= 0 or A >= 0 the states may grow without bound and the result is not
a Mamba layer's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    check_cache_type,
    check_float,
    check_like,
    check_ndim,
    check_same_dtype_as,
    check_shape,
)

OP = "selective_scan"


class SelectiveScanCache(NamedTuple):
    x: np.ndarray  # (B, L, D)     input, needed by (MAMBA.7) and (MAMBA.9)
    delta: np.ndarray  # (B, L, D)  step, needed by (MAMBA.9) and (MAMBA.10)
    A: np.ndarray  # (D, N)        decay, needed by (MAMBA.10)
    Bm: np.ndarray  # (B, L, N)    input matrix, needed by (MAMBA.9)
    C: np.ndarray  # (B, L, N)     output matrix, needed by (MAMBA.5)
    D: np.ndarray  # (D,)          skip, needed by (MAMBA.7)
    Abar: np.ndarray  # (B, L, D, N)  exp(Delta A), (MAMBA.1)
    h: np.ndarray  # (B, L, D, N)  every state h_1 ... h_L, (MAMBA.3); h[:, -1] is the final state
    h0: Optional[np.ndarray]  # (B, D, N) the state before the first position, or None (zero)


def _check_inputs(op, x, delta, A, Bm, C, D, h0) -> Tuple[int, int, int, int]:
    check_float(op, "x", x)
    check_ndim(op, "x", x, 3)
    Bsz, L, Dch = x.shape
    check_same_dtype_as(op, "delta", delta, x.dtype, "x")
    check_shape(op, "delta", delta, x.shape)
    check_same_dtype_as(op, "A", A, x.dtype, "x")
    check_shape(op, "A", A, (Dch, None))
    N = A.shape[1]
    check_same_dtype_as(op, "Bm", Bm, x.dtype, "x")
    check_shape(op, "Bm", Bm, (Bsz, L, N))
    check_same_dtype_as(op, "C", C, x.dtype, "x")
    check_shape(op, "C", C, (Bsz, L, N))
    check_same_dtype_as(op, "D", D, x.dtype, "x")
    check_shape(op, "D", D, (Dch,))
    if h0 is not None:
        check_same_dtype_as(op, "h0", h0, x.dtype, "x")
        check_shape(op, "h0", h0, (Bsz, Dch, N))
    return Bsz, L, Dch, N


def _discretise(x, delta, A, Bm) -> Tuple[np.ndarray, np.ndarray]:
    """Abar (MAMBA.1) and u (MAMBA.2), both (B, L, D, N)."""
    Abar = np.exp(delta[..., None] * A)  # (MAMBA.1)
    u = (delta * x)[..., None] * Bm[:, :, None, :]  # (MAMBA.2)
    return Abar, u


def _readout(h, C, D, x) -> np.ndarray:
    """y_t = C_t . h_t + D x_t (MAMBA.4): (B, L, D, N) @ (B, L, N, 1) -> (B, L, D)."""
    return (h @ C[..., None])[..., 0] + x * D  # (MAMBA.4)


def selective_scan_forward(x: np.ndarray, delta: np.ndarray, A: np.ndarray, Bm: np.ndarray, C: np.ndarray,
                           D: np.ndarray, h0: Optional[np.ndarray] = None) -> Tuple[np.ndarray, SelectiveScanCache]:
    """y of (MAMBA.4) from the sequential recurrence (MAMBA.3).

    x, delta: (B, L, D), A: (D, N), Bm, C: (B, L, N), D: (D,), h0: (B, D, N) or None  ->  y: (B, L, D)
    delta > 0 and A < 0 are the caller's to ensure (see the module docstring); they are not checked.
    """
    op = f"{OP}_forward"
    Bsz, L, Dch, N = _check_inputs(op, x, delta, A, Bm, C, D, h0)
    Abar, u = _discretise(x, delta, A, Bm)
    h = np.empty_like(Abar)
    prev = np.zeros((Bsz, Dch, N), x.dtype) if h0 is None else h0
    for t in range(L):
        prev = h[:, t] = Abar[:, t] * prev + u[:, t]  # (MAMBA.3)
    y = _readout(h, C, D, x)  # (MAMBA.4)
    return y, SelectiveScanCache(x=x, delta=delta, A=A, Bm=Bm, C=C, D=D, Abar=Abar, h=h, h0=h0)


def selective_scan_parallel(x: np.ndarray, delta: np.ndarray, A: np.ndarray, Bm: np.ndarray, C: np.ndarray,
                            D: np.ndarray, h0: Optional[np.ndarray] = None) -> Tuple[np.ndarray, SelectiveScanCache]:
    """``selective_scan_forward`` with the states from an inclusive scan under (MAMBA.13).

    Hillis-Steele: after the step of offset s (1, 2, 4, ...), element t holds the composite
    (a, b) of elements t - 2s + 1 ... t; ceil(log2 L) steps, each one vectorised over all t
    (MAMBA.15). The result equals the sequential one up to rounding (the products are
    associated differently). Same arguments, same output, same cache.
    """
    op = "selective_scan_parallel"
    Bsz, L, Dch, N = _check_inputs(op, x, delta, A, Bm, C, D, h0)
    Abar, u = _discretise(x, delta, A, Bm)
    a, b = Abar.copy(), u.copy()
    if h0 is not None:
        b[:, :1] += Abar[:, :1] * h0[:, None]  # h0 folded into the first element: (1, h0) o (Abar_1, u_1), (MAMBA.13)
    s = 1
    while s < L:
        # element t <- (a_(t-s), b_(t-s)) o (a_t, b_t) = (a_(t-s) a_t, a_t b_(t-s) + b_t), (MAMBA.13)
        b_new = b.copy()
        b_new[:, s:] += a[:, s:] * b[:, :-s]
        a_new = a.copy()
        a_new[:, s:] *= a[:, :-s]
        a, b = a_new, b_new
        s *= 2
    h = b  # (MAMBA.14): the b of the prefix composite is h_t
    y = _readout(h, C, D, x)  # (MAMBA.4)
    return y, SelectiveScanCache(x=x, delta=delta, A=A, Bm=Bm, C=C, D=D, Abar=Abar, h=h, h0=h0)


def _adjoint_state(dy: np.ndarray, C: np.ndarray, Abar: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """g_t = dL/dh_t of (MAMBA.5), a scan from t = L down to 1, and Abar_1 g_1 (what h_0 receives).

    dy: (B, L, D), C: (B, L, N), Abar: (B, L, D, N)  ->  g: (B, L, D, N), Abar_1 g_1: (B, D, N)
    """
    Bsz, L, Dch, N = Abar.shape
    g = np.empty_like(Abar)
    carry = np.zeros((Bsz, Dch, N), Abar.dtype)  # Abar_(t+1) g_(t+1); zero after the last position
    for t in range(L - 1, -1, -1):
        carry = g[:, t] = dy[:, t, :, None] * C[:, t, None, :] + carry  # (MAMBA.5)
        carry = Abar[:, t] * carry  # (MAMBA.5)  what h_(t-1) receives through h_t
    return g, carry


def selective_scan_backward(dy: np.ndarray, cache: SelectiveScanCache):
    """Gradients with respect to x, delta, A, Bm, C, D and h0 (None when the forward had no h0).

    dy: (B, L, D)  ->  dx, ddelta: (B, L, D), dA: (D, N), dBm, dC: (B, L, N), dD: (D,), dh0: (B, D, N) or None
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, SelectiveScanCache)
    x, delta, A, Bm, C, D, Abar, h, h0 = cache
    check_like(op, "dy", dy, x)

    dD = (dy * x).sum(axis=(0, 1))  # (MAMBA.7)
    dx = dy * D  # (MAMBA.7)  the skip path
    dC = (dy[:, :, None, :] @ h)[:, :, 0, :]  # (MAMBA.6)  sum over d of dy_(t,d) h_(t,d,n)

    g, carry = _adjoint_state(dy, C, Abar)  # (MAMBA.5)
    dh0 = None if h0 is None else carry  # (MAMBA.11)

    h_prev = np.empty_like(h)  # h_(t-1): h0 (or 0), h_1, ..., h_(L-1)
    h_prev[:, :1] = 0 if h0 is None else h0[:, None]
    h_prev[:, 1:] = h[:, :-1]
    dAbar = g * h_prev  # (MAMBA.8)
    ds = dAbar * Abar  # (MAMBA.10)  the gradient of s = Delta A, since dAbar/ds = Abar
    ddelta = (ds * A).sum(axis=-1)  # (MAMBA.10)  sum over n of ds A
    dA = np.einsum("bldn,bld->dn", ds, delta)  # (MAMBA.10)  sum over b, t of ds Delta

    gB = (g @ Bm[..., None])[..., 0]  # (B, L, D): sum over n of g_(t,d,n) B_(t,n), (MAMBA.9)
    ddelta += gB * x  # (MAMBA.9)
    dx += gB * delta  # (MAMBA.9)
    dBm = ((delta * x)[:, :, None, :] @ g)[:, :, 0, :]  # (MAMBA.9)  sum over d of g Delta x
    return dx, ddelta, dA, dBm, dC, dD, dh0


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck selective_scan``."""
    from ..gradcheck import Case

    Bsz, L, Dch, N = 2, 4, 3, 2
    inputs = {"x": rng.standard_normal((Bsz, L, Dch)), "delta": rng.uniform(0.1, 1.0, (Bsz, L, Dch)),
              "A": -rng.uniform(0.5, 2.0, (Dch, N)), "Bm": rng.standard_normal((Bsz, L, N)),
              "C": rng.standard_normal((Bsz, L, N)), "D": rng.standard_normal(Dch),
              "h0": rng.standard_normal((Bsz, Dch, N))}
    wrt = ("x", "delta", "A", "Bm", "C", "D", "h0")
    yield Case("selective_scan", selective_scan_forward, selective_scan_backward, inputs, wrt=wrt)
    yield Case("selective_scan (parallel)", selective_scan_parallel, selective_scan_backward, inputs, wrt=wrt)
