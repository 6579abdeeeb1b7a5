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

The steps shared with the original Transformer (``forward`` encodes then decodes; ``backward`` walks
the decoder down, hands the memory's gradient to the encoder and walks it down too; ``encode``,
``make_decoder_caches``, ``decode``) are ``npformer.nn.seq2seq.EncoderDecoder``'s; this file holds
BART's embeddings and head.

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); logits (B, T, V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..nn.layers import Dropout, Embedding, LayerNorm
from ..nn.module import Module, ModuleList, Parameter, atomic
from ..nn.seq2seq import (IGNORE_INDEX, EncoderDecoder, EncoderDecoderConfig, PostNormDecoderLayer,  # noqa: F401
                          Seq2SeqEncoderLayer)
from ..ops._checks import check_bool, check_real
from ..ops.linear import LinearCache, linear_backward, linear_forward

POSITION_OFFSET = 2  # BART's learned positions: position p is row p + 2 of the table


@dataclass
class BartConfig(EncoderDecoderConfig):
    max_position: int = 128  # the longest source or target (each table has max_position + 2 rows)
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    init_std: float = 0.02
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        op = "BartConfig"
        self._check_sizes(op)
        self._check_rates(op)
        self.init_std = check_real(op, "init_std", self.init_std, lo=0.0)
        self.scale_embedding = check_bool(op, "scale_embedding", self.scale_embedding)
        self._check_token_ids_and_dtype(op, ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id"))


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


class Bart(EncoderDecoder):
    name = "Bart"
    config_type = BartConfig

    @atomic
    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """See ``EncoderDecoder._forward``: embeddings, encoder, decoder, head, loss."""
        return self._forward(src_ids, tgt_ids, targets, src_padding_mask=src_padding_mask)

    @atomic
    def backward(self) -> None:
        """See ``EncoderDecoder._backward``: the head, the decoder down, then the encoder down."""
        self._backward()

    def __init__(self, cfg: BartConfig, seed: int = 0):
        super().__init__(cfg, seed)
        rng = self.rng
        dtype = np.dtype(cfg.dtype)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, std=cfg.init_std, dtype=dtype)  # + the head
        self.encoder = BartSide(cfg, cfg.n_layer, Seq2SeqEncoderLayer, rng)
        self.decoder = BartSide(cfg, cfg.decoder_layers, PostNormDecoderLayer, rng)
        self.final_logits_bias = Parameter(np.zeros((1, cfg.vocab_size), dtype))

    # -- the hooks of EncoderDecoder -------------------------------------------------------------------
    def _layers(self, side: str) -> ModuleList:
        return getattr(self, side).layers

    def _embed(self, side: str, ids: np.ndarray, start: int) -> np.ndarray:
        """drop(layernorm_embedding(s E[ids] + P[start + 2 : start + 2 + L])): (B, L) -> (B, L, D)."""
        part = getattr(self, side)
        tok = self.shared.forward(ids)
        pos = part.embed_positions.forward(np.arange(start, start + ids.shape[1]) + POSITION_OFFSET)  # (L, D)
        x = part.drop.forward(part.layernorm_embedding.forward(tok * tok.dtype.type(self.embed_scale) + pos))
        part.save_cache(EmbedCache(ids=ids))
        return x

    def _embed_backward(self, side: str, dx: np.ndarray) -> None:
        """The tables' gradients of one ``_embed``; a pad lookup adds nothing to the pad row."""
        part = getattr(self, side)
        ids = part.pop_cache().ids
        dsum = part.layernorm_embedding.backward(part.drop.backward(dx))  # into s E[ids] + P[...]
        part.embed_positions.backward(dsum.sum(axis=0))  # one row per position, shared over the batch
        dtok = dsum * dsum.dtype.type(self.embed_scale)
        self.shared.backward(np.where((ids == self.cfg.pad_token_id)[..., None], 0, dtok))

    def _head(self, h: np.ndarray) -> Tuple[np.ndarray, LinearCache]:
        """logits = h E^T + final_logits_bias: (B, T, D) -> (B, T, V)."""
        return linear_forward(h, self.shared.weight.data, self.final_logits_bias.data[0])

    def _head_backward(self, dlogits: np.ndarray, cache: LinearCache) -> np.ndarray:
        dy, dW_head, dbias = linear_backward(dlogits, cache)
        self.final_logits_bias.grad += dbias[None]
        self.shared.weight.grad += dW_head  # tied: the head's gradient joins the table's
        return dy

    def astype(self, dtype) -> "Bart":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.shared.weight.data.dtype.name)
        return self
