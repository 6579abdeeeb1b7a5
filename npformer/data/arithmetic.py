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

``ReasoningTask`` (with ``Item`` for one problem) covers more kinds and formats, for the studies in
``npformer.reasoning``. Operands are written without padding unless ``fixed_width=True``; one
example line per kind (digits=3) and per option::

    "add":      "352+469=821\n"
    "sub":      "35-469=-434\n"
    "mul":      "12*34=408\n"
    "compare":  "123?456=<\n"            answer "<", "=" or ">" (the sign of a - b)
    "mod":      "(35+80)%97=18\n"         (a + b) mod p, p a task parameter (``p=97``)
    "chain":    "12+34*2=80\n"            a op b op c, op in + - *, with the usual precedence:
                                         "*" first, then left to right ("12-3-4=5", "12*3+4=40")
    min_digits=1, digits=4:  each operand's length drawn uniformly from 1..4 per problem,
                "7+3051=3058\n"          and ``Item.length`` = the longest operand's length
    index_hints=True:  "c3b5a2+c4b6a9=c8b2a1\n"   each digit after a letter naming its place
                (a = units, b = tens, ...), so equal letters mark digits of equal significance
                at every length; with reverse=True: "=a1b2c8" and a negative answer ends in "-"
    scratchpad=True:  the working, ";", then the answer:
                "add":  "352+469=110;821\n"    the carry out of each place, units first
                "sub":  "352-469=000;-117\n"   the borrow each place takes, units first, of
                                               |a - b| computed as the larger minus the smaller
                "mul":  "12*34=48,36;408\n"    a times each digit of b, units first
                "mod":  "(35+80)%97=115;18\n"  the sum before the reduction
                "chain": "12+34*2=68;80\n"     the first operation's value
                ("compare" has no working: scratchpad=True is refused)

A ``ReasoningTask``'s held-out side is decided by a hash of the operands (and chain's operators)
alone, so it is the same for every format and length; "add", "sub", "mul" use ``heldout_mask``
itself, so a problem sits on the same side as in ``ArithmeticTask``. ``full_tokenizer()`` holds
every character these formats use; ``make_batch`` puts the loss on everything after the prompt
(the working included) and ``exact_match`` scores the final answer.

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


def _check_problems(op: str, problems: object) -> List[Union["Problem", "Item"]]:
    if isinstance(problems, (str, bytes, dict)) or not isinstance(problems, Iterable):
        raise TypeError(f"{op}: argument 'problems' expected a sequence of Problem, got {type(problems).__name__}")
    problems = list(problems)
    for i, p in enumerate(problems):
        if not isinstance(p, (Problem, Item)):
            raise TypeError(f"{op}: argument 'problems' expected Problem (or Item) entries, got {type(p).__name__} "
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
    answer character or the closing newline (for an ``Item``: everything after the prompt,
    scratchpad included); elsewhere y[b, t] = IGNORE_INDEX. Shorter lines
    (``fixed_width=False``, mixed lengths) are padded on the right to T with newline inputs
    and ignored targets. ``Problem`` and ``Item`` lines may be mixed; the default tokenizer
    is ``tokenizer()`` for ``Problem`` lines alone and ``full_tokenizer()`` otherwise.

    -> x: (B, T) int64, y: (B, T) int64, loss_mask: (B, T) bool;
       T = block_size, or the longest line's length - 1.
    """
    problems = _check_problems("make_batch", problems)
    tok = _check_line_tokenizer("make_batch", tok, problems)
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
        first = len(p.prompt) - 1  # position whose target is the first answer (or scratchpad) character
        mask[i, first:n] = True
    y[~mask] = IGNORE_INDEX
    return x, y, mask


def exact_match(predicted_answers: Sequence[Union[str, int]], problems: Sequence[Problem]) -> float:
    """Fraction of problems answered exactly.

    A string must equal ``problem.answer`` (the formatted, possibly reversed answer) once
    surrounding whitespace, such as the closing newline, is stripped (for an ``Item`` with a
    scratchpad, the part after the last ";" is compared: the working is not scored); an int
    must equal ``problem.result``.
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
            hits += (p.final(pred) if isinstance(p, Item) else pred.strip()) == p.answer
        else:
            hits += int(pred) == p.result
    return hits / len(problems)


# -- the reasoning tasks: more kinds, mixed lengths, index hints, scratchpads --------------------------
KINDS = ("add", "sub", "mul", "compare", "mod", "chain")
CHAIN_ORDERS = ("precedence",)  # "*" before "+" and "-", then left to right: 12+34*2 = 12+68 = 80
FULL_VOCAB = VOCAB + "%(),;<>?" + "abcdefghijklmnopqrstuvwxyz"
MAX_HINTS = 26  # index hints are the letters a..z: at most 26 digit places
_KIND_OP = {"add": "+", "sub": "-", "mul": "*"}
_KIND_SALT = {"compare": 0xA0761D6478BD642F, "mod": 0xE7037ED1A0B428DB, "chain": 0x8EBC6AF09C88C6E3}
_CHAIN_OPS = ("+", "-", "*")
_COMPARE = {-1: "<", 0: "=", 1: ">"}


def full_tokenizer() -> CharTokenizer:
    """The character tokenizer of every ``ReasoningTask`` format: ``VOCAB``, ``% ( ) , ; < > ?`` and a..z."""
    return CharTokenizer(FULL_VOCAB)


def _check_line_tokenizer(op: str, tok: object, problems: Sequence[Union["Problem", "Item"]]) -> CharTokenizer:
    """``tok`` (None for the default) holding every character of the problems' lines."""
    if tok is None:
        return tokenizer() if all(isinstance(p, Problem) for p in problems) else full_tokenizer()
    tok = _check_tokenizer(op, tok)
    for p in problems:
        missing = sorted(set(p.text) - set(tok.stoi))
        if missing:
            raise ValueError(f"{op}: argument 'tok' expected a vocabulary holding every character of the lines, "
                             f"missing {''.join(missing)!r} (full_tokenizer() holds them all)")
    return tok


def _hash_uniform(salt: int, *columns: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per row of uint64 ``columns`` (one shape), chaining splitmix64's finaliser."""
    h = np.full(columns[0].shape, np.uint64(salt), dtype=np.uint64)
    for c in columns:
        h = _mix64(h ^ c.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _hinted(digits: str, hints: bool) -> List[str]:
    """A digit string (most significant first) as units: ``"352"`` -> ``["3", "5", "2"]``, with hints
    ``["c3", "b5", "a2"]`` (the letter names the place: a = units, b = tens, ...)."""
    if not hints:
        return list(digits)
    n = len(digits)
    return [chr(ord("a") + n - 1 - i) + d for i, d in enumerate(digits)]


def _write_number(value: int, width: Optional[int], hints: bool, reverse: bool) -> str:
    """``value`` as written in an answer: sign, then the digits (zero-padded so that the whole is ``width``
    characters, as ``f"{value:0{width}d}"``), each digit after its place marker with ``hints``; ``reverse``
    writes the units (marker and digit) least significant first and the sign last."""
    s = f"{value:0{width}d}" if width is not None else str(value)
    sign, digits = ("-", s[1:]) if s.startswith("-") else ("", s)
    units = _hinted(digits, hints)
    return "".join(units[::-1]) + sign if reverse else sign + "".join(units)


def _read_number(s: str, hints: bool, reverse: bool) -> Optional[int]:
    """The inverse of ``_write_number`` (None for a string it cannot have written)."""
    sign = ""
    if reverse and s.endswith("-"):
        sign, s = "-", s[:-1]
    elif not reverse and s.startswith("-"):
        sign, s = "-", s[1:]
    if hints:
        if len(s) % 2 or not s:
            return None
        marks, digits = s[0::2], s[1::2]
        n = len(digits)
        order = [chr(ord("a") + i) for i in range(n)]
        if list(marks) != (order if reverse else order[::-1]):
            return None
        s = digits
    s = s[::-1] if reverse else s
    return int(sign + s) if re.fullmatch(r"[0-9]+", s, re.ASCII) else None


def _chain_value(operands: Tuple[int, ...], ops: Tuple[str, ...]) -> Tuple[int, int]:
    """(first step's value, result) of ``a op1 b op2 c`` with "*" before "+"/"-", else left to right."""
    a, b, c = operands
    f = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
    if ops[1] == "*" and ops[0] != "*":  # a + b*c, a - b*c: the product first
        first = b * c
        return first, f[ops[0]](a, first)
    first = f[ops[0]](a, b)
    return first, f[ops[1]](first, c)


def _digits_lsd(n: int, width: int) -> List[int]:
    return [(n // 10**i) % 10 for i in range(width)]


@dataclass(frozen=True)
class Item:
    """One problem of a ``ReasoningTask``: its operands (and, for "chain", its two operators).

    ``text == prompt + target + "\\n"`` where ``target`` is the scratchpad and ";" before the
    answer when the task writes one, else the answer alone. ``length`` is the number of digits
    of the longest operand (what "accuracy by operand length" groups by).
    """

    task: "ReasoningTask"
    operands: Tuple[int, ...]
    ops: Tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return max(len(str(v)) for v in self.operands)

    @property
    def result(self) -> int:
        """The true value: the arithmetic result; for "compare" the sign of a - b (-1, 0, 1)."""
        kind, v = self.task.kind, self.operands
        if kind == "add":
            return v[0] + v[1]
        if kind == "sub":
            return v[0] - v[1]
        if kind == "mul":
            return v[0] * v[1]
        if kind == "compare":
            return (v[0] > v[1]) - (v[0] < v[1])
        if kind == "mod":
            return (v[0] + v[1]) % self.task.p
        return _chain_value(v, self.ops)[1]

    def _operand(self, value: int) -> str:
        t = self.task
        s = f"{value:0{t.digits}d}" if t.fixed_width else str(value)
        return "".join(_hinted(s, t.index_hints))

    @property
    def prompt(self) -> str:
        t, (a, b) = self.task, self.operands[:2]
        if t.kind in _KIND_OP:
            return f"{self._operand(a)}{_KIND_OP[t.kind]}{self._operand(b)}="
        if t.kind == "compare":
            return f"{self._operand(a)}?{self._operand(b)}="
        if t.kind == "mod":
            return f"({self._operand(a)}+{self._operand(b)})%{t.p}="
        c = self.operands[2]
        return f"{self._operand(a)}{self.ops[0]}{self._operand(b)}{self.ops[1]}{self._operand(c)}="

    @property
    def answer(self) -> str:
        """The final answer as written (padded, hinted and reversed as the task says)."""
        t = self.task
        if t.kind == "compare":
            return _COMPARE[self.result]
        width = t.answer_width if t.fixed_width else None
        return _write_number(self.result, width, t.index_hints, t.reverse)

    @property
    def scratchpad(self) -> str:
        """The working written before ";" and the answer ("" when the task writes none; see ``ReasoningTask``)."""
        t = self.task
        if not t.scratchpad:
            return ""
        v = self.operands
        if t.kind in ("add", "sub"):
            a, b = v if t.kind == "add" or v[0] >= v[1] else v[::-1]
            width = max(len(str(a)), len(str(b)))
            da, db = _digits_lsd(a, width), _digits_lsd(b, width)
            flags, carry = [], 0
            for x, y in zip(da, db):
                if t.kind == "add":
                    carry = (x + y + carry) // 10  # the carry out of this place
                else:
                    carry = int(x - y - carry < 0)  # the borrow this place takes from the next
                flags.append(str(carry))
            return "".join(flags)
        if t.kind == "mul":
            a, b = v
            return ",".join(str(a * d) for d in _digits_lsd(b, len(str(b))))
        if t.kind == "mod":
            return str(v[0] + v[1])
        return str(_chain_value(v, self.ops)[0])  # chain

    @property
    def target(self) -> str:
        """What follows the prompt, before the closing newline: ``scratchpad + ";" + answer``, or the answer."""
        return f"{self.scratchpad};{self.answer}" if self.task.scratchpad else self.answer

    @property
    def text(self) -> str:
        return self.prompt + self.target + "\n"

    def final(self, generated: str) -> str:
        """The answer part of a generated target: surrounding whitespace stripped, and with a scratchpad
        the part after the last ";" (the whole string when it holds none)."""
        s = check_text("Item.final", "generated", generated).strip()
        return s.rsplit(";", 1)[-1] if self.task.scratchpad else s

    def parse(self, generated: str) -> Optional[int]:
        """The value a generated target stands for (None if it is not one in this task's format).

        The inverse of the formatting: scratchpad dropped, reversal and place markers undone (the
        markers must be exactly the ones the task writes); "compare" reads "<", "=", ">" as -1, 0, 1.
        """
        s = self.final(generated)
        if self.task.kind == "compare":
            return {v: k for k, v in _COMPARE.items()}.get(s)
        return _read_number(s, self.task.index_hints, self.task.reverse)


@dataclass(frozen=True)
class ReasoningTask:
    """Problems of one kind and format, with operand lengths fixed or drawn per problem; see ``ReasoningTask.help``.

    kind: one of ``KINDS``. digits: the (longest) operand length, in [1, 9]. min_digits: None for
    operands uniform in [0, 10^digits) (as ``ArithmeticTask``); an integer in [1, digits] to draw
    each operand's length uniformly from [min_digits, digits], then the operand uniformly among
    the numbers of exactly that many digits (0..9 for one digit). p: the modulus of "mod" (>= 2).
    """

    kind: str = "add"
    digits: int = 3
    min_digits: Optional[int] = None
    fixed_width: bool = False
    reverse: bool = False
    index_hints: bool = False
    scratchpad: bool = False
    p: int = 97
    heldout_fraction: float = 0.1

    def __post_init__(self):
        op = "ReasoningTask"
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"{op}: argument 'kind' expected one of {KINDS}, got {self.kind!r:.40}")
        digits = _check_digits(op, self.digits)
        if self.min_digits is not None:
            check_count(op, "min_digits", self.min_digits, lo=1, hi=digits)
        for name in ("fixed_width", "reverse", "index_hints", "scratchpad"):
            check_bool(op, name, getattr(self, name))
        check_count(op, "p", self.p, lo=2, hi=10**MAX_DIGITS)
        check_real(op, "heldout_fraction", self.heldout_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.scratchpad and self.kind == "compare":
            raise ValueError(f"{op}: argument 'scratchpad' expected False for kind 'compare' (it has no "
                             f"intermediate step), got True")
        if self.index_hints and self._max_answer_digits > MAX_HINTS:
            raise ValueError(f"{op}: argument 'index_hints' expected answers of at most {MAX_HINTS} digits "
                             f"(one letter per place), got up to {self._max_answer_digits} for {self.kind} "
                             f"with digits={digits}")

    @property
    def n_operands(self) -> int:
        return 3 if self.kind == "chain" else 2

    @property
    def _max_answer_digits(self) -> int:
        n = self.digits
        return {"add": n + 1, "sub": n + 1, "mul": 2 * n, "compare": 1, "mod": len(str(self.p - 1)),
                "chain": 3 * n + 1}[self.kind]

    @property
    def answer_width(self) -> Optional[int]:
        """Characters of a fixed-width answer before hints (sign included, as ``ArithmeticTask``);
        None for "compare"."""
        return None if self.kind == "compare" else self._max_answer_digits

    @property
    def lengths(self) -> Tuple[int, ...]:
        """The operand lengths this task draws."""
        return tuple(range(self.min_digits, self.digits + 1)) if self.min_digits is not None else (self.digits,)

    def item(self, *operands: int, ops: Sequence[str] = ()) -> Item:
        """The problem with these operands (two, three for "chain" with ``ops``: two of ``+ - *``)."""
        where = "ReasoningTask.item"
        if len(operands) != self.n_operands:
            raise ValueError(f"{where}: argument 'operands' expected {self.n_operands} integers, got {len(operands)}")
        values = []
        for i, v in enumerate(operands):
            v = check_count(where, f"operands[{i}]", v, lo=0, hi=10**self.digits - 1)
            values.append(int(v))
        if isinstance(ops, str) or not isinstance(ops, (list, tuple)):
            raise TypeError(f"{where}: argument 'ops' expected a tuple of operator strings, got {type(ops).__name__}")
        ops = tuple(ops)
        want = 2 if self.kind == "chain" else 0
        if len(ops) != want or any(o not in _CHAIN_OPS for o in ops):
            raise ValueError(f"{where}: argument 'ops' expected {want} of {_CHAIN_OPS}, got {ops!r:.60}")
        return Item(self, tuple(values), ops)

    def _hashable(self, cols: List[np.ndarray], op_codes: Optional[np.ndarray]) -> np.ndarray:
        """Whether each drawn problem is held out: by its operands (and operators) alone, so a problem
        keeps its side across lengths and formats; "+", "-", "*" use ``heldout_mask`` itself."""
        if self.kind in _KIND_OP:
            return heldout_mask(_KIND_OP[self.kind], cols[0], cols[1], self.heldout_fraction)
        a, b = (np.asarray(c, np.uint64) for c in cols[:2])
        if self.kind == "mod":
            a, b = np.minimum(a, b), np.maximum(a, b)
        more = [np.asarray(c, np.uint64) for c in cols[2:]]
        if op_codes is not None:
            more.append(op_codes.astype(np.uint64))
        return _hash_uniform(_KIND_SALT[self.kind], a, b, *more) < self.heldout_fraction

    def is_heldout(self, item: Item) -> bool:
        """Whether ``item`` is on the held-out side."""
        if not isinstance(item, Item):
            raise TypeError(f"ReasoningTask.is_heldout: argument 'item' expected an Item, got {type(item).__name__}")
        codes = None if not item.ops else \
            np.asarray([3 * _CHAIN_OPS.index(item.ops[0]) + _CHAIN_OPS.index(item.ops[1])])
        cols = [np.asarray([v]) for v in item.operands]
        return bool(self._hashable(cols, codes)[0])

    def _draw_operands(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """(m, n_operands) int64 operands."""
        if self.min_digits is None:
            return rng.integers(0, 10**self.digits, size=(m, self.n_operands))
        lengths = rng.integers(self.min_digits, self.digits + 1, size=(m, self.n_operands))
        lo = np.where(lengths == 1, 0, 10 ** (lengths - 1))
        return lo + np.floor(rng.random((m, self.n_operands)) * (10**lengths - lo)).astype(np.int64)

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> List[Item]:
        """``n`` (>= 1) problems from the ``"train"`` or ``"heldout"`` side, drawn with ``rng``."""
        where = "ReasoningTask.sample"
        _check_rng(where, rng)
        n = check_count(where, "n", n, lo=1)
        if not isinstance(split, str) or split not in ("train", "heldout"):
            raise ValueError(f"{where}: argument 'split' expected 'train' or 'heldout', got {split!r:.40}")
        want = split == "heldout"
        found: List[Item] = []
        for _ in range(1000):
            m = max(2 * (n - len(found)), 16)
            v = self._draw_operands(rng, m)
            codes = rng.integers(0, 9, size=m) if self.kind == "chain" else None
            keep = self._hashable([v[:, i] for i in range(self.n_operands)], codes) == want
            for i in np.flatnonzero(keep):
                ops = (_CHAIN_OPS[codes[i] // 3], _CHAIN_OPS[codes[i] % 3]) if codes is not None else ()
                found.append(Item(self, tuple(int(x) for x in v[i]), ops))
            if len(found) >= n:
                return found[:n]
        raise ValueError(f"{where}: argument 'split': the {split!r} side of {self} is empty or too small to sample")

    def all_pairs(self, high: Optional[int] = None) -> List[Item]:
        """Every two-operand problem (a, b) with a, b in [0, high) (default: p for "mod", else 10^digits), a-major."""
        where = "ReasoningTask.all_pairs"
        if self.n_operands != 2:
            raise ValueError(f"{where}: argument 'kind' expected a two-operand kind, got {self.kind!r}")
        high = (self.p if self.kind == "mod" else 10**self.digits) if high is None else high
        high = check_count(where, "high", high, lo=1, hi=10**self.digits)
        return [Item(self, (a, b)) for a in range(high) for b in range(high)]

    def split_pairs(self, items: Sequence[Item]) -> Tuple[List[Item], List[Item]]:
        """(train side, held-out side) of ``items``, order kept."""
        items = _check_problems("ReasoningTask.split_pairs", items)
        return ([p for p in items if not self.is_heldout(p)], [p for p in items if self.is_heldout(p)])

    @property
    def max_line_length(self) -> int:
        """The longest line this task can write (characters, newline included): the longest prompt, working
        and answer over the extreme operands (0 and 10^digits - 1 in every position, every operator pair)."""
        from itertools import product

        big = 10**self.digits - 1
        op_pairs = list(product(_CHAIN_OPS, repeat=2)) if self.kind == "chain" else [()]
        probes = [Item(self, v, ops) for v in product((0, big), repeat=self.n_operands) for ops in op_pairs]
        results = [p.result for p in probes] + ([self.p - 1] if self.kind == "mod" else [])
        if self.kind == "compare":
            answer = 1
        else:
            width = self.answer_width if self.fixed_width else None
            answer = max(len(_write_number(r, width, self.index_hints, self.reverse)) for r in results)
        working = max(len(p.scratchpad) for p in probes) + 1 if self.scratchpad else 0
        return max(len(p.prompt) for p in probes) + working + answer + 1
