"""Character-level tokenizer: one id per distinct character, in sorted order.

    tok = CharTokenizer.from_text("hello")   # chars "ehlo": e=0, h=1, l=2, o=3
    tok.encode("hole") == [1, 3, 2, 0]
    tok.decode([1, 0, 2, 2, 3]) == "hello"

Ids follow the sorted code points of the characters, so the same text always gives
the same vocabulary. A character is one Python code point, lone surrogates included.
Encoding a character the tokenizer has not seen raises ``ValueError`` naming it (its
``repr`` and code point) and its index in the text; there is no "unknown" id.
Decoding refuses ids outside ``[0, vocab_size)`` the same way.

Two tokenizers are equal when their characters are; ``fingerprint()`` is a short hash
of ``to_dict()`` to store beside a checkpoint (see ``npformer.data.vocab``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Dict, List

import numpy as np

from .vocab import check_ids, check_text, fingerprint_of


class CharTokenizer:
    def __init__(self, chars: Iterable[str]):
        if isinstance(chars, (bytes, bytearray)) or not isinstance(chars, Iterable):
            raise TypeError(f"CharTokenizer: argument 'chars' expected an iterable of characters, "
                            f"got {type(chars).__name__}")
        chars = list(chars)
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer: argument 'chars' expected single characters, got {c!r:.40} "
                                 f"at position {i}")
        if not chars:
            raise ValueError("CharTokenizer: argument 'chars' expected at least one character, got none")
        if len(set(chars)) != len(chars):
            repeated = next(c for c in chars if chars.count(c) > 1)
            raise ValueError(f"CharTokenizer: argument 'chars' expected distinct characters, got {repeated!r} twice")
        self.chars: List[str] = sorted(chars)
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        # Sorted code points: encoding is a vectorised binary search.
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The characters of ``text`` (a non-empty str)."""
        check_text("CharTokenizer.from_text", "text", text)
        if not text:
            raise ValueError("CharTokenizer.from_text: argument 'text' expected at least one character, got ''")
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _encode(self, op: str, text: object) -> np.ndarray:
        text = check_text(op, "text", text)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        known = ids < len(self._codes)
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            i = int(np.argmin(known))
            raise ValueError(f"{op}: argument 'text' has character {text[i]!r} (U+{ord(text[i]):04X}) at position {i}, "
                             f"which is not in the vocabulary of {self.vocab_size} characters")
        return ids.astype(np.int64)

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids, shape (len(text),)."""
        return self._encode("CharTokenizer.encode_array", text)

    def encode(self, text: str) -> List[int]:
        return self._encode("CharTokenizer.encode", text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of ``ids`` (a sequence or 1-d array of integers in ``[0, vocab_size)``)."""
        return "".join(self.chars[i] for i in check_ids("CharTokenizer.decode", "ids", ids, self.vocab_size))

    def to_dict(self) -> Dict[str, str]:
        """JSON-able state (stored in checkpoints): ``{"kind": "char", "chars": "..."}``."""
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: Dict[str, str]) -> "CharTokenizer":
        if not isinstance(d, dict):
            raise TypeError(f"CharTokenizer.from_dict: argument 'd' expected a dict, got {type(d).__name__}")
        if d.get("kind", "char") != "char":
            raise ValueError(f"CharTokenizer.from_dict: argument 'd' expected kind 'char', got {d.get('kind')!r}")
        if not isinstance(d.get("chars"), str):
            raise ValueError(f"CharTokenizer.from_dict: argument 'd' expected a str under 'chars', "
                             f"got {type(d.get('chars')).__name__}")
        try:
            return cls(d["chars"])
        except ValueError as e:
            raise ValueError(f"CharTokenizer.from_dict: argument 'd' holds a bad vocabulary: {e}") from None

    def fingerprint(self) -> str:
        """``"sha256:..."`` of ``to_dict()``: equal for equal tokenizers."""
        return fingerprint_of(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
