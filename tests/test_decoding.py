"""Decoding for encoder-decoders on a tiny model written here: greedy against argmax by hand, beam search
against exhaustive enumeration, the n-gram ban against a direct implementation, sampling, and bad input.

``Tiny`` follows the encoder-decoder interface with random tables: the next token's logits come from
the last token, its position, a summary of the source (masked mean of the memory, read back from
the cross cache) and the sum of the features of every token so far (read back from the self
cache), so a cache reordered wrongly changes the result.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npformer import decoding
from npformer.decoding import NonFiniteLogitsError, banned_ngram_tokens, beam_search, greedy, sample
from npformer.nn.attention import KVCache
from tests.badinput import NON_ARRAYS, corrupt, expect_rejected
from tests.strategies import in_layout, layouts
from tests.tolerances import RTOL


@dataclass
class TinyConfig:
    vocab_size: int = 7
    d_model: int = 3
    max_len: int = 16
    dtype: str = "float64"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 2


class Tiny:
    """A protocol model of random tables (see the module's notes)."""

    def __init__(self, cfg: TinyConfig, seed: int = 0, eos_bias: float = 0.0):
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        V, D, dt = cfg.vocab_size, cfg.d_model, np.dtype(cfg.dtype)
        self.src_emb = rng.standard_normal((V, D)).astype(dt)
        self.tok_feat = rng.standard_normal((V, D)).astype(dt)
        self.last = (rng.standard_normal((V, V)) * 1.5).astype(dt)
        self.pos = rng.standard_normal((cfg.max_len, V)).astype(dt)
        self.mem_out = rng.standard_normal((D, V)).astype(dt)
        self.hist_out = rng.standard_normal((D, V)).astype(dt)
        if eos_bias:
            self.last[:, cfg.eos_token_id] += eos_bias
        self.training = True
        self.calls = 0

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def encode(self, src_ids, src_padding_mask=None):
        assert not self.training
        return self.src_emb[src_ids]  # (B, S, D)

    def make_decoder_caches(self, batch, max_len, src_len):
        dt = np.dtype(self.cfg.dtype)
        return [(KVCache(batch, 1, max_len, self.cfg.d_model, dt), KVCache(batch, 1, src_len, self.cfg.d_model, dt))]

    def decode(self, tgt_ids, memory, caches=None, *, src_padding_mask=None):
        assert not self.training
        self.calls += 1
        B, T = tgt_ids.shape
        feats = self.tok_feat[tgt_ids]  # (B, T, D)
        if caches is None:
            start, history = 0, feats
        else:
            self_c, cross_c = caches[0]
            start = self_c.length
            history = self_c.append(feats[:, None], feats[:, None])[0][:, 0]  # (B, start + T, D)
            if cross_c.length == 0:
                cross_c.append(memory[:, None], memory[:, None])
            memory = cross_c.k[:, 0]  # the source as cached
        keep = np.ones(memory.shape[:2]) if src_padding_mask is None else (~src_padding_mask).astype(np.float64)
        summary = (memory * keep[..., None]).sum(1) / np.maximum(keep.sum(1), 1)[:, None]  # (B, D)
        so_far = np.cumsum(history, axis=1)[:, start:start + T]  # (B, T, D) features of every token so far
        logits = (self.last[tgt_ids] + self.pos[start:start + T] + (summary @ self.mem_out)[:, None]
                  + np.tanh(so_far) @ self.hist_out)
        return logits.astype(self.cfg.dtype)


def uncached_logits(model, src, mask, prefix):
    """The next token's logits (B, V) after prefix (B, T), from the decoder run over the whole prefix."""
    model.eval()
    memory = model.encode(src, src_padding_mask=mask)
    return model.decode(prefix, memory, None, src_padding_mask=mask)[:, -1].astype(np.float64)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def direct_banned(ids, n, V):
    """The n-gram ban, directly: a dict from each (n-1)-gram of the row to the ids that followed it."""
    out = np.zeros((len(ids), V), bool)
    for b, row in enumerate(ids.tolist()):
        follows = {}
        for i in range(len(row) - n + 1):
            follows.setdefault(tuple(row[i:i + n - 1]), []).append(row[i + n - 1])
        if len(row) >= n:
            for t in follows.get(tuple(row[len(row) - n + 1:]), []):
                out[b, t] = True
    return out


def greedy_by_hand(model, src, mask, max_new, ngram=0, min_new=0):
    cfg = model.cfg
    B = len(src)
    out = np.full((B, 1), cfg.decoder_start_token_id)
    done = np.zeros(B, bool)
    for i in range(max_new):
        z = uncached_logits(model, src, mask, out)
        if ngram:
            z[direct_banned(out, ngram, cfg.vocab_size)] = -np.inf
        if i < min_new:
            z[:, cfg.eos_token_id] = -np.inf
        nxt = np.where(done, cfg.pad_token_id, np.argmax(z, -1))
        out = np.concatenate([out, nxt[:, None]], 1)
        done |= nxt == cfg.eos_token_id
        if done.all():
            break
    return out


def source(seed, cfg, B, S, with_mask):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, cfg.vocab_size, (B, S))
    mask = None
    if with_mask:
        mask = np.zeros((B, S), bool)
        for b in range(B):
            mask[b, rng.integers(1, S + 1):] = True  # at least one real token per row
    return src, mask


def strip(row, eos):
    """A decoded row's tokens after the start token, up to and including the first eos."""
    toks = row[1:].tolist()
    return toks[:toks.index(eos) + 1] if eos in toks else toks


CASES = st.tuples(st.integers(0, 2**16), st.integers(3, 9), st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 5]),
                  st.booleans(), st.sampled_from(["float64", "float32"]))


# -- greedy ----------------------------------------------------------------------------------------
@given(CASES, st.integers(1, 7), st.sampled_from([0.0, 2.0]), layouts())
def test_greedy_is_the_argmax_by_hand(case, max_new, eos_bias, layout):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed, eos_bias)
    src, mask = source(seed, cfg, B, S, with_mask)
    got = greedy(model, in_layout(src, layout), src_padding_mask=mask, max_new_tokens=max_new)
    assert model.training  # put back in its mode
    assert model.calls == got.shape[1] - 1  # one cached decoder call per new token
    np.testing.assert_array_equal(got, greedy_by_hand(model, src, mask, max_new))


@given(CASES, st.integers(1, 8), st.integers(1, 3), st.integers(0, 3))
def test_greedy_with_the_processors_equals_the_direct_ones(case, max_new, ngram, min_new):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed, eos_bias=2.0)
    src, mask = source(seed, cfg, B, S, with_mask)
    got = greedy(model, src, src_padding_mask=mask, max_new_tokens=max_new, no_repeat_ngram_size=ngram,
                 min_new_tokens=min_new)
    np.testing.assert_array_equal(got, greedy_by_hand(model, src, mask, max_new, ngram, min_new))
    for row in got:
        toks = [cfg.decoder_start_token_id] + strip(row, cfg.eos_token_id)
        assert len(toks) - 1 >= min(min_new, max_new) or toks[-1] != cfg.eos_token_id


def test_greedy_stops_when_every_row_is_finished_and_pads_after_eos():
    cfg = TinyConfig(vocab_size=5)
    for seed in range(40):
        model = Tiny(cfg, seed, eos_bias=1.0)
        src, _ = source(seed, cfg, 4, 3, False)
        out = greedy(model, src, max_new_tokens=10)
        ended = (out[:, 1:] == cfg.eos_token_id)
        if ended.any(1).all() and out.shape[1] < 11:
            first = ended.argmax(1)
            assert out.shape[1] == 2 + first.max()  # ends on the last row to finish
            for b, f in enumerate(first):
                assert (out[b, 2 + f:] == cfg.pad_token_id).all()
            return
    pytest.fail("no seed made every row stop early")


# -- the n-gram ban --------------------------------------------------------------------------------
@given(st.integers(0, 2**16), st.integers(1, 4), st.integers(0, 12), st.integers(1, 4), st.integers(1, 5))
def test_banned_ngram_tokens_equal_the_direct_ban(seed, B, T, n, V):
    ids = np.random.default_rng(seed).integers(0, V, (B, T))
    np.testing.assert_array_equal(banned_ngram_tokens(ids, n, V), direct_banned(ids, n, V))


def test_banned_ngram_tokens_by_hand():
    ids = np.array([[5, 3, 5, 4, 5], [1, 2, 3, 1, 2]])
    got = banned_ngram_tokens(ids, 2, 6)
    assert np.flatnonzero(got[0]).tolist() == [3, 4]  # 5 was followed by 3 and by 4
    got = banned_ngram_tokens(ids, 3, 6)
    assert np.flatnonzero(got[1]).tolist() == [3]  # (1, 2) was followed by 3
    assert np.flatnonzero(banned_ngram_tokens(ids, 1, 6)[0]).tolist() == [3, 4, 5]


def ngrams_repeat(toks, n):
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return len(grams) != len(set(grams))


@given(CASES, st.integers(1, 3), st.sampled_from(["greedy", "beam", "sample"]))
def test_no_repeated_ngram_is_ever_emitted(case, n, how):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed)
    src, mask = source(seed, cfg, B, S, with_mask)
    max_new = 6 if n > 1 else V - 2  # n = 1 bans every id already used: V - 1 ids besides the start
    kw = dict(src_padding_mask=mask, max_new_tokens=max_new, no_repeat_ngram_size=n)
    if how == "greedy":
        out = greedy(model, src, **kw)
    elif how == "beam":
        out = beam_search(model, src, num_beams=3, num_return_sequences=3, **kw)[0]
    else:
        out = sample(model, src, rng=np.random.default_rng(seed), **kw)
    for row in out:
        toks = [cfg.decoder_start_token_id] + strip(row, cfg.eos_token_id)
        assert not ngrams_repeat(toks, n), toks


# -- beam search -----------------------------------------------------------------------------------
def exhaustive_best(model, src, mask, L, lp):
    """Per source row: the best sequence (start token excluded) and its score over every sequence that
    ends with eos within L tokens or has L tokens, score = sum of log probabilities / length ** lp."""
    cfg = model.cfg
    V, eos, start = cfg.vocab_size, cfg.eos_token_id, cfg.decoder_start_token_id
    best = []
    for b in range(len(src)):
        s, m = src[b:b + 1], None if mask is None else mask[b:b + 1]
        top = (-np.inf, None)
        for t in range(1, L + 1):
            for seq in itertools.product(range(V), repeat=t):
                if eos in seq[:-1] or (t < L and seq[-1] != eos):
                    continue
                prefix = np.array([[start, *seq]])
                total = 0.0
                for i in range(t):
                    total += log_softmax(uncached_logits(model, s, m, prefix[:, :i + 1]))[0, seq[i]]
                score = total / t ** lp
                if score > top[0]:
                    top = (score, list(seq))
        best.append(top)
    return best


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(3, 4), st.integers(1, 3), st.sampled_from([-0.5, 0.0, 0.5, 1.0, 2.0]),
       st.sampled_from([False, True, "never"]), st.sampled_from([0.0, 1.5]), st.booleans())
def test_beam_search_with_every_sequence_kept_finds_the_exhaustive_best(seed, V, L, lp, early, eos_bias, with_mask):
    """num_beams >= V ** L keeps every prefix. Up to L = 3 the hypotheses of the -1e9 copies of the first
    beam cannot fill the N slots before the last step, so early_stopping=True finds the best as well
    (for longer L it may stop first: ``test_early_stopping_can_end_on_the_copies_hypotheses``)."""
    cfg = TinyConfig(vocab_size=V)
    model = Tiny(cfg, seed, eos_bias)
    src, mask = source(seed, cfg, 2, 3, with_mask)
    N = max(2, V ** L)
    ids, scores = beam_search(model, src, src_padding_mask=mask, num_beams=N, max_new_tokens=L, length_penalty=lp,
                              early_stopping=early)
    for b, (score, seq) in enumerate(exhaustive_best(model, src, mask, L, lp)):
        assert abs(scores[b] - score) <= RTOL[np.dtype(np.float64)] * max(1.0, abs(score))
        assert strip(ids[b], cfg.eos_token_id) == seq


def test_early_stopping_can_end_on_the_copies_hypotheses():
    """V = 3, L = 4, 81 beams: the copies' hypotheses (about -1e9 / L ** 2, L = 2 or 3) fill the slots after three
    steps, and early_stopping=True ends there, missing the best sequence of four tokens; with False
    the search goes on and finds it (Hugging Face's semantics, see the module's notes)."""
    cfg = TinyConfig(vocab_size=3)
    model = Tiny(cfg, 18)
    src, _ = source(18, cfg, 1, 3, False)
    kw = dict(num_beams=81, max_new_tokens=4, length_penalty=2.0, num_return_sequences=81)
    ids, scores = beam_search(model, src, early_stopping=True, **kw)
    (best, seq), = exhaustive_best(model, src, None, 4, 2.0)
    assert ids.shape[1] == 4 and (scores < -1e8).sum() > 40 and scores[0] < best - 1e-3
    assert len(seq) == 4
    ids, scores = beam_search(model, src, early_stopping=False, **kw)
    assert strip(ids[0], cfg.eos_token_id) == seq and abs(scores[0] - best) < 1e-12


@given(CASES, st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 2.0]))
def test_one_beam_is_greedy(case, max_new, lp, eos_bias):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed, eos_bias)
    src, mask = source(seed, cfg, B, S, with_mask)
    expected = greedy(model, src, src_padding_mask=mask, max_new_tokens=max_new)
    ids, scores = beam_search(model, src, src_padding_mask=mask, num_beams=1, max_new_tokens=max_new,
                              length_penalty=lp)
    np.testing.assert_array_equal(ids, expected)
    for b in range(B):  # the score by hand: summed log probabilities over length ** lp
        toks = strip(expected[b], cfg.eos_token_id)
        prefix = np.array([[cfg.decoder_start_token_id, *toks]])
        total = sum(log_softmax(uncached_logits(model, src[b:b + 1], None if mask is None else mask[b:b + 1],
                                                prefix[:, :i + 1]))[0, toks[i]] for i in range(len(toks)))
        assert abs(scores[b] - total / len(toks) ** lp) <= 1e-5 * max(1.0, abs(total))
    # The search itself with one beam: stops at the first hypothesis, so it is greedy as well.
    for early in (True, False):
        stops = np.array([cfg.eos_token_id])
        model.eval()
        rules = decoding._Rules(ngram=0, stops=stops, min_new_tokens=0, max_new_tokens=max_new, forced_bos=None,
                                forced_eos=None)
        ids1, _ = decoding._beams("t", model, src, mask, 1, lp, early, 1, rules)
        model.train()
        for b in range(B):
            assert strip(ids1[b], cfg.eos_token_id) == strip(expected[b], cfg.eos_token_id)


@given(CASES, st.integers(2, 5), st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([False, True, "never"]), st.sampled_from([0.0, 2.0]))
def test_beam_outputs_are_scored_sorted_and_padded(case, N, max_new, lp, early, eos_bias):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype, pad_token_id=V - 1 if V > 3 else 0)
    fill = cfg.pad_token_id or cfg.eos_token_id  # the beam output's fill (see the module's notes)
    model = Tiny(cfg, seed, eos_bias)
    src, mask = source(seed, cfg, B, S, with_mask)
    R = min(N, 1 + seed % N)
    ids, scores = beam_search(model, src, src_padding_mask=mask, num_beams=N, max_new_tokens=max_new,
                              length_penalty=lp, early_stopping=early, num_return_sequences=R)
    assert ids.shape[0] == B * R and scores.shape == (B * R,) and ids.shape[1] <= 1 + max_new
    assert (ids[:, 0] == cfg.decoder_start_token_id).all()
    assert (np.diff(scores.reshape(B, R), axis=1) <= 0).all()  # best first
    for r, row in enumerate(ids):
        toks = strip(row, cfg.eos_token_id)
        if scores[r] < -1e8:  # an empty slot (fewer real hypotheses than asked for)
            continue
        assert toks[-1] == cfg.eos_token_id or len(toks) == max_new
        assert (row[1 + len(toks):] == fill).all()
        prefix = np.array([[cfg.decoder_start_token_id, *toks]])
        b = r // R
        m = None if mask is None else mask[b:b + 1]
        total = sum(log_softmax(uncached_logits(model, src[b:b + 1], m, prefix[:, :i + 1]))[0, toks[i]]
                    for i in range(len(toks)))
        assert abs(scores[r] - total / len(toks) ** lp) <= 1e-5 * max(1.0, abs(total))  # float32 logits


def test_beam_output_pads_with_eos_when_pad_is_zero():
    cfg = TinyConfig(vocab_size=6, pad_token_id=0)
    for seed in range(30):
        model = Tiny(cfg, seed, eos_bias=2.0)
        src, _ = source(seed, cfg, 2, 3, False)
        ids, _ = beam_search(model, src, num_beams=3, max_new_tokens=6, num_return_sequences=3)
        for row in ids:
            toks = strip(row, cfg.eos_token_id)
            if toks[-1] == cfg.eos_token_id and len(toks) < ids.shape[1] - 1:
                assert (row[1 + len(toks):] == cfg.eos_token_id).all()
                return
    pytest.fail("no hypothesis ended before the others")


def test_wrong_cache_reordering_would_be_seen():
    """The tiny model's logits depend on the cached history: decoding with a cache of another row differs."""
    cfg = TinyConfig(vocab_size=7)
    model = Tiny(cfg, 3).eval()
    src, _ = source(3, cfg, 2, 4, False)
    memory = model.encode(src)
    caches = model.make_decoder_caches(2, 4, 4)
    model.decode(np.array([[2, 4], [2, 5]]), memory, caches)
    right = model.decode(np.array([[3], [3]]), memory, caches)
    caches = model.make_decoder_caches(2, 4, 4)
    model.decode(np.array([[2, 4], [2, 5]]), memory, caches)
    for c in caches[0]:
        c.k[...] = c.k[[1, 0]]
        c.v[...] = c.v[[1, 0]]
    swapped = model.decode(np.array([[3], [3]]), memory, caches)
    assert np.abs(right - swapped).max() > 1e-3


# -- sampling --------------------------------------------------------------------------------------
@given(CASES, st.integers(1, 6), st.sampled_from([0.7, 1.0, 1.5]), st.sampled_from([None, 2]),
       st.sampled_from([None, 0.8]))
def test_sampling_is_reproducible_and_top_k_1_is_greedy(case, max_new, temperature, top_k, top_p):
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed, eos_bias=1.0)
    src, mask = source(seed, cfg, B, S, with_mask)
    kw = dict(src_padding_mask=mask, max_new_tokens=max_new)
    a = sample(model, src, rng=np.random.default_rng(seed), temperature=temperature, top_k=top_k, top_p=top_p, **kw)
    b = sample(model, src, rng=np.random.default_rng(seed), temperature=temperature, top_k=top_k, top_p=top_p, **kw)
    np.testing.assert_array_equal(a, b)
    expected = greedy(model, src, **kw)
    np.testing.assert_array_equal(sample(model, src, rng=np.random.default_rng(seed), top_k=1, **kw), expected)
    np.testing.assert_array_equal(sample(model, src, rng=np.random.default_rng(seed), temperature=0.0, **kw),
                                  expected)


def test_sampling_draws_follow_the_first_step_distribution():
    cfg = TinyConfig(vocab_size=4, eos_token_id=1)
    model = Tiny(cfg, 5)
    src = np.zeros((4000, 2), np.int64)
    out = sample(model, src, rng=np.random.default_rng(0), max_new_tokens=1)
    p = np.exp(log_softmax(uncached_logits(model, src[:1], None, np.array([[2]]))))[0]
    freq = np.bincount(out[:, 1], minlength=4) / len(out)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / len(out)) + 1e-3).all(), (freq, p)


# -- bad input -------------------------------------------------------------------------------------
CFG = TinyConfig(vocab_size=6)
SRC = np.array([[3, 4, 5], [0, 1, 2]])
FUNCS = {
    "decoding.greedy": lambda **kw: greedy(kw.pop("model", Tiny(CFG)), kw.pop("src_ids", SRC),
                                           **{"max_new_tokens": 3, **kw}),
    "decoding.beam_search": lambda **kw: beam_search(kw.pop("model", Tiny(CFG)), kw.pop("src_ids", SRC),
                                                     **{"num_beams": 2, "max_new_tokens": 3, **kw}),
    "decoding.sample": lambda **kw: sample(kw.pop("model", Tiny(CFG)), kw.pop("src_ids", SRC),
                                           **{"rng": np.random.default_rng(0), "max_new_tokens": 3, **kw}),
}
COMMON_BAD = {
    "max_new_tokens": [0, -1, 2.5, True, "3", None],
    "eos_token_id": [-1, 6, 1.5, "1", [], [1, 7], True],
    "min_new_tokens": [-1, 1.5, True, None],
    "no_repeat_ngram_size": [-1, 2.0, False, None],
    "src_padding_mask": [np.zeros((2, 3), np.int64), np.zeros((2, 4), bool), np.zeros(3, bool), [[False] * 3] * 2],
}
OWN_BAD = {
    "decoding.beam_search": {
        "num_beams": [0, -1, 2.0, True, None], "length_penalty": [np.nan, np.inf, "1", None, True],
        "early_stopping": ["always", 1, None, "True"], "num_return_sequences": [0, 3, 1.0, True]},
    "decoding.sample": {"rng": [None, 0, np.random.RandomState(0)], "temperature": [-1.0, np.nan, "1"],
                        "top_k": [0, 1.5, True], "top_p": [-0.1, 1.5, np.nan]},
    "decoding.greedy": {},
}


@pytest.mark.parametrize("func", list(FUNCS))
def test_bad_arguments_are_refused_by_name(func):
    call = FUNCS[func]
    for arg, values in {**COMMON_BAD, **OWN_BAD[func]}.items():
        for bad in values:
            message = expect_rejected(lambda: call(**{arg: bad}), func, arg)
            assert "expected" in message and "got" in message, message
    for kind in NON_ARRAYS + ("float64", "bool", "rank+1", "rank-1"):
        expect_rejected(lambda: call(src_ids=corrupt(SRC, kind)), func, "src_ids")
    for bad in (SRC + 10, SRC - 5, SRC[:, :0], SRC[:0]):
        expect_rejected(lambda: call(src_ids=bad), func, "src_ids")
    expect_rejected(lambda: call(min_new_tokens=2, eos_token_id=None, model=Tiny(TinyConfig(vocab_size=6,
                                                                                            eos_token_id=None))),
                    func, "min_new_tokens")


class NoDecode:
    def __init__(self):
        self.cfg = CFG

    def encode(self, src_ids, src_padding_mask=None):
        return np.zeros((len(src_ids), 1, 1))


class NoIds(Tiny):
    def __init__(self):
        super().__init__(TinyConfig(vocab_size=6))
        self.cfg = type("Cfg", (), {"vocab_size": 6, "pad_token_id": 0})()


class BadCaches(Tiny):
    def make_decoder_caches(self, batch, max_len, src_len):
        return {"layer": None}


class BadLogits(Tiny):
    def decode(self, tgt_ids, memory, caches=None, *, src_padding_mask=None):
        return super().decode(tgt_ids, memory, caches, src_padding_mask=src_padding_mask)[:, :, :-1]


@pytest.mark.parametrize("func", list(FUNCS))
@pytest.mark.parametrize("model", [object(), None, NoDecode(), NoIds(), BadCaches(CFG), BadLogits(CFG),
                                   Tiny(TinyConfig(vocab_size=6, pad_token_id=9))])
def test_a_model_without_the_interface_is_refused_by_name(func, model):
    message = expect_rejected(lambda: FUNCS[func](model=model), func, "model")
    assert "expected" in message and "got" in message


class NaNAfter(Tiny):
    """Finite logits for the first ``good`` calls, then one NaN (or +inf, or a row all -inf)."""

    def __init__(self, bad, good=1):
        super().__init__(CFG)
        self.bad, self.good = bad, good

    def decode(self, tgt_ids, memory, caches=None, *, src_padding_mask=None):
        z = super().decode(tgt_ids, memory, caches, src_padding_mask=src_padding_mask)
        if self.calls > self.good:
            z = z.copy()
            if self.bad == "-inf":
                z[0] = -np.inf
            else:
                z[-1, -1, 2] = self.bad
        return z


@pytest.mark.parametrize("func", list(FUNCS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, "-inf"])
def test_non_finite_logits_are_refused(func, bad):
    model = NaNAfter(bad)
    with pytest.raises(NonFiniteLogitsError, match=func.replace(".", r"\.") + ".*new token 1"):
        FUNCS[func](model=model, min_new_tokens=2)  # no row ends before the bad step
    assert model.training


def test_sampling_refuses_a_row_with_every_token_banned():
    cfg = TinyConfig(vocab_size=3)  # ids 0, 1 (eos, held back) and the start token 2: two to draw at most
    model = Tiny(cfg, 0)
    expect_rejected(lambda: sample(model, SRC % 3, rng=np.random.default_rng(0), max_new_tokens=3,
                                   no_repeat_ngram_size=1, min_new_tokens=3), "decoding.sample",
                    "no_repeat_ngram_size")


def test_banned_ngram_tokens_bad_input():
    ids = np.zeros((2, 3), np.int64)
    for kind in NON_ARRAYS + ("float64", "rank+1", "rank-1"):
        expect_rejected(lambda: banned_ngram_tokens(corrupt(ids, kind), 2, 4), "banned_ngram_tokens", "ids")
    for bad in (0, -1, 1.5, True):
        expect_rejected(lambda: banned_ngram_tokens(ids, bad, 4), "banned_ngram_tokens", "ngram_size")
        expect_rejected(lambda: banned_ngram_tokens(ids, 2, bad), "banned_ngram_tokens", "vocab_size")


@given(CASES, st.integers(2, 4), st.integers(1, 7), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([False, True, "never"]), st.sampled_from([0.0, 1.5]))
@example(case=(2, 5, 1, 5, False, "float64"), N=2, max_new=4, lp=1.0, early=False, eos_bias=1.5)  # a row done early
def test_each_source_row_is_decoded_as_if_alone(case, N, max_new, lp, early, eos_bias):
    """A batch is its rows side by side: a row that has its hypotheses (or cannot improve) takes no more,
    while the search goes on for the others, so each row's result is the one it gets alone (padded
    to the batch's length)."""
    seed, V, B, S, with_mask, dtype = case
    cfg = TinyConfig(vocab_size=V, dtype=dtype)
    model = Tiny(cfg, seed, eos_bias)
    src, mask = source(seed, cfg, max(B, 2), S, with_mask)
    kw = dict(num_beams=N, max_new_tokens=max_new, length_penalty=lp, early_stopping=early, num_return_sequences=N)
    ids, scores = beam_search(model, src, src_padding_mask=mask, **kw)
    fill = cfg.pad_token_id or cfg.eos_token_id
    for b in range(len(src)):
        alone, alone_scores = beam_search(model, src[b:b + 1], src_padding_mask=None if mask is None else mask[b:b + 1],
                                          **kw)
        rows = ids[b * N:(b + 1) * N]
        np.testing.assert_array_equal(rows[:, :alone.shape[1]], alone)
        assert (rows[:, alone.shape[1]:] == fill).all()
        np.testing.assert_allclose(scores[b * N:(b + 1) * N], alone_scores, rtol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("fn", ["greedy", "beam_search", "sample"])
def test_more_new_tokens_than_the_decoder_has_positions_is_refused_by_name(fn):
    from npformer.models.bart import Bart, BartConfig

    model = Bart(BartConfig(vocab_size=11, max_position=6, n_layer=1, n_head=2, d_model=8, dtype="float64"), seed=0)
    extra = {"greedy": {}, "beam_search": {"num_beams": 2}, "sample": {"rng": np.random.default_rng(0)}}[fn]
    with pytest.raises(ValueError, match=rf"decoding.{fn}: argument 'max_new_tokens' expected at most 6"):
        getattr(decoding, fn)(model, np.array([[3, 4, 5]]), max_new_tokens=7, **extra)
    out = getattr(decoding, fn)(model, np.array([[3, 4, 5]]), max_new_tokens=6, **extra)
    assert (out[0] if fn == "beam_search" else out).shape[1] <= 7


@pytest.mark.parametrize("name, value", [("forced_bos_token_id", -1), ("forced_eos_token_id", 99),
                                         ("forced_eos_token_id", 1.5), ("forced_bos_token_id", True)])
def test_forced_tokens_are_checked_by_name(name, value):
    from npformer.models.bart import Bart, BartConfig

    model = Bart(BartConfig(vocab_size=11, max_position=6, n_layer=1, n_head=2, d_model=8), seed=0)
    with pytest.raises(ValueError, match=rf"decoding.greedy: argument '{name}'"):
        decoding.greedy(model, np.array([[3, 4]]), max_new_tokens=3, **{name: value})
