"""A torch ALBERT with the same structure and parameter names as ``npformer.models.albert``.

The whole-model oracle (float64, same weights, same dropout masks) and the reference of the
divergence finder. Built from the BERT twin's pieces: E-wide embeddings, a Linear E -> D,
ONE ``TwinEncoderLayer`` applied ``n_layer`` times (autograd sums the applications' gradients
into its parameters), an MLM head that narrows D -> E before the tied decoder, the tanh pooler
and the sentence-order classifier D -> 2.

Recording follows npformer's names for a module called several times: ``layer.out`` for the
first application, ``layer.out@2`` for the second, ...; a backward name counts in backward
order (``layer.dx`` is the last application's). For the shared layer's parameter gradients per
application (npformer's Linear records its ``dW`` at each backward call), each application
runs on its own differentiable copies of the shared parameters, whose gradients are recorded.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from torch import nn
from torch.func import functional_call

from .bert import TwinAttention, TwinEmbeddings, TwinEncoderLayer, TwinPooler
from .common import TwinModel
from .encoder import (Calls, TwinMLMHead, TwinMLP, active_recorder, narrow_mlm_head, pretraining_loss, record,
                      record_common, record_table_grads, store_grad)


def masks_of_call(masks: Optional[Dict[str, np.ndarray]], prefix: str, i: int):
    """npformer's dropout masks of the i-th application (0-based) of the module at ``prefix``, under plain names."""
    if masks is None or i == 0:
        return masks
    out = dict(masks)
    for drop in ("drop_1", "drop_2"):
        key = f"{prefix}.{drop}.mask@{i + 1}"
        if key in masks:
            out[f"{prefix}.{drop}.mask"] = masks[key]
    return out


class TwinAlbert(TwinModel):
    recording_modules = (TwinAttention, TwinMLP, TwinMLMHead)

    def __init__(self, vocab_size=65, max_position=128, type_vocab_size=2, embedding_size=32, n_layer=4, n_head=4,
                 d_model=128, d_ff=512, dropout=0.0, layer_norm_eps=1e-12, pad_token_id=0, **_):
        super().__init__()
        c = dict(vocab_size=vocab_size, max_position=max_position, type_vocab_size=type_vocab_size,
                 d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, layer_norm_eps=layer_norm_eps,
                 pad_token_id=pad_token_id, position_padding_idx=None)
        self.embeddings = TwinEmbeddings(dict(c, d_model=embedding_size))
        self.embedding_hidden_mapping_in = nn.Linear(embedding_size, d_model)
        self.layer = TwinEncoderLayer(c)
        self.mlm_head = narrow_mlm_head(c, embedding_size)
        self.pooler = TwinPooler(d_model)
        self.sop_classifier = nn.Linear(d_model, 2)
        self.n_layer = n_layer
        self.recorder: Optional[Calls] = None
        self._hooks = []

    def forward(self, ids, token_type_ids=None, attention_mask=None, mlm_labels=None, sop_labels=None, masks=None):
        """-> (mlm_logits (B, T, V), sop_logits (B, 2), loss or None), as ``Albert.forward``."""
        rec = active_recorder(self)
        pad = None if attention_mask is None else attention_mask == 0
        e = self.embeddings(ids, token_type_ids, masks, rec)
        record(rec, "embeddings.out", e)
        x = self.embedding_hidden_mapping_in(e)
        shared = dict(self.layer.named_parameters())
        for i in range(self.n_layer):
            if rec is None:
                x = self.layer(x, pad, masks_of_call(masks, "layer", i), "layer")
                continue
            copies = {}  # this application's own differentiable copies: their gradients are its part
            for name, prm in shared.items():
                copies[name] = prm.clone()
                module, kind = name.rsplit(".", 1)
                gname = {"weight": "dW", "bias": "db"} if "norm" not in module else {"weight": "dweight",
                                                                                    "bias": "dbias"}
                copies[name].register_hook(store_grad(rec, f"layer.{module}.{gname[kind]}"))
            x = functional_call(self.layer, copies, (x, pad, masks_of_call(masks, "layer", i), "layer"))
            record(rec, "layer.out", x)
        mlm_logits = self.mlm_head(x, self.embeddings.word_embeddings.weight)
        pooled = self.pooler(x)
        sop_logits = self.sop_classifier(pooled)
        record(rec, "mlm_head.logits", mlm_logits, "dmlm_logits")
        record(rec, "pooler.out", pooled)
        record(rec, "sop_logits", sop_logits, "dsop_logits")
        return mlm_logits, sop_logits, pretraining_loss(mlm_logits, mlm_labels, sop_logits, sop_labels)

    def start_recording(self) -> Calls:
        """Record what npformer's ALBERT records, under its names (see the module's docstring)."""
        self.stop_recording()
        rec = Calls()
        self.recorder = rec
        record_common(self, rec, (TwinEncoderLayer,), skip_grads=("layer",))
        self._hooks.append(self.mlm_head.bias.register_hook(store_grad(rec, "mlm_head.dbias")))
        record_table_grads(self, rec, self.embeddings)
        return rec
