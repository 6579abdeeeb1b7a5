"""A torch BART with the same structure and parameter names as ``npformer.models.bart``.

The whole-model oracle (float64, same weights, same dropout masks) and the reference of the
divergence finder. Learned positions read row p + 2; each side's embedding is LayerNorm'd; the
pad id's row gets no gradient from lookups (``F.embedding(padding_idx=...)``); the head is the
shared table's transpose plus ``final_logits_bias``. Layers: the post-norm encoder and decoder
layers of the Transformer twin, with the exact GELU.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Table, TwinLayerNorm, drop, record
from .transformer import TwinDecoderLayer, TwinEncoderLayer, TwinSeq2Seq, seq2seq_loss, set_call


class TwinSide(nn.Module):
    def __init__(self, max_position, d_model, eps, layers):
        super().__init__()
        self.embed_positions = Table(max_position + 2, d_model)
        self.layernorm_embedding = TwinLayerNorm(d_model, eps)
        self.layers = nn.ModuleList(layers)


class TwinBart(TwinSeq2Seq):
    def __init__(self, vocab_size, max_position, n_layer, n_head, d_model, n_decoder_layer=None, d_ff=None,
                 dropout=0.0, label_smoothing=0.0, layer_norm_eps=1e-5, scale_embedding=False, pad_token_id=1, **_):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        n_decoder_layer = n_layer if n_decoder_layer is None else n_decoder_layer
        args = (d_model, n_head, d_ff, layer_norm_eps, "gelu", dropout)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, vocab_size))
        self.shared = Table(vocab_size, d_model)
        self.encoder = TwinSide(max_position, d_model, layer_norm_eps,
                                [TwinEncoderLayer(*args) for _ in range(n_layer)])
        self.decoder = TwinSide(max_position, d_model, layer_norm_eps,
                                [TwinDecoderLayer(*args) for _ in range(n_decoder_layer)])
        self.scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.p, self.label_smoothing, self.pad = dropout, label_smoothing, pad_token_id
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []

    def _embed(self, side: TwinSide, ids, name: str, masks):
        tok = F.embedding(ids, self.shared.weight, padding_idx=self.pad) * self.scale
        pos = side.embed_positions.weight[2:2 + ids.shape[1]]
        return drop(side.layernorm_embedding(tok + pos), masks, f"{name}.drop", self.p, self.training)

    def forward(self, src_ids, tgt_ids, targets=None, src_padding_mask=None, masks=None):
        rec = self.recorder if torch.is_grad_enabled() else None
        self.name_layers()
        set_call(list(self.encoder.layers) + list(self.decoder.layers), masks, src_padding_mask)
        x = self._embed(self.encoder, src_ids, "encoder", masks)
        for layer in self.encoder.layers:
            x = layer(x)
        record(rec, "memory", x)
        y = self._embed(self.decoder, tgt_ids, "decoder", masks)
        for layer in self.decoder.layers:
            y = layer(y, x)
        logits = y @ self.shared.weight.T + self.final_logits_bias
        record(rec, "logits", logits, "dlogits")
        loss = None if targets is None else seq2seq_loss(logits, targets, self.label_smoothing)
        return logits, loss
