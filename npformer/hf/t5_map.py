"""T5 v1.0 and v1.1 (``t5``, as ``T5ForConditionalGeneration``) <-> npformer's ``T5``.

npformer's T5 keeps Hugging Face's module tree (``encoder.block.{i}.layer.{j}...``) and nn.Linear's
(out, in) weights, so the tensors move over unchanged; only the attention projections are renamed
(HF's ``SelfAttention.q`` is npformer's ``SelfAttention.q_proj``, and so on for k, v, o). The
embedding is ``shared.weight``; a checkpoint may store it again as ``encoder.embed_tokens.weight``,
``decoder.embed_tokens.weight`` and, tied, ``lm_head.weight``, and each copy must equal it.

The head: config.json's ``tie_word_embeddings`` says whether ``lm_head.weight`` is a tensor of its
own (v1.1 checkpoints: false), and ``scale_decoder_outputs`` (written by transformers 5) whether the
decoder's output is scaled by d_model^-1/2 before it; without that field the scaling follows
``tie_word_embeddings``, as transformers has always read it. Both fields are written.

Refused by name: a feed forward other than ``relu`` or ``gated-gelu`` (gelu_new), a decoder-only or
encoder-only config, a ``block_size`` (T5's positions are relative: there is no table to cover).
A loaded model has dropout 0 (inference and gradients).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..models.t5 import T5, T5Config
from .family import Family, _Fields, _Row

__all__ = ["FAMILY", "t5_config", "t5_rows", "t5_config_json"]

ARCHITECTURE = "T5ForConditionalGeneration"
ACTIVATION = {"relu": "relu", "gated-gelu": "gelu_new"}  # feed_forward_proj -> the dense_act_fn it implies


def t5_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> T5Config:
    """config.json -> T5Config (dropout 0)."""
    f.architectures("t5", "T5")
    if block_size is not None:
        raise ValueError(f"{f.op}: argument 'block_size' expected None for t5 (its positions are relative: no "
                         f"table to cover), got {block_size}")
    proj = f.require("feed_forward_proj", tuple(ACTIVATION), "relu",
                     "npformer's T5 has the ReLU feed forward of v1.0 and the gated gelu_new one of v1.1")
    # transformers takes these two from config.json over what feed_forward_proj implies: each must agree with it
    f.require("dense_act_fn", (ACTIVATION[proj],), ACTIVATION[proj],
              f"feed_forward_proj {proj!r} runs {ACTIVATION[proj]}; npformer's T5 has no other activation")
    f.require("is_gated_act", (proj == "gated-gelu",), proj == "gated-gelu",
              f"feed_forward_proj {proj!r} is {'' if proj == 'gated-gelu' else 'not '}gated")
    f.require("is_encoder_decoder", (True,), True, "npformer's T5 is the encoder-decoder")
    f.require("is_decoder", (False,), False, "npformer's T5 is the encoder-decoder")
    tie = f.get("tie_word_embeddings", "bool", True)
    scale = f.get("scale_decoder_outputs", "bool", tie)  # None in the config: the scaling follows the tie
    pad = f.token_id("pad_token_id", 0)
    return T5Config(
        vocab_size=f.get("vocab_size", "int"), d_model=f.get("d_model", "int"), d_kv=f.get("d_kv", "int"),
        d_ff=f.get("d_ff", "int"), num_layers=f.get("num_layers", "int"),
        num_decoder_layers=f.get("num_decoder_layers", "int", None), n_head=f.get("num_heads", "int"),
        relative_attention_num_buckets=f.get("relative_attention_num_buckets", "int", 32),
        relative_attention_max_distance=f.get("relative_attention_max_distance", "int", 128),
        feed_forward_proj=proj, tie_word_embeddings=tie,
        scale_decoder_outputs=None if scale == tie else scale,
        layer_norm_epsilon=float(f.get("layer_norm_epsilon", "float", 1e-6)), dropout=0.0,
        pad_token_id=pad, eos_token_id=f.token_id("eos_token_id", 1),
        decoder_start_token_id=f.token_id("decoder_start_token_id", pad), dtype=dtype)


def _stack_rows(cfg: T5Config, stack: str, n_blocks: int) -> List[_Row]:
    rows: List[_Row] = []
    mlp = ("wi_0", "wi_1", "wo") if cfg.feed_forward_proj == "gated-gelu" else ("wi", "wo")
    for i in range(n_blocks):
        b = f"{stack}.block.{i}.layer"
        attention = [(0, "SelfAttention")] + ([(1, "EncDecAttention")] if stack == "decoder" else [])
        for j, name in attention:
            rows.append((f"{b}.{j}.layer_norm.weight", (f"{b}.{j}.layer_norm.weight",), "same"))
            rows += [(f"{b}.{j}.{name}.{p}.weight", (f"{b}.{j}.{name}.{p}_proj.weight",), "same") for p in "qkvo"]
        if i == 0:
            table = f"{b}.0.SelfAttention.relative_attention_bias.weight"
            rows.append((table, (table,), "same"))
        j = len(attention)
        rows.append((f"{b}.{j}.layer_norm.weight", (f"{b}.{j}.layer_norm.weight",), "same"))
        rows += [(f"{b}.{j}.DenseReluDense.{w}.weight", (f"{b}.{j}.DenseReluDense.{w}.weight",), "same") for w in mlp]
    rows.append((f"{stack}.final_layer_norm.weight", (f"{stack}.final_layer_norm.weight",), "same"))
    return rows


def t5_rows(cfg: T5Config, variant: Optional[str] = None, model_type: str = "t5") -> List[_Row]:
    """shared, the encoder's and the decoder's blocks, and lm_head when untied."""
    rows: List[_Row] = [("shared.weight", ("shared.weight",), "same")]
    rows += _stack_rows(cfg, "encoder", cfg.num_layers)
    rows += _stack_rows(cfg, "decoder", cfg.resolved_num_decoder_layers)
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",), "same"))
    return rows


def t5_tied(cfg: T5Config, variant: Optional[str] = None, model_type: str = "t5") -> Dict[str, str]:
    """The stacks' views of the shared table (and the tied head), stored again by some checkpoints."""
    tied = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    if cfg.tie_word_embeddings:
        tied["lm_head.weight"] = "shared.weight"
    return tied


def t5_ignored(name: str, cfg: T5Config, model_type: str = "t5") -> bool:
    """A cross-attention position table some old checkpoints carry, which no T5 uses (transformers drops it)."""
    return name == "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def t5_config_json(cfg: T5Config, variant: Optional[str], model_type: str) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": "t5", "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
            "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_decoder_layers": cfg.resolved_num_decoder_layers, "num_heads": cfg.n_head,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "feed_forward_proj": cfg.feed_forward_proj, "dense_act_fn": ACTIVATION[cfg.feed_forward_proj],
            "is_gated_act": cfg.feed_forward_proj == "gated-gelu", "tie_word_embeddings": cfg.tie_word_embeddings,
            "scale_decoder_outputs": cfg.resolved_scale_decoder_outputs, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "dropout_rate": cfg.dropout, "initializer_factor": 1.0, "is_encoder_decoder": True, "is_decoder": False,
            "use_cache": True, "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id,
            "decoder_start_token_id": cfg.decoder_start_token_id}


FAMILY = Family(name="t5", model_types=("t5",), models={None: T5}, config_from_hf=t5_config, rows=t5_rows,
                config_json=t5_config_json, infer=lambda model: ("t5", None), ignored=t5_ignored, tied=t5_tied)
