"""Sampling: the kept sets of top-k and top-p, the draw's distribution, cached decoding, and bad input."""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from npformer.generate import filter_logits, generate, sample_next
from npformer.models.gpt import GPT, GPTConfig
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, corrupt, expect_rejected

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=12, dtype="float64")


@st.composite
def logit_rows(draw, max_batch=4, max_vocab=9):
    """(B, V) float64 logits: continuous values or few distinct ones (ties), some masked to -inf."""
    B, V = draw(st.integers(1, max_batch)), draw(st.integers(1, max_vocab))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        z = rng.standard_normal((B, V)) * draw(st.sampled_from([0.1, 1.0, 5.0, 50.0]))
    else:
        z = rng.integers(-2, 3, (B, V)).astype(np.float64)  # ties everywhere
    if draw(st.booleans()):
        z[rng.random((B, V)) < 0.3] = -np.inf
        z[np.arange(B), rng.integers(0, V, B)] = rng.standard_normal(B)  # a finite logit in every row
    return z


def kept_by_top_k(z, k):
    """Independently: every token whose logit is at least the row's k-th largest."""
    kth = np.array([sorted(row, reverse=True)[min(k, len(row)) - 1] for row in z])
    return z >= kth[:, None]


def kept_by_top_p(z, p):
    """Independently: the shortest prefix of the tokens by falling probability (lower id first on ties)
    whose probability reaches p, never empty. Returns the mask and the prefix sums met on the way."""
    keep = np.zeros(z.shape, bool)
    sums = []
    if p >= 1:
        return np.ones(z.shape, bool), sums  # everything, by definition
    for b, row in enumerate(z):
        finite = [v for v in row if v != -math.inf]
        top = max(finite)
        weights = [math.exp(v - top) if v != -math.inf else 0.0 for v in row]
        total = math.fsum(weights)
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        mass = 0.0
        for rank, i in enumerate(order):
            if rank > 0 and mass >= p:
                break
            keep[b, i] = True
            mass = math.fsum([mass, weights[i] / total])
            sums.append(mass)
    return keep, sums


@given(logit_rows(), st.integers(1, 10))
def test_top_k_keeps_the_k_largest_and_their_ties(z, k):
    out = filter_logits(z, top_k=k)
    np.testing.assert_array_equal(np.isfinite(out), kept_by_top_k(z, k) & np.isfinite(z))
    np.testing.assert_array_equal(out[np.isfinite(out)], z[np.isfinite(out)])  # kept logits unchanged
    assert (np.isfinite(out).sum(-1) >= np.minimum(k, np.isfinite(z).sum(-1))).all()


@given(logit_rows(), st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
def test_top_p_keeps_the_smallest_nucleus(z, p):
    out = filter_logits(z, top_p=p)
    expected, sums = kept_by_top_p(z, p)
    assume(all(abs(s - p) > 1e-9 for s in sums))  # a prefix sum equal to p up to round-off could go either way
    np.testing.assert_array_equal(np.isfinite(out), expected & np.isfinite(z))
    np.testing.assert_array_equal(out[np.isfinite(out)], z[np.isfinite(out)])
    best = np.argmax(z, axis=-1)
    assert np.isfinite(out[np.arange(len(z)), best]).all()  # the most likely token always stays
    if p == 0.0:
        assert (np.isfinite(out).sum(-1) == 1).all()  # top_p = 0 keeps exactly the most likely token
    if p == 1.0:
        np.testing.assert_array_equal(out, z)


@given(logit_rows(), st.integers(1, 10), st.floats(0.0, 1.0))
def test_top_k_then_top_p_is_the_nucleus_of_the_top_k(z, k, p):
    after_k = np.where(kept_by_top_k(z, k), z, -np.inf)
    expected, sums = kept_by_top_p(after_k, p)
    assume(all(abs(s - p) > 1e-9 for s in sums))
    out = filter_logits(z, top_k=k, top_p=p)
    np.testing.assert_array_equal(np.isfinite(out), expected & np.isfinite(after_k))
    assert (np.isfinite(out).sum(-1) >= 1).all()


@given(logit_rows(max_batch=1, max_vocab=6), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([None, 1, 2, 4]), st.sampled_from([None, 0.0, 0.5, 0.9]), st.integers(0, 2**16))
def test_draws_follow_the_filtered_tempered_distribution(z, temperature, k, p, seed):
    N = 20000
    draws = sample_next(np.repeat(z, N, axis=0), np.random.default_rng(seed), temperature, k, p)
    # Expected, written out: temperature first, then top-k, then top-p on the tempered probabilities.
    tempered = z[0] / temperature
    keep = kept_by_top_k(tempered[None], k)[0] if k else np.ones_like(tempered, bool)
    if p is not None:
        mask, sums = kept_by_top_p(np.where(keep, tempered, -np.inf)[None], p)
        assume(all(abs(s - p) > 1e-9 for s in sums))
        keep &= mask[0]
    weights = np.where(keep & np.isfinite(tempered), np.exp(tempered - tempered[np.isfinite(tempered)].max()), 0.0)
    expected = weights / weights.sum()
    freq = np.bincount(draws, minlength=z.shape[1]) / N
    assert (freq[expected == 0] == 0).all(), "a filtered token was drawn"
    bound = 5 * np.sqrt(expected * (1 - expected) / N) + 3 / N
    assert (np.abs(freq - expected) <= bound).all(), (freq, expected)


@given(st.floats(0.5, 3.0), st.floats(0.5, 2.0).filter(lambda t: abs(math.log(t)) > 0.2), st.booleans(),
       st.integers(0, 2**16))
def test_top_p_measures_the_tempered_probabilities(gap, temperature, between, seed):
    """Two tokens, logits 0 and -gap: top_p set between (or beyond) the best token's probability before
    and after the temperature keeps the second token exactly when the tempered probability says so."""
    best_plain, best_tempered = 1 / (1 + math.exp(-gap)), 1 / (1 + math.exp(-gap / temperature))
    p = (best_plain + best_tempered) / 2 if between else min(best_plain, best_tempered) / 2
    draws = sample_next(np.tile([0.0, -gap], (5000, 1)), np.random.default_rng(seed), temperature, top_p=p)
    second_kept = p > best_tempered
    assert (draws == 1).any() == second_kept


@given(logit_rows(), st.sampled_from([None, 1, 3]), st.sampled_from([None, 0.0, 0.5]), st.integers(0, 100))
def test_temperature_zero_is_greedy_whatever_the_generator(z, k, p, seed):
    draws = sample_next(z, np.random.default_rng(seed), 0.0, k, p)
    np.testing.assert_array_equal(draws, np.argmax(z, axis=-1))
    assert draws.dtype == np.int64


def tiny_model():
    return GPT(CFG, seed=3)


@given(batch=st.integers(1, 3), prompt_len=st.integers(1, CFG.block_size + 3), new=st.integers(0, 2 * CFG.block_size),
       temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]), k=st.sampled_from([None, 1, 4, CFG.vocab_size]),
       p=st.sampled_from([None, 0.0, 0.6, 1.0]), seed=st.integers(0, 2**16))
def test_cached_sampling_equals_full_recomputation(batch, prompt_len, new, temperature, k, p, seed):
    """In float64 the KV cache changes nothing but speed, also past the context window and for long prompts."""
    model = tiny_model()
    prompt = np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, prompt_len))
    options = dict(temperature=temperature, top_k=k, top_p=p)
    cached = generate(model, prompt, new, rng=np.random.default_rng(seed), use_cache=True, **options)
    plain = generate(model, prompt, new, rng=np.random.default_rng(seed), use_cache=False, **options)
    assert cached.shape == (batch, prompt_len + new) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    assert model.training  # restored


def test_greedy_generation_follows_the_argmax_of_the_full_context():
    model = tiny_model()
    prompt = np.array([[1, 2, 3]])
    out = generate(model, prompt, 5, temperature=0)
    model.eval()
    for t in range(3, 8):
        logits, _ = model.forward(out[:, :t])
        assert out[0, t] == np.argmax(logits[0, -1])


# -- bad input: errors name the function and the argument, before any work -----------------------
def bad_counts(lo):
    """Not an integer >= lo: smaller integers, floats, bools, strings."""
    return st.one_of(st.integers(max_value=lo - 1), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                     st.integers(lo, 10).map(float))


def bad_reals(lo, hi=None):
    """Not a finite real number in [lo, hi]: outside it, NaN, infinities, bools, strings."""
    outside = st.floats(max_value=lo, exclude_max=True)
    if hi is not None:
        outside |= st.floats(min_value=hi, exclude_min=True)
    return st.one_of(outside, st.sampled_from([math.nan, math.inf, -math.inf, True, False, "1"]))


LOGITS = np.random.default_rng(0).standard_normal((2, 5))


def bad_logits():
    kinds = st.sampled_from(NON_ARRAYS + DTYPE_KINDS + ("rank+1", "rank-1")).map(lambda kind: corrupt(LOGITS, kind))
    special = st.sampled_from(["nan", "+inf", "all -inf", "V=0"]).map(_special_logits)
    return kinds | special


def _special_logits(kind):
    z = LOGITS.copy()
    if kind == "nan":
        z[1, 2] = np.nan
    elif kind == "+inf":
        z[0, 0] = np.inf
    elif kind == "all -inf":
        z[1] = -np.inf
    else:
        z = z[:, :0]
    return z


@given(bad_logits())
def test_filter_and_sample_reject_bad_logits(z):
    expect_rejected(lambda: filter_logits(z, top_k=2), "filter_logits", "logits")
    expect_rejected(lambda: sample_next(z, np.random.default_rng(0)), "sample_next", "logits")


BAD_OPTIONS = {"top_k": bad_counts(1), "top_p": bad_reals(0.0, 1.0), "temperature": bad_reals(0.0) | st.none()}


@given(st.data())
def test_filter_and_sample_reject_bad_options(data):
    name = data.draw(st.sampled_from(sorted(BAD_OPTIONS)))
    bad = data.draw(BAD_OPTIONS[name])
    options = {"temperature": 1.0, "top_k": None, "top_p": None, name: bad}
    expect_rejected(lambda: sample_next(LOGITS, np.random.default_rng(0), **options), "sample_next", name)
    if name != "temperature":
        expect_rejected(lambda: filter_logits(LOGITS, top_k=options["top_k"], top_p=options["top_p"]),
                        "filter_logits", name)


@given(st.sampled_from([0, None, "x", np.random.RandomState(0), np.random.default_rng(0).bit_generator]))
def test_sample_rejects_what_is_not_a_generator(rng):
    expect_rejected(lambda: sample_next(LOGITS, rng), "sample_next", "rng")


def spy_model():
    """A tiny model that counts forward calls, to show that bad input is refused before any work."""
    model = tiny_model()
    calls = []
    real = model.forward
    model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    return model, calls


PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


def bad_prompts():
    kinds = st.sampled_from(NON_ARRAYS + ("float16", "complex128", "bool", "object", "rank+1", "rank-1"))
    return kinds.map(lambda kind: corrupt(PROMPT, kind)) | st.sampled_from(
        [PROMPT[:0], PROMPT[:, :0], PROMPT - 10, PROMPT + CFG.vocab_size])


@given(st.data())
def test_generate_rejects_bad_arguments_before_any_work(data):
    name = data.draw(st.sampled_from(["ids", "max_new_tokens", "temperature", "top_k", "top_p", "rng", "use_cache"]))
    strategies = {"ids": bad_prompts(), "max_new_tokens": bad_counts(0), **BAD_OPTIONS,
                  "rng": st.sampled_from([0, "x", np.random.RandomState(0)]),
                  "use_cache": st.sampled_from([1, 0, "yes", None, np.array([True])])}
    bad = data.draw(strategies[name])
    args = {"ids": PROMPT, "max_new_tokens": 4, "temperature": 1.0, "top_k": None, "top_p": None,
            "rng": np.random.default_rng(0), "use_cache": True, name: bad}
    model, calls = spy_model()
    ids, n = args.pop("ids"), args.pop("max_new_tokens")
    expect_rejected(lambda: generate(model, ids, n, **args), "generate", name)
    assert calls == [] and model.training  # nothing ran, nothing changed


@pytest.mark.parametrize("model", [None, object(), "gpt"])
def test_generate_rejects_what_is_not_a_model(model):
    expect_rejected(lambda: generate(model, PROMPT, 2), "generate", "model")


# -- logits that cannot be sampled: a named error, at the step they appear ---------------------------------
def poisoned_model(at, value):
    """The tiny model, whose forward returns logits with ``value`` in row 0's last position from call ``at`` on."""
    model = tiny_model()
    real = model.forward
    calls = []

    def forward(*args, **kwargs):
        logits, rest = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= at:
            logits = logits.copy()
            if value == "all -inf":
                logits[0, -1] = -np.inf
            else:
                logits[0, -1, calls[-1] % logits.shape[-1]] = value
        return logits, rest

    model.forward = forward
    return model, calls


@given(at=st.integers(1, 12), value=st.sampled_from([np.nan, np.inf, "all -inf"]), use_cache=st.booleans(),
       prompt_len=st.integers(1, CFG.block_size + 2))
def test_generate_refuses_logits_it_cannot_sample_at_the_step_they_appear(at, value, use_cache, prompt_len):
    """A NaN (a diverged model) used to 'sample' token 0 forever; now the first bad step stops generation."""
    from npformer.generate import NonFiniteLogitsError

    model, calls = poisoned_model(at, value)
    prompt = np.random.default_rng(at).integers(0, CFG.vocab_size, (2, prompt_len))
    with pytest.raises(NonFiniteLogitsError) as info:
        generate(model, prompt, 12, rng=np.random.default_rng(0), use_cache=use_cache)
    assert len(calls) == at  # stopped at the first bad logits, before any further forward
    assert f"for new token {at - 1} hold" in str(info.value) and str(info.value).startswith("generate: ")
    assert model.training  # restored


@given(st.sampled_from(["wte.weight", "ln_f.bias", "blocks.0.attn.q_proj.weight", "blocks.1.mlp.fc.bias"]),
       st.booleans())
def test_a_model_with_a_nan_weight_cannot_generate(name, use_cache):
    from npformer.generate import NonFiniteLogitsError

    model = tiny_model()
    dict(model.named_parameters())[name].data[...] = np.nan
    with pytest.raises(NonFiniteLogitsError, match="new token 0"):
        generate(model, np.array([[1, 2]]), 5, temperature=0, use_cache=use_cache)


class _FixedDraws(np.random.Generator):
    """A generator whose uniform draws are all ``value``: the ends of [0, 1) on demand."""

    def __init__(self, value):
        super().__init__(np.random.PCG64(0))
        self.value = value

    def random(self, size=None, dtype=np.float64, out=None):
        return np.full(size, self.value, dtype)


@given(st.sampled_from([0.0, 1 - 2**-53, 0.5]), st.integers(2, 9), st.integers(0, 2**32 - 1),
       st.sampled_from([None, 1, 2]), st.sampled_from([None, 0.3, 0.9]))
def test_a_draw_at_either_end_of_the_unit_interval_never_picks_a_filtered_token(u, V, seed, top_k, top_p):
    """Tokens at -inf, or cut by top-k / top-p, have probability 0 and are never drawn, whatever u is."""
    from npformer.generate import filter_logits, sample_next

    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, V)) * 3
    logits[:, rng.random(V) < 0.3] = -np.inf
    logits[:, rng.integers(V)] = 1.0  # at least one finite entry per row
    kept = np.isfinite(filter_logits(logits, top_k=top_k, top_p=top_p))
    picks = sample_next(logits, _FixedDraws(u), top_k=top_k, top_p=top_p)
    assert all(kept[b, t] for b, t in enumerate(picks)), (picks, kept)


def reference_stopped(full: np.ndarray, prompt_len: int, stops, pad):
    """Independently: cut the unstopped output where every row has drawn a stop token, padding each finished
    row after its first stop (with ``pad``, or the stop token it drew)."""
    out = full.copy()
    end = full.shape[1]
    first = []
    for row in out:
        hits = [t for t in range(prompt_len, full.shape[1]) if row[t] in stops]
        first.append(hits[0] if hits else None)
        if hits:
            row[hits[0] + 1:] = row[hits[0]] if pad is None else pad
    if all(f is not None for f in first):
        end = max(first) + 1
    return out[:, :end]


@given(batch=st.integers(1, 3), prompt_len=st.integers(1, 4), new=st.integers(1, 12),
       temperature=st.sampled_from([0.0, 1.0, 2.0]), n_stops=st.integers(1, 3), pad=st.sampled_from([None, 0, 10]),
       use_cache=st.booleans(), seed=st.integers(0, 2**16))
def test_stop_tokens_end_rows_and_the_whole_generation(batch, prompt_len, new, temperature, n_stops, pad, use_cache,
                                                       seed):
    """A row that draws a stop token is padded afterwards; the output ends when every row has stopped. The
    tokens before that are exactly those of the unstopped run with the same generator."""
    model = tiny_model()
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, CFG.vocab_size, (batch, prompt_len))
    full = generate(model, prompt, new, temperature=temperature, rng=np.random.default_rng(seed), use_cache=use_cache)
    # stop tokens drawn from what the run produced, so that rows do stop
    stops = [int(t) for t in rng.choice(full[:, prompt_len:].ravel(), n_stops)]
    got = generate(model, prompt, new, temperature=temperature, rng=np.random.default_rng(seed), use_cache=use_cache,
                   stop_tokens=stops, pad_token=pad)
    np.testing.assert_array_equal(got, reference_stopped(full, prompt_len, stops, pad))


@pytest.mark.parametrize("stop_tokens, pad_token, error", [
    ([], None, ValueError), ([11], None, ValueError), ([-1], None, ValueError), ([1.0], None, ValueError),
    ("ab", None, TypeError), (5, None, TypeError), ([1], 11, ValueError), ([1], True, ValueError),
    (None, 3, ValueError), ({3: 1}, None, TypeError), ({3}, None, TypeError), (np.array([[1]]), None, ValueError),
    (np.array([1.5]), None, ValueError)])
def test_generate_rejects_bad_stop_tokens(stop_tokens, pad_token, error):
    with pytest.raises(error, match=r"generate: argument '(stop_tokens|pad_token)"):
        generate(tiny_model(), np.array([[1]]), 3, stop_tokens=stop_tokens, pad_token=pad_token)


def test_stop_tokens_may_be_an_array_of_ids():
    model = tiny_model()
    full = generate(model, np.array([[1, 2]]), 6, temperature=0)
    stop = int(full[0, 3])
    as_list = generate(model, np.array([[1, 2]]), 6, temperature=0, stop_tokens=[stop])
    as_array = generate(model, np.array([[1, 2]]), 6, temperature=0, stop_tokens=np.array([stop]))
    np.testing.assert_array_equal(as_array, as_list)
    assert as_array.shape[1] <= 4


def penalized_argmax_reference(model, prompt, new, penalty, stops=(), min_new=0):
    """Independently: greedy decoding from full recomputation, each step's logits penalised by hand."""
    out = prompt.copy()
    model.eval()
    for i in range(new):
        logits, _ = model.forward(out[:, -CFG.block_size:])
        z = logits[:, -1].copy()
        for b in range(z.shape[0]):
            for t in set(out[b].tolist()):
                z[b, t] = z[b, t] / penalty if z[b, t] > 0 else z[b, t] * penalty
            for s in stops if i < min_new else ():
                z[b, s] = -np.inf
        out = np.concatenate([out, z.argmax(-1)[:, None]], axis=1)
    model.train()
    return out


@given(batch=st.integers(1, 3), prompt_len=st.integers(1, 6), new=st.integers(1, 10),
       penalty=st.sampled_from([0.5, 1.0, 1.3, 4.0]), min_new=st.integers(0, 10), seed=st.integers(0, 2**16))
def test_repetition_penalty_and_min_new_tokens_follow_their_definition(batch, prompt_len, new, penalty, min_new, seed):
    model = tiny_model()
    prompt = np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, prompt_len))
    stops = [int(t) for t in np.random.default_rng(seed + 1).choice(CFG.vocab_size, 2, replace=False)]
    expected = penalized_argmax_reference(model, prompt, new, penalty, stops, min_new)
    got = generate(model, prompt, new, temperature=0, repetition_penalty=penalty, stop_tokens=stops,
                   min_new_tokens=min_new)
    cut = reference_stopped(expected, prompt_len, stops, None)
    np.testing.assert_array_equal(got, cut)
    assert not np.isin(got[:, prompt_len:prompt_len + min_new], stops).any()


@pytest.mark.parametrize("options", [dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                     dict(repetition_penalty=float("nan")), dict(min_new_tokens=-1),
                                     dict(min_new_tokens=2), dict(min_new_tokens=1.5, stop_tokens=[1])])
def test_generate_rejects_bad_penalty_and_minimum(options):
    with pytest.raises(ValueError, match=r"generate: argument '(repetition_penalty|min_new_tokens)'"):
        generate(tiny_model(), np.array([[1]]), 3, **options)


def test_a_model_without_kv_caches_decodes_by_recomputing():
    """Mixture of Depths routes over the whole sequence, so it has no KV caches: generate recomputes, and its
    tokens equal a loop of full forwards."""
    from npformer.models.variant import VariantConfig, VariantLM

    model = VariantLM(VariantConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, d_model=8, mod_capacity=0.5,
                                    dtype="float64"), seed=3)
    assert model.supports_kv_cache is False
    prompt = np.array([[1, 2, 3]])
    out = generate(model, prompt, 5, temperature=0.0)
    model.eval()
    ids = prompt
    for _ in range(5):
        logits, _ = model.forward(ids)
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ids)
