"""Linear attention: torch autograd oracle, finite differences, the equations of proofs/linear_attention.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.linear_attention import elu_plus_one, linear_attention_backward, linear_attention_forward
from tests.badinput import (
    ARRAY_KINDS,
    BAD_FLAGS,
    BAD_SCALES,
    DTYPE_KINDS,
    NON_ARRAYS,
    SUBCLASS_KINDS,
    corrupt,
    other_float,
    rejects_all,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, assert_close

EPS = 1e-6


def torch_phi(x):
    """elu(x) + 1, with exp(x) for x <= 0 written directly: elu(x) + 1 taken literally cancels
    (-1 + e^x) + 1 and loses the relative precision of e^x for x << 0."""
    return torch.where(x > 0, x + 1, torch.exp(torch.clamp(x, max=0.0)))


def torch_linear_attention(q, k, v, causal, eps=EPS):
    """The quadratic form of (LINATT.3): weights phi(q_i).phi(k_j), masked to j <= i when causal."""
    qf, kf = torch_phi(q), torch_phi(k)
    A = qf @ kf.transpose(-1, -2)  # (B, H, T, T)
    if causal:
        A = A * torch.tril(torch.ones(A.shape[-2:], dtype=A.dtype))
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


@st.composite
def cases(draw, dtypes=DTYPES, scales=SCALES, lengths=(1, 2, 5, 8)):
    B, H, T = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])), draw(st.sampled_from(lengths))
    D, Dv = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 4]))
    dtype, scale, rng = draw(dtypes), draw(scales), draw(rngs())
    if dtype == np.float32:
        scale = min(scale, 30.0)  # float32's 1e-4 bound is meaningful at moderate magnitudes
    q, k = randn(rng, (B, H, T, D), dtype, scale), randn(rng, (B, H, T, D), dtype, scale)
    v, dout = randn(rng, (B, H, T, Dv), dtype), randn(rng, (B, H, T, Dv), dtype)
    return q, k, v, dout, draw(st.booleans())


def term_scales(q, k, v, dout, causal):
    """Round-off of each gradient is relative to the size of the terms it is summed from, not to its
    value (for D = 1 without a mask, dq is zero but for eps). Those sizes are the same backward run
    with every term made non-negative: |v|, |dout|, and out -> -|out| so that (LINATT.5)'s dden >= 0."""
    _, cache = linear_attention_forward(q, k, np.abs(v), causal=causal, eps=EPS)
    out, _ = linear_attention_forward(q, k, v, causal=causal, eps=EPS)
    bound = linear_attention_backward(np.abs(dout), cache._replace(out=-np.abs(out)))
    return [float(b.max(initial=0.0)) for b in bound]


def run_both(q, k, v, dout, causal, layout_of=None):
    """Ours (every array in the layout ``layout_of`` names for it) and the torch oracle."""
    lay = (lambda name, x: x) if layout_of is None else (lambda name, x: in_layout(x, layout_of[name]))
    out, cache = linear_attention_forward(lay("q", q), lay("k", k), lay("v", v), causal=causal, eps=EPS)
    grads = linear_attention_backward(lay("dout", dout), cache)
    assert all(x.flags.c_contiguous for x in (out, *grads))
    tq, tk, tv = leaf(q), leaf(k), leaf(v)
    tout = torch_linear_attention(tq, tk, tv, causal)
    return (out, *grads), (tout.detach().numpy(), *backprop(tout, dout, tq, tk, tv)), cache


@pytest.mark.derivation("LINATT.1")
@given(DTYPES, SCALES, rngs())
def test_feature_map(dtype, scale, rng):
    x = np.concatenate([randn(rng, 50, dtype, scale), np.array([0.0, -1e3, 1e3, -80.0], dtype)])
    phi = elu_plus_one(x)
    assert phi.dtype == dtype and np.all(phi >= 0) and np.all(phi[x > -80] > 0)
    expected = (torch.nn.functional.elu(leaf(x, grad=False)) + 1).numpy()
    assert_close(phi, expected, what="phi")


@pytest.mark.derivation("LINATT.2")
@given(SCALES, rngs())
def test_feature_map_derivative(scale, rng):
    x = np.concatenate([rng.standard_normal(50) * scale, [0.0, -1e3, 1e3]])
    tx = leaf(x)
    (expected,) = backprop(torch.nn.functional.elu(tx) + 1, np.ones_like(x), tx)
    assert_close(np.minimum(elu_plus_one(x), 1), expected, what="phi' = min(phi, 1)")


LAYOUTS_OF_INPUTS = st.fixed_dictionaries({name: layouts() for name in ("q", "k", "v", "dout")})


@pytest.mark.derivation("LINATT.3")
@pytest.mark.derivation("LINATT.4")
@given(cases(lengths=(0, 1, 2, 5, 8)), LAYOUTS_OF_INPUTS)
def test_forward_matches_torch(case, layout_of):
    q, k, v, dout, causal = case
    (out, *_), (tout, *_), _ = run_both(q, k, v, dout, causal, layout_of)
    assert out.dtype == q.dtype
    # each out_i is at most a convex combination of the v_j
    assert_close(out, tout, scale=np.abs(v).max(initial=0.0), what="out")


@pytest.mark.derivation("LINATT.4")
@given(cases(dtypes=st.just(np.float64)))
def test_causal_recurrence(case):
    q, k, v, _, _ = case
    out, cache = linear_attention_forward(q, k, v, causal=True, eps=EPS)
    qf, kf = elu_plus_one(q), elu_plus_one(k)
    S = np.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]))
    z = np.zeros(q.shape[:2] + (q.shape[-1],))
    for i in range(q.shape[2]):
        S = S + kf[:, :, i, :, None] * v[:, :, i, None, :]  # (LINATT.4)
        z = z + kf[:, :, i]
        o = np.einsum("bhd,bhde->bhe", qf[:, :, i], S) / (np.einsum("bhd,bhd->bh", qf[:, :, i], z)[..., None] + EPS)
        assert_close(cache.S[:, :, i], S, what=f"S_{i}")
        assert_close(cache.z[:, :, i], z, what=f"z_{i}")
        assert_close(out[:, :, i], o, scale=np.abs(v).max(), what=f"o_{i}")


@pytest.mark.derivation("LINATT.9")
@given(cases(lengths=(0, 1, 2, 5, 8)), LAYOUTS_OF_INPUTS)
def test_backward_matches_torch(case, layout_of):
    q, k, v, dout, causal = case
    ours, oracle, _ = run_both(q, k, v, dout, causal, layout_of)
    for name, a, b, scale in zip(("dq", "dk", "dv"), ours[1:], oracle[1:], term_scales(q, k, v, dout, causal)):
        assert a.dtype == q.dtype, name
        assert_close(a, b, scale=scale, what=name)


@pytest.mark.derivation("LINATT.5")
@pytest.mark.derivation("LINATT.6")
@pytest.mark.derivation("LINATT.8")
@given(cases(), st.sampled_from([0.01, 1.0]))
def test_feature_gradients(case, shift):
    """Positive q, k: phi' = 1, so dq and dk are the feature gradients of (LINATT.6) and (LINATT.8)."""
    q, k, v, dout, causal = case
    q, k = np.abs(q) + q.dtype.type(shift), np.abs(k) + k.dtype.type(shift)
    ours, oracle, cache = run_both(q, k, v, dout, causal)
    assert np.all(np.minimum(cache.q_feat, 1) == 1) and np.all(np.minimum(cache.k_feat, 1) == 1)
    for name, a, b, scale in zip(("dphi(q)", "dphi(k)", "dv"), ours[1:], oracle[1:], term_scales(q, k, v, dout, causal)):
        assert_close(a, b, scale=scale, what=name)


@pytest.mark.derivation("LINATT.5")
@pytest.mark.derivation("LINATT.6")
@given(cases(dtypes=st.just(np.float64)), st.sampled_from([0.01, 1.0]))
def test_quotient_and_query_feature_formulas(case, shift):
    """(LINATT.5) and (LINATT.6) evaluated query by query, with S_i, z_i summed afresh from phi(k) and v.
    Positive q: phi' = 1, so the op's dq is the gradient with respect to phi(q)."""
    q, k, v, dout, causal = case
    q = np.abs(q) + shift
    _, cache = linear_attention_forward(q, k, v, causal=causal, eps=EPS)
    dq, _, _ = linear_attention_backward(dout, cache)
    qf = q + 1  # (LINATT.1) for q > 0
    kf = np.where(k > 0, k + 1, np.exp(np.minimum(k, 0)))  # (LINATT.1)
    T = q.shape[2]
    expected = np.zeros_like(q)
    for i in range(T):
        keys = slice(0, i + 1) if causal else slice(0, T)
        S_i = np.einsum("bhjd,bhje->bhde", kf[:, :, keys], v[:, :, keys])
        z_i = kf[:, :, keys].sum(2)
        d_i = np.einsum("bhd,bhd->bh", qf[:, :, i], z_i)[..., None] + EPS
        o_i = np.einsum("bhd,bhde->bhe", qf[:, :, i], S_i) / d_i
        dn_i = dout[:, :, i] / d_i  # (LINATT.5)
        dd_i = -np.sum(dout[:, :, i] * o_i, axis=-1, keepdims=True) / d_i  # (LINATT.5)
        expected[:, :, i] = np.einsum("bhde,bhe->bhd", S_i, dn_i) + dd_i * z_i  # (LINATT.6)
    assert_close(dq, expected, scale=term_scales(q, k, v, dout, causal)[0], what="dphi(q) vs (LINATT.5), (LINATT.6)")


@pytest.mark.derivation("LINATT.7")
@pytest.mark.derivation("LINATT.8")
@given(cases(dtypes=st.just(np.float64)))
def test_reverse_time_recurrence(case):
    """G_j and g_j by a loop backwards in time; dv_j = G_j^T phi(k_j), dphi(k_j) = G_j v_j + g_j."""
    q, k, v, dout, _ = case
    ours, oracle, cache = run_both(q, k, v, dout, causal=True)
    qf, kf, den, out = cache.q_feat, cache.k_feat, cache.den, cache.out
    dnum = dout / den  # (LINATT.5)
    dden = -np.sum(dout * out, axis=-1, keepdims=True) / den
    G = np.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]))
    g = np.zeros(q.shape[:2] + (q.shape[-1],))
    dv, dk_feat = np.zeros_like(v), np.zeros_like(k)
    for j in reversed(range(q.shape[2])):
        G = G + qf[:, :, j, :, None] * dnum[:, :, j, None, :]  # (LINATT.7)
        g = g + dden[:, :, j] * qf[:, :, j]
        dv[:, :, j] = np.einsum("bhde,bhd->bhe", G, kf[:, :, j])  # (LINATT.8)
        dk_feat[:, :, j] = np.einsum("bhde,bhe->bhd", G, v[:, :, j]) + g
    _, dk_scale, dv_scale = term_scales(q, k, v, dout, True)
    assert_close(ours[3], dv, scale=dv_scale, what="dv vs the loop")
    assert_close(oracle[3], dv, scale=dv_scale, what="torch dv vs the loop")
    assert_close(ours[2], dk_feat * np.minimum(kf, 1), scale=dk_scale, what="dk vs the loop")


# D >= 2: for D = 1 without a mask, out_i = S / (z + eps / phi(q_i)) and dq is of the size of eps.
@pytest.mark.derivation("LINATT.9")
@given(st.booleans(), st.sampled_from([(2, 1), (3, 4), (4, 2)]), rngs())
def test_finite_differences(causal, dims, rng):
    D, Dv = dims
    inputs = {"q": rng.standard_normal((2, 2, 4, D)), "k": rng.standard_normal((2, 2, 4, D)),
              "v": rng.standard_normal((2, 2, 4, Dv))}
    results = gradcheck.check(linear_attention_forward, linear_attention_backward, inputs, wrt=("q", "k", "v"),
                              options={"causal": causal, "eps": EPS})
    assert [r.input for r in results] == ["q", "k", "v"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


# -- bad input -----------------------------------------------------------------------------------


@st.composite
def valid_calls(draw):
    return draw(cases(lengths=(1, 2, 5)))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@given(valid_calls())
def test_forward_rejects_bad_arrays(name, case):
    q, k, v, _, causal = case
    args = {"q": q, "k": k, "v": v}
    kinds = ARRAY_KINDS + SUBCLASS_KINDS + (other_float(q.dtype),)
    if name == "v":
        kinds = tuple(kind for kind in kinds if kind != "last+1")  # any value size Dv is valid
    rejects_all(lambda bad: linear_attention_forward(**{**args, name: bad}, causal=causal), "linear_attention_forward",
                name, [corrupt(args[name], kind) for kind in kinds])
    rejects_all(lambda bad: linear_attention_forward(**{**args, name: bad}), "linear_attention_forward", name,
                [args[name][..., :0]])  # a feature or value size of 0


@pytest.mark.parametrize("name, bad_values", [("causal", BAD_FLAGS), ("eps", BAD_SCALES)])
@given(valid_calls())
def test_forward_rejects_bad_options(name, bad_values, case):
    q, k, v, _, _ = case
    rejects_all(lambda bad: linear_attention_forward(q, k, v, **{name: bad}), "linear_attention_forward", name,
                bad_values)


@pytest.mark.parametrize("name", ["dout", "cache"])
@given(valid_calls())
def test_backward_rejects_bad_input(name, case):
    q, k, v, dout, causal = case
    _, cache = linear_attention_forward(q, k, v, causal=causal)
    if name == "dout":
        kinds = ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dout.dtype),)
        rejects_all(lambda bad: linear_attention_backward(bad, cache), "linear_attention_backward", "dout",
                    [corrupt(dout, kind) for kind in kinds])
    else:
        rejects_all(lambda bad: linear_attention_backward(dout, bad), "linear_attention_backward", "cache",
                    [None, tuple(cache), list(cache), cache._asdict(), dout])


@given(valid_calls())
def test_feature_map_rejects_non_float_arrays(case):
    q = case[0]
    rejects_all(elu_plus_one, "elu_plus_one", "x",
                [corrupt(q, kind) for kind in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS])
