"""Data parallelism and ZeRO 1-3 on N simulated ranks against one device (proofs/parallelism_data.md)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.module import Parameter
from npformer.optim.optimizer import AdamW
from npformer.parallel.data import (ACCOUNTING, DataParallel, Traffic, all_gather, all_reduce, data_parallel_step,
                                    flat_grads, flat_params, memory_per_rank, memory_table, reduce_scatter,
                                    shard_bounds)
from tests.badinput import BAD_COUNTS, expect_rejected, rejects_all
from tests.strategies import in_layout, layouts, randn, rngs, shapes
from tests.tolerances import MODEL_RTOL, RTOL, assert_close

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8, dtype="float64")
OPTS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def factory(seed=3):
    return lambda: GPT(CFG, seed=seed)


def batch(rng, B, T, ignore):
    ids = rng.integers(0, CFG.vocab_size, (B, T))
    targets = rng.integers(0, CFG.vocab_size, (B, T))
    targets[rng.random((B, T)) < ignore] = -100
    if not (targets != -100).any():
        targets[0, 0] = 1
    return ids, targets


def single_device(ids, targets, steps, seed=3):
    model = GPT(CFG, seed=seed)
    opt = AdamW(model.parameters(), **OPTS)
    for _ in range(steps):
        model.zero_grad()
        _, loss = model.forward(ids, targets)
        model.backward()
        opt.step()
    return model, loss


# -- (PAR.1), (PAR.2): the batch loss and gradient from the micro-batches ------------------------
@pytest.mark.derivation("PAR.1")
@pytest.mark.derivation("PAR.2")
@settings(max_examples=6)
@given(rng=rngs(), N=st.integers(1, 4), extra=st.integers(0, 3), T=st.integers(1, 6),
       ignore=st.sampled_from([0.0, 0.4, 0.9]))
def test_token_weighted_micro_batches_give_the_batch_loss_and_gradient(rng, N, extra, T, ignore):
    ids, targets = batch(rng, N + extra, T, ignore)
    ref = GPT(CFG, seed=3)
    _, loss = ref.forward(ids, targets)
    ref.backward()
    want = flat_grads(ref)
    parts = list(zip(np.array_split(ids, N), np.array_split(targets, N)))
    n_r = np.array([np.count_nonzero(t != -100) for _, t in parts], dtype=np.float64)
    n = n_r.sum()
    losses, grads = [], []
    for i, t in parts:
        m = GPT(CFG, seed=3)
        _, l_r = m.forward(i, t)
        m.backward()
        losses.append(l_r)
        grads.append(flat_grads(m))
    assert math.isclose(sum(n_r / n * np.array(losses)), loss, rel_tol=MODEL_RTOL)  # (PAR.1)
    scaled = [N * n_r[r] / n * grads[r] for r in range(N)]  # (PAR.2)
    assert_close(np.mean(scaled, axis=0), want, rtol=MODEL_RTOL, what="mean of scaled micro-batch gradients")
    if N > 1 and len(set(n_r)) > 1:  # uneven counts: the plain mean is not the batch gradient
        assert not np.allclose(np.mean(grads, axis=0), want, rtol=1e-6, atol=1e-9)


# -- (PAR.3), (PAR.4): the collectives and their ring volume --------------------------------------
@pytest.mark.derivation("PAR.3")
@pytest.mark.derivation("PAR.4")
@given(rng=rngs(), N=st.integers(1, 5), shape=shapes(0, 3), dtype=st.sampled_from([np.float32, np.float64]),
       layout=layouts(), op=st.sampled_from(["sum", "mean"]))
def test_collectives(rng, N, shape, dtype, layout, op):
    xs = [in_layout(randn(rng, shape, dtype), layout) for _ in range(N)]
    want = np.sum([x.astype(np.float64) for x in xs], axis=0) / (N if op == "mean" else 1)
    S = float(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    tr = Traffic()
    out = all_reduce(xs, op, tr)
    assert len(out) == N and len({id(o) for o in out}) == N  # each rank its own copy
    for o in out:
        assert o.dtype == dtype and o.shape == tuple(shape)
        assert_close(o, want, rtol=RTOL[np.dtype(dtype)] * N, what="all_reduce")
        assert np.array_equal(o, out[0])
    assert math.isclose(tr.all_reduce, 2 * (N - 1) / N * S)  # (PAR.4)
    shards = reduce_scatter(xs, op, tr)
    for (lo, hi), s in zip(shard_bounds(int(np.prod(shape, dtype=np.int64)), N), shards):
        assert s.shape == (hi - lo,)
        assert np.array_equal(s, out[0].reshape(-1)[lo:hi])  # RS is the slice of AR
    assert math.isclose(tr.reduce_scatter, (N - 1) / N * S)  # (PAR.4)
    gathered = all_gather(shards, tr)
    for g in gathered:
        assert np.array_equal(g, out[0].reshape(-1))  # AR = AG o RS
    assert math.isclose(tr.all_gather, (N - 1) / N * S)  # (PAR.4)
    assert math.isclose(tr.total, 4 * (N - 1) / N * S)
    assert tr.calls == {"all_reduce": 1, "reduce_scatter": 1, "all_gather": 1}


@given(size=st.integers(0, 50), N=st.integers(1, 9))
def test_shard_bounds_partition(size, N):
    b = shard_bounds(size, N)
    assert len(b) == N and b[0][0] == 0 and b[-1][1] == size
    assert all(b[r][1] == b[r + 1][0] for r in range(N - 1))
    lengths = [hi - lo for lo, hi in b]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


# -- (PAR.5): AdamW on a slice is the slice of AdamW ----------------------------------------------
@pytest.mark.derivation("PAR.5")
@given(rng=rngs(), P=st.integers(1, 40), N=st.integers(1, 6), dtype=st.sampled_from([np.float32, np.float64]))
def test_sharded_adamw_equals_full(rng, P, N, dtype):
    theta = randn(rng, (P,), dtype)
    full = Parameter(theta.copy())
    opt = AdamW([full], **OPTS)
    shards = [Parameter(theta[lo:hi].copy()) for lo, hi in shard_bounds(P, N)]
    opts = [AdamW([s], **OPTS) for s in shards]
    for _ in range(3):
        g = randn(rng, (P,), dtype)
        full.grad = g.copy()
        opt.step()
        for s, o, (lo, hi) in zip(shards, opts, shard_bounds(P, N)):
            s.grad = g[lo:hi].copy()
            o.step()
    assert np.array_equal(np.concatenate([s.data for s in shards]), full.data)  # bit for bit


# -- (PAR.6): every stage equals the single-device step; traffic per step ------------------------
@pytest.mark.derivation("PAR.6")
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@settings(max_examples=5)
@given(rng=rngs(), N=st.integers(1, 4), extra=st.integers(0, 2), ignore=st.sampled_from([0.0, 0.5]))
def test_stage_equals_single_device(stage, rng, N, extra, ignore):
    ids, targets = batch(rng, N + extra, 5, ignore)
    steps = 2
    ref, ref_loss = single_device(ids, targets, steps)
    want = flat_params(ref)
    dp = DataParallel(factory(), N, stage, **OPTS)
    for _ in range(steps):
        loss = dp.step(ids, targets)
    assert math.isclose(loss, ref_loss, rel_tol=MODEL_RTOL)
    views = dp.full_params()
    for v in views:
        assert_close(v, want, rtol=MODEL_RTOL, what=f"stage {stage} weights")
        assert np.array_equal(v, views[0])  # the replicas stay identical
    if stage == 3:
        assert all(np.isnan(p.data).all() for m in dp.models for p in m.parameters())  # freed between steps
    # Gradient and weight traffic per step, less the 8-byte token-count all-reduce (PAR.6).
    S = dp.n_params * 8
    count = steps * 2 * (N - 1) / N * 8
    per_step = {0: 2, 1: 3, 2: 2, 3: 3}[stage] * (N - 1) / N * S
    assert math.isclose(dp.traffic.total - count, steps * per_step, rel_tol=1e-12, abs_tol=1e-9)


def test_data_parallel_step_one_step():
    rng = np.random.default_rng(1)
    ids, targets = batch(rng, 6, 4, 0.3)
    ref, ref_loss = single_device(ids, targets, 1)
    dp, loss = data_parallel_step(factory(), (ids, targets), 3, stage=2, **OPTS)
    assert math.isclose(loss, ref_loss, rel_tol=MODEL_RTOL)
    assert_close(dp.full_params()[1], flat_params(ref), rtol=MODEL_RTOL, what="one step")


# -- (PAR.7): memory per rank ---------------------------------------------------------------------
@pytest.mark.derivation("PAR.7")
@given(P=st.integers(0, 10**9), N=st.integers(1, 64), accounting=st.sampled_from(sorted(ACCOUNTING)))
def test_memory_per_rank(P, N, accounting):
    w, g, o = ACCOUNTING[accounting]
    assert w + g + o == 16  # both accountings: 16 bytes per parameter unsharded
    want = {0: (w + g + o) * P, 1: (w + g) * P + o * P / N, 2: w * P + (g + o) * P / N, 3: (w + g + o) * P / N}
    totals = []
    for stage in range(4):
        m = memory_per_rank(stage, P, N, accounting)
        assert math.isclose(m["total"], want[stage], rel_tol=1e-12, abs_tol=1e-9)
        assert math.isclose(m["params"] + m["grads"] + m["optimizer"], m["total"], rel_tol=1e-12, abs_tol=1e-9)
        totals.append(m["total"])
    assert totals == sorted(totals, reverse=True)  # each stage saves memory


def test_memory_table_rows():
    table = memory_table(124_000_000, 8).splitlines()
    assert len(table) == 6 and table[2].startswith("| 0 |") and table[5].startswith("| 3 |")
    assert float(table[2].split("|")[-2]) == pytest.approx(16 * 124e6 / 2**20, abs=0.01)
    assert float(table[5].split("|")[-2]) == pytest.approx(2 * 124e6 / 2**20, abs=0.01)


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input():
    x = np.zeros(3)
    expect_rejected(lambda: all_reduce(x), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([]), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([x, [0.0, 0.0, 0.0]]), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([x, np.zeros(4)]), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([x, np.zeros(3, np.float32)]), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([np.zeros(3, int)]), "all_reduce", "arrays")
    expect_rejected(lambda: all_reduce([x], op="max"), "all_reduce", "op")
    expect_rejected(lambda: all_reduce([x], traffic={}), "all_reduce", "traffic")
    expect_rejected(lambda: reduce_scatter([x, np.zeros((3, 1))]), "reduce_scatter", "arrays")
    expect_rejected(lambda: reduce_scatter([x], op=None), "reduce_scatter", "op")
    expect_rejected(lambda: all_gather([np.zeros((2, 2))]), "all_gather", "shards")
    expect_rejected(lambda: all_gather(x), "all_gather", "shards")
    rejects_all(lambda n: shard_bounds(5, n), "shard_bounds", "N", [b for b in BAD_COUNTS if b is not None] + [0])
    rejects_all(lambda n: memory_per_rank(0, 5, n), "memory_per_rank", "N", [0, -1, 2.5, True, "3"])
    rejects_all(lambda s: memory_per_rank(s, 5, 2), "memory_per_rank", "stage", [4, -1, True, "1", 1.5])
    rejects_all(lambda a: memory_per_rank(0, 5, 2, a), "memory_per_rank", "accounting", ["fp16", None, 4])
    rejects_all(lambda n: DataParallel(factory(), n), "DataParallel", "N", [0, 2.5, True, "2"])
    rejects_all(lambda s: DataParallel(factory(), 2, s), "DataParallel", "stage", [4, True, None])
    expect_rejected(lambda: DataParallel(3, 2), "DataParallel", "model_factory")
    expect_rejected(lambda: DataParallel(lambda: 3, 2), "DataParallel", "model_factory")
    dp = DataParallel(factory(), 3)
    ids = np.zeros((3, 2), dtype=np.int64)
    expect_rejected(lambda: dp.step(ids[:2], ids[:2]), "DataParallel.step", "ids")
    expect_rejected(lambda: dp.step(ids.astype(float), ids), "DataParallel.step", "ids")
    expect_rejected(lambda: dp.step(ids, ids[:, :1]), "DataParallel.step", "targets")
    expect_rejected(lambda: dp.step(ids, np.full_like(ids, -100)), "DataParallel.step", "targets")
    expect_rejected(lambda: data_parallel_step(factory(), ids, 3), "data_parallel_step", "batch")
