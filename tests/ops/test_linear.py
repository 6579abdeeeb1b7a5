"""Linear: torch oracle in every memory layout, finite differences, the equations of
proofs/linear.md, zero sizes, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.embedding import embedding_forward
from npformer.ops.linear import LinearCache, linear_backward, linear_forward
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_EPS, FD_RTOL, assert_close

INPUTS = ("x", "W", "b", "dy")


def make(rng, lead, d_in, d_out, dtype, scale=1.0, bias=True):
    x = randn(rng, lead + (d_in,), dtype, scale)
    W = randn(rng, (d_out, d_in), dtype)
    b = randn(rng, (d_out,), dtype) if bias else None
    dy = randn(rng, lead + (d_out,), dtype)
    return x, W, b, dy


def run_both(x, W, b, dy, layout=None):
    """npformer (inputs in the given layouts, none written to) and the float64 torch oracle on the same values."""
    layout = layout or dict.fromkeys(INPUTS, "contiguous")
    values = dict(zip(INPUTS, (x, W, b, dy)))
    args = {name: None if a is None else in_layout(a, layout[name]) for name, a in values.items()}
    y, cache = linear_forward(args["x"], args["W"], args["b"])
    ours = (y, *linear_backward(args["dy"], cache))
    for name, a in args.items():
        if a is not None:
            np.testing.assert_array_equal(a, values[name], err_msg=f"{name} was written to")
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
input_layouts = st.fixed_dictionaries({name: layouts() for name in INPUTS})


@pytest.mark.derivation("LIN.1")
@given(cases, input_layouts)
def test_linear_matches_torch(case, layout):
    """Every input (dy included) in every memory layout."""
    lead, d_in, d_out, dtype, scale, bias, rng = case
    inputs = make(rng, lead, d_in, d_out, dtype, scale, bias)
    ours, oracle = run_both(*inputs, layout=layout)
    s = scales(*inputs)
    for name, a, b in zip(("y", "dx", "dW", "db"), ours, oracle):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_close(a, b, scale=s[name], what=name)


def jacobian(f, a):
    """d f() / d a by central differences in float64 (``gradcheck.numerical_gradient`` of each entry of
    f()), of shape f().shape + a.shape; ``f`` reads ``a``, which is perturbed in place and restored."""
    shape = f().shape
    rows = [gradcheck.numerical_gradient(lambda: f()[i], a, FD_EPS) for i in np.ndindex(shape)]
    return np.stack(rows).reshape(shape + a.shape) if rows else np.zeros(shape + a.shape)


@pytest.mark.derivation("LIN.2")
@given(SIDES, SIDES, SIDES, rngs())
def test_partial_derivatives(n, d_in, d_out, rng):
    """(LIN.2) entry by entry: the Jacobians of y = linear_forward(x, W, b) by central differences in float64
    are delta_nm W_ki, delta_kl x_nj and delta_kl (the identity for b), built here from the equation."""
    x, W, b, _ = make(rng, (n,), d_in, d_out, np.float64)
    y = lambda: linear_forward(x, W, b)[0]  # noqa: E731
    claimed = {
        "x": np.einsum("nm,ki->nkmi", np.eye(n), W),  # dy_nk / dx_mi
        "W": np.einsum("kl,nj->nklj", np.eye(d_out), x),  # dy_nk / dW_lj
        "b": np.broadcast_to(np.eye(d_out), (n, d_out, d_out)),  # dy_nk / db_l
    }
    for name, a in (("x", x), ("W", W), ("b", b)):
        assert_close(jacobian(y, a), claimed[name], rtol=FD_RTOL, what=f"dy/d{name} vs (LIN.2)")


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


@pytest.mark.derivation("LIN.1")
@given(DTYPES, st.sampled_from([(0,), (2, 0), (0, 3)]), st.sampled_from([0, 1, 4]), st.sampled_from([0, 1, 3]),
       st.booleans(), rngs())
def test_zero_sizes_are_empty_sums(dtype, lead, d_in, d_out, bias, rng):
    """N, Din or Dout of 0: the same results as torch (an empty sum is 0, so Din = 0 gives y = b)."""
    inputs = make(rng, lead, d_in, d_out, dtype, bias=bias)
    ours, oracle = run_both(*inputs)
    for name, a, b in zip(("y", "dx", "dW", "db"), ours, oracle):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == dtype, name
        assert_close(a, b, scale=1.0, what=name)


# ---- bad input --------------------------------------------------------------------------------

X_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + ("0-d",)
# first+1 is another Dout: legal
W_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + ("last+1", "other float")
B_KINDS = ("list", "tuple", "scalar", "string") + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + (
    "other float",)
EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)


def bad(a, kind):
    if kind == "other float":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    if kind == "0-d":
        return np.asarray(a.reshape(-1)[0])
    return corrupt(a, kind)


@st.composite
def valid(draw):
    lead, d_in, d_out, dtype, rng = draw(shapes(0, 2)), draw(SIDES), draw(SIDES), draw(DTYPES), draw(rngs())
    return dict(zip(INPUTS, make(rng, lead, d_in, d_out, dtype)))


@pytest.mark.parametrize("arg, kinds", [("x", X_KINDS), ("W", W_KINDS), ("b", B_KINDS)])
@given(data=st.data(), a=valid())
def test_forward_rejects_bad_arrays(arg, kinds, data, a):
    a[arg] = bad(a[arg], data.draw(st.sampled_from(kinds), label="kind"))
    expect_rejected(lambda: linear_forward(a["x"], a["W"], a["b"]), "linear_forward", arg)


@given(st.sampled_from(EXACT_KINDS), valid(), st.booleans())
def test_backward_rejects_bad_dy(kind, a, bias):
    """dy must be a float array of shape x.shape[:-1] + (Dout,) and x's dtype."""
    _, cache = linear_forward(a["x"], a["W"], a["b"] if bias else None)
    bad_dy = bad(a["dy"], kind)
    expect_rejected(lambda: linear_backward(bad_dy, cache), "linear_backward", "dy")


@given(st.sampled_from(["tuple", "none", "other op"]), valid())
def test_backward_rejects_a_cache_it_did_not_make(kind, a):
    _, cache = linear_forward(a["x"], a["W"], a["b"])
    assert isinstance(cache, LinearCache)
    wrong = {"tuple": tuple(cache), "none": None, "other op": embedding_forward(np.zeros(2, np.int64), a["W"])[1]}
    expect_rejected(lambda: linear_backward(a["dy"], wrong[kind]), "linear_backward", "cache")


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.ones((2, 4)), np.ones((3, 5))), "linear_forward: argument 'W' expected shape (*, 4), got (3, 5)"),
        ((np.ones((2, 4)), np.ones((3, 4)), np.ones(4)), "linear_forward: argument 'b' expected shape (3,), got (4,)"),
        ((np.ones((2, 4), np.float32), np.ones((3, 4))), "argument 'W' expected dtype float32 (same as 'x'), got float64"),
        ((np.ones((2, 4), np.int32), np.ones((3, 4))), "argument 'x' expected dtype float32 or float64, got int32"),
        ((np.ones(4), np.ones(4)), "argument 'W' expected shape (*, 4), got (4,)"),
        ((np.ones(4), np.ones((3, 4)), [0.0, 0.0, 0.0]), "argument 'b' expected a numpy.ndarray, got list"),
    ],
)
def test_messages_say_what_was_expected_and_what_came(args, message):
    assert message in expect_rejected(lambda: linear_forward(*args), "linear_forward", message.split("'")[1])


def test_backward_message_names_dy():
    _, cache = linear_forward(np.ones((2, 4)), np.ones((3, 4)))
    message = expect_rejected(lambda: linear_backward(np.ones((3, 2)), cache), "linear_backward", "dy")
    assert "linear_backward: argument 'dy' expected shape (2, 3), got (3, 2)" in message
