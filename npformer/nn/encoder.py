"""The pieces of a bidirectional (BERT-style) encoder: embeddings, a post-norm layer, the MLM head, the pooler.

BERT, RoBERTa, ALBERT and ELECTRA are built from these:

- ``EncoderEmbeddings``: word + learned position (+ token type) embeddings, then LayerNorm
  and dropout. Positions are 0 .. T-1 (BERT), or RoBERTa's: ``p + k`` for the k-th token
  (k = 1, 2, ...) counting only tokens that are not padding, and ``p`` for padding, with
  p = ``position_padding_idx``.
- ``PostNormEncoderLayer``: x = LN(x + drop(attn(x))), then x = LN(x + drop(mlp(x))), the
  attention unmasked except for padded keys, the MLP with the exact (erf) GELU.
- ``MLMHead``: dense + GELU + LayerNorm, then the decoder tied to the word embeddings
  (the table is passed in, so the caller adds its gradient to the table) plus a bias.
- ``Pooler``: dense + tanh on the first token's hidden state.

Rows frozen as ``torch.nn.Embedding(padding_idx=...)`` freezes them: a lookup of the padding
id adds nothing to that row's gradient (the word table's ``pad_token_id``, RoBERTa's position
``position_padding_idx``), so a model loaded from Hugging Face gets the gradients torch gives.

Attention masks: ``attention_mask`` (B, T) of 1 for a token and 0 for padding becomes the
attention op's ``key_padding_mask = attention_mask == 0`` (``key_padding_mask``).

Shapes: ids (B, T) int, hidden (B, T, D), logits (B, T, V), pooled (B, D).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..ops._checks import (
    MAX_POSITION,
    check_array,
    check_count,
    check_float,
    check_int,
    check_ndim,
    check_real,
    check_shape,
)
from ..ops.activations import gelu_backward, gelu_forward
from ..ops.linear import linear_backward, linear_forward
from .attention import MultiHeadAttention
from .layers import Dropout, Embedding, LayerNorm, Linear, check_dout, check_features, check_layer_options
from .mlp import MLP
from .lm import IGNORE_INDEX
from .module import Module, Parameter, atomic

__all__ = ["EncoderEmbeddings", "PostNormEncoderLayer", "MLMHead", "Pooler", "key_padding_mask",
           "roberta_position_ids", "check_encoder_config", "check_mlm_labels", "check_pair_labels"]


def key_padding_mask(op: str, attention_mask: object, shape: Tuple[int, int]) -> Optional[np.ndarray]:
    """attention_mask (B, T) of 1 (token) / 0 (padding), int or bool, -> key_padding_mask (B, T) bool, True = padding.

    None stays None (every position is a token). A row with no token at all is refused: its
    queries would attend to nothing.
    """
    if attention_mask is None:
        return None
    check_array(op, "attention_mask", attention_mask)
    if not (np.issubdtype(attention_mask.dtype, np.integer) or attention_mask.dtype == np.bool_):
        raise ValueError(f"{op}: argument 'attention_mask' expected an integer or bool dtype, "
                         f"got {attention_mask.dtype}")
    check_shape(op, "attention_mask", attention_mask, shape)
    if not np.isin(attention_mask, (0, 1)).all():
        bad = attention_mask[~np.isin(attention_mask, (0, 1))].flat[0]
        raise ValueError(f"{op}: argument 'attention_mask' expected values 0 (padding) or 1 (token), got {bad}")
    tokens = attention_mask.astype(bool)
    if not tokens.any(axis=1).all():
        row = int(np.flatnonzero(~tokens.any(axis=1))[0])
        raise ValueError(f"{op}: argument 'attention_mask' expected at least one token (1) in every row, "
                         f"got row {row} all padding")
    return ~tokens


def check_encoder_config(op: str, cfg, sizes: Tuple[str, ...] = ()) -> None:
    """The fields every encoder config shares, checked by name and set to plain Python values in place:
    sizes vocab_size, max_position, n_layer, n_head, d_model, d_ff (and ``sizes``) >= 1, type_vocab_size >= 0,
    n_head dividing d_model, dropout in [0, 1), layer_norm_eps >= 0, pad_token_id None or a word id, dtype
    float32 or float64."""
    for name in ("vocab_size", "max_position") + tuple(sizes) + ("n_layer", "n_head", "d_model", "d_ff"):
        setattr(cfg, name, check_count(op, name, getattr(cfg, name), 1, MAX_POSITION))
    cfg.type_vocab_size = check_count(op, "type_vocab_size", cfg.type_vocab_size, 0, MAX_POSITION)
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {cfg.d_model}, got {cfg.n_head}")
    cfg.dropout = check_real(op, "dropout", cfg.dropout, lo=0.0, hi=1.0, hi_open=True)
    cfg.layer_norm_eps = check_real(op, "layer_norm_eps", cfg.layer_norm_eps, lo=0.0)
    if cfg.pad_token_id is not None:
        cfg.pad_token_id = check_count(op, "pad_token_id", cfg.pad_token_id, 0, cfg.vocab_size - 1)
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {cfg.dtype!r}")


def check_mlm_labels(op: str, ids: np.ndarray, mlm_labels: object, vocab_size: int) -> None:
    """mlm_labels (B, T) int: the original token in [0, vocab_size) where masked, IGNORE_INDEX elsewhere."""
    check_int(op, "mlm_labels", mlm_labels)
    check_shape(op, "mlm_labels", mlm_labels, ids.shape)
    bad = (mlm_labels != IGNORE_INDEX) & ((mlm_labels < 0) | (mlm_labels >= vocab_size))
    if bad.any():
        raise ValueError(f"{op}: argument 'mlm_labels' expected values in [0, {vocab_size}) or {IGNORE_INDEX} "
                         f"(not masked), got {mlm_labels[bad].flat[0]}")


def check_pair_labels(op: str, name: str, labels: object, batch: int, meaning: str) -> None:
    """A sentence-pair head's labels (B,) int in {0, 1}; ``meaning`` says what 0 and 1 are, for the message."""
    check_int(op, name, labels)
    check_shape(op, name, labels, (batch,))
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{op}: argument '{name}' expected values {meaning}, "
                         f"got {labels[~np.isin(labels, (0, 1))].flat[0]}")


def roberta_position_ids(ids: np.ndarray, padding_idx: int) -> np.ndarray:
    """RoBERTa's positions: padding_idx + (k-th non-pad token: k = 1, 2, ...), padding_idx at pads. (B, T) int64."""
    token = ids != padding_idx  # (B, T)
    return padding_idx + np.cumsum(token, axis=1, dtype=np.int64) * token


class EmbeddingsCache(NamedTuple):
    """One forward of ``EncoderEmbeddings``: which lookups hit a frozen row, and the output's shape."""

    word_frozen: Optional[np.ndarray]  # (B, T) bool: ids == pad_token_id (None: no frozen word row)
    position_frozen: Optional[np.ndarray]  # (B, T) bool: position == position_padding_idx (None: BERT positions)
    out_shape: Tuple[int, ...]  # (B, T, D)


class EncoderEmbeddings(Module):
    """LN(word_embeddings[ids] + position_embeddings[pos] + token_type_embeddings[types]), then dropout.

    type_vocab_size 0: no token-type table. position_padding_idx None: positions 0 .. T-1;
    an int p: RoBERTa's positions (``roberta_position_ids``), row p never trained by a lookup.
    pad_token_id None or the word row a lookup never trains. embed_dim: the tables' width
    (ALBERT's E); the LayerNorm has that width too.
    """

    def __init__(self, vocab_size: int, max_position: int, embed_dim: int, *, type_vocab_size: int = 2,
                 pad_token_id: Optional[int] = None, position_padding_idx: Optional[int] = None,
                 layer_norm_eps: float = 1e-12, dropout: float = 0.0, rng: np.random.Generator,
                 std: float = 0.02, dtype=np.float32):
        super().__init__()
        name = "EncoderEmbeddings"
        dtype = check_layer_options(name, rng=rng, dtype=dtype, std=std, eps=layer_norm_eps,
                                    vocab_size=vocab_size, max_position=max_position, embed_dim=embed_dim)
        check_count(name, "type_vocab_size", type_vocab_size, 0, MAX_POSITION)
        if pad_token_id is not None:
            check_count(name, "pad_token_id", pad_token_id, 0, vocab_size - 1)
        if position_padding_idx is not None:
            check_count(name, "position_padding_idx", position_padding_idx, 0, max_position - 2)
        self.pad_token_id, self.position_padding_idx = pad_token_id, position_padding_idx
        self.type_vocab_size = int(type_vocab_size)
        self.word_embeddings = Embedding(vocab_size, embed_dim, rng=rng, std=std, dtype=dtype)
        self.position_embeddings = Embedding(max_position, embed_dim, rng=rng, std=std, dtype=dtype)
        if type_vocab_size:
            self.token_type_embeddings = Embedding(type_vocab_size, embed_dim, rng=rng, std=std, dtype=dtype)
        self.LayerNorm = LayerNorm(embed_dim, layer_norm_eps, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)
        for table, row in ((self.word_embeddings, pad_token_id), (self.position_embeddings, position_padding_idx)):
            if row is not None:
                table.weight.data[row] = 0  # a frozen row starts at zero, as torch's padding_idx does

    @property
    def max_length(self) -> int:
        """The longest sequence the position table covers: max_position, or max_position - p - 1 for RoBERTa's."""
        rows = self.position_embeddings.weight.shape[0]
        return rows if self.position_padding_idx is None else rows - self.position_padding_idx - 1

    def check_inputs(self, op: str, ids: object, token_type_ids: object) -> None:
        """ids (B, T) int in [0, V) with B, T >= 1 and T <= max_length; token_type_ids None or (B, T) in [0, types)."""
        check_int(op, "ids", ids)
        check_ndim(op, "ids", ids, 2)
        B, T = ids.shape
        if B < 1 or T < 1:
            raise ValueError(f"{op}: argument 'ids' expected shape (B, T) with B >= 1 and T >= 1, got {ids.shape}")
        V = self.word_embeddings.weight.shape[0]
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"{op}: argument 'ids' expected values in [0, {V}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        if T > self.max_length:
            raise ValueError(f"{op}: argument 'ids' expected at most {self.max_length} positions (the position "
                             f"table's), got {T}")
        if token_type_ids is not None:
            if not self.type_vocab_size:
                raise ValueError(f"{op}: argument 'token_type_ids' expected None (this model has no token-type "
                                 f"embeddings), got an array")
            check_int(op, "token_type_ids", token_type_ids)
            check_shape(op, "token_type_ids", token_type_ids, ids.shape)
            if token_type_ids.min() < 0 or token_type_ids.max() >= self.type_vocab_size:
                raise ValueError(f"{op}: argument 'token_type_ids' expected values in [0, {self.type_vocab_size}), "
                                 f"got values in [{token_type_ids.min()}, {token_type_ids.max()}]")

    @atomic
    def forward(self, ids: np.ndarray, token_type_ids: Optional[np.ndarray] = None) -> np.ndarray:
        """ids (B, T) -> (B, T, E); token types default to 0 where the model has them."""
        self.check_inputs("EncoderEmbeddings.forward", ids, token_type_ids)
        B, T = ids.shape
        if self.position_padding_idx is None:
            positions = np.broadcast_to(np.arange(T), (B, T))  # BERT: 0 .. T-1 in every row
        else:
            positions = roberta_position_ids(ids, self.position_padding_idx)
        self.record("position_ids", positions)
        x = self.word_embeddings.forward(ids) + self.position_embeddings.forward(positions)
        if self.type_vocab_size:
            types = np.zeros((B, T), np.int64) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embeddings.forward(types)
        out = self.dropout.forward(self.LayerNorm.forward(x))
        self.save_cache(EmbeddingsCache(
            word_frozen=None if self.pad_token_id is None else ids == self.pad_token_id,
            position_frozen=None if self.position_padding_idx is None else positions == self.position_padding_idx,
            out_shape=out.shape))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> None:
        """dout (B, T, E): the tables' gradients (ids get none). A lookup of a frozen row adds nothing to it."""
        weight = self.LayerNorm.weight
        check_dout(self, "EncoderEmbeddings.backward", "dout", dout, weight.shape[0], weight.data.dtype)
        cache = self.pop_cache()
        dx = self.LayerNorm.backward(self.dropout.backward(dout))  # the sum of the lookups gets dx in each table
        if self.type_vocab_size:
            self.token_type_embeddings.backward(dx)
        dpos = dx if cache.position_frozen is None else np.where(cache.position_frozen[..., None], 0, dx)
        self.position_embeddings.backward(dpos)
        dword = dx if cache.word_frozen is None else np.where(cache.word_frozen[..., None], 0, dx)
        self.word_embeddings.backward(dword)


class EncoderLayerCache(NamedTuple):
    """One forward of a ``PostNormEncoderLayer``: the output's shape (the sublayers keep the rest)."""

    out_shape: Tuple[int, ...]


class PostNormEncoderLayer(Module):
    """h = attention_norm(x + drop_1(attention(x))), out = output_norm(h + drop_2(mlp(h))), as BERT."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, dropout: float = 0.0, layer_norm_eps: float = 1e-12,
                 rng: np.random.Generator, std: float = 0.02, dtype=np.float32, approximate: str = "none"):
        """approximate: the MLP's GELU, "none" (erf, BERT's "gelu") or "tanh" (ALBERT's "gelu_new")."""
        super().__init__()
        name = "PostNormEncoderLayer"
        dtype = check_layer_options(name, rng=rng, dtype=dtype, std=std, eps=layer_norm_eps, d_model=d_model,
                                    n_head=n_head, d_ff=d_ff)
        self.attention = MultiHeadAttention(d_model, n_head, bias=True, rng=rng, dtype=dtype)
        self.drop_1 = Dropout(dropout, rng=rng)
        self.attention_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.mlp = MLP(d_model, d_ff, True, approximate, rng=rng, proj_std=std, dtype=dtype)
        self.drop_2 = Dropout(dropout, rng=rng)
        self.output_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)

    @atomic
    def forward(self, x: np.ndarray, key_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, D) -> (B, T, D); key_padding_mask (B, T) bool, True where a key is padding."""
        op, norm = "PostNormEncoderLayer.forward", self.attention_norm.weight
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, norm.shape[0], norm.data.dtype)
        a = self.attention.forward(x, key_padding_mask=key_padding_mask)  # bidirectional: no causal mask
        h = self.attention_norm.forward(x + self.drop_1.forward(a))
        m = self.mlp.forward(h)
        out = self.output_norm.forward(h + self.drop_2.forward(m))
        self.save_cache(EncoderLayerCache(out_shape=out.shape))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, T, D) -> dx (B, T, D): the forward's lines in reverse."""
        norm = self.attention_norm.weight
        check_dout(self, "PostNormEncoderLayer.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        self.pop_cache()
        dz_2 = self.output_norm.backward(dout)  # into h + drop_2(m)
        dh = dz_2 + self.mlp.backward(self.drop_2.backward(dz_2))  # residual: identity path plus MLP path
        dz_1 = self.attention_norm.backward(dh)  # into x + drop_1(a)
        dx = dz_1 + self.attention.backward(self.drop_1.backward(dz_1))  # residual again
        self.record("dx", dx)
        return dx


class MLMHeadCache(NamedTuple):
    """One forward of an ``MLMHead``: GELU's cache and the tied decoder's product cache."""

    act: object  # GeluCache of the transform
    decoder: object  # LinearCache of logits = t @ W_word^T


class MLMHead(Module):
    """logits = layer_norm(gelu(dense(h))) @ W_word^T + bias, W_word the word table (V, E) passed in (tied).

    d_model: the hidden width D; embed_dim: the table's width E (D for BERT, ALBERT's E).
    """

    def __init__(self, d_model: int, vocab_size: int, embed_dim: Optional[int] = None, *,
                 layer_norm_eps: float = 1e-12, rng: np.random.Generator, std: float = 0.02, dtype=np.float32,
                 approximate: str = "none"):
        """approximate: the head's GELU, "none" (erf) or "tanh" (Hugging Face's "gelu_new")."""
        super().__init__()
        if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
            raise ValueError(f"MLMHead: argument 'approximate' expected 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        embed_dim = d_model if embed_dim is None else embed_dim
        dtype = check_layer_options("MLMHead", rng=rng, dtype=dtype, std=std, eps=layer_norm_eps, d_model=d_model,
                                    vocab_size=vocab_size, embed_dim=embed_dim)
        self.dense = Linear(d_model, embed_dim, True, rng=rng, std=std, dtype=dtype)
        self.layer_norm = LayerNorm(embed_dim, layer_norm_eps, dtype=dtype)
        self.bias = Parameter(np.zeros(vocab_size, dtype))

    def _check_table(self, op: str, word_weight: object) -> None:
        check_float(op, "word_weight", word_weight)
        check_shape(op, "word_weight", word_weight, (self.bias.shape[0], self.layer_norm.weight.shape[0]))
        if word_weight.dtype != self.bias.data.dtype:
            raise ValueError(f"{op}: argument 'word_weight' expected dtype {self.bias.data.dtype} (the parameters'), "
                             f"got {word_weight.dtype}")

    @atomic
    def forward(self, h: np.ndarray, word_weight: np.ndarray) -> np.ndarray:
        """h (..., D), word_weight (V, E) -> logits (..., V)."""
        op = "MLMHead.forward"
        check_features(op, "h", h, self.dense.weight.shape[1], self.dense.weight.data.dtype)
        self._check_table(op, word_weight)
        z = self.dense.forward(h)
        g, act = gelu_forward(z, approximate=self.approximate)  # BERT's exact GELU unless "tanh"
        self.record("act", g)
        t = self.layer_norm.forward(g)
        logits, decoder = linear_forward(t, word_weight, self.bias.data)  # tied decoder + the head's bias
        self.save_cache(MLMHeadCache(act=act, decoder=decoder))
        self.record("logits", logits)
        return logits

    @atomic
    def backward(self, dlogits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """dlogits (..., V) -> (dh (..., D), dW_word (V, E)); the caller adds dW_word into the tied table's grad."""
        op = "MLMHead.backward"
        check_features(op, "dlogits", dlogits, self.bias.shape[0], self.bias.data.dtype)
        check_shape(op, "dlogits", dlogits, self.peek_cache().decoder.x.shape[:-1] + (self.bias.shape[0],))
        cache = self.pop_cache()
        dt, dW_word, dbias = linear_backward(dlogits, cache.decoder)
        self.bias.grad += dbias
        self.record("dbias", dbias)
        dg = self.layer_norm.backward(dt)
        dz = gelu_backward(dg, cache.act)
        dh = self.dense.backward(dz)
        return dh, dW_word


class PoolerCache(NamedTuple):
    """One forward of a ``Pooler``: tanh's output (its derivative is 1 - y^2) and the input's shape."""

    y: np.ndarray  # (B, D)
    in_shape: Tuple[int, ...]  # (B, T, D)


class Pooler(Module):
    """pooled = tanh(dense(h[:, 0])): the first token's hidden state, (B, T, D) -> (B, D)."""

    def __init__(self, d_model: int, *, rng: np.random.Generator, std: float = 0.02, dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("Pooler", rng=rng, dtype=dtype, std=std, d_model=d_model)
        self.dense = Linear(d_model, d_model, True, rng=rng, std=std, dtype=dtype)

    @atomic
    def forward(self, h: np.ndarray) -> np.ndarray:
        op = "Pooler.forward"
        check_float(op, "h", h)
        check_ndim(op, "h", h, 3)
        check_features(op, "h", h, self.dense.weight.shape[1], self.dense.weight.data.dtype)
        y = np.tanh(self.dense.forward(np.ascontiguousarray(h[:, 0])))
        self.save_cache(PoolerCache(y=y, in_shape=h.shape))
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (B, D) -> dh (B, T, D), zero but at the first token."""
        op = "Pooler.backward"
        check_features(op, "dy", dy, self.dense.weight.shape[0], self.dense.weight.data.dtype)
        check_shape(op, "dy", dy, self.peek_cache().y.shape)
        cache = self.pop_cache()
        dz = dy * (1 - cache.y * cache.y)  # tanh' = 1 - tanh^2
        dh = np.zeros(cache.in_shape, dy.dtype)
        dh[:, 0] = self.dense.backward(dz)
        return dh

