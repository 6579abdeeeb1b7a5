"""Sampling from a language model: temperature, top-k, top-p, with or without a KV cache.

``generate`` works with any model that has ``forward(ids, kv_caches=None) -> (logits, _)``,
``make_kv_caches(batch, max_len=None)`` and ``cfg.block_size`` (GPT and Llama of ``npformer.models``).
The cached path feeds the prompt once, then one token per step; the uncached path
re-runs the whole (cropped) context every step. Both draw from the same generator
in the same order, so in float64 they pick the same tokens.

The options, checked before any work:

- ``temperature`` >= 0 divides the logits; 0 means greedy (the most likely token,
  the lowest id among ties), and then no random number is drawn;
- ``top_k`` >= 1 keeps the k largest logits (every token tied with the k-th too);
- ``top_p`` in [0, 1] keeps the smallest set of most likely tokens whose probability
  (after temperature and top-k) reaches ``top_p``. The most likely token is always
  kept, so ``top_p=0`` keeps it alone and ``top_p=1`` keeps everything.

Order: repetition penalty, minimum length, temperature, then top-k, then top-p, then one
inverse-CDF draw per row (greedy: the argmax after the first two).

``repetition_penalty`` p > 0 (Hugging Face's, from the CTRL paper; 1 means none) divides the
logit of every token already in the row (prompt included) by p where it is positive and
multiplies it by p where it is negative. ``min_new_tokens`` keeps the stop tokens out
(logit -inf) until that many tokens have been added.

Stopping (``stop_tokens``, e.g. a Hugging Face model's ``eos_token_id``): a row that
draws one of these ids is finished; each later position of that row is ``pad_token``
(default: the stop token it drew), and generation ends as soon as every row is
finished, so the output may be shorter than ``T0 + max_new_tokens``. Without
``stop_tokens`` exactly ``max_new_tokens`` tokens are added.

``generate`` checks the model's logits at every step it samples from (a cheap test of
the last position's row) and raises ``NonFiniteLogitsError`` on a NaN or +inf, or a row
with no finite logit, rather than sampling from them: a model with NaN weights (a
diverged run) would otherwise "sample" token 0 forever.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .ops._checks import check_bool, check_count, check_float, check_int, check_ndim, check_real


class NonFiniteLogitsError(ValueError):
    """The model gave logits that cannot be sampled from (NaN, +inf, or no finite entry in a row)."""


def _check_logits(op: str, logits: object) -> np.ndarray:
    """(B, V) float logits with V >= 1: no NaN or +inf, and a finite entry in every row (-inf masks a token)."""
    check_float(op, "logits", logits)
    check_ndim(op, "logits", logits, 2)
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: argument 'logits' expected at least one token (V >= 1), got shape {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError(f"{op}: argument 'logits' expected no NaN or +inf, got "
                         f"{int(np.isnan(logits).sum())} NaN and {int(np.isposinf(logits).sum())} +inf")
    hopeless = ~np.isfinite(logits).any(axis=-1)
    if hopeless.any():
        raise ValueError(f"{op}: argument 'logits' expected a finite logit in every row, "
                         f"got row {int(np.argmax(hopeless))} all -inf")
    return logits


def _check_model_logits(op: str, last: np.ndarray, i: int) -> None:
    """The logits (B, V) a model gave for new token ``i``: ``NonFiniteLogitsError`` if they cannot be sampled."""
    nan, posinf = int(np.isnan(last).sum()), int(np.isposinf(last).sum())
    hopeless = ~np.isfinite(last).any(axis=-1)
    if nan or posinf or hopeless.any():
        what = (f"{nan} NaN and {posinf} +inf" if nan or posinf else f"row {int(np.argmax(hopeless))} all -inf")
        raise NonFiniteLogitsError(f"{op}: the model's logits for new token {i} hold {what}, which cannot be "
                                   f"sampled from (are its weights finite? a diverged run gives NaN)")


def _check_options(op: str, temperature: object = 1.0, top_k: object = None, top_p: object = None) -> None:
    check_real(op, "temperature", temperature, lo=0.0)
    if top_k is not None:
        check_count(op, "top_k", top_k, lo=1)
    if top_p is not None:
        check_real(op, "top_p", top_p, lo=0.0, hi=1.0)


def _check_rng(op: str, rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")


def filter_logits(logits: np.ndarray, top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p.

    logits: (B, V) -> (B, V) float64 (a copy). At least one token of every row is kept.
    """
    _check_logits("filter_logits", logits)
    _check_options("filter_logits", top_k=top_k, top_p=top_p)
    return _filter(logits.astype(np.float64), top_k, top_p)


def _filter(z: np.ndarray, top_k: Optional[int], top_p: Optional[float]) -> np.ndarray:
    """``filter_logits`` on checked float64 logits ``z`` (B, V), modified in place."""
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k, None]  # (B, 1) the k-th largest
        z[z < kth] = -np.inf
    if top_p is not None and top_p < 1:
        order = np.argsort(-z, axis=-1, kind="stable")  # most likely first, lower id first among ties
        z_sorted = np.take_along_axis(z, order, axis=-1)
        with np.errstate(over="ignore", under="ignore"):
            p_sorted = np.exp(z_sorted - z_sorted[:, :1])
        p_sorted /= p_sorted.sum(axis=-1, keepdims=True)
        mass_before = np.cumsum(p_sorted, axis=-1) - p_sorted  # mass of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this token
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        z[drop] = -np.inf
    return z


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """One token id per row of logits (B, V) -> (B,) int64; temperature 0 means greedy."""
    _check_logits("sample_next", logits)
    _check_rng("sample_next", rng)
    _check_options("sample_next", temperature, top_k, top_p)
    return _sample(logits, rng, temperature, top_k, top_p)


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float,
            top_k: Optional[int], top_p: Optional[float]) -> np.ndarray:
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):  # a spread past the float range becomes -inf: probability 0
        z -= z.max(axis=-1, keepdims=True)  # <= 0, so a small temperature can only push logits towards -inf
        z /= temperature
    z = _filter(z, top_k, top_p)
    with np.errstate(under="ignore"):
        p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))  # in [0, 1)
    cdf = np.cumsum(p, -1)
    # Inverse-CDF draw: the first token whose cumulative mass exceeds u * total. As u * total < total and
    # a token of probability 0 adds no mass, the draw can never land on a filtered (-inf) token, even
    # for u = 0 or when the rounded total falls short of 1.
    return (cdf <= u * cdf[:, -1:]).sum(-1).astype(np.int64)


def generate(model, ids: np.ndarray, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             rng: Optional[np.random.Generator] = None, use_cache: bool = True,
             stop_tokens: Optional[Sequence[int]] = None, pad_token: Optional[int] = None,
             repetition_penalty: float = 1.0, min_new_tokens: int = 0, prefix: bool = False) -> np.ndarray:
    """Extend ids (B, T0) by ``max_new_tokens`` sampled tokens -> (B, T0 + max_new_tokens) int64.

    ids: a non-empty prompt per row (B >= 1, T0 >= 1) of ids in [0, vocab_size). A prompt
    longer than ``block_size`` is cropped to its last ``block_size`` tokens for the model.
    With ``stop_tokens`` (ids in [0, vocab_size)) the output ends once every row has drawn
    one (see the module's notes); ``pad_token`` fills a finished row's later positions.
    ``prefix=True`` reads the prompt as a prefix LM's prefix (ATT.18: its tokens see each other
    both ways; what follows is causal), for a model trained with ``--objective prefix``.
    """
    op = "generate"
    if not callable(getattr(model, "forward", None)) or not hasattr(getattr(model, "cfg", None), "block_size"):
        raise TypeError(f"{op}: argument 'model' expected a model with forward() and cfg.block_size, "
                        f"got {type(model).__name__}")
    check_int(op, "ids", ids)
    check_ndim(op, "ids", ids, 2)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{op}: argument 'ids' expected a non-empty prompt (B >= 1, T0 >= 1), got shape {ids.shape}")
    vocab_size = getattr(model.cfg, "vocab_size", None)
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{op}: argument 'ids' expected ids in [0, {vocab_size}), got {int(bad)}")
    check_count(op, "max_new_tokens", max_new_tokens, lo=0)
    _check_options(op, temperature, top_k, top_p)
    if rng is not None:
        _check_rng(op, rng)
    check_bool(op, "use_cache", use_cache)
    check_bool(op, "prefix", prefix)
    stops = _check_stop_tokens(op, stop_tokens, pad_token, vocab_size)
    repetition_penalty = check_real(op, "repetition_penalty", repetition_penalty, lo=0.0, lo_open=True)
    min_new_tokens = check_count(op, "min_new_tokens", min_new_tokens, lo=0)
    if min_new_tokens and stops is None:
        raise ValueError(f"{op}: argument 'min_new_tokens' expected 0 without stop_tokens (it holds them back), "
                         f"got {min_new_tokens}")

    rng = rng if rng is not None else np.random.default_rng()
    was_training = model.training
    model.eval()
    T_max = model.cfg.block_size
    B, T0 = ids.shape
    try:
        out = np.empty((B, T0 + max_new_tokens), dtype=np.int64)
    except (MemoryError, ValueError, OverflowError):
        raise ValueError(f"{op}: argument 'max_new_tokens' expected a count whose output fits in memory, "
                         f"got {max_new_tokens}") from None
    out[:, :T0] = ids
    finished = np.zeros(B, bool)  # rows that drew a stop token
    ended_with = np.zeros(B, np.int64)  # the stop token each finished row drew
    try:
        # caches as long as this call can use: a long-context model's block_size would be mostly unused memory
        cache_len = min(T_max, T0 + max_new_tokens)
        # a model that cannot decode with caches (Mixture of Depths routes over the whole sequence) recomputes
        use_cache = use_cache and getattr(model, "supports_kv_cache", True)
        caches = model.make_kv_caches(B, max_len=cache_len) if use_cache and max_new_tokens else None
        start = 0  # the first position the model has not seen yet (cached path)
        for i in range(max_new_tokens):
            end = T0 + i  # out[:, :end] is known
            if caches is not None and caches[0].length + (end - start) > T_max:
                # The window is full: positions shift, so the cache is rebuilt from the last T_max tokens
                # (exactly what the uncached path sees).
                caches, start = model.make_kv_caches(B, max_len=cache_len), end - T_max
            first = start if caches is not None else max(0, end - T_max)  # the context's first position
            context = out[:, first:end]
            options = {}
            if prefix and (caches is None or caches[0].length == 0):  # a fresh window holds what is left of it
                options["prefix_len"] = np.full(B, min(max(0, T0 - first), end - first), np.int64)
            with np.errstate(over="ignore", invalid="ignore"):  # the logits are checked below
                logits, _ = model.forward(context, kv_caches=caches, **options)
            last = logits[:, -1]  # (B, V)
            if not np.isfinite(last).all():  # the cheap test; the details only when it fails
                _check_model_logits(op, last, i)
            if repetition_penalty != 1.0 or i < min_new_tokens:
                last = last.copy()
                if repetition_penalty != 1.0:
                    _penalize_repeats(last, out[:, :end], repetition_penalty)
                if i < min_new_tokens:
                    last[:, stops] = -np.inf
            out[:, end] = _sample(last, rng, temperature, top_k, top_p)
            start = end
            if stops is not None:
                if finished.any():
                    out[finished, end] = pad_token if pad_token is not None else ended_with[finished]
                newly = ~finished & np.isin(out[:, end], stops)
                ended_with[newly] = out[newly, end]
                finished |= newly
                if finished.all():
                    return out[:, :end + 1]
    finally:
        model.train(was_training)
    return out


def _penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place: each row's logits of the tokens in that row of ``seen`` (B, T) pushed down by ``penalty``."""
    p = logits.dtype.type(penalty)
    for b in range(logits.shape[0]):
        tokens = np.unique(seen[b])
        z = logits[b, tokens]
        logits[b, tokens] = np.where(z > 0, z / p, z * p)


def _check_stop_tokens(op: str, stop_tokens: object, pad_token: object, vocab_size: Optional[int]) -> Optional[np.ndarray]:
    """The stop ids as an int64 array (None without ``stop_tokens``); each id, and ``pad_token``, in the vocabulary."""
    if stop_tokens is None:
        if pad_token is not None:
            raise ValueError(f"{op}: argument 'pad_token' expected None without stop_tokens (it pads finished rows), "
                             f"got {pad_token!r}")
        return None
    if isinstance(stop_tokens, np.ndarray):
        if stop_tokens.ndim != 1:
            raise ValueError(f"{op}: argument 'stop_tokens' expected a 1-d array of token ids, got shape "
                             f"{stop_tokens.shape}")
        stop_tokens = stop_tokens.tolist()
    if isinstance(stop_tokens, (str, bytes, dict, set, frozenset)) or not isinstance(stop_tokens, (list, tuple)):
        raise TypeError(f"{op}: argument 'stop_tokens' expected a list, tuple or 1-d array of token ids, "
                        f"got {type(stop_tokens).__name__}")
    stops = list(stop_tokens)
    if not stops:
        raise ValueError(f"{op}: argument 'stop_tokens' expected at least one id (or None), got an empty sequence")
    hi = None if vocab_size is None else vocab_size - 1
    for i, t in enumerate(stops):
        check_count(op, f"stop_tokens[{i}]", t, lo=0, hi=hi)
    if pad_token is not None:
        check_count(op, "pad_token", pad_token, lo=0, hi=hi)
    return np.asarray(stops, np.int64)
