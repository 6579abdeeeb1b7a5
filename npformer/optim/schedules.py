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

Each schedule is a small frozen dataclass, so a debugger or ``print`` shows its settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..ops._checks import check_range


def _check(op: str, lr: float, end_name: str, end_lr: float, warmup: int, total_steps: int) -> None:
    check_range(op, "lr", lr, 0.0, math.inf)
    check_range(op, end_name, end_lr, 0.0, math.inf)
    check_range(op, "warmup", warmup, 0, math.inf)
    check_range(op, "total_steps", total_steps, 0, math.inf)
    for name, value in (("warmup", warmup), ("total_steps", total_steps)):
        if int(value) != value:
            raise ValueError(f"{op}: argument '{name}' expected an integer, got {value}")


def _progress(step: int, warmup: int, total_steps: int) -> float:
    """Fraction of the decay phase done before update ``step``: 0 at ``warmup``, 1 at ``total_steps``."""
    span = total_steps - warmup
    return 1.0 if span <= 0 else min(max((step - warmup) / span, 0.0), 1.0)


@dataclass(frozen=True)
class Constant:
    lr: float

    def __call__(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to ``lr``, then half a cosine from ``lr`` down to ``min_lr`` at ``total_steps``."""

    lr: float
    min_lr: float
    warmup: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = _progress(step, self.warmup, self.total_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class LinearDecay:
    """Linear warmup to ``lr``, then a straight line from ``lr`` to ``end_lr`` at ``total_steps``."""

    lr: float
    warmup: int
    total_steps: int
    end_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = _progress(step, self.warmup, self.total_steps)
        return self.lr + (self.end_lr - self.lr) * p


def constant(lr: float) -> Constant:
    """``lr`` at every step."""
    check_range("constant", "lr", lr, 0.0, math.inf)
    return Constant(lr)


def warmup_cosine(lr: float, min_lr: float, warmup: int, total_steps: int) -> WarmupCosine:
    """``lr (s+1)/warmup`` for ``s < warmup``; then ``min_lr + (lr - min_lr)(1 + cos(pi p))/2``
    with ``p = (s - warmup)/(total_steps - warmup)`` clipped to [0, 1]."""
    _check("warmup_cosine", lr, "min_lr", min_lr, warmup, total_steps)
    return WarmupCosine(lr, min_lr, int(warmup), int(total_steps))


def linear_decay(lr: float, warmup: int, total_steps: int, end_lr: float = 0.0) -> LinearDecay:
    """``lr (s+1)/warmup`` for ``s < warmup``; then ``lr + (end_lr - lr) p`` with ``p`` as in ``warmup_cosine``."""
    _check("linear_decay", lr, "end_lr", end_lr, warmup, total_steps)
    return LinearDecay(lr, int(warmup), int(total_steps), end_lr)
