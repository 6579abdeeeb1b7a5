"""Checkpoints: config, weights, optimizer state, RNG state and step in one file.

Two formats, chosen by the file's suffix:

- ``.npz``: NumPy's zip of arrays, read back with ``allow_pickle=False``;
- ``.safetensors``: the safetensors layout (8-byte little-endian header length, a
  JSON header of dtype/shape/offsets, then the raw bytes), written and read here
  with NumPy alone.

Nested state (an optimizer's per-parameter moments, a bit generator's state) is
flattened to ``/``-joined keys: arrays become tensors, everything else goes into a
JSON ``metadata`` entry. Saving is atomic: write a temporary file in the same
directory, flush it to disk, then ``os.replace`` it over the target.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

FORMAT = "npformer-checkpoint"
VERSION = 1
_META_KEY = "__metadata__"
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """The file is truncated, not a checkpoint, or from an incompatible version."""


def _flatten(tree: Any, prefix: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            if "/" in str(k):
                raise ValueError(f"checkpoint: key {k!r} may not contain '/'")
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), arrays, meta)
    elif isinstance(tree, np.ndarray):
        arrays[prefix] = tree
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, np.ndarray)) for v in tree):
        meta[f"{prefix}#len"] = len(tree)
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}/{i}", arrays, meta)
    else:
        meta[prefix] = tree.item() if isinstance(tree, np.generic) else tree


def _unflatten(arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> Dict[str, Any]:
    root: Dict[str, Any] = {}
    lists = {k[: -len("#len")] for k in meta if k.endswith("#len")}
    for key, value in list(arrays.items()) + [(k, v) for k, v in meta.items() if not k.endswith("#len")]:
        node, parts = root, key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def relist(node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: relist(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return [node[str(i)] for i in range(len(node))] if path in lists else node

    return relist(root, "")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path: str | os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts of arrays and JSON-able values) atomically to ``path``."""
    path = Path(path)
    arrays: Dict[str, np.ndarray] = {}
    meta: Dict[str, Any] = {"format": FORMAT, "version": VERSION}
    _flatten(state, "", arrays, meta)
    if path.suffix == ".npz":
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        _atomic_write(path, lambda f: np.savez(f, **arrays))
    elif path.suffix == ".safetensors":
        _atomic_write(path, lambda f: _write_safetensors(f, arrays, meta))
    else:
        raise ValueError(f"checkpoint.save: argument 'path' expected a .npz or .safetensors file, got {path.name!r}")
    return path


def load(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by ``save``; a truncated or foreign file raises ``CheckpointError``."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if _META_KEY not in arrays:
                raise CheckpointError(f"{path}: not an npformer checkpoint (no {_META_KEY} entry)")
            meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
        elif path.suffix == ".safetensors":
            arrays, meta = _read_safetensors(path)
        else:
            raise CheckpointError(f"{path}: expected a .npz or .safetensors file")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, json.JSONDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or not a checkpoint): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an npformer checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} but this npformer reads {VERSION}")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return _unflatten(arrays, meta)


def _write_safetensors(f: io.BufferedIOBase, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    header: Dict[str, Any] = {_META_KEY: {"npformer": json.dumps(meta)}}
    offset, blobs = 0, []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"checkpoint.save: array {name!r} has unsupported dtype {a.dtype}")
        blob = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for blob in blobs:
        f.write(blob)


def _read_safetensors(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CheckpointError(f"{path}: header length {n} exceeds file size {len(data)}")
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    meta = json.loads(header.pop(_META_KEY, {}).get("npformer", "{}"))
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > len(body):
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated)")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        arrays[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"]).astype(dtype.newbyteorder("="))
    return arrays, meta
