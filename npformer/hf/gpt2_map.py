"""GPT-2 (``gpt2``, as ``GPT2LMHeadModel``) <-> npformer's ``GPT``.

GPT-2 stores its linear layers as ``Conv1D``, weight (in, out), so each is transposed into
npformer's (out, in); its fused ``c_attn`` (in, 3 D) splits into q, k, v. The LM head is the
token table (``wte``): a checkpoint that stores ``lm_head.weight`` too must store that table.
The original checkpoints name the transformer's tensors without the ``transformer.`` prefix.

Refused by name: another activation than the tanh GELU, another MLP width or LayerNorm eps,
attention scalings npformer does not apply, cross attention, an untied head.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..models.gpt import GPT, GPTConfig
from .family import Family, _Fields, _Row

__all__ = ["FAMILY", "gpt2_config", "gpt2_rows", "gpt2_config_json"]

# npformer's GPT: LayerNorm eps (nn.layers.LayerNorm's default) and its GELU (tanh approximation).
GPT_LAYERNORM_EPS = 1e-5
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_config(f: _Fields, dtype: str, block_size: Optional[int] = None) -> GPTConfig:
    d_model = f.get("n_embd", "int")
    f.require("activation_function", GPT2_ACTIVATIONS, "gelu_new", "npformer's GPT uses the tanh-approximated GELU")
    n_inner = f.get("n_inner", "int", None)
    if n_inner not in (None, 4 * d_model):
        raise f.fail("n_inner", f"is {n_inner}; npformer's GPT has an MLP of 4 * n_embd = {4 * d_model}")
    eps = f.get("layer_norm_epsilon", "float", 1e-5)
    if eps != GPT_LAYERNORM_EPS:
        raise f.fail("layer_norm_epsilon", f"is {eps}; npformer's GPT uses LayerNorm eps {GPT_LAYERNORM_EPS}")
    f.require("scale_attn_weights", (True,), True, "npformer's GPT scales the attention logits by 1/sqrt(head_dim)")
    f.require("scale_attn_by_inverse_layer_idx", (False,), False, "npformer's GPT does not scale by the layer index")
    f.require("reorder_and_upcast_attn", (False,), False, "npformer's GPT has no reordered attention")
    f.require("add_cross_attention", (False,), False, "npformer's GPT is a decoder without cross attention")
    f.require("tie_word_embeddings", (True,), True, "npformer's GPT ties its LM head to wte")
    n_positions = f.get("n_positions", "int")
    if block_size not in (None, n_positions):
        raise ValueError(f"{f.op}: argument 'block_size' expected None or n_positions = {n_positions} for gpt2 "
                         f"(the position table wpe has that many rows), got {block_size}")
    return GPTConfig(vocab_size=f.get("vocab_size", "int"), block_size=n_positions,
                     n_layer=f.get("n_layer", "int"), n_head=f.get("n_head", "int"), d_model=d_model,
                     dropout=0.0, bias=True, dtype=dtype)


def gpt2_rows(cfg: GPTConfig, variant: Optional[str] = None, model_type: str = "gpt2") -> List[_Row]:
    rows: List[_Row] = [("transformer.wte.weight", ("wte.weight",), "same"),
                        ("transformer.wpe.weight", ("wpe.weight",), "same")]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        rows += [
            (f"{h}.ln_1.weight", (f"{b}.ln_1.weight",), "same"),
            (f"{h}.ln_1.bias", (f"{b}.ln_1.bias",), "same"),
            (f"{h}.attn.c_attn.weight", tuple(f"{b}.attn.{p}_proj.weight" for p in "qkv"), "qkv_T"),
            (f"{h}.attn.c_attn.bias", tuple(f"{b}.attn.{p}_proj.bias" for p in "qkv"), "qkv"),
            (f"{h}.attn.c_proj.weight", (f"{b}.attn.o_proj.weight",), "T"),
            (f"{h}.attn.c_proj.bias", (f"{b}.attn.o_proj.bias",), "same"),
            (f"{h}.ln_2.weight", (f"{b}.ln_2.weight",), "same"),
            (f"{h}.ln_2.bias", (f"{b}.ln_2.bias",), "same"),
            (f"{h}.mlp.c_fc.weight", (f"{b}.mlp.fc.weight",), "T"),
            (f"{h}.mlp.c_fc.bias", (f"{b}.mlp.fc.bias",), "same"),
            (f"{h}.mlp.c_proj.weight", (f"{b}.mlp.proj.weight",), "T"),
            (f"{h}.mlp.c_proj.bias", (f"{b}.mlp.proj.bias",), "same"),
        ]
    rows += [("transformer.ln_f.weight", ("ln_f.weight",), "same"),
             ("transformer.ln_f.bias", ("ln_f.bias",), "same")]
    return rows


def gpt2_ignored(name: str, cfg: GPTConfig, model_type: str = "gpt2") -> bool:
    """Buffers some GPT-2 checkpoints carry that are not parameters: the causal mask and its fill value."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) and ".c_attn." not in name


def gpt2_tied(cfg: GPTConfig, variant: Optional[str] = None, model_type: str = "gpt2") -> Dict[str, str]:
    """Some checkpoints store the LM head too: it must be the token table."""
    return {"lm_head.weight": "transformer.wte.weight"}


def gpt2_rename(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The original checkpoints' names (``wte.weight``, ``h.0...``) -> ``transformer.`` + the name."""
    if "transformer.wte.weight" in tensors or "wte.weight" not in tensors:
        return tensors
    return {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in tensors.items()}


def gpt2_config_json(cfg: GPTConfig, variant: Optional[str] = None, model_type: str = "gpt2") -> dict:
    if not cfg.bias:
        raise ValueError("save_pretrained: argument 'model' has bias=False, which a gpt2 config cannot express "
                         "(GPT-2's linear layers always carry biases)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": GPT_LAYERNORM_EPS,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


FAMILY = Family(name="gpt2", model_types=("gpt2",), models={None: GPT}, config_from_hf=gpt2_config,
                rows=gpt2_rows, config_json=gpt2_config_json, infer=lambda model: ("gpt2", None),
                ignored=gpt2_ignored, tied=gpt2_tied, rename=gpt2_rename)
