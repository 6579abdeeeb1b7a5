"""Tokenizers, the built-in corpus, splits, batches and the arithmetic tasks."""

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data import (IGNORE_INDEX, ArithmeticTask, ByteBPE, CharTokenizer, Problem, default_corpus,
                           exact_match, get_batch, make_batch, train_val_split)
from npformer.data.arithmetic import tokenizer as arithmetic_tokenizer
from npformer.data.bpe import PATTERN
from tests.strategies import rngs

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ["", "a", "hello world", "naïve café — 東京 😀👩‍👩‍👧 \u0301x", "  \n\t\r\n  spaced  ", "x_y__z 1234567 ,.;!?",
           "don't it's we'll", "\x00\x7f\u2028\U0010ffff"]

# -- characters ------------------------------------------------------------------------------


@given(st.text(min_size=1))
def test_char_round_trip(text):
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids) and tok.vocab_size == len(set(text))
    assert tok.chars == sorted(set(text))
    assert CharTokenizer.from_dict(tok.to_dict()) == tok


def test_char_ids_are_sorted_characters():
    tok = CharTokenizer.from_text("hello")
    assert tok.chars == ["e", "h", "l", "o"] and tok.encode("hole") == [1, 3, 2, 0]
    assert tok.encode_array("hole").dtype == np.int64


def test_char_unknown_character_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"CharTokenizer.encode: argument 'text' has character 'z' \(U\+007A\) "
                                         r"at position 2, which is not in the vocabulary of 3 characters"):
        tok.encode("abzc")
    with pytest.raises(ValueError, match=r"character '😀' \(U\+1F600\) at position 0"):
        tok.encode("😀")
    with pytest.raises(ValueError, match=r"argument 'ids' has id 3 at position 1, outside the vocabulary \[0, 3\)"):
        tok.decode([0, 3])


# -- byte-level BPE ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    return ByteBPE.train(default_corpus(max_bytes=200_000), vocab_size=600)


def naive_bpe_merges(text, vocab_size):
    """Reference trainer: recount every pair over every chunk occurrence at each merge."""
    import re

    words = [list(w.encode("utf-8")) for w in re.findall(PATTERN, text, re.DOTALL)]
    merges = []
    while len(merges) < vocab_size - 256:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        new = 256 + len(merges)
        merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


@pytest.mark.parametrize("text", ["aaaa aaa aa a banana bandana nana", "the cat sat on the mat; the hat"])
def test_bpe_training_matches_naive_recount(text):
    assert ByteBPE.train(text, 256 + 30).merges == naive_bpe_merges(text, 256 + 30)


def test_bpe_training_on_corpus_matches_naive_recount():
    text = default_corpus(max_bytes=8_000)
    assert ByteBPE.train(text, 256 + 40).merges == naive_bpe_merges(text, 256 + 40)


@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips_samples(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_compresses_its_training_text(bpe):
    text = default_corpus(max_bytes=200_000)
    ids = bpe.encode(text)
    assert bpe.vocab_size == 600 and len(bpe.merges) == 344
    assert len(ids) < 0.6 * len(text.encode("utf-8"))
    assert bpe.decode(ids) == text
    # Every merged token is the concatenation of its parts.
    for k, (a, b) in enumerate(bpe.merges):
        assert bpe.token_bytes(256 + k) == bpe.token_bytes(a) + bpe.token_bytes(b)


def test_bpe_save_load(bpe, tmp_path):
    loaded = ByteBPE.load(bpe.save(tmp_path / "bpe.json"))
    assert loaded == bpe and loaded.merges == bpe.merges and loaded.vocab_size == bpe.vocab_size
    for text in SAMPLES + [default_corpus(max_bytes=5_000)]:
        assert loaded.encode(text) == bpe.encode(text)


def test_bpe_stops_when_no_pairs_remain_and_rejects_bad_input():
    tiny = ByteBPE.train("ab ab", 1000)
    assert tiny.merges == [(97, 98), (32, 256)] and tiny.encode("ab ab") == [256, 257]
    with pytest.raises(ValueError, match="argument 'vocab_size' expected an integer >= 256, got 100"):
        ByteBPE.train("abc", 100)
    with pytest.raises(ValueError, match=r"id 258 at position 0, outside the vocabulary \[0, 258\)"):
        tiny.decode([258])
    with pytest.raises(ValueError, match="merge 0 = \\(256, 1\\) refers to an id not defined before it"):
        ByteBPE([(256, 1)])
    with pytest.raises(ValueError, match="merge 1 = \\(97, 98\\) repeats merge 0"):
        ByteBPE([(97, 98), (97, 98)])


def test_bpe_decode_of_a_split_character_is_replaced(bpe):
    ids = ByteBPE().encode("é")  # no merges: two byte ids
    assert ids == [0xC3, 0xA9] and bpe.decode(ids[:1]) == "\ufffd"


# -- corpus, split, batches -------------------------------------------------------------------

def test_corpus_size_and_content():
    text = default_corpus()
    size = len(text.encode("utf-8"))
    assert 500_000 < size <= 1 << 20 and text.endswith("\n")
    assert text.startswith('The "assert" statement')
    small = default_corpus(max_bytes=10_000)
    assert len(small.encode("utf-8")) <= 10_000 and text.startswith(small)


def test_corpus_is_deterministic_across_processes():
    code = "import hashlib; from npformer.data import default_corpus; " \
           "print(hashlib.sha256(default_corpus().encode()).hexdigest())"
    here = hashlib.sha256(default_corpus().encode()).hexdigest()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
        assert out.stdout.strip() == here


@given(n=st.integers(2, 5000), frac=st.sampled_from([0.01, 0.1, 0.5, 0.9]), seed=st.integers(0, 100),
       chunk=st.sampled_from([1, 7, 64, 4096]), contiguous=st.booleans())
def test_split_is_disjoint_and_complete(n, frac, seed, chunk, contiguous):
    ids = np.arange(n)  # each value names its position
    train, val = train_val_split(ids, frac, seed=seed, chunk_size=chunk, contiguous=contiguous)
    assert train.dtype == val.dtype == np.int64
    assert len(train) >= 1 and len(val) >= 1
    assert not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), ids)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # original order kept
    again = train_val_split(ids, frac, seed=seed, chunk_size=chunk, contiguous=contiguous)
    np.testing.assert_array_equal(again[1], val)


def test_split_chunks_and_fraction():
    ids = np.arange(100_000)
    train, val = train_val_split(ids, 0.1, seed=0, chunk_size=1000)
    assert len(val) == 10_000  # 10 of 100 chunks of 1000
    starts = val[np.r_[True, np.diff(val) > 1]]
    assert np.all(starts % 1000 == 0)  # whole chunks
    other = train_val_split(ids, 0.1, seed=1, chunk_size=1000)[1]
    assert not np.array_equal(val, other)
    assert train_val_split(ids, 0.1, contiguous=True)[1][0] == 90_000
    assert len(train_val_split(ids, 0.0)[1]) == 0


@given(rngs(), st.integers(1, 5), st.integers(1, 9))
def test_get_batch_shapes_and_shift(rng, B, T):
    ids = np.arange(20, 60)
    seed = int(rng.integers(1 << 31))
    x, y = get_batch(ids, B, T, np.random.default_rng(seed))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)  # consecutive ids: y is x shifted by one position
    assert x.min() >= 20 and y.max() <= 59
    x2, _ = get_batch(list(ids), B, T, np.random.default_rng(seed))
    np.testing.assert_array_equal(x, x2)


def test_get_batch_windows_come_from_the_stream():
    text = default_corpus(max_bytes=20_000)
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text))
    x, y = get_batch(ids, 4, 16, np.random.default_rng(0))
    for row_x, row_y in zip(x, y):
        window = tok.decode(row_x) + tok.decode(row_y[-1:])
        assert window in text and tok.decode(row_y) == window[1:]
    with pytest.raises(ValueError, match="get_batch: argument 'block_size' expected at most 7 .* got 8"):
        get_batch(np.arange(8), 2, 8, np.random.default_rng(0))


# -- arithmetic -------------------------------------------------------------------------------

TASKS = st.builds(ArithmeticTask, op=st.sampled_from(["+", "-", "*"]), digits=st.integers(1, 6),
                  fixed_width=st.booleans(), reverse=st.booleans())


def solve(text):
    """Independent reading of a line: split at the operator and '=', compute with Python ints."""
    assert text.endswith("\n")
    lhs, answer = text[:-1].split("=")
    op = next(c for c in "+-*" if c in lhs)
    a, b = (int(s) for s in lhs.split(op))
    return {"+": a + b, "-": a - b, "*": a * b}[op], answer


@given(TASKS, rngs())
def test_generated_answers_are_correct(task, rng):
    for p in task.sample(rng, 20):
        expected, answer = solve(p.text)
        digits = answer[::-1] if task.reverse else answer
        assert int(digits) == expected == p.result == p.parse(p.answer)
        assert 0 <= p.a < 10**task.digits and 0 <= p.b < 10**task.digits
        if task.fixed_width:
            assert len(p.text) == task.line_length and len(answer) == p.answer_width
        else:
            assert digits == str(expected)


def test_formats():
    assert Problem(7, 456, "+", 3).text == "007+456=0463\n"
    assert Problem(7, 456, "-", 3).text == "007-456=-449\n"
    assert Problem(456, 7, "-", 3).text == "456-007=0449\n"
    assert Problem(7, 456, "*", 3).text == "007*456=003192\n"
    assert Problem(7, 456, "+", 3, reverse=True).text == "007+456=3640\n"
    assert Problem(7, 456, "-", 3, reverse=True).text == "007-456=944-\n"
    assert Problem(7, 456, "-", 3, fixed_width=False).text == "7-456=-449\n"
    assert Problem(7, 456, "-", 3, reverse=True).parse("944-") == -449


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_heldout_never_overlaps_training(op):
    task = ArithmeticTask(op, digits=2, heldout_fraction=0.1)
    key = (lambda p: (min(p.a, p.b), max(p.a, p.b))) if op in "+*" else (lambda p: (p.a, p.b))
    train = {key(p) for p in task.sample(np.random.default_rng(0), 3000, "train")}
    held = {key(p) for p in task.sample(np.random.default_rng(1), 600, "heldout")}
    assert train and held and not train & held
    a, b = np.meshgrid(np.arange(100), np.arange(100), indexing="ij")
    mask = task.is_heldout(a, b)
    assert mask.shape == (100, 100) and 0.05 < mask.mean() < 0.15  # the hash is fixed: this cannot flake
    if op in "+*":
        np.testing.assert_array_equal(mask, mask.T)  # "3+5" and "5+3" on the same side
    assert all(mask[p.a, p.b] for p in task.sample(np.random.default_rng(2), 50, "heldout"))
    # The split is a property of the operands: the same pairs at another width agree.
    wide = ArithmeticTask(op, digits=4, heldout_fraction=0.1)
    np.testing.assert_array_equal(wide.is_heldout(a, b), mask)


def test_sampling_is_seeded():
    task = ArithmeticTask("*", 3)
    assert task.sample(np.random.default_rng(5), 10) == task.sample(np.random.default_rng(5), 10)


@pytest.mark.parametrize("fixed_width", [True, False])
@pytest.mark.parametrize("reverse", [True, False])
def test_batch_loss_only_on_answers(fixed_width, reverse):
    task = ArithmeticTask("-", 3, fixed_width=fixed_width, reverse=reverse)
    tok = arithmetic_tokenizer()
    problems = task.sample(np.random.default_rng(0), 8)
    x, y, mask = make_batch(problems, tok)
    T = max(len(p.text) for p in problems) - 1
    assert x.shape == y.shape == mask.shape == (8, T) and x.dtype == y.dtype == np.int64 and mask.dtype == bool
    assert np.all((y == IGNORE_INDEX) == ~mask)
    for i, p in enumerate(problems):
        ids = tok.encode(p.text)
        n = len(ids) - 1
        np.testing.assert_array_equal(x[i, :n], ids[:-1])
        assert tok.decode(y[i][mask[i]]) == p.answer + "\n"
        assert tok.decode(x[i, :len(p.prompt)]) == p.prompt
        assert not mask[i, n:].any()
    x2, y2, mask2 = task.batch(np.random.default_rng(0), 8, tok=tok)
    np.testing.assert_array_equal(y2, y)
    with pytest.raises(ValueError, match="argument 'block_size' expected at least"):
        make_batch(problems, tok, block_size=3)


def test_exact_match():
    problems = [Problem(12, 34, "+", 2), Problem(5, 9, "-", 2, reverse=True), Problem(3, 4, "*", 1)]
    assert [p.answer for p in problems] == ["046", "40-", "12"]
    assert exact_match(["046\n", "40-", "12"], problems) == 1.0
    assert exact_match(["46", "40-", 12], problems) == pytest.approx(2 / 3)  # "46" is not in the fixed-width format
    assert exact_match([46, -4, 11], problems) == pytest.approx(2 / 3)
    assert exact_match(["047", "04-", "x"], problems) == 0.0
    with pytest.raises(ValueError, match="expected 3 answers \\(one per problem\\), got 2"):
        exact_match(["046", "40-"], problems)


def test_task_bad_arguments():
    with pytest.raises(ValueError, match="argument 'op' expected one of"):
        ArithmeticTask("/")
    with pytest.raises(ValueError, match="argument 'digits' expected an integer in \\[1, 9\\], got 10"):
        ArithmeticTask("+", 10)
    with pytest.raises(ValueError, match="argument 'split' expected 'train' or 'heldout', got 'val'"):
        ArithmeticTask().sample(np.random.default_rng(0), 1, "val")


# -- answers are read strictly ------------------------------------------------------------------

ANSWER_TEXTS = st.text(alphabet="0123456789-+_ \n٣１²x", max_size=6) | st.sampled_from(
    ["1_0", "+5", "٣", "１", "²", "1 0", "--1", "-", "", "0x1", "1e3", "-0", "007", " 12\n"])


@given(problem=st.sampled_from([Problem(12, 34, "+", 2), Problem(5, 9, "-", 2, reverse=True),
                                Problem(3, 4, "*", 1, fixed_width=False)]), text=ANSWER_TEXTS)
def test_parse_reads_ascii_digits_with_a_sign_and_nothing_else(problem, text):
    """The answer format is ASCII digits and a leading "-" (trailing when reversed); int()'s other spellings
    ("1_0", "+5", "٣") are not answers."""
    stripped = text.strip()
    s = stripped[::-1] if problem.reverse else stripped
    digits = s[1:] if s.startswith("-") else s
    expected = int(s) if digits and all(c in "0123456789" for c in digits) else None
    assert problem.parse(text) == expected
    assert problem.parse(problem.answer) == problem.result and problem.parse(problem.answer + "\n") == problem.result


# -- BPE: the chunks cover the whole text, whatever the pattern ------------------------------------

SPLIT_PATTERNS = [r"\w+", r"\d", r"[aeiou]+", r"\s", r" ?\w+", r"x*", r"\b", r"(?:ab)+", r"$", r".", r"[^\W\d_]+",
                  PATTERN]


@given(pattern=st.sampled_from(SPLIT_PATTERNS), text=st.text(max_size=40) | st.sampled_from(SAMPLES),
       train=st.booleans())
def test_bpe_round_trips_any_text_under_any_pattern(pattern, text, train):
    r"""r"\w+" matches no space or punctuation: the gaps between matches are chunks of their own, so
    decode(encode(text)) == text for every pattern, trained on the text or not."""
    tok = ByteBPE.train(text + " abab aab", 256 + 12, pattern) if train else ByteBPE(pattern=pattern)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_array(text)) == text
    assert len(ids) <= len(text.encode("utf-8", "surrogatepass"))


def test_bpe_with_a_partial_pattern_keeps_what_it_does_not_match():
    tok = ByteBPE(pattern=r"\w+")
    assert tok.decode(tok.encode("Hello, World! 123")) == "Hello, World! 123"


@given(B=st.integers(1, 5), T=st.integers(1, 9), seed=st.integers(0, 999))
def test_prefix_batches_are_next_token_windows_with_the_copied_targets_ignored(B, T, seed):
    """get_prefix_batch: get_batch's windows (the same draws first), prefix lengths in [1, T], and exactly the
    targets before position L_b - 1 set to -100 (ATT.18)."""
    from npformer.data.corpus import get_batch, get_prefix_batch

    ids = np.random.default_rng(seed).integers(0, 50, 40)
    x, y, prefix = get_prefix_batch(ids, B, T, np.random.default_rng(seed))
    x0, y0 = get_batch(ids, B, T, np.random.default_rng(seed))
    assert np.array_equal(x, x0) and prefix.shape == (B,) and prefix.min() >= 1 and prefix.max() <= T
    for b in range(B):
        L = prefix[b]
        assert (y[b, :L - 1] == -100).all() and np.array_equal(y[b, L - 1:], y0[b, L - 1:])
