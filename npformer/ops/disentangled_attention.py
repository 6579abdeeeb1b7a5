"""DeBERTa-v2 disentangled attention: content and relative-position terms in one softmax.

Derivation: ``proofs/disentangled_attention.md``; each line of the backward cites the
equation it implements. Shapes (the proof's letters):

    q_c: (B, H, Tq, D)   content queries
    k_c, v: (B, H, Tk, D) content keys and values
    q_r, k_r: (H, R, D)   projected relative embeddings, R = 2 S rows (S = the attention span)
    c2p_index, p2c_index: (Tq, Tk) integers in [0, R)
    out: (B, H, Tq, D)    probs: (B, H, Tq, Tk)

The scores add up to three terms, each a product of a content and a position vector
(DA.4)-(DA.6): content-to-content q_c[i] . k_c[j], content-to-position q_c[i] . k_r[c2p[i, j]]
and position-to-content k_c[j] . q_r[p2c[i, j]], all scaled by 1/sqrt(D (1 + n)) where n
counts the position terms present (DA.7). ``pos_att_type`` names them: ``("c2p", "p2c")``,
one of the two, or ``()``. An input that only an absent term uses must be ``None``.

The op is pure: the relative embeddings enter already projected (``q_r = E W_q^r + b``, and
with DeBERTa's ``share_att_key`` the content projections themselves), so their linear
backward stays with the layer that owns the weights. ``deberta_relative_indices`` builds
the two index tables as Hugging Face's ``DisentangledSelfAttention`` does, from the
log-bucketed relative positions of ``deberta_log_bucket`` (DA.1)-(DA.3).

Mask: ``attention_mask`` is True where query i may attend to key j (Hugging Face's
convention, the opposite of ``attention``'s ``key_padding_mask``), 4-D, each dimension 1
or the matching one of (B, H, Tq, Tk); DeBERTa builds it as the pairwise product of the
(B, T) padding mask, shape (B, 1, T, T) (``pairwise_attention_mask``). A hidden score is
replaced by the dtype's most negative finite value (DA.8): it gets probability 0 in a
row with a visible key, and a row with no visible key at all is uniform over its Tk
keys (output: the mean of the values), exactly as the reference. No gradient flows
through a hidden score (DA.13).

Queries and keys are separate inputs: a layer may project q_c from another stream than k_c
and v (DeBERTa's enhanced mask decoder); each stream then gets only its own share of the
gradient (DA.18), which the layer that owns the projections forms.

Lengths: B, Tq >= 0; Tk >= 1 (a softmax over no keys has no value); H, D, R >= 1.
Inputs may be any views; outputs are C-contiguous and keep the inputs' dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_array,
    check_cache_type,
    check_count,
    check_fits,
    check_float,
    check_int,
    check_ndim,
    check_real,
    check_same_dtype,
)

OP = "disentangled_attention"
TERMS = ("c2p", "p2c")


class DisentangledAttentionCache(NamedTuple):
    q_c: np.ndarray  # (B, H, Tq, D)
    k_c: np.ndarray  # (B, H, Tk, D)
    v: np.ndarray  # (B, H, Tk, D)
    q_r: Optional[np.ndarray]  # (H, R, D), None without "p2c"
    k_r: Optional[np.ndarray]  # (H, R, D), None without "c2p"
    c2p_index: Optional[np.ndarray]  # (Tq, Tk) int64, None without "c2p"
    p2c_index: Optional[np.ndarray]  # (Tq, Tk) int64, None without "p2c"
    visible: Optional[np.ndarray]  # bool, broadcastable to (B, H, Tq, Tk); None: every key visible
    probs: np.ndarray  # (B, H, Tq, Tk)  P of (DA.9)
    scale: float  # c of (DA.7)


# -- relative positions (no gradient) ----------------------------------------------------------


def _check_bucket_options(op: str, bucket_size: object, max_position: object,
                          names: Tuple[str, str] = ("bucket_size", "max_position")) -> Tuple[int, int]:
    """N >= 2 buckets (mid = N // 2 >= 1) and M >= mid + 2, so that ln((M - 1)/mid) > 0 in (DA.1)."""
    N = check_count(op, names[0], bucket_size, 2, MAX_POSITION)
    M = check_count(op, names[1], max_position, N // 2 + 2, MAX_POSITION)
    return N, M


def deberta_log_bucket(relative_position: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """Log-bucketed relative position (DA.1): exact for |r| <= N // 2, then logarithmic, sign kept.

    relative_position: (...) integers with |r| <= 2**53 - 1  ->  (...) int64

    As the reference, the quotient, the ratio of logarithms and its product are float32; the
    logarithms are float32's correctly rounded values (taken in float64, then rounded).
    """
    op = "deberta_log_bucket"
    check_int(op, "relative_position", relative_position)
    N, M = _check_bucket_options(op, bucket_size, max_position)
    if relative_position.size:
        lo, hi = int(relative_position.min()), int(relative_position.max())
        if lo < -MAX_POSITION or hi > MAX_POSITION:
            _fail(op, "relative_position", "values with |r| <= 2**53 - 1", f"range [{lo}, {hi}]")
    r = relative_position.astype(np.int64)
    mid = N // 2
    a = np.abs(r)
    f32 = np.float32
    # (DA.1)  |r| > mid: mid + ceil(ln(|r|/mid) / ln((M-1)/mid) * (mid - 1)), in float32. Distances
    # in the exact range are given the argument mid (log 1 = 0) so the discarded branch stays finite.
    ratio = np.maximum(a, mid).astype(f32) / f32(mid)
    log_ratio = np.log(ratio.astype(np.float64)).astype(f32)
    log_span = f32(np.log(np.float64(f32((M - 1) / mid))))
    log_part = np.ceil(log_ratio / log_span * f32(mid - 1))
    far = np.sign(r) * (mid + log_part.astype(np.int64))
    return np.where(a <= mid, r, far)


def deberta_relative_indices(
    Tq: int, Tk: int, *, position_buckets: Optional[int] = 256, max_relative_positions: int = 512
) -> Tuple[np.ndarray, np.ndarray]:
    """The c2p and p2c index tables of DeBERTa-v2 for queries 0..Tq-1 and keys 0..Tk-1.

    position_buckets: N (bucketed, span S = N) or None (no bucketing, span S = max_relative_positions);
    the defaults are DeBERTa-v3's. For Tq = Tk the tables are the reference's; other lengths give
    the top-left block of the tables of max(Tq, Tk) tokens.
    ->  c2p_index, p2c_index: (Tq, Tk) int64 in [0, 2 S)   (DA.2), (DA.3)
    """
    op = "deberta_relative_indices"
    Tq = check_count(op, "Tq", Tq, 0, MAX_POSITION)
    Tk = check_count(op, "Tk", Tk, 0, MAX_POSITION)
    if position_buckets is None:
        span = check_count(op, "max_relative_positions", max_relative_positions, 1, MAX_POSITION)
    else:
        span, _ = _check_bucket_options(op, position_buckets, max_relative_positions,
                                        ("position_buckets", "max_relative_positions"))
    check_fits(op, "Tq" if Tq >= Tk else "Tk", (Tq, Tk, 4), 8)  # relative positions, buckets, two tables
    i = np.arange(Tq)[:, None]
    j = np.arange(Tk)[None, :]
    delta = i - j  # (DA.2)  query position minus key position, (Tq, Tk)
    if position_buckets is None:
        bucket, bucket_t = delta, -delta
    else:
        bucket = deberta_log_bucket(delta, position_buckets, max_relative_positions)
        bucket_t = deberta_log_bucket(-delta, position_buckets, max_relative_positions)  # of j - i
    c2p = np.clip(bucket + span, 0, 2 * span - 1)  # (DA.3)
    p2c = np.clip(span - bucket_t, 0, 2 * span - 1)  # (DA.3)
    return c2p, p2c


def pairwise_attention_mask(padding_mask: np.ndarray) -> np.ndarray:
    """DeBERTa's mask from a (B, T) padding mask (True = a real token): (B, 1, T, T), True where
    both the query and the key are real tokens."""
    op = "pairwise_attention_mask"
    check_array(op, "padding_mask", padding_mask)
    if padding_mask.dtype != np.bool_:
        _fail(op, "padding_mask", "dtype bool (True where a token is real)", padding_mask.dtype)
    check_ndim(op, "padding_mask", padding_mask, 2)
    return (padding_mask[:, None, :, None] & padding_mask[:, None, None, :])


# -- the op ------------------------------------------------------------------------------------


def _parse_terms(op: str, pos_att_type: object) -> Tuple[bool, bool]:
    ok = isinstance(pos_att_type, (tuple, list)) and all(isinstance(t, str) and t in TERMS for t in pos_att_type)
    if not ok or len(set(pos_att_type)) != len(pos_att_type):
        _fail(op, "pos_att_type", 'a tuple of distinct names from ("c2p", "p2c")', repr(pos_att_type))
    return "c2p" in pos_att_type, "p2c" in pos_att_type


def _check_relative(op: str, name: str, x: object, needed: bool, term: str, H: int, D: int, dtype) -> int:
    """q_r / k_r: (H, R, D) of q_c's dtype when its term is present, else None; returns R (0 if absent)."""
    if not needed:
        if x is not None:
            _fail(op, name, f'None (pos_att_type has no "{term}")', type(x).__name__)
        return 0
    check_float(op, name, x)
    check_ndim(op, name, x, 3)
    if x.shape[0] != H or x.shape[2] != D or x.shape[1] == 0:
        _fail(op, name, f"shape ({H}, R, {D}) with R >= 1 (heads and head size of 'q_c')", tuple(x.shape))
    if x.dtype != dtype:
        _fail(op, name, f"dtype {dtype} (same as 'q_c')", x.dtype)
    return x.shape[1]


def _check_index(op: str, name: str, index: object, needed: bool, term: str, Tq: int, Tk: int, R: int):
    """c2p_index / p2c_index: integers (Tq, Tk) in [0, R) when its term is present, else None."""
    if not needed:
        if index is not None:
            _fail(op, name, f'None (pos_att_type has no "{term}")', type(index).__name__)
        return None
    check_int(op, name, index)
    if index.shape != (Tq, Tk):
        _fail(op, name, f"shape ({Tq}, {Tk}) (queries of 'q_c', keys of 'k_c')", tuple(index.shape))
    if index.size and (int(index.min()) < 0 or int(index.max()) >= R):
        _fail(op, name, f"values in [0, {R}) (rows of the relative embeddings)",
              f"range [{int(index.min())}, {int(index.max())}]")
    return index.astype(np.int64)


def disentangled_attention_forward(
    q_c: np.ndarray,
    k_c: np.ndarray,
    v: np.ndarray,
    q_r: Optional[np.ndarray] = None,
    k_r: Optional[np.ndarray] = None,
    *,
    c2p_index: Optional[np.ndarray] = None,
    p2c_index: Optional[np.ndarray] = None,
    attention_mask: Optional[np.ndarray] = None,
    pos_att_type: Tuple[str, ...] = ("c2p", "p2c"),
    scale: Optional[float] = None,
) -> Tuple[np.ndarray, DisentangledAttentionCache]:
    """out = softmax(c (q_c k_c^T + c2p + p2c), masked) v, per head.

    q_c: (B, H, Tq, D), k_c, v: (B, H, Tk, D), q_r ("p2c"), k_r ("c2p"): (H, R, D),
    c2p_index ("c2p"), p2c_index ("p2c"): (Tq, Tk) in [0, R), attention_mask: bool, 4-D,
    each dimension 1 or that of (B, H, Tq, Tk), True = visible; scale: c, by default
    1/sqrt(D (1 + number of position terms)) (DA.7)
    ->  out: (B, H, Tq, D)
    """
    op = f"{OP}_forward"
    for name, x in (("q_c", q_c), ("k_c", k_c), ("v", v)):
        check_float(op, name, x)
        check_ndim(op, name, x, 4)
    B, H, Tq, D = q_c.shape
    Tk = k_c.shape[2]
    if H == 0 or D == 0:
        _fail(op, "q_c", "at least one head (axis 1) of size D >= 1 (axis 3)", f"shape {tuple(q_c.shape)}")
    check_same_dtype(op, "q_c", q_c, k_c=k_c, v=v)
    if k_c.shape[0] != B or k_c.shape[1] != H or k_c.shape[3] != D or Tk == 0:
        _fail(op, "k_c", f"shape ({B}, {H}, Tk, {D}) with Tk >= 1 (batch, heads and head size of 'q_c')",
              tuple(k_c.shape))
    if v.shape != k_c.shape:
        _fail(op, "v", f"shape {tuple(k_c.shape)} (same as 'k_c')", tuple(v.shape))
    c2p, p2c = _parse_terms(op, pos_att_type)
    R_k = _check_relative(op, "k_r", k_r, c2p, "c2p", H, D, q_c.dtype)
    R_q = _check_relative(op, "q_r", q_r, p2c, "p2c", H, D, q_c.dtype)
    if c2p and p2c and R_q != R_k:
        _fail(op, "q_r", f"R = {R_k} rows (same as 'k_r')", tuple(q_r.shape))
    alpha = _check_index(op, "c2p_index", c2p_index, c2p, "c2p", Tq, Tk, R_k)
    beta = _check_index(op, "p2c_index", p2c_index, p2c, "p2c", Tq, Tk, R_q)
    if attention_mask is not None:
        check_array(op, "attention_mask", attention_mask)
        if attention_mask.dtype != np.bool_:
            _fail(op, "attention_mask", "dtype bool (True where query i may attend to key j)", attention_mask.dtype)
        full = (B, H, Tq, Tk)
        if attention_mask.ndim != 4 or any(m not in (1, f) for m, f in zip(attention_mask.shape, full)):
            _fail(op, "attention_mask", f"4-D shape with each dimension 1 or equal to {full}",
                  tuple(attention_mask.shape))
    if scale is None:
        scale = 1.0 / float(np.sqrt(D * (1 + c2p + p2c)))  # (DA.7)
    else:
        scale = check_real(op, "scale", scale, lo=0.0, lo_open=True)
    check_fits(op, "q_c" if Tq >= Tk else "k_c", (B, H, Tq, Tk), q_c.dtype.itemsize)  # the probabilities

    dtype = q_c.dtype
    rows = np.arange(Tq)[:, None]  # (Tq, 1): query i of each (i, j) in the gathers
    cols = np.arange(Tk)[None, :]  # (1, Tk): key j
    lowest = np.finfo(dtype).min
    p = np.empty((B, H, Tq, Tk), dtype)  # P (DA.9)
    out = np.empty((B, H, Tq, D), dtype)  # O (DA.10)
    for b in range(B):  # one batch element at a time: its (H, Tq, Tk) scores stay in cache
        a = np.matmul(q_c[b], k_c[b].swapaxes(-1, -2))  # (DA.4)  content-to-content, (H, Tq, Tk)
        if c2p:
            c2p_all = np.matmul(q_c[b], k_r.swapaxes(-1, -2))  # (DA.5)  every q_c[i] . k_r[r], (H, Tq, R)
            a += c2p_all[:, rows, alpha]  # (DA.5)  gathered at r = c2p[i, j]
        if p2c:
            p2c_all = np.matmul(k_c[b], q_r.swapaxes(-1, -2))  # (DA.6)  every k_c[j] . q_r[r], (H, Tk, R)
            a += p2c_all[:, cols, beta]  # (DA.6)  gathered at [j, p2c[i, j]], transposed to (i, j)
        s = np.multiply(a, dtype.type(scale), out=a)  # (DA.7)
        if attention_mask is not None:
            np.copyto(s, lowest, where=~attention_mask[b if attention_mask.shape[0] > 1 else 0])  # (DA.8)
        # (DA.9)  P = softmax(S) along keys, stabilised by the row maximum (finite: a hidden score is
        # the lowest finite value, not -inf, so a row with no visible key is uniform)
        p_b = p[b]
        np.subtract(s, s.max(axis=-1, keepdims=True), out=p_b)
        np.exp(p_b, out=p_b)
        p_b /= p_b.sum(axis=-1, keepdims=True)
        np.matmul(p_b, v[b], out=out[b])  # (DA.10)
    cache = DisentangledAttentionCache(
        q_c=q_c, k_c=k_c, v=v, q_r=q_r if p2c else None, k_r=k_r if c2p else None, c2p_index=alpha,
        p2c_index=beta, visible=attention_mask, probs=p, scale=scale)
    return out, cache


def _scatter_add(g: np.ndarray, flat_index: np.ndarray, shape: Tuple[int, int, int]) -> np.ndarray:
    """(DA.15): the adjoint of a gather, sum of g over every entry that read the same element.

    g: (H, Tq, Tk), flat_index: (H, Tq, Tk) positions in the (H, rows, R) result  ->  (H, rows, R)
    np.bincount is an unbuffered scatter-add (as np.add.at), summed in float64.
    """
    summed = np.bincount(flat_index.reshape(-1), weights=g.reshape(-1), minlength=int(np.prod(shape)))
    return summed.astype(g.dtype, copy=False).reshape(shape)


def disentangled_attention_backward(
    dout: np.ndarray, cache: DisentangledAttentionCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Gradients of a scalar loss with respect to q_c, k_c, v, q_r and k_r.

    dout: (B, H, Tq, D)  ->  dq_c: (B, H, Tq, D), dk_c, dv: (B, H, Tk, D),
    dq_r, dk_r: (H, R, D) (None for an absent term)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, DisentangledAttentionCache)
    q_c, k_c, v, q_r, k_r, alpha, beta, visible, p, scale = cache
    check_float(op, "dout", dout)
    if dout.shape != q_c.shape:
        _fail(op, "dout", f"shape {tuple(q_c.shape)} (that of the forward's output)", tuple(dout.shape))
    if dout.dtype != q_c.dtype:
        _fail(op, "dout", f"dtype {q_c.dtype} (that of the forward's 'q_c')", dout.dtype)
    B, H, Tq, D = q_c.shape
    Tk = k_c.shape[2]
    dtype = q_c.dtype
    c = dtype.type(scale)

    dq_c = np.empty((B, H, Tq, D), dtype)
    dk_c = np.empty((B, H, Tk, D), dtype)
    dv = np.empty((B, H, Tk, D), dtype)
    dk_r = None if k_r is None else np.zeros(k_r.shape, dtype)
    dq_r = None if q_r is None else np.zeros(q_r.shape, dtype)
    heads = np.arange(H)[:, None, None]
    if k_r is not None:  # where G[h, i, j] lands in the (H, Tq, R) adjoint of the c2p products
        R = k_r.shape[1]
        c2p_flat = (heads * Tq + np.arange(Tq)[:, None]) * R + alpha  # (H, Tq, Tk)
    if q_r is not None:  # where G[h, i, j] lands in the (H, Tk, R) adjoint of the p2c products
        R = q_r.shape[1]
        p2c_flat = (heads * Tk + np.arange(Tk)[None, :]) * R + beta  # (H, Tq, Tk)
    for b in range(B):
        p_b = p[b]  # (H, Tq, Tk)
        np.matmul(p_b.swapaxes(-1, -2), dout[b], out=dv[b])  # (DA.11)
        dp = np.matmul(dout[b], v[b].swapaxes(-1, -2))  # (DA.12)
        rowsum = np.einsum("hij,hij->hi", dp, p_b)[..., None]  # (DA.12)
        g = np.subtract(dp, rowsum, out=dp)
        g *= p_b  # (DA.12)  dS
        g *= c  # (DA.13)  G = c dS: the gradient of the unscaled sum A
        if visible is not None:
            np.copyto(g, 0, where=~visible[b if visible.shape[0] > 1 else 0])  # (DA.13)  hidden scores are constants
        np.matmul(g, k_c[b], out=dq_c[b])  # (DA.14)
        np.matmul(g.swapaxes(-1, -2), q_c[b], out=dk_c[b])  # (DA.14)
        if k_r is not None:
            dc2p = _scatter_add(g, c2p_flat, (H, Tq, k_r.shape[1]))  # (DA.15)  (H, Tq, R)
            dq_c[b] += np.matmul(dc2p, k_r)  # (DA.16)
            dk_r += np.matmul(dc2p.swapaxes(-1, -2), q_c[b])  # (DA.16)
        if q_r is not None:
            dp2c = _scatter_add(g, p2c_flat, (H, Tk, q_r.shape[1]))  # (DA.15)  (H, Tk, R)
            dk_c[b] += np.matmul(dp2c, q_r)  # (DA.17)
            dq_r += np.matmul(dp2c.swapaxes(-1, -2), k_c[b])  # (DA.17)
    return dq_c, dk_c, dv, dq_r, dk_r


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck disentangled_attention``: a short span so that
    relative indices repeat and clamp."""
    from ..gradcheck import Case

    B, H, T, D = 2, 2, 5, 3
    c2p, p2c = deberta_relative_indices(T, T, position_buckets=4, max_relative_positions=6)
    inputs = {"q_c": rng.standard_normal((B, H, T, D)), "k_c": rng.standard_normal((B, H, T, D)),
              "v": rng.standard_normal((B, H, T, D)), "q_r": rng.standard_normal((H, 8, D)),
              "k_r": rng.standard_normal((H, 8, D))}
    names = ("q_c", "k_c", "v", "q_r", "k_r")
    mask = pairwise_attention_mask(np.array([[True] * 5, [True] * 3 + [False] * 2]))
    yield Case("disentangled c2p+p2c, padding", disentangled_attention_forward, disentangled_attention_backward,
               {**inputs, "c2p_index": c2p, "p2c_index": p2c, "attention_mask": mask}, wrt=names)
    yield Case("disentangled c2p only", disentangled_attention_forward, disentangled_attention_backward,
               {**inputs, "q_r": None, "c2p_index": c2p}, wrt=names[:3] + (None, "k_r"),
               options={"pos_att_type": ("c2p",)})
