"""Rows whose squares overflow, at offsets from zero up to many orders of magnitude beyond their
spread, and their normalisation evaluated exactly (rational arithmetic), for the norm tests; and a
normalisation's input gradient from its cache, evaluated exactly."""

from fractions import Fraction
import math

import numpy as np
from hypothesis import strategies as st

from tests.strategies import rngs
from tests.tolerances import NORM_ULPS

# log10 of the spread: wide enough that the variance overflows (float32: 3.4e38, float64: 1.8e308)
SPREAD_EXPONENTS = {np.dtype(np.float32): (20.0, 37.3), np.dtype(np.float64): (154.8, 307.2)}
# log10 of offset / spread: from well inside the spread to where the spread is a few units in the
# last place of the offset (2^24 ~ 1.7e7 for float32, 2^53 ~ 9e15 for float64)
RATIO_EXPONENTS = {np.dtype(np.float32): (-3.0, 7.0), np.dtype(np.float64): (-3.0, 15.5)}


@st.composite
def huge_rows(draw, rows=2):
    """(x, ratio): float rows offset + spread * u, with u spread over [-1, 1], whose variance overflows."""
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64]), label="dtype"))
    D = draw(st.sampled_from([2, 3, 5, 8]), label="D")
    spread = 10.0 ** draw(st.floats(*SPREAD_EXPONENTS[dtype]), label="log10 spread")
    ratio = 10.0 ** draw(st.floats(*RATIO_EXPONENTS[dtype]), label="log10 offset/spread")
    sign = draw(st.sampled_from([1.0, -1.0]), label="sign of the offset")
    rng = draw(rngs())
    limit = float(np.finfo(dtype).max)
    offset = sign * min(spread * ratio, limit / 2)
    u = np.linspace(-1.0, 1.0, D) + rng.uniform(-0.2, 0.2, (rows, D))  # the ends of [-1, 1] always in use
    u = rng.permuted(u, axis=-1)
    x = np.clip(offset + spread / 2 * u, -limit, limit).astype(dtype)
    return x, ratio


def exact(x, eps, *, centre):
    """xhat and r of each row of ``x``, (LN.1)-(LN.4) (``centre``) or (RMS.1)-(RMS.3), to float64 round-off.

    Every sum is taken in rational arithmetic on the exact values of x; only the final
    square root and quotient are rounded, after scaling by the largest centred entry.
    """
    x = np.asarray(x, np.float64)  # exact for float32 and float64 input
    xhat, r = np.empty_like(x), np.empty(x.shape[:-1] + (1,))
    for i in np.ndindex(x.shape[:-1]):
        row = [Fraction(float(v)) for v in x[i]]
        D = len(row)
        mu = sum(row) / D if centre else Fraction(0)
        c = [v - mu for v in row]
        s = max(abs(v) for v in c)
        if s == 0:
            xhat[i], r[i] = 0.0, 1.0 / math.sqrt(eps)
            continue
        var_s = float(sum(v * v for v in c) / D / (s * s)) + float(Fraction(eps) / (s * s))  # (var + eps) / s^2
        xhat[i] = [float(v / s) / math.sqrt(var_s) for v in c]
        r[i] = float(1 / s) / math.sqrt(var_s)
    return xhat, r


def overflows(x, *, centre):
    """Whether each row's variance (or mean square) is beyond the dtype's largest number, exactly."""
    limit = Fraction(float(np.finfo(x.dtype).max))
    result = []
    for i in np.ndindex(x.shape[:-1]):
        row = [Fraction(float(v)) for v in x[i]]
        mu = sum(row) / len(row) if centre else Fraction(0)
        result.append(sum((v - mu) ** 2 for v in row) / len(row) > limit)
    return np.array(result).reshape(x.shape[:-1])


def exact_dx(dy, gamma, xhat, r):
    """dx = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy gamma, of rows (..., D) with gamma (D,),
    xhat (..., D) and r (..., 1) from a cache ((LN.8) and (LN.10); a group of (GN.9) and (GN.10)): every sum
    taken exactly (rational arithmetic on the exact values of the inputs), only the results rounded to float64."""
    D = xhat.shape[-1]
    dx = np.empty(xhat.shape)
    for i in np.ndindex(xhat.shape[:-1]):
        g = [Fraction(float(a)) * Fraction(float(b)) for a, b in zip(dy[i], gamma)]  # dxhat
        xh = [Fraction(float(v)) for v in xhat[i]]
        mean_g, mean_g_xhat = sum(g) / D, sum(a * b for a, b in zip(g, xh)) / D
        ri = Fraction(float(r[i][0]))
        dx[i] = [float(ri * (a - mean_g - b * mean_g_xhat)) for a, b in zip(g, xh)]
    return dx


def rows_with_large_entries(rng, shape, dtype, scale, large):
    """Rows of ``shape``: the values ``large`` (each of size ``scale``, a power of two) at distinct places among
    the first 32 of each row, every other entry of a size whose square is below half a unit of scale^2. Summed
    with a long-running total that holds a large square (a plain loop, or each lane of a dot product), every
    small square after it is rounded away, an error of about D / 100 units; summed pairwise, a few at any D."""
    unit = float(np.finfo(dtype).eps)
    x = scale * np.sqrt(unit / 2) * rng.uniform(0.5, 0.99, shape) * rng.choice([-1.0, 1.0], shape)
    for j, value in zip(rng.choice(min(shape[-1], 32), len(large), replace=False), large):
        x[..., j] = value
    return x.astype(dtype)


def assert_rstd_exact(rstd, x, eps, *, centre):
    """A norm's cached r of rows x against (LN.1)-(LN.3) (``centre``) or (RMS.1)-(RMS.2) in exact arithmetic,
    within NORM_ULPS units of the dtype's rounding of itself."""
    _, r = exact(x, eps, centre=centre)
    assert rstd.dtype == x.dtype and rstd.shape == r.shape
    np.testing.assert_allclose(rstd, r, rtol=NORM_ULPS * float(np.finfo(x.dtype).eps), atol=0, err_msg="r")
