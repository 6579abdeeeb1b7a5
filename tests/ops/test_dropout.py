"""Dropout: reproducible masks, torch with the same mask, the equations of proofs/dropout.md."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.dropout import dropout_backward, dropout_forward
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

PS = st.sampled_from([0.0, 0.1, 0.5, 0.9])


@pytest.mark.derivation("DO.2")
@given(shapes(1, 3), DTYPES, PS, rngs())
def test_dropout_matches_torch_with_same_mask(shape, dtype, p, rng):
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    y, cache = dropout_forward(x, p, rng)
    dx = dropout_backward(dy, cache)
    mask = np.ones(shape, bool) if cache.mask is None else cache.mask
    tx = leaf(x)
    ty = tx * torch.from_numpy(mask) / (1 - p)  # torch's dropout formula with our mask
    (tdx,) = backprop(ty, dy, tx)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, ty.detach().numpy(), what="y")
    assert_close(dx, tdx, what="dx")


def test_same_seed_same_mask_and_identity_draws_nothing():
    x = np.ones((4, 8))
    y1, _ = dropout_forward(x, 0.5, np.random.default_rng(7))
    y2, _ = dropout_forward(x, 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(y1, y2)
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    for kwargs in ({"p": 0.0}, {"p": 0.5, "training": False}):
        y, cache = dropout_forward(x, rng=rng, **kwargs)
        assert y is x and cache.mask is None
    assert rng.bit_generator.state == state


@pytest.mark.derivation("DO.1")
def test_keep_rate():
    p, n = 0.3, 200_000
    _, cache = dropout_forward(np.ones(n), p, np.random.default_rng(0))
    # Binomial(n, 0.7): standard deviation of the kept fraction is sqrt(0.21 / n) ~ 1e-3; allow 5 of them.
    assert abs(cache.mask.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)


@pytest.mark.derivation("DO.2")
def test_mean_is_preserved():
    x = np.full(200_000, 2.0)
    y, _ = dropout_forward(x, 0.25, np.random.default_rng(1))
    assert set(np.unique(y)) == {0.0, 2.0 / 0.75}
    assert abs(y.mean() - 2.0) < 5 * 2.0 / 0.75 * np.sqrt(0.25 * 0.75 / y.size)


@pytest.mark.derivation("DO.3")
@given(shapes(1, 3), rngs())
def test_backward_uses_the_same_mask(shape, rng):
    x, dy = randn(rng, shape), randn(rng, shape)
    y, cache = dropout_forward(x, 0.4, rng)
    dx = dropout_backward(dy, cache)
    np.testing.assert_array_equal(dx == 0, ~cache.mask)
    assert_close(dx, dy * cache.mask / 0.6, what="dx vs (DO.3)")


@given(shapes(1, 2), rngs())
def test_finite_differences(shape, rng):
    mask = rng.random(shape) >= 0.5
    results = gradcheck.check(dropout_forward, dropout_backward, {"x": randn(rng, shape)}, wrt=("x",),
                              options={"p": 0.5, "rng": None, "mask": mask})
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"dropout_forward: argument 'p' expected a value in \[0.0, 1.0\), got 1.0"):
        dropout_forward(np.ones(3), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="dropout_forward: argument 'x' expected dtype float32 or float64, got int64"):
        dropout_forward(np.ones(3, np.int64), 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"dropout_forward: argument 'mask' expected shape \(3,\), got \(4,\)"):
        dropout_forward(np.ones(3), 0.5, None, mask=np.ones(4, bool))
