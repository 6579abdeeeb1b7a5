"""Llama with experts (Mixtral) against its torch twin: the loss with the pooled load balance and every
gradient at MODEL_RTOL, with and without dropped tokens; config checks; decoding with experts."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.twins.llama import TwinLlama
from kernels.twins.moe import TwinMoE, load_balancing_loss
from npformer.generate import generate
from npformer.models.llama import IGNORE_INDEX, Llama, LlamaConfig, Mixtral
from npformer.ops.moe import capacity_of
from tests.models.helpers import batch, twin_pair
from tests.tolerances import MODEL_RTOL, assert_close

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_kv_head=2, d_model=8, intermediate_size=6,
            num_local_experts=4, num_experts_per_tok=2)


def pair(seed=0, **overrides):
    return twin_pair(Mixtral, TwinLlama, LlamaConfig(**{**TINY, **overrides, "dtype": "float64"}), seed)


def twin_forward(twin, ids, targets):
    """The twin's logits and loss, its pooled load balance over the positions whose target is not ignored
    (MOE.15): the twin's own pools every position, so it runs with coefficient 0 and the masked term is
    added here from its layers' probabilities and selections."""
    coef, twin.router_aux_loss_coef = twin.router_aux_loss_coef, 0.0
    try:
        logits, loss = twin(torch.from_numpy(ids), torch.from_numpy(targets))
    finally:
        twin.router_aux_loss_coef = coef
    kept = torch.from_numpy(targets.reshape(-1) != IGNORE_INDEX)
    moe = [layer.mlp for layer in twin.layers if isinstance(layer.mlp, TwinMoE)]
    if coef and bool(kept.any()):
        probs = torch.cat([m.probs[kept] for m in moe])
        expert = torch.cat([m.expert[kept] for m in moe])
        loss = loss + coef * load_balancing_loss(probs, expert)
    return logits, loss


def compare(model, twin, ids, targets):
    logits, loss = model.forward(ids, targets)
    model.backward()
    t_logits, t_loss = twin_forward(twin, ids, targets)
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
    kept = targets.reshape(-1) != IGNORE_INDEX  # (MOE.15): ignored positions count nowhere
    E, N = model.cfg.num_local_experts, int(kept.sum())
    f = sum(np.bincount(x.expert[kept].reshape(-1), minlength=E) for x in r) / (len(r) * N)
    P = sum(x.probs[kept].sum(axis=0) for x in r) / (len(r) * N)
    assert model.aux_loss == pytest.approx(E * float(f @ P), rel=1e-12)
    per_layer = [E * float(np.bincount(x.expert[kept].reshape(-1), minlength=E) / N @ x.probs[kept].mean(axis=0))
                 for x in r]
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


@pytest.mark.derivation("MOE.15")
@given(seed=st.integers(0, 2**16), pad=st.integers(1, 5))
def test_load_balance_does_not_depend_on_padding_ids(seed, pad):
    """Right padding with ignored targets: the loss (cross entropy + load balance) and every gradient are the
    same whatever ids fill the padding, and the load balance is (MOE.11) over the kept positions alone."""
    model, twin = pair(seed % 5, router_aux_loss_coef=0.3)
    ids, targets = batch(model.cfg, seed=seed)
    targets[:, -pad:] = IGNORE_INDEX
    other = ids.copy()
    other[:, -pad:] = np.random.default_rng(seed + 1).integers(0, model.cfg.vocab_size, (ids.shape[0], pad))
    _, loss = model.forward(ids, targets)
    model.backward()
    grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    aux = model.aux_loss
    model.zero_grad()
    _, loss_other = model.forward(other, targets)
    model.backward()
    assert loss_other == pytest.approx(loss, rel=MODEL_RTOL)
    assert model.aux_loss == pytest.approx(aux, rel=MODEL_RTOL)
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n], rtol=MODEL_RTOL, scale=max(float(np.abs(grads[n]).max()), 1e-12), what=n)
    model.zero_grad()
    compare(model, twin, other, targets)  # and it is the masked twin's


def test_every_target_ignored_gives_no_load_balance():
    model, _ = pair(3, router_aux_loss_coef=0.5)
    ids, _ = batch(model.cfg)
    targets = np.full(ids.shape, IGNORE_INDEX)
    targets[0, 0] = 1
    model.forward(ids, targets)
    assert model.aux_loss > 0
    model.backward()


@pytest.mark.parametrize("field, value", [("capacity_factor", 1.0), ("router_aux_loss_coef", 0.01),
                                          ("num_experts_per_tok", 1)])
def test_moe_fields_without_experts_are_refused_by_name(field, value):
    """A dense model (num_local_experts 0) would ignore them: refused by name."""
    with pytest.raises(ValueError, match=f"LlamaConfig: argument '{field}' expected .* without experts"):
        LlamaConfig(**{**TINY, "num_local_experts": 0, field: value})
    LlamaConfig(**{**TINY, field: value})  # with experts they mean something


def test_capacity_routing_is_non_causal_and_refuses_kv_caches():
    """With a capacity an earlier position's output depends on later tokens and on other rows (the capacity
    counts every token of the call), so a model with one refuses KV caches by name and decodes uncached."""
    model, _ = pair(2, capacity_factor=0.5)
    model.eval()
    assert model.supports_kv_cache is False
    ids, _ = batch(model.cfg, B=2, seed=5)
    full, _ = model.forward(ids)
    head, _ = model.forward(ids[:, :3])
    assert not np.allclose(full[:, :3], head)  # later tokens changed earlier outputs
    alone, _ = model.forward(ids[:1])
    assert not np.allclose(full[:1], alone)  # another row changed this row's outputs
    with pytest.raises(ValueError, match="Llama.make_kv_caches: argument 'self'.*capacity_factor 0.5"):
        model.make_kv_caches(1)
    caches = pair(2)[0].make_kv_caches(1)  # a model without a capacity has them
    with pytest.raises(ValueError, match="Llama.forward: argument 'kv_caches' expected None.*capacity_factor"):
        model.forward(ids[:1, :1], kv_caches=caches)
    prompt = np.array([[1, 2, 3]])
    out = generate(model, prompt, 4, temperature=0)  # recomputes: equals the plain greedy loop
    seq = prompt
    for _ in range(4):
        logits, _ = model.forward(seq)
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)
    assert pair(2)[0].supports_kv_cache is True


@pytest.mark.derivation("MOE.2")
def test_a_zero_router_sends_every_token_to_the_lowest_experts():
    """Exact ties in router probabilities go to the lowest expert indices (MOE.2), in every layer; torch.topk
    documents no order, so such ties may route differently from transformers."""
    model, _ = pair(4, num_experts_per_tok=2)
    for layer in model.layers:
        layer.mlp.gate.weight.data[...] = 0.0
    model.eval()
    ids, _ = batch(model.cfg, seed=2)
    model.forward(ids)
    for layer in model.layers:
        np.testing.assert_array_equal(layer.mlp.routing.expert, np.tile([0, 1], (ids.size, 1)))
        np.testing.assert_array_equal(layer.mlp.routing.gate, np.full((ids.size, 2), 0.5))


def test_capacity_of_is_exact():
    """capacity_of(50, 2, 2, 1.1) = 55, not the 56 of the float product 55.00000000000001."""
    assert 1.1 * 50 * 2 / 2 > 55
    assert capacity_of(50, 2, 2, 1.1) == 55
