"""Decoding for encoder-decoders: greedy search, beam search and sampling, always with the KV caches.

The three functions drive any model that offers the encoder-decoder interface (``model.encode``,
``model.make_decoder_caches``, ``model.decode`` and a ``cfg`` with ``vocab_size``, ``pad_token_id``,
``eos_token_id`` and ``decoder_start_token_id``; Transformer, T5 and BART of ``npformer.models``).
The source is encoded once; the decoder then sees one new token per step and continues its
self-attention caches, so a step costs one position, not the whole prefix. The model runs in
eval mode and is put back in its former mode afterwards.

Every output row starts with ``decoder_start_token_id``; its length counts that token, so
``max_new_tokens`` tokens at most follow it.

Shared rules (the logits processors, applied in the order below, in all three functions)
---------------------------------------------------------------------------------------

- **No repeated n-gram** (``no_repeat_ngram_size`` n >= 1): before each new token, the row's ids so
  far (the decoder start token included, as it is the decoder's prompt) are read as n-grams; every
  earlier n-gram whose first n - 1 ids equal the row's last n - 1 ids bans its last id (logit
  -inf). So no n-gram ever occurs twice in a row (``banned_ngram_tokens``).
- **Minimum length** (``min_new_tokens`` m): the stop ids get logit -inf while fewer than m tokens
  have been added.
- **Forced first and last tokens** (``forced_bos_token_id``, ``forced_eos_token_id``; None by default,
  as a model config holds neither): the first new token, and the token at the maximum length
  1 + ``max_new_tokens``, get score 0 and every other token -inf (Hugging Face's
  ForcedBOS/ForcedEOS processors, which BART's config.json turns on: pass the folder's values,
  e.g. from its config.json, to decode as ``generate`` does).
- **Stopping**: a row (or a beam) that adds one of the stop ids (``eos_token_id``: an id or a list
  of ids; the config's by default; None in the config means "never stop") is finished.

Greedy and sampling
-------------------

Each step takes the processed logits of every row: greedy keeps the most likely token (the lowest
id among ties); ``sample`` draws with ``npformer.generate``'s temperature, top-k and top-p (one
inverse-CDF draw per row; temperature 0 is greedy). A finished row gets ``pad_token_id`` at every
later position; decoding ends when every row is finished or ``max_new_tokens`` tokens were added,
so the output is (B, 1 + n) with n <= ``max_new_tokens``: the output of Hugging Face's ``generate``.

Beam search (Hugging Face's ``generate(num_beams=N, do_sample=False)``)
----------------------------------------------------------------------

Per source row, N running beams (the unfinished prefixes) and N hypothesis slots (finished
sequences with their scores), kept as follows. A beam's score is the sum of the processed log
probabilities of its tokens: log-softmax of the model's logits (computed in float64 here, float32
in Hugging Face), then the processors above, with no renormalisation after a ban.

1. Start: one beam of score 0 and N - 1 copies of it at -1e9 (so that the first step draws from
   one beam only); every slot empty at score -1e9.
2. Each step, every beam's score plus each token's log probability gives N * V candidates; the
   K = max(2, 1 + number of stop ids) * N best are kept, sorted by score (the lower flat index
   beam * V + token first among ties).
3. A candidate "hits" when its token is a stop id, or when it reaches the maximum length
   1 + ``max_new_tokens`` (then every candidate hits).
4. The next running beams are the N best candidates after -1e9 is added to every hit.
5. Only a hit among the first N of the K candidates can become a hypothesis. Its score is the
   candidate's summed log probability divided by ``L ** length_penalty``, with L the number of
   tokens it has after the decoder start token (the stop id included; the start token not
   counted). -1e9 is added to it as well when the row can no longer take hypotheses (all N
   slots full and ``early_stopping`` is True, or the row is "done", below), and to every
   candidate that is not such a hit. The slots and the K scored candidates are merged and the
   N best kept (so a better hypothesis pushes out the worst one; an unfilled slot stays at -1e9).
6. The caches follow the beams: for each (self, cross) cache pair c, ``c.k[...] = c.k[index]``
   and ``c.v[...] = c.v[index]``, with index the flat row (source * N + beam) each new running
   beam came from. The cross caches of one source are equal across its beams, so reordering
   them changes nothing.
7. A row is "done" (it stays done) when all its N slots hold hypotheses and its best running
   beam cannot beat its worst hypothesis, judged as best running score / L' ** length_penalty
   with L' = the number of tokens added so far, or, for ``early_stopping="never"`` with a
   positive length penalty, L' = ``max_new_tokens`` (the most favourable length).
8. The search ends when every row is done, or when ``early_stopping`` is True and every slot of
   every row holds a hypothesis, or when every kept candidate hits (the maximum length).

So ``early_stopping=True`` stops a row's search as soon as it has N hypotheses; False stops it when
the heuristic of 7 says that no running beam can improve on them; "never" uses the optimistic
length of 7. A hypothesis can only come from the top N of the K candidates, as in Hugging Face.

The -1e9 copies of 1. rank below every allowed candidate of the first beam, so they take part only
when the first step offers fewer than N allowed tokens that are not stop ids (a tiny vocabulary,
as with N near V ** max_new_tokens). Then their hypotheses score about -1e9 / L ** length_penalty,
which beats an empty slot's -1e9 when the length penalty is positive, so with
``early_stopping=True`` they can fill the slots and end a search before a better, longer sequence
is reached (Hugging Face behaves the same).

The output: the first ``num_return_sequences`` slots of each row, best first, as rows of
``B * num_return_sequences`` ids (the rows of one source together), cropped to 1 + the longest
returned hypothesis. Each position after a hypothesis's end holds ``pad_token_id``, or the first
stop id when ``pad_token_id`` is 0 (Hugging Face fills its beam output with ``pad or eos``, so a
T5 beam output pads with its eos id 1, unlike its greedy output). The scores are the slots'
length-penalised scores (``sequences_scores`` in Hugging Face). With ``num_beams=1`` the search
is greedy decoding (as ``generate`` does), and the score is the greedy sequence's summed
processed log probability over its length ** ``length_penalty``.

Checks: every argument is checked by name before any work; a model without the interface is
refused by name; logits with a NaN or +inf (or a row with no finite logit) raise
``npformer.generate.NonFiniteLogitsError`` instead of being decoded. Sampling refuses a row whose
every token is banned (a small vocabulary with ``no_repeat_ngram_size``); greedy takes the lowest
id there (an argmax over -inf), and beam search scores such candidates -inf.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .generate import NonFiniteLogitsError, _check_model_logits, _check_options, _check_rng, _sample
from .ops._checks import check_array, check_count, check_int, check_ndim, check_real, check_shape

__all__ = ["greedy", "beam_search", "sample", "banned_ngram_tokens", "NonFiniteLogitsError"]

# A score that takes a beam or a candidate out of the running (as Hugging Face's beam search).
_OUT = -1.0e9


# -- processors ------------------------------------------------------------------------------------
def banned_ngram_tokens(ids: np.ndarray, ngram_size: int, vocab_size: int) -> np.ndarray:
    """The tokens each row may not add without repeating one of its n-grams: (B, T) ids -> (B, V) bool.

    A token t is banned for row b when some earlier window ids[b, i : i + n] has its first n - 1 ids
    equal to the row's last n - 1 ids and its last id equal to t. For n = 1 every id already in
    the row is banned. Ids outside [0, V) ban nothing.
    """
    op = "banned_ngram_tokens"
    check_int(op, "ids", ids)
    check_ndim(op, "ids", ids, 2)
    n = check_count(op, "ngram_size", ngram_size, lo=1)
    V = check_count(op, "vocab_size", vocab_size, lo=1)
    return _banned_ngrams(ids, n, V)


def _banned_ngrams(ids: np.ndarray, n: int, V: int) -> np.ndarray:
    B, T = ids.shape
    banned = np.zeros((B, V + 1), bool)  # column V collects the windows that ban nothing
    if T < n:  # no complete n-gram yet
        return banned[:, :V]
    windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)  # (B, T - n + 1, n)
    prefix = ids[:, T - (n - 1):]  # (B, n - 1) the row's last n - 1 ids (empty for n = 1)
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(axis=-1)  # (B, T - n + 1)
    last = windows[:, :, -1]
    target = np.where(matches & (last >= 0) & (last < V), last, V)
    banned[np.arange(B)[:, None], target] = True
    return banned[:, :V]


class _Rules(NamedTuple):
    """The logits processors' settings of one call (see the module's notes)."""

    ngram: int  # no_repeat_ngram_size, 0: off
    stops: Optional[np.ndarray]  # the stop ids, or None
    min_new_tokens: int
    max_new_tokens: int
    forced_bos: Optional[int]
    forced_eos: Optional[int]

    def forced(self, added: int) -> Optional[int]:
        """The token forced as new token number ``added`` (from 0), or None; the last token's eos wins over
        the first token's bos when both fall on one step (max_new_tokens = 1), as Hugging Face's order does."""
        if added == self.max_new_tokens - 1 and self.forced_eos is not None:
            return self.forced_eos
        if added == 0 and self.forced_bos is not None:
            return self.forced_bos
        return None


def _process(scores: np.ndarray, ids: np.ndarray, added: int, rules: _Rules) -> np.ndarray:
    """In place on float64 scores (B, V): the n-gram ban, the minimum length, then the forced tokens
    (see the module's notes)."""
    if rules.ngram:
        scores[_banned_ngrams(ids, rules.ngram, scores.shape[1])] = -np.inf
    if added < rules.min_new_tokens:
        scores[:, rules.stops] = -np.inf
    forced = rules.forced(added)
    if forced is not None:
        scores[:] = -np.inf
        scores[:, forced] = 0.0
    return scores


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Rows of float64 logits (B, V) with a finite entry each -> log probabilities."""
    shifted = z - z.max(axis=-1, keepdims=True)
    with np.errstate(under="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# -- checks ----------------------------------------------------------------------------------------
_CFG_FIELDS = ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id")
_METHODS = ("encode", "make_decoder_caches", "decode", "train", "eval")


def _check_model(op: str, model: object):
    """The model's cfg, after checking that the model offers the encoder-decoder interface."""
    missing = [m for m in _METHODS if not callable(getattr(model, m, None))]
    cfg = getattr(model, "cfg", None)
    missing += [f"cfg.{f}" for f in _CFG_FIELDS if not hasattr(cfg, f)]
    if missing:
        raise TypeError(f"{op}: argument 'model' expected an encoder-decoder model (encode, make_decoder_caches, "
                        f"decode, train/eval and cfg.{', cfg.'.join(_CFG_FIELDS)}), got {type(model).__name__} "
                        f"without {', '.join(missing)}")
    V = cfg.vocab_size
    if isinstance(V, bool) or not isinstance(V, (int, np.integer)) or V < 1:
        raise ValueError(f"{op}: argument 'model' expected cfg.vocab_size an integer >= 1, got {V!r}")
    for field in ("pad_token_id", "decoder_start_token_id"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < V:
            raise ValueError(f"{op}: argument 'model' expected cfg.{field} an id in [0, {V}), got {value!r}")
    return cfg


def _check_stops(op: str, eos_token_id: object, cfg) -> Optional[np.ndarray]:
    """The stop ids (int64, non-empty) or None: ``eos_token_id`` if given, else the config's (None: never stop)."""
    name = "eos_token_id"
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
        if eos_token_id is None:
            return None
        name = "model"  # the config's own value is wrong
    V = int(cfg.vocab_size)
    if isinstance(eos_token_id, np.ndarray):
        if eos_token_id.ndim != 1 or not np.issubdtype(eos_token_id.dtype, np.integer):
            raise ValueError(f"{op}: argument '{name}' expected an id or a 1-d integer array of ids, got "
                             f"{eos_token_id.dtype} array of shape {eos_token_id.shape}")
        eos_token_id = eos_token_id.tolist()
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    if not ids:
        raise ValueError(f"{op}: argument '{name}' expected at least one id, got an empty sequence")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{op}: argument '{name}' expected an integer id or a list of them, got {t!r}")
        if not 0 <= t < V:
            raise ValueError(f"{op}: argument '{name}' expected ids in [0, {V}), got {int(t)}")
    return np.asarray(ids, np.int64)


def _check_source(op: str, cfg, src_ids: object, src_padding_mask: object) -> None:
    check_int(op, "src_ids", src_ids)
    check_ndim(op, "src_ids", src_ids, 2)
    if src_ids.shape[0] == 0 or src_ids.shape[1] == 0:
        raise ValueError(f"{op}: argument 'src_ids' expected a non-empty source (B >= 1, S >= 1), got shape "
                         f"{src_ids.shape}")
    if src_ids.min() < 0 or src_ids.max() >= cfg.vocab_size:
        bad = src_ids.min() if src_ids.min() < 0 else src_ids.max()
        raise ValueError(f"{op}: argument 'src_ids' expected ids in [0, {cfg.vocab_size}), got {int(bad)}")
    if src_padding_mask is not None:
        check_array(op, "src_padding_mask", src_padding_mask)
        if src_padding_mask.dtype != np.bool_:
            raise ValueError(f"{op}: argument 'src_padding_mask' expected dtype bool, got {src_padding_mask.dtype}")
        check_shape(op, "src_padding_mask", src_padding_mask, src_ids.shape)


def _check_common(op: str, model, src_ids, src_padding_mask, max_new_tokens, eos_token_id, min_new_tokens,
                  no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id) -> _Rules:
    """The checks every decoding function makes; returns the call's processor settings."""
    cfg = _check_model(op, model)
    _check_source(op, cfg, src_ids, src_padding_mask)
    check_count(op, "max_new_tokens", max_new_tokens, lo=1)
    positions = getattr(cfg, "max_position", None)  # a learned or fixed position table bounds the decoder
    if isinstance(positions, int) and max_new_tokens > positions:
        raise ValueError(f"{op}: argument 'max_new_tokens' expected at most {positions} (the decoder's positions, "
                         f"cfg.max_position), got {max_new_tokens}")
    stops = _check_stops(op, eos_token_id, cfg)
    check_count(op, "min_new_tokens", min_new_tokens, lo=0)
    if min_new_tokens and stops is None:
        raise ValueError(f"{op}: argument 'min_new_tokens' expected 0 when no eos_token_id is known (it holds the "
                         f"stop ids back), got {min_new_tokens}")
    check_count(op, "no_repeat_ngram_size", no_repeat_ngram_size, lo=0)
    V = int(cfg.vocab_size)
    forced = {}
    for name, value in (("forced_bos_token_id", forced_bos_token_id), ("forced_eos_token_id", forced_eos_token_id)):
        forced[name] = None if value is None else check_count(op, name, value, lo=0, hi=V - 1)
    return _Rules(no_repeat_ngram_size, stops, min_new_tokens, max_new_tokens, forced["forced_bos_token_id"],
                  forced["forced_eos_token_id"])


# -- the decoder, one step at a time ---------------------------------------------------------------
class _Steps:
    """The source encoded once (each row repeated ``copies`` times) and the decoder's caches.

    ``step(ids)`` feeds one new token per row (R,) and returns the logits of the next one (R, V) as
    float64, refusing non-finite logits. ``reorder(index)`` makes row r's caches those of row index[r].
    """

    def __init__(self, op: str, model, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray],
                 copies: int, max_len: int):
        self.op, self.model, self.added = op, model, 0
        B, S = src_ids.shape
        self.rows, self.V = B * copies, int(model.cfg.vocab_size)
        memory = model.encode(src_ids, src_padding_mask=src_padding_mask)
        self.memory = np.repeat(memory, copies, axis=0) if copies > 1 else memory
        self.mask = None if src_padding_mask is None else np.repeat(src_padding_mask, copies, axis=0)
        self.caches = model.make_decoder_caches(self.rows, max_len, S)
        self._check_caches()

    def _check_caches(self) -> None:
        caches = self.caches
        ok = isinstance(caches, (list, tuple)) and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                isinstance(getattr(c, "k", None), np.ndarray) and isinstance(getattr(c, "v", None), np.ndarray)
                and c.k.shape[:1] == (self.rows,) and c.v.shape[:1] == (self.rows,) for c in pair)
            for pair in caches)
        if not ok:
            raise TypeError(f"{self.op}: argument 'model' expected make_decoder_caches({self.rows}, ...) to return a "
                            f"list of (self, cross) caches with arrays k, v of {self.rows} rows, got "
                            f"{type(caches).__name__}")

    def step(self, ids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # the logits are checked below
            logits = self.model.decode(ids[:, None], self.memory, self.caches, src_padding_mask=self.mask)
        if not isinstance(logits, np.ndarray) or logits.shape != (self.rows, 1, self.V):
            got = logits.shape if isinstance(logits, np.ndarray) else type(logits).__name__
            raise TypeError(f"{self.op}: argument 'model' expected decode() to return logits of shape "
                            f"({self.rows}, 1, {self.V}), got {got}")
        last = logits[:, 0].astype(np.float64)
        if not np.isfinite(last).all():
            _check_model_logits(self.op, last, self.added)
        self.added += 1
        return last

    def reorder(self, index: np.ndarray) -> None:
        for pair in self.caches:
            for c in pair:
                c.k[...] = c.k[index]
                c.v[...] = c.v[index]


def _in_eval(model, run):
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        return run()
    finally:
        model.train(was_training)


# -- greedy and sampling ---------------------------------------------------------------------------
def _extend(op, model, src_ids, src_padding_mask, rules: _Rules, choose):
    """(B, 1 + n) ids: decoder start, then one token per step from ``choose(logits, scores, i)``, given the
    step's logits (B, V) float64 and the processed ones (see the module's notes)."""
    cfg = model.cfg
    B, max_new_tokens, stops = src_ids.shape[0], rules.max_new_tokens, rules.stops
    out = np.full((B, 1 + max_new_tokens), cfg.pad_token_id, np.int64)
    out[:, 0] = cfg.decoder_start_token_id
    steps = _Steps(op, model, src_ids, src_padding_mask, 1, max_new_tokens)
    finished = np.zeros(B, bool)
    for i in range(max_new_tokens):
        logits = steps.step(out[:, i])
        scores = _process(logits.copy(), out[:, :i + 1], i, rules)
        tokens = choose(logits, scores, i)
        out[:, i + 1] = np.where(finished, cfg.pad_token_id, tokens)
        if stops is not None:
            finished |= np.isin(out[:, i + 1], stops) & ~finished
            if finished.all():
                return out[:, :i + 2]
    return out


def greedy(model, src_ids: np.ndarray, *, src_padding_mask: Optional[np.ndarray] = None, max_new_tokens: int,
           eos_token_id: Union[None, int, Sequence[int]] = None, min_new_tokens: int = 0,
           no_repeat_ngram_size: int = 0, forced_bos_token_id: Optional[int] = None,
           forced_eos_token_id: Optional[int] = None) -> np.ndarray:
    """Greedy decoding: src_ids (B, S) -> ids (B, 1 + n) int64, n <= max_new_tokens (see the module's notes)."""
    op = "decoding.greedy"
    rules = _check_common(op, model, src_ids, src_padding_mask, max_new_tokens, eos_token_id, min_new_tokens,
                          no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id)

    def choose(logits, scores, i):
        return np.argmax(scores, axis=-1)  # the lowest id among ties

    return _in_eval(model, lambda: _extend(op, model, src_ids, src_padding_mask, rules, choose))


def sample(model, src_ids: np.ndarray, *, rng: np.random.Generator, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, max_new_tokens: int,
           src_padding_mask: Optional[np.ndarray] = None, eos_token_id: Union[None, int, Sequence[int]] = None,
           min_new_tokens: int = 0, no_repeat_ngram_size: int = 0, forced_bos_token_id: Optional[int] = None,
           forced_eos_token_id: Optional[int] = None) -> np.ndarray:
    """Sampling: src_ids (B, S) -> ids (B, 1 + n) int64, one draw per row and step from ``rng``.

    temperature, top_k and top_p as ``npformer.generate`` (temperature 0 is greedy); the draws of a
    seeded generator make the output reproducible.
    """
    op = "decoding.sample"
    rules = _check_common(op, model, src_ids, src_padding_mask, max_new_tokens, eos_token_id, min_new_tokens,
                          no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id)
    _check_rng(op, rng)
    _check_options(op, temperature, top_k, top_p)

    def choose(logits, scores, i):
        hopeless = ~np.isfinite(scores).any(axis=-1)
        if hopeless.any():
            raise ValueError(f"{op}: argument 'no_repeat_ngram_size' left row {int(np.argmax(hopeless))} no token "
                             f"to draw for new token {i} (every token banned)")
        return _sample(scores, rng, temperature, top_k, top_p)

    return _in_eval(model, lambda: _extend(op, model, src_ids, src_padding_mask, rules, choose))


# -- beam search -----------------------------------------------------------------------------------
def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row of scores (R, M), largest first, lower index first on ties."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _take(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x (B, M, ...) gathered along axis 1 by index (B, k) -> (B, k, ...)."""
    return x[np.arange(x.shape[0])[:, None], index]


def beam_search(model, src_ids: np.ndarray, *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: Union[bool, str] = False, no_repeat_ngram_size: int = 0,
                num_return_sequences: int = 1, eos_token_id: Union[None, int, Sequence[int]] = None,
                min_new_tokens: int = 0, src_padding_mask: Optional[np.ndarray] = None,
                forced_bos_token_id: Optional[int] = None, forced_eos_token_id: Optional[int] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Beam search: src_ids (B, S) -> (ids (B * R, L) int64, scores (B * R,) float64), R = num_return_sequences.

    The rows of source b are ids[b * R : (b + 1) * R], best first; L <= 1 + max_new_tokens. The
    semantics (Hugging Face's, step by step) are in the module's notes.
    """
    op = "decoding.beam_search"
    rules = _check_common(op, model, src_ids, src_padding_mask, max_new_tokens, eos_token_id, min_new_tokens,
                          no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id)
    N = check_count(op, "num_beams", num_beams, lo=1)
    lp = check_real(op, "length_penalty", length_penalty)
    if not (isinstance(early_stopping, (bool, np.bool_)) or (isinstance(early_stopping, str)
                                                             and early_stopping == "never")):
        raise TypeError(f"{op}: argument 'early_stopping' expected True, False or \"never\", got {early_stopping!r}")
    early_stopping = early_stopping if isinstance(early_stopping, str) else bool(early_stopping)
    R = check_count(op, "num_return_sequences", num_return_sequences, lo=1, hi=N)
    if N == 1:
        return _in_eval(model, lambda: _greedy_scored(op, model, src_ids, src_padding_mask, rules, lp))
    return _in_eval(model, lambda: _beams(op, model, src_ids, src_padding_mask, N, lp, early_stopping, R, rules))


def _greedy_scored(op, model, src_ids, src_padding_mask, rules: _Rules, lp):
    """num_beams = 1: greedy decoding and the score of each row, sum of log probabilities / length ** lp
    (a forced token counts 0, as in beam search)."""
    stops = rules.stops
    B = src_ids.shape[0]
    total = np.zeros(B)
    length = np.zeros(B, np.int64)
    done = np.zeros(B, bool)

    def choose(logits, scores, i):
        # the processed log probabilities: log-softmax of the logits, then the processors' -inf entries
        logp = scores if rules.forced(i) is not None else np.where(np.isfinite(scores), _log_softmax(logits), -np.inf)
        tokens = np.argmax(scores, axis=-1)
        live = ~done
        total[live] += logp[live, tokens[live]]
        length[live] += 1
        if stops is not None:
            done[live & np.isin(tokens, stops)] = True
        return tokens

    ids = _extend(op, model, src_ids, src_padding_mask, rules, choose)
    return ids, total / length.astype(np.float64) ** lp


def _beams(op, model, src_ids, src_padding_mask, N, lp, early_stopping, R, rules: _Rules):
    cfg = model.cfg
    max_new_tokens, stops = rules.max_new_tokens, rules.stops
    B, V = src_ids.shape[0], int(cfg.vocab_size)
    K = max(2, 1 + (0 if stops is None else len(stops))) * N  # candidates kept per source row (2.)
    max_length = 1 + max_new_tokens
    # the fill after a hypothesis's end: pad, or the first stop id when pad is 0 (as Hugging Face)
    fill = cfg.pad_token_id if (cfg.pad_token_id or stops is None) else int(stops[0])
    steps = _Steps(op, model, src_ids, src_padding_mask, N, max_new_tokens)

    running = np.full((B, N, max_length), fill, np.int64)  # the running beams' ids
    running[:, :, 0] = cfg.decoder_start_token_id
    running_scores = np.zeros((B, N))  # summed log probabilities (1.)
    running_scores[:, 1:] = _OUT
    slots = running.copy()  # the hypotheses' ids
    slot_scores = np.full((B, N), _OUT)  # length-penalised
    slot_full = np.zeros((B, N), bool)
    slot_length = np.zeros((B, N), np.int64)  # tokens after the start token
    done = np.zeros(B, bool)  # (7.) the row cannot improve
    first_n = np.arange(K) < N
    rows = np.arange(B)[:, None]
    cur = 1  # tokens in every running beam, the start token included
    while True:
        logits = steps.step(running[:, :, cur - 1].reshape(B * N))  # (B * N, V)
        logp = _process(_log_softmax(logits), running[:, :, :cur].reshape(B * N, cur), cur - 1, rules)
        total = (logp.reshape(B, N, V) + running_scores[:, :, None]).reshape(B, N * V)
        # (2.) the K best candidates
        flat = _top(total, K)  # (B, K)
        cand_scores = _take(total, flat)
        cand_beam, cand_token = flat // V, flat % V
        cand = _take(running, cand_beam)  # (B, K, max_length)
        cand[:, :, cur] = cand_token
        # (3.) which candidates hit a stop id or the maximum length
        hits = np.isin(cand_token, stops) if stops is not None else np.zeros((B, K), bool)
        if cur + 1 >= max_length:
            hits[:] = True
        # (4.) the next running beams
        next_scores = cand_scores + np.where(hits, _OUT, 0.0)
        keep = _top(next_scores, N)
        running, running_scores = _take(cand, keep), _take(next_scores, keep)
        came_from = _take(cand_beam, keep)  # (B, N)
        # (5.) the hypotheses
        just = hits & first_n
        scored = cand_scores / float(cur) ** lp  # cur tokens after the start token
        closed = done | (slot_full.all(axis=1) & (early_stopping is True))
        scored = scored + np.where(closed, _OUT, 0.0)[:, None] + np.where(just, 0.0, _OUT)
        merged = np.concatenate([slot_scores, scored], axis=1)  # (B, N + K)
        best = _top(merged, N)
        slots = _take(np.concatenate([slots, cand], axis=1), best)
        slot_scores = _take(merged, best)
        slot_full = _take(np.concatenate([slot_full, just], axis=1), best)
        slot_length = _take(np.concatenate([slot_length, np.full((B, K), cur)], axis=1), best)
        # (6.) the caches follow the beams
        steps.reorder((rows * N + came_from).reshape(B * N))
        cur += 1
        # (7.) can the running beams still improve on the hypotheses?
        length = (max_length - 1) if (early_stopping == "never" and lp > 0.0) else (cur - 1)
        best_possible = running_scores[:, 0] / float(length) ** lp
        worst = np.where(slot_full, slot_scores.min(axis=1, keepdims=True), _OUT)
        done |= ~(best_possible[:, None] > worst).any(axis=1)
        # (8.) the end of the search
        if done.all() or (slot_full.all() and early_stopping is True) or hits.all():
            break

    ids = slots[:, :R].reshape(B * R, max_length)
    L = 1 + int(slot_length[:, :R].max())
    return ids[:, :L].copy(), slot_scores[:, :R].reshape(B * R).copy()
