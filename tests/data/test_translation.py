"""The built-in translation tasks: number words and dates, their splits, vocabulary and batches."""

import datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data.seq2seq_objectives import IGNORE_INDEX, Seq2SeqBatch
from npformer.data.tasks import split_of
from npformer.data.translation import (BOS_ID, CHARS, EOS_ID, FIRST_DATE, LAST_DATE, MAX_NUMBER, PAD_ID, SPLITS,
                                       TranslationPair, TranslationTask, TranslationVocab, _task, format_date,
                                       number_to_words, parse_date, translation_batches, translation_task,
                                       words_to_number)
from tests.badinput import expect_rejected

SEEDS = st.integers(0, 2**32 - 1)


# -- numbers --------------------------------------------------------------------------------------

def independent_words(n):
    """Words of every n in the array ``n`` (0 .. 999 999), built column-wise from digit groups with object arrays."""
    small = np.array(["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                      "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"],
                     dtype=object)
    tens = np.array(["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"],
                    dtype=object)
    empty = np.full(n.shape, "", dtype=object)

    def under_100(r):  # "" for 0
        unit = np.where(r % 10 == 0, empty, "-" + small[r % 10])
        return np.where(r < 20, small[np.minimum(r, 19)], tens[r // 10] + unit)

    def under_1000(x):  # "" for 0
        h, r = x // 100, x % 100
        hundreds = np.where(h > 0, small[h] + " hundred", empty)
        joiner = np.where((h > 0) & (r > 0), " and ", empty)
        return hundreds + joiner + under_100(r)

    high, low = n // 1000, n % 1000
    thousands = np.where(high > 0, under_1000(high) + " thousand", empty)
    joiner = np.where((high > 0) & (low > 0), np.where(low < 100, " and ", " "), empty)
    words = thousands + joiner + under_1000(low)
    return np.where(n == 0, "zero", words)


def test_number_words_equal_an_independent_implementation_for_every_number():
    n = np.arange(MAX_NUMBER + 1)
    want = independent_words(n).tolist()
    got = [number_to_words(i) for i in range(MAX_NUMBER + 1)]
    assert got == want
    assert len(set(got)) == MAX_NUMBER + 1  # a bijection: no two numbers share words
    assert set("".join(got[::997])) <= set(CHARS)


def test_number_words_examples():
    assert number_to_words(0) == "zero"
    assert number_to_words(342) == "three hundred and forty-two"
    assert number_to_words(1005) == "one thousand and five"
    assert number_to_words(12304) == "twelve thousand three hundred and four"
    assert number_to_words(100001) == "one hundred thousand and one"
    assert number_to_words(999999) == "nine hundred and ninety-nine thousand nine hundred and ninety-nine"


def test_words_to_number_inverts_every_number():
    assert all(words_to_number(number_to_words(i)) == i for i in range(MAX_NUMBER + 1))


@pytest.mark.parametrize("text", ["three hundred forty-two", "forty two", "Forty-two", "zero thousand",
                                  "one thousand zero", "one thousand, two", "one thousand two", "twenty-zero",
                                  "one thousand thousand", "", " one", "one hundred and", "thousand",
                                  "one million", "ten hundred", "one thousand and one hundred"])
def test_words_to_number_refuses_other_spellings(text):
    expect_rejected(lambda: words_to_number(text), "words_to_number", "text")


# -- dates ----------------------------------------------------------------------------------------

def test_dates_round_trip_for_every_day():
    d, days = FIRST_DATE, 0
    while d <= LAST_DATE:
        text = format_date(d)
        assert parse_date(text) == d
        day, month, year = text.split(" ")
        assert (int(day), int(year)) == (d.day, d.year) and day == str(d.day) and len(year) == 4
        assert datetime.datetime.strptime(text, "%d %B %Y").date() == d  # the C library reads it back
        d += datetime.timedelta(days=1)
        days += 1
    assert days == 73049  # 200 years, 48 of them leap (2000 is, 1900 is not)


@pytest.mark.parametrize("text", ["07 March 2024", "7 march 2024", "31 February 2024", "7 March 24", "7  March 2024",
                                  "31 December 1899", "1 January 2100", "2024-03-07", "7 Mar 2024", "+7 March 2024"])
def test_parse_date_refuses_other_forms(text):
    expect_rejected(lambda: parse_date(text), "parse_date", "text")


def test_format_date_example_and_refusals():
    assert format_date(datetime.date(2024, 3, 7)) == "7 March 2024"
    expect_rejected(lambda: format_date("2024-03-07"), "format_date", "date")
    expect_rejected(lambda: format_date(datetime.datetime(2024, 3, 7)), "format_date", "date")
    expect_rejected(lambda: format_date(datetime.date(1899, 12, 31)), "format_date", "date")


# -- tasks and splits ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["numbers", "dates"])
def test_splits_are_disjoint_sized_and_decided_by_the_hash(name):
    task = translation_task(name, sizes=(3000, 300, 200))
    assert isinstance(task, TranslationTask)
    keys = {}
    for split, size in zip(SPLITS, (3000, 300, 200)):
        pairs = task.split(split)
        assert len(pairs) == size
        assert all(isinstance(p, TranslationPair) for p in pairs)
        keys[split] = {p.key for p in pairs}
        assert len(keys[split]) == size  # no repeats
        assert all(split_of(p.key) == split for p in pairs)
        assert all(p.key == p.source for p in pairs)
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    for p in task.train[:500]:
        if name == "numbers":
            assert words_to_number(p.source) == int(p.target) and str(int(p.target)) == p.target
        else:
            assert parse_date(p.target) == datetime.date.fromisoformat(p.source)
    # the same rule at any size: a smaller task's pairs are the first of the larger one's
    small = translation_task(name, sizes=(100, 10, 10))
    for split in SPLITS:
        assert small.split(split) == task.split(split)[: len(small.split(split))]


@pytest.mark.parametrize("name", ["numbers", "dates"])
def test_reverse_swaps_source_and_target_and_keeps_the_splits(name):
    forward = translation_task(name, sizes=(500, 50, 50))
    backward = translation_task(name, sizes=(500, 50, 50), reverse=True)
    assert backward.reverse and not forward.reverse
    for split in SPLITS:
        assert [(p.target, p.source, p.key) for p in backward.split(split)] == list(forward.split(split))


def test_tasks_are_deterministic_and_cover_the_small_numbers():
    task = translation_task("numbers")
    assert tuple(len(task.split(s)) for s in SPLITS) == (20_000, 1_000, 1_000)
    fresh = _task.__wrapped__("numbers", (20_000, 1_000, 1_000), False)  # built again, not from the cache
    assert fresh == task
    numbers = {int(p.target) for s in SPLITS for p in task.split(s)}
    assert set(range(1000)) <= numbers
    assert max(numbers) > 100_000


def test_task_sizes_too_large_are_refused():
    expect_rejected(lambda: translation_task("dates", sizes=(0, 0, 20_000)), "translation_task", "sizes")


@pytest.mark.parametrize("kwargs, arg", [(dict(name="words"), "name"), (dict(sizes=(1, 2)), "sizes"),
                                         (dict(sizes=(1, 2, -3)), "sizes"), (dict(sizes="123"), "sizes"),
                                         (dict(reverse=1), "reverse")])
def test_task_bad_arguments(kwargs, arg):
    expect_rejected(lambda: translation_task(**kwargs), "translation_task", arg)


# -- vocabulary --------------------------------------------------------------------------------------

def test_vocabulary_ids():
    vocab = TranslationVocab()
    assert (PAD_ID, EOS_ID, BOS_ID) == (vocab.pad_id, vocab.eos_id, vocab.bos_id) == (0, 1, 2)
    assert vocab.vocab_size == 3 + len(CHARS) and list(CHARS) == sorted(set(CHARS))
    assert vocab.encode(CHARS) == list(range(3, 3 + len(CHARS)))
    assert vocab.decode([BOS_ID, 3 + CHARS.index("4"), 3 + CHARS.index("2"), EOS_ID, 3, PAD_ID]) == "42"
    expect_rejected(lambda: vocab.encode("42!"), "TranslationVocab.encode", "text")
    expect_rejected(lambda: vocab.encode(42), "TranslationVocab.encode", "text")
    expect_rejected(lambda: vocab.decode([vocab.vocab_size]), "TranslationVocab.decode", "ids")


@pytest.mark.parametrize("name", ["numbers", "dates"])
def test_every_pair_round_trips_through_the_vocabulary(name):
    task = translation_task(name)
    vocab = task.vocab
    for split in SPLITS:
        for p in task.split(split):
            assert vocab.decode(vocab.encode(p.source) + [EOS_ID]) == p.source
            assert vocab.decode(vocab.encode(p.target)) == p.target


# -- batches ----------------------------------------------------------------------------------------

@given(st.sampled_from(["numbers", "dates"]), st.booleans(), st.sampled_from([1, 3, 7, 64]),
       st.one_of(st.none(), SEEDS))
def test_batches_decode_back_to_the_pairs(name, reverse, B, seed):
    task = translation_task(name, sizes=(200, 37, 20), reverse=reverse)
    vocab = task.vocab
    rng = None if seed is None else np.random.default_rng(seed)
    batches = list(translation_batches(task, "validation", batch_size=B, rng=rng))
    order = np.arange(37) if seed is None else np.random.default_rng(seed).permutation(37)
    assert [len(b.src_ids) for b in batches] == [min(B, 37 - at) for at in range(0, 37, B)]
    seen = []
    for batch in batches:
        assert isinstance(batch, Seq2SeqBatch)
        src, tgt_in, targets, mask = batch
        assert src.dtype == tgt_in.dtype == targets.dtype == np.int64 and mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, src == PAD_ID)
        np.testing.assert_array_equal(tgt_in[:, 0], BOS_ID)
        np.testing.assert_array_equal(tgt_in[:, 1:], np.where(targets[:, :-1] == IGNORE_INDEX, PAD_ID,
                                                              targets[:, :-1]))
        for b in range(len(src)):
            n_src, n_tgt = int((~mask[b]).sum()), int((targets[b] != IGNORE_INDEX).sum())
            assert src[b, n_src - 1] == EOS_ID and targets[b, n_tgt - 1] == EOS_ID
            assert (targets[b, n_tgt:] == IGNORE_INDEX).all() and not mask[b, :n_src].any()
            seen.append(TranslationPair(vocab.decode(src[b]), vocab.decode(targets[b, :n_tgt]), ""))
        assert src.shape[1] == max(len(p.source) for p in seen[-len(src):]) + 1  # the longest row and its EOS
    want = [task.validation[i] for i in order]
    assert [(p.source, p.target) for p in seen] == [(p.source, p.target) for p in want]


def test_batches_bad_arguments():
    task = translation_task("numbers", sizes=(10, 2, 2))
    expect_rejected(lambda: translation_batches("numbers", "train"), "translation_batches", "task")
    expect_rejected(lambda: translation_batches(task, "dev"), "translation_batches", "split")
    expect_rejected(lambda: translation_batches(task, "train", batch_size=0), "translation_batches", "batch_size")
    expect_rejected(lambda: translation_batches(task, "train", rng=3), "translation_batches", "rng")
    expect_rejected(lambda: number_to_words(MAX_NUMBER + 1), "number_to_words", "n")
    expect_rejected(lambda: number_to_words(3.0), "number_to_words", "n")
    expect_rejected(lambda: words_to_number(b"one"), "words_to_number", "text")
