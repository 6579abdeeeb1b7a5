"""Tiled attention (FlashAttention-2) in NumPy: the reference a fused GPU kernel mirrors.

Derivation: ``proofs/flash_attention.md``. The result equals ``attention_forward`` /
``attention_backward`` of ``npformer.ops.attention`` (same causal alignment, same
grouped-query rule, same empty-sequence rule), but no (Tq, Tk) array is ever formed:
the forward walks the keys one tile at a time keeping a running max ``m_running``, a
running sum ``l_running`` and an unnormalised output ``acc`` per query row (online
softmax, FA.3), and keeps only the output and two numbers per row, the row maximum
``row_max`` and ``log_row_sum`` = log l (their sum is the log-sum-exp ``lse``, FA.4),
for the backward, which recomputes each tile of P from them (FA.5). Memory is
O(T D) instead of O(T^2) (FA.8).

Shapes (the proof's letters):

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D), out: (B, H, Tq, D), lse: (B, H, Tq)

Forward loops: one iteration of the outer loop is what one GPU program does (a tile
of ``block_q`` query rows, all batches and heads at once here); the inner loop is the
program's walk along the keys. The G = H // Hkv query heads that share a key/value
head are viewed as an extra axis, q: (B, Hkv, G, Tq, D), so that one key tile meets
all of them.

Backward: the kernel's three launches, in order (FA.9): ``_backward_delta`` computes
delta = rowsum(dO * O) (FA.6); ``_backward_dkdv`` is one program per key tile, which
walks the query tiles that can see it (of every query head of its group) and owns dK
and dV of its keys; ``_backward_dq`` is one program per query tile, which walks the
key tiles it can see and owns dQ of its rows. No two programs write the same output,
so no atomic add is needed; the price is recomputing each tile of P twice.

A query row that sees no key (causal with Tq > Tk, or Tk = 0) gets output 0,
``row_max = 0`` and ``log_row_sum = lse = +inf``, so that the recomputed probabilities
of the backward are 0 in that row. Tq = 0 gives an empty output.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import MAX_POSITION, check_bool, check_cache_type, check_count
from .attention import check_dout, check_qkv, check_scale

OP = "flash_attention"


class FlashAttentionCache(NamedTuple):
    q: np.ndarray  # (B, H, Tq, D)
    k: np.ndarray  # (B, Hkv, Tk, D)
    v: np.ndarray  # (B, Hkv, Tk, D)
    out: np.ndarray  # (B, H, Tq, D)  the output, the cache's own copy (not the returned array)
    row_max: np.ndarray  # (B, H, Tq)  m_i of (FA.4): the largest visible logit, 0 in a row that sees no key
    log_row_sum: np.ndarray  # (B, H, Tq)  log l_i of (FA.4), +inf in a row that sees no key
    lse: np.ndarray  # (B, H, Tq)  row_max + log_row_sum: log-sum-exp of each row of logits, (FA.4)
    scale: float
    causal: bool
    block_q: int
    block_k: int


def _key_tile_end(i_last: int, Tk: int, offset: int, causal: bool) -> int:
    """One past the last key that query ``i_last`` may see (all Tk keys when not causal)."""
    return Tk if not causal else max(0, min(Tk, i_last + offset + 1))


def _first_query_tile(j0: int, block_q: int, offset: int, causal: bool) -> int:
    """Start of the first query tile with a row that may see key ``j0`` (0 when not causal)."""
    first_row = max(0, j0 - offset) if causal else 0  # query i sees key j0 iff j0 <= i + offset
    return (first_row // block_q) * block_q


def _tile_logits(q_tile, k_tile, scale, causal, i0, j0, offset):
    """Scaled logits of one tile, -inf where causally hidden.

    q_tile: (B, Hkv, G, bq, D), k_tile: (B, Hkv, bk, D)  ->  s: (B, Hkv, G, bq, bk)
    """
    s = np.matmul(q_tile, k_tile[:, :, None].swapaxes(-1, -2))
    s *= scale
    bq, bk = s.shape[-2], s.shape[-1]
    if causal and j0 + bk - 1 > i0 + offset:  # a tile crossing the diagonal: mask it
        i = np.arange(i0, i0 + bq)[:, None]
        j = np.arange(j0, j0 + bk)[None, :]
        np.copyto(s, -np.inf, where=j > i + offset)
    return s


def flash_attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    scale: float = None,
    block_q: int = 64,
    block_k: int = 64,
) -> Tuple[np.ndarray, FlashAttentionCache]:
    """softmax(scale * q k^T, causally masked) v, one (block_q, block_k) tile at a time.

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D)  ->  out: (B, H, Tq, D)
    """
    op = f"{OP}_forward"
    B, H, Hkv, Tq, Tk, D = check_qkv(op, q, k, v)
    causal = check_bool(op, "causal", causal)
    scale = check_scale(op, scale, D)
    block_q = check_count(op, "block_q", block_q, 1, MAX_POSITION)
    block_k = check_count(op, "block_k", block_k, 1, MAX_POSITION)
    G = H // Hkv
    offset = Tk - Tq  # causal: query i sees key j iff j <= i + offset
    dtype = q.dtype
    qg = q.reshape(B, Hkv, G, Tq, D)  # read only: a copy when q is not contiguous is fine
    out = np.empty((B, Hkv, G, Tq, D), dtype)
    row_max = np.empty((B, Hkv, G, Tq), dtype)
    log_row_sum = np.empty((B, Hkv, G, Tq), dtype)

    for i0 in range(0, Tq, block_q):  # one GPU program per query tile
        i1 = min(i0 + block_q, Tq)
        q_tile = qg[:, :, :, i0:i1]  # (B, Hkv, G, bq, D)
        m_running = np.full((B, Hkv, G, i1 - i0), -np.inf, dtype)  # running max of the logits, (FA.1)
        l_running = np.zeros((B, Hkv, G, i1 - i0), dtype)  # running sum of exp(s - m_running)
        acc = np.zeros((B, Hkv, G, i1 - i0, D), dtype)  # running sum of exp(s - m_running) v

        # keys past the last one the tile's bottom row may see lie above the diagonal: skipped
        for j0 in range(0, _key_tile_end(i1 - 1, Tk, offset, causal), block_k):
            j1 = min(j0 + block_k, Tk)
            s = _tile_logits(q_tile, k[:, :, j0:j1], scale, causal, i0, j0, offset)  # (B, Hkv, G, bq, bk)

            # (FA.3)  merge this tile's partial softmax into the running state
            m_old = m_running
            m_new = np.maximum(m_old, s.max(axis=-1))
            m_ref = np.where(m_new == -np.inf, 0.0, m_new).astype(dtype)  # rows with nothing visible yet: 0
            alpha = np.exp(m_old - m_ref)  # rescale factor exp(m_old - m_new); 0 while m_old = -inf
            p = np.exp(s - m_ref[..., None])  # (B, Hkv, G, bq, bk)
            l_running = alpha * l_running + p.sum(axis=-1)
            acc = alpha[..., None] * acc + np.matmul(p, v[:, :, None, j0:j1])
            m_running = m_new

        # (FA.4)  normalise; a row that saw no key keeps out = 0, row_max = 0 and log l = +inf
        seen = l_running > 0
        out[:, :, :, i0:i1] = acc / np.where(seen, l_running, 1.0)[..., None].astype(dtype)
        row_max[:, :, :, i0:i1] = np.where(seen, m_running, 0.0)
        log_l = np.log(l_running, where=seen, out=np.full_like(l_running, np.inf))
        log_row_sum[:, :, :, i0:i1] = log_l

    out = out.reshape(B, H, Tq, D)
    row_max, log_row_sum = row_max.reshape(B, H, Tq), log_row_sum.reshape(B, H, Tq)
    lse = row_max + log_row_sum  # (FA.4)
    out_kept = out.copy()  # the backward reads O: the cache's own copy, so a caller writing to out changes nothing
    cache = FlashAttentionCache(q=q, k=k, v=v, out=out_kept, row_max=row_max, log_row_sum=log_row_sum, lse=lse,
                                scale=scale, causal=causal, block_q=block_q, block_k=block_k)
    return out, cache


def _tile_probs(cache: FlashAttentionCache, qg, i0, i1, j0, j1):
    """P of one tile, recomputed from the logits and the cached row statistics (FA.5).

    qg: (B, Hkv, G, Tq, D)  ->  p: (B, Hkv, G, bq, bk)
    """
    B, Hkv, G, Tq, _ = qg.shape
    offset = cache.k.shape[2] - Tq
    s = _tile_logits(qg[:, :, :, i0:i1], cache.k[:, :, j0:j1], cache.scale, cache.causal, i0, j0, offset)
    m = cache.row_max.reshape(B, Hkv, G, Tq)[:, :, :, i0:i1, None]
    log_l = cache.log_row_sum.reshape(B, Hkv, G, Tq)[:, :, :, i0:i1, None]
    # (FA.5)  exp(s - lse) evaluated as exp((s - m) - log l): s - m is exact where P is not negligible
    return np.exp((s - m) - log_l)


def _backward_delta(dout: np.ndarray, cache: FlashAttentionCache) -> np.ndarray:
    """delta_i = rowsum(dO * O) (FA.6): the row sums of (ATT.7) from O(T D) data.  -> (B, H, Tq)"""
    return np.einsum("bhid,bhid->bhi", dout, cache.out)  # (FA.6)


class _Grouped(NamedTuple):
    """What both backward passes read: sizes, and q, dout, delta with the G query heads of a key/value head together."""

    B: int
    Hkv: int
    G: int
    Tq: int
    Tk: int
    D: int
    offset: int  # Tk - Tq: the causal diagonal, aligned to the end
    qg: np.ndarray  # (B, Hkv, G, Tq, D)
    dout_g: np.ndarray  # (B, Hkv, G, Tq, D)
    delta_g: np.ndarray  # (B, Hkv, G, Tq)


def _grouped(dout: np.ndarray, cache: "FlashAttentionCache", delta: np.ndarray) -> _Grouped:
    B, H, Tq, D = cache.q.shape
    Hkv, Tk = cache.k.shape[1], cache.k.shape[2]
    G = H // Hkv
    return _Grouped(B, Hkv, G, Tq, Tk, D, Tk - Tq, cache.q.reshape(B, Hkv, G, Tq, D),
                    dout.reshape(B, Hkv, G, Tq, D), delta.reshape(B, Hkv, G, Tq))


def _backward_dkdv(dout: np.ndarray, cache: FlashAttentionCache, delta: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """dK, dV: one program per key tile, walking the query tiles that can see it (FA.9).  -> (B, Hkv, Tk, D) each"""
    q, v = cache.q, cache.v
    B, Hkv, G, Tq, Tk, D, offset, qg, dout_g, delta_g = _grouped(dout, cache, delta)
    dk = np.empty((B, Hkv, Tk, D), q.dtype)
    dv = np.empty((B, Hkv, Tk, D), q.dtype)
    for j0 in range(0, Tk, cache.block_k):  # one GPU program per key tile
        j1 = min(j0 + cache.block_k, Tk)
        v_tile = v[:, :, j0:j1]  # (B, Hkv, bk, D)
        dk_acc = np.zeros((B, Hkv, j1 - j0, D), q.dtype)  # sum over query tiles of dS^T Q
        dv_acc = np.zeros((B, Hkv, j1 - j0, D), q.dtype)  # sum over query tiles of P^T dO
        # causal: query tiles above the first one that sees key j0 see none of this tile: skipped
        for i0 in range(_first_query_tile(j0, cache.block_q, offset, cache.causal), Tq, cache.block_q):
            i1 = min(i0 + cache.block_q, Tq)
            p = _tile_probs(cache, qg, i0, i1, j0, j1)  # (FA.5)  (B, Hkv, G, bq, bk)
            do_tile = dout_g[:, :, :, i0:i1]  # (B, Hkv, G, bq, D)
            dv_acc += np.matmul(p.swapaxes(-1, -2), do_tile).sum(axis=2)  # (ATT.4), summed over G (ATT.12)
            dp = np.matmul(do_tile, v_tile[:, :, None].swapaxes(-1, -2))  # (ATT.5)
            ds = p * (dp - delta_g[:, :, :, i0:i1, None])  # (FA.7)
            dk_acc += np.matmul(ds.swapaxes(-1, -2), qg[:, :, :, i0:i1]).sum(axis=2)  # (ATT.9), over G (ATT.12)
        dk[:, :, j0:j1] = cache.scale * dk_acc  # (ATT.9): c_s once, on the tile's T x D result
        dv[:, :, j0:j1] = dv_acc
    return dk, dv


def _backward_dq(dout: np.ndarray, cache: FlashAttentionCache, delta: np.ndarray) -> np.ndarray:
    """dQ: one program per query tile, walking the key tiles it can see (FA.9).  -> (B, H, Tq, D)"""
    q, k, v = cache.q, cache.k, cache.v
    B, Hkv, G, Tq, Tk, D, offset, qg, dout_g, delta_g = _grouped(dout, cache, delta)
    dq = np.empty((B, Hkv, G, Tq, D), q.dtype)
    for i0 in range(0, Tq, cache.block_q):  # one GPU program per query tile
        i1 = min(i0 + cache.block_q, Tq)
        do_tile = dout_g[:, :, :, i0:i1]  # (B, Hkv, G, bq, D)
        dq_acc = np.zeros((B, Hkv, G, i1 - i0, D), q.dtype)  # sum over key tiles of dS K
        # keys past the last one the tile's bottom row may see lie above the diagonal: skipped
        for j0 in range(0, _key_tile_end(i1 - 1, Tk, offset, cache.causal), cache.block_k):
            j1 = min(j0 + cache.block_k, Tk)
            k_tile = k[:, :, None, j0:j1]  # (B, Hkv, 1, bk, D)
            p = _tile_probs(cache, qg, i0, i1, j0, j1)  # (FA.5)  (B, Hkv, G, bq, bk)
            dp = np.matmul(do_tile, v[:, :, None, j0:j1].swapaxes(-1, -2))  # (ATT.5)
            ds = p * (dp - delta_g[:, :, :, i0:i1, None])  # (FA.7)
            dq_acc += np.matmul(ds, k_tile)  # (ATT.8)
        dq[:, :, :, i0:i1] = cache.scale * dq_acc  # (ATT.8): c_s once, on the tile's T x D result
    return dq.reshape(q.shape)


def flash_attention_backward(dout: np.ndarray, cache: FlashAttentionCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients with respect to q, k, v, recomputing each tile of P from the row statistics.

    dout: (B, H, Tq, D)  ->  dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, FlashAttentionCache)
    check_dout(op, dout, cache.q, cache.k)
    delta = _backward_delta(dout, cache)  # (FA.6)  delta_i, "D_i" in the FlashAttention-2 paper
    dk, dv = _backward_dkdv(dout, cache, delta)  # (FA.9)  first pass: over key tiles
    dq = _backward_dq(dout, cache, delta)  # (FA.9)  second pass: over query tiles
    return dq, dk, dv


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck flash_attention`` (small tiles, ragged edges)."""
    from ..gradcheck import Case

    q = rng.standard_normal((1, 4, 5, 3))
    k = rng.standard_normal((1, 2, 7, 3))
    v = rng.standard_normal((1, 2, 7, 3))
    for causal in (False, True):
        yield Case(f"flash_attention causal={causal}", flash_attention_forward, flash_attention_backward,
                   {"q": q, "k": k, "v": v}, wrt=("q", "k", "v"),
                   options={"causal": causal, "block_q": 2, "block_k": 3})
