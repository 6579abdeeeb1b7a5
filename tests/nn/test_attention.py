"""MultiHeadAttention and KVCache: torch twin with the same weights, cross attention, cached decoding."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from npformer.nn.attention import KVCache, MultiHeadAttention, merge_heads, split_heads
from npformer.ops.attention import attention_backward
from tests.oracle import backprop, leaf
from tests.strategies import rngs
from tests.tolerances import RTOL, assert_close


def make_layer(d_model, n_head, n_kv_head=None, bias=True, dtype=np.float64, seed=0, std=0.5):
    """A layer whose weights are large enough that attention is neither uniform nor one-hot."""
    rng = np.random.default_rng(seed)
    layer = MultiHeadAttention(d_model, n_head, n_kv_head, bias, rng=rng, dtype=dtype)
    for _, p in layer.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * std
    return layer


def torch_twin(layer, x, *, context=None, causal=False, key_padding_mask=None):
    """The same layer in torch (float64): F.linear projections and scaled_dot_product_attention."""
    params = {name: leaf(p.data) for name, p in layer.named_parameters()}
    tx = leaf(x)
    tc = None if context is None else leaf(context)
    H, Hkv, D = layer.n_head, layer.n_kv_head, layer.head_dim

    def proj(name, inp):
        return F.linear(inp, params[f"{name}.weight"], params.get(f"{name}.bias"))

    src = tx if tc is None else tc
    B, T, S = x.shape[0], x.shape[1], src.shape[1]
    q = proj("q_proj", tx).view(B, T, H, D).transpose(1, 2)
    k = proj("k_proj", src).view(B, S, Hkv, D).transpose(1, 2)
    v = proj("v_proj", src).view(B, S, Hkv, D).transpose(1, 2)
    visible = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:  # end-aligned (sdpa's is_causal would align top-left)
        visible &= torch.ones(T, S, dtype=torch.bool).tril(S - T)
    if key_padding_mask is not None:
        visible &= ~torch.from_numpy(key_padding_mask)[:, None, None, :]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    out = proj("o_proj", y.transpose(1, 2).reshape(B, T, H * D))
    return out, params, tx, tc


def k_bias_scale(layer, dy):
    """The k bias gradient is zero in exact arithmetic: adding q_i . b_k to every logit of row i
    leaves the softmax unchanged. Its round-off is relative to the terms it sums, |dk| over positions.
    Read from the cache of the latest forward, so call it before the matching backward."""
    dout = split_heads(dy @ layer.o_proj.weight.data, layer.n_head)
    dk = merge_heads(attention_backward(dout, layer._caches[-1].attn)[1])
    return float(np.abs(dk).sum(axis=(0, 1)).max())


def assert_params_close(layer, grads, kscale, one_key=False):
    """Every parameter gradient against torch's. ``one_key``: every query saw a single key, so the softmax
    is constant and dS = P * (dP - rowsum(dP P)) = dP - dP is exactly 0 (ATT.7): the q and k projections'
    gradients are 0 here, and torch's are its round-off, judged at the size of the v projection's."""
    vscale = float(np.abs(grads["v_proj.weight"]).max())
    for name, p in layer.named_parameters():
        assert p.grad.dtype == layer.q_proj.weight.data.dtype, name
        if one_key and name.split(".")[0] in ("q_proj", "k_proj"):
            np.testing.assert_array_equal(p.grad, np.zeros_like(p.grad), err_msg=name)
            assert_close(np.zeros_like(grads[name]), grads[name], scale=vscale, what=name)
            continue
        scale = kscale if name == "k_proj.bias" else None
        assert_close(p.grad, grads[name], scale=scale, what=name)
    if layer.k_proj.bias is not None:
        assert_close(layer.k_proj.bias.grad, np.zeros(layer.k_proj.bias.shape), scale=kscale,
                     what="k bias gradient is round-off around 0")


def ours_and_torch(layer, x, dy, **kwargs):
    """Also returns, under grads["k bias scale"], the scale of the k bias gradient's round-off."""
    layer.zero_grad()
    y = layer.forward(x, **kwargs)
    kscale = k_bias_scale(layer, dy)
    dinputs = layer.backward(dy)
    out, params, tx, tc = torch_twin(layer, x, **kwargs)
    leaves = [tx] + ([] if tc is None else [tc]) + list(params.values())
    grads = backprop(out, dy, *leaves)
    grads = dict(zip(["x"] + ([] if tc is None else ["context"]) + list(params), grads))
    grads["k bias scale"] = kscale
    return y, dinputs, out.detach().numpy(), grads


@pytest.mark.derivation("ATT.12")
@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(st.sampled_from([(1, 1), (2, 5), (3, 4)]), st.booleans(), st.booleans(), rngs())
def test_gqa_layer_matches_torch(n_kv_head, dtype, sizes, causal, bias, rng):
    """Forward and every gradient (x, q/k/v/o weights and biases) of MHA, GQA (4 heads on 2), MQA."""
    B, T = sizes
    layer = make_layer(16, 4, n_kv_head, bias, dtype)
    x = rng.standard_normal((B, T, 16)).astype(dtype)
    dy = rng.standard_normal((B, T, 16)).astype(dtype)
    y, dx, y_ref, grads = ours_and_torch(layer, x, dy, causal=causal)
    assert y.dtype == dx.dtype == dtype
    assert_close(y, y_ref, what="y")
    assert_close(dx, grads["x"], what="dx")
    assert_params_close(layer, grads, grads["k bias scale"], one_key=T == 1)


@pytest.mark.parametrize("n_kv_head", [None, 1])
def test_cross_attention_matches_torch(n_kv_head):
    rng = np.random.default_rng(1)
    layer = make_layer(12, 3, n_kv_head)
    x, context, dy = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 7, 12)), rng.standard_normal((2, 4, 12))
    pad = np.zeros((2, 7), bool)
    pad[1, 5:] = True
    y, (dx, dcontext), y_ref, grads = ours_and_torch(layer, x, dy, context=context, key_padding_mask=pad)
    assert y.shape == (2, 4, 12) and dcontext.shape == context.shape
    assert_close(y, y_ref, what="y")
    assert_close(dx, grads["x"], what="dx")
    assert_close(dcontext, grads["context"], what="dcontext")
    assert np.all(dcontext[1, 5:] == 0)  # padded context positions get no gradient
    assert_params_close(layer, grads, grads["k bias scale"])


def test_additive_bias_gradient_is_left_on_the_layer():
    rng = np.random.default_rng(2)
    layer = make_layer(8, 2)
    x, dy = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    bias = rng.standard_normal((1, 2, 3, 3))
    layer.forward(x, bias=bias)
    layer.backward(dy)
    eps = 1e-6  # central differences in float64, as npformer.gradcheck
    numeric = np.zeros_like(bias)
    for idx in np.ndindex(bias.shape):
        b_plus, b_minus = bias.copy(), bias.copy()
        b_plus[idx] += eps
        b_minus[idx] -= eps
        numeric[idx] = np.sum((layer.forward(x, bias=b_plus) - layer.forward(x, bias=b_minus)) * dy) / (2 * eps)
    from tests.tolerances import FD_RTOL

    assert layer.dbias.shape == bias.shape
    assert_close(layer.dbias, numeric, rtol=FD_RTOL, what="dbias")


@pytest.mark.parametrize("chunks", [[1] * 9, [3, 1, 4, 1], [9], [2, 2, 2, 2, 1]], ids=["tokens", "mixed", "whole", "pairs"])
@pytest.mark.parametrize("n_kv_head", [None, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_kv_cache_decoding_equals_full_recomputation(chunks, n_kv_head):
    rng = np.random.default_rng(3)
    layer = make_layer(16, 4, n_kv_head)
    T = sum(chunks)
    x = rng.standard_normal((2, T, 16))
    full = layer.forward(x, causal=True)
    layer.eval()  # decoding with a cache is inference
    cache = layer.make_kv_cache(2, 12)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(layer.forward(x[:, start:start + n], causal=True, kv_cache=cache))
        start += n
        assert cache.length == start
    assert_close(np.concatenate(pieces, axis=1), full, what="cached decoding vs full")
    assert cache.k.shape == (2, layer.n_kv_head, 12, 4)
    layer.backward(np.ones_like(full))  # the training forward above is still matched
    with pytest.raises(RuntimeError, match="eval mode keeps no cache"):
        layer.backward(np.ones_like(pieces[-1]))


def test_cross_attention_cache_is_filled_once():
    rng = np.random.default_rng(4)
    layer = make_layer(8, 2)
    x, context = rng.standard_normal((1, 5, 8)), rng.standard_normal((1, 6, 8))
    full = layer.eval().forward(x, context=context)
    cache = layer.make_kv_cache(1, 6)
    steps = [layer.forward(x[:, t:t + 1], context=context, kv_cache=cache) for t in range(5)]
    assert cache.length == 6
    assert_close(np.concatenate(steps, axis=1), full, what="cross attention with a cache")


def test_kv_cache_append_and_overflow():
    cache = KVCache(2, 3, 4, 5, np.float32)
    k, v = np.ones((2, 3, 3, 5), np.float32), np.full((2, 3, 3, 5), 2, np.float32)
    k_all, v_all = cache.append(k, v)
    assert cache.length == 3 and k_all.shape == (2, 3, 3, 5) and np.all(v_all == 2)
    assert np.shares_memory(k_all, cache.k)  # views, no copy
    k_all, _ = cache.append(k[:, :, :1] * 3, v[:, :, :1])
    assert cache.length == 4 and np.all(k_all[:, :, 3] == 3) and np.all(k_all[:, :, :3] == 1)
    with pytest.raises(ValueError, match=r"KVCache.append: argument 'k_new' expected at most 0 new positions \(the cache holds 4 of 4\), got 1"):
        cache.append(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match=r"argument 'k_new' expected shape \(2, 3, \*, 5\)"):
        KVCache(2, 3, 4, 5).append(np.ones((2, 2, 1, 5), np.float32), np.ones((2, 2, 1, 5), np.float32))
    cache.reset()
    assert cache.length == 0


@pytest.mark.derivation("ATT.14")
@pytest.mark.parametrize("n_kv_head, dtype", [(None, np.float32), (2, np.float32), (1, np.float64)])
def test_kv_cache_bytes_per_token(n_kv_head, dtype):
    """2 * n_layer * Hkv * D * bytes per token: here 3 layers of 8 heads of size 8."""
    n_layer, T_max = 3, 10
    layers = [make_layer(64, 8, n_kv_head, dtype=dtype, seed=i) for i in range(n_layer)]
    caches = [layer.make_kv_cache(1, T_max) for layer in layers]
    per_token = sum(c.k.nbytes + c.v.nbytes for c in caches) / T_max
    Hkv = n_kv_head or 8
    assert per_token == 2 * n_layer * Hkv * 8 * np.dtype(dtype).itemsize


def test_parameter_names_and_shapes_follow_hugging_face():
    layer = make_layer(16, 4, 2)
    assert {name: p.shape for name, p in layer.named_parameters()} == {
        "q_proj.weight": (16, 16), "q_proj.bias": (16,),
        "k_proj.weight": (8, 16), "k_proj.bias": (8,),
        "v_proj.weight": (8, 16), "v_proj.bias": (8,),
        "o_proj.weight": (16, 16), "o_proj.bias": (16,),
    }
    no_bias = make_layer(16, 4, bias=False)
    assert [name for name, _ in no_bias.named_parameters()] == ["q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                "o_proj.weight"]


def test_probs_are_recorded():
    layer = make_layer(8, 2)
    recorder = layer.start_recording()
    layer.forward(np.random.default_rng(5).standard_normal((1, 3, 8)), causal=True)
    probs = recorder["probs"]
    assert probs.shape == (1, 2, 3, 3)
    assert_close(probs.sum(-1), np.ones((1, 2, 3)), what="rows sum to 1")
    assert np.all(probs[..., 0, 1:] == 0)


@pytest.mark.parametrize(
    "args, message",
    [
        ((16, 5), "MultiHeadAttention: argument 'n_head' expected a divisor of d_model = 16, got 5"),
        ((16, 4, 3), "MultiHeadAttention: argument 'n_kv_head' expected a divisor of n_head = 4, got 3"),
    ],
)
def test_bad_configuration_is_named(args, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(*args, rng=np.random.default_rng(0))


def test_bad_input_is_named():
    layer = make_layer(8, 2)
    with pytest.raises(ValueError, match="MultiHeadAttention.forward: argument 'x' expected 3 dimensions, got 2"):
        layer.forward(np.ones((3, 8)))
    with pytest.raises(ValueError, match=r"argument 'context' expected shape \(1, \*, 8\), got \(1, 2, 6\)"):
        layer.forward(np.ones((1, 3, 8)), context=np.ones((1, 2, 6)))


# --- q, k, v as one product: the same layer as three projections --------------------------------------------


class ThreeProjections(MultiHeadAttention):
    """The layer with q, k and v each from its own ``Linear`` (the path adapted or quantized projections take)."""

    def _fused(self) -> bool:
        return False


def _layout(x, kind):
    """x's values in another memory layout: C order, Fortran order, (T, B, D) storage, a strided view."""
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "time-major":
        return np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
    if kind == "strided":
        wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


@st.composite
def qkv_layers(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    opts = dict(n_kv_head=draw(st.sampled_from([h for h in (1, 2, H) if H % h == 0])),
                head_dim=draw(st.sampled_from([None, 6])), bias=draw(st.booleans()),
                qkv_bias=draw(st.sampled_from([None, True, False])),
                position=draw(st.sampled_from(["none", "rope", "alibi", "t5"])))
    return 4 * H, H, opts


@given(qkv_layers(), st.sampled_from([np.float64, np.float32]), st.integers(0, 3), st.integers(0, 7),
       st.sampled_from(["c", "fortran", "time-major", "strided"]), st.integers(1, 3), st.integers(1, 3), rngs())
def test_one_qkv_product_equals_three_projections(layer_args, dtype, B, T, layout, calls, threads, rng):
    """Outputs, input gradients, every parameter gradient and every recorded intermediate of the fused
    layer equal the three-projection layer's, for any batch and length (0 included), layout of x,
    several forwards before their backwards, and on several threads."""
    from npformer.ops import fastpath

    d_model, H, opts = layer_args
    fused = MultiHeadAttention(d_model, H, rng=np.random.default_rng(0), dtype=dtype, **opts)
    plain = ThreeProjections(d_model, H, rng=np.random.default_rng(0), dtype=dtype, **opts)
    for (_, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        p.data[...] = q.data[...] = rng.standard_normal(p.shape) * 0.5
    assert fused._fused() and not plain._fused()
    xs = [rng.standard_normal((B, T, d_model)).astype(dtype) for _ in range(calls)]
    dys = [rng.standard_normal((B, T, d_model)).astype(dtype) for _ in range(calls)]
    results = []
    with fastpath.configured(threads=threads):
        for layer in (fused, plain):
            recorder = layer.start_recording()
            ys = [layer.forward(_layout(x, layout), causal=True) for x in xs]
            dxs = [layer.backward(dy) for dy in reversed(dys)]  # last in, first out
            layer.stop_recording()
            results.append((ys, dxs, {n: p.grad for n, p in layer.named_parameters()}, dict(recorder)))
    (ys, dxs, grads, recorded), (want_ys, want_dxs, want_grads, want_recorded) = results
    for got, want in zip(ys + dxs, want_ys + want_dxs):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close(got, want, rtol=RTOL[np.dtype(dtype)])
    # the k bias gradient is round-off around 0 (softmax ignores a shift of a whole row): judged against
    # the k weight gradient, a sum of the same terms times the inputs
    k_scale = float(np.abs(want_grads["k_proj.weight"]).max()) if "k_proj.bias" in want_grads else None
    for name in want_grads:
        scale = k_scale if name == "k_proj.bias" else None
        assert_close(grads[name], want_grads[name], rtol=RTOL[np.dtype(dtype)], scale=scale, what=name)
    assert list(recorded) == list(want_recorded)
    for name in want_recorded:
        scale = k_scale if name.startswith("k_proj.db") else None
        assert_close(recorded[name], want_recorded[name], rtol=RTOL[np.dtype(dtype)], scale=scale, what=name)


def test_the_one_qkv_product_reads_the_weights_its_backward_finds_as_a_linear_does():
    """Weights changed in place between a forward and its backward: the fused layer's backward uses the
    weights it finds, as ``Linear`` (and so the three-projection layer) does."""
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    dxs = []
    for cls, change in ((MultiHeadAttention, True), (ThreeProjections, True), (MultiHeadAttention, False)):
        layer = cls(8, 2, rng=np.random.default_rng(0), dtype=np.float64)
        layer.forward(x, causal=True)
        if change:
            layer.q_proj.weight.data *= 2
            layer.k_proj.weight.data += 1
        dxs.append(layer.backward(dy))
    assert_close(dxs[0], dxs[1], rtol=RTOL[np.dtype(np.float64)])
    assert np.abs(dxs[0] - dxs[2]).max() > 0.1 * np.abs(dxs[2]).max()  # the change did reach the backward
