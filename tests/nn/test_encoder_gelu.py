"""The encoder pieces' GELU option: "tanh" (Hugging Face's gelu_new, ALBERT's default) against torch."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.nn.encoder import MLMHead, PostNormEncoderLayer
from tests.tolerances import RTOL, assert_close

F64 = np.dtype(np.float64)


def torch_layer(layer, x, approximate):
    """The post-norm layer written out in torch with the layer's weights: attention, residual, norm, MLP."""
    p = {n: torch.tensor(v.data, requires_grad=True) for n, v in layer.named_parameters()}
    B, T, D = x.shape
    H = layer.attention.n_head
    xt = torch.tensor(x, requires_grad=True)

    def lin(name, z):
        return z @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def split(z):
        return z.view(B, T, H, D // H).transpose(1, 2)

    q, k, v = (split(lin(f"attention.{n}_proj", xt)) for n in "qkv")
    a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, -1) @ v
    a = lin("attention.o_proj", a.transpose(1, 2).reshape(B, T, D))
    ln = lambda name, z: torch.nn.functional.layer_norm(z, (D,), p[f"{name}.weight"], p[f"{name}.bias"],  # noqa
                                                        layer.attention_norm.eps)
    h = ln("attention_norm", xt + a)
    m = lin("mlp.proj", torch.nn.functional.gelu(lin("mlp.fc", h), approximate=approximate))
    return xt, p, ln("output_norm", h + m)


@given(approximate=st.sampled_from(["none", "tanh"]), B=st.integers(1, 2), T=st.integers(1, 5),
       seed=st.integers(0, 99))
def test_post_norm_layer_gelu_options_match_torch(approximate, B, T, seed):
    rng = np.random.default_rng(seed)
    layer = PostNormEncoderLayer(8, 2, 16, rng=rng, std=0.5, dtype=F64, approximate=approximate)
    x = rng.standard_normal((B, T, 8))
    dy = rng.standard_normal((B, T, 8))
    y = layer.forward(x)
    dx = layer.backward(dy)
    xt, p, yt = torch_layer(layer, x, approximate)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt.detach().numpy(), what="y")
    assert_close(dx, xt.grad.numpy(), what="dx")
    for name, prm in layer.named_parameters():
        assert_close(prm.grad, p[name].grad.numpy(), rtol=RTOL[F64], what=name)


@pytest.mark.parametrize("approximate", ["erf", "", None, 1])
def test_mlm_head_gelu_option_is_checked_by_name(approximate):
    with pytest.raises(ValueError, match="MLMHead: argument 'approximate'"):
        MLMHead(8, 11, rng=np.random.default_rng(0), approximate=approximate)


def test_mlm_head_tanh_gelu_differs_from_erf_by_the_approximation():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 3, 8))
    word = rng.standard_normal((11, 8))
    heads = [MLMHead(8, 11, rng=np.random.default_rng(1), dtype=F64, approximate=a) for a in ("none", "tanh")]
    erf, tanh = (head.forward(h, word) for head in heads)
    gap = np.abs(erf - tanh).max()
    assert 0 < gap < 0.1  # the two GELUs differ by at most ~1e-3 per unit; the head scales it
