"""BART: a post-norm encoder-decoder with learned positions, embedding norms and a tied head.

Each side embeds as x = drop(layernorm_embedding(s E[ids] + P[positions + 2])): E (V, D) the
token table ``shared`` by both sides and the head, s = sqrt(D) when ``scale_embedding`` (else
1), P a learned table of ``max_position + 2`` rows per side (BART's first two rows are never
looked up: position p reads row p + 2). The layers are ``npformer.nn.seq2seq``'s post-norm
encoder and decoder layers with the exact (erf) GELU. The logits are h E^T + final_logits_bias.

As ``torch.nn.Embedding(padding_idx=pad)``, a lookup of the pad id adds nothing to its row's
gradient (the head still does). ``final_logits_bias`` (1, V) is a parameter here (trained, its
gradient the sum of dlogits over positions); Hugging Face keeps it as a zero buffer it never
trains, and checkpoints store it, so it loads and saves with the weights.

Dropout: ``dropout`` after the embeddings and on every residual branch. Hugging Face's
``attention_dropout`` and ``activation_dropout`` (on the attention probabilities and inside the
feed-forward) are not part of this model.

Read top to bottom: ``forward`` encodes then decodes; ``backward`` walks the decoder down, hands the
memory's gradient to the encoder and walks it down too.

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); logits (B, T, V).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache
from ..nn.layers import Dropout, Embedding, LayerNorm
from ..nn.module import Module, ModuleList, Parameter, atomic
from ..nn.seq2seq import (IGNORE_INDEX, PostNormDecoderLayer, Seq2SeqEncoderLayer, check_decoder_caches,  # noqa: F401
                          check_ids, check_memory, check_padding_mask, check_seq2seq_inputs, stack_caches)
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_real
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward

POSITION_OFFSET = 2  # BART's learned positions: position p is row p + 2 of the table


@dataclass
class BartConfig:
    vocab_size: int = 64
    max_position: int = 128  # the longest source or target (each table has max_position + 2 rows)
    n_layer: int = 2  # encoder layers
    n_decoder_layer: Optional[int] = None  # decoder layers (None: n_layer, set when the config is made)
    n_head: int = 4
    d_model: int = 64
    d_ff: Optional[int] = None  # feed-forward width (None: 4 d_model, set when the config is made)
    dropout: float = 0.1
    label_smoothing: float = 0.0
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    init_std: float = 0.02
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        op = "BartConfig"
        for name in ("vocab_size", "max_position", "n_layer", "n_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        for name in ("n_decoder_layer", "d_ff"):
            if getattr(self, name) is not None:
                setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        self.n_decoder_layer = self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer  # resolved
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        if self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model}, "
                             f"got {self.n_head}")
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.label_smoothing = check_real(op, "label_smoothing", self.label_smoothing, lo=0.0, hi=1.0)
        self.layer_norm_eps = check_real(op, "layer_norm_eps", self.layer_norm_eps, lo=0.0)
        self.init_std = check_real(op, "init_std", self.init_std, lo=0.0)
        self.scale_embedding = check_bool(op, "scale_embedding", self.scale_embedding)
        for name in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
            setattr(self, name, check_count(op, name, getattr(self, name), 0, self.vocab_size - 1))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    @property
    def decoder_layers(self) -> int:
        return self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def to_dict(self) -> dict:
        return asdict(self)


class EmbedCache(NamedTuple):
    """One side's embedding: the ids (their pad lookups add nothing to the table)."""

    ids: np.ndarray  # (B, L)


class BartSide(Module):
    """One side's own parameters (encoder or decoder): positions, the embedding norm, the layers."""

    def __init__(self, cfg: BartConfig, n_layer: int, layer_cls, rng: np.random.Generator):
        super().__init__()
        dtype, D = np.dtype(cfg.dtype), cfg.d_model
        self.embed_positions = Embedding(cfg.max_position + POSITION_OFFSET, D, rng=rng, std=cfg.init_std,
                                         dtype=dtype)
        self.layernorm_embedding = LayerNorm(D, cfg.layer_norm_eps, dtype=dtype)
        self.drop = Dropout(cfg.dropout, rng=rng)
        self.layers = ModuleList(layer_cls(D, cfg.n_head, cfg.ffn_dim, dropout=cfg.dropout,
                                           layer_norm_eps=cfg.layer_norm_eps, activation="gelu", rng=rng,
                                           std=cfg.init_std, dtype=dtype) for _ in range(n_layer))


class BartCache(NamedTuple):
    """One training forward: the tied head's and the loss's op caches."""

    head: LinearCache  # logits = h @ E^T + final_logits_bias
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets


class Bart(Module):
    def __init__(self, cfg: BartConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, BartConfig):
            raise TypeError(f"Bart: argument 'cfg' expected a BartConfig, got {type(cfg).__name__}")
        check_count("Bart", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init, then dropout masks
        dtype = np.dtype(cfg.dtype)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, std=cfg.init_std, dtype=dtype)  # + the head
        self.encoder = BartSide(cfg, cfg.n_layer, Seq2SeqEncoderLayer, rng)
        self.decoder = BartSide(cfg, cfg.decoder_layers, PostNormDecoderLayer, rng)
        self.final_logits_bias = Parameter(np.zeros((1, cfg.vocab_size), dtype))

    # -- the two halves ----------------------------------------------------------------------------
    def _embed(self, side: BartSide, ids: np.ndarray, start: int) -> np.ndarray:
        """drop(layernorm_embedding(s E[ids] + P[start + 2 : start + 2 + L])): (B, L) -> (B, L, D)."""
        tok = self.shared.forward(ids)
        pos = side.embed_positions.forward(np.arange(start, start + ids.shape[1]) + POSITION_OFFSET)  # (L, D)
        x = side.drop.forward(side.layernorm_embedding.forward(tok * tok.dtype.type(self.embed_scale) + pos))
        side.save_cache(EmbedCache(ids=ids))
        return x

    def _embed_backward(self, side: BartSide, dx: np.ndarray) -> None:
        """The tables' gradients of one ``_embed``; a pad lookup adds nothing to the pad row."""
        ids = side.pop_cache().ids
        dsum = side.layernorm_embedding.backward(side.drop.backward(dx))  # into s E[ids] + P[...]
        side.embed_positions.backward(dsum.sum(axis=0))  # one row per position, shared over the batch
        dtok = dsum * dsum.dtype.type(self.embed_scale)
        self.shared.backward(np.where((ids == self.cfg.pad_token_id)[..., None], 0, dtok))

    def _encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray]) -> np.ndarray:
        x = self._embed(self.encoder, src_ids, 0)
        for layer in self.encoder.layers:
            x = layer.forward(x, key_padding_mask=src_padding_mask)
        self.record("memory", x)
        return x

    def _decode(self, tgt_ids: np.ndarray, memory: np.ndarray, src_padding_mask: Optional[np.ndarray],
                caches: Optional[List[Tuple[KVCache, KVCache]]], start: int) -> np.ndarray:
        y = self._embed(self.decoder, tgt_ids, start)
        for i, layer in enumerate(self.decoder.layers):
            self_c, cross_c = (None, None) if caches is None else caches[i]
            y = layer.forward(y, memory, memory_padding_mask=src_padding_mask, self_cache=self_c, cross_cache=cross_c)
        return y

    def _head(self, h: np.ndarray) -> Tuple[np.ndarray, LinearCache]:
        """logits = h E^T + final_logits_bias: (B, T, D) -> (B, T, V)."""
        return linear_forward(h, self.shared.weight.data, self.final_logits_bias.data[0])

    # -- training -----------------------------------------------------------------------------------
    @atomic
    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """src_ids (B, S), tgt_ids (B, T) -> logits (B, T, V) and the mean cross entropy of targets (B, T)
        (in [0, V) or -100, ignored) when given. src_padding_mask (B, S) bool, True = padding."""
        cfg = self.cfg
        check_seq2seq_inputs("Bart.forward", src_ids, tgt_ids, targets, src_padding_mask, cfg.vocab_size,
                             max_src_len=cfg.max_position, max_tgt_len=cfg.max_position)
        memory = self._encode(src_ids, src_padding_mask)
        h = self._decode(tgt_ids, memory, src_padding_mask, None, 0)
        logits, head = self._head(h)
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(
            logits, targets, label_smoothing=cfg.label_smoothing)
        self.save_cache(BartCache(head=head, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss: decoder down, then encoder down."""
        if self.peek_cache().loss is None:
            raise RuntimeError("Bart.backward: the matching forward had no targets, so there is no loss to "
                               "differentiate")
        cache = self.pop_cache()
        dlogits = cross_entropy_backward(np.asarray(1.0, cache.head.x.dtype), cache.loss)
        self.record("dlogits", dlogits)
        dy, dW_head, dbias = linear_backward(dlogits, cache.head)
        self.final_logits_bias.grad += dbias[None]
        self.shared.weight.grad += dW_head  # tied: the head's gradient joins the table's
        dmemory = None
        for layer in reversed(self.decoder.layers):
            dy, dmem = layer.backward(dy)
            dmemory = dmem if dmemory is None else dmemory + dmem  # every layer reads the same memory
        self._embed_backward(self.decoder, dy)  # the target lookup came second: its gradient first
        dx = dmemory
        for layer in reversed(self.encoder.layers):
            dx = layer.backward(dx)
        self._embed_backward(self.encoder, dx)

    # -- inference -----------------------------------------------------------------------------------
    def _check_eval(self, op: str) -> None:
        if self.training:
            raise RuntimeError(f"{op}: inference only; call .eval() first")

    def encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """src_ids (B, S) -> memory (B, S, D); eval mode only."""
        op = "Bart.encode"
        self._check_eval(op)
        B, S = check_ids(op, "src_ids", src_ids, self.cfg.vocab_size)
        check_padding_mask(op, src_padding_mask, (B, S))
        if S > self.cfg.max_position:
            raise ValueError(f"{op}: argument 'src_ids' expected at most {self.cfg.max_position} positions, got {S}")
        return self._encode(src_ids, src_padding_mask)

    def make_decoder_caches(self, batch: int, max_len: Optional[int] = None,
                            src_len: Optional[int] = None) -> List[Tuple[KVCache, KVCache]]:
        """(self cache for max_len target positions, cross cache for src_len source positions) per decoder layer."""
        op, P = "Bart.make_decoder_caches", self.cfg.max_position
        batch = check_count(op, "batch", batch, 1)
        max_len = P if max_len is None else check_count(op, "max_len", max_len, 1, P)
        src_len = P if src_len is None else check_count(op, "src_len", src_len, 1, P)
        return stack_caches(self.decoder.layers, batch, max_len, src_len)

    def decode(self, tgt_ids: np.ndarray, memory: np.ndarray, caches: Optional[List[Tuple[KVCache, KVCache]]] = None,
               *, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """tgt_ids (B, T), memory (B, S, D) -> logits (B, T, V); eval mode only. With caches, tgt_ids continue
        the cached sequence (positions from the self caches' length)."""
        op, cfg = "Bart.decode", self.cfg
        self._check_eval(op)
        B, T = check_ids(op, "tgt_ids", tgt_ids, cfg.vocab_size)
        S = check_memory(op, memory, B, cfg.d_model, np.dtype(cfg.dtype), src_padding_mask, cfg.max_position)
        start = 0
        if caches is not None:
            start = check_decoder_caches(op, caches, n_layer=cfg.decoder_layers, batch=B, src_len=S, n_head=cfg.n_head,
                                         head_dim=cfg.d_model // cfg.n_head, dtype=np.dtype(cfg.dtype),
                                         training=self.training)
            if start + T > caches[0][0].max_len:
                raise ValueError(f"{op}: argument 'tgt_ids' expected at most {caches[0][0].max_len - start} "
                                 f"positions (the caches hold {caches[0][0].max_len}, {start} used), got {T}")
        check_seq2seq_inputs(op, None, tgt_ids, None, None, cfg.vocab_size, max_tgt_len=cfg.max_position,
                             tgt_start=start)
        h = self._decode(tgt_ids, memory, src_padding_mask, caches, start)
        return self._head(h)[0]

    def astype(self, dtype) -> "Bart":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.shared.weight.data.dtype.name)
        return self
