"""LayerNorm: torch oracle, finite differences, the equations of proofs/layernorm.md."""

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.layernorm import layernorm_backward, layernorm_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

EPS = 1e-5


def make(rng, shape, dtype, scale=1.0):
    D = shape[-1]
    x = randn(rng, shape, dtype, scale) + dtype(scale * rng.standard_normal())  # a row offset too
    gamma = randn(rng, (D,), dtype)
    beta = randn(rng, (D,), dtype)
    dy = randn(rng, shape, dtype)
    return x, gamma, beta, dy


def run_both(x, gamma, beta, dy):
    """npformer forward+backward, and the float64 torch oracle on the same values."""
    y, cache = layernorm_forward(x, gamma, beta, EPS)
    grads = layernorm_backward(dy, cache)
    tx, tg, tb = leaf(x), leaf(gamma), leaf(beta)
    ty = torch.nn.functional.layer_norm(tx, (x.shape[-1],), tg, tb, EPS)
    return (y, *grads), (ty.detach().numpy(), *backprop(ty, dy, tx, tg, tb))


def term_scales(x, gamma, beta, dy):
    """Size of the terms each result is summed from: round-off is relative to these.

    (For D = 1 every gradient but dbeta is zero in exact arithmetic, and only this
    scale says how small "zero" has to be.)
    """
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + EPS)
    dy_abs = np.abs(dy.astype(np.float64))
    return {
        "y": float(np.abs(gamma).max() * np.abs(x).max() * rstd.max() + np.abs(beta).max()),
        "dx": float((rstd * dy_abs * np.abs(gamma)).max() * 3),
        "dgamma": float(dy_abs.sum(axis=tuple(range(dy.ndim - 1))).max() * 3),
        "dbeta": float(dy_abs.sum(axis=tuple(range(dy.ndim - 1))).max()),
    }


# Values up to 1e3 in float64; float32 keeps moderate magnitudes, where its 1e-4 bound is meaningful.
cases = st.tuples(shapes(1, 3), DTYPES, SCALES, rngs()).filter(lambda c: c[1] == np.float64 or c[2] <= 30)


@pytest.mark.derivation("LN.5")
@given(cases)
def test_layernorm_matches_torch(case):
    shape, dtype, scale, rng = case
    inputs = make(rng, shape, dtype, scale)
    ours, oracle = run_both(*inputs)
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
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)
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


@pytest.mark.derivation("LN.10")
@given(shapes(1, 3), rngs())
def test_dx_formula(shape, rng):
    x, gamma, beta, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, gamma, beta, dy)
    assert_close(ours[1], oracle[1], scale=term_scales(x, gamma, beta, dy)["dx"], what="dx vs torch")


@pytest.mark.derivation("LN.10")
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5, 8])), rngs())
def test_dx_invariances(shape, rng):
    """Each row of dx sums to zero and, with eps = 0, is orthogonal to xhat (shift and scale invariance)."""
    x, gamma, beta, dy = make(rng, shape, np.float64)
    _, cache = layernorm_forward(x, gamma, beta, eps=0.0)
    dx, _, _ = layernorm_backward(dy, cache)
    # Round-off is set by the terms that cancel in (LN.10): rstd * |dxhat| per entry.
    scale = (cache.rstd * np.abs(dy * gamma)).max() * shape[-1]
    assert np.all(np.abs(dx.sum(-1)) <= 1e-13 * scale)
    assert np.all(np.abs((dx * cache.xhat).sum(-1)) <= 1e-13 * scale)


# D >= 3: for D <= 2 the normalised row is constant up to eps and its gradient is round-off.
@given(shapes(1, 3, sides=st.sampled_from([3, 5, 8])), rngs())
def test_finite_differences(shape, rng):
    x, gamma, beta, _ = make(rng, shape, np.float64)
    results = gradcheck.check(layernorm_forward, layernorm_backward, {"x": x, "gamma": gamma, "beta": beta},
                              wrt=("x", "gamma", "beta"), options={"eps": EPS})
    assert [r.input for r in results] == ["x", "gamma", "beta"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones((2, 4)), np.ones(3), np.ones(4)), "layernorm_forward: argument 'gamma' expected shape (4,), got (3,)"),
        ((np.ones((2, 4)), np.ones(4), np.ones((1, 4))), "argument 'beta' expected shape (4,), got (1, 4)"),
        ((np.ones((2, 4), np.int64), np.ones(4), np.ones(4)), "argument 'x' expected dtype float32 or float64, got int64"),
        ((np.ones((2, 4), np.float32), np.ones(4), np.ones(4)), "argument 'gamma' expected dtype float32"),
        ((np.ones(()), np.ones(4), np.ones(4)), "argument 'x' expected at least 1 dimensions, got 0"),
        (([1.0, 2.0], np.ones(2), np.ones(2)), "argument 'x' expected a numpy.ndarray, got list"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError) as err:
        layernorm_forward(*args)
    assert message in str(err.value)


def test_backward_rejects_wrong_dy_shape():
    _, cache = layernorm_forward(np.ones((2, 4)), np.ones(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"layernorm_backward: argument 'dy' expected shape \(2, 4\), got \(4,\)"):
        layernorm_backward(np.ones(4), cache)
