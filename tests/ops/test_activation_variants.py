"""GELU's sigmoid form (ACT.22), (ACT.23) against its formula, sympy and finite differences; Mish against
torch; the MLP with every GELU form and with Mish against torch; the options checked by name."""

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.nn.mlp import MLP
from npformer.ops.activations import (GELU_APPROXIMATIONS, geglu_forward, gelu_backward, gelu_forward, mish_backward,
                                      mish_forward)
from tests.badinput import expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

ALPHA = 1.702
cases = st.tuples(shapes(0, 3), DTYPES, SCALES, rngs())


def sigmoid64(z):
    """1 / (1 + e^-z) in float64, written independently of the op (exp of -|z| only)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


@pytest.mark.derivation("ACT.22")
@given(case=cases, layout=layouts())
def test_gelu_sigmoid_is_its_formula(case, layout):
    """y = x sigmoid(1.702 x) (ACT.22) against the float64 formula (and torch's sigmoid), in any layout."""
    shape, dtype, scale, rng = case
    x = randn(rng, shape, dtype, scale)
    xl = in_layout(x, layout)
    saved = xl.copy()
    y, cache = gelu_forward(xl, approximate="sigmoid")
    np.testing.assert_array_equal(xl, saved)
    x64 = x.astype(np.float64)
    expected = x64 * sigmoid64(ALPHA * x64)
    assert y.dtype == dtype and y.shape == shape and isinstance(y, np.ndarray)
    assert_close(y, expected, what="y")
    t = leaf(x)
    assert_close(y, (t * torch.sigmoid(ALPHA * t)).detach().numpy(), what="y (torch)")
    assert cache.approximate == "sigmoid" and cache.tanh_u is None


@pytest.mark.derivation("ACT.23")
@given(case=cases, layout=layouts())
def test_gelu_sigmoid_gradient_is_its_formula(case, layout):
    """dx = dy s (1 + 1.702 x (1 - s)) (ACT.23), against the formula and torch autograd of x sigmoid(1.702 x)."""
    shape, dtype, scale, rng = case
    x, dy = randn(rng, shape, dtype, scale), randn(rng, shape, dtype)
    _, cache = gelu_forward(x, approximate="sigmoid")
    dx = gelu_backward(in_layout(dy, layout), cache)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    s = sigmoid64(ALPHA * x64)
    expected = dy64 * s * (1 + ALPHA * x64 * (1 - s))
    assert dx.dtype == dtype and dx.shape == shape
    scale_dx = float(np.abs(dy64).max() * (1 + ALPHA * np.abs(x64).max() / 4)) if dy.size else 1.0
    assert_close(dx, expected, scale=scale_dx, what="dx")
    t = leaf(x)
    (tdx,) = backprop(t * torch.sigmoid(ALPHA * t), dy, t)
    assert_close(dx, tdx, scale=scale_dx, what="dx (torch)")


@pytest.mark.derivation("ACT.23")
def test_gelu_sigmoid_derivative_symbolic():
    """(ACT.23) is the derivative of (ACT.22), and 1.702 keeps sigmoid(1.702 x) within 0.0095 of Phi."""
    x = sp.symbols("x", real=True)
    a = sp.Rational(1702, 1000)
    s = 1 / (1 + sp.exp(-a * x))
    assert sp.simplify(sp.diff(x * s, x) - s * (1 + a * x * (1 - s))) == 0
    grid = np.linspace(-8, 8, 4001)
    phi = np.array([float(sp.erfc(-v / sp.sqrt(2)) / 2) for v in grid[::40]])
    assert np.abs(sigmoid64(ALPHA * grid[::40]) - phi).max() < 0.0096


@given(rng=rngs())
def test_gelu_sigmoid_finite_differences(rng):
    results = gradcheck.check(gelu_forward, gelu_backward, {"x": 2 * rng.standard_normal((2, 3, 5))}, wrt=("x",),
                              options={"approximate": "sigmoid"})
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@given(dtype=DTYPES)
def test_gelu_sigmoid_is_finite_and_quiet_at_large_magnitudes(dtype):
    x = np.array([-1e30, -1e3, -50.0, 0.0, 50.0, 1e3, 1e30], dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # (underflow to 0 is the right answer)
        y, cache = gelu_forward(x, approximate="sigmoid")
        dx = gelu_backward(np.ones_like(x), cache)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(y[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(y[-2:], x[-2:])
    np.testing.assert_array_equal(dx[-2:], 1.0)


@pytest.mark.derivation("ACT.14")
@pytest.mark.derivation("ACT.15")
@given(case=cases, layout=layouts())
def test_mish_matches_torch_in_every_layout(case, layout):
    shape, dtype, scale, rng = case
    x, dy = randn(rng, shape, dtype, scale), randn(rng, shape, dtype)
    y, cache = mish_forward(in_layout(x, layout))
    dx = mish_backward(in_layout(dy, layout), cache)
    t = leaf(x)
    ty = F.mish(t)
    (tdx,) = backprop(ty, dy, t)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, ty.detach().numpy(), what="y")
    assert_close(dx, tdx, scale=float(np.abs(dy).max() * 1.2) if dy.size else 1.0, what="dx")


MLP_OPTIONS = [("gelu", "tanh"), ("gelu", "none"), ("gelu", "sigmoid"), ("mish", "tanh"), ("relu", "none")]


def torch_activation(activation, approximate, h):
    if activation == "mish":
        return F.mish(h)
    if activation == "relu":
        return F.relu(h)
    if approximate == "sigmoid":
        return h * torch.sigmoid(ALPHA * h)
    return F.gelu(h, approximate=approximate)


@pytest.mark.parametrize("activation, approximate", MLP_OPTIONS)
@given(dtype=DTYPES, bias=st.booleans(), rng=rngs(), lead=st.sampled_from([(1,), (2, 3), (3, 1, 2)]))
def test_mlp_with_each_activation_matches_torch(activation, approximate, dtype, bias, rng, lead):
    """The MLP's output and every gradient against torch, for each GELU form and for Mish."""
    mlp = MLP(4, 7, bias, approximate, rng=rng, activation=activation, dtype=dtype, proj_std=0.5)
    if bias:
        mlp.fc.bias.data[...] = randn(rng, (7,), dtype)
    x, dy = randn(rng, (*lead, 4), dtype), randn(rng, (*lead, 4), dtype)
    y = mlp.forward(x)
    dx = mlp.backward(dy)
    p = {n: leaf(v.data) for n, v in mlp.named_parameters()}
    tx = leaf(x)
    h = F.linear(tx, p["fc.weight"], p.get("fc.bias"))
    ty = F.linear(torch_activation(activation, approximate, h), p["proj.weight"], p.get("proj.bias"))
    names = list(p)
    grads = backprop(ty, dy, tx, *(p[n] for n in names))
    assert y.dtype == dx.dtype == dtype
    assert_close(y, ty.detach().numpy(), what="y")
    assert_close(dx, grads[0], what="dx")
    for name, g in zip(names, grads[1:]):
        assert_close(dict(mlp.named_parameters())[name].grad, g, what=name)


def test_gelu_forms_differ_and_agree_roughly():
    """The three GELU forms are different functions, within 0.025 of one another on [-4, 4]."""
    x = np.linspace(-4, 4, 81)
    ys = {a: gelu_forward(x, approximate=a)[0] for a in GELU_APPROXIMATIONS}
    assert set(ys) == {"none", "tanh", "sigmoid"}
    assert np.abs(ys["sigmoid"] - ys["none"]).max() < 0.025 and np.abs(ys["sigmoid"] - ys["none"]).max() > 1e-3
    assert np.abs(ys["tanh"] - ys["none"]).max() < 1e-3


# -- bad input ----------------------------------------------------------------------------------------
BAD = ("Sigmoid", "fast", "", None, 1, True, ("sigmoid",), np.array(["sigmoid"]))


@given(bad=st.sampled_from(BAD))
def test_gelu_rejects_a_bad_approximate_naming_every_form(bad):
    message = expect_rejected(lambda: gelu_forward(np.ones(3), approximate=bad), "gelu_forward", "approximate")
    assert "expected 'none', 'tanh' or 'sigmoid'" in message


def test_geglu_keeps_the_exact_and_tanh_forms():
    message = expect_rejected(lambda: geglu_forward(np.ones(3), np.ones(3), approximate="sigmoid"),
                              "geglu_forward", "approximate")
    assert "expected 'none' or 'tanh', got 'sigmoid'" in message


@pytest.mark.parametrize("name, bad", [("approximate", "Sigmoid"), ("approximate", None), ("activation", "silu"),
                                       ("activation", "Mish"), ("activation", None)])
def test_mlp_rejects_bad_options_by_name(name, bad):
    options = {"approximate": "tanh", "activation": "gelu", name: bad}
    message = expect_rejected(lambda: MLP(4, 8, rng=np.random.default_rng(0), **options), "MLP", name)
    assert ("'sigmoid'" if name == "approximate" else "'mish'") in message


@pytest.mark.derivation("ACT.23")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_sigmoid_is_finite_at_the_dtype_extremes(dtype):
    """1.702 x overflows for |x| > ~2e38 in float32; the saturated sigmoid makes (ACT.23) exactly 1 (x > 0) or
    0 (x < 0) there, never inf * 0. Values below the clip keep (ACT.23) itself."""
    big = np.finfo(dtype).max
    x = np.array([big, -big, 2.5e38, -2.5e38, 1e30, -1e30, 1e4, -1e4, 3e4, -3e4, 25.0, -25.0], dtype)
    with np.errstate(over="raise", invalid="raise"):  # no overflow, no inf * 0
        y, cache = gelu_forward(x, "sigmoid")
        dx = gelu_backward(np.ones_like(x), cache)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert y.dtype == dx.dtype == dtype
    pos, saturated = x > 0, np.abs(x) >= 1e4
    np.testing.assert_array_equal(y[pos & saturated], x[pos & saturated])
    np.testing.assert_array_equal(y[~pos & saturated], 0)
    np.testing.assert_array_equal(dx[saturated], np.where(pos, 1, 0)[saturated])
    x64 = x.astype(np.float64)
    s = sigmoid64(np.clip(ALPHA * np.clip(x64, -1e5, 1e5), -1e3, 1e3))
    expected = s * (1 + ALPHA * np.clip(x64, -1e5, 1e5) * (1 - s))  # (ACT.23) in float64, where it is finite
    assert_close(dx, expected.astype(dtype), rtol=1e-6, what="(ACT.23) at the extremes")
