"""Hugging Face's DeBERTa-v2/v3 (``deberta-v2``, as ``DebertaV2ForMaskedLM``) <-> npformer's ``Deberta``.

One ``Family`` record (``FAMILY``): a config.json reader (``deberta_config``), the
tensor-name rows (``deberta_rows``: every tensor moves over unchanged, only its name changes),
the tensors a checkpoint may store beside their original (``deberta_tied``), the names
transformers itself drops (``deberta_ignored``), and the config.json writer
(``deberta_config_json``); ``pretrained.py`` applies them in both directions.

The MLM head has two spellings, the family's two variants, chosen by config.json's ``legacy``
(default true): ``"legacy"``, ``cls.predictions.transform.{dense,LayerNorm}`` + ``cls.predictions.bias``
(the decoder, ``cls.predictions.decoder.*``, is the word table and that bias, and is not stored),
or ``"lm_predictions"`` (legacy false), ``lm_predictions.lm_head.{dense,LayerNorm,bias}``. Both
compute dense -> GELU -> LayerNorm -> the word table's transpose + bias, which is npformer's
``MLMHead``; save_pretrained writes ``"legacy"`` unless asked for the other.

What npformer's model cannot represent is refused by name: no relative attention
(``relative_attention`` false: npformer's DeBERTa always attends by relative position), the
convolution beside the first layer (``conv_kernel_size`` > 0), a separate embedding width
(``embedding_size``), another head size (``attention_head_size``), another activation than the
exact GELU, an untied decoder, ``p2p`` or other position terms, ``norm_rel_ebd`` values other
than ``none`` / ``layer_norm``, log buckets whose largest position is too small for them
(``max_relative_positions`` < ``position_buckets`` // 2 + 2). Attention-probability dropout
is not represented; a loaded model has dropout 0 (it is loaded for inference and gradients).

A loaded model never has the enhanced mask decoder (``emd_layers`` 0: transformers' model computes
none, and drops a checkpoint's ``mask_predictions.*``); a model with one (``emd_layers`` > 0) is
refused by ``save_pretrained``, ``check_savable`` and ``hf_state_dict``, since its position table
has no place in a ``DebertaV2ForMaskedLM`` folder.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..models.deberta import Deberta, DebertaConfig
from .family import Family, _Fields, _linear_rows, _post_norm_sublayers, _Row

__all__ = ["FAMILY", "MODEL_TYPE", "ARCHITECTURE", "VARIANTS", "deberta_config", "deberta_variant", "deberta_rows",
           "deberta_tied", "deberta_ignored", "deberta_config_json"]

MODEL_TYPE = "deberta-v2"
ARCHITECTURE = "DebertaV2ForMaskedLM"
PREFIX = "deberta"  # the inner model's name, the prefix of the encoder's tensors
TERMS = ("c2p", "p2c")
# The MLM head's spellings (config.json's legacy true / false): its dense and LayerNorm modules, and its bias.
VARIANTS = {"legacy": ("cls.predictions.transform", "cls.predictions.bias"),
            "lm_predictions": ("lm_predictions.lm_head", "lm_predictions.lm_head.bias")}


def deberta_variant(f: _Fields) -> str:
    """config.json's ``legacy`` (default true): which names the MLM head's tensors have."""
    return "legacy" if f.get("legacy", "bool", True) else "lm_predictions"


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


def deberta_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> DebertaConfig:
    """config.json (as ``_Fields``) -> ``DebertaConfig``, every field transformers reads, refused by name where
    npformer's model differs. Defaults are transformers' ``DebertaV2Config``'s and its modules'."""
    f.architectures(MODEL_TYPE, "DebertaV2")
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
    pad = f.nullable("pad_token_id", "int0", 0)
    cfg = DebertaConfig(
        vocab_size=f.get("vocab_size", "int"), max_position=max_position,
        type_vocab_size=f.get("type_vocab_size", "int0", 0), n_layer=f.get("num_hidden_layers", "int"),
        n_head=heads, d_model=hidden, d_ff=f.get("intermediate_size", "int"), dropout=0.0,
        layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-7)), pad_token_id=pad,
        position_biased_input=biased, position_buckets=buckets if buckets > 0 else None,
        max_relative_positions=max_rel, pos_att_type=_terms(f), share_att_key=share,
        norm_rel_ebd=_norm_rel_ebd(f), dtype=dtype)
    if biased:
        f.block_size(block_size, cfg.max_position, MODEL_TYPE)
    return cfg


def deberta_rows(cfg: DebertaConfig, variant: str = "legacy", model_type: str = MODEL_TYPE) -> List[_Row]:
    """(HF name, (npformer name,), "same") for every tensor of a DebertaV2ForMaskedLM of this config.

    A config with the enhanced mask decoder has no such list (its position table has no HF name): refused,
    so that ``hf_state_dict`` never drops it silently (``save_pretrained`` refuses earlier, in
    ``deberta_config_json``; a loaded config never has one)."""
    if cfg.emd_layers:
        raise ValueError(f"hf_state_dict: argument 'model' has emd_layers={cfg.emd_layers}, an enhanced mask "
                         f"decoder whose position table (emd_position_embeddings) has no name in a {ARCHITECTURE}")
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
        pairs += _post_norm_sublayers(hf, ours)
    head, bias = VARIANTS[variant]
    pairs += [(f"{head}.dense", "mlm_head.dense"), (f"{head}.LayerNorm", "mlm_head.layer_norm")]
    return rows + _linear_rows(pairs) + [(bias, ("mlm_head.bias",), "same")]


def deberta_tied(cfg: DebertaConfig, variant: str = "legacy", model_type: str = MODEL_TYPE) -> Dict[str, str]:
    """Tensors a checkpoint may store beside their original (the legacy head's decoder): stored name -> original."""
    if variant != "legacy":
        return {}
    return {"cls.predictions.decoder.weight": f"{PREFIX}.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}


def deberta_ignored(name: str, cfg: DebertaConfig, model_type: str = MODEL_TYPE) -> bool:
    """Names transformers drops on load: the position-id buffer, the replaced-token / EMD heads of released
    checkpoints (``mask_predictions.*``), and an absolute table a model without absolute positions has no use for."""
    if name == f"{PREFIX}.embeddings.position_ids" or name.startswith("mask_predictions."):
        return True
    return not cfg.position_biased_input and "position_embeddings" in name


def deberta_config_json(cfg: DebertaConfig, variant: str = "legacy", model_type: str = MODEL_TYPE) -> dict:
    """config.json of a DebertaV2ForMaskedLM with npformer's ``DebertaConfig``."""
    if cfg.emd_layers:
        raise ValueError(f"save_pretrained: argument 'model' has emd_layers={cfg.emd_layers}, an enhanced mask "
                         f"decoder whose position table (emd_position_embeddings) a {ARCHITECTURE} folder cannot "
                         "hold (transformers computes no such decoder); only emd_layers=0 can be saved")
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
            "legacy": variant == "legacy", "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


FAMILY = Family(name="deberta", model_types=(MODEL_TYPE,), models={"legacy": Deberta, "lm_predictions": Deberta},
                config_from_hf=deberta_config, rows=deberta_rows, config_json=deberta_config_json,
                infer=lambda model: (MODEL_TYPE, "legacy"), variant_from_hf=deberta_variant,
                ignored=deberta_ignored, tied=deberta_tied)
