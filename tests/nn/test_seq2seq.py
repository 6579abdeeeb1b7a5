"""The shared encoder-decoder pieces: shift_right (against Hugging Face's), the post-norm encoder and decoder
layers (against torch twins, in both dtypes and any layout), cached decoding through one layer, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.bart.modeling_bart import shift_tokens_right

from kernels.twins.transformer import TwinDecoderLayer, TwinEncoderLayer
from npformer.nn.seq2seq import (PostNormDecoderLayer, Seq2SeqEncoderLayer, check_seq2seq_inputs, shift_right)
from tests.badinput import BAD_COUNTS, NON_ARRAYS, RANK_KINDS, corrupt, expect_rejected, rejects_all
from tests.strategies import DTYPES, SIDES, in_layout, layouts, randn
from tests.tolerances import RTOL, assert_close


# -- shift_right -----------------------------------------------------------------------------------
@given(B=SIDES, T=SIDES, start=st.integers(0, 9), pad=st.integers(0, 9), seed=st.integers(0, 99),
       dtype=st.sampled_from([np.int64, np.int32]))
def test_shift_right_equals_hugging_face(B, T, start, pad, seed, dtype):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 20, (B, T)).astype(dtype)
    labels[rng.random((B, T)) < 0.3] = -100
    ours = shift_right(labels, start, pad)
    theirs = shift_tokens_right(torch.from_numpy(labels.astype(np.int64)), pad, start).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == np.int64 and ours.shape == labels.shape
    assert (ours[:, 0] == start).all() and not (ours == -100).any()


def test_shift_right_by_hand():
    out = shift_right(np.array([[5, 6, 7], [8, -100, -100]]), 2, 1)
    np.testing.assert_array_equal(out, [[2, 5, 6], [2, 8, 1]])


@pytest.mark.parametrize("kind", NON_ARRAYS + ("float64", "bool") + RANK_KINDS)
def test_shift_right_refuses_bad_labels(kind):
    labels = np.array([[1, 2, 3], [4, 5, 6]])
    expect_rejected(lambda: shift_right(corrupt(labels, kind), 0, 0), "shift_right", "labels")


def test_shift_right_refuses_negative_labels_and_bad_ids():
    expect_rejected(lambda: shift_right(np.array([[1, -5]]), 0, 0), "shift_right", "labels")
    rejects_all(lambda v: shift_right(np.array([[1]]), v, 0), "shift_right", "decoder_start_token_id", BAD_COUNTS[:6])
    rejects_all(lambda v: shift_right(np.array([[1]]), 0, v), "shift_right", "pad_token_id", BAD_COUNTS[:6])


# -- the layers against their twins ---------------------------------------------------------------------
def twin_of(layer, cls, eps, activation):
    D, H, F = layer.fc1.weight.shape[1], layer.self_attn.n_head, layer.fc1.weight.shape[0]
    twin = cls(D, H, F, eps, activation, 0.0).double()
    state = {n: torch.from_numpy(p.data.astype(np.float64)) for n, p in layer.named_parameters()}
    twin.load_state_dict(state)
    return twin


def randomise(layer, rng):
    for name, p in layer.named_parameters():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        p.data[...] = base + rng.standard_normal(p.shape) * (0.3 if p.data.ndim == 1 else 1 / np.sqrt(p.shape[1]))


@st.composite
def layer_cases(draw):
    H = draw(st.integers(1, 3))  # D >= 3: LayerNorm over 1 or 2 features is flat (gradients round-off only)
    return dict(D=H * draw(st.integers(3 if H == 1 else 2, 3)), H=H, F=draw(SIDES), B=draw(SIDES), T=draw(SIDES),
                S=draw(SIDES),
                activation=draw(st.sampled_from(["relu", "gelu"])), eps=draw(st.sampled_from([1e-5, 0.1])),
                dtype=draw(DTYPES), layout=draw(layouts()), pad=draw(st.booleans()), seed=draw(st.integers(0, 99)))


def padding(rng, B, S):
    lengths = rng.integers(1, S + 1, B)
    return np.arange(S)[None, :] >= lengths[:, None]


@settings(max_examples=25, deadline=None)
@given(c=layer_cases())
def test_decoder_layer_matches_its_twin(c):
    rng = np.random.default_rng(c["seed"])
    layer = PostNormDecoderLayer(c["D"], c["H"], c["F"], layer_norm_eps=c["eps"], activation=c["activation"],
                                 rng=rng, dtype=c["dtype"])
    randomise(layer, rng)
    twin = twin_of(layer, TwinDecoderLayer, c["eps"], c["activation"])
    x = randn(rng, (c["B"], c["T"], c["D"]), c["dtype"])
    memory = randn(rng, (c["B"], c["S"], c["D"]), c["dtype"])
    dy = randn(rng, (c["B"], c["T"], c["D"]), c["dtype"])
    mask = padding(rng, c["B"], c["S"]) if c["pad"] else None
    y = layer.forward(in_layout(x, c["layout"]), in_layout(memory, c["layout"]), memory_padding_mask=mask)
    dx, dmemory = layer.backward(in_layout(dy, c["layout"]))

    tx, tm = (torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, memory))
    twin.pad = None if mask is None else torch.from_numpy(mask)
    ty = twin(tx, tm)
    ty.backward(torch.from_numpy(dy.astype(np.float64)))
    rtol = RTOL[np.dtype(c["dtype"])] * (1 if c["dtype"] == np.float64 else 10)  # a layer: several float32 roundings
    assert y.dtype == dx.dtype == dmemory.dtype == c["dtype"]
    assert_close(y, ty.detach().numpy(), rtol=rtol, what="y")
    assert_close(dx, tx.grad.numpy(), rtol=rtol, what="dx")
    assert_close(dmemory, tm.grad.numpy(), rtol=rtol, what="dmemory")
    grads = dict(twin.named_parameters())
    for name, p in layer.named_parameters():
        scale = grads[name.replace("k_proj", "v_proj")].grad.abs().max().item() if "k_proj.bias" in name else None
        assert_close(p.grad, grads[name].grad.numpy(), rtol=rtol, scale=scale, what=name)


@settings(max_examples=15, deadline=None)
@given(c=layer_cases())
def test_encoder_layer_matches_its_twin(c):
    rng = np.random.default_rng(c["seed"])
    layer = Seq2SeqEncoderLayer(c["D"], c["H"], c["F"], layer_norm_eps=c["eps"], activation=c["activation"],
                                rng=rng, dtype=c["dtype"])
    randomise(layer, rng)
    twin = twin_of(layer, TwinEncoderLayer, c["eps"], c["activation"])
    x, dy = (randn(rng, (c["B"], c["S"], c["D"]), c["dtype"]) for _ in range(2))
    mask = padding(rng, c["B"], c["S"]) if c["pad"] else None
    y = layer.forward(in_layout(x, c["layout"]), key_padding_mask=mask)
    dx = layer.backward(dy)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    twin.pad = None if mask is None else torch.from_numpy(mask)
    ty = twin(tx)
    ty.backward(torch.from_numpy(dy.astype(np.float64)))
    rtol = RTOL[np.dtype(c["dtype"])] * (1 if c["dtype"] == np.float64 else 10)
    assert_close(y, ty.detach().numpy(), rtol=rtol, what="y")
    assert_close(dx, tx.grad.numpy(), rtol=rtol, what="dx")
    grads = dict(twin.named_parameters())
    for name, p in layer.named_parameters():
        scale = grads[name.replace("k_proj", "v_proj")].grad.abs().max().item() if "k_proj.bias" in name else None
        assert_close(p.grad, grads[name].grad.numpy(), rtol=rtol, scale=scale, what=name)


@given(T=SIDES, S=SIDES, split=st.integers(0, 8), seed=st.integers(0, 99))
def test_decoder_layer_cached_equals_uncached(T, S, split, seed):
    rng = np.random.default_rng(seed)
    layer = PostNormDecoderLayer(6, 2, 5, activation="gelu", rng=rng, dtype=np.float64).eval()
    randomise(layer, rng)
    x, memory = randn(rng, (2, T, 6)), randn(rng, (2, S, 6))
    mask = padding(rng, 2, S)
    full = layer.forward(x, memory, memory_padding_mask=mask)
    self_c, cross_c = layer.make_caches(2, T, S)
    cut = min(split, T)
    parts = [layer.forward(x[:, a:b], memory, memory_padding_mask=mask, self_cache=self_c, cross_cache=cross_c)
             for a, b in ((0, cut), (cut, T)) if b > a]
    assert_close(np.concatenate(parts, axis=1), full, what="cached")
    assert self_c.length == T and cross_c.length == S


def test_decoder_layer_backward_without_forward_and_bad_dout():
    layer = PostNormDecoderLayer(4, 2, 3, rng=np.random.default_rng(0), dtype=np.float64)
    with pytest.raises(RuntimeError, match="no forward left"):
        layer.backward(np.zeros((1, 2, 4)))
    layer.forward(np.ones((1, 2, 4)), np.ones((1, 3, 4)))
    expect_rejected(lambda: layer.backward(np.zeros((1, 3, 4))), "PostNormDecoderLayer.backward", "dout")
    assert layer.pending_backwards == 1  # the refused backward consumed nothing


@pytest.mark.parametrize("kind", NON_ARRAYS + ("float32", "int64") + RANK_KINDS + ("last+1",))
def test_decoder_layer_refuses_bad_memory_and_x(kind):
    layer = PostNormDecoderLayer(4, 2, 3, rng=np.random.default_rng(0), dtype=np.float64)
    x, memory = np.ones((2, 2, 4)), np.ones((2, 3, 4))
    expect_rejected(lambda: layer.forward(x, corrupt(memory, kind)), "PostNormDecoderLayer.forward", "memory")
    expect_rejected(lambda: layer.forward(corrupt(x, kind), memory), "PostNormDecoderLayer.forward", "x")
    assert all(m.pending_backwards == 0 for _, m in layer.named_modules())


def test_layer_options_refused_by_name():
    rng = np.random.default_rng(0)
    for cls in (PostNormDecoderLayer, Seq2SeqEncoderLayer):
        expect_rejected(lambda: cls(4, 2, 3, activation="tanh", rng=rng), cls.__name__, "activation")
        expect_rejected(lambda: cls(4, 2, 0, rng=rng), cls.__name__, "d_ff")
        expect_rejected(lambda: cls(4, 3, 3, rng=rng), "MultiHeadAttention", "n_head")


# -- check_seq2seq_inputs ---------------------------------------------------------------------------------
def test_check_seq2seq_inputs_names_each_argument():
    op, V = "f", 10
    src, tgt = np.ones((2, 3), np.int64), np.ones((2, 4), np.int64)
    assert check_seq2seq_inputs(op, src, tgt, tgt, None, V) == (2, 3, 4)
    cases = [("src_ids", dict(src_ids=src[:1])), ("tgt_ids", dict(src_ids=src, tgt_ids=tgt[:1])),
             ("src_ids", dict(src_ids=src * V)), ("targets", dict(targets=tgt[:, :2])),
             ("targets", dict(targets=-tgt)), ("src_padding_mask", dict(src_padding_mask=np.zeros((2, 3), np.int8))),
             ("src_padding_mask", dict(src_padding_mask=np.array([[1, 1, 1], [0, 0, 0]], bool))),
             ("src_ids", dict(max_src_len=2)), ("tgt_ids", dict(max_tgt_len=5, tgt_start=2))]
    for name, change in cases:
        args = dict(src_ids=src, tgt_ids=tgt, targets=None, src_padding_mask=None)
        extra = {k: change.pop(k) for k in ("max_src_len", "max_tgt_len", "tgt_start") if k in change}
        args.update(change)
        expect_rejected(lambda: check_seq2seq_inputs(op, args["src_ids"], args["tgt_ids"], args["targets"],
                                                     args["src_padding_mask"], V, **extra), op, name)
