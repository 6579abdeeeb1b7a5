"""WordPiece vocabularies for BERT-style tokenizers: train one on a text, save it, load a ``vocab.txt``.

A WordPiece vocabulary holds word-initial pieces ("token") and continuation pieces written with
the prefix "##" ("##s"). Encoding (``npformer.hf.tokenizer``) cuts each word greedily, longest
piece first. The text is first split into words the way BERT does: control characters dropped,
whitespace as separators, CJK ideographs and every punctuation character as words of their own,
accents stripped and lower-cased when ``lowercase``.

Training (``train_wordpiece``): every word starts as its characters (the first plain, the others
with "##"); the vocabulary starts as the special tokens and every such character seen; then,
repeatedly, the most frequent adjacent pair of pieces (counted over the words, weighted by how
often each word occurs; ties broken by the pair's text) is merged into one piece -- "a" + "##b"
gives "ab", "##a" + "##b" gives "##ab" -- until ``vocab_size`` pieces exist or no pair occurs
``min_frequency`` times. The vocabulary it learns need not be the one another trainer learns;
the encoding of a given vocabulary is what ``load_vocab_txt`` reproduces exactly.

Files: ``save_vocab_txt`` writes one piece a line (the id is the line number), the format BERT
checkpoints ship; ``save_tokenizer_json`` writes the whole pipeline as a ``tokenizer.json``;
``load_vocab_txt(path, lowercase=True)`` gives the ``HFTokenizer`` that BERT's tokenizer built
from that ``vocab.txt`` is: the normalizer and pre-tokenizer above, "[UNK]" for a word it
cannot cut (or one over 100 characters), "[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]" with
token type ids 0 up to the first "[SEP]" and 1 after it (``encode_pair``).
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..hf._tokenizer_parts import WHITE_SPACE, bert_normalizer, is_punctuation
from ..hf.tokenizer import HFTokenizer
from ..ops._checks import check_bool, check_count
from .corpus import default_corpus

__all__ = ["SPECIAL_TOKENS", "bert_words", "train_wordpiece", "save_vocab_txt", "read_vocab_txt",
           "tokenizer_json", "save_tokenizer_json", "load_vocab_txt"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PREFIX = "##"
MAX_CHARS_PER_WORD = 100


def bert_words(text: str, lowercase: bool = True) -> List[str]:
    """The words BERT's normalizer and pre-tokenizer make of ``text``."""
    op = "bert_words"
    if not isinstance(text, str):
        raise TypeError(f"{op}: argument 'text' expected str, got {type(text).__name__}")
    lowercase = check_bool(op, "lowercase", lowercase)
    text = bert_normalizer(True, True, lowercase, lowercase)(text)
    words: List[str] = []
    current: List[str] = []
    for c in text:
        if c in WHITE_SPACE or is_punctuation(c):
            if current:
                words.append("".join(current))
                current = []
            if c not in WHITE_SPACE:
                words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


def _merge_word(word: List[str], a: str, b: str, merged: str) -> List[str]:
    out: List[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _pairs(word: List[str]) -> Counter:
    return Counter(zip(word, word[1:]))


def train_wordpiece(text: Optional[str] = None, vocab_size: int = 4000, *, lowercase: bool = True,
                    min_frequency: int = 2, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> List[str]:
    """A WordPiece vocabulary (special tokens first, then characters, then merged pieces) learned
    from ``text`` (default: ``default_corpus()``); see the module docstring for the rule."""
    op = "train_wordpiece"
    if text is None:
        text = default_corpus()
    if not isinstance(text, str):
        raise TypeError(f"{op}: argument 'text' expected str or None, got {type(text).__name__}")
    vocab_size = check_count(op, "vocab_size", vocab_size, lo=1)
    min_frequency = check_count(op, "min_frequency", min_frequency, lo=1)
    lowercase = check_bool(op, "lowercase", lowercase)
    if isinstance(special_tokens, str) or not all(isinstance(t, str) and t for t in special_tokens):
        raise TypeError(f"{op}: argument 'special_tokens' expected a sequence of non-empty str, "
                        f"got {special_tokens!r:.60}")
    vocab: List[str] = list(dict.fromkeys(special_tokens))
    known = set(vocab)
    counts = Counter(w for w in bert_words(text, lowercase) if len(w) <= MAX_CHARS_PER_WORD)
    words = [[w[0]] + [PREFIX + c for c in w[1:]] for w in counts]
    freq = list(counts.values())
    alphabet = Counter()
    for word, n in zip(words, freq):
        for piece in word:
            alphabet[piece] += n
    for piece in sorted(alphabet, key=lambda p: (-alphabet[p], p)):
        if piece not in known:
            vocab.append(piece)
            known.add(piece)
    # Pair counts, the words each pair occurs in, and a max-heap of (count, pair) checked lazily.
    pair_count: Counter = Counter()
    where: Dict[Tuple[str, str], set] = {}
    for k, (word, n) in enumerate(zip(words, freq)):
        for pair, m in _pairs(word).items():
            pair_count[pair] += m * n
            where.setdefault(pair, set()).add(k)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:  # stale entry
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[len(PREFIX):]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: Dict[Tuple[str, str], int] = {}
        for k in where.pop(pair, set()):
            old = words[k]
            new = _merge_word(old, a, b, merged)
            n = freq[k]
            for p, m in _pairs(old).items():
                pair_count[p] -= m * n
                changed[p] = pair_count[p]
            for p, m in _pairs(new).items():
                pair_count[p] += m * n
                changed[p] = pair_count[p]
                where.setdefault(p, set()).add(k)
            words[k] = new
        pair_count.pop(pair, None)
        for p, c in changed.items():
            if c <= 0:
                pair_count.pop(p, None)
            elif p != pair:
                heapq.heappush(heap, (-c, p))
    return vocab


def _path(op: str, path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: argument 'path' expected a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _check_vocab(op: str, vocab: object) -> List[str]:
    if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Iterable):
        raise TypeError(f"{op}: argument 'vocab' expected a sequence of str, got {type(vocab).__name__}")
    vocab = list(vocab)
    for k, t in enumerate(vocab):
        if not isinstance(t, str) or not t or "\n" in t or "\r" in t:
            raise ValueError(f"{op}: argument 'vocab' expected non-empty one-line str pieces, got {t!r:.40} at {k}")
    return vocab


def save_vocab_txt(vocab: Sequence[str], path) -> None:
    """Write ``vocab`` one piece a line (UTF-8): the piece on line i has id i."""
    op = "save_vocab_txt"
    vocab = _check_vocab(op, vocab)
    _path(op, path).write_text("".join(t + "\n" for t in vocab), encoding="utf-8")


def read_vocab_txt(path) -> Dict[str, int]:
    """piece -> id of a ``vocab.txt``: line i (newline removed) has id i; a repeated line keeps its last id."""
    op = "read_vocab_txt"
    path = _path(op, path)
    if not path.is_file():
        raise ValueError(f"{op}: file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:  # universal newlines, as BERT's own reader
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    vocab = {line.rstrip("\n"): i for i, line in enumerate(lines)}
    if not vocab:
        raise ValueError(f"{path}: empty vocabulary")
    return vocab


def tokenizer_json(vocab, lowercase: bool = True, unk_token: str = "[UNK]") -> Dict[str, Any]:
    """The ``tokenizer.json`` description of BERT's tokenizer over ``vocab`` (a list, id = position, or a
    dict piece -> id). The special tokens of ``SPECIAL_TOKENS`` in it are added tokens."""
    op = "tokenizer_json"
    lowercase = check_bool(op, "lowercase", lowercase)
    if isinstance(vocab, dict):
        ids = dict(vocab)
    else:
        ids = {t: i for i, t in enumerate(_check_vocab(op, vocab))}
    for token in (unk_token, "[CLS]", "[SEP]"):
        if token not in ids:
            raise ValueError(f"{op}: argument 'vocab' has no {token!r} piece")
    added = [{"id": ids[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIAL_TOKENS if t in ids]
    cls, sep = ids["[CLS]"], ids["[SEP]"]

    def special(name: str, type_id: int):
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def sequence(name: str, type_id: int):
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": sorted(added, key=lambda t: t["id"]),
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), sequence("A", 0), special("[SEP]", 0), sequence("B", 1),
                     special("[SEP]", 1)],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}},
        },
        "decoder": {"type": "WordPiece", "prefix": PREFIX, "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": unk_token, "continuing_subword_prefix": PREFIX,
                  "max_input_chars_per_word": MAX_CHARS_PER_WORD, "vocab": ids},
    }


def save_tokenizer_json(vocab, path, lowercase: bool = True) -> None:
    """Write ``tokenizer_json(vocab, lowercase)`` to ``path``."""
    op = "save_tokenizer_json"
    spec = tokenizer_json(vocab, lowercase)
    _path(op, path).write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")


def load_vocab_txt(path, lowercase: bool = True) -> HFTokenizer:
    """BERT's tokenizer over the ``vocab.txt`` at ``path`` (``lowercase``: BERT's ``do_lower_case``, which
    also strips accents)."""
    op = "load_vocab_txt"
    lowercase = check_bool(op, "lowercase", lowercase)
    vocab = read_vocab_txt(path)
    try:
        spec = tokenizer_json(vocab, lowercase)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return HFTokenizer(spec, source=str(path), pad_token="[PAD]" if "[PAD]" in vocab else None)
