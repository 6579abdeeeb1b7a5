"""The Unigram model of a ``tokenizer.json`` (SentencePiece: ALBERT, T5, DeBERTa-v2, XLNet).

Each piece p of the vocabulary has a score s(p) (a log-probability). A word w is cut into the
pieces p_1 ... p_k (w = p_1 ... p_k) of largest total score sum_j s(p_j), found by dynamic
programming (Viterbi) over the character positions 0..n of w:

    best[0] = 0,   best[e] = max over pieces p = w[b:e] of best[b] + s(p),

with the path kept as (start b, piece) for each e. Positions b are visited in increasing
order and, from each, pieces in increasing length; a candidate replaces the current one at
e only when strictly better, so on equal totals the earlier start and then the shorter piece
win. A character where no piece of exactly one character starts also gets an "unknown" edge
of score min_p s(p) - 10. Walking back from e = n gives the pieces; consecutive unknown
characters are fused into one piece. A piece not in the vocabulary (an unknown one) becomes
its UTF-8 bytes as ``<0xXX>`` tokens when ``byte_fallback`` is on and all of them exist,
else the ``unk_id`` token.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ._tokenizer_parts import Reader

_CACHE_LIMIT = 100_000
UNK_PENALTY = 10.0
_U64_MAX = 2**64 - 1


def reference_float(x: float) -> float:
    """``x`` as the reference implementation's JSON reader gets it from its shortest decimal form.

    That reader is not correctly rounded: it gathers the decimal digits into an unsigned 64-bit
    integer m (dropping digits that would overflow it, counting dropped integer digits in the
    exponent) and returns the float of m multiplied or divided by the float 10**|e| -- two
    roundings, so now and then one unit in the last place away from ``float(text)``. Scores that
    differ by one unit can decide a Viterbi tie, so the scores are read the same way here.
    """
    text = repr(float(x))
    if text in ("inf", "-inf", "nan"):
        return float(x)
    negative = text.startswith("-")
    text = text.lstrip("-")
    mantissa, _, exp_text = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    m, e = 0, int(exp_text) if exp_text else 0
    for d in whole:
        if m * 10 + int(d) > _U64_MAX:
            e += 1  # an integer digit past 64 bits: dropped, its place counted
        else:
            m = m * 10 + int(d)
    for d in fraction:
        if m * 10 + int(d) > _U64_MAX:
            break  # fraction digits past 64 bits: dropped
        m, e = m * 10 + int(d), e - 1
    f = float(m)
    while True:
        if abs(e) <= 308:
            f = f * float(10 ** e) if e >= 0 else f / float(10 ** -e)
            break
        if f == 0.0 or e > 0:
            break
        f, e = f / 1e308, e + 308
    return -f if negative else f


class UnigramModel:
    """vocab: piece -> id (the position in the file's list); ``tokenize(word)`` gives its ids."""

    def __init__(self, reader: Reader, spec: Dict[str, Any], where: str = "model"):
        self.source, self.where = reader.file, where
        entries = reader.get(spec, "vocab", list, where)
        if not entries:
            raise reader.fail(f"{where}.vocab", "expected at least one piece, got an empty list")
        self.scores: List[float] = []
        self.vocab: Dict[str, int] = {}
        self.id_to_token: Dict[int, str] = {}
        for i, entry in enumerate(entries):
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], (int, float)) or isinstance(entry[1], bool)):
                raise reader.fail(f"{where}.vocab[{i}]", f"expected [piece, score], got {entry!r:.60}")
            self.vocab[entry[0]] = i
            self.id_to_token[i] = entry[0]
            self.scores.append(reference_float(entry[1]))
        self.unk_id: Optional[int] = reader.get(spec, "unk_id", (int, None), where, None)
        if self.unk_id is not None and not 0 <= self.unk_id < len(entries):
            raise reader.fail(f"{where}.unk_id", f"expected an index into {where}.vocab (0..{len(entries) - 1}), "
                                                 f"got {self.unk_id}")
        self.byte_fallback: bool = reader.get(spec, "byte_fallback", bool, where, False)
        self.unk_score = min(self.scores) - UNK_PENALTY
        self._longest = max(len(p) for p in self.vocab)
        self._cache: Dict[str, List[int]] = {}

    def _unk_id(self) -> int:
        if self.unk_id is None:
            raise ValueError(f"{self.source}: {self.where}.unk_id: a piece is unknown but the model has no unk_id")
        return self.unk_id

    def segment(self, word: str) -> List[str]:
        """The best-scoring pieces of ``word`` (unknown runs fused), as strings."""
        n = len(word)
        score: List[float] = [0.0] * (n + 1)
        start: List[Optional[int]] = [None] * (n + 1)
        piece: List[int] = [-1] * (n + 1)  # id of the piece ending at e (-1: unknown)
        for b in range(n):
            here = score[b]
            single = False
            for e in range(b + 1, min(n, b + self._longest) + 1):
                i = self.vocab.get(word[b:e])
                if i is None:
                    continue
                candidate = here + self.scores[i]
                if start[e] is None or candidate > score[e]:
                    score[e], start[e], piece[e] = candidate, b, i
                if e == b + 1:
                    single = True
            if not single:
                candidate = here + self.unk_score
                if start[b + 1] is None or candidate > score[b + 1]:
                    score[b + 1], start[b + 1], piece[b + 1] = candidate, b, self._unk_id()
        pieces: List[str] = []
        unknown: List[str] = []  # a run of unknown characters, read backwards
        e = n
        while e > 0:
            b = start[e]
            if piece[e] == self.unk_id:
                unknown.append(word[b:e])
            else:
                if unknown:
                    pieces.append("".join(reversed(unknown)))
                    unknown = []
                pieces.append(word[b:e])
            e = b
        if unknown:
            pieces.append("".join(reversed(unknown)))
        pieces.reverse()
        return pieces

    def tokenize(self, word: str) -> List[int]:
        if not word:
            return []
        ids = self._cache.get(word)
        if ids is None:
            ids = []
            for p in self.segment(word):
                i = self.vocab.get(p)
                if i is None and self.byte_fallback:
                    byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in p.encode("utf-8")]
                    if all(j is not None for j in byte_ids):
                        ids.extend(byte_ids)
                        continue
                ids.append(self._unk_id() if i is None else i)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return list(ids)
