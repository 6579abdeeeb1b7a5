"""Rotary position embedding (RoPE): forward and hand-derived backward.

Derivation: ``proofs/rope.md``. Shapes: ``x: (B, H, T, D)`` with ``D`` even, one
rotation angle per position ``p`` and frequency ``i < D/2``:
``theta[p, i] = p * base**(-2i/D)`` (ROPE.1). Each pair of coordinates of a row is
rotated by its angle (ROPE.2). Which coordinates form a pair is the convention:

- rotate-half (default; LLaMA / Hugging Face): pairs ``(i, i + D/2)``;
- interleaved (``interleaved=True``; GPT-J / the RoFormer paper): pairs ``(2i, 2i + 1)``.

The two differ only by a permutation of the last axis (ROPE.7). The rotation is
orthogonal, so the backward is the same rotation by ``-theta`` (ROPE.5).

Angles, cosines and sines are computed in float64 and then cast to the dtype of
``x``; a GPU kernel with the same semantics computes ``cos``/``sin`` of exactly
these angles.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import check_float, check_int, check_ndim

OP = "rope"


class RopeCache(NamedTuple):
    cos: np.ndarray  # (1 or B, 1, T, D/2)  cos(theta), dtype of x, (ROPE.1)
    sin: np.ndarray  # (1 or B, 1, T, D/2)  sin(theta)
    interleaved: bool  # pair convention, (ROPE.7)
    shape: tuple  # (B, H, T, D) of x, to check dy against


def _check_even_dim(op: str, name: str, D: int) -> None:
    if D < 2 or D % 2:
        raise ValueError(f"{op}: argument '{name}' expected an even size D >= 2 of the last axis, got {D}")


def rope_cos_sin(
    positions: np.ndarray, D: int, base: float = 10000.0, dtype=np.float32
) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles theta[..., i] = positions[...] * base**(-2i/D).

    positions: (...) int  ->  cos, sin: (..., D/2) in ``dtype`` (one angle per pair)
    """
    op = "rope_cos_sin"
    check_int(op, "positions", positions)
    _check_even_dim(op, "D", int(D))
    if not base > 0:
        raise ValueError(f"{op}: argument 'base' expected a value > 0, got {base}")
    inv_freq = float(base) ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)  (ROPE.1)
    theta = positions.astype(np.float64)[..., None] * inv_freq  # (..., D/2)  (ROPE.1)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def _pairs(x: np.ndarray, interleaved: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The two coordinates of every rotated pair, as views: (..., D/2) each."""
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotate every pair (x1, x2) of x by the angle whose cosine and sine are given.

    x: (B, H, T, D), cos, sin: broadcastable to (B, H, T, D/2)  ->  (B, H, T, D)
    """
    x1, x2 = _pairs(x, interleaved)
    y = np.empty_like(x)
    y1, y2 = _pairs(y, interleaved)
    np.subtract(x1 * cos, x2 * sin, out=y1)  # (ROPE.3)
    np.add(x2 * cos, x1 * sin, out=y2)  # (ROPE.3)
    return y


def _positions(op: str, positions: Optional[np.ndarray], offset: int, B: int, T: int) -> np.ndarray:
    """Positions as (1 or B, 1, T): offset + arange(T), or the given array."""
    if positions is None:
        return (int(offset) + np.arange(T, dtype=np.int64))[None, None, :]
    check_int(op, "positions", positions)
    if offset != 0:
        raise ValueError(f"{op}: argument 'offset' expected 0 when 'positions' is given, got {offset}")
    if positions.shape == (T,):
        return positions[None, None, :]
    if positions.shape == (B, T):
        return positions[:, None, :]
    raise ValueError(f"{op}: argument 'positions' expected shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")


def rope_forward(
    x: np.ndarray,
    *,
    base: float = 10000.0,
    offset: int = 0,
    positions: Optional[np.ndarray] = None,
    interleaved: bool = False,
) -> Tuple[np.ndarray, RopeCache]:
    """y = R(theta_p) x for each row, p = offset + t (or positions[t] / positions[b, t]).

    x: (B, H, T, D), positions: (T,) or (B, T) int  ->  y: (B, H, T, D)
    """
    op = f"{OP}_forward"
    check_float(op, "x", x)
    check_ndim(op, "x", x, 4)
    B, H, T, D = x.shape
    _check_even_dim(op, "x", D)
    pos = _positions(op, positions, offset, B, T)  # (1 or B, 1, T)
    cos, sin = rope_cos_sin(pos, D, base, x.dtype)  # (1 or B, 1, T, D/2)  (ROPE.1)
    y = _rotate(x, cos, sin, interleaved)  # (ROPE.2), (ROPE.3)
    return y, RopeCache(cos=cos, sin=sin, interleaved=bool(interleaved), shape=x.shape)


def rope_backward(dy: np.ndarray, cache: RopeCache) -> np.ndarray:
    """dx = R(theta)^T dy = R(-theta) dy: the same rotation, backwards.

    dy: (B, H, T, D)  ->  dx: (B, H, T, D)
    """
    op = f"{OP}_backward"
    check_float(op, "dy", dy)
    if dy.shape != cache.shape:
        raise ValueError(f"{op}: argument 'dy' expected shape {cache.shape}, got {tuple(dy.shape)}")
    if dy.dtype != cache.cos.dtype:
        raise ValueError(f"{op}: argument 'dy' expected dtype {cache.cos.dtype} (same as 'x'), got {dy.dtype}")
    return _rotate(dy, cache.cos, -cache.sin, cache.interleaved)  # (ROPE.5)


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck rope``: both conventions, offset and explicit positions."""
    from ..gradcheck import Case

    x = rng.standard_normal((2, 3, 5, 6))
    yield Case("rope (rotate-half, offset 3)", rope_forward, rope_backward, {"x": x}, wrt=("x",),
               options={"offset": 3})
    yield Case("rope (interleaved, positions)", rope_forward, rope_backward, {"x": x}, wrt=("x",),
               options={"interleaved": True, "positions": np.array([[0, 4, 1, 9, 2], [7, 7, 3, 0, 5]])})
