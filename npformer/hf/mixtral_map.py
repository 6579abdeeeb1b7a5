"""Mixtral (``mixtral``, as ``MixtralForCausalLM``) <-> npformer's ``Mixtral`` (a ``Llama`` with experts).

The attention, norms, embedding and head are LLaMA's, under LLaMA's names. Each layer's mixture of
experts is stored as ``model.layers.{i}.block_sparse_moe.gate.weight`` (the router, (E, D)) and, for
each expert e, ``...block_sparse_moe.experts.{e}.w1.weight`` (npformer's ``gate_proj``),
``w3`` (``up_proj``) and ``w2`` (``down_proj``), all nn.Linear (out, in), moved over unchanged.

transformers 5 keeps the experts of a layer fused: ``model.layers.{i}.mlp.gate.weight`` (the router) and
``model.layers.{i}.mlp.experts.gate_up_proj`` (E, 2I, D), whose expert e computes
``x @ gate_up_proj[e].T`` and splits the 2I outputs into halves, the first the gate (w1), the second the
up projection (w3); ``...experts.down_proj`` (E, D, I) holds each expert's w2. A folder in that layout is
read too: ``mixtral_rename`` splits it into the per-expert names above. Folders are written per expert.

Router ties: npformer's top-k sends a tie in router probabilities to the lowest expert index (MOE.2),
while ``torch.topk`` documents no order among equal values. Exact ties (a zero router, duplicated router
rows) may therefore route differently from transformers; a trained router's probabilities are almost
never exactly equal.

The load balance: transformers adds ``router_aux_loss_coef`` times it to the loss only when
``output_router_logits`` is true, so a folder with it false loads with ``router_aux_loss_coef`` 0, and a
model with a coefficient > 0 is written with ``output_router_logits`` true. Mixtral routes every token
(no capacity): a model with a ``capacity_factor`` is refused by ``save_pretrained``.

Refused by name: another activation than SiLU, a rope scaling, router jitter (``router_jitter_noise``
> 0 multiplies training inputs by noise npformer's Llama does not draw), tensor-parallel projections.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np

from ..models.llama import LlamaConfig, Mixtral
from .family import Family, HFFormatError, _Fields, _Row
from .llama_map import _rope_theta

__all__ = ["FAMILY", "mixtral_config", "mixtral_rows", "mixtral_config_json"]

EXPERT_NAMES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))  # HF name, npformer's


def mixtral_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> LlamaConfig:
    """config.json -> LlamaConfig with experts."""
    f.require("hidden_act", ("silu",), "silu", "npformer's Mixtral experts are SwiGLU with SiLU")
    f.require("pretraining_tp", (1,), 1, "npformer computes each projection as one matrix product")
    jitter = f.get("router_jitter_noise", "float", 0.0)
    if jitter != 0:
        raise f.fail("router_jitter_noise", f"is {jitter!r}; npformer's Mixtral routes without jitter (0 only)")
    n_head = f.get("num_attention_heads", "int")
    coef = float(f.get("router_aux_loss_coef", "float", 0.001))
    sliding_window = f.nullable("sliding_window", "int", None)
    return LlamaConfig(
        vocab_size=f.get("vocab_size", "int"),
        block_size=block_size or f.get("max_position_embeddings", "int"),
        n_layer=f.get("num_hidden_layers", "int"), n_head=n_head,
        n_kv_head=f.get("num_key_value_heads", "int", n_head),
        d_model=f.get("hidden_size", "int"),
        head_dim=f.get("head_dim", "int", None),
        intermediate_size=f.get("intermediate_size", "int"),
        rope_theta=_rope_theta(f), rms_norm_eps=float(f.get("rms_norm_eps", "float", 1e-5)),
        tie_word_embeddings=f.get("tie_word_embeddings", "bool", False),
        sliding_window=sliding_window,
        num_local_experts=f.get("num_local_experts", "int", 8),
        num_experts_per_tok=f.get("num_experts_per_tok", "int", 2),
        router_aux_loss_coef=coef if f.get("output_router_logits", "bool", False) else 0.0,
        dtype=dtype)


def mixtral_rows(cfg: LlamaConfig, variant: Optional[str] = None, model_type: str = "mixtral") -> List[_Row]:
    """``model.`` + npformer's name for LLaMA's parts; ``block_sparse_moe`` for the experts."""
    rows: List[_Row] = [("model.embed_tokens.weight", ("embed_tokens.weight",), "same")]
    for i in range(cfg.n_layer):
        names = [f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"]
        names += [f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        rows += [(f"model.{n}", (n,), "same") for n in names]
        hf, ours = f"model.layers.{i}.block_sparse_moe", f"layers.{i}.mlp"
        rows.append((f"{hf}.gate.weight", (f"{ours}.gate.weight",), "same"))
        for e in range(cfg.num_local_experts):
            rows += [(f"{hf}.experts.{e}.{w}.weight", (f"{ours}.experts.{e}.{p}.weight",), "same")
                     for w, p in EXPERT_NAMES]
    rows.append(("model.norm.weight", ("norm.weight",), "same"))
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",), "same"))
    return rows


def mixtral_ignored(name: str, cfg: LlamaConfig, model_type: str = "mixtral") -> bool:
    """RoPE's inverse frequencies, which some checkpoints store and npformer recomputes."""
    return name.endswith(".self_attn.rotary_emb.inv_freq")


def mixtral_tied(cfg: LlamaConfig, variant: Optional[str] = None, model_type: str = "mixtral") -> Dict[str, str]:
    return {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else {}


_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)")


def mixtral_rename(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """transformers 5's fused expert tensors -> the per-expert ``block_sparse_moe`` names the rows use.

    ``gate_up_proj`` (E, 2I, D): rows [0, I) of expert e are its w1 (gate), rows [I, 2I) its w3 (up);
    ``down_proj`` (E, D, I): expert e's w2. Other names are kept as they are.
    """
    out: Dict[str, np.ndarray] = {}
    for name, a in tensors.items():
        m = _FUSED.fullmatch(name)
        if m is None:
            out[name] = a
            continue
        hf = f"model.layers.{m.group(1)}.block_sparse_moe"
        if m.group(2) == "gate.weight":
            out[f"{hf}.gate.weight"] = a
            continue
        if a.ndim != 3 or (m.group(2).endswith("gate_up_proj") and a.shape[1] % 2):
            shape = "(E, 2I, D)" if m.group(2).endswith("gate_up_proj") else "(E, D, I)"
            raise HFFormatError(f"load_pretrained: tensor '{name}' (transformers' fused expert layout) expected "
                                f"shape {shape}, got {tuple(a.shape)}")
        if m.group(2).endswith("gate_up_proj"):
            I = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{hf}.experts.{e}.w1.weight"] = a[e, :I]  # the first half of the outputs: the gate
                out[f"{hf}.experts.{e}.w3.weight"] = a[e, I:]  # the second half: the up projection
        else:
            for e in range(a.shape[0]):
                out[f"{hf}.experts.{e}.w2.weight"] = a[e]
    return out


def mixtral_infer(model: Mixtral):
    return "mixtral", None


def mixtral_config_json(cfg: LlamaConfig, variant: Optional[str], model_type: str) -> dict:
    op = "save_pretrained"
    biases = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
    if any(biases):
        raise ValueError(f"{op}: argument 'model' is written as 'mixtral', which has no biases, got qkv/o/mlp bias "
                         f"{biases}")
    if cfg.capacity_factor is not None:
        raise ValueError(f"{op}: argument 'model' is written as 'mixtral', which routes every token, got "
                         f"capacity_factor={cfg.capacity_factor} (set it to None)")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.block_size, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.resolved_intermediate_size,  # head_dim null: D / H
            "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "sliding_window": cfg.sliding_window, "num_local_experts": cfg.num_local_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok, "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "output_router_logits": cfg.router_aux_loss_coef > 0, "router_jitter_noise": 0.0,
            "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None}


FAMILY = Family(name="mixtral", model_types=("mixtral",), models={None: Mixtral}, config_from_hf=mixtral_config,
                rows=mixtral_rows, config_json=mixtral_config_json, infer=mixtral_infer, ignored=mixtral_ignored,
                tied=mixtral_tied, rename=mixtral_rename)
