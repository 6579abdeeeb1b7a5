"""RMSNorm in Triton: fused forward (optionally with the residual add) and backward.

Reference: ``npformer.ops.rmsnorm`` and ``proofs/rmsnorm.md``. Shapes: ``x: (..., D)``,
``weight: (D,)``; every leading index is a row, ``N`` rows in all.

Precision convention (LLaMA / Hugging Face)::

    r    = 1 / sqrt(mean(x_f32 ** 2) + eps)        fp32
    xhat = (x_f32 * r).to(x.dtype)                  rounded once to the input dtype
    y    = (weight_f32 * xhat_f32).to(x.dtype)      one more rounding

so in float32 this is exactly (RMS.4) and in fp16/bf16 it is what
``LlamaRMSNorm`` computes. The backward works in fp32 (``dweight`` sums ``dy`` times
the rounded ``xhat`` the forward multiplied by, as autograd of that code would).

The weight is in the input's dtype or in float32 (a model kept in bf16 with its norm
weights in float32, as Hugging Face LLaMA and Liger-Kernel allow): the formulas above
do not change, the output stays in the input's dtype (as Liger-Kernel's; Hugging
Face's ``LlamaRMSNorm`` would promote it to float32), and ``dweight`` comes out in the
weight's dtype, so a float32 weight gets its float32 sum unrounded.

With ``residual``: ``h = x + residual``, rounded to the input dtype as a transformer
block's residual stream is, is written out as the new residual stream and normalised;
``rms_norm(x, w, residual=r)`` returns ``(rms_norm(h), h)``, and both x and residual
receive the gradient of h.

Kernels:

- ``_rmsnorm_fwd_kernel``: one program per row. When the row fits one block
  (``D <= BLOCK_D``) it is loaded once; otherwise (hidden sizes up to 65536 and
  beyond) the program walks the row in ``BLOCK_D`` chunks twice: sum of squares,
  then normalise.
- ``_rmsnorm_bwd_kernel``: ``G`` programs, each owning a contiguous range of rows;
  each writes its partial ``sum_rows dy * xhat`` to row ``pid`` of a (G, D) fp32
  buffer, which ``_sum_partials_kernel`` adds up in a fixed order. No atomics, so
  ``dweight`` is bitwise reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from npformer.ops._checks import check_real

from ._common import check_runnable, check_tensor

# Largest row kept in registers in one piece; longer rows are walked in chunks.
MAX_FUSED_BLOCK_D = 8192
# Chunk width for rows longer than MAX_FUSED_BLOCK_D.
CHUNK_BLOCK_D = 4096


@triton.jit
def _add_rounded(a, b):
    """a + b rounded once to the dtype of a (the sum is formed in fp32: fp16/bf16
    arithmetic is never done in the input dtype, which the Triton interpreter mishandles)."""
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


@triton.jit
def _rmsnorm_fwd_kernel(
    X, R, W, Y, Hout, RSTD,  # pointers: x, residual, weight, y, new residual, rstd (N,) fp32
    stride_x, stride_r, stride_y, stride_h,  # row strides (the last axis is contiguous)
    D, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if HAS_RESIDUAL:
        R += row * stride_r
        Hout += row * stride_h
    cols = tl.arange(0, BLOCK_D)

    if ONE_BLOCK:
        mask = cols < D
        x = tl.load(X + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = _add_rounded(x, tl.load(R + cols, mask=mask, other=0.0))
            tl.store(Hout + cols, x, mask=mask)
        xf = x.to(tl.float32)
        ms = tl.sum(xf * xf, axis=0) / D  # (RMS.1)
        rstd = 1.0 / tl.sqrt(ms + eps)  # (RMS.2)
        xhat = (xf * rstd).to(Y.dtype.element_ty)  # (RMS.3), rounded to the input dtype
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, (w * xhat.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)  # (RMS.4)
    else:
        # pass 1: sum of squares, chunk by chunk (and the residual add, stored once)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            mask = c0 + cols < D
            x = tl.load(X + c0 + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = _add_rounded(x, tl.load(R + c0 + cols, mask=mask, other=0.0))
                tl.store(Hout + c0 + cols, x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / D + eps)  # (RMS.1), (RMS.2)
        # pass 2: normalise and scale (x + residual recomputed rather than re-read)
        for c0 in range(0, D, BLOCK_D):
            mask = c0 + cols < D
            x = tl.load(X + c0 + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = _add_rounded(x, tl.load(R + c0 + cols, mask=mask, other=0.0))
            xhat = (x.to(tl.float32) * rstd).to(Y.dtype.element_ty)  # (RMS.3)
            w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + c0 + cols, (w * xhat.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)  # (RMS.4)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DH, DX, DW_PARTIAL,  # DH: gradient reaching the new residual (if any)
    N, D, rows_per_program,  # DY, X, DH, DX: contiguous (N, D)
    HAS_DH: tl.constexpr, BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.arange(0, BLOCK_D)
    DW_PARTIAL += pid.to(tl.int64) * D
    off = row_start.to(tl.int64) * D  # offset of the current row, advanced by D per row

    if ONE_BLOCK:
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd  # (RMS.3)
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)  # (RMS.5), this program's rows
            dxhat = dy * w  # (RMS.6)
            c = tl.sum(dxhat * xhat, axis=0) / D
            dx = (dxhat - xhat * c) * rstd  # (RMS.8)
            if HAS_DH:
                dx += tl.load(DH + off + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + off + cols, dx.to(DX.dtype.element_ty), mask=mask)
            off += D
        tl.store(DW_PARTIAL + cols, dw, mask=mask)
    else:
        # This program's DW_PARTIAL row was zeroed by the launcher; only this program updates it.
        for row in range(row_start, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):
                mask = c0 + cols < D
                x = tl.load(X + off + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * (x * rstd)
            c = tl.sum(acc, axis=0) / D
            for c0 in range(0, D, BLOCK_D):
                mask = c0 + cols < D
                x = tl.load(X + off + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd  # (RMS.3)
                dx = (dy * w - xhat * c) * rstd  # (RMS.6), (RMS.8)
                if HAS_DH:
                    dx += tl.load(DH + off + c0 + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + off + c0 + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(DW_PARTIAL + c0 + cols, mask=mask, other=0.0)
                dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)  # (RMS.5), this program's rows
                tl.store(DW_PARTIAL + c0 + cols, dw, mask=mask)
            off += D


@triton.jit
def _sum_partials_kernel(P, OUT, G, D, BLOCK: tl.constexpr):
    """OUT[d] = sum_g P[g, d], g = 0, 1, ..., G-1 in that order (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(P + cols, mask=mask, other=0.0)
        P += D
    tl.store(OUT + cols, acc.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# launch parameters


def block_for(D: int, block_d: Optional[int] = None):
    """(BLOCK_D, ONE_BLOCK) for a row of D elements; ``block_d`` forces a chunk width."""
    if block_d is not None:
        return int(block_d), D <= block_d
    full = triton.next_power_of_2(D)
    if full <= MAX_FUSED_BLOCK_D:
        return full, True
    return CHUNK_BLOCK_D, False


def warps_for(BLOCK_D: int, one_block: bool = True) -> int:
    """Warps for a block of ``BLOCK_D`` columns.

    A row held in one block: 4 warps up to 512 columns, then one warp per 128 columns,
    at most 16 (8 for 1024, 16 from 2048 on). With one warp per 256 columns the
    backward of 1024- and 2048-wide fp16 rows with a float32 weight and a residual
    gradient spills registers (``python -m kernels.aot --full``). A chunk of the chunked
    walk (``one_block=False``, whose backward also carries the running ``dweight``
    partial through the second pass): one warp per 512 columns, 4 to 8, i.e. 8 for the
    4096-wide ``CHUNK_BLOCK_D``; with 16 warps that backward spills registers under
    some Triton releases.
    """
    if one_block:
        return max(4, min(16, BLOCK_D // 128))
    return max(4, min(8, BLOCK_D // 512))


def _num_programs(N: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(N, 2 * sms))
    return max(1, min(N, 4))


def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float) -> None:
    check_tensor("rms_norm", "x", x, min_ndim=1)
    check_runnable("rms_norm", x)
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"rms_norm: argument 'x' expected at least one entry on the last axis, got shape {tuple(x.shape)}")
    check_tensor("rms_norm", "weight", weight, ndim=1)
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: argument 'weight' expected shape ({D},), got {tuple(weight.shape)}")
    if weight.dtype not in (x.dtype, torch.float32):
        allowed = "float32" if x.dtype == torch.float32 else f"{x.dtype} (same as 'x') or torch.float32"
        raise ValueError(f"rms_norm: argument 'weight' expected dtype {allowed}, got {weight.dtype}")
    if residual is not None:
        check_tensor("rms_norm", "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: argument 'residual' expected shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: argument 'residual' expected dtype {x.dtype}, got {residual.dtype}")
    for name, t in (("weight", weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"rms_norm: argument '{name}' expected device {x.device}, got {t.device}")
    check_real("rms_norm", "eps", eps, lo=0.0)


def rmsnorm_fwd(x, weight, eps=1e-6, residual=None, *, block_d=None):
    """Launch the forward. x: (..., D) -> y: (..., D), h: (..., D) or None, rstd: (N,) fp32."""
    _check(x, weight, residual, eps)
    shape, D = x.shape, x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    N = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, D).contiguous()
        h = torch.empty_like(x2)
    else:
        r2 = h = x2  # placeholders, never touched (HAS_RESIDUAL is False)
    BLOCK_D, one = block_for(D, block_d)
    if N > 0:
        _rmsnorm_fwd_kernel[(N,)](
            x2, r2, weight.contiguous(), y, h, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
            D, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_D=BLOCK_D, ONE_BLOCK=one,
            num_warps=warps_for(BLOCK_D, one),
        )
    return y.reshape(shape), (h.reshape(shape) if residual is not None else None), rstd


def rmsnorm_bwd(dy, x, weight, rstd, dh=None, *, block_d=None, num_programs=None):
    """Launch the backward. dy, x: (..., D) (x: the normalised input, i.e. h with a residual),
    dh: gradient reaching the new residual or None -> dx: (..., D), dweight: (D,)."""
    shape, D = x.shape, x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    dy2 = dy.reshape(-1, D).contiguous()
    dh2 = dh.reshape(-1, D).contiguous() if dh is not None else dy2
    N = x2.shape[0]
    dx = torch.empty_like(x2)
    BLOCK_D, one = block_for(D, block_d)
    G = num_programs or _num_programs(N, x.device)
    rows_per_program = triton.cdiv(max(N, 1), G)
    G = triton.cdiv(max(N, 1), rows_per_program)
    partial = torch.zeros((G, D), dtype=torch.float32, device=x.device)
    if N > 0:
        _rmsnorm_bwd_kernel[(G,)](
            dy2, x2, weight.contiguous(), rstd, dh2, dx, partial,
            N, D, rows_per_program,
            HAS_DH=dh is not None, BLOCK_D=BLOCK_D, ONE_BLOCK=one,
            num_warps=warps_for(BLOCK_D, one),
        )
    dweight = torch.empty(D, dtype=weight.dtype, device=x.device)
    SUM_BLOCK = min(1024, triton.next_power_of_2(D))
    _sum_partials_kernel[(triton.cdiv(D, SUM_BLOCK),)](partial, dweight, G, D, BLOCK=SUM_BLOCK)
    return dx.reshape(shape), dweight


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (normalised input, weight, rstd)."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, h, rstd = rmsnorm_fwd(x, weight, eps, residual)
        ctx.save_for_backward(h if residual is not None else x, weight, rstd)
        ctx.has_residual = residual is not None
        if residual is not None:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, *maybe_dh):
        x, weight, rstd = ctx.saved_tensors
        dh = maybe_dh[0] if ctx.has_residual else None
        dx, dweight = rmsnorm_bwd(dy, x, weight, rstd, dh)
        # h = x + residual: both receive the gradient of h
        return dx, dweight, (dx if ctx.has_residual else None), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """RMSNorm over the last axis, LLaMA convention (see the module docstring).

    x: (..., D), weight: (D,) in x's dtype or float32  ->  y: (..., D) in x's dtype;
    with residual (..., D): h = x + residual  ->  (rms_norm(h), h).
    """
    _check(x, weight, residual, eps)
    return RMSNormFunction.apply(x, weight, residual, float(eps))
