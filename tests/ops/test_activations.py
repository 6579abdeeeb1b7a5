"""Activations: torch oracle in every memory layout, finite differences, erf, the equations of
proofs/activations.md against independent derivatives, empty input, bad input."""

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
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import ERF_ATOL, ERF_RTOL, FD_RTOL, assert_close


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

cases = st.tuples(shapes(0, 3), DTYPES, SCALES, rngs())  # 0-d arrays included
unary_layouts = st.fixed_dictionaries({"x": layouts(), "dy": layouts()})
gated_layouts = st.fixed_dictionaries({"gate": layouts(), "up": layouts(), "dy": layouts()})


def in_layouts(arrays, layout):
    """The arrays in the named layouts, and a check that none of them was written to."""
    moved = {name: in_layout(a, layout[name]) for name, a in arrays.items()}

    def unchanged():
        for name, a in moved.items():
            np.testing.assert_array_equal(a, arrays[name], err_msg=f"{name} was written to")

    return moved, unchanged


# ---------------------------------------------------------------------------
# torch oracle
# ---------------------------------------------------------------------------


def check_unary_against_torch(name, case, layout):
    """Forward and gradient against torch autograd (float64 oracle on the same values),
    with x and dy in the given memory layouts.

    Every output entry is a product of terms no larger than |x| (forward) or |dy|
    (gradient: each of these derivatives is bounded by about 1.2), so round-off is
    judged against those scales.
    """
    forward, backward, options, oracle = UNARY[name]
    shape, dtype, scale, rng = case
    x = randn(rng, shape, dtype, scale)
    dy = randn(rng, shape, dtype)
    moved, unchanged = in_layouts({"x": x, "dy": dy}, layout)
    y, cache = forward(moved["x"], **options)
    dx = backward(moved["dy"], cache)
    unchanged()
    tx = leaf(x)
    ty = oracle(tx)
    (tdx,) = backprop(ty, dy, tx)
    assert type(y) is type(dx) is np.ndarray and y.shape == dx.shape == x.shape  # 0-d in, 0-d arrays out
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_close(y, ty.detach().numpy(), scale=float(np.abs(x).max()), what=f"{name} y")
    assert_close(dx, tdx, scale=float(np.abs(dy).max()), what=f"{name} dx")


def check_gated_against_torch(name, case, layout):
    forward, backward, options, oracle = GATED[name]
    shape, dtype, scale, rng = case
    gate = randn(rng, shape, dtype, scale)
    up = randn(rng, shape, dtype, scale)
    dy = randn(rng, shape, dtype)
    moved, unchanged = in_layouts({"gate": gate, "up": up, "dy": dy}, layout)
    y, cache = forward(moved["gate"], moved["up"], **options)
    dgate, dup = backward(moved["dy"], cache)
    unchanged()
    tg, tu = leaf(gate), leaf(up)
    ty = oracle(tg, tu)
    tdgate, tdup = backprop(ty, dy, tg, tu)
    for a in (y, dgate, dup):
        assert type(a) is np.ndarray and a.shape == gate.shape  # 0-d in, 0-d arrays out
        assert a.dtype == dtype
        assert np.all(np.isfinite(a))
    g64, u64, dy64 = (a.astype(np.float64) for a in (gate, up, dy))
    assert_close(y, ty.detach().numpy(), scale=float(np.abs(g64 * u64).max()), what=f"{name} y")
    assert_close(dgate, tdgate, scale=float(np.abs(dy64 * u64).max()), what=f"{name} dgate")
    assert_close(dup, tdup, scale=float(np.abs(dy64 * g64).max()), what=f"{name} dup")


@pytest.mark.derivation("ACT.4")
@pytest.mark.derivation("ACT.5")
@given(cases, unary_layouts)
def test_relu_matches_torch(case, layout):
    check_unary_against_torch("relu", case, layout)


@pytest.mark.derivation("ACT.6")
@pytest.mark.derivation("ACT.7")
@given(cases, unary_layouts)
def test_gelu_exact_matches_torch(case, layout):
    check_unary_against_torch("gelu[none]", case, layout)


@pytest.mark.derivation("ACT.8")
@pytest.mark.derivation("ACT.9")
@given(cases, unary_layouts)
def test_gelu_tanh_matches_torch(case, layout):
    check_unary_against_torch("gelu[tanh]", case, layout)


@pytest.mark.derivation("ACT.11")
@pytest.mark.derivation("ACT.12")
@given(cases, unary_layouts)
def test_silu_matches_torch(case, layout):
    check_unary_against_torch("silu", case, layout)


@pytest.mark.derivation("ACT.14")
@pytest.mark.derivation("ACT.15")
@given(cases, unary_layouts)
def test_mish_matches_torch(case, layout):
    check_unary_against_torch("mish", case, layout)


@pytest.mark.derivation("ACT.16")
@pytest.mark.derivation("ACT.17")
@pytest.mark.derivation("ACT.18")
@given(cases, gated_layouts)
def test_swiglu_matches_torch(case, layout):
    check_gated_against_torch("swiglu", case, layout)


@pytest.mark.derivation("ACT.19")
@pytest.mark.derivation("ACT.20")
@pytest.mark.derivation("ACT.21")
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@given(case=cases, layout=gated_layouts)
def test_geglu_matches_torch(approximate, case, layout):
    check_gated_against_torch(f"geglu[{approximate}]", case, layout)


@pytest.mark.derivation("ACT.5")
def test_relu_kink_gets_zero_gradient_like_torch():
    x = np.array([-1.0, -0.0, 0.0, 1.0])
    dy = np.full(4, 3.0)
    _, cache = relu_forward(x)
    tx = leaf(x)
    (expected,) = backprop(F.relu(tx), dy, tx)
    np.testing.assert_array_equal(relu_backward(dy, cache), expected)
    np.testing.assert_array_equal(relu_backward(dy, cache), [0.0, 0.0, 0.0, 3.0])


@pytest.mark.derivation("ACT.5")
@given(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.0, -1.0, 1e-300]), min_size=1, max_size=8),
       st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 2.0]), min_size=8, max_size=8), DTYPES)
def test_relu_passes_nan_and_inf_as_torch_does(xs, dys, dtype):
    """NaN inputs and inf/NaN upstream gradients travel through ReLU's backward exactly as in torch."""
    x = np.array(xs, dtype)
    dy = np.array(dys[: len(xs)], dtype)
    y, cache = relu_forward(x)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = F.relu(tx)
    ty.backward(torch.from_numpy(dy.copy()))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(y, ty.detach().numpy())
        np.testing.assert_array_equal(relu_backward(dy, cache), tx.grad.numpy())


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
        "relu", "gelu[none]", "gelu[tanh]", "gelu[sigmoid]", "silu", "mish", "swiglu", "geglu[none]", "geglu[tanh]",
    ]
    results = [r for c in cases_ for r in gradcheck.check_case(c)]
    assert all(r.ok for r in results), gradcheck.format_table(results)


# ---------------------------------------------------------------------------
# the equations of the proof
# ---------------------------------------------------------------------------


# Each activation written from its definition in sympy, differentiated by sympy, and evaluated
# elementwise in float64 with the standard library: an f and f' that share nothing with the op.
_T = sp.Symbol("t", real=True)
_KAPPA = sp.Rational(44715, 1000000)
DEFINITIONS = {
    "relu": sp.Max(_T, 0),
    "gelu[none]": _T * (1 + sp.erf(_T / sp.sqrt(2))) / 2,
    "gelu[tanh]": _T / 2 * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (_T + _KAPPA * _T**3))),
    "silu": _T / (1 + sp.exp(-_T)),
    "mish": _T * sp.tanh(sp.log(1 + sp.exp(_T))),
}
_MODULES = [{"Heaviside": lambda t, *_: 1.0 if t > 0 else 0.0}, "math"]


def _elementwise(expr):
    return np.vectorize(sp.lambdify(_T, expr, modules=_MODULES), otypes=[np.float64])


SYMPY_F = {name: _elementwise(expr) for name, expr in DEFINITIONS.items()}
SYMPY_DF = {name: _elementwise(sp.diff(expr, _T)) for name, expr in DEFINITIONS.items()}


@pytest.mark.derivation("ACT.1")
@pytest.mark.parametrize("name", list(UNARY))
@given(case=st.tuples(shapes(0, 3), DTYPES, rngs()))
def test_backward_is_dy_times_elementwise_derivative(name, case):
    """(ACT.1): dx = dy * f'(x), with f' differentiated by sympy from f's definition (ReLU: f'(0) = 0)."""
    forward, backward, options, _ = UNARY[name]
    shape, dtype, rng = case
    x = randn(rng, shape, dtype, 3.0)
    dy = randn(rng, shape, dtype)
    _, cache = forward(x, **options)
    derivative = SYMPY_DF[name](x.astype(np.float64))
    expected = dy.astype(np.float64) * derivative  # (ACT.1)
    assert_close(backward(dy, cache), expected, scale=float(np.abs(expected).max(initial=0.0)) + 1e-30,
                 what=f"{name}: dx vs dy * f'(x)")


@pytest.mark.derivation("ACT.16")
@pytest.mark.derivation("ACT.17")
@pytest.mark.derivation("ACT.18")
@pytest.mark.derivation("ACT.19")
@pytest.mark.derivation("ACT.20")
@pytest.mark.derivation("ACT.21")
@pytest.mark.parametrize("name", list(GATED))
@given(case=st.tuples(shapes(0, 3), DTYPES, rngs()))
def test_gated_backward_is_the_product_rule(name, case):
    """y = f(gate) up, dgate = dy up f'(gate), dup = dy f(gate), with f and f' from sympy, not from the op."""
    forward, backward, options, _ = GATED[name]
    unary = "silu" if name == "swiglu" else f"gelu[{options['approximate']}]"
    shape, dtype, rng = case
    gate, up, dy = (randn(rng, shape, dtype, 3.0) for _ in range(3))
    y, cache = forward(gate, up, **options)
    dgate, dup = backward(dy, cache)
    g64, u64, dy64 = (a.astype(np.float64) for a in (gate, up, dy))
    f, df = SYMPY_F[unary](g64), SYMPY_DF[unary](g64)
    expected = {
        "y": f * u64,  # (ACT.16), (ACT.19)
        "dgate": dy64 * u64 * df,  # (ACT.17), (ACT.20)
        "dup": dy64 * f,  # (ACT.18), (ACT.21)
    }
    for what, ours in (("y", y), ("dgate", dgate), ("dup", dup)):
        assert ours.dtype == dtype
        assert_close(ours, expected[what], scale=float(np.abs(expected[what]).max()) + 1e-30, what=f"{name} {what}")


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


@given(st.floats(-40.0, 40.0, width=32) | st.sampled_from([-np.inf, np.inf, 1.5, -1.5, 0.0, -0.0]), DTYPES)
def test_erf_of_a_0d_array_is_a_0d_array(value, dtype):
    """erf and erfc of a 0-d array: a 0-d array of its dtype, the value the same entry has in a 1-d array."""
    x = np.asarray(value, dtype)
    for f in (erf, erfc):
        out = f(x)
        assert type(out) is np.ndarray and out.shape == () and out.dtype == dtype
        np.testing.assert_array_equal(out, f(x.reshape(1))[0])


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
# empty input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNARY) + list(GATED))
@given(dtype=DTYPES, shape=shapes(1, 3).map(lambda s: (0,) + s[1:]))
def test_empty_in_empty_out(name, dtype, shape):
    x = np.zeros(shape, dtype)
    if name in UNARY:
        forward, backward, options, _ = UNARY[name]
        y, cache = forward(x, **options)
        grads = (backward(x.copy(), cache),)
    else:
        forward, backward, options, _ = GATED[name]
        y, cache = forward(x, x.copy(), **options)
        grads = backward(x.copy(), cache)
    for a in (y, *grads):
        assert a.shape == shape and a.dtype == dtype
    for f in (erf, erfc):
        assert f(x).shape == shape


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
X_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS
BAD_APPROXIMATIONS = ("fast", "TANH", "", None, 1, True, ("tanh",), np.array(["tanh"]))


def bad(x, kind):
    """``x`` made wrong by ``kind``: a kind of tests/badinput.py, or "other float" (the other float dtype)."""
    if kind == "other float":
        return x.astype(np.float32 if x.dtype == np.float64 else np.float64)
    return corrupt(x, kind)


arrays = st.tuples(shapes(1, 3), DTYPES, rngs()).map(lambda c: randn(c[2], c[0], c[1]))


@pytest.mark.parametrize("name", list(UNARY) + ["erf", "erfc"])
@given(kind=st.sampled_from(X_KINDS), x=arrays)
def test_unary_forward_rejects_bad_x(name, kind, x):
    if name in UNARY:
        forward, _, options, _ = UNARY[name]
        call, func = (lambda: forward(bad(x, kind), **options)), forward.__name__
    else:
        call, func = (lambda: {"erf": erf, "erfc": erfc}[name](bad(x, kind))), name
    expect_rejected(call, func, "x")


@pytest.mark.parametrize("name", list(GATED))
@pytest.mark.parametrize("arg, kinds", [("gate", X_KINDS), ("up", EXACT_KINDS)])
@given(data=st.data(), x=arrays)
def test_gated_forward_rejects_bad_arrays(name, arg, kinds, data, x):
    """gate must be a float array; up must match it exactly (shape and dtype: no broadcasting, no promotion)."""
    forward, _, options, _ = GATED[name]
    inputs = {"gate": x, "up": x[::-1].copy()}
    inputs[arg] = bad(inputs[arg], data.draw(st.sampled_from(kinds), label="kind"))
    expect_rejected(lambda: forward(inputs["gate"], inputs["up"], **options), forward.__name__, arg)


@pytest.mark.parametrize("forward", [gelu_forward, geglu_forward])
@given(approximate=st.sampled_from(BAD_APPROXIMATIONS), x=arrays)
def test_forward_rejects_bad_approximate(forward, approximate, x):
    args = (x,) if forward is gelu_forward else (x, x)
    expect_rejected(lambda: forward(*args, approximate=approximate), forward.__name__, "approximate")


def _forward_and_backward(name):
    if name in UNARY:
        forward, backward, options, _ = UNARY[name]
        return (lambda x: forward(x, **options)), backward
    forward, backward, options, _ = GATED[name]
    return (lambda x: forward(x, x[::-1].copy(), **options)), backward


@pytest.mark.parametrize("name", list(UNARY) + list(GATED))
@given(kind=st.sampled_from(EXACT_KINDS), x=arrays)
def test_backward_rejects_bad_dy(name, kind, x):
    """dy must be a float array of the forward input's shape and dtype (an integer dy is refused, not cast)."""
    forward, backward = _forward_and_backward(name)
    _, cache = forward(x)
    bad_dy = bad(x.copy(), kind)
    expect_rejected(lambda: backward(bad_dy, cache), backward.__name__, "dy")


@pytest.mark.parametrize("name", list(UNARY) + list(GATED))
@given(kind=st.sampled_from(["tuple", "none", "other op"]), x=arrays)
def test_backward_rejects_a_cache_it_did_not_make(name, kind, x):
    forward, backward = _forward_and_backward(name)
    _, cache = forward(x)
    other = relu_forward(x)[1] if backward is not relu_backward else silu_forward(x)[1]
    wrong = {"tuple": tuple(cache), "none": None, "other op": other}[kind]
    expect_rejected(lambda: backward(x, wrong), backward.__name__, "cache")


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
         "gelu_forward: argument 'approximate' expected 'none', 'tanh' or 'sigmoid', got 'fast'"),
        (lambda: geglu_forward(np.ones(3), np.ones(3), approximate=None),
         "geglu_forward: argument 'approximate' expected 'none' or 'tanh', got None"),
        (lambda: relu_forward([1.0, -1.0]), "relu_forward: argument 'x' expected a numpy.ndarray, got list"),
        (lambda: erf(np.ones(2, np.int64)), "erf: argument 'x' expected dtype float32 or float64, got int64"),
        (lambda: gelu_backward(np.ones(3, np.int64), gelu_forward(np.ones(3))[1]),
         "gelu_backward: argument 'dy' expected dtype float32 or float64, got int64"),
        (lambda: silu_backward(np.ones(3, np.float32), silu_forward(np.ones(3))[1]),
         "silu_backward: argument 'dy' expected dtype float64 (same as 'x'), got float32"),
        (lambda: mish_backward(np.ones(4), mish_forward(np.ones(3))[1]),
         "mish_backward: argument 'dy' expected shape (3,), got (4,)"),
    ],
)
def test_messages_say_what_was_expected_and_what_came(call, message):
    func, arg = message.split(":")[0], message.split("'")[1]
    assert message in expect_rejected(call, func, arg)
