"""Tiled attention: equal to the plain op to round-off, torch oracle, memory, the equations of proofs/flash_attention.md."""

import tracemalloc

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops import flash_attention as flash
from npformer.ops.attention import attention_backward, attention_forward
from npformer.ops.flash_attention import flash_attention_backward, flash_attention_forward
from tests.ops.test_attention import hidden_mask, make, run_torch, term_scales
from tests.strategies import DTYPES, rngs
from tests.tolerances import FD_RTOL, assert_close

BLOCKS = st.sampled_from([1, 2, 3, 4, 8, 64])


@st.composite
def configs(draw, dtypes=DTYPES):
    B = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    Tq, Tk = draw(st.sampled_from([1, 2, 5, 7, 9])), draw(st.sampled_from([1, 3, 5, 8, 11]))
    D = draw(st.sampled_from([1, 3, 8]))
    dtype = draw(dtypes)
    scale = draw(st.sampled_from([1e-2, 1.0, 3.0] if dtype == np.float32 else [1e-2, 1.0, 3.0, 30.0]))
    return (B, H, Hkv, Tq, Tk, D), draw(st.booleans()), draw(BLOCKS), draw(BLOCKS), dtype, scale, draw(rngs())


def run_flash(q, k, v, dout, causal, block_q, block_k):
    out, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    return (out, *flash_attention_backward(dout, cache)), cache


@pytest.mark.derivation("FA.3")
@pytest.mark.derivation("FA.7")
@given(configs())
def test_matches_plain_attention(config):
    """Same output and gradients as attention_forward/backward, whatever the tile sizes."""
    shape, causal, block_q, block_k, dtype, scale, rng = config
    q, k, v, dout, _ = make(shape, dtype, scale, rng)
    ours, _ = run_flash(q, k, v, dout, causal, block_q, block_k)
    plain_out, plain_cache = attention_forward(q, k, v, causal=causal)
    plain = (plain_out, *attention_backward(dout, plain_cache)[:3])
    scales = term_scales(q, k, v, dout, plain_cache.probs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, plain):
        assert a.dtype == dtype, name
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("FA.4")
@pytest.mark.derivation("FA.7")
@given(configs())
def test_matches_torch(config):
    shape, causal, block_q, block_k, dtype, scale, rng = config
    q, k, v, dout, _ = make(shape, dtype, scale, rng)
    ours, _ = run_flash(q, k, v, dout, causal, block_q, block_k)
    empty_rows = causal and shape[3] > shape[4]  # sdpa gives NaN on a row that sees no key
    oracle = run_torch(q, k, v, dout, None, causal, None, sdpa=not empty_rows)
    scales = term_scales(q, k, v, dout, attention_forward(q, k, v, causal=causal)[1].probs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, oracle):
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("FA.4")
@given(configs(dtypes=st.just(np.float64)))
def test_lse_is_logsumexp(config):
    shape, causal, block_q, block_k, dtype, scale, rng = config
    q, k, v, _, _ = make(shape, dtype, scale, rng)
    B, H, Hkv, Tq, Tk, D = shape
    _, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    s = q @ np.repeat(k, H // Hkv, axis=1).swapaxes(-1, -2) / np.sqrt(D)
    hidden = np.broadcast_to(hidden_mask(B, Tq, Tk, causal, None), s.shape)
    s = np.where(hidden, -np.inf, s)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m[..., 0])
    m = np.where(np.isfinite(m), m, 0.0)
    expected = m[..., 0] + np.log(np.where(seen, np.exp(s - m).sum(-1), 1.0))
    assert cache.lse.shape == (B, H, Tq) and cache.lse.dtype == dtype
    assert np.all(cache.lse[~seen] == np.inf)
    assert_close(cache.lse[seen], expected[seen], scale=max(1.0, float(np.abs(expected[seen]).max(initial=0))), what="lse")


@pytest.mark.derivation("FA.5")
@given(configs(dtypes=st.just(np.float64)))
def test_probs_recomputed_from_lse(config):
    shape, causal, block_q, block_k, dtype, scale, rng = config
    q, k, v, _, _ = make(shape, dtype, scale, rng)
    B, H, Hkv, Tq, Tk, D = shape
    _, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    _, plain = attention_forward(q, k, v, causal=causal)
    s = q @ np.repeat(k, H // Hkv, axis=1).swapaxes(-1, -2) * cache.scale
    s = np.where(np.broadcast_to(hidden_mask(B, Tq, Tk, causal, None), s.shape), -np.inf, s)
    assert_close(np.exp(s - cache.lse[..., None]), plain.probs, scale=1.0, what="exp(s - lse) vs P")  # (FA.5)


@pytest.mark.derivation("FA.6")
@given(configs(dtypes=st.just(np.float64)))
def test_delta_identity(config):
    """rowsum(dO * O) = rowsum(dP * P): the row sums of (ATT.7) from O(T D) data."""
    shape, causal, _, _, dtype, scale, rng = config
    q, k, v, dout, _ = make(shape, dtype, scale, rng)
    H, Hkv = shape[1], shape[2]
    out, cache = attention_forward(q, k, v, causal=causal)
    dp = dout @ np.repeat(v, H // Hkv, axis=1).swapaxes(-1, -2)
    from_o = (dout * out).sum(-1)
    from_p = (dp * cache.probs).sum(-1)
    assert_close(from_o, from_p, scale=float(np.abs(dout).max() * np.abs(v).max() * shape[5]), what="D_i")


@pytest.mark.derivation("FA.2")
def test_merge_identity_symbolic():
    """Two partial states of 2 logits each merge into the state of all 4 (any reference maxima)."""
    s = sp.symbols("s0:4", real=True)
    v = sp.symbols("v0:4", real=True)  # D = 1 values
    m1, m2 = sp.symbols("m1 m2", real=True)

    def state(idx, m):  # (FA.1) with reference m
        return sum(sp.exp(s[j] - m) for j in idx), sum(sp.exp(s[j] - m) * v[j] for j in idx)

    (l1, a1), (l2, a2) = state((0, 1), m1), state((2, 3), m2)
    for m in (m1, m2, sp.Max(m1, m2)):  # (FA.2): the merged state, whichever reference wins the max
        l, a = sp.exp(m1 - m) * l1 + sp.exp(m2 - m) * l2, sp.exp(m1 - m) * a1 + sp.exp(m2 - m) * a2
        l_all, a_all = state(range(4), m)
        assert sp.simplify(l - l_all) == 0
        assert sp.simplify(a - a_all) == 0
    # a / l is the softmax average of all four, with the true maxima
    values = {s[0]: 1, s[1]: -2, s[2]: 3, s[3]: sp.Rational(1, 2), v[0]: 5, v[1]: -1, v[2]: 2, v[3]: 7}
    ref = {m1: 1, m2: 3}
    m = sp.Max(*ref.values())
    l = (sp.exp(m1 - m) * l1 + sp.exp(m2 - m) * l2).subs(ref).subs(values)
    a = (sp.exp(m1 - m) * a1 + sp.exp(m2 - m) * a2).subs(ref).subs(values)
    softmax_avg = sum(sp.exp(s[j]) * v[j] for j in range(4)) / sum(sp.exp(s[j]) for j in range(4))
    assert sp.simplify(a / l - softmax_avg.subs(values)) == 0


def test_causal_tiles_above_diagonal_are_skipped(monkeypatch):
    """Tq = Tk = 8, tiles of 2: the forward visits 4 + 3 + 2 + 1 = 10 of the 16 tiles, the backward too."""
    calls = []
    original = flash._tile_logits
    monkeypatch.setattr(flash, "_tile_logits", lambda *a: calls.append(a[4:6]) or original(*a))
    rng = np.random.default_rng(0)
    q, k, v, dout, _ = make((1, 1, 1, 8, 8, 3), np.float64, 1.0, rng)
    out, cache = flash_attention_forward(q, k, v, causal=True, block_q=2, block_k=2)
    assert len(calls) == 10 and all(j0 <= i0 for i0, j0 in calls)
    calls.clear()
    grads = flash_attention_backward(dout, cache)
    assert len(calls) == 10 and all(j0 <= i0 for i0, j0 in calls)
    plain_out, plain_cache = attention_forward(q, k, v, causal=True)
    assert_close(out, plain_out, what="out")
    for a, b in zip(grads, attention_backward(dout, plain_cache)[:3]):
        assert_close(a, b)
    calls.clear()
    flash_attention_forward(q, k, v, causal=False, block_q=2, block_k=2)
    assert len(calls) == 16


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rows_that_see_no_key(dtype):
    """Causal with Tq > Tk: the first Tq - Tk rows see nothing: output 0, lse +inf, zero gradients, no NaN."""
    rng = np.random.default_rng(1)
    q, k, v, dout, _ = make((1, 2, 1, 7, 3, 4), dtype, 1.0, rng)
    (out, dq, dk, dv), cache = run_flash(q, k, v, dout, True, 3, 2)
    assert np.all(out[:, :, :4] == 0) and np.all(dq[:, :, :4] == 0) and np.all(cache.lse[:, :, :4] == np.inf)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dq)) and np.all(np.isfinite(dk)) and np.all(np.isfinite(dv))
    plain_out, plain_cache = attention_forward(q, k, v, causal=True)
    assert_close(out, plain_out, what="out")
    for a, b in zip((dq, dk, dv), attention_backward(dout, plain_cache)[:3]):
        assert_close(a, b)


def test_gradcheck_cases_pass():
    results = [r for case in gradcheck.cases("flash_attention") for r in gradcheck.check_case(case)]
    assert len(results) == 6
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def peak_extra_bytes(forward, backward, T, **options):
    """Peak bytes allocated by forward + backward beyond the inputs (B = H = 1, D = 16, float64)."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, T, 16)) for _ in range(4))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out, cache = forward(q, k, v, causal=True, **options)
        grads = backward(dout, cache)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del out, cache, grads
    return peak


@pytest.mark.derivation("FA.8")
def test_peak_memory_is_linear_in_length():
    plain = [peak_extra_bytes(attention_forward, attention_backward, T) for T in (512, 1024)]
    tiled = [peak_extra_bytes(flash_attention_forward, flash_attention_backward, T, block_q=32, block_k=32)
             for T in (512, 1024)]
    plain_ratio, tiled_ratio = plain[1] / plain[0], tiled[1] / tiled[0]
    print(f"\npeak extra bytes, forward + backward, D = 16, float64:"
          f"\n  plain attention  T=512: {plain[0]:>10,d}  T=1024: {plain[1]:>10,d}  ratio {plain_ratio:.2f}"
          f"\n  flash attention  T=512: {tiled[0]:>10,d}  T=1024: {tiled[1]:>10,d}  ratio {tiled_ratio:.2f}")
    # Doubling T: O(T^2) memory grows ~4x, O(T D) memory ~2x (FA.8); the bounds leave room for constants.
    assert plain_ratio > 3.4
    assert tiled_ratio < 2.6
    assert tiled[1] < plain[1] / 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_q": 0}, "flash_attention_forward: argument 'block_q' expected a positive integer, got 0"),
        ({"block_k": 2.5}, "argument 'block_k' expected a positive integer, got 2.5"),
        ({"k": np.ones((1, 3, 4, 2)), "v": np.ones((1, 3, 4, 2))}, "argument 'k' expected a number of heads dividing q's H = 2, got 3"),
        ({"v": np.ones((1, 1, 5, 2))}, "argument 'v' expected shape (1, 1, 4, 2), got (1, 1, 5, 2)"),
        ({"q": np.ones((1, 2, 3, 2), np.float32)}, "argument 'k' expected dtype float32 (same as 'q'), got float64"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    args = {"q": np.ones((1, 2, 3, 2)), "k": np.ones((1, 1, 4, 2)), "v": np.ones((1, 1, 4, 2))}
    options = {key: kwargs.pop(key) for key in ("block_q", "block_k") if key in kwargs}
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        flash_attention_forward(args["q"], args["k"], args["v"], **options)
    assert message in str(err.value)


def test_backward_rejects_wrong_dout():
    _, cache = flash_attention_forward(np.ones((1, 2, 3, 2)), np.ones((1, 1, 4, 2)), np.ones((1, 1, 4, 2)))
    with pytest.raises(ValueError, match=r"flash_attention_backward: argument 'dout' expected shape \(1, 2, 3, 2\)"):
        flash_attention_backward(np.ones((1, 2, 3, 3)), cache)
