"""The pre-training objectives of encoder models, as transforms of integer token arrays.

Each function takes token ids and a ``numpy.random.Generator`` and returns new arrays;
nothing is changed in place, and the same generator state gives the same result.

Masked language modelling (BERT, RoBERTa, ALBERT, ELECTRA's generator): ``mask_tokens``
----------------------------------------------------------------------------------------

``mask_tokens(ids, rng=..., vocab_size=V, mask_id=M, special_ids=S, pad_id=P)`` with
ids (B, T) returns ``inputs`` (B, T) and ``labels`` (B, T), both int64:

1. *Which positions.* A position may be chosen when its id is not reserved: not in
   ``special_ids``, not ``mask_id`` and not ``pad_id``. Each such position is chosen
   independently with probability ``mask_prob`` (a Bernoulli draw per position, as
   Hugging Face's ``DataCollatorForLanguageModeling`` does, not an exact count of
   ``round(mask_prob * n)``), so the number chosen among n candidates is
   Binomial(n, mask_prob) and a short row may get none.
2. *What they become.* Each chosen position independently becomes ``mask_id`` with
   probability ``replace_probs[0]`` (0.8), a random token with probability
   ``replace_probs[1]`` (0.1), or keeps its id with probability ``replace_probs[2]``
   (0.1). One uniform u per position decides: u < p0 masks, p0 <= u < p0 + p1
   replaces (the same distribution as the collator's two scaled Bernoulli draws).
   A random token is uniform over the ids in [0, V) that are not reserved, so it is
   never a special id, the mask or the pad (the collator draws from the whole
   vocabulary, specials included).
3. *Labels.* ``labels`` holds the original id at every chosen position (whatever it
   became) and ``IGNORE_INDEX`` (-100) everywhere else, so a cross-entropy with
   ``ignore_index=-100`` scores exactly the chosen positions.

Whole-word masking (``word_starts`` (B, T) bool, True at the first sub-token of each
word): a word runs from a start to the position before the next start, or before the
next reserved id, or to the end of the row. A non-reserved token at the start of a row
or right after a reserved one also begins a word, whatever ``word_starts`` says there
(the collator does the same), and ``word_starts`` at a reserved position is ignored.
Each word is chosen as a unit with probability ``mask_prob``, and all its sub-tokens
are chosen with it; step 2 then decides per sub-token, independently, as in the
original ``DataCollatorForWholeWordMask``. (The current collator forces
``mask_replace_prob=1`` under whole-word masking; ``replace_probs=(1.0, 0.0, 0.0)``
gives that behaviour here.)

Random draws, in this order: ``rng.random((B, T))`` for step 1 (read at word starts
only under whole-word masking), ``rng.random((B, T))`` for step 2, and, when a
non-reserved id exists, ``rng.integers(0, n_allowed, size=(B, T))`` for the random
tokens. The amount drawn does not depend on the values of ``ids``.

Sentence pairs (BERT's next-sentence prediction, ALBERT's sentence order): ``sentence_pairs``
-------------------------------------------------------------------------------------------

``segments`` is a list of token sequences in corpus order (sentences, lines or
chunks), with optional ``doc_ids`` (one per segment, non-decreasing) naming the
document of each. A pair starts at segment i whose successor i + 1 is in the same
document (with no ``doc_ids``, any i < len(segments) - 1).

- ``kind="nsp"`` (BERT): A = segment i; with probability 1/2, B = segment i + 1 and
  the label is 0 ("B is a continuation of A"); otherwise B is a segment drawn
  uniformly from another document (with no ``doc_ids``: from every segment but i and
  i + 1) and the label is 1 ("B is random"). These are the values Hugging Face's
  ``BertForPreTraining`` expects as ``next_sentence_label``.
- ``kind="sop"`` (ALBERT): the two consecutive segments i and i + 1, in order with
  label 0, or swapped with probability 1/2 and label 1, as ``AlbertForPreTraining``'s
  ``sentence_order_label`` expects.

Each pair is packed as ``[CLS] A [SEP] B [SEP]`` and padded with ``pad_id`` to
``max_length``; ``token_type_ids`` is 0 over ``[CLS] A [SEP]`` and 1 over ``B [SEP]``
(0 on padding), ``attention_mask`` is 1 on the packed tokens and 0 on padding.
When A and B together exceed ``max_length - 3`` tokens they are truncated as
BERT's ``create_pretraining_data.py`` does: one token at a time from the longer of the
two (from B when they are equally long), each time from its front or its back with
probability 1/2. The number taken from each side's front is drawn at once as
Binomial(k, 1/2) for the k tokens that side loses: the same distribution, fewer draws.

Replaced-token detection (ELECTRA's discriminator): ``replaced_token_labels``
-----------------------------------------------------------------------------

The discriminator reads the original ids with every masked position replaced by the
generator's sample there; its label is 1 where that token differs from the original
and 0 elsewhere, so a sample that happens to equal the original counts as original.

Batches from the built-in corpus: ``pretraining_batches``
---------------------------------------------------------

``pretraining_batches(tokenizer, objective, ...)`` encodes ``default_corpus`` (or a
given text) with any tokenizer that has ``encode(text) -> list[int]`` and yields dicts
of int64 arrays named as Hugging Face's pre-training models take them. The special
ids come from ``special_ids_for(tokenizer)``: the tokenizer's own ``cls_token_id``,
``sep_token_id``, ``mask_token_id`` and ``pad_token_id`` when it has all four, else four
new ids after its vocabulary (the model's ``vocab_size`` is then ``tokenizer.vocab_size + 4``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..nn.lm import IGNORE_INDEX
from ..ops._checks import check_count, check_int, check_ndim, check_real, check_shape
from .corpus import default_corpus, token_stream

__all__ = ["mask_tokens", "sentence_pairs", "PairBatch", "replaced_token_labels", "SpecialIds",
           "special_ids_for", "pretraining_batches", "word_starts_for", "IGNORE_INDEX", "OBJECTIVES"]

OBJECTIVES = ("mlm", "wwm", "nsp", "sop")


# -- argument checks -----------------------------------------------------------------------

def _check_rng(op: str, rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_token_array(op: str, name: str, x: object, vocab_size: Optional[int]) -> np.ndarray:
    """A (B, T) integer array with ids in [0, vocab_size) (or >= 0 when vocab_size is None)."""
    check_int(op, name, x)
    check_ndim(op, name, x, 2)
    if x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            want = "ids >= 0" if vocab_size is None else f"ids in [0, {vocab_size})"
            raise ValueError(f"{op}: argument '{name}' expected {want}, got values in [{lo}, {hi}]")
    return x


def _check_bool_array(op: str, name: str, x: object, shape: Tuple[int, ...]) -> np.ndarray:
    if not isinstance(x, np.ndarray) or type(x) is not np.ndarray:
        raise TypeError(f"{op}: argument '{name}' expected a numpy.ndarray of dtype bool, got {type(x).__name__}")
    if x.dtype != np.bool_:
        raise TypeError(f"{op}: argument '{name}' expected dtype bool, got {x.dtype}")
    check_shape(op, name, x, shape)
    return x


def _check_id(op: str, name: str, value: object, vocab_size: Optional[int]) -> int:
    return check_count(op, name, value, lo=0, hi=None if vocab_size is None else vocab_size - 1)


def _check_id_set(op: str, name: str, values: object, vocab_size: int) -> Tuple[int, ...]:
    if isinstance(values, (str, bytes, bytearray, dict, np.ndarray)) or not isinstance(values, Iterable):
        raise TypeError(f"{op}: argument '{name}' expected a tuple, list or set of integer ids, "
                        f"got {type(values).__name__}")
    return tuple(sorted({_check_id(op, name, v, vocab_size) for v in values}))


def _check_replace_probs(op: str, probs: object) -> Tuple[float, float, float]:
    if not isinstance(probs, (tuple, list)) or len(probs) != 3:
        raise TypeError(f"{op}: argument 'replace_probs' expected a tuple of 3 probabilities "
                        f"(mask, random, keep), got {probs!r:.60}")
    p = tuple(check_real(op, "replace_probs", v, lo=0.0, hi=1.0) for v in probs)
    if abs(sum(p) - 1.0) > 1e-9:
        raise ValueError(f"{op}: argument 'replace_probs' expected probabilities summing to 1, "
                         f"got {probs!r} (sum {sum(p)!r})")
    return p


# -- masked language modelling --------------------------------------------------------------

def mask_tokens(ids: np.ndarray, *, rng: np.random.Generator, vocab_size: int, mask_id: int,
                special_ids: Iterable[int] = (), mask_prob: float = 0.15,
                replace_probs: Sequence[float] = (0.8, 0.1, 0.1), word_starts: Optional[np.ndarray] = None,
                pad_id: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """BERT's masked-LM corruption of ``ids``; see the module doc for the rules and the draws.

    ids: (B, T) integer in [0, V)  ->  inputs: (B, T) int64, labels: (B, T) int64 (original id or -100)
    word_starts: None, or (B, T) bool marking the first sub-token of each word (whole-word masking).
    """
    op = "mask_tokens"
    _check_rng(op, rng)
    V = check_count(op, "vocab_size", vocab_size, lo=1)
    _check_token_array(op, "ids", ids, V)
    mask_id = _check_id(op, "mask_id", mask_id, V)
    special = _check_id_set(op, "special_ids", special_ids, V)
    mask_prob = check_real(op, "mask_prob", mask_prob, lo=0.0, hi=1.0)
    p_mask, p_random, _ = _check_replace_probs(op, replace_probs)
    if word_starts is not None:
        _check_bool_array(op, "word_starts", word_starts, ids.shape)
    if pad_id is not None:
        pad_id = _check_id(op, "pad_id", pad_id, V)

    B, T = ids.shape
    reserved = np.array(sorted(set(special) | {mask_id} | ({pad_id} if pad_id is not None else set())),
                        dtype=np.int64)
    candidate = ~np.isin(ids, reserved)  # (B, T) positions that may be chosen

    # 1. which positions: a Bernoulli(mask_prob) per position, or per word.
    draw = rng.random((B, T)) < mask_prob  # (B, T)
    if word_starts is None:
        chosen = candidate & draw
    else:
        before = np.zeros((B, T), dtype=bool)  # was the previous position a candidate?
        before[:, 1:] = candidate[:, :-1]
        begins = candidate & (word_starts | ~before)  # (B, T) first sub-token of each word
        positions = np.broadcast_to(np.arange(T), (B, T))
        start = np.maximum.accumulate(np.where(begins, positions, -1), axis=1)  # (B, T) its word's start
        word_drawn = np.take_along_axis(draw & begins, np.maximum(start, 0), axis=1)
        chosen = candidate & word_drawn  # every candidate has start >= 0: the row begins a word

    # 2. what each chosen position becomes: mask / random token / kept.
    u = rng.random((B, T))
    to_mask = chosen & (u < p_mask)
    to_random = chosen & (u >= p_mask) & (u < p_mask + p_random)
    inputs = ids.astype(np.int64, copy=True)
    inputs[to_mask] = mask_id
    allowed = np.setdiff1d(np.arange(V, dtype=np.int64), reserved)  # never a special, mask or pad id
    if allowed.size:
        random_tokens = allowed[rng.integers(0, allowed.size, size=(B, T))]
        inputs[to_random] = random_tokens[to_random]

    # 3. labels: the original id where chosen, ignored elsewhere.
    labels = np.where(chosen, ids.astype(np.int64, copy=False), np.int64(IGNORE_INDEX))
    return inputs, labels


# -- sentence pairs --------------------------------------------------------------------------

class PairBatch(NamedTuple):
    """Packed sentence pairs, P of them, each padded to L = max_length.

    input_ids (P, L), token_type_ids (P, L), attention_mask (P, L), labels (P,) (0 or 1),
    sources (P, 2): the segment indices of the first and the second part, as placed.
    """
    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    sources: np.ndarray


def _check_segments(op: str, segments: object) -> list:
    if not isinstance(segments, (list, tuple)):
        raise TypeError(f"{op}: argument 'segments' expected a list of token sequences, got {type(segments).__name__}")
    out = []
    for i, seg in enumerate(segments):
        try:
            arr = token_stream(op, "segments", seg)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (segment {i})") from None
        if arr.size == 0:
            raise ValueError(f"{op}: argument 'segments' expected non-empty segments, got an empty one at {i}")
        if arr.min() < 0:
            raise ValueError(f"{op}: argument 'segments' expected ids >= 0, got {arr.min()} in segment {i}")
        out.append(arr)
    return out


def _truncation(len_a: np.ndarray, len_b: np.ndarray, budget: int) -> Tuple[np.ndarray, np.ndarray]:
    """How many tokens A and B each lose when BERT trims the longer one (B on a tie) until la + lb <= budget.

    After |la - lb| tokens from the longer side the two are equal; from then on B, A, B, A, ... lose one each.
    """
    excess = np.maximum(len_a + len_b - budget, 0)
    gap = np.abs(len_a - len_b)
    first = np.minimum(excess, gap)  # from the longer side
    rest = excess - first  # alternating, B first
    cut_a = np.where(len_a > len_b, first, 0) + rest // 2
    cut_b = np.where(len_a > len_b, 0, first) + (rest + 1) // 2
    return cut_a, cut_b


def sentence_pairs(segments: Sequence[Sequence[int]], *, rng: np.random.Generator, kind: str = "nsp",
                   max_length: int = 128, cls_id: int, sep_id: int, pad_id: int,
                   doc_ids: Optional[Sequence[int]] = None, n_pairs: Optional[int] = None) -> PairBatch:
    """NSP or SOP pairs packed as ``[CLS] A [SEP] B [SEP]``; see the module doc for the rules.

    segments: N token sequences, each non-empty; doc_ids: None or (N,) non-decreasing integers.
    n_pairs: None for one pair per valid start i in order, else that many starts drawn uniformly
    (with replacement) from the valid ones.  ->  PairBatch of P pairs, each of length L = max_length.

    Draws, in order: the starts (only when ``n_pairs`` is given), ``rng.random(P)`` for the coin,
    ``rng.integers`` for NSP's random partners (P of them, used only where the coin says so), then
    ``rng.binomial`` for the fronts trimmed from A and from B.
    """
    op = "sentence_pairs"
    _check_rng(op, rng)
    if not isinstance(kind, str) or kind not in ("nsp", "sop"):
        raise ValueError(f"{op}: argument 'kind' expected 'nsp' or 'sop', got {kind!r:.40}")
    L = check_count(op, "max_length", max_length, lo=5)
    cls_id = _check_id(op, "cls_id", cls_id, None)
    sep_id = _check_id(op, "sep_id", sep_id, None)
    pad_id = _check_id(op, "pad_id", pad_id, None)
    segs = _check_segments(op, segments)
    N = len(segs)
    if doc_ids is None:
        docs = np.zeros(N, dtype=np.int64)
    else:
        docs = token_stream(op, "doc_ids", doc_ids)
        if len(docs) != N:
            raise ValueError(f"{op}: argument 'doc_ids' expected {N} entries (one per segment), got {len(docs)}")
        if N and np.any(np.diff(docs) < 0):
            raise ValueError(f"{op}: argument 'doc_ids' expected non-decreasing document ids "
                             "(each document's segments together, in order)")
    if n_pairs is not None:
        n_pairs = check_count(op, "n_pairs", n_pairs, lo=1)

    starts = np.flatnonzero(docs[:-1] == docs[1:]) if N >= 2 else np.zeros(0, dtype=np.int64)
    if starts.size == 0:
        raise ValueError(f"{op}: argument 'segments' expected at least two consecutive segments of one document, "
                         f"got {N} segments")
    if kind == "nsp":
        if doc_ids is None and N < 3:
            raise ValueError(f"{op}: argument 'segments' expected at least 3 segments for kind 'nsp' "
                             f"(a random partner other than A and its successor), got {N}")
        if doc_ids is not None and docs[0] == docs[-1]:
            raise ValueError(f"{op}: argument 'doc_ids' expected at least two documents for kind 'nsp' "
                             "(a random partner from another document), got one")

    first = starts if n_pairs is None else starts[rng.integers(0, starts.size, size=n_pairs)]  # (P,) segment i
    P = first.size
    flip = rng.random(P) < 0.5  # (P,) NSP: random partner; SOP: swapped
    labels = flip.astype(np.int64)
    if kind == "nsp":
        doc_lo = np.searchsorted(docs, docs[first], side="left")  # (P,) the document of A: [lo, hi)
        doc_hi = np.searchsorted(docs, docs[first], side="right")
        if doc_ids is None:  # every segment but i and i + 1
            doc_lo, doc_hi = first, first + 2
        k = rng.integers(0, N - (doc_hi - doc_lo))  # (P,) an index among the others ...
        other = np.where(k < doc_lo, k, k + (doc_hi - doc_lo))  # ... skipping A's block
        a_idx, b_idx = first, np.where(flip, other, first + 1)
    else:
        a_idx = np.where(flip, first + 1, first)
        b_idx = np.where(flip, first, first + 1)

    len_a = np.array([segs[i].size for i in a_idx], dtype=np.int64)
    len_b = np.array([segs[i].size for i in b_idx], dtype=np.int64)
    cut_a, cut_b = _truncation(len_a, len_b, L - 3)
    front_a = rng.binomial(cut_a, 0.5)  # (P,) of A's lost tokens, how many from its front
    front_b = rng.binomial(cut_b, 0.5)

    input_ids = np.full((P, L), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((P, L), dtype=np.int64)
    attention_mask = np.zeros((P, L), dtype=np.int64)
    for p in range(P):
        a = segs[a_idx[p]][front_a[p]: len_a[p] - (cut_a[p] - front_a[p])]
        b = segs[b_idx[p]][front_b[p]: len_b[p] - (cut_b[p] - front_b[p])]
        packed = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]])
        input_ids[p, : packed.size] = packed
        token_type_ids[p, a.size + 2: packed.size] = 1
        attention_mask[p, : packed.size] = 1
    sources = np.stack([a_idx, b_idx], axis=1).astype(np.int64) if P else np.zeros((0, 2), dtype=np.int64)
    return PairBatch(input_ids, token_type_ids, attention_mask, labels, sources)


# -- replaced-token detection -------------------------------------------------------------------

def replaced_token_labels(inputs: np.ndarray, generator_samples: np.ndarray,
                          mask_positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """ELECTRA's discriminator input and labels.

    inputs: (B, T) the original ids; mask_positions: (B, T) bool, the positions the generator filled;
    generator_samples: (B, T) (read at the masked positions only) or (K,) with K = mask_positions.sum(),
    the samples in row-major order of the masked positions.
    ->  disc_inputs: (B, T) int64 (inputs, with the samples at the masked positions),
        labels: (B, T) int64, 1 where disc_inputs != inputs, else 0.
    """
    op = "replaced_token_labels"
    _check_token_array(op, "inputs", inputs, None)
    _check_bool_array(op, "mask_positions", mask_positions, inputs.shape)
    K = int(mask_positions.sum())
    check_int(op, "generator_samples", generator_samples)
    if generator_samples.shape != inputs.shape and generator_samples.shape != (K,):
        raise ValueError(f"{op}: argument 'generator_samples' expected shape {tuple(inputs.shape)} or ({K},) "
                         f"(one per masked position), got {tuple(generator_samples.shape)}")
    samples = generator_samples[mask_positions] if generator_samples.shape == inputs.shape else generator_samples
    if samples.size and samples.min() < 0:
        raise ValueError(f"{op}: argument 'generator_samples' expected ids >= 0 at the masked positions, "
                         f"got {samples.min()}")
    disc_inputs = inputs.astype(np.int64, copy=True)
    disc_inputs[mask_positions] = samples
    labels = (disc_inputs != inputs).astype(np.int64)
    return disc_inputs, labels


# -- batches from the corpus -------------------------------------------------------------------

class SpecialIds(NamedTuple):
    """The ids of [CLS], [SEP], [MASK] and [PAD], and the model vocabulary size that holds them."""
    cls: int
    sep: int
    mask: int
    pad: int
    vocab_size: int


def _tokenizer_size(op: str, tokenizer: object) -> Optional[int]:
    size = getattr(tokenizer, "vocab_size", None)
    if size is None:
        return None
    return check_count(op, "tokenizer", size, lo=1)


def special_ids_for(tokenizer: object) -> SpecialIds:
    """The tokenizer's own special ids (``cls_token_id`` ...) if it has all four, else four new ones after it."""
    return _special_ids("special_ids_for", tokenizer)


def _check_tokenizer(op: str, tokenizer: object) -> object:
    if isinstance(tokenizer, (str, bytes, bytearray)) or not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"{op}: argument 'tokenizer' expected an object with encode(text) -> list[int], "
                        f"got {type(tokenizer).__name__}")
    return tokenizer


def _special_ids(op: str, tokenizer: object) -> SpecialIds:
    _check_tokenizer(op, tokenizer)
    names = ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id")
    own = [getattr(tokenizer, n, None) for n in names]
    size = _tokenizer_size(op, tokenizer)
    if all(v is not None for v in own):
        ids = [check_count(op, "tokenizer", v, lo=0) for v in own]
        if len(set(ids)) != 4:
            raise ValueError(f"{op}: argument 'tokenizer' expected four distinct special ids, got {ids}")
        return SpecialIds(*ids, vocab_size=max(size or 0, max(ids) + 1))
    if size is None:
        raise TypeError(f"{op}: argument 'tokenizer' expected a 'vocab_size' or all of {names}, has neither")
    return SpecialIds(size, size + 1, size + 2, size + 3, size + 4)


def word_starts_for(tokenizer: object, ids: np.ndarray) -> np.ndarray:
    """(N,) bool: True where token t begins a word of the 1-d stream ``ids``.

    A tokenizer with ``word_starts(ids)`` (npformer.hf's: WordPiece's "##", SentencePiece's "▁")
    decides itself. Otherwise a token begins a word when its text (``tokenizer.decode([id])``) begins
    with whitespace, or when the previous token's text ends with whitespace, or t = 0: "dog." is one
    word, " dog" begins one.
    """
    op = "word_starts_for"
    if isinstance(tokenizer, (str, bytes, bytearray)) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"{op}: argument 'tokenizer' expected an object with decode(ids) -> str, "
                        f"got {type(tokenizer).__name__}")
    ids = token_stream(op, "ids", ids)
    if callable(getattr(tokenizer, "word_starts", None)):  # a tokenizer that knows its pieces' word marks
        return np.asarray(tokenizer.word_starts(ids), dtype=bool)
    values, inverse = np.unique(ids, return_inverse=True)
    texts = [tokenizer.decode([int(v)]) for v in values]
    opens = np.array([t[:1].isspace() for t in texts], dtype=bool)[inverse]
    closes = np.array([t[-1:].isspace() for t in texts], dtype=bool)[inverse]
    starts = opens.copy()
    if ids.size:
        starts[0] = True
        starts[1:] |= closes[:-1]
    return starts


def _corpus_segments(tokenizer, text: str) -> Tuple[list, np.ndarray]:
    """The non-blank lines of ``text`` as encoded segments; a blank line separates two documents."""
    segments, docs = [], []
    for d, paragraph in enumerate(text.split("\n\n")):
        for line in paragraph.split("\n"):
            if line.strip():
                ids = list(tokenizer.encode(line.strip()))
                if ids:
                    segments.append(ids)
                    docs.append(d)
    return segments, np.array(docs, dtype=np.int64)


def pretraining_batches(tokenizer: object, objective: str, *, rng: np.random.Generator, batch_size: int = 8,
                        max_length: int = 64, specials: Optional[SpecialIds] = None, text: Optional[str] = None,
                        max_bytes: int = 1 << 16, mask_prob: float = 0.15,
                        replace_probs: Sequence[float] = (0.8, 0.1, 0.1),
                        n_batches: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Batches of the built-in corpus (or ``text``) for one objective, as dicts of int64 arrays.

    objective "mlm" / "wwm": windows of L - 2 tokens drawn uniformly from the encoded text, packed as
    ``[CLS] window [SEP]`` and masked by ``mask_tokens`` (whole words for "wwm", word starts from
    ``word_starts_for``): keys input_ids, token_type_ids, attention_mask, labels, all (B, L).
    objective "nsp" / "sop": ``sentence_pairs`` of the text's lines (documents split at blank lines),
    also masked for MLM: the same keys plus next_sentence_label / sentence_order_label (B,).
    ELECTRA's generator takes the "mlm" batches; the positions it fills are ``labels != IGNORE_INDEX``.

    The text is encoded once, here, before the first batch; ``n_batches=None`` yields forever.
    """
    op = "pretraining_batches"
    _check_tokenizer(op, tokenizer)
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"{op}: argument 'objective' expected one of {OBJECTIVES}, got {objective!r:.40}")
    _check_rng(op, rng)
    B = check_count(op, "batch_size", batch_size, lo=1)
    L = check_count(op, "max_length", max_length, lo=5)
    if specials is None:
        specials = _special_ids(op, tokenizer)
    elif not isinstance(specials, SpecialIds):
        raise TypeError(f"{op}: argument 'specials' expected a SpecialIds, got {type(specials).__name__}")
    if text is None:
        text = default_corpus(check_count(op, "max_bytes", max_bytes, lo=1))
    elif not isinstance(text, str):
        raise TypeError(f"{op}: argument 'text' expected a str, got {type(text).__name__}")
    mask_prob = check_real(op, "mask_prob", mask_prob, lo=0.0, hi=1.0)
    replace_probs = _check_replace_probs(op, replace_probs)
    if n_batches is not None:
        n_batches = check_count(op, "n_batches", n_batches, lo=0)
    if objective == "wwm" and not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"{op}: argument 'tokenizer' expected decode(ids) -> str for objective 'wwm'")

    S = specials
    masking = dict(vocab_size=S.vocab_size, mask_id=S.mask, special_ids=(S.cls, S.sep, S.pad), pad_id=S.pad,
                   mask_prob=mask_prob, replace_probs=replace_probs)
    if objective in ("mlm", "wwm"):
        stream = token_stream(op, "tokenizer", tokenizer.encode(text))
        W = L - 2  # window length inside [CLS] ... [SEP]
        if stream.size < W:
            raise ValueError(f"{op}: argument 'max_length' expected at most {stream.size + 2} "
                             f"(the text has {stream.size} tokens), got {L}")
        starts_of_words = word_starts_for(tokenizer, stream) if objective == "wwm" else None

        def windows() -> Iterator[Dict[str, np.ndarray]]:
            count = 0
            while n_batches is None or count < n_batches:
                count += 1
                at = rng.integers(0, stream.size - W + 1, size=B)[:, None] + np.arange(W)  # (B, W)
                ids = np.empty((B, L), dtype=np.int64)
                ids[:, 0], ids[:, 1:-1], ids[:, -1] = S.cls, stream[at], S.sep
                word_starts = None
                if starts_of_words is not None:
                    word_starts = np.zeros((B, L), dtype=bool)
                    word_starts[:, 1:-1] = starts_of_words[at]
                inputs, labels = mask_tokens(ids, rng=rng, word_starts=word_starts, **masking)
                yield {"input_ids": inputs, "token_type_ids": np.zeros((B, L), dtype=np.int64),
                       "attention_mask": np.ones((B, L), dtype=np.int64), "labels": labels}

        return windows()

    segments, docs = _corpus_segments(tokenizer, text)
    label_name = "next_sentence_label" if objective == "nsp" else "sentence_order_label"
    # One check now, so that a text too short for pairs fails here rather than at the first batch.
    sentence_pairs(segments, rng=np.random.default_rng(0), kind=objective, max_length=L,
                   cls_id=S.cls, sep_id=S.sep, pad_id=S.pad, doc_ids=docs, n_pairs=1)

    def pairs() -> Iterator[Dict[str, np.ndarray]]:
        count = 0
        while n_batches is None or count < n_batches:
            count += 1
            batch = sentence_pairs(segments, rng=rng, kind=objective, max_length=L, cls_id=S.cls, sep_id=S.sep,
                                   pad_id=S.pad, doc_ids=docs, n_pairs=B)
            inputs, labels = mask_tokens(batch.input_ids, rng=rng, **masking)
            yield {"input_ids": inputs, "token_type_ids": batch.token_type_ids,
                   "attention_mask": batch.attention_mask, "labels": labels, label_name: batch.labels}

    return pairs()
