"""BART (``bart``, as ``BartForConditionalGeneration``) <-> npformer's ``Bart``.

BART stores nn.Linear weights (out, in), as npformer does, and its layers already carry the
names npformer's encoder-decoder layers use (``self_attn``, ``encoder_attn``, ``fc1``, ``fc2``,
``*_layer_norm``): only the model prefix goes (``model.encoder.`` is npformer's ``encoder.``)
and each attention's ``out_proj`` is npformer's ``o_proj``. ``final_logits_bias`` (1, V) moves
over unchanged. The token table is ``model.shared.weight``; a checkpoint may store it again as
each side's ``embed_tokens`` and as ``lm_head.weight``, and then each must equal it.

Dropout is 0 in a loaded model (it is for inference and gradients). Refused by name: another
activation than the exact GELU, unequal encoder and decoder widths or head counts (npformer's
Bart has one of each), an untied head, pre-norm layers or a final layer norm (mBART's variants).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..models.bart import Bart, BartConfig
from .family import Family, _Fields, _linear_rows, _Row

__all__ = ["FAMILY", "bart_config", "bart_rows", "bart_config_json", "bart_layer_pairs"]

ARCHITECTURE = "BartForConditionalGeneration"


def _same(f: _Fields, a: str, b: str, kind: str = "int"):
    """Two fields npformer's Bart holds as one: they must agree."""
    first = f.get(a, kind)
    if f.get(b, kind) != first:
        raise f.fail(b, f"is {f.doc[b]!r}, but '{a}' is {first!r}; npformer's Bart gives both sides one value")
    return first


def bart_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> BartConfig:
    """config.json -> BartConfig (dropout 0: a loaded model is for inference and gradients)."""
    model_type = f.get("model_type", "str")
    f.architectures(model_type, "Bart")
    f.require("activation_function", ("gelu",), "gelu", "npformer's Bart uses the exact (erf) GELU")
    f.require("tie_word_embeddings", (True,), True, "npformer's Bart decodes with the shared token table")
    f.require("normalize_before", (False,), False, "npformer's Bart has post-norm layers")
    f.require("add_final_layer_norm", (False,), False, "npformer's Bart has no final layer norm")
    f.require("add_bias_logits", (False,), False, "npformer's Bart adds only final_logits_bias to the logits")
    cfg = BartConfig(
        vocab_size=f.get("vocab_size", "int"), max_position=f.get("max_position_embeddings", "int"),
        n_layer=f.get("encoder_layers", "int"), n_decoder_layer=f.get("decoder_layers", "int"),
        n_head=_same(f, "encoder_attention_heads", "decoder_attention_heads"), d_model=f.get("d_model", "int"),
        d_ff=_same(f, "encoder_ffn_dim", "decoder_ffn_dim"), dropout=0.0,
        scale_embedding=f.get("scale_embedding", "bool", False), init_std=float(f.get("init_std", "float", 0.02)),
        bos_token_id=f.token_id("bos_token_id", 0), pad_token_id=f.token_id("pad_token_id", 1),
        eos_token_id=f.token_id("eos_token_id", 2), decoder_start_token_id=f.token_id("decoder_start_token_id", 2),
        dtype=dtype)
    f.block_size(block_size, cfg.max_position, model_type)
    return cfg


def bart_layer_pairs(hf: str, ours: str, decoder: bool) -> List[Tuple[str, str]]:
    """(HF module, npformer module) of one encoder or decoder layer."""
    attentions = ("self_attn", "encoder_attn") if decoder else ("self_attn",)
    pairs = []
    for attn in attentions:
        pairs += [(f"{hf}.{attn}.{p}_proj", f"{ours}.{attn}.{p}_proj") for p in "qkv"]
        pairs += [(f"{hf}.{attn}.out_proj", f"{ours}.{attn}.o_proj"),
                  (f"{hf}.{attn}_layer_norm", f"{ours}.{attn}_layer_norm")]
    return pairs + [(f"{hf}.{m}", f"{ours}.{m}") for m in ("fc1", "fc2", "final_layer_norm")]


def bart_rows(cfg: BartConfig, variant: Optional[str] = None, model_type: str = "bart") -> List[_Row]:
    """The shared table, the logits bias, then each side: positions, embedding norm, layers."""
    rows: List[_Row] = [("model.shared.weight", ("shared.weight",), "same"),
                        ("final_logits_bias", ("final_logits_bias",), "same")]
    pairs = []
    for side, n in (("encoder", cfg.n_layer), ("decoder", cfg.decoder_layers)):
        rows.append((f"model.{side}.embed_positions.weight", (f"{side}.embed_positions.weight",), "same"))
        pairs.append((f"model.{side}.layernorm_embedding", f"{side}.layernorm_embedding"))
        for i in range(n):
            pairs += bart_layer_pairs(f"model.{side}.layers.{i}", f"{side}.layers.{i}", side == "decoder")
    return rows + _linear_rows(pairs)


def bart_tied(cfg: BartConfig, variant: Optional[str] = None, model_type: str = "bart") -> Dict[str, str]:
    """The shared table, stored again by some checkpoints: each side's lookup and the head."""
    return {name: "model.shared.weight" for name in
            ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")}


def bart_config_json(cfg: BartConfig, variant: Optional[str], model_type: str) -> dict:
    """config.json of a BartForConditionalGeneration."""
    if cfg.layer_norm_eps != 1e-5:
        raise ValueError(f"save_pretrained: argument 'model' has layer_norm_eps={cfg.layer_norm_eps}, which bart's "
                         "config.json cannot express (its layer norms use 1e-5)")
    return {"architectures": [ARCHITECTURE], "model_type": "bart", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position, "d_model": cfg.d_model,
            "encoder_layers": cfg.n_layer, "decoder_layers": cfg.decoder_layers,
            "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
            "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim, "activation_function": "gelu",
            "dropout": cfg.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "scale_embedding": cfg.scale_embedding, "init_std": cfg.init_std, "tie_word_embeddings": True,
            "is_encoder_decoder": True, "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
            "eos_token_id": cfg.eos_token_id, "decoder_start_token_id": cfg.decoder_start_token_id,
            "forced_eos_token_id": cfg.eos_token_id}


FAMILY = Family(name="bart", model_types=("bart",), models={None: Bart}, config_from_hf=bart_config,
                rows=bart_rows, config_json=bart_config_json, infer=lambda model: ("bart", None), tied=bart_tied)
