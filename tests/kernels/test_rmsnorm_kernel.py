"""Triton RMSNorm against npformer.ops.rmsnorm (float64) and a torch LLaMA-style RMSNorm."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.rmsnorm import rms_norm, rmsnorm_bwd, rmsnorm_fwd
from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from tests.kernels import KERNEL_DTYPES, KERNEL_RTOL, LAYOUTS, check, f64, few_examples, in_layout, tensor
from tests.strategies import rngs
from tests.tolerances import assert_close

EPS = 1e-6
ROWS = st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=2).map(tuple)
HIDDEN = st.sampled_from([1, 2, 7, 16, 33, 100])


def reference(x, w, dy, residual=None, dh=None):
    """float64 npformer forward/backward on the kernel's inputs: y, h, dx, dweight."""
    h = f64(x) + (f64(residual) if residual is not None else 0.0)
    y, cache = rmsnorm_forward(h, f64(w), EPS)
    dx, dw = rmsnorm_backward(f64(dy), cache)
    if dh is not None:
        dx = dx + f64(dh)
    return y, h, dx, dw


def scales(x, w, dy):
    """Size of the terms each result is summed from (round-off is relative to these)."""
    x, w, dy = f64(x), f64(w), f64(dy)
    rstd = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
    return {"y": float(np.abs(x * rstd).max() * np.abs(w).max()),
            "dx": float((rstd * np.abs(dy * w)).max() * 2),
            "dw": float(np.abs(dy * x * rstd).reshape(-1, x.shape[-1]).sum(0).max())}


@few_examples
@given(ROWS, HIDDEN, st.sampled_from(KERNEL_DTYPES), st.sampled_from([1e-2, 1.0, 30.0]), st.booleans(),
       st.sampled_from(LAYOUTS), rngs())
def test_matches_reference(rows, D, dtype, scale, with_residual, layout, rng):
    shape = rows + (D,)
    x = in_layout(tensor(rng, shape, dtype, scale), layout).requires_grad_()
    w = tensor(rng, (D,), dtype).requires_grad_()
    dy = tensor(rng, shape, dtype)
    if with_residual:
        r = tensor(rng, shape, dtype, scale).requires_grad_()
        dh = tensor(rng, shape, dtype)
        y, h = rms_norm(x, w, EPS, residual=r)
        dx, dw, dr = torch.autograd.grad((y, h), (x, w, r), (dy, dh))
        y_ref, h_ref, dx_ref, dw_ref = reference(x, w, dy, r, dh)
        s = scales(h, w, dy)
        s["dx"] += float(np.abs(f64(dh)).max())  # dh is added to the normalisation's gradient
        check(h, h_ref, dtype, what="h")
        check(dr, dx_ref, dtype, scale=s["dx"], what="dresidual")
    else:
        y = rms_norm(x, w, EPS)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        y_ref, _, dx_ref, dw_ref = reference(x, w, dy)
        s = scales(x, w, dy)
    check(y, y_ref, dtype, scale=s["y"], what="y")
    check(dx, dx_ref, dtype, scale=s["dx"], what="dx")
    check(dw, dw_ref, dtype, scale=s["dw"], what="dweight")


@few_examples
@given(st.sampled_from([(3, 37), (2, 100), (5, 16), (1, 65)]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.sampled_from([16, 32]), rngs())
def test_chunked_rows(shape, dtype, block, rng):
    """Rows longer than one block are walked in chunks (the path of hidden sizes above 8192)."""
    x, w, dy = tensor(rng, shape, dtype), tensor(rng, shape[-1:], dtype), tensor(rng, shape, dtype)
    y, _, rstd = rmsnorm_fwd(x, w, EPS, block_d=block)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd, block_d=block)
    y_ref, _, dx_ref, dw_ref = reference(x, w, dy)
    s = scales(x, w, dy)
    check(y, y_ref, dtype, scale=s["y"], what="y")
    check(dx, dx_ref, dtype, scale=s["dx"], what="dx")
    check(dw, dw_ref, dtype, scale=s["dw"], what="dweight")


def test_hidden_65536():
    rng = np.random.default_rng(0)
    D = 65536
    x, w, dy = tensor(rng, (2, D), torch.float32), tensor(rng, (D,), torch.float32), tensor(rng, (2, D), torch.float32)
    x.requires_grad_(), w.requires_grad_()
    y = rms_norm(x, w, EPS)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    y_ref, _, dx_ref, dw_ref = reference(x, w, dy)
    s = scales(x, w, dy)
    check(y, y_ref, torch.float32, scale=s["y"], what="y")
    check(dx, dx_ref, torch.float32, scale=s["dx"], what="dx")
    check(dw, dw_ref, torch.float32, scale=s["dw"], what="dweight")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_llama_convention_in_torch(dtype):
    """Same values as LlamaRMSNorm written in torch: weight * (x_f32 * rstd).to(dtype)."""
    rng = np.random.default_rng(1)
    x, w = tensor(rng, (4, 48), dtype), tensor(rng, (48,), dtype)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    y = rms_norm(x, w, EPS)
    assert y.dtype == dtype
    # identical up to one rounding of y (the torch product rounds once too)
    check(y, f64(expected), dtype, what="y vs torch LLaMA RMSNorm")


def test_dweight_is_deterministic_and_independent_of_the_split():
    """dweight = fixed-order sum of per-program partials: bitwise repeatable, and equal
    (to round-off) however the rows are split between programs."""
    rng = np.random.default_rng(2)
    x, dy = tensor(rng, (37, 24), torch.float32), tensor(rng, (37, 24), torch.float32)
    w = tensor(rng, (24,), torch.float32)
    _, _, rstd = rmsnorm_fwd(x, w, EPS)
    first = rmsnorm_bwd(dy, x, w, rstd)[1]
    again = rmsnorm_bwd(dy, x, w, rstd)[1]
    assert torch.equal(first, again)
    one_program = rmsnorm_bwd(dy, x, w, rstd, num_programs=1)[1]
    many = rmsnorm_bwd(dy, x, w, rstd, num_programs=7)[1]
    _, _, _, dw_ref = reference(x, w, dy)
    for dw in (one_program, many):
        check(dw, dw_ref, torch.float32, scale=scales(x, w, dy)["dw"], what="dweight")


def test_residual_gradient_reaches_both_inputs():
    """h = x + residual: dL/dx = dL/dresidual, including the gradient arriving through h."""
    rng = np.random.default_rng(3)
    x, r = (tensor(rng, (3, 10), torch.float32).requires_grad_() for _ in range(2))
    w = tensor(rng, (10,), torch.float32)
    y, h = rms_norm(x, w, EPS, residual=r)
    (y.square().sum() + 3 * h.sum()).backward()
    assert torch.equal(x.grad, r.grad)
    xt, rt = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ht = xt + rt
    yt = w.double() * ht * torch.rsqrt(ht.pow(2).mean(-1, keepdim=True) + EPS)
    (yt.square().sum() + 3 * ht.sum()).backward()
    check(x.grad, f64(xt.grad), torch.float32, what="dx vs torch autograd")


@few_examples
@given(ROWS, HIDDEN, st.sampled_from([torch.bfloat16, torch.float16]), st.booleans(), rngs())
def test_float32_weight_with_16_bit_rows(rows, D, dtype, with_residual, rng):
    """A float32 weight with fp16/bf16 rows (Hugging Face LLaMA's and Liger-Kernel's mix):
    y in the rows' dtype, as ``(w_f32 * xhat.to(dtype)).to(dtype)`` in torch gives it;
    dweight in float32, dx (and dresidual) in the rows' dtype, against the float64 reference."""
    shape = rows + (D,)
    x = tensor(rng, shape, dtype).requires_grad_()
    w = tensor(rng, (D,), torch.float32).requires_grad_()
    dy = tensor(rng, shape, dtype)
    r = tensor(rng, shape, dtype).requires_grad_() if with_residual else None
    if with_residual:
        y, h = rms_norm(x, w, EPS, residual=r)
        dx, dw, dr = torch.autograd.grad(y, (x, w, r), dy)
        assert torch.equal(dx, dr)
    else:
        h = x
        y = rms_norm(x, w, EPS)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (dtype, dtype, torch.float32)
    # the convention written in torch, on the same (rounded) h
    hf = h.detach().float()
    xhat = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    expected = (w.detach() * xhat.float()).to(dtype)
    check(y, f64(expected), dtype, scale=float(np.abs(f64(expected)).max(initial=0.0)) or 1.0,
          what="y vs the torch formula")
    y_ref, _, dx_ref, dw_ref = reference(h, w, dy)
    s = scales(h, w, dy)
    check(y, y_ref, dtype, scale=s["y"], what="y")
    check(dx, dx_ref, dtype, scale=s["dx"], what="dx")
    # dweight sums dy * xhat with xhat rounded to the rows' dtype: that rounding sets the tolerance
    assert_close(f64(dw), dw_ref, rtol=KERNEL_RTOL[dtype], scale=s["dw"], what="dweight")


def test_float32_weight_keeps_its_gradient_unrounded():
    """dweight of a float32 weight is the float32 sum, not a sum rounded to the rows' dtype."""
    rng = np.random.default_rng(5)
    x, dy = tensor(rng, (64, 16), torch.bfloat16), tensor(rng, (64, 16), torch.bfloat16)
    w = tensor(rng, (16,), torch.float32).requires_grad_()
    dw = torch.autograd.grad(rms_norm(x, w, EPS), w, dy)[0]
    assert dw.dtype == torch.float32
    assert not torch.equal(dw, dw.to(torch.bfloat16).float())  # finer than bf16's grid
    w16 = w.detach().to(torch.bfloat16).requires_grad_()
    dw16 = torch.autograd.grad(rms_norm(x, w16, EPS), w16, dy)[0]
    assert dw16.dtype == torch.bfloat16
