"""A decoder-only model as a prefix LM (ATT.18): the mask against its definition, GPT's and LLaMA's loss and
every gradient against their torch twins with the same mask, what the prefix can and cannot see, cached
continuation, and bad prefixes refused by name."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.gpt import TwinGPT
from kernels.twins.llama import TwinLlama
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import IGNORE_INDEX, Llama, LlamaConfig
from npformer.nn.lm import prefix_lm_bias
from tests.tolerances import MODEL_RTOL, assert_close

FAMILIES = {"gpt": (GPT, GPTConfig, TwinGPT, dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8)),
            "llama": (Llama, LlamaConfig, TwinLlama, dict(vocab_size=11, block_size=8, n_layer=2, n_head=4,
                                                          n_kv_head=2, d_model=16))}


def build(family, seed=0, **overrides):
    model_cls, config_cls, twin_cls, fields = FAMILIES[family]
    cfg = config_cls(**{**fields, **overrides, "dtype": "float64"})
    model = model_cls(cfg, seed=seed)
    rng = np.random.default_rng(seed + 7)  # weights of order one, so every mask shows in the loss
    for name, prm in model.named_parameters():
        base = 1.0 if name.endswith("weight") and prm.data.ndim == 1 else 0.0
        prm.data[...] = base + (0.3 if prm.data.ndim == 1 else 1.0 / np.sqrt(prm.shape[1])) * \
            rng.standard_normal(prm.shape)
    twin = twin_cls(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


@pytest.mark.derivation("ATT.18")
@given(B=st.integers(1, 3), T=st.integers(1, 6), start=st.integers(0, 5), data=st.data())
def test_prefix_mask_matches_its_definition(B, T, start, data):
    most = start if start else T  # with positions cached, the prefix must lie within them
    prefix = np.array(data.draw(st.lists(st.integers(0, most), min_size=B, max_size=B)))
    bias = prefix_lm_bias("t", prefix, B, start, T, np.dtype(np.float64))
    assert bias.shape == (B, 1, T, start + T)
    for b in range(B):
        for i in range(T):
            for j in range(start + T):
                seen = j <= start + i or j < prefix[b]
                assert bias[b, 0, i, j] == (0.0 if seen else -np.inf)


@pytest.mark.derivation("ATT.18")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(max_examples=10)
@given(B=st.integers(1, 3), T=st.integers(1, 8), seed=st.integers(0, 20), data=st.data())
def test_loss_and_every_gradient_match_the_twin_with_a_prefix(family, B, T, seed, data):
    model, twin = build(family, seed % 3)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 11, (B, T))
    prefix = np.array(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))
    targets = rng.integers(0, 11, (B, T))
    targets[np.arange(T)[None] < prefix[:, None] - 1] = IGNORE_INDEX  # what the prefix sees is not predicted
    targets[:, -1] = rng.integers(0, 11, B)
    model.zero_grad()
    _, loss = model.forward(ids, targets, prefix_len=prefix)
    model.backward()
    _, twin_loss = twin(torch.from_numpy(ids), torch.from_numpy(targets), prefix_len=prefix)
    twin.zero_grad()
    twin_loss.backward()
    assert abs(loss - twin_loss.item()) <= MODEL_RTOL * abs(twin_loss.item())
    twin_grads = {n: t.grad.numpy() for n, t in twin.named_parameters()}
    # a key bias's gradient is zero in exact arithmetic (softmax ignores a per-row shift): judged on the
    # scale of the whole gradient, not on its own round-off
    scale = max(float(np.abs(g).max()) for g in twin_grads.values())
    for name, prm in model.named_parameters():
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, scale=scale, what=name)


@pytest.mark.derivation("ATT.18")
@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(T=st.integers(2, 8), p=st.integers(1, 8), seed=st.integers(0, 20))
def test_the_prefix_sees_itself_both_ways_and_never_the_rest(family, T, p, seed):
    """Changing a token at position t changes the logits at positions before t exactly when t is inside the
    prefix; a prefix of 0 or 1 is the causal model."""
    p = min(p, T)
    model, _ = build(family, seed % 3)
    model.eval()
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 11, (1, T))
    base, _ = model.forward(ids, prefix_len=np.array([p]))
    for t in range(1, T):
        changed = ids.copy()
        changed[0, t] = (ids[0, t] + 1) % 11
        logits, _ = model.forward(changed, prefix_len=np.array([p]))
        moved = np.abs(logits[0, :t] - base[0, :t]).max()
        assert (moved > 1e-6) if t < p else (moved == 0.0), (t, p, moved)
    causal, _ = model.forward(ids)
    for q in (0, 1):
        assert_close(model.forward(ids, prefix_len=np.array([q]))[0], causal, rtol=MODEL_RTOL, what=f"prefix {q}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(T=st.integers(2, 8), split=st.integers(1, 7), seed=st.integers(0, 20))
def test_cached_continuation_after_a_prefix_equals_one_forward(family, T, split, seed):
    """The prompt as a bidirectional prefix, then tokens one at a time with the caches: the logits of one
    forward with the same prefix."""
    split = min(split, T - 1)
    model, _ = build(family, seed % 3)
    model.eval()
    ids = np.random.default_rng(seed).integers(0, 11, (2, T))
    prefix = np.array([split, split])
    full, _ = model.forward(ids, prefix_len=prefix)
    caches = model.make_kv_caches(2)
    parts = [model.forward(ids[:, :split], kv_caches=caches, prefix_len=prefix)[0]]
    for t in range(split, T):
        parts.append(model.forward(ids[:, t:t + 1], kv_caches=caches, prefix_len=prefix)[0])
    assert_close(np.concatenate(parts, axis=1), full, rtol=MODEL_RTOL, what="cached")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("prefix, error", [(np.array([1.0, 2.0]), ValueError), (np.array([1]), ValueError),
                                           (np.array([[1, 2]]), ValueError), (np.array([-1, 2]), ValueError),
                                           (np.array([2, 6]), ValueError), ([1, 2], ValueError)])
def test_a_bad_prefix_is_refused_by_name(family, prefix, error):
    model, _ = build(family)
    with pytest.raises(error, match=r"forward: argument 'prefix_len'"):
        model.forward(np.zeros((2, 5), np.int64), prefix_len=prefix)


def test_a_sliding_window_refuses_a_prefix():
    model, _ = build("llama", sliding_window=3)
    with pytest.raises(ValueError, match=r"Llama.forward: argument 'prefix_len' expected None .* sliding_window"):
        model.forward(np.zeros((1, 4), np.int64), prefix_len=np.array([2]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_prefix_reaching_past_the_cache_is_refused(family):
    """Keys cached before the prefix ended were computed without its later tokens: not the prefix LM."""
    model, _ = build(family)
    model.eval()
    ids = np.arange(6)[None] % 11
    caches = model.make_kv_caches(1)
    model.forward(ids[:, :2], kv_caches=caches, prefix_len=np.array([2]))
    with pytest.raises(ValueError, match=r"forward: argument 'prefix_len' expected values of at most 2 with 2"):
        model.forward(ids[:, 2:4], kv_caches=caches, prefix_len=np.array([4]))
    assert caches[0].length == 2  # nothing moved
    step, _ = model.forward(ids[:, 2:3], kv_caches=caches, prefix_len=np.array([2]))
    full, _ = model.forward(ids[:, :3], prefix_len=np.array([2]))
    assert_close(step[:, -1], full[:, -1], rtol=MODEL_RTOL, what="continuation")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@given(T0=st.integers(1, 6), new=st.integers(1, 6), seed=st.integers(0, 20))
def test_generate_reads_the_prompt_as_the_prefix(family, T0, new, seed):
    """generate(prefix=True): greedy tokens equal a loop of full forwards with prefix_len = T0 (cached and not,
    and past the context window of 8), and the first token is the argmax of the prefix's last position."""
    from npformer.generate import generate

    model, _ = build(family, seed % 3)
    prompt = np.random.default_rng(seed).integers(0, 11, (2, T0))
    cached = generate(model, prompt, new, temperature=0.0, prefix=True)
    uncached = generate(model, prompt, new, temperature=0.0, prefix=True, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    model.eval()
    out = prompt
    for _ in range(new):  # by hand: the window's first position, and what is left of the prefix in it
        first = max(0, out.shape[1] - 8)
        logits, _ = model.forward(out[:, first:], prefix_len=np.full(2, max(0, T0 - first)))
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(uncached, out)
