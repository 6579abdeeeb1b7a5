"""The NumPy safetensors reader and writer: bit-exact 16-bit decoding, interchange with the
reference library, and a named error for every malformed file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npformer.hf import SafetensorsError, read_safetensors, write_safetensors
from npformer.hf.safetensors import bf16_bits_to_float, float_to_bf16_bits

safetensors_numpy = pytest.importorskip("safetensors.numpy")
safetensors_torch = pytest.importorskip("safetensors.torch")

ALL_16_BIT = np.arange(2**16, dtype=np.uint32).astype(np.uint16)  # every pattern: zeros, subnormals, inf, nan


def _file(tmp_path, header: dict, body: bytes = b"", name="t.safetensors", pad: bytes = b""):
    raw = json.dumps(header).encode() + pad
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


# -- 16-bit decoding, bit for bit against torch ------------------------------------------------------------
def test_bf16_decodes_every_pattern_as_torch():
    theirs = torch.from_numpy(ALL_16_BIT.view(np.int16)).view(torch.bfloat16).float().numpy()
    ours = bf16_bits_to_float(ALL_16_BIT)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))  # -0, subnormals, inf, NaN payloads
    wide = bf16_bits_to_float(ALL_16_BIT, "float64")
    nan = np.isnan(ours)
    assert wide.dtype == np.float64 and np.array_equal(np.isnan(wide), nan)
    np.testing.assert_array_equal(wide[~nan].view(np.uint64), ours[~nan].astype(np.float64).view(np.uint64))
    assert np.isnan(ours).sum() == 2 * (2**7 - 1) and np.signbit(ours[0x8000]) and ours[0x8000] == 0


def test_fp16_decodes_every_pattern_as_torch(tmp_path):
    theirs = torch.from_numpy(ALL_16_BIT.view(np.float16).copy()).float().numpy()
    safetensors_numpy.save_file({"h": ALL_16_BIT.view(np.float16)}, str(tmp_path / "h.safetensors"))
    for dtype in ("float32", "float64"):
        ours = read_safetensors(tmp_path / "h.safetensors", dtype=dtype)["h"]
        assert ours.dtype == dtype
        nan = np.isnan(theirs)  # torch's NaN payloads differ between its own code paths: NaN-ness is compared
        np.testing.assert_array_equal(np.isnan(ours), nan)
        bits = np.uint32 if dtype == "float32" else np.uint64
        # -0, subnormals and infinities bit for bit
        np.testing.assert_array_equal(ours[~nan].view(bits), theirs[~nan].astype(dtype).view(bits))


SPECIAL_F32 = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.17e-38, 3.4e38, 1.0 + 2**-8,
                        1.0 + 3 * 2**-8, 3.3895e38, -np.float32(np.nan)], np.float32)


@given(hnp.arrays(np.uint32, st.integers(1, 200), elements=st.integers(0, 2**32 - 1)))
def test_bf16_encode_rounds_as_torch(bits):
    """Round to nearest even, from random float32 bit patterns (all classes) and the ties and extremes."""
    x = np.concatenate([bits.view(np.float32), SPECIAL_F32])
    ours = float_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_float(ours[nan])).all()  # a NaN stays NaN
    # float64 rounds through float32, as torch converts
    x64 = x.astype(np.float64) * (1 + 2.0**-30)
    with np.errstate(over="ignore", invalid="ignore"):
        t64 = torch.from_numpy(x64).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float_to_bf16_bits(x64)[~nan], t64[~nan])


# -- interchange with the safetensors library ----------------------------------------------------------------------
def _arrays(rng):
    return {
        "f64": rng.standard_normal((3, 5)), "f32": rng.standard_normal((7,)).astype(np.float32),
        "f16": rng.standard_normal((2, 2, 3)).astype(np.float16), "i64": rng.integers(-9, 9, (4,)),
        "i32": rng.integers(-9, 9, (2, 3)).astype(np.int32), "i16": np.array([-5, 7], np.int16),
        "i8": np.array([[-128, 127]], np.int8), "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "bool": np.array([True, False, True]), "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }


def test_library_files_read_by_us(tmp_path):
    arrays = _arrays(np.random.default_rng(0))
    safetensors_numpy.save_file(arrays, str(tmp_path / "a.safetensors"), metadata={"format": "np", "k": "v"})
    ours, meta = read_safetensors(tmp_path / "a.safetensors", with_metadata=True)
    assert meta == {"format": "np", "k": "v"} and sorted(ours) == sorted(arrays)
    for name, a in arrays.items():
        want = a.astype(np.float32) if a.dtype == np.float16 else a
        assert ours[name].dtype == want.dtype and ours[name].shape == a.shape and np.array_equal(ours[name], want), name
    bf = torch.randn(4, 6, dtype=torch.float64).to(torch.bfloat16)
    safetensors_torch.save_file({"bf": bf}, str(tmp_path / "b.safetensors"))
    got = read_safetensors(tmp_path / "b.safetensors", dtype="float64")["bf"]
    assert got.dtype == np.float64 and np.array_equal(got, bf.double().numpy())


def test_our_files_read_by_library(tmp_path):
    arrays = _arrays(np.random.default_rng(1))
    write_safetensors(tmp_path / "a.safetensors", arrays, metadata={"format": "pt"})
    theirs = safetensors_numpy.load_file(str(tmp_path / "a.safetensors"))
    assert sorted(theirs) == sorted(arrays)
    for name, a in arrays.items():
        assert theirs[name].dtype == a.dtype and np.array_equal(theirs[name], a), name
    floats = {"w": np.random.default_rng(2).standard_normal((5, 3)), "b": np.array([np.nan, -0.0, 1e39])}
    write_safetensors(tmp_path / "bf.safetensors", floats, dtype="bfloat16")
    loaded = safetensors_torch.load_file(str(tmp_path / "bf.safetensors"))
    for name, a in floats.items():
        assert loaded[name].dtype == torch.bfloat16
        expected = torch.from_numpy(a).to(torch.bfloat16)
        np.testing.assert_array_equal(loaded[name].float().numpy(), expected.float().numpy())
    round_trip = read_safetensors(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(round_trip["w"], loaded["w"].float().numpy())


@given(st.sampled_from(["float16", "float32", "float64"]), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0))
def test_write_read_round_trip(dtype, shape):
    import tempfile
    from pathlib import Path

    a = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float64)
    with tempfile.TemporaryDirectory() as d:
        path = write_safetensors(Path(d) / "x.safetensors", {"x": a, "y": a[..., ::-1].T if a.ndim else a}, dtype=dtype)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0  # tensors start 8-byte aligned
        got = read_safetensors(path, dtype="float64")
    assert np.array_equal(got["x"], a.astype(dtype).astype(np.float64))
    # a strided, transposed view is written in C order
    assert np.array_equal(got["y"], (a[..., ::-1].T if a.ndim else a).astype(dtype).astype(np.float64))


# -- malformed files, each named ----------------------------------------------------------------------------
F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BAD_HEADERS = [
    ({"a": {**F32_2x2, "dtype": "F8_E4M3"}}, 16, "unknown dtype 'F8_E4M3'"),
    ({"a": {**F32_2x2, "dtype": 32}}, 16, "unknown dtype 32"),
    ({"a": {**F32_2x2, "shape": [2, 3]}}, 16, "span 16 bytes, but shape [2, 3] of F32 needs 24"),
    ({"a": {**F32_2x2, "shape": [2, -2]}}, 16, "shape must be a list of integers >= 0"),
    ({"a": {**F32_2x2, "shape": [0, 2**70]}, "b": F32_2x2}, 16, "is larger than NumPy can index"),
    ({"a": {**F32_2x2, "shape": [1] * 65}}, 16, "dimensions, more than NumPy's"),
    ({"a": {**F32_2x2, "data_offsets": [16, 0]}}, 16, "must satisfy 0 <= begin <= end"),
    ({"a": {**F32_2x2, "data_offsets": [8, 24]}}, 16, "reach past the 16 bytes"),
    ({"a": {**F32_2x2, "data_offsets": [0, 16.0]}}, 16, "data_offsets must be a list"),
    ({"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [8, 24]}}, 24, "'b': data_offsets [8, 24] overlaps"),
    ({"a": F32_2x2, "b": {**F32_2x2, "data_offsets": [20, 36]}}, 36, "leaves a gap after byte 16"),
    ({"a": F32_2x2}, 20, "holds 4 bytes after the last tensor"),
    ({"a": {**F32_2x2, "extra": 1}}, 16, "expected the keys dtype, shape and data_offsets"),
    ({"a": [1, 2]}, 16, "got a JSON array"),
    ({"__metadata__": {"k": 1}, "a": F32_2x2}, 16, "__metadata__ must be a JSON object of strings"),
    ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02", "BOOL tensor holds bytes"),
]


@pytest.mark.parametrize("header,body,message", BAD_HEADERS)
def test_bad_header_named(header, body, message, tmp_path):
    path = _file(tmp_path, header, body if isinstance(body, bytes) else bytes(body))
    with pytest.raises(SafetensorsError, match="read_safetensors: ") as err:
        read_safetensors(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("raw,message", [
    (b"", "fewer than the 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "header length 1000 exceeds the 2 bytes"),
    (struct.pack("<Q", 2) + b"[]", "must start with '{'"),
    (struct.pack("<Q", 5) + b"{\"a\":", "the header is not valid JSON"),
    (struct.pack("<Q", 3) + b"{\xff}", "is not UTF-8"),
    (struct.pack("<Q", 18) + b'{"a":{},"a":{}}   ', "names 'a' twice"),
])
def test_bad_framing_named(raw, message, tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafetensorsError, match="read_safetensors: ") as err:
        read_safetensors(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_arguments_named(tmp_path):
    with pytest.raises(TypeError, match="read_safetensors: argument 'path'"):
        read_safetensors(3)
    with pytest.raises(ValueError, match="read_safetensors: argument 'dtype'"):
        read_safetensors(tmp_path, dtype="float16")
    with pytest.raises(SafetensorsError, match="no such file"):
        read_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(SafetensorsError, match="neither model.safetensors nor"):
        read_safetensors(tmp_path)
    with pytest.raises(TypeError, match="write_safetensors: argument 'tensors'"):
        write_safetensors(tmp_path / "x", [np.zeros(2)])
    with pytest.raises(ValueError, match="write_safetensors: argument 'tensors' entry 'c' has dtype complex128"):
        write_safetensors(tmp_path / "x", {"c": np.zeros(2, complex)})
    with pytest.raises(ValueError, match="write_safetensors: argument 'tensors' expected non-empty str names"):
        write_safetensors(tmp_path / "x", {1: np.zeros(2), "b": np.zeros(2)})
    with pytest.raises(ValueError, match="write_safetensors: argument 'tensors' expected non-empty str names"):
        write_safetensors(tmp_path / "x", {"__metadata__": np.zeros(2)})
    with pytest.raises(TypeError, match="write_safetensors: argument 'tensors' entry 'a' expected a numpy.ndarray"):
        write_safetensors(tmp_path / "x", {"a": [1.0]})
    assert not list(tmp_path.iterdir())  # a refused call writes nothing
    with pytest.raises(TypeError, match="write_safetensors: argument 'metadata'"):
        write_safetensors(tmp_path / "x", {}, metadata={"k": 1})
    with pytest.raises(ValueError, match="write_safetensors: argument 'dtype'"):
        write_safetensors(tmp_path / "x", {}, dtype="int8")
    with pytest.raises(TypeError, match="bf16_bits_to_float: argument 'bits'"):
        bf16_bits_to_float(np.zeros(2, np.int16))
    with pytest.raises(TypeError, match="float_to_bf16_bits: argument 'x'"):
        float_to_bf16_bits(np.zeros(2, np.int32))


# -- the fuzz: mutated files raise a named SafetensorsError or read as the reference reads them -----------------
def _valid_bytes() -> bytes:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int16),
              "h": np.array([0.5, -1.0], np.float16)}
    raw = safetensors_numpy.save(arrays, metadata={"format": "pt"})
    return bytes(raw)


VALID = _valid_bytes()


@settings(max_examples=60)
@given(data=st.data())
def test_mutated_files_raise_named_error_or_match_reference(data, tmp_path_factory):
    raw = bytearray(VALID)
    n = int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["truncate", "flip_header", "length", "insert", "byte_in_header"]))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip_header":
        i = data.draw(st.integers(0, 8 + n - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2 * len(raw)), st.integers(0, 2**64 - 1))))
    elif kind == "insert":
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        i = data.draw(st.integers(8, 8 + n - 1))
        raw[i] = data.draw(st.sampled_from(b'{}[]",:0123456789-. aF'))
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(raw))
    try:
        ours = read_safetensors(path)
    except SafetensorsError as err:
        assert str(path) in str(err)
        return
    # Accepted: the reference reader must accept the same bytes and read the same tensors.
    theirs = safetensors_numpy.load(bytes(raw))
    assert sorted(ours) == sorted(theirs)
    for name, a in theirs.items():
        want = a.astype(np.float32) if a.dtype == np.float16 else a
        assert ours[name].shape == want.shape and np.array_equal(ours[name], want, equal_nan=True), name


# -- sharded folders --------------------------------------------------------------------------------------
def _sharded(tmp_path, weight_map, shards):
    for name, arrays in shards.items():
        write_safetensors(tmp_path / name, arrays)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                       "weight_map": weight_map}))
    return tmp_path


def test_sharded_folder_reads_every_shard(tmp_path):
    a, b, c = np.ones(2, np.float32), np.zeros((2, 2)), np.arange(3)
    folder = _sharded(tmp_path, {"a": "s1", "b": "s1", "c": "s2"}, {"s1": {"a": a, "b": b}, "s2": {"c": c}})
    got, meta = read_safetensors(folder, with_metadata=True)
    assert meta == {"total_size": "1"} and sorted(got) == ["a", "b", "c"]
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and np.array_equal(got["c"], c)


@pytest.mark.parametrize("weight_map,shards,message", [
    ({"a": "s1", "b": "s1"}, {"s1": {"a": np.ones(1)}}, "tensor 'b' is listed in model.safetensors.index.json"),
    ({"a": "s1"}, {"s1": {"a": np.ones(1), "b": np.ones(1)}}, "tensor 'b' is not in the weight_map"),
    ({"a": "s1", "b": "s2"}, {"s1": {"a": np.ones(1), "b": np.ones(1)}, "s2": {"b": np.ones(1)}},
     "tensor 'b' is listed in shard 's2'"),
    ({"a": "s1", "b": "s9"}, {"s1": {"a": np.ones(1)}}, "shard 's9'"),
    ({"a": "../s1"}, {"s1": {"a": np.ones(1)}}, "must be a file name in the same folder"),
])
def test_sharded_errors_named(weight_map, shards, message, tmp_path):
    folder = _sharded(tmp_path, weight_map, shards)
    with pytest.raises(SafetensorsError, match="read_safetensors: ") as err:
        read_safetensors(folder)
    assert message in str(err.value)


def test_sharded_duplicate_name_in_index(tmp_path):
    write_safetensors(tmp_path / "s1", {"a": np.ones(1)})
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s1", "a": "s1"}}')
    with pytest.raises(SafetensorsError, match="names 'a' twice"):
        read_safetensors(tmp_path)


def test_package_imports_without_torch(tmp_path):
    """npformer.hf needs numpy alone: importing it with torch, transformers and safetensors hidden works."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'safetensors', 'tokenizers'): sys.modules[m] = None\n"
            "import npformer.hf as hf\n"
            "from npformer.models.gpt import GPT, GPTConfig\n"
            f"hf.save_pretrained(GPT(GPTConfig(n_layer=1, d_model=12, n_head=2)), {str(tmp_path)!r})\n"
            f"print(type(hf.load_pretrained({str(tmp_path)!r})).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "GPT"
