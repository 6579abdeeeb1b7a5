"""Scaled dot-product attention: torch oracles, finite differences, the equations of proofs/attention.md,
every memory layout of every input, float32 logits with huge offsets, empty sequences, bad input."""

from typing import NamedTuple, Optional

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st
from sympy.stats import E as expectation
from sympy.stats import Normal, variance

from npformer import gradcheck
from npformer.ops.attention import attention_backward, attention_forward, causal_mask
from tests.badinput import (
    ARRAY_KINDS,
    BAD_COUNTS,
    BAD_FLAGS,
    BAD_SCALES,
    NOT_A_MASK,
    SUBCLASS_KINDS,
    corrupt,
    expect_rejected,
    other_float,
    rejects_all,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, in_layout, layouts, rngs
from tests.tolerances import FD_RTOL, RTOL, assert_close

SIZES = st.sampled_from([1, 2, 3, 5, 8])
INPUTS = ("q", "k", "v", "dout", "bias", "pad")  # every array an attention call takes


class Config(NamedTuple):
    shape: tuple  # (B, H, Hkv, Tq, Tk, D)
    causal: bool
    pad: Optional[np.ndarray]  # (B, Tk) bool key padding mask, or None
    bias_shape: Optional[tuple]
    dtype: type
    magnitude: float  # of q and k: sets the size of the logits
    rng: np.random.Generator
    layouts: dict  # input name -> memory layout it is passed in (tests.strategies.LAYOUTS)


def layouts_of_inputs():
    return st.fixed_dictionaries({name: layouts() for name in INPUTS})


@st.composite
def configs(draw, no_empty_rows=False, dtypes=DTYPES):
    B = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2, 3]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))  # G = 1: MHA; Hkv = 1: MQA; else GQA
    Tq, Tk, D = draw(SIZES), draw(SIZES), draw(st.sampled_from([1, 2, 3, 8]))
    causal = draw(st.booleans())
    dtype = draw(dtypes)
    # Large logits in float64; float32 keeps moderate ones here (huge offsets: test_float32_logit_offsets).
    magnitude = draw(st.sampled_from([1e-2, 1.0, 3.0] if dtype == np.float32 else [1e-2, 1.0, 3.0, 30.0]))
    rng = draw(rngs())
    pad = None
    if draw(st.booleans()):
        pad = rng.random((B, Tk)) < 0.3
        if no_empty_rows:
            pad[:, 0] = False  # key 0 stays visible to every query ...
    if no_empty_rows:
        assume(not causal or Tq <= Tk)  # ... and causal row 0 sees key 0
    bias_shape = None
    if draw(st.booleans()):
        full = (B, H, Tq, Tk)
        bias_shape = tuple(n if draw(st.booleans()) else 1 for n in full)
    return Config((B, H, Hkv, Tq, Tk, D), causal, pad, bias_shape, dtype, magnitude, rng, draw(layouts_of_inputs()))


def make(shape, dtype, magnitude, rng, bias_shape=None):
    B, H, Hkv, Tq, Tk, D = shape
    q = (rng.standard_normal((B, H, Tq, D)) * magnitude).astype(dtype)
    k = (rng.standard_normal((B, Hkv, Tk, D)) * magnitude).astype(dtype)
    v = rng.standard_normal((B, Hkv, Tk, D)).astype(dtype)
    dout = rng.standard_normal((B, H, Tq, D)).astype(dtype)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    return q, k, v, dout, bias


def hidden_mask(B, Tq, Tk, causal, pad):
    """(B, 1, Tq, Tk) bool, True where a key is hidden from a query."""
    hidden = np.zeros((B, 1, Tq, Tk), bool)
    if causal:
        hidden |= causal_mask(Tq, Tk)
    if pad is not None:
        hidden |= pad[:, None, None, :]
    return hidden


def torch_plain(tq, tk, tv, tbias, hidden, attn_scale=None):
    """Attention written out in torch: repeat kv heads, mask, stable softmax (0 on empty rows), P V."""
    G = tq.shape[1] // tk.shape[1]
    k_rep = tk.repeat_interleave(G, dim=1)
    c = 1 / np.sqrt(tq.shape[-1]) if attn_scale is None else attn_scale
    s = tq @ k_rep.transpose(-1, -2) * c
    if tbias is not None:
        s = s + tbias
    s = s.masked_fill(torch.from_numpy(hidden), -torch.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def in_layouts(layout_of, **arrays):
    """Each array (None stays None) in the layout ``layout_of`` names for it (contiguous if not named)."""
    return {name: None if x is None else in_layout(x, (layout_of or {}).get(name, "contiguous"))
            for name, x in arrays.items()}


def run_ours(q, k, v, dout, bias, causal, pad, layout_of=None, attn_scale=None):
    a = in_layouts(layout_of, q=q, k=k, v=v, dout=dout, bias=bias, pad=pad)
    out, cache = attention_forward(a["q"], a["k"], a["v"], causal=causal, key_padding_mask=a["pad"], bias=a["bias"],
                                   scale=attn_scale)
    return (out, *attention_backward(a["dout"], cache)), cache


def run_torch(q, k, v, dout, bias, causal, pad, *, sdpa, attn_scale=None):
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tbias = None if bias is None else leaf(bias)
    hidden = hidden_mask(q.shape[0], q.shape[2], k.shape[2], causal, pad)
    if sdpa:
        # sdpa's is_causal aligns top-left, so the end-aligned mask goes in as attn_mask (True = attend);
        # a float mask carries the bias, with -inf where hidden.
        mask = torch.from_numpy(~hidden)
        if tbias is not None:
            mask = tbias.masked_fill(~mask, -torch.inf)
        out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True, scale=attn_scale)
    else:
        p = torch_plain(tq, tk, tv, tbias, hidden, attn_scale)
        G = q.shape[1] // k.shape[1]
        out = p @ tv.repeat_interleave(G, dim=1)
    leaves = (tq, tk, tv) + (() if tbias is None else (tbias,))
    grads = backprop(out, dout, *leaves)
    return (out.detach().numpy(), *grads, *([None] if bias is None else []))


def term_scales(q, k, v, dout, probs, bias_shape=None, attn_scale=None):
    """Size of the terms each result is summed from: round-off is relative to these (see test_layernorm)."""
    a = lambda x: float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0  # noqa: E731
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    c = 1 / np.sqrt(D) if attn_scale is None else attn_scale
    dp = a(dout) * a(v) * D  # bound on |dP| (ATT.5)
    col = probs.reshape(B, Hkv, -1, Tk).sum(2).max() if probs.size else 0.0  # most probability one key receives
    return {
        "out": a(v),
        "dq": 2 * c * dp * a(k),
        "dk": 2 * c * dp * a(q) * col,
        "dv": a(dout) * col,
        "dbias": 2 * dp * (B * H * Tq * Tk // int(np.prod(bias_shape or (B, H, Tq, Tk)))),  # entries summed
    }


NAMES = ("out", "dq", "dk", "dv", "dbias")


def compare(ours, oracle, cache, q, k, v, dout, dtype, attn_scale=None):
    scales = term_scales(q, k, v, dout, cache.probs, cache.bias_shape, attn_scale)
    for name, a, b in zip(NAMES, ours, oracle):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert a.flags.c_contiguous, f"{name} is not C-contiguous"  # a fresh array, whatever the inputs' layout
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("ATT.3")
@given(configs())
def test_matches_plain_torch(config):
    """Every input (q, k, v, dout, bias, mask) in any memory layout: the same values as torch."""
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, bias = make(shape, dtype, magnitude, rng, bias_shape)
    ours, cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    compare(ours, run_torch(q, k, v, dout, bias, causal, pad, sdpa=False), cache, q, k, v, dout, dtype)


@pytest.mark.derivation("ATT.3")
@given(configs(no_empty_rows=True))
def test_matches_torch_sdpa(config):
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, bias = make(shape, dtype, magnitude, rng, bias_shape)
    ours, cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    compare(ours, run_torch(q, k, v, dout, bias, causal, pad, sdpa=True), cache, q, k, v, dout, dtype)


@pytest.mark.derivation("ATT.2")
@given(configs(dtypes=st.just(np.float64)))
def test_probs_are_masked_softmax(config):
    shape, causal, pad, bias_shape, _, magnitude, rng, layout_of = config
    q, k, v, dout, bias = make(shape, np.float64, magnitude, rng, bias_shape)
    _, cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    hidden = hidden_mask(q.shape[0], q.shape[2], k.shape[2], causal, pad)
    expected = torch_plain(leaf(q), leaf(k), leaf(v), None if bias is None else leaf(bias), hidden).detach().numpy()
    assert_close(cache.probs, expected, scale=1.0, what="probs")
    assert np.all(cache.probs[np.broadcast_to(hidden, cache.probs.shape)] == 0)
    row_sums = cache.probs.sum(-1)
    empty = np.broadcast_to(hidden.all(-1), row_sums.shape)
    assert_close(row_sums, np.where(empty, 0.0, 1.0), scale=1.0, what="rows sum to 1, or 0 when fully masked")


def scores(q, k, bias, causal, pad, attn_scale=None):
    """S of (ATT.1) in float64, written out from the equation: c_s q_i . k_j + beta_ij with key/value head
    c(h) = h // G, and the hidden pairs (causal: j > i + (Tk - Tq); padded keys), returned as a mask beside it."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    c = 1 / np.sqrt(D) if attn_scale is None else attn_scale
    kv_head = np.arange(H) // (H // Hkv)  # c(h)
    s = c * np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)[:, kv_head])  # (ATT.1)
    if bias is not None:
        s = s + bias  # (ATT.1), broadcast over the bias's axes of size 1
    i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    hidden = np.zeros((B, 1, Tq, Tk), bool)
    if causal:
        hidden |= j > i + (Tk - Tq)
    if pad is not None:
        hidden |= pad[:, None, None, :]
    return s, np.broadcast_to(hidden, s.shape)


@pytest.mark.derivation("ATT.1")
@given(configs(), st.sampled_from([None, 0.3, 0.7]))
@example(Config((1, 2, 1, 3, 5, 4), True, None, (1, 2, 3, 5), np.float64, 1.0, np.random.default_rng(0),
                dict.fromkeys(INPUTS, "contiguous")), None)  # causal, Tq < Tk: the mask is end-aligned
def test_logits_formula(config, attn_scale):
    """The logits behind the op's P, log P up to the constant of each row that the softmax drops (centred over
    the row's visible keys), are c_s q . k + beta of (ATT.1); every hidden pair has P = 0 exactly, every
    visible one P > 0. Logits of moderate size, so that no visible probability underflows."""
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    q, k, v, _, bias = make(shape, dtype, min(magnitude, 1.0), rng, bias_shape)
    a = in_layouts(layout_of, q=q, k=k, v=v, bias=bias, pad=pad)
    _, cache = attention_forward(a["q"], a["k"], a["v"], causal=causal, key_padding_mask=a["pad"], bias=a["bias"],
                                 scale=attn_scale)
    s, hidden = scores(q, k, bias, causal, pad, attn_scale)
    p, visible = cache.probs.astype(np.float64), ~hidden
    assert np.all(p[hidden] == 0) and np.all(p[visible] > 0)
    n = np.maximum(visible.sum(-1, keepdims=True), 1)

    def centred(a):  # each row less its mean over the visible keys; 0 at hidden ones
        a = np.where(visible, a, 0.0)
        return np.where(visible, a - a.sum(-1, keepdims=True) / n, 0.0)

    expected = centred(s)
    assert_close(centred(np.log(np.where(visible, p, 1.0))), expected, rtol=RTOL[np.dtype(dtype)],
                 scale=max(1.0, float(np.abs(expected).max(initial=0))), what="log P vs (ATT.1), row constants removed")


@pytest.mark.derivation("ATT.5")
@given(configs())
def test_dp_formula(config):
    """dP = dO V^T of (ATT.5), as the backward formed it. With a bias of full shape, dbias is dS = P * (dP - delta)
    of (ATT.7), and delta_i = rowsum(dP * P) = dO_i . o_i, so where P > 0 the backward's dP is dS / P + dO_i . o_i.
    It equals dO_i . v_j written out in float64 with the key/value head c(h) of each query head. (A constant added
    to a row of dP would change no gradient, (ATT.7), and would go unseen here too.)"""
    shape, causal, pad, _, dtype, magnitude, rng, layout_of = config
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, dout, _ = make(shape, dtype, min(magnitude, 1.0), rng)
    bias = rng.standard_normal((B, H, Tq, Tk)).astype(dtype)
    (out, _, _, _, ds), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    p = cache.probs.astype(np.float64)
    visible = p > 0
    delta = np.einsum("bhid,bhid->bhi", dout.astype(np.float64), out.astype(np.float64))[..., None]  # rowsum(dP * P)
    seen = np.where(visible, ds.astype(np.float64) / np.where(visible, p, 1.0) + delta, 0.0)  # (ATT.7) solved for dP
    kv_head = np.arange(H) // (H // Hkv)  # c(h)
    dp = np.einsum("bhid,bhjd->bhij", dout.astype(np.float64), v.astype(np.float64)[:, kv_head])  # (ATT.5)
    bound = float(np.abs(dout).max(initial=0) * np.abs(v).max(initial=0) * D)  # |dP| and |delta| at most this
    assert_close(seen, np.where(visible, dp, 0.0), rtol=RTOL[np.dtype(dtype)], scale=bound, what="dP vs (ATT.5)")


@pytest.mark.derivation("ATT.4")
@pytest.mark.derivation("ATT.12")
@given(configs(dtypes=st.just(np.float64)))
def test_dv_is_probs_transposed_times_dout_summed_over_group(config):
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, bias = make(shape, dtype, magnitude, rng, bias_shape)
    (_, _, _, dv, _), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    B, H, Hkv = shape[:3]
    per_head = cache.probs.swapaxes(-1, -2) @ dout  # (B, H, Tk, D): P_h^T dO_h   (ATT.4)
    expected = per_head.reshape(B, Hkv, H // Hkv, *per_head.shape[2:]).sum(2)  # (ATT.12)
    oracle = run_torch(q, k, v, dout, bias, causal, pad, sdpa=False)[3]
    scales = term_scales(q, k, v, dout, cache.probs)
    assert_close(dv, expected, scale=scales["dv"], what="dv vs (ATT.4)")
    assert_close(dv, oracle, scale=scales["dv"], what="dv vs torch")


def logits_gradient(q, k, v, dout, bias, causal, pad):
    """dL/dS from torch, S the masked logits of (ATT.1) (a full-shape bias is S up to a constant)."""
    B, H, Tq, _ = q.shape
    full = np.zeros((B, H, Tq, k.shape[2])) if bias is None else np.broadcast_to(bias, (B, H, Tq, k.shape[2])).copy()
    return run_torch(q, k, v, dout, full, causal, pad, sdpa=False)[4]


@pytest.mark.derivation("ATT.7")
@given(configs(dtypes=st.just(np.float64)))
def test_ds_formula(config):
    """dS = P * (dP - rowsum(dP * P)): with a full-shape bias, dbias is exactly dS."""
    shape, causal, pad, _, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    B, H, Hkv, Tq, Tk, D = shape
    bias = rng.standard_normal((B, H, Tq, Tk))
    (_, _, _, _, dbias), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    p = cache.probs
    dp = dout @ np.repeat(v, H // Hkv, axis=1).swapaxes(-1, -2)  # (ATT.5)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))  # (ATT.7)
    scale_ds = term_scales(q, k, v, dout, p)["dbias"]
    assert_close(dbias, ds, scale=scale_ds, what="dS vs (ATT.7)")
    assert_close(dbias, logits_gradient(q, k, v, dout, bias, causal, pad), scale=scale_ds, what="dS vs torch")


@pytest.mark.derivation("ATT.8")
@pytest.mark.derivation("ATT.9")
@given(configs(dtypes=st.just(np.float64)), st.sampled_from([None, 0.3, 2.0]))
def test_dq_dk_formulas(config, attn_scale):
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, bias = make(shape, dtype, magnitude, rng, bias_shape)
    (_, dq, dk, _, _), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of, attn_scale)
    B, H, Hkv, Tq, Tk, D = shape
    G, c = H // Hkv, 1 / np.sqrt(D) if attn_scale is None else attn_scale
    assert cache.scale == c
    p = cache.probs
    dp = dout @ np.repeat(v, G, axis=1).swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    scales = term_scales(q, k, v, dout, p, attn_scale=c)
    assert_close(dq, c * ds @ np.repeat(k, G, axis=1), scale=scales["dq"], what="dq vs (ATT.8)")
    dk_heads = c * ds.swapaxes(-1, -2) @ q  # (B, H, Tk, D)
    assert_close(dk, dk_heads.reshape(B, Hkv, G, Tk, D).sum(2), scale=scales["dk"], what="dk vs (ATT.9)")


@pytest.mark.derivation("ATT.10")
@given(configs(dtypes=st.just(np.float64)))
def test_dbias_sums_over_broadcast_axes(config):
    shape, causal, pad, _, dtype, magnitude, rng, layout_of = config
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    for bias_shape in [(1, 1, 1, 1), (B, 1, Tq, Tk), (1, H, Tq, Tk), (1, H, 1, Tk), (B, H, Tq, Tk)]:
        bias = rng.standard_normal(bias_shape)
        (_, _, _, _, dbias), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
        ds = logits_gradient(q, k, v, dout, bias, causal, pad)
        axes = tuple(a for a, n in enumerate(bias_shape) if n == 1)
        assert dbias.shape == bias_shape
        scale_dbias = term_scales(q, k, v, dout, cache.probs, bias_shape)["dbias"]
        assert_close(dbias, ds.sum(axis=axes, keepdims=True), scale=scale_dbias, what=f"dbias {bias_shape}")


@pytest.mark.derivation("ATT.6")
@pytest.mark.derivation("ATT.7")
def test_softmax_jacobian_symbolic():
    n = 3
    s = sp.symbols(f"s0:{n}", real=True)
    g = sp.symbols(f"g0:{n}", real=True)  # upstream dL/dP
    p = [sp.exp(si) / sum(sp.exp(sj) for sj in s) for si in s]
    for i in range(n):
        for j in range(n):
            claimed = p[i] * (sp.KroneckerDelta(i, j) - p[j])  # (ATT.6)
            assert sp.simplify(sp.diff(p[i], s[j]) - claimed) == 0, (i, j)
    for j in range(n):  # contracting the Jacobian with g gives (ATT.7)
        chain = sum(g[i] * sp.diff(p[i], s[j]) for i in range(n))
        claimed = p[j] * (g[j] - sum(gi * pi for gi, pi in zip(g, p)))
        assert sp.simplify(chain - claimed) == 0, j


@pytest.mark.derivation("ATT.13")
def test_dot_product_variance_is_d():
    """q . k of independent zero-mean unit-variance entries has mean 0 and variance D; scaled, variance 1."""
    D = 4
    q = [Normal(f"q{i}", 0, 1) for i in range(D)]
    k = [Normal(f"k{i}", 0, 1) for i in range(D)]
    dot = sum(a * b for a, b in zip(q, k))
    assert sp.simplify(expectation(dot)) == 0
    assert sp.simplify(variance(dot)) == D
    assert sp.simplify(variance(dot / sp.sqrt(D))) == 1


@pytest.mark.derivation("ATT.11")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows_give_zero_output_and_gradient(dtype):
    rng = np.random.default_rng(0)
    B, H, Tq, Tk, D = 2, 2, 5, 3, 4
    q, k, v, dout, _ = make((B, H, H, Tq, Tk, D), dtype, 1.0, rng)
    pad = np.array([[True] * Tk, [False, True, False]])  # batch 0: every key is padding
    bias = rng.standard_normal((B, H, Tq, Tk)).astype(dtype)
    (out, dq, dk, dv, dbias), cache = run_ours(q, k, v, dout, bias, True, pad)  # causal, Tq > Tk: rows 0, 1 see nothing
    for x in (out, dq, dk, dv, dbias):
        assert np.all(np.isfinite(x))
    assert np.all(out[0] == 0) and np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
    assert np.all(dbias[0] == 0)
    assert np.all(out[1, :, :2] == 0) and np.all(dq[1, :, :2] == 0) and np.all(dbias[1, :, :2] == 0)
    assert np.all(dbias[1, :, :, 1] == 0)  # the padded key
    assert np.all(dk[1, :, 1] == 0) and np.all(dv[1, :, 1] == 0)
    # the rows that see keys still match torch
    oracle = run_torch(q, k, v, dout, bias, True, pad, sdpa=False)
    compare((out, dq, dk, dv, dbias), oracle, cache, q, k, v, dout, dtype)
    assert np.any(out[1, :, 2:] != 0)


@pytest.mark.derivation("ATT.11")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_logits_stay_finite(dtype):
    """Logits of +-1e4 (through the bias and through q . k): a one-hot softmax, no overflow, no warning."""
    rng = np.random.default_rng(1)
    B, H, T, D = 1, 2, 4, 4
    q, k, v, dout, _ = make((B, H, H, T, T, D), dtype, 1.0, rng)
    if dtype == np.float32:
        q[:] = 0  # float32 cannot hold 1e4 + q . k to 1e-4 of the O(1) part: the logits are the bias alone
    bias = np.where(rng.random((B, H, T, T)) < 0.5, 1e4, -1e4).astype(dtype)
    bias[..., 0] = -1e4  # every row has both signs, key 0 is always suppressed
    bias[..., 1] = 1e4
    (out, dq, dk, dv, dbias), cache = run_ours(q, k, v, dout, bias, False, None)
    for x in (out, dq, dk, dv, dbias):
        assert np.all(np.isfinite(x))
    assert np.all(cache.probs[..., 0] == 0)
    compare((out, dq, dk, dv, dbias), run_torch(q, k, v, dout, bias, False, None, sdpa=False),
            cache, q, k, v, dout, dtype)
    # q . k of 1e4 itself
    big_q = np.full((1, 1, 2, 1), 100.0, dtype)
    big_k = np.array([[[[100.0], [-100.0], [99.0]]]], dtype)
    out, cache = attention_forward(big_q, big_k, big_k, scale=1.0)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(cache.probs))
    assert_close(cache.probs[0, 0, :, 0], [1.0, 1.0], scale=1.0, what="one-hot on the largest logit")


# -- float32 logits with a huge common offset --------------------------------------------------


class OffsetCase(NamedTuple):
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dout: np.ndarray
    causal: bool
    exponent: int  # the logits are 2**exponent + d_ij


@st.composite
def offset_cases(draw):
    """float32 inputs whose logits (scale 1) float32 holds exactly: c + d_ij with a common offset
    c = 2**e, e up to 120, through q . k. For e <= 20 the differences d_ij are multiples of 1/4 in
    [-2, 2] (a softmax of O(1) logits sitting on a huge offset); beyond, every row is a row of equal
    scores. Causal with Tq > Tk adds rows that see no key. The float64 oracle sees the same values."""
    B, Hkv, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    Tq, Tk = draw(st.sampled_from([1, 2, 3, 5, 8])), draw(st.sampled_from([1, 2, 3, 5, 8]))
    e = draw(st.sampled_from([0, 10, 20, 40, 80, 120]))
    rng = draw(rngs())
    H, D = Hkv * G, 3
    q = np.zeros((B, H, Tq, D), np.float32)
    k = np.zeros((B, Hkv, Tk, D), np.float32)
    q[..., 0] = k[..., 0] = 2.0 ** (e // 2)
    if e <= 20:
        q[..., 1:] = rng.integers(-2, 3, size=(B, H, Tq, 2)) / 2
        k[..., 1:] = rng.integers(-2, 3, size=(B, Hkv, Tk, 2)) / 2
    v = rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32)
    dout = rng.standard_normal((B, H, Tq, D)).astype(np.float32)
    return OffsetCase(q, k, v, dout, draw(st.booleans()), e)


@pytest.mark.derivation("ATT.2")
@given(offset_cases())
def test_float32_logit_offsets(case):
    """The row maximum is subtracted exactly: float32 probabilities and gradients are those of float64."""
    q, k, v, dout, causal, e = case
    ours, cache = run_ours(q, k, v, dout, None, causal, None, attn_scale=1.0)
    for x in ours[:4]:
        assert np.all(np.isfinite(x))
    oracle = run_torch(q, k, v, dout, None, causal, None, sdpa=False, attn_scale=1.0)
    compare(ours, oracle, cache, q, k, v, dout, np.float32, attn_scale=1.0)
    if e > 20:  # rows of equal scores: P is exactly uniform over the visible keys
        visible = ~hidden_mask(q.shape[0], q.shape[2], k.shape[2], causal, None)
        counts = visible.sum(-1, keepdims=True)
        expected = np.where(visible, 1.0 / np.maximum(counts, 1), 0.0)
        assert_close(cache.probs, np.broadcast_to(expected, cache.probs.shape), scale=1.0, what="uniform rows")


# -- empty sequences ---------------------------------------------------------------------------


@st.composite
def empty_configs(draw):
    """Tq = 0 or Tk = 0 (or both), with the other options drawn as usual."""
    config = draw(configs())
    B, H, Hkv, Tq, Tk, D = config.shape
    Tq, Tk = draw(st.sampled_from([(0, Tk), (Tq, 0), (0, 0)]))
    bias_shape = None if config.bias_shape is None else config.bias_shape[:2] + (
        Tq if config.bias_shape[2] > 1 else 1, Tk if config.bias_shape[3] > 1 else 1)
    pad = None if config.pad is None else np.zeros((B, Tk), bool)
    return config._replace(shape=(B, H, Hkv, Tq, Tk, D), pad=pad, bias_shape=bias_shape)


@pytest.mark.derivation("ATT.11")
@given(empty_configs())
def test_empty_sequences(config):
    """Tq = 0: empty output and dq, zero dk, dv. Tk = 0: every row sees no key, so (ATT.11) gives out = 0, dq = 0."""
    shape, causal, pad, bias_shape, dtype, magnitude, rng, layout_of = config
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, dout, bias = make(shape, dtype, magnitude, rng, bias_shape)
    (out, dq, dk, dv, dbias), cache = run_ours(q, k, v, dout, bias, causal, pad, layout_of)
    assert out.shape == dq.shape == (B, H, Tq, D) and dk.shape == dv.shape == (B, Hkv, Tk, D)
    assert cache.probs.shape == (B, H, Tq, Tk)
    assert all(x.dtype == dtype for x in (out, dq, dk, dv))
    for x in (out, dq, dk, dv) + (() if dbias is None else (dbias,)):
        assert np.all(x == 0)  # empty, or zero by (ATT.11)
    assert (dbias is None) == (bias is None) and (dbias is None or dbias.shape == bias_shape)


# -- finite differences, worked cases ------------------------------------------------------------


# Tk >= 2 so that no softmax is over a single key (whose dq is round-off around zero).
@given(st.sampled_from([(1, 2, 1), (2, 2, 2), (1, 3, 3)]), st.sampled_from([2, 3, 5]), st.sampled_from([2, 3, 5]),
       st.booleans(), st.booleans(), rngs())
def test_finite_differences(heads, Tq, Tk, causal, with_bias, rng):
    B, H, Hkv = heads
    q, k, v, _, bias = make((B, H, Hkv, Tq, Tk, 3), np.float64, 1.0, rng, (1, H, Tq, Tk) if with_bias else None)
    assume(not causal or Tq <= Tk)  # every query row sees at least one key ...
    inputs = {"q": q, "k": k, "v": v, **({"bias": bias} if with_bias else {})}
    results = gradcheck.check(attention_forward, attention_backward, inputs,
                              wrt=("q", "k", "v", "bias" if with_bias else None), options={"causal": causal})
    assert [r.input for r in results] == ["q", "k", "v"] + (["bias"] if with_bias else [])
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def test_gradcheck_cases_pass():
    results = [r for case in gradcheck.cases("attention") for r in gradcheck.check_case(case)]
    assert len(results) == 13  # 3 + 3 + 4 + 3 (the sliding-window case)
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def test_causal_alignment_is_end_aligned():
    """With Tq < Tk the last query sees every key and query i sees keys 0 .. i + Tk - Tq."""
    hidden = causal_mask(2, 4)
    assert hidden.tolist() == [[False, False, False, True], [False, False, False, False]]
    assert causal_mask(3, 1).tolist() == [[True], [True], [False]]


def test_default_scale_and_explicit_scale():
    rng = np.random.default_rng(2)
    q, k, v, _, _ = make((1, 1, 1, 3, 4, 9), np.float64, 1.0, rng)
    _, default = attention_forward(q, k, v)
    _, explicit = attention_forward(q / 3.0, k, v, scale=1.0)
    assert default.scale == 1 / 3
    assert_close(default.probs, explicit.probs, what="scale 1/sqrt(9) = 1/3")


def test_float32_stays_float32_on_the_hot_path_shape():
    rng = np.random.default_rng(3)
    q, k, v, dout, _ = make((2, 6, 6, 16, 16, 8), np.float32, 1.0, rng)
    (out, dq, dk, dv, dbias), cache = run_ours(q, k, v, dout, None, True, None)
    assert {x.dtype for x in (out, dq, dk, dv, cache.probs)} == {np.dtype(np.float32)}
    assert dbias is None
    oracle = run_torch(q, k, v, dout, None, True, None, sdpa=True)
    compare((out, dq, dk, dv, dbias), oracle, cache, q, k, v, dout, np.float32)
    assert RTOL[out.dtype] == 1e-4


# -- bad input -----------------------------------------------------------------------------------

# Bad scalar options, shared by the attention and position test files.
@st.composite
def valid_calls(draw):
    """Valid arguments of attention_forward (Tk >= 1, a full-shape bias) and a matching dout."""
    B, Hkv, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3]))
    Tq, Tk, D, dtype, rng = draw(SIZES), draw(SIZES), draw(st.sampled_from([1, 4])), draw(DTYPES), draw(rngs())
    q, k, v, dout, bias = make((B, Hkv * G, Hkv, Tq, Tk, D), dtype, 1.0, rng, (B, Hkv * G, Tq, Tk))
    args = {"q": q, "k": k, "v": v, "key_padding_mask": rng.random((B, Tk)) < 0.3, "bias": bias}
    return args, dout


def call_forward(args, name, value):
    given_args = {**args, name: value}
    return attention_forward(given_args["q"], given_args["k"], given_args["v"],
                             **{n: given_args[n] for n in ("key_padding_mask", "bias", "causal", "scale")
                                if n in given_args})


@pytest.mark.parametrize("name", ["q", "k", "v", "key_padding_mask", "bias"])
@given(valid_calls())
def test_forward_rejects_bad_arrays(name, call):
    args, _ = call
    dtype = args["q"].dtype
    kinds = {"key_padding_mask": NOT_A_MASK,
             "bias": tuple(k for k in ARRAY_KINDS if k != "none") + SUBCLASS_KINDS + (other_float(dtype),)}.get(
        name, ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dtype),))
    rejects_all(lambda bad: call_forward(args, name, bad), "attention_forward", name,
                [corrupt(args[name], kind) for kind in kinds])


@pytest.mark.parametrize("name, bad_values", [("causal", BAD_FLAGS), ("scale", BAD_SCALES)])
@given(valid_calls())
def test_forward_rejects_bad_options(name, bad_values, call):
    args, _ = call
    rejects_all(lambda bad: call_forward(args, name, bad), "attention_forward", name, bad_values)


@given(valid_calls())
def test_forward_rejects_heads_that_do_not_divide(call):
    args, _ = call
    q, k, v = args["q"], args["k"], args["v"]
    H = q.shape[1]
    k3, v3 = (np.concatenate([x] * (H + 1), axis=1) for x in (k, v))  # H + 1 kv heads never divide H
    expect_rejected(lambda: attention_forward(q, k3[:, : H + 1], v3[:, : H + 1]), "attention_forward", "k")
    expect_rejected(lambda: attention_forward(q[..., :0], k[..., :0], v[..., :0]), "attention_forward", "q")


@pytest.mark.parametrize("name", ["dout", "cache"])
@given(valid_calls())
def test_backward_rejects_bad_input(name, call):
    args, dout = call
    _, cache = call_forward(args, "causal", True)
    if name == "dout":
        bad_values = [corrupt(dout, kind) for kind in ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dout.dtype),)]
        rejects_all(lambda bad: attention_backward(bad, cache), "attention_backward", "dout", bad_values)
    else:
        bad_values = [None, tuple(cache), list(cache), cache._asdict(), "cache", dout]
        rejects_all(lambda bad: attention_backward(dout, bad), "attention_backward", "cache", bad_values)


@pytest.mark.parametrize("name", ["Tq", "Tk"])
@given(SIZES, SIZES)
def test_causal_mask_rejects_bad_sizes(name, Tq, Tk):
    sizes = {"Tq": Tq, "Tk": Tk}
    rejects_all(lambda bad: causal_mask(**{**sizes, name: bad}), "causal_mask", name, BAD_COUNTS)
    assert causal_mask(**sizes).shape == (Tq, Tk)
