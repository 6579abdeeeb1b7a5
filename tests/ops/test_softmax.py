"""Softmax and log-softmax: torch oracle in every memory layout, finite differences, the equations
of proofs/softmax.md, float32 rows far from zero, empty input, bad input."""

import warnings

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.softmax import (
    LogSoftmaxCache,
    SoftmaxCache,
    log_softmax_backward,
    log_softmax_forward,
    softmax_backward,
    softmax_forward,
)
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

PAIRS = {"softmax": (softmax_forward, softmax_backward), "log_softmax": (log_softmax_forward, log_softmax_backward)}

# Logits up to 1e4: the max-subtraction of (SM.1) keeps even float32 finite there.
LOGIT_SCALES = st.one_of(SCALES, st.just(1e4))


@st.composite
def cases(draw, dtypes=DTYPES, scales=LOGIT_SCALES):
    """(x, dy, axis) with a random axis (negative or not) of a random shape."""
    shape = draw(shapes(1, 3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    dtype, scale, rng = draw(dtypes), draw(scales), draw(rngs())
    return randn(rng, shape, dtype, scale), randn(rng, shape, dtype), axis


def softmax_scale(y, dy, axis):
    """Size of the terms (SM.3) sums over, per entry: y * (|dy| + sum |dy| y). Round-off is relative to it."""
    y, dy = y.astype(np.float64), np.abs(dy.astype(np.float64))
    return float(np.max(y * (dy + np.sum(dy * y, axis=axis, keepdims=True)), initial=0.0))


def log_softmax_scale(y, dy, axis):
    """Size of the terms of (LSM.3): |dy| + p * sum |dy|."""
    p, dy = np.exp(y.astype(np.float64)), np.abs(dy.astype(np.float64))
    return float(np.max(dy + p * dy.sum(axis=axis, keepdims=True), initial=0.0))


def call_in_layouts(forward, backward, x, dy, axis, x_layout, dy_layout):
    """forward then backward with x and dy in the given memory layouts; neither may be written to."""
    x_in, dy_in = in_layout(x, x_layout), in_layout(dy, dy_layout)
    y, cache = forward(x_in, axis)
    dx = backward(dy_in, cache)
    np.testing.assert_array_equal(x_in, x, err_msg="x was written to")
    np.testing.assert_array_equal(dy_in, dy, err_msg="dy was written to")
    return y, dx


@pytest.mark.derivation("SM.1")
@pytest.mark.derivation("SM.3")
@given(cases(), layouts(), layouts())
def test_softmax_matches_torch(case, x_layout, dy_layout):
    """x and dy in every memory layout."""
    x, dy, axis = case
    y, dx = call_in_layouts(softmax_forward, softmax_backward, x, dy, axis, x_layout, dy_layout)
    tx = leaf(x)
    ty = torch.softmax(tx, dim=axis)
    (tdx,) = backprop(ty, dy, tx)
    assert y.dtype == dx.dtype == x.dtype
    assert_close(y, ty.detach().numpy(), scale=1.0, what="y")
    assert_close(dx, tdx, scale=softmax_scale(y, dy, axis), what="dx")


@pytest.mark.derivation("LSM.1")
@pytest.mark.derivation("LSM.3")
@given(cases(), layouts(), layouts())
def test_log_softmax_matches_torch(case, x_layout, dy_layout):
    """x and dy in every memory layout."""
    x, dy, axis = case
    y, dx = call_in_layouts(log_softmax_forward, log_softmax_backward, x, dy, axis, x_layout, dy_layout)
    tx = leaf(x)
    ty = torch.log_softmax(tx, dim=axis)
    (tdx,) = backprop(ty, dy, tx)
    assert y.dtype == dx.dtype == x.dtype
    assert_close(y, ty.detach().numpy(), what="y")
    assert_close(dx, tdx, scale=log_softmax_scale(y, dy, axis), what="dx")


@pytest.mark.derivation("SM.1")
@given(cases())
def test_softmax_rows_sum_to_one(case):
    x, _, axis = case
    y, _ = softmax_forward(x, axis)
    assert np.all(y >= 0)
    assert_close(y.sum(axis=axis), np.ones(np.delete(x.shape, axis)), what="row sums")


@pytest.mark.derivation("SM.3")
@given(cases(dtypes=st.just(np.float64)))
def test_softmax_dx_rows_sum_to_zero(case):
    """J 1 = 0 and J is symmetric, so every row of dx sums to zero."""
    x, dy, axis = case
    y, cache = softmax_forward(x, axis)
    dx = softmax_backward(dy, cache)
    scale = softmax_scale(y, dy, axis) * x.shape[axis]
    assert_close(dx.sum(axis=axis), np.zeros(np.delete(x.shape, axis)), scale=scale, what="row sums of dx")


@pytest.mark.derivation("SM.1")
@pytest.mark.derivation("LSM.1")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_stay_finite(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, -1e4]], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # together with np.seterr(all="raise") from conftest
        y, cache = softmax_forward(x)
        dx = softmax_backward(np.ones_like(x), cache)
        ly, lcache = log_softmax_forward(x)
        ldx = log_softmax_backward(np.ones_like(x), lcache)
    assert_close(y, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]], what="softmax")
    assert_close(ly, [[0, -2e4, -1e4], [-np.log(3)] * 3, [-np.log(2), -np.log(2), -2e4 - np.log(2)]], what="log_softmax")
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(ldx))
    assert_close(ldx, 1 - 3 * y, what="log_softmax dx")  # (LSM.3) with dy = 1


def reference_softmax(x, axis):
    """softmax and log-softmax in float64 from the same values, independently of the op."""
    x = x.astype(np.float64)
    z = x - x.max(axis=axis, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return np.exp(z - lse), z - lse


FAR_OFFSETS = st.sampled_from([0.0, 1e3, -1e4, 1e6, -1e6, 1e30, -3e38])
FAR_SPREADS = st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e4, 1e38])


@pytest.mark.derivation("SM.1")
@pytest.mark.derivation("LSM.1")
@given(st.sampled_from([1, 2, 3, 7, 65, 768]), FAR_OFFSETS, FAR_SPREADS, rngs())
def test_float32_rows_far_from_zero(V, offset, spread, rng):
    """float32 logits offset + spread * noise (up to float32's range, entries up to 3.4e38 apart)
    against float64 on the same values; a row of equal logits gives exactly 1/V."""
    limit = float(np.finfo(np.float32).max)
    x = np.clip(offset + spread * rng.standard_normal((3, V)), -limit, limit).astype(np.float32)
    dy = randn(rng, (3, V), np.float32)
    p_ref, logp_ref = reference_softmax(x, -1)
    y, cache = softmax_forward(x)
    dx = softmax_backward(dy, cache)
    ly, lcache = log_softmax_forward(x)
    ldx = log_softmax_backward(dy, lcache)
    assert_close(y, p_ref, scale=1.0, what="softmax")
    # A log-probability below -3.4e38 rounds to -inf in float32; every other one is finite and accurate.
    representable = logp_ref >= -limit
    assert np.all(ly[~representable] == -np.inf)
    kept = logp_ref[representable]
    assert_close(ly[representable], kept, scale=max(float(np.abs(kept).max()), 1.0), what="log_softmax")
    assert_close(dx, p_ref * (dy - (dy * p_ref).sum(-1, keepdims=True)), scale=softmax_scale(p_ref, dy, -1),
                 what="softmax dx, (SM.3)")
    assert_close(ldx, dy - p_ref * dy.sum(-1, keepdims=True), scale=log_softmax_scale(logp_ref, dy, -1),
                 what="log_softmax dx, (LSM.3)")
    equal = np.all(x == x[:, :1], axis=-1)
    assert np.all(y[equal] == np.float32(1) / np.float32(V)), "a row of equal logits gives exactly 1/V"


@pytest.mark.parametrize("name", list(PAIRS))
@given(dtype=DTYPES, lead=shapes(0, 2), V=st.sampled_from([1, 3]))
def test_no_rows_gives_empty_output(name, dtype, lead, V):
    forward, backward = PAIRS[name]
    x = np.zeros((0,) + lead + (V,), dtype)
    y, cache = forward(x)
    dx = backward(np.zeros_like(x), cache)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype


# ---- symbolic checks, V = 3 ------------------------------------------------------

V_SYM = 3
X = sp.symbols(f"x0:{V_SYM}", real=True)
G = sp.symbols(f"g0:{V_SYM}", real=True)  # upstream gradient
_E = [sp.exp(xi) for xi in X]
Y = [e / sum(_E) for e in _E]  # (SM.1) without the shift, which cancels
LOGY = [xi - sp.log(sum(_E)) for xi in X]  # (LSM.1)


@pytest.mark.derivation("SM.2")
def test_softmax_jacobian_symbolic():
    y = sp.Matrix(Y)
    autodiff = y.jacobian(X)
    claimed = sp.diag(*Y) - y * y.T  # (SM.2)
    assert sp.simplify(autodiff - claimed) == sp.zeros(V_SYM, V_SYM)


@pytest.mark.derivation("SM.3")
def test_softmax_vjp_symbolic():
    for j in range(V_SYM):
        chain = sum(G[i] * sp.diff(Y[i], X[j]) for i in range(V_SYM))
        claimed = Y[j] * (G[j] - sum(g * y for g, y in zip(G, Y)))  # (SM.3)
        assert sp.simplify(chain - claimed) == 0, j


@pytest.mark.derivation("LSM.2")
def test_log_softmax_jacobian_symbolic():
    autodiff = sp.Matrix(LOGY).jacobian(X)
    claimed = sp.eye(V_SYM) - sp.ones(V_SYM, 1) * sp.Matrix(Y).T  # (LSM.2)
    assert sp.simplify(autodiff - claimed) == sp.zeros(V_SYM, V_SYM)


@pytest.mark.derivation("LSM.3")
def test_log_softmax_vjp_symbolic():
    for j in range(V_SYM):
        chain = sum(G[i] * sp.diff(LOGY[i], X[j]) for i in range(V_SYM))
        claimed = G[j] - Y[j] * sum(G)  # (LSM.3)
        assert sp.simplify(chain - claimed) == 0, j


# ---- finite differences -------------------------------------------------------------


@pytest.mark.derivation("SM.3")
@pytest.mark.derivation("LSM.3")
@given(cases(dtypes=st.just(np.float64), scales=st.sampled_from([1.0, 3.0])))
def test_finite_differences(case):
    x, _, axis = case
    for forward, backward in ((softmax_forward, softmax_backward), (log_softmax_forward, log_softmax_backward)):
        results = gradcheck.check(forward, backward, {"x": x}, wrt=("x",), options={"axis": axis})
        assert len(results) == 1 and results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


def test_gradcheck_cases_pass():
    for case in gradcheck.cases("softmax"):
        results = gradcheck.check_case(case)
        assert results and all(r.max_rel < FD_RTOL for r in results), gradcheck.format_table(results)


# ---- bad input ---------------------------------------------------------------------

EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
X_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + ("0-d", "V = 0")
BAD_AXES = ("ndim", "-ndim-1", 1.0, np.float64(0), True, None, "0", (0,))


def bad(x, kind, axis=-1):
    """``x`` made wrong by ``kind``: a kind of tests/badinput.py, or one of the kinds named here."""
    if kind == "other float":
        return x.astype(np.float32 if x.dtype == np.float64 else np.float64)
    if kind == "0-d":
        return np.asarray(x.reshape(-1)[0])
    if kind == "V = 0":
        return np.take(x, [], axis=axis)
    return corrupt(x, kind)


@st.composite
def valid(draw, dtypes=DTYPES):
    x, dy, axis = draw(cases(dtypes=dtypes, scales=st.just(1.0)))
    return x, dy, axis


@pytest.mark.parametrize("name", list(PAIRS))
@given(kind=st.sampled_from(X_KINDS), case=valid())
def test_forward_rejects_bad_x(name, kind, case):
    forward, _ = PAIRS[name]
    x, _, axis = case
    bad_x = bad(x, kind, axis)
    expect_rejected(lambda: forward(bad_x, axis), f"{name}_forward", "x")


@pytest.mark.parametrize("name", list(PAIRS))
@given(axis=st.sampled_from(BAD_AXES), case=valid())
def test_forward_rejects_bad_axis(name, axis, case):
    forward, _ = PAIRS[name]
    x = case[0]
    axis = {"ndim": x.ndim, "-ndim-1": -x.ndim - 1}.get(axis, axis) if isinstance(axis, str) else axis
    expect_rejected(lambda: forward(x, axis), f"{name}_forward", "axis")


@pytest.mark.parametrize("name", list(PAIRS))
@given(kind=st.sampled_from(EXACT_KINDS), case=valid())
def test_backward_rejects_bad_dy(name, kind, case):
    """dy must be a float array of the output's shape and dtype (an integer dy is refused, not cast)."""
    forward, backward = PAIRS[name]
    x, dy, axis = case
    _, cache = forward(x, axis)
    bad_dy = bad(dy, kind, axis)
    expect_rejected(lambda: backward(bad_dy, cache), f"{name}_backward", "dy")


@pytest.mark.parametrize("name", list(PAIRS))
@given(kind=st.sampled_from(["tuple", "none", "other op"]), case=valid())
def test_backward_rejects_a_cache_it_did_not_make(name, kind, case):
    forward, backward = PAIRS[name]
    other_forward = log_softmax_forward if name == "softmax" else softmax_forward
    x, dy, axis = case
    _, cache = forward(x, axis)
    assert isinstance(cache, SoftmaxCache if name == "softmax" else LogSoftmaxCache)
    wrong = {"tuple": tuple(cache), "none": None, "other op": other_forward(x, axis)[1]}[kind]
    expect_rejected(lambda: backward(dy, wrong), f"{name}_backward", "cache")


@pytest.mark.parametrize("forward", [softmax_forward, log_softmax_forward])
def test_messages_say_what_was_expected_and_what_came(forward):
    cases = [
        (np.ones((2, 4), np.int64), -1, "argument 'x' expected dtype float32 or float64, got int64"),
        (np.ones((2, 4)), 2, "argument 'axis' expected a value in [-2, 2), got 2"),
        (np.ones((2, 4)), -3, "argument 'axis' expected a value in [-2, 2), got -3"),
        (np.ones((2, 4)), 1.0, "argument 'axis' expected an int, got float"),
        (np.ones(()), -1, "argument 'x' expected at least 1 dimensions, got 0"),
        (np.ones((2, 0)), -1, "argument 'x' expected at least one entry along axis 1, got shape (2, 0)"),
        ([1.0, 2.0], -1, "argument 'x' expected a numpy.ndarray, got list"),
    ]
    name = forward.__name__
    for x, axis, message in cases:
        assert f"{name}: {message}" in expect_rejected(lambda: forward(x, axis), name, message.split("'")[1])
