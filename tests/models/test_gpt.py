"""The whole GPT against its torch twin: loss, every gradient, recordings, decoding."""

import numpy as np
import pytest
import torch

from kernels.twins.gpt import TwinGPT
from npformer.debug import first_divergence
from npformer.generate import generate
from npformer.models.gpt import GPT, GPTConfig
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, assert_close

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=12)


def pair(dropout=0.0, seed=0, **overrides):
    cfg = GPTConfig(**{**TINY, **overrides}, dropout=dropout, dtype="float64")
    model = GPT(cfg, seed=seed)
    twin = TwinGPT(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def batch(cfg, B=3, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
    return ids, rng.integers(0, cfg.vocab_size, (B, cfg.block_size))


def run_twin(twin, ids, targets, masks=None):
    _, loss = twin(torch.from_numpy(ids), torch.from_numpy(targets), masks=masks)
    twin.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in twin.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_loss_and_every_gradient_match_the_twin(dropout):
    model, twin = pair(dropout)
    ids, targets = batch(model.cfg)
    rec = model.start_recording()  # dropout masks are recorded, so the twin can reuse them
    _, loss = model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    model.stop_recording()
    masks = {k: v for k, v in rec.items() if k.endswith(".mask")}
    assert (len(masks) == 1 + 2 * model.cfg.n_layer) == (dropout > 0)
    twin_loss, twin_grads = run_twin(twin, ids, targets, masks)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)  # same names, the tied head included once (as wte.weight)
    for name, prm in ours.items():
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, what=name)


def record_both(model, twin):
    """One forward and backward of each on the same batch, recording under the same names."""
    ids, targets = batch(model.cfg)
    ours, theirs = model.start_recording(), twin.start_recording()
    model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    run_twin(twin, ids, targets)
    return ours, theirs


def test_divergence_finder_agrees_on_a_correct_model():
    ours, theirs = record_both(*pair())
    shared = [n for n in ours if n in theirs]
    assert len(shared) > 40  # forward values and gradients of every layer
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def test_divergence_finder_names_a_planted_bug(monkeypatch):
    """A wrong GELU backward in the MLP: the finder must point at the last block's MLP gradient."""
    import npformer.nn.mlp as mlp

    right = mlp.gelu_backward
    monkeypatch.setattr(mlp, "gelu_backward", lambda dy, cache: right(dy, cache) * 1.01)
    ours, theirs = record_both(*pair())
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "blocks.1.mlp.dact", found
    assert 0.005 < found.max_rel < 0.02  # the planted 1% error, measured


def test_cached_decoding_equals_full_recomputation():
    model, _ = pair()
    ids, _ = batch(model.cfg, B=2)
    model.eval()  # decoding is inference: no caches kept for a backward
    full, _ = model.forward(ids)
    caches = model.make_kv_caches(2)
    chunks = [model.forward(ids[:, a:b], kv_caches=caches)[0] for a, b in [(0, 3), (3, 4), (4, 8)]]
    assert_close(np.concatenate(chunks, axis=1), full, what="logits")


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(top_p=0.8),
                                     dict(temperature=0)])
def test_sampling_with_cache_equals_without(options):
    model, _ = pair()
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    n_new = 2 * model.cfg.block_size  # past the context window: the cache is rebuilt
    cached = generate(model, prompt, n_new, rng=np.random.default_rng(5), use_cache=True, **options)
    plain = generate(model, prompt, n_new, rng=np.random.default_rng(5), use_cache=False, **options)
    assert cached.shape == (2, 3 + n_new)
    np.testing.assert_array_equal(cached, plain)


def test_float32_model_keeps_float32():
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    ids, targets = batch(cfg)
    logits, loss = model.forward(ids, targets)
    model.backward()
    assert logits.dtype == np.float32 and np.isfinite(loss)
    assert all(p.grad.dtype == np.float32 for p in model.parameters())
    assert abs(loss - np.log(cfg.vocab_size)) < 0.1  # small init: near-uniform predictions


def test_too_long_a_sequence_is_refused():
    model, _ = pair()
    with pytest.raises(ValueError, match=r"GPT.forward: argument 'ids' expected at most 8 positions \(block_size 8"):
        model.forward(np.zeros((1, 9), np.int64))


@pytest.mark.parametrize("bad", [("ours", [1]), ("reference", None), ("rtol", -1e-9), ("rtol", float("nan")),
                                 ("atol", float("inf")), ("atol", True)])
def test_divergence_finder_checks_its_arguments(bad):
    from tests.badinput import expect_rejected

    args = {"ours": {"a": np.ones(2)}, "reference": {"a": np.ones(2)}, "rtol": 1e-9, "atol": 0.0}
    args[bad[0]] = bad[1]
    expect_rejected(lambda: first_divergence(**args), "first_divergence", bad[0])
