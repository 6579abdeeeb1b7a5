"""Activations: torch oracle, finite differences, erf, the equations of proofs/activations.md."""

import math

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops import activations as act
from npformer.ops.activations import (
    erf,
    erfc,
    geglu_backward,
    geglu_forward,
    gelu_backward,
    gelu_forward,
    mish_backward,
    mish_forward,
    relu_backward,
    relu_forward,
    silu_backward,
    silu_forward,
    swiglu_backward,
    swiglu_forward,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

# erf is held to float64 round-off, stated in units of float64's machine epsilon
# (2.2e-16): a few units absolute (about 1e-15) and 45 units relative (about 1e-14).
F64_EPS = float(np.finfo(np.float64).eps)
ERF_ATOL = 5 * F64_EPS
ERF_RTOL = 45 * F64_EPS

APPROXIMATIONS = ["none", "tanh"]

# name -> (forward, backward, options, torch expression)
UNARY = {
    "relu": (relu_forward, relu_backward, {}, F.relu),
    "gelu[none]": (gelu_forward, gelu_backward, {"approximate": "none"}, lambda t: F.gelu(t, approximate="none")),
    "gelu[tanh]": (gelu_forward, gelu_backward, {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
    "silu": (silu_forward, silu_backward, {}, F.silu),
    "mish": (mish_forward, mish_backward, {}, F.mish),
}
GATED = {
    "swiglu": (swiglu_forward, swiglu_backward, {}, lambda g, u: F.silu(g) * u),
    "geglu[none]": (geglu_forward, geglu_backward, {"approximate": "none"},
                    lambda g, u: F.gelu(g, approximate="none") * u),
    "geglu[tanh]": (geglu_forward, geglu_backward, {"approximate": "tanh"},
                    lambda g, u: F.gelu(g, approximate="tanh") * u),
}

cases = st.tuples(shapes(1, 3), DTYPES, SCALES, rngs())


# ---------------------------------------------------------------------------
# torch oracle
# ---------------------------------------------------------------------------


def check_unary_against_torch(name, case):
    """Forward and gradient against torch autograd (float64 oracle on the same values).

    Every output entry is a product of terms no larger than |x| (forward) or |dy|
    (gradient: each of these derivatives is bounded by about 1.2), so round-off is
    judged against those scales.
    """
    forward, backward, options, oracle = UNARY[name]
    shape, dtype, scale, rng = case
    x = randn(rng, shape, dtype, scale)
    dy = randn(rng, shape, dtype)
    y, cache = forward(x, **options)
    dx = backward(dy, cache)
    tx = leaf(x)
    ty = oracle(tx)
    (tdx,) = backprop(ty, dy, tx)
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_close(y, ty.detach().numpy(), scale=float(np.abs(x).max()), what=f"{name} y")
    assert_close(dx, tdx, scale=float(np.abs(dy).max()), what=f"{name} dx")


def check_gated_against_torch(name, case):
    forward, backward, options, oracle = GATED[name]
    shape, dtype, scale, rng = case
    gate = randn(rng, shape, dtype, scale)
    up = randn(rng, shape, dtype, scale)
    dy = randn(rng, shape, dtype)
    y, cache = forward(gate, up, **options)
    dgate, dup = backward(dy, cache)
    tg, tu = leaf(gate), leaf(up)
    ty = oracle(tg, tu)
    tdgate, tdup = backprop(ty, dy, tg, tu)
    for a in (y, dgate, dup):
        assert a.dtype == dtype
        assert np.all(np.isfinite(a))
    g64, u64, dy64 = (a.astype(np.float64) for a in (gate, up, dy))
    assert_close(y, ty.detach().numpy(), scale=float(np.abs(g64 * u64).max()), what=f"{name} y")
    assert_close(dgate, tdgate, scale=float(np.abs(dy64 * u64).max()), what=f"{name} dgate")
    assert_close(dup, tdup, scale=float(np.abs(dy64 * g64).max()), what=f"{name} dup")


@pytest.mark.derivation("ACT.4")
@pytest.mark.derivation("ACT.5")
@given(cases)
def test_relu_matches_torch(case):
    check_unary_against_torch("relu", case)


@pytest.mark.derivation("ACT.6")
@pytest.mark.derivation("ACT.7")
@given(cases)
def test_gelu_exact_matches_torch(case):
    check_unary_against_torch("gelu[none]", case)


@pytest.mark.derivation("ACT.8")
@pytest.mark.derivation("ACT.9")
@given(cases)
def test_gelu_tanh_matches_torch(case):
    check_unary_against_torch("gelu[tanh]", case)


@pytest.mark.derivation("ACT.11")
@pytest.mark.derivation("ACT.12")
@given(cases)
def test_silu_matches_torch(case):
    check_unary_against_torch("silu", case)


@pytest.mark.derivation("ACT.14")
@pytest.mark.derivation("ACT.15")
@given(cases)
def test_mish_matches_torch(case):
    check_unary_against_torch("mish", case)


@pytest.mark.derivation("ACT.16")
@pytest.mark.derivation("ACT.17")
@pytest.mark.derivation("ACT.18")
@given(cases)
def test_swiglu_matches_torch(case):
    check_gated_against_torch("swiglu", case)


@pytest.mark.derivation("ACT.19")
@pytest.mark.derivation("ACT.20")
@pytest.mark.derivation("ACT.21")
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases)
def test_geglu_matches_torch(approximate, case):
    check_gated_against_torch(f"geglu[{approximate}]", case)


@pytest.mark.derivation("ACT.5")
def test_relu_kink_gets_zero_gradient_like_torch():
    x = np.array([-1.0, -0.0, 0.0, 1.0])
    dy = np.full(4, 3.0)
    _, cache = relu_forward(x)
    tx = leaf(x)
    (expected,) = backprop(F.relu(tx), dy, tx)
    np.testing.assert_array_equal(relu_backward(dy, cache), expected)
    np.testing.assert_array_equal(relu_backward(dy, cache), [0.0, 0.0, 0.0, 3.0])


# ---------------------------------------------------------------------------
# large magnitudes: finite, no floating point warnings, still right
# ---------------------------------------------------------------------------

EXTREMES = [-1e3, -700.0, -100.0, -30.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 30.0, 100.0, 700.0, 1e3]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(UNARY) + list(GATED))
def test_large_magnitudes_are_finite_and_quiet(name, dtype):
    x = np.array(EXTREMES, dtype)
    dy = np.ones_like(x)
    with np.errstate(all="raise", under="ignore"):
        if name in UNARY:
            forward, backward, options, oracle = UNARY[name]
            y, cache = forward(x, **options)
            outs, inputs = (y, backward(dy, cache)), (x,)
        else:
            forward, backward, options, oracle = GATED[name]
            up = x[::-1].copy()
            y, cache = forward(x, up, **options)
            outs, inputs = (y, *backward(dy, cache)), (x, up)
    leaves = [leaf(a) for a in inputs]
    ty = oracle(*leaves)
    expected = (ty.detach().numpy(), *backprop(ty, dy, *leaves))
    for what, a, b in zip(("y", "d0", "d1"), outs, expected):
        assert a.dtype == dtype, what
        assert np.all(np.isfinite(a)), what
        assert_close(a, b, what=f"{name} {what}")


# ---------------------------------------------------------------------------
# finite differences (float64, independent of torch)
# ---------------------------------------------------------------------------

fd_cases = st.tuples(shapes(1, 2), rngs())


@pytest.mark.parametrize("name", list(UNARY))
@given(case=fd_cases)
def test_unary_finite_differences(name, case):
    forward, backward, options, _ = UNARY[name]
    shape, rng = case
    x = 2.0 * rng.standard_normal(shape)
    if name == "relu":  # keep clear of the kink, where the derivative does not exist
        x += np.where(x >= 0, 0.1, -0.1)
    results = gradcheck.check(forward, backward, {"x": x}, wrt=("x",), options=options)
    assert [r.input for r in results] == ["x"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@pytest.mark.parametrize("name", list(GATED))
@given(case=fd_cases)
def test_gated_finite_differences(name, case):
    forward, backward, options, _ = GATED[name]
    shape, rng = case
    inputs = {"gate": 2.0 * rng.standard_normal(shape), "up": rng.standard_normal(shape)}
    results = gradcheck.check(forward, backward, inputs, wrt=("gate", "up"), options=options)
    assert [r.input for r in results] == ["gate", "up"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def test_gradcheck_cases_cover_every_op_and_pass():
    cases_ = gradcheck.cases("activations")
    assert [c.name for c in cases_] == [
        "relu", "gelu[none]", "gelu[tanh]", "silu", "mish", "swiglu", "geglu[none]", "geglu[tanh]",
    ]
    results = [r for c in cases_ for r in gradcheck.check_case(c)]
    assert all(r.ok for r in results), gradcheck.format_table(results)


# ---------------------------------------------------------------------------
# the equations of the proof
# ---------------------------------------------------------------------------


@pytest.mark.derivation("ACT.1")
@pytest.mark.parametrize("name", list(UNARY))
@given(case=st.tuples(shapes(1, 3), DTYPES, rngs()))
def test_backward_is_dy_times_elementwise_derivative(name, case):
    """(ACT.1): the Jacobian is diagonal, so dx = dy * f'(x) with f'(x) = backward(ones)."""
    forward, backward, options, _ = UNARY[name]
    shape, dtype, rng = case
    x = randn(rng, shape, dtype, 3.0)
    dy = randn(rng, shape, dtype)
    _, cache = forward(x, **options)
    derivative = backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(backward(dy, cache), dy * derivative)


@pytest.mark.derivation("ACT.17")
@pytest.mark.derivation("ACT.18")
@pytest.mark.derivation("ACT.20")
@pytest.mark.derivation("ACT.21")
@pytest.mark.parametrize("name", list(GATED))
@given(case=st.tuples(shapes(1, 3), DTYPES, rngs()))
def test_gated_backward_is_the_product_rule(name, case):
    """dgate = f'(gate) * up * dy and dup = f(gate) * dy, with f the unary op's own pair."""
    forward, backward, options, _ = GATED[name]
    unary_forward, unary_backward = (silu_forward, silu_backward) if name == "swiglu" else (gelu_forward, gelu_backward)
    shape, dtype, rng = case
    gate, up, dy = (randn(rng, shape, dtype, 3.0) for _ in range(3))
    y, cache = forward(gate, up, **options)
    dgate, dup = backward(dy, cache)
    f, f_cache = unary_forward(gate, **options)
    np.testing.assert_array_equal(y, f * up)  # (ACT.16), (ACT.19)
    np.testing.assert_array_equal(dup, dy * f)  # (ACT.18), (ACT.21)
    np.testing.assert_array_equal(dgate, unary_backward(dy * up, f_cache))  # (ACT.17), (ACT.20)


X = sp.Symbol("x", real=True)


def _sympy_zero(expr):
    return sp.simplify(sp.expand(sp.simplify(expr.rewrite(sp.exp)))) == 0


@pytest.mark.derivation("ACT.7")
def test_gelu_exact_derivative_symbolic():
    Phi = (1 + sp.erf(X / sp.sqrt(2))) / 2  # (ACT.6)
    phi = sp.exp(-X**2 / 2) / sp.sqrt(2 * sp.pi)
    claimed = Phi + X * phi  # (ACT.7)
    assert sp.simplify(sp.diff(X * Phi, X) - claimed) == 0
    assert sp.simplify((Phi - sp.erfc(-X / sp.sqrt(2)) / 2).rewrite(sp.erf)) == 0  # the erfc form the code uses


@pytest.mark.derivation("ACT.9")
def test_gelu_tanh_derivative_symbolic():
    kappa = sp.Rational(44715, 1000000)
    u = sp.sqrt(2 / sp.pi) * (X + kappa * X**3)  # (ACT.8)
    y = X / 2 * (1 + sp.tanh(u))  # (ACT.8)
    claimed = (1 + sp.tanh(u)) / 2 + X / 2 * (1 - sp.tanh(u) ** 2) * sp.sqrt(2 / sp.pi) * (1 + 3 * kappa * X**2)
    assert sp.simplify(sp.diff(y, X) - claimed) == 0  # (ACT.9)


@pytest.mark.derivation("ACT.10")
def test_sigmoid_forms_and_derivative_symbolic():
    s = 1 / (1 + sp.exp(-X))
    assert sp.simplify(sp.diff(s, X) - s * (1 - s)) == 0
    assert sp.simplify(sp.exp(X) / (1 + sp.exp(X)) - s) == 0  # the branch for x < 0


@pytest.mark.derivation("ACT.10")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_stable(dtype):
    x = np.array(EXTREMES, dtype)
    _, cache = silu_forward(x)
    assert cache.s.dtype == dtype
    assert_close(cache.s, torch.sigmoid(leaf(x)).detach().numpy(), what="sigmoid")


@pytest.mark.derivation("ACT.12")
def test_silu_derivative_symbolic():
    s = 1 / (1 + sp.exp(-X))
    assert sp.simplify(sp.diff(X * s, X) - s * (1 + X * (1 - s))) == 0  # (ACT.12)


@pytest.mark.derivation("ACT.13")
def test_softplus_forms_and_derivative_symbolic():
    softplus = sp.log(1 + sp.exp(X))
    pos, neg = sp.Symbol("p", positive=True), sp.Symbol("n", negative=True)
    # max(x, 0) + log1p(e^-|x|) on each side of 0
    assert sp.simplify(pos + sp.log(1 + sp.exp(-pos)) - softplus.subs(X, pos)) == 0
    assert sp.simplify(sp.log(1 + sp.exp(neg)) - softplus.subs(X, neg)) == 0
    assert sp.simplify(sp.diff(softplus, X) - 1 / (1 + sp.exp(-X))) == 0


@pytest.mark.derivation("ACT.13")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softplus_is_stable(dtype):
    x = np.array(EXTREMES, dtype)
    ours = act._softplus(x)
    assert ours.dtype == dtype
    assert_close(ours, F.softplus(leaf(x)).detach().numpy(), what="softplus")


@pytest.mark.derivation("ACT.15")
def test_mish_derivative_symbolic():
    softplus = sp.log(1 + sp.exp(X))
    s = 1 / (1 + sp.exp(-X))
    t = sp.tanh(softplus)
    claimed = t + X * (1 - t**2) * s  # (ACT.15)
    assert _sympy_zero(sp.diff(X * t, X) - claimed)


# ---------------------------------------------------------------------------
# erf and erfc against the standard library
# ---------------------------------------------------------------------------


def erf_points():
    """A dense grid over [-30, 30], random points at several scales, and the edges."""
    rng = np.random.default_rng(20240611)
    special = [0.0, -0.0, 5e-324, -5e-324, 1e-310, 1e-300, 1e-150, 1e-20, 1e-8, 1.5, np.nextafter(1.5, 0.0),
               26.0, 27.0, 30.0]
    return np.concatenate([
        np.linspace(-30.0, 30.0, 240_001),
        rng.standard_normal(20_000) * np.repeat([1e-3, 1.0, 3.0, 10.0], 5_000),
        special, np.negative(special),
    ])


def assert_erf_matches_math(x):
    ours = erf(x)
    ref = np.array([math.erf(v) for v in x])
    error = np.abs(ours - ref)
    assert error.max() <= ERF_ATOL, f"abs error {error.max():.3e} at x = {x[error.argmax()]!r}"
    relative = error[ref != 0] / np.abs(ref[ref != 0])
    assert relative.max() <= ERF_RTOL, f"rel error {relative.max():.3e}"
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(ref))  # odd, down to -0.0


@pytest.mark.derivation("ACT.2")
@pytest.mark.derivation("ACT.3")
def test_erf_matches_math_erf_on_the_whole_line():
    assert_erf_matches_math(erf_points())


@pytest.mark.derivation("ACT.2")
def test_erf_series_region():
    x = np.linspace(-1.5, 1.5, 30_001)[1:-1]
    assert np.all(np.abs(x) < act._ERF_SPLIT)
    assert_erf_matches_math(x)


@pytest.mark.derivation("ACT.3")
def test_erfc_continued_fraction_region():
    """Relative accuracy of erfc where the continued fraction is used (the tail GELU's Phi needs)."""
    x = np.concatenate([np.linspace(act._ERF_SPLIT, 26.5, 50_001), [27.0, 30.0, 1e3]])
    ours = erfc(x)
    ref = np.array([math.erfc(v) for v in x])
    normal = ref >= np.finfo(np.float64).tiny  # below it, math.erfc itself is subnormal
    relative = np.abs(ours[normal] - ref[normal]) / ref[normal]
    assert relative.max() <= ERF_RTOL, f"rel error {relative.max():.3e}"
    assert np.all(np.abs(ours[~normal] - ref[~normal]) <= ERF_ATOL * np.finfo(np.float64).tiny)
    assert_erf_matches_math(np.concatenate([x, -x]))


@pytest.mark.derivation("ACT.2")
@pytest.mark.derivation("ACT.3")
def test_erfc_matches_math_erfc_on_the_whole_line():
    x = erf_points()
    ours = erfc(x)
    ref = np.array([math.erfc(v) for v in x])
    error = np.abs(ours - ref)
    # Absolute to round-off everywhere; relative where erfc is not formed as 1 - erf.
    assert error.max() <= ERF_ATOL, f"abs error {error.max():.3e}"
    tail = (x >= act._ERF_SPLIT) & (ref >= np.finfo(np.float64).tiny)
    assert (error[tail] / ref[tail]).max() <= ERF_RTOL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_erf_keeps_dtype_and_limits(dtype):
    x = np.array([-np.inf, -1e3, -30.0, 0.0, 30.0, 1e3, np.inf], dtype)
    for f, expected in ((erf, [-1, -1, -1, 0, 1, 1, 1]), (erfc, [2, 2, 2, 1, 0, 0, 0])):
        out = f(x)
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, np.array(expected, dtype))


def test_erf_float32_is_float32_accurate():
    x = np.linspace(-6, 6, 4001).astype(np.float32)
    ref = np.array([math.erf(float(v)) for v in x])
    assert_close(erf(x), ref, what="erf float32")


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

FORWARDS = {
    "relu_forward": lambda a: relu_forward(a),
    "gelu_forward": lambda a: gelu_forward(a),
    "silu_forward": lambda a: silu_forward(a),
    "mish_forward": lambda a: mish_forward(a),
}


@pytest.mark.parametrize("op", list(FORWARDS))
def test_integer_input_is_named(op):
    with pytest.raises(ValueError) as err:
        FORWARDS[op](np.ones((2, 3), np.int64))
    assert f"{op}: argument 'x' expected dtype float32 or float64, got int64" in str(err.value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: swiglu_forward(np.ones((2, 3)), np.ones(3)),
         "swiglu_forward: argument 'up' expected shape (2, 3) (same as 'gate'), got (3,)"),
        (lambda: geglu_forward(np.ones((2, 3)), np.ones((3, 2))),
         "geglu_forward: argument 'up' expected shape (2, 3) (same as 'gate'), got (3, 2)"),
        (lambda: swiglu_forward(np.ones(3, np.int32), np.ones(3)),
         "swiglu_forward: argument 'gate' expected dtype float32 or float64, got int32"),
        (lambda: geglu_forward(np.ones(3), np.ones(3, np.int64)),
         "geglu_forward: argument 'up' expected dtype float32 or float64, got int64"),
        (lambda: swiglu_forward(np.ones(3), np.ones(3, np.float32)),
         "swiglu_forward: argument 'up' expected dtype float64 (same as 'gate'), got float32"),
        (lambda: gelu_forward(np.ones(3), approximate="fast"),
         "gelu_forward: argument 'approximate' expected 'none' or 'tanh', got 'fast'"),
        (lambda: geglu_forward(np.ones(3), np.ones(3), approximate=None),
         "geglu_forward: argument 'approximate' expected 'none' or 'tanh', got None"),
        (lambda: relu_forward([1.0, -1.0]), "relu_forward: argument 'x' expected a numpy.ndarray, got list"),
        (lambda: erf(np.ones(2, np.int64)), "erf: argument 'x' expected dtype float32 or float64, got int64"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("name", list(UNARY) + list(GATED))
def test_backward_rejects_wrong_dy(name):
    x = np.ones((2, 3))
    if name in UNARY:
        forward, backward, options, _ = UNARY[name]
        _, cache = forward(x, **options)
    else:
        forward, backward, options, _ = GATED[name]
        _, cache = forward(x, x, **options)
    op = f"{name.split('[')[0]}_backward"
    with pytest.raises(ValueError, match=rf"{op}: argument 'dy' expected shape \(2, 3\), got \(3,\)"):
        backward(np.ones(3), cache)
    with pytest.raises(ValueError, match=rf"{op}: argument 'dy' expected dtype float64"):
        backward(np.ones((2, 3), np.float32), cache)
