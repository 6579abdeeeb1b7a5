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
of keys. ``key_padding_mask`` (B, Tk) is True where a key is padding. A query
that sees no key at all (a fully masked row) gets output 0 and gradient 0 (ATT.11).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ._checks import _fail, check_array, check_float, check_ndim, check_same_dtype, check_shape

OP = "attention"


class AttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, Tq, D)
    k: np.ndarray  # (B, Hkv, Tk, D)
    v: np.ndarray  # (B, Hkv, Tk, D)
    probs: np.ndarray  # (B, H, Tq, Tk)  P of (ATT.2); 0 at masked entries
    scale: float  # the factor on Q K^T in (ATT.1)
    causal: bool  # whether the causal mask was applied (the backward skips the same keys)
    bias_shape: Optional[Tuple[int, ...]]  # shape of the additive bias, None if there was none


def check_qkv(op: str, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Tuple[int, int, int, int, int, int]:
    """Validate q (B, H, Tq, D), k, v (B, Hkv, Tk, D); return (B, H, Hkv, Tq, Tk, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, x)
        check_ndim(op, name, x, 4)
    check_same_dtype(op, "q", q, k=k, v=v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check_shape(op, "k", k, (B, None, None, D))
    check_shape(op, "v", v, (B, Hkv, Tk, D))
    if Hkv == 0 or H % Hkv != 0:
        _fail(op, "k", f"a number of heads dividing q's H = {H}", f"{Hkv} (shape {tuple(k.shape)})")
    return B, H, Hkv, Tq, Tk, D


ROW_BLOCK = 64  # causal attention handles this many query rows at a time


def row_blocks(Tq: int, Tk: int, causal: bool) -> List[Tuple[int, int, int]]:
    """``[(r0, r1, n), ...]``: query rows ``r0 .. r1-1`` and the ``n`` leading keys any of them can see.

    Without a causal mask this is one block of every row and every key. With one, row i sees
    keys up to i + (Tk - Tq), so a block of rows needs only a prefix of the keys: the rest of
    its probabilities are 0 (ATT.11) and their products are skipped, which saves close to
    half the work of a square causal matrix. Rows that see no key at all are left out.
    """
    if not causal:
        return [(0, Tq, Tk)]
    blocks = []
    for r0 in range(0, Tq, ROW_BLOCK):
        r1 = min(r0 + ROW_BLOCK, Tq)
        n = min(Tk, r1 + (Tk - Tq))
        if n > 0:
            blocks.append((r0, r1, n))
    return blocks


def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """(Tq, Tk) bool, True where key j is *hidden* from query i: j > i + (Tk - Tq)."""
    i = np.arange(Tq)[:, None]
    j = np.arange(Tk)[None, :]
    return j > i + (Tk - Tq)


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    key_padding_mask: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
) -> Tuple[np.ndarray, AttentionCache]:
    """out = softmax(scale * q k^T + bias, masked) v, per head.

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D), key_padding_mask: bool (B, Tk),
    bias: 4-D, each dimension 1 or the matching one of (B, H, Tq, Tk)
    ->  out: (B, H, Tq, D)
    """
    op = f"{OP}_forward"
    B, H, Hkv, Tq, Tk, D = check_qkv(op, q, k, v)
    G = H // Hkv
    if key_padding_mask is not None:
        check_array(op, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != np.bool_:
            _fail(op, "key_padding_mask", "dtype bool", key_padding_mask.dtype)
        check_shape(op, "key_padding_mask", key_padding_mask, (B, Tk))
    if bias is not None:
        check_float(op, "bias", bias)
        check_same_dtype(op, "q", q, bias=bias)
        full = (B, H, Tq, Tk)
        if bias.ndim != 4 or any(b not in (1, f) for b, f in zip(bias.shape, full)):
            _fail(op, "bias", f"4-D shape with each dimension 1 or equal to {full}", tuple(bias.shape))
    if scale is None:
        scale = 1.0 / np.sqrt(D)  # (ATT.13)
    scale = float(scale)

    # Queries of one kv head's group side by side: (B, Hkv, G, Tq, D), scaled once (ATT.1) (Q is T/D
    # times smaller than S); k and v get a group axis of 1 to broadcast over.
    q_grouped = (q * q.dtype.type(scale)).reshape(B, Hkv, G, Tq, D)
    k_grouped, v_grouped = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, Tk, D)
    pad = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)

    blocks = row_blocks(Tq, Tk, causal)
    whole = blocks == [(0, Tq, Tk)]
    p = None if whole else np.zeros((B, H, Tq, Tk), q.dtype)  # keys a block cannot see keep P = 0
    out = np.zeros((B, H, Tq, D), q.dtype)  # rows that see no key keep 0 (ATT.11)
    for r0, r1, n in blocks:
        rows = r1 - r0
        # (ATT.1)  S = (scale Q) K^T + bias, for these rows and the n keys they can see
        s = np.matmul(q_grouped[:, :, :, r0:r1], k_grouped[:, :, :, :n].swapaxes(-1, -2)).reshape(B, H, rows, n)
        if bias is not None:
            s += bias[:, :, r0:r1, :n] if bias.shape[2] != 1 else bias[..., :n]

        # masked entries are -inf before the softmax: exp(-inf) = 0 exactly, and no gradient flows (ATT.11)
        hidden = causal_mask(Tq, Tk)[r0:r1, :n] if causal else None
        if pad is not None:
            hidden = pad[..., :n] if hidden is None else (hidden | pad[..., :n])
        if hidden is not None:
            np.copyto(s, -np.inf, where=hidden)

        # (ATT.2)  P = softmax(S) along keys, stabilised by the row maximum
        m = np.fmax.reduce(s, axis=-1, keepdims=True)  # (B, H, rows, 1); fmax: no NaN bookkeeping, faster
        m[m == -np.inf] = 0.0  # a fully masked row: keep exp(-inf - m) = 0 instead of nan
        s -= m
        p_rows = np.exp(s, out=s)
        row_sum = p_rows.sum(axis=-1, keepdims=True)
        row_sum[row_sum == 0] = 1.0  # a fully masked row stays all zeros: output 0 (ATT.11)
        p_rows /= row_sum
        if whole:
            p = p_rows
        else:
            p[:, :, r0:r1, :n] = p_rows

        # (ATT.3)  O = P V
        out[:, :, r0:r1] = np.matmul(p_rows.reshape(B, Hkv, G, rows, n), v_grouped[:, :, :, :n]).reshape(B, H, rows, D)
    cache = AttentionCache(q=q, k=k, v=v, probs=p, scale=scale, causal=bool(causal),
                           bias_shape=None if bias is None else tuple(bias.shape))
    return out, cache


def attention_backward(
    dout: np.ndarray, cache: AttentionCache
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients of a scalar loss with respect to q, k, v and the additive bias.

    dout: (B, H, Tq, D)  ->  dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D),
    dbias: the bias's shape (None if the forward had no bias)
    """
    q, k, v, p, scale, causal, bias_shape = cache
    op = f"{OP}_backward"
    check_array(op, "dout", dout)
    check_shape(op, "dout", dout, q.shape)
    check_same_dtype(op, "q", q, dout=dout)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    q_grouped, dout_grouped = q.reshape(B, Hkv, G, Tq, D), dout.reshape(B, Hkv, G, Tq, D)
    k_grouped, v_grouped = k[:, :, None], v[:, :, None]  # (B, Hkv, 1, Tk, D)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    ds_all = None if bias_shape is None else np.zeros((B, H, Tq, Tk), q.dtype)
    for r0, r1, n in row_blocks(Tq, Tk, cache.causal):
        rows = r1 - r0
        p_rows = p[:, :, r0:r1, :n]  # (B, H, rows, n): the entries of P that can be nonzero
        p_grouped = p_rows.reshape(B, Hkv, G, rows, n)
        dout_rows = dout_grouped[:, :, :, r0:r1]  # (B, Hkv, G, rows, D)

        # (ATT.4), summed over the query heads of each group (ATT.12)
        dv[:, :, :n] += np.matmul(p_grouped.swapaxes(-1, -2), dout_rows).sum(axis=2)
        dp = np.matmul(dout_rows, v_grouped[:, :, :, :n].swapaxes(-1, -2)).reshape(B, H, rows, n)  # (ATT.5)
        # (ATT.7)  dS = P * (dP - rowsum(dP * P)), in place in dP's array
        rowsum = np.einsum("bhik,bhik->bhi", dp, p_rows)[..., None]
        dp -= rowsum
        ds = dp
        ds *= p_rows  # masked entries have P = 0, so dS = 0 there (ATT.11)
        if ds_all is not None:
            ds_all[:, :, r0:r1, :n] = ds

        ds_grouped = ds.reshape(B, Hkv, G, rows, n)
        dq[:, :, r0:r1] = np.matmul(ds_grouped, k_grouped[:, :, :, :n]).reshape(B, H, rows, D)  # (ATT.8)
        dk[:, :, :n] += np.matmul(ds_grouped.swapaxes(-1, -2), q_grouped[:, :, :, r0:r1]).sum(axis=2)  # (ATT.9), (ATT.12)
    dq *= scale
    dk *= scale

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
