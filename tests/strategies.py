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
    return (rng.standard_normal(shape) * scale).astype(dtype)
