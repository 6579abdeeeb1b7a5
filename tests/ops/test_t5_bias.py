"""T5 relative position bias: buckets vs a torch re-implementation, table gradient vs autograd (proofs/t5_bias.md)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.t5_bias import t5_bias_backward, t5_bias_forward, t5_relative_bucket
from tests.badinput import (
    ARRAY_KINDS,
    BAD_COUNTS,
    BAD_FLAGS,
    DTYPE_KINDS,
    NON_ARRAYS,
    RANK_KINDS,
    SUBCLASS_KINDS,
    corrupt,
    other_float,
    rejects_all,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SIDES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, assert_close

NUM_BUCKETS = st.sampled_from([4, 6, 8, 16, 32, 64])
MAX_DISTANCES = st.sampled_from([5, 8, 16, 20, 128, 1000])


def torch_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """Hugging Face T5's bucketing rule in torch (long positions, float32 logarithm)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


def torch_bias(table, Tq, Tk, bidirectional, max_distance, offset):
    """Embedding lookup of the buckets: (1, H, Tq, Tk)."""
    relative = torch.arange(Tk)[None, :] - (offset + torch.arange(Tq)[:, None])
    buckets = torch_bucket(relative, bidirectional, table.shape[0], max_distance)
    return torch.nn.functional.embedding(buckets, table).permute(2, 0, 1)[None]


def valid(num_buckets, max_distance, bidirectional):
    n = num_buckets // 2 if bidirectional else num_buckets
    return max_distance > n // 2


@pytest.mark.derivation("T5.2")
@pytest.mark.derivation("T5.3")
@given(NUM_BUCKETS, MAX_DISTANCES, st.booleans(), rngs(), layouts())
def test_buckets_match_reference(num_buckets, max_distance, bidirectional, rng, layout):
    assume(valid(num_buckets, max_distance, bidirectional))
    near = rng.integers(-3 * max_distance, 3 * max_distance, size=500)
    far = rng.integers(-(10**6), 10**6, size=100)
    r = np.concatenate([near, far, [0, 1, -1, max_distance, -max_distance]])
    ours = t5_relative_bucket(in_layout(r, layout), bidirectional=bidirectional, num_buckets=num_buckets,
                              max_distance=max_distance)
    ref = torch_bucket(torch.from_numpy(r), bidirectional, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.derivation("T5.3")
@pytest.mark.parametrize("bidirectional", [True, False])
def test_buckets_match_reference_exhaustively(bidirectional):
    """Every relative position in a wide range, the default configuration (32 buckets, 128)."""
    r = np.arange(-70000, 70001)
    ours = t5_relative_bucket(r, bidirectional=bidirectional)
    ref = torch_bucket(torch.from_numpy(r), bidirectional, 32, 128).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.derivation("T5.3")
@pytest.mark.parametrize("bidirectional", [True, False])
def test_32_buckets_match_reference_at_every_max_distance(bidirectional):
    """32 buckets (every released T5) with each max_distance from 17 to 1024: every distance up to it and past."""
    for max_distance in range(17, 1025):
        r = np.arange(-max_distance - 3, max_distance + 4)
        ours = t5_relative_bucket(r, bidirectional=bidirectional, num_buckets=32, max_distance=max_distance)
        ref = torch_bucket(torch.from_numpy(r), bidirectional, 32, max_distance).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"max_distance {max_distance}")


def around(k):
    """Integers within 3 of 2**k, and their negatives."""
    return st.tuples(st.integers(-3, 3), st.sampled_from([1, -1])).map(lambda c: c[1] * (2**k + c[0]))


EXTREMES = st.one_of([around(k) for k in (7, 15, 31, 53, 62, 63, 64)])
INTEGER_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


def python_bucket(r, bidirectional, num_buckets, max_distance):
    """(T5.2)-(T5.3) for one Python integer r: exact integer arithmetic, the float32 logarithm of the reference."""
    n = num_buckets // 2 if bidirectional else num_buckets
    base, a = ((n if r > 0 else 0), abs(r)) if bidirectional else (0, max(-r, 0))
    exact = n // 2
    if a < exact:
        return base + a
    if a >= max_distance:  # every distance from M on shares the last bucket of its sign
        return base + n - 1
    log_part = np.log(np.float32(a) / exact) / math.log(max_distance / exact) * (n - exact)
    return base + min(exact + int(log_part), n - 1)


@pytest.mark.derivation("T5.2")
@pytest.mark.derivation("T5.3")
@given(st.lists(EXTREMES, min_size=1, max_size=6), st.sampled_from(INTEGER_DTYPES), NUM_BUCKETS, MAX_DISTANCES,
       st.booleans())
def test_extreme_relative_positions(values, dtype, num_buckets, max_distance, bidirectional):
    """Relative positions at the ends of every integer dtype (int64's -2**63, uint64's 2**63 and beyond):
    each bucket as exact integer arithmetic gives it, in [0, N), never wrapped around."""
    assume(valid(num_buckets, max_distance, bidirectional))
    info = np.iinfo(dtype)
    values = [v for v in values if info.min <= v <= info.max] + [int(info.min), int(info.max), 0]
    r = np.array(values, dtype)
    ours = t5_relative_bucket(r, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    expected = [python_bucket(v, bidirectional, num_buckets, max_distance) for v in values]
    np.testing.assert_array_equal(ours, expected)
    assert np.all((0 <= ours) & (ours < num_buckets))


@pytest.mark.derivation("T5.2")
@pytest.mark.derivation("T5.3")
def test_bucket_properties():
    r = np.arange(-300, 301)
    bi = t5_relative_bucket(r)
    n, e = 16, 8
    assert np.all((bi[r <= 0] >= 0) & (bi[r <= 0] < n)) and np.all((bi[r > 0] >= n) & (bi[r > 0] < 2 * n))
    small = np.abs(r) < e
    np.testing.assert_array_equal(bi[small], np.abs(r[small]) + n * (r[small] > 0))  # exact buckets
    np.testing.assert_array_equal(bi[r <= -128], n - 1)  # every distance >= max_distance in the last bucket
    np.testing.assert_array_equal(bi[r >= 128], 2 * n - 1)
    past = bi[r <= 0][::-1]  # distance 0, 1, 2, ...: non-decreasing, every bucket used
    assert np.all(np.diff(past) >= 0) and set(past.tolist()) == set(range(n))

    uni = t5_relative_bucket(r, bidirectional=False)
    np.testing.assert_array_equal(uni[r >= 0], 0)  # the future counts as distance 0
    np.testing.assert_array_equal(uni[(r < 0) & (r > -16)], -r[(r < 0) & (r > -16)])
    np.testing.assert_array_equal(uni[r <= -128], 31)
    assert uni.dtype == np.int64


@pytest.mark.derivation("T5.1")
@given(NUM_BUCKETS, SIDES, st.sampled_from([0, 1, 6]), st.booleans(), rngs())
def test_offset_is_a_row_slice(N, Tq, extra, bidirectional, rng):
    """offset = Tk - Tq gives the last Tq rows of the full (Tk, Tk) bias; each head's bias is Toeplitz;
    the buckets are those of r = j - (offset + i)."""
    assume(valid(N, 8, bidirectional))
    Tk = Tq + extra
    table = rng.standard_normal((N, 3))
    opts = {"bidirectional": bidirectional, "max_distance": 8}
    part, cache = t5_bias_forward(table, Tq, Tk, offset=Tk - Tq, **opts)
    full, _ = t5_bias_forward(table, Tk, Tk, **opts)
    np.testing.assert_array_equal(part, full[:, :, Tk - Tq :, :])
    np.testing.assert_array_equal(full[:, :, 1:, 1:], full[:, :, :-1, :-1])
    r = np.arange(Tk)[None, :] - ((Tk - Tq) + np.arange(Tq)[:, None])  # (T5.1): key position - query position
    np.testing.assert_array_equal(cache.buckets, torch_bucket(torch.from_numpy(r), bidirectional, N, 8).numpy())


@st.composite
def bias_cases(draw, empty=True):
    """A table and a dbias (each in a drawn memory layout), the forward's options; Tq or Tk may be 0."""
    N, md, bidirectional = draw(NUM_BUCKETS), draw(MAX_DISTANCES), draw(st.booleans())
    assume(valid(N, md, bidirectional))
    lengths = [0, 1, 2, 5, 8] if empty else [1, 2, 5, 8]
    H, Tq, Tk = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths + [40]))
    offset, dtype, rng = draw(st.sampled_from([0, 2, 37])), draw(DTYPES), draw(rngs())
    table = in_layout(randn(rng, (N, H), dtype), draw(layouts()))
    dbias = in_layout(randn(rng, (1, H, Tq, Tk), dtype), draw(layouts()))
    return table, dbias, dict(bidirectional=bidirectional, max_distance=md, offset=offset)


@pytest.mark.derivation("T5.4")
@given(bias_cases())
def test_bias_matches_torch(case):
    table, dbias, opts = case
    Tq, Tk = dbias.shape[2:]
    bias, cache = t5_bias_forward(table, Tq, Tk, **opts)
    assert bias.shape == dbias.shape and bias.dtype == table.dtype
    expected = torch_bias(leaf(table), Tq, Tk, **opts).detach().numpy()
    np.testing.assert_array_equal(bias, expected.astype(table.dtype))  # a lookup: exact


@pytest.mark.derivation("T5.5")
@given(bias_cases())
def test_table_gradient_matches_torch(case):
    table, dbias, opts = case
    Tq, Tk = dbias.shape[2:]
    _, cache = t5_bias_forward(table, Tq, Tk, **opts)
    dtable = t5_bias_backward(dbias, cache)
    t_table = leaf(table)
    (expected,) = backprop(torch_bias(t_table, Tq, Tk, **opts), np.array(dbias), t_table)
    assert dtable.dtype == table.dtype and dtable.flags.c_contiguous
    assert_close(dtable, expected, scale=max(np.abs(dbias).sum(), 1.0), what="dtable")
    unused = np.setdiff1d(np.arange(table.shape[0]), cache.buckets)
    assert np.all(dtable[unused] == 0)
    assert_close(dtable.sum(0), dbias.sum(axis=(0, 2, 3)), scale=max(np.abs(dbias).sum(), 1.0), what="column sums")


@pytest.mark.derivation("T5.5")
@given(st.booleans(), st.sampled_from([0, 3]), rngs())
def test_finite_differences(bidirectional, offset, rng):
    table = rng.standard_normal((8, 2))
    results = gradcheck.check(t5_bias_forward, t5_bias_backward, {"table": table}, wrt=("table",),
                              options={"Tq": 3, "Tk": 7, "bidirectional": bidirectional, "max_distance": 6,
                                       "offset": offset})
    assert [r.input for r in results] == ["table"]
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


# -- bad input -----------------------------------------------------------------------------------

NOT_INTEGERS = tuple(k for k in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS if k not in ("int64", "int32", "uint8")) + (
    "float64",)
BAD_BUCKET_COUNTS = (3, 1, 0, -4, 32.0, True, "32", None)  # >= 4 buckets bidirectional, >= 2 one-way
BAD_MAX_DISTANCES = (8, 0, -128, 128.0, True, "128", None)  # > 8, the exact buckets of 32 bidirectional ones


@given(rngs(), SIDES)
def test_relative_bucket_rejects_bad_arguments(rng, n):
    r = rng.integers(-200, 200, size=(n, 3))
    rejects_all(t5_relative_bucket, "t5_relative_bucket", "relative_position", [corrupt(r, k) for k in NOT_INTEGERS])
    for name, bad_values in (("bidirectional", BAD_FLAGS), ("num_buckets", BAD_BUCKET_COUNTS),
                             ("max_distance", BAD_MAX_DISTANCES)):
        rejects_all(lambda bad: t5_relative_bucket(r, **{name: bad}), "t5_relative_bucket", name, bad_values)
    rejects_all(lambda bad: t5_relative_bucket(r, bidirectional=False, num_buckets=bad), "t5_relative_bucket",
                "num_buckets", [1, 0])
    assert t5_relative_bucket(r, bidirectional=False, num_buckets=2, max_distance=2).shape == r.shape


@pytest.mark.parametrize("name", ["table", "Tq", "Tk", "bidirectional", "max_distance", "offset"])
@given(bias_cases())
def test_forward_rejects_bad_arguments(name, case):
    table, _, opts = case
    arguments = {"table": table, "Tq": 3, "Tk": 5, **opts}
    if name == "table":  # wrong type, dtype or rank, or fewer rows than the smallest bucket rule needs
        bad_values = [corrupt(table, k) for k in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS] + [
            table[:1], table[:, :0]]
    else:
        bad_values = {"bidirectional": BAD_FLAGS, "max_distance": (0, -1, 2.5, True, "8", None)}.get(name, BAD_COUNTS)
    rejects_all(lambda bad: t5_bias_forward(**{**arguments, name: bad}), "t5_bias_forward", name, bad_values)


@pytest.mark.parametrize("name", ["dbias", "cache"])
@given(bias_cases(empty=False))
def test_backward_rejects_bad_input(name, case):
    table, dbias, opts = case
    _, cache = t5_bias_forward(table, dbias.shape[2], dbias.shape[3], **opts)
    if name == "dbias":
        kinds = ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dbias.dtype),)
        rejects_all(lambda bad: t5_bias_backward(bad, cache), "t5_bias_backward", "dbias",
                    [corrupt(dbias, k) for k in kinds])
    else:
        rejects_all(lambda bad: t5_bias_backward(dbias, bad), "t5_bias_backward", "cache",
                    [None, tuple(cache), list(cache), cache._asdict(), dbias])
