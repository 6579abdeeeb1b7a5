"""The fast path (npformer/ops/fastpath.py) against its plain form.

Causal block skipping (ATT.19) equals one block of every query against every key at the
dtype's tolerance, for every mask, bias, group size, window and block size, including blocks
of one row and blocks longer than the sequence; its probabilities are exactly zero on the
hidden keys. Row-parallel work gives the plain form's result bit for bit.
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.ops import attention, fastpath
from npformer.ops.attention import SLAB_BYTES
from npformer.ops.attention import attention_backward, attention_forward, query_blocks, sliding_window_mask
from tests.badinput import expect_rejected
from tests.ops.test_attention import configs, hidden_mask, in_layouts, make, torch_plain
from tests.strategies import rngs
from tests.tolerances import RTOL, assert_close

BLOCKS = st.sampled_from([1, 2, 3, 5, 64])


def run(cfg, inputs, window=None):
    q, k, v, dout, bias = inputs
    a = in_layouts(cfg.layouts, q=q, k=k, v=v, dout=dout, bias=bias, pad=cfg.pad)
    out, cache = attention_forward(a["q"], a["k"], a["v"], causal=cfg.causal or window is not None,
                                   key_padding_mask=a["pad"], bias=a["bias"], window=window)
    return (out, cache.probs, *attention_backward(a["dout"], cache))


@pytest.mark.derivation("ATT.19")
@given(cfg=configs(), block=BLOCKS, window=st.sampled_from([None, 1, 2, 4]))
def test_causal_blocks_equal_the_plain_form(cfg, block, window):
    inputs = make(cfg.shape, cfg.dtype, cfg.magnitude, cfg.rng, cfg.bias_shape)
    with fastpath.configured(causal_block=None):
        plain = run(cfg, inputs, window)
    with fastpath.configured(causal_block=block):
        fast = run(cfg, inputs, window)
    rtol = RTOL[np.dtype(cfg.dtype)]
    for name, want, got in zip(("out", "probs", "dq", "dk", "dv", "dbias"), plain, fast):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_close(got, want, rtol=rtol, what=name)


@pytest.mark.derivation("ATT.19")
@given(cfg=configs(), block=BLOCKS)
def test_causal_blocks_match_torch(cfg, block):
    """The block path against attention written out in torch (the oracle of test_attention.py)."""
    B, H, Hkv, Tq, Tk, D = cfg.shape
    q, k, v, dout, bias = make(cfg.shape, cfg.dtype, cfg.magnitude, cfg.rng, cfg.bias_shape)
    with fastpath.configured(causal_block=block):
        out, cache = attention_forward(q, k, v, causal=True, key_padding_mask=cfg.pad, bias=bias)
    hidden = hidden_mask(B, Tq, Tk, True, cfg.pad)
    probs = torch_plain(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                        None if bias is None else torch.from_numpy(bias), hidden)
    assert_close(cache.probs, probs.numpy(), rtol=RTOL[np.dtype(cfg.dtype)])


@pytest.mark.derivation("ATT.19")
@given(Tq=st.integers(0, 40), Tk=st.integers(0, 40), block=st.integers(1, 45),
       window=st.sampled_from([None, 1, 3, 17]))
def test_blocks_cover_every_visible_key_and_no_row_twice(Tq, Tk, block, window):
    """Each row lies in one block; every key it sees lies in its block's range [lo, hi) (ATT.19)."""
    with fastpath.configured(causal_block=block):
        blocks = query_blocks(Tq, Tk, True, window)
    seen = np.zeros(Tq, int)
    visible = ~sliding_window_mask(Tq, Tk, window if window is not None else max(Tk, 1))
    for i0, i1, lo, hi in blocks:
        seen[i0:i1] += 1
        assert 0 <= lo <= hi <= Tk
        inside = np.zeros(Tk, bool)
        inside[lo:hi] = True
        assert not (visible[i0:i1] & ~inside).any()
        if hi > lo:  # the range is tight: its first and last keys are seen by some row
            assert visible[i0:i1, lo].any() and visible[i0:i1, hi - 1].any()
    assert (seen == 1).all()


@given(rng=rngs(), block=st.integers(1, 9))
def test_hidden_probabilities_are_exactly_zero(rng, block):
    q, k, v = (rng.standard_normal((2, 3, 11, 4)).astype(np.float32) for _ in range(3))
    with fastpath.configured(causal_block=block):
        _, cache = attention_forward(q, k, v, causal=True)
    assert (cache.probs[..., np.triu_indices(11, 1)[0], np.triu_indices(11, 1)[1]] == 0).all()
    assert_close(cache.probs.sum(-1), np.ones((2, 3, 11), np.float32), rtol=RTOL[np.dtype(np.float32)])


def test_a_backward_after_the_setting_changed_is_still_exact():
    """The backward reads its blocks from the setting at its own call; any blocking is exact."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 9, 3)) for _ in range(4))
    with fastpath.configured(causal_block=2):
        _, cache = attention_forward(q, k, v, causal=True)
    with fastpath.configured(causal_block=None):
        got = attention_backward(dout, cache)
        _, cache_plain = attention_forward(q, k, v, causal=True)
        want = attention_backward(dout, cache_plain)
    for g, w in zip(got[:3], want[:3]):
        assert_close(g, w, rtol=RTOL[np.dtype(np.float64)])


# --- row-parallel work -------------------------------------------------------------------------


@given(n=st.integers(0, 3000), parts=st.integers(1, 9))
def test_row_slices_partition_the_rows(n, parts):
    slices = fastpath.row_slices(n, parts)
    covered = np.concatenate([np.arange(n)[s] for s in slices]) if slices else np.arange(0)
    assert (covered == np.arange(n)).all()
    assert len(slices) <= parts and all(s.stop > s.start for s in slices)
    if slices:
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1


@given(n=st.integers(0, 5000), threads=st.integers(1, 5))
def test_row_parallel_visits_every_row_once(n, threads):
    counts = np.zeros(n, int)
    names = set()

    def fn(rows):
        counts[rows] += 1
        names.add(threading.current_thread().name)

    with fastpath.configured(threads=threads):
        fastpath.row_parallel(fn, n, row_size=64)
    assert (counts == 1).all()
    assert len(names) <= threads


@given(n=st.integers(0, 5000), threads=st.integers(1, 5), row_size=st.integers(0, 300), block=st.integers(1, 1 << 14))
def test_row_parallel_in_blocks_visits_every_row_once_in_slices_of_at_most_a_block(n, threads, row_size, block):
    """``blocked``: every row is still handed over once, in slices of at most ``CACHE_BLOCK`` elements (one
    row where a row is larger); on one thread (the plain form) in a single call."""
    counts = np.zeros(n, int)
    sizes = []

    def fn(rows):
        counts[rows] += 1
        sizes.append(rows.stop - rows.start)

    before = fastpath.CACHE_BLOCK
    fastpath.CACHE_BLOCK = block
    try:
        with fastpath.configured(threads=threads):
            fastpath.row_parallel(fn, n, row_size=row_size, blocked=True)
    finally:
        fastpath.CACHE_BLOCK = before
    assert (counts == 1).all()
    most = max(1, block // max(row_size, 1)) if threads > 1 else max(n, 1)
    assert max(sizes) <= most and (n == 0) == (sizes == [0])
    assert len(sizes) >= -(-n // most)  # no slice longer than a block: at least ceil(n / most) of them


def test_row_parallel_runs_large_work_at_once_on_several_threads_and_small_work_on_one():
    barrier = threading.Barrier(3, timeout=20)  # passes only when three calls run at the same time
    names = set()

    def together(rows):
        barrier.wait()
        names.add(threading.current_thread().name)

    with fastpath.configured(threads=3):
        fastpath.row_parallel(together, 3000, row_size=64)
        assert len(names) == 3
        names.clear()
        fastpath.row_parallel(lambda rows: names.add(threading.current_thread().name), 3000, row_size=1)
        assert names == {threading.current_thread().name}


def test_an_error_in_a_worker_reaches_the_caller():
    def fn(rows):
        if rows.start > 0:
            raise RuntimeError(f"row block {rows.start}")

    with fastpath.configured(threads=2), pytest.raises(RuntimeError, match="row block"):
        fastpath.row_parallel(fn, 4000, row_size=64)


@given(threads=st.integers(1, 4), failing=st.integers(0, 39), block=st.integers(1, 30))
def test_an_error_in_one_slice_is_raised_once_every_slice_has_run(threads, failing, block):
    """``blocked``: the slices after a failing one, on the same thread, still run (as the other threads'
    do); the caller gets the first error once all have finished."""
    done = np.zeros(40, int)

    def fn(rows):
        done[rows] += 1
        if rows.start <= failing < rows.stop:
            raise RuntimeError(f"slice {rows.start}")

    before, minimum = fastpath.CACHE_BLOCK, fastpath.MIN_ELEMENTS
    fastpath.CACHE_BLOCK, fastpath.MIN_ELEMENTS = block, 1
    try:
        with fastpath.configured(threads=threads), pytest.raises(RuntimeError, match="slice"):
            fastpath.row_parallel(fn, 40, row_size=1, blocked=True)
    finally:
        fastpath.CACHE_BLOCK, fastpath.MIN_ELEMENTS = before, minimum
    assert (done == 1).all()


def test_configured_restores_the_settings():
    before = (fastpath.num_threads(), fastpath.causal_block())
    with fastpath.configured(threads=7, causal_block=None):
        assert (fastpath.num_threads(), fastpath.causal_block()) == (7, None)
    assert (fastpath.num_threads(), fastpath.causal_block()) == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_threads_are_refused(bad):
    expect_rejected(lambda: fastpath.configure(threads=bad), "fastpath.configure", "threads")


@pytest.mark.parametrize("bad", [0, -3, 2.0, False, "64"])
def test_bad_causal_blocks_are_refused(bad):
    expect_rejected(lambda: fastpath.configure(causal_block=bad), "fastpath.configure", "causal_block")


# --- ops on row blocks: bit for bit the plain form -----------------------------------------------

ROWS = st.sampled_from([1, 3, 257, 1031])  # with D up to 193: from one thread's work to several
WIDTHS = st.sampled_from([1, 5, 64, 193])


@contextlib.contextmanager
def on_threads(threads=3):
    """``threads`` threads for any amount of work (MIN_ELEMENTS lowered), and a check that work was
    indeed handed to threads inside the block: a test of the threaded form that ran on one thread fails."""
    calls = []
    run_together, minimum, block = fastpath._run_together, fastpath.MIN_ELEMENTS, fastpath.CACHE_BLOCK

    def counted(tasks):
        calls.append(len(tasks))
        return run_together(tasks)

    fastpath._run_together, fastpath.MIN_ELEMENTS, fastpath.CACHE_BLOCK = counted, 1, 64  # blocks of a few rows
    try:
        with fastpath.configured(threads=threads):
            yield
    finally:
        fastpath._run_together, fastpath.MIN_ELEMENTS, fastpath.CACHE_BLOCK = run_together, minimum, block
    assert calls and max(calls) > 1, "nothing ran on more than one thread"


def _both_forms(call, rows=2):
    with fastpath.configured(threads=1):
        plain = call()
    with (on_threads() if rows > 1 else fastpath.configured(threads=3)):  # one row: one thread's work
        fast = call()
    return plain, fast


def _assert_identical(plain, fast):
    for want, got in zip(plain, fast):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=True)


@given(rng=rngs(), n=ROWS, D=WIDTHS, dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]))
def test_layernorm_on_row_blocks_is_the_plain_form_bit_for_bit(rng, n, D, dtype, layout):
    from npformer.ops.layernorm import layernorm_backward, layernorm_forward
    from tests.strategies import in_layout

    x = in_layout((rng.standard_normal((n, D)) * 3 + 1).astype(dtype), layout)
    x[0, 0] = 1e30 if dtype == np.float32 else 1e300  # a row whose variance overflows: (LN.13)
    gamma, beta, dy = rng.standard_normal(D).astype(dtype), rng.standard_normal(D).astype(dtype), \
        rng.standard_normal((n, D)).astype(dtype)

    def call():
        y, cache = layernorm_forward(x, gamma, beta)
        dx, _, _ = layernorm_backward(dy, cache)
        return y, cache.xhat, cache.rstd, dx

    _assert_identical(*_both_forms(call, n))


@given(rng=rngs(), n=ROWS, D=WIDTHS, dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]))
def test_rmsnorm_on_row_blocks_is_the_plain_form_bit_for_bit(rng, n, D, dtype, layout):
    from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
    from tests.strategies import in_layout

    x = in_layout((rng.standard_normal((n, D)) * 3 + 1).astype(dtype), layout)
    x[0, 0] = 1e30 if dtype == np.float32 else 1e300  # a row whose mean square overflows: (RMS.10)
    gamma, dy = rng.standard_normal(D).astype(dtype), rng.standard_normal((n, D)).astype(dtype)

    def call():
        y, cache = rmsnorm_forward(x, gamma)
        dx, dgamma = rmsnorm_backward(dy, cache)
        return y, cache.xhat, cache.rstd, dx, dgamma

    _assert_identical(*_both_forms(call, n))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@given(rng=rngs(), n=st.sampled_from([2, 3]), D=st.sampled_from([8_999, 20_000]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_norms_of_long_rows_do_not_depend_on_any_thread_count(norm, rng, n, D, dtype):
    """Rows longer than NumPy's einsum buffer (8192) and the BLAS's threshold for splitting a dot product among
    its threads (float64: 10000): each row's sums must not depend on the block of rows holding it (one row per
    thread here) nor on the BLAS's own thread count."""
    from threadpoolctl import threadpool_limits

    from npformer.ops.layernorm import layernorm_backward, layernorm_forward
    from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward

    x, dy = (rng.standard_normal((n, D)) * 3 + 1).astype(dtype), rng.standard_normal((n, D)).astype(dtype)
    gamma, beta = rng.standard_normal(D).astype(dtype), rng.standard_normal(D).astype(dtype)

    def call():
        if norm == "layernorm":
            y, cache = layernorm_forward(x, gamma, beta)
            return (y, cache.rstd) + layernorm_backward(dy, cache)
        y, cache = rmsnorm_forward(x, gamma)
        return (y, cache.rstd) + rmsnorm_backward(dy, cache)

    plain, fast = _both_forms(call, n)
    _assert_identical(plain, fast)
    for blas in (1, 2):
        with threadpool_limits(blas):
            _assert_identical(plain, call())


@given(rng=rngs(), n=st.sampled_from([1, 7, 40_000, 70_001]), dtype=st.sampled_from([np.float32, np.float64]),
       chunk=st.sampled_from([None, 1, 999, 4096]))
def test_gelu_on_element_blocks_is_the_plain_form_bit_for_bit(rng, n, dtype, chunk):
    """On threads, and in chunks of any size (``chunk``: CHUNK lowered so that chunks end inside every
    thread's share; None: the library's own), the elements are those of one thread in one piece."""
    from npformer.ops import activations
    from npformer.ops.activations import gelu_backward, gelu_forward

    x = (rng.standard_normal(n) * 4).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)

    def call():
        y, cache = gelu_forward(x, "tanh")
        return y, cache.cdf, cache.tanh_u, gelu_backward(dy, cache)

    whole = activations.CHUNK
    with fastpath.configured(threads=1):
        activations.CHUNK = n  # the plain form: one thread, one piece
        try:
            plain = call()
        finally:
            activations.CHUNK = whole
    activations.CHUNK = chunk or whole
    try:
        with (on_threads() if n > 1 else fastpath.configured(threads=3)):
            fast = call()
    finally:
        activations.CHUNK = whole
    _assert_identical(plain, fast)


@given(rng=rngs(), B=st.sampled_from([1, 2, 5]), block=st.sampled_from([None, 3]))
def test_attention_on_batch_blocks_is_the_plain_form_bit_for_bit(rng, B, block):
    q = rng.standard_normal((B, 4, 33, 8)).astype(np.float32)
    k, v = (rng.standard_normal((B, 2, 41, 8)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal((B, 4, 33, 8)).astype(np.float32)

    def call():
        with fastpath.configured(causal_block=block):
            out, cache = attention_forward(q, k, v, causal=True)
            return (out, cache.probs, *attention_backward(dout, cache)[:3])

    with fastpath.configured(threads=1):
        plain = call()
    if B == 1:  # one batch element: one thread's work
        with fastpath.configured(threads=3):
            fast = call()
    else:
        with on_threads():
            fast = call()
    _assert_identical(plain, fast)


@st.composite
def slab_cases(draw):
    """Attention calls of every mask and bias form, with keys from a few up to rows longer than the
    8192 elements past which some NumPy reductions work in pieces."""
    rng = draw(rngs())
    B, (H, Hkv) = draw(st.integers(1, 7)), draw(st.sampled_from([(1, 1), (4, 2), (3, 3), (6, 1)]))
    Tq, Tk = draw(st.sampled_from([(1, 1), (1, 9000), (33, 41), (70, 70), (3, 130)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    causal, padded = draw(st.booleans()), draw(st.booleans())
    bias_shape = draw(st.sampled_from([None, (B, H, Tq, Tk), (1, H, 1, Tk), (B, 1, Tq, 1)]))
    q, dout = (rng.standard_normal((B, H, Tq, 8)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, Hkv, Tk, 8)).astype(dtype) for _ in range(2))
    return dict(q=q, k=k, v=v, dout=dout, causal=causal,
                key_padding_mask=rng.random((B, Tk)) < 0.3 if padded else None,
                bias=None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype))


@given(case=slab_cases(), slab=st.sampled_from([2, 3, None]), threads=st.sampled_from([1, 3]))
def test_attention_on_slabs_of_batch_elements_is_one_element_at_a_time_bit_for_bit(case, slab, threads):
    dout = case.pop("dout")

    def call(slab_bytes):
        attention.SLAB_BYTES = slab_bytes
        try:
            out, cache = attention_forward(**case)
            return (out, cache.probs, *(g for g in attention_backward(dout, cache) if g is not None))
        finally:
            attention.SLAB_BYTES = SLAB_BYTES

    q, k = case["q"], case["k"]
    rows = min(q.shape[2], fastpath.causal_block()) if case["causal"] else q.shape[2]  # a block's, as the op's
    element = q.shape[1] * rows * k.shape[2] * q.itemsize
    with fastpath.configured(threads=1):
        plain = call(1)  # one batch element per slab
    with fastpath.configured(threads=threads):
        fast = call(1 << 40 if slab is None else slab * element)
    _assert_identical(plain, fast)


@given(sizes=st.lists(st.integers(0, 50_000), max_size=12), threads=st.integers(1, 4))
def test_parallel_items_runs_every_item_once(sizes, threads):
    counts = [0] * len(sizes)
    lock = threading.Lock()

    def fn(i):
        with lock:
            counts[i] += 1

    with fastpath.configured(threads=threads):
        fastpath.parallel_items(fn, sizes)
    assert counts == [1] * len(sizes)


@given(rng=rngs(), threads=st.sampled_from([2, 3]), decoupled=st.booleans())
def test_adam_on_threads_is_the_plain_form_bit_for_bit(rng, threads, decoupled):
    from npformer.nn.module import Parameter
    from npformer.optim import Adam, AdamW

    shapes = [(300, 200), (7,), (), (129, 3), (64, 64)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    def train(n_threads):
        params = [Parameter(x.copy()) for x in start]
        opt = (AdamW if decoupled else Adam)(params, lr=1e-2, weight_decay=0.1)
        with (fastpath.configured(threads=1) if n_threads == 1 else on_threads(n_threads)):
            for g in grads:
                for p, gi in zip(params, g):
                    p.grad = gi.copy()
                opt.step()
        return [p.data for p in params] + [opt.state[p]["exp_avg_sq"] for p in params]

    _assert_identical(train(1), train(threads))


@given(rng=rngs(), n=st.sampled_from([2, 5, 300]), dout=st.sampled_from([1, 7, 130]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_linear_bias_add_on_row_blocks_is_the_plain_form_bit_for_bit(rng, n, dout, dtype):
    from npformer.ops.linear import linear_backward, linear_forward

    x = rng.standard_normal((n, 1, 9)).astype(dtype)
    W, b = rng.standard_normal((dout, 9)).astype(dtype), rng.standard_normal(dout).astype(dtype)
    dy = rng.standard_normal((n, 1, dout)).astype(dtype)

    def call():
        y, cache = linear_forward(x, W, b)
        return (y, *linear_backward(dy, cache))

    _assert_identical(*_both_forms(call, n))


def test_workers_keep_the_callers_floating_point_error_state():
    """np.errstate / np.seterr hold on every thread: an overflow raises, or stays silent, as asked."""
    big = np.full((4096, 64), 3e38, np.float32)

    def overflow(rows):
        big[rows] * np.float32(10)

    with on_threads(2), np.errstate(over="raise"), pytest.raises(FloatingPointError):
        fastpath.row_parallel(overflow, len(big), 64)
    with on_threads(2), np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning from any thread would fail here
        fastpath.row_parallel(overflow, len(big), 64)


def test_a_failing_threaded_optimizer_step_changes_nothing():
    from npformer.nn.module import Parameter
    from npformer.optim import AdamW

    params = [Parameter(np.ones((200, 200), np.float32)), Parameter(np.ones((300, 100), np.float32))]
    opt = AdamW(params, lr=1e-3)
    params[0].grad = np.ones((200, 200), np.float32)
    params[1].grad = np.full((300, 100), 3e38, np.float32)  # g * g overflows
    with on_threads(2), np.errstate(all="raise"), pytest.raises(FloatingPointError):
        opt.step()
    assert (params[0].data == 1).all() and (params[1].data == 1).all() and not opt.state


def test_a_forked_child_runs_threaded_work():
    import os

    with on_threads(2):
        fastpath.row_parallel(lambda rows: None, 4096, 64)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: threaded work must finish (the parent's threads are gone)
        try:
            with fastpath.configured(threads=2):
                out = np.zeros(4096)

                def fill(rows):
                    out[rows] = 1

                fastpath.MIN_ELEMENTS = 1
                fastpath.row_parallel(fill, 4096, 64)
            os._exit(0 if out.all() else 1)
        except BaseException:
            os._exit(2)
    deadline = 60
    import time

    start = time.time()
    while time.time() - start < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung on threaded work")


def test_overlapping_attention_on_user_threads_leaves_the_blas_as_it_was():
    control = fastpath._blas_threads()
    if control is None:
        pytest.skip("no OpenBLAS whose thread count can be read in this process")
    get, _ = control
    before = get()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, 2, 64, 8)).astype(np.float32) for _ in range(3))
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for _ in range(20):
            attention_forward(q, k, v, causal=True)

    with on_threads(2):
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert get() == before


def test_configure_checks_every_option_before_setting_any():
    before = (fastpath.num_threads(), fastpath.causal_block())
    expect_rejected(lambda: fastpath.configure(threads=1, causal_block=0), "fastpath.configure", "causal_block")
    with pytest.raises(ValueError):
        with fastpath.configured(threads=1, causal_block=0):
            pass
    assert (fastpath.num_threads(), fastpath.causal_block()) == before


@pytest.mark.parametrize("value", ["0", "-2", "abc", "2.5", "99999"])
def test_a_bad_thread_variable_is_named_and_passed_over(monkeypatch, value):
    monkeypatch.setenv("NPFORMER_NUM_THREADS", value)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    with pytest.warns(RuntimeWarning, match="NPFORMER_NUM_THREADS"):
        assert fastpath._default_threads() == 3


# --- OpenBLAS's idle threads ---------------------------------------------------------------------

_IDLE_SPIN = """
import json, os, sys, threading, time
import numpy as np  # NumPy (and its BLAS, with its threads) first, as a user's script would
rng = np.random.default_rng(0)
a = rng.standard_normal((600, 600))
before = a @ a
if sys.argv[1:] == ["thread"]:  # a thread of the user's, waiting, while npformer is imported
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
from npformer.ops import fastpath
if sys.argv[1:] == ["thread"]:
    done.set()
    other.join()

def worker_seconds():  # CPU time of every thread but this one (the BLAS's workers)
    total, me = 0, threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")

spin = 0.0
for _ in range(3):
    after = a @ a  # the workers take their share, then wait for the next product
    t0 = worker_seconds()
    time.sleep(0.3)
    spin += worker_seconds() - t0
libs = fastpath._openblas_libraries()
print(json.dumps({"quieted": fastpath.QUIETED, "same": bool((before == after).all()),
                  "spin_s": spin, "env": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                  "timeout": [lib.openblas_thread_timeout() for lib in libs
                              if getattr(lib, "openblas_thread_timeout", None) is not None]}))
"""


def _idle_spin(timeout=None, thread=False):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(OPENBLAS_NUM_THREADS="2", NPFORMER_NUM_THREADS="2")
    if timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = str(timeout)
    done = subprocess.run([sys.executable, "-c", _IDLE_SPIN] + (["thread"] if thread else []), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads threads' CPU time from /proc (Linux)")
def test_idle_blas_threads_sleep_soon_and_a_users_timeout_is_kept():
    if not fastpath._openblas_libraries():
        pytest.skip("NumPy's BLAS here is not OpenBLAS")
    quiet = _idle_spin()
    assert quiet["quieted"] and quiet["timeout"] == [fastpath.BLAS_SPIN] * len(quiet["timeout"])
    assert quiet["env"] is None  # the environment is left as it was
    assert quiet["same"]  # a product after the threads' restart is the one before, bit for bit
    users = _idle_spin(timeout=28)  # OpenBLAS's usual spin of 2**28 cycles, asked for by the user
    assert users["quieted"] == [] and users["timeout"] == [28] * len(users["timeout"])
    # the measurement sees a spinning worker: about 0.1 s of CPU in the 0.3 s after each of three
    # products (0.3 s in all on an idle machine, and at least a third of it on a busy one)
    assert users["spin_s"] >= 0.08, users
    assert quiet["spin_s"] <= 0.03, quiet
    busy = _idle_spin(thread=True)  # another Python thread running: the BLAS's threads are left alone
    assert busy["quieted"] == [] and busy["timeout"] == [0] * len(busy["timeout"]), busy  # 0: never read


_REUSE = """
import json, resource, sys, threading
import numpy as np
from npformer.ops import fastpath
kept = fastpath.keep_freed_memory()

def faults(make):
    # page faults of touching a freshly made array, once an array of its size was made and freed
    make().fill(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    make().fill(2.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

big = faults(lambda: np.empty(48 << 18, np.float32))  # 48 MiB: above glibc's adaptive mmap threshold
in_thread = []
for _ in range(3):  # a pool thread's arrays, in a thread heap, made and freed in turn
    worker = threading.Thread(target=lambda: in_thread.append(faults(lambda: np.empty(40 << 18, np.float32))))
    worker.start(); worker.join()
print(json.dumps({"kept": kept, "big": big, "thread": in_thread[-1]}))
"""


def _reuse(**env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _REUSE], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and its page-fault count")
def test_freed_memory_is_reused_without_page_faults_and_a_users_malloc_setting_is_kept():
    kept = _reuse()
    if not kept["kept"]:
        pytest.skip("the C library here is not glibc")
    # 48 MiB is 12,288 pages of 4 KiB (24 of 2 MiB where the kernel backs it with huge pages): all fresh
    # pages under glibc's defaults, none when the freed array's memory is reused
    assert kept["big"] <= 4 and kept["thread"] <= 4, kept
    users = _reuse(MALLOC_ARENA_MAX="8")  # the environment tunes malloc: left as it is
    assert users["kept"] is False and users["big"] >= 20, users


@given(rng=rngs(), shape=st.sampled_from([(2, 3, 5), (7, 1, 130), (1, 1031), (300, 2), (3, 0, 4), (5,)]),
       dtype=st.sampled_from([np.float32, np.float64, np.int64]),
       layout=st.sampled_from(["contiguous", "transposed", "strided"]), extreme=st.booleans())
def test_add_is_numpys_sum_bit_for_bit(rng, shape, dtype, layout, extreme):
    """``fastpath.add`` (the residual sums) is ``a + b`` on one thread and on several, for any layout and
    dtype, in float32 at the edge of overflow too (inf, and nan from inf - inf, where NumPy gives them)."""
    def draw():
        a = rng.standard_normal(shape) * (3e38 if extreme else 1.0)
        a = a.astype(dtype) if dtype is not np.int64 else rng.integers(-9, 9, shape)
        if layout == "transposed":
            return np.ascontiguousarray(a.T).T
        if layout == "strided":
            return np.repeat(a, 2, axis=-1)[..., ::2]
        return a

    with np.errstate(over="ignore", invalid="ignore"):  # float32 at 3e38: inf where NumPy makes it
        a, b = draw(), draw()
        if extreme and dtype is np.float32 and a.size:
            a.flat[0], b.flat[0] = np.inf, -np.inf
        want = a + b
        pooled = a.flags.c_contiguous and b.flags.c_contiguous and dtype is not np.int64  # else NumPy's a + b
        plain, fast = _both_forms(lambda: (fastpath.add(a, b),), rows=a.size if pooled else 1)
    _assert_identical((want,), plain)
    _assert_identical((want,), fast)
    assert fast[0].flags.c_contiguous == want.flags.c_contiguous and fast[0].flags.f_contiguous == want.flags.f_contiguous


@pytest.mark.parametrize("a, b", [(np.ones((2, 3)), np.ones(3)), (np.ones((2, 3), np.float32), np.ones((2, 3))),
                                  (np.float32(2), np.float32(3)), (np.ones((2, 3)), 1.5),
                                  (np.ma.masked_array(np.ones(3), [0, 1, 0]), np.ones(3)),
                                  (np.array(["abc", "de"]), np.array(["xyz", "fg"])),
                                  (np.array([b"abc", b"de"]), np.array([b"xyz", b"fg"])),
                                  (np.arange(6.0).astype(">f4"), np.arange(6.0).astype(">f4")),
                                  (np.array([True, False]), np.array([True, True])),
                                  (np.asfortranarray(np.ones((3, 4), np.float32)), np.asfortranarray(np.ones((3, 4), np.float32)))])
def test_add_of_anything_else_is_numpys_own(a, b, monkeypatch):
    """Broadcasting, mixed dtypes, scalars, subclasses, strings (whose sum is longer), big-endian floats
    (whose sum is native), booleans and other layouts (whose sum keeps NumPy's) are NumPy's ``a + b``,
    never handed to the pool even where the work is large enough for it."""
    handed = []
    monkeypatch.setattr(fastpath, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(fastpath, "row_parallel", lambda *args, **kwargs: handed.append(args))
    with fastpath.configured(threads=3):
        got = fastpath.add(a, b)
    assert handed == []
    want = a + b
    assert type(got) is type(want) and np.asarray(got).dtype == np.asarray(want).dtype
    assert np.asarray(got).flags.f_contiguous == np.asarray(want).flags.f_contiguous
    np.testing.assert_array_equal(got, want)
