"""Weight-only quantisation for inference: int8 per output channel and 4-bit groups.

A ``Linear`` holds W (O, I) in float32 (4 bytes a weight). ``quantize_model`` replaces
every ``Linear`` of a model by a ``QuantLinear`` that stores the weight in fewer bits
and turns it back into floats on every forward (a dequantising matmul). Activations,
biases, norms and embeddings stay in the model's float dtype. The derivations and the
error bounds are in proofs/quantization.md; letters: O output features, I input
features, g the group size, G = I / g groups per row.

- int8 (``bits=8``), symmetric per output row: s_o = max_i |W_oi| / 127 (QUANT.1),
  q = round(W / s) in [-127, 127] stored as int8 (QUANT.2), W^ = q s. Error per weight
  at most s_o / 2 (QUANT.3).
- int4 (``bits=4``), asymmetric per row and group of g input columns: the range
  [lo, hi] of the group with 0 inside it, s = (hi - lo) / 15, an integer zero point
  z = round(-lo / s) in [0, 15] (QUANT.4), q = clip(round(W / s) + z, 0, 15) (QUANT.5),
  W^ = (q - z) s. Error per weight at most s / 2 as well (QUANT.6). Two 4-bit codes
  share one uint8 (QUANT.7): the low nibble holds the even column, the high nibble
  the odd one, as GPTQ/AWQ checkpoints store ``qweight``, ``scales`` and ``zeros``
  (here ``zeros`` is one uint8 per group, not packed).

The asymmetric form is chosen for 4 bits because 16 levels are few: a symmetric grid
would spend half of them on a sign the group may barely use. Zero is always a level,
so a zero weight stays exactly zero.

A quantised layer is for inference only: its forward refuses training mode and its
backward always refuses, by name. Its tensors are plain arrays, not ``Parameter``s, so
no optimiser sees them.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np

from .nn.layers import Linear, check_features
from .nn.module import Module
from .ops._checks import MAX_POSITION, check_count, check_float, check_ndim
from .ops.linear import linear_forward

INT8_LEVELS = 127  # symmetric int8 codes -127 .. 127 (-128 unused, so the grid is symmetric)
INT4_LEVELS = 15  # unsigned 4-bit codes 0 .. 15


class Int8Weight(NamedTuple):
    """W (O, I) as int8 codes and one scale per output row: W^ = q * s[:, None]."""

    q: np.ndarray  # (O, I) int8
    scales: np.ndarray  # (O,) float, the weight's dtype


class Int4Weight(NamedTuple):
    """W (O, I) as packed 4-bit codes with a scale and a zero point per (row, group of g columns)."""

    qweight: np.ndarray  # (O, ceil(I / 2)) uint8, two codes a byte (QUANT.7)
    scales: np.ndarray  # (O, G) float, the weight's dtype
    zeros: np.ndarray  # (O, G) uint8 in [0, 15]
    in_features: int  # I
    group_size: int  # g


def _check_weight(op: str, W: object) -> np.ndarray:
    check_float(op, "W", W)
    check_ndim(op, "W", W, 2)
    if W.shape[0] < 1 or W.shape[1] < 1:
        raise ValueError(f"{op}: argument 'W' expected shape (O, I) with O, I >= 1, got {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError(f"{op}: argument 'W' expected finite values, got some inf or nan")
    return W


# -- int8, per output channel -------------------------------------------------------------
def quantize_int8(W: np.ndarray) -> Int8Weight:
    """W (O, I) float32/float64 -> int8 codes (O, I) and scales (O,) in W's dtype."""
    W = _check_weight("quantize_int8", W)
    absmax = np.abs(W).max(axis=1).astype(np.float64)
    s = np.where(absmax > 0, absmax / INT8_LEVELS, 1.0).astype(W.dtype)  # (QUANT.1); a zero row: any s, q = 0
    s64 = s.astype(np.float64)  # the stored scale: the codes are rounded against it, not the unrounded one
    q = np.clip(np.rint(W.astype(np.float64) / s64[:, None]), -INT8_LEVELS, INT8_LEVELS)  # (QUANT.2)
    return Int8Weight(q=q.astype(np.int8), scales=s)


def dequantize_int8(w: Int8Weight) -> np.ndarray:
    """W^ (O, I) = q * s, in the scales' dtype; within s_o / 2 of W per weight (QUANT.3)."""
    return w.q.astype(w.scales.dtype) * w.scales[:, None]  # (QUANT.2), within (QUANT.3)


# -- 4-bit packing ---------------------------------------------------------------------------
def pack_int4(q: np.ndarray) -> np.ndarray:
    """q (O, I) integer codes in [0, 15] -> (O, ceil(I / 2)) uint8: byte j = q[:, 2j] | q[:, 2j+1] << 4 (QUANT.7).

    An odd I is padded with one zero code."""
    op = "pack_int4"
    if not isinstance(q, np.ndarray) or type(q) is not np.ndarray or not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"{op}: argument 'q' expected an integer numpy.ndarray, "
                        f"got {getattr(q, 'dtype', type(q).__name__)}")
    check_ndim(op, "q", q, 2)
    if q.size and (q.min() < 0 or q.max() > INT4_LEVELS):
        raise ValueError(f"{op}: argument 'q' expected codes in [0, 15], got [{q.min()}, {q.max()}]")
    O, I = q.shape
    codes = np.zeros((O, I + I % 2), np.uint8)
    codes[:, :I] = q
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)  # (QUANT.7)


def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """packed (O, ceil(I / 2)) uint8 -> codes (O, I) uint8, the inverse of ``pack_int4`` (QUANT.7)."""
    op = "unpack_int4"
    if not isinstance(packed, np.ndarray) or type(packed) is not np.ndarray or packed.dtype != np.uint8:
        raise TypeError(f"{op}: argument 'packed' expected a uint8 numpy.ndarray, "
                        f"got {getattr(packed, 'dtype', type(packed).__name__)}")
    check_ndim(op, "packed", packed, 2)
    I = check_count(op, "in_features", in_features, 1, MAX_POSITION)
    if packed.shape[1] != (I + 1) // 2:
        raise ValueError(f"{op}: argument 'packed' expected {(I + 1) // 2} columns for in_features = {I}, "
                         f"got {packed.shape[1]}")
    codes = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
    codes[:, 0::2] = packed & 0x0F  # low nibble: even columns
    codes[:, 1::2] = packed >> 4  # high nibble: odd columns
    return codes[:, :I]


# -- 4-bit, group-wise with a zero point ------------------------------------------------------
def _check_group_size(op: str, group_size: object, I: int) -> int:
    g = check_count(op, "group_size", group_size, 1, MAX_POSITION)
    if I % g:
        raise ValueError(f"{op}: argument 'group_size' expected a divisor of the input features I = {I}, got {g}")
    return g


def quantize_int4(W: np.ndarray, group_size: int = 64) -> Int4Weight:
    """W (O, I) float32/float64 -> packed codes, scales (O, G) and zero points (O, G); g divides I."""
    op = "quantize_int4"
    W = _check_weight(op, W)
    O, I = W.shape
    g = _check_group_size(op, group_size, I)
    Wg = W.astype(np.float64).reshape(O, I // g, g)  # (O, G, g)
    lo = np.minimum(Wg.min(axis=2), 0.0)  # the range holds 0, so 0 is a level and z lies in [0, 15]
    hi = np.maximum(Wg.max(axis=2), 0.0)
    s = np.where(hi > lo, (hi - lo) / INT4_LEVELS, 1.0).astype(W.dtype)  # (QUANT.4); an all-zero group: any s
    s64 = s.astype(np.float64)  # codes are rounded against the stored scale
    z = np.clip(np.rint(-lo / s64), 0, INT4_LEVELS)  # (QUANT.4)
    q = np.clip(np.rint(Wg / s64[..., None]) + z[..., None], 0, INT4_LEVELS)  # (QUANT.5)
    return Int4Weight(qweight=pack_int4(q.reshape(O, I).astype(np.uint8)), scales=s, zeros=z.astype(np.uint8),
                      in_features=I, group_size=g)


def dequantize_int4(w: Int4Weight) -> np.ndarray:
    """W^ (O, I) = (q - z) * s per group, in the scales' dtype; within s / 2 of W per weight (QUANT.6)."""
    q = unpack_int4(w.qweight, w.in_features)  # (O, I)
    O, G = w.scales.shape
    q = q.reshape(O, G, w.group_size).astype(w.scales.dtype)
    Wh = (q - w.zeros[..., None].astype(w.scales.dtype)) * w.scales[..., None]  # (QUANT.6)
    return Wh.reshape(O, w.in_features)


def weight_bytes(w) -> int:
    """Bytes a quantised weight occupies: its codes, scales and zero points."""
    if isinstance(w, Int8Weight):
        return w.q.nbytes + w.scales.nbytes
    return w.qweight.nbytes + w.scales.nbytes + w.zeros.nbytes


# -- the layer ----------------------------------------------------------------------------------
class QuantWeight:
    """What a layer around a ``QuantLinear`` may ask of its ``weight``: ``shape`` (O, I), ``dtype`` and ``data``.

    ``data`` is the dequantised weight W^, made afresh (O I work) and read-only on every access;
    attention and MLP layers read only its dtype. It is not a ``Parameter``: no optimiser sees it.
    """

    def __init__(self, layer: "QuantLinear"):
        self._layer = layer

    @property
    def shape(self):
        return (self._layer.out_features, self._layer.in_features)

    @property
    def dtype(self) -> np.dtype:
        return self._layer.dtype

    @property
    def data(self) -> np.ndarray:
        Wh = self._layer.dequantize()
        Wh.flags.writeable = False  # writing into a copy would change nothing: refuse it
        return Wh

    def __repr__(self) -> str:
        return f"QuantWeight(shape={self.shape}, bits={self._layer.bits})"


class QuantLinear(Module):
    """y = x W^T + b with W held quantised (int8 or 4-bit) and dequantised on each forward.

    Inference only: ``forward`` refuses training mode and ``backward`` always refuses.
    """

    def __init__(self, linear: Linear, bits: int = 8, group_size: int = 64):
        super().__init__()
        op = "QuantLinear"
        if not isinstance(linear, Linear):
            raise TypeError(f"{op}: argument 'linear' expected a Linear, got {type(linear).__name__}")
        if isinstance(bits, bool) or bits not in (4, 8):
            raise ValueError(f"{op}: argument 'bits' expected 8 or 4, got {bits!r}")
        W = linear.weight.data
        self.bits = bits
        self.out_features, self.in_features = W.shape
        self.dtype = W.dtype
        self.qweight = quantize_int8(W) if bits == 8 else quantize_int4(W, group_size)
        self.bias: Optional[np.ndarray] = None if linear.bias is None else linear.bias.data.copy()
        self.weight = QuantWeight(self)

    def dequantize(self) -> np.ndarray:
        """W^ (O, I) in the layer's dtype: the weight the forward multiplies by."""
        return dequantize_int8(self.qweight) if self.bits == 8 else dequantize_int4(self.qweight)

    @property
    def nbytes(self) -> int:
        """Bytes held: the quantised weight and the float bias."""
        return weight_bytes(self.qweight) + (0 if self.bias is None else self.bias.nbytes)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., I) -> y (..., O) = x W^^T + b, within (QUANT.8) of the float layer's x W^T + b."""
        if self.training:
            raise RuntimeError("QuantLinear.forward: a quantised layer is for inference only; "
                               "call .eval() on the model first (it cannot be trained)")
        check_features("QuantLinear.forward", "x", x, self.in_features, self.dtype)
        y, _ = linear_forward(x, self.dequantize(), self.bias)  # the dequantising matmul (QUANT.8)
        self.record("out", y)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        raise RuntimeError("QuantLinear.backward: a quantised layer is for inference only and has no backward; "
                           "train the float model, then quantise it")

    def __repr__(self) -> str:
        g = "" if self.bits == 8 else f", group_size={self.qweight.group_size}"
        return f"QuantLinear({self.in_features} -> {self.out_features}, bits={self.bits}{g})"


def quantize_model(model: Module, bits: int = 8, group_size: int = 64) -> Dict[str, int]:
    """Replace every ``Linear`` in ``model`` (in place) by a ``QuantLinear``; put the model in eval mode.

    A Linear reached by several paths (shared) becomes one QuantLinear at every path.
    Returns ``{"layers": n, "bytes_before": ..., "bytes_after": ...}``: the bytes of the
    replaced layers' weights and biases before and after. Layers that are not ``Linear``
    (embeddings, norms, GPT's tied head, which reuses the embedding table) keep their floats.
    Every layer is checked (group size) before the first is replaced. Forward caches still
    waiting for a backward are dropped: a quantised model has no backward.

    The quantised tensors are not ``Parameter``s, so ``state_dict`` no longer lists the replaced
    layers' weights and biases, and ``astype`` leaves the quantised layers in their dtype.
    """
    op = "quantize_model"
    if not isinstance(model, Module):
        raise TypeError(f"{op}: argument 'model' expected a Module, got {type(model).__name__}")
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{op}: argument 'bits' expected 8 or 4, got {bits!r}")
    check_count(op, "group_size", group_size, 1, MAX_POSITION)
    sites = [(parent, name, child) for _, parent in model.named_modules()
             for name, child in list(parent._modules.items()) if isinstance(child, Linear)]
    if bits == 4:
        for _, name, child in sites:
            _check_group_size(op, group_size, child.weight.shape[1])
    model.clear_caches()
    model.eval()
    made: Dict[int, QuantLinear] = {}
    before = after = 0
    for parent, name, child in sites:
        if id(child) not in made:
            made[id(child)] = QuantLinear(child, bits, group_size)
            before += sum(p.data.nbytes for p in child.parameters())
            after += made[id(child)].nbytes
        setattr(parent, name, made[id(child)])
    model.eval()  # the new layers too
    return {"layers": len(made), "bytes_before": before, "bytes_after": after}
