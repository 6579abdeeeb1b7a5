"""Scaled dot-product attention: forward and hand-derived backward.

Derivation: ``proofs/attention.md``; each line of the backward cites the equation
it implements. Shapes (the proof's letters):

    q: (B, H, Tq, D)     queries, H query heads
    k, v: (B, Hkv, Tk, D) keys and values, Hkv key/value heads, Hkv divides H
    out: (B, H, Tq, D)    probs: (B, H, Tq, Tk)

Grouped-query attention (GQA; multi-query attention, MQA, is Hkv = 1): the
G = H // Hkv query heads h = c*G, ..., c*G + G - 1 share key/value head c = h // G.
Rather than repeating k and v G times, the queries are viewed as
(B, Hkv, G*Tq, D) so that each key/value head meets all of its queries in one
matrix product, and the gradients of k and v come out already summed over the
group (ATT.12).

Masks: ``causal`` lets query i see key j iff j <= i + (Tk - Tq), i.e. the last
query is aligned with the last key, as when new queries are appended to a cache
of keys. ``window=W`` (with ``causal``) is a sliding window as in Mistral: query i,
at absolute position i + (Tk - Tq), sees only its W latest keys,
i + (Tk - Tq) - W < j <= i + (Tk - Tq) (ATT.15); a window of Tk or more is the plain
causal mask. ``key_padding_mask`` (B, Tk) is True where a key is padding. A query
that sees no key at all (a fully masked row) gets output 0 and gradient 0 (ATT.11).

Empty sequences: Tq = 0 gives an empty output and an empty ``dq`` (``dk``, ``dv``
are 0). Tk = 0 leaves every query with no key to see, so by (ATT.11) every output
row is 0 and ``dq`` is 0 (``dk``, ``dv`` are empty). B may be 0; H, Hkv and D must
be at least 1.

Layout: the inputs may be any views (transposed, strided, reversed, read-only).
Outputs and working buffers are allocated C-contiguous here, so that the grouped
views ``x.reshape(B, Hkv, G * Tq, ...)`` that the products write into with ``out=``
are views of them, never copies.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_array,
    check_bool,
    check_cache_type,
    check_count,
    check_fits,
    check_float,
    check_ndim,
    check_real,
    check_same_dtype,
)

from .fastpath import blas_parallel, causal_block

OP = "attention"
SLAB_BYTES = 1 << 20  # bytes of scores per slab of batch elements in the forward: about a core's L2 cache


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, Tq, D)
    k: np.ndarray  # (B, Hkv, Tk, D)
    v: np.ndarray  # (B, Hkv, Tk, D)
    probs: np.ndarray  # (B, H, Tq, Tk)  P of (ATT.2), C-contiguous; 0 at masked entries
    scale: float  # c_s, the factor on Q K^T in (ATT.1)
    bias_shape: Optional[Tuple[int, ...]]  # shape of the additive bias, None if there was none
    causal: bool = False  # the causal mask was on: the backward skips the same hidden keys (ATT.19)
    window: Optional[int] = None  # its sliding window (ATT.15), if any


def check_qkv(op: str, q: object, k: object, v: object) -> Tuple[int, int, int, int, int, int]:
    """Validate q (B, H, Tq, D), k, v (B, Hkv, Tk, D); return (B, H, Hkv, Tq, Tk, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, x)
        check_ndim(op, name, x, 4)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if D == 0 or H == 0:
        _fail(op, "q", "at least one head (axis 1) of size D >= 1 (axis 3)", f"shape {tuple(q.shape)}")
    check_same_dtype(op, "q", q, k=k, v=v)
    if k.shape[0] != B or k.shape[3] != D:
        _fail(op, "k", f"shape ({B}, *, *, {D}) (batch and head size of 'q')", tuple(k.shape))
    if Hkv == 0 or H % Hkv != 0:
        _fail(op, "k", f"a number of heads dividing the H = {H} heads of 'q'", f"{Hkv} (shape {tuple(k.shape)})")
    if v.shape != k.shape:
        _fail(op, "v", f"shape {tuple(k.shape)} (same as 'k')", tuple(v.shape))
    return B, H, Hkv, Tq, Tk, D


def check_scale(op: str, scale: object, D: int) -> float:
    """``scale=None`` means 1/sqrt(D) (ATT.13); otherwise a finite number > 0."""
    if scale is None:
        return 1.0 / float(np.sqrt(D))  # (ATT.13)
    return check_real(op, "scale", scale, lo=0.0, lo_open=True)


def check_dout(op: str, dout: object, q: np.ndarray, k: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    """dout must be a float array of the cached q's shape and dtype; return (B, H, Hkv, Tq, Tk, D)."""
    check_float(op, "dout", dout)
    if dout.shape != q.shape:
        _fail(op, "dout", f"shape {tuple(q.shape)} (that of the forward's output)", tuple(dout.shape))
    if dout.dtype != q.dtype:
        _fail(op, "dout", f"dtype {q.dtype} (that of the forward's 'q')", dout.dtype)
    B, H, Tq, D = q.shape
    return B, H, k.shape[1], Tq, k.shape[2], D


def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """(Tq, Tk) bool, True where key j is *hidden* from query i: j > i + (Tk - Tq).

    Lengths are at most 2**53 - 1, and a mask that would not fit in memory is refused by name.
    """
    Tq = check_count("causal_mask", "Tq", Tq, 0, MAX_POSITION)
    Tk = check_count("causal_mask", "Tk", Tk, 0, MAX_POSITION)
    check_fits("causal_mask", "Tq" if Tq >= Tk else "Tk", (Tq, Tk), 1)
    if Tq == 0 or Tk == 0:
        return np.zeros((Tq, Tk), bool)  # no pairs (the other length may be huge)
    i = np.arange(Tq)[:, None]
    j = np.arange(Tk)[None, :]
    return j > i + (Tk - Tq)


def sliding_window_mask(Tq: int, Tk: int, window: int) -> np.ndarray:
    """(Tq, Tk) bool, True where key j is *hidden* from query i under a causal sliding window
    of W = ``window`` keys: visible iff i + (Tk - Tq) - W < j <= i + (Tk - Tq)  (ATT.15).

    Lengths are at most 2**53 - 1, W an integer >= 1, and a mask that would not fit in memory
    is refused by name. W >= Tk hides nothing beyond ``causal_mask(Tq, Tk)``.
    """
    op = "sliding_window_mask"
    Tq = check_count(op, "Tq", Tq, 0, MAX_POSITION)
    Tk = check_count(op, "Tk", Tk, 0, MAX_POSITION)
    W = check_count(op, "window", window, 1, MAX_POSITION)
    check_fits(op, "Tq" if Tq >= Tk else "Tk", (Tq, Tk), 1)
    if Tq == 0 or Tk == 0:
        return np.zeros((Tq, Tk), bool)  # no pairs (the other length may be huge)
    position = np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, 1)  absolute position of query i
    j = np.arange(Tk)[None, :]  # (1, Tk)
    return (j > position) | (j <= position - W)  # (ATT.15): the complement of the window


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    key_padding_mask: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    window: Optional[int] = None,
) -> Tuple[np.ndarray, AttentionCache]:
    """out = softmax(scale * q k^T + bias, masked) v, per head.

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D), key_padding_mask: bool (B, Tk),
    bias: 4-D, each dimension 1 or the matching one of (B, H, Tq, Tk),
    window: W >= 1 keys per query, causal only (ATT.15)
    ->  out: (B, H, Tq, D)
    """
    op = f"{OP}_forward"
    B, H, Hkv, Tq, Tk, D = check_qkv(op, q, k, v)
    causal = check_bool(op, "causal", causal)
    if window is not None:
        window = check_count(op, "window", window, 1, MAX_POSITION)
        if not causal:
            _fail(op, "window", "None unless causal=True (a sliding window is causal)", window)
    if key_padding_mask is not None:
        check_array(op, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != np.bool_:
            _fail(op, "key_padding_mask", "dtype bool (True where a key is padding)", key_padding_mask.dtype)
        if key_padding_mask.shape != (B, Tk):
            _fail(op, "key_padding_mask", f"shape ({B}, {Tk}) (batch of 'q', keys of 'k')",
                  tuple(key_padding_mask.shape))
    if bias is not None:
        check_float(op, "bias", bias)
        check_same_dtype(op, "q", q, bias=bias)
        full = (B, H, Tq, Tk)
        if bias.ndim != 4 or any(b not in (1, f) for b, f in zip(bias.shape, full)):
            _fail(op, "bias", f"4-D shape with each dimension 1 or equal to {full}", tuple(bias.shape))
    scale = check_scale(op, scale, D)
    G = H // Hkv
    if not causal:
        hidden = None
    elif window is None or window >= Tk:  # a window of every key is the causal mask
        hidden = causal_mask(Tq, Tk)  # (Tq, Tk), True = masked
    else:
        hidden = sliding_window_mask(Tq, Tk, window)  # (ATT.15)

    # c_s Q, scaled once: Q is T/D times smaller than S. Every query-side array is viewed as
    # (B, Hkv, G, Tq, .): the G query heads that share key/value head c side by side (ATT.12).
    q4 = np.multiply(q, q.dtype.type(scale), order="C").reshape(B, Hkv, G, Tq, D)
    p = np.empty((B, H, Tq, Tk), q.dtype)  # P (ATT.2)
    out = np.empty((B, H, Tq, D), q.dtype)  # O (ATT.3)
    p4, out4 = p.reshape(B, Hkv, G, Tq, Tk), out.reshape(B, Hkv, G, Tq, D)  # views
    blocks = query_blocks(Tq, Tk, causal, window)
    # A few batch elements at a time (``slab``), and within them one block of query rows at a time:
    # the block's (e, H, rows, keys) slab of scores stays in cache through the several passes of
    # the softmax, and each NumPy call does enough work to be worth its fixed cost.
    def batch_elements(batch: slice) -> None:
        for els in _slabs(batch, blocks, H, Tk, q.itemsize):
            for i0, i1, lo, hi in blocks:
                rows, whole = slice(i0, i1), i1 - i0 == Tq
                p_blk = p4[els, :, :, rows]  # (e, Hkv, G, n, Tk)
                p_blk[..., :lo] = 0.0  # keys hidden from every row of the block: P = 0 (ATT.11), (ATT.19)
                p_blk[..., hi:] = 0.0
                if hi == lo:  # no row of the block sees a key: output 0 (ATT.11)
                    out4[els, :, :, rows] = 0.0
                    continue
                s = p_blk[..., lo:hi]  # S (ATT.1) of the visible keys, computed in P's own buffer
                np.matmul(_rows(q4[els], rows, whole), k[els, :, None, lo:hi].swapaxes(-1, -2),
                          out=_rows(p4[els, ..., lo:hi], rows, whole))  # (ATT.1)
                if bias is not None:
                    s += _bias_block(bias, els, Hkv, G, rows, lo, hi)  # (ATT.1)

                # masked entries are -inf: exp(-inf) = 0 exactly, and no gradient flows (ATT.1), (ATT.11)
                if hidden is not None:  # keys before c0 are seen by every row of the block: no mask to apply there
                    c0 = lo if window is not None else min(max(i0 + (Tk - Tq) + 1, lo), hi)
                    np.copyto(s[..., c0 - lo:], -np.inf, where=hidden[rows, c0:hi])
                if key_padding_mask is not None:
                    np.copyto(s, -np.inf, where=key_padding_mask[els, None, None, None, lo:hi])

                # (ATT.2)  P = softmax(S) along keys, stabilised by the row maximum m; S - m and
                # exp(S - m) are unnamed steps in P's own buffer
                m = np.fmax.reduce(s, axis=-1, keepdims=True, initial=-np.inf)  # fmax: no NaN bookkeeping
                m[m == -np.inf] = 0.0  # a fully masked row: exp(-inf - 0) = 0 instead of nan
                s -= m
                np.exp(s, out=s)
                row_sum = s.sum(axis=-1, keepdims=True)
                row_sum[row_sum == 0] = 1.0  # a fully masked row stays all zeros: output 0 (ATT.11)
                s /= row_sum

                np.matmul(_rows(p4[els, ..., lo:hi], rows, whole), v[els, :, None, lo:hi],
                          out=_rows(out4[els], rows, whole))  # (ATT.3)  O = P V over the visible keys (ATT.19)

    blas_parallel(batch_elements, B, H * Tq * max(Tk, 1))  # batch elements on several cores
    cache = AttentionCache(q=q, k=k, v=v, probs=p, scale=scale, bias_shape=None if bias is None else tuple(bias.shape),
                           causal=causal, window=window)
    return out, cache


def query_blocks(Tq: int, Tk: int, causal: bool, window: Optional[int]) -> List[Tuple[int, int, int, int]]:
    """Blocks (i0, i1, lo, hi) of query rows [i0, i1) with the keys [lo, hi) that some row of the block
    may see: every key outside is hidden from every row of the block (ATT.19).

    Causal attention in the fast path: blocks of ``fastpath.causal_block()`` rows, row i seeing keys
    up to i + (Tk - Tq) and, with a window W, from i + (Tk - Tq) - W + 1 (ATT.15). Otherwise (or with
    the fast path's plain form) one block: every query against every key.
    """
    size = causal_block()
    if not causal or size is None or size >= Tq:
        return [(0, Tq, 0, Tk)] if not causal else [(0, Tq, *_visible(0, Tq, Tq, Tk, window))]
    return [(i0, min(i0 + size, Tq), *_visible(i0, min(i0 + size, Tq), Tq, Tk, window)) for i0 in range(0, Tq, size)]


def _visible(i0: int, i1: int, Tq: int, Tk: int, window: Optional[int]) -> Tuple[int, int]:
    """[lo, hi): the keys rows i0 .. i1 - 1 see between them under the causal mask (and window) (ATT.19)."""
    hi = min(max(i1 + (Tk - Tq), 0), Tk)  # the last row sees j <= i1 - 1 + (Tk - Tq)
    lo = 0 if window is None else min(max(i0 + (Tk - Tq) - window + 1, 0), Tk)  # (ATT.15)
    return lo, max(lo, hi)


def _slabs(batch: slice, blocks: List[Tuple[int, int, int, int]], H: int, Tk: int, itemsize: int) -> List[slice]:
    """``batch`` cut into slabs of consecutive batch elements whose scores for one block of query rows
    (H x rows x Tk each) fill about SLAB_BYTES: at least one element per slab."""
    element_bytes = H * (blocks[0][1] - blocks[0][0]) * max(Tk, 1) * itemsize
    step = max(1, SLAB_BYTES // max(element_bytes, 1))
    return [slice(b, min(b + step, batch.stop)) for b in range(batch.start, batch.stop, step)]


def _rows(x5: np.ndarray, rows: slice, whole: bool) -> np.ndarray:
    """(e, Hkv, G, Tq, .) -> the block's rows as a stack of matrices for one product per key/value head.

    When the block holds every query and the G heads' rows follow one another at one stride, the
    group is viewed as one (e, Hkv, 1, G*Tq, .) stack (a view, never a copy: products write into it),
    so that a product over the rows sums over the group inside the BLAS call (ATT.12); otherwise
    (e, Hkv, G, n, .), summed over G afterwards (``_sum_group``).
    """
    ne, Hkv, G, Tq = x5.shape[:4]
    if whole and G > 1 and x5.strides[2] == Tq * x5.strides[3]:
        return np.lib.stride_tricks.as_strided(x5, (ne, Hkv, 1, G * Tq) + x5.shape[4:],
                                               x5.strides[:2] + (0,) + x5.strides[3:], writeable=x5.flags.writeable)
    return x5[:, :, :, rows]


def _sum_group(x: np.ndarray) -> np.ndarray:
    """(e, Hkv, G', t, D) -> (e, Hkv, t, D): the sum over the group axis (ATT.12), a view when G' = 1."""
    return x[:, :, 0] if x.shape[2] == 1 else x.sum(axis=2)


def _bias_block(bias: np.ndarray, els: slice, Hkv: int, G: int, rows: slice, lo: int, hi: int) -> np.ndarray:
    """The additive bias for the batch elements ``els``, the block's rows and keys [lo, hi), as
    (e|1, Hkv|1, G|1, n|1, t|1)."""
    bb = bias[els] if bias.shape[0] > 1 else bias  # (e|1, H|1, Tq|1, Tk|1)
    bb = bb.reshape(bb.shape[:1] + (Hkv, G) + bb.shape[2:]) if bb.shape[1] > 1 else bb[:, None]
    keys = slice(lo, hi) if bb.shape[4] > 1 else slice(None)
    return bb[:, :, :, rows if bb.shape[3] > 1 else slice(None), keys]


def attention_backward(
    dout: np.ndarray, cache: AttentionCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients of a scalar loss with respect to q, k, v and the additive bias.

    dout: (B, H, Tq, D)  ->  dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D),
    dbias: the bias's shape (None if the forward had no bias)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, AttentionCache)
    q, k, v, p, scale, bias_shape = cache[:6]
    B, H, Hkv, Tq, Tk, D = check_dout(op, dout, q, k)
    G = H // Hkv

    # c_s enters (ATT.8) and (ATT.9) on a T x D operand, c_s K and c_s Q, not on the Tq x Tk dS
    q4 = np.multiply(q, q.dtype.type(scale), order="C").reshape(B, Hkv, G, Tq, D)  # grouped as forward
    k_scaled = k * k.dtype.type(scale)
    dout4 = np.ascontiguousarray(dout).reshape(B, Hkv, G, Tq, D)
    p4 = p.reshape(B, Hkv, G, Tq, Tk)

    dq = np.empty((B, H, Tq, D), q.dtype)
    dk = np.zeros((B, Hkv, Tk, D), q.dtype)  # summed over the query blocks
    dv = np.zeros((B, Hkv, Tk, D), q.dtype)
    dq4 = dq.reshape(B, Hkv, G, Tq, D)  # a view: dq is C-contiguous
    ds_all = None if bias_shape is None else np.zeros((B, H, Tq, Tk), q.dtype)  # dS of every batch element
    ds5 = None if ds_all is None else ds_all.reshape(B, Hkv, G, Tq, Tk)
    blocks = query_blocks(Tq, Tk, cache.causal, cache.window)  # as in the forward (ATT.19)
    def batch_elements(batch: slice) -> None:  # one batch element and one block of query rows at a time
        for e in range(batch.start, batch.stop):
            els = slice(e, e + 1)  # one element, not a slab: np.einsum's row sums below then do not depend
            # on how the batch is split (with one head and 9000 keys, a slab of two gave other bits than one)
            for i0, i1, lo, hi in blocks:
                rows, whole = slice(i0, i1), i1 - i0 == Tq
                if hi == lo:  # rows that see no key: dQ = 0 (ATT.11)
                    dq4[els, :, :, rows] = 0.0
                    continue
                p_mm = _rows(p4[els, ..., lo:hi], rows, whole)  # (1, Hkv, G', n', t), P of the visible keys
                do_mm = _rows(dout4[els], rows, whole)
                # (ATT.4), summed over the query heads of each group (ATT.12) and over the query blocks
                dv[els, :, lo:hi] += _sum_group(np.matmul(p_mm.swapaxes(-1, -2), do_mm))
                dp = np.matmul(do_mm, v[els, :, None, lo:hi].swapaxes(-1, -2))  # (ATT.5)
                dp5 = dp.reshape(1, Hkv, G, i1 - i0, hi - lo)  # the block's rows by head, as P's
                p_blk = p4[els, :, :, rows, lo:hi]
                rowsum = np.einsum("bcgik,bcgik->bcgi", dp5, p_blk)[..., None]  # rowsum(dP * P) of (ATT.7)
                # (ATT.7)  dS = P * (dP - rowsum): dP - rowsum is an unnamed step in dP's own buffer
                dp5 -= rowsum
                dp5 *= p_blk  # masked entries have P = 0, so dS = 0 there (ATT.11)
                ds = dp  # dS, in the product layout
                np.matmul(ds, k_scaled[els, :, None, lo:hi], out=_rows(dq4[els], rows, whole))  # (ATT.8)
                # (ATT.9), summed over the group (ATT.12) and over the query blocks
                dk[els, :, lo:hi] += _sum_group(np.matmul(ds.swapaxes(-1, -2), _rows(q4[els], rows, whole)))
                if ds5 is not None:
                    ds5[els, :, :, rows, lo:hi] = dp5

    blas_parallel(batch_elements, B, H * Tq * max(Tk, 1))

    dbias = None
    if bias_shape is not None:
        axes = tuple(a for a, n in enumerate(bias_shape) if n == 1 and ds_all.shape[a] != 1)
        dbias = ds_all.sum(axis=axes, keepdims=True) if axes else ds_all  # (ATT.10)
    return dq, dk, dv, dbias


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck attention``."""
    from ..gradcheck import Case

    B, D = 2, 4
    q = rng.standard_normal((B, 2, 3, D))
    k = rng.standard_normal((B, 2, 5, D))
    v = rng.standard_normal((B, 2, 5, D))
    yield Case("attention", attention_forward, attention_backward, {"q": q, "k": k, "v": v}, wrt=("q", "k", "v", None))
    yield Case("attention causal", attention_forward, attention_backward, {"q": q, "k": k, "v": v},
               wrt=("q", "k", "v", None), options={"causal": True})
    # GQA (H = 4 query heads on Hkv = 2), a padding mask and a per-head bias broadcast over the batch
    q4 = rng.standard_normal((B, 4, 3, D))
    pad = np.array([[False] * 4 + [True], [False] * 5])
    bias = rng.standard_normal((1, 4, 3, 5))
    yield Case("attention gqa+mask+bias", attention_forward, attention_backward,
               {"q": q4, "k": k, "v": v, "bias": bias, "key_padding_mask": pad},
               wrt=("q", "k", "v", "bias"), options={"causal": True})
    # a sliding window of 2 keys, Tq < Tk (end-aligned), GQA (ATT.15)
    yield Case("attention sliding window", attention_forward, attention_backward, {"q": q4, "k": k, "v": v},
               wrt=("q", "k", "v", None), options={"causal": True, "window": 2})
