"""Fine-tuning tasks for encoders, built from the standard library: no download, the same on every run.

Two labelled tasks come from the sources of the modules in ``TASK_MODULES`` (pure-Python
modules present on every CPython 3.10 to 3.12 install), read from the files under
``sysconfig.get_paths()["stdlib"]`` without importing them:

``docstring_task()``: sequence classification, "which module is this docstring from"
    Every class's and function's docstring (methods and nested ones included; the module's
    own docstring left out), found by parsing the source with ``ast``, taken in sorted
    order of qualified name within each module and the modules in ``TASK_MODULES`` order.
    Each is cleaned to its first paragraph with whitespace runs made single spaces and cut
    at a word boundary to at most ``max_chars`` characters; one of fewer than ``min_words``
    words is dropped. A text that occurs in two modules is dropped everywhere (its label
    would be a coin toss); a text repeated within one module is kept once. The label is the
    module's index in ``TASK_MODULES``.

``token_task()``: token classification, "what kind of Python token is this"
    Every physical line of the same sources (``inspect.getsource`` of the module is that
    file's text), tokenized in context by the standard ``tokenize`` module. A line's words
    are its tokens, tagged with ``TOKEN_TAGS``: ``KEYWORD`` (a NAME that
    ``keyword.iskeyword`` accepts: the hard keywords, the same 35 in 3.10 to 3.12),
    ``NAME`` (any other name, the soft keywords ``match``, ``case``, ``type`` and ``_``
    included), ``OP``, ``NUMBER``, ``STRING``, ``COMMENT``. NEWLINE, NL, INDENT, DEDENT and
    ENDMARKER carry no text and are not words. Python 3.12 splits an f-string into
    FSTRING_START, FSTRING_MIDDLE, its fields and FSTRING_END; those are merged back into
    one ``STRING`` token spanning the whole literal, as 3.10 and 3.11 report it. A line
    touched by a token spanning several lines (a triple-quoted string) is left out, and
    so is a line with an ERRORTOKEN. The text of an example is its words joined by the
    spaces that separate them in the source (``spaces[i]`` precedes ``words[i]``,
    ``spaces[0] == ""``: indentation is dropped); a line-continuation backslash, which is
    no token, is not part of it. Repeated texts are kept once (the first, in module and
    line order).

Splits. An example goes to ``train``, ``validation`` or ``test`` by the SHA-256 of its text
(``split_of``): the first 8 bytes, read as a big-endian integer over 2**64, against the
cumulative ``fractions`` (0.8, 0.1, 0.1). Texts are unique within a task, so no text is
in two splits, and an example keeps its split when modules are added or removed. Python
versions ship different sources, so the examples differ between versions; the rules
(and so the split of any given text) do not: no ``hash()``, no dict order, no imports.

Batches. ``classification_batches`` encodes examples with any tokenizer that has
``encode(text) -> list[int]`` and packs them as ``[CLS] pieces [SEP]`` padded with [PAD]
to ``max_length`` (pieces beyond ``max_length - 2`` cut off), with the special ids of
``objectives.special_ids_for``. For token classification each word and each run of
spaces is encoded on its own (``encode_words``), and ``align_labels`` gives the word's tag
to its first piece and ``IGNORE_INDEX`` (-100) to its other pieces, to spaces, to [CLS],
[SEP] and padding, and so to a word cut off by the length limit.

Metrics. ``accuracy``, ``macro_f1`` and ``confusion_matrix`` compare integer labels with
predictions; ``majority_baseline`` is the accuracy on an evaluation split of always
predicting the most frequent training label; ``token_accuracy`` scores the positions
whose label is not ``IGNORE_INDEX``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import keyword
import re
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.lm import IGNORE_INDEX
from ..ops._checks import check_bool, check_count, check_int, check_ndim, check_real
from .corpus import _module_file, _stdlib, token_stream
from .objectives import SpecialIds, _check_rng, _check_tokenizer, _special_ids

__all__ = ["TASK_MODULES", "TOKEN_TAGS", "SPLITS", "TASKS", "TextExample", "TaggedLine", "Task", "docstring_task",
           "token_task", "load_task", "split_of", "clean_docstring", "tag_source", "encode_words", "align_labels",
           "classification_batches", "accuracy", "macro_f1", "confusion_matrix", "majority_baseline",
           "token_accuracy", "classification_metrics", "IGNORE_INDEX"]

# Pure-Python modules with many documented classes and functions, each a file (or a package's
# __init__.py) in CPython 3.10, 3.11 and 3.12. The label of a docstring is its module's index here.
TASK_MODULES = ("collections", "email.message", "inspect", "logging", "pathlib", "statistics", "tarfile",
                "threading", "typing", "unittest.case")
TOKEN_TAGS = ("KEYWORD", "NAME", "OP", "NUMBER", "STRING", "COMMENT")
SPLITS = ("train", "validation", "test")
TASKS = ("docstrings", "tokens")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# -- examples and tasks ------------------------------------------------------------------------

class TextExample(NamedTuple):
    """One text with one label; ``source`` names where it came from ("module:Class.method")."""
    text: str
    label: int
    source: str


class TaggedLine(NamedTuple):
    """One line of source as words with a tag each; ``spaces[i]`` is the whitespace before ``words[i]``.

    ``source`` is "module:line number".
    """
    words: Tuple[str, ...]
    spaces: Tuple[str, ...]
    tags: Tuple[int, ...]
    source: str

    @property
    def text(self) -> str:
        return "".join(s + w for s, w in zip(self.spaces, self.words))


@dataclass(frozen=True)
class Task:
    """A labelled task: ``kind`` is "sequence" (TextExample) or "token" (TaggedLine), three splits of examples."""
    name: str
    kind: str
    label_names: Tuple[str, ...]
    train: tuple
    validation: tuple
    test: tuple

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, split: str) -> tuple:
        """The examples of ``split`` ("train", "validation" or "test")."""
        return getattr(self, _check_split("Task.split", split))

    def labels(self, split: str) -> np.ndarray:
        """(N,) int64: one label per example (sequence), or every word's tag, line after line (token)."""
        examples = self.split(_check_split("Task.labels", split))
        if self.kind == "sequence":
            return np.array([e.label for e in examples], dtype=np.int64)
        return np.array([t for e in examples for t in e.tags], dtype=np.int64)

    def class_counts(self, split: str) -> np.ndarray:
        """(K,) int64: how many labels of each class ``split`` holds."""
        return np.bincount(self.labels(_check_split("Task.class_counts", split)), minlength=self.num_labels)

    def majority_baseline(self, split: str) -> float:
        """Accuracy on ``split`` of always predicting the most frequent training label."""
        return majority_baseline(self.labels("train"), self.labels(_check_split("Task.majority_baseline", split)))

    def summary(self) -> str:
        """A table of class counts per split."""
        width = max(len(n) for n in self.label_names + ("total",))
        lines = [f"{self.name} ({self.kind} classification, {self.num_labels} classes)",
                 f"{'':{width}}  " + "  ".join(f"{s:>10}" for s in SPLITS)]
        counts = [self.class_counts(s) for s in SPLITS]
        for k, name in enumerate(self.label_names):
            lines.append(f"{name:{width}}  " + "  ".join(f"{c[k]:>10}" for c in counts))
        lines.append(f"{'total':{width}}  " + "  ".join(f"{int(c.sum()):>10}" for c in counts))
        return "\n".join(lines)


def _check_split(op: str, split: object) -> str:
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"{op}: argument 'split' expected one of {SPLITS}, got {split!r:.40}")
    return split


def _check_modules(op: str, modules: object) -> Tuple[str, ...]:
    if isinstance(modules, (str, bytes)) or not isinstance(modules, (tuple, list)):
        raise TypeError(f"{op}: argument 'modules' expected a tuple of module names, got {type(modules).__name__}")
    if not modules:
        raise ValueError(f"{op}: argument 'modules' expected at least one module name, got none")
    for m in modules:
        if not isinstance(m, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", m):
            raise ValueError(f"{op}: argument 'modules' expected dotted module names, got {m!r:.60}")
        if _module_file(m) is None:
            raise ValueError(f"{op}: argument 'modules' expected pure-Python standard library modules, "
                             f"got {m!r}, which has no source under {_stdlib()}")
    if len(set(modules)) != len(modules):
        raise ValueError(f"{op}: argument 'modules' expected distinct names, got {list(modules)}")
    return tuple(modules)


def _check_fractions(op: str, fractions: object) -> Tuple[float, float, float]:
    if not isinstance(fractions, (tuple, list)) or len(fractions) != 3:
        raise TypeError(f"{op}: argument 'fractions' expected a tuple of 3 fractions (train, validation, test), "
                        f"got {fractions!r:.60}")
    f = tuple(check_real(op, "fractions", v, lo=0.0, hi=1.0) for v in fractions)
    if abs(sum(f) - 1.0) > 1e-9 or f[0] == 0.0:
        raise ValueError(f"{op}: argument 'fractions' expected fractions summing to 1 with train > 0, "
                         f"got {fractions!r}")
    return f


def split_of(text: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of ``text``: u = int(sha256(utf-8)[:8], big-endian) / 2**64 against cumulative ``fractions``."""
    op = "split_of"
    if not isinstance(text, str):
        raise TypeError(f"{op}: argument 'text' expected a str, got {type(text).__name__}")
    f = _check_fractions(op, fractions)
    return _split_of(text, f)


def _split_of(text: str, f: Tuple[float, float, float]) -> str:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # in [0, 1)
    if u < f[0]:
        return "train"
    return "validation" if u < f[0] + f[1] else "test"


def _split_examples(examples: List[tuple], text_of, f) -> Dict[str, tuple]:
    out = {s: [] for s in SPLITS}
    for e in examples:
        out[_split_of(text_of(e), f)].append(e)
    return {s: tuple(v) for s, v in out.items()}


# -- sequence classification: docstrings ----------------------------------------------------------

def clean_docstring(doc: str, max_chars: int = 300) -> str:
    """The first paragraph of ``doc`` with whitespace runs as single spaces, cut at a word to <= ``max_chars``.

    A single word longer than ``max_chars`` is cut inside it.
    """
    op = "clean_docstring"
    if not isinstance(doc, str):
        raise TypeError(f"{op}: argument 'doc' expected a str, got {type(doc).__name__}")
    return _clean(doc, check_count(op, "max_chars", max_chars, lo=1))


def _clean(doc: str, max_chars: int) -> str:
    paragraph = re.split(r"\n[ \t\r\f\v]*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[:cut] if cut > 0 else text[:max_chars]
    return text


def _documented(module: str) -> List[Tuple[str, str]]:
    """(qualified name, docstring) of every documented class and function in ``module``'s source, sorted by name."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                doc = ast.get_docstring(child)
                if doc:
                    found.append((name, doc))
                visit(child, name)

    visit(tree, "")
    return sorted(found, key=lambda pair: pair[0])  # stable: a name defined twice keeps its source order


def docstring_task(modules: Sequence[str] = TASK_MODULES, *, max_chars: int = 300, min_words: int = 3,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Task:
    """Which of ``modules`` a docstring comes from; see the module doc. Built once per argument set."""
    op = "docstring_task"
    modules = _check_modules(op, modules)
    max_chars = check_count(op, "max_chars", max_chars, lo=1)
    min_words = check_count(op, "min_words", min_words, lo=1)
    return _docstring_task(modules, max_chars, min_words, _check_fractions(op, fractions))


@functools.lru_cache(maxsize=8)
def _docstring_task(modules, max_chars, min_words, fractions) -> Task:
    candidates = []  # (text, label, source) in module order, then name order
    for label, module in enumerate(modules):
        for name, doc in _documented(module):
            text = _clean(doc, max_chars)
            if len(text.split()) >= min_words:
                candidates.append(TextExample(text, label, f"{module}:{name}"))
    labels_of: Dict[str, set] = {}
    for e in candidates:
        labels_of.setdefault(e.text, set()).add(e.label)
    kept, seen = [], set()
    for e in candidates:
        if len(labels_of[e.text]) == 1 and e.text not in seen:
            seen.add(e.text)
            kept.append(e)
    splits = _split_examples(kept, lambda e: e.text, fractions)
    return Task("docstrings", "sequence", modules, **splits)


# -- token classification: Python tokens ------------------------------------------------------------

_SKIPPED = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
_TAG_OF_TYPE = {tokenize.OP: "OP", tokenize.NUMBER: "NUMBER", tokenize.STRING: "STRING", tokenize.COMMENT: "COMMENT"}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def _merge_fstrings(tokens: Iterable[tokenize.TokenInfo]) -> Iterator[tokenize.TokenInfo]:
    """Python 3.12's FSTRING_START ... FSTRING_END (nested ones included) as one STRING token, as before 3.12.

    The merged token spans the literal (start of FSTRING_START to end of FSTRING_END); its text is
    read from the source by the caller.
    """
    depth, start = 0, None
    for tok in tokens:
        if _FSTRING_START is not None and tok.type == _FSTRING_START:
            if depth == 0:
                start = tok
            depth += 1
        elif depth and tok.type == _FSTRING_END:
            depth -= 1
            if depth == 0:
                yield tokenize.TokenInfo(tokenize.STRING, "", start.start, tok.end, start.line)
        elif depth == 0:
            yield tok


def tag_source(source: str) -> List[Tuple[int, List[Tuple[str, str, str]]]]:
    """The taggable lines of ``source``: (line number, [(space before, token text, tag name), ...]) in line order.

    Lines touched by a multi-line token or holding an ERRORTOKEN are left out (see the module doc).
    """
    op = "tag_source"
    if not isinstance(source, str):
        raise TypeError(f"{op}: argument 'source' expected a str, got {type(source).__name__}")
    lines = source.splitlines(keepends=True)
    try:
        tokens = list(_merge_fstrings(tokenize.generate_tokens(io.StringIO(source).readline)))
    except (tokenize.TokenError, SyntaxError) as e:
        raise ValueError(f"{op}: argument 'source' expected Python source that tokenizes, got an error: {e}") from None
    bad = set()
    by_line: Dict[int, list] = {}
    for tok in tokens:
        (r0, c0), (r1, c1) = tok.start, tok.end
        if tok.type in _SKIPPED:
            continue
        if r0 != r1:
            bad.update(range(r0, r1 + 1))
        elif tok.type == tokenize.ERRORTOKEN:
            bad.add(r0)
        else:
            by_line.setdefault(r0, []).append((c0, c1, tok))
    out = []
    for r in sorted(by_line):
        if r in bad:
            continue
        line, words, end = lines[r - 1], [], None
        for c0, c1, tok in by_line[r]:
            if tok.type == tokenize.NAME:
                tag = "KEYWORD" if keyword.iskeyword(tok.string) else "NAME"
            else:
                tag = _TAG_OF_TYPE.get(tok.type)
                if tag is None:
                    raise ValueError(f"{op}: argument 'source' has a token of type {tokenize.tok_name[tok.type]} "
                                     f"at line {r}, which has no tag")
            space = "" if end is None else line[end:c0]
            words.append((space, line[c0:c1], tag))
            end = c1
        out.append((r, words))
    return out


def token_task(modules: Sequence[str] = TASK_MODULES, *,
               fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Task:
    """Tag each token of each line of ``modules``' sources with its ``TOKEN_TAGS`` class; see the module doc."""
    op = "token_task"
    return _token_task(_check_modules(op, modules), _check_fractions(op, fractions))


@functools.lru_cache(maxsize=8)
def _token_task(modules, fractions) -> Task:
    index = {t: i for i, t in enumerate(TOKEN_TAGS)}
    kept, seen = [], set()
    for module in modules:
        for r, words in tag_source(_module_file(module).read_text(encoding="utf-8")):
            example = TaggedLine(tuple(w for _, w, _ in words), tuple(s for s, _, _ in words),
                                 tuple(index[t] for _, _, t in words), f"{module}:{r}")
            text = example.text
            if text not in seen:
                seen.add(text)
                kept.append(example)
    splits = _split_examples(kept, lambda e: e.text, fractions)
    return Task("tokens", "token", TOKEN_TAGS, **splits)


def load_task(name: str) -> Task:
    """A built-in task by name: "docstrings" (``docstring_task()``) or "tokens" (``token_task()``)."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"load_task: argument 'name' expected one of {TASKS}, got {name!r:.40}")
    return docstring_task() if name == "docstrings" else token_task()


# -- encoding and alignment ----------------------------------------------------------------------

def _pieces(op: str, tokenizer, text: str, memo: Optional[dict] = None) -> List[int]:
    if memo is not None and text in memo:
        return memo[text]
    ids = token_stream(op, "tokenizer", tokenizer.encode(text)).tolist()
    if memo is not None:
        memo[text] = ids
    return ids


def _check_tagged(op: str, name: str, example: object) -> TaggedLine:
    if not isinstance(example, TaggedLine):
        raise TypeError(f"{op}: argument '{name}' expected a TaggedLine, got {type(example).__name__}")
    if not (len(example.words) == len(example.spaces) == len(example.tags)):
        raise ValueError(f"{op}: argument '{name}' expected words, spaces and tags of one length, got "
                         f"{len(example.words)}, {len(example.spaces)} and {len(example.tags)}")
    return example


def encode_words(tokenizer: object, example: TaggedLine) -> Tuple[List[int], List[Optional[int]]]:
    """``example``'s pieces and, per piece, the index of its word (None for the pieces of spaces).

    Each run of spaces and each word is encoded on its own, so ``decode(ids) == example.text``
    for a tokenizer that round-trips its pieces. A word that encodes to no pieces gets none.
    """
    op = "encode_words"
    _check_tokenizer(op, tokenizer)
    return _encode_words(op, tokenizer, _check_tagged(op, "example", example), None)


def _encode_words(op, tokenizer, example: TaggedLine, memo) -> Tuple[List[int], List[Optional[int]]]:
    ids: List[int] = []
    word_ids: List[Optional[int]] = []
    for i, (space, word) in enumerate(zip(example.spaces, example.words)):
        if space:
            pieces = _pieces(op, tokenizer, space, memo)
            ids += pieces
            word_ids += [None] * len(pieces)
        pieces = _pieces(op, tokenizer, word, memo)
        ids += pieces
        word_ids += [i] * len(pieces)
    return ids, word_ids


def align_labels(word_ids: Sequence[Optional[int]], word_labels: Sequence[int], *,
                 label_all_pieces: bool = False) -> np.ndarray:
    """Piece labels from word labels: (P,) int64.

    Piece j of word w = word_ids[j] gets word_labels[w] when it is the first piece of its word
    (j = 0 or word_ids[j - 1] != w), or always with ``label_all_pieces``; otherwise, and where
    word_ids[j] is None (a space, a special token), ``IGNORE_INDEX``.
    """
    op = "align_labels"
    if isinstance(word_ids, (str, bytes, np.ndarray)) or not isinstance(word_ids, Sequence):
        raise TypeError(f"{op}: argument 'word_ids' expected a list of word indices or None, "
                        f"got {type(word_ids).__name__}")
    labels = token_stream(op, "word_labels", word_labels)
    label_all_pieces = check_bool(op, "label_all_pieces", label_all_pieces)
    W = len(labels)
    for j, w in enumerate(word_ids):
        if w is None:
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"{op}: argument 'word_ids' expected ints or None, got {type(w).__name__} at {j}")
        if not 0 <= w < W:
            raise ValueError(f"{op}: argument 'word_ids' expected word indices in [0, {W}), got {w} at {j}")
    return _align(word_ids, labels, label_all_pieces)


def _align(word_ids, labels: np.ndarray, label_all_pieces: bool) -> np.ndarray:
    out = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
    previous = None
    for j, w in enumerate(word_ids):
        if w is not None and (w != previous or label_all_pieces):
            out[j] = labels[w]
        previous = w
    return out


# -- batches ---------------------------------------------------------------------------------------

def _check_task(op: str, task: object) -> Task:
    if not isinstance(task, Task):
        raise TypeError(f"{op}: argument 'task' expected a Task (docstring_task(), token_task()), "
                        f"got {type(task).__name__}")
    return task


def classification_batches(tokenizer: object, task: Task, split: str, *, batch_size: int = 32,
                           max_length: int = 128, rng: Optional[np.random.Generator],
                           specials: Optional[SpecialIds] = None,
                           label_all_pieces: bool = False) -> Iterator[Dict[str, np.ndarray]]:
    """One pass over ``split`` in batches of dicts of int64 arrays, each row ``[CLS] pieces [SEP] [PAD]...``.

    Keys: input_ids, token_type_ids (zeros), attention_mask (1 on [CLS] pieces [SEP]), all (B, L)
    with L = max_length, and labels: (B,) for a sequence task, (B, L) for a token task (aligned by
    ``align_labels``, IGNORE_INDEX on [CLS], [SEP], padding and cut-off pieces).
    The order is ``rng.permutation(N)`` (one call, before the first batch), or the split's order
    when ``rng`` is None; the last batch holds the N mod B left over, if any. Examples are encoded
    as their batch is made; the arguments are checked here, before the first batch.
    """
    op = "classification_batches"
    _check_tokenizer(op, tokenizer)
    _check_task(op, task)
    examples = task.split(_check_split(op, split))
    B = check_count(op, "batch_size", batch_size, lo=1)
    L = check_count(op, "max_length", max_length, lo=3)
    if rng is not None:
        _check_rng(op, rng)
    if specials is None:
        specials = _special_ids(op, tokenizer)
    elif not isinstance(specials, SpecialIds):
        raise TypeError(f"{op}: argument 'specials' expected a SpecialIds, got {type(specials).__name__}")
    label_all_pieces = check_bool(op, "label_all_pieces", label_all_pieces)
    if examples and task.kind == "token":
        _check_tagged(op, "task", examples[0])
    order = np.arange(len(examples)) if rng is None else rng.permutation(len(examples))
    S = specials

    def batches() -> Iterator[Dict[str, np.ndarray]]:
        memo: dict = {}
        for at in range(0, len(order), B):
            rows = [examples[i] for i in order[at: at + B]]
            n = len(rows)
            input_ids = np.full((n, L), S.pad, dtype=np.int64)
            attention_mask = np.zeros((n, L), dtype=np.int64)
            if task.kind == "sequence":
                labels = np.array([e.label for e in rows], dtype=np.int64)  # (B,)
            else:
                labels = np.full((n, L), IGNORE_INDEX, dtype=np.int64)  # (B, L)
            for b, e in enumerate(rows):
                if task.kind == "sequence":
                    ids = _pieces(op, tokenizer, e.text)[: L - 2]
                else:
                    ids, word_ids = _encode_words(op, tokenizer, e, memo)
                    ids = ids[: L - 2]
                    labels[b, 1: 1 + len(ids)] = _align(word_ids[: L - 2], np.asarray(e.tags), label_all_pieces)
                input_ids[b, 0], input_ids[b, 1: 1 + len(ids)], input_ids[b, 1 + len(ids)] = S.cls, ids, S.sep
                attention_mask[b, : len(ids) + 2] = 1
            yield {"input_ids": input_ids, "token_type_ids": np.zeros((n, L), dtype=np.int64),
                   "attention_mask": attention_mask, "labels": labels}

    return batches()


# -- metrics ---------------------------------------------------------------------------------------

def _check_pair(op: str, labels: object, predictions: object, ndim: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    for name, x in (("labels", labels), ("predictions", predictions)):
        check_int(op, name, x)
        if ndim is not None:
            check_ndim(op, name, x, ndim)
    if predictions.shape != labels.shape:
        raise ValueError(f"{op}: argument 'predictions' expected shape {tuple(labels.shape)} (same as 'labels'), "
                         f"got {tuple(predictions.shape)}")
    return labels.astype(np.int64, copy=False), predictions.astype(np.int64, copy=False)


def _check_classes(op: str, name: str, x: np.ndarray, K: int) -> None:
    if x.size and (x.min() < 0 or x.max() >= K):
        raise ValueError(f"{op}: argument '{name}' expected class ids in [0, {K}), "
                         f"got values in [{x.min()}, {x.max()}]")


def _check_nonempty(op: str, name: str, x: np.ndarray) -> None:
    if x.size == 0:
        raise ValueError(f"{op}: argument '{name}' expected at least one label, got none")


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """The share of i with predictions[i] == labels[i].  labels, predictions: (N,) integer, N >= 1."""
    op = "accuracy"
    y, p = _check_pair(op, labels, predictions, 1)
    _check_nonempty(op, "labels", y)
    return float(np.mean(y == p))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> np.ndarray:
    """(K, K) int64: C[i, j] = how many examples of true class i were predicted j.  labels, predictions: (N,)."""
    return _confusion("confusion_matrix", labels, predictions, num_labels)


def _confusion(op: str, labels, predictions, num_labels) -> np.ndarray:
    y, p = _check_pair(op, labels, predictions, 1)
    K = check_count(op, "num_labels", num_labels, lo=1)
    _check_classes(op, "labels", y, K)
    _check_classes(op, "predictions", p, K)
    return np.bincount(y * K + p, minlength=K * K).reshape(K, K).astype(np.int64)


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> float:
    """The mean over classes of F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k).

    The mean runs over the classes that occur in ``labels`` or ``predictions`` (as scikit-learn's
    ``f1_score(average="macro")`` does with its default labels): a class absent from both has no
    F1 and does not count. labels, predictions: (N,) integer in [0, K), N >= 1.
    """
    op = "macro_f1"
    C = _confusion(op, labels, predictions, num_labels)
    _check_nonempty(op, "labels", labels)
    tp = np.diag(C)
    fp = C.sum(axis=0) - tp  # predicted k, true another
    fn = C.sum(axis=1) - tp  # true k, predicted another
    present = (tp + fp + fn) > 0
    return float(np.mean(2 * tp[present] / (2 * tp[present] + fp[present] + fn[present])))


def majority_baseline(train_labels: np.ndarray, eval_labels: np.ndarray) -> float:
    """Accuracy on ``eval_labels`` of always predicting the most frequent of ``train_labels`` (ties: lowest id).

    train_labels: (N,) integer >= 0, N >= 1; eval_labels: (M,) integer, M >= 1.
    """
    op = "majority_baseline"
    for name, x in (("train_labels", train_labels), ("eval_labels", eval_labels)):
        check_int(op, name, x)
        check_ndim(op, name, x, 1)
        _check_nonempty(op, name, x)
    if train_labels.min() < 0:
        raise ValueError(f"{op}: argument 'train_labels' expected class ids >= 0, got {train_labels.min()}")
    majority = int(np.argmax(np.bincount(train_labels.astype(np.int64))))
    return float(np.mean(eval_labels == majority))


def token_accuracy(labels: np.ndarray, predictions: np.ndarray, *, ignore_index: int = IGNORE_INDEX) -> float:
    """Accuracy over the positions where labels != ignore_index.  labels, predictions: (...) integer, same shape."""
    op = "token_accuracy"
    y, p = _check_pair(op, labels, predictions, None)
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"{op}: argument 'ignore_index' expected an int, got {type(ignore_index).__name__}")
    scored = y != ignore_index
    if not scored.any():
        raise ValueError(f"{op}: argument 'labels' expected at least one position not equal to "
                         f"ignore_index={ignore_index}, got none")
    return float(np.mean(y[scored] == p[scored]))


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_labels: int, *,
                           train_labels: Optional[np.ndarray] = None) -> Dict[str, object]:
    """accuracy, macro_f1, confusion_matrix and (given ``train_labels``) majority_baseline, in one dict."""
    out: Dict[str, object] = {"accuracy": accuracy(labels, predictions),
                              "macro_f1": macro_f1(labels, predictions, num_labels),
                              "confusion_matrix": confusion_matrix(labels, predictions, num_labels)}
    if train_labels is not None:
        out["majority_baseline"] = majority_baseline(train_labels, labels)
    return out
