"""The original Transformer ("Attention Is All You Need"): a post-norm encoder-decoder.

One token table E (V, D) is shared by the source, the target and the output head. Each side
embeds as x = drop(sqrt(D) E[ids] + PE[positions]), PE the fixed sinusoidal table (POS.1);
encoder layers are post-norm self attention and a ReLU feed-forward, decoder layers add a
causal mask and cross attention to the encoder's output (``npformer.nn.seq2seq``). The logits
are h E^T; the loss is the label-smoothed cross entropy (CE.3), smoothing
``label_smoothing`` (0.1 in the paper). The learning-rate schedule of the paper is
``npformer.optim.schedules.noam``.

Read top to bottom: ``forward`` encodes then decodes; ``backward`` walks the decoder down,
hands the memory's gradient to the encoder and walks it down too, one line per layer.

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); logits (B, T, V).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache
from ..nn.layers import Dropout, Embedding
from ..nn.module import Module, ModuleList, atomic
from ..nn.seq2seq import (IGNORE_INDEX, PostNormDecoderLayer, Seq2SeqEncoderLayer, check_decoder_caches,  # noqa: F401
                          check_ids, check_memory, check_padding_mask, check_seq2seq_inputs, stack_caches)
from ..ops._checks import MAX_POSITION, check_count, check_real
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.positional import sinusoidal_table


@dataclass
class TransformerConfig:
    vocab_size: int = 64
    max_position: int = 256  # rows of the sinusoidal table: the longest source or target
    n_layer: int = 2  # encoder layers
    n_decoder_layer: Optional[int] = None  # decoder layers (None: n_layer, set when the config is made)
    n_head: int = 4
    d_model: int = 64
    d_ff: Optional[int] = None  # feed-forward width (None: 4 d_model, set when the config is made)
    dropout: float = 0.1
    label_smoothing: float = 0.1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 2  # a bos id
    dtype: str = "float32"

    def __post_init__(self) -> None:
        op = "TransformerConfig"
        for name in ("vocab_size", "max_position", "n_layer", "n_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.n_decoder_layer is not None:
            self.n_decoder_layer = check_count(op, "n_decoder_layer", self.n_decoder_layer, 1, MAX_POSITION)
        if self.d_ff is not None:
            self.d_ff = check_count(op, "d_ff", self.d_ff, 1, MAX_POSITION)
        self.n_decoder_layer = self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer  # resolved
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        if self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model}, "
                             f"got {self.n_head}")
        if self.d_model % 2:
            raise ValueError(f"{op}: argument 'd_model' expected an even size (the sinusoidal table pairs "
                             f"sin and cos), got {self.d_model}")
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.label_smoothing = check_real(op, "label_smoothing", self.label_smoothing, lo=0.0, hi=1.0)
        self.layer_norm_eps = check_real(op, "layer_norm_eps", self.layer_norm_eps, lo=0.0)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
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


class TransformerCache(NamedTuple):
    """One training forward: the tied head's and the loss's op caches."""

    head: LinearCache  # logits = h @ E^T
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets


class Transformer(Module):
    def __init__(self, cfg: TransformerConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise TypeError(f"Transformer: argument 'cfg' expected a TransformerConfig, got {type(cfg).__name__}")
        check_count("Transformer", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init, then dropout masks
        dtype, D = np.dtype(cfg.dtype), cfg.d_model
        self.embed_scale = math.sqrt(D)
        self.embed_tokens = Embedding(cfg.vocab_size, D, rng=rng, std=D ** -0.5, dtype=dtype)  # shared, and the head
        self.pe = sinusoidal_table(cfg.max_position, D, dtype=dtype)  # (P, D) a constant (POS.1)
        self.encoder_drop = Dropout(cfg.dropout, rng=rng)
        layer = dict(dropout=cfg.dropout, layer_norm_eps=cfg.layer_norm_eps, activation="relu", rng=rng, dtype=dtype)
        self.encoder_layers = ModuleList(Seq2SeqEncoderLayer(D, cfg.n_head, cfg.ffn_dim, **layer)
                                         for _ in range(cfg.n_layer))
        self.decoder_drop = Dropout(cfg.dropout, rng=rng)
        self.decoder_layers = ModuleList(PostNormDecoderLayer(D, cfg.n_head, cfg.ffn_dim, **layer)
                                         for _ in range(cfg.decoder_layers))

    # -- the two halves ----------------------------------------------------------------------------
    def _embed(self, ids: np.ndarray, start: int, drop: Dropout) -> np.ndarray:
        """drop(sqrt(D) E[ids] + PE[start : start + L]): (B, L) -> (B, L, D)."""
        tok = self.embed_tokens.forward(ids)
        return drop.forward(tok * tok.dtype.type(self.embed_scale) + self.pe[start:start + ids.shape[1]])

    def _embed_backward(self, dx: np.ndarray, drop: Dropout) -> None:
        """The table's gradient of one ``_embed`` (the sinusoidal table is constant)."""
        dtok = drop.backward(dx) * dx.dtype.type(self.embed_scale)
        self.embed_tokens.backward(dtok)

    def _encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray]) -> np.ndarray:
        x = self._embed(src_ids, 0, self.encoder_drop)
        for layer in self.encoder_layers:
            x = layer.forward(x, key_padding_mask=src_padding_mask)
        self.record("memory", x)
        return x

    def _decode(self, tgt_ids: np.ndarray, memory: np.ndarray, src_padding_mask: Optional[np.ndarray],
                caches: Optional[List[Tuple[KVCache, KVCache]]], start: int) -> np.ndarray:
        y = self._embed(tgt_ids, start, self.decoder_drop)
        for i, layer in enumerate(self.decoder_layers):
            self_c, cross_c = (None, None) if caches is None else caches[i]
            y = layer.forward(y, memory, memory_padding_mask=src_padding_mask, self_cache=self_c, cross_cache=cross_c)
        return y

    # -- training -----------------------------------------------------------------------------------
    @atomic
    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """src_ids (B, S), tgt_ids (B, T) -> logits (B, T, V) and the label-smoothed mean cross entropy of
        targets (B, T) (in [0, V) or -100, ignored) when given. src_padding_mask (B, S) bool, True = padding."""
        cfg = self.cfg
        check_seq2seq_inputs("Transformer.forward", src_ids, tgt_ids, targets, src_padding_mask, cfg.vocab_size,
                             max_src_len=cfg.max_position, max_tgt_len=cfg.max_position)
        memory = self._encode(src_ids, src_padding_mask)
        h = self._decode(tgt_ids, memory, src_padding_mask, None, 0)
        logits, head = linear_forward(h, self.embed_tokens.weight.data)  # tied head: h E^T
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(
            logits, targets, label_smoothing=cfg.label_smoothing)
        self.save_cache(TransformerCache(head=head, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss: decoder down, then encoder down."""
        if self.peek_cache().loss is None:
            raise RuntimeError("Transformer.backward: the matching forward had no targets, so there is no loss "
                               "to differentiate")
        cache = self.pop_cache()
        dlogits = cross_entropy_backward(np.asarray(1.0, cache.head.x.dtype), cache.loss)
        self.record("dlogits", dlogits)
        dy, dW_head, _ = linear_backward(dlogits, cache.head)
        self.embed_tokens.weight.grad += dW_head  # tied: the head's gradient joins the table's
        dmemory = None
        for layer in reversed(self.decoder_layers):
            dy, dmem = layer.backward(dy)
            dmemory = dmem if dmemory is None else dmemory + dmem  # every layer reads the same memory
        self._embed_backward(dy, self.decoder_drop)  # the target lookup came second: its gradient first
        dx = dmemory
        for layer in reversed(self.encoder_layers):
            dx = layer.backward(dx)
        self._embed_backward(dx, self.encoder_drop)

    # -- inference -----------------------------------------------------------------------------------
    def _check_eval(self, op: str) -> None:
        if self.training:
            raise RuntimeError(f"{op}: inference only; call .eval() first")

    def encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """src_ids (B, S) -> memory (B, S, D); eval mode only."""
        op = "Transformer.encode"
        self._check_eval(op)
        B, S = check_ids(op, "src_ids", src_ids, self.cfg.vocab_size)
        check_padding_mask(op, src_padding_mask, (B, S))
        if S > self.cfg.max_position:
            raise ValueError(f"{op}: argument 'src_ids' expected at most {self.cfg.max_position} positions, got {S}")
        return self._encode(src_ids, src_padding_mask)

    def make_decoder_caches(self, batch: int, max_len: Optional[int] = None,
                            src_len: Optional[int] = None) -> List[Tuple[KVCache, KVCache]]:
        """(self cache for max_len target positions, cross cache for src_len source positions) per decoder layer."""
        op, P = "Transformer.make_decoder_caches", self.cfg.max_position
        batch = check_count(op, "batch", batch, 1)
        max_len = P if max_len is None else check_count(op, "max_len", max_len, 1, P)
        src_len = P if src_len is None else check_count(op, "src_len", src_len, 1, P)
        return stack_caches(self.decoder_layers, batch, max_len, src_len)

    def decode(self, tgt_ids: np.ndarray, memory: np.ndarray, caches: Optional[List[Tuple[KVCache, KVCache]]] = None,
               *, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """tgt_ids (B, T), memory (B, S, D) -> logits (B, T, V); eval mode only. With caches, tgt_ids continue
        the cached sequence (positions from the self caches' length)."""
        op, cfg = "Transformer.decode", self.cfg
        self._check_eval(op)
        check_seq2seq_inputs(op, None, tgt_ids, None, None, cfg.vocab_size)
        B = tgt_ids.shape[0]
        S = check_memory(op, memory, B, cfg.d_model, np.dtype(cfg.dtype), src_padding_mask, cfg.max_position)
        start = 0
        if caches is not None:
            start = check_decoder_caches(op, caches, n_layer=cfg.decoder_layers, batch=B, src_len=S, n_head=cfg.n_head,
                                         head_dim=cfg.d_model // cfg.n_head, dtype=np.dtype(cfg.dtype),
                                         training=self.training)
            if start + tgt_ids.shape[1] > caches[0][0].max_len:
                raise ValueError(f"{op}: argument 'tgt_ids' expected at most {caches[0][0].max_len - start} "
                                 f"positions (the caches hold {caches[0][0].max_len}, {start} used), "
                                 f"got {tgt_ids.shape[1]}")
        check_seq2seq_inputs(op, None, tgt_ids, None, None, cfg.vocab_size, max_tgt_len=cfg.max_position,
                             tgt_start=start)
        h = self._decode(tgt_ids, memory, src_padding_mask, caches, start)
        logits, _ = linear_forward(h, self.embed_tokens.weight.data)
        return logits

    def astype(self, dtype) -> "Transformer":
        """Convert the parameters to float32 or float64; the config and the sinusoidal table follow."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.embed_tokens.weight.data.dtype.name)
        self.pe = self.pe.astype(self.cfg.dtype)
        return self
