"""ALBERT (``albert``, as ``AlbertForPreTraining``) in and out of Hugging Face folders: the ``albert`` family of
``pretrained.py``'s registry.

HF stores nn.Linear weights (out, in), as npformer does, so every row's layout is "same"; only
names change. HF's one layer group holds one layer (``albert_layer_groups.0.albert_layers.0``),
npformer's shared ``layer``. The MLM decoder is the word table: a checkpoint may store it again
(``predictions.decoder.weight``, and its bias ``predictions.decoder.bias``), and then it must
equal its original (``TIED``).

Refused by name: several layer groups or layers per group (npformer shares one layer), an
activation other than the GELU in its erf form ("gelu") or its tanh form ("gelu_new", HF's
default for ALBERT and that of the released checkpoints), relative position embeddings, a
decoder or cross attention.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..models.albert import Albert, AlbertConfig
from .bert_map import check_encoder_fields, embedding_rows, encoder_config_json, encoder_sizes
from .family import Family, _Fields, _linear_rows, _Row

__all__ = ["FAMILY", "MODEL_TYPE", "ARCHITECTURE", "TIED", "albert_config", "albert_rows", "albert_ignored",
           "albert_config_json"]

MODEL_TYPE = "albert"
ARCHITECTURE = "AlbertForPreTraining"
# Tensors a checkpoint may store beside their original (the tied decoder): stored name -> original.
TIED: Dict[str, str] = {"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
                        "predictions.decoder.bias": "predictions.bias"}


def albert_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> AlbertConfig:
    """config.json's fields (in ``f``) -> an AlbertConfig; what npformer's ALBERT cannot compute is refused."""
    f.architectures(MODEL_TYPE, "Albert")
    f.require("num_hidden_groups", (1,), 1, "npformer's ALBERT shares one layer across all depths")
    f.require("inner_group_num", (1,), 1, "npformer's ALBERT shares one layer across all depths")
    hidden_act = f.require("hidden_act", ("gelu", "gelu_new"), "gelu_new",
                           "npformer's encoder layer and MLM head have the erf GELU and its tanh form")
    check_encoder_fields(f, "ALBERT")
    cfg = AlbertConfig(**encoder_sizes(f), embedding_size=f.get("embedding_size", "int", 128), hidden_act=hidden_act,
                       dtype=dtype)
    f.block_size(block_size, cfg.block_size, MODEL_TYPE)
    return cfg


def albert_rows(cfg: AlbertConfig, variant: Optional[str] = None, model_type: str = MODEL_TYPE) -> List[_Row]:
    """HF name -> npformer name, one row per tensor, every layout "same"."""
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
    return embedding_rows(cfg, "albert") + _linear_rows(pairs) + [("predictions.bias", ("mlm_head.bias",), "same")]


def albert_ignored(name: str, cfg: Optional[AlbertConfig] = None, model_type: str = MODEL_TYPE) -> bool:
    """Buffers some checkpoints carry: the position and token-type ids."""
    return name in ("albert.embeddings.position_ids", "albert.embeddings.token_type_ids")


def albert_config_json(cfg: AlbertConfig, variant: Optional[str] = None, model_type: str = MODEL_TYPE) -> dict:
    """config.json of an AlbertForPreTraining with ``cfg``'s shape."""
    return {**encoder_config_json(cfg, ARCHITECTURE, MODEL_TYPE), "hidden_act": cfg.hidden_act,
            "embedding_size": cfg.embedding_size, "num_hidden_groups": 1, "inner_group_num": 1,
            "classifier_dropout_prob": 0.0}


FAMILY = Family(name="albert", model_types=(MODEL_TYPE,), models={None: Albert}, config_from_hf=albert_config,
                rows=albert_rows, config_json=albert_config_json, infer=lambda model: (MODEL_TYPE, None),
                ignored=albert_ignored, tied=lambda cfg, variant, model_type: TIED)
