"""Split-KV decoding attention (kernels.decode) against npformer.ops.attention (float64),
kernels.flash_attention, and the merge formula evaluated on its own partials.

The float64 references are evaluated on the kernel's (already rounded) inputs, so only the
kernel's rounding is measured; fp16 and bf16 are held to the suite's four units of their
machine epsilon (``tests.kernels.check``). bf16 under the interpreter: its ``tl.dot``
multiplies fp32 copies (``DOT_F32``, exact for bf16 products) and its casts to bf16 may
truncate instead of rounding to nearest, which costs at most one unit more per cast
(the probabilities before P V, the output): within the four units.
"""

import math

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels.decode as Dk
from kernels.attention import flash_attention
from kernels.decode import choose_num_splits, decode_partials, flash_decode, keys_per_split_for, plan
from npformer.ops.attention import attention_forward
from tests.badinput import BAD_FLAGS, BAD_SCALES, expect_rejected
from tests.kernels import DEVICE, KERNEL_DTYPES, KERNEL_RTOL, LAYOUTS, check, f64, few_examples, in_layout, tensor
from tests.kernels.test_bad_input import BAD_DTYPES, NON_TENSORS, OTHER_FLOATS, RANKS, SIZES, corrupt
from tests.strategies import rngs
from tests.tolerances import RTOL, assert_close

BLOCK_N = Dk.launch_config(torch.float32, 16, 16, 90)[0]  # key tile the launcher uses here (16 under the interpreter)
HEADS = st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1), (6, 3), (8, 2)])  # (H, Hkv): MHA, GQA, MQA
LENGTHS = st.sampled_from([1, 2, 5, 16, 17, 33, 50])  # Tk: 1, partial tiles, whole tiles, tiles plus one
HEAD_DIMS = st.sampled_from([16, 24, 40, 80, 128])
F32_RTOL = RTOL[np.dtype(np.float32)]
LSE_RTOL = 8 * 2.0**-24  # a few float32 rounding steps of the log-sum-exp (a wrong ln 2 in its 6th digit fails)


def make(rng, B, H, Hkv, Tq, Tk, D, dtype, layout="contiguous"):
    q = in_layout(tensor(rng, (B, H, Tq, D), dtype), layout)
    k = in_layout(tensor(rng, (B, Hkv, Tk, D), dtype), layout)
    v = in_layout(tensor(rng, (B, Hkv, Tk, D), dtype), layout)
    return q, k, v


def logits(q, k, causal, scale):
    """float64 scaled logits (B, H, Tq, Tk), -inf where the causal mask hides a key (ATT.1)."""
    q, k = f64(q), f64(k)
    G = q.shape[1] // k.shape[1]
    s = scale * q @ np.repeat(k, G, axis=1).swapaxes(-1, -2)
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        hidden = np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq)
        s = np.where(hidden, -np.inf, s)
    return s


def softmax_over(s, v, keys):
    """(o, lse) of softmax attention restricted to the key indices ``keys`` (FD.1), float64:
    o = 0 and lse = -inf in a row that sees none of them."""
    G = s.shape[1] // v.shape[1]
    s, v = s[..., keys], np.repeat(f64(v), G, axis=1)[:, :, keys]
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(m)
    e = np.exp(s - np.where(seen, m, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    o = np.where(seen, (e @ v) / np.where(seen, total, 1.0), 0.0)
    lse = np.where(seen, m + np.log(np.where(seen, total, 1.0)), -np.inf)[..., 0]
    return o, lse


def reference_lse(q, k, causal, scale):
    """log sum_j exp(s_ij), +inf in a row that sees no key (the kernels' convention)."""
    s = logits(q, k, causal, scale)
    _, lse = softmax_over(s, k, np.arange(s.shape[-1]))
    return np.where(np.isfinite(lse), lse, np.inf)


def out_scale(q, k, v, causal, scale):
    """max_i sum_j P_ij |v_j|: the size of the terms each output is summed from."""
    _, cache = attention_forward(f64(q), f64(k), f64(v), causal=causal, scale=scale)
    G = q.shape[1] // k.shape[1]
    return max(float((cache.probs @ np.abs(np.repeat(f64(v), G, axis=1))).max(initial=0.0)), 1e-30)


def check_lse(lse, expected, what="lse", rtol=LSE_RTOL):
    """fp32 log-sum-exp: +inf exactly where expected, within a few float32 rounding steps of
    max(1, |lse|) elsewhere."""
    assert lse.dtype == torch.float32
    got = f64(lse)
    assert np.array_equal(np.isposinf(got), np.isposinf(expected)), what
    finite = np.isfinite(expected)
    assert np.isfinite(got[finite]).all(), what
    assert_close(got[finite], expected[finite], rtol=rtol, scale=max(1.0, np.abs(expected[finite]).max(initial=0)),
                 what=what)


@st.composite
def decode_cases(draw):
    B = draw(st.sampled_from([1, 2]))
    H, Hkv = draw(HEADS)
    Tq, Tk = draw(st.integers(1, 16)), draw(LENGTHS)
    tiles = -(-Tk // BLOCK_N)
    num_splits = draw(st.none() | st.integers(1, tiles + 3))  # up to more splits than key tiles
    return B, H, Hkv, Tq, Tk, num_splits


# ---------------------------------------------------------------------------------------
# the result


@pytest.mark.derivation("FD.2")
@few_examples
@given(decode_cases(), HEAD_DIMS, st.booleans(), st.sampled_from(KERNEL_DTYPES), st.sampled_from(LAYOUTS), rngs())
def test_matches_reference(case, D, causal, dtype, layout, rng):
    """out and lse against npformer's attention forward and the log-sum-exp of its logits
    (float64), and against the FlashAttention kernel's forward on the same inputs."""
    B, H, Hkv, Tq, Tk, num_splits = case
    q, k, v = make(rng, B, H, Hkv, Tq, Tk, D, dtype, layout)
    out, lse = flash_decode(q, k, v, causal=causal, num_splits=num_splits, return_lse=True)
    assert out.shape == (B, H, Tq, D) and lse.shape == (B, H, Tq)
    scale = 1 / math.sqrt(D)
    out_ref, _ = attention_forward(f64(q), f64(k), f64(v), causal=causal)
    s = out_scale(q, k, v, causal, scale)
    check(out, out_ref, dtype, scale=s, what=f"out, {num_splits} splits")
    check_lse(lse, reference_lse(q, k, causal, scale))
    # the FlashAttention kernel rounds once too: the two are within twice the tolerance
    fa_out, fa_lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    assert_close(f64(out), f64(fa_out), rtol=2 * KERNEL_RTOL[dtype], scale=s, what="out vs flash_attention")
    check_lse(lse, f64(fa_lse), what="lse vs flash_attention", rtol=2 * LSE_RTOL)


@pytest.mark.derivation("FD.1")
@few_examples
@given(decode_cases(), st.sampled_from([16, 40]), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]),
       rngs())
def test_partials_are_attention_over_each_split(case, D, causal, dtype, rng):
    """Split s holds keys [s n_s, (s + 1) n_s) (n_s whole key tiles): its o_s and lse_s are
    softmax attention and the log-sum-exp over those keys alone (FD.1), and a split with no
    visible key stores (0, -inf)."""
    B, H, Hkv, Tq, Tk, num_splits = case
    q, k, v = make(rng, B, H, Hkv, Tq, Tk, D, dtype)
    o_part, lse_part, p = decode_partials(q, k, v, causal=causal, num_splits=num_splits)
    S = p.num_splits
    assert o_part.shape == (B, H, Tq, S, D) and lse_part.shape == (B, H, Tq, S)
    assert o_part.dtype == lse_part.dtype == torch.float32
    assert p.keys_per_split % p.BLOCK_N == 0 and S * p.keys_per_split >= Tk
    scale = 1 / math.sqrt(D)
    s = logits(q, k, causal, scale)
    o_part, lse_part = f64(o_part), f64(lse_part)
    for split in range(S):
        keys = np.arange(split * p.keys_per_split, min((split + 1) * p.keys_per_split, Tk))
        o_ref, lse_ref = softmax_over(s, v, keys)
        # float32 partials of 16-bit inputs: the probabilities enter P V in the input dtype
        rtol = F32_RTOL if dtype == torch.float32 else KERNEL_RTOL[dtype]
        assert_close(o_part[:, :, :, split], o_ref, rtol=rtol, scale=float(np.abs(f64(v)).max(initial=1e-30)),
                     what=f"o_s of split {split}")
        empty = np.isneginf(lse_ref)
        assert np.array_equal(np.isneginf(lse_part[:, :, :, split]), empty)
        assert np.all(o_part[:, :, :, split][empty] == 0.0)
        assert_close(lse_part[:, :, :, split][~empty], lse_ref[~empty], rtol=LSE_RTOL,
                     scale=max(1.0, np.abs(lse_ref[~empty]).max(initial=0)), what=f"lse_s of split {split}")


@pytest.mark.derivation("FD.2")
@few_examples
@given(decode_cases(), st.booleans(), st.sampled_from(KERNEL_DTYPES), rngs())
def test_merge_formula(case, causal, dtype, rng):
    """(FD.2) evaluated here in float64 on the kernel's own partials gives the kernel's out and
    lse; and on float64 partials of any cut of the keys it gives attention over all keys."""
    B, H, Hkv, Tq, Tk, num_splits = case
    D = 24
    q, k, v = make(rng, B, H, Hkv, Tq, Tk, D, dtype)
    o_part, lse_part, _ = decode_partials(q, k, v, causal=causal, num_splits=num_splits)
    o_part, lse_part = f64(o_part), f64(lse_part)
    with np.errstate(invalid="ignore"):  # rows with every split empty: -inf - (-inf)
        lse = np.logaddexp.reduce(lse_part, axis=-1)  # log sum_s exp(lse_s)
        w = np.exp(lse_part - lse[..., None])  # exp(lse_s - lse)
    seen = np.isfinite(lse)
    merged = np.where(seen[..., None], (w[..., None] * o_part).sum(axis=-2), 0.0)
    out, lse_kernel = flash_decode(q, k, v, causal=causal, num_splits=num_splits, return_lse=True)
    check(out, merged, dtype, scale=max(float(np.abs(o_part).max(initial=0)), 1e-30), what="out = merge of partials")
    check_lse(lse_kernel, np.where(seen, lse, np.inf), what="lse = log sum exp lse_s")

    # the identity itself, on float64 partials of a random cut of the keys
    s = logits(q, k, causal, 1 / math.sqrt(D))
    cuts = np.sort(rng.choice(np.arange(Tk + 1), size=rng.integers(1, 5)))
    parts = [softmax_over(s, v, np.arange(a, b)) for a, b in zip(np.r_[0, cuts], np.r_[cuts, Tk])]
    with np.errstate(invalid="ignore"):
        lse_all = np.logaddexp.reduce(np.stack([lse_s for _, lse_s in parts]), axis=0)
        o_all = sum(np.exp(lse_s - lse_all)[..., None] * o_s for o_s, lse_s in parts)
    o_ref, lse_ref = softmax_over(s, v, np.arange(Tk))
    seen = np.isfinite(lse_ref)
    assert_close(np.where(seen[..., None], o_all, 0.0), o_ref, rtol=RTOL[np.dtype(np.float64)], what="merge identity")
    assert_close(lse_all[seen], lse_ref[seen], rtol=RTOL[np.dtype(np.float64)], what="lse identity")


@pytest.mark.derivation("FD.2")
def test_merge_identity_symbolic():
    """Three keys cut into splits {0} and {1, 2}: (FD.1) for each, merged by (FD.2), equal
    softmax attention over all three and the log-sum-exp of all three."""
    s = sp.symbols("s0:3", real=True)
    v = sp.symbols("v0:3", real=True)  # D = 1 values

    def part(idx):  # (FD.1)
        total = sum(sp.exp(s[j]) for j in idx)
        return sum(sp.exp(s[j]) * v[j] for j in idx) / total, sp.log(total)

    (o1, lse1), (o2, lse2) = part((0,)), part((1, 2))
    lse = sp.log(sp.exp(lse1) + sp.exp(lse2))
    o = sp.exp(lse1 - lse) * o1 + sp.exp(lse2 - lse) * o2
    o_all, lse_all = part((0, 1, 2))
    assert sp.simplify(o - o_all) == 0
    assert sp.simplify(sp.exp(lse) - sp.exp(lse_all)) == 0
    # (FD.3): the shift by M = lse1 (any reference) cancels
    M = lse1
    w1, w2 = sp.exp(lse1 - M), sp.exp(lse2 - M)
    assert sp.simplify((w1 * o1 + w2 * o2) / (w1 + w2) - o_all) == 0
    assert sp.simplify(sp.exp(M + sp.log(w1 + w2)) - sp.exp(lse_all)) == 0


@pytest.mark.derivation("FD.3")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_more_splits_than_key_tiles(dtype, causal):
    """Every number of splits from 1 to four more than there are key tiles: the splits past
    the last tile are empty (lse_s = -inf, o_s = 0), weigh 0 in the merge, and the result is
    the same attention each time."""
    rng = np.random.default_rng(3)
    B, H, Hkv, Tq, Tk, D = 1, 4, 2, 3, 2 * BLOCK_N + 3, 24  # three key tiles
    q, k, v = make(rng, B, H, Hkv, Tq, Tk, D, dtype)
    out_ref, _ = attention_forward(f64(q), f64(k), f64(v), causal=causal)
    lse_ref = reference_lse(q, k, causal, 1 / math.sqrt(D))
    s = out_scale(q, k, v, causal, 1 / math.sqrt(D))
    tiles = 3
    for num_splits in range(1, tiles + 5):
        o_part, lse_part, p = decode_partials(q, k, v, causal=causal, num_splits=num_splits)
        filled = -(-Tk // p.keys_per_split)  # splits that hold a key
        assert filled == min(num_splits, tiles)
        assert torch.all(lse_part[..., filled:] == float("-inf")) and torch.all(o_part[..., filled:, :] == 0)
        assert torch.isfinite(lse_part[..., :1]).all()  # the first key is seen by every row here
        out, lse = flash_decode(q, k, v, causal=causal, num_splits=num_splits, return_lse=True)
        check(out, out_ref, dtype, scale=s, what=f"{num_splits} splits")
        check_lse(lse, lse_ref, what=f"lse, {num_splits} splits")


@pytest.mark.derivation("FD.3")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("Tk", [0, 5])
def test_rows_that_see_no_key(dtype, Tk):
    """Causal with Tq > Tk: the first Tq - Tk queries see no key (every split empty): out 0,
    lse +inf, as kernels.flash_attention; the other rows are ordinary attention."""
    rng = np.random.default_rng(5)
    B, H, Hkv, Tq, D = 1, 2, 1, 16, 16
    q, k, v = make(rng, B, H, Hkv, Tq, Tk, D, dtype)
    for num_splits in (1, 3):
        out, lse = flash_decode(q, k, v, causal=True, num_splits=num_splits, return_lse=True)
        hidden = Tq - Tk
        assert torch.isfinite(out).all()
        assert torch.all(out[:, :, :hidden] == 0) and torch.all(lse[:, :, :hidden] == float("inf"))
        assert torch.isfinite(lse[:, :, hidden:]).all()
        if Tk:
            out_ref, _ = attention_forward(f64(q), f64(k), f64(v), causal=True)
            check(out, out_ref, dtype, scale=out_scale(q, k, v, True, 0.25), what="visible rows")
            check_lse(lse, reference_lse(q, k, True, 0.25))


@pytest.mark.derivation("FD.3")
@pytest.mark.parametrize("c", [10.0, 30.0, 70.0])
def test_merge_of_large_logits(c):
    """q = k = c (D = 4): every logit is 2 c^2 (200 to 9800), far past float32's exp range
    (exp(89) overflows). Each split's lse_s is about 2 c^2, so a merge that exponentiates
    lse_s without the shift by M = max lse_s (FD.3) gives inf / inf; with it the weights are
    1 and the output is the mean of the values, lse = 2 c^2 + log Tk."""
    Tk, D = 40, 4
    q = torch.full((1, 1, 1, D), c, device=DEVICE)
    k = torch.full((1, 1, Tk, D), c, device=DEVICE)
    v = tensor(np.random.default_rng(7), (1, 1, Tk, D), torch.float32)
    _, lse_part, _ = decode_partials(q, k, v, num_splits=3)
    assert float(lse_part.min()) > 100.0  # every split past exp's range
    out, lse = flash_decode(q, k, v, num_splits=3, return_lse=True)
    expected = 2 * c * c + math.log(Tk)
    check_lse(lse, np.full((1, 1, 1), expected))
    check(out, f64(v).mean(axis=2, keepdims=True), torch.float32, scale=float(np.abs(f64(v)).max()), what="mean of v")


@pytest.mark.derivation("FD.3")
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_key_poisons_the_row(bad):
    """One key of 40 (3 splits) holds +inf or NaN: its logit is +inf or NaN, its split's running
    sum NaN. The merged out and lse of every row that sees it are NaN, not a finite lse over the
    other splits; kernels.flash_attention's forward also gives NaN outputs and a non-finite lse."""
    rng = np.random.default_rng(11)
    Tk, D = 40, 4
    q = torch.ones((1, 1, 1, D), device=DEVICE)
    k = tensor(rng, (1, 1, Tk, D), torch.float32)
    v = tensor(rng, (1, 1, Tk, D), torch.float32)
    k[0, 0, 3, :] = bad  # in the first split (16-key tiles): the other two are finite
    k[0, 0, 25, 0] = float("nan")  # a NaN key in the second split as well
    with np.errstate(all="ignore"):  # the interpreter's NumPy meets inf - inf and NaN on purpose
        _check_poisoned(q, k, v, bad)


def _check_poisoned(q, k, v, bad):
    Tk, D = k.shape[2], k.shape[3]
    _, lse_part, _ = decode_partials(q, k, v, num_splits=3)
    assert torch.isnan(lse_part[..., 0]).all() and torch.isnan(lse_part[..., 1]).all()
    assert torch.isfinite(lse_part[..., 2]).all()
    out, lse = flash_decode(q, k, v, num_splits=3, return_lse=True)
    assert torch.isnan(out).all() and torch.isnan(lse).all()
    fa_out, fa_lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isnan(fa_out).all() and not torch.isfinite(fa_lse).any()
    # a key only the last split holds, hidden from the query by the causal mask, changes nothing
    k2 = k.clone()
    k2[0, 0, 3, :], k2[0, 0, 25, 0] = 0.5, 0.5
    q2 = torch.ones((1, 1, 2, D), device=DEVICE)
    k2[0, 0, Tk - 1, :] = bad  # visible to query 1 only
    out2, lse2 = flash_decode(q2, k2, v, num_splits=3, return_lse=True)
    assert torch.isfinite(out2[:, :, 0]).all() and torch.isfinite(lse2[:, :, 0]).all()
    assert torch.isnan(out2[:, :, 1]).all() and torch.isnan(lse2[:, :, 1]).all()


def test_empty_batch_and_no_queries():
    """Nothing to compute: an empty output of the right shape and dtype, no launch."""
    for B, Tq in ((0, 1), (1, 0)):
        q = torch.zeros((B, 2, Tq, 16), device=DEVICE)
        k = torch.zeros((B, 1, 7, 16), device=DEVICE)
        out, lse = flash_decode(q, k, k, return_lse=True)
        assert out.shape == (B, 2, Tq, 16) and lse.shape == (B, 2, Tq) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# grouped heads, the plan


@pytest.mark.derivation("FD.4")
@few_examples
@given(st.sampled_from([(12, 2), (8, 1), (6, 3), (16, 4)]), st.integers(1, 7), st.sampled_from([1, 9, 40]),
       st.booleans(), rngs())
def test_grouped_heads_packed_into_one_tile(heads, Tq, Tk, causal, rng):
    """G = H / Hkv heads times Tq queries are the rows of a tile (several tiles when G Tq is
    over the tile height): the same result as every head with its own copy of the keys
    (G = 1), and as the reference, the causal mask applied by each row's own query index."""
    H, Hkv = heads
    G, D = H // Hkv, 40
    q, k, v = make(rng, 1, H, Hkv, Tq, Tk, D, torch.float32)
    p = plan(q, k)
    assert p.BLOCK_M == Dk.block_m_for(G * Tq, q.dtype) and p.BLOCK_M >= min(G * Tq, Dk.INTERPRET_MAX_BLOCK_M)
    assert p.grid[1:] == (-(-G * Tq // p.BLOCK_M), Hkv)  # row tiles, key/value heads
    out = flash_decode(q, k, v, causal=causal, num_splits=2)
    per_head = flash_decode(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), causal=causal, num_splits=2)
    out_ref, _ = attention_forward(f64(q), f64(k), f64(v), causal=causal)
    s = out_scale(q, k, v, causal, 1 / math.sqrt(D))
    check(out, out_ref, torch.float32, scale=s, what="packed group")
    assert_close(f64(out), f64(per_head), rtol=2 * F32_RTOL, scale=s, what="packed vs one head per tile")


@pytest.mark.derivation("FD.5")
@given(st.integers(0, 1 << 20), st.integers(1, 4096), st.sampled_from([1, 8, 108, 132, 144]),
       st.sampled_from([16, 32, 64, 128]))
def test_chosen_number_of_splits(Tk, programs, sms, block_n):
    """(FD.5) restated: S0 = max(1, min(ceil(2 N_SM / P), floor(n / 2), 256)), then
    S = ceil(n / ceil(n / S0)); every chosen split holds whole key tiles and at least one key,
    and together they cover the cache."""
    n = max(1, -(-Tk // block_n))
    S0 = max(1, min(-(-2 * sms // programs), n // 2, 256))
    S = choose_num_splits(Tk, programs, sms, block_n)
    assert S == -(-n // -(-n // S0))
    assert 1 <= S <= min(S0, Dk.MAX_SPLITS)
    keys = keys_per_split_for(Tk, S, block_n)
    assert keys % block_n == 0 and S * keys >= Tk
    assert Tk == 0 or (S - 1) * keys < Tk  # the last split holds a key: none empty
    if Tk >= 2 * block_n * 256 and programs * 256 <= 2 * sms:
        assert S == 256  # a long cache and few programs: the most splits


@pytest.mark.derivation("FD.5")
@pytest.mark.parametrize("Tk,programs,sms,block_n", [(4096, 8, 132, 16), (4096, 8, 108, 16), (4096, 8, 132, 32),
                                                    (5000, 3, 132, 64), (1000, 1, 144, 16)])
def test_chosen_splits_never_empty(Tk, programs, sms, block_n):
    """Cases where the first estimate S0 > 1 does not divide the n key tiles, so S0 splits of
    ceil(n / S0) tiles would leave the last empty: the chosen S is smaller, and every chosen
    split holds at least one key."""
    n = -(-Tk // block_n)
    S0 = max(1, min(-(-2 * sms // programs), n // 2, 256))
    assert S0 > 1 and n % S0 and (S0 - 1) * keys_per_split_for(Tk, S0, block_n) >= Tk  # S0 itself: one empty
    S = choose_num_splits(Tk, programs, sms, block_n)
    keys = keys_per_split_for(Tk, S, block_n)
    assert 1 < S < S0 and S * keys >= Tk
    assert all(split * keys < Tk for split in range(S))  # every split starts inside the cache


def test_plan_spreads_a_long_cache_over_the_device():
    """One query of 8 heads against 4096 keys: B * Hkv = 8 programs alone would leave most
    multiprocessors idle; the plan splits the keys until about two programs per multiprocessor."""
    q = torch.zeros((1, 8, 1, 64), device=DEVICE)
    k = torch.zeros((1, 8, 4096, 64), device=DEVICE)
    p = plan(q, k)
    programs = p.grid[1] * p.grid[2]
    assert p.num_splits * programs >= Dk.sm_count(q.device)  # at least one program per multiprocessor
    assert p.num_splits > 1 and p.keys_per_split >= Dk.MIN_BLOCKS_PER_SPLIT * p.BLOCK_N
    assert plan(q, k, num_splits=3).num_splits == 3


# ---------------------------------------------------------------------------------------
# bad input

DECODE_TENSORS = (
    [("q", kind) for kind in NON_TENSORS + BAD_DTYPES + RANKS]
    + [("k", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
    + [("v", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
)
DECODE_OPTIONS = (
    [("causal", v) for v in BAD_FLAGS]
    + [("return_lse", v) for v in BAD_FLAGS]
    + [("scale", v) for v in BAD_SCALES]
    + [("num_splits", v) for v in (0, -1, Dk.MAX_SPLITS + 1, 2.0, True, "2", [2], np.float64(2.0))]
)


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("arg,kind", DECODE_TENSORS)
def test_rejects_bad_tensors(arg, kind):
    inputs = {"q": _zeros(1, 4, 3, 16), "k": _zeros(1, 2, 5, 16), "v": _zeros(1, 2, 5, 16)}
    inputs[arg] = corrupt(inputs[arg], kind)
    expect_rejected(lambda: flash_decode(**inputs), "flash_decode", arg)


@pytest.mark.parametrize("arg,value", DECODE_OPTIONS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(DECODE_OPTIONS)])
def test_rejects_bad_options(arg, value):
    q, k = _zeros(1, 2, 1, 16), _zeros(1, 1, 9, 16)
    expect_rejected(lambda: flash_decode(q, k, k, **{arg: value}), "flash_decode", arg)
    if arg != "return_lse":  # the partials alone have no lse option
        expect_rejected(lambda: decode_partials(q, k, k, **{arg: value}), "flash_decode", arg)


def test_shape_rules():
    """More than 16 queries, heads that do not divide, a head size over 128: named, not launched."""
    expect_rejected(lambda: flash_decode(_zeros(1, 2, 17, 16), _zeros(1, 1, 40, 16), _zeros(1, 1, 40, 16)),
                    "flash_decode", "q")
    expect_rejected(lambda: flash_decode(_zeros(1, 4, 1, 16), _zeros(1, 3, 5, 16), _zeros(1, 3, 5, 16)),
                    "flash_decode", "k")
    big = _zeros(1, 1, 1, 130)
    expect_rejected(lambda: flash_decode(big, big, big), "flash_decode", "q")
    expect_rejected(lambda: flash_decode(_zeros(1, 2, 1, 16), _zeros(2, 1, 5, 16), _zeros(2, 1, 5, 16)),
                    "flash_decode", "k")
    expect_rejected(lambda: flash_decode(_zeros(1, 2, 1, 16), _zeros(1, 1, 5, 16), _zeros(1, 1, 6, 16)),
                    "flash_decode", "v")
