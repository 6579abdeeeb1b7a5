"""The depthwise causal convolution (proofs/mamba.md, MAMBA.17 - MAMBA.20): against torch's conv1d and its
autograd, each equation on its own, finite differences, a sequence continued from its last inputs, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.causal_conv1d import CausalConv1dCache, causal_conv1d_backward, causal_conv1d_forward
from npformer.ops.linear import linear_forward
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_EPS, FD_RTOL, assert_close


def make(rng, Bsz, L, Dch, K, dtype=np.float64, scale=1.0, bias=True):
    return dict(x=randn(rng, (Bsz, L, Dch), dtype, scale), w=randn(rng, (Dch, K), dtype),
                b=randn(rng, (Dch,), dtype) if bias else None, dy=randn(rng, (Bsz, L, Dch), dtype))


@st.composite
def cases(draw):
    Bsz, L, Dch, K = draw(st.sampled_from([1, 2, 3])), draw(SIDES), draw(SIDES), draw(st.sampled_from([1, 2, 3, 4, 6]))
    return make(draw(rngs()), Bsz, L, Dch, K, draw(DTYPES), draw(SCALES), draw(st.booleans()))


def torch_run(a):
    x, w = torch.tensor(a["x"], requires_grad=True), torch.tensor(a["w"], requires_grad=True)
    b = None if a["b"] is None else torch.tensor(a["b"], requires_grad=True)
    K, L = w.shape[1], x.shape[1]
    y = F.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=K - 1, groups=w.shape[0])[..., :L].transpose(1, 2)
    y.backward(torch.tensor(a["dy"]))
    return y.detach().numpy(), x.grad.numpy(), w.grad.numpy(), None if b is None else b.grad.numpy()


def as64(a):
    return {k: None if v is None else v.astype(np.float64) for k, v in a.items()}


@pytest.mark.derivation("MAMBA.17")
@given(cases(), layouts())
def test_conv_matches_torch(a, layout):
    a["x"] = in_layout(a["x"], layout)
    y, _ = causal_conv1d_forward(a["x"], a["w"], a["b"])
    want = torch_run(as64(a))[0]
    assert y.dtype == a["x"].dtype and y.shape == a["x"].shape
    assert_close(y, want, what="y")


@pytest.mark.derivation("MAMBA.17")
def test_conv_formula():
    """y_(t,d) = b_d + sum_k w_(d,k) x_(t-K+1+k,d) with x = 0 before the first position, by scalar loops."""
    a = make(np.random.default_rng(0), 2, 6, 3, 4)
    y, _ = causal_conv1d_forward(a["x"], a["w"], a["b"])
    want = np.zeros_like(y)
    for b in range(2):
        for t in range(6):
            for d in range(3):
                want[b, t, d] = a["b"][d] + sum(a["w"][d, k] * a["x"][b, t - 3 + k, d]
                                                for k in range(4) if t - 3 + k >= 0)
    assert_close(y, want, what="y")


@pytest.mark.derivation("MAMBA.18")
@pytest.mark.derivation("MAMBA.19")
@pytest.mark.derivation("MAMBA.20")
@given(cases())
def test_conv_gradients_match_torch(a):
    _, cache = causal_conv1d_forward(a["x"], a["w"], a["b"])
    grads = causal_conv1d_backward(a["dy"], cache)
    want = torch_run(as64(a))[1:]
    for name, g, w in zip(("dx", "dw", "db"), grads, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == a["x"].dtype and g.shape == w.shape, name
        assert_close(g, w, what=name)


@pytest.mark.derivation("MAMBA.18")
@pytest.mark.parametrize("bias", [True, False])
def test_conv_finite_differences(bias):
    a = make(np.random.default_rng(2), 2, 5, 3, 3, bias=bias)
    inputs = {"x": a["x"], "w": a["w"]} | ({"b": a["b"]} if bias else {})
    results = gradcheck.check(causal_conv1d_forward, causal_conv1d_backward, inputs,
                              ("x", "w", "b" if bias else None), eps=FD_EPS)
    assert len(results) == (3 if bias else 2)
    for r in results:
        assert r.max_rel < FD_RTOL, (r.input, r.max_rel)


@pytest.mark.derivation("MAMBA.18")
def test_dx_formula():
    """dx_(s,d) = sum_k w_(d,k) dy_(s+K-1-k,d) over the outputs that exist, by scalar loops."""
    a = make(np.random.default_rng(4), 2, 6, 3, 4)
    _, cache = causal_conv1d_forward(a["x"], a["w"], a["b"])
    dx = causal_conv1d_backward(a["dy"], cache)[0]
    want = np.zeros_like(dx)
    for s in range(6):
        for k in range(4):
            t = s + 3 - k
            if 0 <= t < 6:
                want[:, s] += a["w"][:, k] * a["dy"][:, t]
    assert_close(dx, want, what="dx")


@pytest.mark.derivation("MAMBA.19")
@given(cases())
def test_dw_formula(a):
    _, cache = causal_conv1d_forward(a["x"], a["w"], a["b"])
    dw = causal_conv1d_backward(a["dy"], cache)[1]
    K, L = a["w"].shape[1], a["x"].shape[1]
    xp = np.concatenate([np.zeros((a["x"].shape[0], K - 1, a["x"].shape[2])), a["x"]], axis=1)
    want = np.stack([(a["dy"] * xp[:, k:k + L]).sum(axis=(0, 1)) for k in range(K)], axis=1)
    assert_close(dw, want, what="dw")


@pytest.mark.derivation("MAMBA.21")
@given(cases(), st.data())
def test_conv_continues_from_prev(a, data):
    """The last K - 1 inputs of the first part, passed as prev, make the second part's output the whole's."""
    L, K = a["x"].shape[1], a["w"].shape[1]
    if L < 2:
        return
    L1 = data.draw(st.integers(1, L - 1), label="L1")
    y, _ = causal_conv1d_forward(a["x"], a["w"], a["b"])
    y1, c1 = causal_conv1d_forward(a["x"][:, :L1], a["w"], a["b"])
    prev = c1.xp[:, c1.xp.shape[1] - (K - 1):]
    y2, _ = causal_conv1d_forward(a["x"][:, L1:], a["w"], a["b"], prev)
    assert_close(np.concatenate([y1, y2], axis=1), y.astype(np.float64), what="y")


# ---- bad input --------------------------------------------------------------------------------------------

EXACT = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
KINDS = {
    "x": NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS,
    "w": NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + ("first+1", "other float"),  # w sets K
    "b": tuple(k for k in EXACT if k != "none"),
    "prev": tuple(k for k in EXACT if k != "none"),
}


def bad(a, kind):
    if kind == "other float":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    return corrupt(a, kind)


@pytest.mark.parametrize("arg", list(KINDS))
@given(data=st.data())
def test_forward_rejects_bad_arrays(arg, data):
    a = make(np.random.default_rng(0), 2, 4, 3, 3, data.draw(DTYPES))
    a["prev"] = randn(np.random.default_rng(1), (2, 2, 3), a["x"].dtype)
    a[arg] = bad(a[arg], data.draw(st.sampled_from(KINDS[arg]), label="kind"))
    expect_rejected(lambda: causal_conv1d_forward(a["x"], a["w"], a["b"], a["prev"]), "causal_conv1d_forward", arg)


def test_a_filter_without_taps_is_refused():
    message = expect_rejected(lambda: causal_conv1d_forward(np.ones((1, 2, 3)), np.ones((3, 0))),
                              "causal_conv1d_forward", "w")
    assert "K >= 1" in message


@given(st.sampled_from(EXACT), DTYPES, st.booleans())
def test_backward_rejects_bad_dy(kind, dtype, bias):
    a = make(np.random.default_rng(0), 2, 4, 3, 3, dtype, bias=bias)
    _, cache = causal_conv1d_forward(a["x"], a["w"], a["b"])
    expect_rejected(lambda: causal_conv1d_backward(bad(a["dy"], kind), cache), "causal_conv1d_backward", "dy")


@pytest.mark.parametrize("kind", ["tuple", "none", "other op"])
def test_backward_rejects_a_cache_it_did_not_make(kind):
    a = make(np.random.default_rng(0), 2, 4, 3, 3)
    _, cache = causal_conv1d_forward(a["x"], a["w"], a["b"])
    assert isinstance(cache, CausalConv1dCache)
    wrong = {"tuple": tuple(cache), "none": None, "other op": linear_forward(a["x"], np.ones((2, 3)))[1]}[kind]
    expect_rejected(lambda: causal_conv1d_backward(a["dy"], wrong), "causal_conv1d_backward", "cache")
