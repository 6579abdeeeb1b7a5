"""ALiBi: attention with linear biases (no parameters, no backward of its own).

Derivation: ``proofs/alibi.md``. Head ``h`` adds ``-m_h * distance`` to every
attention score, where ``m_h`` is a fixed per-head slope (ALIBI.1, ALIBI.2) and the
distance is between the query's and the key's absolute positions (ALIBI.3). The
result is passed as the ``bias`` of ``npformer.ops.attention.attention_forward``::

    bias = alibi_bias(H, Tq, Tk, dtype=q.dtype)            # (1, H, Tq, Tk)
    out, cache = attention_forward(q, k, v, causal=True, bias=bias)
    dq, dk, dv, _ = attention_backward(dout, cache)       # dbias is discarded

The bias depends on no input and no parameter, so gradients reach q, k and v
through the attention backward unchanged and the returned ``dbias`` is dropped
(ALIBI.5).
"""

from __future__ import annotations

import numpy as np

from ._checks import MAX_POSITION, check_count, check_dtype_option, check_fits

OP = "alibi"


def _geometric_slopes(n: int) -> np.ndarray:
    """The slopes for a power-of-two head count n: 2^(-8h/n), h = 1..n (ALIBI.1)."""
    return 2.0 ** (-8.0 * np.arange(1, n + 1, dtype=np.float64) / n)


def alibi_slopes(n_head: int) -> np.ndarray:
    """Per-head slopes m_h of the ALiBi paper, float64.

    n_head = H  ->  (H,)
    """
    H = check_count("alibi_slopes", "n_head", n_head, 1, MAX_POSITION)
    check_fits("alibi_slopes", "n_head", (2 * H,), 8)  # the float64 slopes of up to 2H heads, (ALIBI.2)
    closest = 1 << (H.bit_length() - 1)  # 2^k <= H < 2^(k+1)
    slopes = _geometric_slopes(closest)  # (ALIBI.1)
    if closest == H:
        return slopes
    extra = _geometric_slopes(2 * closest)[0::2][: H - closest]  # (ALIBI.2)
    return np.concatenate([slopes, extra])


def alibi_bias(n_head: int, Tq: int, Tk: int, *, dtype=np.float32) -> np.ndarray:
    """Additive attention bias b[0, h, i, j] = -m_h * |(i + Tk - Tq) - j|.

    Query i sits at absolute position i + Tk - Tq (queries aligned to the end of the
    keys, as with a key/value cache); key j at position j.

    n_head = H  ->  (1, H, Tq, Tk) in ``dtype`` (empty when Tq or Tk is 0)

    Sizes are at most 2**53 - 1 (positions exact in float64), and a bias that would not
    fit in memory (it is formed in float64) is refused before any work, by name.
    """
    op = "alibi_bias"
    H = check_count(op, "n_head", n_head, 1, MAX_POSITION)
    Tq = check_count(op, "Tq", Tq, 0, MAX_POSITION)
    Tk = check_count(op, "Tk", Tk, 0, MAX_POSITION)
    dtype = check_dtype_option(op, "dtype", dtype)
    largest = max((("n_head", H), ("Tq", Tq), ("Tk", Tk)), key=lambda named: named[1])[0]
    check_fits(op, largest, (H + 2, Tq, Tk), 8)  # the int64 distances, the float64 bias and its cast
    if Tq == 0 or Tk == 0:
        return np.zeros((1, H, Tq, Tk), dtype)  # no positions to form (the other length may be huge)
    slopes = alibi_slopes(H)  # (H,)
    query_pos = np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, 1)
    key_pos = np.arange(Tk)[None, :]  # (1, Tk)
    distance = np.abs(query_pos - key_pos)  # (Tq, Tk)
    bias = -slopes[:, None, None] * distance  # (ALIBI.3)  (H, Tq, Tk), float64
    return bias.astype(dtype)[None]
