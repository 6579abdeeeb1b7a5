"""Sliding-window attention (ATT.15), (ATT.16): the mask against its definition, the op against torch
autograd with an explicit additive -inf mask, keys outside every window, and bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.attention import attention_backward, attention_forward, causal_mask, sliding_window_mask
from tests.badinput import BAD_COUNTS, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, in_layout, layouts, rngs
from tests.tolerances import FD_RTOL, assert_close

LENGTHS = st.sampled_from([1, 2, 3, 5, 8])
WINDOWS = st.sampled_from([1, 2, 3, 4, 7, 16])
HEADS = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 1), (6, 3)])  # (H, Hkv): MHA, GQA, MQA


def visible_by_definition(Tq, Tk, W):
    """(Tq, Tk) bool, True where query i sees key j, by (ATT.15) evaluated one pair at a time."""
    visible = np.zeros((Tq, Tk), bool)
    for i in range(Tq):
        p = i + (Tk - Tq)  # absolute position of query i (end-aligned)
        for j in range(Tk):
            visible[i, j] = p - W < j <= p
    return visible


@st.composite
def window_cases(draw, dtypes=DTYPES):
    """q, k, v (and a bias) with Tq <= Tk, GQA head counts, any batch, a window W, in any layout."""
    B = draw(st.sampled_from([1, 2, 3]))
    H, Hkv = draw(HEADS)
    Tk = draw(LENGTHS)
    Tq = draw(st.integers(1, Tk))
    W = draw(WINDOWS)
    D = draw(st.sampled_from([1, 3, 4]))
    dtype = draw(dtypes)
    rng = draw(rngs())
    q = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Tk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Tk, D)).astype(dtype)
    bias_shape = draw(st.sampled_from([None, (1, H, Tq, Tk), (B, 1, Tq, Tk)]))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    dout = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    layout = draw(layouts())
    q, k, v = (in_layout(a, layout) for a in (q, k, v))
    return q, k, v, bias, dout, W


def torch_window_attention(q, k, v, bias, W, scale=None):
    """softmax(c_s q k^T + bias + M) v in float64 torch, with M = 0 inside the window of (ATT.15) and
    -inf outside, written from the definition; key/value heads repeated for GQA."""
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tb = None if bias is None else leaf(bias)
    H, Hkv, Tq, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    Tk = k.shape[2]
    G = H // Hkv
    kk, vv = tk.repeat_interleave(G, dim=1), tv.repeat_interleave(G, dim=1)
    c = 1.0 / np.sqrt(D) if scale is None else scale
    logits = c * tq @ kk.transpose(-1, -2)
    if tb is not None:
        logits = logits + tb
    additive = torch.where(torch.from_numpy(visible_by_definition(Tq, Tk, W)), 0.0, -torch.inf).double()
    out = torch.softmax(logits + additive, dim=-1) @ vv
    return out, (tq, tk, tv) + (() if tb is None else (tb,))


@pytest.mark.derivation("ATT.15")
@given(st.integers(0, 9), st.integers(0, 9), st.integers(1, 20))
def test_sliding_window_mask_matches_definition(Tq, Tk, W):
    """The helper's mask is the complement of (ATT.15) pair by pair; W >= Tk is the causal mask;
    a query at position p >= 0 sees min(W, p + 1) keys."""
    hidden = sliding_window_mask(Tq, Tk, W)
    assert hidden.shape == (Tq, Tk) and hidden.dtype == np.bool_
    np.testing.assert_array_equal(~hidden, visible_by_definition(Tq, Tk, W))
    if W >= Tk:
        np.testing.assert_array_equal(hidden, causal_mask(Tq, Tk))
    assert np.all(hidden >= causal_mask(Tq, Tk))  # never shows a key the causal mask hides
    for i in range(Tq):
        p = i + Tk - Tq
        assert (~hidden[i]).sum() == (min(W, p + 1) if p >= 0 else 0)


@pytest.mark.derivation("ATT.15")
@given(window_cases())
def test_window_matches_torch_additive_mask(case):
    q, k, v, bias, _, W = case
    out, cache = attention_forward(q, k, v, causal=True, bias=bias, window=W)
    ref, _ = torch_window_attention(q, k, v, bias, W)
    assert out.dtype == q.dtype
    assert_close(out, ref.detach().numpy(), what="window forward")
    # probabilities: exactly zero outside the window, rows sum to 1 (Tq <= Tk: no row is empty)
    hidden = sliding_window_mask(q.shape[2], k.shape[2], W)
    assert np.all(cache.probs[..., hidden] == 0)
    assert_close(cache.probs.sum(-1), np.ones(cache.probs.shape[:-1]), what="rows sum to 1")


@pytest.mark.derivation("ATT.16")
@given(window_cases())
def test_window_gradients_match_torch(case):
    q, k, v, bias, dout, W = case
    out, cache = attention_forward(q, k, v, causal=True, bias=bias, window=W)
    dq, dk, dv, dbias = attention_backward(dout, cache)
    ref, leaves = torch_window_attention(q, k, v, bias, W)
    grads = backprop(ref, dout, *leaves)
    for name, ours, theirs in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), grads):
        assert ours.dtype == q.dtype, name
        assert_close(ours, theirs, what=name)
    assert (dbias is None) == (bias is None)


@pytest.mark.derivation("ATT.16")
@given(window_cases(dtypes=st.just(np.float64)))
def test_keys_outside_every_window_get_no_gradient(case):
    """(ATT.16) evaluated term by term: dk_j = c_s sum over the queries whose window holds j of
    dS_ij q_i, dv_j = sum of P_ij do_i; keys older than the first query's window get exactly 0."""
    q, k, v, bias, dout, W = case
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    _, cache = attention_forward(q, k, v, causal=True, bias=bias, window=W)
    _, dk, dv, _ = attention_backward(dout, cache)
    P, c = cache.probs, cache.scale
    dk_ref, dv_ref = np.zeros(k.shape), np.zeros(v.shape)
    for b in range(B):
        for h in range(H):
            kv = h // G
            dP = dout[b, h] @ v[b, kv].T  # (ATT.5)
            dS = P[b, h] * (dP - (dP * P[b, h]).sum(-1, keepdims=True))  # (ATT.7)
            for j in range(Tk):
                for i in range(Tq):
                    p = i + Tk - Tq
                    if j <= p < j + W:  # the queries whose window holds key j
                        dk_ref[b, kv, j] += c * dS[i, j] * q[b, h, i]
                        dv_ref[b, kv, j] += P[b, h, i, j] * dout[b, h, i]
    assert_close(dk, dk_ref, what="dk by (ATT.16)")
    assert_close(dv, dv_ref, what="dv by (ATT.16)")
    outside = max(0, Tk - Tq - W + 1)  # keys j < Tk - Tq - W + 1 lie in no window
    assert np.all(dk[:, :, :outside] == 0) and np.all(dv[:, :, :outside] == 0)


@given(window_cases(), st.integers(0, 20))
def test_wide_window_is_exactly_causal(case, extra):
    """W >= Tk (in particular W >= Tk + Tq) gives the causal result bit for bit."""
    q, k, v, bias, dout, _ = case
    W = k.shape[2] + extra
    out_w, cache_w = attention_forward(q, k, v, causal=True, bias=bias, window=W)
    out_c, cache_c = attention_forward(q, k, v, causal=True, bias=bias)
    np.testing.assert_array_equal(out_w, out_c)
    for gw, gc in zip(attention_backward(dout, cache_w), attention_backward(dout, cache_c)):
        np.testing.assert_array_equal(gw, gc)


def test_window_rows_with_no_key_follow_the_fully_masked_rule():
    """Tq > Tk: the first queries sit before every key; their rows are fully masked (ATT.11):
    output 0 and gradient 0, and no NaN anywhere."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 3, 3)), rng.standard_normal((1, 2, 3, 3))
    out, cache = attention_forward(q, k, v, causal=True, window=2)
    dq, dk, dv, _ = attention_backward(np.ones_like(out), cache)
    assert np.all(out[:, :, :2] == 0) and np.all(dq[:, :, :2] == 0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    ref, _ = torch_window_attention(q[:, :, 2:], k, v, None, 2)  # the other rows, as if alone with Tq = 3
    assert_close(out[:, :, 2:], ref.detach().numpy(), what="rows that see keys")


@pytest.mark.parametrize("Tq, Tk", [(0, 4), (3, 0), (0, 0)])
def test_window_with_empty_sequences(Tq, Tk):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 2, Tq, 3)), rng.standard_normal((2, 1, Tk, 3)), rng.standard_normal((2, 1, Tk, 3))
    out, cache = attention_forward(q, k, v, causal=True, window=1)
    dq, dk, dv, _ = attention_backward(np.ones_like(out), cache)
    assert out.shape == q.shape and np.all(out == 0) and np.all(dq == 0)
    assert dk.shape == k.shape and np.all(dk == 0) and np.all(dv == 0)


def test_window_gradcheck_case_passes():
    cases = [c for c in gradcheck.cases("attention") if "window" in c.name]
    assert len(cases) == 1
    results = gradcheck.check_case(cases[0])
    assert [r.input for r in results] == ["q", "k", "v"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def test_window_without_causal_is_refused():
    q = np.zeros((1, 1, 2, 2))
    message = expect_rejected(lambda: attention_forward(q, q, q, window=2), "attention_forward", "window")
    assert "causal" in message


@pytest.mark.parametrize("bad", BAD_COUNTS + (0,))
def test_bad_window_is_refused(bad):
    q = np.zeros((1, 1, 2, 2))
    if bad is not None:  # None is the op's "no window"
        expect_rejected(lambda: attention_forward(q, q, q, causal=True, window=bad), "attention_forward", "window")
    expect_rejected(lambda: sliding_window_mask(2, 2, bad), "sliding_window_mask", "window")


@pytest.mark.parametrize("arg", ["Tq", "Tk"])
@pytest.mark.parametrize("bad", BAD_COUNTS)
def test_bad_mask_lengths_are_refused(arg, bad):
    sizes = {"Tq": 2, "Tk": 2, arg: bad}
    expect_rejected(lambda: sliding_window_mask(sizes["Tq"], sizes["Tk"], 1), "sliding_window_mask", arg)


def test_mask_too_large_for_memory_is_refused_by_name():
    expect_rejected(lambda: sliding_window_mask(2**40, 2**40, 3), "sliding_window_mask", "Tq")
    assert sliding_window_mask(0, 2**52, 3).shape == (0, 2**52)  # no pairs: nothing to form
