"""What one Hugging Face family's map is made of, and the record that holds it (``Family``).

A family map (``gpt2_map.py``, ``llama_map.py``, ``bert_map.py``, ``deberta_map.py``, ...) reads
config.json through ``_Fields`` (each error naming the file and the field), lists one ``_Row`` per
stored tensor (HF name, npformer names, layout) and writes config.json back. ``pretrained.py``
holds the families in one registry and loads, checks and saves every one of them the same way.

A model type may have several variants: layouts of one config that differ in their tensor names
or in the npformer model they are (DeBERTa-v2's two spellings of the MLM head, ELECTRA's
discriminator and generator). A family with one layout has the single variant ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["Family", "HFFormatError"]


class HFFormatError(ValueError):
    """A Hugging Face folder npformer cannot load: names the file and the field or tensor."""


def _error(op: str, path: Path, what: str) -> HFFormatError:
    return HFFormatError(f"{op}: {path}: {what}")


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

    def nullable(self, field: str, kind: str, default):
        """``default`` when the field is missing, None when it is null, else the checked value."""
        if field in self.doc and self.doc[field] is None:
            return None
        return self.get(field, kind, default)

    def token_id(self, field: str, default: int) -> int:
        """A special token's id: ``default`` when the field is missing; a null one is refused (npformer's
        encoder-decoders pad, stop and start decoding with these ids and have no "none")."""
        if field in self.doc and self.doc[field] is None:
            raise self.fail(field, "is null; npformer's model needs this id (an integer >= 0)")
        return self.get(field, "int0", default)

    def require(self, field: str, allowed, default, why: str):
        value = self.doc.get(field, default)
        if value not in allowed:
            raise self.fail(field, f"is {value!r:.80}; npformer supports only {list(allowed)} ({why})")
        return value

    def architectures(self, model_type: str, prefix: str) -> None:
        """'architectures' (absent, or a list) names only models of the family (``prefix``*)."""
        names = self.doc.get("architectures") or []
        if not isinstance(names, list) or not all(isinstance(a, str) and a.startswith(prefix) for a in names):
            raise self.fail("model_type", f"is {model_type!r}, but 'architectures' names {names!r:.80}, "
                                          f"not one of the {prefix}* models")

    def block_size(self, block_size: Optional[int], size: int, model_type: str) -> None:
        """A family whose absolute position table has ``size`` rows takes exactly that many positions."""
        if block_size not in (None, size):
            raise ValueError(f"{self.op}: argument 'block_size' expected None or {size} for {model_type} (what "
                             f"its position table covers), got {block_size}")


# -- the rows and their layouts ----------------------------------------------------------------------
# A row: (HF name, npformer names, layout). Layouts:
#   "same"     the array as it is
#   "T"        Conv1D weight (in, out) <-> npformer weight (out, in)
#   "qkv_T"    GPT-2's c_attn weight (D, 3D): columns [q | k | v], each transposed
#   "qkv"      GPT-2's c_attn bias (3D,): [q | k | v]
_Row = Tuple[str, Tuple[str, ...], str]


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


def _linear_rows(pairs: List[Tuple[str, str]]) -> List[_Row]:
    """The weight and the bias of each (HF module, npformer module) pair, moved over unchanged."""
    return [(f"{hf}.{w}", (f"{ours}.{w}",), "same") for hf, ours in pairs for w in ("weight", "bias")]


def _post_norm_sublayers(hf: str, ours: str) -> List[Tuple[str, str]]:
    """The modules after the attention scores in a BERT-style post-norm layer (HF prefix ``hf``, npformer's
    ``ours``): the attention output and its norm, the MLP's two linears and the output norm."""
    return [(f"{hf}.attention.output.dense", f"{ours}.attention.o_proj"),
            (f"{hf}.attention.output.LayerNorm", f"{ours}.attention_norm"),
            (f"{hf}.intermediate.dense", f"{ours}.mlp.fc"),
            (f"{hf}.output.dense", f"{ours}.mlp.proj"),
            (f"{hf}.output.LayerNorm", f"{ours}.output_norm")]


# -- the record ------------------------------------------------------------------------------------------
def _none_ignored(name: str, cfg, model_type: str) -> bool:
    return False


def _none_tied(cfg, variant: Optional[str], model_type: str) -> Dict[str, str]:
    return {}


def _one_variant(f: _Fields) -> Optional[str]:
    return None


def _same_names(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return tensors


@dataclass(frozen=True)
class Family:
    """One Hugging Face family: which folders it reads and writes, and the functions that map them.

    The functions take, after their own argument, the variant, then the model type (the
    arguments a family with one of each has no use for come last).

    name:            the registry's key ('gpt2', 'llama', 'bert', 'deberta', ...)
    model_types:     config.json's ``model_type`` values it reads and writes
    models:          variant -> the npformer model class it is loaded as (``None``: one layout);
                     ``isinstance`` against these picks the family of a model to save
    config_from_hf:  (fields, dtype, block_size) -> the npformer config, for config.json's
                     model_type (one of ``model_types``); refuses by name what the model cannot compute
    rows:            (cfg, variant, model_type) -> one ``_Row`` per stored tensor
    config_json:     (cfg, variant, model_type) -> config.json's fields (``ValueError`` naming
                     save_pretrained's argument where the model cannot be written as that type)
    infer:           model -> (model_type, variant) written by default
    variant_from_hf: fields -> the variant a folder holds
    ignored:         (name, cfg, model_type) -> True for a stored tensor that is not a parameter
                     (buffers, heads the model has no use for)
    tied:            (cfg, variant, model_type) -> {stored name: original} for tensors a
                     checkpoint may store again beside their original (a tied decoder); they
                     must equal it
    rename:          stored names -> the names the rows use (GPT-2's prefix-less checkpoints)
    """

    name: str
    model_types: Tuple[str, ...]
    models: Mapping[Optional[str], type]
    config_from_hf: Callable[[_Fields, str, Optional[int]], Any]
    rows: Callable[[Any, Optional[str], str], List[_Row]]
    config_json: Callable[[Any, Optional[str], str], dict]
    infer: Callable[[Any], Tuple[str, Optional[str]]]
    variant_from_hf: Callable[[_Fields], Optional[str]] = _one_variant
    ignored: Callable[[str, Any, str], bool] = _none_ignored
    tied: Callable[[Any, Optional[str], str], Dict[str, str]] = _none_tied
    rename: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]] = _same_names

    @property
    def classes(self) -> Tuple[type, ...]:
        """The distinct npformer model classes of the family, in the order of ``models``."""
        return tuple(dict.fromkeys(self.models.values()))
