"""One safetensors container: Hugging Face weights and checkpoints refuse a malformed file alike.

``read_safetensors`` and ``checkpoint.load`` both parse the header with ``npformer._safetensors``,
so a fault in the framing or in an entry gets the same words from each, after its own prefix.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer import checkpoint
from npformer.checkpoint import CheckpointError
from npformer.hf import SafetensorsError, read_safetensors, write_safetensors

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
CASES = [  # (header, data bytes, the words both readers use)
    ({"a": {**F32_2x2, "dtype": "F8_E4M3"}}, 16, "unknown dtype 'F8_E4M3'"),
    ({"a": {**F32_2x2, "shape": [2, 3]}}, 16, "span 16 bytes, but shape [2, 3] of F32 needs 24"),
    ({"a": {**F32_2x2, "shape": [2, -2]}}, 16, "shape must be a list of integers >= 0"),
    ({"a": {**F32_2x2, "shape": [1] * 65}}, 16, "dimensions, more than NumPy's"),
    ({"a": {**F32_2x2, "data_offsets": [16, 0]}}, 16, "must satisfy 0 <= begin <= end"),
    ({"a": {**F32_2x2, "data_offsets": [8, 24]}}, 16, "reach past the 16 bytes"),
    ({"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [20, 36]}}, 36, "leaves a gap after byte 16"),
    ({"a": F32_2x2}, 20, "holds 4 bytes after the last tensor"),
    ({"a": {**F32_2x2, "extra": 1}}, 16, "expected the keys dtype, shape and data_offsets"),
    ({"__metadata__": {"k": 1}, "a": F32_2x2}, 16, "__metadata__ must be a JSON object of strings"),
]


@pytest.mark.parametrize("header,body,words", CASES)
def test_both_readers_name_a_bad_entry_alike(header, body, words, tmp_path):
    raw = json.dumps(header).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(body))
    with pytest.raises(SafetensorsError) as hf_error:
        read_safetensors(path)
    with pytest.raises(CheckpointError) as ckpt_error:
        checkpoint.load(path)
    # The dtype names each accepts differ (BF16 weights; U16/U32/U64 checkpoint arrays), the words do not.
    hf_words = str(hf_error.value).removeprefix(f"read_safetensors: {path}: ").split(", expected one of")[0]
    ckpt_words = str(ckpt_error.value).removeprefix(f"checkpoint.load: {path}: ").split(", expected one of")[0]
    assert words in hf_words and hf_words == ckpt_words


@given(dtype=st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_]),
       shape=st.lists(st.integers(0, 3), max_size=3))
def test_a_checkpoint_reads_as_weights_and_weights_lay_out_as_a_checkpoint(tmp_path_factory, dtype, shape):
    """The two writers lay a tensor out the same way: same header entry, same bytes."""
    a = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
    folder = tmp_path_factory.mktemp("c")
    ckpt = checkpoint.save(folder / "c.safetensors", {"a": a})
    weights = write_safetensors(folder / "w.safetensors", {"a": a})
    read = read_safetensors(ckpt)
    assert read["a"].shape == a.shape and np.array_equal(read["a"], a.astype(np.float32) if dtype == np.float16 else a)
    entries = []
    for raw in (ckpt.read_bytes(), weights.read_bytes()):
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        begin, end = header["a"]["data_offsets"]
        entries.append((header["a"], raw[8 + n + begin:8 + n + end]))
    assert entries[0] == entries[1]
