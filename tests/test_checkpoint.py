"""Checkpoint files: round trip in both formats, atomic writes with the usual permissions, clear errors.

The reader's fuzzing (mutated files) is in ``test_checkpoint_fuzz.py``.
"""

import json
import math
import os
import stat
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer import checkpoint
from npformer.checkpoint import CheckpointError
from tests.badinput import expect_rejected
from tests.strategies import rngs, shapes

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


# -- dtypes, permissions, missing files --------------------------------------------------------

ST_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32,
             np.uint16, np.uint8, np.bool_]


@given(fmt=st.sampled_from(FORMATS), dtype=st.sampled_from(ST_DTYPES + [np.complex128]),
       shape=shapes(min_dims=0, max_dims=3, sides=st.sampled_from([0, 1, 2, 3, 5])), rng=rngs(),
       fortran=st.booleans())
def test_round_trip_keeps_dtype_shape_and_values(tmp_path_factory, fmt, dtype, shape, rng, fortran):
    if fmt == "safetensors" and dtype is np.complex128:
        dtype = np.float64  # safetensors has no complex dtype
    values = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    if fortran:
        values = np.asfortranarray(values).reshape(shape, order="A")  # (asfortranarray makes 0-d 1-d)
    state = {"x": values, "nested": {"empty": {}, "items": [{"a": values.reshape(-1)[:1]}, 3]}, "n": np.int64(3)}
    path = checkpoint.save(tmp_path_factory.mktemp("rt") / f"c.{fmt}", state)
    loaded = checkpoint.load(path)
    assert loaded["x"].dtype == np.dtype(dtype) and loaded["x"].shape == shape  # an I64 tensor stays int64
    assert loaded["x"].flags.writeable and loaded["x"].flags.owndata
    assert_same(loaded, {**state, "n": 3})


@given(fmt=st.sampled_from(FORMATS), umask=st.integers(0, 0o777), old_mode=st.sampled_from([0o600, 0o640, 0o664]))
def test_written_files_follow_the_umask_and_keep_an_existing_mode(tmp_path_factory, fmt, umask, old_mode):
    directory = tmp_path_factory.mktemp("mode")
    path = directory / f"c.{fmt}"
    previous = os.umask(umask)
    try:
        checkpoint.save(path, {"step": 1, "w": np.ones(3)})
        created = stat.S_IMODE(path.stat().st_mode)
        os.chmod(path, old_mode)
        checkpoint.save(path, {"step": 2, "w": np.zeros(3)})
        replaced = stat.S_IMODE(path.stat().st_mode)
    finally:
        os.umask(previous)
    assert created == 0o666 & ~umask  # what open(path, "wb") gives a new file
    assert replaced == old_mode  # as overwriting the file in place would keep it
    assert checkpoint.load(path)["step"] == 2
    assert os.listdir(directory) == [path.name]  # no temporary left behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_file_or_a_directory_is_named(tmp_path, fmt):
    missing = tmp_path / "run" / f"ckpt.{fmt}"
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert "truncated" not in str(info.value)
    (tmp_path / f"d.{fmt}").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load(tmp_path / f"d.{fmt}")


@given(bad=st.one_of(st.integers(), st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                     st.binary(max_size=4)))
def test_path_of_another_type_is_a_type_error(bad):
    expect_rejected(lambda: checkpoint.load(bad), "checkpoint.load", "path")
    expect_rejected(lambda: checkpoint.save(bad, {}), "checkpoint.save", "path")


@given(bad=st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.none(), st.text(max_size=3)))
def test_state_must_be_a_dict(tmp_path_factory, bad):
    path = tmp_path_factory.mktemp("s") / "c.npz"
    expect_rejected(lambda: checkpoint.save(path, bad), "checkpoint.save", "state")
    assert not path.exists()


@given(fmt=st.sampled_from(FORMATS), key=st.text(min_size=1, max_size=6).map(lambda s: s + "/x")
       | st.text(max_size=4).map(lambda s: s + "#len") | st.just("__metadata__"),
       value=st.sampled_from([np.ones(2), 1.5, "text"]))
def test_keys_the_format_cannot_hold_are_refused_before_writing(tmp_path_factory, fmt, key, value):
    path = tmp_path_factory.mktemp("k") / f"c.{fmt}"
    expect_rejected(lambda: checkpoint.save(path, {key: value}), "checkpoint.save", "state")
    assert not path.exists()


@given(fmt=st.sampled_from(FORMATS),
       value=st.sampled_from([{1, 2}, object(), b"bytes", np.array(["a"]), np.array([None], dtype=object)]))
def test_values_the_format_cannot_hold_are_refused_before_writing(tmp_path_factory, fmt, value):
    path = tmp_path_factory.mktemp("v") / f"c.{fmt}"
    expect_rejected(lambda: checkpoint.save(path, {"a": {"b": value}}), "checkpoint.save", "state")
    assert not path.exists()


def test_names_that_numpy_savez_reserves_are_ordinary_keys(tmp_path):
    state = {"file": np.ones(2), "allow_pickle": np.zeros(1), "args": np.arange(3)}
    assert_same(checkpoint.load(checkpoint.save(tmp_path / "c.npz", state)), state)


def test_the_same_state_gives_the_same_bytes(tmp_path):
    for fmt in FORMATS:
        a = checkpoint.save(tmp_path / f"a.{fmt}", example_state()).read_bytes()
        b = checkpoint.save(tmp_path / f"b.{fmt}", example_state()).read_bytes()
        assert a == b


@given(fmt=st.sampled_from(FORMATS), depth=st.integers(66, 400), cyclic=st.booleans())
def test_a_state_nested_too_deep_or_containing_itself_is_refused(tmp_path_factory, fmt, depth, cyclic):
    state = inner = {}
    for _ in range(depth):
        inner["a"] = {}
        inner = inner["a"]
    if cyclic:
        state = {"x": 1}
        state["self"] = state
    path = tmp_path_factory.mktemp("deep") / f"c.{fmt}"
    message = expect_rejected(lambda: checkpoint.save(path, state), "checkpoint.save", "state")
    assert "nested deeper than" in message and not path.exists()


# -- keys: any text key round-trips or is refused by name --------------------------------------

SPECIAL_KEYS = ["", "\x00", "/", "#", ".", "..", "a/b", "#len", "x#len", "format", "version", "__metadata__",
                "\\", "a\\b", "k.npy", "é", "\ud800", "😀", "0", "a\x00b", " ", "npformer", "npformer.sha256"]
KEYS = st.text(max_size=4) | st.sampled_from(SPECIAL_KEYS)
KEY_DTYPES = [np.float64, np.float32, np.float16, np.int64, np.uint8, np.int8, np.bool_, np.complex128]


@st.composite
def small_arrays(draw):
    dtype = draw(st.sampled_from(KEY_DTYPES))
    shape = draw(shapes(min_dims=0, max_dims=2, sides=st.sampled_from([0, 1, 3])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.asarray(rng.standard_normal(shape) * 10).astype(dtype)  # 0-d stays an array


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=4))
VALUES = st.recursive(JSON_LEAVES | small_arrays(),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=8)
STATES = st.dictionaries(KEYS, VALUES, max_size=4)


def assert_identical(a, b, where="state"):
    """``b`` is ``a``: the same types (a dict, a list, an int, a float with its sign), keys, dtypes and values."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(sorted(a)) == list(sorted(b)), f"{where}: keys {sorted(a)!r} != {sorted(b)!r}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float):
        assert a == b and math.copysign(1, a) == math.copysign(1, b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def unholdable(state, fmt):
    """The rules of the module docstring, applied to ``state``: a reason it cannot be saved, or None."""

    def walk(tree, path):
        if isinstance(tree, dict):
            for k, v in tree.items():
                if "/" in k or k.endswith("#len"):
                    return f"key {k!r}"
                if not path and k in ("format", "version", "__metadata__"):
                    return f"reserved key {k!r}"
                reason = walk(v, path + (k,))
                if reason:
                    return reason
        elif isinstance(tree, list):
            for i, v in enumerate(tree):
                reason = walk(v, path + (str(i),))
                if reason:
                    return reason
        elif isinstance(tree, np.ndarray):
            name = "/".join(path)
            if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
                return f"array name {name!r} with a lone surrogate"
            if fmt == "npz" and ("\x00" in name or "\\" in name):
                return f"array name {name!r} for a zip member"
            if fmt == "safetensors" and tree.dtype.kind == "c":
                return "a complex array in safetensors"
        return None

    return walk(state, ())


def holds_arrays(tree):
    if isinstance(tree, dict):
        return any(holds_arrays(v) for v in tree.values())
    if isinstance(tree, list):
        return any(holds_arrays(v) for v in tree)
    return isinstance(tree, np.ndarray)


@given(fmt=st.sampled_from(FORMATS), state=STATES)
def test_any_text_keys_load_back_equal_or_are_refused_by_name(tmp_path_factory, fmt, state):
    """Keys "", NUL, "/", "#", ".", "\\", any Unicode, at any depth: what loads is what was saved, or save says no."""
    path = tmp_path_factory.mktemp("keys") / f"c.{fmt}"
    reason = unholdable(state, fmt)
    if reason is None:
        assert_identical(checkpoint.load(checkpoint.save(path, state)), state)
    else:
        with pytest.raises(ValueError) as info:
            checkpoint.save(path, state)
        assert "checkpoint.save: argument 'state'" in str(info.value), str(info.value)
        assert not path.exists() and os.listdir(path.parent) == [], reason


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("state", [{"": {"a": 1}}, {"": {}, "b": 1}, {"": [{"a": 1}]}, {"": np.ones(2)},
                                   {"a": {"": {"": [np.zeros(1), {"": 2}]}}}, {"": 3, "x": {"": []}}])
def test_the_empty_key_is_a_key_like_any_other(tmp_path, fmt, state):
    assert_identical(checkpoint.load(checkpoint.save(tmp_path / f"c.{fmt}", state)), state)


@pytest.mark.parametrize("key", ["format", "version", "__metadata__"])
def test_reserved_top_level_keys_are_named_as_reserved(tmp_path, key):
    for value in (1, np.ones(1)):
        message = expect_rejected(lambda: checkpoint.save(tmp_path / "c.npz", {key: value}), "checkpoint.save",
                                  "state")
        assert "reserves" in message and repr(key) in message
    state = {"nested": {key: 1}}  # one level down they are ordinary keys
    assert_identical(checkpoint.load(checkpoint.save(tmp_path / "c.npz", state)), state)


# -- arrays as the formats need them; paths --------------------------------------------------------

@given(fmt=st.sampled_from(FORMATS), dtype=st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.int32,
                                                            np.uint16, np.uint64]),
       shape=shapes(min_dims=0, max_dims=3, sides=st.sampled_from([0, 1, 2, 5])), rng=rngs())
def test_big_endian_arrays_are_stored_and_come_back_native(tmp_path_factory, fmt, dtype, shape, rng):
    values = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
    swapped = values.astype(np.dtype(dtype).newbyteorder(">"))
    loaded = checkpoint.load(checkpoint.save(tmp_path_factory.mktemp("be") / f"c.{fmt}", {"x": swapped}))["x"]
    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative and loaded.shape == shape
    np.testing.assert_array_equal(loaded, values)


@given(fmt=st.sampled_from(FORMATS), raw=st.lists(st.integers(0, 255), max_size=12))
def test_bool_arrays_of_any_bytes_are_stored_as_zero_or_one(tmp_path_factory, fmt, raw):
    """A bool array may hold any byte (a view of uint8): non-zero is True, and the file holds 0/1."""
    flags = np.array(raw, dtype=np.uint8).view(np.bool_)
    loaded = checkpoint.load(checkpoint.save(tmp_path_factory.mktemp("b") / f"c.{fmt}", {"m": flags}))["m"]
    assert loaded.dtype == np.bool_
    np.testing.assert_array_equal(loaded.view(np.uint8), (np.array(raw) != 0).astype(np.uint8))


@given(fmt=st.sampled_from(FORMATS), relative=st.booleans(), exists=st.booleans())
def test_saving_to_a_symlink_writes_the_file_it_points_to(tmp_path_factory, fmt, relative, exists):
    directory = tmp_path_factory.mktemp("link")
    (directory / "real").mkdir()
    target = directory / "real" / f"data.{fmt}"
    if exists:
        checkpoint.save(target, {"step": 1})
    link = directory / f"ckpt.{fmt}"
    link.symlink_to(os.path.relpath(target, directory) if relative else target)
    assert checkpoint.save(link, {"step": 2}) == link
    assert link.is_symlink() and os.readlink(link) == (os.path.relpath(target, directory) if relative else str(target))
    assert checkpoint.load(target)["step"] == 2 and checkpoint.load(link)["step"] == 2
    assert sorted(os.listdir(directory / "real")) == [target.name]


@given(fmt=st.sampled_from(FORMATS), length=st.integers(1, 255))
def test_file_names_up_to_the_limit_of_the_file_system(tmp_path_factory, fmt, length):
    suffix = f".{fmt}"
    name = ("n" * 255)[: max(1, length - len(suffix))] + suffix
    name = name[-255:]
    directory = tmp_path_factory.mktemp("long")
    path = checkpoint.save(directory / name, {"w": np.arange(3.0)})
    np.testing.assert_array_equal(checkpoint.load(path)["w"], np.arange(3.0))
    assert os.listdir(directory) == [name]


# -- an npz holds the members its metadata lists, and no other --------------------------------------
def npz_members(path):
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def write_members(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members:
            zf.writestr(name, raw)


def npy_bytes(a):
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, a, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Duplicate name")  # a duplicate member is one of the drawn cases
@given(name=st.sampled_from(["stray", "x/__metadata__", "a/__metadata__", "w", "opt/0/m2"]),
       values=st.lists(st.integers(-5, 5), max_size=4))
def test_an_npz_member_its_metadata_does_not_list_is_refused(tmp_path_factory, name, values):
    path = tmp_path_factory.mktemp("extra") / "c.npz"
    state = {"w": np.arange(6.0).reshape(2, 3), "x": {"k": 1}, "opt": [{"m": np.ones(2)}]}
    checkpoint.save(path, state)
    members = npz_members(path)
    assert checkpoint.load(path)["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    write_members(path, members + [(name + ".npy", npy_bytes(np.array(values, np.int64)))])
    with pytest.raises(CheckpointError, match=str(path)) as info:
        checkpoint.load(path)
    assert "appears twice" in str(info.value) if name == "w" else "does not list" in str(info.value) \
        or "not one" in str(info.value)


def test_an_npz_member_its_metadata_lists_is_required_and_old_files_load(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": np.ones(3), "v": np.zeros(2), "n": 4})
    members = npz_members(path)
    write_members(path, [m for m in members if m[0] != "v.npy"])
    with pytest.raises(CheckpointError, match="v.npy"):
        checkpoint.load(path)
    # A file written before the member list was kept (no list in its metadata) loads as it did.
    meta = json.loads(np.lib.format.read_array(__import__("io").BytesIO(dict(members)["__metadata__.npy"])).tobytes())
    assert meta.pop("__metadata__") == ["v", "w"]
    old = [(n, npy_bytes(np.frombuffer(json.dumps(meta).encode(), np.uint8)) if n == "__metadata__.npy" else r)
           for n, r in members]
    write_members(path, old)
    state = checkpoint.load(path)
    assert state["n"] == 4 and state["w"].tolist() == [1.0, 1.0, 1.0] and set(state) == {"w", "v", "n"}


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_second_metadata_member_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"w": np.ones(3)})
    members = npz_members(path)
    write_members(path, members + [m for m in members if m[0] == "__metadata__.npy"])
    with pytest.raises(CheckpointError, match="__metadata__"):
        checkpoint.load(path)
