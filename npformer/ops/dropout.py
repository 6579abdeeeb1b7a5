"""Inverted dropout with an explicit random generator: forward and backward.

Derivation: ``proofs/dropout.md``. Shapes: ``x: (...)`` any, ``mask`` the same.
In training each element is kept with probability 1 - p and scaled by 1/(1 - p),
so the expectation of the output equals the input and evaluation needs no
rescaling. The mask comes from the ``numpy.random.Generator`` passed in, so a
seeded generator reproduces every mask, and the mask is kept in the cache (a torch
twin can reuse it to check a whole model).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import check_float, check_range, check_shape

OP = "dropout"


class DropoutCache(NamedTuple):
    mask: Optional[np.ndarray]  # bool (...), True = kept; None when dropout is the identity
    scale: float  # 1 / (1 - p)


def dropout_mask(shape, p: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each element independently with probability 1 - p (DO.1)."""
    return rng.random(shape) >= p


def dropout_forward(
    x: np.ndarray, p: float, rng: np.random.Generator, *, training: bool = True, mask: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, DropoutCache]:
    """y = x * mask / (1 - p) in training (or with p = 0: y = x, drawing nothing).

    x: (...)  ->  y: (...).  ``mask`` (bool, x's shape) replaces the random draw.
    """
    check_float(f"{OP}_forward", "x", x)
    check_range(f"{OP}_forward", "p", p, 0.0, 1.0)
    if not training or p == 0.0:
        return x, DropoutCache(mask=None, scale=1.0)
    if mask is None:
        mask = dropout_mask(x.shape, p, rng)
    else:
        check_shape(f"{OP}_forward", "mask", mask, x.shape)
    scale = 1.0 / (1.0 - p)
    y = x * mask  # (DO.2)
    y *= x.dtype.type(scale)
    return y, DropoutCache(mask=mask, scale=scale)


def dropout_backward(dy: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """dx = dy * mask / (1 - p) (DO.3): the same mask, the same scale.

    dy: (...)  ->  dx: (...)
    """
    mask, scale = cache
    if mask is None:
        return dy
    check_shape(f"{OP}_backward", "dy", dy, mask.shape)
    dx = dy * mask  # (DO.3)
    dx *= dy.dtype.type(scale)
    return dx


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck dropout`` (a fixed mask, so the op is deterministic)."""
    from ..gradcheck import Case

    x = rng.standard_normal((3, 5))
    mask = rng.random((3, 5)) >= 0.3
    yield Case("dropout", dropout_forward, dropout_backward, {"x": x},
               wrt=("x",), options={"p": 0.3, "rng": None, "mask": mask})
