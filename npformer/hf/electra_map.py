"""ELECTRA (``electra``) in and out of Hugging Face folders: the config map, the tensor-name rows and the
config.json writer, in ``pretrained.py``'s format.

One model type, two models: ``ElectraForPreTraining`` is npformer's ``ElectraDiscriminator`` and
``ElectraForMaskedLM`` its ``ElectraGenerator`` (``electra_kind`` reads which from
``architectures``). Both store nn.Linear weights (out, in), as npformer does: every layout is
"same"; the encoder's names are BERT's under ``electra.``, ``embeddings_project`` when
embedding_size != hidden_size. The generator's decoder is the word table: a checkpoint may store
it again (``generator_lm_head.weight``), and then it must equal it (``TIED``).

Refused by name: an activation other than the exact GELU, relative positions, a decoder or
cross attention, an untied generator head.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from .pretrained import _Fields, _Row

__all__ = ["MODEL_TYPE", "ARCHITECTURES", "TIED", "electra_kind", "electra_config", "electra_rows",
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


def electra_config(f: _Fields, dtype: str, block_size: Optional[int] = None):
    """config.json's fields (in ``f``) -> an ElectraConfig; what npformer's ELECTRA cannot compute is refused."""
    from ..models.electra import ElectraConfig

    electra_kind(f)
    f.require("hidden_act", ("gelu",), "gelu", "npformer's encoder layers and heads use the exact (erf) GELU")
    f.require("position_embedding_type", ("absolute",), "absolute",
              "npformer's ELECTRA has a learned table of absolute positions")
    f.require("is_decoder", (False,), False, "npformer's ELECTRA is a bidirectional encoder")
    f.require("add_cross_attention", (False,), False, "npformer's ELECTRA has no cross attention")
    f.require("tie_word_embeddings", (True,), True, "npformer's generator decodes with the word table itself")
    pad = None if f.doc.get("pad_token_id", 0) is None else f.get("pad_token_id", "int0", 0)
    cfg = ElectraConfig(vocab_size=f.get("vocab_size", "int"), max_position=f.get("max_position_embeddings", "int"),
                        type_vocab_size=f.get("type_vocab_size", "int", 2),
                        embedding_size=f.get("embedding_size", "int", 128),
                        n_layer=f.get("num_hidden_layers", "int"), n_head=f.get("num_attention_heads", "int"),
                        d_model=f.get("hidden_size", "int"), d_ff=f.get("intermediate_size", "int"), dropout=0.0,
                        layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-12)), pad_token_id=pad, dtype=dtype)
    if block_size not in (None, cfg.block_size):
        raise ValueError(f"{f.op}: argument 'block_size' expected None or {cfg.block_size} for electra (what its "
                         f"position table covers), got {block_size}")
    return cfg


def electra_rows(cfg, kind: str) -> List[_Row]:
    """HF name -> npformer name for the discriminator or the generator, every layout "same"."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"electra_rows: argument 'kind' expected 'discriminator' or 'generator', got {kind!r}")
    rows: List[_Row] = []
    for table in ("word", "position", "token_type"):
        if table != "token_type" or cfg.type_vocab_size:
            rows.append((f"electra.embeddings.{table}_embeddings.weight", (f"embeddings.{table}_embeddings.weight",),
                         "same"))
    pairs = [("electra.embeddings.LayerNorm", "embeddings.LayerNorm")]
    if cfg.embedding_size != cfg.d_model:
        pairs.append(("electra.embeddings_project", "embeddings_project"))
    for i in range(cfg.n_layer):
        hf, ours = f"electra.encoder.layer.{i}", f"layers.{i}"
        pairs += [(f"{hf}.attention.self.query", f"{ours}.attention.q_proj"),
                  (f"{hf}.attention.self.key", f"{ours}.attention.k_proj"),
                  (f"{hf}.attention.self.value", f"{ours}.attention.v_proj"),
                  (f"{hf}.attention.output.dense", f"{ours}.attention.o_proj"),
                  (f"{hf}.attention.output.LayerNorm", f"{ours}.attention_norm"),
                  (f"{hf}.intermediate.dense", f"{ours}.mlp.fc"),
                  (f"{hf}.output.dense", f"{ours}.mlp.proj"),
                  (f"{hf}.output.LayerNorm", f"{ours}.output_norm")]
    if kind == "discriminator":
        pairs += [("discriminator_predictions.dense", "discriminator_predictions.dense"),
                  ("discriminator_predictions.dense_prediction", "discriminator_predictions.dense_prediction")]
    else:
        pairs += [("generator_predictions.dense", "generator_predictions.dense"),
                  ("generator_predictions.LayerNorm", "generator_predictions.layer_norm")]
    rows += [(f"{hf}.{w}", (f"{ours}.{w}",), "same") for hf, ours in pairs for w in ("weight", "bias")]
    if kind == "generator":
        rows.append(("generator_lm_head.bias", ("generator_predictions.bias",), "same"))
    return rows


def electra_ignored(name: str) -> bool:
    """Buffers some checkpoints carry: the position and token-type ids."""
    return name in ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")


def electra_config_json(cfg, kind: str) -> dict:
    """config.json of an ElectraForPreTraining ('discriminator') or ElectraForMaskedLM ('generator')."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"save_pretrained: argument 'kind' expected 'discriminator' or 'generator', got {kind!r}")
    if not cfg.type_vocab_size:
        raise ValueError("save_pretrained: argument 'model' has type_vocab_size=0, which an electra config cannot "
                         "express (its models always add a token-type embedding; use type_vocab_size=1)")
    return {"architectures": [ARCHITECTURES[kind]], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.embedding_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
            "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}
