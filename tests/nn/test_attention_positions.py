"""MultiHeadAttention options: positions (none, RoPE, ALiBi, T5), head_dim, q/k/v biases, sliding window.

The oracle is a small torch layer written here from the formulas themselves: rotate-half RoPE
with float64 cos/sin, ALiBi slopes from the paper's rule, T5's learned table looked up by
bucket (npformer's bucket function gives the indices only), an explicit end-aligned causal
and sliding-window mask. Every output and gradient agrees in float64 at RTOL.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.nn.attention import MultiHeadAttention
from npformer.ops.t5_bias import t5_relative_bucket
from tests.badinput import BAD_BASES, BAD_COUNTS, BAD_FLAGS, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import rngs
from tests.tolerances import assert_close

POSITIONS = ("none", "rope", "alibi", "t5")
HEADS = st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (3, 3), (6, 2), (4, 1)])  # (H, Hkv)


def make_layer(d_model, n_head, n_kv_head=None, bias=True, *, dtype=np.float64, seed=0, std=0.5, **options):
    """A layer whose weights (and T5 table) are large enough that attention is neither uniform nor one-hot."""
    rng = np.random.default_rng(seed)
    layer = MultiHeadAttention(d_model, n_head, n_kv_head, bias, rng=rng, dtype=dtype, **options)
    for _, p in layer.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * std
    return layer


def paper_alibi_slopes(n):
    """The ALiBi paper's slopes: for n a power of two, the geometric sequence starting at 2^(-8/n) with
    that ratio; otherwise those of the closest power of two below, then every other slope of twice it."""
    def power_of_two(m):
        start = 2.0 ** (-8.0 / m)
        return [start ** (h + 1) for h in range(m)]
    closest = 2 ** int(np.floor(np.log2(n)))
    if closest == n:
        return power_of_two(n)
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: n - closest]


def rotate_half_rope(x, positions, theta):
    """Rotate-half RoPE in torch: x (B, H, T, D), cos and sin formed in float64."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.as_tensor(positions, dtype=torch.float64)[:, None] * inv_freq  # (T, D/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def torch_layer(layer, x, *, causal=False, bias=None):
    """The layer in float64 torch. Returns out, named leaves, and the k projection's output (for the
    scale of the k bias gradient's round-off)."""
    params = {name: leaf(p.data) for name, p in layer.named_parameters()}
    tx = leaf(x)
    tb = None if bias is None else leaf(bias)
    H, Hkv, D = layer.n_head, layer.n_kv_head, layer.head_dim
    B, T = x.shape[0], x.shape[1]

    def proj(name, inp):
        return F.linear(inp, params[f"{name}.weight"], params.get(f"{name}.bias"))

    k_flat = proj("k_proj", tx)
    q = proj("q_proj", tx).view(B, T, H, D).transpose(1, 2)
    k = k_flat.view(B, T, Hkv, D).transpose(1, 2)
    v = proj("v_proj", tx).view(B, T, Hkv, D).transpose(1, 2)
    if layer.position == "rope":
        q = rotate_half_rope(q, np.arange(T), layer.rope_theta)
        k = rotate_half_rope(k, np.arange(T), layer.rope_theta)
    G = H // Hkv
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scale = 1.0 / np.sqrt(D) if layer.scale is None else layer.scale
    logits = scale * q @ k.transpose(-1, -2)  # (B, H, T, T)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    if layer.position == "alibi":
        slopes = torch.tensor(paper_alibi_slopes(H), dtype=torch.float64)
        logits = logits - slopes[:, None, None] * torch.from_numpy(np.abs(i - j).astype(np.float64))
    if layer.position == "t5":
        buckets = t5_relative_bucket(j - i, bidirectional=layer.t5_bidirectional,
                                     num_buckets=layer.t5_num_buckets, max_distance=layer.t5_max_distance)
        table = params["relative_attention_bias.weight"]  # (N, H)
        logits = logits + table[torch.from_numpy(buckets)].permute(2, 0, 1)
    if tb is not None:
        logits = logits + tb
    visible = np.ones((T, T), bool)
    if causal:
        visible &= j <= i
    if layer.window is not None:
        visible &= j > i - layer.window
    logits = logits + torch.where(torch.from_numpy(visible), 0.0, -torch.inf).double()
    y = torch.softmax(logits, dim=-1) @ v
    out = proj("o_proj", y.transpose(1, 2).reshape(B, T, H * D))
    leaves = {"x": tx, **params, **({} if tb is None else {"bias": tb})}
    return out, leaves, k_flat


def check_against_torch(layer, x, dy, *, causal, bias=None):
    layer.zero_grad()
    y = layer.forward(x, causal=causal, bias=bias)
    dx = layer.backward(dy)
    out, leaves, k_flat = torch_layer(layer, x, causal=causal, bias=bias)
    names = list(leaves)
    grads = backprop(out, dy, *leaves.values(), k_flat)
    grads, dk_flat = dict(zip(names, grads[:-1])), grads[-1]
    assert y.dtype == dx.dtype == x.dtype
    assert_close(y, out.detach().numpy(), what="y")
    assert_close(dx, grads["x"], what="dx")
    # the k bias gradient sums dk over every position; where it is 0 in exact arithmetic (no RoPE:
    # a shift of every logit of a row) its round-off is relative to those terms
    kscale = float(np.abs(dk_flat).sum(axis=(0, 1)).max())
    for name, p in layer.named_parameters():
        assert p.grad.dtype == x.dtype, name
        assert_close(p.grad, grads[name], scale=kscale if name == "k_proj.bias" else None, what=name)
    if bias is not None:
        assert layer.dbias.shape == bias.shape
        assert_close(layer.dbias, grads["bias"], what="dbias")
    else:
        assert layer.dbias is None


@st.composite
def layer_configs(draw):
    """Options of a layer for one position scheme, and the sizes of an input."""
    H, Hkv = draw(HEADS)
    head_dim = draw(st.sampled_from([None, 2, 4, 6]))
    d_model = H * draw(st.sampled_from([2, 4])) if head_dim is None else draw(st.sampled_from([5, 8]))
    window = draw(st.sampled_from([None, 1, 2, 3]))
    causal = window is not None or draw(st.booleans())
    options = dict(head_dim=head_dim, bias=draw(st.booleans()), qkv_bias=draw(st.sampled_from([None, True, False])),
                   window=window, scale=draw(st.sampled_from([None, 0.7])))
    N, bidirectional = draw(st.sampled_from([6, 8, 32])), draw(st.booleans())
    exact = (N // 2 if bidirectional else N) // 2  # max_distance must exceed the exact buckets
    t5 = dict(t5_num_buckets=N, t5_max_distance=exact + draw(st.sampled_from([1, 3, 120])),
              t5_bidirectional=bidirectional, rope_theta=draw(st.sampled_from([10000.0, 7.5])))
    B, T = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3, 5, 7]))
    return d_model, H, Hkv, options, t5, causal, B, T


@pytest.mark.parametrize("position", POSITIONS)
@settings(max_examples=12)
@given(layer_configs(), rngs())
def test_layer_matches_torch(position, config, rng):
    """Output, dx and every parameter gradient (T5 table included) for each position scheme, GQA and
    MQA, head_dim given or not, every bias combination, with and without a sliding window."""
    d_model, H, Hkv, options, t5, causal, B, T = config
    if position == "rope" and options["head_dim"] is None and (d_model // H) % 2:
        options["head_dim"] = 2
    layer = make_layer(d_model, H, Hkv, position=position, seed=int(rng.integers(1 << 30)), **options, **t5)
    x = rng.standard_normal((B, T, d_model))
    dy = rng.standard_normal((B, T, d_model))
    check_against_torch(layer, x, dy, causal=causal)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("bias_shape", [(1, 1, 4, 4), (2, 3, 4, 4), (2, 1, 1, 4)])
def test_user_bias_adds_to_the_positional_bias(position, bias_shape):
    """A caller's bias is added to the ALiBi/T5 bias; its gradient, reduced to its own shape, is in dbias."""
    rng = np.random.default_rng(7)
    layer = make_layer(12, 3, 1, position=position, t5_num_buckets=8, t5_max_distance=6)
    x, dy = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 4, 12))
    check_against_torch(layer, x, dy, causal=True, bias=rng.standard_normal(bias_shape))


@pytest.mark.parametrize("position", POSITIONS)
def test_float32_layer_matches_torch(position):
    rng = np.random.default_rng(8)
    layer = make_layer(16, 4, 2, position=position, dtype=np.float32, std=0.3, window=3, qkv_bias=True, bias=False)
    x, dy = rng.standard_normal((2, 6, 16)).astype(np.float32), rng.standard_normal((2, 6, 16)).astype(np.float32)
    check_against_torch(layer, x, dy, causal=True)


@pytest.mark.derivation("ATT.17")
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("window", [None, 1, 3])
@settings(max_examples=6)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), HEADS, rngs())
def test_cached_decoding_equals_full_forward(position, window, chunks, heads, rng):
    """Feeding the sequence in chunks of random sizes through a KV cache (keys stored rotated under
    RoPE, queries at positions t0 + i) gives the output of one forward over the whole sequence."""
    H, Hkv = heads
    T = sum(chunks)
    layer = make_layer(10, H, Hkv, head_dim=4, position=position, window=window, t5_num_buckets=8,
                       t5_max_distance=5, seed=int(rng.integers(1 << 30))).eval()
    x = rng.standard_normal((2, T, 10))
    full = layer.forward(x, causal=True)
    cache = layer.make_kv_cache(2, T + 2)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(layer.forward(x[:, start:start + n], causal=True, kv_cache=cache))
        start += n
        assert cache.length == start
    assert_close(np.concatenate(pieces, axis=1), full, what=f"cached decoding, chunks {chunks}")


@pytest.mark.parametrize("position", POSITIONS)
def test_two_forwards_then_two_backwards_pair_last_in_first_out(position):
    """Gradients of f(x1), f(x2) run forward, forward, backward(dy2), backward(dy1) equal the sum of
    two separate runs: each call's RoPE and T5 caches stay with it."""
    rng = np.random.default_rng(9)
    layer = make_layer(8, 4, 2, position=position, t5_num_buckets=8, t5_max_distance=5)
    x1, x2 = rng.standard_normal((2, 5, 8)), rng.standard_normal((1, 3, 8))
    dy1, dy2 = rng.standard_normal(x1.shape), rng.standard_normal(x2.shape)
    separate, dxs = {}, []
    for x, dy in ((x1, dy1), (x2, dy2)):
        layer.zero_grad()
        layer.forward(x, causal=True)
        dxs.append(layer.backward(dy))
        for name, p in layer.named_parameters():
            separate[name] = separate.get(name, 0) + p.grad
    layer.zero_grad()
    layer.forward(x1, causal=True)
    layer.forward(x2, causal=True)
    dx2 = layer.backward(dy2)
    dx1 = layer.backward(dy1)
    assert_close(dx1, dxs[0], what="dx1")
    assert_close(dx2, dxs[1], what="dx2")
    for name, p in layer.named_parameters():
        assert_close(p.grad, separate[name], what=name)
    assert layer.pending_backwards == 0


def test_parameter_names_and_shapes():
    """head_dim given (d_model not H * D), Qwen2's q/k/v bias without an o bias, T5's table."""
    layer = make_layer(10, 4, 2, bias=False, qkv_bias=True, head_dim=6, position="t5", t5_num_buckets=16)
    assert {name: p.shape for name, p in layer.named_parameters()} == {
        "q_proj.weight": (24, 10), "q_proj.bias": (24,),
        "k_proj.weight": (12, 10), "k_proj.bias": (12,),
        "v_proj.weight": (12, 10), "v_proj.bias": (12,),
        "o_proj.weight": (10, 24),
        "relative_attention_bias.weight": (16, 4),
    }
    assert list(layer.state_dict())[-1] == "relative_attention_bias.weight"
    assert (layer.head_dim, layer.position, layer.window, layer.rope_theta) == (6, "t5", None, 10000.0)
    assert layer.make_kv_cache(1, 5).k.shape == (1, 2, 5, 6)
    o_only = make_layer(8, 2, bias=True, qkv_bias=False)
    assert [n for n, _ in o_only.named_parameters()] == ["q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "o_proj.weight", "o_proj.bias"]


def test_default_layer_draws_the_same_weights():
    """The options' defaults change nothing: the same generator gives the same parameters as before
    (q, k, v, o in that order, each drawn by Linear)."""
    from npformer.nn.layers import Linear

    a = MultiHeadAttention(8, 2, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    expected = [Linear(8, 8, True, rng=rng) for _ in range(4)]
    for name, lin in zip(("q_proj", "k_proj", "v_proj", "o_proj"), expected):
        np.testing.assert_array_equal(getattr(a, name).weight.data, lin.weight.data)
    assert a.position == "none" and a.window is None and a.head_dim == 4 and a.qkv_bias is True


def test_failed_forward_leaves_the_kv_cache_length():
    """A call that fails after its keys are staged (a bad bias, checked once the key count is known)
    does not move the cache; the next good call continues from the same position."""
    rng = np.random.default_rng(10)
    layer = make_layer(8, 2, position="rope").eval()
    x = rng.standard_normal((1, 4, 8))
    full = layer.forward(x, causal=True)
    cache = layer.make_kv_cache(1, 4)
    first = layer.forward(x[:, :2], causal=True, kv_cache=cache)
    with pytest.raises(ValueError, match="'bias'"):
        layer.forward(x[:, 2:], causal=True, kv_cache=cache, bias=np.zeros((1, 1, 2, 3)))
    assert cache.length == 2
    rest = layer.forward(x[:, 2:], causal=True, kv_cache=cache)
    assert_close(np.concatenate([first, rest], axis=1), full, what="decoding after a failed call")


# -- bad input ---------------------------------------------------------------------------------------
def construct(**options):
    args = dict(d_model=8, n_head=2, rng=np.random.default_rng(0))
    args.update(options)
    return lambda: MultiHeadAttention(**args)


@pytest.mark.parametrize("bad", ["ROPE", "sinusoidal", "", 1, None, True, ["rope"]])
def test_unknown_position_is_refused(bad):
    message = expect_rejected(construct(position=bad), "MultiHeadAttention", "position")
    assert "'rope'" in message


@pytest.mark.parametrize("option, values", [
    ("head_dim", tuple(b for b in BAD_COUNTS if b is not None) + (0,)),
    ("window", tuple(b for b in BAD_COUNTS if b is not None) + (0,)),
    ("qkv_bias", tuple(b for b in BAD_FLAGS if b is not None)),
    ("rope_theta", BAD_BASES),
    ("t5_bidirectional", BAD_FLAGS),
    ("t5_num_buckets", BAD_COUNTS + (3, 0)),
    ("t5_max_distance", BAD_COUNTS + (0, 2)),
])
def test_bad_options_are_named(option, values):
    for bad in values:
        expect_rejected(construct(**{option: bad}), "MultiHeadAttention", option)


def test_rope_with_an_odd_head_size_is_refused():
    message = expect_rejected(construct(d_model=6, n_head=2, position="rope"), "MultiHeadAttention", "head_dim")
    assert "even" in message
    expect_rejected(construct(head_dim=5, position="rope"), "MultiHeadAttention", "head_dim")


@pytest.mark.parametrize("options", [dict(position="rope"), dict(position="alibi"), dict(position="t5"),
                                     dict(window=2)])
def test_cross_attention_with_positions_is_refused(options):
    layer = make_layer(8, 2, **options)
    x, context = np.ones((1, 3, 8)), np.ones((1, 4, 8))
    message = expect_rejected(lambda: layer.forward(x, causal=True, context=context),
                              "MultiHeadAttention.forward", "context")
    assert "no positions" in message
    assert layer.pending_backwards == 0


def test_window_without_causal_is_refused():
    layer = make_layer(8, 2, window=2)
    expect_rejected(lambda: layer.forward(np.ones((1, 3, 8))), "MultiHeadAttention.forward", "causal")


@pytest.mark.parametrize("position", ["alibi", "t5"])
@pytest.mark.parametrize("bad", [np.zeros((1, 2, 3)), np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 3), np.float32),
                                 np.zeros((1, 2, 3, 3), int), [[0.0]]])
def test_bad_user_bias_with_a_positional_bias_is_named(position, bad):
    layer = make_layer(8, 2, position=position)
    expect_rejected(lambda: layer.forward(np.ones((1, 3, 8)), causal=True, bias=bad),
                    "MultiHeadAttention.forward", "bias")
