"""Synthetic arithmetic: n-digit addition, subtraction and multiplication as text.

A problem is a line such as ``"123+456=579\\n"``. Operands are drawn uniformly from
[0, 10^n), so with ``digits=3`` both "7" and "999" occur.

Formats (``ArithmeticTask`` options):

- ``fixed_width=True`` (default): operands are zero-padded to n digits and answers
  to the widest possible answer, so every line of a task has the same length::

      "+", n=3:  "007+456=0463\\n"     answer width n + 1
      "-", n=3:  "007-456=-449\\n"     answer width n + 1: "-" and n digits, or n + 1 digits
                 "456-007=0449\\n"
      "*", n=3:  "007*456=003192\\n"   answer width 2n

  ``fixed_width=False`` writes plain integers: ``"7+456=463\\n"``.
- ``reverse=True`` writes the answer's characters in reverse (least significant digit
  first, the order in which carries are computed): ``"007+456=3640\\n"``, and a negative
  answer ends in its sign: ``"007-456=944-\\n"``.

Training and held-out problems never overlap: a problem is held out when a 64-bit hash
of (op, a, b) falls below ``heldout_fraction`` (with a, b sorted for the commutative
"+" and "*", so "3+5" and "5+3" are on the same side). The split depends on the
operands only, not on ``digits`` or the format, so a problem keeps its side across
tasks of different widths. ``sample`` draws by rejection from the requested side.

``make_batch`` turns problems into ``(x, y, loss_mask)``: next-token pairs whose targets
are ``IGNORE_INDEX`` (-100, as ``cross_entropy(..., ignore_index=-100)`` expects) except
on the answer characters and the closing newline, so the loss measures the answers only.

Every option is checked where it enters: ``op`` one of ``OPS``, ``digits`` an integer in
[1, 9], operands integers in [0, 10^digits), the format flags bools, ``heldout_fraction``
in (0, 1), counts (``n``, ``batch_size``, ``block_size``) integers >= 1, a tokenizer
holding every character of ``VOCAB``. A wrong one raises ``ValueError`` or ``TypeError``
naming the function and the argument.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..ops._checks import check_bool, check_count, check_real
from .char import CharTokenizer
from .vocab import check_text

IGNORE_INDEX = -100
OPS = ("+", "-", "*")
VOCAB = "\n*+-0123456789="
_SALT = {"+": 0x2545F4914F6CDD1D, "-": 0x9E3779B97F4A7C15, "*": 0xD6E8FEB86659FD93}
_M64 = (1 << 64) - 1
MAX_DIGITS = 9  # operands below 10^9 < 2^32, the range the held-out hash takes
_ANSWER = re.compile(r"-?[0-9]+", re.ASCII)  # an answer as written (sign first): ASCII digits, nothing else


def _check_op(op: str, value: object) -> str:
    if not isinstance(value, str) or value not in OPS:
        raise ValueError(f"{op}: argument 'op' expected one of {OPS}, got {value!r:.40}")
    return value


def _check_digits(op: str, value: object) -> int:
    digits = check_count(op, "digits", value, lo=1)
    if digits > MAX_DIGITS:
        raise ValueError(f"{op}: argument 'digits' expected an integer in [1, {MAX_DIGITS}], got {value!r}")
    return digits


def _check_rng(op: str, rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_tokenizer(op: str, tok: object) -> CharTokenizer:
    """``tok`` (``None`` for the default) must be a CharTokenizer that holds every character of ``VOCAB``."""
    if tok is None:
        return tokenizer()
    if not isinstance(tok, CharTokenizer):
        raise TypeError(f"{op}: argument 'tok' expected a CharTokenizer or None, got {type(tok).__name__}")
    missing = [c for c in VOCAB if c not in tok.stoi]
    if missing:
        raise ValueError(f"{op}: argument 'tok' expected a vocabulary holding {VOCAB!r}, "
                         f"missing {''.join(missing)!r}")
    return tok


def _check_problems(op: str, problems: object) -> List["Problem"]:
    if isinstance(problems, (str, bytes, dict)) or not isinstance(problems, Iterable):
        raise TypeError(f"{op}: argument 'problems' expected a sequence of Problem, got {type(problems).__name__}")
    problems = list(problems)
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise TypeError(f"{op}: argument 'problems' expected Problem entries, got {type(p).__name__} "
                            f"at position {i}")
    if not problems:
        raise ValueError(f"{op}: argument 'problems' expected at least one problem, got 0")
    return problems


def tokenizer() -> CharTokenizer:
    """The character tokenizer of every arithmetic format: digits, ``+ - * =`` and newline."""
    return CharTokenizer(VOCAB)


@dataclass(frozen=True)
class Problem:
    """One problem and its format; ``text == prompt + answer + "\\n"``."""

    a: int
    b: int
    op: str = "+"
    digits: int = 3
    fixed_width: bool = True
    reverse: bool = False

    def __post_init__(self):
        _check_op("Problem", self.op)
        digits = _check_digits("Problem", self.digits)
        for name in ("a", "b"):
            value = check_count("Problem", name, getattr(self, name), lo=0)
            if value >= 10**digits:
                raise ValueError(f"Problem: argument '{name}' expected an integer in [0, 10^{digits}), got {value}")
        check_bool("Problem", "fixed_width", self.fixed_width)
        check_bool("Problem", "reverse", self.reverse)

    @property
    def result(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def answer_width(self) -> int:
        return 2 * self.digits if self.op == "*" else self.digits + 1

    @property
    def prompt(self) -> str:
        if self.fixed_width:
            return f"{self.a:0{self.digits}d}{self.op}{self.b:0{self.digits}d}="
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        r = self.result
        # "0{w}d" pads after the sign: -42 -> "-042" (width 4), 42 -> "0042".
        s = f"{r:0{self.answer_width}d}" if self.fixed_width else str(r)
        return s[::-1] if self.reverse else s

    @property
    def text(self) -> str:
        return self.prompt + self.answer + "\n"

    def parse(self, answer: str) -> Optional[int]:
        """The integer an answer string in this problem's format stands for (None if it is not one).

        Surrounding whitespace (the closing newline) is ignored; what remains must be ASCII
        digits with an optional leading "-" (trailing, when ``reverse``), the only characters
        an answer is written with. ``int``'s other spellings ("1_0", "+5", "٣", " 5 ") are
        not answers, so they give None.
        """
        s = check_text("Problem.parse", "answer", answer).strip()
        s = s[::-1] if self.reverse else s
        return int(s) if _ANSWER.fullmatch(s) else None


def _operand(where: str, name: str, x: object) -> np.ndarray:
    """Operands of ``heldout_mask`` as uint64, refusing floats, bools and values outside [0, 2^32).

    An empty list or tuple is an empty set of operands (NumPy alone would make it float64).
    """
    arr = np.asarray(x) if isinstance(x, (np.ndarray, int, np.integer, list, tuple, range)) else None
    if arr is not None and arr.size == 0 and isinstance(x, (list, tuple)) and arr.dtype == np.float64:
        arr = arr.astype(np.int64)
    if arr is None or isinstance(x, (bool, np.bool_)) or arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: argument '{name}' expected integers in [0, 2^32), got "
                         f"{type(x).__name__}{'' if arr is None else ' of dtype ' + str(arr.dtype)}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 32):
        raise ValueError(f"{where}: argument '{name}' expected integers in [0, 2^32), "
                         f"got values in [{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def heldout_mask(op: str, a, b, fraction: float) -> np.ndarray:
    """Whether each problem (op, a[i], b[i]) belongs to the held-out side.

    a, b: integers in [0, 2^32) of broadcastable shapes -> a bool array of their broadcast shape.
    """
    return _heldout_mask("heldout_mask", op, a, b, fraction)


def _heldout_mask(where: str, op: str, a, b, fraction: float) -> np.ndarray:
    _check_op(where, op)
    fraction = check_real(where, "fraction", fraction, lo=0.0, hi=1.0)
    a, b = _operand(where, "a", a), _operand(where, "b", b)
    try:
        a, b = np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(f"{where}: arguments 'a' and 'b' expected broadcastable shapes, "
                         f"got {a.shape} and {b.shape}") from None
    shape = a.shape
    a, b = a.ravel(), b.ravel()  # 1-d: uint64 arithmetic wraps silently on arrays, not on scalars
    if op in ("+", "*"):
        a, b = np.minimum(a, b), np.maximum(a, b)
    key = (a << np.uint64(32)) | b
    key ^= np.uint64(_SALT[op])
    u = (_mix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    return (u < fraction).reshape(shape)


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems ``a op b`` with a, b uniform in [0, 10^digits), in one format, split into train / held out."""

    op: str = "+"
    digits: int = 3
    fixed_width: bool = True
    reverse: bool = False
    heldout_fraction: float = 0.1

    def __post_init__(self):
        _check_op("ArithmeticTask", self.op)
        _check_digits("ArithmeticTask", self.digits)
        check_bool("ArithmeticTask", "fixed_width", self.fixed_width)
        check_bool("ArithmeticTask", "reverse", self.reverse)
        check_real("ArithmeticTask", "heldout_fraction", self.heldout_fraction, lo=0.0, hi=1.0,
                   lo_open=True, hi_open=True)

    def problem(self, a: int, b: int) -> Problem:
        """The problem ``a op b`` in this task's format; a, b integers in [0, 10^digits)."""
        for name, value in (("a", a), ("b", b)):
            value = check_count("ArithmeticTask.problem", name, value, lo=0)
            if value >= 10**self.digits:
                raise ValueError(f"ArithmeticTask.problem: argument '{name}' expected an integer in "
                                 f"[0, 10^{self.digits}), got {value}")
        return Problem(int(a), int(b), self.op, self.digits, self.fixed_width, self.reverse)

    def is_heldout(self, a, b) -> np.ndarray:
        """Whether each problem (a[i], b[i]) of this task is on the held-out side (see ``heldout_mask``)."""
        return _heldout_mask("ArithmeticTask.is_heldout", self.op, a, b, self.heldout_fraction)

    @property
    def line_length(self) -> Optional[int]:
        """Characters per line (with the newline) in the fixed-width format; None otherwise."""
        return 3 * self.digits + 3 + (self.digits if self.op == "*" else 1) if self.fixed_width else None

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> List[Problem]:
        """``n`` (>= 1) problems from the ``"train"`` or ``"heldout"`` side, drawn with ``rng``."""
        return self._sample("ArithmeticTask.sample", rng, n, "n", split)

    def _sample(self, op: str, rng: np.random.Generator, n: int, n_name: str, split: str) -> List[Problem]:
        _check_rng(op, rng)
        n = check_count(op, n_name, n, lo=1)
        if not isinstance(split, str) or split not in ("train", "heldout"):
            raise ValueError(f"{op}: argument 'split' expected 'train' or 'heldout', got {split!r:.40}")
        want_heldout = split == "heldout"
        high = 10**self.digits
        found: List[Tuple[int, int]] = []
        for _ in range(1000):
            m = max(2 * (n - len(found)), 16)
            a, b = rng.integers(0, high, size=m), rng.integers(0, high, size=m)
            keep = self.is_heldout(a, b) == want_heldout
            found.extend(zip(a[keep].tolist(), b[keep].tolist()))
            if len(found) >= n:
                return [self.problem(x, y) for x, y in found[:n]]
        raise ValueError(f"{op}: argument 'split': the {split!r} side of {self} is empty or too small to sample")

    def batch(self, rng: np.random.Generator, batch_size: int, split: str = "train",
              tok: Optional[CharTokenizer] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``make_batch`` of ``batch_size`` fresh problems: (x, y, loss_mask), each (B, T)."""
        tok = _check_tokenizer("ArithmeticTask.batch", tok)
        return make_batch(self._sample("ArithmeticTask.batch", rng, batch_size, "batch_size", split), tok)


def make_batch(problems: Sequence[Problem], tok: Optional[CharTokenizer] = None,
               block_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-token pairs of each problem's line, with the loss on the answer only.

    Row b holds the tokens of ``problems[b].text``: x = tokens[:-1], y = tokens[1:], so
    y[b, t] is the token after x[b, t]. ``loss_mask[b, t]`` is True where y[b, t] is an
    answer character or the closing newline; elsewhere y[b, t] = IGNORE_INDEX. Shorter
    lines (``fixed_width=False``) are padded on the right to T with newline inputs and
    ignored targets.

    -> x: (B, T) int64, y: (B, T) int64, loss_mask: (B, T) bool;
       T = block_size, or the longest line's length - 1.
    """
    problems = _check_problems("make_batch", problems)
    tok = _check_tokenizer("make_batch", tok)
    rows = [tok.encode(p.text) for p in problems]
    longest = max(len(r) for r in rows) - 1
    T = longest if block_size is None else check_count("make_batch", "block_size", block_size, lo=1)
    if longest > T:
        raise ValueError(f"make_batch: argument 'block_size' expected at least {longest} (the longest line's "
                         f"length - 1), got {T}")
    B = len(problems)
    x = np.full((B, T), tok.stoi["\n"], dtype=np.int64)
    y = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    for i, (p, r) in enumerate(zip(problems, rows)):
        n = len(r) - 1
        x[i, :n] = r[:-1]
        y[i, :n] = r[1:]
        first = len(p.prompt) - 1  # position whose target is the first answer character
        mask[i, first:n] = True
    y[~mask] = IGNORE_INDEX
    return x, y, mask


def exact_match(predicted_answers: Sequence[Union[str, int]], problems: Sequence[Problem]) -> float:
    """Fraction of problems answered exactly.

    A string must equal ``problem.answer`` (the formatted, possibly reversed answer) once
    surrounding whitespace, such as the closing newline, is stripped; an int must equal
    ``problem.result``.
    """
    problems = _check_problems("exact_match", problems)
    if isinstance(predicted_answers, (str, bytes, dict)) or not isinstance(predicted_answers, Iterable):
        raise TypeError(f"exact_match: argument 'predicted_answers' expected a sequence of str or int answers, "
                        f"got {type(predicted_answers).__name__}")
    predicted_answers = list(predicted_answers)
    if len(predicted_answers) != len(problems):
        raise ValueError(f"exact_match: argument 'predicted_answers' expected {len(problems)} answers "
                         f"(one per problem), got {len(predicted_answers)}")
    for i, pred in enumerate(predicted_answers):
        if isinstance(pred, (bool, np.bool_)) or not isinstance(pred, (str, int, np.integer)):
            raise TypeError(f"exact_match: argument 'predicted_answers' expected str or int answers, "
                            f"got {type(pred).__name__} at position {i}")
    hits = 0
    for pred, p in zip(predicted_answers, problems):
        if isinstance(pred, str):
            hits += pred.strip() == p.answer
        else:
            hits += int(pred) == p.result
    return hits / len(problems)
