"""Dropout: reproducible masks, torch with the same mask in every memory layout, the equations of
proofs/dropout.md, empty input, bad input (nothing drawn from the generator when refused)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.dropout import DropoutCache, dropout_backward, dropout_forward, dropout_mask
from npformer.ops.rmsnorm import rmsnorm_forward
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, assert_close

PS = st.sampled_from([0.0, 0.1, 0.5, 0.9])
INPUTS = ("x", "dy", "mask")


@pytest.mark.derivation("DO.2")
@given(shapes(0, 3), DTYPES, PS, st.booleans(), st.fixed_dictionaries({name: layouts() for name in INPUTS}), rngs())
def test_dropout_matches_torch_with_same_mask(shape, dtype, p, explicit_mask, layout, rng):
    """x, dy and a given mask in every memory layout (0-d included); none of them is written to.
    A given mask is applied at every p, p = 0 included (scale 1); results are arrays, 0-d ones too."""
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    mask = np.asarray(rng.random(shape) >= p) if explicit_mask else None
    args = {name: in_layout(a, layout[name]) for name, a in (("x", x), ("dy", dy), ("mask", mask)) if a is not None}
    y, cache = dropout_forward(args["x"], p, rng, mask=args.get("mask"))
    dx = dropout_backward(args["dy"], cache)
    for name, a in (("x", x), ("dy", dy), ("mask", mask)):
        if a is not None:
            np.testing.assert_array_equal(args[name], a, err_msg=f"{name} was written to")
    used = np.ones(shape, bool) if cache.mask is None else cache.mask
    if explicit_mask:
        np.testing.assert_array_equal(used, mask)
    assert isinstance(y, np.ndarray) and isinstance(dx, np.ndarray) and y.shape == dx.shape == shape
    tx = leaf(x)
    ty = tx * torch.from_numpy(np.array(used)) / (1 - p)  # torch's dropout formula with our mask
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


@pytest.mark.derivation("DO.2")
@pytest.mark.derivation("DO.3")
@given(shapes(0, 3), DTYPES, st.sampled_from([0.0, 0.1, 0.4, 0.9]), rngs())
def test_backward_uses_the_same_mask(shape, dtype, p, rng):
    """With a mask chosen here (any mask goes with any p, p = 0 included): y = s m x (DO.2) and
    dx = s m dy (DO.3), s = 1 / (1 - p), in float64; arrays of x's shape, 0-d included."""
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    m = np.asarray(rng.random(shape) >= 0.5)  # an array for shape () too
    y, cache = dropout_forward(x, p, None, mask=m)
    dx = dropout_backward(dy, cache)
    assert isinstance(y, np.ndarray) and isinstance(dx, np.ndarray) and y.shape == dx.shape == shape
    s = 1.0 / (1.0 - p)
    assert_close(y, s * m * x.astype(np.float64), scale=s * float(np.abs(x).max()), what="y vs (DO.2)")
    assert_close(dx, s * m * dy.astype(np.float64), scale=s * float(np.abs(dy).max()), what="dx vs (DO.3)")
    np.testing.assert_array_equal(dx == 0, ~m)


@pytest.mark.derivation("DO.3")
@given(shapes(0, 3), DTYPES, st.sampled_from([0.0, 0.5]), rngs())
def test_cache_keeps_its_own_mask(shape, dtype, p, rng):
    """The caller's mask may be reused or changed after the forward: the backward keeps what it was."""
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    mask = np.asarray(rng.random(shape) >= 0.5)
    kept = mask.copy()
    _, cache = dropout_forward(x, p, None, mask=mask)
    mask[...] = ~mask  # the caller's buffer, reused
    dx = dropout_backward(dy, cache)
    np.testing.assert_array_equal(dx, dy * kept / dtype(1 - p))
    np.testing.assert_array_equal(cache.mask, kept)


@given(shapes(0, 3), st.sampled_from([0.0, 0.5]), rngs())
def test_a_mask_in_evaluation_is_refused(shape, p, rng):
    """Evaluation is the identity: a mask there would be ignored, so it is refused, naming it."""
    x = randn(rng, shape)
    mask = np.asarray(rng.random(shape) >= 0.5)
    message = expect_rejected(lambda: dropout_forward(x, p, rng, training=False, mask=mask), "dropout_forward", "mask")
    assert "None when 'training' is False" in message


@given(shapes(1, 2), rngs())
def test_finite_differences(shape, rng):
    mask = rng.random(shape) >= 0.5
    results = gradcheck.check(dropout_forward, dropout_backward, {"x": randn(rng, shape)}, wrt=("x",),
                              options={"p": 0.5, "rng": None, "mask": mask})
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


@given(DTYPES, shapes(1, 3).map(lambda s: (0,) + s[1:]), PS, st.booleans())
def test_empty_in_empty_out(dtype, shape, p, training):
    x = np.zeros(shape, dtype)
    y, cache = dropout_forward(x, p, np.random.default_rng(0), training=training)
    dx = dropout_backward(np.zeros(shape, dtype), cache)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    assert dropout_mask(shape, p, np.random.default_rng(0)).shape == shape


# ---- bad input ----------------------------------------------------------------------------

X_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS
# A mask is bool: 0/1 numbers (floats, ints) are refused rather than taken as a scale.
MASK_KINDS = ("list", "tuple", "scalar", "string", "float64", "float32", "int64", "uint8", "object") + (
    SUBCLASS_KINDS + RANK_KINDS + SHAPE_KINDS)
EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
BAD = {
    "p": (-0.1, 1.0, 1.5, float("nan"), float("inf"), True, None, "0.5", [0.5]),
    "rng": (None, 7, "seed", np.random.RandomState(0)),
    "training": (1, 0, "yes", None, np.array(True)),
}


def bad(a, kind):
    if kind == "other float":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    if kind in ("float64", "float32"):
        return a.astype(kind)
    return corrupt(a, kind)


@st.composite
def valid(draw):
    shape, dtype, rng = draw(shapes(1, 3)), draw(DTYPES), draw(rngs())
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    return {"x": x, "p": draw(st.sampled_from([0.1, 0.5])), "rng": rng, "training": True,
            "mask": rng.random(shape) >= 0.5, "dy": dy}


def forward(a, **changes):
    a = {**a, **changes}
    return lambda: dropout_forward(a["x"], a["p"], a["rng"], training=a["training"], mask=a["mask"])


@pytest.mark.parametrize("arg, kinds", [("x", X_KINDS), ("mask", MASK_KINDS)])
@given(data=st.data(), a=valid())
def test_forward_rejects_bad_arrays_and_draws_nothing(arg, kinds, data, a):
    state = a["rng"].bit_generator.state
    expect_rejected(forward(a, **{arg: bad(a[arg], data.draw(st.sampled_from(kinds), label="kind"))}),
                    "dropout_forward", arg)
    assert a["rng"].bit_generator.state == state


@pytest.mark.parametrize("arg", list(BAD))
@given(data=st.data(), a=valid())
def test_forward_rejects_bad_options(arg, data, a):
    value = data.draw(st.sampled_from(BAD[arg]), label=arg)
    changes = {arg: value, "mask": None} if arg == "rng" else {arg: value}  # the generator is needed without a mask
    expect_rejected(forward(a, **changes), "dropout_forward", arg)


@given(st.sampled_from(EXACT_KINDS), valid(), st.booleans())
def test_backward_rejects_bad_dy(kind, a, training):
    """dy must match x's shape and dtype, in training and in evaluation (an integer dy would truncate s dy)."""
    _, cache = dropout_forward(a["x"], a["p"], a["rng"], training=training)
    bad_dy = bad(a["dy"], kind)
    expect_rejected(lambda: dropout_backward(bad_dy, cache), "dropout_backward", "dy")


@given(st.sampled_from(["tuple", "none", "other op"]), valid())
def test_backward_rejects_a_cache_it_did_not_make(kind, a):
    _, cache = dropout_forward(a["x"], a["p"], a["rng"])
    assert isinstance(cache, DropoutCache)
    x = a["x"]
    wrong = {"tuple": tuple(cache), "none": None, "other op": rmsnorm_forward(x, np.ones(x.shape[-1], x.dtype))[1]}
    expect_rejected(lambda: dropout_backward(a["dy"], wrong[kind]), "dropout_backward", "cache")


@given(st.sampled_from([("shape", -1), ("shape", (2, -1)), ("shape", "3"), ("shape", (2.0,)), ("shape", None),
                        ("shape", True), ("p", 1.0), ("p", -0.5), ("p", float("nan")), ("rng", None), ("rng", 3)]))
def test_dropout_mask_rejects_bad_arguments(case):
    arg, value = case
    a = {"shape": (2, 3), "p": 0.5, "rng": np.random.default_rng(0), **{arg: value}}
    expect_rejected(lambda: dropout_mask(a["shape"], a["p"], a["rng"]), "dropout_mask", arg)


def test_messages_say_what_was_expected_and_what_came():
    rng = np.random.default_rng(0)
    cases = [
        (lambda: dropout_forward(np.ones(3), 1.0, rng),
         "dropout_forward: argument 'p' expected a finite real number in [0.0, 1.0), got 1.0"),
        (lambda: dropout_forward(np.ones(3, np.int64), 0.5, rng),
         "dropout_forward: argument 'x' expected dtype float32 or float64, got int64"),
        (lambda: dropout_forward(np.ones(3), 0.5, None, mask=np.ones(4, bool)),
         "dropout_forward: argument 'mask' expected shape (3,), got (4,)"),
        (lambda: dropout_forward(np.ones(3), 0.5, None, mask=np.ones(3)),
         "dropout_forward: argument 'mask' expected dtype bool (True = kept), got float64"),
        (lambda: dropout_forward(np.ones(3), 0.5, None),
         "dropout_forward: argument 'rng' expected a numpy.random.Generator, got NoneType"),
        (lambda: dropout_backward(np.ones(3, np.int64), dropout_forward(np.ones(3), 0.5, rng)[1]),
         "dropout_backward: argument 'dy' expected dtype float32 or float64, got int64"),
    ]
    for call, message in cases:
        assert message in expect_rejected(call, message.split(":")[0], message.split("'")[1])
