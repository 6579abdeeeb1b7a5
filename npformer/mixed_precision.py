"""Mixed precision: bf16 and fp16 working copies over float32 master weights, with loss scaling.

Derivation: ``proofs/mixed_precision.md``. NumPy has no bfloat16, so bf16 is emulated:
``bf16_bits`` rounds float32 to the nearest bf16 bit pattern (uint16), ties to even
(MP.1); ``round_bf16`` returns those values as float32 with the low 16 bits zero (MP.2).
fp16 is NumPy's own ``float16`` (IEEE binary16, round to nearest even).

``MixedPrecisionTrainer`` keeps the float32 master weights (MP.3). Each step it writes
a working copy rounded to the low precision into the model, runs the caller's forward
and backward (the model's arithmetic stays float32, as a matrix unit accumulates in
float32), stores each gradient in the low precision after multiplying it by the loss
scale S (MP.4), and unscales it into the master's gradient in float32 (MP.5). A
gradient that is inf or NaN skips the step and halves S; N good steps in a row double
it (MP.6). ``step`` does all of that; a training loop that clips the gradients calls its
phases itself (``cast_working_copy``, forward and backward, ``unscale_gradients``, clipping
of the masters' gradients, ``update``), and saves ``state_dict()`` (S and its counters) with
its checkpoint, as ``npformer train --precision`` does.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import numpy as np

from .nn.module import Module, Parameter
from .ops._checks import check_count, check_real

PRECISIONS = ("bfloat16", "float16", "float32")
BF16_QUIET_NAN = np.uint16(0x7FC0)  # sign 0, exponent all ones, top mantissa bit: the canonical quiet NaN


def _check_f32(op: str, x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        got = f"numpy.ndarray of {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{op}: argument 'x' expected a float32 numpy.ndarray, got {got}")
    return np.ascontiguousarray(x)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 (...) -> uint16 (...): the nearest bf16 bit pattern, ties to even (MP.1); NaN -> 0x7FC0."""
    u = _check_f32("bf16_bits", x).view(np.uint32)
    lsb = (u >> 16) & 1  # the last bit kept: a tie rounds to make it 0
    rounded = ((u + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)  # (MP.1); no NaN reaches a carry out of bit 31
    return np.where(np.isnan(x), BF16_QUIET_NAN, rounded)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 (...) -> float32 (...): exact, the bf16 pattern as the top 16 bits (MP.2)."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
        got = f"numpy.ndarray of {bits.dtype}" if isinstance(bits, np.ndarray) else type(bits).__name__
        raise TypeError(f"bf16_to_float32: argument 'bits' expected a uint16 numpy.ndarray, got {got}")
    return (bits.astype(np.uint32) << 16).view(np.float32)  # (MP.2)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 (...) -> float32 (...) holding bf16 values: bf16_to_float32(bf16_bits(x)) (MP.2)."""
    return bf16_to_float32(bf16_bits(_check_f32("round_bf16", x)))


def round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """float32 (...) rounded to ``precision``, returned as float32 (fp16 overflow gives inf, as the cast does)."""
    x = _check_f32("round_to", x)
    precision = _check_precision("round_to", precision)
    if precision == "bfloat16":
        return round_bf16(x)
    if precision == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    return x.copy()


def _check_precision(op: str, precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: argument 'precision' expected one of {PRECISIONS}, got {precision!r}")
    return precision


class MixedPrecisionTrainer:
    """Float32 master weights, a low-precision working copy in the model, dynamic loss scaling.

    ``make_optimizer`` receives the master Parameters (float32) and returns the optimizer
    that updates them, e.g. ``lambda ps: AdamW(ps, lr=1e-3)``. ``step(forward_backward)``
    runs one update: ``forward_backward()`` must run the model's forward and backward
    (adding into the model's ``.grad``) and return the loss as a float.

    Loss scale S: starts at ``init_scale``; an overflowing step (an inf or NaN gradient
    after scaling and rounding) is skipped and S *= ``backoff``; after ``growth_interval``
    good steps in a row S *= ``growth`` (MP.6). ``dynamic=False`` keeps S fixed and counts
    no good steps (``good_steps`` stays 0); a non-finite gradient still skips the step. bf16 has
    float32's range and needs no scaling (``npformer train`` runs it at a fixed S = 1); fp16 does.
    """

    def __init__(self, model: Module, make_optimizer: Callable[[List[Parameter]], object], *,
                 precision: str = "bfloat16", init_scale: Optional[float] = None, growth: float = 2.0,
                 backoff: float = 0.5, growth_interval: int = 2000, dynamic: bool = True):
        op = "MixedPrecisionTrainer"
        if not isinstance(model, Module):
            raise TypeError(f"{op}: argument 'model' expected a Module, got {type(model).__name__}")
        if not callable(make_optimizer):
            raise TypeError(f"{op}: argument 'make_optimizer' expected a callable, got {type(make_optimizer).__name__}")
        self.precision = _check_precision(op, precision)
        if any(p.data.dtype != np.float32 for p in model.parameters()):
            raise ValueError(f"{op}: argument 'model' expected float32 parameters (the working copy's container)")
        if init_scale is None:
            init_scale = 2.0**16 if precision == "float16" else 1.0
        self.scale = check_real(op, "init_scale", init_scale, lo=0.0, lo_open=True)
        self.growth = check_real(op, "growth", growth, lo=1.0)
        self.backoff = check_real(op, "backoff", backoff, lo=0.0, hi=1.0, lo_open=True)
        self.growth_interval = check_count(op, "growth_interval", growth_interval, 1)
        if not isinstance(dynamic, bool):
            raise TypeError(f"{op}: argument 'dynamic' expected a bool, got {dynamic!r}")
        self.dynamic = dynamic
        self.model = model
        self.params = model.parameters()
        self.master = [Parameter(p.data.copy()) for p in self.params]  # (MP.3): float32, never rounded
        self.optimizer = make_optimizer(self.master)
        self.good_steps = 0  # in a row, since the last change of scale
        self.skipped = 0  # in all

    def cast_working_copy(self) -> None:
        """Write the master weights, rounded to the low precision, into the model (MP.3)."""
        for p, m in zip(self.params, self.master):
            p.data[...] = round_to(m.data, self.precision)

    def write_master(self) -> None:
        """Write the master weights themselves, unrounded, into the model (to evaluate or save them)."""
        for p, m in zip(self.params, self.master):
            p.data[...] = m.data

    def read_master(self) -> None:
        """Take the model's weights as the master weights (after loading a checkpoint into the model)."""
        for p, m in zip(self.params, self.master):
            m.data[...] = p.data

    def unscale_gradients(self) -> bool:
        """The model's gradients, scaled by S and stored in the low precision (MP.4), unscaled into the
        masters' ``.grad`` in float32 (MP.5). Returns whether every stored gradient is finite."""
        S = np.float32(self.scale)
        finite = True
        for p, m in zip(self.params, self.master):
            with np.errstate(over="ignore", invalid="ignore"):
                stored = round_to(p.grad * S, self.precision)  # (MP.4): the scaled gradient as stored
            finite = finite and bool(np.isfinite(stored).all())
            m.grad = stored / S  # (MP.5): unscaled in float32
        return finite

    def update(self, finite: bool) -> bool:
        """The optimizer's step on the masters if the gradients are ``finite``, else a skipped step; then
        the loss scale's rule (MP.6). Returns whether the step was taken."""
        if not isinstance(finite, (bool, np.bool_)):
            raise TypeError(f"MixedPrecisionTrainer.update: argument 'finite' expected a bool, got {finite!r:.40}")
        if not finite:  # (MP.6): skip, and back off
            self.skipped += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale *= self.backoff
            return False
        self.optimizer.step()
        if not self.dynamic:  # a fixed scale: no count toward a growth that never comes
            return True
        self.good_steps += 1
        if self.good_steps == self.growth_interval:  # (MP.6): grow after N good steps
            self.scale *= self.growth
            self.good_steps = 0
        return True

    def step(self, forward_backward: Callable[[], float]) -> tuple:
        """One update; returns (loss, stepped). A skipped step leaves the master weights unchanged.

        The same as ``cast_working_copy``, ``model.zero_grad``, ``forward_backward()``,
        ``update(unscale_gradients())``; a caller that clips the gradients calls those itself and
        clips the masters' gradients between the last two."""
        if not callable(forward_backward):
            raise TypeError(f"MixedPrecisionTrainer.step: argument 'forward_backward' expected a callable, "
                            f"got {type(forward_backward).__name__}")
        self.cast_working_copy()
        self.model.zero_grad()
        loss = float(forward_backward())
        return loss, self.update(self.unscale_gradients())

    # -- saving and resuming --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The loss scale and its counters (the masters and the optimizer's state are saved apart):
        ``{"scale": S, "good_steps": good steps in a row since S last changed (0 when S is fixed), "skipped": steps
        skipped}``."""
        return {"scale": float(self.scale), "good_steps": int(self.good_steps), "skipped": int(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s entries, each checked (nothing changes if one is refused)."""
        op = "MixedPrecisionTrainer.load_state_dict"
        check_state(op, state, self.growth_interval)
        self.scale, self.good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), int(state["skipped"])


STATE_KEYS = ("scale", "good_steps", "skipped")


def check_state(op: str, state: object, growth_interval: int = 2000, steps: Optional[int] = None) -> None:
    """A trainer's ``state_dict()``: a positive finite scale, 0 <= good_steps < growth_interval, and
    0 <= skipped (<= ``steps``, the steps run, when given); a ``ValueError`` naming ``op`` and the entry."""
    if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{op}: argument 'state' expected the entries {list(STATE_KEYS)}, got {got}")

    def whole(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    scale = state["scale"]
    if not (isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_))
            and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: argument 'state' entry 'scale' expected a finite number > 0, got {scale!r:.40}")
    good = state["good_steps"]
    if not (whole(good) and 0 <= good < growth_interval):
        raise ValueError(f"{op}: argument 'state' entry 'good_steps' expected an integer in [0, {growth_interval}), "
                         f"got {good!r:.40}")
    skipped, most = state["skipped"], steps
    if not (whole(skipped) and skipped >= 0 and (most is None or skipped <= most)):
        bound = "" if most is None else f" and at most the {most} steps run"
        raise ValueError(f"{op}: argument 'state' entry 'skipped' expected an integer >= 0{bound}, got {skipped!r:.40}")
