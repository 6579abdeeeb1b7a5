"""Rotary position embedding (RoPE): forward and hand-derived backward.

Derivation: ``proofs/rope.md``. Shapes: ``x: (B, H, T, D)`` with ``D`` even, one
rotation angle per position ``p`` and frequency ``i < D/2``:
``theta[p, i] = p * base**(-2i/D)`` (ROPE.1). Each pair of coordinates of a row is
rotated by its angle (ROPE.2). Which coordinates form a pair is the convention:

- rotate-half (default; LLaMA / Hugging Face): pairs ``(i, i + D/2)``;
- interleaved (``interleaved=True``; GPT-J / the RoFormer paper): pairs ``(2i, 2i + 1)``.

The two differ only by a permutation of the last axis (ROPE.7). The rotation is
orthogonal, so the backward is the same rotation by ``-theta`` (ROPE.5).

Positions: ``offset + t`` for row ``t`` (``offset`` an integer >= 0, the position of
the first row after a cache of ``offset`` tokens; a float is refused, not truncated),
or an explicit integer array ``positions`` of shape (T,) or (B, T), any values with
|p| <= 2**53 - 1. Every position is exact in float64 within that bound, and
``offset + T - 1`` cannot wrap around in int64; beyond it a position is refused by name.

Angles, cosines and sines are computed in float64 and then cast to the dtype of
``x``; a GPU kernel with the same semantics computes ``cos``/``sin`` of exactly
these angles.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_bool,
    check_cache_type,
    check_count,
    check_dtype_option,
    check_float,
    check_fits,
    check_int,
    check_ndim,
    check_positions,
    check_real,
)

OP = "rope"


class RopeCache(NamedTuple):
    cos: np.ndarray  # (1 or B, 1, T, D/2)  cos(theta), dtype of x, (ROPE.1)
    sin: np.ndarray  # (1 or B, 1, T, D/2)  sin(theta)
    interleaved: bool  # pair convention, (ROPE.7)
    shape: tuple  # (B, H, T, D) of x, to check dy against


def rope_cos_sin(
    positions: np.ndarray, D: int, base: float = 10000.0, dtype=np.float32
) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles theta[..., i] = positions[...] * base**(-2i/D).

    positions: (...) int  ->  cos, sin: (..., D/2) in ``dtype`` (one angle per pair)
    """
    op = "rope_cos_sin"
    _check_position_values(op, positions)
    D = check_count(op, "D", D, 2, MAX_POSITION)
    if D % 2:
        _fail(op, "D", "an even integer >= 2", D)
    check_fits(op, "D", positions.shape + (D // 2,), 8)  # theta, in float64
    base = check_real(op, "base", base, lo=0.0, lo_open=True)
    dtype = check_dtype_option(op, "dtype", dtype)
    inv_freq = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)  (ROPE.1)
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
    y = np.empty(x.shape, x.dtype)  # C-contiguous whatever the layout of x
    y1, y2 = _pairs(y, interleaved)
    np.subtract(x1 * cos, x2 * sin, out=y1)  # (ROPE.3)
    np.add(x2 * cos, x1 * sin, out=y2)  # (ROPE.3)
    return y


def _check_position_values(op: str, positions: object) -> None:
    """An integer array of positions p, each with |p| <= MAX_POSITION (exact in float64)."""
    check_int(op, "positions", positions)
    if positions.size:
        lo, hi = int(positions.min()), int(positions.max())  # Python ints: uint64 compared exactly
        if lo < -MAX_POSITION or hi > MAX_POSITION:
            _fail(op, "positions", "values p with |p| <= 2**53 - 1 (exact in float64)",
                  f"values in [{lo}, {hi}]")


def _positions(op: str, positions: Optional[np.ndarray], offset: int, B: int, T: int) -> np.ndarray:
    """Positions as (1 or B, 1, T): offset + arange(T), or the given array."""
    offset = check_count(op, "offset", offset, 0, MAX_POSITION)
    if positions is None:
        check_positions(op, "offset", offset, T)  # offset + T - 1 <= MAX_POSITION: no int64 wraparound
        return (offset + np.arange(T, dtype=np.int64))[None, None, :]
    _check_position_values(op, positions)
    if offset != 0:
        _fail(op, "offset", "0 when 'positions' is given", offset)
    if positions.shape == (T,):
        return positions[None, None, :]
    if positions.shape == (B, T):
        return positions[:, None, :]
    _fail(op, "positions", f"shape ({T},) or ({B}, {T}) (length, or batch and length, of 'x')",
          tuple(positions.shape))


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
    if D < 2 or D % 2:
        _fail(op, "x", "an even size D >= 2 of the last axis", f"{D} (shape {tuple(x.shape)})")
    base = check_real(op, "base", base, lo=0.0, lo_open=True)
    interleaved = check_bool(op, "interleaved", interleaved)
    pos = _positions(op, positions, offset, B, T)  # (1 or B, 1, T)
    cos, sin = rope_cos_sin(pos, D, base, x.dtype)  # (1 or B, 1, T, D/2)  (ROPE.1)
    y = _rotate(x, cos, sin, interleaved)  # (ROPE.2), (ROPE.3)
    return y, RopeCache(cos=cos, sin=sin, interleaved=interleaved, shape=x.shape)


def rope_backward(dy: np.ndarray, cache: RopeCache) -> np.ndarray:
    """dx = R(theta)^T dy = R(-theta) dy: the same rotation, backwards.

    dy: (B, H, T, D)  ->  dx: (B, H, T, D)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, RopeCache)
    check_float(op, "dy", dy)
    if dy.shape != cache.shape:
        _fail(op, "dy", f"shape {tuple(cache.shape)} (that of the forward's 'x')", tuple(dy.shape))
    if dy.dtype != cache.cos.dtype:
        _fail(op, "dy", f"dtype {cache.cos.dtype} (that of the forward's 'x')", dy.dtype)
    return _rotate(dy, cache.cos, -cache.sin, cache.interleaved)  # (ROPE.5)


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck rope``: both conventions, offset and explicit positions."""
    from ..gradcheck import Case

    x = rng.standard_normal((2, 3, 5, 6))
    yield Case("rope (rotate-half, offset 3)", rope_forward, rope_backward, {"x": x}, wrt=("x",),
               options={"offset": 3})
    yield Case("rope (interleaved, positions)", rope_forward, rope_backward, {"x": x}, wrt=("x",),
               options={"interleaved": True, "positions": np.array([[0, 4, 1, 9, 2], [7, 7, 3, 0, 5]])})
