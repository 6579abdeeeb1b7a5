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
"""

from __future__ import annotations

import ast
import functools
import math
import sysconfig
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..ops._checks import check_range

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


@functools.lru_cache(maxsize=4)
def default_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Up to ``max_bytes`` of UTF-8: the pydoc topics, then the docstrings of ``MODULES`` (see the module doc)."""
    check_range("default_corpus", "max_bytes", max_bytes, 1, math.inf)
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
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"train_val_split: argument 'ids' expected 1 dimensions, got {ids.ndim} (shape {ids.shape})")
    check_range("train_val_split", "val_fraction", val_fraction, 0.0, 1.0)
    check_range("train_val_split", "chunk_size", chunk_size, 1, math.inf)
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
    ids = np.asarray(ids)
    B, T = batch_size, block_size
    check_range("get_batch", "batch_size", B, 1, math.inf)
    check_range("get_batch", "block_size", T, 1, math.inf)
    if ids.ndim != 1 or len(ids) <= T:
        raise ValueError(f"get_batch: argument 'ids' expected shape (N,) with N > block_size = {T}, got {ids.shape}")
    starts = rng.integers(0, len(ids) - T, size=B)  # (B,)
    window = starts[:, None] + np.arange(T + 1)  # (B, T + 1)
    tokens = ids[window].astype(np.int64, copy=False)
    return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
