"""Hugging Face weights in safetensors files, read and written with NumPy alone.

The container (header length, JSON header, data buffer) is parsed and laid out by
``npformer._safetensors``; reading checks every part before any tensor is made, and any
fault raises ``SafetensorsError`` (a ``ValueError``) naming the file and the entry.

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

import os
from functools import partial
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .. import _safetensors as container
from .._safetensors import META_KEY as _META_KEY, json_type as _json_type

__all__ = ["SafetensorsError", "read_safetensors", "write_safetensors", "bf16_bits_to_float",
           "float_to_bf16_bits", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The file dtype names read and written here (U16, U32 and U64 are not among them).
_FILE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
# NumPy dtype -> file dtype name, for writing arrays as they are (bfloat16 aside: NumPy has none).
_NAMES = {container.DTYPES[name].newbyteorder("="): name for name in _FILE_DTYPES if name != "BF16"}


class SafetensorsError(ValueError):
    """A safetensors file or sharded folder that is missing, truncated or malformed."""


def _error(path, what: str) -> SafetensorsError:
    return SafetensorsError(f"read_safetensors: {path}: {what}")


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
def _read_file(path: Path, dtype: np.dtype) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    error = partial(_error, path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            entries, metadata, body_size = container.read_header(f, size, _FILE_DTYPES, error)
            body = container.read_body(f, body_size, error)
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except IsADirectoryError:
        raise _error(path, "is a folder, not a file") from None
    except PermissionError:
        raise _error(path, "cannot be read (permission denied)") from None
    tensors = {}
    for entry in entries:
        flat = container.elements(body, entry, error)
        if entry.dtype == "BF16":
            value = bf16_bits_to_float(flat, dtype)
        elif entry.dtype == "F16":
            with np.errstate(invalid="ignore"):  # exact; a signalling NaN widens to a quiet one
                value = flat.astype(dtype)
        else:
            value = flat.astype(flat.dtype.newbyteorder("="))  # a copy: the arrays own their memory
        tensors[entry.name] = value.reshape(entry.shape)
    return tensors, metadata


def _read_sharded(index: Path, dtype: np.dtype) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    try:
        raw = index.read_bytes()
    except OSError as err:
        raise _error(index, f"cannot be read ({err.strerror})") from None
    doc = container.parse_json(raw, "the index", partial(_error, index))
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
    parts = []  # (name, file dtype name, shape, bytes), in name order
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
        parts.append((name, file_dtype, a.shape, container.tensor_bytes(data)))
    header = container.header_bytes(parts, metadata or {})
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a reader never sees half a file
    try:
        with open(tmp, "wb") as f:
            container.write(f, header, [blob for *_, blob in parts])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
