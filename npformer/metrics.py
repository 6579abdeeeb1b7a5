"""Scores of generated text: exact match and BLEU.

``exact_match(predictions, references)``: the share of i with predictions[i] == references[i]
(strings, or token sequences compared as tuples).

BLEU (Papineni et al., 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation")
------------------------------------------------------------------------------------------------

A corpus is M hypotheses, each a sequence of tokens (any hashable: words, ids), and for each
a non-empty list of references. With ``max_order`` N (4) and weights w_n (1/N each):

1. *Clipped counts.* For order n, a hypothesis n-gram g occurring c(g) times counts
   min(c(g), max over the references r of c_r(g)) matches: the n-gram is credited at most as
   often as one reference holds it. ``matches[n]`` sums these over the n-grams of every
   hypothesis; ``totals[n]`` sums the hypotheses' n-gram counts (len - n + 1 each, 0 for a
   hypothesis shorter than n). The modified precision is p_n = matches[n] / totals[n]
   (0 when totals[n] = 0).
2. *Brevity penalty.* c = the hypotheses' total length; r = the sum over hypotheses of the
   reference length closest to the hypothesis' length (the shorter on a tie).
   BP = 1 when c > r, 0 when c = 0, else exp(1 - r / c).
3. *Score.* BLEU = BP * exp(sum_n w_n log p_n); an order with p_n = 0 and w_n > 0 makes it 0,
   and so does a corpus with no matching unigram at all.

Smoothing (``smoothing="method1"``, Chen and Cherry 2014, as NLTK's ``SmoothingFunction().method1``):
an order with no match gets p_n = epsilon / totals[n] instead of 0 (epsilon / 1 when totals[n]
is 0); a corpus with no matching unigram still scores 0.

``sentence_bleu(references, hypothesis)`` is the corpus BLEU of a corpus of one.

Relation to NLTK's ``corpus_bleu``: equal whenever every hypothesis has at least N tokens.
NLTK counts max(1, len - n + 1) n-grams for each hypothesis, so it adds 1 to totals[n] for
each hypothesis shorter than n; and with no smoothing it scores an order with no match as
``sys.float_info.min`` instead of 0, so where BLEU is 0 here it returns min ** w_n times the rest:
about 1e-77 with uniform weights, but far more when that order's weight is small (w_n = 0.0006
gives min ** 0.0006 = 0.65, and a BLEU of 6e-4 where this one says 0). Zero is what the
definition gives: a geometric mean with a zero factor of positive weight.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from typing import List, NamedTuple, Optional, Tuple

from .ops._checks import check_count, check_real

__all__ = ["exact_match", "BleuResult", "corpus_bleu", "corpus_bleu_details", "sentence_bleu", "ngram_counts",
           "SMOOTHING"]

SMOOTHING = (None, "method1")


def exact_match(predictions: Sequence, references: Sequence) -> float:
    """The share of i with predictions[i] == references[i].

    Each item is a str or a sequence of tokens (lists and tuples compare equal when their tokens do);
    the two sequences have one length N >= 1.
    """
    op = "exact_match"
    preds = _items(op, "predictions", predictions)
    refs = _items(op, "references", references)
    if len(preds) != len(refs):
        raise ValueError(f"{op}: argument 'references' expected {len(preds)} items (one per prediction), "
                         f"got {len(refs)}")
    if not preds:
        raise ValueError(f"{op}: argument 'predictions' expected at least one item, got none")
    return sum(p == r for p, r in zip(preds, refs)) / len(preds)


def _items(op: str, name: str, items: object) -> List[object]:
    if isinstance(items, (str, bytes, dict, set, frozenset)) or not isinstance(items, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a sequence of strings or token sequences, "
                        f"got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (bytes, dict, set, frozenset)) or not isinstance(item, Iterable):
            raise TypeError(f"{op}: argument '{name}' expected a str or a sequence of tokens at position {i}, "
                            f"got {type(item).__name__}")
        else:
            out.append(tuple(item))
    return out


# -- BLEU -----------------------------------------------------------------------------------------

class BleuResult(NamedTuple):
    """A corpus BLEU and its parts: orders n = 1 .. N at index n - 1."""
    score: float
    precisions: Tuple[float, ...]  # p_n as used in the score (smoothed where smoothing applies)
    brevity_penalty: float
    hyp_length: int  # c
    ref_length: int  # r
    matches: Tuple[int, ...]  # clipped n-gram matches
    totals: Tuple[int, ...]  # hypothesis n-grams


def ngram_counts(tokens: Sequence[Hashable], n: int) -> Counter:
    """How often each n-gram (a tuple of n tokens) occurs in ``tokens``."""
    op = "ngram_counts"
    toks = _tokens(op, "tokens", tokens)
    n = check_count(op, "n", n, lo=1)
    return _ngrams(toks, n)


def _ngrams(tokens: Tuple[Hashable, ...], n: int) -> Counter:
    return Counter(tokens[i: i + n] for i in range(len(tokens) - n + 1))


def _tokens(op: str, name: str, tokens: object, where: str = "") -> Tuple[Hashable, ...]:
    if isinstance(tokens, str):
        raise TypeError(f"{op}: argument '{name}' expected a sequence of tokens, got a str{where} "
                        f"(split it first, e.g. text.split())")
    if isinstance(tokens, (bytes, dict, set, frozenset)) or not isinstance(tokens, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a sequence of tokens, got {type(tokens).__name__}{where}")
    out = tuple(tokens)
    for i, t in enumerate(out):
        if not isinstance(t, Hashable):
            raise TypeError(f"{op}: argument '{name}' expected hashable tokens, got {type(t).__name__} "
                            f"at position {i}{where}")
    return out


def _check_options(op: str, max_order: object, weights: object, smoothing: object, epsilon: object):
    N = check_count(op, "max_order", max_order, lo=1)
    if weights is None:
        w = (1.0 / N,) * N
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, (tuple, list)):
            raise TypeError(f"{op}: argument 'weights' expected a tuple of {N} weights, got {type(weights).__name__}")
        if len(weights) != N:
            raise ValueError(f"{op}: argument 'weights' expected {N} weights (one per order up to max_order), "
                             f"got {len(weights)}")
        w = tuple(check_real(op, "weights", v, lo=0.0) for v in weights)
    if smoothing not in SMOOTHING:
        raise ValueError(f"{op}: argument 'smoothing' expected one of {SMOOTHING}, got {smoothing!r:.40}")
    eps = check_real(op, "epsilon", epsilon, lo=0.0, lo_open=True)
    return N, w, eps


def corpus_bleu_details(list_of_references: Sequence[Sequence[Sequence[Hashable]]],
                        hypotheses: Sequence[Sequence[Hashable]], *, max_order: int = 4,
                        weights: Optional[Sequence[float]] = None, smoothing: Optional[str] = None,
                        epsilon: float = 0.1) -> BleuResult:
    """Corpus BLEU with its precisions, brevity penalty, lengths and counts; see the module doc.

    list_of_references: M lists, each of one or more token sequences; hypotheses: M token sequences, M >= 1.
    """
    return _bleu("corpus_bleu_details", "list_of_references", "hypotheses", list_of_references, hypotheses,
                 max_order, weights, smoothing, epsilon)


def _bleu(op: str, refs_name: str, hyps_name: str, list_of_references, hypotheses, max_order, weights, smoothing,
          epsilon) -> BleuResult:
    N, w, eps = _check_options(op, max_order, weights, smoothing, epsilon)
    if isinstance(hypotheses, (str, bytes)) or not isinstance(hypotheses, Iterable):
        raise TypeError(f"{op}: argument '{hyps_name}' expected a sequence of token sequences, "
                        f"got {type(hypotheses).__name__}")
    if isinstance(list_of_references, (str, bytes)) or not isinstance(list_of_references, Iterable):
        raise TypeError(f"{op}: argument '{refs_name}' expected a sequence of lists of token sequences, "
                        f"got {type(list_of_references).__name__}")
    hyps = [_tokens(op, hyps_name, h, f" (hypothesis {i})") for i, h in enumerate(hypotheses)]
    refs_list = list(list_of_references)
    if len(refs_list) != len(hyps):
        raise ValueError(f"{op}: argument '{refs_name}' expected {len(hyps)} lists (one per hypothesis), "
                         f"got {len(refs_list)}")
    if not hyps:
        raise ValueError(f"{op}: argument '{hyps_name}' expected at least one hypothesis, got none")

    matches, totals = [0] * N, [0] * N
    c = r = 0
    for i, (refs, hyp) in enumerate(zip(refs_list, hyps)):
        if isinstance(refs, (str, bytes)) or not isinstance(refs, Iterable):
            raise TypeError(f"{op}: argument '{refs_name}' expected a list of token sequences "
                            f"at position {i}, got {type(refs).__name__}")
        refs = [_tokens(op, refs_name, ref, f" (reference {j} of hypothesis {i})")
                for j, ref in enumerate(refs)]
        if not refs:
            raise ValueError(f"{op}: argument '{refs_name}' expected at least one reference for "
                             f"hypothesis {i}, got none")
        for n in range(1, N + 1):
            counts = _ngrams(hyp, n)
            most = Counter()  # per n-gram, its largest count in one reference
            for ref in refs:
                most |= _ngrams(ref, n)  # Counter union keeps the maximum
            matches[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            totals[n - 1] += sum(counts.values())
        c += len(hyp)
        r += min((len(ref) for ref in refs), key=lambda length: (abs(length - len(hyp)), length))

    bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1.0 - r / c))
    precisions = []
    for m, t in zip(matches, totals):
        if m > 0:
            precisions.append(m / t)
        elif smoothing == "method1":
            precisions.append(eps / max(t, 1))
        else:
            precisions.append(0.0)
    if matches[0] == 0 or any(p == 0.0 and wn > 0 for p, wn in zip(precisions, w)):
        score = 0.0
    else:
        score = bp * math.exp(math.fsum(wn * math.log(p) for wn, p in zip(w, precisions) if wn > 0))
    return BleuResult(score, tuple(precisions), bp, c, r, tuple(matches), tuple(totals))


def corpus_bleu(list_of_references: Sequence[Sequence[Sequence[Hashable]]], hypotheses: Sequence[Sequence[Hashable]],
                *, max_order: int = 4, weights: Optional[Sequence[float]] = None, smoothing: Optional[str] = None,
                epsilon: float = 0.1) -> float:
    """Corpus BLEU in [0, 1] (``corpus_bleu_details(...).score``); see the module doc."""
    return _bleu("corpus_bleu", "list_of_references", "hypotheses", list_of_references, hypotheses, max_order,
                 weights, smoothing, epsilon).score


def sentence_bleu(references: Sequence[Sequence[Hashable]], hypothesis: Sequence[Hashable], *, max_order: int = 4,
                  weights: Optional[Sequence[float]] = None, smoothing: Optional[str] = None,
                  epsilon: float = 0.1) -> float:
    """BLEU of one hypothesis against its references: ``corpus_bleu([references], [hypothesis])``."""
    op = "sentence_bleu"
    if isinstance(references, (str, bytes)) or not isinstance(references, Iterable):
        raise TypeError(f"{op}: argument 'references' expected a list of token sequences, "
                        f"got {type(references).__name__}")
    if isinstance(hypothesis, str) or not isinstance(hypothesis, Iterable):
        raise TypeError(f"{op}: argument 'hypothesis' expected a sequence of tokens, got {type(hypothesis).__name__}")
    return _bleu(op, "references", "hypothesis", [references], [hypothesis], max_order, weights, smoothing,
                 epsilon).score
