"""A layer call that fails changes nothing; a tied projection gets every use's gradient; the recorder keeps every call."""

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.attention import MultiHeadAttention
from npformer.nn.layers import Linear
from npformer.nn.module import Module, ModuleList, Parameter
from tests.badinput import corrupt, expect_rejected
from tests.nn.test_sharing import KINDS, call, make
from tests.strategies import rngs
from tests.tolerances import assert_close

D = 8


@given(st.sampled_from(["q=k", "q=v", "k=v", "q=k=v"]), st.booleans(), rngs())
def test_tied_projections_get_the_sum_of_their_uses(tie, cross, rng):
    """Projections that are one layer (forward q, k, v, o; backward o, v, k, q) equal untied copies summed."""
    tied = MultiHeadAttention(D, 2, rng=rng, dtype=np.float64)
    untied = copy.deepcopy(tied)
    names = {"q=k": ("q_proj", "k_proj"), "q=v": ("q_proj", "v_proj"), "k=v": ("k_proj", "v_proj"),
             "q=k=v": ("q_proj", "k_proj", "v_proj")}[tie]
    for name in names[1:]:
        setattr(tied, name, getattr(tied, names[0]))
        getattr(untied, name).weight.data[...] = getattr(untied, names[0]).weight.data
        getattr(untied, name).bias.data[...] = getattr(untied, names[0]).bias.data
    x, c = rng.standard_normal((2, 4, D)), rng.standard_normal((2, 4, D))  # T == S: no shape error to hide behind
    dy = rng.standard_normal((2, 4, D))
    kwargs = {"context": c} if cross else {"causal": True}
    outs = []
    for layer in (tied, untied):
        layer.zero_grad()
        y = layer.forward(x, **kwargs)
        outs.append((y, layer.backward(dy)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    as_tuple = lambda g: g if isinstance(g, tuple) else (g,)  # noqa: E731  (dx, dcontext) after cross attention
    for a, b in zip(as_tuple(outs[0][1]), as_tuple(outs[1][1])):
        assert_close(a, b, what="input gradient")
    for part in ("weight", "bias"):
        want = sum(getattr(getattr(untied, n), part).grad for n in names)
        assert_close(getattr(getattr(tied, names[0]), part).grad, want, scale=float(np.abs(want).max()) + 1.0,
                     what=f"{tie} {part}")


BAD_DY = ("list", "float32", "int64", "first+1", "last+1", "rank+1")


@given(KINDS, st.sampled_from(BAD_DY), rngs())
def test_a_failed_backward_consumes_nothing(kind, bad, rng):
    """Two forwards; a backward with a bad dy raises; the correct backwards then give the clean gradients."""
    layer, new_input = make(kind, rng)
    xs = [new_input(), new_input()]
    reference = copy.deepcopy(layer)  # after the inputs are drawn: a dropout's generator is in the same state
    ys = [call(layer, kind, x) for x in xs]
    dys = [rng.standard_normal(y.shape) for y in ys]
    bad_dy = dys[1].astype(bad) if bad in ("float32", "int64") else corrupt(dys[1], bad)
    with pytest.raises((ValueError, TypeError), match=rf"^{type(layer).__name__}\.backward: .*'(dy|dout)'"):
        layer.backward(bad_dy)
    assert layer.pending_backwards == 2
    assert all(np.all(p.grad == 0) for p in layer.parameters())  # nothing was added
    for x in xs:
        call(reference, kind, x)
    for i in (1, 0):
        got, want = layer.backward(dys[i]), reference.backward(dys[i])
        if want is not None:
            np.testing.assert_array_equal(got, want)
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


@given(st.sampled_from(["mask-dtype", "mask-shape", "bias-shape", "bias-list"]), rngs())
def test_a_failed_forward_leaves_no_cache_and_no_kv_positions(bad, rng):
    layer = MultiHeadAttention(D, 2, rng=rng, dtype=np.float64)
    x = rng.standard_normal((2, 3, D))
    kwargs = {"mask-dtype": {"key_padding_mask": np.zeros((2, 3), np.int64)},
              "mask-shape": {"key_padding_mask": np.zeros((2, 4), bool)},
              "bias-shape": {"bias": np.zeros((2, 2, 3, 5))},
              "bias-list": {"bias": [[0.0]]}}[bad]
    with pytest.raises((ValueError, TypeError), match=r"^MultiHeadAttention\.forward"):
        layer.forward(x, **kwargs)
    assert all(m.pending_backwards == 0 for _, m in layer.named_modules())
    layer.eval()
    kv = layer.make_kv_cache(2, 8)
    with pytest.raises((ValueError, TypeError)):
        layer.forward(x, kv_cache=kv, **kwargs)
    assert kv.length == 0  # the keys of a failed call are not part of the sequence
    layer.forward(x, kv_cache=kv)
    assert kv.length == 3


def test_gpt_refuses_one_cache_for_two_blocks():
    model = GPT(GPTConfig(vocab_size=7, block_size=8, n_layer=2, n_head=2, d_model=8), seed=0).eval()
    caches = model.make_kv_caches(1)
    caches[1] = caches[0]
    expect_rejected(lambda: model.forward(np.zeros((1, 3), np.int64), kv_caches=caches), "GPT.forward", "kv_caches")
    assert caches[0].length == 0


def test_recorder_keeps_every_call_of_a_shared_module():
    rng = np.random.default_rng(0)
    lin = Linear(D, D, rng=rng, dtype=np.float64)

    class Looped(Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

    looped = Looped()
    rec = looped.start_recording()
    xs = [rng.standard_normal((1, D))]
    for _ in range(3):
        xs.append(lin.forward(xs[-1]))
    for _ in range(3):
        lin.backward(np.ones((1, D)))
    assert list(rec) == ["lin.out", "lin.out@2", "lin.out@3", "lin.dW", "lin.db", "lin.dW@2", "lin.db@2",
                         "lin.dW@3", "lin.db@3"]
    for i, key in enumerate(["lin.out", "lin.out@2", "lin.out@3"]):
        np.testing.assert_array_equal(rec[key], xs[i + 1])


@given(st.sampled_from(["int32", "bool", "complex64", "float16", None, "nonsense"]))
def test_astype_takes_float32_or_float64_only(dtype):
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=1, n_head=1, d_model=4), seed=0)
    expect_rejected(lambda: model.astype(dtype), "GPT.astype", "dtype")
    assert all(p.data.dtype == np.float32 for p in model.parameters())
    model.forward(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64))
    model.astype("float64")
    assert model.cfg.dtype == "float64" and model.pending_backwards == 0
    assert all(p.data.dtype == p.grad.dtype == np.float64 for p in model.parameters())


@given(st.sampled_from([("Linear", "bias", lambda v: Linear(2, 2, v, rng=np.random.default_rng(0))),
                        ("MLP", "approximate", lambda v: __import__("npformer.nn.mlp", fromlist=["MLP"]).MLP(
                            2, 4, True, v, rng=np.random.default_rng(0))),
                        ("Module.train", "mode", lambda v: Module().train(v))]),
       st.sampled_from(["no", 0, np.array([1, 0]), None, 1.0]))
def test_flags_and_names_are_checked(case, value):
    func, arg, build = case
    expect_rejected(lambda: build(value), func, arg)


def test_module_list_and_attribute_assignment_are_checked():
    expect_rejected(lambda: ModuleList([Module(), "x"]), "ModuleList.append", "module")
    lin = Linear(2, 2, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="Linear: attribute 'weight' expected a Parameter or None, got ndarray"):
        lin.weight = np.zeros((2, 2), np.float32)
    lin.bias = None  # removing a parameter unregisters it
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    lin.bias = Parameter(np.ones(2, np.float32))
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]


@given(st.sampled_from(["strict", "cast"]), st.sampled_from([1, "yes", None]))
def test_load_state_dict_flags(flag, value):
    lin = Linear(2, 2, rng=np.random.default_rng(0))
    expect_rejected(lambda: lin.load_state_dict(lin.state_dict(), **{flag: value}), "load_state_dict", flag)


def test_load_state_dict_reports_odd_keys_and_overflow():
    lin = Linear(2, 2, rng=np.random.default_rng(0))
    state = {**lin.state_dict(), 0: np.zeros(1), "zz": np.zeros(1)}
    expect_rejected(lambda: lin.load_state_dict(state), "load_state_dict", "state")
    huge = {k: np.full(v.shape, 1e300) for k, v in lin.state_dict().items()}
    expect_rejected(lambda: lin.load_state_dict(huge, cast=True), "load_state_dict", "state")
    assert np.all(np.isfinite(lin.weight.data))


def test_kv_cache_refuses_another_dtype():
    layer = MultiHeadAttention(D, 2, rng=np.random.default_rng(0))
    kv = layer.make_kv_cache(1, 4)
    k = np.zeros((1, 2, 1, 4), np.float64)
    expect_rejected(lambda: kv.append(k, k), "KVCache.append", "k_new")
    assert kv.length == 0


TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=12, dtype="float64")


def fail_on_call(monkeypatch, module, name, k, error):
    """Make ``module.name`` raise ``error`` on its k-th call (1-based)."""
    real, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def everything(model):
    """Every gradient and every cache stack length of a model, to compare before and after."""
    return ([p.grad.copy() for p in model.parameters()], [m.pending_backwards for _, m in model.named_modules()])


@given(st.sampled_from(["layernorm_backward", "linear_backward", "dropout_backward"]), st.integers(1, 5),
       st.sampled_from([ValueError("planted"), KeyboardInterrupt()]), rngs())
def test_a_backward_that_fails_midway_changes_nothing(op, k, error, rng):
    """Whatever op fails, however deep, no .grad keeps a partial sum and no cache is consumed."""
    import npformer.nn.layers as layers

    ids, tg = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    model, clean = GPT(TINY, seed=1), GPT(TINY, seed=1)
    for m in (model, clean):
        m.forward(ids, tg)
        m.forward(ids[:, ::-1].copy(), tg)  # a second pending forward: the first backward must match it
        for p in m.parameters():
            p.grad[...] = 0.5  # accumulation in progress: a failure must keep these, not zero them
    before = everything(model)
    with pytest.MonkeyPatch.context() as mp:
        fail_on_call(mp, layers, op, k, error)
        with pytest.raises(type(error)):
            model.backward()
    after = everything(model)
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert before[1] == after[1]
    model.backward()  # the retry equals a clean run
    clean.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), clean.named_parameters()):
        np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)


@given(st.integers(1, 4), st.sampled_from([ValueError("planted"), KeyboardInterrupt()]), rngs())
def test_a_decoding_forward_that_fails_moves_no_cache_and_records_nothing(k, error, rng):
    import npformer.nn.layers as layers

    ids = rng.integers(0, 11, (1, 6))
    model, clean = GPT(TINY, seed=2).eval(), GPT(TINY, seed=2).eval()
    kv, kv_clean = model.make_kv_caches(1), clean.make_kv_caches(1)
    model.forward(ids[:, :2], kv_caches=kv)
    clean.forward(ids[:, :2], kv_caches=kv_clean)
    rec = model.start_recording()
    with pytest.MonkeyPatch.context() as mp:
        fail_on_call(mp, layers, "layernorm_forward", k, error)
        with pytest.raises(type(error)):
            model.forward(ids[:, 2:5], kv_caches=kv)
    assert [c.length for c in kv] == [2, 2] and len(rec) == 0
    logits, _ = model.forward(ids[:, 2:5], kv_caches=kv)
    np.testing.assert_array_equal(logits, clean.forward(ids[:, 2:5], kv_caches=kv_clean)[0])
    assert "logits" in rec and "logits@2" not in rec


def test_load_state_dict_with_aliased_values_and_pending_caches():
    model = GPT(TINY, seed=0)
    sd = {k: p.data for k, p in model.named_parameters()}  # views of the parameters themselves
    w, b = sd["blocks.0.ln_1.weight"].copy(), sd["blocks.0.ln_1.bias"].copy()
    model.load_state_dict({"blocks.0.ln_1.weight": sd["blocks.0.ln_1.bias"],
                           "blocks.0.ln_1.bias": sd["blocks.0.ln_1.weight"]}, strict=False)
    np.testing.assert_array_equal(model.blocks[0].ln_1.weight.data, b)  # swapped, not both overwritten
    np.testing.assert_array_equal(model.blocks[0].ln_1.bias.data, w)
    model.forward(np.zeros((1, 3), np.int64), np.zeros((1, 3), np.int64))
    with pytest.raises(RuntimeError, match="load_state_dict: forwards wait for their backward"):
        model.load_state_dict(model.state_dict())


def test_a_module_cannot_hold_itself():
    outer, inner = ModuleList(), ModuleList()
    outer.append(inner)
    expect_rejected(lambda: setattr(outer, "me", outer), "ModuleList", "me")
    expect_rejected(lambda: inner.append(outer), "ModuleList", "1" if len(inner) else "0")
    assert [name for name, _ in outer.named_modules()] == ["", "0"]


def test_each_thread_snapshots_its_own_outermost_call():
    """A failing call on one thread is restored even while another thread is inside a layer call."""
    import threading

    import npformer.nn.layers as layers

    inside, release = threading.Event(), threading.Event()
    busy = GPT(TINY, seed=3)
    real = layers.layernorm_forward

    def slow(*args, **kwargs):  # holds the other thread inside busy.forward
        inside.set()
        release.wait(10)
        return real(*args, **kwargs)

    ids = np.zeros((1, 4), np.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "layernorm_forward", slow)
        worker = threading.Thread(target=lambda: busy.forward(ids, ids))
        worker.start()
        assert inside.wait(10)
        mp.setattr(layers, "layernorm_forward", real)
        failing = GPT(TINY, seed=4)
        with pytest.raises(ValueError):
            failing.forward(ids, np.full((1, 4), 99))  # targets out of range: refused after the checks
        fail_on_call(mp, layers, "linear_forward", 3, ValueError("planted"))
        with pytest.raises(ValueError, match="planted"):
            failing.forward(ids, ids)
        release.set()
        worker.join(10)
    assert all(m.pending_backwards == 0 for _, m in failing.named_modules())
