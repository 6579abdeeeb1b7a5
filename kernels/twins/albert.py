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

from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .bert import (TwinAttention, TwinEmbeddings, TwinEncoderLayer, TwinLayerNorm, TwinMLMHead, TwinMLP, TwinPooler,
                   _store)
from .common import TwinModel


class Calls(OrderedDict):
    """A recording in which a name set again is kept as ``<name>@2``, ``<name>@3``, ... (npformer's Recorder)."""

    def __init__(self):
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __setitem__(self, name, value):
        n = self.calls[name] = self.calls.get(name, 0) + 1
        super().__setitem__(name if n == 1 else f"{name}@{n}", value)


def narrow_mlm_head(c: dict, embed_dim: int) -> TwinMLMHead:
    """The BERT twin's MLM head with dense D -> E and its LayerNorm E wide (ALBERT's, ELECTRA's generator's)."""
    head = TwinMLMHead(c)
    head.dense = nn.Linear(c["d_model"], embed_dim)
    head.layer_norm = TwinLayerNorm(embed_dim, c["layer_norm_eps"])
    return head


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


def record_common(model: TwinModel, rec: Calls, skip=()) -> None:
    """The hooks the BERT twin places: linear and norm outputs and gradients, norm and layer input gradients,
    attention probabilities, GELU activations; parameters of the modules under a path in ``skip`` excluded."""
    save = lambda name: (lambda mod, inp, out: rec.__setitem__(name, out.detach().numpy().copy()))  # noqa: E731
    save_dx = lambda name: (  # noqa: E731
        lambda mod, gin, gout: rec.__setitem__(name, gin[0].detach().numpy().copy()))
    for path, m in model.named_modules():
        if isinstance(m, model.recording_modules):
            m.recorder, m.path = rec, path
        if isinstance(m, (nn.Linear, TwinLayerNorm)):
            model._hooks.append(m.register_forward_hook(save(f"{path}.out")))
            if not any(path == s or path.startswith(s + ".") for s in skip):
                names = ("dW", "db") if isinstance(m, nn.Linear) else ("dweight", "dbias")
                for prm, gname in zip((m.weight, m.bias), names):
                    model._hooks.append(prm.register_hook(_store(rec, f"{path}.{gname}")))
        if isinstance(m, (TwinLayerNorm, TwinEncoderLayer)):
            model._hooks.append(m.register_full_backward_hook(save_dx(f"{path}.dx")))


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
        rec = self.recorder if self.recorder is not None and torch.is_grad_enabled() else None
        pad = None if attention_mask is None else attention_mask == 0
        e = self.embeddings(ids, token_type_ids, masks, rec)
        if rec is not None:
            rec["embeddings.out"] = e.detach().numpy().copy()
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
                copies[name].register_hook(_store(rec, f"layer.{module}.{gname[kind]}"))
            x = functional_call(self.layer, copies, (x, pad, masks_of_call(masks, "layer", i), "layer"))
            rec["layer.out"] = x.detach().numpy().copy()
        mlm_logits = self.mlm_head(x, self.embeddings.word_embeddings.weight)
        pooled = self.pooler(x)
        sop_logits = self.sop_classifier(pooled)
        if rec is not None:
            rec["mlm_head.logits"] = mlm_logits.detach().numpy().copy()
            mlm_logits.register_hook(_store(rec, "dmlm_logits"))
            rec["pooler.out"] = pooled.detach().numpy().copy()
            rec["sop_logits"] = sop_logits.detach().numpy().copy()
            sop_logits.register_hook(_store(rec, "dsop_logits"))
        loss = None
        if mlm_labels is not None:
            loss = F.cross_entropy(mlm_logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100)
        if sop_labels is not None:
            sop_loss = F.cross_entropy(sop_logits, sop_labels)
            loss = sop_loss if loss is None else loss + sop_loss
        return mlm_logits, sop_logits, loss

    def start_recording(self) -> Calls:
        """Record what npformer's ALBERT records, under its names (see the module's docstring)."""
        self.stop_recording()
        rec = Calls()
        self.recorder = rec
        record_common(self, rec, skip=("layer",))
        self._hooks.append(self.mlm_head.bias.register_hook(_store(rec, "mlm_head.dbias")))
        for name in ("position_embeddings", "token_type_embeddings"):  # the word table is tied: not comparable
            if hasattr(self.embeddings, name):
                self._hooks.append(getattr(self.embeddings, name).weight.register_hook(
                    _store(rec, f"embeddings.{name}.dW")))
        return rec
