"""Fused attention in Triton (FlashAttention-2 schedule): forward and backward.

Reference: ``npformer.ops.flash_attention`` (the same tiling in NumPy) and
``npformer.ops.attention``. Shapes (the proof's letters)::

    q: (B, H, Tq, D)     k, v: (B, Hkv, Tk, D)     out: (B, H, Tq, D)     lse: (B, H, Tq)

- Grouped-query / multi-query attention: Hkv divides H; query head h reads key/value
  head h // G with G = H // Hkv.
- ``causal``: query i sees key j iff j <= i + (Tk - Tq) (the last query is aligned with
  the last key). A row that sees no key (causal with Tq > Tk) gets output 0 and
  ``lse = +inf``, so its recomputed probabilities in the backward are 0: no NaN.
- Head sizes up to 128, any D (the tile is padded to the next power of two, at
  least 16, and masked).
- fp16 / bf16 / fp32 inputs; logits, softmax statistics and accumulators are fp32.
  fp16/bf16 products run on the tensor cores; fp32 products as three TF32 products
  (``input_precision="tf32x3"``), accurate to about fp32 round-off, not plain TF32.

Kernels (one program = one tile, loops inside the program):

- ``_attn_fwd_kernel``: grid (Tq / BLOCK_M, B*H). Online softmax over key tiles in
  base 2 (``exp2``; the scale is folded with log2(e)); writes out and the natural-log
  row log-sum-exp ``lse``.
- ``_attn_bwd_preprocess``: delta = rowsum(dO * O), the ``D_i`` of FlashAttention-2.
- ``_attn_bwd_dkdv_kernel``: grid (Tk / BLOCK_N, B*Hkv). A program holds one key/value
  tile and walks the query tiles of *every* query head of its group, so dK and dV are
  summed over the group inside the program: no atomics, deterministic.
- ``_attn_bwd_dq_kernel``: grid (Tq / BLOCK_M, B*H). A program holds one query tile and
  walks the key tiles.

Tile sizes, warps and stages are autotuned on a GPU among the configurations of
``CONFIGS`` for the device's architecture (all checked free of register spills by
``kernels.aot`` under Triton 3.6 and 3.9), once per length bucket (``length_bucket``:
the next power of two of Tq and of Tk), so that decoding, one key longer at every
step, is not re-timed at every step; ``AUTOTUNE = False`` takes the first entry
instead, and ``with pinned(fwd=..., dkdv=..., dq=...)`` forces given entries. Under the
Triton interpreter small tiles are used (``INTERPRET_CONFIGS``).

Functional API: ``flash_attention(q, k, v, causal=..., scale=..., return_lse=...)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional

import torch
import triton
import triton.language as tl

from npformer.ops._checks import check_bool, check_real

from ._common import SMEM_LIMIT, check_runnable, check_tensor, interpreting

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


# ---------------------------------------------------------------------------------------
# kernels


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation. ``DOT_F32`` multiplies fp32 copies of the operands:
    the launcher sets it only under the Triton interpreter for bf16 inputs, whose
    ``tl.dot`` there multiplies the raw bf16 bit patterns. A bf16 x bf16 product is
    exact in fp32, so the result is the one the tensor cores give."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    H, GROUP, Tq, Tk, D, qk_scale,  # qk_scale = scale * log2(e)
    Tq_bucket, Tk_bucket,  # length buckets: keys of the autotuner's choices, not read here
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) v

    diag = Tk - Tq  # causal: key j visible to query i iff j <= i + diag
    if CAUSAL:
        # keys beyond the last one this tile's bottom row may see are skipped
        hi = tl.maximum(tl.minimum(Tk, start_m + BLOCK_M + diag), 0)
    else:
        hi = Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < Tk
        k = tl.load(K + offs_kn[:, None] * skt + offs_d[None, :] * skd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, DOT_F32) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_kn[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        # online softmax: merge this tile into the running statistics  (FA.3)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_kn[:, None] * svt + offs_d[None, :] * svd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, DOT_F32)
        m_i = m_new

    seen = l_i > 0.0  # (FA.4); a row that saw no key keeps out = 0, lse = +inf  (ATT.11)
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))  # ln 2 * log2-sum-exp
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=mask_m)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    sob, soh, sot, sod,
    sdb, sdh, sdt, sdd,
    H, Tq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]  (FA.6)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    skgb, skgh, skgt, skgd,  # dk strides
    svgb, svgh, svgt, svgd,  # dv strides
    H, HKV, GROUP, Tq, Tk, D, qk_scale, scale,
    Tq_bucket, Tk_bucket,  # length buckets: keys of the autotuner's choices, not read here
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < Tk
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = Tk - Tq
    lo = 0
    if CAUSAL:
        # the first query that sees key start_n is start_n - diag
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
    n_tiles = tl.cdiv(Tq - lo, BLOCK_M)
    # One flat loop over (query head of the group, query tile): every query head that
    # shares this key/value head contributes to the same dK, dV accumulators.
    for it in range(0, GROUP * n_tiles):
        h = hk * GROUP + it // n_tiles
        start_m = lo + (it % n_tiles) * BLOCK_M
        offs_m = start_m + offs_m0
        mask_m = offs_m < Tq
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=mask_md, other=0.0)
        row = (b * H + h) * Tq  # offset of this head's rows in LSE and DELTA
        # lse = +inf in rows that see no key: their probabilities come out 0
        lse2 = tl.load(LSE + row + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
        # transposed tile: sT[n, m] = qk_scale * k_n . q_m (base-2 logits)
        sT = _mm(k, tl.trans(q), PRECISION, DOT_F32) * qk_scale
        visible = mask_n[:, None] & mask_m[None, :]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + diag)
        sT = tl.where(visible, sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])  # (FA.5) P recomputed from lse; 0 where hidden
        dv += _mm(pT.to(do.dtype), do, PRECISION, DOT_F32)  # (ATT.4) dV = P^T dO, summed over the group (ATT.12)
        dpT = _mm(v, tl.trans(do), PRECISION, DOT_F32)  # (ATT.5) dP = dO V^T, transposed
        dsT = pT * (dpT - delta[None, :])  # (FA.7) dS = P * (dP - delta)
        dk += _mm(dsT.to(q.dtype), q, PRECISION, DOT_F32)  # (ATT.9) dK = scale dS^T Q, scale applied at the end
    dk = dk * scale
    tl.store(DK + b * skgb + hk * skgh + offs_n[:, None] * skgt + offs_d[None, :] * skgd,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * svgb + hk * svgh + offs_n[:, None] * svgt + offs_d[None, :] * svgd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    sqgb, sqgh, sqgt, sqgd,  # dq strides
    H, GROUP, Tq, Tk, D, qk_scale, scale,
    Tq_bucket, Tk_bucket,  # length buckets: keys of the autotuner's choices, not read here
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=mask_md, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd, mask=mask_md, other=0.0)
    row = bh.to(tl.int64) * Tq
    lse2 = tl.load(LSE + row + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = Tk - Tq
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, start_m + BLOCK_M + diag), 0)
    else:
        hi = Tk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < Tk
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :] * skd, mask=mask_nd, other=0.0)
        v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=mask_nd, other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, DOT_F32) * qk_scale
        visible = mask_m[:, None] & mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])  # (FA.5) P recomputed from lse; 0 where hidden
        dp = _mm(do, tl.trans(v), PRECISION, DOT_F32)  # (ATT.5)
        ds = p * (dp - delta[:, None])  # (FA.7)
        dq += _mm(ds.to(k.dtype), k, PRECISION, DOT_F32)  # (ATT.8) dQ = scale dS K, scale applied at the end
    dq = dq * scale
    tl.store(DQ + b * sqgb + h * sqgh + offs_m[:, None] * sqgt + offs_d[None, :] * sqgd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------
# configurations: the autotuner's search space
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, element size (2: fp16/bf16,
# 4: fp32), head-dim tile (<= 64 or 128) and architecture family (80: Ampere and Ada,
# 90: Hopper and later). Every entry was compiled with ``python -m kernels.aot --full``
# for sm_80 and sm_90 under Triton 3.6 and 3.9 (``kernels/results/aot-full-triton*.txt``,
# registers and spills read off the cubins Triton builds, i.e. with its own ptxas
# flags): none spills registers with either and all fit in shared memory; on sm_90
# the fp16/bf16 entries use wgmma (M-side tiles of at least 64 rows). The register
# allocation differs between releases: an entry that sits at the 255-register limit
# with one may spill with the other, and such entries are left out of the table.
# That is why the Hopper fp32 tables hold no wgmma-sized forward tile at D = 128:
# each one tried -- (128, 32, 8, 1), (128, 16, 8, 1), (64, 16, 4, 1 to 3) and
# (64, 32, 4 or 8, 1 to 3) -- spills 4 to 136 bytes under 3.6 or 3.9.

CONFIGS = {
    # 16-bit inputs
    ("fwd", 2, 64, 80): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                         (128, 64, 8, 4)],
    ("fwd", 2, 128, 80): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dkdv", 2, 64, 80): [(32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 2), (32, 128, 8, 3),
                          (16, 64, 4, 2)],
    ("dkdv", 2, 128, 80): [(64, 64, 8, 2), (16, 64, 4, 2), (16, 128, 8, 2)],
    ("dq", 2, 64, 80): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2),
                        (128, 64, 8, 2)],
    ("dq", 2, 128, 80): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 128, 8, 2),
                         (128, 32, 8, 2)],
    # fp32 inputs (products as 3xTF32): twice the bytes per tile, smaller tiles
    ("fwd", 4, 64, 80): [(64, 32, 4, 3), (128, 32, 8, 2)],
    ("fwd", 4, 128, 80): [(32, 32, 4, 2)],
    ("dkdv", 4, 64, 80): [(16, 32, 4, 2)],
    ("dkdv", 4, 128, 80): [(16, 16, 4, 2)],
    ("dq", 4, 64, 80): [(64, 16, 4, 2), (32, 32, 4, 2)],
    ("dq", 4, 128, 80): [(16, 32, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
}
# Hopper: the Ampere entries, plus those that only stay spill-free with its wgmma
# register layout, and its own fp32 tables where wgmma-sized tiles differ.
CONFIGS.update({
    (kind, e, d, 90): list(v) for (kind, e, d, arch), v in CONFIGS.items() if arch == 80
})
CONFIGS[("fwd", 2, 128, 90)] += [(128, 32, 4, 3)]
CONFIGS[("dkdv", 2, 64, 90)] += [(64, 64, 8, 2)]
CONFIGS[("dkdv", 2, 128, 90)] += [(32, 64, 4, 2), (32, 128, 8, 2)]
CONFIGS[("dq", 2, 128, 90)] += [(128, 64, 8, 2)]
CONFIGS[("fwd", 4, 128, 90)] = [(32, 64, 8, 2), (32, 32, 4, 2)]
CONFIGS[("dkdv", 4, 64, 90)] = [(16, 64, 4, 2), (16, 128, 8, 2)]
CONFIGS[("dq", 4, 128, 90)] = [(16, 32, 4, 2), (16, 64, 8, 2), (16, 16, 4, 2)]
CONFIGS[("dq", 4, 64, 90)] = [(64, 32, 4, 2), (64, 16, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)]

# under the interpreter: small tiles, so that short test sequences cross tile edges; the
# first is the default, the others (BLOCK_M != BLOCK_N) are reached by ``pinned``
INTERPRET_CONFIGS = [(16, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)]

def smem_estimate(kind: str, BLOCK_M: int, BLOCK_N: int, BLOCK_D: int, elem_bytes: int, num_stages: int) -> int:
    """A conservative estimate (bytes) of the shared memory a configuration asks for, used
    to prune the table on devices with less shared memory than sm_80 / sm_90 (e.g. sm_86).

    The tiles that are staged (``num_stages`` copies of the streamed ones) and the P / dS
    tile; fp32 builds (3xTF32 products) were measured at up to 1.45x that, so they get
    1.5x. The dK/dV kernel also stages the fp32 lse and delta of each query tile it
    streams. ``tests/kernels/test_aot.py`` checks the estimate against the compiled builds.
    """
    row_stats = 0
    if kind == "fwd":
        elems = BLOCK_M * BLOCK_D + num_stages * 2 * BLOCK_N * BLOCK_D + BLOCK_M * BLOCK_N
    else:
        resident, streamed = (BLOCK_N, BLOCK_M) if kind == "dkdv" else (BLOCK_M, BLOCK_N)
        elems = 2 * resident * BLOCK_D + num_stages * 2 * streamed * BLOCK_D + 2 * BLOCK_M * BLOCK_N
        if kind == "dkdv":
            row_stats = num_stages * 2 * BLOCK_M * 4
    return elems * elem_bytes * (3 if elem_bytes == 4 else 2) // 2 + row_stats


def config_space(kind: str, dtype: torch.dtype, BLOCK_D: int, arch: int, interpret: Optional[bool] = None
                 ) -> List[tuple]:
    """The configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) ``kind`` may launch with
    on compute capability ``arch`` (80, 86, 90, ...)."""
    if (interpreting() if interpret is None else interpret):
        return list(INTERPRET_CONFIGS)
    elem = 4 if dtype == torch.float32 else 2
    family = 90 if arch >= 90 else 80
    table = CONFIGS[(kind, elem, 64 if BLOCK_D <= 64 else 128, family)]
    limit = SMEM_LIMIT.get(arch, SMEM_LIMIT[family])
    if limit >= SMEM_LIMIT[family]:
        return list(table)
    fits = [c for c in table if smem_estimate(kind, c[0], c[1], BLOCK_D, elem, c[3]) <= limit]
    return fits or [min(table, key=lambda c: c[0] * c[1] * c[3])]


def _arch(t: torch.Tensor) -> int:
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


# Autotuning: on (default) the autotuner times every configuration of the table the first
# time it meets a new (length buckets of Tq and Tk, head tile, causal, group, dtype), and
# keeps that choice for every later call in the same buckets: decoding, whose key length
# grows by one per step, is timed once per power of two, not once per step. Off, the
# first entry of the table is used without timing (the tests do this to stay fast).
# Under the interpreter there is nothing to time: the first entry is used.
AUTOTUNE = True
MIN_LENGTH_BUCKET = 16


def length_bucket(T: int) -> int:
    """The autotuner's key for a sequence length: the next power of two, at least 16
    (so lengths 17 ... 32 share one tuning, and 1 ... 16 another)."""
    return max(MIN_LENGTH_BUCKET, triton.next_power_of_2(max(int(T), 1)))


_PINNED: dict = {}  # kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages) forced by ``pinned``


def _key(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        allowed = config_space(kind, q.dtype, kwargs["BLOCK_D"], _arch(q) if q.is_cuda else 90)
        if kind in _PINNED:
            want = [_PINNED[kind]]
        elif AUTOTUNE and not interpreting():
            want = allowed
        else:
            want = allowed[:1]
        kept = [c for c in configs if _key(c) in want]
        if not kept:
            raise ValueError(f"flash_attention: configuration {want} of the {kind} kernel is not among {allowed}")
        return kept

    return prune


def _autotuned(fn, kind):
    if interpreting():
        configs = INTERPRET_CONFIGS
    else:
        configs = list(dict.fromkeys(c for (k, *_), table in CONFIGS.items() if k == kind for c in table))
    return triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs],
        key=["Tq_bucket", "Tk_bucket", "BLOCK_D", "CAUSAL", "GROUP"],
        prune_configs_by={"early_config_prune": _pruner(kind)},
    )(fn)


_attn_fwd = _autotuned(_attn_fwd_kernel, "fwd")
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, "dkdv")
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, "dq")


@contextlib.contextmanager
def pinned(fwd: Optional[tuple] = None, dkdv: Optional[tuple] = None, dq: Optional[tuple] = None):
    """Launch the kernels with exactly these configurations (BLOCK_M, BLOCK_N, num_warps,
    num_stages) inside the block; each must be in the kernel's table (``config_space``)."""
    saved = dict(_PINNED)
    _PINNED.update({k: tuple(v) for k, v in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)) if v is not None})
    _forget_choices()
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(saved)
        _forget_choices()


def _forget_choices() -> None:
    """Drop the autotuners' remembered choices (so that a pin or ``AUTOTUNE`` takes effect)."""
    for tuner in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq):
        tuner.cache.clear()


def precision_for(dtype: torch.dtype) -> str:
    """fp32 products as three TF32 tensor-core products ("tf32x3": fp32-level accuracy,
    registers like a 16-bit build); the setting has no effect on fp16/bf16 products."""
    if dot_f32_for(dtype):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def dot_f32_for(dtype: torch.dtype) -> bool:
    """Products on fp32 copies: only for bf16 under the interpreter (see ``_mm``)."""
    return dtype == torch.bfloat16 and interpreting()


def block_d_for(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# ---------------------------------------------------------------------------------------
# launchers


def _check(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor("flash_attention", name, x, ndim=4)
    check_runnable("flash_attention", q)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"flash_attention: argument '{name}' expected dtype {q.dtype} on {q.device}, "
                             f"got {x.dtype} on {x.device}")
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"flash_attention: argument 'k' expected shape ({B}, *, *, {D}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"flash_attention: argument 'v' expected shape {tuple(k.shape)} (same as 'k'), "
                         f"got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"flash_attention: argument 'k' expected a number of heads dividing H = {H}, got {Hkv}")
    if not 1 <= D <= 128:
        raise ValueError(f"flash_attention: argument 'q' expected a head size D in [1, 128], got {D}")


def _check_options(causal, return_lse, scale):
    check_bool("flash_attention", "causal", causal)
    check_bool("flash_attention", "return_lse", return_lse)
    if scale is not None:
        check_real("flash_attention", "scale", scale, lo=0.0, lo_open=True)


def attention_fwd(q, k, v, causal=False, scale=None):
    """Launch the forward. -> out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32 (natural log)."""
    _check(q, k, v)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        lse.fill_(float("inf") if Tk == 0 else 0.0)
        return o.zero_(), lse
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, H // Hkv, Tq, Tk, D, scale * LOG2E, length_bucket(Tq), length_bucket(Tk),
        CAUSAL=bool(causal), PRECISION=precision_for(q.dtype), DOT_F32=dot_f32_for(q.dtype),
        BLOCK_D=block_d_for(D),
    )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, causal=False, scale=None):
    """Launch the backward: preprocess, dK/dV, dQ. -> dq, dk, dv in the inputs' dtype."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    BLOCK_D = block_d_for(D)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    PRE_M = 16 if interpreting() else 64
    _attn_bwd_preprocess[(triton.cdiv(Tq, PRE_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Tq, D, BLOCK_M=PRE_M, BLOCK_D=BLOCK_D,
    )
    common = dict(CAUSAL=bool(causal), PRECISION=precision_for(q.dtype), DOT_F32=dot_f32_for(q.dtype),
                  BLOCK_D=BLOCK_D)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, Hkv, H // Hkv, Tq, Tk, D, scale * LOG2E, scale, length_bucket(Tq), length_bucket(Tk), **common,
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // Hkv, Tq, Tk, D, scale * LOG2E, scale, length_bucket(Tq), length_bucket(Tk), **common,
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper: the forward saves q, k, v, out and lse (not the (Tq, Tk) probabilities)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, return_lse: bool = False):
    """softmax(scale * q k^T, causally masked) v per head, fused.

    q: (B, H, Tq, D), k, v: (B, Hkv, Tk, D)  ->  out: (B, H, Tq, D)
    (and lse: (B, H, Tq) fp32 when ``return_lse``). ``scale`` defaults to 1/sqrt(D)
    and must be a finite number > 0; ``causal`` and ``return_lse`` are bools.
    """
    _check(q, k, v)
    _check_options(causal=causal, return_lse=return_lse, scale=scale)
    out, lse = AttentionFunction.apply(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out
