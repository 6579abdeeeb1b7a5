"""Checkpoints: config, weights, optimizer state, RNG state and step in one file.

Two formats, chosen by the file's suffix:

- ``.npz``: a zip of ``.npy`` arrays, as ``numpy.savez`` writes it (and readable by
  ``np.load(..., allow_pickle=False)``);
- ``.safetensors``: the safetensors layout (8-byte little-endian header length, a
  JSON header of dtype/shape/offsets, then the raw bytes), parsed and laid out by
  ``npformer._safetensors`` with NumPy alone; what is kept here is npformer's own: the
  ``npformer`` entry of ``__metadata__``, the checksum and the checkpoint version.

Nested state (an optimizer's per-parameter moments, a bit generator's state) is
flattened to ``/``-joined keys: arrays become tensors, everything else goes into a
JSON ``metadata`` entry. The flattening is one-to-one, so what loads is what was
saved: a key may be any string (the empty string, ``"#"``, ``"."``, NUL, any Unicode)
except where the file cannot hold it, and those are refused by ``save`` with a
``ValueError`` naming the key, before anything is written:

- no key may contain ``/`` (the separator) or end in ``#len`` (which marks a list's length);
- the top-level keys ``format``, ``version`` and ``__metadata__`` are reserved for the file's own entries;
- the key of an array becomes a zip member's name in ``.npz`` (no NUL, which zip readers
  cut names at; no ``\\``, which they turn into ``/`` on Windows) and a tensor's name in
  ``.safetensors``; in both it must be encodable as UTF-8 (no lone surrogates).

Arrays are stored in little-endian order (big-endian ones are byte-swapped) and bool
arrays as 0/1 bytes (any non-zero byte is True), as both formats require.

Saving is atomic: the bytes go to a temporary file (a short name of its own) in the
target's directory, which is flushed to disk and then renamed over the target, so a
reader sees the old file or the new one, never half of one. A ``path`` that is a
symbolic link is written through: the file it points to is replaced, the link stays.
The file gets the permissions an ordinary ``open()`` would give it: those of the file
it replaces, or ``0o666`` less the process umask for a new file.

Integrity: an ``.npz`` member carries a CRC-32, and the ``__metadata__`` member lists the
others (under its own key ``__metadata__``): ``load`` refuses a member it does not list, or
one it lists that is missing (files written before the list was kept load without the check). The safetensors format has no checksum,
so ``save`` adds one where other readers ignore it: ``__metadata__["npformer.sha256"]``,
the SHA-256 of the tensors' names, dtypes, shapes and bytes and of the rest of
``__metadata__`` (not of the layout: reordering the tensors keeps it). ``load``
verifies it whenever it is present and refuses a file whose contents do not match it.
Files of checkpoint version 2 (this one) always carry it, so a file whose checksum was
lost (a damaged key name) is refused too; files of version 1, written before the
checksum existed, load without one. Every single-byte change of a saved file is thus
either refused or harmless (a byte no reader looks at, such as a zip time stamp).

Loading trusts nothing in the file. Every structure is checked before any tensor is
read (the zip members and each ``.npy`` header; the safetensors header's dtypes,
shapes and ``data_offsets``, which must tile the data section exactly), and anything
malformed, truncated, foreign or missing raises ``CheckpointError`` (a ``ValueError``)
naming the file and what is wrong. Sizes are checked before memory is spent on them: a
shape must be one NumPy can make (at most 64 dimensions, at most 2**63 - 1 bytes), an
``.npz`` member's declared size must be the one its ``.npy`` header implies (and fit in
memory) before it is inflated, and a list length in the metadata must match the entries
actually present. Arrays come back with the dtype stored in the file (an ``I64``
tensor is an int64 array, never silently cast), in native byte order, writable and
owning their memory, so a caller can compare each dtype with the one it expects.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import struct
import zipfile
import zlib
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from . import _safetensors as container
from ._safetensors import META_KEY as _META_KEY, parse_json, shape_problem
from .ops._checks import memory_limit

FORMAT = "npformer-checkpoint"
# Version 2 adds the safetensors checksum (and requires it); version 1 files, written without one, still load.
VERSION = 2
READABLE_VERSIONS = (1, 2)
_LEN_SUFFIX = "#len"
# The safetensors dtype names a checkpoint holds: all but BF16, for which NumPy has no dtype.
_ST_DTYPES = tuple(name for name in container.DTYPES if name != "BF16")
_ST_NAMES = {container.DTYPES[name].newbyteorder("="): name for name in _ST_DTYPES}
# Largest .npy header accepted (NumPy's own limit for untrusted files).
_MAX_NPY_HEADER = 10_000
_NPY_MAGIC = b"\x93NUMPY"
# Zip members are written with a fixed time stamp, so the same state gives the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# Deepest nesting of a state (levels of dicts and lists): deeper is refused on save and on load.
_MAX_DEPTH = 64
# Top-level keys the file's own entries use.
_RESERVED = ("format", "version", _META_KEY)
# The safetensors __metadata__ entry holding the SHA-256 of the file's contents.
_SHA_KEY = "npformer.sha256"
# The longest zip member name (a 2-byte length field).
_MAX_ZIP_NAME = 0xFFFF
# Temporary files are named with this prefix and a random suffix: short, whatever the target's name.
_TMP_PREFIX = ".npformer-"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """The file is missing, truncated, malformed, not a checkpoint, or from an incompatible version."""


def _error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint.load: {path}: {what}")


def _check_path(op: str, path: object) -> Path:
    try:
        result = Path(path) if isinstance(path, (str, os.PathLike)) else None
    except TypeError:  # an os.PathLike whose path is bytes
        result = None
    if result is None:
        raise TypeError(f"{op}: argument 'path' expected a str or os.PathLike naming a file, got {type(path).__name__}")
    if "\x00" in str(result):
        raise ValueError(f"{op}: argument 'path' expected a file name, got one with a NUL character: {str(result)!r}")
    return result


# -- flattening a nested state into keys -------------------------------------------------------
# A value at path (k1, k2, ..., kn) of the state is stored under the key "k1/k2/.../kn"; a list at
# path P that holds dicts or arrays is stored as "P#len" (its length) and its items under "P/0",
# "P/1", ...; an empty dict as the value {} under its path. No part may contain "/" or end in
# "#len", so a key splits back into its path one way only: the encoding is one-to-one, for the
# empty key as for any other (the top-level key "" with the value {"a": 1} is "/a").
def _flatten(tree: Any, path: Tuple[str, ...], arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    key = "/".join(path)

    def claim(k: str) -> None:
        if k in arrays or k in meta:
            raise ValueError(f"checkpoint.save: argument 'state' has two entries flattened to the key {k!r}")

    if len(path) > _MAX_DEPTH:
        raise ValueError(f"checkpoint.save: argument 'state' is nested deeper than {_MAX_DEPTH} levels at "
                         f"{key[:80]!r}... (does it contain itself?)")

    if isinstance(tree, dict):
        if not tree and path:
            claim(key)
            meta[key] = {}  # an empty dict is kept as a value, so it comes back
        for k, v in tree.items():
            k = str(k)
            if "/" in k or k.endswith(_LEN_SUFFIX):
                raise ValueError(f"checkpoint.save: argument 'state' has a key {k!r}: keys may not contain '/' "
                                 f"or end in {_LEN_SUFFIX!r}")
            if not path and k in _RESERVED:
                raise ValueError(f"checkpoint.save: argument 'state' has the top-level key {k!r}, which the file "
                                 f"reserves for its own entries ({', '.join(map(repr, _RESERVED))}); use another "
                                 "key, or put it one level down")
            _flatten(v, path + (k,), arrays, meta)
    elif isinstance(tree, np.ndarray):
        if tree.dtype.kind not in "biufc" or tree.dtype.fields is not None or tree.dtype.subdtype is not None:
            raise ValueError(f"checkpoint.save: argument 'state' has array {key!r} of dtype {tree.dtype}; "
                             "expected a bool, integer, float or complex dtype")
        claim(key)
        arrays[key] = tree
    elif isinstance(tree, (list, tuple)) and _holds_arrays_or_dicts(tree, len(path)):
        claim(f"{key}{_LEN_SUFFIX}")
        meta[f"{key}{_LEN_SUFFIX}"] = len(tree)
        for i, v in enumerate(tree):
            _flatten(v, path + (str(i),), arrays, meta)
    else:
        value = tree.item() if isinstance(tree, np.generic) else tree
        try:
            json.dumps(value)
        except (TypeError, ValueError, RecursionError) as e:
            raise TypeError(f"checkpoint.save: argument 'state' holds a {type(tree).__name__} at {key!r}, "
                            f"which is neither a numpy array nor JSON-serialisable ({e})") from None
        claim(key)
        meta[key] = value


def _holds_arrays_or_dicts(items: Any, depth: int) -> bool:
    """Whether a list holds a dict or an array, directly or in a list inside it (then it is split into keys)."""
    if depth > _MAX_DEPTH:
        return True  # deeper than any state: _flatten refuses it by name
    return any(isinstance(v, (dict, np.ndarray)) or (isinstance(v, (list, tuple)) and
                                                     _holds_arrays_or_dicts(v, depth + 1)) for v in items)


def _stored(a: np.ndarray) -> np.ndarray:
    """``a`` as the file holds it: native byte order (written little-endian), bools as 0/1."""
    if a.dtype.kind == "b":
        return a.view(np.uint8) != 0  # a bool array may hold any non-zero byte for True
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _check_names(fmt: str, arrays: Dict[str, np.ndarray]) -> None:
    """Every array key must be a name the container can hold (see the module docstring)."""
    for name in arrays:
        where = f"checkpoint.save: argument 'state' has an array key {name!r}"
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} that a {fmt} file cannot hold (a lone surrogate has no UTF-8 form); "
                             "use another key") from None
        if fmt == ".npz":
            if "\x00" in name:
                raise ValueError(f"{where} that a zip member name cannot hold (a NUL character, where zip "
                                 "readers cut the name); use .safetensors or another key")
            if "\\" in name:
                raise ValueError(f"{where} that a zip member name cannot hold portably (a backslash, which zip "
                                 "readers on Windows turn into '/'); use .safetensors or another key")
            if len(raw) + len(".npy") > _MAX_ZIP_NAME:
                raise ValueError(f"{where[:120]}... of {len(raw)} bytes; a zip member name holds at most "
                                 f"{_MAX_ZIP_NAME - len('.npy')}")


class _Node(dict):
    """A dict built from keys while unflattening (as opposed to a dict stored as a value)."""


def _unflatten(path: Path, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> Dict[str, Any]:
    lists: Dict[str, int] = {}
    leaves: List[Tuple[str, Any]] = list(arrays.items())
    for key, value in meta.items():
        if key.endswith(_LEN_SUFFIX):
            if type(value) is not int or value < 0:
                raise _error(path, f"metadata {key!r} must be a list length (an integer >= 0), got {value!r:.80}")
            lists[key[: -len(_LEN_SUFFIX)]] = value
        else:
            leaves.append((key, value))
    root = _Node()
    for key, value in leaves:
        node, parts = root, key.split("/")
        if len(parts) > _MAX_DEPTH + 1:
            raise _error(path, f"key {key[:80]!r}... is nested deeper than {_MAX_DEPTH} levels")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, _Node())
            if not isinstance(child, _Node):
                raise _error(path, f"key {key!r} lies under {'/'.join(parts[:depth + 1])!r}, which holds a value")
            node = child
        if parts[-1] in node:
            raise _error(path, f"key {key!r} is stored twice (as a value and as a group, or in both sections)")
        node[parts[-1]] = value

    def relist(node: Any, where: Optional[str]) -> Any:  # where: the node's key, None for the root
        if not isinstance(node, _Node):
            return node
        out = {k: relist(v, k if where is None else f"{where}/{k}") for k, v in node.items()}
        if where is None or where not in lists:
            return out
        n = lists.pop(where)
        # Compare the count first: the length is bounded by the entries present, not by the number in the file.
        if len(out) != n or not all(str(i) in out for i in range(n)):
            raise _error(path, f"list {where!r} should hold entries 0..{n - 1}, found {sorted(out)[:8]}")
        return [out[str(i)] for i in range(n)]

    tree = relist(root, None)
    if lists:
        raise _error(path, f"metadata gives list lengths for keys that hold no entries: {sorted(lists)[:8]}")
    return tree


# -- writing ---------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the target's directory, then rename it over the target.

    A symbolic link is followed: the target is the file it points to (which the rename
    replaces), so the link itself stays. The temporary file has a short name of its own
    (``.npformer-<random>.tmp``), so a target whose name is near the file system's limit
    still works. It is created with mode 0o666, which the kernel masks with the umask, as
    ``open(path, "wb")`` would; if the target already exists, its permission bits are
    copied over, as overwriting it in place would keep them.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep_mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        keep_mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        if keep_mode is not None:
            os.chmod(tmp, keep_mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def save(path: str | os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts of arrays and JSON-able values) atomically to ``path``; returns ``path``.

    Dict keys become strings; tuples come back as lists; arrays come back in native byte
    order. Raises ``ValueError`` or ``TypeError`` naming the argument (before anything is
    written) for a suffix other than ``.npz``/``.safetensors``, a directory, a key the
    file cannot hold (see the module docstring), or a value that is neither an array nor
    JSON-serialisable.
    """
    path = _check_path("checkpoint.save", path)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint.save: argument 'state' expected a dict, got {type(state).__name__}")
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"checkpoint.save: argument 'path' expected a .npz or .safetensors file, got {path.name!r}")
    if path.is_dir():
        raise ValueError(f"checkpoint.save: argument 'path' names a directory: {path}")
    arrays: Dict[str, np.ndarray] = {}
    meta: Dict[str, Any] = {"format": FORMAT, "version": VERSION}
    _flatten(state, (), arrays, meta)
    _check_names(path.suffix, arrays)
    arrays = {name: _stored(a) for name, a in arrays.items()}
    if path.suffix == ".npz":
        meta[_META_KEY] = sorted(arrays)  # the members the file holds: any other is refused on load
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _atomic_write(path, lambda f: _write_npz(f, arrays))
    else:
        for name, a in arrays.items():
            if a.dtype not in _ST_NAMES:
                raise ValueError(f"checkpoint.save: argument 'state' has array {name!r} of unsupported dtype "
                                 f"{a.dtype} for safetensors; expected one of {sorted(map(str, _ST_NAMES))}")
        header, blobs = _safetensors_parts(arrays, meta)
        if len(header) > container.MAX_HEADER_BYTES:
            raise ValueError(f"checkpoint.save: argument 'state' needs a safetensors header of {len(header)} bytes, "
                             f"more than the {container.MAX_HEADER_BYTES} a reader accepts (too many keys or too much "
                             "metadata); use .npz")
        _atomic_write(path, lambda f: container.write(f, header, blobs))
    return path


def _write_npz(f: BinaryIO, arrays: Dict[str, np.ndarray]) -> None:
    """The zip of ``<key>.npy`` members that ``numpy.savez`` writes (stored, not compressed)."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)


def _safetensors_digest(tensors: List[Tuple[str, str, Tuple[int, ...], Any]], metadata: Dict[str, str]) -> str:
    """SHA-256 (hex) of the contents of a safetensors file, independent of its layout.

    ``tensors``: (name, dtype name, shape, bytes) of each tensor; ``metadata``: the
    ``__metadata__`` entries other than the checksum. Hashed: the length and bytes of the
    canonical JSON of the names, dtypes, shapes and metadata, then each tensor's bytes in
    name order (their lengths follow from the shapes). Reordering the tensors or padding
    the header keeps it; any change to a name, dtype, shape, byte or metadata string does not.
    """
    description = json.dumps({"metadata": metadata, "tensors": {name: [dtype, shape] for name, dtype, shape, _
                                                                in tensors}},
                             sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    digest = hashlib.sha256(struct.pack("<Q", len(description)))
    digest.update(description)
    for _, _, _, data in sorted(tensors, key=lambda t: t[0]):
        digest.update(data)
    return digest.hexdigest()


def _safetensors_parts(arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> Tuple[bytes, List[bytes]]:
    """The header (padded to 8 bytes, checksum included) and the tensors' bytes, in file order."""
    metadata = {"npformer": json.dumps(meta)}
    tensors = [(name, _ST_NAMES[a.dtype], a.shape, container.tensor_bytes(a)) for name, a in arrays.items()]
    header = container.header_bytes(tensors, {**metadata, _SHA_KEY: _safetensors_digest(tensors, metadata)})
    return header, [blob for *_, blob in tensors]


# -- reading ---------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by ``save``.

    Any problem with the file (missing, unreadable, truncated, malformed, foreign, or
    of another version) raises ``CheckpointError`` naming the file and the problem.
    """
    path = _check_path("checkpoint.load", path)
    if path.suffix not in (".npz", ".safetensors"):
        raise _error(path, "expected a .npz or .safetensors file")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _error(path, "no such file (the checkpoint does not exist)") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a checkpoint file") from None
    except OSError as e:
        raise _error(path, f"cannot be opened ({e})") from None
    try:
        with f:
            size = os.fstat(f.fileno()).st_size
            if path.suffix == ".npz":
                arrays, meta = _read_npz(path, f)
            else:
                arrays, meta = _read_safetensors(path, f, size)
    except OSError as e:
        raise _error(path, f"cannot be read ({e})") from e
    if meta.get("format") != FORMAT:
        raise _error(path, f"not an npformer checkpoint (format {meta.get('format')!r})")
    version = meta.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _error(path, f"checkpoint version {version!r:.40} but this npformer reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return _unflatten(path, arrays, meta)


# .npz ----------------------------------------------------------------------------------------
# What zipfile raises on a damaged archive (a bad signature or CRC, a cut stream, a
# corrupt deflate stream, a field out of range).
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, struct.error, OverflowError, IndexError, KeyError,
               NotImplementedError, RuntimeError, zlib.error)


def _read_npz(path: Path, f: BinaryIO) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
        raise _error(path, "is a single .npy array, not an .npz archive (not a checkpoint)")
    f.seek(0)
    try:
        zf = zipfile.ZipFile(f)
    except _ZIP_ERRORS as e:
        raise _error(path, f"unreadable checkpoint (truncated or not a checkpoint): not a zip archive ({e})") from None
    arrays: Dict[str, np.ndarray] = {}
    with zf:
        infos = zf.infolist()
        for info in infos:
            name = info.filename
            if not name.endswith(".npy"):
                raise _error(path, f"zip member {name!r} is not a .npy array")
            key = name[: -len(".npy")]
            if key in arrays:
                raise _error(path, f"zip member {name!r} appears twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _error(path, f"zip member {name!r} uses compression method {info.compress_type}; "
                                   "expected stored (0) or deflated (8)")
            if info.flag_bits & 0x1:
                raise _error(path, f"zip member {name!r} is encrypted")
            try:
                arrays[key] = _read_npy(path, zf, info)
            except CheckpointError:
                raise
            except _ZIP_ERRORS as e:
                raise _error(path, f"unreadable checkpoint (truncated or corrupt): zip member {name!r}: {e}") from None
    if _META_KEY not in arrays:
        raise _error(path, f"not an npformer checkpoint (no {_META_KEY} entry)")
    raw_meta = arrays.pop(_META_KEY)
    if raw_meta.dtype != np.uint8 or raw_meta.ndim != 1:
        raise _error(path, f"the {_META_KEY} entry must be a 1-d uint8 array, got {raw_meta.dtype} "
                           f"of shape {raw_meta.shape}")
    meta = parse_json(raw_meta.tobytes(), f"the {_META_KEY} entry", partial(_error, path))
    listed = meta.pop(_META_KEY, None)  # None in files written before the member list was kept
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
            raise _error(path, f"the {_META_KEY} entry's member list must be a JSON array of strings, "
                               f"got {listed!r:.80}")
        if len(set(listed)) != len(listed):
            raise _error(path, f"the {_META_KEY} entry's member list repeats "
                               f"{next(k for k in listed if listed.count(k) > 1)!r:.80}")
        extra = sorted(set(arrays) - set(listed))
        if extra:
            raise _error(path, f"zip member {extra[0] + '.npy'!r:.100} is not one the checkpoint's {_META_KEY} "
                               f"lists (a member added to the file)")
        missing = sorted(set(listed) - set(arrays))
        if missing:
            raise _error(path, f"no zip member {missing[0] + '.npy'!r:.100}, which the checkpoint's {_META_KEY} "
                               "lists (a member removed from the file)")
    return arrays, meta


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"the member ended after {len(data)} of {n} bytes")
    return data


def _read_npy(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member: magic, version, a literal header dict of descr/fortran_order/shape, then the data.

    The header is read and checked first; the member's declared (uncompressed) size must be
    exactly what the header implies, and fit in memory, before the data is read, and no more
    than that is ever read (an inflating member cannot outgrow it).
    """
    name = info.filename

    def bad(what: str) -> CheckpointError:
        return _error(path, f"zip member {name!r}: {what}")

    with zf.open(info) as stream:
        prefix = stream.read(10)
        if len(prefix) < 10 or prefix[:6] != _NPY_MAGIC:
            raise bad("not a .npy array (bad magic bytes)")
        version = (prefix[6], prefix[7])
        if version == (1, 0):
            (hlen,), start = struct.unpack("<H", prefix[8:10]), 10
        elif version in ((2, 0), (3, 0)):
            more = stream.read(2)
            if len(more) < 2:
                raise bad("the .npy header is truncated")
            (hlen,), start = struct.unpack("<I", prefix[8:10] + more), 12
        else:
            raise bad(f".npy format version {version[0]}.{version[1]} is not supported")
        if hlen > _MAX_NPY_HEADER:
            raise bad(f"the .npy header claims {hlen} bytes (at most {_MAX_NPY_HEADER})")
        text = stream.read(hlen)
        if len(text) != hlen:
            raise bad("the .npy header is truncated")
        dtype, fortran, shape = _npy_header(bad, version, text)
        problem = shape_problem(shape, dtype.itemsize)
        if problem is not None:
            raise bad(f"the .npy shape {shape!r:.100} {problem}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if info.file_size != start + hlen + nbytes:
            raise bad(f"declares {info.file_size} bytes uncompressed, but its .npy header needs "
                      f"{start + hlen + nbytes} (shape {shape} of {dtype})")
        if nbytes > memory_limit():
            raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, more than this machine's memory")
        data = _read_exactly(stream, nbytes)  # at most file_size bytes in all: zipfile stops there
        if stream.read(1):
            raise bad("holds data after the array")
    flat = np.frombuffer(data, dtype=dtype, count=count)
    array = flat.reshape(shape, order="F" if fortran else "C")
    return array.astype(dtype.newbyteorder("="), order="K")  # an owned, writable copy in native byte order


def _npy_header(bad, version: Tuple[int, int], raw: bytes) -> Tuple[np.dtype, bool, Tuple[int, ...]]:
    """The dtype, fortran_order and shape of a ``.npy`` header's text, each checked."""
    try:
        text = raw.decode("utf-8" if version == (3, 0) else "latin1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        raise bad(f"the .npy header is not a Python literal ({type(e).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise bad(f"the .npy header must be a dict of 'descr', 'fortran_order' and 'shape', got {header!r:.200}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str):
        raise bad(f"the .npy dtype must be a simple dtype string, got {descr!r:.100}")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise bad(f"the .npy dtype {descr!r:.100} is not a numpy dtype") from None
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        raise bad(f"the .npy dtype {descr!r:.100} is not a bool, integer, float or complex dtype")
    if not isinstance(fortran, bool):
        raise bad(f"the .npy fortran_order must be True or False, got {fortran!r:.100}")
    if not (isinstance(shape, tuple) and all(type(s) is int and s >= 0 for s in shape)):
        raise bad(f"the .npy shape must be a tuple of integers >= 0, got {shape!r:.100}")
    return dtype, fortran, shape


# .safetensors ------------------------------------------------------------------------------
def _read_safetensors(path: Path, f: BinaryIO, size: int) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    error = partial(_error, path)
    entries, meta_entry, body_size = container.read_header(f, size, _ST_DTYPES, error)
    if "npformer" not in meta_entry:
        raise error(f"not an npformer checkpoint (no 'npformer' entry in {_META_KEY})")
    checksum = meta_entry.pop(_SHA_KEY, None)
    if checksum is not None and not _HEX64.fullmatch(checksum):
        raise error(f"{_META_KEY}[{_SHA_KEY!r}] must be 64 lowercase hex digits, got {checksum!r:.80}")
    meta = parse_json(meta_entry["npformer"].encode("utf-8", "surrogatepass"), f"{_META_KEY}['npformer']", error)
    if checksum is None and type(meta.get("version")) is int and meta["version"] >= 2:
        raise error(f"a version {meta['version']} checkpoint carries a SHA-256 in {_META_KEY}[{_SHA_KEY!r}], "
                    "and this file has none: the file is corrupt")

    body = container.read_body(f, body_size, error)
    if checksum is not None:
        view = memoryview(body)
        actual = _safetensors_digest([(e.name, e.dtype, e.shape, view[e.begin:e.end]) for e in entries], meta_entry)
        if not hmac.compare_digest(actual, checksum):
            raise error(f"the contents do not match the SHA-256 in {_META_KEY}[{_SHA_KEY!r}]: the file is "
                        "corrupt (a changed byte in the data, a tensor's name, dtype or shape, or the metadata)")
    arrays = {}
    for entry in entries:
        flat = container.elements(body, entry, error)
        arrays[entry.name] = flat.reshape(entry.shape).astype(flat.dtype.newbyteorder("="))  # a 0-d tensor stays 0-d
    return arrays, meta
