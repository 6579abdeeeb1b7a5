"""Bad input, generated: wrong types, ranks, dtypes and shapes for any argument.

A public function must reject each with ``ValueError`` or ``TypeError`` before doing
any work, and the message must name the function and the argument::

    @given(st.sampled_from(ARRAY_KINDS))
    def test_gamma_rejected(kind):
        bad = corrupt(gamma, kind)
        expect_rejected(lambda: layernorm_forward(x, bad, beta), "layernorm_forward", "gamma")

Pick the kinds that are wrong for the argument at hand: a leading-axis shape change
is legal for ``x`` of a norm but not for its ``gamma``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import warnings

import numpy as np
import pytest

# Not an array at all.
NON_ARRAYS = ("list", "tuple", "scalar", "none", "string")
# An ndarray subclass holding the same values: np.matrix (``*`` is a matrix product, every result
# 2-D), a masked array (reductions skip masked entries), and a subclass that changes nothing.
# Ops take plain ndarrays only, so each of these is refused by name, not computed with.
SUBCLASS_KINDS = ("matrix", "masked", "subclass")
# An array of a dtype no float op takes.
DTYPE_KINDS = ("int64", "int32", "bool", "float16", "complex128", "object", "uint8")
# The right dtype, the wrong rank or size.
RANK_KINDS = ("rank+1", "rank-1")
SHAPE_KINDS = ("last+1", "first+1")
ARRAY_KINDS = NON_ARRAYS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS
# An argument with exactly one right shape and dtype (a norm's gamma, a backward's dy).
EXACT_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
# Rows (..., D) normalised along the last axis: any leading shape, but D >= 1 and at least one axis.
ROW_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + ("0-d", "D = 0")


class PlainSubclass(np.ndarray):
    """An ndarray subclass that overrides nothing: still not an ndarray an op should take silently."""


def not_an_array(x, kind: str):
    """``x`` (a NumPy array or a torch tensor) as something that is no array at all: a NON_ARRAYS kind."""
    return {
        "list": lambda: x.tolist(),
        "tuple": lambda: tuple(x.reshape(-1).tolist()),
        "scalar": lambda: 1.5,
        "none": lambda: None,
        "string": lambda: "x",
    }[kind]()


def corrupt(x: np.ndarray, kind: str):
    """``x`` made wrong in the way ``kind`` names (values kept where the kind allows)."""
    x = np.asarray(x)
    if kind in NON_ARRAYS:
        return not_an_array(x, kind)
    if kind in ("int64", "int32", "bool", "float16", "float32", "float64", "complex128", "uint8"):
        return x.astype(kind)
    if kind == "other float":  # float32 <-> float64: mixed float dtypes are refused, not up-cast
        return x.astype(np.float32 if x.dtype == np.float64 else np.float64)
    if kind == "0-d":
        return np.asarray(x.reshape(-1)[0])
    if kind == "D = 0":  # nothing on the last axis
        return x[..., :0]
    if kind == "object":
        return x.astype(object)
    if kind == "matrix":  # always 2-D: the values of x, as rows when x is not 2-D already
        with warnings.catch_warnings():  # numpy's PendingDeprecationWarning for np.matrix itself
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return np.asmatrix(x if x.ndim == 2 else x.reshape(1, -1))
    if kind == "masked":  # same shape and dtype, every other entry masked
        return np.ma.masked_array(x, mask=np.arange(x.size).reshape(x.shape) % 2 == 1)
    if kind == "subclass":
        return x.view(PlainSubclass)
    if kind == "rank+1":
        return x[None]
    if kind == "rank-1":
        return x.reshape(-1)[0] if x.ndim <= 1 else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    if kind == "last+1":
        return np.concatenate([x, x[..., :1]], axis=-1) if x.ndim else x[None]
    if kind == "first+1":
        return np.concatenate([x, x[:1]], axis=0) if x.ndim else x[None]
    raise ValueError(f"corrupt: unknown kind {kind!r}")


def expect_rejected(call, func: str, arg: str, errors=(ValueError, TypeError)) -> str:
    """``call()`` must raise one of ``errors`` naming ``func`` and ``'arg'``; returns the message."""
    with pytest.raises(errors) as info:
        call()
    message = str(info.value)
    assert func in message, f"message does not name the function {func!r}: {message}"
    assert f"'{arg}'" in message, f"message does not name the argument {arg!r}: {message}"
    return message


# Scalar options, each wrong for the kind of option named.
BAD_FLAGS = (1, 0, 1.0, "True", None, np.array(True), [True])  # a bool is wanted
# > 0; 10**400 is an int no float64 can hold
BAD_SCALES = (np.nan, np.inf, -np.inf, -1.0, 0.0, True, False, "0.5", [0.5], np.array(0.5), np.float32(np.nan), 10**400)
# an integer >= 0 (a length, an offset), and at most 2**53 - 1 for an op's positions and sizes
BAD_COUNTS = (-1, 2.5, 3.0, True, "3", None, np.float64(2.0), [2], 2**53, 2**64, np.uint64(2**64 - 1), 10**400)
BAD_BASES = (np.nan, np.inf, 0.0, -1.0, True, "1e4", None, [1e4], 10**400)  # a frequency base > 0, a finite float
BAD_EVEN_DIMS = (0, 1, 3, -2, 2.0, True, "4", None)  # an even integer >= 2
BAD_DTYPES = (np.int64, "int32", np.float16, np.complex128, object, bool, "x", None)  # float32 or float64
NOT_A_MASK = tuple(k for k in NON_ARRAYS if k != "none") + tuple(k for k in DTYPE_KINDS if k != "bool") + (
    "float32", "float64") + RANK_KINDS + SHAPE_KINDS + SUBCLASS_KINDS


def rejects_all(call, func, arg, bad_values):
    """``call(bad)`` raises for every bad value, naming ``func`` and ``arg``, with what was expected and what came."""
    for bad in bad_values:
        message = expect_rejected(lambda: call(bad), func, arg)
        assert "expected" in message and "got" in message, message


def other_float(dtype):
    return "float32" if np.dtype(dtype) == np.float64 else "float64"


class Case(NamedTuple):
    """One argument of one public function, and a strategy of values that are wrong for it."""

    func: str
    arg: str
    call: Callable
    values: object  # a hypothesis SearchStrategy

    def __repr__(self):
        return f"{self.func}-{self.arg}"
