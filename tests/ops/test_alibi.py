"""ALiBi: slopes, the bias vs torch, shift invariance, gradients through attention (proofs/alibi.md)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.ops.alibi import alibi_bias, alibi_slopes
from npformer.ops.attention import attention_backward, attention_forward
from tests.badinput import BAD_COUNTS, BAD_DTYPES, rejects_all
from tests.ops.test_attention import in_layouts, layouts_of_inputs
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SIDES, randn, rngs
from tests.tolerances import assert_close

LENGTHS = st.sampled_from([0, 1, 2, 3, 5, 7, 8])  # an empty sequence gives an empty bias


def reference_slopes(n):
    """The slope rule, written recursively with a geometric sequence built by repeated multiplication."""

    def geometric(count):
        ratio = 2.0 ** (-8.0 / count)
        out, value = [], 1.0
        for _ in range(count):
            value *= ratio
            out.append(value)
        return out

    k = int(math.floor(math.log2(n)))
    if 2**k == n:
        return geometric(n)
    return geometric(2**k) + reference_slopes(2 ** (k + 1))[0::2][: n - 2**k]


def torch_alibi(slopes, Tq, Tk):
    """-m_h * |query position - key position|, queries aligned to the end of the keys."""
    query_pos = torch.arange(Tq)[:, None] + (Tk - Tq)
    key_pos = torch.arange(Tk)[None, :]
    distance = (key_pos - query_pos).abs().to(torch.float64)
    return (-torch.as_tensor(slopes)[:, None, None] * distance)[None]


def torch_attention(q, k, v, bias, causal):
    """softmax(q k^T / sqrt(D) + bias, causal mask aligned to the end) v, with a constant bias."""
    Tq, Tk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if causal:
        hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.derivation("ALIBI.1")
@pytest.mark.parametrize("H", [1, 2, 4, 8, 16, 32])
def test_slopes_power_of_two(H):
    m = alibi_slopes(H)
    assert m.dtype == np.float64 and m.shape == (H,)
    assert_close(m, [2.0 ** (-8.0 * h / H) for h in range(1, H + 1)], what="closed form (ALIBI.1)")
    assert_close(m, reference_slopes(H), what="geometric sequence")
    assert m[-1] == 2.0**-8 and np.all(np.diff(m) < 0)


@pytest.mark.derivation("ALIBI.2")
@pytest.mark.parametrize("H", range(1, 17))
def test_slopes_any_head_count(H):
    m = alibi_slopes(H)
    assert m.dtype == np.float64 and m.shape == (H,)
    assert_close(m, reference_slopes(H), what=f"H={H}")
    assert len(set(m.tolist())) == H  # all distinct, all in (0, 1)
    assert np.all((m > 0) & (m < 1))


@pytest.mark.derivation("ALIBI.2")
def test_slopes_worked_examples():
    assert_close(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]), what="H=6")
    expected_12 = np.concatenate([2.0 ** -np.arange(1.0, 9.0), 2.0 ** -np.array([0.5, 1.5, 2.5, 3.5])])
    assert_close(alibi_slopes(12), expected_12, what="H=12")
    assert_close(alibi_slopes(3), 2.0 ** -np.array([4, 8, 2]), what="H=3")


@pytest.mark.derivation("ALIBI.3")
@given(st.integers(1, 12), LENGTHS, LENGTHS, DTYPES)
def test_bias_matches_torch(H, Tq, Tk, dtype):
    bias = alibi_bias(H, Tq, Tk, dtype=dtype)
    assert bias.shape == (1, H, Tq, Tk) and bias.dtype == dtype
    expected = torch_alibi(alibi_slopes(H), Tq, Tk).numpy()
    assert_close(bias, expected, what="bias")
    if Tq == 0 or Tk == 0:
        return
    # the last query sits at the last key's position: zero there, and -m_h * (Tk - 1 - j) along its row
    assert np.all(bias[0, :, -1, -1] == 0)
    assert_close(bias[0, :, -1, :], -alibi_slopes(H)[:, None] * (Tk - 1 - np.arange(Tk)), what="last row")


@pytest.mark.derivation("ALIBI.4")
@given(st.integers(1, 12), SIDES, st.sampled_from([0, 1, 4]), rngs())
def test_shift_property(H, Tq, extra_keys, rng):
    """Under the causal mask, ALiBi and the per-key bias m_h * j give the same softmax."""
    Tk = Tq + extra_keys
    scores = torch.from_numpy(rng.standard_normal((2, H, Tq, Tk)) * 3)
    hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)
    m = torch.from_numpy(alibi_slopes(H))
    ours = torch.from_numpy(alibi_bias(H, Tq, Tk, dtype=np.float64))
    per_key = (m[:, None, None] * torch.arange(Tk, dtype=torch.float64))[None]  # (1, H, 1, Tk)
    p_ours = torch.softmax((scores + ours).masked_fill(hidden, float("-inf")), dim=-1)
    p_key = torch.softmax((scores + per_key).masked_fill(hidden, float("-inf")), dim=-1)
    assert_close(p_ours.numpy(), p_key.numpy(), scale=1.0, what="probabilities")
    # the two biases differ by a constant along each row's visible entries: -m_h * p_i
    diff = (ours - per_key).numpy()[0]
    rows = np.arange(Tq) + (Tk - Tq)
    for i in range(Tq):
        visible = slice(0, rows[i] + 1)
        assert_close(diff[:, i, visible], np.broadcast_to(-alibi_slopes(H)[:, None] * rows[i], (H, rows[i] + 1)),
                     what=f"row {i}")


@pytest.mark.derivation("ALIBI.5")
@given(st.integers(1, 6), SIDES, st.sampled_from([0, 2]), st.booleans(), DTYPES, rngs(), layouts_of_inputs())
def test_gradients_through_attention(H, Tq, extra_keys, causal, dtype, rng, layout_of):
    """npformer attention with the ALiBi bias (every array in any layout) vs torch autograd, the bias a constant."""
    Tk, D = Tq + extra_keys, 4
    q, k, v = (randn(rng, (2, H, T, D), dtype) for T in (Tq, Tk, Tk))
    dout = randn(rng, (2, H, Tq, D), dtype)
    a = in_layouts(layout_of, q=q, k=k, v=v, dout=dout, bias=alibi_bias(H, Tq, Tk, dtype=dtype))
    out, cache = attention_forward(a["q"], a["k"], a["v"], causal=causal, bias=a["bias"])
    dq, dk, dv, _ = attention_backward(a["dout"], cache)  # (ALIBI.5): dbias has no parameter to go to

    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tbias = torch_alibi(alibi_slopes(H), Tq, Tk)  # a constant: requires no gradient
    tout = torch_attention(tq, tk, tv, tbias, causal)
    tgrads = backprop(tout, dout, tq, tk, tv)
    assert_close(out, tout.detach().numpy(), what="out")
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), tgrads):
        assert a.dtype == dtype
        assert_close(a, b, scale=np.abs(b).max() + np.abs(dout).max(), what=name)

    if causal:  # (ALIBI.4) carries over to the gradients: the per-key bias m_h * j gives the same ones
        tq, tk, tv = leaf(q), leaf(k), leaf(v)
        per_key = (torch.from_numpy(alibi_slopes(H))[:, None, None] * torch.arange(Tk, dtype=torch.float64))[None]
        shifted = backprop(torch_attention(tq, tk, tv, per_key, causal), dout, tq, tk, tv)
        for name, a, b in zip(("dq", "dk", "dv"), shifted, tgrads):
            assert_close(a, b, scale=np.abs(b).max() + np.abs(dout).max(), what=f"{name} (per-key bias)")


# -- bad input -----------------------------------------------------------------------------------

BAD_HEADS = (0, -1, 2.5, True, "8", None, np.float64(8.0), [8])


@given(st.integers(1, 12))
def test_slopes_reject_bad_head_count(H):
    rejects_all(alibi_slopes, "alibi_slopes", "n_head", BAD_HEADS)
    assert alibi_slopes(H).shape == (H,)


@pytest.mark.parametrize("name, bad_values", [("n_head", BAD_HEADS), ("Tq", BAD_COUNTS), ("Tk", BAD_COUNTS),
                                              ("dtype", BAD_DTYPES)])
@given(st.integers(1, 12), LENGTHS, LENGTHS, DTYPES)
def test_bias_rejects_bad_arguments(name, bad_values, H, Tq, Tk, dtype):
    arguments = {"n_head": H, "Tq": Tq, "Tk": Tk, "dtype": dtype}
    rejects_all(lambda bad: alibi_bias(**{**arguments, name: bad}), "alibi_bias", name, bad_values)
    assert alibi_bias(**arguments).shape == (1, H, Tq, Tk)
