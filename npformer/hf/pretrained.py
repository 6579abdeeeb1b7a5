"""Hugging Face model folders in and out: config.json, the weights, and explicit name maps.

A folder holds ``config.json`` (``model_type`` and the sizes), the weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``) and
optionally ``generation_config.json`` and tokenizer files.

Each family has one table, written out below, from its config fields to npformer's
config and from each of its tensor names to npformer's parameter names, with the
layout change in between:

- GPT-2 (``gpt2``) stores its linear layers as ``Conv1D``, weight (in, out), so each is
  transposed into npformer's (out, in); its fused ``c_attn`` (in, 3 D) splits into q, k, v.
- LLaMA, Mistral and Qwen2 store nn.Linear weights (out, in), as npformer does, so their
  tensors move over unchanged.
- BERT (``bert``, as ``BertForPreTraining``) and RoBERTa (``roberta``, as ``RobertaForMaskedLM``)
  also store nn.Linear weights; only the names change (``attention.self.query`` is npformer's
  ``attention.q_proj``, ...). Their MLM decoder is the word table itself: a checkpoint may
  store it again (``cls.predictions.decoder.weight``, ``lm_head.decoder.weight``), and then it
  must equal the table.

Whatever npformer's model cannot represent exactly is refused by name (a different
activation, a rope scaling, a sliding window where npformer has none, ...) rather
than loaded into a model that would compute something else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsError, read_safetensors, write_safetensors

__all__ = ["HFFormatError", "load_pretrained", "save_pretrained", "read_generation_config", "hf_state_dict",
           "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "bert", "roberta")
# Copied from ``source`` by save_pretrained when present.
# What a folder's tokenizer may consist of (copied as they are by save_pretrained(source=...)).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
MISTRAL_DEFAULT_WINDOW = 4096  # transformers' MistralConfig.sliding_window when config.json does not set it
GENERATION_FILE = "generation_config.json"
# npformer's GPT: LayerNorm eps (nn.layers.LayerNorm's default) and its GELU (tanh approximation).
GPT_LAYERNORM_EPS = 1e-5
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# The encoder families: the name of each HF model's inner module (the prefix of its encoder's tensors),
# and the architecture save_pretrained writes (the heads npformer's Bert has: MLM + NSP, or MLM alone).
ENCODER_PREFIX = {"bert": "bert", "roberta": "roberta"}
ENCODER_ARCHITECTURES = {"bert": "BertForPreTraining", "roberta": "RobertaForMaskedLM"}


class HFFormatError(ValueError):
    """A Hugging Face folder npformer cannot load: names the file and the field or tensor."""


def _error(op: str, path: Path, what: str) -> HFFormatError:
    return HFFormatError(f"{op}: {path}: {what}")


def _check_folder(op: str, path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"{op}: argument 'path' expected a str or os.PathLike naming a folder, "
                        f"got {type(path).__name__}")
    return Path(path)


def _read_json(op: str, path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _error(op, path, "no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _error(op, path, f"is not readable JSON ({str(err)[:120]})") from None
    if not isinstance(doc, dict):
        raise _error(op, path, "expected a JSON object")
    return doc


# -- config fields -------------------------------------------------------------------------------
class _Fields:
    """Typed access to config.json's fields, each error naming the file and the field."""

    def __init__(self, op: str, path: Path, doc: dict):
        self.op, self.path, self.doc = op, path, doc

    def fail(self, field: str, what: str) -> HFFormatError:
        return _error(self.op, self.path, f"field '{field}' {what}")

    def get(self, field: str, kind: str, default=...):
        if field not in self.doc or (self.doc[field] is None and default is not ...):
            if default is ...:
                raise self.fail(field, "is missing")
            return default
        value = self.doc[field]
        ok = {"int": type(value) is int and value >= 1,
              "int0": type(value) is int and value >= 0,
              "float": type(value) in (int, float) and np.isfinite(value) and value >= 0,
              "bool": type(value) is bool,
              "str": type(value) is str,
              "any": True}[kind]
        if not ok:
            expected = {"int": "an integer >= 1", "int0": "an integer >= 0", "float": "a finite number >= 0",
                        "bool": "true or false", "str": "a string", "any": ""}[kind]
            raise self.fail(field, f"expected {expected}, got {value!r:.80}")
        return value

    def require(self, field: str, allowed, default, why: str):
        value = self.doc.get(field, default)
        if value not in allowed:
            raise self.fail(field, f"is {value!r:.80}; npformer supports only {list(allowed)} ({why})")
        return value


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


# -- the name maps -------------------------------------------------------------------------------
# A row: (HF name, npformer names, layout). Layouts:
#   "same"     the array as it is
#   "T"        Conv1D weight (in, out) <-> npformer weight (out, in)
#   "qkv_T"    GPT-2's c_attn weight (D, 3D): columns [q | k | v], each transposed
#   "qkv"      GPT-2's c_attn bias (3D,): [q | k | v]
_Row = Tuple[str, Tuple[str, ...], str]


def _gpt2_rows(n_layer: int) -> List[_Row]:
    rows: List[_Row] = [("transformer.wte.weight", ("wte.weight",), "same"),
                        ("transformer.wpe.weight", ("wpe.weight",), "same")]
    for i in range(n_layer):
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


def _gpt2_ignored(name: str) -> bool:
    """Buffers some GPT-2 checkpoints carry that are not parameters: the causal mask and its fill value."""
    return name.endswith((".attn.bias", ".attn.masked_bias")) and ".c_attn." not in name


def _llama_rows(cfg) -> List[_Row]:
    """LLaMA, Mistral and Qwen2 share one layout: ``model.`` + npformer's name, and ``lm_head.weight``.

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


def _encoder_rows(cfg, model_type: str) -> List[_Row]:
    """BERT (``bert.`` + the encoder, ``cls.*`` heads, the pooler) and RoBERTa (``roberta.`` + the encoder,
    ``lm_head.*``): the same encoder names, tensors unchanged."""
    pre = ENCODER_PREFIX[model_type]
    rows: List[_Row] = []
    for table in ("word", "position", "token_type"):
        if table != "token_type" or cfg.type_vocab_size:
            rows.append((f"{pre}.embeddings.{table}_embeddings.weight", (f"embeddings.{table}_embeddings.weight",),
                         "same"))
    pairs = [("embeddings.LayerNorm", "embeddings.LayerNorm")]
    for i in range(cfg.n_layer):
        hf, ours = f"encoder.layer.{i}", f"layers.{i}"
        pairs += [(f"{hf}.attention.self.query", f"{ours}.attention.q_proj"),
                  (f"{hf}.attention.self.key", f"{ours}.attention.k_proj"),
                  (f"{hf}.attention.self.value", f"{ours}.attention.v_proj"),
                  (f"{hf}.attention.output.dense", f"{ours}.attention.o_proj"),
                  (f"{hf}.attention.output.LayerNorm", f"{ours}.attention_norm"),
                  (f"{hf}.intermediate.dense", f"{ours}.mlp.fc"),
                  (f"{hf}.output.dense", f"{ours}.mlp.proj"),
                  (f"{hf}.output.LayerNorm", f"{ours}.output_norm")]
    pairs = [(f"{pre}.{hf}", ours) for hf, ours in pairs]
    if model_type == "bert":
        pairs += [("bert.pooler.dense", "pooler.dense"), ("cls.predictions.transform.dense", "mlm_head.dense"),
                  ("cls.predictions.transform.LayerNorm", "mlm_head.layer_norm"),
                  ("cls.seq_relationship", "seq_relationship")]
    else:
        pairs += [("lm_head.dense", "mlm_head.dense"), ("lm_head.layer_norm", "mlm_head.layer_norm")]
    rows += [(f"{hf}.{w}", (f"{ours}.{w}",), "same") for hf, ours in pairs for w in ("weight", "bias")]
    rows.append(("cls.predictions.bias" if model_type == "bert" else "lm_head.bias", ("mlm_head.bias",), "same"))
    return rows


def _encoder_tied(model_type: str) -> Dict[str, str]:
    """Tensors a checkpoint may store beside their original (the tied decoder): stored name -> original."""
    pre, head = ENCODER_PREFIX[model_type], ("cls.predictions" if model_type == "bert" else "lm_head")
    return {f"{head}.decoder.weight": f"{pre}.embeddings.word_embeddings.weight",
            f"{head}.decoder.bias": f"{head}.bias"}


def _encoder_ignored(model_type: str) -> Callable[[str], bool]:
    """Buffers some checkpoints carry (position and token-type ids), and RoBERTa's pooler, which the masked-LM
    model has no use for (transformers drops it too)."""
    pre = ENCODER_PREFIX[model_type]

    def ignored(name: str) -> bool:
        if name in (f"{pre}.embeddings.position_ids", f"{pre}.embeddings.token_type_ids"):
            return True
        return model_type == "roberta" and name.startswith("roberta.pooler.")

    return ignored


def _llama_ignored(name: str) -> bool:
    """Older LLaMA checkpoints store RoPE's inverse frequencies, which npformer recomputes."""
    return name.endswith(".self_attn.rotary_emb.inv_freq")


def _from_hf(layout: str, a: np.ndarray) -> List[np.ndarray]:
    """One HF tensor -> the npformer arrays of its row."""
    if layout == "same":
        return [a]
    if layout == "T":
        return [a.T]
    if layout == "qkv_T":
        return [part.T for part in np.split(a, 3, axis=1)]
    if layout == "qkv":
        return np.split(a, 3)
    raise AssertionError(layout)


def _to_hf(layout: str, parts: List[np.ndarray]) -> np.ndarray:
    """The npformer arrays of a row -> its HF tensor (the inverse of ``_from_hf``)."""
    if layout == "same":
        return parts[0]
    if layout == "T":
        return parts[0].T
    if layout == "qkv_T":
        return np.concatenate([p.T for p in parts], axis=1)
    if layout == "qkv":
        return np.concatenate(parts)
    raise AssertionError(layout)


# -- config maps -----------------------------------------------------------------------------------
def _gpt2_config(f: _Fields, dtype: str, block_size: Optional[int]):
    from ..models.gpt import GPTConfig

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


def _llama_config(f: _Fields, model_type: str, dtype: str, block_size: Optional[int]):
    from ..models.llama import LlamaConfig

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


def _encoder_config(f: _Fields, model_type: str, dtype: str, block_size: Optional[int]):
    from ..models.bert import BertConfig

    prefix = {"bert": "Bert", "roberta": "Roberta"}[model_type]
    architectures = f.doc.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) and a.startswith(prefix)
                                                      for a in architectures):
        raise f.fail("model_type", f"is {model_type!r}, but 'architectures' names {architectures!r:.80}, "
                                   f"not a {prefix}* model")
    f.require("hidden_act", ("gelu",), "gelu", "npformer's encoder layers use the exact (erf) GELU")
    f.require("position_embedding_type", ("absolute",), "absolute",
              "npformer's BERT has a learned table of absolute positions")
    f.require("is_decoder", (False,), False, "npformer's BERT is a bidirectional encoder")
    f.require("add_cross_attention", (False,), False, "npformer's BERT has no cross attention")
    f.require("tie_word_embeddings", (True,), True, "npformer's MLM head decodes with the word table itself")
    default_pad = 0 if model_type == "bert" else 1  # transformers' BertConfig / RobertaConfig defaults
    pad = None if f.doc.get("pad_token_id", default_pad) is None else f.get("pad_token_id", "int0", default_pad)
    if model_type == "roberta" and pad is None:
        raise f.fail("pad_token_id", "is null; RoBERTa counts its positions from the pad id")
    cfg = BertConfig(vocab_size=f.get("vocab_size", "int"), max_position=f.get("max_position_embeddings", "int"),
                     type_vocab_size=f.get("type_vocab_size", "int", 2), n_layer=f.get("num_hidden_layers", "int"),
                     n_head=f.get("num_attention_heads", "int"), d_model=f.get("hidden_size", "int"),
                     d_ff=f.get("intermediate_size", "int"), dropout=0.0,
                     layer_norm_eps=float(f.get("layer_norm_eps", "float", 1e-12)), pad_token_id=pad,
                     position_padding_idx=pad if model_type == "roberta" else None,
                     nsp_head=model_type == "bert", dtype=dtype)
    if block_size not in (None, cfg.block_size):
        raise ValueError(f"{f.op}: argument 'block_size' expected None or {cfg.block_size} for {model_type} (what "
                         f"its position table covers), got {block_size}")
    return cfg


def _family(model) -> str:
    """'gpt2' for npformer's GPT, 'llama' for its Llama (the config picks llama/mistral/qwen2), 'bert' for its
    Bert (the NSP head picks bert or roberta)."""
    from ..models.bert import Bert
    from ..models.gpt import GPT
    from ..models.llama import Llama

    if isinstance(model, GPT):
        return "gpt2"
    if isinstance(model, Llama):
        return "llama"
    if isinstance(model, Bert):
        return "bert"
    raise TypeError(f"save_pretrained: argument 'model' expected an npformer GPT, Llama or Bert, "
                    f"got {type(model).__name__}")


def _rows_for(model) -> List[_Row]:
    family = _family(model)
    if family == "gpt2":
        return _gpt2_rows(model.cfg.n_layer)
    if family == "bert":
        return _encoder_rows(model.cfg, _infer_model_type(model))
    return _llama_rows(model.cfg)


# -- loading -------------------------------------------------------------------------------------------
def load_pretrained(path, *, dtype: str = "float32", block_size: Optional[int] = None):
    """Build an npformer model from a Hugging Face folder (gpt2, llama, mistral, qwen2, bert, roberta).

    path: the folder with config.json and model.safetensors (or its sharded index).
    dtype: 'float32' or 'float64' for the parameters (16-bit weights widen exactly).
    block_size: the longest sequence the model will take; default the config's
    n_positions / max_position_embeddings (gpt2, bert and roberta: only that, their position
    table's). The model comes back in eval mode, with dropout 0.
    Raises HFFormatError naming the file and the field or tensor.
    """
    op = "load_pretrained"
    folder = _check_folder(op, path)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {dtype!r}")
    if block_size is not None and (type(block_size) is not int or block_size < 1):
        raise ValueError(f"{op}: argument 'block_size' expected None or an integer >= 1, got {block_size!r}")
    if not folder.is_dir():
        raise _error(op, folder, "is not a folder")
    config_path = folder / "config.json"
    f = _Fields(op, config_path, _read_json(op, config_path))
    model_type = f.get("model_type", "str")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise f.fail("model_type", f"is {model_type!r}, not one of the supported {list(SUPPORTED_MODEL_TYPES)}")
    if model_type == "gpt2":
        from ..models.gpt import GPT as Model

        make_config, rows_of, ignored = (lambda: _gpt2_config(f, dtype, block_size)), \
            (lambda c: _gpt2_rows(c.n_layer)), _gpt2_ignored
    elif model_type in ENCODER_PREFIX:
        from ..models.bert import Bert as Model

        make_config, rows_of, ignored = (lambda: _encoder_config(f, model_type, dtype, block_size)), \
            (lambda c: _encoder_rows(c, model_type)), _encoder_ignored(model_type)
    else:
        from ..models.llama import Llama as Model

        make_config, rows_of, ignored = (lambda: _llama_config(f, model_type, dtype, block_size)), \
            _llama_rows, _llama_ignored
    try:
        cfg = make_config()
    except HFFormatError:
        raise
    except (ValueError, TypeError) as err:
        if str(err).startswith(f"{op}: argument"):
            raise  # sizes npformer's config refuses (heads not dividing, ...)
        raise _error(op, config_path, f"describes a model npformer cannot build: {err}") from None
    model, rows = Model(cfg), rows_of(cfg)

    # One file first, then the sharded index: the order transformers reads a folder in
    weights = folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else folder / INDEX_FILE
    if not weights.is_file():
        raise _error(op, folder, f"holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        tensors = read_safetensors(weights, dtype=dtype)
    except SafetensorsError as err:
        raise HFFormatError(f"{op}: {err}") from None
    model.load_state_dict(_state_from_hf(op, weights, tensors, rows, ignored, model, model_type), strict=True)
    return model.eval()


def _state_from_hf(op, weights, tensors, rows, ignored, model, model_type) -> Dict[str, np.ndarray]:
    if model_type == "gpt2" and "transformer.wte.weight" not in tensors and "wte.weight" in tensors:
        # The original GPT-2 checkpoints name the transformer's tensors without the "transformer." prefix.
        tensors = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in tensors.items()}
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).data.dtype
    expected = {hf for hf, _, _ in rows}
    tied = getattr(model.cfg, "tie_word_embeddings", model_type == "gpt2")
    stored_twice = _encoder_tied(model_type) if model_type in ENCODER_PREFIX else {}
    for name in tensors:
        if name in expected or ignored(name):
            continue
        if name in stored_twice:  # the tied MLM decoder, stored again: it must be its original
            original = stored_twice[name]
            if original in tensors and np.array_equal(tensors[name], tensors[original]):
                continue
            raise _error(op, weights, f"tensor {name!r} differs from {original!r}, but npformer's MLM head "
                                      "decodes with that tensor itself (tied)")
        if tied and name == "lm_head.weight":  # some tied checkpoints store the head too: it must be the embedding
            embedding = "transformer.wte.weight" if model_type == "gpt2" else "model.embed_tokens.weight"
            if embedding in tensors and np.array_equal(tensors[name], tensors[embedding]):
                continue
            raise _error(op, weights, f"tensor 'lm_head.weight' differs from '{embedding}', but config.json "
                                      "ties the head to the embedding")
        raise _error(op, weights, f"unexpected tensor {name!r} for a {model_type} model of this config")
    state = {}
    for hf, ours, layout in rows:
        if hf not in tensors:
            raise _error(op, weights, f"missing tensor {hf!r}")
        a = tensors[hf]
        if a.dtype.kind != "f":
            raise _error(op, weights, f"tensor {hf!r} has dtype {a.dtype}, which npformer cannot read as weights")
        want = _to_hf(layout, [np.empty(params[n].shape, np.int8) for n in ours]).shape
        if a.shape != want:
            raise _error(op, weights, f"tensor {hf!r} has shape {a.shape}, but config.json implies {want}")
        with np.errstate(over="ignore", invalid="ignore"):
            narrowed = a.astype(dtype, copy=False)
        if narrowed.dtype != a.dtype and np.isfinite(a).all() and not np.isfinite(narrowed).all():
            raise _error(op, weights, f"tensor {hf!r} holds values beyond the range of {dtype}")
        a = narrowed
        for n, part in zip(ours, _from_hf(layout, a)):
            state[n] = np.ascontiguousarray(part)
    return state


# -- saving -----------------------------------------------------------------------------------------
def hf_state_dict(model, *, grads: bool = False, model_type: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The model's parameters (or, with ``grads=True``, their gradients) under HF names and layouts.

    The maps are linear (transposes, splits), so a gradient maps exactly as its parameter does.
    model_type: the names of which HF family, where a model has several ('bert' or 'roberta' for a
    Bert; default as ``save_pretrained``'s). The llama family's names are one table for all three.
    """
    params = dict(model.named_parameters())
    family = _family(model)
    if model_type is not None and model_type not in _MODEL_TYPES_OF[family]:
        raise ValueError(f"hf_state_dict: argument 'model_type' expected None or one of "
                         f"{list(_MODEL_TYPES_OF[family])} for a {type(model).__name__}, got {model_type!r}")
    if family == "bert" and model_type is not None:
        rows = _encoder_rows(model.cfg, model_type)
    else:
        rows = _rows_for(model)  # gpt2 and the llama family each have one table for all their types
    return {hf: np.ascontiguousarray(_to_hf(layout, [params[n].grad if grads else params[n].data for n in ours]))
            for hf, ours, layout in rows}


# The Hugging Face model types each npformer family is written as (``_family``'s names).
_MODEL_TYPES_OF = {"gpt2": ("gpt2",), "llama": ("llama", "mistral", "qwen2"), "bert": ("bert", "roberta")}


def _infer_model_type(model) -> str:
    if _family(model) == "gpt2":
        return "gpt2"
    if _family(model) == "bert":
        return "bert" if model.cfg.nsp_head else "roberta"
    cfg = model.cfg
    if cfg.qkv_bias and not cfg.o_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def _gpt2_config_json(cfg) -> dict:
    if not cfg.bias:
        raise ValueError("save_pretrained: argument 'model' has bias=False, which a gpt2 config cannot express "
                         "(GPT-2's linear layers always carry biases)")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": GPT_LAYERNORM_EPS,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def _llama_config_json(cfg, model_type: str) -> dict:
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
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    doc = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
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


def _encoder_config_json(cfg, model_type: str) -> dict:
    """config.json of a BertForPreTraining (model_type 'bert') or RobertaForMaskedLM ('roberta')."""
    op = "save_pretrained"
    if model_type == "bert" and (not cfg.nsp_head or cfg.position_padding_idx is not None):
        raise ValueError(f"{op}: argument 'model' expected, for 'bert', the NSP head and positions 0 .. T-1, got "
                         f"nsp_head={cfg.nsp_head}, position_padding_idx={cfg.position_padding_idx}")
    if model_type == "roberta" and (cfg.nsp_head or cfg.position_padding_idx is None
                                    or cfg.position_padding_idx != cfg.pad_token_id):
        raise ValueError(f"{op}: argument 'model' expected, for 'roberta', no NSP head and positions counted from "
                         f"the pad id (position_padding_idx == pad_token_id), got nsp_head={cfg.nsp_head}, "
                         f"position_padding_idx={cfg.position_padding_idx}, pad_token_id={cfg.pad_token_id}")
    if not cfg.type_vocab_size:
        raise ValueError(f"{op}: argument 'model' has type_vocab_size=0, which a {model_type} config cannot express "
                         "(its models always add a token-type embedding; use type_vocab_size=1)")
    return {"architectures": [ENCODER_ARCHITECTURES[model_type]], "model_type": model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
            "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def save_pretrained(model, path, *, model_type: Optional[str] = None, dtype: Optional[str] = None,
                    source=None) -> Path:
    """Write ``model`` as a Hugging Face folder: config.json and model.safetensors; returns the folder.

    model_type: 'gpt2' for a GPT; 'llama', 'mistral' or 'qwen2' for a Llama (default: qwen2 with
    qkv biases and no o bias, mistral with a sliding window, else llama); 'bert' or 'roberta' for a
    Bert (default: bert with the NSP head, roberta without).
    dtype: the stored float format, None (the parameters' own), 'float32', 'float64' or 'bfloat16'.
    source: a Hugging Face folder whose generation_config.json and tokenizer files are copied.
    """
    op = "save_pretrained"
    family = _family(model)
    folder = _check_folder(op, path)
    allowed = _MODEL_TYPES_OF[family]
    if model_type is None:
        model_type = _infer_model_type(model)
    elif model_type not in allowed:
        raise ValueError(f"{op}: argument 'model_type' expected one of {list(allowed)} for a "
                         f"{type(model).__name__}, got {model_type!r}")
    if dtype not in (None, "float32", "float64", "bfloat16"):
        raise ValueError(f"{op}: argument 'dtype' expected None, 'float32', 'float64' or 'bfloat16', got {dtype!r}")
    source_dir = None if source is None else _check_folder(op, source)
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"{op}: argument 'source' expected a folder, got {str(source_dir)!r}")
    if family == "gpt2":
        doc = _gpt2_config_json(model.cfg)
    elif family == "bert":
        doc = _encoder_config_json(model.cfg, model_type)
    else:
        doc = _llama_config_json(model.cfg, model_type)
    stored = dtype or model.cfg.dtype
    doc["dtype"] = stored
    if source_dir is not None:  # the source's special token ids, which generate() reads from config.json
        source_doc = _read_json(op, source_dir / "config.json") if (source_dir / "config.json").is_file() else {}
        doc.update({k: source_doc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source_doc})
    folder.mkdir(parents=True, exist_ok=True)
    _remove_shards(op, folder)  # a folder saved sharded before would otherwise keep its old weights beside the new
    write_safetensors(folder / SINGLE_FILE, hf_state_dict(model, model_type=model_type), metadata={"format": "pt"},
                      dtype=stored)
    (folder / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if source_dir is not None:
        for name in (GENERATION_FILE,) + TOKENIZER_FILES:
            if (source_dir / name).is_file() and (source_dir / name).resolve() != (folder / name).resolve():
                shutil.copyfile(source_dir / name, folder / name)
    return folder


def _remove_shards(op: str, folder: Path) -> None:
    """Delete a sharded checkpoint (its index and the shard files the index names) from ``folder``."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    weight_map = _read_json(op, index).get("weight_map")
    shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
    for name in shards:
        shard = folder / str(name)
        if shard.parent.resolve() == folder.resolve() and shard.suffix == ".safetensors" and shard.is_file():
            shard.unlink()
    index.unlink()


# -- generation config ----------------------------------------------------------------------------------
def _token_id(value) -> bool:
    return type(value) is int and value >= 0


_GENERATION_FIELDS: Dict[str, Tuple[str, Callable[[object], bool]]] = {
    "eos_token_id": ("an integer >= 0 or a non-empty list of them",
                     lambda v: _token_id(v) or (isinstance(v, list) and v != [] and all(map(_token_id, v)))),
    "bos_token_id": ("an integer >= 0", _token_id),
    "pad_token_id": ("an integer >= 0", _token_id),
    "max_new_tokens": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "do_sample": ("true or false", lambda v: type(v) is bool),
    "temperature": ("a number >= 0", lambda v: type(v) in (int, float) and np.isfinite(v) and v >= 0),
    "top_k": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: type(v) in (int, float) and 0 < v <= 1),
    "repetition_penalty": ("a number > 0", lambda v: type(v) in (int, float) and np.isfinite(v) and v > 0),
    "min_new_tokens": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "max_length": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
    "num_beams": ("an integer >= 1", lambda v: type(v) is int and v >= 1),
    "no_repeat_ngram_size": ("an integer >= 0", lambda v: type(v) is int and v >= 0),
}


def read_generation_config(path) -> dict:
    """generation_config.json of a folder as a dict ({} when the folder has none).

    The fields generation uses are checked (eos_token_id an int or list of ints; bos/pad
    token ids; max_new_tokens, max_length, min_new_tokens, do_sample, temperature, top_k,
    top_p, repetition_penalty, num_beams, no_repeat_ngram_size); null counts as absent and
    is dropped. Other fields pass through unchecked.
    """
    op = "read_generation_config"
    folder = _check_folder(op, path)
    file = folder / GENERATION_FILE if folder.is_dir() else folder
    if not file.is_file():
        return {}
    doc = _read_json(op, file)
    out = {}
    for key, value in doc.items():
        if value is None and key in _GENERATION_FIELDS:
            continue
        if key in _GENERATION_FIELDS:
            expected, ok = _GENERATION_FIELDS[key]
            if not ok(value):
                raise _error(op, file, f"field '{key}' expected {expected}, got {value!r:.80}")
        out[key] = value
    return out
