"""RMSNorm: torch oracle, finite differences, the equations of proofs/rmsnorm.md."""

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

EPS = 1e-6


def make(rng, shape, dtype, scale=1.0):
    return randn(rng, shape, dtype, scale), randn(rng, shape[-1:], dtype), randn(rng, shape, dtype)


def run_both(x, w, dy):
    y, cache = rmsnorm_forward(x, w, EPS)
    ours = (y, *rmsnorm_backward(dy, cache))
    tx, tw = leaf(x), leaf(w)
    ty = torch.nn.functional.rms_norm(tx, (x.shape[-1],), tw, EPS)
    return ours, (ty.detach().numpy(), *backprop(ty, dy, tx, tw))


def term_scales(x, w, dy):
    rstd = 1 / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + EPS)
    ady = np.abs(dy.astype(np.float64))
    rows = tuple(range(dy.ndim - 1))
    return {
        "y": float(np.abs(w).max() * (np.abs(x) * rstd).max()),
        "dx": float((rstd * ady * np.abs(w)).max() * 2),
        "dweight": float((ady * np.abs(x) * rstd).sum(axis=rows).max()),
    }


cases = st.tuples(shapes(1, 3), DTYPES, SCALES, rngs())


@pytest.mark.derivation("RMS.4")
@given(cases)
def test_rmsnorm_matches_torch(case):
    shape, dtype, scale, rng = case
    inputs = make(rng, shape, dtype, scale)
    ours, oracle = run_both(*inputs)
    s = term_scales(*inputs)
    for name, a, b in zip(("y", "dx", "dweight"), ours, oracle):
        assert a.dtype == dtype, name
        assert_close(a, b, scale=s[name], what=name)


@pytest.mark.derivation("RMS.5")
@given(shapes(1, 3), rngs())
def test_dweight_formula(shape, rng):
    x, w, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, w, dy)
    xhat = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
    s = term_scales(x, w, dy)["dweight"]
    assert_close(ours[2], oracle[2], scale=s, what="dweight vs torch")
    assert_close(ours[2], (dy * xhat).reshape(-1, shape[-1]).sum(0), scale=s, what="dweight vs (RMS.5)")


def _symbolic_row(D):
    x = sp.symbols(f"x0:{D}", real=True)
    eps = sp.Symbol("epsilon", positive=True)
    r = 1 / sp.sqrt(sum(xi**2 for xi in x) / D + eps)  # (RMS.1), (RMS.2)
    return x, r, [xi * r for xi in x]  # (RMS.3)


@pytest.mark.derivation("RMS.7")
def test_jacobian_symbolic():
    D = 3
    x, r, xhat = _symbolic_row(D)
    for i in range(D):
        for j in range(D):
            claimed = r / D * (D * sp.KroneckerDelta(i, j) - xhat[i] * xhat[j])  # (RMS.7)
            assert sp.simplify(sp.diff(xhat[i], x[j]) - claimed) == 0, (i, j)


@pytest.mark.derivation("RMS.8")
def test_dx_formula_symbolic():
    D = 3
    x, r, xhat = _symbolic_row(D)
    g = sp.symbols(f"g0:{D}", real=True)
    for j in range(D):
        chain = sum(g[i] * sp.diff(xhat[i], x[j]) for i in range(D))
        claimed = r * (g[j] - xhat[j] * sum(gi * xi for gi, xi in zip(g, xhat)) / D)  # (RMS.8)
        assert sp.simplify(chain - claimed) == 0, j


@pytest.mark.derivation("RMS.8")
@given(shapes(1, 3), rngs())
def test_dx_formula(shape, rng):
    x, w, dy = make(rng, shape, np.float64)
    ours, oracle = run_both(x, w, dy)
    assert_close(ours[1], oracle[1], scale=term_scales(x, w, dy)["dx"], what="dx vs torch")


@pytest.mark.derivation("RMS.8")
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5, 8])), rngs())
def test_dx_orthogonal_to_xhat(shape, rng):
    x, w, dy = make(rng, shape, np.float64)
    _, cache = rmsnorm_forward(x, w, eps=0.0)
    dx, _ = rmsnorm_backward(dy, cache)
    scale = (cache.rstd * np.abs(dy * w)).max() * shape[-1]
    assert np.all(np.abs((dx * cache.xhat).sum(-1)) <= 1e-13 * scale)


# D >= 2: for D = 1 the normalised value is sign(x) up to eps and its gradient is round-off.
@given(shapes(1, 3, sides=st.sampled_from([2, 3, 5])), rngs())
def test_finite_differences(shape, rng):
    x, w, _ = make(rng, shape, np.float64)
    results = gradcheck.check(rmsnorm_forward, rmsnorm_backward, {"x": x, "weight": w}, wrt=("x", "weight"),
                              options={"eps": EPS})
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones((2, 4)), np.ones(3)), "rmsnorm_forward: argument 'weight' expected shape (4,), got (3,)"),
        ((np.ones((2, 4), np.float32), np.ones(4)), "argument 'weight' expected dtype float32 (same as 'x'), got float64"),
        ((np.ones(()), np.ones(1)), "argument 'x' expected at least 1 dimensions, got 0"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError) as err:
        rmsnorm_forward(*args)
    assert message in str(err.value)
