"""Learning-rate schedules: callables ``step -> lr``.

Convention: ``step`` counts optimizer updates from 0, and ``schedule(step)`` is the
learning rate *used by* update number ``step``::

    for step in range(total_steps):
        for g in opt.param_groups:
            g["lr"] = schedule(step)
        ...
        opt.step()

This is the value ``torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / lr)``
puts in the optimizer after ``step`` calls of ``scheduler.step()``.

Warmup is linear and never starts at zero: ``lr * (step + 1) / warmup`` for
``step < warmup``, so update ``warmup - 1`` runs at the full ``lr`` (as torch's
``LinearLR(start_factor=1/warmup, total_iters=warmup-1)``). The decay phase then runs
from ``step = warmup`` (at ``lr``) to ``step = total_steps`` (at its end value), and
stays at the end value after that.

The landmarks are exact, not merely close: the rate is exactly ``lr`` at update
``warmup - 1`` and at update ``warmup`` (when a decay follows), exactly the end value
from update ``max(warmup, total_steps)`` on, and never outside ``[0, lr]`` (outside
``[end value, lr]`` once warmup is over), whatever the rounding of the formulas.
When ``total_steps <= warmup`` there is no decay phase: the rate drops to the end
value at update ``warmup``; in particular ``warmup = total_steps = 0`` gives the end
value (``min_lr`` or ``end_lr``) from update 0 (a run of no steps has decayed fully).

Each schedule is a small frozen dataclass, so a debugger or ``print`` shows its settings.

Settings are checked when a schedule is made (by its function or its class): rates
finite and >= 0, the end rate at most ``lr``, ``warmup`` and ``total_steps`` integers
>= 0. ``warmup`` may exceed ``total_steps``: the warmup then runs to its end and the
rate drops to its end value at step ``warmup`` (a short run keeps its warmup). A
schedule called with a negative or non-integer step raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ops._checks import check_count, check_real


def _check_rate(op: str, name: str, value: object) -> None:
    check_real(op, name, value, lo=0.0)


def _check_end(op: str, lr: float, end_name: str, end_lr: object) -> None:
    """The rate a decay ends at: finite, >= 0 and at most ``lr`` (a decay does not rise)."""
    _check_rate(op, end_name, end_lr)
    if end_lr > lr:
        raise ValueError(f"{op}: argument '{end_name}' expected at most lr = {lr}, got {end_lr}")


def _check_steps(op: str, warmup: object, total_steps: object) -> None:
    check_count(op, "warmup", warmup, lo=0)
    check_count(op, "total_steps", total_steps, lo=0)


def _check_step(op: str, step: object) -> int:
    return check_count(op, "step", step, lo=0)


def _progress(step: int, warmup: int, total_steps: int) -> float:
    """Fraction of the decay phase done before update ``step``: 0 at ``warmup``, 1 at ``total_steps``."""
    span = total_steps - warmup
    return 1.0 if span <= 0 else min(max((step - warmup) / span, 0.0), 1.0)


def _warmup(lr: float, step: int, warmup: int) -> float:
    """The rate of warmup update ``step < warmup``: ``lr (step + 1) / warmup``, exactly ``lr`` at the last one."""
    return lr if step + 1 == warmup else lr * (step + 1) / warmup


def _between(value: float, end: float, lr: float) -> float:
    """``value`` clamped into ``[end, lr]``: a decay formula's rounding never leaves the interval."""
    return min(max(value, end), lr)


@dataclass(frozen=True)
class Constant:
    lr: float

    def __post_init__(self):
        _check_rate("Constant", "lr", self.lr)

    def __call__(self, step: int) -> float:
        _check_step("Constant", step)
        return self.lr


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to ``lr``, then half a cosine from ``lr`` down to ``min_lr`` at ``total_steps``."""

    lr: float
    min_lr: float
    warmup: int
    total_steps: int

    def __post_init__(self):
        _check_rate("WarmupCosine", "lr", self.lr)
        _check_end("WarmupCosine", self.lr, "min_lr", self.min_lr)
        _check_steps("WarmupCosine", self.warmup, self.total_steps)

    def __call__(self, step: int) -> float:
        step = _check_step("WarmupCosine", step)
        if step < self.warmup:
            return _warmup(self.lr, step, self.warmup)
        p = _progress(step, self.warmup, self.total_steps)
        if p >= 1.0:
            return self.min_lr
        # lr - (lr - min_lr) (1 - cos(pi p)) / 2: exactly lr at p = 0, where cos(0) = 1.
        return _between(self.lr - (self.lr - self.min_lr) * (1.0 - math.cos(math.pi * p)) / 2, self.min_lr, self.lr)


@dataclass(frozen=True)
class LinearDecay:
    """Linear warmup to ``lr``, then a straight line from ``lr`` to ``end_lr`` at ``total_steps``."""

    lr: float
    warmup: int
    total_steps: int
    end_lr: float = 0.0

    def __post_init__(self):
        _check_rate("LinearDecay", "lr", self.lr)
        _check_end("LinearDecay", self.lr, "end_lr", self.end_lr)
        _check_steps("LinearDecay", self.warmup, self.total_steps)

    def __call__(self, step: int) -> float:
        step = _check_step("LinearDecay", step)
        if step < self.warmup:
            return _warmup(self.lr, step, self.warmup)
        p = _progress(step, self.warmup, self.total_steps)
        if p >= 1.0:
            return self.end_lr
        return _between((1.0 - p) * self.lr + p * self.end_lr, self.end_lr, self.lr)  # exactly lr at p = 0


def constant(lr: float) -> Constant:
    """``lr`` at every step."""
    _check_rate("constant", "lr", lr)
    return Constant(lr)


def warmup_cosine(lr: float, min_lr: float, warmup: int, total_steps: int) -> WarmupCosine:
    """``lr (s+1)/warmup`` for ``s < warmup``; then ``lr - (lr - min_lr)(1 - cos(pi p))/2``
    with ``p = (s - warmup)/(total_steps - warmup)`` clipped to [0, 1] (``min_lr`` at ``p = 1``)."""
    _check_rate("warmup_cosine", "lr", lr)
    _check_end("warmup_cosine", lr, "min_lr", min_lr)
    _check_steps("warmup_cosine", warmup, total_steps)
    return WarmupCosine(lr, min_lr, int(warmup), int(total_steps))


def linear_decay(lr: float, warmup: int, total_steps: int, end_lr: float = 0.0) -> LinearDecay:
    """``lr (s+1)/warmup`` for ``s < warmup``; then ``(1 - p) lr + p end_lr`` with ``p`` as in ``warmup_cosine``."""
    _check_rate("linear_decay", "lr", lr)
    _check_end("linear_decay", lr, "end_lr", end_lr)
    _check_steps("linear_decay", warmup, total_steps)
    return LinearDecay(lr, int(warmup), int(total_steps), end_lr)


@dataclass(frozen=True)
class InverseSqrt:
    """The schedule of "Attention Is All You Need": ``scale d_model**-0.5 min((s+1)**-0.5, (s+1) warmup**-1.5)``.

    It rises linearly for ``warmup`` updates, peaks at update ``warmup - 1`` at
    ``scale / sqrt(d_model warmup)``, then decays as the inverse square root of the update count.
    ``s + 1`` counts the updates done so far including this one (the convention above: update 0
    runs at the paper's step 1).
    """

    d_model: int
    warmup: int
    scale: float = 1.0

    def __post_init__(self):
        check_count("InverseSqrt", "d_model", self.d_model, lo=1)
        check_count("InverseSqrt", "warmup", self.warmup, lo=1)
        _check_rate("InverseSqrt", "scale", self.scale)

    @property
    def peak(self) -> float:
        """The largest rate, at update ``warmup - 1``."""
        return self.scale * (self.d_model * self.warmup) ** -0.5

    def __call__(self, step: int) -> float:
        n = _check_step("InverseSqrt", step) + 1  # the paper's step number
        rise, fall = n * self.warmup ** -1.5, n ** -0.5
        return self.scale * self.d_model ** -0.5 * min(fall, rise)


def inverse_sqrt(d_model: int, warmup: int, scale: float = 1.0) -> InverseSqrt:
    """``scale d_model**-0.5 min((s+1)**-0.5, (s+1) warmup**-1.5)``: the Transformer's (``noam``) schedule."""
    check_count("inverse_sqrt", "d_model", d_model, lo=1)
    check_count("inverse_sqrt", "warmup", warmup, lo=1)
    _check_rate("inverse_sqrt", "scale", scale)
    return InverseSqrt(int(d_model), int(warmup), scale)


noam = inverse_sqrt  # the name the schedule is known by
