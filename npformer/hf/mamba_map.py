"""Mamba (``mamba``, as ``MambaForCausalLM``) <-> npformer's ``MambaLM``.

Every tensor moves over unchanged: ``backbone.`` + npformer's name (the convolution's weight
keeps torch's (E, 1, K) layout in npformer too), and ``lm_head.weight`` when the head is not
tied. Older checkpoints that spell the embedding ``backbone.embedding.weight`` are read too.

Mamba has no position table, so config.json sets no context length: ``block_size`` comes from
the argument, else from a ``max_position_embeddings`` field (written by ``save_pretrained``),
else ``DEFAULT_BLOCK_SIZE``, the largest position npformer computes exactly (``MAX_POSITION``): a
recurrent model has no context limit, so ``generate`` never crops its prompt (as transformers' does
not), and its decoding state is O(1) in the length. ``residual_in_fp32`` changes nothing in float32 and float64, the
precisions npformer computes in; the ``time_step_*`` fields only initialise a new model.

Refused by name: another activation than SiLU, an ``intermediate_size`` other than
``expand * hidden_size``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from ..models.mamba import MambaConfig, MambaLM
from ..ops._checks import MAX_POSITION
from .family import Family, _Fields, _Row

__all__ = ["FAMILY", "mamba_config", "mamba_rows", "mamba_config_json", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = MAX_POSITION  # the context of a folder that names none: the recurrence itself has no limit
MIXER_TENSORS = ("in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
                 "out_proj.weight")


def mamba_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> MambaConfig:
    """config.json -> MambaConfig; time_step_rank "auto" (or its value, ceil(hidden_size / 16)) is kept as None."""
    f.require("hidden_act", ("silu",), "silu", "npformer's Mamba mixer uses SiLU")
    d_model = f.get("hidden_size", "int")
    expand = f.get("expand", "int", 2)
    if f.get("intermediate_size", "int", expand * d_model) != expand * d_model:
        raise f.fail("intermediate_size", f"is {f.doc['intermediate_size']!r}; npformer's Mamba has "
                                          f"expand * hidden_size = {expand * d_model} channels")
    rank = f.doc.get("time_step_rank", "auto")
    auto = math.ceil(d_model / 16)
    if rank != "auto":
        rank = f.get("time_step_rank", "int")
    return MambaConfig(
        vocab_size=f.get("vocab_size", "int"),
        block_size=block_size or f.get("max_position_embeddings", "int", DEFAULT_BLOCK_SIZE),
        n_layer=f.get("num_hidden_layers", "int"), d_model=d_model, d_state=f.get("state_size", "int", 16),
        expand=expand, d_conv=f.get("conv_kernel", "int", 4), dt_rank=None if rank in ("auto", auto) else rank,
        layer_norm_epsilon=float(f.get("layer_norm_epsilon", "float", 1e-5)),
        use_bias=f.get("use_bias", "bool", False), use_conv_bias=f.get("use_conv_bias", "bool", True),
        tie_word_embeddings=f.get("tie_word_embeddings", "bool", True), dtype=dtype)


def mamba_rows(cfg: MambaConfig, variant: Optional[str] = None, model_type: str = "mamba") -> List[_Row]:
    """``backbone.`` + npformer's name for every tensor, and ``lm_head.weight`` when untied."""
    names = ["embeddings.weight"]
    for i in range(cfg.n_layer):
        names.append(f"layers.{i}.norm.weight")
        names += [f"layers.{i}.mixer.{t}" for t in MIXER_TENSORS]
        if cfg.use_conv_bias:
            names.append(f"layers.{i}.mixer.conv1d.bias")
        if cfg.use_bias:
            names += [f"layers.{i}.mixer.in_proj.bias", f"layers.{i}.mixer.out_proj.bias"]
    names.append("norm_f.weight")
    rows: List[_Row] = [(f"backbone.{n}", (n,), "same") for n in names]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head.weight",), "same"))
    return rows


def mamba_tied(cfg: MambaConfig, variant: Optional[str] = None, model_type: str = "mamba") -> Dict[str, str]:
    """A tied checkpoint may store the head too: it must be the embedding."""
    return {"lm_head.weight": "backbone.embeddings.weight"} if cfg.tie_word_embeddings else {}


def mamba_rename(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Older checkpoints name the embedding ``backbone.embedding.weight``."""
    old, new = "backbone.embedding.weight", "backbone.embeddings.weight"
    if old in tensors and new not in tensors:
        tensors = {(new if k == old else k): v for k, v in tensors.items()}
    return tensors


def mamba_infer(model: MambaLM):
    return "mamba", None


def mamba_config_json(cfg: MambaConfig, variant: Optional[str], model_type: str) -> dict:
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "state_size": cfg.d_state, "num_hidden_layers": cfg.n_layer,
            "expand": cfg.expand, "intermediate_size": cfg.d_inner, "conv_kernel": cfg.d_conv,
            "time_step_rank": cfg.resolved_dt_rank, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "use_bias": cfg.use_bias, "use_conv_bias": cfg.use_conv_bias, "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.block_size,
            "residual_in_fp32": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


FAMILY = Family(name="mamba", model_types=("mamba",), models={None: MambaLM}, config_from_hf=mamba_config,
                rows=mamba_rows, config_json=mamba_config_json, infer=mamba_infer, tied=mamba_tied,
                rename=mamba_rename)
