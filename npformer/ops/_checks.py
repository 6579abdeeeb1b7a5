"""Input validation shared by every op: fail loudly, early, and by name.

Each check raises ``ValueError`` with the op, the argument, what was expected
and what was given, e.g.::

    layernorm_forward: argument 'gamma' expected shape (16,), got (15,)
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _fail(op: str, name: str, expected: str, actual: object) -> None:
    raise ValueError(f"{op}: argument '{name}' expected {expected}, got {actual}")


def check_array(op: str, name: str, x: object) -> np.ndarray:
    """``x`` must already be an ``np.ndarray`` (no silent conversion of lists)."""
    if not isinstance(x, np.ndarray):
        _fail(op, name, "a numpy.ndarray", type(x).__name__)
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
