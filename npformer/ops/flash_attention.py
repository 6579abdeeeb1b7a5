"""Tiled attention (FlashAttention-2) in NumPy: the reference a fused GPU kernel mirrors.

Derivation: ``proofs/flash_attention.md``. The result equals ``attention_forward`` /
``attention_backward`` of ``npformer.ops.attention`` (same causal alignment, same
grouped-query rule), but no (Tq, Tk) array is ever formed: the forward walks the keys
one tile at a time keeping a running max ``m_running``, a running sum ``l_running`` and an
unnormalised output ``acc`` per query row (online softmax, FA.3), and keeps only the
output and the log-sum-exp ``lse`` for the backward, which recomputes each tile of P
from ``lse`` (FA.5). Memory is O(T D) instead of O(T^2) (FA.8).

Shapes (the proof's letters):

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D), out: (B, H, Tq, D), lse: (B, H, Tq)

Loops: one iteration of the outer loop is what one GPU program does (a tile of
``block_q`` query rows, all batches and heads at once here); the inner loop is the
program's walk along the keys. The G = H // Hkv query heads that share a key/value
head are viewed as an extra axis, q: (B, Hkv, G, Tq, D), so that one key tile meets
all of them.

A query row that sees no key (causal with Tq > Tk) gets output 0 and ``lse = +inf``,
so that the recomputed probabilities exp(s - lse) of the backward are 0 in that row.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import _fail
from .attention import check_dout, check_qkv

OP = "flash_attention"


class FlashCache(NamedTuple):
    q: np.ndarray  # (B, H, Tq, D)
    k: np.ndarray  # (B, Hkv, Tk, D)
    v: np.ndarray  # (B, Hkv, Tk, D)
    out: np.ndarray  # (B, H, Tq, D)
    lse: np.ndarray  # (B, H, Tq)  log-sum-exp of each row of scaled logits, (FA.4)
    scale: float
    causal: bool
    block_q: int
    block_k: int


def _key_tile_end(i_last: int, Tk: int, offset: int, causal: bool) -> int:
    """One past the last key that query ``i_last`` may see (all Tk keys when not causal)."""
    return Tk if not causal else max(0, min(Tk, i_last + offset + 1))


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
) -> Tuple[np.ndarray, FlashCache]:
    """softmax(scale * q k^T, causally masked) v, one (block_q, block_k) tile at a time.

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D)  ->  out: (B, H, Tq, D)
    """
    op = f"{OP}_forward"
    B, H, Hkv, Tq, Tk, D = check_qkv(op, q, k, v)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, (int, np.integer)) or b < 1:
            _fail(op, name, "a positive integer", b)
    G = H // Hkv
    scale = float(1.0 / np.sqrt(D) if scale is None else scale)
    offset = Tk - Tq  # causal: query i sees key j iff j <= i + offset
    dtype = q.dtype
    qg = q.reshape(B, Hkv, G, Tq, D)
    out = np.empty((B, Hkv, G, Tq, D), dtype)
    lse = np.empty((B, Hkv, G, Tq), dtype)

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
            m_safe = np.where(m_new == -np.inf, 0.0, m_new).astype(dtype)  # rows with nothing visible yet
            alpha = np.exp(m_old - m_safe)  # rescale factor exp(m_old - m_new); 0 while m_old = -inf
            p = np.exp(s - m_safe[..., None])  # (B, Hkv, G, bq, bk)
            l_running = alpha * l_running + p.sum(axis=-1)
            acc = alpha[..., None] * acc + np.matmul(p, v[:, :, None, j0:j1])
            m_running = m_new

        # (FA.4)  normalise; a row that saw no key keeps out = 0 and lse = +inf
        seen = l_running > 0
        out[:, :, :, i0:i1] = acc / np.where(seen, l_running, 1.0)[..., None].astype(dtype)
        log_l = np.log(l_running, where=seen, out=np.zeros_like(l_running))
        lse[:, :, :, i0:i1] = np.where(seen, m_running + log_l, np.inf)

    out = out.reshape(B, H, Tq, D)
    lse = lse.reshape(B, H, Tq)
    return out, FlashCache(q, k, v, out, lse, scale, bool(causal), int(block_q), int(block_k))


def flash_attention_backward(dout: np.ndarray, cache: FlashCache) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients with respect to q, k, v, recomputing each tile of P from lse.

    dout: (B, H, Tq, D)  ->  dq: (B, H, Tq, D), dk, dv: (B, Hkv, Tk, D)
    """
    q, k, v, out, lse, scale, causal, block_q, block_k = cache
    B, H, Hkv, Tq, Tk, D = check_dout(f"{OP}_backward", dout, q, k)
    G = H // Hkv
    offset = Tk - Tq
    qg = q.reshape(B, Hkv, G, Tq, D)
    dout_g = dout.reshape(B, Hkv, G, Tq, D)
    lse_g = lse.reshape(B, Hkv, G, Tq)
    delta = np.einsum("bcgid,bcgid->bcgi", dout_g, out.reshape(B, Hkv, G, Tq, D))  # (FA.6)  D_i = rowsum(dO * O)

    dq = np.zeros((B, Hkv, G, Tq, D), q.dtype)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    # As FlashAttention-2: one program per key tile, owning dK and dV of its keys and
    # adding into dQ (an atomic add on the GPU).
    for j0 in range(0, Tk, block_k):
        j1 = min(j0 + block_k, Tk)
        k_tile, v_tile = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, Hkv, bk, D)
        # causal: query tiles whose last row is above key j0 see none of this tile: skipped
        first_row = max(0, j0 - offset) if causal else 0
        for i0 in range((first_row // block_q) * block_q, Tq, block_q):
            i1 = min(i0 + block_q, Tq)
            s = _tile_logits(qg[:, :, :, i0:i1], k_tile, scale, causal, i0, j0, offset)  # (B, Hkv, G, bq, bk)
            p = np.exp(s - lse_g[:, :, :, i0:i1, None])  # (FA.5)  P recomputed from lse
            do_tile = dout_g[:, :, :, i0:i1]  # (B, Hkv, G, bq, D)
            dv[:, :, j0:j1] += np.matmul(p.swapaxes(-1, -2), do_tile).sum(axis=2)  # (ATT.4) summed over G (ATT.12)
            dp = np.matmul(do_tile, v_tile[:, :, None].swapaxes(-1, -2))  # (ATT.5)
            ds = p * (dp - delta[:, :, :, i0:i1, None])  # (FA.7)
            dq[:, :, :, i0:i1] += scale * np.matmul(ds, k_tile[:, :, None])  # (ATT.8)
            dk[:, :, j0:j1] += scale * np.matmul(ds.swapaxes(-1, -2), qg[:, :, :, i0:i1]).sum(axis=2)  # (ATT.9)
    return dq.reshape(B, H, Tq, D), dk, dv


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
