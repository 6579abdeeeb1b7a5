"""The checkpoint reader, fuzzed: every mutated file loads correctly or raises CheckpointError.

Valid files (npz as written, npz compressed, safetensors) are mutated at the byte level
(overwritten bytes, insertions, deletions, truncations, and every single-byte flip) and
at the level of their structure (the safetensors JSON header, the npformer metadata
inside it, the header of each ``.npy`` member, rewritten with valid lengths and
checksums). Any exception other than ``CheckpointError`` fails. Where the format can
prove a load right, the test checks it: an npz member carries a CRC and a safetensors
file written by ``save`` a SHA-256 of its contents, so a mutated file that loads must
equal the original.

The structural tests of the safetensors parser work on the file as version 1 wrote it,
without a checksum, so that the parser, not the checksum, decides:
there a load must agree, tensor by tensor, with the (mutated) header it was read from,
and a mutation of the data bytes changes those bytes' values only.
"""

import io
import json
import math
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer import checkpoint
from npformer.checkpoint import CheckpointError
from tests.test_checkpoint import assert_same, example_state

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
             "U8": np.uint8, "BOOL": np.bool_}
KINDS = ("npz", "npz-compressed", "safetensors")
SHA_KEY = "npformer.sha256"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """{kind: (bytes of a valid file, the state it holds)}."""
    directory = tmp_path_factory.mktemp("originals")
    state = example_state()
    files = {fmt: checkpoint.save(directory / f"c.{fmt}", state).read_bytes() for fmt in ("npz", "safetensors")}
    with zipfile.ZipFile(io.BytesIO(files["npz"])) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    compressed = io.BytesIO()
    with zipfile.ZipFile(compressed, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    files["npz-compressed"] = compressed.getvalue()
    header, body = split_safetensors(files["safetensors"])
    files["safetensors-unsigned"] = join_safetensors(as_version_1(header), body)
    return {kind: (raw, state) for kind, raw in files.items()}


def load_bytes(tmp_path_factory, kind, raw):
    """``checkpoint.load`` of ``raw`` written to a file of ``kind``'s suffix: the state, or None on CheckpointError."""
    path = tmp_path_factory.mktemp("m") / ("c.safetensors" if kind == "safetensors" else "c.npz")
    path.write_bytes(raw)
    try:
        return checkpoint.load(path)
    except CheckpointError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return None


def lookup(tree, key):
    """The value under a flattened key ``"optim/state/0/m"`` (list levels indexed by int)."""
    for part in key.split("/"):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def split_safetensors(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def as_version_1(header):
    """``header`` as a version 1 ``save`` wrote it: the same, without the checksum version 2 adds."""
    header = json.loads(json.dumps(header))
    del header["__metadata__"][SHA_KEY]
    meta = json.loads(header["__metadata__"]["npformer"])
    header["__metadata__"]["npformer"] = json.dumps({**meta, "version": 1})
    return header


def join_safetensors(header, body, pad=0):
    text = json.dumps(header).encode("utf-8", "surrogatepass") + b" " * pad
    return struct.pack("<Q", len(text)) + text + body


def assert_matches_header(state, header, body):
    """A successful load agrees with the header it came from: every tensor's dtype, shape and bytes."""
    for name, info in header.items():
        if name == "__metadata__":
            continue
        array = lookup(state, name)
        begin, end = info["data_offsets"]
        assert array.dtype == np.dtype(ST_DTYPES[info["dtype"]]) and array.shape == tuple(info["shape"])
        assert array.astype(array.dtype.newbyteorder("<")).tobytes() == body[begin:end]


# -- byte-level mutations ----------------------------------------------------------------------

@st.composite
def byte_mutations(draw, size):
    """(kind of mutation, the mutated bytes' function): overwrite, insert, delete or truncate."""
    kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate"]))
    at = draw(st.integers(0, size - 1))
    data = draw(st.binary(min_size=1, max_size=8))
    if kind == "overwrite":
        return kind, at, lambda raw: raw[:at] + data[: size - at] + raw[at + len(data):]
    if kind == "insert":
        return kind, at, lambda raw: raw[:at] + data + raw[at:]
    if kind == "delete":
        return kind, at, lambda raw: raw[:at] + raw[at + len(data):]
    return kind, at, lambda raw: raw[:at]


@given(kind=st.sampled_from(["npz", "npz-compressed"]), data=st.data())
def test_mutated_npz_loads_the_original_or_is_refused(originals, tmp_path_factory, kind, data):
    raw, state = originals[kind]
    _, _, mutate = data.draw(byte_mutations(len(raw)))
    mutated = mutate(raw)
    loaded = load_bytes(tmp_path_factory, kind, mutated)
    if loaded is not None:  # every member is checked against its CRC: a load is the original
        assert_same(loaded, state)


@given(signed=st.booleans(), data=st.data())
def test_mutated_safetensors_loads_what_its_header_says_or_is_refused(originals, tmp_path_factory, signed, data):
    raw, state = originals["safetensors" if signed else "safetensors-unsigned"]
    mutation, at, mutate = data.draw(byte_mutations(len(raw)))
    mutated = mutate(raw)
    loaded = load_bytes(tmp_path_factory, "safetensors", mutated)
    if loaded is not None:
        header, body = split_safetensors(mutated)
        assert_matches_header(loaded, header, body)
        if signed:  # a version 2 file loads only when its checksum is there and holds
            assert_same(loaded, state)


@pytest.mark.parametrize("kind", ["safetensors", "npz"])  # the files save writes
def test_every_single_byte_flip_is_refused_or_loads_the_original(originals, tmp_path_factory, kind):
    """Each byte of the file in turn, XORed with a mask that walks through all eight bits and 0xFF."""
    raw, state = originals[kind]
    path = tmp_path_factory.mktemp("flip") / ("c.safetensors" if kind == "safetensors" else "c.npz")
    masks = [1 << b for b in range(8)] + [0xFF]
    outcomes = {"refused": 0, "loaded": 0}
    for at in range(len(raw)):
        flipped = bytearray(raw)
        flipped[at] ^= masks[at % len(masks)]
        path.write_bytes(flipped)
        try:
            loaded = checkpoint.load(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["refused"] += 1
            continue
        assert_same(loaded, state)
        outcomes["loaded"] += 1
    assert outcomes["refused"] + outcomes["loaded"] == len(raw)
    if kind == "safetensors":  # every byte is covered by the checksum (or is the checksum, or its key)
        assert outcomes["loaded"] == 0


@given(kind=st.sampled_from(KINDS), data=st.data())
def test_a_random_byte_overwrite_is_refused_or_loads_the_original(originals, tmp_path_factory, kind, data):
    raw, state = originals[kind]
    at = data.draw(st.integers(0, len(raw) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != raw[at]))
    loaded = load_bytes(tmp_path_factory, kind, raw[:at] + bytes([value]) + raw[at + 1:])
    if loaded is not None:
        assert_same(loaded, state)


@given(kind=st.sampled_from(KINDS), data=st.data())
def test_any_truncation_is_refused(originals, tmp_path_factory, kind, data):
    raw, _ = originals[kind]
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert load_bytes(tmp_path_factory, kind, raw[:cut]) is None


@given(data=st.data())
def test_overwritten_data_bytes_change_only_their_tensor(originals, tmp_path_factory, data):
    """Without a checksum (a file written elsewhere) the parser alone reads the data: only the bytes change."""
    raw, state = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    at = data.draw(st.integers(0, len(body) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != body[at]))
    mutated = raw[: len(raw) - len(body) + at] + bytes([value]) + raw[len(raw) - len(body) + at + 1:]
    loaded = load_bytes(tmp_path_factory, "safetensors", mutated)
    hit = next(name for name, info in header.items()
               if name != "__metadata__" and info["data_offsets"][0] <= at < info["data_offsets"][1])
    if header[hit]["dtype"] == "BOOL" and value > 1:
        assert loaded is None  # a BOOL byte other than 0 or 1 is refused
        return
    assert loaded is not None
    assert_matches_header(loaded, header, mutated[len(raw) - len(body):])
    for name in header:
        if name not in ("__metadata__", hit):
            np.testing.assert_array_equal(lookup(loaded, name), lookup(state, name))


# -- structural mutations: the safetensors header and the metadata -----------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                         st.sampled_from(list(ST_DTYPES) + ["BF16", "f32", ""]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def json_paths(tree, prefix=()):
    """Every location in a JSON tree, as a tuple of keys and indices (the root is ())."""
    yield prefix
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from json_paths(v, prefix + (k,))


@st.composite
def json_edits(draw, tree):
    """``tree`` with one location replaced, deleted, or given a new key / element."""
    tree = json.loads(json.dumps(tree))
    paths = list(json_paths(tree))
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "delete", "add"] if path else ["replace", "add"]))
    value = draw(JSON_VALUES)
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        if not path:
            return value
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    else:
        node = parent[path[-1]] if path else tree
        if isinstance(node, dict):
            node[draw(st.text(max_size=6))] = value
        elif isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), value)
        elif path:
            parent[path[-1]] = [node, value]
    return tree


@given(signed=st.booleans(), data=st.data())
def test_edited_safetensors_header_loads_what_it_says_or_is_refused(originals, tmp_path_factory, signed, data):
    raw, state = originals["safetensors" if signed else "safetensors-unsigned"]
    header, body = split_safetensors(raw)
    edited = data.draw(json_edits(header))
    mutated = join_safetensors(edited, body)
    loaded = load_bytes(tmp_path_factory, "safetensors", mutated)
    if loaded is not None:
        assert isinstance(edited, dict)
        assert_matches_header(loaded, edited, body)
        if signed:  # the checksum is there and held: the edit changed nothing that matters
            assert_same(loaded, state)


@given(data=st.data())
def test_edited_metadata_loads_its_values_or_is_refused(originals, tmp_path_factory, data):
    raw, _ = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    meta = data.draw(json_edits(json.loads(header["__metadata__"]["npformer"])))
    header["__metadata__"]["npformer"] = json.dumps(meta)
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body))
    if loaded is not None:
        assert isinstance(loaded, dict)
        for key, value in meta.items():
            if key not in ("format", "version") and not key.endswith("#len"):  # as JSON: NaN equals NaN
                assert json.dumps(lookup(loaded, key), sort_keys=True) == json.dumps(value, sort_keys=True)


@given(data=st.data())
def test_offsets_are_accepted_only_when_they_tile_the_data(originals, tmp_path_factory, data):
    raw, state = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    correct = header[name]["data_offsets"]
    begin = data.draw(st.sampled_from([correct[0], correct[1]]) | st.integers(-10, len(body) + 10))
    end = data.draw(st.sampled_from([correct[0], correct[1], begin]) | st.integers(-10, len(body) + 10))
    header[name]["data_offsets"] = [begin, end]
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body))
    assert (loaded is not None) == ([begin, end] == correct)  # negative, reversed, overlapping: all refused
    if loaded is not None:
        assert_same(loaded, state)


@given(data=st.data())
def test_shapes_are_accepted_only_when_they_fit_the_offsets(originals, tmp_path_factory, data):
    raw, _ = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    info = header[name]
    shape = data.draw(st.lists(st.integers(-4, 24), max_size=4))
    nbytes = int(np.prod(shape)) * np.dtype(ST_DTYPES[info["dtype"]]).itemsize
    fits = all(s >= 0 for s in shape) and nbytes == info["data_offsets"][1] - info["data_offsets"][0]
    info["shape"] = shape
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body))
    assert (loaded is not None) == fits  # negative sizes and sizes that do not match the bytes: refused
    if loaded is not None:
        assert lookup(loaded, name).shape == tuple(shape)


@given(signed=st.booleans(), data=st.data())
def test_equivalent_layouts_load_the_same_state(originals, tmp_path_factory, signed, data):
    """Reordered tensors (header and data) and any padding of the header mean the same file (and checksum)."""
    raw, state = originals["safetensors" if signed else "safetensors-unsigned"]
    header, body = split_safetensors(raw)
    names = data.draw(st.permutations(sorted(k for k in header if k != "__metadata__")))
    new_header, new_body = {"__metadata__": header["__metadata__"]}, b""
    for name in names:
        begin, end = header[name]["data_offsets"]
        new_header[name] = dict(header[name], data_offsets=[len(new_body), len(new_body) + end - begin])
        new_body += body[begin:end]
    keys = data.draw(st.permutations(list(new_header)))
    reordered = {k: new_header[k] for k in keys}
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(reordered, new_body, data.draw(
        st.integers(0, 9))))
    assert loaded is not None
    assert_same(loaded, state)


# -- structural mutations: the .npy members of an npz ------------------------------------------

NPY_DESCRS = st.sampled_from(["<f8", "<f4", ">f8", "<i8", "|u1", "|b1", "<c16", "|O", "<U3", "V8", "<M8[s]",
                              "(2,)<f8", "float64", "nonsense", ""])


@st.composite
def npy_header_edits(draw, header):
    """A .npy header dict with one field replaced by a value of another kind, or the whole header replaced."""
    header = dict(header)
    field = draw(st.sampled_from(["descr", "shape", "fortran_order", "whole"]))
    if field == "descr":
        header["descr"] = draw(NPY_DESCRS | st.integers() | st.none())
    elif field == "shape":
        header["shape"] = draw(st.tuples() | st.lists(st.integers(-3, 40), max_size=3).map(tuple)
                               | st.lists(st.integers(0, 3), max_size=2) | st.text(max_size=3))
    elif field == "fortran_order":
        header["fortran_order"] = draw(st.booleans() | st.integers(0, 2) | st.none())
    else:
        return draw(st.sampled_from(["{}", "[1, 2]", "{'descr': '<f8'}", "(", "x" * 20, "{'a': " * 50]))
    return header


@given(data=st.data())
def test_edited_npy_headers_load_what_they_say_or_are_refused(originals, tmp_path_factory, data):
    raw, _ = originals["npz"]
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    name = data.draw(st.sampled_from(sorted(members)))
    member = io.BytesIO(members[name])
    version = np.lib.format.read_magic(member)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(member) if version == (1, 0) else \
        np.lib.format.read_array_header_2_0(member)
    array_bytes = members[name][member.tell():]
    edited = data.draw(npy_header_edits({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran,
                                         "shape": shape}))
    text = (edited if isinstance(edited, str) else repr(edited)).encode("latin1", "replace")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    members[name] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + array_bytes
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w") as zf:
        for member_name, member_raw in members.items():
            zf.writestr(member_name, member_raw)  # valid CRCs: only the header's meaning changed
    loaded = load_bytes(tmp_path_factory, "npz", rebuilt.getvalue())
    if loaded is not None and name != "__metadata__.npy":
        array = lookup(loaded, name[: -len(".npy")])
        assert array.dtype == np.dtype(edited["descr"]).newbyteorder("=") and array.shape == edited["shape"]
        expected = np.frombuffer(array_bytes, np.dtype(edited["descr"])).reshape(
            edited["shape"], order="F" if edited["fortran_order"] else "C")
        np.testing.assert_array_equal(array, expected)


@given(depth=st.integers(66, 5000), where=st.sampled_from(["tensor", "metadata"]))
def test_keys_nested_beyond_any_state_are_refused(originals, tmp_path_factory, depth, where):
    raw, _ = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    key = "/".join(["a"] * depth)
    meta = json.loads(header["__metadata__"]["npformer"])
    if where == "tensor":
        header[key] = {"dtype": "U8", "shape": [0], "data_offsets": [len(body), len(body)]}
    else:
        meta[key] = 1
    header["__metadata__"]["npformer"] = json.dumps(meta)
    assert load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body)) is None


# -- sizes: checked before memory is spent ------------------------------------------------------

HUGE_SHAPES = st.lists(st.integers(0, 3) | st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, 2**63, 2**64]),
                       max_size=4).map(lambda s: [0] + s) \
    | st.integers(60, 70).map(lambda n: [1] * n) | st.sampled_from([[0, 2**63], [0, 2**40, 2**40], [1] * 65])


def numpy_can_make(shape, dtype):
    """NumPy's own answer: can it make an array of this shape (of no element, or of one)?"""
    try:
        np.empty(0 if 0 in shape else 1, dtype).reshape(shape)
    except (ValueError, OverflowError):
        return False
    return True


@given(dtype=st.sampled_from(["U8", "F64"]), shape=HUGE_SHAPES)
def test_safetensors_shapes_numpy_cannot_make_are_refused_by_name(originals, tmp_path_factory, dtype, shape):
    raw, _ = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    nbytes = math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize  # 0, or 1 byte for 65 ones
    header["x"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + nbytes]}
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body + b"\x00" * nbytes))
    assert (loaded is not None) == numpy_can_make(shape, ST_DTYPES[dtype])
    if loaded is not None:
        assert loaded["x"].shape == tuple(shape)


@given(descr=st.sampled_from(["|u1", "<f8"]), shape=HUGE_SHAPES)
def test_npy_shapes_numpy_cannot_make_are_refused_by_name(originals, tmp_path_factory, descr, shape):
    raw, _ = originals["npz"]
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    nbytes = math.prod(shape) * np.dtype(descr).itemsize
    text = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    members["x.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\x00" * nbytes
    meta = json.loads(np.load(io.BytesIO(members["__metadata__.npy"])).tobytes())
    meta["__metadata__"] = sorted(meta["__metadata__"] + ["x"])  # the member list accounts for x
    listed = io.BytesIO()
    np.save(listed, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    members["__metadata__.npy"] = listed.getvalue()
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w") as zf:
        for name, member in members.items():
            zf.writestr(name, member)
    loaded = load_bytes(tmp_path_factory, "npz", rebuilt.getvalue())
    assert (loaded is not None) == numpy_can_make(shape, np.dtype(descr))
    if loaded is not None:
        assert loaded["x"].shape == tuple(shape)


@given(length=st.integers(0, 5) | st.sampled_from([10**6, 2**63, 10**30, 10**300]), present=st.integers(0, 5))
def test_list_lengths_are_bounded_by_the_entries_present(originals, tmp_path_factory, length, present):
    """A list length the entries do not back (10**30 with one entry) is refused at once, without counting to it."""
    raw, _ = originals["safetensors-unsigned"]
    header, body = split_safetensors(raw)
    meta = json.loads(header["__metadata__"]["npformer"])
    meta["a#len"] = length
    meta.update({f"a/{i}": i for i in range(present)})
    header["__metadata__"]["npformer"] = json.dumps(meta)
    loaded = load_bytes(tmp_path_factory, "safetensors", join_safetensors(header, body))
    assert (loaded is not None) == (length == present and present > 0)
    if loaded is not None:
        assert loaded["a"] == list(range(present))


class CountingReads:
    """Counts the bytes read from every zip member opened while it is active."""

    def __init__(self, monkeypatch):
        self.total = 0
        opener = zipfile.ZipFile.open
        counter = self

        def counting_open(zf, *args, **kwargs):
            stream = opener(zf, *args, **kwargs)
            read = stream.read

            def counted(n=-1):
                data = read(n)
                counter.total += len(data)
                return data

            stream.read = counted
            return stream

        monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)


@given(inflated=st.sampled_from([2**20, 2**24]), declared_shape=st.sampled_from([(2,), (0,), (), (3, 5)]),
       compressed=st.booleans())
def test_an_npz_member_larger_than_its_header_says_is_refused_before_it_is_read(
        originals, tmp_path_factory, inflated, declared_shape, compressed):
    """A member whose .npy header says a few bytes but which inflates to megabytes (a zip bomb in small)."""
    raw, _ = originals["npz"]
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    text = repr({"descr": "<f8", "fortran_order": False, "shape": declared_shape}).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    members["bomb.npy"] = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(inflated)
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w", compression=zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        for name, member in members.items():
            zf.writestr(name, member)
    path = tmp_path_factory.mktemp("bomb") / "c.npz"
    path.write_bytes(rebuilt.getvalue())
    with pytest.MonkeyPatch.context() as monkeypatch:
        reads = CountingReads(monkeypatch)
        with pytest.raises(CheckpointError, match="bomb.npy.*declares") as info:
            checkpoint.load(path)
    assert str(path) in str(info.value)
    assert reads.total < 2**16  # the other members and one header, never the inflated data
