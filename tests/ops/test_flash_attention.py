"""Tiled attention: equal to the plain op to round-off, torch oracle, memory, the equations of
proofs/flash_attention.md, the kernel's backward schedule, layouts, float32 offsets, empty sequences, bad input."""

import tracemalloc
from unittest import mock

import numpy as np
import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from npformer.ops import fastpath
from npformer import gradcheck
from npformer.ops import flash_attention as flash
from npformer.ops.attention import attention_backward, attention_forward
from npformer.ops.flash_attention import flash_attention_backward, flash_attention_forward
from tests.badinput import ARRAY_KINDS, BAD_FLAGS, BAD_SCALES, SUBCLASS_KINDS, corrupt, other_float, rejects_all
from tests.ops.test_attention import hidden_mask, in_layouts, layouts_of_inputs, make, offset_cases, run_torch, term_scales
from tests.strategies import DTYPES, rngs
from tests.tolerances import FD_RTOL, RTOL, assert_close

BLOCKS = st.sampled_from([1, 2, 3, 4, 8, 64])
BAD_BLOCKS = (0, -1, 2.5, True, False, "4", None, np.float64(4.0), [4])


@st.composite
def configs(draw, dtypes=DTYPES):
    B = draw(st.sampled_from([1, 2]))
    Hkv = draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    Tq, Tk = draw(st.sampled_from([1, 2, 5, 7, 9])), draw(st.sampled_from([1, 3, 5, 8, 11]))
    D = draw(st.sampled_from([1, 3, 8]))
    dtype = draw(dtypes)
    magnitude = draw(st.sampled_from([1e-2, 1.0, 3.0] if dtype == np.float32 else [1e-2, 1.0, 3.0, 30.0]))
    return ((B, H, Hkv, Tq, Tk, D), draw(st.booleans()), draw(BLOCKS), draw(BLOCKS), dtype, magnitude, draw(rngs()),
            draw(layouts_of_inputs()))


def run_flash(q, k, v, dout, causal, block_q, block_k, layout_of=None, attn_scale=None):
    a = in_layouts(layout_of, q=q, k=k, v=v, dout=dout)
    out, cache = flash_attention_forward(a["q"], a["k"], a["v"], causal=causal, scale=attn_scale,
                                         block_q=block_q, block_k=block_k)
    return (out, *flash_attention_backward(a["dout"], cache)), cache


def logits(q, k, causal, attn_scale=None):
    """S of (ATT.1) with -inf where causally hidden, written out: (B, H, Tq, Tk)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    c = 1 / np.sqrt(D) if attn_scale is None else attn_scale
    s = q @ np.repeat(k, H // Hkv, axis=1).swapaxes(-1, -2) * c
    return np.where(np.broadcast_to(hidden_mask(B, Tq, Tk, causal, None), s.shape), -np.inf, s)


@pytest.mark.derivation("FA.3")
@pytest.mark.derivation("FA.7")
@given(configs())
def test_matches_plain_attention(config):
    """Same output and gradients as attention_forward/backward, whatever the tile sizes and the layouts."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    ours, _ = run_flash(q, k, v, dout, causal, block_q, block_k, layout_of)
    plain_out, plain_cache = attention_forward(q, k, v, causal=causal)
    plain = (plain_out, *attention_backward(dout, plain_cache)[:3])
    scales = term_scales(q, k, v, dout, plain_cache.probs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, plain):
        assert a.dtype == dtype, name
        assert a.flags.c_contiguous, f"{name} is not C-contiguous"
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("FA.4")
@pytest.mark.derivation("FA.7")
@given(configs())
def test_matches_torch(config):
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    ours, _ = run_flash(q, k, v, dout, causal, block_q, block_k, layout_of)
    empty_rows = causal and shape[3] > shape[4]  # sdpa gives NaN on a row that sees no key
    oracle = run_torch(q, k, v, dout, None, causal, None, sdpa=not empty_rows)
    scales = term_scales(q, k, v, dout, attention_forward(q, k, v, causal=causal)[1].probs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, oracle):
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("FA.4")
@given(configs(dtypes=st.just(np.float64)))
def test_lse_is_logsumexp(config):
    """lse = m + log l = log sum_j exp(s_j), with m the row maximum; +inf (and m = 0) where no key is seen."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, _, _ = make(shape, dtype, magnitude, rng)
    B, H, Hkv, Tq, Tk, D = shape
    a = in_layouts(layout_of, q=q, k=k, v=v)
    _, cache = flash_attention_forward(a["q"], a["k"], a["v"], causal=causal, block_q=block_q, block_k=block_k)
    s = logits(q, k, causal)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m[..., 0])
    m = np.where(np.isfinite(m), m, 0.0)
    log_l = np.log(np.where(seen, np.exp(s - m).sum(-1), 1.0))
    expected = m[..., 0] + log_l  # (FA.4)
    assert cache.lse.shape == cache.row_max.shape == cache.log_row_sum.shape == (B, H, Tq)
    assert cache.lse.dtype == dtype
    assert np.all(cache.lse[~seen] == np.inf) and np.all(cache.log_row_sum[~seen] == np.inf)
    assert np.all(cache.row_max[~seen] == 0)
    assert_close(cache.row_max, m[..., 0], scale=max(1.0, float(np.abs(m).max())), what="m, the largest visible logit")
    scale_lse = max(1.0, float(np.abs(expected[seen]).max(initial=0)))
    assert_close(cache.lse[seen], expected[seen], scale=scale_lse, what="lse")
    assert_close(cache.log_row_sum[seen], log_l[seen], scale=max(1.0, float(np.abs(log_l).max())), what="log l")


@pytest.mark.derivation("FA.5")
@given(configs(dtypes=st.just(np.float64)))
def test_probs_recomputed_from_lse(config):
    """exp(s - lse) = exp((s - m) - log l) = P, and the tiles the backward recomputes assemble into P."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, _ = config
    q, k, v, _, _ = make(shape, dtype, magnitude, rng)
    B, H, Hkv, Tq, Tk, D = shape
    _, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    _, plain = attention_forward(q, k, v, causal=causal)
    s = logits(q, k, causal)
    assert_close(np.exp(s - cache.lse[..., None]), plain.probs, scale=1.0, what="exp(s - lse) vs P")  # (FA.5)
    from_stats = np.exp((s - cache.row_max[..., None]) - cache.log_row_sum[..., None])  # (FA.5), as the code has it
    assert_close(from_stats, plain.probs, scale=1.0, what="exp((s - m) - log l) vs P")
    tiled = np.full((B, H, Tq, Tk), np.nan)
    qg = q.reshape(B, Hkv, H // Hkv, Tq, D)
    for i0 in range(0, Tq, block_q):
        for j0 in range(0, Tk, block_k):
            i1, j1 = min(i0 + block_q, Tq), min(j0 + block_k, Tk)
            tiled[:, :, i0:i1, j0:j1] = flash._tile_probs(cache, qg, i0, i1, j0, j1).reshape(B, H, i1 - i0, j1 - j0)
    assert_close(tiled, plain.probs, scale=1.0, what="tiles of P recomputed by the backward")


@pytest.mark.derivation("FA.6")
@given(configs(dtypes=st.just(np.float64)))
def test_delta_identity(config):
    """delta_i of the flash backward, from O(T D) data, equals rowsum(dP * P), the row sums of (ATT.7)."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    H, Hkv = shape[1], shape[2]
    a = in_layouts(layout_of, q=q, k=k, v=v, dout=dout)
    _, cache = flash_attention_forward(a["q"], a["k"], a["v"], causal=causal, block_q=block_q, block_k=block_k)
    delta = flash._backward_delta(a["dout"], cache)  # (FA.6), as the flash backward computes it
    _, plain = attention_forward(q, k, v, causal=causal)
    dp = dout @ np.repeat(v, H // Hkv, axis=1).swapaxes(-1, -2)  # (ATT.5)
    from_p = (dp * plain.probs).sum(-1)  # rowsum(dP * P)
    assert delta.shape == from_p.shape
    assert_close(delta, from_p, scale=float(np.abs(dout).max() * np.abs(v).max() * shape[5]), what="delta_i")


@pytest.mark.derivation("FA.1")
@given(configs())
def test_state_of_a_set_of_keys(config):
    """(FA.1) for a set J of keys: the forward run on the keys of J alone ends in the state of J, read from the
    cache as m = row_max, l = exp(log_row_sum) and a = out * l, and that is max_J s, sum_J exp(s - m) and
    sum_J exp(s - m) v written out in float64. J is a random subset of the keys, and each prefix J_1 u ... u J_t
    of the key tiles: the state the online update (FA.3) holds after tile t."""
    shape, _, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, _, _ = make(shape, dtype, magnitude, rng)
    B, H, Hkv, Tq, Tk, D = shape
    subset = np.sort(rng.choice(Tk, size=int(rng.integers(1, Tk + 1)), replace=False))
    prefixes = [np.arange(min(j1, Tk)) for j1 in range(block_k, Tk + block_k, block_k)]
    for J in [subset] + prefixes:
        a = in_layouts(layout_of, q=q, k=k[:, :, J], v=v[:, :, J])
        out, cache = flash_attention_forward(a["q"], a["k"], a["v"], block_q=block_q, block_k=block_k)
        s = logits(q.astype(np.float64), k[:, :, J].astype(np.float64), causal=False)  # s_j, j in J
        m = s.max(-1)  # (FA.1)
        e = np.exp(s - m[..., None])
        ell = e.sum(-1)  # (FA.1)
        acc = e @ np.repeat(v[:, :, J].astype(np.float64), H // Hkv, axis=1)  # (FA.1)
        l_seen = np.exp(cache.log_row_sum.astype(np.float64))
        what = f"keys {J.tolist()}"
        assert_close(cache.row_max, m, scale=max(1.0, float(np.abs(m).max())), what=f"m, {what}")
        assert_close(l_seen, ell, rtol=RTOL[np.dtype(dtype)], scale=float(ell.max()), what=f"l, {what}")
        assert_close(out.astype(np.float64) * l_seen[..., None], acc, rtol=RTOL[np.dtype(dtype)],
                     scale=float(ell.max() * np.abs(v).max()), what=f"a, {what}")


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


@pytest.mark.derivation("FA.3")
@pytest.mark.derivation("FA.9")
@given(st.sampled_from([1, 4, 7, 8, 9]), st.sampled_from([1, 4, 7, 8, 9]), st.sampled_from([1, 2, 3, 4]),
       st.sampled_from([1, 2, 3, 4]), st.booleans(), rngs())
def test_causal_tiles_above_diagonal_are_skipped(Tq, Tk, block_q, block_k, causal, rng):
    """The tiles visited, in order: the forward and the dQ pass by query tile, the dK/dV pass by key tile;
    causal skips exactly the tiles entirely above the diagonal, and the result is unchanged (FA.3)."""
    calls = []
    original = flash._tile_logits
    recording = mock.patch.object(flash, "_tile_logits", lambda *a: calls.append(tuple(a[4:6])) or original(*a))
    q, k, v, dout, _ = make((1, 2, 1, Tq, Tk, 3), np.float64, 1.0, rng)
    offset = Tk - Tq
    tiles = [(i0, j0) for i0 in range(0, Tq, block_q) for j0 in range(0, Tk, block_k)
             if not causal or j0 <= min(i0 + block_q, Tq) - 1 + offset]  # some query of the tile sees key j0
    with recording:
        out, cache = flash_attention_forward(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
        forward_calls = list(calls)
        calls.clear()
        grads = flash_attention_backward(dout, cache)
    assert forward_calls == tiles  # query tile outer, key tile inner
    by_key_tile = sorted(tiles, key=lambda t: (t[1], t[0]))
    assert calls == by_key_tile + tiles  # (FA.9): the dK/dV pass by key tile, then the dQ pass by query tile
    plain_out, plain_cache = attention_forward(q, k, v, causal=causal)
    scales = term_scales(q, k, v, dout, plain_cache.probs)
    assert_close(out, plain_out, scale=scales["out"], what="out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, attention_backward(dout, plain_cache)[:3]):
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("FA.7")
@pytest.mark.derivation("FA.9")
@given(configs(dtypes=st.just(np.float64)))
def test_backward_passes(config):
    """Each pass on its own: the dK/dV pass sums c_s dS^T Q and P^T dO over the query tiles and the heads of a
    group, the dQ pass sums c_s dS K over the key tiles; checked against the whole-matrix products."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    B, H, Hkv, Tq, Tk, D = shape
    G, c = H // Hkv, 1 / np.sqrt(D)
    a = in_layouts(layout_of, q=q, k=k, v=v, dout=dout)
    _, cache = flash_attention_forward(a["q"], a["k"], a["v"], causal=causal, block_q=block_q, block_k=block_k)
    delta = flash._backward_delta(a["dout"], cache)
    dk, dv = flash._backward_dkdv(a["dout"], cache, delta)
    dq = flash._backward_dq(a["dout"], cache, delta)
    _, plain = attention_forward(q, k, v, causal=causal)
    p = plain.probs
    dp = dout @ np.repeat(v, G, axis=1).swapaxes(-1, -2)  # (ATT.5)
    ds = p * (dp - (dout * (p @ np.repeat(v, G, axis=1))).sum(-1, keepdims=True))  # (FA.7), delta from O = P V
    scales = term_scales(q, k, v, dout, p)
    assert_close(dv, (p.swapaxes(-1, -2) @ dout).reshape(B, Hkv, G, Tk, D).sum(2), scale=scales["dv"], what="dV")
    assert_close(dk, (c * ds.swapaxes(-1, -2) @ q).reshape(B, Hkv, G, Tk, D).sum(2), scale=scales["dk"], what="dK")
    assert_close(dq, c * ds @ np.repeat(k, G, axis=1), scale=scales["dq"], what="dQ")


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


@pytest.mark.derivation("FA.5")
@given(offset_cases(), BLOCKS, BLOCKS)
def test_float32_logit_offsets(case, block_q, block_k):
    """Logits 2**e + d_ij in float32, e up to 120: P is recomputed from m and log l, so no precision is lost
    (m + log l rounded to float32 would lose log l, and every recomputed P, at large e)."""
    q, k, v, dout, causal, _ = case
    ours, cache = run_flash(q, k, v, dout, causal, block_q, block_k, attn_scale=1.0)
    for x in ours:
        assert x.dtype == np.float32 and np.all(np.isfinite(x))
    oracle = run_torch(q, k, v, dout, None, causal, None, sdpa=False, attn_scale=1.0)
    probs = attention_forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), causal=causal,
                              scale=1.0)[1].probs
    scales = term_scales(q, k, v, dout, probs, attn_scale=1.0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, oracle):
        assert_close(a, b, scale=scales[name], what=name)


@st.composite
def empty_configs(draw):
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = draw(configs())
    B, H, Hkv, Tq, Tk, D = shape
    Tq, Tk = draw(st.sampled_from([(0, Tk), (Tq, 0), (0, 0)]))
    return (B, H, Hkv, Tq, Tk, D), causal, block_q, block_k, dtype, magnitude, rng, layout_of


@pytest.mark.derivation("FA.4")
@given(empty_configs())
def test_empty_sequences(config):
    """As plain attention: Tq = 0 gives empty out and dq, zero dk, dv; Tk = 0 gives out = 0, lse = +inf, dq = 0."""
    shape, causal, block_q, block_k, dtype, magnitude, rng, layout_of = config
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, dout, _ = make(shape, dtype, magnitude, rng)
    (out, dq, dk, dv), cache = run_flash(q, k, v, dout, causal, block_q, block_k, layout_of)
    plain_out, plain_cache = attention_forward(q, k, v, causal=causal)
    plain = (plain_out, *attention_backward(dout, plain_cache)[:3])
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), plain):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert np.all(a == 0) and np.all(b == 0), name
    assert cache.lse.shape == (B, H, Tq) and np.all(cache.lse == np.inf)


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
    with fastpath.configured(causal_block=None):  # the dense form (blocks change only the constant)
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


# -- bad input -----------------------------------------------------------------------------------


@st.composite
def valid_calls(draw):
    B, Hkv, G = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3]))
    Tq, Tk, D = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 4]))
    q, k, v, dout, _ = make((B, Hkv * G, Hkv, Tq, Tk, D), draw(DTYPES), 1.0, draw(rngs()))
    return {"q": q, "k": k, "v": v}, dout


def call_forward(args, name, value):
    given_args = {**args, name: value}
    return flash_attention_forward(given_args["q"], given_args["k"], given_args["v"],
                                   **{n: given_args[n] for n in ("causal", "scale", "block_q", "block_k")
                                      if n in given_args})


@pytest.mark.parametrize("name", ["q", "k", "v"])
@given(valid_calls())
def test_forward_rejects_bad_arrays(name, call):
    args, _ = call
    kinds = ARRAY_KINDS + SUBCLASS_KINDS + (other_float(args["q"].dtype),)
    rejects_all(lambda bad: call_forward(args, name, bad), "flash_attention_forward", name,
                [corrupt(args[name], kind) for kind in kinds])


@pytest.mark.parametrize("name, bad_values", [("causal", BAD_FLAGS), ("scale", BAD_SCALES), ("block_q", BAD_BLOCKS),
                                              ("block_k", BAD_BLOCKS)])
@given(valid_calls())
def test_forward_rejects_bad_options(name, bad_values, call):
    args, _ = call
    rejects_all(lambda bad: call_forward(args, name, bad), "flash_attention_forward", name, bad_values)


@pytest.mark.parametrize("name", ["dout", "cache"])
@given(valid_calls())
def test_backward_rejects_bad_input(name, call):
    args, dout = call
    _, cache = flash_attention_forward(args["q"], args["k"], args["v"], causal=True, block_q=2, block_k=3)
    if name == "dout":
        bad_values = [corrupt(dout, kind) for kind in ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dout.dtype),)]
        rejects_all(lambda bad: flash_attention_backward(bad, cache), "flash_attention_backward", "dout", bad_values)
    else:
        plain_cache = attention_forward(args["q"], args["k"], args["v"])[1]  # another op's cache
        bad_values = [None, tuple(cache), list(cache), cache._asdict(), plain_cache, dout]
        rejects_all(lambda bad: flash_attention_backward(dout, bad), "flash_attention_backward", "cache", bad_values)
