"""LoRALinear against torch autograd and its own equations; apply_lora on whole models; PEFT's folder layout."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.hf.safetensors import read_safetensors
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import Llama, LlamaConfig
from npformer.nn.layers import Linear
from npformer.nn.lora import LoRALinear, apply_lora, lora_parameters, save_peft_adapter
from npformer.optim.optimizer import AdamW
from tests.badinput import expect_rejected
from tests.strategies import DTYPES, SIDES, in_layout, layouts, randn, shapes
from tests.tolerances import HF_LOGITS_RTOL, RTOL

P_DROP = st.sampled_from([0.0, 0.3])


def _layer(d_in, d_out, r, dtype, seed, *, bias=True, p=0.0, alpha=3.0):
    """A LoRALinear with random W, b and a non-zero B (a zero B would hide every error in A's path)."""
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, bias, rng=rng, std=1.0, dtype=dtype)
    if bias:
        base.bias.data[...] = randn(rng, d_out, dtype)
    layer = LoRALinear(base, r, alpha, p, rng=rng)
    layer.lora_B.data[...] = randn(rng, (d_out, r), dtype)
    return layer


def _torch_reference(layer, x, mask):
    """(LORA.1) in torch float64 with the layer's dropout mask; returns y and the leaves."""
    t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in
         dict(x=x, W=layer.weight.data, A=layer.lora_A.data, B=layer.lora_B.data).items()}
    h = t["x"] if mask is None else t["x"] * torch.tensor(mask) / (1 - layer.dropout)
    y = t["x"] @ t["W"].T + layer.scale * (h @ t["A"].T) @ t["B"].T
    if layer.bias is not None:
        y = y + torch.tensor(layer.bias.data.astype(np.float64))
    return y, t


@pytest.mark.derivation("LORA.1")
@given(lead=shapes(1, 2), d_in=SIDES, d_out=SIDES, r=st.sampled_from([1, 2, 4]), dtype=DTYPES,
       layout=layouts(), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_equals_formula_and_torch(lead, d_in, d_out, r, dtype, layout, bias, seed):
    layer = _layer(d_in, d_out, r, dtype, seed, bias=bias)
    x = randn(np.random.default_rng(seed + 1), lead + (d_in,), dtype)
    y = layer.forward(in_layout(x, layout))
    assert y.dtype == dtype and y.shape == lead + (d_out,)
    W, A, B = (p.data.astype(np.float64) for p in (layer.weight, layer.lora_A, layer.lora_B))
    x64 = x.astype(np.float64)
    expected = np.einsum("...i,oi->...o", x64, W) + layer.scale * np.einsum("...i,ri,or->...o", x64, A, B)
    if bias:
        expected += layer.bias.data
    np.testing.assert_allclose(y, expected, rtol=RTOL[np.dtype(dtype)], atol=RTOL[np.dtype(dtype)] * 10)
    y_t, _ = _torch_reference(layer, x, None)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=RTOL[np.dtype(dtype)], atol=RTOL[np.dtype(dtype)] * 10)


def test_fresh_adapter_is_the_identity_update():
    """B = 0 at creation: the wrapped layer's output is unchanged; A within PEFT's kaiming bound."""
    rng = np.random.default_rng(0)
    base = Linear(9, 5, rng=rng)
    x = randn(rng, (3, 9), np.float32)
    before = base.forward(x)
    layer = LoRALinear(base, 4, 8.0, rng=rng)
    np.testing.assert_array_equal(layer.forward(x), before)
    assert np.all(layer.lora_B.data == 0) and np.abs(layer.lora_A.data).max() <= 1 / 3
    assert layer.weight is base.weight and layer.bias is base.bias


@pytest.mark.derivation("LORA.2")
@pytest.mark.derivation("LORA.3")
@pytest.mark.derivation("LORA.4")
@given(lead=shapes(1, 2), d_in=SIDES, d_out=SIDES, r=st.sampled_from([1, 3]), p=P_DROP, bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gradients_equal_torch(lead, d_in, d_out, r, p, bias, seed):
    layer = _layer(d_in, d_out, r, np.float64, seed, bias=bias, p=p)
    rng = np.random.default_rng(seed + 1)
    x, dy = randn(rng, lead + (d_in,)), randn(rng, lead + (d_out,))
    layer.forward(x)
    mask = layer.peek_cache().drop.mask
    dx = layer.backward(dy)
    y_t, t = _torch_reference(layer, x, mask)
    y_t.backward(torch.tensor(dy))
    rtol = RTOL[np.dtype(np.float64)]
    np.testing.assert_allclose(dx, t["x"].grad.numpy(), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(layer.lora_A.grad, t["A"].grad.numpy(), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(layer.lora_B.grad, t["B"].grad.numpy(), rtol=rtol, atol=1e-12)
    assert not layer.weight.grad.any() and (layer.bias is None or not layer.bias.grad.any())  # frozen


@pytest.mark.derivation("LORA.2")
@pytest.mark.derivation("LORA.3")
@pytest.mark.derivation("LORA.4")
@given(seed=st.integers(0, 2**16), p=P_DROP)
def test_gradient_formulas(seed, p):
    """(LORA.2)-(LORA.4) written out with einsum, and central finite differences of <y, dy> for A and B."""
    layer = _layer(5, 3, 2, np.float64, seed, p=p)
    rng = np.random.default_rng(seed + 7)
    x, dy = randn(rng, (2, 4, 5)), randn(rng, (2, 4, 3))
    layer.forward(x)
    mask = layer.peek_cache().drop.mask
    dx = layer.backward(dy)
    s, W, A, B = layer.scale, layer.weight.data, layer.lora_A.data, layer.lora_B.data
    h = x if mask is None else x * mask / (1 - p)
    u = np.einsum("bti,ri->btr", h, A)
    np.testing.assert_allclose(layer.lora_B.grad, s * np.einsum("bto,btr->or", dy, u), rtol=1e-12)  # (LORA.2)
    du = s * np.einsum("bto,or->btr", dy, B)
    np.testing.assert_allclose(layer.lora_A.grad, np.einsum("btr,bti->ri", du, h), rtol=1e-12)  # (LORA.3)
    dh = np.einsum("btr,ri->bti", du, A)
    expected_dx = dy @ W + (dh if mask is None else dh * mask / (1 - p))
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-13)  # (LORA.4)

    def objective(A_, B_):
        return float(np.sum((x @ W.T + s * (h @ A_.T) @ B_.T) * dy))

    eps = 1e-6
    for which, grad in (("A", layer.lora_A.grad), ("B", layer.lora_B.grad)):
        base = A if which == "A" else B
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args = lambda m: (m, B) if which == "A" else (A, m)  # noqa: E731
            fd[idx] = (objective(*args(plus)) - objective(*args(minus))) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.derivation("LORA.5")
@given(d_in=SIDES, d_out=SIDES, r=st.sampled_from([1, 2, 5]), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_merge_equals_adapter_and_unmerge_is_exact(d_in, d_out, r, dtype, seed):
    layer = _layer(d_in, d_out, r, dtype, seed).eval()
    x = randn(np.random.default_rng(seed + 3), (4, d_in), dtype)
    before_bytes = layer.weight.data.tobytes()
    adapter_out = layer.forward(x)
    layer.merge()
    expected = layer._unmerged.astype(np.float64) + layer.scale * (layer.lora_B.data.astype(np.float64)
                                                                    @ layer.lora_A.data.astype(np.float64))
    np.testing.assert_allclose(layer.weight.data, expected, rtol=RTOL[np.dtype(dtype)], atol=RTOL[np.dtype(dtype)])
    np.testing.assert_allclose(layer.forward(x), adapter_out, rtol=RTOL[np.dtype(dtype)] * 10,
                               atol=RTOL[np.dtype(dtype)] * 10)
    layer.unmerge()
    assert layer.weight.data.tobytes() == before_bytes  # bit for bit
    np.testing.assert_array_equal(layer.forward(x), adapter_out)


def test_subtraction_would_not_unmerge_exactly():
    """Why unmerge keeps a copy: fl(fl(W + D) - D) != W (proofs/lora.md, Merge)."""
    W, D = np.float32(1.0), np.float32(2.0**-24)
    assert (W + D) - D != W


def test_merged_layer_refuses_training_and_double_merge():
    layer = _layer(3, 2, 1, np.float64, 0)
    layer.merge()
    with pytest.raises(RuntimeError, match="LoRALinear.merge: the adapter is already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.forward(np.ones((1, 3)))
    layer.unmerge()
    with pytest.raises(RuntimeError, match="LoRALinear.unmerge: the adapter is not merged"):
        layer.unmerge()
    layer.forward(np.ones((1, 3)))
    with pytest.raises(RuntimeError, match="forwards wait"):
        layer.merge()


def _tiny_llama(dtype="float64"):
    return Llama(LlamaConfig(vocab_size=31, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                             intermediate_size=24, dtype=dtype), seed=1)


def test_only_adapters_get_gradients():
    """apply_lora on a Llama and on a GPT: after a backward the wrapped weights' .grad stays zero."""
    for model, targets in ((_tiny_llama(), ("q_proj", "v_proj", "down_proj")), (GPT(GPTConfig(
            vocab_size=29, block_size=16, n_layer=2, n_head=2, d_model=8, dtype="float64"), seed=2), None)):
        if targets is None:  # GPT: every Linear name it has
            targets = tuple(sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if type(m) is Linear}))
        adapters = apply_lora(model, targets, r=2, alpha=4.0, rng=np.random.default_rng(0))
        wrapped = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        assert all(m.training for m in wrapped)
        assert wrapped and len(adapters) == 2 * len(wrapped)
        assert [id(p) for p in adapters] == [id(p) for p in lora_parameters(model)]
        for m in wrapped:
            m.lora_B.data[...] = 0.1  # so that A gets a gradient too
        ids = np.random.default_rng(3).integers(0, model.cfg.vocab_size, (2, 7))
        model.forward(ids, ids)
        model.backward()
        for m in wrapped:
            assert not m.weight.grad.any() and (m.bias is None or not m.bias.grad.any())
            assert m.lora_A.grad.any() and m.lora_B.grad.any()


def _hf_folder(tmp_path, case="llama_gqa"):
    pytest.importorskip("transformers")
    from tests.hf.conftest import build_hf_model

    model = build_hf_model(case)
    model.save_pretrained(tmp_path / "base")
    return model, tmp_path / "base"


def test_tiny_hf_llama_trains_on_adapters(tmp_path):
    from npformer.hf import load_pretrained

    _, folder = _hf_folder(tmp_path)
    model = load_pretrained(folder).train()
    frozen = {k: v.copy() for k, v in model.state_dict().items()}
    adapters = apply_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj"), r=4, alpha=8.0, dropout=0.1,
                          rng=np.random.default_rng(0))
    opt = AdamW(adapters, lr=1e-2, weight_decay=0.0)
    ids = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 12))
    losses = []
    for _ in range(6):
        model.zero_grad()
        _, loss = model.forward(ids[:, :-1], ids[:, 1:])
        model.backward()
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    for name, value in frozen.items():  # the base model is untouched, bit for bit
        np.testing.assert_array_equal(after[name], value)


def test_saved_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from npformer.hf import load_pretrained

    hf_model, folder = _hf_folder(tmp_path)
    model = load_pretrained(folder).eval()
    apply_lora(model, ("q_proj", "v_proj", "gate_proj"), r=4, alpha=8.0, dropout=0.05, rng=np.random.default_rng(0))
    rng = np.random.default_rng(5)
    for m in lora_parameters(model):
        m.data[...] = randn(rng, m.shape, np.float32, 0.3)
    assert not any(m.training for _, m in model.named_modules() if isinstance(m, LoRALinear))  # the model's mode
    out = save_peft_adapter(model, tmp_path / "adapter", "tiny-llama")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["bias"], config["task_type"]) == (
        "LORA", 4, 8.0, "none", "CAUSAL_LM")
    assert config["target_modules"] == ["gate_proj", "q_proj", "v_proj"]
    names = set(read_safetensors(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names and len(names) == 2 * 3 * 2
    peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
    ids = np.random.default_rng(2).integers(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        expected = peft_model(torch.tensor(ids)).logits.numpy()
    logits, _ = model.forward(ids)
    np.testing.assert_allclose(logits, expected, rtol=HF_LOGITS_RTOL[np.dtype(np.float32)], atol=1e-5)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.merge()
    np.testing.assert_allclose(model.forward(ids)[0], expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_named(tmp_path):
    rng = np.random.default_rng(0)
    base = Linear(3, 2, rng=rng)
    expect_rejected(lambda: LoRALinear("W", 2, 1.0, rng=rng), "LoRALinear", "base")
    expect_rejected(lambda: LoRALinear(base, 0, 1.0, rng=rng), "LoRALinear", "r")
    expect_rejected(lambda: LoRALinear(base, 2.0, 1.0, rng=rng), "LoRALinear", "r")
    expect_rejected(lambda: LoRALinear(base, 2, 0.0, rng=rng), "LoRALinear", "alpha")
    expect_rejected(lambda: LoRALinear(base, 2, 1.0, 1.0, rng=rng), "LoRALinear", "dropout")
    expect_rejected(lambda: LoRALinear(base, 2, 1.0, rng=3), "LoRALinear", "rng")
    layer = LoRALinear(base, 2, 1.0, rng=rng)
    expect_rejected(lambda: layer.forward(np.ones((2, 4), np.float32)), "LoRALinear.forward", "x")
    expect_rejected(lambda: layer.forward(np.ones((2, 3), np.float64)), "LoRALinear.forward", "x")
    layer.forward(np.ones((2, 3), np.float32))
    expect_rejected(lambda: layer.backward(np.ones((3, 2), np.float32)), "LoRALinear.backward", "dy")
    assert layer.pending_backwards == 1 and not layer.lora_A.grad.any()  # the failed backward consumed nothing
    llama = _tiny_llama()
    expect_rejected(lambda: apply_lora(llama, ("nothing",), rng=rng), "apply_lora", "target_modules")
    expect_rejected(lambda: apply_lora(llama, "q_proj", rng=rng), "apply_lora", "target_modules")
    expect_rejected(lambda: apply_lora(object(), rng=rng), "apply_lora", "model")
    expect_rejected(lambda: apply_lora(llama, r=0, rng=rng), "apply_lora", "r")
    expect_rejected(lambda: apply_lora(llama, rng=None), "apply_lora", "rng")
    expect_rejected(lambda: lora_parameters([]), "lora_parameters", "model")
    expect_rejected(lambda: save_peft_adapter(llama, tmp_path), "save_peft_adapter", "model")  # no adapters
    gpt = GPT(GPTConfig(vocab_size=29, block_size=8, n_layer=1, n_head=2, d_model=8), seed=0)
    expect_rejected(lambda: save_peft_adapter(gpt, tmp_path), "save_peft_adapter", "model")
    apply_lora(llama, rng=rng)
    expect_rejected(lambda: save_peft_adapter(llama, 3), "save_peft_adapter", "folder")
    expect_rejected(lambda: save_peft_adapter(llama, tmp_path, 3), "save_peft_adapter", "base_model_name_or_path")
