"""Inverted dropout with an explicit random generator: forward and backward.

Derivation: ``proofs/dropout.md``. Shapes: ``x: (...)`` any, empty included;
``mask`` the same shape, dtype bool (True = kept: a mask of 0/1 floats or ints is
refused rather than guessed at). In training each element is kept with probability
1 - p and scaled by 1/(1 - p), so the expectation of the output equals the input
and evaluation needs no rescaling. The mask comes from the ``numpy.random.Generator``
passed in, so a seeded generator reproduces every mask, and the mask is kept in the
cache (a torch twin can reuse it to check a whole model).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_array,
    check_bool,
    check_cache_type,
    check_fits,
    check_float,
    check_real,
    check_same_dtype_as,
    check_shape,
)

OP = "dropout"


class DropoutCache(NamedTuple):
    mask: Optional[np.ndarray]  # bool (...), True = kept (the cache's own copy); None for the identity
    scale: float  # s = 1 / (1 - p) of (DO.2)
    shape: Tuple[int, ...]  # of x, so that dy can be checked against it
    dtype: np.dtype  # of x


def _check_p(op: str, p: object) -> float:
    return check_real(op, "p", p, lo=0.0, hi=1.0, hi_open=True)


def _check_rng(op: str, rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        _fail(op, "rng", "a numpy.random.Generator", type(rng).__name__)


def _check_shape_arg(op: str, shape: object) -> Tuple[int, ...]:
    """A shape: an int or a tuple/list of ints, each in [0, MAX_POSITION]."""
    dims = (shape,) if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool) else shape
    ok = isinstance(dims, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and 0 <= d <= MAX_POSITION for d in dims)
    if not ok:
        _fail(op, "shape", "a tuple of integers in [0, 2**53 - 1]", repr(shape))
    return tuple(int(d) for d in dims)


def dropout_mask(shape, p: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each element independently with probability 1 - p (DO.1).  shape: (...) -> bool (...)"""
    op = "dropout_mask"
    shape = _check_shape_arg(op, shape)
    check_fits(op, "shape", shape, 8)  # the float64 uniform draws
    p = _check_p(op, p)
    _check_rng(op, rng)
    return rng.random(shape) >= p  # (DO.1)


def dropout_forward(
    x: np.ndarray, p: float, rng: Optional[np.random.Generator], *, training: bool = True,
    mask: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, DropoutCache]:
    """y = x * mask / (1 - p) in training; in evaluation, or with p = 0 and no mask, y = x.

    x: (...)  ->  y: (...).  ``mask`` (bool, x's shape) replaces the random draw and is always
    applied, p = 0 included (scale 1); ``rng`` may then be None, and is not used. A mask in
    evaluation is refused: evaluation is the identity, and a mask there would be ignored.

    The identity returns ``x`` itself (and its backward ``dy`` itself), as torch's dropout
    does in evaluation: no copy is made where nothing changes. Otherwise ``y`` is a new array,
    and the cache keeps its own copy of a given mask.
    """
    op = f"{OP}_forward"
    check_float(op, "x", x)
    p = _check_p(op, p)
    training = check_bool(op, "training", training)
    if mask is not None:
        check_array(op, "mask", mask)
        if mask.dtype != np.bool_:
            _fail(op, "mask", "dtype bool (True = kept)", mask.dtype)
        check_shape(op, "mask", mask, x.shape)
        if not training:
            _fail(op, "mask", "None when 'training' is False (evaluation is the identity)", "a mask")
    if training and p > 0.0 and mask is None:
        _check_rng(op, rng)

    if not training or (p == 0.0 and mask is None):
        return x, DropoutCache(mask=None, scale=1.0, shape=x.shape, dtype=x.dtype)
    if mask is None:
        mask = dropout_mask(x.shape, p, rng)  # (DO.1)
    else:
        mask = mask.copy()  # the caller's mask may change after this call; the backward's must not
    scale = 1.0 / (1.0 - p)
    y = np.empty(x.shape, x.dtype)  # an array for 0-d x too (x * mask would be a NumPy scalar)
    np.multiply(x, mask, out=y)  # (DO.2)
    y *= x.dtype.type(scale)
    return y, DropoutCache(mask=mask, scale=scale, shape=x.shape, dtype=x.dtype)


def dropout_backward(dy: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """dx = dy * mask / (1 - p) (DO.3): the same mask, the same scale.

    dy: (...), a float array of x's shape and dtype  ->  dx: (...) (``dy`` itself for the identity)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, DropoutCache)
    mask, scale, shape, dtype = cache
    check_same_dtype_as(op, "dy", dy, dtype, "x")
    check_shape(op, "dy", dy, shape)
    if mask is None:
        return dy
    dx = np.empty(shape, dtype)  # an array for 0-d dy too
    np.multiply(dy, mask, out=dx)  # (DO.3)
    dx *= dy.dtype.type(scale)
    return dx


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck dropout`` (a fixed mask, so the op is deterministic)."""
    from ..gradcheck import Case

    x = rng.standard_normal((3, 5))
    mask = rng.random((3, 5)) >= 0.3
    yield Case("dropout", dropout_forward, dropout_backward, {"x": x},
               wrt=("x",), options={"p": 0.3, "rng": None, "mask": mask})
