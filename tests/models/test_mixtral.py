"""Llama with experts (Mixtral) against its torch twin: the loss with the pooled load balance and every
gradient at MODEL_RTOL, with and without dropped tokens; config checks; decoding with experts."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.twins.llama import TwinLlama
from npformer.generate import generate
from npformer.models.llama import IGNORE_INDEX, Llama, LlamaConfig, Mixtral
from tests.tolerances import MODEL_RTOL, assert_close

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_kv_head=2, d_model=8, intermediate_size=6,
            num_local_experts=4, num_experts_per_tok=2)


def randomise(model, seed=7):
    rng = np.random.default_rng(seed)
    for name, prm in model.named_parameters():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        scale = 0.3 if prm.data.ndim == 1 else 1.0 / np.sqrt(prm.shape[1])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def pair(seed=0, **overrides):
    cfg = LlamaConfig(**{**TINY, **overrides, "dtype": "float64"})
    model = randomise(Mixtral(cfg, seed=seed), seed + 7)
    twin = TwinLlama(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def batch(cfg, B=3, T=None, seed=1):
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.25] = IGNORE_INDEX
    targets[0, -1] = rng.integers(0, cfg.vocab_size)
    return ids, targets


def compare(model, twin, ids, targets):
    logits, loss = model.forward(ids, targets)
    model.backward()
    t_logits, t_loss = twin(torch.from_numpy(ids), torch.from_numpy(targets))
    twin.zero_grad()
    t_loss.backward()
    assert_close(logits, t_logits.detach().numpy(), rtol=MODEL_RTOL, what="logits")
    assert_close(loss, t_loss.item(), rtol=MODEL_RTOL, what="loss")
    grads = {n: np.zeros(tuple(p.shape)) if p.grad is None else p.grad.numpy()  # an expert no token reached
             for n, p in twin.named_parameters()}
    ours = dict(model.named_parameters())
    assert sorted(ours) == sorted(grads)
    # Round-off is relative to the model's gradients: with k = 1 renormalised the router's is exactly 0, torch's ~1e-17
    scale = max(float(np.abs(g).max(initial=0.0)) for g in grads.values())
    for name, g in grads.items():
        assert_close(ours[name].grad, g, rtol=MODEL_RTOL, scale=max(float(np.abs(g).max(initial=0.0)), 1e-6 * scale),
                     what=f"d{name}")


@pytest.mark.derivation("MOE.13")
@given(k=st.integers(1, 3), capacity=st.sampled_from([None, 0.25, 0.6, 1.0, 2.0]),
       coef=st.sampled_from([0.0, 0.01, 0.7]), seed=st.integers(0, 2**16))
def test_every_gradient_equals_the_twin(k, capacity, coef, seed):
    """Loss (cross entropy + coef * pooled load balance) and every gradient; capacities that drop many tokens."""
    model, twin = pair(seed % 5, num_experts_per_tok=k, capacity_factor=capacity, router_aux_loss_coef=coef)
    ids, targets = batch(model.cfg, seed=seed)
    compare(model, twin, ids, targets)
    if capacity is not None and capacity < 1:  # tokens were dropped in every layer
        assert all(not layer.mlp.routing.kept.all() for layer in model.layers)


def test_pooled_load_balance_is_one_loss_over_every_layers_tokens():
    """The aux loss is E sum_e f_e P_e over the layers' rows stacked, not a sum of per-layer losses."""
    model, _ = pair(1, router_aux_loss_coef=0.5)
    ids, targets = batch(model.cfg, seed=4)
    model.eval()
    _, loss = model.forward(ids, targets)
    r = [layer.mlp.routing for layer in model.layers]
    E, N = model.cfg.num_local_experts, ids.size
    f = sum(np.bincount(x.expert.reshape(-1), minlength=E) for x in r) / (len(r) * N)
    P = sum(x.probs.sum(axis=0) for x in r) / (len(r) * N)
    assert model.aux_loss == pytest.approx(E * float(f @ P), rel=1e-12)
    per_layer = [E * float(np.bincount(x.expert.reshape(-1), minlength=E) / N @ x.probs.mean(axis=0)) for x in r]
    assert model.aux_loss != pytest.approx(sum(per_layer), rel=1e-6)  # pooled, not summed
    model.cfg.router_aux_loss_coef = 0.0
    _, ce = model.forward(ids, targets)
    assert loss == pytest.approx(ce + 0.5 * model.aux_loss, rel=1e-12)


def test_dense_config_keeps_a_swiglu_mlp_and_mixtral_needs_experts():
    dense = Llama(LlamaConfig(**{**TINY, "num_local_experts": 0}))
    assert "layers.0.mlp.gate_proj.weight" in dense.state_dict()
    moe = Llama(LlamaConfig(**TINY))
    assert type(moe) is Mixtral  # a Llama with experts is written as Mixtral
    names = moe.state_dict()
    assert "layers.0.mlp.gate.weight" in names and "layers.1.mlp.experts.3.down_proj.weight" in names
    with pytest.raises(ValueError, match="Mixtral: argument 'cfg' expected num_local_experts >= 1"):
        Mixtral(LlamaConfig(**{**TINY, "num_local_experts": 0}))


@pytest.mark.parametrize("field, value", [("num_local_experts", -1), ("num_experts_per_tok", 5),
                                          ("num_experts_per_tok", 0), ("router_aux_loss_coef", -0.1),
                                          ("capacity_factor", 0.0), ("capacity_factor", float("nan"))])
def test_bad_moe_fields_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"LlamaConfig: argument '{field}'"):
        LlamaConfig(**{**TINY, field: value})


def test_flops_count_k_experts_and_the_router():
    dense = LlamaConfig(**{**TINY, "num_local_experts": 0}).flops_per_token()
    moe = LlamaConfig(**TINY).flops_per_token()
    per_layer = 3 * 8 * 6 + 8 * 4  # k = 2: one more expert's three matrices, and the router
    assert moe - dense == 6 * 2 * per_layer


def test_cached_decoding_equals_uncached_with_experts():
    model, _ = pair(2)
    model.eval()
    prompt = np.array([[1, 2, 3]])
    out = generate(model, prompt, 5, temperature=0)
    seq = prompt
    for _ in range(5):
        logits, _ = model.forward(seq)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)
