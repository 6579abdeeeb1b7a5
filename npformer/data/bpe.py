"""Byte-level byte-pair encoding (BPE), trained and applied with the standard library.

Ids 0..255 are the 256 byte values, so *any* text encodes: it is first written as
UTF-8 bytes. Training learns merges: the most frequent adjacent pair of ids (a, b)
becomes a new id 256, the next one 257, and so on, until ``vocab_size`` ids exist.
Encoding replays the merges in the order they were learned; decoding concatenates
each id's bytes and reads them back as UTF-8 (so ``decode(encode(s)) == s`` for
every string ``s``, including emoji and scripts never seen in training).

Text is first split into chunks by ``PATTERN`` (a run of letters with one optional
leading space, a run of digits, a run of other symbols, whitespace), and merges never
cross a chunk boundary: "dog." and "dog!" share the token for " dog".

Training counts each distinct chunk once, with its frequency, and keeps the pair
counts up to date incrementally (only the chunks containing the merged pair are
revisited), taking the next pair from a heap. Ties go to the smallest pair (a, b),
so training is deterministic. About a second per MB of text for a few hundred merges.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

# Contractions; letters; digits; other symbols (and "_"); whitespace not followed by text; other whitespace.
# The alternatives cover every character; the last one is a safety net for anything else.
PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+|."""

Pair = Tuple[int, int]


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
        self.merges: List[Pair] = []
        for k, (a, b) in enumerate(merges):
            a, b = int(a), int(b)
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"ByteBPE: merge {k} = ({a}, {b}) refers to an id not defined before it")
            self.merges.append((a, b))
        self.pattern = pattern
        self._split = re.compile(pattern, re.DOTALL)
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
        if vocab_size < 256:
            raise ValueError(f"ByteBPE.train: argument 'vocab_size' expected at least 256, got {vocab_size}")
        chunks = Counter(re.findall(pattern, text, re.DOTALL))
        words = [list(chunk.encode("utf-8")) for chunk in chunks]
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
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            rank = self.ranks.get(pair)
            if rank is None:
                break  # no adjacent pair is a merge
            ids = _merge(ids, pair, 256 + rank)
        if len(self._cache) < 100_000:
            self._cache[chunk] = ids
        return ids

    def encode(self, text: str) -> List[int]:
        """UTF-8 bytes of ``text``, chunked by ``pattern``, with the merges applied in the order learned."""
        out: List[int] = []
        for chunk in self._split.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenated bytes of ``ids`` read as UTF-8; a cut through a multi-byte character becomes U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteBPE.decode: id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.vocab[i]

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, object]:
        return {"kind": "byte-bpe", "version": 1, "pattern": self.pattern, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "ByteBPE":
        if d.get("kind") != "byte-bpe" or d.get("version") != 1:
            raise ValueError(f"ByteBPE.from_dict: expected kind 'byte-bpe' version 1, "
                             f"got kind {d.get('kind')!r} version {d.get('version')!r}")
        return cls(d["merges"], d["pattern"])

    def save(self, path) -> Path:
        """Write the merges (and the split pattern) as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path) -> "ByteBPE":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteBPE) and self.merges == other.merges and self.pattern == other.pattern

    def __repr__(self) -> str:
        return f"ByteBPE(vocab_size={self.vocab_size})"
