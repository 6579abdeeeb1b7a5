"""Input validation shared by every op: fail loudly, early, and by name.

Each check raises ``ValueError`` with the op, the argument, what was expected
and what was given, e.g.::

    layernorm_forward: argument 'gamma' expected shape (16,), got (15,)
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# The largest position, length or offset an op takes. Positions enter floating point (RoPE and
# sinusoidal angles, ALiBi distances, T5 bucket logarithms), and every integer up to 2**53 is exact
# in float64; the sum or difference of two of them stays far inside int64, so nothing wraps around.
MAX_POSITION = 2**53 - 1


def _fail(op: str, name: str, expected: str, actual: object) -> None:
    raise ValueError(f"{op}: argument '{name}' expected {expected}, got {actual}")


def _shown(value: object) -> str:
    """``repr(value)``, shortened for an integer too long to read (10**400 has 401 digits)."""
    text = repr(value)
    if isinstance(value, int) and len(text) > 40:
        return f"an integer of {len(text.lstrip('-'))} digits ({text[:12]}...)"
    return text


def _int_text(n: int) -> str:
    """``n`` as written in a message: 2**53 - 1 rather than 9007199254740991."""
    return "2**53 - 1" if n == MAX_POSITION else str(n)


def check_array(op: str, name: str, x: object) -> np.ndarray:
    """``x`` must already be an ``np.ndarray`` (no silent conversion of lists), and not a subclass.

    Subclasses are refused, not converted: ``np.matrix`` makes ``*`` a matrix product and keeps
    every result 2-D, a masked array skips its masked entries in reductions, and neither says so.
    The caller converts (``np.asarray(x)``, or ``x.filled(value)`` for a masked array) and decides.
    """
    if not isinstance(x, np.ndarray):
        _fail(op, name, "a numpy.ndarray", type(x).__name__)
    if type(x) is not np.ndarray:
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        _fail(op, name, "a numpy.ndarray, not a subclass of it",
              f"{kind} (convert it with np.asarray, or .filled() for a masked array)")
    return x


def check_float(op: str, name: str, x: object) -> np.ndarray:
    """``x`` must be a float32 or float64 array."""
    check_array(op, name, x)
    if x.dtype not in FLOAT_DTYPES:
        _fail(op, name, "dtype float32 or float64", x.dtype)
    return x


def check_int(op: str, name: str, x: object) -> np.ndarray:
    """``x`` must be an integer array (token ids, class targets)."""
    check_array(op, name, x)
    if not np.issubdtype(x.dtype, np.integer):
        _fail(op, name, "an integer dtype", x.dtype)
    return x


def check_ndim(op: str, name: str, x: np.ndarray, ndim: int, *, at_least: bool = False) -> None:
    """``x.ndim`` must equal ``ndim`` (or be at least ``ndim``)."""
    ok = x.ndim >= ndim if at_least else x.ndim == ndim
    if not ok:
        want = f"at least {ndim} dimensions" if at_least else f"{ndim} dimensions"
        _fail(op, name, want, f"{x.ndim} (shape {x.shape})")


def check_shape(op: str, name: str, x: np.ndarray, shape: Sequence[Optional[int]]) -> None:
    """``x.shape`` must equal ``shape``; a ``None`` entry matches any size."""
    ok = x.ndim == len(shape) and all(s is None or s == a for s, a in zip(shape, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        _fail(op, name, f"shape {want}", tuple(x.shape))


def check_same_dtype(op: str, ref_name: str, ref: np.ndarray, **others: Optional[np.ndarray]) -> None:
    """Every array in ``others`` must share ``ref``'s dtype (no silent up-casting)."""
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            _fail(op, name, f"dtype {ref.dtype} (same as '{ref_name}')", x.dtype)


def check_same_shape(op: str, ref_name: str, ref: np.ndarray, **others: np.ndarray) -> None:
    """Every array in ``others`` must have exactly ``ref``'s shape (no broadcasting)."""
    for name, x in others.items():
        if x.shape != ref.shape:
            _fail(op, name, f"shape {tuple(ref.shape)} (same as '{ref_name}')", tuple(x.shape))


def check_range(op: str, name: str, value: float, lo: float, hi: float, *, hi_open: bool = True) -> None:
    """A scalar option must lie in [lo, hi) (or [lo, hi])."""
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        _fail(op, name, f"a value in [{lo}, {hi}{')' if hi_open else ']'}", value)


# -- scalar options ------------------------------------------------------------------------
def check_count(op: str, name: str, n: object, lo: int = 0, hi: Optional[int] = None) -> int:
    """An integer option (a size, a count, an offset) in [lo, hi] (no upper bound when ``hi`` is None).

    Bools and floats are refused. Ops pass ``hi=MAX_POSITION`` for positions, lengths and offsets.
    """
    ok = not isinstance(n, bool) and isinstance(n, (int, np.integer)) and n >= lo and (hi is None or n <= hi)
    if not ok:
        _fail(op, name, f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {_int_text(hi)}]",
              _shown(n))
    return int(n)


def check_positions(op: str, offset_name: str, offset: int, length: int) -> None:
    """Positions offset, ..., offset + length - 1 must all be at most MAX_POSITION (exact in float64)."""
    if length and offset + length - 1 > MAX_POSITION:
        _fail(op, offset_name, f"a last position offset + length - 1 <= {_int_text(MAX_POSITION)}",
              f"{offset} + {length} - 1 = {offset + length - 1}")


def memory_limit() -> int:
    """Bytes of physical memory (where the system says; else the largest size NumPy can address)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or the names are unknown
        return int(np.iinfo(np.intp).max)


def check_fits(op: str, name: str, shape: Sequence[int], itemsize: int) -> None:
    """A table of ``shape`` (``itemsize`` bytes each) the op would build must fit in physical memory.

    Refused before any work, naming the argument that sets the largest size, instead of NumPy's
    "Maximum allowed size exceeded" or an allocation that fails (or swaps) half-way through.
    """
    nbytes = math.prod(int(s) for s in shape) * int(itemsize)
    limit = memory_limit()
    if nbytes > limit:
        _fail(op, name, f"a size whose {tuple(int(s) for s in shape)} table fits in memory ({limit} bytes)",
              f"{nbytes} bytes")


def check_real(op: str, name: str, value: object, *, lo: Optional[float] = None, hi: Optional[float] = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real option (eps, scale, a rate) within optional bounds; bools, NaN and inf are refused.

    So is a Python integer too large for a float (10**400): it is not a finite float64.
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    number = None
    if ok:
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64's range
            ok = False
        else:
            ok = math.isfinite(number)
    if ok and lo is not None:
        ok = number > lo if lo_open else number >= lo
    if ok and hi is not None:
        ok = number < hi if hi_open else number <= hi
    if not ok:
        lo_s = "-inf" if lo is None else f"{lo}"
        hi_s = "inf" if hi is None else f"{hi}"
        interval = f"{'(' if lo is None or lo_open else '['}{lo_s}, {hi_s}{')' if hi is None or hi_open else ']'}"
        _fail(op, name, f"a finite real number in {interval}", _shown(value))
    return number


def check_bool(op: str, name: str, value: object) -> bool:
    """A flag: ``True`` or ``False`` (numpy bools too), nothing that merely converts to one."""
    if not isinstance(value, (bool, np.bool_)):
        _fail(op, name, "a bool", repr(value))
    return bool(value)


def check_dtype_option(op: str, name: str, dtype: object) -> np.dtype:
    """A ``dtype=`` option naming float32 or float64."""
    try:
        dt = np.dtype(dtype) if dtype is not None else None  # np.dtype(None) would be float64
    except TypeError:
        dt = None
    if dt is None or dt not in FLOAT_DTYPES:
        _fail(op, name, "float32 or float64", repr(dtype))
    return dt


def check_same_dtype_as(op: str, name: str, x: np.ndarray, dtype: np.dtype, ref_name: str) -> None:
    """``x`` (a float array) must have ``dtype``, the dtype of the array named ``ref_name``."""
    check_float(op, name, x)
    if x.dtype != dtype:
        _fail(op, name, f"dtype {dtype} (same as '{ref_name}')", x.dtype)


def check_cache_type(op: str, cache: object, cache_type: type) -> None:
    """A backward's ``cache`` must be what the matching forward returned (``cache_type``)."""
    if not isinstance(cache, cache_type):
        _fail(op, "cache", f"a {cache_type.__name__} from the matching forward", type(cache).__name__)


def check_rows(op: str, name: str, x: object) -> int:
    """A float array of rows (..., D) with D >= 1, normalised along its last axis; returns D."""
    check_float(op, name, x)
    check_ndim(op, name, x, 1, at_least=True)
    if x.shape[-1] == 0:
        _fail(op, name, "at least one entry on the last axis", f"shape {tuple(x.shape)}")
    return x.shape[-1]


def check_like(op: str, name: str, x: object, like: np.ndarray, like_name: str = "x") -> None:
    """``x`` (an upstream gradient) must be a float array of ``like``'s dtype and exact shape."""
    check_same_dtype_as(op, name, x, like.dtype, like_name)
    check_shape(op, name, x, like.shape)
