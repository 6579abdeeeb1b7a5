"""The safetensors container, parsed and laid out with NumPy alone.

A file is three parts, in this order:

    8 bytes      N, the header length, an unsigned little-endian 64-bit integer
    N bytes      a JSON object: name -> {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                 and optionally "__metadata__": {str: str}; trailing spaces pad it
    the rest     the data buffer: each tensor's bytes, C order, little-endian, at [begin, end)
                 counted from the start of the buffer; the tensors cover it with no gap or overlap

``read_header`` checks the framing and every entry (dtype name, shape, offsets, sizes)
before any tensor is made; ``header_bytes`` and ``write`` lay a file out. What a file
means is its reader's: ``npformer.hf.safetensors`` (Hugging Face weights) and
``npformer.checkpoint`` (training checkpoints) each pass the dtype names they accept and
``error``, a function that turns a message into their own exception naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO, Callable, Collection, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

META_KEY = "__metadata__"
# A header larger than this is refused before it is read (the reference reader's limit, 100 MB).
MAX_HEADER_BYTES = 100_000_000
# The most dimensions a NumPy array may have (32 before NumPy 2, 64 since).
MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
# File dtype name -> the NumPy dtype of its stored bytes (little-endian). BF16 is stored as its bits (uint16).
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
Error = Callable[[str], Exception]


class Entry(NamedTuple):
    """One tensor of the header: its bytes are [begin, end) of the data buffer."""
    begin: int
    end: int
    name: str
    dtype: str  # a key of DTYPES
    shape: Tuple[int, ...]


def json_type(x: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


class _Repeated(Exception):
    """A JSON object names a key twice (the key is its argument)."""


def _no_repeats(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Repeated(key)
        seen.add(key)
    return dict(pairs)


def parse_json(raw: bytes, what: str, error: Error) -> dict:
    """``raw`` as UTF-8 JSON that must be an object naming no key twice (at any depth)."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except UnicodeDecodeError as err:
        raise error(f"{what} is not UTF-8 text (byte {err.start})") from None
    except _Repeated as err:
        raise error(f"{what} names {err.args[0]!r:.100} twice") from None
    except (ValueError, RecursionError) as err:
        raise error(f"{what} is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object, got a JSON {json_type(value)}")
    return value


def shape_problem(shape: Sequence[int], itemsize: int) -> Optional[str]:
    """Why NumPy cannot make an array of ``shape`` (integers >= 0), or None if it can."""
    if len(shape) > MAX_NDIM:
        return f"has {len(shape)} dimensions, more than NumPy's {MAX_NDIM}"
    nbytes = math.prod(s for s in shape if s) * itemsize  # Python ints: no overflow; NumPy's own rule
    limit = int(np.iinfo(np.intp).max)
    if nbytes > limit:
        return f"is larger than NumPy can index (its non-zero sizes make {nbytes} bytes, at most {limit})"
    return None


def read_header(f: BinaryIO, size: int, names: Collection[str], error: Error
                ) -> Tuple[List[Entry], Dict[str, str], int]:
    """Check the header of the ``size``-byte file ``f`` (read from its start), and every entry in it.

    names: the dtype names the reader accepts (keys of DTYPES). Returns the entries sorted by
    offset, the ``__metadata__`` ({} where there is none) and the size of the data buffer,
    which follows in ``f``.
    """
    if size < 8:
        raise error(f"the file has {size} bytes, fewer than the 8-byte header length (truncated)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise error(f"header length {n} exceeds the {size - 8} bytes after the length field "
                    "(truncated, or not a safetensors file)")
    if n > MAX_HEADER_BYTES:
        raise error(f"header length {n} exceeds the {MAX_HEADER_BYTES} bytes allowed")
    raw = f.read(n)
    if len(raw) != n:
        raise error("the file ended inside the header (truncated)")
    if not raw.startswith(b"{"):
        raise error("the header must start with '{' (not a safetensors file)")
    header = parse_json(raw, "the header", error)
    body_size = size - 8 - n

    metadata = header.pop(META_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{META_KEY} must be a JSON object of strings, got a JSON {json_type(metadata)}"
                    + (" holding other values" if isinstance(metadata, dict) else ""))
    entries = []
    for name, info in header.items():
        where = f"tensor {name!r:.200}"
        if not isinstance(info, dict):
            raise error(f"{where}: expected a JSON object of dtype, shape and data_offsets, "
                        f"got a JSON {json_type(info)}")
        if set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(f"{where}: expected the keys dtype, shape and data_offsets, got {sorted(info)!r:.200}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in names:
            raise error(f"{where}: unknown dtype {dtype_name!r:.100}, expected one of {sorted(names)}")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise error(f"{where}: shape must be a list of integers >= 0, got {shape!r:.100}")
        problem = shape_problem(shape, DTYPES[dtype_name].itemsize)
        if problem is not None:
            raise error(f"{where}: shape {shape!r:.100} {problem}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise error(f"{where}: data_offsets must be a list [begin, end] of two integers, got {offsets!r:.100}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise error(f"{where}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end")
        nbytes = math.prod(shape) * DTYPES[dtype_name].itemsize
        if end - begin != nbytes:
            raise error(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                        f"{shape} of {dtype_name} needs {nbytes}")
        if end > body_size:
            raise error(f"{where}: data_offsets [{begin}, {end}] reach past the {body_size} bytes "
                        "of the data buffer (truncated)")
        entries.append(Entry(begin, end, name, dtype_name, tuple(shape)))
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a gap after byte {position}"
            raise error(f"tensor {name!r:.200}: data_offsets [{begin}, {end}] {problem}")
        position = end
    if position != body_size:
        raise error(f"the data buffer holds {body_size - position} bytes after the last tensor")
    return entries, metadata, body_size


def read_body(f: BinaryIO, body_size: int, error: Error) -> bytes:
    """The data buffer, which follows the header in ``f``."""
    body = f.read(body_size)
    if len(body) != body_size:
        raise error(f"the file ended after {len(body)} of {body_size} data bytes (truncated)")
    return body


def elements(body: bytes, entry: Entry, error: Error) -> np.ndarray:
    """``entry``'s elements as the file stores them: a flat, read-only, little-endian view of ``body``.

    A BOOL tensor must hold only the bytes 0 and 1.
    """
    flat = np.frombuffer(body, dtype=DTYPES[entry.dtype], count=math.prod(entry.shape), offset=entry.begin)
    if entry.dtype == "BOOL" and np.any(flat.view(np.uint8) > 1):
        raise error(f"tensor {entry.name!r:.200}: a BOOL tensor holds bytes other than 0 and 1")
    return flat


# -- writing ----------------------------------------------------------------------------------------
def tensor_bytes(a: np.ndarray) -> bytes:
    """``a``'s elements in C order, little-endian (a strided or transposed view included)."""
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def header_bytes(tensors: Sequence[Tuple[str, str, Sequence[int], bytes]], metadata: Mapping[str, str]) -> bytes:
    """The header of a file holding ``tensors`` ((name, dtype name, shape, bytes), in file order).

    ``metadata`` (if not empty) comes first; spaces pad the header to a multiple of 8 bytes,
    so that every tensor starts 8-byte aligned.
    """
    header: Dict[str, object] = {META_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype_name, shape, blob in tensors:
        header[name] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write(f: BinaryIO, header: bytes, blobs: Sequence[bytes]) -> None:
    """A whole file: the header's length, the header, then the tensors' bytes in file order."""
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for blob in blobs:
        f.write(blob)
