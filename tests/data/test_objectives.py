"""Pre-training objectives as data transforms: masked LM, whole-word masking, NSP/SOP pairs, ELECTRA's labels.

Statistics use fixed seeds and bounds several standard deviations wide (binomial bounds,
chi-square at p = 0.001), so a correct implementation passes for every seed drawn and a
wrong rate (0.15 against 0.10, or 80/10/10 against 90/10/0) fails.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.data import CharTokenizer, default_corpus
from npformer.data.objectives import (IGNORE_INDEX, OBJECTIVES, PairBatch, SpecialIds, mask_tokens,
                                      pretraining_batches, replaced_token_labels, sentence_pairs, special_ids_for,
                                      word_starts_for)
from npformer.nn.lm import IGNORE_INDEX as LM_IGNORE_INDEX
from tests.badinput import expect_rejected
from tests.strategies import SIDES, in_layout, layouts

SEEDS = st.integers(0, 2**32 - 1)
CHI2_2DOF_P001 = 13.816  # the 0.999 quantile of chi-square with 2 degrees of freedom
Z = 5.0  # standard deviations allowed for a binomial count


def binomial_ok(k, n, p):
    """k successes in n trials is within Z standard deviations of Binomial(n, p)'s mean."""
    return abs(k - n * p) <= Z * np.sqrt(n * p * (1 - p)) + 1e-9


def reserved_of(mask_id, special_ids, pad_id):
    return set(special_ids) | {mask_id} | ({pad_id} if pad_id is not None else set())


def words_of(ids, word_starts, reserved):
    """Python-loop reference: a list per row of words, each a list of positions."""
    rows = []
    for b in range(ids.shape[0]):
        words, current = [], None
        for t in range(ids.shape[1]):
            if int(ids[b, t]) in reserved:
                current = None
                continue
            if current is None or word_starts[b, t]:
                current = []
                words.append(current)
            current.append(t)
        rows.append(words)
    return rows


@st.composite
def masking_cases(draw, whole_words=False):
    B, T = draw(SIDES), draw(st.sampled_from([1, 2, 5, 8, 13, 33]))
    V = draw(st.sampled_from([6, 7, 30, 1000]))
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    n_special = draw(st.integers(0, 3))
    special = tuple(int(v) for v in rng.choice(V, size=n_special, replace=False))
    mask_id = draw(st.integers(0, V - 1))
    pad_id = draw(st.one_of(st.none(), st.integers(0, V - 1)))
    ids = rng.integers(0, V, size=(B, T))
    if pad_id is not None:  # right padding on some rows
        lengths = rng.integers(0, T + 1, size=B)
        ids[np.arange(T) >= lengths[:, None]] = pad_id
    kwargs = dict(vocab_size=V, mask_id=mask_id, special_ids=special, pad_id=pad_id,
                  mask_prob=draw(st.sampled_from([0.0, 0.15, 0.5, 1.0])),
                  replace_probs=draw(st.sampled_from([(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                                      (0.0, 0.0, 1.0), (0.5, 0.25, 0.25)])))
    if whole_words:
        kwargs["word_starts"] = rng.random((B, T)) < 0.4
    return ids, kwargs, draw(SEEDS)


# -- mask_tokens: rules, exactly ----------------------------------------------------------------

def reference_mask_tokens(ids, *, rng, vocab_size, mask_id, special_ids, mask_prob, replace_probs,
                          pad_id=None, word_starts=None):
    """The documented rules and draw order, written with loops."""
    B, T = ids.shape
    reserved = reserved_of(mask_id, special_ids, pad_id)
    draw = rng.random((B, T)) < mask_prob
    chosen = np.zeros((B, T), dtype=bool)
    if word_starts is None:
        for b in range(B):
            for t in range(T):
                chosen[b, t] = int(ids[b, t]) not in reserved and draw[b, t]
    else:
        for b, words in enumerate(words_of(ids, word_starts, reserved)):
            for word in words:
                chosen[b, word] = draw[b, word[0]]
    u = rng.random((B, T))
    allowed = [v for v in range(vocab_size) if v not in reserved]
    picks = rng.integers(0, len(allowed), size=(B, T)) if allowed else None
    inputs, labels = ids.astype(np.int64).copy(), np.full((B, T), -100, dtype=np.int64)
    p0, p1, _ = replace_probs
    for b in range(B):
        for t in range(T):
            if chosen[b, t]:
                labels[b, t] = ids[b, t]
                if u[b, t] < p0:
                    inputs[b, t] = mask_id
                elif u[b, t] < p0 + p1:
                    inputs[b, t] = allowed[picks[b, t]]
    return inputs, labels


@given(masking_cases(), layouts())
def test_mask_tokens_follows_the_documented_rules(case, layout):
    ids, kwargs, seed = case
    view = in_layout(ids, layout)
    inputs, labels = mask_tokens(view, rng=np.random.default_rng(seed), **kwargs)
    want_inputs, want_labels = reference_mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(view, ids)  # the input is not changed
    assert inputs.dtype == labels.dtype == np.int64


@given(masking_cases(whole_words=True))
def test_whole_word_masking_follows_the_documented_rules(case):
    ids, kwargs, seed = case
    inputs, labels = mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    want_inputs, want_labels = reference_mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    np.testing.assert_array_equal(inputs, want_inputs)
    np.testing.assert_array_equal(labels, want_labels)


@given(st.one_of(masking_cases(), masking_cases(whole_words=True)))
def test_labels_exactly_at_chosen_positions_and_specials_never_touched(case):
    ids, kwargs, seed = case
    inputs, labels = mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    reserved = np.array(sorted(reserved_of(kwargs["mask_id"], kwargs["special_ids"], kwargs["pad_id"])))
    chosen = labels != IGNORE_INDEX
    assert IGNORE_INDEX == LM_IGNORE_INDEX == -100
    np.testing.assert_array_equal(labels[chosen], ids[chosen])  # the original id where chosen
    assert not chosen[np.isin(ids, reserved)].any()  # specials, the mask and pads are never chosen
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    changed = chosen & (inputs != ids) & (inputs != kwargs["mask_id"])  # random replacements
    assert not np.isin(inputs[changed], reserved).any()
    p0, p1, p2 = kwargs["replace_probs"]
    if p0 == 0:
        assert not (inputs[chosen] == kwargs["mask_id"]).any()
    if p1 == 0 and p2 == 0:
        assert (inputs[chosen] == kwargs["mask_id"]).all()
    if p2 == 1:
        np.testing.assert_array_equal(inputs, ids)
    if kwargs["mask_prob"] == 0:
        assert not chosen.any()
    if kwargs["mask_prob"] == 1:
        np.testing.assert_array_equal(chosen, ~np.isin(ids, reserved))


@given(masking_cases(whole_words=True))
def test_whole_words_are_all_or_nothing(case):
    ids, kwargs, seed = case
    _, labels = mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    chosen = labels != IGNORE_INDEX
    reserved = reserved_of(kwargs["mask_id"], kwargs["special_ids"], kwargs["pad_id"])
    n_words = 0
    for b, words in enumerate(words_of(ids, kwargs["word_starts"], reserved)):
        for word in words:
            assert chosen[b, word].all() or not chosen[b, word].any(), (b, word, chosen[b])
            n_words += 1
    assert chosen.sum() <= sum(len(w) for row in words_of(ids, kwargs["word_starts"], reserved) for w in row)


def test_whole_word_example():
    # [CLS]=0 un ##believ ##able [SEP]=1 the ##m [PAD]=2; mask_prob=1 takes every word
    ids = np.array([[0, 10, 11, 12, 1, 13, 14, 2]])
    starts = np.array([[True, True, False, False, True, True, False, True]])
    inputs, labels = mask_tokens(ids, rng=np.random.default_rng(0), vocab_size=20, mask_id=3, special_ids=(0, 1),
                                 pad_id=2, mask_prob=1.0, replace_probs=(1.0, 0.0, 0.0), word_starts=starts)
    np.testing.assert_array_equal(inputs, [[0, 3, 3, 3, 1, 3, 3, 2]])
    np.testing.assert_array_equal(labels, [[-100, 10, 11, 12, -100, 13, 14, -100]])
    # a word without a start after a special still begins there
    starts = np.zeros((1, 8), dtype=bool)
    rows = words_of(ids, starts, {0, 1, 2, 3})
    assert rows == [[[1, 2, 3], [5, 6]]]


# -- mask_tokens: statistics -----------------------------------------------------------------

@settings(max_examples=6)
@given(st.sampled_from([0.05, 0.15, 0.4]), SEEDS)
def test_mask_rate_is_binomial(mask_prob, seed):
    rng = np.random.default_rng(seed)
    V, specials, pad = 500, (0, 1, 2), 3
    ids = rng.integers(0, V, size=(200, 128))
    ids[:, 100:] = pad
    _, labels = mask_tokens(ids, rng=rng, vocab_size=V, mask_id=2, special_ids=specials, pad_id=pad,
                            mask_prob=mask_prob)
    n = int((~np.isin(ids, [0, 1, 2, 3])).sum())
    k = int((labels != IGNORE_INDEX).sum())
    assert binomial_ok(k, n, mask_prob), (k, n, mask_prob)
    assert not binomial_ok(k, n, mask_prob * 2 / 3) and not binomial_ok(k, n, mask_prob * 4 / 3)
    # a Bernoulli per position: the count per row varies as a binomial does (an exact count would not)
    per_row = (labels != IGNORE_INDEX).sum(axis=1)
    n_row = (~np.isin(ids, [0, 1, 2, 3])).sum(axis=1)
    variance = np.mean(n_row * mask_prob * (1 - mask_prob))
    assert 0.6 * variance < per_row.var() < 1.5 * variance


@settings(max_examples=6)
@given(st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.3, 0.2), (0.6, 0.4, 0.0)]), SEEDS, st.booleans())
def test_replacement_split_chi_square(replace_probs, seed, whole_words):
    rng = np.random.default_rng(seed)
    V = 50  # small, so a random replacement equal to the original happens and must be counted as kept
    specials = (0, 1, 2)
    ids = rng.integers(3, V, size=(100, 200))
    word_starts = rng.random(ids.shape) < 0.5 if whole_words else None
    inputs, labels = mask_tokens(ids, rng=rng, vocab_size=V, mask_id=2, special_ids=specials, mask_prob=0.3,
                                 replace_probs=replace_probs, word_starts=word_starts)
    chosen = labels != IGNORE_INDEX
    k = int(chosen.sum())
    masked = int((inputs[chosen] == 2).sum())
    random = int(((inputs != ids) & chosen & (inputs != 2)).sum())
    kept = k - masked - random
    p0, p1, p2 = replace_probs
    same = 1 / (V - len(specials))  # a random token equal to the original looks kept
    expected = np.array([p0, p1 * (1 - same), p2 + p1 * same]) * k
    observed = np.array([masked, random, kept])
    live = expected > 0
    assert (observed[~live] == 0).all()
    chi2 = float((((observed - expected) ** 2)[live] / expected[live]).sum())
    assert chi2 < CHI2_2DOF_P001, (observed, expected, chi2)
    # a split of 90/10/0 is rejected by the same statistic
    wrong = np.array([0.9, 0.1 * (1 - same), 0.1 * same]) * k
    assert float(((observed - wrong) ** 2 / wrong).sum()) > CHI2_2DOF_P001


def test_random_replacements_are_uniform_over_non_special_ids():
    rng = np.random.default_rng(7)
    V, specials = 12, (0, 5, 11)
    ids = rng.choice([1, 2], size=(400, 300))
    inputs, labels = mask_tokens(ids, rng=rng, vocab_size=V, mask_id=5, special_ids=specials, mask_prob=1.0,
                                 replace_probs=(0.0, 1.0, 0.0))
    counts = np.bincount(inputs.ravel(), minlength=V)
    assert (counts[list(specials)] == 0).all()
    allowed = counts[[v for v in range(V) if v not in specials]]
    expected = ids.size / allowed.size
    chi2 = float(((allowed - expected) ** 2 / expected).sum())
    assert chi2 < 27.88  # chi-square, 8 degrees of freedom, p = 0.001


@settings(max_examples=5)
@given(SEEDS)
def test_whole_word_rate_is_per_word(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, size=(100, 120))
    word_starts = rng.random(ids.shape) < 0.3  # words of about 3 sub-tokens
    _, labels = mask_tokens(ids, rng=rng, vocab_size=100, mask_id=2, special_ids=(0, 1), mask_prob=0.15,
                            word_starts=word_starts)
    chosen = labels != IGNORE_INDEX
    words = [(b, w) for b, row in enumerate(words_of(ids, word_starts, {0, 1, 2})) for w in row]
    k = sum(bool(chosen[b, w[0]]) for b, w in words)
    assert binomial_ok(k, len(words), 0.15)


@given(masking_cases(whole_words=True))
def test_mask_tokens_reproducible_from_the_seed(case):
    ids, kwargs, seed = case
    first = mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    second = mask_tokens(ids, rng=np.random.default_rng(seed), **kwargs)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_mask_tokens_draws_do_not_depend_on_values():
    a = np.random.default_rng(3)
    b = np.random.default_rng(3)
    mask_tokens(np.zeros((4, 9), dtype=np.int64), rng=a, vocab_size=10, mask_id=1, special_ids=(0,))
    mask_tokens(np.full((4, 9), 7), rng=b, vocab_size=10, mask_id=1, special_ids=(0,))
    assert a.random() == b.random()


# -- sentence pairs ---------------------------------------------------------------------------

@st.composite
def pair_cases(draw):
    rng = np.random.default_rng(draw(SEEDS))
    n_docs = draw(st.integers(1, 5))
    sizes = [draw(st.integers(1, 6)) for _ in range(n_docs)]
    if sum(sizes) < 3 or max(sizes) < 2:
        sizes = sizes + [3]
    lengths = rng.integers(1, draw(st.sampled_from([3, 12, 40])), size=sum(sizes))
    start = 10
    segments = []
    for n in lengths:  # distinct ids everywhere, so a packed slice tells where it came from
        segments.append(list(range(start, start + int(n))))
        start += int(n)
    doc_ids = np.repeat(np.arange(len(sizes)), sizes)
    use_docs = draw(st.booleans()) and len(sizes) >= 2
    kind = draw(st.sampled_from(["nsp", "sop"]))
    return dict(segments=segments, kind=kind, max_length=draw(st.sampled_from([5, 6, 9, 16, 64])),
                cls_id=1, sep_id=2, pad_id=0, doc_ids=doc_ids if use_docs else None,
                n_pairs=draw(st.one_of(st.none(), st.integers(1, 30)))), draw(SEEDS)


def bert_trim_lengths(la, lb, budget):
    """BERT's loop: trim the longer side (B on a tie) until the two fit."""
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


@given(pair_cases())
def test_pair_packing_layout_exact(case):
    kwargs, seed = case
    out = sentence_pairs(rng=np.random.default_rng(seed), **kwargs)
    assert isinstance(out, PairBatch)
    segs, L = kwargs["segments"], kwargs["max_length"]
    P = out.labels.size
    assert out.input_ids.shape == out.token_type_ids.shape == out.attention_mask.shape == (P, L)
    assert out.sources.shape == (P, 2)
    for p in range(P):
        a_src, b_src = (segs[i] for i in out.sources[p])
        row = out.input_ids[p].tolist()
        n = int(out.attention_mask[p].sum())
        np.testing.assert_array_equal(out.attention_mask[p], np.arange(L) < n)
        assert n <= L and row[n:] == [0] * (L - n)
        assert row[0] == 1 and row[n - 1] == 2 and row[1:n - 1].count(2) == 1
        sep = row.index(2)
        a, b = row[1:sep], row[sep + 1:n - 1]
        assert (len(a), len(b)) == bert_trim_lengths(len(a_src), len(b_src), L - 3)
        assert len(a) >= 1 and len(b) >= 1
        # each side is a contiguous piece of its segment
        for piece, src in ((a, a_src), (b, b_src)):
            at = src.index(piece[0])
            assert src[at: at + len(piece)] == piece
        np.testing.assert_array_equal(out.token_type_ids[p], (np.arange(L) > sep) & (np.arange(L) < n))


@given(pair_cases())
def test_pair_labels_match_the_construction(case):
    kwargs, seed = case
    out = sentence_pairs(rng=np.random.default_rng(seed), **kwargs)
    docs = kwargs["doc_ids"]
    a, b = out.sources[:, 0], out.sources[:, 1]
    assert set(out.labels.tolist()) <= {0, 1}
    if kwargs["kind"] == "nsp":
        np.testing.assert_array_equal(out.labels == 0, b == a + 1)
        rand = out.labels == 1
        if docs is None:
            assert not np.isin(b[rand] - a[rand], [0, 1]).any()
        else:
            assert (docs[b[rand]] != docs[a[rand]]).all()
            assert (docs[b[~rand]] == docs[a[~rand]]).all()
    else:
        np.testing.assert_array_equal(out.labels == 0, b == a + 1)
        np.testing.assert_array_equal(out.labels == 1, a == b + 1)
        if docs is not None:
            assert (docs[a] == docs[b]).all()
    again = sentence_pairs(rng=np.random.default_rng(seed), **kwargs)
    for x, y in zip(out, again):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_pair_labels_are_half_and_half(kind):
    segments = [[i + 3] * (1 + i % 7) for i in range(60)]
    docs = np.repeat(np.arange(6), 10)
    out = sentence_pairs(segments, rng=np.random.default_rng(11), kind=kind, max_length=8, cls_id=0, sep_id=1,
                         pad_id=2, doc_ids=docs, n_pairs=4000)
    assert binomial_ok(int(out.labels.sum()), 4000, 0.5)
    if kind == "nsp":  # random partners spread over the other documents
        rand = out.labels == 1
        counts = np.bincount(docs[out.sources[rand, 1]], minlength=6)
        assert (counts > 0.5 * rand.sum() / 6).all()


def test_truncation_trims_front_and_back_at_random():
    segments = [list(range(100, 200)), list(range(200, 300)), list(range(300, 400))]
    out = sentence_pairs(segments, rng=np.random.default_rng(5), kind="sop", max_length=23, cls_id=0, sep_id=1,
                         pad_id=2, n_pairs=2000)
    # 200 tokens into 20: each side loses 90; the first kept id says how many went from the front
    fronts_a = np.array([row[1] - segments[src[0]][0] for row, src in zip(out.input_ids, out.sources)])
    fronts_b = np.array([row[12] - segments[src[1]][0] for row, src in zip(out.input_ids, out.sources)])
    for fronts in (fronts_a, fronts_b):
        assert binomial_ok(int(fronts.sum()), 2000 * 90, 0.5)
        assert fronts.min() >= 0 and fronts.max() <= 90
        # each lost token goes from the front or the back independently: Binomial(90, 1/2) per pair
        assert 0.8 * 22.5 < fronts.var() < 1.25 * 22.5
    assert np.corrcoef(fronts_a, fronts_b)[0, 1] < 0.1


def test_pair_example():
    segs = [[10, 11, 12], [20, 21], [30]]
    out = sentence_pairs(segs, rng=np.random.default_rng(0), kind="sop", max_length=9, cls_id=1, sep_id=2, pad_id=0)
    for p, (a, b) in enumerate(out.sources):
        assert a in (p, p + 1) and b in (p, p + 1)
        A, B = segs[a], segs[b]
        want = [1] + A + [2] + B + [2]
        assert out.input_ids[p].tolist() == want + [0] * (9 - len(want))
        assert out.token_type_ids[p].tolist() == [0] * (len(A) + 2) + [1] * (len(B) + 1) + [0] * (9 - len(want))


# -- ELECTRA's replaced-token detection ------------------------------------------------------------

@given(SIDES, SIDES, SEEDS, st.booleans())
def test_replaced_token_labels_by_definition(B, T, seed, flat):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 4, size=(B, T))  # few ids: samples often equal the original
    mask = rng.random((B, T)) < 0.5
    samples = rng.integers(0, 4, size=(B, T))
    given_samples = samples[mask] if flat else samples
    disc, labels = replaced_token_labels(inputs, given_samples, mask)
    for b in range(B):
        for t in range(T):
            want = samples[b, t] if mask[b, t] else inputs[b, t]
            assert disc[b, t] == want
            assert labels[b, t] == int(want != inputs[b, t])
    assert disc.dtype == labels.dtype == np.int64


def test_replaced_token_sample_equal_to_original_is_original():
    inputs = np.array([[5, 6, 7]])
    disc, labels = replaced_token_labels(inputs, np.array([[5, 9, 0]]), np.array([[True, True, False]]))
    assert disc.tolist() == [[5, 9, 7]] and labels.tolist() == [[0, 1, 0]]


# -- batches from the corpus ---------------------------------------------------------------------

TEXT = default_corpus(1 << 14)
CHAR = CharTokenizer.from_text(TEXT)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pretraining_batches_for_each_objective(objective):
    specials = special_ids_for(CHAR)
    assert specials == SpecialIds(CHAR.vocab_size, CHAR.vocab_size + 1, CHAR.vocab_size + 2,
                                  CHAR.vocab_size + 3, CHAR.vocab_size + 4)
    batches = list(pretraining_batches(CHAR, objective, rng=np.random.default_rng(1), batch_size=6, max_length=24,
                                       text=TEXT, n_batches=3))
    again = list(pretraining_batches(CHAR, objective, rng=np.random.default_rng(1), batch_size=6, max_length=24,
                                     text=TEXT, n_batches=3))
    assert len(batches) == 3
    label_name = {"nsp": "next_sentence_label", "sop": "sentence_order_label"}.get(objective)
    for batch, same in zip(batches, again):
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"} | (
            {label_name} if label_name else set())
        for key, value in batch.items():
            assert value.dtype == np.int64
            assert value.shape == ((6,) if key == label_name else (6, 24))
            np.testing.assert_array_equal(value, same[key])
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.min() >= 0 and ids.max() < specials.vocab_size
        assert (ids[:, 0] == specials.cls).all()
        chosen = labels != IGNORE_INDEX
        assert (labels[chosen] < CHAR.vocab_size).all()  # never a special
        assert chosen.any() or objective in ("nsp", "sop")
        n = batch["attention_mask"].sum(axis=1)
        assert (ids[np.arange(6), n - 1] == specials.sep).all() or chosen[np.arange(6), n - 1].any()
        if label_name:
            assert set(batch[label_name].tolist()) <= {0, 1}


def test_special_ids_from_the_tokenizer():
    class WithSpecials:
        vocab_size = 30
        cls_token_id, sep_token_id, mask_token_id, pad_token_id = 2, 3, 4, 0

        def encode(self, text):
            return [5] * len(text)

    assert special_ids_for(WithSpecials()) == SpecialIds(2, 3, 4, 0, 30)


def test_word_starts_for_char_tokenizer():
    tok = CharTokenizer.from_text("ab cd.")
    starts = word_starts_for(tok, tok.encode("ab cd."))
    assert starts.tolist() == [True, False, True, True, False, False]


# -- bad input ---------------------------------------------------------------------------------

IDS = np.array([[4, 5, 6], [7, 8, 0]])
MASK_OK = dict(rng=np.random.default_rng(0), vocab_size=10, mask_id=1, special_ids=(0, 2))

MASK_BAD = [
    ("ids", dict(ids=IDS.tolist())), ("ids", dict(ids=IDS.astype(float))), ("ids", dict(ids=IDS[0])),
    ("ids", dict(ids=IDS + 10)), ("ids", dict(ids=IDS - 5)),
    ("rng", dict(rng=0)), ("rng", dict(rng=np.random.RandomState(0))),
    ("vocab_size", dict(vocab_size=0)), ("vocab_size", dict(vocab_size=10.0)), ("vocab_size", dict(vocab_size=True)),
    ("mask_id", dict(mask_id=10)), ("mask_id", dict(mask_id=-1)), ("mask_id", dict(mask_id=None)),
    ("special_ids", dict(special_ids=0)), ("special_ids", dict(special_ids=(11,))),
    ("special_ids", dict(special_ids="ab")), ("special_ids", dict(special_ids=(1.0,))),
    ("mask_prob", dict(mask_prob=1.5)), ("mask_prob", dict(mask_prob=-0.1)), ("mask_prob", dict(mask_prob=np.nan)),
    ("mask_prob", dict(mask_prob="0.15")),
    ("replace_probs", dict(replace_probs=(0.8, 0.1))), ("replace_probs", dict(replace_probs=(0.8, 0.1, 0.2))),
    ("replace_probs", dict(replace_probs=(1.2, -0.1, -0.1))), ("replace_probs", dict(replace_probs=0.8)),
    ("word_starts", dict(word_starts=np.ones((2, 3), dtype=np.int64))),
    ("word_starts", dict(word_starts=np.ones((2, 4), dtype=bool))), ("word_starts", dict(word_starts=[[True]])),
    ("pad_id", dict(pad_id=10)), ("pad_id", dict(pad_id=1.0)),
]


@pytest.mark.parametrize("arg,change", MASK_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(MASK_BAD)])
def test_mask_tokens_bad_input(arg, change):
    kwargs = dict(MASK_OK, ids=IDS)
    kwargs.update(change)
    expect_rejected(lambda: mask_tokens(**kwargs), "mask_tokens", arg)


SEGS = [[3, 4], [5], [6, 7, 8], [9]]
PAIR_OK = dict(segments=SEGS, rng=np.random.default_rng(0), kind="nsp", max_length=8, cls_id=0, sep_id=1, pad_id=2)
PAIR_BAD = [
    ("segments", dict(segments="abc")), ("segments", dict(segments=[[1], []])), ("segments", dict(segments=[[1.5]])),
    ("segments", dict(segments=[[1], [-2]])), ("segments", dict(segments=[[1], [2]])),
    ("segments", dict(segments=[[1]], kind="sop")), ("segments", dict(segments=np.ones((3, 2), dtype=int))),
    ("rng", dict(rng=None)), ("kind", dict(kind="mlm")), ("kind", dict(kind=1)),
    ("max_length", dict(max_length=4)), ("max_length", dict(max_length=8.0)),
    ("cls_id", dict(cls_id=-1)), ("sep_id", dict(sep_id="1")), ("pad_id", dict(pad_id=None)),
    ("doc_ids", dict(doc_ids=[0, 0, 1])), ("doc_ids", dict(doc_ids=[1, 0, 0, 0])),
    ("doc_ids", dict(doc_ids=[0, 0, 0, 0])), ("doc_ids", dict(doc_ids=[0.0, 0, 1, 1])),
    ("n_pairs", dict(n_pairs=0)), ("n_pairs", dict(n_pairs=2.0)),
]


@pytest.mark.parametrize("arg,change", PAIR_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PAIR_BAD)])
def test_sentence_pairs_bad_input(arg, change):
    kwargs = dict(PAIR_OK)
    kwargs.update(change)
    expect_rejected(lambda: sentence_pairs(**kwargs), "sentence_pairs", arg)


MASK = np.array([[True, False, True], [False, False, True]])
RTD_BAD = [
    ("inputs", dict(inputs=IDS.tolist())), ("inputs", dict(inputs=IDS[0])), ("inputs", dict(inputs=IDS * 1.0)),
    ("inputs", dict(inputs=IDS - 9)),
    ("generator_samples", dict(generator_samples=IDS[:, :2])), ("generator_samples", dict(generator_samples=IDS * 1.0)),
    ("generator_samples", dict(generator_samples=np.arange(4))), ("generator_samples", dict(generator_samples=IDS - 9)),
    ("generator_samples", dict(generator_samples=None)),
    ("mask_positions", dict(mask_positions=MASK.astype(int))), ("mask_positions", dict(mask_positions=MASK[:, :2])),
    ("mask_positions", dict(mask_positions=MASK.tolist())),
]


@pytest.mark.parametrize("arg,change", RTD_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(RTD_BAD)])
def test_replaced_token_labels_bad_input(arg, change):
    kwargs = dict(inputs=IDS, generator_samples=IDS, mask_positions=MASK)
    kwargs.update(change)
    expect_rejected(lambda: replaced_token_labels(**kwargs), "replaced_token_labels", arg)


BATCH_BAD = [
    ("tokenizer", dict(tokenizer="abc")), ("objective", dict(objective="clm")), ("rng", dict(rng=1)),
    ("batch_size", dict(batch_size=0)), ("max_length", dict(max_length=3)), ("max_length", dict(max_length=10**6)),
    ("specials", dict(specials=(1, 2, 3, 4))), ("text", dict(text=b"abc")), ("mask_prob", dict(mask_prob=2)),
    ("replace_probs", dict(replace_probs=(0.5, 0.5, 0.5))), ("n_batches", dict(n_batches=-1)),
    ("max_bytes", dict(text=None, max_bytes=0)),
]


@pytest.mark.parametrize("arg,change", BATCH_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BATCH_BAD)])
def test_pretraining_batches_bad_input(arg, change):
    kwargs = dict(tokenizer=CHAR, objective="mlm", rng=np.random.default_rng(0), text=TEXT)
    kwargs.update(change)
    expect_rejected(lambda: pretraining_batches(**kwargs), "pretraining_batches", arg)


def test_helpers_bad_input():
    expect_rejected(lambda: special_ids_for(3), "special_ids_for", "tokenizer")
    expect_rejected(lambda: word_starts_for(3, [1]), "word_starts_for", "tokenizer")
    expect_rejected(lambda: word_starts_for(CHAR, [1.5]), "word_starts_for", "ids")
