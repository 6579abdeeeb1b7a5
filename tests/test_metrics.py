"""Exact match and BLEU: a case worked by hand, published values, and NLTK's corpus_bleu on random corpora."""

import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.metrics import BleuResult, corpus_bleu, corpus_bleu_details, exact_match, ngram_counts, sentence_bleu
from tests.badinput import expect_rejected

# Agreement with NLTK's float arithmetic: both sum w_n log p_n with math.fsum, so only the last bits differ.
NLTK_RTOL = 1e-12


# -- exact match -------------------------------------------------------------------------------------

def test_exact_match():
    assert exact_match(["342", "7", "12"], ["342", "8", "12"]) == 2 / 3
    assert exact_match([[1, 2], (3,)], [(1, 2), [3, 4]]) == 0.5  # token sequences compare as tuples
    assert exact_match(["a "], ["a"]) == 0.0  # exact: no stripping
    expect_rejected(lambda: exact_match(["a"], ["a", "b"]), "exact_match", "references")
    expect_rejected(lambda: exact_match([], []), "exact_match", "predictions")
    expect_rejected(lambda: exact_match("ab", ["a", "b"]), "exact_match", "predictions")
    expect_rejected(lambda: exact_match(["a"], [3]), "exact_match", "references")


# -- BLEU: by hand -------------------------------------------------------------------------------------

def test_bleu_worked_by_hand():
    """hypothesis "the cat sat on the mat", reference "the cat is on the mat" (6 tokens each, so BP = 1).

    unigrams: the x2, cat, sat, on, mat; the reference has the x2, cat, is, on, mat -> matches 2+1+0+1+1 = 5 of 6
    bigrams:  the cat, cat sat, sat on, on the, the mat; the reference has the cat, on the, the mat -> 3 of 5
    trigrams: the cat sat, cat sat on, sat on the, on the mat; the reference has on the mat -> 1 of 4
    4-grams:  the cat sat on, cat sat on the, sat on the mat; none in the reference -> 0 of 3
    No smoothing: p_4 = 0, so BLEU = 0.
    Smoothing method 1 (epsilon = 0.1): p_4 = 0.1 / 3, and
        BLEU = (5/6 * 3/5 * 1/4 * 0.1/3) ** (1/4) = (1.5 / 360) ** (1/4) = (1/240) ** (1/4) = 0.254066...
    With max_order 3: (5/6 * 3/5 * 1/4) ** (1/3) = (1/8) ** (1/3) = 1/2 exactly.
    """
    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    details = corpus_bleu_details([[ref]], [hyp])
    assert isinstance(details, BleuResult)
    assert details.matches == (5, 3, 1, 0) and details.totals == (6, 5, 4, 3)
    assert (details.hyp_length, details.ref_length, details.brevity_penalty) == (6, 6, 1.0)
    assert details.score == 0.0 == sentence_bleu([ref], hyp)
    smoothed = sentence_bleu([ref], hyp, smoothing="method1")
    assert math.isclose(smoothed, 240 ** -0.25, rel_tol=1e-15)
    assert math.isclose(smoothed, 0.2540663740773, rel_tol=1e-12)
    assert math.isclose(sentence_bleu([ref], hyp, max_order=3), 0.5, rel_tol=1e-15)


def test_clipping_and_closest_reference_by_hand():
    """hypothesis "the the the the" against "the cat" and "the the cat", orders 1 and 2:
    unigram "the" 4 times, at most 2 in one reference -> 2 of 4; bigram "the the" 3 times, at most 1 -> 1 of 3.
    c = 4; reference lengths 2 and 3, the closest is 3 -> r = 3 < c, BP = 1. BLEU = (1/2 * 1/3) ** (1/2) = 6 ** -0.5.
    Papineni's example: "the" x7 against "the cat is on the mat" / "there is a cat on the mat": p_1 = 2/7.
    """
    hyp = ["the"] * 4
    refs = [["the", "cat"], ["the", "the", "cat"]]
    d = corpus_bleu_details([refs], [hyp], max_order=2)
    assert d.matches == (2, 1) and d.totals == (4, 3) and d.ref_length == 3 and d.brevity_penalty == 1.0
    assert math.isclose(d.score, 6 ** -0.5, rel_tol=1e-15)
    papineni = corpus_bleu_details([["the cat is on the mat".split(), "there is a cat on the mat".split()]],
                                   [["the"] * 7], max_order=1)
    assert papineni.precisions == (2 / 7,)


def test_brevity_penalty_by_hand():
    """"the cat" against "the cat sat on": p_1 = p_2 = 1, c = 2, r = 4, BP = exp(1 - 4/2) = 1/e.
    A tie in closeness takes the shorter reference: a 4-token hypothesis against lengths 3 and 5 has r = 3."""
    assert math.isclose(sentence_bleu([["the", "cat", "sat", "on"]], ["the", "cat"], max_order=2), math.exp(-1),
                        rel_tol=1e-15)
    d = corpus_bleu_details([[list("abc"), list("abcde")]], [list("abcd")], max_order=1)
    assert d.ref_length == 3 and d.brevity_penalty == 1.0
    d = corpus_bleu_details([[list("abcde"), list("abc")]], [list("ab")], max_order=1)
    assert d.ref_length == 3 and math.isclose(d.brevity_penalty, math.exp(1 - 3 / 2), rel_tol=1e-15)
    assert corpus_bleu([[list("ab")]], [[]]) == 0.0  # an empty hypothesis: c = 0, BP = 0


def test_smoothing_an_order_with_no_ngrams_at_all():
    """"a b" against "a b": orders 3 and 4 have no n-gram (totals 0); smoothed each is epsilon / 1, so
    BLEU = (1 * 1 * 0.1 * 0.1) ** (1/4) = 0.1 ** (1/2); unsmoothed it is 0."""
    d = corpus_bleu_details([[["a", "b"]]], [["a", "b"]], smoothing="method1")
    assert d.totals == (2, 1, 0, 0) and d.precisions == (1.0, 1.0, 0.1, 0.1)
    assert math.isclose(d.score, math.sqrt(0.1), rel_tol=1e-15)
    assert corpus_bleu([[["a", "b"]]], [["a", "b"]]) == 0.0


def test_no_matching_unigram_scores_zero_even_smoothed():
    assert corpus_bleu([[list("abcd")]], [list("wxyz")], smoothing="method1") == 0.0


def test_ngram_counts():
    assert ngram_counts(list("abab"), 2) == {("a", "b"): 2, ("b", "a"): 1}
    assert ngram_counts(list("ab"), 3) == {}


# -- BLEU: published values ------------------------------------------------------------------------

# The example of NLTK's ``nltk.translate.bleu_score.corpus_bleu`` docstring (NLTK 3.x), after Papineni et al.
HYP1 = ["It", "is", "a", "guide", "to", "action", "which", "ensures", "that", "the", "military", "always", "obeys",
        "the", "commands", "of", "the", "party"]
REF1A = ["It", "is", "a", "guide", "to", "action", "that", "ensures", "that", "the", "military", "will", "forever",
         "heed", "Party", "commands"]
REF1B = ["It", "is", "the", "guiding", "principle", "which", "guarantees", "the", "military", "forces", "always",
         "being", "under", "the", "command", "of", "the", "Party"]
REF1C = ["It", "is", "the", "practical", "guide", "for", "the", "army", "always", "to", "heed", "the", "directions",
         "of", "the", "party"]
HYP2 = ["he", "read", "the", "book", "because", "he", "was", "interested", "in", "world", "history"]
REF2A = ["he", "was", "interested", "in", "world", "history", "because", "he", "read", "the", "book"]


def printed(x, digits=4):
    """``x`` truncated to ``digits`` decimals, as a doctest with an ellipsis reads it ("0.5920...")."""
    return f"{math.floor(x * 10**digits) / 10**digits:.{digits}f}"


def test_nltk_docstring_values():
    """Published in NLTK's corpus_bleu docstring: 0.5920..., 0.5818... with weights (0.1, 0.3, 0.5, 0.1),
    0.6223... for the mean of the two sentence BLEUs, and [0.8242..., 0.7067..., 0.5920..., 0.4719...] for
    orders 2, 3, 4 and 5 (weights (0.5, 0.5), (0.333, 0.333, 0.334), uniform 1/4 and 1/5)."""
    refs, hyps = [[REF1A, REF1B, REF1C], [REF2A]], [HYP1, HYP2]
    assert printed(corpus_bleu(refs, hyps)) == "0.5920"
    assert printed(corpus_bleu(refs, hyps, weights=(0.1, 0.3, 0.5, 0.1))) == "0.5818"
    mean = (sentence_bleu([REF1A, REF1B, REF1C], HYP1) + sentence_bleu([REF2A], HYP2)) / 2
    assert printed(mean) == "0.6223"
    scores = [corpus_bleu(refs, hyps, max_order=2, weights=(0.5, 0.5)),
              corpus_bleu(refs, hyps, max_order=3, weights=(0.333, 0.333, 0.334)),
              corpus_bleu(refs, hyps),
              corpus_bleu(refs, hyps, max_order=5)]
    assert [printed(s) for s in scores] == ["0.8242", "0.7067", "0.5920", "0.4719"]


def test_sentence_bleu_nltk_docstring_value():
    """NLTK's sentence_bleu docstring: HYP1 against REF1A, REF1B, REF1C scores 0.5045..."""
    assert printed(sentence_bleu([REF1A, REF1B, REF1C], HYP1)) == "0.5045"


# -- BLEU: against NLTK ---------------------------------------------------------------------------

WORDS = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def corpora(draw):
    N = draw(st.integers(1, 4))
    M = draw(st.integers(1, 4))
    hyps = [draw(st.lists(WORDS, min_size=N, max_size=12)) for _ in range(M)]  # >= N tokens: NLTK counts as here
    refs = [[draw(st.lists(WORDS, min_size=0, max_size=12)) for _ in range(draw(st.integers(1, 3)))]
            for _ in range(M)]
    weights = draw(st.one_of(st.none(), st.lists(st.floats(0.05, 1.0), min_size=N, max_size=N)))
    if weights is None:
        weights = [1.0 / N] * N
    return refs, hyps, N, tuple(weights)


@given(corpora(), st.sampled_from([None, "method1"]))
def test_equals_nltk_corpus_bleu(corpus, smoothing):
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    refs, hyps, N, weights = corpus
    ours = corpus_bleu(refs, hyps, max_order=N, weights=weights, smoothing=smoothing)
    function = bleu.SmoothingFunction().method1 if smoothing else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns about orders with no match
        theirs = bleu.corpus_bleu(refs, hyps, weights=weights, smoothing_function=function)
    # NLTK scores an order with no match (unsmoothed) as float_info.min: about 1e-77 where ours is 0.
    assert math.isclose(ours, theirs, rel_tol=NLTK_RTOL, abs_tol=1e-60), (ours, theirs)
    assert 0.0 <= ours <= 1.0
    one = sentence_bleu(refs[0], hyps[0], max_order=N, weights=weights, smoothing=smoothing)
    assert one == corpus_bleu(refs[:1], hyps[:1], max_order=N, weights=weights, smoothing=smoothing)


@given(st.lists(WORDS, min_size=4, max_size=20))
def test_a_hypothesis_equal_to_its_reference_scores_one(tokens):
    assert corpus_bleu([[tokens, ["z"]]], [tokens]) == 1.0


def test_hypothesis_shorter_than_the_order_counts_no_ngrams():
    """totals[n] counts only real n-grams (NLTK counts max(1, len - n + 1) per hypothesis)."""
    d = corpus_bleu_details([[list("abcde")], [list("ab")]], [list("abcde"), list("ab")], smoothing="method1")
    assert d.totals == (7, 5, 3, 2) and d.matches == (7, 5, 3, 2) and d.score == 1.0


# -- bad input ----------------------------------------------------------------------------------------

def test_bleu_bad_input():
    ref, hyp = ["a", "b"], ["a", "b"]
    cases = [
        (lambda: corpus_bleu([[ref]], ["a b"]), "corpus_bleu", "hypotheses"),
        (lambda: corpus_bleu([[ref]], "a b"), "corpus_bleu", "hypotheses"),
        (lambda: corpus_bleu([[ref]], [hyp, hyp]), "corpus_bleu", "list_of_references"),
        (lambda: corpus_bleu([], []), "corpus_bleu", "hypotheses"),
        (lambda: corpus_bleu([[]], [hyp]), "corpus_bleu", "list_of_references"),
        (lambda: corpus_bleu([["a b"]], [hyp]), "corpus_bleu", "list_of_references"),
        (lambda: corpus_bleu([ref], [hyp]), "corpus_bleu", "list_of_references"),
        (lambda: corpus_bleu([[ref]], [[["a"]]]), "corpus_bleu", "hypotheses"),
        (lambda: corpus_bleu([[ref]], [hyp], max_order=0), "corpus_bleu", "max_order"),
        (lambda: corpus_bleu([[ref]], [hyp], weights=(0.5, 0.5)), "corpus_bleu", "weights"),
        (lambda: corpus_bleu([[ref]], [hyp], max_order=2, weights=(0.5, -0.5)), "corpus_bleu", "weights"),
        (lambda: corpus_bleu([[ref]], [hyp], max_order=2, weights="ab"), "corpus_bleu", "weights"),
        (lambda: corpus_bleu([[ref]], [hyp], smoothing="method7"), "corpus_bleu", "smoothing"),
        (lambda: corpus_bleu([[ref]], [hyp], smoothing="method1", epsilon=0.0), "corpus_bleu", "epsilon"),
        (lambda: corpus_bleu_details([[ref]], [hyp], max_order=2.0), "corpus_bleu_details", "max_order"),
        (lambda: sentence_bleu(ref, hyp), "sentence_bleu", "references"),
        (lambda: sentence_bleu([ref], "a b"), "sentence_bleu", "hypothesis"),
        (lambda: sentence_bleu([], hyp), "sentence_bleu", "references"),
        (lambda: ngram_counts(["a"], 0), "ngram_counts", "n"),
        (lambda: ngram_counts("ab", 1), "ngram_counts", "tokens"),
    ]
    for call, func, arg in cases:
        message = expect_rejected(call, func, arg)
        assert "expected" in message, message
