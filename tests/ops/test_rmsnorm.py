"""RMSNorm: torch oracle in every memory layout, finite differences, the equations of
proofs/rmsnorm.md evaluated independently, float32 rows far from zero, huge rows,
empty input, bad input."""

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.layernorm import layernorm_forward
from npformer.ops.rmsnorm import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from tests.badinput import (
    EXACT_KINDS,
    ROW_KINDS,
    corrupt,
    expect_rejected,
)
from tests.oracle import backprop, leaf
from tests.ops.huge_rows import assert_rstd_exact, exact, huge_rows, overflows, rows_with_large_entries
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, RTOL, assert_close

EPS = 1e-6
INPUTS = ("x", "gamma", "dy")


def make(rng, shape, dtype, scale=1.0):
    return randn(rng, shape, dtype, scale), randn(rng, shape[-1:], dtype), randn(rng, shape, dtype)


def reference(x, gamma, dy, eps=EPS):
    """(RMS.1)-(RMS.4), (RMS.6) and (RMS.8) written out in float64 from the proof, independently of the op."""
    x, gamma, dy = (np.asarray(a, np.float64) for a in (x, gamma, dy))
    m = (x * x).mean(-1, keepdims=True)  # (RMS.1)
    r = 1.0 / np.sqrt(m + eps)  # (RMS.2)
    xhat = x * r  # (RMS.3)
    g = dy * gamma  # (RMS.6)
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdims=True))  # (RMS.8)
    return {"y": gamma * xhat, "xhat": xhat, "r": r, "g": g, "dx": dx}


def run_both(x, gamma, dy, layout=None):
    layout = layout or dict.fromkeys(INPUTS, "contiguous")
    args = {name: in_layout(a, layout[name]) for name, a in zip(INPUTS, (x, gamma, dy))}
    saved = {name: a.copy() for name, a in args.items()}
    y, cache = rmsnorm_forward(args["x"], args["gamma"], EPS)
    ours = (y, *rmsnorm_backward(args["dy"], cache))
    for name, a in args.items():
        np.testing.assert_array_equal(a, saved[name], err_msg=f"{name} was written to")
    tx, tw = leaf(x), leaf(gamma)
    ty = torch.nn.functional.rms_norm(tx, (x.shape[-1],), tw, EPS)
    return ours, (ty.detach().numpy(), *backprop(ty, dy, tx, tw))


def term_scales(x, gamma, dy):
    rstd = 1 / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + EPS)
    ady = np.abs(dy.astype(np.float64))
    rows = tuple(range(dy.ndim - 1))
    return {
        "y": float(np.abs(gamma).max() * (np.abs(x) * rstd).max()),
        "dx": float((rstd * ady * np.abs(gamma)).max() * 2),
        "dgamma": float((ady * np.abs(x) * rstd).sum(axis=rows).max()),
    }


cases = st.tuples(shapes(1, 3), DTYPES, SCALES, rngs())
input_layouts = st.fixed_dictionaries({name: layouts() for name in INPUTS})


@pytest.mark.derivation("RMS.4")
@given(cases, input_layouts)
def test_rmsnorm_matches_torch(case, layout):
    """Every input (dy included) in every memory layout: same values, inputs left unchanged."""
    shape, dtype, scale, rng = case
    inputs = make(rng, shape, dtype, scale)
    ours, oracle = run_both(*inputs, layout=layout)
    s = term_scales(*inputs)
    for name, a, b in zip(("y", "dx", "dgamma"), ours, oracle):
        assert a.dtype == dtype, name
        assert_close(a, b, scale=s[name], what=name)


@pytest.mark.derivation("RMS.5")
@given(shapes(1, 3), rngs())
def test_dgamma_formula(shape, rng):
    x, w, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, w, dy)
    xhat = reference(x, w, dy)["xhat"]
    s = term_scales(x, w, dy)["dgamma"]
    assert_close(ours[2], oracle[2], scale=s, what="dgamma vs torch")
    assert_close(ours[2], (dy * xhat).reshape(-1, shape[-1]).sum(0), scale=s, what="dgamma vs (RMS.5)")


def _symbolic_row(D):
    x = sp.symbols(f"x0:{D}", real=True)
    eps = sp.Symbol("epsilon", positive=True)
    r = 1 / sp.sqrt(sum(xi**2 for xi in x) / D + eps)  # (RMS.1), (RMS.2)
    return x, eps, r, [xi * r for xi in x]  # (RMS.3)


@pytest.mark.derivation("RMS.7")
def test_jacobian_symbolic():
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    for i in range(D):
        for j in range(D):
            claimed = r / D * (D * sp.KroneckerDelta(i, j) - xhat[i] * xhat[j])  # (RMS.7)
            assert sp.simplify(sp.diff(xhat[i], x[j]) - claimed) == 0, (i, j)


@pytest.mark.derivation("RMS.8")
def test_dx_formula_symbolic():
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    g = sp.symbols(f"g0:{D}", real=True)
    for j in range(D):
        chain = sum(g[i] * sp.diff(xhat[i], x[j]) for i in range(D))
        claimed = r * (g[j] - xhat[j] * sum(gi * xi for gi, xi in zip(g, xhat)) / D)  # (RMS.8)
        assert sp.simplify(chain - claimed) == 0, j


@pytest.mark.derivation("RMS.9")
def test_dx_along_xhat_symbolic():
    D = 3
    x, eps, r, xhat = _symbolic_row(D)
    g = sp.symbols(f"g0:{D}", real=True)
    g_xhat = sum(gi * xi for gi, xi in zip(g, xhat))
    dx = [r * (g[j] - xhat[j] * g_xhat / D) for j in range(D)]  # (RMS.8)
    assert sp.simplify(sum(d * xh for d, xh in zip(dx, xhat)) - eps * r**3 * g_xhat) == 0  # (RMS.9)


@pytest.mark.derivation("RMS.8")
@given(shapes(1, 3), st.sampled_from([EPS, 1e-2, 1.0]), rngs())
def test_dx_formula(shape, eps, rng):
    """(RMS.8) evaluated in float64 from x itself agrees with torch autograd, and the op agrees with it."""
    x, w, dy = make(rng, shape, np.float64)
    ref = reference(x, w, dy, eps)
    tx = leaf(x)
    ty = torch.nn.functional.rms_norm(tx, (shape[-1],), leaf(w, grad=False), eps)
    (autograd,) = backprop(ty, dy, tx)
    _, cache = rmsnorm_forward(x, w, eps)
    dx, _ = rmsnorm_backward(dy, cache)
    scale = float((ref["r"] * np.abs(ref["g"])).max() * 2)
    assert_close(ref["dx"], autograd, scale=scale, what="(RMS.8) vs torch autograd")
    assert_close(dx, ref["dx"], scale=scale, what="dx vs (RMS.8)")


@pytest.mark.derivation("RMS.9")
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5, 8])), st.sampled_from([0.0, EPS, 1e-2, 1.0]), rngs())
def test_dx_along_xhat_is_the_eps_term(shape, eps, rng):
    """<dx, xhat> = eps r^3 <dxhat, xhat> per row: zero (orthogonal) only for eps = 0."""
    x, w, dy = make(rng, shape, np.float64)
    ref = reference(x, w, dy, eps)
    _, cache = rmsnorm_forward(x, w, eps=eps)
    dx, _ = rmsnorm_backward(dy, cache)
    scale = float((ref["r"] * np.abs(ref["g"])).max() * shape[-1])
    eps_term = eps * ref["r"][..., 0] ** 3 * (ref["g"] * ref["xhat"]).sum(-1)  # (RMS.9)
    assert_close((dx * ref["xhat"]).sum(-1), eps_term, scale=scale, what="<dx, xhat>")


# D >= 2: for D = 1 the normalised value is sign(x) up to eps and its gradient is round-off.
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5])), rngs())
def test_finite_differences(shape, rng):
    x, w, _ = make(rng, shape, np.float64)
    results = gradcheck.check(rmsnorm_forward, rmsnorm_backward, {"x": x, "gamma": w}, wrt=("x", "gamma"),
                              options={"eps": EPS})
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


# ---- floating point: rows far from zero, huge rows --------------------------------------


@pytest.mark.derivation("RMS.4")
@given(st.sampled_from([1, 2, 3, 7, 64, 768]), st.sampled_from([0.0, 1.0, -3e2, 1000.1, 10000.3, -1e6, 1e6]),
       st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 30.0]), rngs())
def test_float32_rows_far_from_zero(D, offset, spread, rng):
    """float32 rows offset + spread * noise against the float64 formula, judged by the size of y."""
    x = (offset + spread * rng.standard_normal((2, D))).astype(np.float32)
    w, dy = randn(rng, (D,), np.float32), randn(rng, (2, D), np.float32)
    y, cache = rmsnorm_forward(x, w, EPS)
    dx, _ = rmsnorm_backward(dy, cache)
    ref = reference(x, w, dy)
    assert_close(y, ref["y"], scale=float(np.abs(w).max() * np.abs(ref["xhat"]).max()), what="y")
    assert_close(dx, ref["dx"], scale=float((ref["r"] * np.abs(ref["g"])).max() * 2), what="dx")


@pytest.mark.derivation("RMS.10")
@given(DTYPES, st.sampled_from([1, 2, 3, 7]), st.sampled_from([1e15, 1e20, 1e30, 1e36, 3e38, 1e150, 1e300]),
       st.sampled_from([0.0, 1e-3, 1.0]), rngs())
def test_huge_rows_are_scaled(dtype, D, magnitude, relative_offset, rng):
    """Rows whose squares overflow give the same xhat, y and dx as the formula on x / 2^k (k exact)."""
    limit = float(np.finfo(dtype).max)
    magnitude = min(magnitude, limit / 4)
    x = np.clip(magnitude * (relative_offset * 8 + rng.uniform(-1, 1, (2, D))), -limit, limit).astype(dtype)
    w, dy = randn(rng, (D,), dtype), randn(rng, (2, D), dtype)
    y, cache = rmsnorm_forward(x, w, EPS)
    dx, _ = rmsnorm_backward(dy, cache)
    s = 2.0 ** np.floor(np.log2(np.abs(x.astype(np.float64)).max(-1, keepdims=True)))  # exact scale
    ref = reference(x.astype(np.float64) / s, w, dy, EPS / s / s)
    rtol = RTOL[np.dtype(dtype)]
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_close(y, ref["y"], scale=float(np.abs(w).max() * np.abs(ref["xhat"]).max()), what="y")
    assert_close(cache.rstd * s, ref["r"], rtol=rtol, what="rstd * s")
    assert_close(dx * s, ref["dx"], rtol=rtol, scale=float((ref["r"] * np.abs(ref["g"])).max() * 2), what="dx * s")


@pytest.mark.derivation("RMS.10")
@given(huge_rows(), st.sampled_from([EPS, 1.0]), rngs())
def test_huge_rows_far_from_zero(case, eps, rng):
    """Rows whose mean square overflows, at offsets up to 10^7 (float32) or 10^15 (float64) times their
    spread, against (RMS.1)-(RMS.4) in exact rational arithmetic, judged by the size of y (and xhat
    entry by entry: with nothing to cancel, every entry keeps its own relative accuracy)."""
    x, _ = case
    assert overflows(x, centre=False).all()  # every row takes the (RMS.10) path
    D, dtype = x.shape[-1], x.dtype
    w, dy = randn(rng, (D,), dtype), randn(rng, x.shape, dtype)
    y, cache = rmsnorm_forward(x, w, eps)
    dx, _ = rmsnorm_backward(dy, cache)
    xhat, r = exact(x, eps, centre=False)
    assert_close(y, w.astype(np.float64) * xhat, scale=float(np.abs(w).max() * np.abs(xhat).max()), what="y")
    np.testing.assert_allclose(cache.xhat, xhat, rtol=4 * np.finfo(dtype).eps, atol=0, err_msg="xhat")
    assert_close(cache.rstd, r, what="rstd")
    g = dy.astype(np.float64) * w  # (RMS.6)
    dx_exact = r * (g - xhat * (g * xhat).mean(-1, keepdims=True))  # (RMS.8)
    assert_close(dx, dx_exact, scale=float((r * np.abs(g)).max() * 2), what="dx")


# ---- the forward's statistics, (RMS.1)-(RMS.3), and (RMS.6) ---------------------------------------


@st.composite
def offset_rows(draw):
    """(x, gamma, eps): rows offset + spread * noise of drawn shape and dtype, offsets far from zero included."""
    dtype = draw(DTYPES)
    shape = draw(shapes(1, 2, sides=st.sampled_from([1, 2, 3]))) + (draw(st.sampled_from([1, 2, 3, 7, 64, 768])),)
    offset = draw(st.sampled_from([0.0, 1.0, -3e2, 1000.1, 10000.3, -1e6, 1e6]))
    spread = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 30.0]))
    eps, rng = draw(st.sampled_from([EPS, 1e-2, 1.0])), draw(rngs())
    x = (offset + spread * rng.standard_normal(shape)).astype(dtype)
    return x, randn(rng, shape[-1:], dtype), eps


def mean_square(x):
    """m of (RMS.1) in float64: a sum of non-negative terms, accurate to about D units of float64's last place."""
    x = np.asarray(x, np.float64)
    return (x * x).mean(-1, keepdims=True)  # (RMS.1)


@pytest.mark.derivation("RMS.1")
@given(offset_rows())
def test_mean_square_formula(case):
    """The mean square behind the cached r, 1 / r^2 - eps by (RMS.2) solved for m, is the mean of x^2 of
    (RMS.1), judged by m + eps (the size r is computed from)."""
    x, gamma, eps = case
    _, cache = rmsnorm_forward(x, gamma, eps)
    m = mean_square(x)
    seen = 1.0 / cache.rstd.astype(np.float64) ** 2 - eps  # (RMS.2) solved for m
    assert cache.rstd.dtype == x.dtype
    assert_close(seen / (m + eps), m / (m + eps), rtol=RTOL[np.dtype(x.dtype)], scale=1.0, what="m / (m + eps)")


@pytest.mark.derivation("RMS.2")
@given(offset_rows())
def test_rstd_formula(case):
    """cache.rstd is r = (m + eps)^(-1/2) of (RMS.2), every entry to the dtype's relative tolerance."""
    x, gamma, eps = case
    _, cache = rmsnorm_forward(x, gamma, eps)
    r = 1.0 / np.sqrt(mean_square(x) + eps)  # (RMS.2)
    assert cache.rstd.shape == x.shape[:-1] + (1,) and cache.rstd.dtype == x.dtype
    assert_close(cache.rstd, r, scale=float(r.min()), what="r")  # each entry relative to at least its own size


@pytest.mark.derivation("RMS.1")
@given(DTYPES, shapes(0, 1, sides=st.sampled_from([1, 2])), st.sampled_from([1, 7, 768, 4096, 16384]),
       st.sampled_from([2.0**-3, 1.0, 2.0**10]), st.sampled_from([0.0, EPS]), rngs())
def test_rstd_to_a_few_rounding_units_with_one_large_entry(dtype, lead, D, scale, eps, rng):
    """cache.rstd against (RMS.1)-(RMS.2) in exact rational arithmetic, within a few units of the dtype's
    rounding of itself (proofs/rmsnorm.md: m is a sum of non-negative terms, accurate to a few units at any
    spread). The rows are one entry of size scale (a power of two), early in the row, among entries whose
    squares are each below half a unit of its square: summed with a long-running total that holds the large
    square (a plain loop, or each lane of a dot product), every small square after it is rounded away and r
    is off by about D / 100 units; summed pairwise, as np.mean does, by a few units at any D."""
    x = rows_with_large_entries(rng, lead + (D,), dtype, scale, (scale,))
    _, cache = rmsnorm_forward(x, randn(rng, (D,), dtype), eps)
    assert_rstd_exact(cache.rstd, x, eps, centre=False)  # (RMS.1)-(RMS.2), the sums in rational arithmetic


@pytest.mark.derivation("RMS.3")
@given(offset_rows())
def test_xhat_formula(case):
    """cache.xhat is x r of (RMS.3): with nothing to cancel, every entry to the dtype's relative tolerance."""
    x, gamma, eps = case
    _, cache = rmsnorm_forward(x, gamma, eps)
    xhat = x.astype(np.float64) / np.sqrt(mean_square(x) + eps)  # (RMS.3)
    assert cache.xhat.shape == x.shape and cache.xhat.dtype == x.dtype
    np.testing.assert_allclose(cache.xhat, xhat, rtol=RTOL[np.dtype(x.dtype)], atol=0, err_msg="xhat")


@pytest.mark.derivation("RMS.6")
@given(shapes(1, 3), DTYPES, rngs())
def test_dxhat_is_dy_times_gamma(shape, dtype, rng):
    """(RMS.6) itself: the gradient of L = <dy, gamma * xhat> with respect to xhat, by central differences in
    float64, is dy * gamma. And in the op: the backward sees dy and gamma only through that product, so
    (dy, gamma) and (dy * gamma, ones) give the same dx, bit for bit."""
    x, gamma, dy = make(rng, shape, dtype)
    xhat64 = rng.standard_normal(shape)
    dy64, gamma64 = dy.astype(np.float64), gamma.astype(np.float64)
    numeric = gradcheck.numerical_gradient(lambda: float(np.sum(dy64 * (gamma64 * xhat64))), xhat64)  # (RMS.4)
    assert_close(numeric, dy64 * gamma64, rtol=FD_RTOL, what="dL/dxhat by central differences vs (RMS.6)")
    _, cache = rmsnorm_forward(x, gamma, EPS)
    dx, _ = rmsnorm_backward(dy, cache)
    dx_folded, _ = rmsnorm_backward(dy * gamma, cache._replace(gamma=np.ones_like(gamma)))
    np.testing.assert_array_equal(dx, dx_folded)


# ---- empty input ------------------------------------------------------------------------------


@given(DTYPES, shapes(0, 2), st.sampled_from([1, 3, 8]))
def test_no_rows_gives_empty_output_and_zero_gamma_gradient(dtype, lead, D):
    shape = (0,) + lead + (D,)
    y, cache = rmsnorm_forward(np.zeros(shape, dtype), np.ones(D, dtype))
    dx, dgamma = rmsnorm_backward(np.zeros(shape, dtype), cache)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(dgamma, np.zeros(D, dtype))


# ---- bad input ----------------------------------------------------------------------------------

X_KINDS = ROW_KINDS
BAD_EPS = (-1e-6, -1.0, float("nan"), float("inf"), "1e-6", None, False, (1e-6,))


bad = corrupt  # every kind, the norms' own ("other float", "0-d", "D = 0") included


@pytest.mark.parametrize("arg, kinds", [("x", X_KINDS), ("gamma", EXACT_KINDS)])
@given(data=st.data(), shape=shapes(1, 3), dtype=DTYPES, rng=rngs())
def test_forward_rejects_bad_arrays(arg, kinds, data, shape, dtype, rng):
    inputs = dict(zip(INPUTS, make(rng, shape, dtype)))
    inputs[arg] = bad(inputs[arg], data.draw(st.sampled_from(kinds), label="kind"))
    expect_rejected(lambda: rmsnorm_forward(inputs["x"], inputs["gamma"]), "rmsnorm_forward", arg)


@given(st.sampled_from(BAD_EPS), shapes(1, 2), rngs())
def test_forward_rejects_bad_eps(eps, shape, rng):
    x, w, _ = make(rng, shape, np.float64)
    message = expect_rejected(lambda: rmsnorm_forward(x, w, eps), "rmsnorm_forward", "eps")
    assert "finite real number in [0.0, inf)" in message


@given(st.sampled_from(EXACT_KINDS), shapes(1, 3), DTYPES, rngs())
def test_backward_rejects_bad_dy(kind, shape, dtype, rng):
    x, w, dy = make(rng, shape, dtype)
    _, cache = rmsnorm_forward(x, w)
    bad_dy = bad(dy, kind)
    expect_rejected(lambda: rmsnorm_backward(bad_dy, cache), "rmsnorm_backward", "dy")


@given(st.sampled_from(["tuple", "none", "other op"]), shapes(1, 2), rngs())
def test_backward_rejects_a_cache_it_did_not_make(kind, shape, rng):
    x, w, dy = make(rng, shape, np.float64)
    _, cache = rmsnorm_forward(x, w)
    assert isinstance(cache, RMSNormCache)
    wrong = {"tuple": tuple(cache), "none": None, "other op": layernorm_forward(x, w, w)[1]}[kind]
    expect_rejected(lambda: rmsnorm_backward(dy, wrong), "rmsnorm_backward", "cache")


def test_messages_say_what_was_expected_and_what_came():
    cases = [
        ((np.ones((2, 4)), np.ones(3)), "rmsnorm_forward: argument 'gamma' expected shape (4,), got (3,)"),
        ((np.ones((2, 4), np.float32), np.ones(4)),
         "rmsnorm_forward: argument 'gamma' expected dtype float32 (same as 'x'), got float64"),
        ((np.ones(()), np.ones(1)), "rmsnorm_forward: argument 'x' expected at least 1 dimensions, got 0"),
        ((np.ones((2, 4)), list(np.ones(4))), "rmsnorm_forward: argument 'gamma' expected a numpy.ndarray, got list"),
    ]
    for args, message in cases:
        assert message in expect_rejected(lambda: rmsnorm_forward(*args), "rmsnorm_forward", message.split("'")[1])
