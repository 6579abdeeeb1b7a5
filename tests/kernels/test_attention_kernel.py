"""Fused Triton attention against npformer.ops.flash_attention / attention (float64) and torch SDPA."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels.attention as A
from kernels.attention import block_d_for, config_space, flash_attention, length_bucket, pinned
from npformer.ops.attention import attention_backward, attention_forward
from npformer.ops.flash_attention import flash_attention_forward
from tests.kernels import DEVICE, KERNEL_DTYPES, LAYOUTS, check, f64, few_examples, in_layout, tensor
from tests.strategies import rngs

# Lengths around the interpreter's 16-wide tiles (1, a partial tile, one tile, two tiles
# plus one); head sizes include non-powers of two (padded to the next power, masked).
LENGTHS = st.sampled_from([1, 5, 16, 17, 33])
HEADS = st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1), (6, 3)])  # (H, Hkv): MHA, GQA, MQA
HEAD_DIMS = st.sampled_from([16, 24, 40, 64, 80, 128])


def run(q, k, v, dout, **kw):
    """Kernel out, lse and gradients."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, lse, dq, dk, dv


def scales(q, k, v, dout, causal, scale):
    """Size of the terms each result is summed from, from the float64 probabilities P:
    round-off is relative to these. (With one visible key, dk is 0 in exact arithmetic:
    o = v, so dP - delta cancels, and only this scale says how small 0 has to be.)"""
    aq, ak, av, ado = (np.abs(f64(t)) for t in (q, k, v, dout))
    _, cache = attention_forward(f64(q), f64(k), f64(v), causal=causal, scale=scale)
    P = cache.probs  # (B, H, Tq, Tk)
    G = q.shape[1] // k.shape[1]
    ak, av = np.repeat(ak, G, axis=1), np.repeat(av, G, axis=1)
    out_abs = P @ av
    ds_abs = P * (ado @ av.swapaxes(-1, -2) + (ado * out_abs).sum(-1, keepdims=True))  # |P (dP - delta)| terms
    dq_abs = scale * ds_abs @ ak
    dk_abs = scale * ds_abs.swapaxes(-1, -2) @ aq
    dv_abs = P.swapaxes(-1, -2) @ ado
    return {name: max(float(t.max(initial=0.0)), 1e-30) for name, t in
            (("out", out_abs), ("dq", dq_abs), ("dk", dk_abs * G), ("dv", dv_abs * G))}


@few_examples
@given(st.sampled_from([1, 2]), HEADS, LENGTHS, LENGTHS, HEAD_DIMS, st.booleans(),
       st.sampled_from(KERNEL_DTYPES), st.sampled_from(LAYOUTS), rngs())
def test_matches_reference(B, heads, Tq, Tk, D, causal, dtype, layout, rng):
    H, Hkv = heads
    q, dout = tensor(rng, (B, H, Tq, D), dtype), tensor(rng, (B, H, Tq, D), dtype)
    k, v = tensor(rng, (B, Hkv, Tk, D), dtype), tensor(rng, (B, Hkv, Tk, D), dtype)
    q, k, v, dout = (in_layout(t, layout) for t in (q, k, v, dout))
    out, lse, dq, dk, dv = run(q, k, v, dout, causal=causal)

    out_ref, flash = flash_attention_forward(f64(q), f64(k), f64(v), causal=causal)
    _, cache = attention_forward(f64(q), f64(k), f64(v), causal=causal)
    dq_ref, dk_ref, dv_ref, _ = attention_backward(f64(dout), cache)
    s = scales(q, k, v, dout, causal, 1 / math.sqrt(D))
    check(out, out_ref, dtype, scale=s["out"], what="out")
    # lse: fp32 whatever the input dtype; +inf exactly in the rows that see no key
    assert lse.dtype == torch.float32
    lse_np, lse_ref = f64(lse), flash.lse
    assert np.array_equal(np.isinf(lse_np), np.isinf(lse_ref))
    seen = np.isfinite(lse_ref)
    assert np.all(lse_np[~seen] > 0)
    check(lse[torch.from_numpy(seen).to(DEVICE)], lse_ref[seen], torch.float32,
          scale=max(1.0, np.abs(lse_ref[seen]).max(initial=0)), what="lse")
    check(dq, dq_ref, dtype, scale=s["dq"], what="dq")
    check(dk, dk_ref, dtype, scale=s["dk"], what="dk")
    check(dv, dv_ref, dtype, scale=s["dv"], what="dv")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fully_masked_rows_are_zero_not_nan(dtype):
    """Causal with Tq > Tk: the first Tq - Tk queries see no key: out 0, lse +inf, dq 0."""
    rng = np.random.default_rng(0)
    B, H, Tq, Tk, D = 1, 2, 21, 5, 16
    q, k, v = tensor(rng, (B, H, Tq, D), dtype), tensor(rng, (B, 1, Tk, D), dtype), tensor(rng, (B, 1, Tk, D), dtype)
    out, lse, dq, dk, dv = run(q, k, v, tensor(rng, (B, H, Tq, D), dtype), causal=True)
    hidden = Tq - Tk  # rows 0 .. hidden-1 see no key
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert torch.all(out[:, :, :hidden] == 0) and torch.all(dq[:, :, :hidden] == 0)
    assert torch.all(lse[:, :, :hidden] == float("inf"))
    assert torch.isfinite(lse[:, :, hidden:]).all()
    # the visible rows are an ordinary causal softmax: compare them with the reference
    out_ref, _ = flash_attention_forward(f64(q), f64(k), f64(v), causal=True)
    check(out[:, :, hidden:], out_ref[:, :, hidden:], dtype, scale=float(np.abs(f64(v)).max()), what="visible rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [40, 128])
def test_every_configuration_of_the_table(dtype, D):
    """Each (BLOCK_M, BLOCK_N, warps, stages) the launcher may pick gives the same answer,
    with Tq < Tk and with Tq > Tk (fully masked rows), causal, grouped heads."""
    major, minor = torch.cuda.get_device_capability() if DEVICE == "cuda" else (9, 0)
    arch = 10 * major + minor
    tables = {kind: config_space(kind, dtype, block_d_for(D), arch) for kind in ("fwd", "dkdv", "dq")}
    rng = np.random.default_rng(4)
    shapes = [(45, 70), (70, 45)]
    inputs = []
    for Tq, Tk in shapes:
        q, dout = tensor(rng, (1, 4, Tq, D), dtype), tensor(rng, (1, 4, Tq, D), dtype)
        k, v = tensor(rng, (1, 2, Tk, D), dtype), tensor(rng, (1, 2, Tk, D), dtype)
        out_ref, _ = flash_attention_forward(f64(q), f64(k), f64(v), causal=True)
        _, cache = attention_forward(f64(q), f64(k), f64(v), causal=True)
        inputs.append(((q, k, v, dout), (out_ref, *attention_backward(f64(dout), cache)[:3]),
                       scales(q, k, v, dout, True, 1 / math.sqrt(D))))
    for i in range(max(len(t) for t in tables.values())):
        chosen = {kind: t[i % len(t)] for kind, t in tables.items()}
        with pinned(**chosen):
            for (q, k, v, dout), refs, s in inputs:
                out, _, dq, dk, dv = run(q, k, v, dout, causal=True)
                for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), refs):
                    check(a, b, dtype, scale=s[name], what=f"{name} with {chosen}, Tq={q.shape[2]}, Tk={k.shape[2]}")


def sdpa_reference(q, k, v, causal, scale):
    """torch SDPA in float64 with the bottom-right causal alignment spelled out as a mask."""
    q, k, v = (torch.from_numpy(f64(t)).requires_grad_() for t in (q, k, v))
    G = q.shape[1] // k.shape[1]
    mask = None
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        mask = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask, scale=scale)
    return q, k, v, out


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("causal,Tq,Tk,scale", [(False, 20, 35, None), (True, 18, 18, 0.3), (True, 7, 40, None)])
def test_matches_torch_sdpa(dtype, causal, Tq, Tk, scale):
    rng = np.random.default_rng(1)
    B, H, Hkv, D = 2, 4, 2, 48
    q, dout = tensor(rng, (B, H, Tq, D), dtype), tensor(rng, (B, H, Tq, D), dtype)
    k, v = tensor(rng, (B, Hkv, Tk, D), dtype), tensor(rng, (B, Hkv, Tk, D), dtype)
    out, _, dq, dk, dv = run(q, k, v, dout, causal=causal, scale=scale)
    tq, tk, tv, tout = sdpa_reference(q, k, v, causal, scale if scale is not None else 1 / math.sqrt(D))
    tout.backward(torch.from_numpy(f64(dout)))
    s = scales(q, k, v, dout, causal, scale or 1 / math.sqrt(D))
    check(out, tout.detach().numpy(), dtype, scale=s["out"], what="out vs SDPA")
    check(dq, tq.grad.numpy(), dtype, scale=s["dq"], what="dq vs SDPA")
    check(dk, tk.grad.numpy(), dtype, scale=s["dk"], what="dk vs SDPA")
    check(dv, tv.grad.numpy(), dtype, scale=s["dv"], what="dv vs SDPA")


def test_strided_inputs_and_determinism():
    """q, k, v as transposed views of (B, T, H, D) projections; GQA gradients bitwise repeatable."""
    rng = np.random.default_rng(2)
    q = tensor(rng, (1, 19, 4, 32), torch.float32).transpose(1, 2)
    k = tensor(rng, (1, 23, 2, 32), torch.float32).transpose(1, 2)
    v = tensor(rng, (1, 23, 2, 32), torch.float32).transpose(1, 2)
    dout = tensor(rng, (1, 4, 19, 32), torch.float32)
    first = run(q, k, v, dout, causal=True)
    again = run(q, k, v, dout, causal=True)
    contiguous = run(q.contiguous(), k.contiguous(), v.contiguous(), dout, causal=True)
    for a, b, c in zip(first, again, contiguous):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@given(st.integers(1, 1 << 20))
def test_length_bucket(T):
    """The autotuner's length key: a power of two, at least 16, at least T, less than 2T above 16."""
    b = length_bucket(T)
    assert b & (b - 1) == 0 and b >= max(T, 16)
    assert b < 2 * T or b == 16


@few_examples
@given(st.lists(st.integers(1, 40), min_size=2, max_size=3), st.booleans())
def test_lengths_in_one_bucket_share_one_tuning(lengths, causal):
    """Decoding grows the key length by one per step: the autotuner keeps one choice per
    length bucket (and per the other keys), not one per length."""
    rng = np.random.default_rng(6)
    A._forget_choices()
    for T in lengths:
        q = tensor(rng, (1, 2, 1, 16), torch.float32)  # one query, as in decoding
        k, v = tensor(rng, (1, 1, T, 16), torch.float32), tensor(rng, (1, 1, T, 16), torch.float32)
        flash_attention(q, k, v, causal=causal)
    buckets = {length_bucket(T) for T in lengths}
    assert len(A._attn_fwd.cache) == len(buckets)
    assert {key[1] for key in A._attn_fwd.cache} == buckets  # (Tq bucket, Tk bucket, ...)
