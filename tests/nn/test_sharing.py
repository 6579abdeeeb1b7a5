"""One layer applied many times before its backward: one cache per call, consumed last in, first out.

Weight sharing (ALBERT's one block at every depth, T5's shared embedding, a looped
model) is exact only if every call keeps its own cache. The reference for a layer
applied n times is n snapshots of it, each taken just before one of the calls (same
weights, same random state), each applied once: every input gradient must be
bit-identical and the shared parameter gradients must equal the snapshots' summed.
"""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.twins.gpt import TwinBlock
from npformer.models.gpt import GPT, Block, GPTConfig
from npformer.nn.attention import MultiHeadAttention
from npformer.nn.layers import Dropout, Embedding, LayerNorm, Linear, RMSNorm
from npformer.nn.mlp import MLP, SwiGLUMLP
from tests.strategies import rngs
from tests.tolerances import MODEL_RTOL, assert_close

D, B, T = 8, 2, 5


def make(kind, rng):
    """(layer, input maker): every layer maps (B, T, D) to (B, T, D) but the embedding (ids -> rows)."""
    dtype = np.float64
    layers = {
        "linear": lambda: Linear(D, D, rng=rng, dtype=dtype, std=0.5),
        "layernorm": lambda: LayerNorm(D, dtype=dtype),
        "rmsnorm": lambda: RMSNorm(D, dtype=dtype),
        "dropout": lambda: Dropout(0.3, rng=rng),
        "mlp": lambda: MLP(D, 3 * D, rng=rng, dtype=dtype, proj_std=0.5),
        "swiglu": lambda: SwiGLUMLP(D, 3 * D, rng=rng, dtype=dtype),
        "attention": lambda: MultiHeadAttention(D, 4, 2, rng=rng, dtype=dtype),
        "block": lambda: Block(GPTConfig(vocab_size=7, block_size=T, n_layer=2, n_head=2, d_model=D, dropout=0.2,
                                         dtype="float64"), rng),
        "embedding": lambda: Embedding(6, D, rng=rng, dtype=dtype),
    }
    layer = layers[kind]()
    for p in layer.parameters():  # norms start at ones/zeros: perturb so every gradient term shows
        p.data += 0.1 * rng.standard_normal(p.shape)
    if kind == "embedding":
        return layer, lambda: rng.integers(0, 6, (B, T))
    return layer, lambda: rng.standard_normal((B, T, D))


def call(layer, kind, x):
    return layer.forward(x, causal=True) if kind == "attention" else layer.forward(x)


KINDS = st.sampled_from(["linear", "layernorm", "rmsnorm", "dropout", "mlp", "swiglu", "attention", "block",
                         "embedding"])


@given(KINDS, st.integers(1, 4), st.booleans(), rngs())
def test_n_calls_equal_n_snapshots(kind, n, chained, rng):
    """Independent inputs, or a chain x_{i+1} = f(x_i) (a looped model): backward in reverse order."""
    chained = chained and kind != "embedding"
    layer, new_input = make(kind, rng)
    layer.zero_grad()
    xs, ys, snapshots = [], [], []
    x = new_input()
    for _ in range(n):
        snapshots.append(copy.deepcopy(layer))
        xs.append(x)
        ys.append(call(layer, kind, x))
        x = ys[-1] if chained else new_input()
    assert layer.pending_backwards == n

    dys = [rng.standard_normal(y.shape) for y in ys]
    dxs, ref_dxs = [None] * n, [None] * n
    dy = dys[-1]
    for i in reversed(range(n)):  # shared layer: last in, first out
        dxs[i] = layer.backward(dy if chained else dys[i])
        dy = dxs[i]
    assert layer.pending_backwards == 0

    for snap in snapshots:
        snap.clear_caches()
        snap.zero_grad()
    dy = dys[-1]
    for i in reversed(range(n)):
        ref_y = call(snapshots[i], kind, xs[i])
        np.testing.assert_array_equal(ref_y, ys[i])  # same weights, same random state
        ref_dxs[i] = snapshots[i].backward(dy if chained else dys[i])
        dy = ref_dxs[i]
    for i in range(n):
        if ref_dxs[i] is not None:  # the embedding returns no input gradient
            np.testing.assert_array_equal(dxs[i], ref_dxs[i])
    for (name, p), *refs in zip(layer.named_parameters(), *(s.named_parameters() for s in snapshots)):
        assert_close(p.grad, sum(r[1].grad for r in refs), what=f"{kind}.{name} after {n} calls")


def test_embedding_two_calls_two_backwards():
    """Rows 0 and 1 from the first call, 2 and 3 from the second: each gets its own gradient."""
    emb = Embedding(5, 3, rng=np.random.default_rng(0), dtype=np.float64)
    emb.forward(np.array([0, 1]))
    emb.forward(np.array([2, 3]))
    emb.backward(np.full((2, 3), 2.0))  # matches the second call: rows 2, 3
    emb.backward(np.full((2, 3), 1.0))  # matches the first call: rows 0, 1
    np.testing.assert_array_equal(emb.weight.grad, [[1] * 3, [1] * 3, [2] * 3, [2] * 3, [0] * 3])


@given(KINDS, rngs())
def test_backward_with_no_forward_left_is_an_error(kind, rng):
    layer, new_input = make(kind, rng)
    y = call(layer, kind, new_input())
    layer.backward(np.ones_like(y, dtype=np.float64))
    with pytest.raises(RuntimeError, match=rf"{type(layer).__name__}\.backward: no forward left to match"):
        layer.backward(np.ones_like(y, dtype=np.float64))


@given(KINDS, rngs())
def test_eval_mode_keeps_no_cache(kind, rng):
    layer, new_input = make(kind, rng)
    layer.eval()
    y = call(layer, kind, new_input())
    assert all(m.pending_backwards == 0 for _, m in layer.named_modules())
    with pytest.raises(RuntimeError, match="a forward in eval mode keeps no cache"):
        layer.backward(np.ones_like(y, dtype=np.float64))
    layer.train()
    call(layer, kind, new_input())
    assert layer.pending_backwards == 1


CFG = GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, d_model=8, dropout=0.0, dtype="float64")


@pytest.mark.parametrize("depth", [3])
def test_one_block_three_times_equals_three_blocks_and_torch(depth):
    """A looped block (ALBERT-style) against three equal blocks summed and a torch module applied three times."""
    rng = np.random.default_rng(7)
    shared = Block(CFG, rng)
    for p in shared.parameters():
        p.data += 0.1 * rng.standard_normal(p.shape)
    copies = [copy.deepcopy(shared) for _ in range(depth)]
    x0 = rng.standard_normal((B, CFG.block_size, D))
    w = rng.standard_normal((B, CFG.block_size, D))  # loss = sum(w * x_depth)

    x = x0
    for _ in range(depth):
        x = shared.forward(x)
    loss_shared = float(np.sum(w * x))
    dx_shared = w
    for _ in range(depth):
        dx_shared = shared.backward(dx_shared)

    x = x0
    for block in copies:
        x = block.forward(x)
    loss_copies = float(np.sum(w * x))
    dx_copies = w
    for block in reversed(copies):
        dx_copies = block.backward(dx_copies)
    assert loss_shared == loss_copies
    np.testing.assert_array_equal(dx_shared, dx_copies)

    twin = TwinBlock(D, CFG.n_head, bias=True, dropout=0.0).double()
    with torch.no_grad():
        for name, prm in twin.named_parameters():
            prm.copy_(torch.from_numpy(dict(shared.named_parameters())[name].data))
    tx0 = torch.from_numpy(x0).requires_grad_(True)
    tx = tx0
    for i in range(depth):
        tx = twin(tx, None, f"blocks.{i}")
    tloss = (tx * torch.from_numpy(w)).sum()
    tloss.backward()
    assert abs(loss_shared - tloss.item()) <= MODEL_RTOL * abs(tloss.item())
    assert_close(dx_shared, tx0.grad.numpy(), rtol=MODEL_RTOL, what="dx0")
    ours = dict(shared.named_parameters())
    # The k bias gradient is zero in exact arithmetic (softmax ignores a per-row shift): judge its
    # round-off against the k weight gradient, the sum of the same terms times inputs of size ~1.
    k_scale = float(np.abs(ours["attn.k_proj.weight"].grad).max())
    for name, prm in twin.named_parameters():
        scale = k_scale if name == "attn.k_proj.bias" else None
        summed = sum(dict(c.named_parameters())[name].grad for c in copies)
        assert_close(ours[name].grad, summed, rtol=MODEL_RTOL, scale=scale, what=f"{name}: shared vs three copies")
        assert_close(ours[name].grad, prm.grad.numpy(), rtol=MODEL_RTOL, scale=scale, what=f"{name}: shared vs torch")


@given(st.integers(1, 3), rngs())
def test_gpt_micro_batches_forward_all_then_backward_all(n, rng):
    """n forwards then n backwards equals n (forward, backward) pairs: gradient accumulation either way."""
    a, b = GPT(CFG, seed=1), GPT(CFG, seed=1)
    batches = [(rng.integers(0, 7, (2, 6)), rng.integers(0, 7, (2, 6))) for _ in range(n)]
    losses_a = [a.forward(ids, t)[1] for ids, t in batches]
    for _ in range(n):
        a.backward()
    losses_b = []
    for ids, t in batches:
        losses_b.append(b.forward(ids, t)[1])
        b.backward()
    assert losses_a == losses_b
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(pa.grad, pb.grad, what=name)
    with pytest.raises(RuntimeError, match="GPT.backward: no forward left to match"):
        a.backward()


def test_many_unmatched_forwards_warn_and_clear_caches_frees_them():
    from npformer.nn.module import PENDING_WARNING

    layer = Linear(2, 2, rng=np.random.default_rng(0), dtype=np.float64)
    x = np.ones((1, 2))
    for _ in range(PENDING_WARNING - 1):
        layer.forward(x)
    with pytest.warns(RuntimeWarning, match=f"{PENDING_WARNING} forwards wait for their backward"):
        layer.forward(x)
    assert layer.pending_backwards == PENDING_WARNING
    layer.clear_caches()
    assert layer.pending_backwards == 0
