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
from collections.abc import Iterable
from typing import Callable, Sequence, Union

import numpy as np

from ..nn.module import Parameter
from ..ops._checks import check_bool, check_real

Params = Union[Parameter, Iterable[Parameter]]


def _as_list(op: str, params: Params) -> list:
    """One Parameter or an iterable of them, as a list (each checked, with its gradient)."""
    if isinstance(params, Parameter):
        params = [params]
    elif isinstance(params, (dict, str, bytes, np.ndarray)) or not isinstance(params, Iterable):
        raise TypeError(f"{op}: argument 'params' expected a Parameter or an iterable of Parameters, "
                        f"got {type(params).__name__}")
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"{op}: argument 'params' expected Parameter entries, got {type(p).__name__} "
                            f"at position {i}")
        g = p.grad
        if not isinstance(g, np.ndarray) or g.shape != p.data.shape or g.dtype.kind != "f":
            got = f"{g.dtype} of shape {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__
            raise ValueError(f"{op}: argument 'params': parameter {i} has a gradient of {got}; expected a float "
                             f"array of shape {p.data.shape}")
    return params


def grad_norm(params: Params) -> float:
    """Global L2 norm of all gradients, sqrt(sum_p sum_i g_pi^2), summed in float64 across parameters.

    NaN if a gradient holds NaN, inf if one holds inf; finite gradients give a finite norm
    (their squares are rescaled when they would overflow).
    """
    return _total_norm(_as_list("grad_norm", params))


def _total_norm(params: list) -> float:
    # np.vdot(g, g) is a BLAS dot over the flattened gradient: no squared temporary.
    total = math.sqrt(sum(float(np.vdot(p.grad, p.grad)) for p in params))
    if math.isfinite(total) or _first_nonfinite(params) is not None:
        return total
    # Every gradient is finite, but a sum of squares overflowed (|g| > 1e19 in float32, 1e154 in float64):
    # measure again with every gradient divided by the largest magnitude, in float64.
    scale = max(float(np.max(np.abs(p.grad), initial=0.0)) for p in params)
    squares = 0.0
    for p in params:
        g = p.grad.astype(np.float64) / scale
        squares += float(np.vdot(g, g))
    return scale * math.sqrt(squares)


def _first_nonfinite(params: list):
    """``(index, "NaN" or "inf")`` of the first parameter whose gradient is not finite, else None."""
    for i, p in enumerate(params):
        if not np.isfinite(p.grad).all():
            return i, "NaN" if np.isnan(p.grad).any() else "inf"
    return None


def clip_grad_norm_(params: Params, max_norm: float, error_if_nonfinite: bool = True) -> float:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the coefficient is
    ``max_norm / (total_norm + 1e-6)``, applied only when it is below 1, and the
    return value is the norm *before* clipping. ``max_norm`` must be > 0 (``math.inf``
    measures the norm and clips nothing); NaN, zero and negative values are refused.

    A gradient holding NaN or inf has no norm to clip to. By default
    (``error_if_nonfinite=True``, where torch's default is False) that raises
    ``ValueError`` naming the first such parameter, and no gradient changes: training on
    would only spread the NaN into every weight. With ``error_if_nonfinite=False`` the
    gradients are scaled as torch scales them: by NaN when the norm is NaN, by 0 when it is
    inf (an inf entry becomes NaN), and by NaN when both the norm and ``max_norm`` are inf.
    Finite gradients whose squares overflow are measured exactly (see ``grad_norm``), where
    torch would report an inf norm and zero them.
    """
    op = "clip_grad_norm_"
    params = _as_list(op, params)
    if not (isinstance(max_norm, (float, np.floating)) and max_norm == math.inf):
        check_real(op, "max_norm", max_norm, lo=0.0, lo_open=True)
    error_if_nonfinite = check_bool(op, "error_if_nonfinite", error_if_nonfinite)
    total = _total_norm(params)
    if not math.isfinite(total) and error_if_nonfinite:
        bad = _first_nonfinite(params)
        what = (f"the gradient is not finite: parameter {bad[0]}'s gradient holds {bad[1]}" if bad is not None
                else "the gradient norm is not finite: the gradients are finite, but their norm exceeds the "
                     "largest float64")
        raise ValueError(f"{op}: argument 'params': {what} (total norm {total}); expected finite gradients "
                         "(error_if_nonfinite=False scales them as torch does)")
    coef = float(max_norm) / (total + 1e-6)  # NaN for a NaN norm (or inf / inf), 0 for an inf norm
    if math.isnan(coef) or coef < 1.0:
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN, as in torch
            _scale(params, coef)
    return total


def scale_grads_(params: Params, factor: float) -> None:
    """``p.grad *= factor`` for every parameter (in place, in the gradient's dtype); ``factor`` finite."""
    params = _as_list("scale_grads_", params)
    _scale(params, check_real("scale_grads_", "factor", factor))


def _scale(params: list, factor: float) -> None:
    for p in params:
        p.grad *= factor


def accumulate_gradients(params: Params, micro_batches: Sequence, forward_backward: Callable[..., float]) -> float:
    """Mean-loss gradient over several micro-batches, accumulated in ``.grad``; returns the mean loss.

    Zeroes the gradients of ``params``, calls ``forward_backward(*batch)`` (which must
    add its micro-batch gradient into ``.grad`` and return that micro-batch's loss) on
    each batch, then divides the gradients by the number of micro-batches.
    """
    op = "accumulate_gradients"
    params = _as_list(op, params)
    if isinstance(micro_batches, (dict, str, bytes)) or not isinstance(micro_batches, Iterable):
        raise TypeError(f"{op}: argument 'micro_batches' expected a sequence of batches (tuples of arguments), "
                        f"got {type(micro_batches).__name__}")
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError(f"{op}: argument 'micro_batches' expected at least one batch, got 0")
    for i, batch in enumerate(micro_batches):
        if not isinstance(batch, (tuple, list)):
            raise TypeError(f"{op}: argument 'micro_batches' expected each batch as a tuple of arguments, "
                            f"got {type(batch).__name__} at position {i}")
    if not callable(forward_backward):
        raise TypeError(f"{op}: argument 'forward_backward' expected a callable, got {type(forward_backward).__name__}")
    for p in params:
        p.grad.fill(0)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        loss = forward_backward(*batch)
        if not _is_real(loss):
            raise TypeError(f"{op}: argument 'forward_backward' returned {type(loss).__name__} for batch {i}; "
                            "expected the batch's loss as a real number")
        total += float(loss)
    _scale(params, 1.0 / len(micro_batches))
    return total / len(micro_batches)


def _is_real(x: object) -> bool:
    """A Python or NumPy int or float, or a 0-d int/float array (not a bool)."""
    if isinstance(x, np.ndarray):
        return x.shape == () and x.dtype.kind in "iuf"
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
