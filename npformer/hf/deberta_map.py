"""Hugging Face's DeBERTa-v2/v3 (``deberta-v2``, as ``DebertaV2ForMaskedLM``) <-> npformer's ``Deberta``.

In ``pretrained.py``'s format: a config.json reader (``deberta_config``, on a ``_Fields``), the
tensor-name rows (``deberta_rows``: every tensor moves over unchanged, only its name changes),
the tensors a checkpoint may store beside their original (``deberta_tied``), the names
transformers itself drops (``deberta_ignored``), and the config.json writer
(``deberta_config_json``). ``deberta_state_from_hf`` and ``deberta_hf_state_dict`` apply the
rows in both directions.

The MLM head has two spellings, chosen by config.json's ``legacy`` (default true):
``cls.predictions.transform.{dense,LayerNorm}`` + ``cls.predictions.bias`` (the decoder,
``cls.predictions.decoder.*``, is the word table and that bias, and is not stored), or
``lm_predictions.lm_head.{dense,LayerNorm,bias}``. Both compute dense -> GELU -> LayerNorm ->
the word table's transpose + bias, which is npformer's ``MLMHead``.

What npformer's model cannot represent is refused by name: no relative attention
(``relative_attention`` false: npformer's DeBERTa always attends by relative position), the
convolution beside the first layer (``conv_kernel_size`` > 0), a separate embedding width
(``embedding_size``), another head size (``attention_head_size``), another activation than the
exact GELU, an untied decoder, ``p2p`` or other position terms, ``norm_rel_ebd`` values other
than ``none`` / ``layer_norm``, log buckets whose largest position is too small for them
(``max_relative_positions`` < ``position_buckets`` // 2 + 2). Attention-probability dropout
is not represented; a loaded model has dropout 0 (it is loaded for inference and gradients).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .pretrained import _error, _Fields, _Row

__all__ = ["MODEL_TYPE", "ARCHITECTURE", "deberta_config", "deberta_legacy", "deberta_rows", "deberta_tied",
           "deberta_ignored", "deberta_config_json", "deberta_state_from_hf", "deberta_hf_state_dict"]

MODEL_TYPE = "deberta-v2"
ARCHITECTURE = "DebertaV2ForMaskedLM"
PREFIX = "deberta"  # the inner model's name, the prefix of the encoder's tensors
TERMS = ("c2p", "p2c")


def deberta_legacy(f: _Fields) -> bool:
    """config.json's ``legacy`` (default true): which names the MLM head's tensors have."""
    return f.get("legacy", "bool", True)


def _terms(f: _Fields) -> tuple:
    """pos_att_type: null (none), a string "p2c|c2p", or a list of names."""
    value = f.doc.get("pos_att_type")
    if value is None:
        return ()
    if isinstance(value, str):
        items = [t.strip() for t in value.lower().split("|") if t.strip()]
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        items = [t.strip().lower() for t in value]
    else:
        raise f.fail("pos_att_type", f"expected a string like \"p2c|c2p\", a list of names or null, got {value!r:.80}")
    bad = [t for t in items if t not in TERMS]
    if bad or len(set(items)) != len(items):
        raise f.fail("pos_att_type", f"is {value!r:.80}; npformer supports only distinct terms from {list(TERMS)}")
    return tuple(items)


def _norm_rel_ebd(f: _Fields) -> bool:
    value = f.get("norm_rel_ebd", "str", "none")
    items = [t.strip() for t in value.lower().split("|")]
    if any(t not in ("none", "layer_norm") for t in items):
        raise f.fail("norm_rel_ebd", f"is {value!r:.80}; npformer supports only 'none' and 'layer_norm'")
    return "layer_norm" in items


def _int_or_default(f: _Fields, field: str, default: int) -> int:
    value = f.doc.get(field, default)
    if value is None:
        value = default
    if type(value) is not int:
        raise f.fail(field, f"expected an integer, got {value!r:.80}")
    return value


def deberta_config(f: _Fields, dtype: str, block_size: Optional[int] = None):
    """config.json (as ``_Fields``) -> ``DebertaConfig``, every field transformers reads, refused by name where
    npformer's model differs. Defaults are transformers' ``DebertaV2Config``'s and its modules'."""
    from ..models.deberta import DebertaConfig

    model_type = f.get("model_type", "str")
    if model_type != MODEL_TYPE:
        raise f.fail("model_type", f"is {model_type!r}, not {MODEL_TYPE!r}")
    architectures = f.doc.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) and a.startswith("DebertaV2")
                                                      for a in architectures):
        raise f.fail("model_type", f"is {MODEL_TYPE!r}, but 'architectures' names {architectures!r:.80}, "
                                   "not a DebertaV2* model")
    f.require("hidden_act", ("gelu",), "gelu", "npformer's DeBERTa uses the exact (erf) GELU")
    f.require("relative_attention", (True,), False, "npformer's DeBERTa attends by relative position")
    f.require("tie_word_embeddings", (True,), True, "npformer's MLM head decodes with the word table itself")
    if _int_or_default(f, "conv_kernel_size", 0) > 0:
        raise f.fail("conv_kernel_size", f"is {f.doc['conv_kernel_size']}; npformer's DeBERTa has no convolution "
                                         "layer (0 turns it off)")
    hidden, heads = f.get("hidden_size", "int"), f.get("num_attention_heads", "int")
    if f.doc.get("embedding_size") not in (None, hidden):
        raise f.fail("embedding_size", f"is {f.doc['embedding_size']!r:.80}; npformer's DeBERTa embeds at the "
                                       f"hidden size ({hidden}), with no projection")
    if f.doc.get("attention_head_size") is not None and (hidden % heads or f.doc["attention_head_size"] !=
                                                          hidden // heads):
        raise f.fail("attention_head_size", f"is {f.doc['attention_head_size']!r:.80}; npformer's heads are "
                                            "hidden_size / num_attention_heads wide")
    max_position = f.get("max_position_embeddings", "int", 512)
    buckets = _int_or_default(f, "position_buckets", -1)
    max_rel = _int_or_default(f, "max_relative_positions", -1)
    if max_rel < 1:
        max_rel = max_position  # transformers' rule
    share = f.get("share_att_key", "bool", False)  # transformers reads it with default false
    biased = f.get("position_biased_input", "bool", True)
    pad = None if f.doc.get("pad_token_id", 0) is None else f.get("pad_token_id", "int0", 0)
    deberta_legacy(f)  # checked here: a bad value fails before any tensor is read
    try:
        cfg = DebertaConfig(
            vocab_size=f.get("vocab_size", "int"), max_position=max_position,
            type_vocab_size=f.get("type_vocab_size", "int0", 0), n_layer=f.get("num_hidden_layers", "int"),
            n_head=heads, d_model=hidden, d_ff=f.get("intermediate_size", "int"), dropout=0.0,
            layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-7)), pad_token_id=pad,
            position_biased_input=biased, position_buckets=buckets if buckets > 0 else None,
            max_relative_positions=max_rel, pos_att_type=_terms(f), share_att_key=share,
            norm_rel_ebd=_norm_rel_ebd(f), dtype=dtype)
    except (ValueError, TypeError) as err:
        raise _error(f.op, f.path, f"describes a model npformer cannot build: {err}") from None
    if biased and block_size not in (None, cfg.max_position):
        raise ValueError(f"{f.op}: argument 'block_size' expected None or {cfg.max_position} for {MODEL_TYPE} with "
                         f"absolute positions (what its position table covers), got {block_size}")
    return cfg


def _head(legacy: bool) -> List[tuple]:
    if legacy:
        return [("cls.predictions.transform.dense", "mlm_head.dense"),
                ("cls.predictions.transform.LayerNorm", "mlm_head.layer_norm")]
    return [("lm_predictions.lm_head.dense", "mlm_head.dense"),
            ("lm_predictions.lm_head.LayerNorm", "mlm_head.layer_norm")]


def deberta_rows(cfg, legacy: bool = True) -> List[_Row]:
    """(HF name, (npformer name,), "same") for every tensor of a DebertaV2ForMaskedLM of this config."""
    rows: List[_Row] = [(f"{PREFIX}.embeddings.word_embeddings.weight", ("embeddings.word_embeddings.weight",),
                         "same")]
    if cfg.position_biased_input:
        rows.append((f"{PREFIX}.embeddings.position_embeddings.weight", ("embeddings.position_embeddings.weight",),
                     "same"))
    if cfg.type_vocab_size:
        rows.append((f"{PREFIX}.embeddings.token_type_embeddings.weight",
                     ("embeddings.token_type_embeddings.weight",), "same"))
    rows.append((f"{PREFIX}.encoder.rel_embeddings.weight", ("rel_embeddings.weight",), "same"))
    pairs = [(f"{PREFIX}.embeddings.LayerNorm", "embeddings.LayerNorm")]
    if cfg.norm_rel_ebd:
        pairs.append((f"{PREFIX}.encoder.LayerNorm", "rel_norm"))
    for i in range(cfg.n_layer):
        hf, ours = f"{PREFIX}.encoder.layer.{i}", f"layers.{i}"
        projections = ["query_proj", "key_proj", "value_proj"]
        if not cfg.share_att_key:
            projections += [p for p, term in (("pos_key_proj", "c2p"), ("pos_query_proj", "p2c"))
                            if term in cfg.pos_att_type]
        pairs += [(f"{hf}.attention.self.{p}", f"{ours}.attention.{p}") for p in projections]
        pairs += [(f"{hf}.attention.output.dense", f"{ours}.attention.o_proj"),
                  (f"{hf}.attention.output.LayerNorm", f"{ours}.attention_norm"),
                  (f"{hf}.intermediate.dense", f"{ours}.mlp.fc"),
                  (f"{hf}.output.dense", f"{ours}.mlp.proj"),
                  (f"{hf}.output.LayerNorm", f"{ours}.output_norm")]
    pairs += _head(legacy)
    rows += [(f"{hf}.{w}", (f"{ours}.{w}",), "same") for hf, ours in pairs for w in ("weight", "bias")]
    rows.append(("cls.predictions.bias" if legacy else "lm_predictions.lm_head.bias", ("mlm_head.bias",), "same"))
    return rows


def deberta_tied(legacy: bool = True) -> Dict[str, str]:
    """Tensors a checkpoint may store beside their original (the legacy head's decoder): stored name -> original."""
    if not legacy:
        return {}
    return {"cls.predictions.decoder.weight": f"{PREFIX}.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}


def deberta_ignored(cfg) -> Callable[[str], bool]:
    """Names transformers drops on load: the position-id buffer, the replaced-token / EMD heads of released
    checkpoints (``mask_predictions.*``), and an absolute table a model without absolute positions has no use for."""

    def ignored(name: str) -> bool:
        if name == f"{PREFIX}.embeddings.position_ids" or name.startswith("mask_predictions."):
            return True
        return not cfg.position_biased_input and "position_embeddings" in name

    return ignored


def deberta_state_from_hf(op: str, weights: Path, tensors: Dict[str, np.ndarray], cfg, model,
                          legacy: bool = True) -> Dict[str, np.ndarray]:
    """HF tensors (name -> array) -> npformer's state dict; each error names the file and the tensor."""
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).data.dtype
    rows = deberta_rows(cfg, legacy)
    expected, ignored, stored_twice = {hf for hf, _, _ in rows}, deberta_ignored(cfg), deberta_tied(legacy)
    for name in tensors:
        if name in expected or ignored(name):
            continue
        if name in stored_twice:  # the tied decoder, stored again: it must be its original
            original = stored_twice[name]
            if original in tensors and np.array_equal(tensors[name], tensors[original]):
                continue
            raise _error(op, weights, f"tensor {name!r} differs from {original!r}, but npformer's MLM head "
                                      "decodes with that tensor itself (tied)")
        raise _error(op, weights, f"unexpected tensor {name!r} for a {MODEL_TYPE} model of this config")
    state = {}
    for hf, (ours,), _ in rows:
        if hf not in tensors:
            raise _error(op, weights, f"missing tensor {hf!r}")
        a = tensors[hf]
        if a.dtype.kind != "f":
            raise _error(op, weights, f"tensor {hf!r} has dtype {a.dtype}, which npformer cannot read as weights")
        if a.shape != params[ours].shape:
            raise _error(op, weights, f"tensor {hf!r} has shape {a.shape}, but config.json implies "
                                      f"{params[ours].shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            narrowed = a.astype(dtype, copy=False)
        if narrowed.dtype != a.dtype and np.isfinite(a).all() and not np.isfinite(narrowed).all():
            raise _error(op, weights, f"tensor {hf!r} holds values beyond the range of {dtype}")
        state[ours] = np.ascontiguousarray(narrowed)
    return state


def deberta_hf_state_dict(model, *, grads: bool = False, legacy: bool = True) -> Dict[str, np.ndarray]:
    """The model's parameters (or, with ``grads=True``, their gradients) under HF names."""
    params = dict(model.named_parameters())
    return {hf: np.ascontiguousarray(params[ours].grad if grads else params[ours].data)
            for hf, (ours,), _ in deberta_rows(model.cfg, legacy)}


def deberta_config_json(cfg, legacy: bool = True) -> dict:
    """config.json of a DebertaV2ForMaskedLM with npformer's ``DebertaConfig``."""
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": 0.0, "max_position_embeddings": cfg.max_position,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
            "pad_token_id": cfg.pad_token_id, "relative_attention": True,
            "position_buckets": -1 if cfg.position_buckets is None else cfg.position_buckets,
            "max_relative_positions": cfg.max_relative_positions, "position_biased_input": cfg.position_biased_input,
            "pos_att_type": list(cfg.pos_att_type), "share_att_key": cfg.share_att_key,
            "norm_rel_ebd": "layer_norm" if cfg.norm_rel_ebd else "none", "conv_kernel_size": 0,
            "legacy": legacy, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}
