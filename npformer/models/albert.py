"""ALBERT: BERT with a factorized embedding, one encoder layer shared by every depth, and sentence order.

Read it beside ``bert.py``; three things differ:

- The tables are E wide (``embedding_size``, small), and a linear map
  ``embedding_hidden_mapping_in`` widens them to the hidden width D. The MLM head narrows
  back to E (dense D -> E) so that its decoder can be the (V, E) word table itself.
- One ``PostNormEncoderLayer`` (``layer``) is applied ``n_layer`` times. Each application
  keeps its own cache; ``backward`` pops them in reverse, and each adds its gradient into
  the same parameters, so the shared weights receive the SUM over applications.
- The second objective is sentence-order prediction (SOP): ``sop_classifier`` (D -> 2) on
  the pooled first token, label 0 when the two segments are in their original order, 1
  when swapped (Hugging Face's ``sentence_order_label``). No dropout before it.

Parameter names: ``embeddings.{word,position,token_type}_embeddings.weight``,
``embeddings.LayerNorm.*``, ``embedding_hidden_mapping_in.*``, ``layer.attention.{q,k,v,o}_proj.*``,
``layer.attention_norm.*``, ``layer.mlp.{fc,proj}.*``, ``layer.output_norm.*``,
``mlm_head.dense.*``, ``mlm_head.layer_norm.*``, ``mlm_head.bias``, ``pooler.dense.*``,
``sop_classifier.*``. Recordings of the shared layer are named ``layer.<name>`` for the first
application, ``layer.<name>@2`` for the second, ... (backward names count in backward order).

Shapes: ids (B, T) int, embeddings (B, T, E), hidden (B, T, D), mlm_logits (B, T, V), sop_logits (B, 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..nn.encoder import (EncoderEmbeddings, MLMHead, Pooler, PostNormEncoderLayer, check_encoder_config,
                          check_mlm_labels, check_pair_labels, key_padding_mask)
from ..nn.heads import EncodeCache, peek_forward_cache, pop_encode_cache
from ..nn.layers import Linear
from ..nn.lm import IGNORE_INDEX
from ..nn.module import Module, atomic
from ..ops._checks import check_count
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward

__all__ = ["AlbertConfig", "Albert", "AlbertOutputs", "IGNORE_INDEX"]


GELUS = {"gelu": "none", "gelu_new": "tanh"}  # Hugging Face's hidden_act -> the GELU's approximation


@dataclass
class AlbertConfig:
    """An ALBERT model's shape; Hugging Face's field name, where it differs, in the comment."""

    vocab_size: int = 65
    max_position: int = 128  # max_position_embeddings
    type_vocab_size: int = 2  # 0: no token-type table
    embedding_size: int = 32  # E: the tables' width
    n_layer: int = 4  # num_hidden_layers: applications of the one shared layer
    n_head: int = 4  # num_attention_heads
    d_model: int = 128  # hidden_size
    d_ff: int = 512  # intermediate_size
    dropout: float = 0.0  # hidden_dropout_prob (embeddings, attention output, MLP output)
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0  # the word row a lookup never trains; None: none
    hidden_act: str = "gelu"  # "gelu" (erf) or "gelu_new" (tanh: Hugging Face's default and real checkpoints')
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "AlbertConfig"
        if self.hidden_act not in GELUS:
            raise ValueError(f"{op}: argument 'hidden_act' expected one of {sorted(GELUS)}, got {self.hidden_act!r}")
        check_encoder_config(op, self, ("embedding_size",))  # the fields every encoder has

    @property
    def block_size(self) -> int:
        """The longest sequence: the position table's rows."""
        return self.max_position

    def to_dict(self) -> dict:
        return asdict(self)


class AlbertOutputs(NamedTuple):
    mlm_logits: np.ndarray  # (B, T, V)
    sop_logits: np.ndarray  # (B, 2)


class AlbertCache(NamedTuple):
    """One training forward of ``Albert``: the two losses' op caches (None where no labels were given)."""

    mlm_loss: Optional[CrossEntropyCache]
    sop_loss: Optional[CrossEntropyCache]
    batch: int  # B, for the zero gradient of the SOP head without labels


class Albert(Module):
    """embeddings (E) -> embedding_hidden_mapping_in (E -> D) -> layer x n_layer -> mlm_head (tied, D -> E -> V),
    and pooler -> sop_classifier."""

    def __init__(self, cfg: AlbertConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, AlbertConfig):
            raise TypeError(f"Albert: argument 'cfg' expected an AlbertConfig, got {type(cfg).__name__}")
        check_count("Albert", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init normal(0, 0.02), then dropout masks
        dtype = np.dtype(cfg.dtype)
        E, D = cfg.embedding_size, cfg.d_model
        self.embeddings = EncoderEmbeddings(
            cfg.vocab_size, cfg.max_position, E, type_vocab_size=cfg.type_vocab_size, pad_token_id=cfg.pad_token_id,
            layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout, rng=rng, dtype=dtype)
        self.embedding_hidden_mapping_in = Linear(E, D, True, rng=rng, dtype=dtype)
        gelu = GELUS[cfg.hidden_act]
        self.layer = PostNormEncoderLayer(D, cfg.n_head, cfg.d_ff, dropout=cfg.dropout,
                                          layer_norm_eps=cfg.layer_norm_eps, rng=rng, dtype=dtype, approximate=gelu)
        self.mlm_head = MLMHead(D, cfg.vocab_size, E, layer_norm_eps=cfg.layer_norm_eps, rng=rng, dtype=dtype,
                                approximate=gelu)
        self.pooler = Pooler(D, rng=rng, dtype=dtype)
        self.sop_classifier = Linear(D, 2, True, rng=rng, dtype=dtype)

    def _check_labels(self, op: str, ids: np.ndarray, mlm_labels: object, sop_labels: object) -> None:
        V = self.cfg.vocab_size
        if mlm_labels is not None:
            check_mlm_labels(op, ids, mlm_labels, V)
        if sop_labels is not None:
            check_pair_labels(op, "sop_labels", sop_labels, ids.shape[0], "0 (original order) or 1 (swapped)")

    # ------------------------------------------------------------------------------------
    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None, mlm_labels: Optional[np.ndarray] = None,
                sop_labels: Optional[np.ndarray] = None) -> Tuple[AlbertOutputs, Optional[float]]:
        """ids (B, T) -> (AlbertOutputs(mlm_logits (B, T, V), sop_logits (B, 2)), loss or None).

        token_type_ids (B, T) in [0, type_vocab_size) (default 0); attention_mask (B, T) of 1 for
        a token and 0 for padding (every row needs a token); mlm_labels (B, T) in [0, V) or -100
        where not masked; sop_labels (B,) in {0, 1}. The loss is the mean cross entropy over the
        masked tokens plus the mean SOP cross entropy, of what is given.
        """
        op = "Albert.forward"
        self.embeddings.check_inputs(op, ids, token_type_ids)
        pad = key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding
        self._check_labels(op, ids, mlm_labels, sop_labels)

        e = self.embeddings.forward(ids, token_type_ids)  # (B, T, E)
        x = self.embedding_hidden_mapping_in.forward(e)  # (B, T, D)
        for _ in range(self.cfg.n_layer):  # the same layer every time: one cache per application
            x = self.layer.forward(x, key_padding_mask=pad)
        mlm_logits = self.mlm_head.forward(x, self.embeddings.word_embeddings.weight.data)  # (B, T, V), tied
        sop_logits = self.sop_classifier.forward(self.pooler.forward(x))  # (B, 2)
        self.record("sop_logits", sop_logits)
        loss, mlm_cache, sop_cache = None, None, None
        if mlm_labels is not None:
            mlm_loss, mlm_cache = cross_entropy_forward(mlm_logits, mlm_labels)
            loss = float(mlm_loss)
        if sop_labels is not None:
            sop_loss, sop_cache = cross_entropy_forward(sop_logits, sop_labels)
            loss = float(sop_loss) + (0.0 if loss is None else loss)
        self.save_cache(AlbertCache(mlm_loss=mlm_cache, sop_loss=sop_cache, batch=ids.shape[0]))
        return AlbertOutputs(mlm_logits=mlm_logits, sop_logits=sop_logits), loss

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the stack in reverse.

        The shared layer's backward runs n_layer times, last application first; each call adds
        its part into the shared weights' ``.grad``. A head without labels gets a zero gradient.
        """
        cache = peek_forward_cache(self, "Albert.backward")
        if cache.mlm_loss is None and cache.sop_loss is None:
            raise RuntimeError("Albert.backward: the matching forward had no labels, so there is no loss to "
                               "differentiate")
        self.pop_cache()
        dtype = self.mlm_head.bias.data.dtype
        one = np.asarray(1.0, dtype)
        if cache.mlm_loss is not None:
            dmlm_logits = cross_entropy_backward(one, cache.mlm_loss)  # (B, T, V)
        else:
            shape = self.mlm_head.peek_cache().decoder.x.shape[:-1] + (self.cfg.vocab_size,)
            dmlm_logits = np.zeros(shape, dtype)  # no MLM labels: a zero gradient
        self.record("dmlm_logits", dmlm_logits)
        dx, dW_word = self.mlm_head.backward(dmlm_logits)  # dx (B, T, D), dW_word (V, E)
        self.embeddings.word_embeddings.weight.grad += dW_word  # tied: the decoder's gradient joins the table's
        dsop_logits = (cross_entropy_backward(one, cache.sop_loss) if cache.sop_loss is not None
                       else np.zeros((cache.batch, 2), dtype))
        self.record("dsop_logits", dsop_logits)
        dpooled = self.sop_classifier.backward(dsop_logits)
        dx = dx + self.pooler.backward(dpooled)  # the first token's state feeds both heads
        for _ in range(self.cfg.n_layer):  # last application first: LIFO caches, gradients summed in .grad
            dx = self.layer.backward(dx)
        de = self.embedding_hidden_mapping_in.backward(dx)  # (B, T, E)
        self.embeddings.backward(de)

    # -- the body alone, for fine-tuning (npformer.finetune) ----------------------------------------
    @atomic
    def encode(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
               attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D): embeddings, the widening map, the shared layer n_layer times.

        Arguments as ``forward``'s; ``backward_encode(dhidden)`` is its backward.
        """
        op = "Albert.encode"
        self.embeddings.check_inputs(op, ids, token_type_ids)
        pad = key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding
        e = self.embeddings.forward(ids, token_type_ids)  # (B, T, E)
        x = self.embedding_hidden_mapping_in.forward(e)  # (B, T, D)
        for _ in range(self.cfg.n_layer):
            x = self.layer.forward(x, key_padding_mask=pad)
        self.save_cache(EncodeCache(out_shape=x.shape))
        return x

    @atomic
    def backward_encode(self, dhidden: np.ndarray) -> None:
        """dhidden (B, T, D) of the latest unmatched ``encode``: the body's gradients (the shared layer's summed)."""
        pop_encode_cache(self, "Albert.backward_encode", dhidden, self.cfg.d_model,
                         self.embeddings.LayerNorm.weight.data.dtype)
        dx = dhidden
        for _ in range(self.cfg.n_layer):
            dx = self.layer.backward(dx)
        de = self.embedding_hidden_mapping_in.backward(dx)  # (B, T, E)
        self.embeddings.backward(de)

    def astype(self, dtype) -> "Albert":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.mlm_head.bias.data.dtype.name)
        return self
