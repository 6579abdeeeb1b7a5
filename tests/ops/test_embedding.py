"""Embedding: torch oracle, finite differences, the equations of proofs/embedding.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.embedding import embedding_backward, embedding_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SIDES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close


@pytest.mark.derivation("EMB.1")
@pytest.mark.derivation("EMB.3")
@given(shapes(0, 3), SIDES, SIDES, DTYPES, rngs())
def test_embedding_matches_torch(id_shape, V, D, dtype, rng):
    ids = rng.integers(0, V, size=id_shape)
    W = randn(rng, (V, D), dtype)
    dout = randn(rng, id_shape + (D,), dtype)
    out, cache = embedding_forward(ids, W)
    dW = embedding_backward(dout, cache)
    tW = leaf(W)
    tout = torch.nn.functional.embedding(torch.from_numpy(ids), tW)
    (tdW,) = backprop(tout, dout, tW)
    assert out.dtype == dW.dtype == dtype
    assert_close(out, tout.detach().numpy(), what="out")
    # dW rows sum up to (number of repeats) gradients: round-off relative to that sum of magnitudes.
    scale = float(np.abs(dout).sum(axis=tuple(range(ids.ndim))).max(initial=0)) if ids.size else 0.0
    assert_close(dW, tdW, scale=scale, what="dW")


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


@pytest.mark.parametrize(
    "ids, message",
    [
        (np.array([0, 5]), "embedding_forward: argument 'ids' expected values in [0, 5), got 5"),
        (np.array([-1, 2]), "embedding_forward: argument 'ids' expected values in [0, 5), got -1"),
        (np.array([0.0, 1.0]), "embedding_forward: argument 'ids' expected an integer dtype, got float64"),
    ],
)
def test_bad_ids_are_named(ids, message):
    with pytest.raises(ValueError) as err:
        embedding_forward(ids, np.ones((5, 2)))
    assert message in str(err.value)


def test_bad_table_and_gradient_are_named():
    with pytest.raises(ValueError, match="embedding_forward: argument 'W' expected 2 dimensions, got 1"):
        embedding_forward(np.array([0]), np.ones(5))
    _, cache = embedding_forward(np.array([0, 1]), np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"embedding_backward: argument 'dout' expected shape \(2, \*\), got \(3, 2\)"):
        embedding_backward(np.ones((3, 2)), cache)
