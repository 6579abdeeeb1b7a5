"""Embedding: torch oracle in every memory layout, finite differences, the equations of
proofs/embedding.md, empty input, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.embedding import EmbeddingCache, embedding_backward, embedding_forward
from npformer.ops.linear import linear_forward
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SIDES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

INPUTS = ("ids", "W", "dout")


def dW_scale(ids, dout):
    """dW rows sum up to (number of repeats) gradients: round-off is relative to that sum of magnitudes."""
    return float(np.abs(dout).sum(axis=tuple(range(ids.ndim))).max(initial=0)) if ids.size else 0.0


@pytest.mark.derivation("EMB.1")
@pytest.mark.derivation("EMB.3")
@given(shapes(0, 3), SIDES, SIDES, DTYPES, st.fixed_dictionaries({name: layouts() for name in INPUTS}), rngs())
def test_embedding_matches_torch(id_shape, V, D, dtype, layout, rng):
    """ids, W and dout in every memory layout; none of them is written to."""
    ids = rng.integers(0, V, size=id_shape)
    W = randn(rng, (V, D), dtype)
    dout = randn(rng, id_shape + (D,), dtype)
    # (a 0-d ids array has no layout to vary)
    args = {name: a if a.ndim == 0 else in_layout(a, layout[name]) for name, a in zip(INPUTS, (ids, W, dout))}
    out, cache = embedding_forward(args["ids"], args["W"])
    dW = embedding_backward(args["dout"], cache)
    for name, a in zip(INPUTS, (ids, W, dout)):
        np.testing.assert_array_equal(args[name], a, err_msg=f"{name} was written to")
    tW = leaf(W)
    tout = torch.nn.functional.embedding(torch.from_numpy(ids), tW)
    (tdW,) = backprop(tout, dout, tW)
    assert out.dtype == dW.dtype == dtype
    assert_close(out, tout.detach().numpy(), what="out")
    assert_close(dW, tdW, scale=dW_scale(ids, dout), what="dW")


@pytest.mark.derivation("EMB.2")
@given(shapes(0, 3), st.sampled_from([1, 2, 3, 7]), SIDES, DTYPES, rngs())
def test_lookup_is_the_one_hot_product(id_shape, V, D, dtype, rng):
    """(EMB.2): Out = E W, with the one-hot E_nv = [t_n = v] built densely. Each row of E holds a single 1,
    so the product picks a row of W exactly, and the lookup must equal it bit for bit."""
    ids = rng.integers(0, V, size=id_shape)
    W = randn(rng, (V, D), dtype)
    out, _ = embedding_forward(ids, W)
    E = (ids.reshape(-1, 1) == np.arange(V)).astype(np.float64)  # (N, V)
    assert np.all(E.sum(1) == 1)
    expected = (E @ W.astype(np.float64)).reshape(id_shape + (D,))  # (EMB.2)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)


@pytest.mark.derivation("EMB.3")
@given(shapes(0, 3), st.sampled_from([1, 2, 3, 7]), SIDES, DTYPES, rngs())
def test_dW_is_the_one_hot_product(id_shape, V, D, dtype, rng):
    """(EMB.3) in its matrix form: dW = E^T dOut, with the one-hot E of (EMB.2) built densely here."""
    ids = rng.integers(0, V, size=id_shape)  # few rows: repeated ids are likely
    W = randn(rng, (V, D), dtype)
    dout = randn(rng, id_shape + (D,), dtype)
    _, cache = embedding_forward(ids, W)
    E = (ids.reshape(-1, 1) == np.arange(V)).astype(np.float64)  # (N, V), (EMB.2)
    expected = E.T @ dout.reshape(-1, D).astype(np.float64)  # (EMB.3)
    assert_close(embedding_backward(dout, cache), expected, scale=dW_scale(ids, dout), what="dW vs E^T dOut")


@pytest.mark.derivation("EMB.3")
def test_repeated_ids_add_up():
    W = np.zeros((4, 2))
    ids = np.array([2, 0, 2, 2])
    dout = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    _, cache = embedding_forward(ids, W)
    dW = embedding_backward(dout, cache)
    # Row 2 is looked up three times: 1 + 3 + 4; row 0 once; rows 1 and 3 never.
    np.testing.assert_array_equal(dW, [[2.0, 20.0], [0.0, 0.0], [8.0, 80.0], [0.0, 0.0]])


@given(shapes(1, 2, sides=st.sampled_from([1, 3, 6])), rngs())
def test_finite_differences(id_shape, rng):
    ids = rng.integers(0, 3, size=id_shape)  # few rows: repeats are certain for larger shapes
    results = gradcheck.check(embedding_forward, embedding_backward, {"ids": ids, "W": rng.standard_normal((3, 4))},
                              wrt=("W",))
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


@given(DTYPES, shapes(1, 3).map(lambda s: (0,) + s[1:]), st.sampled_from([0, 1, 5]), st.sampled_from([0, 1, 3]))
def test_no_ids_gives_empty_output_and_zero_gradient(dtype, id_shape, V, D):
    """No ids (even with a table of no rows or no columns): an empty lookup and a zero dW."""
    out, cache = embedding_forward(np.zeros(id_shape, np.int64), np.ones((V, D), dtype))
    dW = embedding_backward(np.zeros(id_shape + (D,), dtype), cache)
    assert out.shape == id_shape + (D,) and out.dtype == dtype
    assert dW.shape == (V, D) and dW.dtype == dtype and not dW.any()


# ---- bad input ------------------------------------------------------------------------------

# ids: any integer dtype is fine; floats, bools, complex and objects are not ids.
IDS_KINDS = NON_ARRAYS + SUBCLASS_KINDS + (
    "bool", "float16", "complex128", "object", "float32", "float64", "too large", "negative")
W_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS
EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)


def bad(a, kind, V=None):
    if kind == "other float":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    if kind in ("float32", "float64"):
        return a.astype(kind)
    if kind == "too large":
        out = a.copy()
        out.flat[-1] = V
        return out
    if kind == "negative":
        out = a.copy()
        out.flat[0] = -1  # no wrap-around to the last row
        return out
    return corrupt(a, kind)


@st.composite
def valid(draw):
    id_shape, V, D, dtype, rng = draw(shapes(1, 3)), draw(SIDES), draw(SIDES), draw(DTYPES), draw(rngs())
    return {"ids": rng.integers(0, V, size=id_shape), "W": randn(rng, (V, D), dtype),
            "dout": randn(rng, id_shape + (D,), dtype)}


@pytest.mark.parametrize("arg, kinds", [("ids", IDS_KINDS), ("W", W_KINDS)])
@given(data=st.data(), a=valid())
def test_forward_rejects_bad_arrays(arg, kinds, data, a):
    a[arg] = bad(a[arg], data.draw(st.sampled_from(kinds), label="kind"), V=a["W"].shape[0])
    expect_rejected(lambda: embedding_forward(a["ids"], a["W"]), "embedding_forward", arg)


@given(st.sampled_from(EXACT_KINDS), valid())
def test_backward_rejects_bad_dout(kind, a):
    """dout must be a float array of shape ids.shape + (D,) and W's dtype."""
    _, cache = embedding_forward(a["ids"], a["W"])
    bad_dout = bad(a["dout"], kind)
    expect_rejected(lambda: embedding_backward(bad_dout, cache), "embedding_backward", "dout")


@given(st.sampled_from(["tuple", "none", "other op"]), valid())
def test_backward_rejects_a_cache_it_did_not_make(kind, a):
    _, cache = embedding_forward(a["ids"], a["W"])
    assert isinstance(cache, EmbeddingCache)
    W = a["W"]
    wrong = {"tuple": tuple(cache), "none": None, "other op": linear_forward(W, W)[1]}[kind]
    expect_rejected(lambda: embedding_backward(a["dout"], wrong), "embedding_backward", "cache")


def test_messages_say_what_was_expected_and_what_came():
    W = np.ones((5, 2))
    cases = [
        (lambda: embedding_forward(np.array([0, 5]), W),
         "embedding_forward: argument 'ids' expected values in [0, 5), got 5"),
        (lambda: embedding_forward(np.array([-1, 2]), W),
         "embedding_forward: argument 'ids' expected values in [0, 5), got -1"),
        (lambda: embedding_forward(np.array([0.0, 1.0]), W),
         "embedding_forward: argument 'ids' expected an integer dtype, got float64"),
        (lambda: embedding_forward([0, 1], W), "embedding_forward: argument 'ids' expected a numpy.ndarray, got list"),
        (lambda: embedding_forward(np.array([0]), np.ones(5)),
         "embedding_forward: argument 'W' expected 2 dimensions, got 1"),
        (lambda: embedding_backward(np.ones((3, 2)), embedding_forward(np.array([0, 1]), W)[1]),
         "embedding_backward: argument 'dout' expected shape (2, 2), got (3, 2)"),
    ]
    for call, message in cases:
        assert message in expect_rejected(call, message.split(":")[0], message.split("'")[1])
