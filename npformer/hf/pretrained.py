"""Hugging Face model folders in and out: config.json, the weights, and one registry of family maps.

A folder holds ``config.json`` (``model_type`` and the sizes), the weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``) and
optionally ``generation_config.json`` and tokenizer files.

Each family is one ``Family`` record (``family.py``), written out in its own map file, from its
config fields to npformer's config and from each of its tensor names to npformer's parameter
names, with the layout change in between:

- ``gpt2_map.py``: GPT-2 (``gpt2``); Conv1D weights transposed, ``c_attn`` split into q, k, v.
- ``llama_map.py``: LLaMA, Mistral and Qwen2 (``llama``, ``mistral``, ``qwen2``); unchanged tensors.
- ``mixtral_map.py``: Mixtral (``mixtral``), a ``Llama`` with experts; listed before LLaMA, since
  its model class is a subclass of ``Llama`` and the first family whose class matches writes a model.
- ``bert_map.py``: BERT (``bert``, as ``BertForPreTraining``) and RoBERTa (``roberta``, as
  ``RobertaForMaskedLM``); unchanged tensors, renamed.
- ``albert_map.py``: ALBERT (``albert``, as ``AlbertForPreTraining``); one shared layer.
- ``electra_map.py``: ELECTRA (``electra``), its discriminator (``ElectraForPreTraining``) or its
  generator (``ElectraForMaskedLM``); BERT's encoder names.
- ``deberta_map.py``: DeBERTa-v2/v3 (``deberta-v2``, as ``DebertaV2ForMaskedLM``), with either
  spelling of its MLM head.

``REGISTRY`` holds them; ``load_pretrained``, ``save_pretrained`` and ``hf_state_dict`` do the
same for every family: read and check config.json, check every stored tensor against the rows
(missing, unexpected, wrong shape or dtype, a tied copy that differs from its original), convert,
and the reverse. Whatever npformer's model cannot represent exactly is refused by name (a
different activation, a rope scaling, a sliding window where npformer has none, ...) rather than
loaded into a model that would compute something else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from . import (albert_map, bart_map, bert_map, deberta_map, electra_map, gpt2_map, llama_map, mamba_map, mixtral_map,
               t5_map)
from .family import Family, HFFormatError, _error, _Fields, _from_hf, _to_hf
from .safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsError, read_safetensors, write_safetensors

__all__ = ["HFFormatError", "load_pretrained", "save_pretrained", "read_generation_config", "hf_state_dict",
           "SUPPORTED_MODEL_TYPES", "REGISTRY"]

# The families by name; each reads and writes the model types it lists.
REGISTRY: Dict[str, Family] = {family.name: family for family in (
    gpt2_map.FAMILY, mixtral_map.FAMILY, llama_map.FAMILY, bert_map.FAMILY, albert_map.FAMILY, electra_map.FAMILY,
    deberta_map.FAMILY, t5_map.FAMILY, bart_map.FAMILY, mamba_map.FAMILY)}
_FAMILY_OF_TYPE: Dict[str, Family] = {t: family for family in REGISTRY.values() for t in family.model_types}
SUPPORTED_MODEL_TYPES = tuple(_FAMILY_OF_TYPE)
# What a folder's tokenizer may consist of (copied as they are by save_pretrained(source=...)).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
GENERATION_FILE = "generation_config.json"


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


# -- which family, type and variant a model is written as ----------------------------------------------
def _family_of(op: str, model) -> Family:
    for family in REGISTRY.values():
        if isinstance(model, family.classes):
            return family
    names = [cls.__name__ for family in REGISTRY.values() for cls in family.classes]
    raise TypeError(f"{op}: argument 'model' expected an npformer {', '.join(names[:-1])} or {names[-1]}, "
                    f"got {type(model).__name__}")


def _written_as(op: str, model, model_type: Optional[str], variant: Optional[str]) -> Tuple[Family, str, object]:
    """The family of ``model`` and the model type and variant it is written as (given, or the family's default)."""
    family = _family_of(op, model)
    default_type, default_variant = family.infer(model)
    kind = type(model).__name__
    if model_type is None:
        model_type = default_type
    elif model_type not in family.model_types:
        raise ValueError(f"{op}: argument 'model_type' expected None or one of {list(family.model_types)} for a "
                         f"{kind}, got {model_type!r}")
    named = [v for v in family.models if v is not None]
    if variant is None:
        variant = default_variant
    elif variant not in named:
        allowed = f"None or one of {named}" if named else f"None (a {kind} is written in one layout)"
        raise ValueError(f"{op}: argument 'variant' expected {allowed}, got {variant!r}")
    if not isinstance(model, family.models[variant]):
        raise ValueError(f"{op}: argument 'variant' {variant!r} is written from a {family.models[variant].__name__}, "
                         f"got a {kind}")
    return family, model_type, variant


def check_savable(model, *, model_type: Optional[str] = None, variant: Optional[str] = None) -> None:
    """Raise what ``save_pretrained`` would (TypeError for a model no family maps, ValueError for a config its
    config.json cannot express) without writing anything: a trainer checks this before its first step."""
    family, model_type, variant = _written_as("save_pretrained", model, model_type, variant)
    family.config_json(model.cfg, variant, model_type)


# -- loading -------------------------------------------------------------------------------------------
def load_pretrained(path, *, dtype: str = "float32", block_size: Optional[int] = None):
    """Build an npformer model from a Hugging Face folder (any of ``SUPPORTED_MODEL_TYPES``).

    path: the folder with config.json and model.safetensors (or its sharded index).
    dtype: 'float32' or 'float64' for the parameters (16-bit weights widen exactly).
    block_size: the longest sequence the model will take; default the config's
    n_positions / max_position_embeddings (a family with an absolute position table, gpt2,
    bert, roberta, deberta-v2 with position_biased_input: only that, the table's).
    The model comes back in eval mode, with dropout 0.
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
    if model_type not in _FAMILY_OF_TYPE:
        raise f.fail("model_type", f"is {model_type!r}, not one of the supported {list(SUPPORTED_MODEL_TYPES)}")
    family = _FAMILY_OF_TYPE[model_type]
    try:
        cfg = family.config_from_hf(f, dtype, block_size)
        variant = family.variant_from_hf(f)
    except HFFormatError:
        raise
    except (ValueError, TypeError) as err:
        if str(err).startswith(f"{op}: argument"):
            raise  # sizes npformer's config refuses (heads not dividing, ...)
        raise _error(op, config_path, f"describes a model npformer cannot build: {err}") from None
    model = family.models[variant](cfg)

    # One file first, then the sharded index: the order transformers reads a folder in
    weights = folder / SINGLE_FILE if (folder / SINGLE_FILE).is_file() else folder / INDEX_FILE
    if not weights.is_file():
        raise _error(op, folder, f"holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        tensors = read_safetensors(weights, dtype=dtype)
    except SafetensorsError as err:
        raise HFFormatError(f"{op}: {err}") from None
    model.load_state_dict(_state_from_hf(op, weights, tensors, family, model, model_type, variant), strict=True)
    return model.eval()


def _state_from_hf(op: str, weights: Path, tensors: Dict[str, np.ndarray], family: Family, model,
                   model_type: str, variant) -> Dict[str, np.ndarray]:
    """HF tensors (name -> array) -> npformer's state dict, by the family's rows; each error names the file and
    the tensor. Every stored tensor is a row's, ignored, or a tied copy equal to its original."""
    cfg = model.cfg
    tensors = family.rename(tensors)
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).data.dtype
    rows = family.rows(cfg, variant, model_type)
    expected, stored_twice = {hf for hf, _, _ in rows}, family.tied(cfg, variant, model_type)
    for name in tensors:
        if name in expected or family.ignored(name, cfg, model_type):
            continue
        if name in stored_twice:  # a tied tensor, stored again: it must be its original
            original = stored_twice[name]
            if original in tensors and np.array_equal(tensors[name], tensors[original]):
                continue
            raise _error(op, weights, f"tensor {name!r} differs from {original!r}, but the model is tied: it computes "
                                      f"with {original!r} in its place")
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
        for n, part in zip(ours, _from_hf(layout, narrowed)):
            state[n] = np.ascontiguousarray(part)
    return state


# -- saving -----------------------------------------------------------------------------------------
def hf_state_dict(model, *, grads: bool = False, model_type: Optional[str] = None,
                  variant: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The model's parameters (or, with ``grads=True``, their gradients) under HF names and layouts.

    The maps are linear (transposes, splits), so a gradient maps exactly as its parameter does.
    model_type, variant: the names of which HF model type and variant, where a family has several
    (default as ``save_pretrained``'s).
    """
    family, model_type, variant = _written_as("hf_state_dict", model, model_type, variant)
    params = dict(model.named_parameters())
    return {hf: np.ascontiguousarray(_to_hf(layout, [params[n].grad if grads else params[n].data for n in ours]))
            for hf, ours, layout in family.rows(model.cfg, variant, model_type)}


def save_pretrained(model, path, *, model_type: Optional[str] = None, variant: Optional[str] = None,
                    dtype: Optional[str] = None, source=None) -> Path:
    """Write ``model`` as a Hugging Face folder: config.json and model.safetensors; returns the folder.

    model_type: 'gpt2' for a GPT; 'llama', 'mistral' or 'qwen2' for a Llama (default: qwen2 with
    qkv biases and no o bias, mistral with a sliding window, else llama); 'bert' or 'roberta' for a
    Bert (default: bert with the NSP head, roberta without); 'deberta-v2' for a Deberta.
    variant: where a model type has several layouts, which one: for a Deberta 'legacy'
    (default: the MLM head as ``cls.predictions.*``) or 'lm_predictions' (config.json's legacy false).
    dtype: the stored float format, None (the parameters' own), 'float32', 'float64' or 'bfloat16'.
    source: a Hugging Face folder whose generation_config.json and tokenizer files are copied.
    """
    op = "save_pretrained"
    family, model_type, variant = _written_as(op, model, model_type, variant)
    folder = _check_folder(op, path)
    if dtype not in (None, "float32", "float64", "bfloat16"):
        raise ValueError(f"{op}: argument 'dtype' expected None, 'float32', 'float64' or 'bfloat16', got {dtype!r}")
    source_dir = None if source is None else _check_folder(op, source)
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"{op}: argument 'source' expected a folder, got {str(source_dir)!r}")
    doc = family.config_json(model.cfg, variant, model_type)
    stored = dtype or model.cfg.dtype
    doc["dtype"] = stored
    if source_dir is not None:  # the source's special token ids, which generate() reads from config.json
        source_doc = _read_json(op, source_dir / "config.json") if (source_dir / "config.json").is_file() else {}
        doc.update({k: source_doc[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source_doc})
    folder.mkdir(parents=True, exist_ok=True)
    _remove_shards(op, folder)  # a folder saved sharded before would otherwise keep its old weights beside the new
    write_safetensors(folder / SINGLE_FILE, hf_state_dict(model, model_type=model_type, variant=variant),
                      metadata={"format": "pt"}, dtype=stored)
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
