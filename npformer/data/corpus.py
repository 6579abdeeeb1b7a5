"""A built-in text corpus, a train/validation split, and random batches of next-token windows.

``default_corpus()`` needs no download: it is English prose about Python that every
Python installation carries in its standard library, read from the files under
``sysconfig.get_paths()["stdlib"]`` without importing anything:

1. the language-reference topics that ``help("assert")`` prints
   (``pydoc_data/topics.py``), in sorted topic order (about 0.45 MB);
2. the docstrings of the modules in ``MODULES`` (in that sorted order), each module's
   docstring followed by those of its classes and functions in source order, found by
   parsing the source with ``ast`` (about 0.8 MB).

It is the same text on every run of the same Python version (no hashing, no
dictionary-order or import side effects), and is cut to at most ``max_bytes`` of UTF-8
at a line end. Different Python versions have different docstrings, so the text (and
its character vocabulary) can differ between versions.

Token streams (``ids``) are 1-d integer arrays or sequences of ints; floats, bools and
strings are refused rather than converted. Counts (``max_bytes``, ``batch_size``,
``block_size``, ``chunk_size``, ``seed``) are integers, ``block_size`` at most
``len(ids) - 1``; a wrong argument raises ``ValueError`` or ``TypeError`` naming it.
``data_fingerprint`` is a short hash of a text or a token stream, for a checkpoint to
record which data it was trained on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..ops._checks import check_bool, check_count, check_real

# Pure-Python standard library modules with plenty of prose in their docstrings.
MODULES = (
    "_pydecimal", "_pyio", "argparse", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64",
    "bisect", "calendar", "codecs", "collections", "concurrent.futures._base", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "difflib", "doctest", "email.message", "email.utils", "enum", "fractions",
    "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "http.client", "http.server", "inspect",
    "ipaddress", "json", "locale", "logging", "mailbox", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "platform", "posixpath", "pprint", "pydoc", "queue", "random", "selectors", "shlex",
    "shutil", "socket", "ssl", "statistics", "string", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)
DEFAULT_MAX_BYTES = 1 << 20


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_file(name: str) -> Path | None:
    base = _stdlib() / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _topics() -> List[str]:
    """The pydoc topic texts, in sorted topic order ([] if this Python lacks them)."""
    path = _stdlib() / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "topics":
            topics = ast.literal_eval(node.value)
            return [topics[k].strip() + "\n\n" for k in sorted(topics)]
    return []


def _docstrings(module: str) -> List[str]:
    """The module's docstring, then each class's and function's, headed by its dotted name."""
    path = _module_file(module)
    if path is None:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = []

    def visit(node, prefix):
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{prefix}\n{doc}\n\n")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return parts


def default_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Up to ``max_bytes`` of UTF-8: the pydoc topics, then the docstrings of ``MODULES`` (see the module doc)."""
    return _default_corpus(check_count("default_corpus", "max_bytes", max_bytes, lo=1))


@functools.lru_cache(maxsize=4)
def _default_corpus(max_bytes: int) -> str:
    pieces, size = [], 0
    sources = [_topics] + [functools.partial(_docstrings, m) for m in MODULES]
    for source in sources:
        for piece in source():
            pieces.append(piece)
            size += len(piece.encode("utf-8"))
        if size >= max_bytes:
            break
    if not pieces:
        raise RuntimeError(f"default_corpus: no standard library sources found under {_stdlib()}")
    raw = "".join(pieces).encode("utf-8")
    if len(raw) <= max_bytes:
        return raw.decode("utf-8")
    text = raw[:max_bytes].decode("utf-8", errors="ignore")  # drop a character cut in half
    end = text.rfind("\n")
    return text[: end + 1] if end >= 0 else text


def train_val_split(ids, val_fraction: float = 0.1, seed: int = 0, chunk_size: int = 4096,
                    contiguous: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Split a token stream into training and validation streams that share no token position.

    By default the stream is cut into ``ceil(N / chunk_size)`` contiguous chunks of
    (nearly) equal length, at least 2, and ``round(val_fraction * chunks)`` of them (at
    least one, at most all but one) are drawn by ``np.random.default_rng(seed)`` for
    validation. Each side is its chunks concatenated in their original order, so a
    window drawn by ``get_batch`` may straddle the seam between two chunks. Random
    chunks keep the validation text from all being the corpus's last topic.

    With ``contiguous=True``, the last ``round(val_fraction * N)`` tokens are validation.

    ids: (N,) integer  ->  train: (N - M,), val: (M,)  int64
    """
    ids = token_stream("train_val_split", "ids", ids)
    val_fraction = check_real("train_val_split", "val_fraction", val_fraction, lo=0.0, hi=1.0, hi_open=True)
    seed = check_count("train_val_split", "seed", seed, lo=0)
    chunk_size = check_count("train_val_split", "chunk_size", chunk_size, lo=1)
    contiguous = check_bool("train_val_split", "contiguous", contiguous)
    N = len(ids)
    if val_fraction == 0 or N == 0:
        return ids.copy(), ids[:0].copy()
    if N < 2:
        raise ValueError(f"train_val_split: argument 'ids' expected at least 2 tokens, got {N}")
    if contiguous:
        M = min(max(round(val_fraction * N), 1), N - 1)
        return ids[: N - M].copy(), ids[N - M :].copy()
    n_chunks = min(max(math.ceil(N / chunk_size), 2), N)
    bounds = np.linspace(0, N, n_chunks + 1).round().astype(np.int64)
    n_val = min(max(round(val_fraction * n_chunks), 1), n_chunks - 1)
    is_val = np.zeros(n_chunks, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_chunks, size=n_val, replace=False)] = True
    in_val = np.repeat(is_val, np.diff(bounds))  # (N,) which side each position falls on
    return ids[~in_val], ids[in_val]


def get_batch(ids, batch_size: int, block_size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows of ``block_size + 1`` tokens: inputs and next-token targets.

    ids: (N,) integer, N > T  ->  x: (B, T) int64, y: (B, T) int64 with y[b, t] = x[b, t + 1] = ids[s_b + t + 1]

    Start positions s_b are uniform over [0, N - T) from ``rng`` (one ``integers`` call).
    """
    ids = token_stream("get_batch", "ids", ids)
    B = check_count("get_batch", "batch_size", batch_size, lo=1)
    T = check_count("get_batch", "block_size", block_size, lo=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"get_batch: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
    if len(ids) <= T:
        raise ValueError(f"get_batch: argument 'block_size' expected at most {len(ids) - 1} (a window of "
                         f"block_size + 1 tokens must fit in the {len(ids)} tokens of 'ids'), got {T}")
    starts = rng.integers(0, len(ids) - T, size=B)  # (B,)
    window = starts[:, None] + np.arange(T + 1)  # (B, T + 1)
    tokens = ids[window].astype(np.int64, copy=False)
    return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])


def get_prefix_batch(ids, batch_size: int, block_size: int,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``get_batch``'s windows for a prefix LM (proofs/attention.md, ATT.18): x, y and prefix_len (B,).

    Row b's prefix length L_b is uniform over [1, T] (drawn after the windows, one ``integers``
    call); the targets a prefix position would copy, y[b, t] for t < L_b - 1, are -100 (ignored),
    so position L_b - 1, which sees the whole prefix, predicts the first token after it.
    """
    x, y = get_batch(ids, batch_size, block_size, rng)
    y = y.copy()  # x and y may be views of one window array (one row): ignoring a target must not edit x
    B, T = x.shape
    prefix_len = rng.integers(1, T + 1, size=B)  # (B,)
    y[np.arange(T)[None, :] < prefix_len[:, None] - 1] = -100
    return x, y, prefix_len


def token_stream(op: str, name: str, ids: object) -> np.ndarray:
    """A 1-d stream of integer token ids as int64: a 1-d integer array, or a list/tuple/range of ints.

    Floats (which would be truncated), bools, strings and arrays of other ranks are refused.
    """
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{op}: argument '{name}' expected an integer array, got dtype {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"{op}: argument '{name}' expected 1 dimension, got {ids.ndim} (shape {ids.shape})")
        if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{op}: argument '{name}' holds an id outside the int64 range")
        return ids.astype(np.int64, copy=False)
    if isinstance(ids, (str, bytes, bytearray, dict, set, frozenset)) or not isinstance(ids, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a 1-d array or sequence of integer ids, "
                        f"got {type(ids).__name__}")
    values = list(ids)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{op}: argument '{name}' expected integer ids, got {type(v).__name__} {v!r:.40} "
                            f"at position {i}")
    try:
        return np.array(values, dtype=np.int64).reshape(len(values))
    except OverflowError:
        raise ValueError(f"{op}: argument '{name}' holds an id outside the int64 range") from None


def data_fingerprint(data: object) -> str:
    """``"sha256:<16 hex digits>"`` of a text (its UTF-8 bytes) or of a token stream (int64 ids).

    A trainer stores it in a checkpoint and compares it on resume: a different corpus
    (even one that happens to have the same vocabulary) gives a different fingerprint.
    """
    if isinstance(data, str):
        raw = b"text:" + data.encode("utf-8", "surrogatepass")
    else:
        try:
            raw = b"ids:" + token_stream("data_fingerprint", "data", data).astype("<i8").tobytes()
        except TypeError:
            raise TypeError(f"data_fingerprint: argument 'data' expected a str or a 1-d sequence of integer ids, "
                            f"got {type(data).__name__}") from None
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]
