"""The BPE model of a ``tokenizer.json``: a word's characters merged pair by pair, lowest rank first.

A word (one pre-tokenized piece) starts as one symbol per character; a character missing
from the vocabulary becomes its UTF-8 bytes as ``<0xXX>`` tokens when ``byte_fallback`` is on
and all of them exist, else the unknown token (consecutive unknowns fused into one when
``fuse_unk``), else nothing. Then, repeatedly, the adjacent pair with the lowest merge rank
(the leftmost such pair on a tie) becomes the symbol the merge names, until no adjacent
pair has a merge. With ``ignore_merges`` a word that is itself in the vocabulary is that
one token. Results are cached per word.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, List, Optional, Tuple

from ._tokenizer_parts import Reader

_CACHE_LIMIT = 100_000


class BPEModel:
    """vocab: token -> id; merges: (left id, right id) -> (rank, merged id)."""

    def __init__(self, reader: Reader, spec: Any, where: str = "model"):
        spec = reader.obj(spec, where)
        self.source = reader.file
        kind = reader.get(spec, "type", str, where, "BPE" if "merges" in spec else None)
        if kind != "BPE":
            raise reader.fail(where, f"component type '{kind}' is not supported (supported: BPE)")
        vocab = reader.get(spec, "vocab", dict, where)
        for token, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise reader.fail(f"{where}.vocab[{token!r}]", f"expected a non-negative int id, got {i!r}")
        self.vocab: Dict[str, int] = dict(vocab)
        self.id_to_token: Dict[int, str] = {i: t for t, i in vocab.items()}
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if reader.get(spec, key, (str, None), where, None):
                raise reader.fail(f"{where}.{key}", "only null is supported")
        dropout = reader.get(spec, "dropout", (float, int, None), where, None)
        if dropout not in (None, 0, 0.0):
            raise reader.fail(f"{where}.dropout", f"only null or 0 is supported (no random merges), got {dropout!r}")
        self.byte_fallback: bool = reader.get(spec, "byte_fallback", bool, where, False)
        self.fuse_unk: bool = reader.get(spec, "fuse_unk", bool, where, False)
        self.ignore_merges: bool = reader.get(spec, "ignore_merges", bool, where, False)
        self.unk_token: Optional[str] = reader.get(spec, "unk_token", (str, None), where, None)
        self.merges: Dict[Tuple[int, int], Tuple[int, int]] = {}
        for rank, merge in enumerate(reader.get(spec, "merges", list, where)):
            w = f"{where}.merges[{rank}]"
            if isinstance(merge, str):
                parts = merge.split(" ")
            elif isinstance(merge, list) and all(isinstance(p, str) for p in merge):
                parts = merge
            else:
                raise reader.fail(w, f"expected \"a b\" or [a, b], got {merge!r:.60}")
            if len(parts) != 2:
                raise reader.fail(w, f"expected two tokens, got {merge!r:.60}")
            left, right = parts
            for token in (left, right, left + right):
                if token not in self.vocab:
                    raise reader.fail(w, f"merge {merge!r:.60} names token {token!r} that is not in {where}.vocab")
            # A merge listed twice keeps its last rank, as the reference implementation does.
            self.merges[(self.vocab[left], self.vocab[right])] = (rank, self.vocab[left + right])
        self.byte_ids: Dict[int, int] = {}
        if self.byte_fallback:
            self.byte_ids = {b: self.vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in self.vocab}
        self._cache: Dict[str, List[int]] = {}

    # ------------------------------------------------------------------ encoding

    def tokenize(self, word: str) -> List[int]:
        if not word:
            return []
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids = self._cache.get(word)
        if ids is None:
            ids = self._merge_word(word)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return list(ids)

    def _initial_symbols(self, word: str) -> List[int]:
        symbols: List[int] = []
        unk: Optional[int] = None  # an unknown token not yet written (it may fuse with the next)
        for c in word:
            i = self.vocab.get(c)
            if i is not None:
                if unk is not None:
                    symbols.append(unk)
                    unk = None
                symbols.append(i)
                continue
            if self.byte_fallback:
                data = c.encode("utf-8")
                if all(b in self.byte_ids for b in data):
                    symbols.extend(self.byte_ids[b] for b in data)
                    continue
            if self.unk_token is not None:
                unk_id = self.vocab.get(self.unk_token)
                if unk_id is None:
                    raise ValueError(
                        f"{self.source}: model.unk_token {self.unk_token!r} is not in model.vocab "
                        f"(needed for the unknown character {c!r})"
                    )
                if unk is not None and not self.fuse_unk:
                    symbols.append(unk)
                unk = unk_id
        if unk is not None:
            symbols.append(unk)
        return symbols

    def _merge_word(self, word: str) -> List[int]:
        ids = self._initial_symbols(word)
        n = len(ids)
        if n < 2:
            return ids
        merges = self.merges
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        alive = [True] * n
        heap: List[Tuple[int, int, int]] = []  # (rank, position, merged id)
        for pos in range(n - 1):
            m = merges.get((ids[pos], ids[pos + 1]))
            if m is not None:
                heap.append((m[0], pos, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, pos, new_id = heapq.heappop(heap)
            if not alive[pos] or nxt[pos] >= n:
                continue
            right = nxt[pos]
            m = merges.get((ids[pos], ids[right]))
            if m is None or m[1] != new_id:  # stale: one side was merged since this entry was queued
                continue
            ids[pos] = new_id
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[pos] < n:
                prev[nxt[pos]] = pos
            if prev[pos] >= 0:
                m = merges.get((ids[prev[pos]], new_id))
                if m is not None:
                    heapq.heappush(heap, (m[0], prev[pos], m[1]))
            if nxt[pos] < n:
                m = merges.get((new_id, ids[nxt[pos]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], pos, m[1]))
        return [i for i, a in zip(ids, alive) if a]
