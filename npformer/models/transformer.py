"""The original Transformer ("Attention Is All You Need"): a post-norm encoder-decoder.

One token table E (V, D) is shared by the source, the target and the output head. Each side
embeds as x = drop(sqrt(D) E[ids] + PE[positions]), PE the fixed sinusoidal table (POS.1);
encoder layers are post-norm self attention and a ReLU feed-forward, decoder layers add a
causal mask and cross attention to the encoder's output (``npformer.nn.seq2seq``). The logits
are h E^T; the loss is the label-smoothed cross entropy (CE.3), smoothing
``label_smoothing`` (0.1 in the paper). The learning-rate schedule of the paper is
``npformer.optim.schedules.noam``.

The steps (``forward`` encodes then decodes; ``backward`` walks the decoder down, hands the
memory's gradient to the encoder and walks it down too; ``encode``, ``make_decoder_caches``,
``decode``) are ``npformer.nn.seq2seq.EncoderDecoder``'s, shared with BART; this file holds the
embeddings and the head.

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); logits (B, T, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from ..nn.layers import Dropout, Embedding
from ..nn.module import ModuleList, atomic
from ..nn.seq2seq import (IGNORE_INDEX, EncoderDecoder, EncoderDecoderConfig, PostNormDecoderLayer,  # noqa: F401
                          Seq2SeqEncoderLayer)
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.positional import sinusoidal_table


@dataclass
class TransformerConfig(EncoderDecoderConfig):
    max_position: int = 256  # rows of the sinusoidal table: the longest source or target
    label_smoothing: float = 0.1  # the paper's
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 2  # a bos id
    dtype: str = "float32"

    def __post_init__(self) -> None:
        op = "TransformerConfig"
        self._check_sizes(op)
        if self.d_model % 2:
            raise ValueError(f"{op}: argument 'd_model' expected an even size (the sinusoidal table pairs "
                             f"sin and cos), got {self.d_model}")
        self._check_rates(op)
        self._check_token_ids_and_dtype(op, ("pad_token_id", "eos_token_id", "decoder_start_token_id"))


class Transformer(EncoderDecoder):
    name = "Transformer"
    config_type = TransformerConfig

    @atomic
    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """See ``EncoderDecoder._forward``: embeddings, encoder, decoder, head, loss."""
        return self._forward(src_ids, tgt_ids, targets, src_padding_mask=src_padding_mask)

    @atomic
    def backward(self) -> None:
        """See ``EncoderDecoder._backward``: the head, the decoder down, then the encoder down."""
        self._backward()

    def __init__(self, cfg: TransformerConfig, seed: int = 0):
        super().__init__(cfg, seed)
        rng = self.rng
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

    # -- the hooks of EncoderDecoder -------------------------------------------------------------------
    def _layers(self, side: str) -> ModuleList:
        return getattr(self, f"{side}_layers")

    def _embed(self, side: str, ids: np.ndarray, start: int) -> np.ndarray:
        """drop(sqrt(D) E[ids] + PE[start : start + L]): (B, L) -> (B, L, D)."""
        tok = self.embed_tokens.forward(ids)
        drop = getattr(self, f"{side}_drop")
        return drop.forward(tok * tok.dtype.type(self.embed_scale) + self.pe[start:start + ids.shape[1]])

    def _embed_backward(self, side: str, dx: np.ndarray) -> None:
        """The table's gradient of one ``_embed`` (the sinusoidal table is constant)."""
        dtok = getattr(self, f"{side}_drop").backward(dx) * dx.dtype.type(self.embed_scale)
        self.embed_tokens.backward(dtok)

    def _head(self, h: np.ndarray) -> Tuple[np.ndarray, LinearCache]:
        """The tied head: logits = h E^T, (B, T, D) -> (B, T, V)."""
        return linear_forward(h, self.embed_tokens.weight.data)

    def _head_backward(self, dlogits: np.ndarray, cache: LinearCache) -> np.ndarray:
        dy, dW_head, _ = linear_backward(dlogits, cache)
        self.embed_tokens.weight.grad += dW_head  # tied: the head's gradient joins the table's
        return dy

    def astype(self, dtype) -> "Transformer":
        """Convert the parameters to float32 or float64; the config and the sinusoidal table follow."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.embed_tokens.weight.data.dtype.name)
        self.pe = self.pe.astype(self.cfg.dtype)
        return self
