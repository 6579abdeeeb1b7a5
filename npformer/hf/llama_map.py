"""LLaMA, Mistral and Qwen2 (``llama``, ``mistral``, ``qwen2``, as ``*ForCausalLM``) <-> npformer's ``Llama``.

The three store nn.Linear weights (out, in), as npformer does, so their tensors move over
unchanged under one table: ``model.`` + npformer's name, and ``lm_head.weight`` when the head is
not tied. They differ in their config: LLaMA's optional biases (``attention_bias``, ``mlp_bias``),
Qwen2's q/k/v biases, Mistral's sliding window.

Refused by name: another activation than SiLU, a rope scaling, a Qwen2 window over only some
layers (npformer's Llama gives every layer the same attention), tensor-parallel projections.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..models.llama import Llama, LlamaConfig
from .family import Family, _Fields, _Row

__all__ = ["FAMILY", "llama_config", "llama_rows", "llama_config_json"]

MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig.sliding_window when config.json does not set it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _rope_theta(f: _Fields) -> float:
    """rope_theta at the top level, or in ``rope_parameters`` / ``rope_scaling``; only the default rope.

    transformers 5 writes ``rope_parameters: {rope_type: default, rope_theta}``; older
    configs a top-level ``rope_theta`` and ``rope_scaling`` null or a dict. Each value
    given is checked, and where several are given they must agree.
    """
    found = {}  # where -> value
    if f.doc.get("rope_theta") is not None:
        found["rope_theta"] = f.doc["rope_theta"]
    for field in ("rope_parameters", "rope_scaling"):
        params = f.doc.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise f.fail(field, f"expected a JSON object or null, got {params!r:.80}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise f.fail(field, f"has rope_type {kind!r}; npformer implements only the 'default' rope "
                                "(no scaling of the frequencies)")
        if params.get("rope_theta") is not None:
            found[f"{field}.rope_theta"] = params["rope_theta"]
    for where, theta in found.items():
        if type(theta) not in (int, float) or not theta > 0 or not np.isfinite(theta):
            raise f.fail(where, f"expected a finite number > 0, got {theta!r:.80}")
    if len({float(v) for v in found.values()}) > 1:
        raise f.fail(next(iter(found)), f"disagrees with the other rope_theta values given: {found}")
    return float(next(iter(found.values()), 10000.0))  # 10000: the families' default


def llama_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> LlamaConfig:
    """config.json -> LlamaConfig: the biases and the window as its model_type (llama, mistral, qwen2) has them."""
    model_type = f.get("model_type", "str")
    f.require("hidden_act", ("silu",), "silu", "npformer's Llama uses SwiGLU with SiLU")
    n_head = f.get("num_attention_heads", "int")
    if model_type == "llama":
        attention_bias = f.get("attention_bias", "bool", False)
        qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, f.get("mlp_bias", "bool", False)
        sliding_window = None
    elif model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
        # Qwen2 windows the layers from max_window_layers on: with none of them windowed, all attend fully
        n_layer = f.get("num_hidden_layers", "int")
        if f.get("use_sliding_window", "bool", False) and f.get("max_window_layers", "int0", 28) < n_layer:
            raise f.fail("use_sliding_window", "is true with max_window_layers below num_hidden_layers; npformer's "
                                               "Llama gives every layer the same attention, so it loads Qwen2 only "
                                               "with full attention in every layer")
        sliding_window = None
    else:  # mistral: a config.json without the key means transformers' default window, not none
        qkv_bias, o_bias, mlp_bias = False, False, False
        raw = f.doc.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
        sliding_window = None if raw is None else f.get("sliding_window", "int", MISTRAL_DEFAULT_WINDOW)
    f.require("pretraining_tp", (1,), 1, "npformer computes each projection as one matrix product")
    return LlamaConfig(
        vocab_size=f.get("vocab_size", "int"),
        block_size=block_size or f.get("max_position_embeddings", "int"),
        n_layer=f.get("num_hidden_layers", "int"), n_head=n_head,
        n_kv_head=f.get("num_key_value_heads", "int", n_head),
        d_model=f.get("hidden_size", "int"),
        head_dim=f.get("head_dim", "int", None),
        intermediate_size=f.get("intermediate_size", "int"),
        rope_theta=_rope_theta(f), rms_norm_eps=float(f.get("rms_norm_eps", "float", 1e-6)),
        tie_word_embeddings=f.get("tie_word_embeddings", "bool", False),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=sliding_window, dtype=dtype)


def llama_rows(cfg: LlamaConfig, variant: Optional[str] = None, model_type: str = "llama") -> List[_Row]:
    """One layout for all three: ``model.`` + npformer's name, and ``lm_head.weight``.

    No permutation of q_proj/k_proj: the HF layout is already the rotate-half order (HF's
    conversion script from Meta's checkpoints permuted the rows of q and k so that RoPE
    rotates dimension j with j + head_dim/2, which is what npformer's rope does).
    """
    rows: List[_Row] = [("model.embed_tokens.weight", ("embed_tokens.weight",), "same")]
    for i in range(cfg.n_layer):
        names = [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
        for p in "qkvo":
            names.append(f"layers.{i}.self_attn.{p}_proj.weight")
            if (cfg.qkv_bias and p != "o") or (cfg.o_bias and p == "o"):
                names.append(f"layers.{i}.self_attn.{p}_proj.bias")
        for p in ("gate", "up", "down"):
            names.append(f"layers.{i}.mlp.{p}_proj.weight")
            if cfg.mlp_bias:
                names.append(f"layers.{i}.mlp.{p}_proj.bias")
        rows += [(f"model.{n}", (n,), "same") for n in names]
    rows.append(("model.norm.weight", ("norm.weight",), "same"))
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",), "same"))
    return rows


def llama_ignored(name: str, cfg: LlamaConfig, model_type: str = "llama") -> bool:
    """Older LLaMA checkpoints store RoPE's inverse frequencies, which npformer recomputes."""
    return name.endswith(".self_attn.rotary_emb.inv_freq")


def llama_tied(cfg: LlamaConfig, variant: Optional[str] = None, model_type: str = "llama") -> Dict[str, str]:
    """Some tied checkpoints store the head too: it must be the embedding."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}


def llama_infer(model: Llama):
    """qwen2 with q/k/v biases and no o bias, mistral with a sliding window, else llama."""
    cfg = model.cfg
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2", None
    if cfg.sliding_window is not None:
        return "mistral", None
    return "llama", None


def llama_config_json(cfg: LlamaConfig, variant: Optional[str], model_type: str) -> dict:
    op = "save_pretrained"
    biases = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
    if model_type == "qwen2" and biases != (True, False, False):
        raise ValueError(f"{op}: argument 'model_type' 'qwen2' needs qkv_bias=True, o_bias=False, mlp_bias=False, "
                         f"got {biases}")
    if model_type == "mistral" and any(biases):
        raise ValueError(f"{op}: argument 'model_type' 'mistral' has no biases, got qkv/o/mlp bias {biases}")
    if model_type == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise ValueError(f"{op}: argument 'model_type' 'llama' has one attention_bias for q, k, v and o, "
                         f"got qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}")
    if model_type != "mistral" and cfg.sliding_window is not None:
        raise ValueError(f"{op}: argument 'model_type' {model_type!r} is written with full attention, but the model "
                         f"has sliding_window={cfg.sliding_window} (use 'mistral')")
    doc = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.block_size, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model,
           "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.resolved_intermediate_size,
           "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
           "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None}
    if model_type == "llama":
        doc.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif model_type == "qwen2":
        doc.update(use_sliding_window=False, sliding_window=None)
    else:
        doc.update(sliding_window=cfg.sliding_window)
    return doc


FAMILY = Family(name="llama", model_types=tuple(ARCHITECTURES), models={None: Llama}, config_from_hf=llama_config,
                rows=llama_rows, config_json=llama_config_json, infer=llama_infer, ignored=llama_ignored,
                tied=llama_tied)
