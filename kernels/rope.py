"""Rotary position embedding in Triton: q and k rotated in one launch, forward and backward.

Reference: ``npformer.ops.rope`` (rotate-half convention, as Hugging Face LLaMA) and
``proofs/rope.md``. Shapes: ``q: (B, H, T, D)``, ``k: (B, Hkv, T, D)``, ``D`` even,
``K = D/2`` pairs ``(i, i + K)`` per row::

    theta[p, i] = p * base ** (-2i / D)                      (ROPE.1)
    y[i]     = x[i] cos(theta) - x[i + K] sin(theta)
    y[i + K] = x[i + K] cos(theta) + x[i] sin(theta)         (ROPE.3)

The position of row t is ``offset + t``, or ``positions[t]`` / ``positions[b, t]``.
The backward is the same rotation by ``-theta`` (ROPE.5): one kernel serves both,
with the sign of the sine as a compile-time flag.

Precision: the angles are formed in float64 (the frequencies come from the host in
float64, as the reference computes them) and their cosine and sine are rounded to
fp32; the rotation is done in fp32 and the result rounded once to the input dtype.

One program per (b, t): it computes the K cosines and sines once and applies them
to every head of q and of k, ``BLOCK_H`` heads at a time (tile and warps:
``launch_config``). Any strides are accepted, so ``q`` may be a transposed view of a
(B, T, H, D) projection.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from npformer.ops._checks import check_bool, check_count, check_real

from ._common import check_runnable, check_tensor


@triton.jit
def _rotate_heads(
    X, Y, base_x, base_y, n_heads, stride_xh, stride_xd, stride_yh, stride_yd,
    cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rotate the n_heads rows X[base_x + h*stride_xh, :] into Y (cos, sin: (BLOCK_K,) fp32)."""
    i = tl.arange(0, BLOCK_K)
    mask_i = i < HALF
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & mask_i[None, :]
        px = X + base_x + h[:, None].to(tl.int64) * stride_xh + i[None, :] * stride_xd
        x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(px + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos[None, :] - x2 * sin[None, :]  # (ROPE.3)
        y2 = x2 * cos[None, :] + x1 * sin[None, :]  # (ROPE.3)
        py = Y + base_y + h[:, None].to(tl.int64) * stride_yh + i[None, :] * stride_yd
        tl.store(py, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(py + HALF * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, INV_FREQ, POS,
    sqb, sqh, sqt, sqd,  # q strides
    skb, skh, skt, skd,  # k strides
    sob, soh, sot, sod,  # q-out strides
    spb, sph, spt, spd,  # k-out strides
    stride_pos_b, stride_pos_t,
    T, H, HKV, offset,
    HAS_POS: tl.constexpr, INVERSE: tl.constexpr,
    HALF: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // T
    t = pid % T
    if HAS_POS:
        p = tl.load(POS + b * stride_pos_b + t * stride_pos_t).to(tl.float64)
    else:
        p = (t + offset).to(tl.float64)
    i = tl.arange(0, BLOCK_K)
    inv_freq = tl.load(INV_FREQ + i, mask=i < HALF, other=0.0)  # float64 (ROPE.1)
    theta = p * inv_freq  # (ROPE.1)
    cos = tl.cos(theta).to(tl.float32)
    sin = tl.sin(theta).to(tl.float32)
    if INVERSE:
        sin = -sin  # (ROPE.5): rotate by -theta
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    _rotate_heads(Q, QO, b64 * sqb + t64 * sqt, b64 * sob + t64 * sot, H, sqh, sqd, soh, sod,
                  cos, sin, HALF, BLOCK_H, BLOCK_K)
    _rotate_heads(K, KO, b64 * skb + t64 * skt, b64 * spb + t64 * spt, HKV, skh, skd, sph, spd,
                  cos, sin, HALF, BLOCK_H, BLOCK_K)


def inv_freq_table(D: int, base: float, device) -> torch.Tensor:
    """(D/2,) float64: base ** (-2i / D), exactly as the reference forms it (ROPE.1)."""
    return float(base) ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)


def block_heads(H: int, HALF: int, tile: int = 1024) -> int:
    """Heads per step: a (BLOCK_H, next_pow2(K)) tile of about ``tile`` elements."""
    return max(1, min(triton.next_power_of_2(max(H, 1)), max(1, tile // triton.next_power_of_2(HALF))))


def launch_config(H: int, HALF: int, elem_bytes: int):
    """(BLOCK_K, BLOCK_H, num_warps) for ``H`` heads (the larger of q's and k's) of ``HALF``
    pairs, in a dtype of ``elem_bytes`` bytes.

    fp16 / bf16: tiles of up to 1024 elements, 4 warps for a full tile, else 2.
    fp32: tiles of up to 512 elements and one warp per 64 of them (2 elements per
    thread, at most 8 warps). The program calls the float64 cosine and sine, whose slow
    argument reduction is a real function call; with more fp32 values live per thread
    around it, ptxas spills registers under some Triton releases (``python -m kernels.aot``).
    """
    BLOCK_K = triton.next_power_of_2(HALF)
    if elem_bytes >= 4:
        BLOCK_H = block_heads(H, HALF, 512)
        return BLOCK_K, BLOCK_H, max(1, min(8, BLOCK_H * BLOCK_K // 64))
    BLOCK_H = block_heads(H, HALF)
    return BLOCK_K, BLOCK_H, 4 if BLOCK_H * BLOCK_K >= 1024 else 2


MAX_KERNEL_POSITION = 2**31 - 1  # positions are int32 inside the kernel


def _check(q, k, base, offset, positions, inverse=False):
    for name, x in (("q", q), ("k", k)):
        check_tensor("apply_rope", name, x, ndim=4)
    check_runnable("apply_rope", q)
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: argument 'k' expected shape ({B}, *, {T}, {D}), got {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"apply_rope: argument 'k' expected dtype {q.dtype} on {q.device}, "
                         f"got {k.dtype} on {k.device}")
    if D < 2 or D % 2:
        raise ValueError(f"apply_rope: argument 'q' expected an even size D >= 2 of the last axis, got {D}")
    check_real("apply_rope", "base", base, lo=0.0, lo_open=True)
    # The kernel forms positions in int32 (and angles in float32, which are coarse long before):
    # the last position must fit, or it would wrap silently.
    check_count("apply_rope", "offset", offset, lo=0, hi=MAX_KERNEL_POSITION - max(T - 1, 0))
    check_bool("apply_rope", "inverse", inverse)
    if positions is not None:
        if offset != 0:
            raise ValueError(f"apply_rope: argument 'offset' expected 0 when 'positions' is given, got {offset}")
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"apply_rope: argument 'positions' expected a torch.Tensor, "
                            f"got {type(positions).__name__}")
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise ValueError(f"apply_rope: argument 'positions' expected an integer dtype, got {positions.dtype}")
        if tuple(positions.shape) not in ((T,), (B, T)):
            raise ValueError(f"apply_rope: argument 'positions' expected shape ({T},) or ({B}, {T}), "
                             f"got {tuple(positions.shape)}")
        if positions.device != q.device:
            raise ValueError(f"apply_rope: argument 'positions' expected device {q.device}, got {positions.device}")
        if positions.numel() and int(positions.abs().max()) > MAX_KERNEL_POSITION:
            raise ValueError(f"apply_rope: argument 'positions' expected values with |p| <= {MAX_KERNEL_POSITION}, "
                             f"got {int(positions.abs().max())}")


def rope_apply(q, k, *, base=10000.0, offset=0, positions=None, inverse=False, out=None):
    """Launch the kernel: rotate q and k by theta (or by -theta when ``inverse``).

    q: (B, H, T, D), k: (B, Hkv, T, D)  ->  (q_rot, k_rot), written to ``out`` if given
    (``out=(q, k)`` rotates in place).
    """
    _check(q, k, base, offset, positions, inverse)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qo, ko = out if out is not None else (torch.empty_like(q), torch.empty_like(k))
    HALF = D // 2
    if positions is not None:
        pos = positions if positions.dim() == 2 else positions[None, :]
        stride_pos_b = pos.stride(0) if positions.dim() == 2 else 0
        stride_pos_t = pos.stride(1)
    else:
        pos, stride_pos_b, stride_pos_t = q, 0, 0  # placeholder, never read
    if B * T == 0:
        return qo, ko
    BLOCK_K, BLOCK_H, num_warps = launch_config(max(H, Hkv), HALF, q.element_size())
    _rope_kernel[(B * T,)](
        q, k, qo, ko, inv_freq_table(D, base, q.device), pos,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        stride_pos_b, stride_pos_t,
        T, H, Hkv, int(offset),
        HAS_POS=positions is not None, INVERSE=bool(inverse),
        HALF=HALF, BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper: the backward rotates (dq, dk) by -theta (ROPE.5)."""

    @staticmethod
    def forward(ctx, q, k, base, offset, positions, inplace):
        out = (q, k) if inplace else None
        qo, ko = rope_apply(q, k, base=base, offset=offset, positions=positions, out=out)
        if inplace:
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(positions)
        ctx.base, ctx.offset = base, offset
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        (positions,) = ctx.saved_tensors
        dq_in, dk_in = rope_apply(dq, dk, base=ctx.base, offset=ctx.offset, positions=positions, inverse=True)
        return dq_in, dk_in, None, None, None, None


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    base: float = 10000.0,
    offset: int = 0,
    positions: Optional[torch.Tensor] = None,
    inplace: bool = False,
):
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by their positions -> (q_rot, k_rot).

    ``positions``: (T,) or (B, T) integers (then ``offset`` must be 0); otherwise
    row t has position ``offset + t`` (``offset`` an integer >= 0).
    ``inplace=True`` overwrites q and k.
    """
    _check(q, k, base, offset, positions)
    check_bool("apply_rope", "inplace", inplace)
    if inplace and q.data_ptr() == k.data_ptr():
        raise ValueError("apply_rope: argument 'k' expected another tensor than 'q' when inplace=True "
                         "(the same memory would be rotated twice)")
    return RopeFunction.apply(q, k, float(base), int(offset), positions, bool(inplace))
