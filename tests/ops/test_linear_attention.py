"""Linear attention: torch autograd oracle, finite differences, the equations of proofs/linear_attention.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.linear_attention import elu_plus_one, linear_attention_backward, linear_attention_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, randn, rngs
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
def cases(draw, dtypes=DTYPES, scales=SCALES):
    B, H, T = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2, 5, 8]))
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
    return [float(b.max()) for b in bound]


def run_both(q, k, v, dout, causal):
    out, cache = linear_attention_forward(q, k, v, causal=causal, eps=EPS)
    grads = linear_attention_backward(dout, cache)
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


@pytest.mark.derivation("LINATT.3")
@pytest.mark.derivation("LINATT.4")
@given(cases())
def test_forward_matches_torch(case):
    q, k, v, dout, causal = case
    (out, *_), (tout, *_), _ = run_both(q, k, v, dout, causal)
    assert out.dtype == q.dtype
    assert_close(out, tout, scale=np.abs(v).max(), what="out")  # each out_i is at most a convex combination of v_j


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
@given(cases())
def test_backward_matches_torch(case):
    q, k, v, dout, causal = case
    ours, oracle, _ = run_both(q, k, v, dout, causal)
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


@pytest.mark.parametrize(
    "shapes, dtypes, message",
    [
        (((1, 1, 3, 2), (1, 1, 3, 4), (1, 1, 3, 2)), None, "linear_attention_forward: argument 'k' expected shape (1, 1, 3, 2), got (1, 1, 3, 4)"),
        (((1, 1, 3, 2), (1, 1, 3, 2), (1, 1, 4, 2)), None, "argument 'v' expected shape (1, 1, 3, *), got (1, 1, 4, 2)"),
        (((1, 3, 2), (1, 3, 2), (1, 3, 2)), None, "argument 'q' expected 4 dimensions, got 3"),
        (((1, 1, 3, 2),) * 3, (np.float64, np.float32, np.float64), "argument 'k' expected dtype float64 (same as 'q'), got float32"),
        (((1, 1, 3, 2),) * 3, (np.int64, np.int64, np.int64), "argument 'q' expected dtype float32 or float64, got int64"),
    ],
)
def test_bad_input_is_named(shapes, dtypes, message):
    dtypes = dtypes or (np.float64,) * 3
    q, k, v = (np.ones(s, d) for s, d in zip(shapes, dtypes))
    with pytest.raises(ValueError) as err:
        linear_attention_forward(q, k, v)
    assert message in str(err.value)


def test_backward_rejects_wrong_dout():
    _, cache = linear_attention_forward(np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 5)), causal=True)
    with pytest.raises(ValueError, match=r"linear_attention_backward: argument 'dout' expected shape \(1, 1, 3, 5\), got \(1, 1, 3, 2\)"):
        linear_attention_backward(np.ones((1, 1, 3, 2)), cache)
    with pytest.raises(ValueError, match=r"argument 'dout' expected dtype float64 \(same as 'out'\), got float32"):
        linear_attention_backward(np.ones((1, 1, 3, 5), np.float32), cache)
