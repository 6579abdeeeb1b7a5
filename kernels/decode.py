r"""Split-KV attention for decoding ("flash-decoding") in Triton: a few queries, a long cache.

Reference: ``npformer.ops.attention`` (and ``kernels.attention``, whose forward it equals).
Derivation: ``proofs/flash_decoding.md``. Shapes (the proof's letters)::

    q: (B, H, Tq, D)     k, v: (B, Hkv, Tk, D)     out: (B, H, Tq, D)     lse: (B, H, Tq)

with ``1 <= Tq <= 16`` (a decoding step, or a few speculative tokens) and ``Tk`` as long as
the KV cache. A FlashAttention forward puts one program on each tile of queries; with one
query per sequence that is ``B * H`` programs, too few to keep a GPU's streaming
multiprocessors busy while each walks the whole cache alone. Here the key axis is cut
instead:

- ``_decode_partial_kernel``: grid ``(S, row tiles, B * Hkv)``. Program ``s`` walks only
  the keys of split ``s`` (``keys_per_split`` of them, a multiple of ``BLOCK_N``) and
  writes the split's normalised output ``o_s`` and its log-sum-exp ``lse_s`` (FD.1), in
  float32. A split that holds no key the row may see writes ``o_s = 0``,
  ``lse_s = -inf``: the empty state.
- ``_decode_merge_kernel``: grid ``(B * H * Tq,)``. Each row combines its ``S`` partials
  (FD.2)::

      lse = log sum_s exp(lse_s)          out = sum_s exp(lse_s - lse) o_s

  evaluated as ``M = max_s lse_s``, ``w_s = exp(lse_s - M)``, ``L = sum_s w_s``,
  ``out = (sum_s w_s o_s) / L``, ``lse = M + log L``: every exponent is <= 0, and
  an empty split has weight ``exp(-inf) = 0`` (FD.3). A row no split gives a key to
  (causal with ``Tq > Tk``, or ``Tk = 0``) gets ``out = 0`` and ``lse = +inf``, the
  convention of ``kernels.attention``. A NaN or ``+inf`` visible logit (a NaN or infinite
  input) makes its split's running sum NaN; that split stores NaN, and a row with a NaN
  partial gets ``out = NaN`` and ``lse = NaN``, as the forward of ``kernels.attention``.

Grouped-query attention (FD.4): the ``G = H / Hkv`` query heads that share a key/value
head, times the ``Tq`` queries, are the rows of one tile (row ``r = g * Tq + i`` is query
``i`` of head ``hk * G + g``), so each key/value tile is loaded once for the whole group
and multiplied as one ``(G Tq) x D`` by ``D x BLOCK_N`` product. ``BLOCK_M``, the rows of
a tile, is the next power of two of ``G Tq`` (at least 16, at most 64, or 16 for fp32);
a larger group takes several row tiles.

Causal masking is aligned to the end, as in ``kernels.attention``: query ``i`` sees key
``j`` iff ``j <= i + (Tk - Tq)``.

fp32 / fp16 / bf16 inputs; logits, softmax statistics, partials and the merge are fp32.
Products as in ``kernels.attention`` (``_mm``: fp16/bf16 on the tensor cores, fp32 as
three TF32 products).

The number of splits ``S`` (FD.5): given, or chosen from ``Tk`` and the device's number
of streaming multiprocessors by ``choose_num_splits`` (enough programs for two per
multiprocessor, at least ``MIN_BLOCKS_PER_SPLIT`` key tiles per split, at most
``MAX_SPLITS``). ``BLOCK_N``, warps and stages come from ``CONFIGS``, one entry per
input width, head tile, tile rows and architecture family, every one compiled for sm_80 and sm_90
without spills by ``python -m kernels.aot`` (family "decode").

Functional API: ``flash_decode(q, k, v, causal=True, scale=None, num_splits=None,
return_lse=False)``. Forward only (inference): the result carries no gradient; training
uses ``kernels.flash_attention``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from npformer.ops._checks import check_bool, check_count, check_real

from ._common import check_runnable, check_tensor, interpreting
from .attention import LOG2E, _mm, block_d_for, dot_f32_for, precision_for

OP = "flash_decode"
MAX_TQ = 16  # queries per sequence this kernel is for; longer prompts go to kernels.flash_attention
MAX_D = 128
MAX_SPLITS = 256
MIN_BLOCKS_PER_SPLIT = 2  # key tiles a chosen split walks at least (a split costs a partial write)
MERGE_BLOCK_S = 16  # partials the merge reads at a time
MERGE_WARPS = 4


# ---------------------------------------------------------------------------------------
# kernels


@triton.jit
def _decode_partial_kernel(
    Q, K, V, OP, LSEP,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HKV, GROUP, Tq, Tk, D, NUM_SPLITS, keys_per_split, qk_scale,  # qk_scale = scale * log2(e)
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One split of the keys for one tile of packed rows of one key/value head: o_s, lse_s (FD.1)."""
    split = tl.program_id(0)
    start_r = tl.program_id(1) * BLOCK_M
    bhk = tl.program_id(2)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    # packed rows (FD.4): row r is query i = r % Tq of head h = hk * G + r // Tq
    offs_r = start_r + tl.arange(0, BLOCK_M)
    mask_r = offs_r < GROUP * Tq
    offs_i = offs_r % Tq
    offs_h = hk * GROUP + (offs_r // Tq).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q = tl.load(Q + b * sqb + offs_h[:, None] * sqh + offs_i[:, None] * sqt + offs_d[None, :] * sqd,
                mask=mask_r[:, None] & mask_d[None, :], other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(s - m_i) v

    diag = Tk - Tq  # causal: key j visible to query i iff j <= i + diag
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)  # an empty split (lo >= Tk) runs no iteration
    for start_n in range(lo, hi, BLOCK_N):
        offs_kn = start_n + offs_n
        mask_n = offs_kn < hi
        k = tl.load(K + offs_kn[:, None] * skt + offs_d[None, :] * skd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, DOT_F32) * qk_scale  # (BLOCK_M, BLOCK_N), one product per group (FD.4)
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_kn[None, :] <= offs_i[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
        # online softmax within the split  (FA.3)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_kn[:, None] * svt + offs_d[None, :] * svd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, DOT_F32)
        m_i = m_new

    # the split's state (FD.1): o_s = a / l, lse_s = ln 2 * (m + log2 l); empty: o_s = 0, lse_s = -inf.
    # A NaN or +inf logit makes l NaN (inf - inf): the split stores NaN, which the merge passes on (FD.3).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o_s = acc / l_safe[:, None]
    lse_s = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    # partials (B, H, Tq, S, D) and (B, H, Tq, S), float32, contiguous
    row = (b * (HKV * GROUP) + offs_h) * Tq + offs_i
    slot = row * NUM_SPLITS + split
    tl.store(OP + slot[:, None] * D + offs_d[None, :], o_s, mask=mask_r[:, None] & mask_d[None, :])
    tl.store(LSEP + slot, lse_s, mask=mask_r)


@triton.jit
def _decode_merge_kernel(
    OP, LSEP, O, LSE,
    sob, soh, sot, sod,
    H, Tq, D, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out, lse of one row from its NUM_SPLITS partials, weighted by exp(lse_s - lse) (FD.2)."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * Tq + i
    i = row % Tq
    h = (row // Tq) % H
    b = row // (Tq * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    LSEP += row * NUM_SPLITS
    OP += row * NUM_SPLITS * D

    # M = max_s lse_s  (FD.2)
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    nan_vec = tl.zeros([BLOCK_S], dtype=tl.int32)  # splits whose lse_s is NaN (a NaN or +inf logit)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        lse_s = tl.load(LSEP + s0 + offs_s, mask=s0 + offs_s < NUM_SPLITS, other=float("-inf"))
        nan_vec += (lse_s != lse_s).to(tl.int32)
        m_vec = tl.maximum(m_vec, tl.where(lse_s != lse_s, float("-inf"), lse_s))
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: every weight exp(-inf) = 0  (FD.3)
    poisoned = tl.sum(nan_vec, axis=0) > 0  # a NaN partial makes out and lse NaN  (FD.3)

    # w_s = exp(lse_s - M), L = sum_s w_s, out = sum_s w_s o_s / L  (FD.2)
    w_sum = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        mask_s = s0 + offs_s < NUM_SPLITS
        lse_s = tl.load(LSEP + s0 + offs_s, mask=mask_s, other=float("-inf"))
        w = tl.exp(lse_s - m_safe)  # empty split: exp(-inf) = 0  (FD.3)
        o_s = tl.load(OP + (s0 + offs_s)[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                      other=0.0)
        acc += tl.sum(w[:, None] * o_s, axis=0)
        w_sum += w
    total = tl.sum(w_sum, axis=0)
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)  # a row that sees no key: out = 0  (FD.3)
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("inf"))
    out = tl.where(poisoned, float("nan"), out)
    lse = tl.where(poisoned, float("nan"), lse)
    tl.store(O + b * sob + h * soh + i * sot + offs_d * sod, out.to(O.dtype.element_ty), mask=mask_d)
    tl.store(LSE + row, lse)


# ---------------------------------------------------------------------------------------
# configurations
#
# (BLOCK_N, num_warps, num_stages) by element size (2: fp16/bf16, 4: fp32), head tile
# (<= 64 or 128), rows of a tile (BLOCK_M: 16, 32 or 64, from G * Tq) and architecture
# family (80: Ampere and Ada, 90: Hopper and later). Every entry is compiled by
# ``python -m kernels.aot`` (family "decode") for sm_80 and sm_90 under Triton 3.6 and 3.9
# (``kernels/results/aot-full-triton*.txt``): none spills. Decoding reads the whole cache
# once and does little arithmetic on it, so the tiles are sized for memory traffic (two
# or three stages of K and V in flight), not for tensor-core throughput. fp32 tiles hold
# at most 16 rows: their three-TF32 products need about twice the registers of a 16-bit
# tile, and 32- and 64-row fp32 tiles spill at D = 128 (a larger group takes more row
# tiles instead). fp32 at D <= 64 on sm_90 takes 8 warps: with 4, every 32- or 64-key
# tile, with 1 or 2 stages, spills 8 to 28 bytes under 3.6 or 3.9 (ptxas keeps a small
# stack frame at 72 to 168 registers).

_BY_ROWS = {(2, 16): (64, 4, 3), (2, 32): (64, 4, 2), (2, 64): (64, 8, 3)}  # (element size, BLOCK_M)
CONFIGS = {(e, d, m, f): cfg for f in (80, 90) for d in (64, 128) for (e, m), cfg in _BY_ROWS.items()}
CONFIGS.update({(4, d, 16, f): (64, 4, 2) if d == 64 else (32, 4, 2) for f in (80, 90) for d in (64, 128)})
CONFIGS[(4, 64, 16, 90)] = (64, 8, 2)
MAX_BLOCK_M = {2: 64, 4: 16}  # rows of one tile by element size

# under the interpreter: 16-key tiles, so that short test caches cross tile and split edges
INTERPRET_CONFIG = (16, 4, 1)
INTERPRET_MAX_BLOCK_M = 16  # so that a group of a few heads already takes several row tiles


def launch_config(dtype: torch.dtype, BLOCK_D: int, BLOCK_M: int, arch: int, interpret: Optional[bool] = None
                  ) -> Tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the partial kernel for ``dtype``, head tile and
    tile rows on compute capability ``arch`` (80, 86, 90, ...)."""
    if (interpreting() if interpret is None else interpret):
        return INTERPRET_CONFIG
    elem = 4 if dtype == torch.float32 else 2
    return CONFIGS[(elem, 64 if BLOCK_D <= 64 else 128, BLOCK_M, 90 if arch >= 90 else 80)]


def block_m_for(rows: int, dtype: torch.dtype, interpret: Optional[bool] = None) -> int:
    """Rows of one tile for ``rows = G * Tq`` packed rows: the next power of two, at least 16,
    at most 64 (16 for fp32; 16 under the interpreter)."""
    if (interpreting() if interpret is None else interpret):
        cap = INTERPRET_MAX_BLOCK_M
    else:
        cap = MAX_BLOCK_M[4 if dtype == torch.float32 else 2]
    return min(max(16, triton.next_power_of_2(max(int(rows), 1))), cap)


def choose_num_splits(Tk: int, programs: int, sm_count: int, BLOCK_N: int) -> int:
    """The number of key splits S for ``programs`` programs per split (B * Hkv * row tiles)
    on a device with ``sm_count`` multiprocessors (FD.5).

    Enough splits that ``S * programs`` reaches two programs per multiprocessor, but no
    split shorter than ``MIN_BLOCKS_PER_SPLIT`` key tiles (each split costs a partial
    write and a share of the merge), and at most ``MAX_SPLITS``; then as few splits as
    give each the same number of tiles (no split left empty)."""
    n_blocks = max(1, triton.cdiv(Tk, BLOCK_N))  # n  (FD.5)
    want = triton.cdiv(2 * sm_count, max(programs, 1))
    splits = max(1, min(want, n_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))  # S0  (FD.5)
    blocks_per_split = triton.cdiv(n_blocks, splits)
    return triton.cdiv(n_blocks, blocks_per_split)  # S: no chosen split empty  (FD.5)


def keys_per_split_for(Tk: int, num_splits: int, BLOCK_N: int) -> int:
    """Keys of one split: whole tiles, the tiles shared out as evenly as ``num_splits`` allows
    (the last splits are shorter, or empty when there are more splits than tiles)."""
    return max(1, triton.cdiv(triton.cdiv(Tk, BLOCK_N), num_splits)) * BLOCK_N


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under the interpreter a nominal 132 (an H100)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _arch(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


# ---------------------------------------------------------------------------------------
# launchers


class DecodePlan(NamedTuple):
    """How a call is cut up: splits, keys per split, the tile sizes and the grid."""

    num_splits: int
    keys_per_split: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    grid: Tuple[int, int, int]


def _check(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, x, ndim=4)
    check_runnable(OP, q)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{OP}: argument '{name}' expected dtype {q.dtype} on {q.device}, "
                             f"got {x.dtype} on {x.device}")
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{OP}: argument 'k' expected shape ({B}, *, *, {D}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{OP}: argument 'v' expected shape {tuple(k.shape)} (same as 'k'), got {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{OP}: argument 'k' expected a number of heads dividing H = {H}, got {Hkv}")
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{OP}: argument 'q' expected a head size D in [1, {MAX_D}], got {D}")
    if Tq > MAX_TQ:
        raise ValueError(f"{OP}: argument 'q' expected at most {MAX_TQ} queries per sequence (Tq), got {Tq}; "
                         "longer prompts: kernels.flash_attention")


def _check_options(causal, scale, num_splits, return_lse):
    causal = check_bool(OP, "causal", causal)
    return_lse = check_bool(OP, "return_lse", return_lse)
    if scale is not None:
        scale = check_real(OP, "scale", scale, lo=0.0, lo_open=True)
    if num_splits is not None:
        num_splits = check_count(OP, "num_splits", num_splits, 1, MAX_SPLITS)
    return causal, scale, num_splits, return_lse


def plan(q: torch.Tensor, k: torch.Tensor, num_splits: Optional[int] = None) -> DecodePlan:
    """The splits, tiles and grid of the partial kernel for these inputs (``num_splits``: given or chosen)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    BLOCK_D = block_d_for(D)
    BLOCK_M = block_m_for((H // Hkv) * Tq, q.dtype)
    BLOCK_N, num_warps, num_stages = launch_config(q.dtype, BLOCK_D, BLOCK_M, _arch(q))
    row_tiles = triton.cdiv((H // Hkv) * Tq, BLOCK_M)
    if num_splits is None:
        num_splits = choose_num_splits(Tk, B * Hkv * row_tiles, sm_count(q.device), BLOCK_N)
    keys = keys_per_split_for(Tk, num_splits, BLOCK_N)
    return DecodePlan(num_splits, keys, BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages,
                      (num_splits, row_tiles, B * Hkv))


def decode_partials(q, k, v, causal=True, scale=None, num_splits=None):
    """Launch the partial kernel only. -> o_part (B, H, Tq, S, D) fp32, lse_part (B, H, Tq, S)
    fp32 (natural log; -inf for a split that holds no visible key, NaN for one that holds a NaN or +inf
    logit), and the plan (FD.1)."""
    _check(q, k, v)
    causal, scale, num_splits, _ = _check_options(causal, scale, num_splits, False)
    return _partials(q, k, v, causal, scale, num_splits)


def _partials(q, k, v, causal, scale, num_splits):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    p = plan(q, k, num_splits)
    o_part = torch.empty((B, H, Tq, p.num_splits, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, H, Tq, p.num_splits), dtype=torch.float32, device=q.device)
    if Tk == 0:
        return o_part.zero_(), lse_part.fill_(float("-inf")), p
    _decode_partial_kernel[p.grid](
        q, k, v, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(),
        Hkv, H // Hkv, Tq, Tk, D, p.num_splits, p.keys_per_split, scale * LOG2E,
        CAUSAL=bool(causal), PRECISION=precision_for(q.dtype), DOT_F32=dot_f32_for(q.dtype),
        BLOCK_M=p.BLOCK_M, BLOCK_N=p.BLOCK_N, BLOCK_D=p.BLOCK_D,
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    return o_part, lse_part, p


def decode_fwd(q, k, v, causal=True, scale=None, num_splits=None):
    """Launch both kernels on checked inputs. -> out (B, H, Tq, D) in q's dtype, lse (B, H, Tq) fp32."""
    B, H, Tq, D = q.shape
    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    o_part, lse_part, p = _partials(q, k, v, causal, scale, num_splits)
    _decode_merge_kernel[(B * H * Tq,)](
        o_part, lse_part, out, lse, *out.stride(), H, Tq, D, p.num_splits,
        BLOCK_S=MERGE_BLOCK_S, BLOCK_D=p.BLOCK_D, num_warps=MERGE_WARPS,
    )
    return out, lse



def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                 scale: Optional[float] = None, num_splits: Optional[int] = None, return_lse: bool = False):
    """softmax(scale * q k^T, causally masked) v per head, the keys split over programs.

    q: (B, H, Tq, D) with Tq <= 16, k, v: (B, Hkv, Tk, D), Hkv dividing H  ->  out: (B, H, Tq, D)
    in q's dtype (and lse: (B, H, Tq) fp32, natural log, when ``return_lse``). ``scale``
    defaults to 1/sqrt(D); ``num_splits`` (1 ... 256) defaults to ``choose_num_splits``;
    more splits than key tiles leaves some empty, which the merge weighs 0. Forward only.
    """
    _check(q, k, v)
    causal, scale, num_splits, return_lse = _check_options(causal, scale, num_splits, return_lse)
    with torch.no_grad():
        out, lse = decode_fwd(q, k, v, causal, scale, num_splits)
    return (out, lse) if return_lse else out
