"""Checkpoint files: round trip in both formats, atomic writes, clear errors."""

import json
import os
import struct

import numpy as np
import pytest

from npformer import checkpoint
from npformer.checkpoint import CheckpointError

FORMATS = ["npz", "safetensors"]


def example_state():
    rng = np.random.default_rng(3)
    return {
        "config": {"lr": 3e-3, "name": "tiny", "layers": [1, 2]},
        "model": {"blocks.0.attn.q_proj.weight": rng.standard_normal((4, 3)).astype(np.float32),
                  "wte.weight": rng.standard_normal((5, 3))},
        "optim": {"step": 7, "state": [{"m": np.arange(3.0), "v": np.ones(3)}, {"m": np.zeros(2), "v": np.ones(2)}]},
        "rng": rng.bit_generator.state,
        "step": 7,
        "ids": np.arange(6, dtype=np.int64),
    }


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(tmp_path, fmt):
    state = example_state()
    path = checkpoint.save(tmp_path / f"ckpt.{fmt}", state)
    assert_same(checkpoint.load(path), state)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rng_state_restores_the_stream(tmp_path, fmt):
    rng = np.random.default_rng(42)
    rng.random(10)
    checkpoint.save(tmp_path / f"r.{fmt}", {"rng": rng.bit_generator.state})
    expected = rng.random(5)
    restored = np.random.default_rng()
    restored.bit_generator.state = checkpoint.load(tmp_path / f"r.{fmt}")["rng"]
    np.testing.assert_array_equal(restored.random(5), expected)


def test_npz_needs_no_pickle(tmp_path):
    checkpoint.save(tmp_path / "c.npz", example_state())
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert "model/wte.weight" in z.files and z["model/wte.weight"].shape == (5, 3)


def test_safetensors_layout_is_standard(tmp_path):
    checkpoint.save(tmp_path / "c.safetensors", {"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}})
    raw = (tmp_path / "c.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["model/w"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    np.testing.assert_array_equal(np.frombuffer(raw[8 + n :], "<f4"), np.arange(6))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_a_clear_error(tmp_path, fmt):
    path = checkpoint.save(tmp_path / f"c.{fmt}", example_state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_foreign_files_are_clear_errors(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.ones(2))
    with pytest.raises(CheckpointError, match="not an npformer checkpoint"):
        checkpoint.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        checkpoint.load(tmp_path / "text.npz")
    with pytest.raises(ValueError, match="expected a .npz or .safetensors file"):
        checkpoint.save(tmp_path / "c.pt", {})


def test_failed_save_leaves_the_old_file_and_no_temporaries(tmp_path):
    path = checkpoint.save(tmp_path / "c.safetensors", {"step": 1})
    with pytest.raises(ValueError, match="unsupported dtype complex64"):
        checkpoint.save(path, {"step": 2, "z": np.ones(2, np.complex64)})  # fails mid-write of the temporary
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.safetensors"]
