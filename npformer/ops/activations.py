"""Elementwise activations and gated units: forward and hand-derived backward.

Derivation: ``proofs/activations.md``; each line of a backward cites the
equation it implements. Every op here acts on each element on its own, so any
shape works, empty included (empty in, empty out): ``x: (...)`` (in a transformer
MLP, ``(B, T, F)`` with ``F`` the hidden width). The gated units take two arrays of
one identical shape and dtype; every backward takes ``dy`` of its forward input's
shape and dtype. A 0-d array in gives 0-d arrays out, never NumPy scalars.

    relu    y = max(x, 0)
    gelu    y = x Phi(x)                       approximate="none"  (exact, with erf)
            y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   approximate="tanh"  (GPT-2)
            y = x sigmoid(1.702 x)             approximate="sigmoid"
    silu    y = x sigmoid(x)
    mish    y = x tanh(softplus(x))
    swiglu  y = silu(gate) * up                (LLaMA)
    geglu   y = gelu(gate) * up

NumPy has no ``erf``, so this module evaluates one (``erf``, ``erfc``) to float64
round-off: a positive-term power series for ``|x| < 1.5`` and a continued fraction
beyond, (ACT.2) and (ACT.3). Sigmoid and softplus are written so that no ``exp``
ever sees a large positive argument: inputs of any magnitude give finite outputs
and gradients without overflow.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import _fail, check_cache_type, check_float, check_like, check_same_dtype_as, check_same_shape
from .fastpath import row_parallel

APPROXIMATIONS = ("none", "tanh")  # the forms of GELU in GeGLU
GELU_APPROXIMATIONS = APPROXIMATIONS + ("sigmoid",)  # the forms of the gelu op itself

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_ONE_OVER_SQRT_PI = 1.0 / math.sqrt(math.pi)
_ONE_OVER_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715  # the cubic coefficient of the tanh approximation, (ACT.8)
_GELU_SIGMOID_SCALE = 1.702  # the slope of the sigmoid approximation, (ACT.22)
# |x| beyond which sigmoid(1.702 x) is exactly 0 or 1 in float32 and float64 (1.702e4 is past both dtypes'
# exp underflow); the argument is clipped there so that 1.702 x never overflows and (ACT.23) never forms inf * 0
_GELU_SIGMOID_CLIP = 1e4

# erf: series below the split, continued fraction from it on. With these term counts
# both parts reach float64 round-off on their whole range (the tests check it densely).
_ERF_SPLIT = 1.5
_ERF_SERIES_TERMS = 30
_ERFC_FRACTION_TERMS = 80
_ERFC_ZERO_FROM = 40.0  # erfc(40) ~ 1e-697, far below the smallest float64


# ---------------------------------------------------------------------------
# erf and erfc
# ---------------------------------------------------------------------------


def _exp_minus_square(a: np.ndarray) -> np.ndarray:
    """e^(-a^2) without the rounding of a^2 magnified by the exponential.

    A rounding error d in a^2 is a relative error d in e^(-a^2), about 1e-13 at a = 30.
    Split a = h + r with h on a grid of 2^-12, so that h^2 is exact in float64, and
    a^2 = h^2 + r (a + h) with a small second term.
    """
    h = np.round(a * 4096.0) / 4096.0
    return np.exp(-(h * h)) * np.exp(-((a - h) * (a + h)))


def _erf_series(a: np.ndarray) -> np.ndarray:
    """erf(a) for 0 <= a < 1.5 by the positive-term series (ACT.2): no cancellation.

    Nested from the last term up: sum = 1 + (2a^2/3) (1 + (2a^2/5) (1 + ...)).
    """
    two_a2 = 2.0 * (a * a)
    nested = np.ones_like(a)
    for n in range(_ERF_SERIES_TERMS - 1, 0, -1):
        nested = 1.0 + two_a2 * nested / (2 * n + 1)
    return (_TWO_OVER_SQRT_PI * a) * _exp_minus_square(a) * nested


def _erfc_fraction(a: np.ndarray) -> np.ndarray:
    """erfc(a) for a >= 1.5 by the continued fraction (ACT.3), evaluated from the tail up."""
    a = np.minimum(a, _ERFC_ZERO_FROM)  # erfc is 0 in float64 beyond; keeps a^2 and inf finite
    f = a.copy()
    for k in range(_ERFC_FRACTION_TERMS, 0, -1):
        f = a + (0.5 * k) / f
    return _ONE_OVER_SQRT_PI * _exp_minus_square(a) / f


def _erf(x: np.ndarray) -> np.ndarray:
    """erf of a float array of any shape, 0-d included (worked on as one flat row)."""
    flat = x.reshape(-1)
    a = np.abs(flat)
    out = np.empty_like(flat)
    small = a < _ERF_SPLIT
    out[small] = _erf_series(a[small])
    out[~small] = 1.0 - _erfc_fraction(a[~small])
    return np.copysign(out, flat).reshape(x.shape)  # erf is odd


def _erfc(x: np.ndarray) -> np.ndarray:
    """erfc of a float array of any shape, 0-d included (worked on as one flat row)."""
    flat = x.reshape(-1)
    a = np.abs(flat)
    out = np.empty_like(flat)
    small = a < _ERF_SPLIT
    out[small] = 1.0 - np.copysign(_erf_series(a[small]), flat[small])
    tail = _erfc_fraction(a[~small])
    out[~small] = np.where(flat[~small] > 0, tail, 2.0 - tail)  # erfc(-a) = 2 - erfc(a)
    return out.reshape(x.shape)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, to float64 round-off; dtype preserved. x: (...) -> (...)"""
    check_float("erf", "x", x)
    return _erf(x)


def erfc(x: np.ndarray) -> np.ndarray:
    """1 - erf(x), elementwise, without cancellation for large positive x; dtype preserved. x: (...) -> (...)"""
    check_float("erfc", "x", x)
    return _erfc(x)


# ---------------------------------------------------------------------------
# shared pieces: checks, sigmoid, softplus
# ---------------------------------------------------------------------------


def _array(a) -> np.ndarray:
    """``a`` as an ndarray (itself when it is one already).

    A ufunc given 0-d arrays returns a NumPy scalar, not a 0-d array, and the next op
    would refuse it: every result and every cached value here passes through this.
    """
    return np.asarray(a)


def _check_approximate(op: str, approximate: object, choices: Tuple[str, ...] = APPROXIMATIONS) -> None:
    if not isinstance(approximate, str) or approximate not in choices:
        expected = " or ".join(", ".join(map(repr, choices)).rsplit(", ", 1))
        _fail(op, "approximate", expected, repr(approximate))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) with exp taken of -|x| only (ACT.10)."""
    e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|) (ACT.13)."""
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


# ---------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------


class ReluCache(NamedTuple):
    x: np.ndarray  # (...)  input; the backward needs only its sign


def relu_forward(x: np.ndarray) -> Tuple[np.ndarray, ReluCache]:
    """y = max(x, 0) (ACT.4).  x: (...) -> y: (...)"""
    check_float("relu_forward", "x", x)
    y = _array(np.maximum(x, 0.0))  # (ACT.4)
    return y, ReluCache(x=x)


def relu_backward(dy: np.ndarray, cache: ReluCache) -> np.ndarray:
    """dx = 0 where x <= 0, else dy (ACT.5); the kink x = 0 gets 0, as in torch.  dy: (...) -> dx: (...)

    Written as "zero where x <= 0" so that a NaN input passes its gradient through, as torch does
    (NaN <= 0 is false): a NaN in the forward stays visible in the backward.
    """
    check_cache_type("relu_backward", cache, ReluCache)
    x = cache.x
    check_like("relu_backward", "dy", dy, x)
    dx = np.where(x <= 0, np.zeros((), dy.dtype), dy)  # (ACT.5)
    return dx


# ---------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------


class GeluCache(NamedTuple):
    x: np.ndarray  # (...)  input
    cdf: np.ndarray  # (...)  Phi(x) (ACT.6), its tanh form 1/2 (1 + tanh u) (ACT.8) or sigmoid(1.702 x) (ACT.22)
    tanh_u: Optional[np.ndarray]  # (...)  tanh(u(x)) of (ACT.8) for "tanh"; None otherwise
    approximate: str  # "none", "tanh" or "sigmoid"


CHUNK = 1 << 18  # elements per chunk of a long in-place chain: a float32 chunk is 1 MiB, an L2 cache's size


def _chunks(elements: slice):
    """Slices of ``CHUNK`` elements covering ``elements`` (a slice with a start and a stop).

    A chain of elementwise steps over a large array (the GPT's MLP activations are 6 M
    floats) reads and writes memory once per step; run chunk by chunk, every step after
    the first finds its operands in cache. Chunks are not smaller: each NumPy call
    releases the interpreter lock only while its loop runs, and threads making many short
    calls spend their time handing the lock to each other (at 32 K elements per chunk, two
    threads were slower than one).
    """
    return (slice(i, min(i + CHUNK, elements.stop)) for i in range(elements.start, elements.stop, CHUNK))


def _gelu_tanh_parts(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = x cdf, tanh(u) and cdf = 1/2 (1 + tanh u), u = sqrt(2/pi) (x + kappa x^3) (ACT.8).  x: (...)

    Three new C-ordered arrays of x's shape, whatever x's layout. ``buf`` is a chunk of
    the ``tanh_u`` output, filled in place: x^2, then u, then tanh u.
    """
    x_flat = x.reshape(-1)  # a view, or a C-ordered copy of a non-contiguous x
    y, tanh_u, cdf = (np.empty(x_flat.size, x.dtype) for _ in range(3))

    def part(elements: slice) -> None:  # elementwise: parts of the array run on several cores
        for c in _chunks(elements):
            buf = np.square(x_flat[c], out=tanh_u[c])
            buf *= _SQRT_2_OVER_PI * _KAPPA
            buf += _SQRT_2_OVER_PI
            buf *= x_flat[c]  # u = x (c + c kappa x^2), c = sqrt(2/pi): (ACT.8) with one product fewer
            np.tanh(buf, out=buf)
            cdf_c = np.add(buf, 1.0, out=cdf[c])
            cdf_c *= 0.5
            np.multiply(x_flat[c], cdf_c, out=y[c])

    row_parallel(part, x_flat.size)
    return y.reshape(x.shape), tanh_u.reshape(x.shape), cdf.reshape(x.shape)


def gelu_forward(x: np.ndarray, approximate: str = "none") -> Tuple[np.ndarray, GeluCache]:
    """y = x Phi(x) exactly (ACT.6), GPT-2's tanh form (ACT.8) or the sigmoid form (ACT.22).  x: (...) -> y: (...)

    "none" and "tanh" match ``torch.nn.functional.gelu(x, approximate=...)``; "sigmoid" is
    x sigmoid(1.702 x), which torch has no option for.
    """
    check_float("gelu_forward", "x", x)
    _check_approximate("gelu_forward", approximate, GELU_APPROXIMATIONS)
    if approximate == "sigmoid":
        xc = np.clip(x, -_GELU_SIGMOID_CLIP, _GELU_SIGMOID_CLIP)  # changes no sigmoid value: it saturates first
        cdf = _array(_sigmoid(_GELU_SIGMOID_SCALE * xc))  # (ACT.22)  sigmoid(1.702 x) in Phi's place, (ACT.10)
        tanh_u = None
        y = _array(x * cdf)  # (ACT.22)
    elif approximate == "none":
        cdf = _array(0.5 * _erfc(_array(-_SQRT_HALF * x)))  # (ACT.6)  Phi(x); erfc keeps its left tail accurate
        tanh_u = None
        y = _array(x * cdf)  # (ACT.6)
    else:
        y, tanh_u, cdf = _gelu_tanh_parts(x)  # (ACT.8)
    return y, GeluCache(x=x, cdf=cdf, tanh_u=tanh_u, approximate=approximate)


def gelu_backward(dy: np.ndarray, cache: GeluCache) -> np.ndarray:
    """dx = dy * gelu'(x) (ACT.1), with gelu' from (ACT.7), (ACT.9) or (ACT.23).  dy: (...) -> dx: (...)"""
    check_cache_type("gelu_backward", cache, GeluCache)
    x, cdf, tanh_u, approximate = cache
    check_like("gelu_backward", "dy", dy, x)
    if approximate == "sigmoid":
        # clipped x: where the sigmoid saturates, 1 - cdf (x > 0) or cdf (x < 0) is exactly 0, and the
        # finite 1.702 x_c times it is 0 (an unclipped 1.702 x overflows for |x| > ~2e38 in float32: inf * 0)
        xc = np.clip(x, -_GELU_SIGMOID_CLIP, _GELU_SIGMOID_CLIP)
        dgelu = cdf * (1.0 + _GELU_SIGMOID_SCALE * xc * (1.0 - cdf))  # (ACT.23)
        return _array(dy * dgelu)  # (ACT.1)
    if approximate == "none":
        pdf = _ONE_OVER_SQRT_2PI * np.exp(-0.5 * (x * x))  # phi(x)
        dgelu = cdf + x * pdf  # (ACT.7)
        dx = _array(dy * dgelu)  # (ACT.1)
        return dx
    # (ACT.9): gelu' = cdf + 1/2 x (1 - tanh^2 u) du/dx, then times dy (ACT.1), chunk by chunk
    x_flat, t_flat, cdf_flat, dy_flat = x.reshape(-1), tanh_u.reshape(-1), cdf.reshape(-1), dy.reshape(-1)
    dx = np.empty(x_flat.size, x.dtype)  # C-ordered, so that the reshape below is a view

    def part(elements: slice) -> None:  # elementwise: parts of the array run on several cores
        for c in _chunks(elements):
            xc = x_flat[c]
            du_dx = np.square(xc)
            du_dx *= 3.0 * _KAPPA
            du_dx += 1.0
            du_dx *= _SQRT_2_OVER_PI  # du/dx = sqrt(2/pi) (1 + 3 kappa x^2)
            g = np.square(t_flat[c], out=dx[c])
            np.subtract(1.0, g, out=g)
            g *= xc
            g *= 0.5
            g *= du_dx
            g += cdf_flat[c]  # gelu'(x)
            g *= dy_flat[c]

    row_parallel(part, x_flat.size)
    return dx.reshape(x.shape)


# ---------------------------------------------------------------------------
# SiLU (swish)
# ---------------------------------------------------------------------------


class SiluCache(NamedTuple):
    x: np.ndarray  # (...)  input
    s: np.ndarray  # (...)  sigmoid(x), (ACT.10)


def silu_forward(x: np.ndarray) -> Tuple[np.ndarray, SiluCache]:
    """y = x sigmoid(x) (ACT.11).  x: (...) -> y: (...)"""
    check_float("silu_forward", "x", x)
    s = _sigmoid(x)  # (ACT.10)
    y = _array(x * s)  # (ACT.11)
    return y, SiluCache(x=x, s=s)


def silu_backward(dy: np.ndarray, cache: SiluCache) -> np.ndarray:
    """dx = dy * s (1 + x (1 - s)) (ACT.12).  dy: (...) -> dx: (...)"""
    check_cache_type("silu_backward", cache, SiluCache)
    x, s = cache
    check_like("silu_backward", "dy", dy, x)
    dsilu = s * (1.0 + x * (1.0 - s))  # (ACT.12)
    return _array(dy * dsilu)  # (ACT.1)


# ---------------------------------------------------------------------------
# Mish
# ---------------------------------------------------------------------------


class MishCache(NamedTuple):
    x: np.ndarray  # (...)  input
    t: np.ndarray  # (...)  tanh(softplus(x)), (ACT.14)


def mish_forward(x: np.ndarray) -> Tuple[np.ndarray, MishCache]:
    """y = x tanh(softplus(x)) (ACT.14).  x: (...) -> y: (...)"""
    check_float("mish_forward", "x", x)
    t = _array(np.tanh(_softplus(x)))  # (ACT.13), (ACT.14)
    y = _array(x * t)  # (ACT.14)
    return y, MishCache(x=x, t=t)


def mish_backward(dy: np.ndarray, cache: MishCache) -> np.ndarray:
    """dx = dy * (t + x (1 - t^2) sigmoid(x)) (ACT.15).  dy: (...) -> dx: (...)"""
    check_cache_type("mish_backward", cache, MishCache)
    x, t = cache
    check_like("mish_backward", "dy", dy, x)
    s = _sigmoid(x)  # softplus'(x), (ACT.13)
    dmish = t + x * (1.0 - t * t) * s  # (ACT.15)
    return _array(dy * dmish)  # (ACT.1)


# ---------------------------------------------------------------------------
# Gated units: SwiGLU and GeGLU
# ---------------------------------------------------------------------------


def _check_gate_up(op: str, gate: np.ndarray, up: np.ndarray) -> None:
    check_float(op, "gate", gate)
    check_same_dtype_as(op, "up", up, gate.dtype, "gate")
    check_same_shape(op, "gate", gate, up=up)  # no broadcasting


class SwigluCache(NamedTuple):
    silu: SiluCache  # gate and sigmoid(gate)
    act: np.ndarray  # (...)  silu(gate)
    up: np.ndarray  # (...)  the linear branch


def swiglu_forward(gate: np.ndarray, up: np.ndarray) -> Tuple[np.ndarray, SwigluCache]:
    """y = silu(gate) * up (ACT.16).  gate, up: (...) of one shape -> y: (...)"""
    _check_gate_up("swiglu_forward", gate, up)
    act, silu_cache = silu_forward(gate)  # (ACT.11)
    y = _array(act * up)  # (ACT.16)
    return y, SwigluCache(silu=silu_cache, act=act, up=up)


def swiglu_backward(dy: np.ndarray, cache: SwigluCache) -> Tuple[np.ndarray, np.ndarray]:
    """dgate = silu'(gate) * up * dy (ACT.17), dup = silu(gate) * dy (ACT.18).  dy: (...)"""
    check_cache_type("swiglu_backward", cache, SwigluCache)
    silu_cache, act, up = cache
    check_like("swiglu_backward", "dy", dy, up, "up")
    dup = _array(dy * act)  # (ACT.18)
    dact = _array(dy * up)  # (ACT.17)  through the product
    dgate = silu_backward(dact, silu_cache)  # (ACT.17)  through silu, (ACT.12)
    return dgate, dup


class GegluCache(NamedTuple):
    gelu: GeluCache  # gate, its cdf and the form of GELU
    act: np.ndarray  # (...)  gelu(gate)
    up: np.ndarray  # (...)  the linear branch


def geglu_forward(gate: np.ndarray, up: np.ndarray, approximate: str = "none") -> Tuple[np.ndarray, GegluCache]:
    """y = gelu(gate) * up (ACT.19).  gate, up: (...) of one shape -> y: (...)"""
    _check_gate_up("geglu_forward", gate, up)
    _check_approximate("geglu_forward", approximate)
    act, gelu_cache = gelu_forward(gate, approximate)  # (ACT.6) or (ACT.8)
    y = _array(act * up)  # (ACT.19)
    return y, GegluCache(gelu=gelu_cache, act=act, up=up)


def geglu_backward(dy: np.ndarray, cache: GegluCache) -> Tuple[np.ndarray, np.ndarray]:
    """dgate = gelu'(gate) * up * dy (ACT.20), dup = gelu(gate) * dy (ACT.21).  dy: (...)"""
    check_cache_type("geglu_backward", cache, GegluCache)
    gelu_cache, act, up = cache
    check_like("geglu_backward", "dy", dy, up, "up")
    dup = _array(dy * act)  # (ACT.21)
    dact = _array(dy * up)  # (ACT.20)  through the product
    dgate = gelu_backward(dact, gelu_cache)  # (ACT.20)  through gelu, (ACT.7) or (ACT.9)
    return dgate, dup


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck activations``.

    ReLU's input keeps away from its kink at 0, where the derivative does not exist.
    """
    from ..gradcheck import Case

    shape = (2, 3, 5)

    def x():
        return 2.0 * rng.standard_normal(shape)

    away_from_kink = x()
    away_from_kink += np.where(away_from_kink >= 0, 0.1, -0.1)
    yield Case("relu", relu_forward, relu_backward, {"x": away_from_kink}, wrt=("x",))
    for approximate in GELU_APPROXIMATIONS:
        yield Case(f"gelu[{approximate}]", gelu_forward, gelu_backward, {"x": x()}, wrt=("x",),
                   options={"approximate": approximate})
    yield Case("silu", silu_forward, silu_backward, {"x": x()}, wrt=("x",))
    yield Case("mish", mish_forward, mish_backward, {"x": x()}, wrt=("x",))
    yield Case("swiglu", swiglu_forward, swiglu_backward, {"gate": x(), "up": x()}, wrt=("gate", "up"))
    for approximate in APPROXIMATIONS:
        yield Case(f"geglu[{approximate}]", geglu_forward, geglu_backward, {"gate": x(), "up": x()},
                   wrt=("gate", "up"), options={"approximate": approximate})
