"""Tensor and pipeline parallelism equal the single-device GPT (proofs/parallelism_model.md)."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.models.gpt import GPT, Block, GPTConfig
from npformer.parallel.tensor_pipeline import (Communicator, TensorParallelBlock, bubble_fraction,
                                               peak_stored_activations, pipeline_schedule, run_pipeline)
from tests.tolerances import MODEL_RTOL

RANKS = st.sampled_from([1, 2, 4])


def close(a, b, scale=None):
    """|a - b| within MODEL_RTOL of ``scale`` (default max |b|): k's bias gradient is zero up to round-off
    (softmax ignores a shift shared by a row's scores), so gradients are judged on the model's own scale."""
    scale = max(float(np.max(np.abs(b))) if scale is None else scale, 1e-30)
    return float(np.max(np.abs(a - b))) <= MODEL_RTOL * scale


def grad_scale(module):
    return max(float(np.max(np.abs(p.grad))) for p in module.parameters())


def tp_case(n_ranks, heads_per_rank, head_dim, B, T, seed):
    H = n_ranks * heads_per_rank
    cfg = GPTConfig(vocab_size=5, block_size=8, n_layer=2, n_head=H, d_model=H * head_dim, dtype="float64")
    rng = np.random.default_rng(seed)
    block = Block(cfg, rng)
    for p in block.parameters():  # non-trivial biases and norms
        p.data[...] = rng.standard_normal(p.shape) * 0.5
    x = rng.standard_normal((B, T, cfg.d_model))
    dout = rng.standard_normal((B, T, cfg.d_model))
    return block, x, dout


@pytest.mark.derivation("PARM.1")
@pytest.mark.derivation("PARM.2")
@pytest.mark.derivation("PARM.4")
@pytest.mark.derivation("PARM.5")
@pytest.mark.derivation("PARM.6")
@given(RANKS, st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 4), st.integers(0, 2**16))
def test_tensor_parallel_block_equals_the_unsplit_block(n_ranks, hpr, head_dim, B, T, seed):
    block, x, dout = tp_case(n_ranks, hpr, head_dim, B, T, seed)
    ref, par = copy.deepcopy(block), copy.deepcopy(block)
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dout)
    tp = TensorParallelBlock(par, n_ranks)
    y = tp.forward(x)
    dx = tp.backward(dout)
    assert close(y, y_ref) and close(dx, dx_ref)
    grads_ref = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in par.named_parameters():
        assert close(p.grad, grads_ref[name], grad_scale(ref)), name


@pytest.mark.derivation("PARM.3")
@pytest.mark.derivation("PARM.7")
@given(RANKS, st.integers(1, 2), st.integers(1, 3), st.integers(0, 2**16))
def test_two_all_reduces_each_way_of_B_T_D_elements(n_ranks, B, T, seed):
    block, x, dout = tp_case(n_ranks, 1, 2, B, T, seed)
    tp = TensorParallelBlock(block, n_ranks)
    tp.forward(x)
    assert [n for n, _ in tp.comm.log] == ["attn.g.forward", "mlp.g.forward"]
    tp.backward(dout)
    assert [n for n, _ in tp.comm.log] == ["attn.g.forward", "mlp.g.forward", "mlp.f.backward", "attn.f.backward"]
    payload = B * T * x.shape[-1] * 8
    assert all(b == payload for _, b in tp.comm.log)
    assert tp.comm.ring_bytes_per_rank(payload) == 2 * (n_ranks - 1) / n_ranks * payload


def test_all_reduce_sums_in_rank_order():
    comm = Communicator(3)
    parts = [np.full(2, float(r)) for r in range(3)]
    assert np.array_equal(comm.all_reduce("x", parts), np.full(2, 3.0))
    assert comm.log == [("x", 16)]


@pytest.mark.derivation("PARM.8")
@pytest.mark.derivation("PARM.9")
@pytest.mark.derivation("PARM.10")
@given(st.integers(1, 6), st.integers(1, 8), st.sampled_from(["gpipe", "1f1b"]))
def test_bubble_is_N_minus_1_over_M_plus_N_minus_1(N, M, kind):
    events = pipeline_schedule(kind, N, M)
    assert len(events) == 2 * N * M
    assert len({(e.time, e.stage) for e in events}) == len(events)  # one op per stage per slot
    assert max(e.time for e in events) + 1 == 2 * (M + N - 1)
    assert bubble_fraction(events, N) == pytest.approx((N - 1) / (M + N - 1), abs=1e-15)


@pytest.mark.derivation("PARM.11")
@given(st.integers(1, 6), st.integers(1, 8))
def test_gpipe_stores_M_activations_1f1b_at_most_N(N, M):
    assert peak_stored_activations(pipeline_schedule("gpipe", N, M), N) == [M] * N
    peak = peak_stored_activations(pipeline_schedule("1f1b", N, M), N)
    assert peak == [min(N - s, M) for s in range(N)] and max(peak) <= N


def small_gpt(seed):
    cfg = GPTConfig(vocab_size=7, block_size=6, n_layer=4, n_head=2, d_model=6, dtype="float64")
    return GPT(cfg, seed=seed)


@pytest.mark.derivation("PARM.12")
@settings(max_examples=8)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 4), st.sampled_from(["gpipe", "1f1b"]),
       st.integers(1, 5), st.integers(0, 2**16))
def test_pipeline_gradients_equal_the_full_batch_gradients(N, M, kind, T, seed):
    model = small_gpt(seed)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 7, (4, T))
    targets = rng.integers(0, 7, (4, T))
    targets[0, 0] = -100  # uneven counted targets per micro-batch
    ref, par = copy.deepcopy(model), copy.deepcopy(model)
    _, loss_ref = ref.forward(ids, targets)
    ref.backward()
    loss, peak = run_pipeline(par, ids, targets, N, M, kind)
    assert loss == pytest.approx(loss_ref, rel=MODEL_RTOL)
    assert peak == peak_stored_activations(pipeline_schedule(kind, N, M), N)
    grads_ref = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in par.named_parameters():
        assert close(p.grad, grads_ref[name], grad_scale(ref)), name
    assert all(m.pending_backwards == 0 for _, m in par.named_modules())


def test_bad_input_is_rejected_by_name():
    with pytest.raises(ValueError, match="pipeline_schedule.*'kind'"):
        pipeline_schedule("zigzag", 2, 2)
    with pytest.raises((ValueError, TypeError), match="pipeline_schedule.*'n_stages'"):
        pipeline_schedule("gpipe", 0, 2)
    block, _, _ = tp_case(2, 1, 2, 1, 1, 0)
    with pytest.raises(ValueError, match="TensorParallelAttention.*'n_ranks'"):
        TensorParallelBlock(block, 4)
    with pytest.raises(TypeError, match="TensorParallelBlock.*'block'"):
        TensorParallelBlock(object(), 2)
    with pytest.raises(TypeError, match="run_pipeline.*'model'"):
        run_pipeline(object(), np.zeros((2, 2), int), np.zeros((2, 2), int), 1, 1)
    with pytest.raises((ValueError, TypeError), match="run_pipeline.*'n_micro'"):
        run_pipeline(small_gpt(0), np.zeros((2, 2), int), np.zeros((2, 2), int), 2, 3)
