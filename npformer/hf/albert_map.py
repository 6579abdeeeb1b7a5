"""ALBERT (``albert``, as ``AlbertForPreTraining``) in and out of Hugging Face folders: the config map,
the tensor-name rows and the config.json writer, in ``pretrained.py``'s format.

HF stores nn.Linear weights (out, in), as npformer does, so every row's layout is "same"; only
names change. HF's one layer group holds one layer (``albert_layer_groups.0.albert_layers.0``),
npformer's shared ``layer``. The MLM decoder is the word table: a checkpoint may store it again
(``predictions.decoder.weight``, and its bias ``predictions.decoder.bias``), and then it must
equal its original (``TIED``).

Refused by name: several layer groups or layers per group (npformer shares one layer), an
activation other than the GELU in its erf form ("gelu") or its tanh form ("gelu_new", HF's
default for ALBERT and that of the released checkpoints), relative position embeddings.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .pretrained import _Fields, _Row

__all__ = ["MODEL_TYPE", "ARCHITECTURE", "TIED", "albert_config", "albert_rows", "albert_ignored",
           "albert_config_json"]

MODEL_TYPE = "albert"
ARCHITECTURE = "AlbertForPreTraining"
# Tensors a checkpoint may store beside their original (the tied decoder): stored name -> original.
TIED: Dict[str, str] = {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
                        "predictions.decoder.bias": "predictions.bias"}


def albert_config(f: _Fields, dtype: str, block_size: Optional[int] = None):
    """config.json's fields (in ``f``) -> an AlbertConfig; what npformer's ALBERT cannot compute is refused."""
    from ..models.albert import AlbertConfig

    architectures = f.doc.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) and a.startswith("Albert")
                                                      for a in architectures):
        raise f.fail("model_type", f"is 'albert', but 'architectures' names {architectures!r:.80}, "
                                   "not an Albert* model")
    f.require("num_hidden_groups", (1,), 1, "npformer's ALBERT shares one layer across all depths")
    f.require("inner_group_num", (1,), 1, "npformer's ALBERT shares one layer across all depths")
    hidden_act = f.require("hidden_act", ("gelu", "gelu_new"), "gelu_new",
                           "npformer's encoder layer and MLM head have the erf GELU and its tanh form")
    f.require("position_embedding_type", ("absolute",), "absolute",
              "npformer's ALBERT has a learned table of absolute positions")
    f.require("tie_word_embeddings", (True,), True, "npformer's MLM head decodes with the word table itself")
    pad = None if f.doc.get("pad_token_id", 0) is None else f.get("pad_token_id", "int0", 0)
    cfg = AlbertConfig(vocab_size=f.get("vocab_size", "int"), max_position=f.get("max_position_embeddings", "int"),
                       type_vocab_size=f.get("type_vocab_size", "int", 2),
                       embedding_size=f.get("embedding_size", "int", 128),
                       n_layer=f.get("num_hidden_layers", "int"), n_head=f.get("num_attention_heads", "int"),
                       d_model=f.get("hidden_size", "int"), d_ff=f.get("intermediate_size", "int"), dropout=0.0,
                       layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-12)), pad_token_id=pad,
                       hidden_act=hidden_act, dtype=dtype)
    if block_size not in (None, cfg.block_size):
        raise ValueError(f"{f.op}: argument 'block_size' expected None or {cfg.block_size} for albert (what its "
                         f"position table covers), got {block_size}")
    return cfg


def albert_rows(cfg) -> List[_Row]:
    """HF name -> npformer name, one row per tensor, every layout "same"."""
    rows: List[_Row] = []
    for table in ("word", "position", "token_type"):
        if table != "token_type" or cfg.type_vocab_size:
            rows.append((f"albert.embeddings.{table}_embeddings.weight", (f"embeddings.{table}_embeddings.weight",),
                         "same"))
    hf_layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    pairs = [("albert.embeddings.LayerNorm", "embeddings.LayerNorm"),
             ("albert.encoder.embedding_hidden_mapping_in", "embedding_hidden_mapping_in"),
             (f"{hf_layer}.attention.query", "layer.attention.q_proj"),
             (f"{hf_layer}.attention.key", "layer.attention.k_proj"),
             (f"{hf_layer}.attention.value", "layer.attention.v_proj"),
             (f"{hf_layer}.attention.dense", "layer.attention.o_proj"),
             (f"{hf_layer}.attention.LayerNorm", "layer.attention_norm"),
             (f"{hf_layer}.ffn", "layer.mlp.fc"),
             (f"{hf_layer}.ffn_output", "layer.mlp.proj"),
             (f"{hf_layer}.full_layer_layer_norm", "layer.output_norm"),
             ("albert.pooler", "pooler.dense"),
             ("predictions.dense", "mlm_head.dense"),
             ("predictions.LayerNorm", "mlm_head.layer_norm"),
             ("sop_classifier.classifier", "sop_classifier")]
    rows += [(f"{hf}.{w}", (f"{ours}.{w}",), "same") for hf, ours in pairs for w in ("weight", "bias")]
    rows.append(("predictions.bias", ("mlm_head.bias",), "same"))
    return rows


def albert_ignored(name: str) -> bool:
    """Buffers some checkpoints carry: the position and token-type ids."""
    return name in ("albert.embeddings.position_ids", "albert.embeddings.token_type_ids")


def albert_config_json(cfg) -> dict:
    """config.json of an AlbertForPreTraining with ``cfg``'s shape."""
    if not cfg.type_vocab_size:
        raise ValueError("save_pretrained: argument 'model' has type_vocab_size=0, which an albert config cannot "
                         "express (its models always add a token-type embedding; use type_vocab_size=1)")
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.embedding_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "num_hidden_groups": 1, "inner_group_num": 1, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": cfg.hidden_act, "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.0,
            "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
            "position_embedding_type": "absolute", "tie_word_embeddings": True, "bos_token_id": None,
            "eos_token_id": None}
