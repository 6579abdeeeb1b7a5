"""Gradient checkpointing: bit-identical gradients, recomputed dropout masks, less memory."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.checkpoint import CheckpointCache, Checkpointed, checkpoint_blocks


def make(n_layer=2, dropout=0.2, dtype="float32", d_model=12, n_head=2, block_size=8, seed=0):
    cfg = GPTConfig(vocab_size=11, block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                    dropout=dropout, dtype=dtype)
    return GPT(cfg, seed=seed)


def step(model, ids, targets):
    model.zero_grad()
    _, loss = model.forward(ids, targets)
    model.backward()
    return loss, {n: p.grad.copy() for n, p in model.named_parameters()}


@pytest.mark.derivation("CKPT.2")
@pytest.mark.derivation("CKPT.3")
@settings(max_examples=10)
@given(n_layer=st.integers(1, 4), dropout=st.sampled_from([0.0, 0.1, 0.5]), B=st.integers(1, 3),
       T=st.integers(1, 8), dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 50),
       segment=st.sampled_from([1, 2, 3, "sqrt"]))
def test_gradients_are_bit_identical_to_the_plain_model(n_layer, dropout, B, T, dtype, seed, segment):
    plain = make(n_layer, dropout, dtype, seed=seed)
    ckpt = checkpoint_blocks(make(n_layer, dropout, dtype, seed=seed), segment_size=segment)
    rng = np.random.default_rng(seed + 1)
    for _ in range(2):  # two steps: the generator continues identically after a recomputation
        ids, targets = rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))
        loss_a, grads_a = step(plain, ids, targets)
        loss_b, grads_b = step(ckpt, ids, targets)
        assert loss_a == loss_b
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            assert np.array_equal(grads_a[name], grads_b[name]), name
    assert plain.rng.bit_generator.state == ckpt.rng.bit_generator.state


@pytest.mark.derivation("CKPT.1")
def test_a_training_forward_keeps_only_the_inputs_and_generator_states():
    model = checkpoint_blocks(make(n_layer=2, dropout=0.3))
    ids = np.zeros((2, 8), dtype=np.int64)
    model.forward(ids, ids)
    for wrapper in model.blocks:
        assert isinstance(wrapper, Checkpointed)
        assert wrapper.pending_backwards == 1
        (cache,) = wrapper._caches
        assert isinstance(cache, CheckpointCache) and cache.args[0].shape == (2, 8, 12)
        assert all(m.pending_backwards == 0 for _, m in wrapper.block.named_modules())  # caches dropped
        assert len(cache.rng_states) == 1  # the model's one generator, shared by its dropouts
    model.backward()
    assert sum(m.pending_backwards for _, m in model.named_modules()) == 0


def test_recordings_and_names_equal_the_plain_model():
    plain, ckpt = make(2, 0.2), checkpoint_blocks(make(2, 0.2))
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    ids = np.arange(16).reshape(2, 8) % 11
    recs = []
    for m in (plain, ckpt):
        rec = m.start_recording()
        step(m, ids, ids)
        recs.append(rec)
    assert list(recs[0]) == list(recs[1])  # the recomputation records nothing twice
    for name in recs[0]:
        assert np.array_equal(recs[0][name], recs[1][name]), name


def test_eval_mode_is_the_plain_forward_and_keeps_nothing():
    plain, ckpt = make(2, 0.2).eval(), checkpoint_blocks(make(2, 0.2)).eval()
    ids = np.arange(8).reshape(1, 8)
    assert np.array_equal(plain.forward(ids)[0], ckpt.forward(ids)[0])
    assert sum(m.pending_backwards for _, m in ckpt.named_modules()) == 0


def test_bad_input():
    with pytest.raises(TypeError, match="Checkpointed: argument 'block'"):
        Checkpointed(np.zeros(3))
    with pytest.raises(TypeError, match="Checkpointed: argument 'block'"):
        Checkpointed(Checkpointed(make(1).blocks[0]))
    with pytest.raises(TypeError, match="checkpoint_blocks: argument 'model'"):
        checkpoint_blocks("gpt")
    model = make(1)
    model.forward(np.zeros((1, 8), dtype=np.int64), np.zeros((1, 8), dtype=np.int64))
    with pytest.raises(RuntimeError, match="checkpoint_blocks"):
        checkpoint_blocks(model)
    ckpt = checkpoint_blocks(make(1))
    with pytest.raises(RuntimeError, match="no forward left"):
        ckpt.blocks[0].backward(np.zeros((1, 8, 12), dtype=np.float32))
    with pytest.raises(ValueError, match="Checkpointed.forward"):
        ckpt.blocks[0].forward(np.zeros((1, 8, 5), dtype=np.float32))
    assert ckpt.blocks[0].pending_backwards == 0  # the failed forward left nothing


def test_a_failed_backward_leaves_every_block_as_before():
    model = checkpoint_blocks(make(n_layer=3, dropout=0.1, d_model=8), segment_size=3)
    ids = np.arange(16).reshape(2, 8) % 11
    model.forward(ids, ids)
    before = [len(m._caches) for _, m in model.named_modules()]
    with pytest.raises(ValueError, match="Checkpointed.backward"):
        model.blocks[2].backward(np.zeros((2, 8, 5)))  # a wrong gradient shape, after the recomputation
    assert [len(m._caches) for _, m in model.named_modules()] == before
    model.backward()  # and the step still completes
    assert sum(m.pending_backwards for _, m in model.named_modules()) == 0


def peak_bytes(model, ids):
    """Peak bytes allocated by numpy during one training forward and backward (tracemalloc)."""
    model.zero_grad()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    model.forward(ids, ids)
    model.backward()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def measure(n_layer):
    kw = dict(n_layer=n_layer, dropout=0.1, d_model=64, n_head=4, block_size=64)
    ids = np.random.default_rng(0).integers(0, 11, (8, 64))
    return peak_bytes(make(**kw), ids), peak_bytes(checkpoint_blocks(make(**kw)), ids)


@pytest.mark.derivation("CKPT.4")
def test_peak_memory_falls_and_grows_more_slowly_with_depth():
    (plain4, ckpt4), (plain8, ckpt8) = measure(4), measure(8)
    assert ckpt4 < plain4 and ckpt8 < plain8
    # (CKPT.4): going from 4 to 8 blocks adds 4 blocks' caches to the plain model, 4 inputs to the wrapped one.
    assert (ckpt8 - ckpt4) < 0.5 * (plain8 - plain4)
    assert ckpt8 < 0.5 * plain8


@pytest.mark.derivation("CKPT.5")
@pytest.mark.parametrize("k", [1, 2, 3, "sqrt"])
def test_every_block_is_recomputed_exactly_once(k):
    """(CKPT.5): n forwards, n recomputations, n backwards: 2 forwards of each block a step."""
    n = 5
    model = checkpoint_blocks(make(n_layer=n, dropout=0.1, d_model=8), segment_size=k)
    calls = [0] * n
    for i, w in enumerate(model.blocks):
        inner = w.block.forward

        def counting(*args, inner=inner, i=i, **kwargs):
            calls[i] += 1
            return inner(*args, **kwargs)

        object.__setattr__(w.block, "forward", counting)
    ids = np.arange(16).reshape(2, 8) % 11
    for _ in range(2):
        model.forward(ids, ids)
        model.backward()
    assert calls == [4] * n


@pytest.mark.derivation("CKPT.6")
@pytest.mark.parametrize("n, k", [(4, 2), (5, 2), (9, 3), (9, "sqrt"), (6, 1)])
def test_segments_keep_n_over_k_inputs_and_at_most_k_blocks_of_caches(n, k):
    """(CKPT.6): ceil(n/k) stored inputs after the forward; at most k blocks hold caches during the backward."""
    model = checkpoint_blocks(make(n_layer=n, dropout=0.1, d_model=8), segment_size=k)
    size = round(np.sqrt(n)) if k == "sqrt" else k
    ids = np.arange(16).reshape(2, 8) % 11
    model.forward(ids, ids)
    stored = sum(w._caches[-1].args[0] is not None for w in model.blocks)
    assert stored == -(-n // size)
    holding = []
    for w in model.blocks:
        inner = w.block.backward

        def spy(dout, inner=inner):
            holding.append(sum(v.block.pending_backwards > 0 for v in model.blocks))
            return inner(dout)

        object.__setattr__(w.block, "backward", spy)
    model.backward()
    assert max(holding) == size and len(holding) == n


@pytest.mark.derivation("CKPT.6")
def test_sqrt_schedule_minimises_the_stated_cost():
    """(CKPT.6): memory (n/k) a + k c is least at k = sqrt(n a / c); a = c gives k = sqrt(n), cost 2 sqrt(n)."""
    for n in (4, 9, 16, 100):
        for a, c in ((1.0, 1.0), (1.0, 4.0), (3.0, 1.0)):
            cost = {k: n / k * a + k * c for k in range(1, n + 1)}
            best = min(cost, key=cost.get)
            k_star = np.sqrt(n * a / c)
            assert best in (int(np.floor(k_star)), int(np.ceil(k_star)), 1)
            assert cost[best] >= 2 * np.sqrt(n * a * c) - 1e-12  # the continuous minimum bounds it below
        assert min(range(1, n + 1), key=lambda k: n / k + k) == round(np.sqrt(n))


def test_segment_size_bad_input():
    for bad in (0, 1.5, "half", True):
        with pytest.raises((TypeError, ValueError), match="checkpoint_blocks: argument 'segment_size'"):
            checkpoint_blocks(make(2), segment_size=bad)
