"""Cross-entropy loss over class logits: forward and hand-derived backward.

Derivation: ``proofs/cross_entropy.md``; each line cites the equation it
implements. Shapes: ``logits: (..., V)`` with the classes on the LAST axis,
``targets: (...)`` integer class ids; every leading index is one prediction
("row"), N rows in all. The loss goes through log-softmax (``proofs/softmax.md``),
so logits of magnitude 1e4 stay finite in float32.

Conventions (each argued in the proof):

- ``ignore_index`` marks rows that take no part in the loss; it must lie outside
  ``[0, V)``, so that a class id can never be silently ignored.
- ``reduction="mean"`` divides by the number of non-ignored rows; when every row
  is ignored the loss and its gradient are 0 (PyTorch returns nan there).
- ``label_smoothing = eps`` mixes the one-hot target with the uniform
  distribution: ``(1 - eps) * nll + eps * mean_v(-log p_v)``, as PyTorch does.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple, Union

import numpy as np

from ._checks import _fail, check_float, check_int, check_ndim, check_range, check_shape
from .softmax import log_softmax_forward

OP = "cross_entropy"
REDUCTIONS = ("mean", "sum")


class CrossEntropyCache(NamedTuple):
    logp: np.ndarray  # (N, V)  log-probabilities of every row, (CE.1)
    targets: np.ndarray  # (N,)  target class per row, ignored rows set to class 0
    weight: np.ndarray  # (N, 1)  w: 1 for a counted row, 0 for an ignored one, (CE.5)
    denom: int  # the normaliser D of (CE.5): rows counted for "mean" (at least 1), 1 for "sum"
    label_smoothing: float  # eps of (CE.3)
    shape: Tuple[int, ...]  # (..., V) the shape of logits, for dlogits


def _check_options(op: str, V: int, ignore_index: int, label_smoothing: float, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        _fail(op, "reduction", f"one of {REDUCTIONS}", repr(reduction))
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float, np.floating, np.integer)):
        _fail(op, "label_smoothing", "a real number", type(label_smoothing).__name__)
    check_range(op, "label_smoothing", float(label_smoothing), 0.0, 1.0, hi_open=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        _fail(op, "ignore_index", "an int", type(ignore_index).__name__)
    if 0 <= ignore_index < V:
        _fail(op, "ignore_index", f"a value outside the class range [0, {V}) (it would hide a class)", ignore_index)


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
    _check_options(op, V, ignore_index, label_smoothing, reduction)

    t = targets.reshape(-1)  # (N,)
    valid = t != ignore_index  # (N,)  rows that count, w of (CE.5)
    bad = valid & ((t < 0) | (t >= V))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        check_range(op, "targets", int(t[row]), 0, V)  # raises, naming the first offending value
    t = np.where(valid, t, 0)  # any in-range class for ignored rows; their weight is 0
    n_valid = int(valid.sum())
    denom = max(n_valid, 1) if reduction == "mean" else 1  # (CE.5)
    eps = float(label_smoothing)

    logp, _ = log_softmax_forward(logits.reshape(-1, V))  # (N, V)  (CE.1)
    nll = -logp[np.arange(t.size), t]  # (N,)  (CE.2)
    if eps:
        smooth = -logp.mean(axis=-1)  # (N,)  mean over classes of -log p
        row_loss = (1.0 - eps) * nll + eps * smooth  # (CE.3)
    else:
        row_loss = nll
    weight = valid.astype(logits.dtype)[:, None]  # (N, 1)
    loss = np.dot(row_loss, weight[:, 0]) / logits.dtype.type(denom)  # (CE.5)  a sum of non-negative terms
    cache = CrossEntropyCache(logp=logp, targets=t, weight=weight, denom=denom, label_smoothing=eps,
                              shape=tuple(logits.shape))
    return np.asarray(loss, dtype=logits.dtype), cache


def cross_entropy_backward(dloss: Union[float, np.ndarray], cache: CrossEntropyCache) -> np.ndarray:
    """Gradient of a scalar objective with respect to the logits, given dloss = d objective / d loss.

    dloss: () array or float  ->  dlogits: (..., V), the dtype of logits
    """
    logp, t, weight, denom, eps, shape = cache
    if np.ndim(dloss) != 0:
        _fail(f"{OP}_backward", "dloss", "a scalar (shape ())", f"shape {np.shape(dloss)}")
    N, V = logp.shape
    coef = weight * logp.dtype.type(float(dloss) / denom)  # (N, 1)  dloss * w_n / D, (CE.7)
    dlogits = np.exp(logp)  # softmax p, (N, V)
    if eps:
        dlogits -= logp.dtype.type(eps / V)  # the uniform part of q, (CE.4)
    dlogits[np.arange(N), t] -= logp.dtype.type(1.0 - eps)  # (CE.6)  p - q
    dlogits *= coef  # (CE.7)
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
