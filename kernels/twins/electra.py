"""A torch ELECTRA (generator, discriminator, and the pair sharing embeddings) with npformer's names.

The oracle of ``npformer.models.electra``: E-wide embeddings, ``embeddings_project`` E -> D when
E != D, the BERT twin's encoder layers; the generator's head narrows D -> E before the tied
decoder; the discriminator's head is dense D -> D, the exact GELU, dense_prediction D -> 1.
The discriminator's loss is torch's ``binary_cross_entropy_with_logits`` over the tokens the
attention mask keeps. The pair takes the corrupted ids npformer sampled (the samples are not
differentiated through in either).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bert import TwinAttention, TwinEmbeddings, TwinEncoderLayer
from .common import TwinModel
from .encoder import (Calls, TwinMLMHead, TwinMLP, active_recorder, gelu, mlm_loss, narrow_mlm_head, record,
                      record_common, record_table_grads, store_grad)


class TwinDiscriminatorHead(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.dense_prediction = nn.Linear(d_model, 1)
        self.recorder = None
        self.path = ""

    def forward(self, h):
        g = gelu(self.dense(h))
        if self.recorder is not None and g.requires_grad:
            self.recorder[f"{self.path}.act"] = g.detach().numpy().copy()
        logits = self.dense_prediction(g)[..., 0]
        if self.recorder is not None and logits.requires_grad:
            self.recorder[f"{self.path}.logits"] = logits.detach().numpy().copy()
        return logits


class _TwinElectraEncoder(TwinModel):
    recording_modules = (TwinAttention, TwinMLP, TwinMLMHead, TwinDiscriminatorHead)

    def __init__(self, vocab_size=65, max_position=128, type_vocab_size=2, embedding_size=128, n_layer=2, n_head=4,
                 d_model=128, d_ff=512, dropout=0.1, layer_norm_eps=1e-12, pad_token_id=0, **_):
        super().__init__()
        self.c = c = dict(vocab_size=vocab_size, max_position=max_position, type_vocab_size=type_vocab_size,
                          d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, layer_norm_eps=layer_norm_eps,
                          pad_token_id=pad_token_id, position_padding_idx=None)
        self.embedding_size = embedding_size
        self.embeddings = TwinEmbeddings(dict(c, d_model=embedding_size))
        if embedding_size != d_model:
            self.embeddings_project = nn.Linear(embedding_size, d_model)
        self.layers = nn.ModuleList(TwinEncoderLayer(c) for _ in range(n_layer))
        self.recorder: Optional[Calls] = None
        self._hooks = []

    def encode(self, ids, types, attention_mask, masks, prefix=""):
        rec = active_recorder(self)
        pad = None if attention_mask is None else attention_mask == 0
        x = self.embeddings(ids, types, masks, rec)
        record(rec, f"{prefix}embeddings.out", x)
        if hasattr(self, "embeddings_project"):
            x = self.embeddings_project(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, pad, masks, f"{prefix}layers.{i}")
            record(rec, f"{prefix}layers.{i}.out", x)
        return x

    def start_recording(self) -> Calls:
        self.stop_recording()
        rec = Calls()
        self.recorder = rec
        record_common(self, rec, (TwinEncoderLayer,))
        for m in self.modules():
            if isinstance(m, TwinMLMHead):
                self._hooks.append(m.bias.register_hook(store_grad(rec, f"{m.path}.dbias")))
        record_table_grads(self, rec, self.embeddings)
        return rec


class TwinElectraGenerator(_TwinElectraEncoder):
    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.generator_predictions = narrow_mlm_head(self.c, self.embedding_size)

    def forward(self, ids, token_type_ids=None, attention_mask=None, mlm_labels=None, masks=None, prefix=""):
        """-> (mlm_logits (B, T, V), loss or None), as ``ElectraGenerator.forward``."""
        x = self.encode(ids, token_type_ids, attention_mask, masks, prefix)
        logits = self.generator_predictions(x, self.embeddings.word_embeddings.weight)
        if self.recorder is not None and logits.requires_grad:
            logits.register_hook(store_grad(self.recorder, f"{prefix}dmlm_logits"))
        loss = None
        if mlm_labels is not None:
            loss = mlm_loss(logits, mlm_labels)
        return logits, loss


class TwinElectraDiscriminator(_TwinElectraEncoder):
    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.discriminator_predictions = TwinDiscriminatorHead(self.c["d_model"])

    def forward(self, ids, token_type_ids=None, attention_mask=None, labels=None, masks=None, prefix=""):
        """-> (rtd_logits (B, T), loss or None), as ``ElectraDiscriminator.forward``."""
        x = self.encode(ids, token_type_ids, attention_mask, masks, prefix)
        logits = self.discriminator_predictions(x)
        if self.recorder is not None and logits.requires_grad:
            logits.register_hook(store_grad(self.recorder, f"{prefix}drtd_logits"))
        loss = None
        if labels is not None:
            keep = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask == 1
            loss = F.binary_cross_entropy_with_logits(logits[keep], labels[keep].to(logits.dtype))
        return logits, loss


class TwinElectraPretraining(nn.Module):
    """The two twins with the discriminator's embeddings module in the generator too (one set of tables)."""

    def __init__(self, generator_cfg: dict, discriminator_cfg: dict, rtd_weight: float = 50.0):
        super().__init__()
        self.discriminator = TwinElectraDiscriminator(**discriminator_cfg)
        self.generator = TwinElectraGenerator(**generator_cfg)
        self.generator.embeddings = self.discriminator.embeddings
        self.rtd_weight = rtd_weight

    def forward(self, ids, token_type_ids, attention_mask, mlm_labels, corrupted_ids, rtd_labels):
        """-> (mlm_logits, rtd_logits, MLM + rtd_weight * BCE), on the corrupted ids npformer drew."""
        mlm_logits, mlm_loss = self.generator(ids, token_type_ids, attention_mask, mlm_labels)
        rtd_logits, rtd_loss = self.discriminator(corrupted_ids, token_type_ids, attention_mask, rtd_labels)
        return mlm_logits, rtd_logits, mlm_loss + self.rtd_weight * rtd_loss

    def load_npformer_state(self, state) -> None:
        TwinModel.load_npformer_state(self, state)
