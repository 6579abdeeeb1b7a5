"""Built-in translation tasks: numbers in words and in digits, dates in two formats. No download.

Two tasks, each a bijection between two ways of writing the same thing:

``"numbers"``: English words -> digits, for the integers 0 to 999 999 (``number_to_words``)
    "zero", "seven", "forty-two", "one hundred", "three hundred and forty-two",
    "one thousand and five", "twelve thousand three hundred and four".
    The rules (British usage, no commas): below 20 a word of its own; below 100 the tens word,
    then "-" and the units word unless the units are 0 ("forty", "forty-two"); below 1000
    "<units> hundred", then " and <the rest>" unless the rest is 0; from 1000 on
    "<words of n // 1000> thousand", then, for a rest r = n % 1000 that is not 0,
    " and <words of r>" when r < 100 and " <words of r>" when r >= 100.
    ``words_to_number`` is its inverse and refuses any other spelling.
``"dates"``: ISO 8601 -> day month year, for every day from 1900-01-01 to 2099-12-31
    "2024-03-07" -> "7 March 2024" (the day without a leading zero, the month's English name).
    ``format_date`` and ``parse_date`` convert.

``reverse=True`` swaps source and target ("342" -> "three hundred and forty-two").

Splits. A pair's split is ``npformer.data.tasks.split_of`` of its forward source (the words, the
ISO date): the SHA-256 of the text against the cumulative fractions (0.8, 0.1, 0.1). So a pair
is in one split whatever the sizes asked for or the direction, and no pair is in two. The
examples of a split are the first ``size`` pairs of that split in a fixed walk of all the pairs:
numbers by digit count in turn (a 1-digit number, a 2-digit one, ..., a 6-digit one, then
again; a count whose numbers are used up is skipped), each count's numbers in the order of
``np.random.default_rng(0).permutation``; dates in the order of
``np.random.default_rng(0).permutation`` of the days. Small numbers thus come first and all of
them are placed (0 to 999 within the first 3700 pairs of the walk).

Vocabulary. ``TranslationVocab`` is character-level with three special ids, the same for both
tasks: ``PAD_ID = 0`` (padding), ``EOS_ID = 1`` (ends every source and target), ``BOS_ID = 2``
(the decoder's start token), then one id per character of ``CHARS`` in sorted order from 3.

Batches. ``translation_batches`` yields ``Seq2SeqBatch(src_ids, tgt_in, targets,
src_padding_mask)``: src_ids (B, S) the source's characters then EOS, padded with PAD;
targets (B, T) the target's characters then EOS, padded with -100; tgt_in = [BOS] +
targets[:, :-1] with -100 read as PAD; src_padding_mask (B, S) True at padding. S and T are the
longest source and target of the batch.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.lm import IGNORE_INDEX
from ..ops._checks import check_count
from .char import CharTokenizer
from .objectives import _check_rng
from .seq2seq_objectives import Seq2SeqBatch, shift_right
from .tasks import DEFAULT_FRACTIONS, SPLITS, _split_of
from .vocab import check_ids, check_text

__all__ = ["TRANSLATION_TASKS", "SPLITS", "PAD_ID", "EOS_ID", "BOS_ID", "CHARS", "MAX_NUMBER", "FIRST_DATE",
           "LAST_DATE", "DEFAULT_SIZES", "number_to_words", "words_to_number", "format_date", "parse_date",
           "TranslationPair", "TranslationTask", "TranslationVocab", "translation_task", "translation_batches"]

TRANSLATION_TASKS = ("numbers", "dates")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
# Every character either task writes: digits, space, hyphen, the lower-case letters, the months' capitals.
CHARS = "".join(sorted(set(" -0123456789abcdefghijklmnopqrstuvwxyz" + "".join(m[0] for m in MONTHS))))
MAX_NUMBER = 999_999
FIRST_DATE, LAST_DATE = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
DEFAULT_SIZES = (20_000, 1_000, 1_000)  # train, validation, test


# -- numbers ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _below_thousand() -> Tuple[str, ...]:
    """The words of 0 .. 999, by the rules of the module doc."""
    words = []
    for n in range(1000):
        hundreds, rest = divmod(n, 100)
        if rest < 20:
            tail = _UNITS[rest]
        else:
            tens, units = divmod(rest, 10)
            tail = _TENS[tens] + ("" if units == 0 else "-" + _UNITS[units])
        if hundreds == 0:
            words.append(tail)
        else:
            words.append(f"{_UNITS[hundreds]} hundred" + ("" if rest == 0 else f" and {tail}"))
    return tuple(words)


@functools.lru_cache(maxsize=1)
def _value_of() -> Dict[str, int]:
    return {w: n for n, w in enumerate(_below_thousand())}


def _check_number(op: str, n: object) -> int:
    return check_count(op, "n", n, lo=0, hi=MAX_NUMBER)


def number_to_words(n: int) -> str:
    """``n`` (an integer in [0, 999 999]) in English words; see the module doc for the rules."""
    return _words(_check_number("number_to_words", n))


def _words(n: int) -> str:
    small = _below_thousand()
    thousands, rest = divmod(n, 1000)
    if thousands == 0:
        return small[rest]
    head = f"{small[thousands]} thousand"
    if rest == 0:
        return head
    return f"{head} and {small[rest]}" if rest < 100 else f"{head} {small[rest]}"


def words_to_number(text: str) -> int:
    """The integer that ``number_to_words`` writes as ``text``; any other spelling is a ``ValueError``."""
    op = "words_to_number"
    check_text(op, "text", text)
    value = _value_of()
    head, sep, tail = text.partition(" thousand")
    if not sep:
        n = value.get(text)
    elif head not in value:
        n = None
    else:
        rest = 0 if tail == "" else value.get(tail[5:] if tail.startswith(" and ") else tail[1:])
        n = None if rest is None else value[head] * 1000 + rest
    if n is None or _words(n) != text:
        raise ValueError(f"{op}: argument 'text' expected a number from 0 to {MAX_NUMBER} in words as "
                         f"number_to_words writes it, got {text!r:.80}")
    return n


# -- dates -----------------------------------------------------------------------------------------

def _check_date(op: str, date: object) -> datetime.date:
    if type(date) is not datetime.date:  # a datetime is a date subclass with a time: refused
        raise TypeError(f"{op}: argument 'date' expected a datetime.date, got {type(date).__name__}")
    if not FIRST_DATE <= date <= LAST_DATE:
        raise ValueError(f"{op}: argument 'date' expected a date from {FIRST_DATE} to {LAST_DATE}, got {date}")
    return date


def format_date(date: datetime.date) -> str:
    """"7 March 2024" for ``datetime.date(2024, 3, 7)`` (1900-01-01 to 2099-12-31)."""
    d = _check_date("format_date", date)
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def parse_date(text: str) -> datetime.date:
    """The date that ``format_date`` writes as ``text`` ("7 March 2024"); any other form is a ``ValueError``."""
    op = "parse_date"
    check_text(op, "text", text)
    parts = text.split(" ")
    date = None
    if len(parts) == 3 and parts[1] in MONTHS and parts[0].isdigit() and parts[2].isdigit():
        try:
            date = datetime.date(int(parts[2]), MONTHS.index(parts[1]) + 1, int(parts[0]))
        except ValueError:  # no such day
            date = None
    if date is None or not FIRST_DATE <= date <= LAST_DATE or format_date(date) != text:
        raise ValueError(f"{op}: argument 'text' expected a date from {FIRST_DATE} to {LAST_DATE} written as "
                         f"'7 March 2024', got {text!r:.80}")
    return date


# -- tasks -------------------------------------------------------------------------------------------

class TranslationPair(NamedTuple):
    """One example: ``source`` -> ``target``; ``key`` is the forward source, which decides the split."""
    source: str
    target: str
    key: str


@dataclass(frozen=True)
class TranslationTask:
    """A translation task: its name, its direction, and three splits of pairs."""
    name: str
    reverse: bool
    train: Tuple[TranslationPair, ...]
    validation: Tuple[TranslationPair, ...]
    test: Tuple[TranslationPair, ...]

    def split(self, split: str) -> Tuple[TranslationPair, ...]:
        """The pairs of ``split`` ("train", "validation" or "test")."""
        if not isinstance(split, str) or split not in SPLITS:
            raise ValueError(f"TranslationTask.split: argument 'split' expected one of {SPLITS}, got {split!r:.40}")
        return getattr(self, split)

    @property
    def vocab(self) -> "TranslationVocab":
        return TranslationVocab()


def _number_walk() -> Iterator[Tuple[str, str]]:
    """(words, digits) of every number 0 .. 999 999, by digit count in turn (see the module doc)."""
    rng = np.random.default_rng(0)
    groups = [np.arange(0, 10)] + [np.arange(10 ** (d - 1), 10 ** d) for d in range(2, 7)]
    orders = [g[rng.permutation(g.size)] for g in groups]
    for i in range(max(o.size for o in orders)):
        for o in orders:
            if i < o.size:
                n = int(o[i])
                yield _words(n), str(n)


def _date_walk() -> Iterator[Tuple[str, str]]:
    """(ISO, long form) of every day from FIRST_DATE to LAST_DATE, in a fixed shuffled order."""
    days = (LAST_DATE - FIRST_DATE).days + 1
    for i in np.random.default_rng(0).permutation(days):
        d = FIRST_DATE + datetime.timedelta(days=int(i))
        yield d.isoformat(), format_date(d)


def translation_task(name: str = "numbers", *, sizes: Iterable[int] = DEFAULT_SIZES,
                     reverse: bool = False) -> TranslationTask:
    """The task ``name`` ("numbers" or "dates") with ``sizes`` = (train, validation, test) pairs; see the module doc."""
    op = "translation_task"
    if not isinstance(name, str) or name not in TRANSLATION_TASKS:
        raise ValueError(f"{op}: argument 'name' expected one of {TRANSLATION_TASKS}, got {name!r:.40}")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (tuple, list)) or len(sizes) != 3:
        raise TypeError(f"{op}: argument 'sizes' expected a tuple of 3 counts (train, validation, test), "
                        f"got {sizes!r:.60}")
    sizes = tuple(check_count(op, "sizes", s) for s in sizes)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"{op}: argument 'reverse' expected a bool, got {reverse!r:.40}")
    return _task(name, sizes, bool(reverse))


@functools.lru_cache(maxsize=8)
def _task(name: str, sizes: Tuple[int, int, int], reverse: bool) -> TranslationTask:
    want = dict(zip(SPLITS, sizes))
    found: Dict[str, List[TranslationPair]] = {s: [] for s in SPLITS}
    missing = sum(sizes)
    for source, target in (_number_walk() if name == "numbers" else _date_walk()):
        if missing == 0:
            break
        split = _split_of(source, DEFAULT_FRACTIONS)
        if len(found[split]) < want[split]:
            found[split].append(TranslationPair(target, source, source) if reverse
                                else TranslationPair(source, target, source))
            missing -= 1
    if missing:
        have = {s: len(v) for s, v in found.items()}
        raise ValueError(f"translation_task: argument 'sizes' expected at most the pairs each split holds "
                         f"({have} for {name!r}), got {sizes}")
    return TranslationTask(name, reverse, *(tuple(found[s]) for s in SPLITS))


# -- vocabulary and batches -------------------------------------------------------------------------

class TranslationVocab:
    """Characters of ``CHARS`` at ids 3, 4, ...; PAD_ID = 0, EOS_ID = 1, BOS_ID = 2."""
    pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID
    n_special = 3

    def __init__(self) -> None:
        self._chars = CharTokenizer(CHARS)

    @property
    def vocab_size(self) -> int:
        return self.n_special + self._chars.vocab_size

    def encode(self, text: str) -> List[int]:
        """The ids of ``text``'s characters (no special id); an unknown character is a ``ValueError``."""
        check_text("TranslationVocab.encode", "text", text)
        try:
            ids = self._chars.encode_array(text)
        except ValueError as e:
            raise ValueError(f"TranslationVocab.encode: argument 'text' has a character outside CHARS: {e}") from None
        return (ids + self.n_special).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of ``ids`` up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in check_ids("TranslationVocab.decode", "ids", ids, self.vocab_size):
            if i == EOS_ID:
                break
            if i >= self.n_special:
                out.append(self._chars.chars[i - self.n_special])
        return "".join(out)

    def __repr__(self) -> str:
        return f"TranslationVocab(vocab_size={self.vocab_size})"


def translation_batches(task: TranslationTask, split: str, *, batch_size: int = 32,
                        rng: Optional[np.random.Generator] = None) -> Iterator[Seq2SeqBatch]:
    """One pass over ``split`` in ``Seq2SeqBatch``es (see the module doc).

    The order is ``rng.permutation(N)`` (one call, before the first batch), or the split's order when
    ``rng`` is None; the last batch holds the N mod B left over, if any.
    """
    op = "translation_batches"
    if not isinstance(task, TranslationTask):
        raise TypeError(f"{op}: argument 'task' expected a TranslationTask, got {type(task).__name__}")
    pairs = task.split(split) if isinstance(split, str) and split in SPLITS else None
    if pairs is None:
        raise ValueError(f"{op}: argument 'split' expected one of {SPLITS}, got {split!r:.40}")
    B = check_count(op, "batch_size", batch_size, lo=1)
    if rng is not None:
        _check_rng(op, rng)
    order = np.arange(len(pairs)) if rng is None else rng.permutation(len(pairs))
    vocab = task.vocab

    def batches() -> Iterator[Seq2SeqBatch]:
        for at in range(0, len(order), B):
            rows = [pairs[i] for i in order[at: at + B]]
            src = [vocab.encode(p.source) + [EOS_ID] for p in rows]
            tgt = [vocab.encode(p.target) + [EOS_ID] for p in rows]
            S, T = max(map(len, src)), max(map(len, tgt))
            src_ids = np.full((len(rows), S), PAD_ID, dtype=np.int64)
            targets = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
            padding = np.ones((len(rows), S), dtype=bool)
            for b, (s, t) in enumerate(zip(src, tgt)):
                src_ids[b, : len(s)], targets[b, : len(t)], padding[b, : len(s)] = s, t, False
            yield Seq2SeqBatch(src_ids, shift_right(targets, BOS_ID, PAD_ID), targets, padding)

    return batches()
