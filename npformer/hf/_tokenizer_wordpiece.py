"""The WordPiece model of a ``tokenizer.json`` (BERT): greedy longest-match-first over each word.

A word (one pre-tokenized piece) is cut from the left: the longest prefix in the vocabulary is
the first token; then, from where it ended, the longest remainder-prefix that is in the
vocabulary once ``continuing_subword_prefix`` ("##") is put before it, and so on. If some
position has no such piece, or the word is longer than ``max_input_chars_per_word``
characters, the whole word is the unknown token.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ._tokenizer_parts import Reader

_CACHE_LIMIT = 100_000


def read_vocab(reader: Reader, spec: Dict[str, Any], where: str) -> Dict[str, int]:
    vocab = reader.get(spec, "vocab", dict, where)
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise reader.fail(f"{where}.vocab[{token!r}]", f"expected a non-negative int id, got {i!r}")
    return dict(vocab)


class WordPieceModel:
    """vocab: token -> id; ``tokenize(word)`` gives the ids of one word."""

    def __init__(self, reader: Reader, spec: Dict[str, Any], where: str = "model"):
        self.source, self.where = reader.file, where
        self.vocab: Dict[str, int] = read_vocab(reader, spec, where)
        self.id_to_token: Dict[int, str] = {i: t for t, i in self.vocab.items()}
        self.unk_token: str = reader.get(spec, "unk_token", str, where, "[UNK]")
        self.prefix: str = reader.get(spec, "continuing_subword_prefix", str, where, "##")
        self.max_chars: int = reader.get(spec, "max_input_chars_per_word", int, where, 100)
        if self.max_chars < 0:
            raise reader.fail(f"{where}.max_input_chars_per_word", f"expected a non-negative int, got {self.max_chars}")
        self._longest = max((len(t) for t in self.vocab), default=0)  # no piece is longer (prefix included)
        self._cache: Dict[str, List[int]] = {}

    def _unk(self) -> List[int]:
        if self.unk_token not in self.vocab:
            raise ValueError(f"{self.source}: {self.where}.unk_token: {self.unk_token!r} is needed but is not in "
                             f"{self.where}.vocab")
        return [self.vocab[self.unk_token]]

    def tokenize(self, word: str) -> List[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self._split(word)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return list(ids)

    def _split(self, word: str) -> List[int]:
        if len(word) > self.max_chars:
            return self._unk()
        ids: List[int] = []
        start = 0
        while start < len(word):
            head = self.prefix if start > 0 else ""
            end = min(len(word), start + self._longest - len(head))
            while end > start and head + word[start:end] not in self.vocab:
                end -= 1
            if end == start:  # no piece starts here: the whole word is unknown
                return self._unk()
            ids.append(self.vocab[head + word[start:end]])
            start = end
        return ids
