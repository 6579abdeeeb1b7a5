"""Sinusoidal and learned absolute positions: torch oracle, finite differences, proofs/positional.md."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.positional import positional_embedding_backward, positional_embedding_forward, sinusoidal_table
from tests.badinput import (
    ARRAY_KINDS,
    BAD_BASES,
    BAD_COUNTS,
    BAD_DTYPES,
    BAD_EVEN_DIMS,
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
from tests.tolerances import FD_RTOL, RTOL, assert_close

WIDTHS = st.sampled_from([2, 4, 6, 16, 64])


def torch_sinusoidal(T, D, base):
    """The usual construction: div_term = exp(-log(base) * 2i / D), sin on even, cos on odd columns."""
    position = torch.arange(T, dtype=torch.float64)[:, None]
    div_term = torch.exp(torch.arange(0, D, 2, dtype=torch.float64) * (-math.log(base) / D))
    pe = torch.zeros(T, D, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


@pytest.mark.derivation("POS.1")
@given(st.sampled_from([0, 1, 2, 7, 100, 2048]), WIDTHS, st.sampled_from([10000.0, 100.0]), DTYPES)
def test_sinusoidal_matches_torch(T, D, base, dtype):
    pe = sinusoidal_table(T, D, base=base, dtype=dtype)
    assert pe.shape == (T, D) and pe.dtype == dtype
    # angles up to T ~ 2e3: the two ways of forming omega_i differ by an ulp, times p
    assert_close(pe, torch_sinusoidal(T, D, base).numpy(), scale=max(1.0, T * 1e-3), what="table")
    assert np.all(pe[:1, 0::2] == 0) and np.all(pe[:1, 1::2] == 1)


def omegas(D, base=10000.0):
    return base ** (-np.arange(0, D, 2) / D)


@pytest.mark.derivation("POS.2")
@given(WIDTHS, st.integers(0, 50), rngs())
def test_shift_is_a_fixed_linear_map(D, k, rng):
    T = 60
    pe = sinusoidal_table(T + k, D, dtype=np.float64)
    M = np.zeros((D, D))
    for i, w in enumerate(omegas(D)):
        c, s = np.cos(k * w), np.sin(k * w)
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, s], [-s, c]]  # (POS.2)
    assert_close(M.T @ M, np.eye(D), scale=1.0, what="M_k orthogonal")
    assert_close(pe[k : k + T], pe[:T] @ M.T, scale=1.0, what="e_(p+k) = M_k e_p for every p")


@pytest.mark.derivation("POS.3")
@given(WIDTHS, rngs())
def test_dot_product_depends_on_offset(D, rng):
    T = 200
    pe = sinusoidal_table(T, D, dtype=np.float64)
    gram = pe @ pe.T  # (T, T)
    delta = np.arange(T)[:, None] - np.arange(T)[None, :]
    expected = np.cos(delta[..., None] * omegas(D)).sum(-1)  # (POS.3)
    assert_close(gram, expected, scale=D / 2, what="gram matrix")
    for k in rng.integers(-T + 1, T, size=5):  # constant along every diagonal
        diag = np.diagonal(gram, offset=k)
        assert_close(diag, np.full_like(diag, diag[0]), scale=D / 2, what=f"diagonal {k}")
    assert_close(np.diag(gram), np.full(T, D / 2), scale=D / 2, what="|e_p|^2 = K")
    off = ~np.eye(T, dtype=bool)
    assert np.all(gram[off] < D / 2 * (1 - RTOL[np.dtype(np.float64)]))  # strictly below K for p != q


@st.composite
def learned_cases(draw, min_length=0):
    """A table, a length T (0 allowed: an empty sequence) and an offset that fit, a dout; table and dout in a
    drawn memory layout."""
    P, D, dtype, rng = draw(st.sampled_from([1, 4, 9, 32])), draw(SIDES), draw(DTYPES), draw(rngs())
    T = draw(st.integers(min_length, P))
    offset = draw(st.integers(0, P - T))
    table = in_layout(randn(rng, (P, D), dtype), draw(layouts()))
    return table, T, offset, in_layout(randn(rng, (T, D), dtype), draw(layouts()))


@pytest.mark.derivation("POS.4")
@given(learned_cases())
def test_learned_matches_torch(case):
    table, T, offset, _ = case
    out, _ = positional_embedding_forward(table, T, offset=offset)
    expected = torch.nn.functional.embedding(torch.arange(offset, offset + T), leaf(table, grad=False))
    assert out.dtype == table.dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected.numpy().astype(table.dtype))
    out[...] = 0  # a copy: the parameter is not aliased
    assert not np.shares_memory(out, table)


@pytest.mark.derivation("POS.5")
@given(learned_cases())
def test_learned_gradient_matches_torch(case):
    table, T, offset, dout = case
    _, cache = positional_embedding_forward(table, T, offset=offset)
    dtable = positional_embedding_backward(dout, cache)
    t_table = leaf(table)
    (expected,) = backprop(t_table[offset : offset + T], np.array(dout), t_table)
    assert dtable.dtype == table.dtype and dtable.shape == table.shape and dtable.flags.c_contiguous
    np.testing.assert_array_equal(dtable, expected.astype(table.dtype))
    unused = np.ones(table.shape[0], bool)
    unused[offset : offset + T] = False
    assert np.all(dtable[unused] == 0)


@pytest.mark.derivation("POS.5")
@given(st.sampled_from([(6, 0, 6), (9, 2, 5), (9, 8, 1)]), rngs())
def test_finite_differences(sizes, rng):
    P, offset, T = sizes
    results = gradcheck.check(positional_embedding_forward, positional_embedding_backward,
                              {"table": rng.standard_normal((P, 3))}, wrt=("table",), options={"T": T, "offset": offset})
    assert [r.input for r in results] == ["table"]
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, bad_values", [("T", BAD_COUNTS), ("D", BAD_EVEN_DIMS), ("base", BAD_BASES),
                                              ("dtype", BAD_DTYPES)])
@given(st.sampled_from([0, 1, 5]), WIDTHS)
def test_sinusoidal_rejects_bad_arguments(name, bad_values, T, D):
    arguments = {"T": T, "D": D}
    rejects_all(lambda bad: sinusoidal_table(**{**arguments, name: bad}), "sinusoidal_table", name, bad_values)
    assert sinusoidal_table(**arguments).shape == (T, D)


@pytest.mark.parametrize("name", ["table", "T", "offset"])
@given(learned_cases(min_length=1))
def test_forward_rejects_bad_arguments(name, case):
    table, T, offset, _ = case
    P = table.shape[0]
    bad_values = {
        # wrong type, dtype or rank, or too few rows for offset + T
        "table": [corrupt(table, kind) for kind in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS]
        + [table[: offset + T - 1]],
        "T": BAD_COUNTS + (P - offset + 1,),  # past the last row of the table
        "offset": BAD_COUNTS + (P - T + 1,),
    }[name]
    arguments = {"table": table, "T": T, "offset": offset}
    rejects_all(lambda bad: positional_embedding_forward(**{**arguments, name: bad}), "positional_embedding_forward",
                name, bad_values)


@pytest.mark.parametrize("name", ["dout", "cache"])
@given(learned_cases(min_length=1))
def test_backward_rejects_bad_input(name, case):
    table, T, offset, dout = case
    _, cache = positional_embedding_forward(table, T, offset=offset)
    if name == "dout":
        kinds = ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dout.dtype),)
        rejects_all(lambda bad: positional_embedding_backward(bad, cache), "positional_embedding_backward", "dout",
                    [corrupt(dout, kind) for kind in kinds])
    else:
        rejects_all(lambda bad: positional_embedding_backward(dout, bad), "positional_embedding_backward", "cache",
                    [None, tuple(cache), list(cache), cache._asdict(), dout])
