"""Pre-training objectives of encoder-decoder models, as transforms of integer token arrays.

Each function takes token ids (a 1-d integer array in any layout, or a list or tuple of ints)
and a ``numpy.random.Generator`` and returns new int64 arrays; nothing is changed in place,
and the same generator state gives the same result.

T5's span corruption: ``random_spans_noise_mask``, ``span_corruption``
-----------------------------------------------------------------------

Raffel et al. (2020), section 3.1.4, as the reference preprocessor
``random_spans_noise_mask`` computes it, for a sequence of L tokens:

1. *Counts, exactly.* num_noise = round(L * noise_density), clipped to [1, L - 1], and
   num_spans = max(round(num_noise / mean_noise_span_length), 1), where ``round`` is
   Python's (half to even, as ``tf.round`` and ``np.round``). L is first raised to 2 and the
   mask cut back to L afterwards, so one token is never noise. Where the split below cannot
   be made (num_spans > L - num_noise, possible only for a density above about 1/2), num_spans
   is lowered to L - num_noise; the reference code would build mismatched shapes there.
2. *Span lengths.* ``random_segmentation(n, k)`` splits n items into k non-empty runs:
   a random permutation of n - 1 flags, k - 1 of them set, marks where a new run begins
   after the first item; every one of the C(n - 1, k - 1) compositions of n into k parts is
   equally likely. The noise tokens are split into num_spans runs, then the non-noise tokens
   into num_spans runs (in this order: two ``rng.permutation`` calls).
3. *Layout.* Non-noise and noise runs alternate, non-noise first: the sequence starts with
   a kept token and ends with a noise span.

``span_corruption(tokens, first_sentinel=..., eos_id=...)`` then builds

    inputs  = the kept tokens with each noise span replaced by one sentinel, then eos;
    targets = sentinel 0, noise span 0, sentinel 1, noise span 1, ..., then eos;

sentinel k is ``first_sentinel - k`` (T5's ``<extra_id_k>``: the extra ids sit at the top of
the vocabulary and count down). Putting each span of ``targets`` in place of its sentinel
in ``inputs`` gives the original tokens back. The lengths depend on L alone
(``span_corruption_lengths``), so a batch of equal windows needs no padding;
``span_raw_length`` is the longest window whose inputs fit a given length (T5's
``compute_input_and_target_lengths``).

BART's noising: ``infilling_spans``, ``text_infilling``, ``sentence_permutation``
-----------------------------------------------------------------------------------

Lewis et al. (2020), section 2.2, with the counts of the reference denoising dataset:

1. num_mask = ceil(mask_ratio * L) tokens are masked, with ``mask_ratio`` read as the decimal
   it prints as: 0.28 of 25 tokens is 7 (in floats 0.28 * 25 is 7.000000000000001).
2. Span lengths are drawn from Poisson(poisson_lambda), num_mask at a time, until their sum
   reaches num_mask; the first span at which it does is cut so that the sum is exactly
   num_mask, and the later draws are dropped. So K spans, the last of length >= 1, the
   others any length >= 0.
3. The K spans, in an order drawn by ``rng.permutation(K)``, are placed among the
   U = L - num_mask unmasked tokens uniformly: K of the U + K slots of a merged sequence are
   chosen (``rng.choice(U + K, K, replace=False)``). Spans never overlap; two may touch.
4. ``text_infilling`` replaces each span with ONE ``mask_id``; a span of length 0 masks
   nothing and inserts a ``mask_id`` where it stands. The output has U + K tokens: removing
   the masks leaves the unmasked tokens in order.

``sentence_permutation`` splits a sequence after every token in ``sentence_end_ids`` (the
text after the last one is a sentence of its own) and puts the sentences in the order of
``rng.permutation``. For both, the target is the original sequence.

The prefix LM of a decoder-only model lives with the models: ``npformer.nn.lm.prefix_lm_bias``
(proofs/attention.md, ATT.18) and ``npformer.data.corpus.get_prefix_batch``.

Batches: ``seq2seq_batches``
----------------------------

``seq2seq_batches(tokenizer, objective, ...)`` encodes ``default_corpus`` (or a given text)
and yields ``Seq2SeqBatch(src_ids, tgt_in, targets, src_padding_mask)`` forever (or
``n_batches`` times): src_ids (B, S) and tgt_in, targets (B, T) int64, src_padding_mask
(B, S) bool, True at padding. ``tgt_in = [decoder_start] + targets[:-1]`` with -100 read as
pad. Special ids come from ``seq2seq_specials_for`` (pad, eos, bos, mask and the sentinels,
all after the tokenizer's vocabulary) or from ``specials``: ids the encoded text never holds.

- "span" (T5): windows of ``span_raw_length(max_length)`` tokens, corrupted; S = max_length,
  T = the fixed targets length; decoder_start defaults to pad (T5's).
- "infill", "permute", "permute+infill" (BART): windows of max_length - 2 tokens, noised,
  as ``[bos] noised [eos]`` padded to S = max_length (a row that infilling makes longer,
  possible only when many spans are empty, is drawn again); targets ``[bos] window [eos]``,
  T = max_length; decoder_start defaults to eos (BART's).

Draws per batch: ``rng.integers`` for the B window starts, then each row's draws in turn.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..nn.lm import IGNORE_INDEX
from ..nn.seq2seq import shift_right
from ..ops._checks import check_count, check_int, check_ndim, check_real
from .corpus import default_corpus, token_stream
from .objectives import _check_rng, _check_tokenizer

__all__ = ["OBJECTIVES", "IGNORE_INDEX", "Seq2SeqBatch", "Seq2SeqSpecials", "seq2seq_specials_for", "seq2seq_specials",
           "random_segmentation", "noise_span_counts", "random_spans_noise_mask", "span_corruption",
           "span_corruption_lengths", "span_raw_length", "infilling_spans", "text_infilling",
           "sentence_permutation", "seq2seq_batches"]

OBJECTIVES = ("span", "infill", "permute", "permute+infill")


class Seq2SeqBatch(NamedTuple):
    """src_ids (B, S), tgt_in (B, T), targets (B, T) (-100 ignored): int64; src_padding_mask (B, S) bool."""
    src_ids: np.ndarray
    tgt_in: np.ndarray
    targets: np.ndarray
    src_padding_mask: np.ndarray


class Seq2SeqSpecials(NamedTuple):
    """Ids of pad, eos, bos and mask, the sentinels ``first_sentinel - k`` for k < n_sentinels, the vocabulary size."""
    pad: int
    eos: int
    bos: int
    mask: int
    first_sentinel: int
    n_sentinels: int
    vocab_size: int

    def sentinel(self, k: int) -> int:
        """The id of sentinel k (``<extra_id_k>``)."""
        return self.first_sentinel - k


def seq2seq_specials_for(tokenizer: object, n_sentinels: int = 100) -> Seq2SeqSpecials:
    """Special ids after a tokenizer's V ids: pad V, eos V + 1, bos V + 2, mask V + 3, then ``n_sentinels``
    sentinels counting down from the top: sentinel 0 is V + 3 + n_sentinels = vocab_size - 1."""
    op = "seq2seq_specials_for"
    _check_tokenizer(op, tokenizer)
    size = getattr(tokenizer, "vocab_size", None)
    if size is None:
        raise TypeError(f"{op}: argument 'tokenizer' expected an object with a 'vocab_size', has none")
    return seq2seq_specials(check_count(op, "tokenizer", size, lo=1), n_sentinels, op=op)


def seq2seq_specials(text_vocab_size: int, n_sentinels: int = 100, *, op: str = "seq2seq_specials") -> Seq2SeqSpecials:
    """``seq2seq_specials_for`` of a tokenizer of ``text_vocab_size`` ids (errors name ``op``)."""
    V = check_count(op, "text_vocab_size", text_vocab_size, lo=1)
    n = check_count(op, "n_sentinels", n_sentinels, lo=0)
    return Seq2SeqSpecials(pad=V, eos=V + 1, bos=V + 2, mask=V + 3, first_sentinel=V + 3 + n, n_sentinels=n,
                           vocab_size=V + 4 + n)


# -- checks ------------------------------------------------------------------------------------

def _tokens(op: str, tokens: object) -> np.ndarray:
    """A 1-d integer array (or sequence) of ids >= 0, as int64."""
    if isinstance(tokens, np.ndarray):
        check_int(op, "tokens", tokens)
        check_ndim(op, "tokens", tokens, 1)
    ids = token_stream(op, "tokens", tokens)
    if ids.size and ids.min() < 0:
        raise ValueError(f"{op}: argument 'tokens' expected ids >= 0, got {ids.min()}")
    return ids


def _density(op: str, name: str, value: object) -> float:
    return check_real(op, name, value, lo=0.0, hi=1.0, lo_open=True, hi_open=True)


def _mean_span(op: str, value: object) -> float:
    return check_real(op, "mean_noise_span_length", value, lo=1.0)


def _lambda(op: str, value: object) -> float:
    return check_real(op, "poisson_lambda", value, lo=0.0, hi=1e6, lo_open=True)


# -- T5 span corruption ----------------------------------------------------------------------------

def random_segmentation(n_items: int, n_segments: int, *, rng: np.random.Generator) -> np.ndarray:
    """(n_segments,) int64: lengths >= 1 summing to ``n_items``, every composition equally likely.

    One ``rng.permutation`` of n_items - 1 flags, n_segments - 1 of them set: flag i set means a new
    run begins at item i + 1. Needs 1 <= n_segments <= n_items.
    """
    op = "random_segmentation"
    _check_rng(op, rng)
    n = check_count(op, "n_items", n_items, lo=1)
    k = check_count(op, "n_segments", n_segments, lo=1, hi=n)
    return _segmentation(n, k, rng)


def _segmentation(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    first_in_segment = np.zeros(n, dtype=np.int64)  # item 0 always begins segment 0
    first_in_segment[1:] = rng.permutation(np.arange(n - 1) < k - 1)
    segment_id = np.cumsum(first_in_segment)  # (n,) in [0, k)
    return np.bincount(segment_id, minlength=k).astype(np.int64)


def noise_span_counts(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> Tuple[int, int]:
    """(num_noise, num_spans) of a sequence of ``length`` tokens, by rule 1 of the module doc ((0, 0) for L < 2)."""
    op = "noise_span_counts"
    L = check_count(op, "length", length)
    return _counts(L, _density(op, "noise_density", noise_density), _mean_span(op, mean_noise_span_length))


def _counts(L: int, density: float, mean: float) -> Tuple[int, int]:
    if L < 2:  # raised to 2, one noise token at position 1, cut back to L: no noise
        return 0, 0
    num_noise = min(max(round(L * density), 1), L - 1)
    num_spans = max(round(num_noise / mean), 1)
    return num_noise, min(num_spans, L - num_noise)


def random_spans_noise_mask(length: int, *, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """(L,) bool, True at noise tokens: T5's ``random_spans_noise_mask`` (see the module doc)."""
    op = "random_spans_noise_mask"
    _check_rng(op, rng)
    L = check_count(op, "length", length)
    density = _density(op, "noise_density", noise_density)
    mean = _mean_span(op, mean_noise_span_length)
    return _noise_mask(L, density, mean, rng)


def _noise_mask(L: int, density: float, mean: float, rng: np.random.Generator) -> np.ndarray:
    num_noise, num_spans = _counts(L, density, mean)
    if num_spans == 0:
        return np.zeros(L, dtype=bool)
    noise_lengths = _segmentation(num_noise, num_spans, rng)  # (K,)
    kept_lengths = _segmentation(L - num_noise, num_spans, rng)  # (K,)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, noise, ...
    return np.repeat(np.tile(np.array([False, True]), num_spans), interleaved)


def span_corruption_lengths(length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> Tuple[int, int]:
    """(inputs length, targets length) of ``span_corruption`` on ``length`` tokens, eos included in each."""
    op = "span_corruption_lengths"
    L = check_count(op, "length", length)
    num_noise, num_spans = _counts(L, _density(op, "noise_density", noise_density),
                                   _mean_span(op, mean_noise_span_length))
    return L - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_raw_length(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """The largest L whose ``span_corruption`` inputs (eos included) have at most ``inputs_length`` tokens."""
    op = "span_raw_length"
    n = check_count(op, "inputs_length", inputs_length, lo=1)
    density = _density(op, "noise_density", noise_density)
    mean = _mean_span(op, mean_noise_span_length)

    def inputs_of(L: int) -> int:
        num_noise, num_spans = _counts(L, density, mean)
        return L - num_noise + num_spans + 1

    L = 0  # inputs_of grows by 0 or 1 per token once L >= 2 (a token is kept, or joins or opens a span)
    while inputs_of(L + 1) <= n:
        L += 1
    return L


def span_corruption(tokens: Sequence[int], *, rng: np.random.Generator, first_sentinel: int, eos_id: int,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    n_sentinels: int = 100) -> Tuple[np.ndarray, np.ndarray]:
    """T5's span corruption of one sequence; see the module doc.

    tokens: (L,) integer ids, none of them a sentinel  ->  inputs (L - N + K + 1,), targets (N + K + 1,): int64,
    for N noise tokens in K spans. Sentinel k is ``first_sentinel - k``, for k < ``n_sentinels``.
    """
    op = "span_corruption"
    _check_rng(op, rng)
    ids = _tokens(op, tokens)
    n_sent = check_count(op, "n_sentinels", n_sentinels, lo=1)
    top = check_count(op, "first_sentinel", first_sentinel, lo=n_sent - 1)
    eos = check_count(op, "eos_id", eos_id)
    lowest = top - n_sent + 1
    if lowest <= eos <= top:
        raise ValueError(f"{op}: argument 'eos_id' expected an id outside the sentinels [{lowest}, {top}], got {eos}")
    if ids.size and np.any((ids >= lowest) & (ids <= top)):
        bad = int(ids[(ids >= lowest) & (ids <= top)][0])
        raise ValueError(f"{op}: argument 'tokens' expected no sentinel id (in [{lowest}, {top}]), got {bad}")
    density = _density(op, "noise_density", noise_density)
    mean = _mean_span(op, mean_noise_span_length)
    _, num_spans = _counts(ids.size, density, mean)
    if num_spans > n_sent:
        raise ValueError(f"{op}: argument 'n_sentinels' expected at least {num_spans} (the spans of "
                         f"{ids.size} tokens), got {n_sent}")
    noise = _noise_mask(ids.size, density, mean, rng)
    return _corrupt(ids, noise, top, eos)


def _corrupt(ids: np.ndarray, noise: np.ndarray, first_sentinel: int, eos: int) -> Tuple[np.ndarray, np.ndarray]:
    previous = np.zeros_like(noise)
    previous[1:] = noise[:-1]
    span_start = noise & ~previous  # (L,) first token of each noise span
    sentinels = first_sentinel - np.arange(int(span_start.sum()), dtype=np.int64)  # (K,)
    marked = ids.copy()
    marked[span_start] = sentinels
    inputs = np.append(marked[~noise | span_start], eos)  # kept tokens, one sentinel per span
    before = np.cumsum(noise)[span_start] - 1  # noise tokens before each span's first
    targets = np.append(np.insert(ids[noise], before, sentinels), eos)  # sentinel k, then span k
    return inputs, targets


# -- BART noising ------------------------------------------------------------------------------

def _mask_count(L: int, ratio: float) -> int:
    return math.ceil(Fraction(repr(ratio)) * L)  # the decimal it prints as: 0.28 * 25 is 7


def infilling_spans(length: int, *, rng: np.random.Generator, mask_ratio: float = 0.3,
                    poisson_lambda: float = 3.0) -> Tuple[np.ndarray, np.ndarray]:
    """BART's spans for ``length`` tokens: starts (K,) and lengths (K,), int64, sorted by start.

    Span k covers original tokens starts[k] .. starts[k] + lengths[k] - 1; a span of length 0 stands before
    token starts[k] (starts[k] = L: at the end). The lengths sum to ceil(mask_ratio * L). See the module doc.
    """
    op = "infilling_spans"
    _check_rng(op, rng)
    L = check_count(op, "length", length)
    ratio = _density(op, "mask_ratio", mask_ratio)
    lam = _lambda(op, poisson_lambda)
    return _infilling_spans(L, ratio, lam, rng)


def _infilling_spans(L: int, ratio: float, lam: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    num_mask = _mask_count(L, ratio)
    if num_mask == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = rng.poisson(lam, size=num_mask).astype(np.int64)
    while lengths.sum() < num_mask:
        lengths = np.concatenate([lengths, rng.poisson(lam, size=num_mask).astype(np.int64)])
    reach = int(np.argmax(np.cumsum(lengths) >= num_mask))  # the first span at which the sum reaches num_mask
    lengths = lengths[: reach + 1]
    lengths[-1] = num_mask - int(lengths[:-1].sum())  # cut: >= 1, since the sum before it is < num_mask
    K = lengths.size
    lengths = lengths[rng.permutation(K)]
    slots = np.sort(rng.choice(L - num_mask + K, size=K, replace=False))  # (K,) places in kept + spans
    kept_before = slots - np.arange(K)  # unmasked tokens before each span
    masked_before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return (kept_before + masked_before).astype(np.int64), lengths


def text_infilling(tokens: Sequence[int], *, rng: np.random.Generator, mask_id: int, mask_ratio: float = 0.3,
                   poisson_lambda: float = 3.0) -> np.ndarray:
    """BART's text infilling: each span of ``infilling_spans`` becomes one ``mask_id``.

    tokens: (L,) integer ids, none equal to ``mask_id``  ->  (L - N + K,) int64 for N masked tokens in K spans.
    """
    op = "text_infilling"
    _check_rng(op, rng)
    ids = _tokens(op, tokens)
    mask_id = check_count(op, "mask_id", mask_id)
    if np.any(ids == mask_id):
        raise ValueError(f"{op}: argument 'tokens' expected no mask id {mask_id}, got one at "
                         f"{int(np.argmax(ids == mask_id))}")
    ratio = _density(op, "mask_ratio", mask_ratio)
    lam = _lambda(op, poisson_lambda)
    starts, lengths = _infilling_spans(ids.size, ratio, lam, rng)
    return _infill(ids, starts, lengths, mask_id)


def _infill(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, mask_id: int) -> np.ndarray:
    masked = np.zeros(ids.size + 1, dtype=np.int64)  # difference array of the covered positions
    np.add.at(masked, starts, 1)
    np.add.at(masked, starts + lengths, -1)
    covered = np.cumsum(masked[:-1]) > 0  # (L,)
    kept_before = starts - np.concatenate([[0], np.cumsum(lengths)[:-1]])  # unmasked tokens before each span
    return np.insert(ids[~covered], kept_before, mask_id)


def sentence_permutation(tokens: Sequence[int], *, rng: np.random.Generator,
                         sentence_end_ids: Iterable[int]) -> np.ndarray:
    """BART's sentence permutation: (L,) ids -> (L,) int64, the sentences (split after each end id) shuffled."""
    op = "sentence_permutation"
    _check_rng(op, rng)
    ids = _tokens(op, tokens)
    if isinstance(sentence_end_ids, (str, bytes, np.ndarray)) or not isinstance(sentence_end_ids, Iterable):
        raise TypeError(f"{op}: argument 'sentence_end_ids' expected a tuple, list or set of integer ids, "
                        f"got {type(sentence_end_ids).__name__}")
    ends = np.array(sorted({check_count(op, "sentence_end_ids", v) for v in sentence_end_ids}), dtype=np.int64)
    return _permute(ids, ends, rng)


def _permute(ids: np.ndarray, ends: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cuts = np.flatnonzero(np.isin(ids[:-1], ends)) + 1  # a sentence begins after each end token
    sentences = np.split(ids, cuts)
    order = rng.permutation(len(sentences))
    return np.concatenate([sentences[i] for i in order]).astype(np.int64) if ids.size else ids.copy()


# -- batches -------------------------------------------------------------------------------------

def _sentence_ends(tokenizer) -> np.ndarray:
    """The ids of ".", "!" and "?" that the tokenizer encodes as one token."""
    ends = set()
    for mark in ".!?":
        try:
            ids = list(tokenizer.encode(mark))
        except (ValueError, KeyError):  # a character the vocabulary lacks
            continue
        if len(ids) == 1:
            ends.add(int(ids[0]))
    return np.array(sorted(ends), dtype=np.int64)


def seq2seq_batches(tokenizer: object, objective: str, *, rng: np.random.Generator, batch_size: int = 8,
                    max_length: int = 64, specials: Optional[Seq2SeqSpecials] = None, text: Optional[str] = None,
                    max_bytes: int = 1 << 16, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                    mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                    sentence_end_ids: Optional[Iterable[int]] = None, decoder_start_id: Optional[int] = None,
                    n_batches: Optional[int] = None) -> Iterator[Seq2SeqBatch]:
    """Batches of the built-in corpus (or ``text``) for one objective; see the module doc.

    ``sentence_end_ids`` defaults to the tokenizer's ids of ".", "!" and "?". The text is encoded once,
    here, before the first batch; ``n_batches=None`` yields forever.
    """
    op = "seq2seq_batches"
    _check_tokenizer(op, tokenizer)
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"{op}: argument 'objective' expected one of {OBJECTIVES}, got {objective!r:.40}")
    _check_rng(op, rng)
    B = check_count(op, "batch_size", batch_size, lo=1)
    L = check_count(op, "max_length", max_length, lo=4)
    if specials is None:
        specials = seq2seq_specials_for(tokenizer)
    elif not isinstance(specials, Seq2SeqSpecials):
        raise TypeError(f"{op}: argument 'specials' expected a Seq2SeqSpecials, got {type(specials).__name__}")
    S = specials
    if text is None:
        text = default_corpus(check_count(op, "max_bytes", max_bytes, lo=1))
    elif not isinstance(text, str):
        raise TypeError(f"{op}: argument 'text' expected a str, got {type(text).__name__}")
    density = _density(op, "noise_density", noise_density)
    mean = _mean_span(op, mean_noise_span_length)
    ratio = _density(op, "mask_ratio", mask_ratio)
    lam = _lambda(op, poisson_lambda)
    if n_batches is not None:
        n_batches = check_count(op, "n_batches", n_batches, lo=0)
    if decoder_start_id is None:
        decoder_start_id = S.pad if objective == "span" else S.eos
    start = check_count(op, "decoder_start_id", decoder_start_id, hi=S.vocab_size - 1)
    if sentence_end_ids is None:
        ends = _sentence_ends(tokenizer)
    else:
        if isinstance(sentence_end_ids, (str, bytes, np.ndarray)) or not isinstance(sentence_end_ids, Iterable):
            raise TypeError(f"{op}: argument 'sentence_end_ids' expected a tuple, list or set of integer ids, "
                            f"got {type(sentence_end_ids).__name__}")
        ends = np.array(sorted({check_count(op, "sentence_end_ids", v) for v in sentence_end_ids}), dtype=np.int64)

    lowest = S.first_sentinel - S.n_sentinels + 1
    named = (S.pad, S.eos, S.bos, S.mask)
    if len(set(named)) != 4 or any(lowest <= i <= S.first_sentinel for i in named) or lowest < 0 \
            or max(named + (S.first_sentinel,)) >= S.vocab_size or min(named) < 0:
        raise ValueError(f"{op}: argument 'specials' expected distinct pad, eos, bos and mask ids outside the "
                         f"sentinels, all in [0, vocab_size), got {S}")
    stream = token_stream(op, "tokenizer", tokenizer.encode(text))
    clash = np.isin(stream, named) | ((stream >= lowest) & (stream <= S.first_sentinel))
    if clash.any() or (stream.size and stream.min() < 0):
        bad = int(stream[clash | (stream < 0)][0])
        raise ValueError(f"{op}: argument 'specials' expected no special id among the text's ids, "
                         f"got text id {bad} (specials {S})")
    if objective == "span":
        W = span_raw_length(L, density, mean)
        _, num_spans = _counts(W, density, mean)
        if num_spans > S.n_sentinels:
            raise ValueError(f"{op}: argument 'specials' expected at least {num_spans} sentinels for "
                             f"max_length {L}, got {S.n_sentinels}")
        T = span_corruption_lengths(W, density, mean)[1]
    else:
        W, T = L - 2, L
    if stream.size < W:
        raise ValueError(f"{op}: argument 'max_length' expected a window of at most {stream.size} tokens "
                         f"(the text's length), got {L} (a window of {W})")

    def row(window: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if objective == "span":
            noise = _noise_mask(W, density, mean, rng)
            return _corrupt(window, noise, S.first_sentinel, S.eos)
        target = np.concatenate([[S.bos], window, [S.eos]]).astype(np.int64)
        content = _permute(window, ends, rng) if "permute" in objective else window
        if "infill" in objective:
            while True:  # drawn again in the rare case that empty spans make it longer than the window
                infilled = _infill(content, *_infilling_spans(W, ratio, lam, rng), S.mask)
                if infilled.size <= W:
                    break
            content = infilled
        return np.concatenate([[S.bos], content, [S.eos]]).astype(np.int64), target

    def batches() -> Iterator[Seq2SeqBatch]:
        count = 0
        while n_batches is None or count < n_batches:
            count += 1
            at = rng.integers(0, stream.size - W + 1, size=B)
            src = np.full((B, L), S.pad, dtype=np.int64)
            targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
            for b in range(B):
                inputs, target = row(stream[at[b]: at[b] + W])
                src[b, : inputs.size] = inputs
                targets[b, : target.size] = target
            yield Seq2SeqBatch(src, shift_right(targets, start, S.pad), targets, src == S.pad)

    return batches()
