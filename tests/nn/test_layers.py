"""Layers over the ops: parameters, accumulated gradients, recordings, and the MLPs against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npformer.nn.layers import Dropout, Linear, RMSNorm
from npformer.nn.mlp import MLP, SwiGLUMLP
from tests.oracle import leaf
from tests.tolerances import assert_close


def torch_grads(module, params, x, dy, forward):
    """Gradients of sum(forward(x) * dy) for x and each named parameter, by torch autograd."""
    tx = leaf(x)
    tp = {name: leaf(p.data) for name, p in module.named_parameters()}
    out = forward(tx, tp)
    out.backward(torch.from_numpy(dy))
    return out.detach().numpy(), tx.grad.numpy(), {n: t.grad.numpy() for n, t in tp.items()}


def check_layer(module, x, dy, forward):
    y = module.forward(x)
    dx = module.backward(dy)
    ty, tdx, tgrads = torch_grads(module, dict(module.named_parameters()), x, dy, forward)
    assert_close(y, ty, what="y")
    assert_close(dx, tdx, what="dx")
    for name, p in module.named_parameters():
        assert_close(p.grad, tgrads[name], what=name)


def test_gelu_mlp_matches_torch():
    rng = np.random.default_rng(0)
    mlp = MLP(6, 24, rng=rng, dtype=np.float64)
    x, dy = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))

    def forward(tx, p):
        h = F.gelu(F.linear(tx, p["fc.weight"], p["fc.bias"]), approximate="tanh")
        return F.linear(h, p["proj.weight"], p["proj.bias"])

    check_layer(mlp, x, dy, forward)


@pytest.mark.parametrize("bias", [True, False])
def test_relu_mlp_matches_torch(bias):
    rng = np.random.default_rng(3)
    mlp = MLP(5, 9, bias, rng=rng, dtype=np.float64, activation="relu")
    x, dy = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    x[0, 0, :] = 0.0  # ReLU's kink at the input of fc when fc has no bias: gradient 0 there, as torch

    def forward(tx, p):
        h = F.relu(F.linear(tx, p["fc.weight"], p.get("fc.bias")))
        return F.linear(h, p["proj.weight"], p.get("proj.bias"))

    check_layer(mlp, x, dy, forward)


@pytest.mark.parametrize("activation", ["swish", "", None, 1])
def test_mlp_refuses_an_unknown_activation(activation):
    with pytest.raises(ValueError, match="MLP: argument 'activation'"):
        MLP(4, 8, rng=np.random.default_rng(0), activation=activation)


def test_swiglu_mlp_matches_torch():
    rng = np.random.default_rng(1)
    mlp = SwiGLUMLP(6, 16, rng=rng, dtype=np.float64)
    assert sorted(n for n, _ in mlp.named_parameters()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    x, dy = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))

    def forward(tx, p):
        return F.linear(F.silu(F.linear(tx, p["gate_proj.weight"])) * F.linear(tx, p["up_proj.weight"]), p["down_proj.weight"])

    check_layer(mlp, x, dy, forward)


def test_rmsnorm_layer_matches_torch():
    rng = np.random.default_rng(2)
    norm = RMSNorm(7, dtype=np.float64)
    norm.weight.data[:] = rng.standard_normal(7)
    x, dy = rng.standard_normal((3, 7)), rng.standard_normal((3, 7))
    check_layer(norm, x, dy, lambda tx, p: F.rms_norm(tx, (7,), p["weight"], 1e-6))


def test_gradients_accumulate_until_zeroed():
    rng = np.random.default_rng(3)
    layer = Linear(4, 3, rng=rng, dtype=np.float64)
    x, dy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    layer.forward(x)
    layer.backward(dy)
    once = layer.weight.grad.copy()
    layer.forward(x)
    layer.backward(dy)
    assert_close(layer.weight.grad, 2 * once, what="two backward passes add up")
    layer.zero_grad()
    assert not layer.weight.grad.any() and not layer.bias.grad.any()


def test_linear_keeps_the_torch_layout_and_float32():
    layer = Linear(5, 2, bias=False, rng=np.random.default_rng(0))
    assert layer.weight.data.shape == (2, 5) and layer.bias is None
    assert layer.forward(np.ones((3, 5), np.float32)).dtype == np.float32


def test_dropout_layer_records_its_mask_and_is_the_identity_in_eval():
    drop = Dropout(0.5, rng=np.random.default_rng(4))
    rec = drop.start_recording()
    x = np.ones((4, 6))
    y = drop.forward(x)
    np.testing.assert_array_equal(y, 2.0 * rec["mask"])
    np.testing.assert_array_equal(drop.backward(np.ones_like(x)), 2.0 * rec["mask"])
    drop.eval()
    assert drop.forward(x) is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_are_created_in_the_requested_dtype(dtype):
    mlp = MLP(4, 8, rng=np.random.default_rng(0), dtype=dtype)
    assert {p.data.dtype for p in mlp.parameters()} == {np.dtype(dtype)}
