"""Encoder-decoder objectives: T5 span corruption, BART infilling and permutation, prefix LM, batches.

Exact rules are checked against references written here from the definitions (T5's
``random_spans_noise_mask`` step by step, loops over positions); statistics use fixed seeds
and bounds at p = 0.001 (chi-square) or 5 standard deviations (binomial), so a correct
implementation passes for every seed drawn and a wrong distribution fails.
"""

import math
from collections import Counter
from itertools import permutations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from npformer.data import CharTokenizer, default_corpus
from npformer.data.seq2seq_objectives import (IGNORE_INDEX, OBJECTIVES, Seq2SeqBatch, Seq2SeqSpecials,
                                              infilling_spans, noise_span_counts, random_segmentation,
                                              random_spans_noise_mask, sentence_permutation, seq2seq_batches,
                                              seq2seq_specials_for, span_corruption, span_corruption_lengths,
                                              span_raw_length, text_infilling)
from tests.badinput import NON_ARRAYS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import in_layout, layouts

SEEDS = st.integers(0, 2**32 - 1)
Z = 5.0
# The 0.999 quantile of chi-square with k degrees of freedom (checked against the regularised gamma function).
CHI2_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
             10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697, 16: 39.252, 17: 40.790,
             18: 42.312, 19: 43.820, 20: 45.315}


def chi_square_ok(observed, expected_probs):
    """Pearson's chi-square of counts against probabilities, bins merged from the right until each expects >= 5."""
    observed = np.asarray(observed, dtype=np.float64)
    n = observed.sum()
    expected = np.asarray(expected_probs, dtype=np.float64) * n
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed, expected):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    obs[-1] += o_acc
    exp[-1] += e_acc
    stat = float(np.sum((np.array(obs) - np.array(exp)) ** 2 / np.array(exp)))
    return stat <= CHI2_P001[len(obs) - 1], stat


def binomial_ok(k, n, p):
    return abs(k - n * p) <= Z * np.sqrt(n * p * (1 - p)) + 1e-9


def runs(mask):
    """[(value, length), ...] of the runs of a 1-d bool array."""
    out = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return [tuple(r) for r in out]


# -- T5 span corruption ---------------------------------------------------------------------------

def reference_noise_mask(length, density, mean, rng):
    """T5's random_spans_noise_mask, op by op (pad, cumsum, segment sums, span-start indicator)."""
    orig_length = length
    length = max(length, 2)
    num_noise = min(max(int(round(length * density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean)), 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items, num_segments):
        flags = (np.arange(num_items - 1) < num_segments - 1).astype(np.int64)
        first_in_segment = np.pad(rng.permutation(flags), [[1, 0]])
        segment_id = np.cumsum(first_in_segment)
        lengths = np.zeros(num_segments, dtype=np.int64)
        np.add.at(lengths, segment_id, 1)  # segment_sum of ones
        return lengths

    noise_lengths = segmentation(num_noise, num_spans)
    nonnoise_lengths = segmentation(num_nonnoise, num_spans)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(num_spans * 2)
    span_starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    np.add.at(indicator, span_starts, 1)  # unsorted_segment_sum
    span_num = np.cumsum(indicator)
    return (span_num % 2 == 1)[:orig_length]


DENSITIES = st.sampled_from([0.15, 0.05, 0.3, 0.5])
MEANS = st.sampled_from([3.0, 1.0, 2.0, 2.5, 5.0])


@given(st.integers(0, 300), DENSITIES, MEANS, SEEDS)
def test_noise_mask_is_t5s_random_spans_noise_mask(L, density, mean, seed):
    n = max(L, 2)
    num_noise = min(max(round(n * density), 1), n - 1)
    assume(max(round(num_noise / mean), 1) <= n - num_noise)  # where the reference code can split (see below)
    got = random_spans_noise_mask(L, rng=np.random.default_rng(seed), noise_density=density,
                                  mean_noise_span_length=mean)
    want = reference_noise_mask(L, density, mean, np.random.default_rng(seed))
    assert got.dtype == np.bool_ and got.shape == (L,)
    np.testing.assert_array_equal(got, want)


@given(st.integers(2, 400), DENSITIES, MEANS, SEEDS)
def test_noise_counts_are_exact_and_spans_alternate(L, density, mean, seed):
    mask = random_spans_noise_mask(L, rng=np.random.default_rng(seed), noise_density=density,
                                   mean_noise_span_length=mean)
    num_noise = min(max(round(L * density), 1), L - 1)
    num_spans = min(max(round(num_noise / mean), 1), L - num_noise)  # lowered only where too many to separate
    assert noise_span_counts(L, density, mean) == (num_noise, num_spans)
    assert int(mask.sum()) == num_noise
    r = runs(mask)
    assert [v for v, _ in r] == [False, True] * num_spans  # kept first, noise last, alternating
    assert all(n >= 1 for _, n in r)  # no span is empty
    noise_lengths = [n for v, n in r if v]
    assert np.mean(noise_lengths) == num_noise / num_spans
    if num_spans == round(num_noise / mean):  # neither raised to 1 nor lowered
        assert abs(num_noise / num_spans - mean) <= mean / (2 * num_spans) + 1e-12  # |N/3 - K| <= 1/2


def test_too_many_spans_are_lowered_to_the_kept_tokens():
    """7 tokens at density 0.5 and mean 1: 4 noise tokens in 4 spans would need 4 kept tokens between them."""
    assert noise_span_counts(7, 0.5, 1.0) == (4, 3)
    mask = random_spans_noise_mask(7, rng=np.random.default_rng(0), noise_density=0.5, mean_noise_span_length=1.0)
    assert [v for v, _ in runs(mask)] == [False, True] * 3 and mask.sum() == 4


def test_noise_mask_of_short_sequences():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert random_spans_noise_mask(0, rng=rng).shape == (0,)
        np.testing.assert_array_equal(random_spans_noise_mask(1, rng=rng), [False])  # raised to 2, cut back
        np.testing.assert_array_equal(random_spans_noise_mask(2, rng=rng), [False, True])
    assert noise_span_counts(1) == (0, 0) and noise_span_counts(10) == (2, 1) and noise_span_counts(512) == (77, 26)


def test_random_segmentation_is_uniform_over_compositions():
    """6 items in 3 non-empty parts: C(5, 2) = 10 compositions, each 1/10."""
    rng = np.random.default_rng(1)
    compositions = {c: i for i, c in enumerate(c for c in
                                               ((a, b, 6 - a - b) for a in range(1, 5) for b in range(1, 5))
                                               if c[2] >= 1)}
    assert len(compositions) == 10
    counts = np.zeros(10)
    for _ in range(4000):
        lengths = random_segmentation(6, 3, rng=rng)
        assert lengths.dtype == np.int64 and lengths.sum() == 6 and lengths.min() >= 1
        counts[compositions[tuple(lengths.tolist())]] += 1
    ok, stat = chi_square_ok(counts, np.full(10, 0.1))
    assert ok, stat


def test_span_lengths_follow_the_segmentation_law():
    """T5's setting (L = 512: 77 noise tokens in 26 spans): a span's length l has probability
    C(n - l - 1, k - 2) / C(n - 1, k - 1) (the other k - 1 parts take the other n - l items); the mean is n / k."""
    n, k = noise_span_counts(512)
    law = np.array([math.comb(n - l - 1, k - 2) / math.comb(n - 1, k - 1) for l in range(1, n - k + 2)])
    assert abs(law.sum() - 1) < 1e-12
    rng = np.random.default_rng(2)
    first, all_lengths = np.zeros(law.size), []
    for _ in range(1500):
        lengths = [m for v, m in runs(random_spans_noise_mask(512, rng=rng)) if v]
        assert len(lengths) == k and sum(lengths) == n
        first[lengths[0] - 1] += 1
        all_lengths += lengths
    ok, stat = chi_square_ok(first, law)
    assert ok, stat
    assert np.mean(all_lengths) == n / k  # 2.96...
    pooled = np.bincount(np.array(all_lengths) - 1, minlength=law.size)  # marginally the same law
    assert abs(pooled[0] / len(all_lengths) - law[0]) < 0.02


def reconstruct(inputs, targets, first_sentinel, n_sentinels, eos):
    """Each sentinel of inputs replaced by what follows it in targets (up to the next sentinel or eos)."""
    is_sentinel = lambda t: first_sentinel - n_sentinels < t <= first_sentinel
    spans, current = {}, None
    assert targets[-1] == eos
    for t in targets[:-1].tolist():
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    assert inputs[-1] == eos
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans[t] if is_sentinel(t) else [t])
    return out, spans


@given(st.integers(0, 200), st.sampled_from([0.15, 0.3]), st.sampled_from([3.0, 1.0, 4.0]), SEEDS,
       st.sampled_from([5, 50, 1000]))
def test_span_corruption_interleaves_back_to_the_text(L, density, mean, seed, V):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=L)
    first_sentinel, n_sent, eos = V + 101, 100, V + 1
    inputs, targets = span_corruption(tokens, rng=np.random.default_rng(seed), first_sentinel=first_sentinel,
                                      eos_id=eos, noise_density=density, mean_noise_span_length=mean)
    assert inputs.dtype == targets.dtype == np.int64
    restored, spans = reconstruct(inputs, targets, first_sentinel, n_sent, eos)
    assert restored == tokens.tolist()
    N, K = noise_span_counts(L, density, mean) if L >= 2 else (0, 0)
    assert (len(inputs), len(targets)) == (L - N + K + 1, N + K + 1) == span_corruption_lengths(L, density, mean)
    sentinels = [first_sentinel - k for k in range(K)]
    assert [t for t in inputs.tolist() if t > V + 1] == sentinels  # <extra_id_0>, <extra_id_1>, ... in order
    assert [t for t in targets.tolist() if t > V + 1] == sentinels
    assert all(len(s) >= 1 for s in spans.values())
    mask = random_spans_noise_mask(L, rng=np.random.default_rng(seed), noise_density=density,
                                   mean_noise_span_length=mean)
    np.testing.assert_array_equal(inputs[:-1][~np.isin(inputs[:-1], sentinels)], tokens[~mask])


def test_span_corruption_example():
    """The paper's Figure 2 layout on a fixed draw: 'Thank you <X> me to your party <Y> week .'."""
    tokens = np.arange(10, 30)
    rng = np.random.default_rng(3)
    mask = random_spans_noise_mask(20, rng=np.random.default_rng(3))
    inputs, targets = span_corruption(tokens, rng=rng, first_sentinel=99, eos_id=1, n_sentinels=10)
    want_in, want_tgt, k = [], [], 0
    for t in range(20):
        if mask[t] and (t == 0 or not mask[t - 1]):
            want_in.append(99 - k)
            want_tgt.append(99 - k)
            k += 1
        (want_tgt if mask[t] else want_in).append(int(tokens[t]))
    assert inputs.tolist() == want_in + [1] and targets.tolist() == want_tgt + [1]


@given(st.integers(1, 600), st.sampled_from([0.15, 0.3]), st.sampled_from([3.0, 2.0]))
def test_span_raw_length_is_the_longest_that_fits(n, density, mean):
    L = span_raw_length(n, density, mean)
    assert span_corruption_lengths(L, density, mean)[0] <= n
    assert span_corruption_lengths(L + 1, density, mean)[0] > n
    if n >= 3:
        assert span_corruption_lengths(L, density, mean)[0] == n  # every inputs length >= 3 is reached


# -- BART ---------------------------------------------------------------------------------------

def mask_count(L):
    return (3 * L + 9) // 10  # ceil(0.3 L) in integers


@given(st.integers(0, 300), SEEDS)
def test_infilling_spans_rules(L, seed):
    starts, lengths = infilling_spans(L, rng=np.random.default_rng(seed))
    assert starts.dtype == lengths.dtype == np.int64 and starts.shape == lengths.shape
    assert int(lengths.sum()) == mask_count(L)  # exactly 30 %, rounded up
    assert (lengths >= 0).all()
    if lengths.size:
        assert np.all(np.diff(starts) >= 0) and starts[0] >= 0
        ends = starts + lengths
        assert np.all(ends[:-1] <= starts[1:])  # no overlap
        assert ends[-1] <= L


def reference_infilling_spans(L, rng, ratio=0.3, lam=3.0):
    """The documented draws, step by step: Poisson batches, the cut, the order, the slots."""
    n = mask_count(L)
    if n == 0:
        return [], []
    draws = []
    while sum(draws) < n:
        draws += rng.poisson(lam, size=n).tolist()
    lengths, total = [], 0
    for d in draws:
        if total + d >= n:
            lengths.append(n - total)
            break
        lengths.append(d)
        total += d
    K = len(lengths)
    lengths = [lengths[i] for i in rng.permutation(K)]
    slots = sorted(rng.choice(L - n + K, size=K, replace=False).tolist())
    starts, masked = [], 0
    for k, slot in enumerate(slots):
        starts.append(slot - k + masked)
        masked += lengths[k]
    return starts, lengths


@given(st.integers(0, 300), SEEDS)
def test_infilling_spans_follow_the_documented_draws(L, seed):
    starts, lengths = infilling_spans(L, rng=np.random.default_rng(seed))
    want_starts, want_lengths = reference_infilling_spans(L, np.random.default_rng(seed))
    assert starts.tolist() == want_starts and lengths.tolist() == want_lengths


def test_mask_count_is_the_exact_ceiling():
    """ceil(r L) for the decimal r: 0.28 of 25 tokens is 7, not the 8 that ceil(0.28 * 25) = ceil(7.000000000000001)
    would give, and 0.1 of 10 is 1, not the 2 of the binary 0.1 (a little above 1/10) times 10 exactly."""
    rng = np.random.default_rng(8)
    for hundredths in (30, 10, 20, 28, 7, 14):
        for L in range(0, 301):
            lengths = infilling_spans(L, rng=rng, mask_ratio=hundredths / 100)[1]
            assert int(lengths.sum()) == (hundredths * L + 99) // 100


def test_the_cut_span_goes_anywhere():
    """The spans are in random order: the first and the last span by position are empty equally often
    (without the shuffle the last would be the cut span, never empty)."""
    rng = np.random.default_rng(9)
    first = last = 0
    rows = 4000
    for _ in range(rows):
        lengths = infilling_spans(100, rng=rng)[1]
        first += lengths[0] == 0
        last += lengths[-1] == 0
    assert first > 100 and abs(first - last) <= Z * math.sqrt(2 * first)


def reference_infill(tokens, starts, lengths, mask_id):
    out, t = [], 0
    order = sorted(range(len(starts)), key=lambda i: (starts[i], lengths[i] > 0))
    for i in order:
        s, n = int(starts[i]), int(lengths[i])
        out.extend(tokens[t:s].tolist())
        out.append(mask_id)
        t = s + n
    out.extend(tokens[t:].tolist())
    return out


def is_subsequence(short, long):
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


@given(st.integers(0, 300), SEEDS, st.sampled_from([6, 100]))
def test_text_infilling_replaces_each_span_with_one_mask(L, seed, V):
    tokens = np.random.default_rng(seed ^ 1).integers(0, V, size=L)
    mask_id = V
    out = text_infilling(tokens, rng=np.random.default_rng(seed), mask_id=mask_id)
    starts, lengths = infilling_spans(L, rng=np.random.default_rng(seed))
    assert out.dtype == np.int64
    assert out.tolist() == reference_infill(tokens, starts, lengths, mask_id)
    assert int((out == mask_id).sum()) == lengths.size  # one mask per span, empty spans included
    kept = out[out != mask_id]
    assert kept.size == L - mask_count(L)
    assert is_subsequence(kept.tolist(), tokens.tolist())


def test_infilling_span_lengths_are_poisson():
    """Pooled span lengths against Poisson(3) (only the one cut span per row differs: ~300 spans a row)."""
    rng = np.random.default_rng(4)
    lengths = np.concatenate([infilling_spans(3000, rng=rng)[1] for _ in range(20)])
    top = 10
    counts = np.bincount(np.minimum(lengths, top), minlength=top + 1)
    pmf = np.array([math.exp(-3) * 3**k / math.factorial(k) for k in range(top)])
    ok, stat = chi_square_ok(counts, np.append(pmf, 1 - pmf.sum()))
    assert ok, stat
    assert binomial_ok(int((lengths == 0).sum()), lengths.size, math.exp(-3))  # empty spans: insertions
    assert abs(lengths.mean() - 3.0) <= Z * math.sqrt(3.0 / lengths.size) + 0.01


def test_infilling_places_spans_uniformly():
    """Two spans in 10 tokens (3 masked, L = 10): where the unmasked tokens go is uniform over placements.
    The number of unmasked tokens before the first span is one of 0 .. 7 with weights (8 - j) / 36."""
    rng = np.random.default_rng(5)
    counts = Counter()
    n = 0
    while n < 6000:
        starts, lengths = infilling_spans(10, rng=rng)
        if lengths.size == 2:
            counts[int(starts[0])] += 1
            n += 1
    obs = [counts[j] for j in range(8)]
    ok, stat = chi_square_ok(obs, [(8 - j) / 36 for j in range(8)])
    assert ok, stat


@given(st.integers(0, 60), SEEDS)
def test_sentence_permutation_shuffles_whole_sentences(L, seed):
    rng = np.random.default_rng(seed ^ 7)
    tokens = rng.integers(0, 6, size=L)  # ids 0 and 1 end sentences
    out = sentence_permutation(tokens, rng=np.random.default_rng(seed), sentence_end_ids=[0, 1])

    def sentences(x):
        found, current = [], []
        for t in x.tolist():
            current.append(t)
            if t in (0, 1):
                found.append(tuple(current))
                current = []
        return found + ([tuple(current)] if current else [])

    src = sentences(tokens)
    assert out.dtype == np.int64 and out.shape == (L,)
    order = np.random.default_rng(seed).permutation(len(src)) if L else []
    assert out.tolist() == [t for i in order for t in src[i]]
    assert Counter(out.tolist()) == Counter(tokens.tolist())


def test_sentence_permutation_orders_are_uniform():
    tokens = np.array([5, 9, 7, 9, 6, 6])  # three sentences: "5 .", "7 .", "6 6"
    rng = np.random.default_rng(6)
    names = {tuple(np.concatenate(p).tolist()): i for i, p in enumerate(permutations([[5, 9], [7, 9], [6, 6]]))}
    counts = np.zeros(6)
    for _ in range(3000):
        counts[names[tuple(sentence_permutation(tokens, rng=rng, sentence_end_ids={9}).tolist())]] += 1
    ok, stat = chi_square_ok(counts, np.full(6, 1 / 6))
    assert ok, stat


# -- batches ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_text(default_corpus())


def test_specials_sit_after_the_vocabulary(tokenizer):
    V = tokenizer.vocab_size
    S = seq2seq_specials_for(tokenizer, n_sentinels=3)
    assert S == Seq2SeqSpecials(pad=V, eos=V + 1, bos=V + 2, mask=V + 3, first_sentinel=V + 6, n_sentinels=3,
                                vocab_size=V + 7)
    assert [S.sentinel(k) for k in range(3)] == [V + 6, V + 5, V + 4]  # <extra_id_0> = vocab_size - 1


def find_in(stream, window):
    """Does ``window`` occur in ``stream`` as a contiguous run?"""
    hay, needle = stream.astype(np.int64).tobytes(), np.asarray(window, dtype=np.int64).tobytes()
    at = hay.find(needle)
    while at != -1 and at % 8:
        at = hay.find(needle, at + 1)
    return at != -1


@pytest.mark.parametrize("objective", OBJECTIVES)
@given(seed=SEEDS, B=st.sampled_from([1, 3]), L=st.sampled_from([8, 17, 40]))
@settings(max_examples=5)
def test_batches_have_the_documented_layout(tokenizer, objective, seed, B, L):
    text = default_corpus(1 << 14)
    stream = np.array(tokenizer.encode(text))
    S = seq2seq_specials_for(tokenizer)
    batches = list(seq2seq_batches(tokenizer, objective, rng=np.random.default_rng(seed), batch_size=B,
                                   max_length=L, text=text, n_batches=2))
    again = list(seq2seq_batches(tokenizer, objective, rng=np.random.default_rng(seed), batch_size=B,
                                 max_length=L, text=text, n_batches=2))
    assert len(batches) == 2
    for batch, same in zip(batches, again):
        assert isinstance(batch, Seq2SeqBatch)
        for x, y in zip(batch, same):
            np.testing.assert_array_equal(x, y)  # the same generator state gives the same batches
        src, tgt_in, targets, pad_mask = batch
        assert src.dtype == tgt_in.dtype == targets.dtype == np.int64 and pad_mask.dtype == np.bool_
        assert src.shape == pad_mask.shape == (B, L) and tgt_in.shape == targets.shape
        np.testing.assert_array_equal(pad_mask, src == S.pad)
        start = S.pad if objective == "span" else S.eos
        assert (tgt_in[:, 0] == start).all()
        np.testing.assert_array_equal(tgt_in[:, 1:], np.where(targets[:, :-1] == IGNORE_INDEX, S.pad, targets[:, :-1]))
        assert src.max() < S.vocab_size and targets.max() < S.vocab_size
        for b in range(B):
            row = src[b][~pad_mask[b]]
            if objective == "span":
                assert (targets[b] != IGNORE_INDEX).all()  # a fixed length: no padding in the targets
                restored, _ = reconstruct(row, targets[b], S.first_sentinel, S.n_sentinels, S.eos)
                assert len(restored) == span_raw_length(L)
                assert find_in(stream, restored)
            else:
                assert targets.shape[1] == L and targets[b, 0] == S.bos and targets[b, -1] == S.eos
                window = targets[b, 1:-1]
                assert find_in(stream, window)
                assert row[0] == S.bos and row[-1] == S.eos
                content = row[1:-1]
                if objective == "permute":
                    assert sorted(content.tolist()) == sorted(window.tolist())
                if objective == "infill":
                    assert is_subsequence(content[content != S.mask].tolist(), window.tolist())
                    assert (content != S.mask).sum() == len(window) - mask_count(len(window))
                if objective == "permute+infill":
                    assert (content != S.mask).sum() == len(window) - mask_count(len(window))


class ShiftedTokenizer:
    """Text ids from 5 on, leaving 0 .. 4 to special ids (pad 0, eos 1, as T5's vocabulary has them)."""

    def __init__(self, inner):
        self.inner = inner
        self.vocab_size = inner.vocab_size + 5

    def encode(self, text):
        return [i + 5 for i in self.inner.encode(text)]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batches_with_the_tokenizers_own_special_ids(tokenizer, objective):
    shifted = ShiftedTokenizer(tokenizer)
    top = shifted.vocab_size + 9
    S = Seq2SeqSpecials(pad=0, eos=1, bos=2, mask=3, first_sentinel=top, n_sentinels=10, vocab_size=top + 1)
    text = default_corpus(1 << 13)
    batch = next(seq2seq_batches(shifted, objective, rng=np.random.default_rng(0), batch_size=4, max_length=40,
                                 specials=S, text=text))
    stream = np.array(shifted.encode(text))
    np.testing.assert_array_equal(batch.src_padding_mask, batch.src_ids == 0)
    assert (batch.tgt_in[:, 0] == (0 if objective == "span" else 1)).all()
    for b in range(4):
        if objective == "span":
            restored, _ = reconstruct(batch.src_ids[b], batch.targets[b], top, 10, 1)
            assert find_in(stream, restored)
        else:
            assert find_in(stream, batch.targets[b, 1:-1])


# -- layouts and bad input ------------------------------------------------------------------------------

TOKEN_FUNCTIONS = {
    "span_corruption": lambda x, rng: span_corruption(x, rng=rng, first_sentinel=999, eos_id=1),
    "text_infilling": lambda x, rng: text_infilling(x, rng=rng, mask_id=999),
    "sentence_permutation": lambda x, rng: sentence_permutation(x, rng=rng, sentence_end_ids=[3]),
}


@pytest.mark.parametrize("func", sorted(TOKEN_FUNCTIONS))
@given(layout=layouts(), L=st.integers(0, 40), seed=SEEDS, dtype=st.sampled_from([np.int64, np.int32, np.uint8]))
def test_token_functions_read_any_layout_and_integer_dtype(func, layout, L, seed, dtype):
    tokens = np.random.default_rng(seed).integers(0, 50, size=L).astype(dtype)
    view = in_layout(tokens, layout)
    got = TOKEN_FUNCTIONS[func](view, np.random.default_rng(seed))
    want = TOKEN_FUNCTIONS[func](tokens.astype(np.int64).tolist(), np.random.default_rng(seed))
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(view, tokens)  # the input is not changed


@pytest.mark.parametrize("func", sorted(TOKEN_FUNCTIONS))
@pytest.mark.parametrize("kind", [k for k in NON_ARRAYS if k not in ("list", "tuple")] + list(SUBCLASS_KINDS) +
                         ["float64", "float16", "bool", "complex128", "object", "rank+1"])
def test_token_functions_refuse_bad_tokens(func, kind):
    bad = corrupt(np.arange(1, 9), kind)
    expect_rejected(lambda: TOKEN_FUNCTIONS[func](bad, np.random.default_rng(0)), func, "tokens")



def test_bad_input_is_refused_by_name(tokenizer):
    rng = np.random.default_rng(0)
    toks = np.arange(10)
    cases = [
        (lambda: random_spans_noise_mask(10, rng=0), "random_spans_noise_mask", "rng"),
        (lambda: random_spans_noise_mask(-1, rng=rng), "random_spans_noise_mask", "length"),
        (lambda: random_spans_noise_mask(10, rng=rng, noise_density=0.0), "random_spans_noise_mask", "noise_density"),
        (lambda: random_spans_noise_mask(10, rng=rng, noise_density=float("nan")), "random_spans_noise_mask",
         "noise_density"),
        (lambda: random_spans_noise_mask(10, rng=rng, mean_noise_span_length=0.5), "random_spans_noise_mask",
         "mean_noise_span_length"),
        (lambda: random_segmentation(3, 4, rng=rng), "random_segmentation", "n_segments"),
        (lambda: random_segmentation(0, 1, rng=rng), "random_segmentation", "n_items"),
        (lambda: span_corruption(toks.reshape(2, 5), rng=rng, first_sentinel=99, eos_id=1), "span_corruption",
         "tokens"),
        (lambda: span_corruption(toks.astype(float), rng=rng, first_sentinel=99, eos_id=1), "span_corruption",
         "tokens"),
        (lambda: span_corruption([1, 2.5], rng=rng, first_sentinel=99, eos_id=1), "span_corruption", "tokens"),
        (lambda: span_corruption(toks, rng=rng, first_sentinel=9, eos_id=1), "span_corruption", "first_sentinel"),
        (lambda: span_corruption(toks, rng=rng, first_sentinel=105, eos_id=1), "span_corruption", "tokens"),
        (lambda: span_corruption(toks, rng=rng, first_sentinel=200, eos_id=150, n_sentinels=100),
         "span_corruption", "eos_id"),
        (lambda: span_corruption(np.arange(200), rng=rng, first_sentinel=999, eos_id=1, n_sentinels=3),
         "span_corruption", "n_sentinels"),
        (lambda: span_corruption(toks, rng=rng, first_sentinel=99, eos_id=True), "span_corruption", "eos_id"),
        (lambda: infilling_spans(10, rng=rng, mask_ratio=1.0), "infilling_spans", "mask_ratio"),
        (lambda: infilling_spans(10, rng=rng, poisson_lambda=0.0), "infilling_spans", "poisson_lambda"),
        (lambda: text_infilling(toks, rng=rng, mask_id=3), "text_infilling", "tokens"),
        (lambda: text_infilling(toks, rng=rng, mask_id=-1), "text_infilling", "mask_id"),
        (lambda: text_infilling("abc", rng=rng, mask_id=99), "text_infilling", "tokens"),
        (lambda: sentence_permutation(toks, rng=rng, sentence_end_ids=3), "sentence_permutation",
         "sentence_end_ids"),
        (lambda: sentence_permutation(toks, rng=rng, sentence_end_ids=[-1]), "sentence_permutation",
         "sentence_end_ids"),
        (lambda: seq2seq_batches(tokenizer, "mlm", rng=rng), "seq2seq_batches", "objective"),
        (lambda: seq2seq_batches("abc", "span", rng=rng), "seq2seq_batches", "tokenizer"),
        (lambda: seq2seq_batches(tokenizer, "span", rng=rng, max_length=3), "seq2seq_batches", "max_length"),
        (lambda: seq2seq_batches(tokenizer, "span", rng=rng, text="abc", max_length=64), "seq2seq_batches",
         "max_length"),
        (lambda: seq2seq_batches(tokenizer, "span", rng=rng, specials=(1, 2)), "seq2seq_batches", "specials"),
        (lambda: seq2seq_batches(tokenizer, "span", rng=rng, max_length=512,
                                 specials=seq2seq_specials_for(tokenizer, n_sentinels=2)), "seq2seq_batches",
         "specials"),
        (lambda: seq2seq_batches(tokenizer, "infill", rng=rng, batch_size=0), "seq2seq_batches", "batch_size"),
        (lambda: seq2seq_batches(tokenizer, "infill", rng=rng, specials=seq2seq_specials_for(tokenizer)._replace(
            pad=3)), "seq2seq_batches", "specials"),
        (lambda: seq2seq_batches(tokenizer, "infill", rng=rng, specials=seq2seq_specials_for(tokenizer)._replace(
            eos=seq2seq_specials_for(tokenizer).first_sentinel)), "seq2seq_batches", "specials"),
        (lambda: seq2seq_specials_for(tokenizer, n_sentinels=-1), "seq2seq_specials_for", "n_sentinels"),
    ]
    for call, func, arg in cases:
        message = expect_rejected(call, func, arg)
        assert "expected" in message, message
