"""Byte-level byte-pair encoding (BPE), trained and applied with the standard library.

Ids 0..255 are the 256 byte values, so *any* text encodes: it is first written as
UTF-8 bytes. Training learns merges: the most frequent adjacent pair of ids (a, b)
becomes a new id 256, the next one 257, and so on, until ``vocab_size`` ids exist.
Encoding replays the merges in the order they were learned; decoding concatenates
each id's bytes and reads them back as UTF-8 (so ``decode(encode(s)) == s`` for
every string ``s``, including emoji and scripts never seen in training).

Lone surrogates (U+D800..U+DFFF, which a Python ``str`` may hold, e.g. from
``os.fsdecode`` of a bad file name or half of a UTF-16 pair) have no UTF-8 form. They
are written as the three bytes UTF-8's scheme would give them (Python's
``"surrogatepass"``: U+D800 -> ED A0 80), and decoding reads those three bytes back
as the same surrogate, so the round trip holds for them too. Any other byte sequence
that is not UTF-8 (an id sequence cut through a character) decodes to U+FFFD per
bad byte, as ``errors="replace"`` does.

Text is first split into chunks by ``PATTERN`` (a run of letters with one optional
leading space, a run of digits, a run of other symbols, whitespace), and merges never
cross a chunk boundary: "dog." and "dog!" share the token for " dog". Another
``pattern`` may match only part of a text (``r"\\w+"`` skips spaces and punctuation):
the text between two matches (or before the first, or after the last) is then a chunk
of its own, so chunks always cover the whole text and nothing is dropped.

Training counts each distinct chunk once, with its frequency, and keeps the pair
counts up to date incrementally (only the chunks containing the merged pair are
revisited), taking the next pair from a heap. Ties go to the smallest pair (a, b),
so training is deterministic. About a second per MB of text for a few hundred merges.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..ops._checks import check_count
from .vocab import check_ids, check_text, fingerprint_of

# Contractions; letters; digits; other symbols (and "_"); whitespace not followed by text; other whitespace.
# The alternatives cover every character; the last one is a safety net for anything else.
PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|."""

Pair = Tuple[int, int]


_SURROGATEPASS = codecs.lookup_error("surrogatepass")
_REPLACE = codecs.lookup_error("replace")


def _surrogatepass_or_replace(exc: UnicodeError):
    """Decoding error handler: an encoded lone surrogate comes back as itself; other bad bytes as U+FFFD."""
    if isinstance(exc, UnicodeDecodeError):
        try:
            return _SURROGATEPASS(exc)
        except UnicodeDecodeError:
            return _REPLACE(exc)
    raise exc


_DECODE_ERRORS = "npformer.bpe.surrogatepass_or_replace"
codecs.register_error(_DECODE_ERRORS, _surrogatepass_or_replace)


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; a lone surrogate becomes its three-byte form (see the module doc)."""
    return text.encode("utf-8", "surrogatepass")


def _compile(op: str, pattern: object) -> "re.Pattern":
    if not isinstance(pattern, str):
        raise TypeError(f"{op}: argument 'pattern' expected a regular expression str, got {type(pattern).__name__}")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"{op}: argument 'pattern' is not a valid regular expression: {e}") from None
    if compiled.groups:
        raise ValueError(f"{op}: argument 'pattern' expected no capturing groups (use (?:...)), "
                         f"got {compiled.groups}")
    return compiled


def _chunks(split: "re.Pattern", text: str) -> List[str]:
    """``text`` cut into the pattern's matches and the (non-empty) stretches between them, in order.

    Joined, the chunks give ``text`` back, whatever the pattern matches; empty matches are dropped.
    """
    chunks: List[str] = []
    end = 0
    for match in split.finditer(text):
        start = match.start()
        if start > end:
            chunks.append(text[end:start])  # a gap the pattern does not match
        if match.end() > start:
            chunks.append(match.group())
        end = match.end()
    if end < len(text):
        chunks.append(text[end:])
    return chunks


def _merge(ids: Sequence[int], pair: Pair, new: int) -> List[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` (left to right) by ``new``."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class ByteBPE:
    """A list of merges; id ``256 + k`` is the k-th merge."""

    def __init__(self, merges: Iterable[Sequence[int]] = (), pattern: str = PATTERN):
        self._split = _compile("ByteBPE", pattern)
        self.pattern = pattern
        self.merges = _check_merges("ByteBPE", "merges", merges)
        self.ranks: Dict[Pair, int] = {pair: k for k, pair in enumerate(self.merges)}
        self.vocab: List[bytes] = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    # -- training ---------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, pattern: str = PATTERN) -> "ByteBPE":
        """Learn ``vocab_size - 256`` merges from ``text`` (fewer if no adjacent pair is left)."""
        check_text("ByteBPE.train", "text", text)
        vocab_size = check_count("ByteBPE.train", "vocab_size", vocab_size, lo=256)
        split = _compile("ByteBPE.train", pattern)
        chunks = Counter(_chunks(split, text))
        words = [list(_utf8(chunk)) for chunk in chunks]
        freqs = list(chunks.values())

        counts: Dict[Pair, int] = Counter()
        where: Dict[Pair, set] = {}  # pair -> indices of the words that contain (or once contained) it
        for w, (word, f) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                counts[pair] += f
                where.setdefault(pair, set()).add(w)
        heap = [(-c, pair) for pair, c in counts.items()]
        heapq.heapify(heap)

        merges: List[Pair] = []
        while len(merges) < vocab_size - 256 and heap:
            neg, pair = heapq.heappop(heap)
            if counts.get(pair, 0) != -neg or -neg <= 0:
                continue  # a stale heap entry: the count has changed since it was pushed
            new = 256 + len(merges)
            merges.append(pair)
            changed = set()
            for w in where.pop(pair):
                word, f = words[w], freqs[w]
                merged = _merge(word, pair, new)
                if len(merged) == len(word):
                    continue  # the pair left this word in an earlier merge
                for p in zip(word, word[1:]):
                    counts[p] -= f
                    changed.add(p)
                for p in zip(merged, merged[1:]):
                    counts[p] += f
                    changed.add(p)
                    where.setdefault(p, set()).add(w)
                words[w] = merged
            counts.pop(pair, None)
            for p in changed:
                if counts.get(p, 0) > 0:
                    heapq.heappush(heap, (-counts[p], p))
        return cls(merges, pattern)

    # -- encoding ---------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> List[int]:
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        ids = list(_utf8(chunk))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            rank = self.ranks.get(pair)
            if rank is None:
                break  # no adjacent pair is a merge
            ids = _merge(ids, pair, 256 + rank)
        if len(self._cache) < 100_000:
            self._cache[chunk] = ids
        return ids

    def _encode(self, text: str) -> List[int]:
        out: List[int] = []
        for chunk in _chunks(self._split, text):
            out.extend(self._encode_chunk(chunk))
        return out

    def encode(self, text: str) -> List[int]:
        """UTF-8 bytes of ``text``, chunked by ``pattern`` (gaps between matches are chunks too), with the
        merges applied in the order learned."""
        return self._encode(check_text("ByteBPE.encode", "text", text))

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as an int64 array, shape (N,)."""
        return np.asarray(self._encode(check_text("ByteBPE.encode_array", "text", text)), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenated bytes of ``ids`` read as UTF-8 (lone surrogates kept, other bad bytes -> U+FFFD)."""
        ids = check_ids("ByteBPE.decode", "ids", ids, self.vocab_size)
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors=_DECODE_ERRORS)

    def token_bytes(self, i: int) -> bytes:
        """The bytes id ``i`` stands for."""
        i = check_count("ByteBPE.token_bytes", "i", i)
        if i >= self.vocab_size:
            raise ValueError(f"ByteBPE.token_bytes: argument 'i' expected an id in [0, {self.vocab_size}), got {i}")
        return self.vocab[i]

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, object]:
        return {"kind": "byte-bpe", "version": 1, "pattern": self.pattern, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "ByteBPE":
        return cls._from_dict("ByteBPE.from_dict", "d", d)

    @classmethod
    def _from_dict(cls, op: str, name: str, d: object) -> "ByteBPE":
        if not isinstance(d, dict):
            raise TypeError(f"{op}: argument '{name}' expected a dict, got {type(d).__name__}")
        if d.get("kind") != "byte-bpe" or type(d.get("version")) is not int or d.get("version") != 1:
            raise ValueError(f"{op}: argument '{name}' expected kind 'byte-bpe' version 1, "
                             f"got kind {d.get('kind')!r:.40} version {d.get('version')!r:.40}")
        if not isinstance(d.get("merges"), list) or not isinstance(d.get("pattern"), str):
            raise ValueError(f"{op}: argument '{name}' expected a list under 'merges' and a str under 'pattern', "
                             f"got {type(d.get('merges')).__name__} and {type(d.get('pattern')).__name__}")
        try:
            return cls(d["merges"], d["pattern"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{op}: argument '{name}' holds a bad tokenizer: {e}") from None

    def save(self, path) -> Path:
        """Write the merges (and the split pattern) as JSON."""
        path = _path("ByteBPE.save", path)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "ByteBPE":
        """Read a file written by ``save``.

        A missing or unreadable file raises the ``OSError`` that names it (``FileNotFoundError``);
        one that is not a tokenizer written by ``save`` raises ``ValueError``.
        """
        path = _path("ByteBPE.load", path)
        raw = path.read_bytes()
        try:
            d = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ValueError(f"ByteBPE.load: argument 'path': {path} is not a JSON tokenizer file ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"ByteBPE.load: argument 'path': {path} holds a JSON {type(d).__name__}, "
                             "expected a tokenizer object")
        return cls._from_dict("ByteBPE.load", "path", d)

    def fingerprint(self) -> str:
        """``"sha256:..."`` of ``to_dict()``: equal for equal tokenizers."""
        return fingerprint_of(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteBPE) and self.merges == other.merges and self.pattern == other.pattern

    def __hash__(self) -> int:
        return hash((tuple(self.merges), self.pattern))

    def __repr__(self) -> str:
        return f"ByteBPE(vocab_size={self.vocab_size})"


def _path(op: str, path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: argument 'path' expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _check_merges(op: str, name: str, merges: object) -> List[Pair]:
    """A sequence of pairs (a, b) of integer ids, each defined before it, none repeated."""
    if isinstance(merges, (str, bytes, dict)) or not isinstance(merges, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a sequence of (a, b) id pairs, got {type(merges).__name__}")
    out: List[Pair] = []
    seen: Dict[Pair, int] = {}
    for k, pair in enumerate(merges):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable) or len(pair := tuple(pair)) != 2:
            raise ValueError(f"{op}: argument '{name}' expected pairs (a, b), got {pair!r:.40} as merge {k}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in pair):
            raise ValueError(f"{op}: argument '{name}' expected integer ids, got {pair!r:.40} as merge {k}")
        a, b = int(pair[0]), int(pair[1])
        if not (0 <= a < 256 + k and 0 <= b < 256 + k):
            raise ValueError(f"{op}: argument '{name}': merge {k} = ({a}, {b}) refers to an id not defined before it")
        if (a, b) in seen:
            raise ValueError(f"{op}: argument '{name}': merge {k} = ({a}, {b}) repeats merge {seen[(a, b)]}")
        seen[(a, b)] = k
        out.append((a, b))
    return out
