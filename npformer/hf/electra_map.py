"""ELECTRA (``electra``) in and out of Hugging Face folders: the ``electra`` family of ``pretrained.py``'s registry.

One model type, two models, the family's two variants: ``ElectraForPreTraining`` is npformer's
``ElectraDiscriminator`` and ``ElectraForMaskedLM`` its ``ElectraGenerator`` (``electra_kind`` reads
which from ``architectures``). Both store nn.Linear weights (out, in), as npformer does: every
layout is "same"; the encoder's names are BERT's under ``electra.`` (``bert_map``'s tables),
``embeddings_project`` when embedding_size != hidden_size. The generator's decoder is the word
table: a checkpoint may store it again (``generator_lm_head.weight``), and then it must equal it
(``TIED``).

Refused by name: an activation other than the exact GELU, relative positions, a decoder or
cross attention, an untied generator head.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..models.electra import ElectraConfig, ElectraDiscriminator, ElectraGenerator
from .bert_map import bert_layer_pairs, check_encoder_fields, embedding_rows, encoder_config_json, encoder_sizes
from .family import Family, _Fields, _linear_rows, _Row

__all__ = ["FAMILY", "MODEL_TYPE", "ARCHITECTURES", "TIED", "electra_kind", "electra_config", "electra_rows",
           "electra_ignored", "electra_config_json"]

MODEL_TYPE = "electra"
ARCHITECTURES = {"discriminator": "ElectraForPreTraining", "generator": "ElectraForMaskedLM"}
# Tensors a checkpoint may store beside their original (the generator's tied decoder): stored name -> original.
TIED: Dict[str, Dict[str, str]] = {
    "generator": {"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"},
    "discriminator": {}}


def electra_kind(f: _Fields) -> str:
    """'discriminator' (ElectraForPreTraining) or 'generator' (ElectraForMaskedLM), from 'architectures'."""
    architectures = f.doc.get("architectures")
    kinds = {v: k for k, v in ARCHITECTURES.items()}
    if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in kinds:
        raise f.fail("architectures", f"is {architectures!r:.80}; npformer loads an electra folder as exactly one "
                                      f"of {sorted(kinds)}")
    return kinds[architectures[0]]


def electra_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> ElectraConfig:
    """config.json's fields (in ``f``) -> an ElectraConfig; what npformer's ELECTRA cannot compute is refused."""
    electra_kind(f)
    f.require("hidden_act", ("gelu",), "gelu", "npformer's encoder layers and heads use the exact (erf) GELU")
    check_encoder_fields(f, "ELECTRA")
    cfg = ElectraConfig(**encoder_sizes(f), embedding_size=f.get("embedding_size", "int", 128), dtype=dtype)
    f.block_size(block_size, cfg.block_size, MODEL_TYPE)
    return cfg


def _check_kind(op: str, kind: str) -> None:
    if kind not in ARCHITECTURES:
        raise ValueError(f"{op}: argument 'kind' expected 'discriminator' or 'generator', got {kind!r}")


def electra_rows(cfg: ElectraConfig, kind: str, model_type: str = MODEL_TYPE) -> List[_Row]:
    """HF name -> npformer name for the discriminator or the generator, every layout "same"."""
    _check_kind("electra_rows", kind)
    pairs = [("electra.embeddings.LayerNorm", "embeddings.LayerNorm")]
    if cfg.embedding_size != cfg.d_model:
        pairs.append(("electra.embeddings_project", "embeddings_project"))
    for i in range(cfg.n_layer):
        pairs += bert_layer_pairs(f"electra.encoder.layer.{i}", f"layers.{i}")
    if kind == "discriminator":
        pairs += [("discriminator_predictions.dense", "discriminator_predictions.dense"),
                  ("discriminator_predictions.dense_prediction", "discriminator_predictions.dense_prediction")]
        return embedding_rows(cfg, "electra") + _linear_rows(pairs)
    pairs += [("generator_predictions.dense", "generator_predictions.dense"),
              ("generator_predictions.LayerNorm", "generator_predictions.layer_norm")]
    return embedding_rows(cfg, "electra") + _linear_rows(pairs) + [
        ("generator_lm_head.bias", ("generator_predictions.bias",), "same")]


def electra_ignored(name: str, cfg: Optional[ElectraConfig] = None, model_type: str = MODEL_TYPE) -> bool:
    """Buffers some checkpoints carry: the position and token-type ids."""
    return name in ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")


def electra_config_json(cfg: ElectraConfig, kind: str, model_type: str = MODEL_TYPE) -> dict:
    """config.json of an ElectraForPreTraining ('discriminator') or ElectraForMaskedLM ('generator')."""
    _check_kind("save_pretrained", kind)
    return {**encoder_config_json(cfg, ARCHITECTURES[kind], MODEL_TYPE), "embedding_size": cfg.embedding_size}


FAMILY = Family(name="electra", model_types=(MODEL_TYPE,),
                models={"discriminator": ElectraDiscriminator, "generator": ElectraGenerator},
                config_from_hf=electra_config, rows=electra_rows, config_json=electra_config_json,
                infer=lambda model: (MODEL_TYPE, "generator" if isinstance(model, ElectraGenerator)
                                     else "discriminator"),
                variant_from_hf=electra_kind, ignored=electra_ignored,
                tied=lambda cfg, kind, model_type: TIED[kind])
