"""BERT and RoBERTa: embeddings, post-norm bidirectional encoder layers, a tied MLM head and (BERT) an NSP head.

Read it beside ``llama.py``: ``forward`` runs the layers in order, ``backward`` walks them in
reverse, one line per layer. What differs from a causal model: every token sees every other
token that is not padding (``attention_mask``), the LayerNorm comes after each residual sum
(post-norm), positions are a learned table, and the objective is masked-token prediction
(MLM, labels -100 where a token was not masked) plus, for BERT, next-sentence prediction
(NSP) from the pooled first token.

RoBERTa is a configuration of the same model: ``type_vocab_size=1`` (or 0), positions
counted from ``position_padding_idx`` (its pad id: positions p+1, p+2, ... for tokens, p
for padding), and ``nsp_head=False`` (no pooler, no NSP head).

Parameter names (Hugging Face's inner names where they are cheap; attention projections as
``MultiHeadAttention`` names them): ``embeddings.{word,position,token_type}_embeddings.weight``,
``embeddings.LayerNorm.{weight,bias}``, ``layers.{i}.attention.{q,k,v,o}_proj.{weight,bias}``,
``layers.{i}.attention_norm.*``, ``layers.{i}.mlp.{fc,proj}.*``, ``layers.{i}.output_norm.*``,
``mlm_head.dense.*``, ``mlm_head.layer_norm.*``, ``mlm_head.bias`` (the decoder is the word
table), and with the NSP head ``pooler.dense.*``, ``seq_relationship.{weight,bias}``.

Shapes: ids (B, T) int, hidden (B, T, D), mlm_logits (B, T, V), nsp_logits (B, 2).
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
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import check_bool, check_count
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward

__all__ = ["BertConfig", "Bert", "BertOutputs", "IGNORE_INDEX"]


@dataclass
class BertConfig:
    """A BERT/RoBERTa model's shape; Hugging Face's field name, where it differs, in the comment."""

    vocab_size: int = 65
    max_position: int = 128  # max_position_embeddings: rows of the position table
    type_vocab_size: int = 2  # 0: no token-type table
    n_layer: int = 2  # num_hidden_layers
    n_head: int = 4  # num_attention_heads
    d_model: int = 128  # hidden_size
    d_ff: int = 512  # intermediate_size
    dropout: float = 0.1  # hidden_dropout_prob (embeddings, attention output, MLP output); none on attention probs
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0  # the word row a lookup never trains (torch's padding_idx); None: none
    position_padding_idx: Optional[int] = None  # RoBERTa: pad_token_id (positions p+1, p+2, ...); None: 0 .. T-1
    nsp_head: bool = True  # the pooler and the next-sentence head (BERT); False for RoBERTa
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "BertConfig"
        check_encoder_config(op, self)  # the fields every encoder has
        if self.position_padding_idx is not None:  # at least one token position after it
            self.position_padding_idx = check_count(op, "position_padding_idx", self.position_padding_idx, 0,
                                                    self.max_position - 2)
        self.nsp_head = check_bool(op, "nsp_head", self.nsp_head)

    @property
    def block_size(self) -> int:
        """The longest sequence: max_position, or max_position - position_padding_idx - 1 with RoBERTa's positions."""
        p = self.position_padding_idx
        return self.max_position if p is None else self.max_position - p - 1

    def to_dict(self) -> dict:
        return asdict(self)


class BertOutputs(NamedTuple):
    mlm_logits: np.ndarray  # (B, T, V)
    nsp_logits: Optional[np.ndarray]  # (B, 2), None without the NSP head


class BertCache(NamedTuple):
    """One training forward of ``Bert``: the two losses' op caches (None where no labels were given)."""

    mlm_loss: Optional[CrossEntropyCache]
    nsp_loss: Optional[CrossEntropyCache]
    batch: int  # B, for the zero gradient of an NSP head without labels


class Bert(Module):
    """embeddings -> layers -> mlm_head (tied to the word table), and pooler -> seq_relationship with the NSP head."""

    def __init__(self, cfg: BertConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, BertConfig):
            raise TypeError(f"Bert: argument 'cfg' expected a BertConfig, got {type(cfg).__name__}")
        check_count("Bert", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init normal(0, 0.02), then dropout masks
        dtype = np.dtype(cfg.dtype)
        self.embeddings = EncoderEmbeddings(
            cfg.vocab_size, cfg.max_position, cfg.d_model, type_vocab_size=cfg.type_vocab_size,
            pad_token_id=cfg.pad_token_id, position_padding_idx=cfg.position_padding_idx,
            layer_norm_eps=cfg.layer_norm_eps, dropout=cfg.dropout, rng=rng, dtype=dtype)
        self.layers = ModuleList(
            PostNormEncoderLayer(cfg.d_model, cfg.n_head, cfg.d_ff, dropout=cfg.dropout,
                                 layer_norm_eps=cfg.layer_norm_eps, rng=rng, dtype=dtype)
            for _ in range(cfg.n_layer))
        self.mlm_head = MLMHead(cfg.d_model, cfg.vocab_size, layer_norm_eps=cfg.layer_norm_eps, rng=rng, dtype=dtype)
        if cfg.nsp_head:
            self.pooler = Pooler(cfg.d_model, rng=rng, dtype=dtype)
            self.seq_relationship = Linear(cfg.d_model, 2, True, rng=rng, dtype=dtype)

    def _check_labels(self, op: str, ids: np.ndarray, mlm_labels: object, nsp_labels: object) -> None:
        V = self.cfg.vocab_size
        if mlm_labels is not None:
            check_mlm_labels(op, ids, mlm_labels, V)
        if nsp_labels is not None:
            if not self.cfg.nsp_head:
                raise ValueError(f"{op}: argument 'nsp_labels' expected None (this model has no NSP head), "
                                 "got an array")
            check_pair_labels(op, "nsp_labels", nsp_labels, ids.shape[0], "0 (is next) or 1 (random)")

    # ------------------------------------------------------------------------------------
    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
                attention_mask: Optional[np.ndarray] = None, mlm_labels: Optional[np.ndarray] = None,
                nsp_labels: Optional[np.ndarray] = None) -> Tuple[BertOutputs, Optional[float]]:
        """ids (B, T) -> (BertOutputs(mlm_logits (B, T, V), nsp_logits (B, 2) or None), loss or None).

        token_type_ids (B, T) in [0, type_vocab_size) (default 0); attention_mask (B, T) of 1 for
        a token and 0 for padding (default all 1; every row needs a token); mlm_labels (B, T) in
        [0, V) or -100 where not masked; nsp_labels (B,) in {0, 1}. The loss is the mean cross
        entropy over the masked tokens plus the mean NSP cross entropy, of what is given.
        """
        op, cfg = "Bert.forward", self.cfg
        self.embeddings.check_inputs(op, ids, token_type_ids)
        pad = key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding
        self._check_labels(op, ids, mlm_labels, nsp_labels)

        x = self.embeddings.forward(ids, token_type_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer.forward(x, key_padding_mask=pad)
        mlm_logits = self.mlm_head.forward(x, self.embeddings.word_embeddings.weight.data)  # tied decoder
        nsp_logits = None
        if cfg.nsp_head:
            nsp_logits = self.seq_relationship.forward(self.pooler.forward(x))  # (B, 2)
            self.record("nsp_logits", nsp_logits)
        loss, mlm_cache, nsp_cache = None, None, None
        if mlm_labels is not None:
            mlm_loss, mlm_cache = cross_entropy_forward(mlm_logits, mlm_labels)
            loss = float(mlm_loss)
        if nsp_labels is not None:
            nsp_loss, nsp_cache = cross_entropy_forward(nsp_logits, nsp_labels)
            loss = float(nsp_loss) + (0.0 if loss is None else loss)
        self.save_cache(BertCache(mlm_loss=mlm_cache, nsp_loss=nsp_cache, batch=ids.shape[0]))
        return BertOutputs(mlm_logits=mlm_logits, nsp_logits=nsp_logits), loss

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse.

        A head whose labels were not given gets a zero gradient (its forward still ran).
        """
        cache = peek_forward_cache(self, "Bert.backward")
        if cache.mlm_loss is None and cache.nsp_loss is None:
            raise RuntimeError("Bert.backward: the matching forward had no labels, so there is no loss to "
                               "differentiate")
        self.pop_cache()
        dtype = self.mlm_head.bias.data.dtype
        one = np.asarray(1.0, dtype)
        if cache.mlm_loss is not None:
            dmlm_logits = cross_entropy_backward(one, cache.mlm_loss)  # (B, T, V)
        else:
            dmlm_logits = np.zeros(self._mlm_shape(), dtype)  # no MLM labels: a zero gradient
        self.record("dmlm_logits", dmlm_logits)
        dx, dW_word = self.mlm_head.backward(dmlm_logits)
        self.embeddings.word_embeddings.weight.grad += dW_word  # tied: the decoder's gradient joins the table's
        if self.cfg.nsp_head:
            dnsp_logits = (cross_entropy_backward(one, cache.nsp_loss) if cache.nsp_loss is not None
                           else np.zeros((cache.batch, 2), dtype))
            self.record("dnsp_logits", dnsp_logits)
            dpooled = self.seq_relationship.backward(dnsp_logits)
            dx = dx + self.pooler.backward(dpooled)  # the first token's state feeds both heads
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        self.embeddings.backward(dx)

    # -- the body alone, for fine-tuning (npformer.finetune) ----------------------------------------
    @atomic
    def encode(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None,
               attention_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> hidden (B, T, D): embeddings and layers, without the pre-training heads.

        Arguments as ``forward``'s; ``backward_encode(dhidden)`` is its backward.
        """
        op = "Bert.encode"
        self.embeddings.check_inputs(op, ids, token_type_ids)
        pad = key_padding_mask(op, attention_mask, ids.shape)  # (B, T) True at padding
        x = self.embeddings.forward(ids, token_type_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer.forward(x, key_padding_mask=pad)
        self.save_cache(EncodeCache(out_shape=x.shape))
        return x

    @atomic
    def backward_encode(self, dhidden: np.ndarray) -> None:
        """dhidden (B, T, D) of the latest unmatched ``encode``: the body's gradients, the layers in reverse."""
        pop_encode_cache(self, "Bert.backward_encode", dhidden, self.cfg.d_model,
                         self.embeddings.LayerNorm.weight.data.dtype)
        dx = dhidden
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        self.embeddings.backward(dx)

    def _mlm_shape(self) -> Tuple[int, ...]:
        """The shape of the pending MLM head call's logits: its decoder input's leading axes and V."""
        return self.mlm_head.peek_cache().decoder.x.shape[:-1] + (self.cfg.vocab_size,)

    def astype(self, dtype) -> "Bert":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.mlm_head.bias.data.dtype.name)
        return self
