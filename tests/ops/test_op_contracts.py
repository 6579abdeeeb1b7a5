"""Contracts every op keeps, checked across all of them at once.

- Outputs belong to the caller: writing to what a forward returned (or to what a backward
  returned) never changes what the backward returns. Every forward/backward pair is taken
  from the ops' own ``gradcheck_cases``, so a new op is covered as soon as it lists one.
- Arrays are plain ``np.ndarray``: every array argument of every forward and backward refuses
  ndarray subclasses (np.matrix, masked arrays, any other) by name.
- Elementwise ops map 0-d arrays to 0-d arrays (never to NumPy scalars), with the values
  the same entries have in a 1-d array.
- Integer options (counts, sizes, offsets, positions) and real options at the ends of every
  range (2**31, 2**53, 2**63, 2**64, 10**400): accepted exactly where the documented bounds
  say, with a right result, and otherwise refused with a ValueError naming the op and the
  argument; never an OverflowError, a MemoryError, an IndexError or a silent wraparound.
"""

import inspect
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops import activations as act
from npformer.ops._checks import MAX_POSITION, memory_limit
from npformer.ops.alibi import alibi_bias, alibi_slopes
from npformer.ops.attention import attention_forward, causal_mask
from npformer.ops.cross_entropy import cross_entropy_forward
from npformer.ops.dropout import dropout_backward, dropout_forward, dropout_mask
from npformer.ops.flash_attention import flash_attention_forward
from npformer.ops.layernorm import layernorm_forward
from npformer.ops.linear_attention import elu_plus_one, linear_attention_forward
from npformer.ops.positional import positional_embedding_forward, sinusoidal_table
from npformer.ops.rmsnorm import rmsnorm_forward
from npformer.ops.rope import rope_cos_sin, rope_forward
from npformer.ops.t5_bias import t5_bias_forward, t5_relative_bucket
from tests.badinput import SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import DTYPES, rngs

CASES = [(family, i, case.name) for family in gradcheck.families() for i, case in enumerate(gradcheck.cases(family))]


def drawn_case(family, index, seed, dtype):
    """The registry's case ``index`` of ``family``, its values drawn from ``seed``, floats in ``dtype``."""
    case = gradcheck.cases(family, seed)[index]

    def cast(a):
        return a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a

    return case, {k: cast(v) for k, v in case.inputs.items()}, {k: cast(v) for k, v in case.options.items()}


def as_tuple(grads):
    return grads if isinstance(grads, tuple) else (grads,)


def upstream(out, rng):
    """A random upstream gradient of the output's shape and dtype (a 0-d array for a loss)."""
    return np.asarray(rng.standard_normal(out.shape), out.dtype)


def copies(grads):
    return [None if g is None else np.array(g, copy=True) for g in as_tuple(grads)]


def assert_same(actual, expected, what):
    assert len(as_tuple(actual)) == len(expected), what
    for i, (a, b) in enumerate(zip(as_tuple(actual), expected)):
        if b is None:
            assert a is None, f"{what}: result {i}"
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: result {i}")


def test_every_forward_has_a_case():
    """Every public *_forward of npformer.ops is in the registry these contracts walk."""
    import importlib
    import pkgutil

    import npformer.ops as ops

    listed = {case.forward.__name__ for family in gradcheck.families() for case in gradcheck.cases(family)}
    public = {name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_")
              for name, f in vars(importlib.import_module(f"npformer.ops.{m.name}")).items()
              if name.endswith("_forward") and callable(f) and f.__module__ == f"npformer.ops.{m.name}"}
    assert public and public <= listed, sorted(public - listed)


# ---- outputs belong to the caller ------------------------------------------------------------


@pytest.mark.parametrize("family, index, name", CASES, ids=[c[2] for c in CASES])
@given(seed=st.integers(0, 2**32 - 1), dtype=DTYPES, fill=st.sampled_from([np.nan, 0.0, 1e30]))
def test_writing_to_outputs_leaves_the_backward_unchanged(family, index, name, seed, dtype, fill):
    """y, cache = forward(...); y[...] = fill: the backward returns what it returned before. Then
    the same for the backward's own results: writing to them changes no later backward."""
    case, inputs, options = drawn_case(family, index, seed, dtype)
    out, cache = case.forward(**inputs, **options)
    dy = upstream(out, np.random.default_rng(seed))
    before = copies(case.backward(dy.copy(), cache))
    out[...] = fill  # the caller reuses its output buffer
    first = case.backward(dy.copy(), cache)
    assert_same(first, before, f"{name}: backward after writing to the forward's output")
    for g in as_tuple(first):
        if g is not None:
            g[...] = fill  # ... and the buffers the backward gave it
    assert_same(case.backward(dy.copy(), cache), before, f"{name}: backward after writing to its results")


# ---- plain ndarrays only -------------------------------------------------------------------


@pytest.mark.parametrize("family, index, name", CASES, ids=[c[2] for c in CASES])
@given(seed=st.integers(0, 2**32 - 1), dtype=DTYPES, kind=st.sampled_from(SUBCLASS_KINDS))
def test_every_array_argument_refuses_subclasses(family, index, name, seed, dtype, kind):
    """Each array argument of the forward (inputs, masks, ids, biases, positions) and the backward's
    upstream gradient, as np.matrix, a masked array or another subclass: refused, naming it."""
    case, inputs, options = drawn_case(family, index, seed, dtype)
    arguments = {**inputs, **options}
    for arg, value in arguments.items():
        if isinstance(value, np.ndarray):
            bad = {**arguments, arg: corrupt(value, kind)}
            message = expect_rejected(lambda: case.forward(**bad), case.forward.__name__, arg)
            assert f"not a subclass of it, got {type(bad[arg]).__module__}.{type(bad[arg]).__qualname__}" in message
    out, cache = case.forward(**arguments)
    dy_name = next(iter(inspect.signature(case.backward).parameters))
    bad_dy = corrupt(upstream(out, np.random.default_rng(seed)), kind)
    message = expect_rejected(lambda: case.backward(bad_dy, cache), case.backward.__name__, dy_name)
    assert "not a subclass" in message


# ---- 0-d arrays ------------------------------------------------------------------------------

# name -> forward on a tuple of arrays, backward (None: no backward)
ELEMENTWISE = {
    "relu": (lambda a: act.relu_forward(a[0]), act.relu_backward),
    "gelu[none]": (lambda a: act.gelu_forward(a[0], "none"), act.gelu_backward),
    "gelu[tanh]": (lambda a: act.gelu_forward(a[0], "tanh"), act.gelu_backward),
    "silu": (lambda a: act.silu_forward(a[0]), act.silu_backward),
    "mish": (lambda a: act.mish_forward(a[0]), act.mish_backward),
    "swiglu": (lambda a: act.swiglu_forward(a[0], a[1]), act.swiglu_backward),
    "geglu[none]": (lambda a: act.geglu_forward(a[0], a[1], "none"), act.geglu_backward),
    "geglu[tanh]": (lambda a: act.geglu_forward(a[0], a[1], "tanh"), act.geglu_backward),
    "dropout[mask]": (lambda a: dropout_forward(a[0], 0.5, None, mask=np.asarray(a[1] > 0)), dropout_backward),
    "dropout[p=0, mask]": (lambda a: dropout_forward(a[0], 0.0, None, mask=np.asarray(a[1] > 0)), dropout_backward),
    "dropout[drawn]": (lambda a: dropout_forward(a[0], 0.5, np.random.default_rng(0)), dropout_backward),
    "dropout[eval]": (lambda a: dropout_forward(a[0], 0.5, None, training=False), dropout_backward),
    "erf": (lambda a: (act.erf(a[0]), None), None),
    "erfc": (lambda a: (act.erfc(a[0]), None), None),
    "elu_plus_one": (lambda a: (elu_plus_one(a[0]), None), None),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@given(values=st.lists(st.floats(-50.0, 50.0, width=32), min_size=3, max_size=3), dtype=DTYPES)
def test_elementwise_ops_map_0d_arrays_to_0d_arrays(name, values, dtype):
    """A 0-d input gives 0-d ndarrays out of the forward and the backward, equal to the 1-d results."""
    forward, backward = ELEMENTWISE[name]
    zero_d = [np.asarray(v, dtype) for v in values]
    one_d = [a.reshape(1) for a in zero_d]
    y0, cache0 = forward(zero_d[:2])
    y1, cache1 = forward(one_d[:2])
    results0, results1 = [y0], [y1]
    if backward is not None:
        results0 += as_tuple(backward(zero_d[2], cache0))
        results1 += as_tuple(backward(one_d[2], cache1))
    for i, (r0, r1) in enumerate(zip(results0, results1)):
        assert type(r0) is np.ndarray and r0.shape == () and r0.dtype == dtype, (name, i, type(r0))
        np.testing.assert_array_equal(r0, r1[0], err_msg=f"{name}: result {i}")


# ---- integers and reals at the ends of their ranges ------------------------------------------


def around(k):
    """Integers within 2 of 2**k."""
    return st.integers(-2, 2).map(lambda d: 2**k + d)


HUGE = st.one_of(
    [around(k) for k in (31, 32, 53, 62, 63, 64)]
    + [st.just(10**400), st.integers(2**53, 2**80),
       st.sampled_from([np.int32(2**31 - 1), np.int64(2**63 - 1), np.uint64(2**64 - 1), np.uint64(2**53 - 1),
                        np.int64(2**53), np.uint32(2**32 - 1)])]
)
SIGNED_HUGE = st.tuples(HUGE, st.booleans()).map(lambda c: -int(c[0]) if c[1] else c[0])


def outcome(call, func, *args):
    """call()'s result, or None when it is refused by a ValueError/TypeError naming ``func`` and one of ``args``.

    Any other exception (OverflowError, MemoryError, IndexError, ...) propagates and fails the test.
    """
    try:
        return call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert func in message and any(f"'{a}'" in message for a in args), message
        assert "expected" in message and "got" in message, message
        return None


def fits(nbytes):
    return nbytes <= memory_limit()


def rotated(x, positions, base=10000.0):
    """RoPE (rotate-half) of x (1, 1, T, D) at integer positions, angles from Python floats, float64."""
    D = x.shape[-1]
    inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # (ROPE.1), the op's own frequencies
    y = np.empty_like(x)
    for t, p in enumerate(positions):
        for i, w in enumerate(inv_freq):
            theta = float(p) * float(w)  # float(p): exact for |p| <= 2**53
            c, s = math.cos(theta), math.sin(theta)
            x1, x2 = x[0, 0, t, i], x[0, 0, t, i + D // 2]
            y[0, 0, t, i], y[0, 0, t, i + D // 2] = x1 * c - x2 * s, x2 * c + x1 * s
    return y


X_ROPE = np.random.default_rng(0).standard_normal((1, 1, 3, 4))


@given(HUGE)
def test_rope_offsets(v):
    """Positions offset .. offset + T - 1 must be at most 2**53 - 1 (exact in float64, no int64 wraparound)."""
    y = outcome(lambda: rope_forward(X_ROPE, offset=v)[0], "rope_forward", "offset")  # v as given: numpy ints too
    assert (y is not None) == (0 <= int(v) and int(v) + 2 <= MAX_POSITION), v
    if y is not None:
        np.testing.assert_allclose(y, rotated(X_ROPE, [int(v) + t for t in range(3)]), rtol=0, atol=1e-12)


@given(SIGNED_HUGE)
def test_rope_explicit_positions(v):
    """Explicit positions of int64 or uint64: |p| <= 2**53 - 1 accepted and exact, larger ones refused."""
    v = int(v)
    assume(-(2**63) <= v < 2**64)
    dtype = np.int64 if v < 2**63 else np.uint64
    positions = np.array([v, 0, 1] if v >= 0 else [v, -1, 0], dtype)
    for call, func in ((lambda: rope_forward(X_ROPE, positions=positions)[0], "rope_forward"),
                       (lambda: rope_cos_sin(positions, 4, dtype=np.float64), "rope_cos_sin")):
        result = outcome(call, func, "positions")
        assert (result is not None) == (abs(v) <= MAX_POSITION), v
    if abs(v) <= MAX_POSITION:
        y, _ = rope_forward(X_ROPE, positions=positions)
        np.testing.assert_allclose(y, rotated(X_ROPE, [int(p) for p in positions]), rtol=0, atol=1e-12)


@given(HUGE)
def test_empty_tables_with_a_huge_other_side(v):
    """A table with no rows (or columns) and another length up to 2**53 - 1 is empty, not an error;
    beyond 2**53 - 1 the length is refused by name."""
    accepted = 0 <= int(v) <= MAX_POSITION
    calls = [
        (lambda: alibi_bias(2, 0, v), "alibi_bias", ("Tk",), (1, 2, 0, int(v))),
        (lambda: alibi_bias(2, v, 0), "alibi_bias", ("Tq",), (1, 2, int(v), 0)),
        (lambda: causal_mask(0, v), "causal_mask", ("Tk",), (0, int(v))),
        (lambda: t5_bias_forward(np.ones((8, 2)), 0, v)[0], "t5_bias_forward", ("Tk",), (1, 2, 0, int(v))),
        (lambda: dropout_mask((0, v), 0.5, np.random.default_rng(0)), "dropout_mask", ("shape",), (0, int(v))),
    ]
    for call, func, args, shape in calls:
        result = outcome(call, func, *args)
        assert (result is not None) == accepted, (func, v)
        if result is not None:
            assert result.shape == shape and result.size == 0
    table = outcome(lambda: sinusoidal_table(0, v), "sinusoidal_table", "D")
    assert (table is not None) == (accepted and int(v) % 2 == 0), v


@given(HUGE)
def test_tables_too_large_for_memory_are_refused_by_name(v):
    """Sizes whose table would not fit in memory: a named error before any work."""
    calls = [
        (lambda: alibi_bias(1, v, v), "alibi_bias", ("Tq", "Tk")),
        (lambda: causal_mask(v, v), "causal_mask", ("Tq", "Tk")),
        (lambda: t5_bias_forward(np.ones((8, 2)), v, v)[0], "t5_bias_forward", ("Tq", "Tk")),
        (lambda: sinusoidal_table(v, v), "sinusoidal_table", ("T", "D")),
        (lambda: dropout_mask((v, v), 0.5, np.random.default_rng(0)), "dropout_mask", ("shape",)),
        (lambda: positional_embedding_forward(np.ones((9, 4)), v), "positional_embedding_forward", ("T",)),
        (lambda: positional_embedding_forward(np.ones((9, 4)), 2, offset=v), "positional_embedding_forward",
         ("offset",)),
    ]
    assert not fits(int(v) ** 2)  # every table here has at least v^2 bytes (or v rows of a 9-row table)
    for call, func, args in calls:
        assert outcome(call, func, *args) is None, (func, v)
    if int(v) >= 2**50:  # 2**54 bytes of slopes or more: beyond any machine
        assert outcome(lambda: alibi_slopes(v), "alibi_slopes", "n_head") is None
        assert outcome(lambda: rope_cos_sin(np.arange(3), 2 * int(v)), "rope_cos_sin", "D") is None


@given(HUGE, st.booleans())
def test_t5_offsets_and_distances(v, bidirectional):
    """The first query's position offset (offset + Tq - 1 <= 2**53 - 1) and max_distance (<= 2**53 - 1)."""
    table = np.arange(16.0).reshape(8, 2)
    n = 4 if bidirectional else 8
    bias = outcome(lambda: t5_bias_forward(table, 2, 3, offset=v, bidirectional=bidirectional)[0],
                   "t5_bias_forward", "offset")
    assert (bias is not None) == (0 <= int(v) and int(v) + 1 <= MAX_POSITION), v
    if bias is not None:  # every key lies more than max_distance = 128 before every query: the last past bucket
        np.testing.assert_array_equal(bias, np.broadcast_to(table[n - 1][None, :, None, None], (1, 2, 2, 3)))
    bias = outcome(lambda: t5_bias_forward(table, 2, 3, max_distance=v, bidirectional=bidirectional)[0],
                   "t5_bias_forward", "max_distance")
    assert (bias is not None) == (int(v) <= MAX_POSITION), v
    if bias is not None:  # relative positions -1 .. 2, all in the exact range or its first log bucket
        r = np.arange(3)[None, :] - np.arange(2)[:, None]
        expected = t5_relative_bucket(r, bidirectional=bidirectional, num_buckets=8, max_distance=128)
        np.testing.assert_array_equal(bias, table[expected].transpose(2, 0, 1)[None])
    buckets = outcome(lambda: t5_relative_bucket(np.array([-1, 0, 1]), num_buckets=v, max_distance=MAX_POSITION),
                      "t5_relative_bucket", "num_buckets")
    assert (buckets is not None) == (int(v) <= MAX_POSITION), v
    if buckets is not None:
        np.testing.assert_array_equal(buckets, [1, 0, int(v) // 2 + 1])


@given(HUGE, st.sampled_from(["block_q", "block_k"]), rngs())
def test_flash_block_sizes(v, name, rng):
    """Any tile size up to 2**53 - 1 works (tiles are cut to the sequence): the result of one whole tile."""
    q, k, val = (rng.standard_normal((1, 2, 5, 3)) for _ in range(3))
    out = outcome(lambda: flash_attention_forward(q, k, val, **{name: v})[0], "flash_attention_forward", name)
    assert (out is not None) == (int(v) <= MAX_POSITION), v
    if out is not None:
        np.testing.assert_array_equal(out, flash_attention_forward(q, k, val, block_q=5, block_k=5)[0])


REAL_OPTIONS = [  # (name, call with the value, lowest accepted, highest accepted)
    ("layernorm_forward", "eps", lambda e: layernorm_forward(np.ones((2, 3)), np.ones(3), np.zeros(3), e)[0], 0, None),
    ("rmsnorm_forward", "eps", lambda e: rmsnorm_forward(np.ones((2, 3)), np.ones(3), e)[0], 0, None),
    ("linear_attention_forward", "eps",
     lambda e: linear_attention_forward(*(np.ones((1, 1, 2, 2)),) * 3, eps=e)[0], 0, None),
    ("attention_forward", "scale", lambda s: attention_forward(*(np.ones((1, 1, 2, 2)),) * 3, scale=s)[0], 0, None),
    ("rope_forward", "base", lambda b: rope_forward(X_ROPE, base=b)[0], 0, None),
    ("sinusoidal_table", "base", lambda b: sinusoidal_table(3, 4, base=b), 0, None),
    ("cross_entropy_forward", "label_smoothing",
     lambda e: cross_entropy_forward(np.zeros((2, 3)), np.array([0, 1]), label_smoothing=e), 0, 1),
    ("dropout_forward", "p", lambda p: dropout_forward(np.ones(3), p, np.random.default_rng(0))[0], 0, 1),
]


@pytest.mark.parametrize("func, name, call, lo, hi", REAL_OPTIONS, ids=[f"{f}.{n}" for f, n, *_ in REAL_OPTIONS])
@given(SIGNED_HUGE)
def test_real_options_at_the_ends_of_their_range(func, name, call, lo, hi, v):
    """A real option given as a huge integer: taken when it is a finite float64 in range, else refused by name
    (10**400 has no float64 value: it is not a raw TypeError or OverflowError from isfinite)."""
    result = outcome(lambda: call(v), func, name)
    as_float = float(v) if abs(int(v)) < 2**1024 else math.inf
    accepted = math.isfinite(as_float) and as_float > lo and (hi is None or as_float <= hi)
    assert (result is not None) == accepted, v
    if result is not None:
        assert np.all(np.isfinite(result))
