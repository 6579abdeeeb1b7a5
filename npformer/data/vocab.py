"""Checks shared by the tokenizers, and the comparison of a tokenizer with a model or a saved one.

Arguments (every check raises ``TypeError`` for a wrong type and ``ValueError`` for a
wrong value, naming the function and the argument):

- ``check_text(op, name, text)``: a ``str``;
- ``check_ids(op, name, ids, vocab_size)``: a 1-d sequence of integer ids in
  ``[0, vocab_size)`` (a list, tuple, range, iterator or 1-d integer array; bools,
  floats, strings and sets are refused, so ``2.7`` is never truncated to ``2``). A
  non-integer id is a ``TypeError`` in a list and in an array alike (``[1.0]`` and
  ``np.array([1.0])``); an array of another rank is a ``ValueError``.

Vocabularies (for a trainer resuming a run, or a sampler loading a checkpoint):

- ``check_vocab(tokenizer, vocab_size, where)``: the tokenizer's ids are exactly the
  model's ``0 .. vocab_size - 1``. A tokenizer with more ids than the model would
  index past its embedding; one with fewer could not decode every id the model
  samples, so it is refused too unless ``allow_padding=True`` (a model whose
  vocabulary is padded on purpose, e.g. to a multiple of 64);
- ``tokenizer_difference(saved, current)``: ``None`` when the two tokenizers are equal,
  else one line naming the first difference (characters present on one side only,
  the first merge that differs, the split pattern);
- ``check_same_tokenizer(saved, current, where)``: raises ``ValueError`` with that line.

Each tokenizer also has ``fingerprint()``: a short hash of its ``to_dict()``, equal for
equal tokenizers, to store beside a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import List, Optional

import numpy as np

from ..ops._checks import check_bool, check_count


def check_text(op: str, name: str, text: object) -> str:
    """``text`` must be a ``str`` (not bytes, not a list of characters)."""
    if not isinstance(text, str):
        raise TypeError(f"{op}: argument '{name}' expected a str, got {type(text).__name__}")
    return text


def check_ids(op: str, name: str, ids: object, vocab_size: int) -> List[int]:
    """``ids`` as a list of Python ints, each in ``[0, vocab_size)``."""

    def outside(i: int, v: int) -> ValueError:
        return ValueError(f"{op}: argument '{name}' has id {v} at position {i}, outside the vocabulary "
                          f"[0, {vocab_size})")

    if isinstance(ids, np.ndarray):
        # A non-integer id is a TypeError whether it comes in an array or a list; a wrong rank is a ValueError.
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{op}: argument '{name}' expected a 1-d integer array, got {ids.dtype} "
                            f"of shape {ids.shape}")
        if ids.ndim != 1:
            raise ValueError(f"{op}: argument '{name}' expected a 1-d integer array, got {ids.dtype} "
                             f"of shape {ids.shape}")
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise outside(i, int(ids[i]))
        return ids.tolist()
    if isinstance(ids, (str, bytes, bytearray, dict, set, frozenset)) or not isinstance(ids, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a sequence of integer ids, got {type(ids).__name__}")
    values = list(ids)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{op}: argument '{name}' expected integer ids, got {type(v).__name__} {v!r:.40} "
                            f"at position {i}")
        if not 0 <= v < vocab_size:
            raise outside(i, int(v))
    return [int(v) for v in values]


def fingerprint_of(state: dict) -> str:
    """``"sha256:<16 hex digits>"`` of a JSON-able dict, independent of key order."""
    raw = json.dumps(state, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def _vocab_size(op: str, name: str, tokenizer: object) -> int:
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not hasattr(tokenizer, "to_dict"):
        raise TypeError(f"{op}: argument '{name}' expected a tokenizer (CharTokenizer or ByteBPE), "
                        f"got {type(tokenizer).__name__}")
    return int(size)


def check_vocab(tokenizer: object, vocab_size: int, where: str = "check_vocab", *, allow_padding: bool = False) -> None:
    """Raise ``ValueError`` (prefixed with ``where``) unless ``tokenizer`` fits a model of ``vocab_size`` ids."""
    n = _vocab_size("check_vocab", "tokenizer", tokenizer)
    vocab_size = check_count("check_vocab", "vocab_size", vocab_size, lo=1)
    if not isinstance(where, str):
        raise TypeError(f"check_vocab: argument 'where' expected a str, got {type(where).__name__}")
    allow_padding = check_bool("check_vocab", "allow_padding", allow_padding)
    if n > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} ids but the model's vocab_size is {vocab_size}: "
                         f"ids {vocab_size}..{n - 1} would index past the model's embedding")
    if n < vocab_size and not allow_padding:
        raise ValueError(f"{where}: the tokenizer has {n} ids but the model's vocab_size is {vocab_size}: "
                         f"the model can produce ids {n}..{vocab_size - 1}, which the tokenizer cannot decode "
                         "(allow_padding=True accepts a vocabulary padded on purpose)")


def _some(chars: Iterable[str], limit: int = 10) -> str:
    chars = sorted(chars)
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


def tokenizer_difference(saved: object, current: object) -> Optional[str]:
    """``None`` if the two tokenizers are equal, else the first difference in one line."""
    return _difference("tokenizer_difference", saved, current)


def _difference(op: str, saved: object, current: object) -> Optional[str]:
    _vocab_size(op, "saved", saved)
    _vocab_size(op, "current", current)
    if type(saved) is not type(current):
        return (f"the saved tokenizer is a {type(saved).__name__} of {saved.vocab_size} ids, "
                f"the current one a {type(current).__name__} of {current.vocab_size} ids")
    if saved == current:
        return None
    a, b = saved.to_dict(), current.to_dict()
    if "chars" in a:
        only_saved, only_current = set(a["chars"]) - set(b["chars"]), set(b["chars"]) - set(a["chars"])
        parts = []
        if only_saved:
            parts.append(f"characters only in the saved vocabulary: {_some(only_saved)}")
        if only_current:
            parts.append(f"characters only in the current vocabulary: {_some(only_current)}")
        return f"{saved.vocab_size} saved characters against {current.vocab_size} current: " + "; ".join(parts)
    if a.get("pattern") != b.get("pattern"):
        return f"the split pattern differs: saved {a.get('pattern')!r:.80}, current {b.get('pattern')!r:.80}"
    ma, mb = a.get("merges", []), b.get("merges", [])
    for k, (x, y) in enumerate(zip(ma, mb)):
        if list(x) != list(y):
            return f"merge {k} (id {256 + k}) differs: saved {tuple(x)}, current {tuple(y)}"
    if len(ma) != len(mb):
        return (f"the saved tokenizer has {len(ma)} merges, the current one {len(mb)}; "
                f"the first {min(len(ma), len(mb))} agree")
    return f"the saved state {a!r:.100} differs from the current {b!r:.100}"


def check_same_tokenizer(saved: object, current: object, where: str = "check_same_tokenizer") -> None:
    """Raise ``ValueError`` (prefixed with ``where``) naming the first difference between two tokenizers."""
    if not isinstance(where, str):
        raise TypeError(f"check_same_tokenizer: argument 'where' expected a str, got {type(where).__name__}")
    difference = _difference("check_same_tokenizer", saved, current)
    if difference is not None:
        raise ValueError(f"{where}: the tokenizer does not match the saved one: {difference}")
