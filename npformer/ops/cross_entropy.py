"""Cross-entropy loss over class logits: forward and hand-derived backward.

Derivation: ``proofs/cross_entropy.md``; each line cites the equation it
implements. Shapes: ``logits: (..., V)`` with the classes on the LAST axis
(``V >= 1``), ``targets: (...)`` integer class ids; every leading index is one
prediction ("row"), N rows in all. The loss goes through log-softmax
(``proofs/softmax.md``), so logits of any finite size stay finite in float32.

Conventions (each argued in the proof):

- ``ignore_index`` marks rows that take no part in the loss; it must lie outside
  ``[0, V)``, so that a class id can never be silently ignored. Ignored rows are never
  evaluated: whatever they hold (-inf, nan, logits beyond float range), the loss is that
  of the counted rows and their gradient is exactly 0.
- Infinite logits in a counted row follow PyTorch: -inf at a class that is not the
  target is probability 0, exactly; -inf at the target gives loss +inf (with label
  smoothing, -inf anywhere in the row does) and the finite gradient p - q; a row with
  no finite logit, +inf or nan gives nan.
- ``reduction="mean"`` divides by the number of non-ignored rows; when every row
  is ignored the loss and its gradient are 0 (PyTorch returns nan there).
- ``label_smoothing = eps`` mixes the one-hot target with the uniform
  distribution: ``(1 - eps) * nll + eps * mean_v(-log p_v)``, as PyTorch does.
- No rows at all (``N = 0``) is the all-ignored case: loss 0, an empty gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import numpy as np

from ._checks import (
    _fail,
    check_cache_type,
    check_float,
    check_int,
    check_ndim,
    check_range,
    check_real,
    check_same_dtype_as,
    check_shape,
)
from .softmax import log_softmax_forward

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum")


class CrossEntropyCache(NamedTuple):
    p: np.ndarray  # (M, V)  softmax of the M counted rows, exp of (CE.1): what (CE.6) needs
    targets: np.ndarray  # (M,)  target class of each counted row
    counted: np.ndarray  # (N,)  bool: w of (CE.5), True for a row that counts, False for an ignored one
    denom: int  # the normaliser D of (CE.5): rows counted for "mean" (at least 1), 1 for "sum"
    label_smoothing: float  # eps of (CE.3)
    shape: Tuple[int, ...]  # (..., V) the shape of logits, for dlogits


def _check_options(op: str, V: int, ignore_index: int, label_smoothing: float, reduction: str) -> float:
    """Validate the options; return ``label_smoothing`` as a float."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        _fail(op, "reduction", f"one of {REDUCTIONS}", repr(reduction))
    eps = check_real(op, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        _fail(op, "ignore_index", "an int", type(ignore_index).__name__)
    if 0 <= ignore_index < V:
        _fail(op, "ignore_index", f"a value outside the class range [0, {V}) (it would hide a class)", ignore_index)
    return eps


def _check_dloss(op: str, dloss: object, dtype: np.dtype) -> float:
    """A finite real scalar: a Python or NumPy number, or a 0-d array of the logits' dtype."""
    if isinstance(dloss, np.ndarray):
        check_same_dtype_as(op, "dloss", dloss, dtype, "logits")
        if dloss.ndim != 0:
            _fail(op, "dloss", "a scalar (shape ())", f"shape {dloss.shape}")
        dloss = dloss.item()
    return check_real(op, "dloss", dloss)


def cross_entropy_forward(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tuple[np.ndarray, CrossEntropyCache]:
    """Mean (or sum) over rows of -log softmax(logits)[target], optionally label-smoothed.

    logits: (..., V) float, targets: (...) int  ->  loss: () array of logits' dtype
    """
    op = f"{OP}_forward"
    check_float(op, "logits", logits)
    check_ndim(op, "logits", logits, 1, at_least=True)
    check_int(op, "targets", targets)
    V = logits.shape[-1]
    check_shape(op, "targets", targets, logits.shape[:-1])
    if V == 0:
        _fail(op, "logits", "at least one class on the last axis", f"shape {tuple(logits.shape)}")
    eps = _check_options(op, V, ignore_index, label_smoothing, reduction)

    t = targets.reshape(-1)  # (N,)
    counted = t != ignore_index  # (N,)  rows that count, w of (CE.5)
    bad = counted & ((t < 0) | (t >= V))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        check_range(op, "targets", int(t[row]), 0, V)  # raises, naming the first offending value
    n_counted = int(counted.sum())
    denom = max(n_counted, 1) if reduction == "mean" else 1  # (CE.5)

    # Only the counted rows are evaluated: an ignored row (padding) may hold anything, -inf, nan
    # or logits beyond float range, and 0 * its loss would be nan. (CE.5) sums over counted rows.
    rows = logits.reshape(-1, V)  # (N, V)
    every = n_counted == t.size
    x = rows if every else rows[counted]  # (M, V)
    classes = (t if every else t[counted]).astype(np.intp)  # (M,)  each counted row's target
    logp, log_softmax_cache = log_softmax_forward(x)  # (M, V)  (CE.1); its cache holds p = exp(logp)
    if eps == 1.0:  # (CE.3) with the nll term's weight 0: left out, since 0 * nll is nan where nll = inf
        row_loss = -logp.mean(axis=-1)  # (M,)  mean over classes of -log p
    else:
        nll = -logp[np.arange(classes.size), classes]  # (M,)  (CE.2)
        row_loss = (1.0 - eps) * nll - eps * logp.mean(axis=-1) if eps else nll  # (CE.3)
    loss = row_loss.sum() / logits.dtype.type(denom)  # (CE.5)  a sum of non-negative terms
    cache = CrossEntropyCache(p=log_softmax_cache.p, targets=classes, counted=counted, denom=denom,
                              label_smoothing=eps, shape=tuple(logits.shape))
    return np.asarray(loss, dtype=logits.dtype), cache


def cross_entropy_backward(dloss: Union[float, np.ndarray], cache: CrossEntropyCache) -> np.ndarray:
    """Gradient of a scalar objective with respect to the logits, given dloss = d objective / d loss.

    dloss: a real number or a () array of the logits' dtype  ->  dlogits: (..., V), the dtype of logits
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, CrossEntropyCache)
    p, t, counted, denom, eps, shape = cache  # p: (M, V) softmax of every counted row, (CE.6)
    dloss = _check_dloss(op, dloss, p.dtype)
    M, V = p.shape
    dtype = p.dtype.type
    coef = dtype(dloss / denom)  # dloss * w_n / D for every counted row (w_n = 1), (CE.7)
    # (CE.7): dlogits = coef * (p - q), with q = (1 - eps) onehot(t) + eps / V of (CE.4)
    dcounted = p * coef  # a new array: the cache's p stays as it is
    dcounted[np.arange(M), t] -= coef * dtype(1.0 - eps)  # the one-hot part of q
    if eps:
        dcounted -= coef * dtype(eps / V)  # the uniform part of q
    if M == counted.size:
        return dcounted.reshape(shape)
    dlogits = np.zeros((counted.size, V), p.dtype)  # (CE.7)  ignored rows (w_n = 0): exactly 0
    dlogits[counted] = dcounted
    return dlogits.reshape(shape)


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck cross_entropy``."""
    from ..gradcheck import Case

    V = 5
    logits = 3.0 * rng.standard_normal((2, 3, V))
    targets = rng.integers(0, V, size=(2, 3))
    targets[0, 1] = -100  # one ignored row
    inputs = {"logits": logits, "targets": targets}
    yield Case("cross_entropy (mean)", cross_entropy_forward, cross_entropy_backward, inputs, wrt=("logits",))
    yield Case("cross_entropy (sum, smoothing 0.1)", cross_entropy_forward, cross_entropy_backward, inputs,
               wrt=("logits",), options={"reduction": "sum", "label_smoothing": 0.1})
