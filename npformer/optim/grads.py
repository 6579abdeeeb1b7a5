"""Operations on the gradients of a set of parameters: norm, clipping, scaling, accumulation.

Gradient accumulation needs no special machinery here, because layers *add* into
``Parameter.grad``: run forward and backward on K micro-batches without zeroing in
between, then divide the summed gradient by K. When each micro-batch loss is a
mean over an equal number of examples (or tokens), the result is the gradient of the
mean loss over the whole batch. ``accumulate_gradients`` is that loop::

    def forward_backward(x, y):
        _, loss = model.forward(x, y)
        model.backward()
        return loss

    loss = accumulate_gradients(model.parameters(), micro_batches, forward_backward)
    clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Union

import numpy as np

from ..nn.module import Parameter

Params = Union[Parameter, Iterable[Parameter]]


def _as_list(params: Params) -> list:
    return [params] if isinstance(params, Parameter) else list(params)


def grad_norm(params: Params) -> float:
    """Global L2 norm of all gradients, sqrt(sum_p sum_i g_pi^2), summed in float64 across parameters."""
    # np.vdot(g, g) is a BLAS dot over the flattened gradient: no squared temporary.
    return math.sqrt(sum(float(np.vdot(p.grad, p.grad)) for p in _as_list(params)))


def clip_grad_norm_(params: Params, max_norm: float, error_if_nonfinite: bool = False) -> float:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the coefficient is
    ``max_norm / (total_norm + 1e-6)``, applied only when it is below 1, and the
    return value is the norm *before* clipping.
    """
    params = _as_list(params)
    total = grad_norm(params)
    if error_if_nonfinite and not math.isfinite(total):
        raise ValueError(f"clip_grad_norm_: the total gradient norm is {total}")
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        scale_grads_(params, coef)
    return total


def scale_grads_(params: Params, factor: float) -> None:
    """``p.grad *= factor`` for every parameter (in place, in the gradient's dtype)."""
    for p in _as_list(params):
        p.grad *= factor


def accumulate_gradients(params: Params, micro_batches: Sequence, forward_backward: Callable[..., float]) -> float:
    """Mean-loss gradient over several micro-batches, accumulated in ``.grad``; returns the mean loss.

    Zeroes the gradients of ``params``, calls ``forward_backward(*batch)`` (which must
    add its micro-batch gradient into ``.grad`` and return that micro-batch's loss) on
    each batch, then divides the gradients by the number of micro-batches.
    """
    params = _as_list(params)
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulate_gradients: argument 'micro_batches' expected at least one batch, got 0")
    for p in params:
        p.grad.fill(0)
    total = 0.0
    for batch in micro_batches:
        total += float(forward_backward(*batch))
    scale_grads_(params, 1.0 / len(micro_batches))
    return total / len(micro_batches)
