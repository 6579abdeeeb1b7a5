"""Linear: torch oracle, finite differences, the equations of proofs/linear.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.linear import linear_backward, linear_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, SIDES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close


def make(rng, lead, d_in, d_out, dtype, scale=1.0, bias=True):
    x = randn(rng, lead + (d_in,), dtype, scale)
    W = randn(rng, (d_out, d_in), dtype)
    b = randn(rng, (d_out,), dtype) if bias else None
    dy = randn(rng, lead + (d_out,), dtype)
    return x, W, b, dy


def run_both(x, W, b, dy):
    y, cache = linear_forward(x, W, b)
    ours = (y, *linear_backward(dy, cache))
    tx, tW = leaf(x), leaf(W)
    tb = None if b is None else leaf(b)
    ty = torch.nn.functional.linear(tx, tW, tb)
    grads = backprop(ty, dy, *([tx, tW] if b is None else [tx, tW, tb]))
    return ours, (ty.detach().numpy(), *grads, *([None] if b is None else []))


def scales(x, W, b, dy):
    """Sums of absolute terms: the size each result's round-off is relative to."""
    ax, aW, ady = (np.abs(a.astype(np.float64)) for a in (x, W, dy))
    d_in, d_out = W.shape[1], W.shape[0]
    return {
        "y": float((ax.reshape(-1, d_in) @ aW.T).max(initial=0)) + (0 if b is None else float(np.abs(b).max())),
        "dx": float((ady.reshape(-1, d_out) @ aW).max(initial=0)),
        "dW": float((ady.reshape(-1, d_out).T @ ax.reshape(-1, d_in)).max(initial=0)),
        "db": float(ady.reshape(-1, d_out).sum(0).max(initial=0)),
    }


cases = st.tuples(shapes(0, 2), SIDES, SIDES, DTYPES, SCALES, st.booleans(), rngs())


@pytest.mark.derivation("LIN.1")
@given(cases)
def test_linear_matches_torch(case):
    lead, d_in, d_out, dtype, scale, bias, rng = case
    inputs = make(rng, lead, d_in, d_out, dtype, scale, bias)
    ours, oracle = run_both(*inputs)
    s = scales(*inputs)
    for name, a, b in zip(("y", "dx", "dW", "db"), ours, oracle):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_close(a, b, scale=s[name], what=name)


@pytest.mark.derivation("LIN.3")
@given(shapes(1, 3), SIDES, rngs())
def test_dx_formula(shape, d_out, rng):
    x, W, b, dy = make(rng, shape[:-1], shape[-1], d_out, np.float64)
    _, cache = linear_forward(x, W, b)
    dx, _, _ = linear_backward(dy, cache)
    assert_close(dx, np.einsum("...k,ki->...i", dy, W), what="dx vs (LIN.3)")


@pytest.mark.derivation("LIN.4")
@given(shapes(1, 3), SIDES, rngs())
def test_dW_formula(shape, d_out, rng):
    x, W, b, dy = make(rng, shape[:-1], shape[-1], d_out, np.float64)
    ours, oracle = run_both(x, W, b, dy)
    assert_close(ours[2], oracle[2], scale=scales(x, W, b, dy)["dW"], what="dW vs torch")
    assert_close(ours[2], dy.reshape(-1, d_out).T @ x.reshape(-1, shape[-1]), scale=scales(x, W, b, dy)["dW"], what="dW vs (LIN.4)")


@pytest.mark.derivation("LIN.5")
@given(shapes(1, 3), SIDES, rngs())
def test_db_formula(shape, d_out, rng):
    x, W, b, dy = make(rng, shape[:-1], shape[-1], d_out, np.float64)
    _, cache = linear_forward(x, W, b)
    _, _, db = linear_backward(dy, cache)
    assert_close(db, dy.reshape(-1, d_out).sum(0), what="db vs (LIN.5)")


@given(shapes(1, 3), SIDES, st.booleans(), rngs())
def test_finite_differences(shape, d_out, bias, rng):
    x, W, b, _ = make(rng, shape[:-1], shape[-1], d_out, np.float64, bias=bias)
    inputs = {"x": x, "W": W, **({"b": b} if bias else {})}
    results = gradcheck.check(linear_forward, linear_backward, inputs, wrt=("x", "W", "b" if bias else None))
    assert [r.input for r in results] == ["x", "W"] + (["b"] if bias else [])
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones((2, 4)), np.ones((3, 5))), "linear_forward: argument 'W' expected shape (*, 4), got (3, 5)"),
        ((np.ones((2, 4)), np.ones((3, 4)), np.ones(4)), "linear_forward: argument 'b' expected shape (3,), got (4,)"),
        ((np.ones((2, 4), np.float32), np.ones((3, 4))), "argument 'W' expected dtype float32 (same as 'x'), got float64"),
        ((np.ones((2, 4), np.int32), np.ones((3, 4))), "argument 'x' expected dtype float32 or float64, got int32"),
        ((np.ones(4), np.ones(4)), "argument 'W' expected shape (*, 4), got (4,)"),
    ],
)
def test_bad_input_is_named(args, message):
    with pytest.raises(ValueError) as err:
        linear_forward(*args)
    assert message in str(err.value)


def test_backward_rejects_wrong_dy_shape():
    _, cache = linear_forward(np.ones((2, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"linear_backward: argument 'dy' expected shape \(2, 3\), got \(3, 2\)"):
        linear_backward(np.ones((3, 2)), cache)
