"""Task heads on an encoder's hidden states, with their cross-entropy loss, and the ``encode`` contract.

An encoder (BERT, RoBERTa, ALBERT, DeBERTa, ELECTRA) fine-tuned on a labelled task keeps its
body and drops its pre-training heads. ``model.encode(ids, token_type_ids, attention_mask)``
runs the body and returns the hidden states (B, T, D); a head reads them:

- ``SequenceClassificationHead``: one label per sequence, from the first token ([CLS]):
  ``logits = classifier(dropout(pooler(h)))`` with the ``Pooler`` of ``nn/encoder.py``
  (dense + tanh on h[:, 0]), as BERT's sequence classifier.
- ``TokenClassificationHead``: one label per token, ``logits = classifier(dropout(h))``.

``head.forward(hidden, labels)`` returns ``(logits, loss)``, the loss the mean cross entropy
(``ops/cross_entropy.py``) over the labels that are not ``IGNORE_INDEX`` (-100: padding, [CLS],
[SEP], a word's later pieces); ``head.backward(dloss=1.0)`` returns ``dhidden`` (B, T, D), which
``model.backward_encode(dhidden)`` takes down the body. Every call keeps its own cache and
backward calls match forward calls last in, first out, as every layer's do.

``EncodeCache`` and ``pop_encode_cache`` are what the encoders' ``encode``/``backward_encode``
share: the hidden states' shape, checked against ``dhidden`` before any gradient is added.

Shapes: hidden (B, T, D), sequence logits (B, K), token logits (B, T, K), K = num_labels.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..ops._checks import check_float, check_int, check_ndim, check_real, check_shape
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from .encoder import Pooler
from .layers import Dropout, Linear, check_features, check_layer_options
from .lm import IGNORE_INDEX
from .module import Module, atomic

__all__ = ["SequenceClassificationHead", "TokenClassificationHead", "EncodeCache", "pop_encode_cache",
           "IGNORE_INDEX"]


# -- the encode contract -----------------------------------------------------------------------------
class EncodeCache(NamedTuple):
    """One ``encode`` call of an encoder: the shape of the hidden states it returned (B, T, D)."""

    out_shape: Tuple[int, ...]


def peek_forward_cache(model: Module, op: str):
    """The latest unmatched pre-training ``forward``'s cache; ``RuntimeError`` when the latest call was an
    ``encode`` (its ``backward_encode`` comes first) or there is none."""
    cache = model.peek_cache()  # raises RuntimeError when no call is pending
    if isinstance(cache, EncodeCache):
        raise RuntimeError(f"{op}: the latest unmatched call was encode, not forward: call backward_encode() for it "
                           "first")
    return cache


def pop_encode_cache(model: Module, op: str, dhidden: object, width: int, dtype: np.dtype) -> EncodeCache:
    """The latest unmatched ``encode`` call's cache, after checking ``dhidden`` against it (B, T, D), dtype.

    ``RuntimeError`` when the latest unmatched call of ``model`` was a pre-training ``forward``
    (its ``backward`` comes first) or there is none.
    """
    cache = model.peek_cache()  # raises RuntimeError when no call is pending
    if not isinstance(cache, EncodeCache):
        raise RuntimeError(f"{op}: the latest unmatched call was forward, not encode: call backward() for it first")
    check_features(op, "dhidden", dhidden, width, dtype)
    check_shape(op, "dhidden", dhidden, cache.out_shape)
    return model.pop_cache()


# -- heads -----------------------------------------------------------------------------------------------
def _check_hidden(op: str, hidden: object, width: int, dtype: np.dtype) -> None:
    check_float(op, "hidden", hidden)
    check_ndim(op, "hidden", hidden, 3)
    check_features(op, "hidden", hidden, width, dtype)
    if hidden.shape[0] < 1 or hidden.shape[1] < 1:
        raise ValueError(f"{op}: argument 'hidden' expected shape (B, T, D) with B >= 1 and T >= 1, "
                         f"got {hidden.shape}")


def _check_labels(op: str, labels: object, shape: Tuple[int, ...], K: int) -> None:
    """labels of ``shape``, each in [0, K) or IGNORE_INDEX."""
    check_int(op, "labels", labels)
    check_shape(op, "labels", labels, shape)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= K))
    if bad.any():
        raise ValueError(f"{op}: argument 'labels' expected values in [0, {K}) or {IGNORE_INDEX} (not scored), "
                         f"got {labels[bad].flat[0]}")


class HeadCache(NamedTuple):
    """One forward of a head: the loss's op cache (None when no labels were given) and hidden's shape."""

    loss: Optional[CrossEntropyCache]
    in_shape: Tuple[int, ...]  # (B, T, D)


class _Head(Module):
    """What both heads share: the classifier (D -> K), the dropout before it, the loss and its backward."""

    def __init__(self, name: str, d_model: int, num_labels: int, dropout: float, rng: np.random.Generator,
                 std: float, dtype) -> None:
        super().__init__()
        dtype = check_layer_options(name, rng=rng, dtype=dtype, std=std, d_model=d_model, num_labels=num_labels)
        check_real(name, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        self.num_labels = int(num_labels)
        self.dropout = Dropout(dropout, rng=rng)
        self.classifier = Linear(d_model, num_labels, True, rng=rng, std=std, dtype=dtype)

    @property
    def width(self) -> int:
        return self.classifier.weight.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.classifier.weight.data.dtype

    def _loss(self, logits: np.ndarray, labels: Optional[np.ndarray], in_shape) -> Optional[float]:
        loss, cache = None, None
        if labels is not None:
            value, cache = cross_entropy_forward(logits, labels, ignore_index=IGNORE_INDEX)  # mean over scored
            loss = float(value)
        self.save_cache(HeadCache(loss=cache, in_shape=in_shape))
        return loss

    def _dlogits(self, op: str, dloss: float) -> np.ndarray:
        dloss = check_real(op, "dloss", dloss)
        if self.peek_cache().loss is None:
            raise RuntimeError(f"{op}: the matching forward had no labels, so there is no loss to differentiate")
        cache = self.pop_cache()
        dlogits = cross_entropy_backward(np.asarray(dloss, self.dtype), cache.loss)  # (CE.7)
        self.record("dlogits", dlogits)
        return dlogits


class SequenceClassificationHead(_Head):
    """logits = classifier(dropout(pooler(hidden))), pooler = tanh(dense(hidden[:, 0])): (B, T, D) -> (B, K)."""

    def __init__(self, d_model: int, num_labels: int, *, dropout: float = 0.1, rng: np.random.Generator,
                 std: float = 0.02, dtype=np.float32):
        super().__init__("SequenceClassificationHead", d_model, num_labels, dropout, rng, std, dtype)
        self.pooler = Pooler(d_model, rng=rng, std=std, dtype=self.dtype)

    @atomic
    def forward(self, hidden: np.ndarray,
                labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """hidden (B, T, D), labels (B,) in [0, K) or -100 -> (logits (B, K), mean cross entropy or None)."""
        op = "SequenceClassificationHead.forward"
        _check_hidden(op, hidden, self.width, self.dtype)
        if labels is not None:
            _check_labels(op, labels, hidden.shape[:1], self.num_labels)
        pooled = self.pooler.forward(hidden)  # (B, D)
        logits = self.classifier.forward(self.dropout.forward(pooled))  # (B, K)
        self.record("logits", logits)
        return logits, self._loss(logits, labels, hidden.shape)

    @atomic
    def backward(self, dloss: float = 1.0) -> np.ndarray:
        """-> dhidden (B, T, D) of dloss * (the latest unmatched forward's loss), zero but at the first token."""
        dlogits = self._dlogits("SequenceClassificationHead.backward", dloss)  # (B, K)
        dpooled = self.dropout.backward(self.classifier.backward(dlogits))  # (B, D)
        return self.pooler.backward(dpooled)  # (B, T, D)


class TokenClassificationHead(_Head):
    """logits = classifier(dropout(hidden)): (B, T, D) -> (B, T, K), one label per token."""

    def __init__(self, d_model: int, num_labels: int, *, dropout: float = 0.1, rng: np.random.Generator,
                 std: float = 0.02, dtype=np.float32):
        super().__init__("TokenClassificationHead", d_model, num_labels, dropout, rng, std, dtype)

    @atomic
    def forward(self, hidden: np.ndarray,
                labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """hidden (B, T, D), labels (B, T) in [0, K) or -100 -> (logits (B, T, K), mean cross entropy or None)."""
        op = "TokenClassificationHead.forward"
        _check_hidden(op, hidden, self.width, self.dtype)
        if labels is not None:
            _check_labels(op, labels, hidden.shape[:2], self.num_labels)
        logits = self.classifier.forward(self.dropout.forward(hidden))  # (B, T, K)
        self.record("logits", logits)
        return logits, self._loss(logits, labels, hidden.shape)

    @atomic
    def backward(self, dloss: float = 1.0) -> np.ndarray:
        """-> dhidden (B, T, D) of dloss * (the latest unmatched forward's loss); zero where the label is -100."""
        dlogits = self._dlogits("TokenClassificationHead.backward", dloss)  # (B, T, K)
        return self.dropout.backward(self.classifier.backward(dlogits))  # (B, T, D)
