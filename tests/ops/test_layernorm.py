"""LayerNorm: torch oracle in every memory layout, finite differences, the equations of
proofs/layernorm.md evaluated independently, float32 rows far from zero, huge rows,
empty input, bad input."""

from fractions import Fraction

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from npformer.ops.rmsnorm import rmsnorm_forward
from tests.badinput import (
    EXACT_KINDS,
    ROW_KINDS,
    corrupt,
    expect_rejected,
)
from tests.oracle import backprop, leaf
from tests.ops.huge_rows import assert_rstd_exact, exact, exact_dx, huge_rows, overflows, rows_with_large_entries
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, NORM_ULPS, RTOL, assert_close

EPS = 1e-5
INPUTS = ("x", "gamma", "beta", "dy")


def make(rng, shape, dtype, scale=1.0):
    D = shape[-1]
    x = randn(rng, shape, dtype, scale) + dtype(scale * rng.standard_normal())  # a row offset too
    gamma = randn(rng, (D,), dtype)
    beta = randn(rng, (D,), dtype)
    dy = randn(rng, shape, dtype)
    return x, gamma, beta, dy


def reference(x, gamma, beta, dy, eps=EPS):
    """(LN.1)-(LN.5) and (LN.8)-(LN.10) written out in float64 from the proof, independently of the op."""
    x, gamma, beta, dy = (np.asarray(a, np.float64) for a in (x, gamma, beta, dy))
    mu = x.mean(-1, keepdims=True)  # (LN.1)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # (LN.2)
    r = 1.0 / np.sqrt(var + eps)  # (LN.3)
    xhat = (x - mu) * r  # (LN.4)
    y = gamma * xhat + beta  # (LN.5)
    g = dy * gamma  # (LN.8)
    dx = r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))  # (LN.10)
    return {"y": y, "xhat": xhat, "r": r, "g": g, "dx": dx}


def run_both(x, gamma, beta, dy, layout=None):
    """npformer forward+backward (inputs in the given layouts), and the float64 torch oracle on the same values."""
    layout = layout or dict.fromkeys(INPUTS, "contiguous")
    args = {name: in_layout(a, layout[name]) for name, a in zip(INPUTS, (x, gamma, beta, dy))}
    saved = {name: a.copy() for name, a in args.items()}
    y, cache = layernorm_forward(args["x"], args["gamma"], args["beta"], EPS)
    grads = layernorm_backward(args["dy"], cache)
    for name, a in args.items():
        np.testing.assert_array_equal(a, saved[name], err_msg=f"{name} was written to")
    tx, tg, tb = leaf(x), leaf(gamma), leaf(beta)
    ty = torch.nn.functional.layer_norm(tx, (x.shape[-1],), tg, tb, EPS)
    return (y, *grads), (ty.detach().numpy(), *backprop(ty, dy, tx, tg, tb))


def term_scales(x, gamma, beta, dy):
    """Size of the terms each result is summed from: round-off is relative to these.

    (For D = 1 every gradient but dbeta is zero in exact arithmetic, and only this
    scale says how small "zero" has to be.)
    """
    x64 = x.astype(np.float64)
    rstd = 1 / np.sqrt(x64.var(-1, keepdims=True) + EPS)
    dy_abs = np.abs(dy.astype(np.float64))
    xhat_abs = np.abs(x64 - x64.mean(-1, keepdims=True)) * rstd
    return {
        "y": float(np.abs(gamma).max() * xhat_abs.max() + np.abs(beta).max()),
        "dx": float((rstd * dy_abs * np.abs(gamma)).max() * 3),
        "dgamma": float(dy_abs.sum(axis=tuple(range(dy.ndim - 1))).max() * 3),
        "dbeta": float(dy_abs.sum(axis=tuple(range(dy.ndim - 1))).max()),
    }


# Values up to 1e3 in float64; float32 keeps moderate magnitudes here (far from zero: test_float32_rows_far_from_zero).
cases = st.tuples(shapes(1, 3), DTYPES, SCALES, rngs()).filter(lambda c: c[1] == np.float64 or c[2] <= 30)
input_layouts = st.fixed_dictionaries({name: layouts() for name in INPUTS})


@pytest.mark.derivation("LN.5")
@given(cases, input_layouts)
def test_layernorm_matches_torch(case, layout):
    """Every input (dy included) in every memory layout: same values, inputs left unchanged."""
    shape, dtype, scale, rng = case
    inputs = make(rng, shape, dtype, scale)
    ours, oracle = run_both(*inputs, layout=layout)
    scales = term_scales(*inputs)
    for name, a, b in zip(("y", "dx", "dgamma", "dbeta"), ours, oracle):
        assert a.dtype == dtype, name
        assert_close(a, b, scale=scales[name], what=name)


@pytest.mark.derivation("LN.6")
@given(shapes(1, 3), rngs())
def test_dbeta_is_row_sum(shape, rng):
    x, gamma, beta, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, gamma, beta, dy)
    assert_close(ours[3], oracle[3], what="dbeta vs torch")
    assert_close(ours[3], dy.reshape(-1, shape[-1]).sum(0), what="dbeta vs (LN.6)")


@pytest.mark.derivation("LN.7")
@given(shapes(1, 3), rngs())
def test_dgamma_formula(shape, rng):
    x, gamma, beta, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, gamma, beta, dy)
    xhat = reference(x, gamma, beta, dy)["xhat"]
    scale = term_scales(x, gamma, beta, dy)["dgamma"]
    assert_close(ours[2], oracle[2], scale=scale, what="dgamma vs torch")
    assert_close(ours[2], (dy * xhat).reshape(-1, shape[-1]).sum(0), scale=scale, what="dgamma vs (LN.7)")


def _symbolic_row(D):
    x = sp.symbols(f"x0:{D}", real=True)
    eps = sp.Symbol("epsilon", positive=True)
    mu = sum(x) / D  # (LN.1)
    var = sum((xi - mu) ** 2 for xi in x) / D  # (LN.2)
    r = 1 / sp.sqrt(var + eps)  # (LN.3)
    xhat = [(xi - mu) * r for xi in x]  # (LN.4)
    return x, eps, r, xhat


@pytest.mark.derivation("LN.9")
def test_jacobian_symbolic():
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    for i in range(D):
        for j in range(D):
            autodiff = sp.diff(xhat[i], x[j])
            claimed = r / D * (D * sp.KroneckerDelta(i, j) - 1 - xhat[i] * xhat[j])  # (LN.9)
            assert sp.simplify(autodiff - claimed) == 0, (i, j)


@pytest.mark.derivation("LN.10")
def test_dx_formula_symbolic():
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    g = sp.symbols(f"g0:{D}", real=True)  # upstream gradient d L / d xhat
    for j in range(D):
        chain = sum(g[i] * sp.diff(xhat[i], x[j]) for i in range(D))
        claimed = r * (g[j] - sum(g) / D - xhat[j] * sum(gi * xi for gi, xi in zip(g, xhat)) / D)  # (LN.10)
        assert sp.simplify(chain - claimed) == 0, j


@pytest.mark.derivation("LN.11")
def test_dx_invariances_symbolic():
    """From (LN.10): sum_j dx_j = 0 and sum_j dx_j xhat_j = eps r^3 sum_i g_i xhat_i."""
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    g = sp.symbols(f"g0:{D}", real=True)
    dx = [r * (g[j] - sum(g) / D - xhat[j] * sum(gi * xi for gi, xi in zip(g, xhat)) / D) for j in range(D)]
    assert sp.simplify(sum(dx)) == 0
    along = sum(d * xh for d, xh in zip(dx, xhat)) - eps * r**3 * sum(gi * xi for gi, xi in zip(g, xhat))
    assert sp.simplify(along) == 0  # (LN.11)


@pytest.mark.derivation("LN.10")
@given(shapes(1, 3), st.sampled_from([EPS, 1e-2, 1.0]), rngs())
def test_dx_formula(shape, eps, rng):
    """(LN.10) evaluated in float64 from x itself agrees with torch autograd, and the op agrees with it."""
    x, gamma, beta, dy = make(rng, shape, np.float64)
    formula = reference(x, gamma, beta, dy, eps)["dx"]
    tx = leaf(x)
    ty = torch.nn.functional.layer_norm(tx, (shape[-1],), leaf(gamma, grad=False), leaf(beta, grad=False), eps)
    (autograd,) = backprop(ty, dy, tx)
    _, cache = layernorm_forward(x, gamma, beta, eps)
    dx, _, _ = layernorm_backward(dy, cache)
    scale = float((reference(x, gamma, beta, dy, eps)["r"] * np.abs(dy * gamma)).max() * 3)
    assert_close(formula, autograd, scale=scale, what="(LN.10) vs torch autograd")
    assert_close(dx, formula, scale=scale, what="dx vs (LN.10)")


@pytest.mark.derivation("LN.11")
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5, 8])), st.sampled_from([0.0, EPS, 1e-2, 1.0]), rngs())
def test_dx_invariances(shape, eps, rng):
    """Each row of dx sums to zero, and its component along xhat is eps r^3 <dxhat, xhat> (LN.11)."""
    x, gamma, beta, dy = make(rng, shape, np.float64)
    ref = reference(x, gamma, beta, dy, eps)
    _, cache = layernorm_forward(x, gamma, beta, eps=eps)
    dx, _, _ = layernorm_backward(dy, cache)
    # Round-off is set by the terms that cancel in (LN.10): r * |dxhat| per entry, D of them per row.
    scale = float((ref["r"] * np.abs(ref["g"])).max() * shape[-1])
    assert_close(dx.sum(-1), np.zeros(shape[:-1]), scale=scale, what="row sums of dx")
    eps_term = eps * ref["r"][..., 0] ** 3 * (ref["g"] * ref["xhat"]).sum(-1)  # (LN.11)
    assert_close((dx * ref["xhat"]).sum(-1), eps_term, scale=scale, what="<dx, xhat> vs eps r^3 <dxhat, xhat>")


# D >= 3: for D <= 2 the normalised row is constant up to eps and its gradient is round-off.
@given(shapes(1, 3, sides=st.sampled_from([3, 5, 8])), rngs())
def test_finite_differences(shape, rng):
    x, gamma, beta, _ = make(rng, shape, np.float64)
    results = gradcheck.check(layernorm_forward, layernorm_backward, {"x": x, "gamma": gamma, "beta": beta},
                              wrt=("x", "gamma", "beta"), options={"eps": EPS})
    assert [r.input for r in results] == ["x", "gamma", "beta"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


# ---- floating point: rows far from zero, constant rows, huge rows ------------------------

OFFSETS = st.sampled_from([0.0, 1.0, -3e2, 1e3, 1000.1, -1e4, 10000.3, 1e5, -1e6, 1e6])
SPREADS = st.sampled_from([0.0, 1e-6, 1e-3, 1e-2, 0.1, 1.0, 30.0])


@pytest.mark.derivation("LN.12")
@given(st.sampled_from([1, 2, 3, 7, 64, 768]), st.sampled_from([1, 2, 3]), OFFSETS, SPREADS,
       st.sampled_from([EPS, 1e-6, 1e-12]), rngs())
def test_float32_rows_far_from_zero(D, rows, offset, spread, eps, rng):
    """float32 rows offset + spread * noise against the float64 formula on the same float32 values.

    The error is judged by the size of y (|gamma| |xhat| + |beta|), not by the size of x.
    """
    x = (offset + spread * rng.standard_normal((rows, D))).astype(np.float32)
    gamma = randn(rng, (D,), np.float32)
    beta = randn(rng, (D,), np.float32)
    dy = randn(rng, (rows, D), np.float32)
    y, cache = layernorm_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = layernorm_backward(dy, cache)
    ref = reference(x, gamma, beta, dy, eps)
    y_scale = float(np.abs(gamma).max() * np.abs(ref["xhat"]).max() + np.abs(beta).max())
    assert_close(y, ref["y"], scale=y_scale, what="y")
    assert_close(cache.xhat, ref["xhat"], scale=max(float(np.abs(ref["xhat"]).max()), 1.0), what="xhat")
    dx_scale = float((ref["r"] * np.abs(ref["g"])).max() * 3)
    assert_close(dx, ref["dx"], scale=dx_scale, what="dx")
    assert_close(dgamma, (dy * ref["xhat"]).sum(0), scale=float(np.abs(dy).sum(0).max() * 3), what="dgamma")


CONSTANTS = st.one_of(st.sampled_from([1000.1, 10000.3, -77.7, 3.3e5, 1e30]),
                      st.floats(allow_nan=False, allow_infinity=False, width=32))


@pytest.mark.derivation("LN.12")
@given(DTYPES, st.sampled_from([1, 2, 3]), st.sampled_from([1, 3, 7, 64, 768]), CONSTANTS, rngs())
def test_constant_rows_give_beta(dtype, rows, D, value, rng):
    """A constant row, at any offset, is centred exactly: xhat = 0 and y = beta to the last bit."""
    shape = (rows, D)
    x = np.full(shape, value, dtype)
    gamma, beta = randn(rng, shape[-1:], dtype), randn(rng, shape[-1:], dtype)
    y, cache = layernorm_forward(x, gamma, beta, EPS)
    assert np.all(cache.xhat == 0)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, shape))


def _power_of_two_below(a):
    return 2.0 ** np.floor(np.log2(a))


@pytest.mark.derivation("LN.13")
@given(DTYPES, st.sampled_from([1, 2, 3, 7]), st.sampled_from([1e15, 1e20, 1e30, 1e36, 3e38, 1e150, 1e300]),
       st.sampled_from([0.0, 1e-3, 1.0]), rngs())
def test_huge_rows_are_scaled(dtype, D, magnitude, relative_offset, rng):
    """Rows whose squares overflow give the same xhat, y and dx as the formula on x / 2^k (k exact)."""
    limit = float(np.finfo(dtype).max)
    magnitude = min(magnitude, limit / 4)
    x = magnitude * (relative_offset * 8 + rng.uniform(-1, 1, (2, D)))
    x = np.clip(x, -limit, limit).astype(dtype)
    x[1] = x[0, ::-1]  # a second row with the same entries in another order
    gamma, beta, dy = randn(rng, (D,), dtype), randn(rng, (D,), dtype), randn(rng, (2, D), dtype)
    y, cache = layernorm_forward(x, gamma, beta, EPS)
    dx, _, _ = layernorm_backward(dy, cache)
    # An exact power-of-two scale brings the row into range without rounding; eps scales with it squared.
    s = _power_of_two_below(np.abs(x.astype(np.float64)).max(-1, keepdims=True))
    z = x.astype(np.float64) / s
    ref = reference(z, gamma, beta, dy, EPS / s / s)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_close(y, ref["y"], scale=float(np.abs(gamma).max() * np.abs(ref["xhat"]).max() + np.abs(beta).max()),
                 what="y")
    rtol = RTOL[np.dtype(dtype)]
    assert_close(cache.rstd * s, ref["r"], rtol=rtol, what="rstd * s")  # r(x) = r(z) / s
    assert_close(dx * s, ref["dx"], rtol=rtol, scale=float((ref["r"] * np.abs(ref["g"])).max() * 3), what="dx * s")


@pytest.mark.derivation("LN.13")
@given(huge_rows(), st.sampled_from([EPS, 1.0]), rngs())
@example((np.float32(1e25) + np.array([[0, 1e20, 2e20, 3e20]] * 2, np.float32), 1e5), EPS, np.random.default_rng(0))
@example((1e170 + 1e160 * np.array([[0.0, 1, 2, 3]] * 2), 1e10), EPS, np.random.default_rng(0))
def test_huge_rows_far_from_zero(case, eps, rng):
    """Rows whose variance overflows, at offsets up to 10^7 (float32) or 10^15 (float64) times their
    spread, against (LN.1)-(LN.5) in exact rational arithmetic, judged by the size of y.

    Scaling such a row by max|x| before centring rounds it relative to its offset and loses
    the spread (x = 1e25 + 1e20 k in float32 was off by 1.5e-3).
    """
    x, _ = case
    assert overflows(x, centre=True).all()  # every row takes the (LN.13) path
    D, dtype = x.shape[-1], x.dtype
    gamma, beta, dy = randn(rng, (D,), dtype), randn(rng, (D,), dtype), randn(rng, x.shape, dtype)
    y, cache = layernorm_forward(x, gamma, beta, eps)
    dx, _, _ = layernorm_backward(dy, cache)
    xhat, r = exact(x, eps, centre=True)
    y_exact = gamma.astype(np.float64) * xhat + beta
    y_scale = float(np.abs(gamma).max() * np.abs(xhat).max() + np.abs(beta).max())
    assert_close(y, y_exact, scale=y_scale, what="y")
    assert_close(cache.xhat, xhat, scale=1.0, what="xhat")
    assert_close(cache.rstd, r, what="rstd")
    g = dy.astype(np.float64) * gamma  # (LN.8)
    dx_exact = r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))  # (LN.10)
    assert_close(dx, dx_exact, scale=float((r * np.abs(g)).max() * 3), what="dx")


# ---- the forward's statistics, (LN.1)-(LN.4), and (LN.8) ----------------------------------------


def exact_moments(x):
    """x - mu and sigma^2 of every row, (LN.1) and (LN.2) as written, with every sum taken exactly
    (rational arithmetic on the exact values of x) and only the results rounded to float64.

    A float64 mean of a row far from zero is itself rounded relative to the offset (10^6 for a
    spread of 10^-6 is ten orders of magnitude), so only an exact sum can judge x - mu by the spread.
    """
    x = np.asarray(x, np.float64)  # exact for float32 and float64 input
    dev, var = np.empty_like(x), np.empty(x.shape[:-1] + (1,))
    for i in np.ndindex(x.shape[:-1]):
        row = [Fraction(float(v)) for v in x[i]]
        mu = sum(row) / len(row)  # (LN.1)
        dev[i] = [float(v - mu) for v in row]
        var[i] = float(sum((v - mu) ** 2 for v in row) / len(row))  # (LN.2)
    return dev, var


@st.composite
def offset_rows(draw):
    """(x, gamma, beta, eps): rows offset + spread * noise of drawn shape and dtype, offsets far from zero included."""
    dtype = draw(DTYPES)
    shape = draw(shapes(1, 2, sides=st.sampled_from([1, 2, 3]))) + (draw(st.sampled_from([1, 2, 3, 7, 64, 768])),)
    offset, spread, eps, rng = draw(OFFSETS), draw(SPREADS), draw(st.sampled_from([EPS, 1e-2, 1.0])), draw(rngs())
    x = (offset + spread * rng.standard_normal(shape)).astype(dtype)
    return x, randn(rng, shape[-1:], dtype), randn(rng, shape[-1:], dtype), eps


def assert_rows_close(actual, expected, row_scale, dtype, what):
    """assert_close row by row, each row judged by its own scale (rows of one draw differ in spread)."""
    for i in np.ndindex(actual.shape[:-1]):
        assert_close(actual[i], expected[i], rtol=RTOL[np.dtype(dtype)], scale=float(row_scale[i]),
                     what=f"{what}, row {i}")


@pytest.mark.derivation("LN.1")
@given(offset_rows())
def test_mean_formula(case):
    """The deviations the forward normalised, xhat / r from the cache, are x - mu with mu the mean of (LN.1),
    judged by the row's spread max|x - mu| (a constant row: exactly 0). A float32 mean taken directly is
    off by about one unit in the last place of the offset, far beyond this tolerance for a row at 10^4."""
    x, gamma, beta, eps = case
    _, cache = layernorm_forward(x, gamma, beta, eps)
    dev, _ = exact_moments(x)
    assert cache.xhat.dtype == cache.rstd.dtype == x.dtype
    seen = cache.xhat.astype(np.float64) / cache.rstd.astype(np.float64)  # (LN.4) solved for x - mu
    assert_rows_close(seen, dev, np.abs(dev).max(-1), x.dtype, "x - mu")


@pytest.mark.derivation("LN.2")
@given(offset_rows())
def test_variance_formula(case):
    """The variance behind the cached r, 1 / r^2 - eps by (LN.3) solved for sigma^2, is the mean squared
    deviation of (LN.2), judged by sigma^2 + eps (the size r is computed from)."""
    x, gamma, beta, eps = case
    _, cache = layernorm_forward(x, gamma, beta, eps)
    _, var = exact_moments(x)
    seen = 1.0 / cache.rstd.astype(np.float64) ** 2 - eps  # (LN.3) solved for sigma^2
    assert_rows_close(seen, var, (var + eps)[..., 0], x.dtype, "sigma^2")


@pytest.mark.derivation("LN.3")
@given(offset_rows())
def test_rstd_formula(case):
    """cache.rstd is r = (sigma^2 + eps)^(-1/2) of (LN.3), every entry to the dtype's relative tolerance."""
    x, gamma, beta, eps = case
    _, cache = layernorm_forward(x, gamma, beta, eps)
    _, var = exact_moments(x)
    r = 1.0 / np.sqrt(var + eps)  # (LN.3)
    assert cache.rstd.shape == x.shape[:-1] + (1,) and cache.rstd.dtype == x.dtype
    assert_close(cache.rstd, r, scale=float(r.min()), what="r")  # each entry relative to at least its own size


@pytest.mark.derivation("LN.2")
@given(DTYPES, shapes(0, 1, sides=st.sampled_from([1, 2])), st.sampled_from([2, 7, 768, 4096, 16384]),
       st.sampled_from([2.0**-3, 1.0, 2.0**10]), st.sampled_from([0.0, EPS]), rngs())
def test_rstd_to_a_few_rounding_units_with_one_large_entry(dtype, lead, D, scale, eps, rng):
    """cache.rstd against (LN.1)-(LN.3) in exact rational arithmetic, within a few units of the dtype's rounding
    of itself. The rows are two entries +scale and -scale early in the row (the mean stays near zero) among
    entries whose squares are each below half a unit of scale^2. Summed with a long-running total that holds a
    large square (each lane of a dot product), every small square after it is rounded away and r is off by
    about D / 100 units; summed pairwise (np.mean), by a few at any D."""
    x = rows_with_large_entries(rng, lead + (D,), dtype, scale, (scale, -scale))
    _, cache = layernorm_forward(x, randn(rng, (D,), dtype), randn(rng, (D,), dtype), eps)
    assert_rstd_exact(cache.rstd, x, eps, centre=True)  # (LN.1)-(LN.3), the sums in rational arithmetic


@pytest.mark.derivation("LN.4")
@given(offset_rows())
def test_xhat_formula(case):
    """cache.xhat is (x - mu) r of (LN.4), with x - mu and r from (LN.1)-(LN.3) in exact sums, each row judged
    by its own largest entry (a constant row: exactly 0)."""
    x, gamma, beta, eps = case
    _, cache = layernorm_forward(x, gamma, beta, eps)
    dev, var = exact_moments(x)
    xhat = dev / np.sqrt(var + eps)  # (LN.4)
    assert cache.xhat.shape == x.shape and cache.xhat.dtype == x.dtype
    assert_rows_close(cache.xhat, xhat, np.abs(xhat).max(-1), x.dtype, "xhat")


@pytest.mark.derivation("LN.8")
@given(shapes(1, 3), DTYPES, rngs())
def test_dxhat_is_dy_times_gamma(shape, dtype, rng):
    """(LN.8) itself: the gradient of L = <dy, gamma * xhat + beta> with respect to xhat, by central differences
    in float64, is dy * gamma. And in the op: the backward sees dy and gamma only through that product, so
    (dy, gamma) and (dy * gamma, ones) give the same dx, bit for bit."""
    x, gamma, beta, dy = make(rng, shape, dtype)
    xhat64 = rng.standard_normal(shape)
    dy64, gamma64, beta64 = (a.astype(np.float64) for a in (dy, gamma, beta))
    numeric = gradcheck.numerical_gradient(lambda: float(np.sum(dy64 * (gamma64 * xhat64 + beta64))), xhat64)  # (LN.5)
    assert_close(numeric, dy64 * gamma64, rtol=FD_RTOL, what="dL/dxhat by central differences vs (LN.8)")
    _, cache = layernorm_forward(x, gamma, beta, EPS)
    dx, _, _ = layernorm_backward(dy, cache)
    dx_folded, _, _ = layernorm_backward(dy * gamma, cache._replace(gamma=np.ones_like(gamma)))
    np.testing.assert_array_equal(dx, dx_folded)


@pytest.mark.derivation("LN.10")
@given(DTYPES, shapes(0, 1, sides=st.sampled_from([1, 2, 3])), st.sampled_from([1, 2, 3, 7, 33, 64, 384, 768]),
       SCALES, st.sampled_from([EPS, 1e-2, 1.0]), rngs())
def test_dx_to_a_few_rounding_units(dtype, lead, D, scale, eps, rng):
    """dx from the op's own cache against (LN.10) in exact arithmetic, each row judged by its own r max|dxhat|
    (the size of the terms that cancel): a few units of the dtype's rounding, where the torch comparison
    allows 1e-4 (float32) and 1e-10 (float64) of that size. The two row means of (LN.10) are sums of D
    terms: summed in a poor order, or in a narrower type, they lose digits that this test sees."""
    x, gamma, beta, dy = make(rng, lead + (D,), dtype, scale)
    _, cache = layernorm_forward(x, gamma, beta, eps)
    dx, _, _ = layernorm_backward(dy, cache)
    expected = exact_dx(dy, gamma, cache.xhat, cache.rstd)
    rtol = NORM_ULPS * float(np.finfo(dtype).eps)
    row_scale = cache.rstd[..., 0].astype(np.float64) * np.abs(dy.astype(np.float64) * gamma).max(-1)
    assert dx.dtype == dtype
    for i in np.ndindex(dx.shape[:-1]):
        assert_close(dx[i], expected[i], rtol=rtol, scale=float(row_scale[i]), what=f"dx, row {i}")


# ---- empty input ---------------------------------------------------------------------------


@given(DTYPES, shapes(0, 2), st.sampled_from([1, 3, 8]))
def test_no_rows_gives_empty_output_and_zero_parameter_gradients(dtype, lead, D):
    shape = (0,) + lead + (D,)
    x = np.zeros(shape, dtype)
    gamma, beta = np.ones(D, dtype), np.zeros(D, dtype)
    y, cache = layernorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = layernorm_backward(np.zeros(shape, dtype), cache)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(dgamma, np.zeros(D, dtype))
    np.testing.assert_array_equal(dbeta, np.zeros(D, dtype))


# ---- bad input -------------------------------------------------------------------------------

# gamma, beta and dy have exactly one right shape and dtype; x may have any leading shape.
X_KINDS = ROW_KINDS
BAD_EPS = (-1e-5, -1.0, float("nan"), float("inf"), -float("inf"), "1e-5", None, True, [1e-5])


bad = corrupt  # every kind, the norms' own ("other float", "0-d", "D = 0") included


def valid_inputs(shape, dtype, rng):
    x, gamma, beta, dy = make(rng, shape, dtype)
    return {"x": x, "gamma": gamma, "beta": beta, "dy": dy}


@pytest.mark.parametrize("arg, kinds", [("x", X_KINDS), ("gamma", EXACT_KINDS), ("beta", EXACT_KINDS)])
@given(data=st.data(), shape=shapes(1, 3), dtype=DTYPES, rng=rngs())
def test_forward_rejects_bad_arrays(arg, kinds, data, shape, dtype, rng):
    inputs = valid_inputs(shape, dtype, rng)
    inputs[arg] = bad(inputs[arg], data.draw(st.sampled_from(kinds), label="kind"))
    expect_rejected(lambda: layernorm_forward(inputs["x"], inputs["gamma"], inputs["beta"]), "layernorm_forward", arg)


@given(st.sampled_from(BAD_EPS), shapes(1, 2), rngs())
def test_forward_rejects_bad_eps(eps, shape, rng):
    inputs = valid_inputs(shape, np.float64, rng)
    message = expect_rejected(lambda: layernorm_forward(inputs["x"], inputs["gamma"], inputs["beta"], eps),
                              "layernorm_forward", "eps")
    assert "finite real number in [0.0, inf)" in message


@given(st.sampled_from(EXACT_KINDS), shapes(1, 3), DTYPES, rngs())
def test_backward_rejects_bad_dy(kind, shape, dtype, rng):
    """dy must match the cache: a float array of x's shape and dtype (an integer dy is refused, not cast)."""
    inputs = valid_inputs(shape, dtype, rng)
    _, cache = layernorm_forward(inputs["x"], inputs["gamma"], inputs["beta"])
    bad_dy = bad(inputs["dy"], kind)
    expect_rejected(lambda: layernorm_backward(bad_dy, cache), "layernorm_backward", "dy")


@given(st.sampled_from(["tuple", "none", "other op"]), shapes(1, 2), rngs())
def test_backward_rejects_a_cache_it_did_not_make(kind, shape, rng):
    inputs = valid_inputs(shape, np.float64, rng)
    _, cache = layernorm_forward(inputs["x"], inputs["gamma"], inputs["beta"])
    wrong = {"tuple": tuple(cache), "none": None, "other op": rmsnorm_forward(inputs["x"], inputs["gamma"])[1]}[kind]
    expect_rejected(lambda: layernorm_backward(inputs["dy"], wrong), "layernorm_backward", "cache")
    assert isinstance(cache, LayerNormCache)


def test_messages_say_what_was_expected_and_what_came():
    x, w = np.ones((2, 4)), np.ones(4)
    cases = [
        ((x, np.ones(3), w), "layernorm_forward: argument 'gamma' expected shape (4,), got (3,)"),
        ((x, w, np.ones((1, 4))), "layernorm_forward: argument 'beta' expected shape (4,), got (1, 4)"),
        ((x.astype(np.int64), w, w), "layernorm_forward: argument 'x' expected dtype float32 or float64, got int64"),
        ((x.astype(np.float32), w, w), "argument 'gamma' expected dtype float32 (same as 'x'), got float64"),
        ((np.ones(()), w, w), "argument 'x' expected at least 1 dimensions, got 0"),
        (([1.0, 2.0], w[:2], w[:2]), "argument 'x' expected a numpy.ndarray, got list"),
        ((x, [1.0] * 4, w), "argument 'gamma' expected a numpy.ndarray, got list"),
        ((np.ones((2, 0)), np.ones(0), np.ones(0)), "argument 'x' expected at least one entry on the last axis"),
    ]
    for args, message in cases:
        assert message in expect_rejected(lambda: layernorm_forward(*args), "layernorm_forward", message.split("'")[1])
    _, cache = layernorm_forward(x, w, w)
    message = expect_rejected(lambda: layernorm_backward(np.ones(4), cache), "layernorm_backward", "dy")
    assert "argument 'dy' expected shape (2, 4), got (4,)" in message
    message = expect_rejected(lambda: layernorm_backward(np.ones((2, 4), np.int64), cache), "layernorm_backward", "dy")
    assert "argument 'dy' expected dtype float32 or float64, got int64" in message
