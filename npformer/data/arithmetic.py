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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .char import CharTokenizer

IGNORE_INDEX = -100
OPS = ("+", "-", "*")
VOCAB = "\n*+-0123456789="
_SALT = {"+": 0x2545F4914F6CDD1D, "-": 0x9E3779B97F4A7C15, "*": 0xD6E8FEB86659FD93}
_M64 = (1 << 64) - 1


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
        """The integer an answer string in this problem's format stands for (None if it is not one)."""
        s = answer.strip()
        s = s[::-1] if self.reverse else s
        try:
            return int(s)
        except ValueError:
            return None


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
    """Whether each problem (op, a[i], b[i]) belongs to the held-out side. a, b: (N,) ints in [0, 2^32)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
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
        if self.op not in OPS:
            raise ValueError(f"ArithmeticTask: argument 'op' expected one of {OPS}, got {self.op!r}")
        if not (isinstance(self.digits, int) and 1 <= self.digits <= 9):
            raise ValueError(f"ArithmeticTask: argument 'digits' expected an integer in [1, 9], got {self.digits!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"ArithmeticTask: argument 'heldout_fraction' expected a value in (0, 1), "
                             f"got {self.heldout_fraction}")

    def problem(self, a: int, b: int) -> Problem:
        return Problem(int(a), int(b), self.op, self.digits, self.fixed_width, self.reverse)

    def is_heldout(self, a, b) -> np.ndarray:
        return heldout_mask(self.op, a, b, self.heldout_fraction)

    @property
    def line_length(self) -> Optional[int]:
        """Characters per line (with the newline) in the fixed-width format; None otherwise."""
        return 3 * self.digits + 3 + (self.digits if self.op == "*" else 1) if self.fixed_width else None

    def sample(self, rng: np.random.Generator, n: int, split: str = "train") -> List[Problem]:
        """``n`` problems from the ``"train"`` or ``"heldout"`` side, drawn with ``rng``."""
        if split not in ("train", "heldout"):
            raise ValueError(f"ArithmeticTask.sample: argument 'split' expected 'train' or 'heldout', got {split!r}")
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
        raise ValueError(f"ArithmeticTask.sample: the {split!r} side of {self} is empty or too small to sample")

    def batch(self, rng: np.random.Generator, batch_size: int, split: str = "train",
              tok: Optional[CharTokenizer] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``make_batch`` of ``batch_size`` fresh problems: (x, y, loss_mask), each (B, T)."""
        return make_batch(self.sample(rng, batch_size, split), tok)


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
    tok = tok or tokenizer()
    if not problems:
        raise ValueError("make_batch: argument 'problems' expected at least one problem, got 0")
    rows = [tok.encode(p.text) for p in problems]
    T = max(len(r) for r in rows) - 1 if block_size is None else block_size
    if max(len(r) for r in rows) - 1 > T:
        raise ValueError(f"make_batch: argument 'block_size' expected at least {max(len(r) for r in rows) - 1}, got {T}")
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
    if len(predicted_answers) != len(problems):
        raise ValueError(f"exact_match: argument 'predicted_answers' expected {len(problems)} answers "
                         f"(one per problem), got {len(predicted_answers)}")
    if not problems:
        raise ValueError("exact_match: argument 'problems' expected at least one problem, got 0")
    hits = 0
    for pred, p in zip(predicted_answers, problems):
        if isinstance(pred, str):
            hits += pred.strip() == p.answer
        else:
            hits += int(pred) == p.result
    return hits / len(problems)
