"""Bad input to every public function of ``npformer.data``, generated: a named ValueError or TypeError.

Each case is one argument of one function, with a strategy of values that are wrong
for it (wrong types, out-of-range numbers, floats where counts belong, ids outside the
vocabulary, block sizes larger than the data, ...). The call must raise ``ValueError``
or ``TypeError`` whose message names the function and the argument.
"""


import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data import (ArithmeticTask, ByteBPE, CharTokenizer, Problem, data_fingerprint, default_corpus,
                           exact_match, get_batch, make_batch, train_val_split)
from npformer.data.arithmetic import heldout_mask
from npformer.data.vocab import check_same_tokenizer, check_vocab, tokenizer_difference
from tests.badinput import Case, expect_rejected

CHAR = CharTokenizer("abcde")
BPE = ByteBPE([(97, 98), (256, 99)])
TASK = ArithmeticTask("+", 2)
PROBLEMS = [Problem(12, 34, "+", 2), Problem(5, 6, "+", 2)]
IDS = np.arange(20)


def rng():
    return np.random.default_rng(0)


# -- strategies of wrong values -----------------------------------------------------------------

def anything_but(*types):
    """Values of many kinds, less those that are instances of ``types``."""
    return st.one_of(st.integers(-5, 5), st.floats(), st.none(), st.booleans(), st.text(max_size=3),
                     st.binary(max_size=3), st.lists(st.integers(0, 3), max_size=2), st.just(np.arange(2)),
                     st.just(np.float64(1.5)), st.just({"a": 1})).filter(lambda v: not isinstance(v, types))


NOT_STR = anything_but(str)
NON_BOOL = anything_but(bool, np.bool_)


def bad_counts(lo, hi=None):
    """Not an integer in [lo, hi]: smaller or larger ints, integral floats, bools, None, strings."""
    too_small = st.integers(lo - 50, lo - 1)
    too_large = st.integers(hi + 1, hi + 50) if hi is not None else st.nothing()
    return st.one_of(too_small, too_large, st.floats().filter(lambda v: v != int(v) if np.isfinite(v) else True),
                     st.integers(lo, lo + 5).map(float), st.booleans(), st.none(), st.just("3"))


def bad_reals(lo, hi, lo_open=False, hi_open=False):
    """Not a finite real in the interval: outside it, on an open end, NaN, inf, bools, strings."""
    outside = st.one_of(st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False),
                        st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False))
    return st.one_of(outside, st.just(float("nan")), st.just(float("inf")), st.booleans(), st.none(), st.just("0.5"))


def bad_ids(vocab_size):
    """Not a sequence of ids in [0, vocab_size)."""
    good = st.lists(st.integers(0, vocab_size - 1), max_size=4)
    wrong_entry = st.one_of(st.floats(), st.booleans(), st.none(), st.text(max_size=2), st.just([1]),
                            st.integers(vocab_size, vocab_size + 100), st.integers(-100, -1))
    with_wrong_entry = st.tuples(good, wrong_entry, st.integers(0, 4)).map(
        lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:])
    arrays = st.sampled_from([np.array([0.0, 1.0]), np.array([[0, 1]]), np.array(1), np.array([True]),
                              np.array([0, vocab_size]), np.array([-1, 0])])
    return st.one_of(with_wrong_entry, arrays, st.text(min_size=1, max_size=3), st.binary(max_size=2),
                     st.integers(0, 3), st.none(), st.just({0, 1}), st.just({0: 1}))


def bad_streams():
    """Not a 1-d stream of integer ids."""
    return st.one_of(st.sampled_from([np.arange(6.0), np.arange(6).reshape(2, 3), np.ones(4, bool), np.array(3),
                                      np.array(["1", "2"])]),
                     st.lists(st.floats(), min_size=1, max_size=3), st.lists(st.booleans(), min_size=1, max_size=3),
                     st.text(min_size=1, max_size=3), st.none(), st.integers(), st.just({1, 2}))


def bad_rngs():
    return st.one_of(st.integers(0, 5), st.none(), st.just(np.random.RandomState(0)), st.text(max_size=2))


def bad_problem_lists():
    entries = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just((12, 34)))
    return st.one_of(st.lists(entries, min_size=1, max_size=3).map(lambda bad: PROBLEMS + bad), st.just([]),
                     st.integers(), st.none(), st.text(max_size=2))


# -- the cases ----------------------------------------------------------------------------------


CASES = [
    # CharTokenizer
    Case("CharTokenizer", "chars", CharTokenizer,
         st.one_of(st.integers(), st.none(), st.binary(min_size=1, max_size=3), st.just(""), st.just("aba"),
                   st.lists(st.text(min_size=2, max_size=3) | st.integers(), min_size=1, max_size=2))),
    Case("CharTokenizer.from_text", "text", CharTokenizer.from_text, NOT_STR | st.just("")),
    Case("CharTokenizer.encode", "text", CHAR.encode, NOT_STR | st.text(min_size=1, max_size=4).map(lambda t: t + "z")),
    Case("CharTokenizer.encode_array", "text", CHAR.encode_array, NOT_STR | st.just("abz")),
    Case("CharTokenizer.decode", "ids", CHAR.decode, bad_ids(5)),
    Case("CharTokenizer.from_dict", "d", CharTokenizer.from_dict,
         st.one_of(anything_but(dict), st.sampled_from([{"kind": "bpe", "chars": "ab"}, {"chars": 5}, {},
                                                        {"chars": "aa"}, {"chars": ""}]))),
    # ByteBPE
    Case("ByteBPE", "merges", ByteBPE,
         st.one_of(st.integers(), st.none(), st.text(min_size=1, max_size=2), st.just([(1, 2, 3)]), st.just([(1.5, 2)]),
                   st.just([(True, 2)]), st.just([(256, 1)]), st.just([(-1, 2)]), st.just([(1, 2), (1, 2)]),
                   st.just(["ab"]), st.just([5]))),
    Case("ByteBPE", "pattern", lambda bad: ByteBPE((), bad),
         st.one_of(anything_but(str), st.sampled_from(["(", "[a-", "(a)|b", "*"]))),
    Case("ByteBPE.train", "text", lambda bad: ByteBPE.train(bad, 300), NOT_STR),
    Case("ByteBPE.train", "vocab_size", lambda bad: ByteBPE.train("abab", bad), bad_counts(256)),
    Case("ByteBPE.train", "pattern", lambda bad: ByteBPE.train("abab", 300, bad),
         st.one_of(anything_but(str), st.sampled_from(["(", "(a)|b"]))),
    Case("ByteBPE.encode", "text", BPE.encode, NOT_STR),
    Case("ByteBPE.encode_array", "text", BPE.encode_array, NOT_STR),
    Case("ByteBPE.decode", "ids", BPE.decode, bad_ids(BPE.vocab_size)),
    Case("ByteBPE.token_bytes", "i", BPE.token_bytes, bad_counts(0, BPE.vocab_size - 1)),
    Case("ByteBPE.from_dict", "d", ByteBPE.from_dict,
         st.one_of(anything_but(dict), st.sampled_from([
             {}, {"kind": "byte-bpe", "version": 2, "merges": [], "pattern": "."},
             {"kind": "byte-bpe", "version": True, "merges": [], "pattern": "."},
             {"kind": "byte-bpe", "version": 1, "merges": "ab", "pattern": "."},
             {"kind": "byte-bpe", "version": 1, "merges": [[300, 1]], "pattern": "."},
             {"kind": "byte-bpe", "version": 1, "merges": [], "pattern": "("},
             {"kind": "byte-bpe", "version": 1, "merges": []}]))),
    Case("ByteBPE.save", "path", BPE.save, anything_but(str)),
    Case("ByteBPE.load", "path", ByteBPE.load, anything_but(str)),
    # corpus
    Case("default_corpus", "max_bytes", default_corpus, bad_counts(1)),
    Case("train_val_split", "ids", train_val_split, bad_streams()),
    Case("train_val_split", "val_fraction", lambda bad: train_val_split(IDS, bad), bad_reals(0.0, 1.0, hi_open=True)),
    Case("train_val_split", "seed", lambda bad: train_val_split(IDS, 0.1, seed=bad), bad_counts(0)),
    Case("train_val_split", "chunk_size", lambda bad: train_val_split(IDS, 0.1, chunk_size=bad), bad_counts(1)),
    Case("train_val_split", "contiguous", lambda bad: train_val_split(IDS, 0.1, contiguous=bad), NON_BOOL),
    Case("get_batch", "ids", lambda bad: get_batch(bad, 2, 1, rng()), bad_streams()),
    Case("get_batch", "batch_size", lambda bad: get_batch(IDS, bad, 4, rng()), bad_counts(1)),
    Case("get_batch", "block_size", lambda bad: get_batch(IDS, 2, bad, rng()), bad_counts(1, len(IDS) - 1)),
    Case("get_batch", "rng", lambda bad: get_batch(IDS, 2, 4, bad), bad_rngs()),
    # arithmetic
    Case("Problem", "a", lambda bad: Problem(bad, 3, "+", 2), bad_counts(0, 99)),
    Case("Problem", "b", lambda bad: Problem(3, bad, "*", 2), bad_counts(0, 99)),
    Case("Problem", "op", lambda bad: Problem(1, 2, bad), anything_but(str) | st.sampled_from(["/", "", "++"])),
    Case("Problem", "digits", lambda bad: Problem(1, 2, "+", bad), bad_counts(1, 9)),
    Case("Problem", "fixed_width", lambda bad: Problem(1, 2, fixed_width=bad), NON_BOOL),
    Case("Problem", "reverse", lambda bad: Problem(1, 2, reverse=bad), NON_BOOL),
    Case("Problem.parse", "answer", PROBLEMS[0].parse, NOT_STR),
    Case("ArithmeticTask", "op", ArithmeticTask, anything_but(str) | st.sampled_from(["/", "x"])),
    Case("ArithmeticTask", "digits", lambda bad: ArithmeticTask("+", bad), bad_counts(1, 9)),
    Case("ArithmeticTask", "fixed_width", lambda bad: ArithmeticTask(fixed_width=bad), NON_BOOL),
    Case("ArithmeticTask", "reverse", lambda bad: ArithmeticTask(reverse=bad), NON_BOOL),
    Case("ArithmeticTask", "heldout_fraction", lambda bad: ArithmeticTask(heldout_fraction=bad),
         bad_reals(0.0, 1.0, lo_open=True, hi_open=True)),
    Case("ArithmeticTask.problem", "a", lambda bad: TASK.problem(bad, 3), bad_counts(0, 99)),
    Case("ArithmeticTask.problem", "b", lambda bad: TASK.problem(3, bad), bad_counts(0, 99)),
    Case("ArithmeticTask.sample", "rng", lambda bad: TASK.sample(bad, 2), bad_rngs()),
    Case("ArithmeticTask.sample", "n", lambda bad: TASK.sample(rng(), bad), bad_counts(1)),
    Case("ArithmeticTask.sample", "split", lambda bad: TASK.sample(rng(), 2, bad),
         anything_but(str) | st.sampled_from(["val", "test", ""])),
    Case("ArithmeticTask.batch", "batch_size", lambda bad: TASK.batch(rng(), bad), bad_counts(1)),
    Case("ArithmeticTask.batch", "tok", lambda bad: TASK.batch(rng(), 2, tok=bad),
         st.one_of(anything_but(type(None)), st.just(CharTokenizer("0123456789")), st.just(BPE))),
    Case("ArithmeticTask.is_heldout", "a", lambda bad: TASK.is_heldout(bad, 3),
         st.one_of(st.floats(), st.just(np.array([1.5])), st.just(-1), st.just(2**32), st.just(np.array([True])),
                   st.none(), st.text(max_size=2))),
    Case("heldout_mask", "op", lambda bad: heldout_mask(bad, 1, 2, 0.1), anything_but(str) | st.just("%")),
    Case("heldout_mask", "b", lambda bad: heldout_mask("+", 1, bad, 0.1),
         st.one_of(st.floats(), st.just([1, -2]), st.just(np.array([2**40])), st.none())),
    Case("heldout_mask", "fraction", lambda bad: heldout_mask("+", 1, 2, bad), bad_reals(0.0, 1.0)),
    Case("make_batch", "problems", make_batch, bad_problem_lists()),
    Case("make_batch", "tok", lambda bad: make_batch(PROBLEMS, bad),
         st.one_of(anything_but(type(None)), st.just(CharTokenizer("0123456789+=")), st.just(BPE))),
    Case("make_batch", "block_size", lambda bad: make_batch(PROBLEMS, None, bad),
         bad_counts(1).filter(lambda v: v is not None) | st.integers(1, 8)),
    Case("exact_match", "predicted_answers", lambda bad: exact_match(bad, PROBLEMS),
         st.one_of(st.lists(st.text(max_size=3), max_size=4).filter(lambda v: len(v) != 2),
                   st.tuples(st.floats() | st.none() | st.booleans() | st.just([46]), st.integers(0, 1)).map(
                       lambda t: ["046", "11"][: t[1]] + [t[0]] + ["046", "11"][t[1] + 1:]),
                   st.integers(), st.none(), st.text(min_size=2, max_size=2))),
    Case("exact_match", "problems", lambda bad: exact_match(["1"], bad), bad_problem_lists()),
    # vocabularies
    Case("check_vocab", "tokenizer", lambda bad: check_vocab(bad, 5), anything_but(CharTokenizer, ByteBPE)),
    Case("check_vocab", "vocab_size", lambda bad: check_vocab(CHAR, bad), bad_counts(1)),
    Case("check_vocab", "where", lambda bad: check_vocab(CHAR, 5, bad), NOT_STR.filter(lambda v: v is not None)),
    Case("check_vocab", "allow_padding", lambda bad: check_vocab(CHAR, 5, allow_padding=bad),
         NON_BOOL | st.sampled_from(["no", "False", 0, 1, None, np.array(True)])),
    Case("tokenizer_difference", "saved", lambda bad: tokenizer_difference(bad, CHAR), anything_but(CharTokenizer)),
    Case("tokenizer_difference", "current", lambda bad: tokenizer_difference(BPE, bad), anything_but(ByteBPE)),
    Case("check_same_tokenizer", "current", lambda bad: check_same_tokenizer(CHAR, bad), anything_but(CharTokenizer)),
    Case("check_same_tokenizer", "where", lambda bad: check_same_tokenizer(CHAR, CHAR, bad),
         NOT_STR.filter(lambda v: v is not None)),
    Case("data_fingerprint", "data", data_fingerprint, bad_streams().filter(lambda v: not isinstance(v, str))),
]


@pytest.mark.parametrize("case", CASES, ids=repr)
@given(data=st.data())
def test_bad_input_is_named(case, data):
    bad = data.draw(case.values, label=f"{case.func}({case.arg}=...)")
    expect_rejected(lambda: case.call(bad), case.func, case.arg)


@given(raw=st.binary(max_size=40) | st.sampled_from([b"[1, 2]", b"{}", b'{"kind": "byte-bpe"}', b"\xff\xfe"]))
def test_a_malformed_tokenizer_file_is_named(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    path.write_bytes(raw)
    expect_rejected(lambda: ByteBPE.load(path), "ByteBPE.load", "path", errors=(ValueError,))


def test_the_checks_leave_good_input_alone():
    """The same calls with good values work, so the cases above fail for the bad value alone."""
    assert CHAR.decode(CHAR.encode("abc")) == "abc" and BPE.decode(np.array([256, 257])) == "ababc"
    assert len(train_val_split(IDS, 0.1, seed=1, chunk_size=4, contiguous=True)[1]) == 2
    assert get_batch(IDS, 2, len(IDS) - 1, rng())[0].shape == (2, 19)
    assert make_batch(PROBLEMS, None, 9)[0].shape == (2, 9) and TASK.batch(rng(), 3)[0].shape[0] == 3
    assert exact_match(("046", 11), PROBLEMS) == 1.0 and Problem(99, 99, "*", 2).result == 9801
    assert heldout_mask("+", [1, 2], np.uint32(3), 0.5).shape == (2,)
    check_vocab(CHAR, 5)
    check_same_tokenizer(BPE, ByteBPE(BPE.merges))


# -- the same wrong id is the same error, in a list or in an array ---------------------------------

WITH_A_FLOAT = st.tuples(st.lists(st.integers(0, 4), max_size=4), st.sampled_from([1.0, 2.5, np.float64(1.0)]),
                         st.integers(0, 4)).map(lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2]:])


@given(tok=st.sampled_from([CHAR, BPE]), ids=WITH_A_FLOAT | st.lists(st.booleans(), min_size=1, max_size=4))
def test_a_non_integer_id_is_a_type_error_in_a_list_and_in_an_array(tok, ids):
    """[1, 2.5] and np.array([1, 2.5]) (float64), [True] and np.array([True]) (bool): the same TypeError."""
    errors = []
    for given_as in (ids, np.array(ids)):  # [1.0] and np.array([1.0]) (an array of floats or of bools)
        with pytest.raises((TypeError, ValueError)) as info:
            tok.decode(given_as)
        assert type(tok).__name__ + ".decode" in str(info.value) and "'ids'" in str(info.value)
        errors.append(type(info.value))
    assert errors == [TypeError, TypeError]


@given(tok=st.sampled_from([CHAR, BPE]), shape=st.sampled_from([(), (1, 2), (2, 1, 1)]))
def test_an_id_array_of_another_rank_is_a_value_error(tok, shape):
    with pytest.raises(ValueError, match="expected a 1-d integer array"):
        tok.decode(np.zeros(shape, dtype=np.int64))


@given(op=st.sampled_from(["+", "-", "*"]), a=st.lists(st.integers(0, 2**32 - 1), max_size=3),
       b=st.lists(st.integers(0, 2**32 - 1), max_size=3), as_tuple=st.booleans(),
       fraction=st.floats(0, 1))
def test_heldout_mask_takes_empty_lists_as_no_operands(op, a, b, as_tuple, fraction):
    """``[]`` is an empty set of operands (NumPy alone would make it a float64 array): an empty bool mask."""
    a = a if len(a) == len(b) else []
    b = b if a else []
    wrap = tuple if as_tuple else list
    mask = heldout_mask(op, wrap(a), wrap(b), fraction)
    expected = heldout_mask(op, np.array(a, dtype=np.int64), np.array(b, dtype=np.int64), fraction)
    assert mask.dtype == np.bool_ and mask.shape == (len(a),)
    np.testing.assert_array_equal(mask, expected)
