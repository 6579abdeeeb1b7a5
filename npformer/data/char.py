"""Character-level tokenizer: one id per distinct character, in sorted order.

    tok = CharTokenizer.from_text("hello")   # chars "ehlo": e=0, h=1, l=2, o=3
    tok.encode("hole") == [1, 3, 2, 0]
    tok.decode([1, 0, 2, 2, 3]) == "hello"

Ids follow the sorted code points of the characters, so the same text always gives
the same vocabulary. Encoding a character the tokenizer has not seen raises
``ValueError`` naming it; there is no "unknown" id.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import numpy as np


class CharTokenizer:
    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: argument 'chars' expected single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: argument 'chars' expected distinct characters")
        self.chars: List[str] = sorted(chars)
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        # Sorted code points: encoding is a vectorised binary search.
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids, shape (len(text),)."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        known = ids < len(self._codes)
        known[known] = self._codes[ids[known]] == codes[known]
        if not known.all():
            i = int(np.argmin(known))
            raise ValueError(f"CharTokenizer.encode: character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} "
                             f"is not in the vocabulary of {self.vocab_size} characters")
        return ids.astype(np.int64)

    def encode(self, text: str) -> List[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"CharTokenizer.decode: id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> Dict[str, str]:
        """JSON-able state (stored in checkpoints): ``{"kind": "char", "chars": "..."}``."""
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: Dict[str, str]) -> "CharTokenizer":
        if d.get("kind", "char") != "char":
            raise ValueError(f"CharTokenizer.from_dict: expected kind 'char', got {d.get('kind')!r}")
        return cls(d["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
