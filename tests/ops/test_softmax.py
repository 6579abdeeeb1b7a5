"""Softmax and log-softmax: torch oracle, finite differences, the equations of proofs/softmax.md."""

import warnings

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.softmax import (
    log_softmax_backward,
    log_softmax_forward,
    softmax_backward,
    softmax_forward,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

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


@pytest.mark.derivation("SM.1")
@pytest.mark.derivation("SM.3")
@given(cases())
def test_softmax_matches_torch(case):
    x, dy, axis = case
    y, cache = softmax_forward(x, axis)
    dx = softmax_backward(dy, cache)
    tx = leaf(x)
    ty = torch.softmax(tx, dim=axis)
    (tdx,) = backprop(ty, dy, tx)
    assert y.dtype == dx.dtype == x.dtype
    assert_close(y, ty.detach().numpy(), scale=1.0, what="y")
    assert_close(dx, tdx, scale=softmax_scale(y, dy, axis), what="dx")


@pytest.mark.derivation("LSM.1")
@pytest.mark.derivation("LSM.3")
@given(cases())
def test_log_softmax_matches_torch(case):
    x, dy, axis = case
    y, cache = log_softmax_forward(x, axis)
    dx = log_softmax_backward(dy, cache)
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


@pytest.mark.parametrize("forward", [softmax_forward, log_softmax_forward])
@pytest.mark.parametrize(
    "x, axis, message",
    [
        (np.ones((2, 4), np.int64), -1, "argument 'x' expected dtype float32 or float64, got int64"),
        (np.ones((2, 4)), 2, "argument 'axis' expected a value in [-2, 2), got 2"),
        (np.ones((2, 4)), -3, "argument 'axis' expected a value in [-2, 2), got -3"),
        (np.ones((2, 4)), 1.0, "argument 'axis' expected an int, got float"),
        (np.ones(()), -1, "argument 'x' expected at least 1 dimensions, got 0"),
        (np.ones((2, 0)), -1, "argument 'x' expected at least one entry along axis 1, got shape (2, 0)"),
        ([1.0, 2.0], -1, "argument 'x' expected a numpy.ndarray, got list"),
    ],
)
def test_bad_input_is_named(forward, x, axis, message):
    with pytest.raises(ValueError) as err:
        forward(x, axis)
    assert f"{forward.__name__}: " + message in str(err.value)


@pytest.mark.parametrize(
    "forward, backward",
    [(softmax_forward, softmax_backward), (log_softmax_forward, log_softmax_backward)],
)
def test_backward_rejects_wrong_dy(forward, backward):
    _, cache = forward(np.ones((2, 4)))
    name = backward.__name__
    with pytest.raises(ValueError, match=rf"{name}: argument 'dy' expected shape \(2, 4\), got \(4,\)"):
        backward(np.ones(4), cache)
    with pytest.raises(ValueError, match=rf"{name}: argument 'dy' expected dtype float64"):
        backward(np.ones((2, 4), np.float32), cache)
