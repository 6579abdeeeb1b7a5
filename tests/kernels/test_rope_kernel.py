"""Triton RoPE against npformer.ops.rope (float64, rotate-half) and a Hugging Face style torch RoPE."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.rope import apply_rope
from npformer.ops.rope import rope_backward, rope_forward
from tests.kernels import DEVICE, KERNEL_DTYPES, LAYOUTS, check, f64, few_examples, in_layout, tensor
from tests.strategies import rngs

SIDES = st.sampled_from([1, 2, 3, 5])
HEAD = st.sampled_from([2, 6, 16, 34, 64])


def positions_for(mode, B, T, rng):
    """(keyword arguments for the kernel, the same for the NumPy reference)."""
    if mode == "offset":
        off = int(rng.integers(0, 50))
        return {"offset": off}, {"offset": off}
    if mode in ("positions_t", "positions_bt"):
        pos = rng.integers(0, 200, size=(T,) if mode == "positions_t" else (B, T))
        return {"positions": torch.from_numpy(pos).to(DEVICE)}, {"positions": pos}
    return {}, {}


@few_examples
@given(SIDES, SIDES, SIDES, SIDES, HEAD, st.sampled_from(KERNEL_DTYPES),
       st.sampled_from(["default", "offset", "positions_t", "positions_bt"]), st.sampled_from(LAYOUTS), rngs())
def test_matches_reference(B, H, Hkv, T, D, dtype, mode, layout, rng):
    q = in_layout(tensor(rng, (B, H, T, D), dtype), layout).requires_grad_()
    k = in_layout(tensor(rng, (B, Hkv, T, D), dtype), layout).requires_grad_()
    dq, dk = tensor(rng, q.shape, dtype), tensor(rng, k.shape, dtype)
    kw, kw_np = positions_for(mode, B, T, rng)
    q_rot, k_rot = apply_rope(q, k, **kw)
    gq, gk = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    for name, x, y, dy, dx in (("q", q, q_rot, dq, gq), ("k", k, k_rot, dk, gk)):
        y_ref, cache = rope_forward(f64(x), **kw_np)
        # a rotation mixes two coordinates: the round-off scale is the row's largest entry
        check(y, y_ref, dtype, scale=float(np.abs(f64(x)).max()), what=f"{name}_rot")
        check(dx, rope_backward(f64(dy), cache), dtype, scale=float(np.abs(f64(dy)).max()), what=f"d{name}")


def hf_rope(x, positions, base=10000.0):
    """Hugging Face LLaMA's rotate-half RoPE, in float64 torch: x (B, H, T, D), positions (T,)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_matches_hugging_face_convention(dtype):
    rng = np.random.default_rng(0)
    q, k = tensor(rng, (2, 4, 9, 32), dtype), tensor(rng, (2, 2, 9, 32), dtype)
    q_rot, k_rot = apply_rope(q, k, offset=5, base=500000.0)
    pos = torch.arange(5, 14)
    check(q_rot, hf_rope(torch.from_numpy(f64(q)), pos, 500000.0).numpy(), dtype, scale=float(np.abs(f64(q)).max()))
    check(k_rot, hf_rope(torch.from_numpy(f64(k)), pos, 500000.0).numpy(), dtype, scale=float(np.abs(f64(k)).max()))


def test_relative_position_property():
    """(ROPE.6): q_m . k_n depends only on n - m, so shifting every position keeps the scores."""
    rng = np.random.default_rng(1)
    q, k = tensor(rng, (1, 2, 6, 16), torch.float32), tensor(rng, (1, 2, 6, 16), torch.float32)
    scores = [torch.einsum("bhtd,bhsd->bhts", *apply_rope(q, k, offset=off)) for off in (0, 37)]
    check(scores[1], f64(scores[0]), torch.float32, what="scores after a shift")
    assert not torch.allclose(apply_rope(q, k, offset=37)[0], apply_rope(q, k)[0])  # the rows themselves did move


def test_inplace_and_strided_views():
    rng = np.random.default_rng(2)
    x = tensor(rng, (2, 7, 4, 8), torch.float32)  # (B, T, H, D): q as a transposed view
    q = x.transpose(1, 2)
    k = tensor(rng, (2, 2, 7, 8), torch.float32)
    expected_q, expected_k = apply_rope(q.contiguous(), k.clone())
    q_rot, k_rot = apply_rope(q, k)
    assert torch.equal(q_rot, expected_q) and torch.equal(k_rot, expected_k)
    q2, k2 = q.clone(), k.clone()
    out_q, out_k = apply_rope(q2, k2, inplace=True)
    assert out_q.data_ptr() == q2.data_ptr() and out_k.data_ptr() == k2.data_ptr()
    assert torch.equal(q2, expected_q) and torch.equal(k2, expected_k)


def test_inplace_backward():
    rng = np.random.default_rng(3)
    q0, k0 = tensor(rng, (1, 2, 5, 6), torch.float32), tensor(rng, (1, 1, 5, 6), torch.float32)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    qr, kr = apply_rope(q * 1.0, k * 1.0, inplace=True)  # in place on non-leaf tensors
    (qr.square().sum() + kr.sum()).backward()
    qt, kt = (torch.from_numpy(f64(t)).requires_grad_() for t in (q0, k0))
    pos = torch.arange(5)
    (hf_rope(qt, pos).square().sum() + hf_rope(kt, pos).sum()).backward()
    check(q.grad, qt.grad.numpy(), torch.float32, what="dq")
    check(k.grad, kt.grad.numpy(), torch.float32, what="dk")
