"""Hypothesis strategies shared by the op tests.

Arrays are drawn as (seed, scale) and made with NumPy, which keeps shrinking cheap
and lets large magnitudes appear without hypothesis generating every float.
"""

import numpy as np
from hypothesis import strategies as st

DTYPES = st.sampled_from([np.float64, np.float32])
# Sizes 1 and odd sizes are always in play.
SIDES = st.sampled_from([1, 2, 3, 5, 7, 8])
SCALES = st.sampled_from([1e-2, 1.0, 30.0, 1e3])


def shapes(min_dims=1, max_dims=3, sides=SIDES):
    return st.integers(min_dims, max_dims).flatmap(lambda n: st.tuples(*[sides] * n))


@st.composite
def rngs(draw):
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1)))


def randn(rng, shape, dtype=np.float64, scale=1.0):
    return np.asarray(rng.standard_normal(shape) * scale, dtype=dtype)  # an array for shape () too


# -- layouts: the same values in another memory layout -------------------------------
# Ops must not assume C-contiguous inputs: a transposed, strided, reversed or read-only
# view holds the same values and must give the same results.
LAYOUTS = ("contiguous", "fortran", "transposed", "strided", "reversed", "readonly")


def in_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """``x``'s values in the memory layout named ``layout`` (a view where it can be)."""
    x = np.ascontiguousarray(x) if np.ndim(x) else np.array(x)  # ascontiguousarray makes a 0-d array 1-d
    if layout == "contiguous":
        return x
    if x.ndim == 0 and layout != "readonly":  # a 0-d view into a larger buffer (NumPy's helpers make 0-d 1-d)
        buf = np.zeros(2, x.dtype)
        buf[1] = x
        return buf[1:].reshape(())
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "transposed":  # a transposed copy, transposed back: last axis not contiguous
        return np.ascontiguousarray(x.T).T
    if layout == "strided":  # every other element of a buffer twice the size on every axis
        buf = np.full(tuple(2 * s for s in x.shape), np.nan if x.dtype.kind == "f" else 0, x.dtype)
        view = buf[tuple(slice(None, None, 2) for _ in x.shape)]
        view[...] = x
        return view
    if layout == "reversed":  # negative strides on every axis
        return np.flip(np.ascontiguousarray(np.flip(x)))
    if layout == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    raise ValueError(f"in_layout: unknown layout {layout!r}")


def layouts():
    return st.sampled_from(LAYOUTS)
