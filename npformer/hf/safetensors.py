"""The safetensors format, read and written with NumPy alone.

A file is three parts, in this order:

    8 bytes      N, the header length, an unsigned little-endian 64-bit integer
    N bytes      a JSON object: name -> {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                 and optionally "__metadata__": {str: str}; trailing spaces pad it
    the rest     the data buffer: each tensor's bytes, C order, little-endian, at [begin, end)
                 counted from the start of the buffer; the tensors cover it with no gap or overlap

Reading checks every part before any tensor is made, and any fault raises
``SafetensorsError`` (a ``ValueError``) naming the file and the entry.

16-bit floats are widened when read (float32 by default, float64 on request):
float16 through ``numpy.float16`` (exact), bfloat16 by hand, since NumPy has no
bfloat16: a bfloat16 is the high 16 bits of a float32, so shifting its bits left by 16
into a uint32 and viewing that as float32 gives its value exactly (signs, zeros,
subnormals, infinities and NaN payloads included).

Writing stores float64, float32, float16, the integers and bool as they are, and
bfloat16 on request, rounded to nearest with ties to even (a NaN stays a NaN).

A sharded folder has ``model.safetensors.index.json`` with a ``weight_map`` of
tensor name -> shard file name; ``read_safetensors(folder)`` reads every shard.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["SafetensorsError", "read_safetensors", "write_safetensors", "bf16_bits_to_float",
           "float_to_bf16_bits", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_META_KEY = "__metadata__"
# A header larger than this is refused before it is read (the reference reader's limit, 100 MB).
_MAX_HEADER_BYTES = 100_000_000
# The most dimensions a NumPy array may have (32 before NumPy 2, 64 since).
_MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32

# File dtype name -> the NumPy dtype of its stored bytes (little-endian). BF16 is stored as its bits (uint16).
_STORED = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# NumPy dtype -> file dtype name, for writing arrays as they are.
_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class SafetensorsError(ValueError):
    """A safetensors file or sharded folder that is missing, truncated or malformed."""


def _error(path, what: str) -> SafetensorsError:
    return SafetensorsError(f"read_safetensors: {path}: {what}")


def _json_type(x: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)


def _check_path(op: str, path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"{op}: argument 'path' expected a str or os.PathLike, got {type(path).__name__}")
    if "\x00" in os.fspath(path):
        raise ValueError(f"{op}: argument 'path' expected a file name, got one with a NUL character")
    return Path(path)


def _float_dtype(op: str, dtype: object) -> np.dtype:
    if dtype not in ("float32", "float64", np.float32, np.float64) and not (
            isinstance(dtype, np.dtype) and dtype in (np.float32, np.float64)):
        raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {dtype!r}")
    return np.dtype(dtype)


# -- bfloat16 -----------------------------------------------------------------------------------
def bf16_bits_to_float(bits: np.ndarray, dtype="float32") -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> their exact values as float32 (or float64).

    A bfloat16 is the sign, the 8 exponent bits and the top 7 mantissa bits of a float32,
    so ``bits << 16`` is that float32's bit pattern, low mantissa bits zero.
    """
    dtype = _float_dtype("bf16_bits_to_float", dtype)
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
        raise TypeError(f"bf16_bits_to_float: argument 'bits' expected a uint16 numpy.ndarray, got "
                        f"{type(bits).__name__}{' of ' + str(bits.dtype) if isinstance(bits, np.ndarray) else ''}")
    wide = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == np.float32:
        return wide
    with np.errstate(invalid="ignore"):  # a signalling NaN widens to a quiet one
        return wide.astype(np.float64)


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Floats -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even.

    float64 is first rounded to float32 (as torch does); then, with u the float32's bits,
    adding 0x7FFF plus the lowest kept bit ((u >> 16) & 1) and dropping the low 16 bits
    rounds to nearest with ties to even; a carry into the exponent is the correct rounding
    up to the next binade (or to infinity). A NaN would be rounded as if it were a number,
    so its top bits are kept with the quiet bit set, and it stays a NaN.
    """
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise TypeError(f"float_to_bf16_bits: argument 'x' expected a float numpy.ndarray, got "
                        f"{type(x).__name__}{' of ' + str(x.dtype) if isinstance(x, np.ndarray) else ''}")
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    kept = (u >> 16) | 0x0040
    return np.where(nan, kept, rounded).astype(np.uint16)


# -- reading --------------------------------------------------------------------------------------
def _no_duplicates(path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _error(path, f"the JSON names {key!r:.100} twice")
            seen.add(key)
        return dict(pairs)
    return hook


def _parse_json(path, raw: bytes, what: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _error(path, f"{what} is not UTF-8 text (byte {err.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates(path))
    except SafetensorsError:
        raise
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise _error(path, f"{what} is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(value, dict):
        raise _error(path, f"{what} must be a JSON object, got a JSON {_json_type(value)}")
    return value


def _read_header(path: Path, f, size: int) -> Tuple[list, Dict[str, str], int]:
    """Validate the header: (entries sorted by offset, metadata, byte offset of the data buffer)."""
    if size < 8:
        raise _error(path, f"the file has {size} bytes, fewer than the 8-byte header length (truncated)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise _error(path, f"header length {n} exceeds the {size - 8} bytes after the length field "
                           "(truncated, or not a safetensors file)")
    if n > _MAX_HEADER_BYTES:
        raise _error(path, f"header length {n} exceeds the {_MAX_HEADER_BYTES} bytes allowed")
    raw = f.read(n)
    if len(raw) != n:
        raise _error(path, "the file ended inside the header (truncated)")
    if not raw.startswith(b"{"):
        raise _error(path, "the header must start with '{' (not a safetensors file)")
    header = _parse_json(path, raw, "the header")
    body_size = size - 8 - n

    metadata = header.pop(_META_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, f"{_META_KEY} must be a JSON object of strings, got a JSON {_json_type(metadata)}"
                           + (" holding other values" if isinstance(metadata, dict) else ""))
    entries = []
    for name, info in header.items():
        where = f"tensor {name!r:.200}"
        if not isinstance(info, dict):
            raise _error(path, f"{where}: expected a JSON object of dtype, shape and data_offsets, "
                               f"got a JSON {_json_type(info)}")
        if set(info) != {"dtype", "shape", "data_offsets"}:
            raise _error(path, f"{where}: expected the keys dtype, shape and data_offsets, got {sorted(info)!r:.200}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in _STORED:
            raise _error(path, f"{where}: unknown dtype {dtype_name!r:.100}, expected one of {sorted(_STORED)}")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise _error(path, f"{where}: shape must be a list of integers >= 0, got {shape!r:.100}")
        if len(shape) > _MAX_NDIM:
            raise _error(path, f"{where}: shape has {len(shape)} dimensions, more than NumPy's {_MAX_NDIM}")
        if math.prod(max(s, 1) for s in shape) * _STORED[dtype_name].itemsize > np.iinfo(np.intp).max:
            raise _error(path, f"{where}: shape {shape!r:.100} is larger than NumPy can index")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _error(path, f"{where}: data_offsets must be a list [begin, end] of two integers, "
                               f"got {offsets!r:.100}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _error(path, f"{where}: data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end")
        nbytes = math.prod(shape) * _STORED[dtype_name].itemsize
        if end - begin != nbytes:
            raise _error(path, f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                               f"{shape} of {dtype_name} needs {nbytes}")
        if end > body_size:
            raise _error(path, f"{where}: data_offsets [{begin}, {end}] reach past the {body_size} bytes "
                               "of the data buffer (truncated)")
        entries.append((begin, end, name, dtype_name, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else f"leaves a gap after byte {position}"
            raise _error(path, f"tensor {name!r:.200}: data_offsets [{begin}, {end}] {problem}")
        position = end
    if position != body_size:
        raise _error(path, f"the data buffer holds {body_size - position} bytes after the last tensor")
    return entries, metadata, 8 + n


def _read_file(path: Path, dtype: np.dtype) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            entries, metadata, start = _read_header(path, f, size)
            body = f.read(size - start)
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except IsADirectoryError:
        raise _error(path, "is a folder, not a file") from None
    except PermissionError:
        raise _error(path, "cannot be read (permission denied)") from None
    if len(body) != size - start:
        raise _error(path, "the file ended inside the data buffer (truncated)")
    tensors = {}
    for begin, end, name, dtype_name, shape in entries:
        stored = _STORED[dtype_name]
        flat = np.frombuffer(body, dtype=stored, count=math.prod(shape), offset=begin)
        if dtype_name == "BOOL" and np.any(flat.view(np.uint8) > 1):
            raise _error(path, f"tensor {name!r:.200}: a BOOL tensor holds bytes other than 0 and 1")
        if dtype_name == "BF16":
            value = bf16_bits_to_float(flat, dtype)
        elif dtype_name == "F16":
            with np.errstate(invalid="ignore"):  # exact; a signalling NaN widens to a quiet one
                value = flat.astype(dtype)
        else:
            value = flat.astype(stored.newbyteorder("="))  # a copy: the arrays own their memory
        tensors[name] = value.reshape(shape)
    return tensors, metadata


def _read_sharded(index: Path, dtype: np.dtype) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    try:
        raw = index.read_bytes()
    except OSError as err:
        raise _error(index, f"cannot be read ({err.strerror})") from None
    doc = _parse_json(index, raw, "the index")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _error(index, f"'weight_map' must be a JSON object of tensor name -> shard file name, "
                            f"got a JSON {_json_type(weight_map)}")
    shards: Dict[str, list] = {}
    for name, shard in weight_map.items():
        if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\x00" in shard:
            raise _error(index, f"tensor {name!r:.200}: shard {shard!r:.200} must be a file name in the same folder")
        shards.setdefault(shard, []).append(name)
    metadata = doc.get("metadata", {})
    metadata = {k: str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    tensors: Dict[str, np.ndarray] = {}
    origin: Dict[str, str] = {}
    for shard, names in shards.items():
        path = index.parent / shard
        if not path.is_file():
            raise _error(index, f"shard {shard!r} (holding {names[0]!r} and {len(names) - 1} more) does not exist")
        part, _ = _read_file(path, dtype)
        for name in part:
            if name in origin:
                raise _error(path, f"tensor {name!r:.200} is also in shard {origin[name]!r}")
            if weight_map.get(name) != shard:
                where = f"is listed in shard {weight_map[name]!r}" if name in weight_map else "is not in the weight_map"
                raise _error(path, f"tensor {name!r:.200} {where} of {index.name}")
            origin[name] = shard
        tensors.update(part)
        missing = [n for n in names if n not in part]
        if missing:
            raise _error(path, f"tensor {missing[0]!r:.200} is listed in {index.name} for this shard but missing "
                               f"from it ({len(missing)} missing)")
    return tensors, metadata


def read_safetensors(path, *, dtype="float32", with_metadata: bool = False):
    """Read a safetensors file, or a folder, into a dict of name -> numpy.ndarray.

    path: a ``.safetensors`` file; a ``model.safetensors.index.json``; or a folder holding
    one of ``model.safetensors`` / ``model.safetensors.index.json`` (the index wins when both exist).
    dtype: what F16 and BF16 tensors widen to, 'float32' or 'float64'. Other dtypes are kept.
    with_metadata: also return the ``__metadata__`` dict (str -> str) of the file (for a
    sharded folder, the index's ``metadata``).
    """
    op = "read_safetensors"
    path = _check_path(op, path)
    dtype = _float_dtype(op, dtype)
    if not isinstance(with_metadata, bool):
        raise TypeError(f"{op}: argument 'with_metadata' expected a bool, got {with_metadata!r}")
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            path = path / INDEX_FILE
        elif (path / SINGLE_FILE).is_file():
            path = path / SINGLE_FILE
        else:
            raise _error(path, f"the folder holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    if path.name.endswith(".index.json"):
        tensors, metadata = _read_sharded(path, dtype)
    else:
        tensors, metadata = _read_file(path, dtype)
    return (tensors, metadata) if with_metadata else tensors


# -- writing --------------------------------------------------------------------------------------
def write_safetensors(path, tensors: Mapping[str, np.ndarray], *, metadata: Optional[Mapping[str, str]] = None,
                      dtype: Optional[str] = None) -> Path:
    """Write ``tensors`` (name -> numpy.ndarray) to one safetensors file; returns the path.

    dtype: None keeps each array's dtype (float64, float32, float16, int64/32/16/8, uint8, bool);
    'bfloat16', 'float16', 'float32' or 'float64' converts every float array to it (bfloat16
    rounded to nearest, ties to even). Tensors are stored in name order, the header padded
    with spaces to a multiple of 8 bytes so that every tensor starts 8-byte aligned.
    """
    op = "write_safetensors"
    path = _check_path(op, path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{op}: argument 'tensors' expected a mapping of name -> numpy.ndarray, "
                        f"got {type(tensors).__name__}")
    if dtype not in (None, "bfloat16", "float16", "float32", "float64"):
        raise ValueError(f"{op}: argument 'dtype' expected None, 'bfloat16', 'float16', 'float32' or "
                         f"'float64', got {dtype!r}")
    if metadata is not None and (not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError(f"{op}: argument 'metadata' expected a mapping of str -> str, got {metadata!r:.100}")
    for name in tensors:
        if not isinstance(name, str) or name == _META_KEY or not name:
            raise ValueError(f"{op}: argument 'tensors' expected non-empty str names other than {_META_KEY!r}, "
                             f"got {name!r:.100}")
    header: Dict[str, object] = {}
    if metadata:
        header[_META_KEY] = dict(metadata)
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{op}: argument 'tensors' entry {name!r} expected a numpy.ndarray, got {type(a).__name__}")
        if a.dtype.kind == "f" and dtype == "bfloat16":
            data, file_dtype = float_to_bf16_bits(a), "BF16"
        else:
            if a.dtype.kind == "f" and dtype is not None:
                with np.errstate(over="ignore", invalid="ignore"):
                    a = a.astype(dtype)
            if a.dtype.newbyteorder("=") not in _NAMES:
                raise ValueError(f"{op}: argument 'tensors' entry {name!r} has dtype {a.dtype}, which "
                                 f"safetensors here cannot store (expected one of "
                                 f"{sorted(str(d) for d in _NAMES)})")
            data, file_dtype = a, _NAMES[a.dtype.newbyteorder("=")]
        blob = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": file_dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a reader never sees half a file
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
