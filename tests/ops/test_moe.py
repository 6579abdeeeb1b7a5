"""Mixture of experts: the router (top-k, renormalised gates, capacity), dispatch and combine, the load balance
and the z-loss against torch and finite differences; the equations of proofs/moe.md; the layer ``MoEMLP``
against its torch twin with dropped tokens; bad input."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.twins.moe import TwinMoE, load_balancing_loss, route
from npformer import gradcheck
from npformer.nn.moe import MoEMLP
from npformer.ops.moe import (Routing, gradcheck_cases, load_balancing_loss_backward, load_balancing_loss_forward,
                              moe_combine_backward, moe_combine_forward, moe_dispatch_backward, moe_dispatch_forward,
                              capacity_of, ceil_of_decimal_product, moe_router_backward, moe_router_forward,
                              router_z_loss_backward, router_z_loss_forward, top_k_experts)
from tests.badinput import BAD_COUNTS, BAD_FLAGS, NON_ARRAYS, corrupt, expect_rejected
from tests.strategies import DTYPES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, MODEL_RTOL, RTOL, assert_close

CAPACITIES = st.sampled_from([None, 0.1, 0.5, 1.0, 1.25, 3.0])  # 0.1: most assignments dropped


@st.composite
def routings(draw, dtypes=DTYPES):
    """(logits, k, normalize, capacity): N tokens over E experts, k <= E, logits of several scales."""
    N, E = draw(st.sampled_from([0, 1, 2, 5, 9])), draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    rng = draw(rngs())
    logits = randn(rng, (N, E), draw(dtypes), draw(st.sampled_from([0.1, 1.0, 5.0])))
    return logits, k, draw(st.booleans()), draw(CAPACITIES)


def torch_route(logits, k, normalize, capacity):
    r = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    probs, expert, gate, kept = route(r, k, normalize, capacity)
    return r, probs, expert, gate, kept


# -- the router ---------------------------------------------------------------------------------------
@pytest.mark.derivation("MOE.1")
@pytest.mark.derivation("MOE.2")
@pytest.mark.derivation("MOE.3a")
@pytest.mark.derivation("MOE.3b")
@given(routings(), layouts())
def test_router_forward_matches_torch(case, layout):
    logits, k, normalize, capacity = case
    route_np, _ = moe_router_forward(in_layout(logits, layout), k, normalize, capacity)
    _, probs, expert, gate, kept = torch_route(logits, k, normalize, capacity)
    assert_close(route_np.probs, probs.detach().numpy(), what="probs")
    np.testing.assert_array_equal(route_np.expert, expert.numpy())
    assert_close(route_np.gate, gate.detach().numpy(), what="gate")
    np.testing.assert_array_equal(route_np.kept, kept.numpy())
    assert route_np.gate.dtype == logits.dtype and route_np.probs.dtype == logits.dtype
    if normalize and logits.shape[0]:
        assert_close(route_np.gate.sum(axis=1), np.ones(logits.shape[0]), what="renormalised gates sum to 1")


@pytest.mark.derivation("MOE.2")
def test_ties_go_to_the_lowest_expert():
    """Equal probabilities: the lowest index first (a stable sort), whatever torch.topk does on this machine."""
    p = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3], [0.2, 0.4, 0.4, 0.0]])
    np.testing.assert_array_equal(top_k_experts(p, 2), [[0, 1], [1, 2], [1, 2]])
    route_np, _ = moe_router_forward(np.zeros((3, 5)), 3)
    np.testing.assert_array_equal(route_np.expert, [[0, 1, 2]] * 3)
    ours = torch.sort(torch.tensor(p), dim=-1, descending=True, stable=True).indices[:, :2].numpy()
    np.testing.assert_array_equal(top_k_experts(p, 2), ours)  # the twins' rule is this one


@pytest.mark.derivation("MOE.3b")
@given(routings(dtypes=st.just(np.float64)))
def test_renormalised_gates_are_a_softmax_of_the_selected_logits(case):
    logits, k, _, _ = case
    route_np, _ = moe_router_forward(logits, k, True)
    sel = np.take_along_axis(logits, route_np.expert, axis=1)
    e = np.exp(sel - sel.max(axis=1, keepdims=True)) if sel.size else sel
    assert_close(route_np.gate, e / e.sum(axis=1, keepdims=True) if sel.size else e, what="(MOE.3b)")


@pytest.mark.derivation("MOE.4")
@given(routings(dtypes=st.just(np.float64)))
def test_capacity_keeps_each_experts_first_tokens(case):
    """C = ceil(c N k / E); an assignment is kept iff fewer than C earlier tokens chose its expert."""
    logits, k, normalize, capacity = case
    route_np, _ = moe_router_forward(logits, k, normalize, capacity)
    N, E = logits.shape
    C = None if capacity is None else math.ceil(capacity * N * k / E)
    assert route_np.capacity == C
    for n in range(N):
        for j in range(k):
            e = route_np.expert[n, j]
            q = sum(e in route_np.expert[m] for m in range(n))
            assert route_np.position[n, j] == q
            assert route_np.kept[n, j] == (C is None or q < C)
    counts = np.bincount(route_np.expert[route_np.kept], minlength=E)
    np.testing.assert_array_equal(route_np.counts, counts)
    assert C is None or counts.max(initial=0) <= C
    # the dispatch lists each expert's kept tokens in token order
    for e in range(E):
        group = slice(route_np.offsets[e], route_np.offsets[e + 1])
        toks, choices = route_np.token[group], route_np.choice[group]
        assert list(toks) == sorted(toks) and all(route_np.expert[t, j] == e for t, j in zip(toks, choices))


@pytest.mark.derivation("MOE.6")
@pytest.mark.derivation("MOE.7")
@given(routings(), rngs(), st.booleans())
def test_router_backward_matches_torch(case, rng, with_dprobs):
    logits, k, normalize, capacity = case
    route_np, cache = moe_router_forward(logits, k, normalize, capacity)
    dgate = randn(rng, route_np.gate.shape, logits.dtype)
    dprobs = randn(rng, logits.shape, logits.dtype) if with_dprobs else None
    dlogits = moe_router_backward(dgate, cache, dprobs)
    r, probs, _, gate, _ = torch_route(logits, k, normalize, capacity)
    objective = (gate * torch.from_numpy(dgate.astype(np.float64))).sum()
    if with_dprobs:
        objective = objective + (probs * torch.from_numpy(dprobs.astype(np.float64))).sum()
    objective.backward()
    assert dlogits.dtype == logits.dtype
    scale = float(np.abs(r.grad.numpy()).max(initial=0.0)) + (1.0 if logits.dtype == np.float32 else 1e-12)
    assert_close(dlogits, r.grad.numpy(), scale=scale, what="dlogits")


@pytest.mark.derivation("MOE.6")
@pytest.mark.derivation("MOE.7")
@given(routings(dtypes=st.just(np.float64)), rngs())
def test_router_backward_equations(case, rng):
    """(MOE.6) and (MOE.7) evaluated as written, row by row, against the op."""
    logits, k, normalize, _ = case
    route_np, cache = moe_router_forward(logits, k, normalize)
    dgate = rng.standard_normal(route_np.gate.shape)
    dlogits = moe_router_backward(dgate, cache)
    p, g, sel = route_np.probs, route_np.gate, route_np.expert
    want = np.zeros_like(logits)
    for n in range(logits.shape[0]):
        if normalize:  # (MOE.7): the softmax Jacobian of the selected logits only
            inner = sum(dgate[n, j] * g[n, j] for j in range(k))
            for i in range(k):
                want[n, sel[n, i]] = g[n, i] * (dgate[n, i] - inner)
        else:  # (MOE.6): scatter onto p, then (SM.3)
            dp = np.zeros(logits.shape[1])
            for j in range(k):
                dp[sel[n, j]] += dgate[n, j]
            want[n] = p[n] * (dp - dp @ p[n])
    assert_close(dlogits, want, what="router backward")


@pytest.mark.derivation("MOE.6")
@pytest.mark.derivation("MOE.7")
def test_router_finite_differences():
    """The gates (plain and renormalised), the z-loss, dispatch, combine (ys and gates, some assignments
    dropped) and the masked balance loss by central differences (``python -m npformer.gradcheck moe``)."""
    results = [r for case in gradcheck_cases(np.random.default_rng(0)) for r in gradcheck.check_case(case)]
    assert len(results) == 7 and all(r.max_rel < FD_RTOL for r in results), results


# -- dispatch and combine --------------------------------------------------------------------------------
@pytest.mark.derivation("MOE.8")
@pytest.mark.derivation("MOE.9")
@pytest.mark.derivation("MOE.10")
@given(routings(), rngs(), st.integers(1, 4))
def test_dispatch_and_combine_match_torch(case, rng, D):
    """y = sum_kept g * (xs scaled per expert): gathered, transformed, combined; gradients for x, ys and gate."""
    logits, k, normalize, capacity = case
    dtype = logits.dtype
    route_np, _ = moe_router_forward(logits, k, normalize, capacity)
    N, E = logits.shape
    x = randn(rng, (N, D), dtype)
    scale_e = randn(rng, (E,), dtype)  # a stand-in expert: F_e(x) = scale_e * x
    xs, dcache = moe_dispatch_forward(x, route_np)
    expert_of = np.repeat(np.arange(E), route_np.counts)
    ys = xs * scale_e[expert_of][:, None]
    y, ccache = moe_combine_forward(ys, route_np.gate, route_np)
    dy = randn(rng, (N, D), dtype)
    dys, dgate = moe_combine_backward(dy, ccache)
    dx = moe_dispatch_backward(dys * scale_e[expert_of][:, None], dcache)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor(route_np.gate, dtype=torch.float64, requires_grad=True)
    yt = torch.zeros(N, D, dtype=torch.float64)
    for n in range(N):
        for j in range(k):
            if route_np.kept[n, j]:
                yt[n] = yt[n] + gt[n, j] * float(scale_e[route_np.expert[n, j]]) * xt[n]
    objective = (yt * torch.from_numpy(dy.astype(np.float64))).sum() + 0 * (xt.sum() + gt.sum())  # N = 0: a graph still
    objective.backward()
    assert xs.shape == (int(route_np.kept.sum()), D) and y.dtype == dtype
    assert_close(y, yt.detach().numpy(), what="y (MOE.9)")
    assert_close(dx, xt.grad.numpy(), scale=float(np.abs(xt.grad.numpy()).max(initial=0)) + 1e-6, what="dx (MOE.8)")
    assert_close(dgate, gt.grad.numpy(), scale=float(np.abs(gt.grad.numpy()).max(initial=0)) + 1e-6,
                 what="dgate (MOE.10)")
    assert not dgate[~route_np.kept].any()  # a dropped assignment's gate has no gradient
    assert not y[~route_np.kept.any(axis=1)].any()  # a token with nothing kept gets 0


# -- the auxiliary losses ---------------------------------------------------------------------------------
@pytest.mark.derivation("MOE.11")
@pytest.mark.derivation("MOE.13")
@given(routings(), rngs())
def test_load_balance_matches_torch_and_formula(case, rng):
    logits, k, normalize, capacity = case
    if logits.shape[0] == 0:
        logits = randn(rng, (3, logits.shape[1]), logits.dtype)
    route_np, _ = moe_router_forward(logits, k, normalize, capacity)
    aux, cache = load_balancing_loss_forward(route_np.probs, route_np.expert)
    dprobs = load_balancing_loss_backward(np.asarray(0.7, logits.dtype), cache)
    N, E = logits.shape
    f = np.bincount(route_np.expert.ravel(), minlength=E) / N
    assert_close(aux, E * np.sum(f * route_np.probs.astype(np.float64).mean(axis=0)), what="(MOE.11)")
    assert_close(dprobs, np.tile(0.7 * E * f / N, (N, 1)), what="(MOE.13)")
    p = torch.tensor(route_np.probs, dtype=torch.float64, requires_grad=True)
    (0.7 * load_balancing_loss(p, torch.from_numpy(route_np.expert))).backward()
    assert_close(dprobs, p.grad.numpy(), what="torch")
    assert aux.dtype == logits.dtype and dprobs.dtype == logits.dtype


def test_load_balance_of_a_uniform_router_is_k():
    probs = np.full((6, 3), 1 / 3)
    aux, _ = load_balancing_loss_forward(probs, np.array([[0, 1], [1, 2], [2, 0]] * 2))
    assert aux == pytest.approx(2.0, rel=1e-15)


@pytest.mark.derivation("MOE.12")
@pytest.mark.derivation("MOE.14")
@given(routings(), rngs())
def test_z_loss_matches_torch(case, rng):
    logits = case[0]
    if logits.shape[0] == 0:
        logits = randn(rng, (2, logits.shape[1]), logits.dtype)
    z, cache = router_z_loss_forward(logits)
    dlogits = router_z_loss_backward(np.asarray(1.5, logits.dtype), cache)
    r = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    zt = torch.mean(torch.logsumexp(r, dim=-1) ** 2)
    (1.5 * zt).backward()
    assert_close(z, zt.item(), what="(MOE.12)")
    assert_close(dlogits, r.grad.numpy(), scale=float(np.abs(r.grad.numpy()).max()) + 1e-12, what="(MOE.14)")


# -- the layer --------------------------------------------------------------------------------------------
def layer_pair(E, k, capacity, expert, coefs, seed, jitter=0.0, dtype=np.float64):
    D, H = 5, 7
    ours = MoEMLP(D, H, E, k, capacity, expert, jitter, *coefs, rng=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for _, p in ours.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * 0.6
    twin = TwinMoE(D, H, E, k, capacity, expert, *coefs).double()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(torch.from_numpy(dict(ours.named_parameters())[name].data.astype(np.float64)))
    return ours, twin


@pytest.mark.derivation("MOE.5")
@given(E=st.integers(1, 5), k=st.integers(1, 3), capacity=CAPACITIES, expert=st.sampled_from(["swiglu", "gelu"]),
       coefs=st.sampled_from([(0.0, 0.0), (0.3, 0.0), (0.05, 0.2)]), jitter=st.sampled_from([0.0, 0.2]),
       shape=st.sampled_from([(1, 1), (2, 3), (3, 5), (9,)]), seed=st.integers(0, 1000))
def test_layer_matches_the_twin(E, k, capacity, expert, coefs, jitter, shape, seed):
    """Output, auxiliary losses and every gradient (x, router, each expert) at MODEL_RTOL, tokens dropped or not."""
    k = min(k, E)
    ours, twin = layer_pair(E, k, capacity, expert, coefs, seed, jitter)
    rng = np.random.default_rng(seed + 2)
    x, dy = rng.standard_normal(shape + (5,)), rng.standard_normal(shape + (5,))
    rec = ours.start_recording()
    y = ours.forward(x)
    dx = ours.backward(dy)
    noise = torch.from_numpy(rec["jitter"]) if jitter else None  # the twin multiplies by the same noise
    assert ("jitter" in rec) == bool(jitter)
    xt = torch.tensor(x, requires_grad=True)
    yt = twin(xt, noise)
    ((yt * torch.from_numpy(dy)).sum() + twin.loss).backward()
    assert_close(y, yt.detach().numpy(), rtol=MODEL_RTOL, what="y")
    assert ours.loss == pytest.approx(twin.loss.item(), rel=MODEL_RTOL, abs=1e-15)
    assert_close(dx, xt.grad.numpy(), rtol=MODEL_RTOL, what="dx")
    grads = {n: p.grad for n, p in twin.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    for name, p in ours.named_parameters():
        g = grads[name]
        want = np.zeros(p.shape) if g is None else g.numpy()  # an expert no token reached has no torch gradient
        assert_close(p.grad, want, rtol=MODEL_RTOL, scale=max(float(np.abs(want).max()), 1e-6 * scale),
                     what=f"d{name}")
    if capacity == 0.1 and x.size // 5 * k > E:
        assert not ours.routing.kept.all()  # heavy dropping happened


@pytest.mark.derivation("MOE.5")
@pytest.mark.parametrize("k, capacity, expert", [(1, None, "gelu"), (2, 0.5, "swiglu"), (3, 1.0, "swiglu")])
def test_layer_finite_differences(k, capacity, expert):
    """dx and the router's gradient by central differences (float64), dropped tokens included."""
    ours, _ = layer_pair(4, k, capacity, expert, (0.2, 0.1), 3)
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((2, 4, 5)), rng.standard_normal((2, 4, 5))
    ours.forward(x)
    dx = ours.backward(dy)

    def objective():
        ours.eval()
        value = float(np.sum(ours.forward(x) * dy)) + ours.loss
        ours.train()
        return value

    assert_close(dx, gradcheck.numerical_gradient(objective, x), rtol=FD_RTOL, what="dx")
    W = ours.gate.weight
    assert_close(W.grad, gradcheck.numerical_gradient(objective, W.data), rtol=FD_RTOL, what="dgate.weight")


def test_float32_layer_follows_float64():
    ours64, _ = layer_pair(3, 2, 1.0, "swiglu", (0.1, 0.1), 8)
    ours32 = MoEMLP(5, 7, 3, 2, 1.0, "swiglu", 0.0, 0.1, 0.1, rng=np.random.default_rng(0), dtype=np.float32)
    ours32.load_state_dict(ours64.state_dict(), cast=True)
    x = np.random.default_rng(1).standard_normal((4, 5))
    y32, y64 = ours32.forward(x.astype(np.float32)), ours64.forward(x)
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(ours32.routing.expert, ours64.routing.expert)
    assert_close(y32, y64, rtol=RTOL[np.dtype(np.float32)], what="float32")
    dx = ours32.backward(np.ones_like(y32))
    assert dx.dtype == np.float32


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", NON_ARRAYS + ("int64", "rank+1", "rank-1"))
def test_router_rejects_bad_logits(kind):
    expect_rejected(lambda: moe_router_forward(corrupt(np.zeros((3, 4)), kind), 2), "moe_router_forward", "logits")


@pytest.mark.parametrize("bad", BAD_COUNTS + (0, 5))
def test_router_rejects_bad_top_k(bad):
    expect_rejected(lambda: moe_router_forward(np.zeros((3, 4)), bad), "moe_router_forward", "top_k")


@pytest.mark.parametrize("bad", (0.0, -1.0, np.nan, np.inf, "1", True))
def test_router_rejects_bad_capacity(bad):
    expect_rejected(lambda: moe_router_forward(np.zeros((3, 4)), 1, capacity_factor=bad), "moe_router_forward",
                    "capacity_factor")


@pytest.mark.parametrize("bad", BAD_FLAGS)
def test_router_rejects_bad_normalize(bad):
    expect_rejected(lambda: moe_router_forward(np.zeros((3, 4)), 1, bad), "moe_router_forward", "normalize_topk")


def test_backwards_reject_bad_gradients_and_caches():
    route_np, cache = moe_router_forward(np.zeros((3, 4)), 2)
    for kind in ("list", "float32", "last+1", "rank+1"):
        bad = np.zeros((3, 2), np.float32) if kind == "float32" else corrupt(np.zeros((3, 2)), kind)
        expect_rejected(lambda: moe_router_backward(bad, cache), "moe_router_backward", "dgate")
    expect_rejected(lambda: moe_router_backward(np.zeros((3, 2)), cache, np.zeros((3, 5))), "moe_router_backward",
                    "dprobs")
    expect_rejected(lambda: moe_router_backward(np.zeros((3, 2)), None), "moe_router_backward", "cache")
    expect_rejected(lambda: moe_dispatch_forward(np.zeros((4, 2)), route_np), "moe_dispatch_forward", "x")
    expect_rejected(lambda: moe_dispatch_forward(np.zeros((3, 2)), "route"), "moe_dispatch_forward", "route")
    xs, dcache = moe_dispatch_forward(np.zeros((3, 2)), route_np)
    expect_rejected(lambda: moe_dispatch_backward(np.zeros((xs.shape[0], 3)), dcache), "moe_dispatch_backward", "dxs")
    expect_rejected(lambda: moe_combine_forward(xs, np.zeros((3, 3)), route_np), "moe_combine_forward", "gate")
    expect_rejected(lambda: moe_combine_forward(xs[:1], route_np.gate, route_np), "moe_combine_forward", "ys")
    _, ccache = moe_combine_forward(xs, route_np.gate, route_np)
    expect_rejected(lambda: moe_combine_backward(np.zeros((2, 2)), ccache), "moe_combine_backward", "dy")
    expect_rejected(lambda: load_balancing_loss_forward(route_np.probs, route_np.expert + 4),
                    "load_balancing_loss_forward", "expert")
    expect_rejected(lambda: load_balancing_loss_forward(route_np.probs, route_np.expert.astype(float)),
                    "load_balancing_loss_forward", "expert")
    _, acache = load_balancing_loss_forward(route_np.probs, route_np.expert)
    expect_rejected(lambda: load_balancing_loss_backward(np.zeros(2), acache), "load_balancing_loss_backward", "daux")
    expect_rejected(lambda: router_z_loss_forward(np.zeros((0, 3))), "router_z_loss_forward", "logits")
    _, zcache = router_z_loss_forward(np.zeros((2, 3)))
    expect_rejected(lambda: router_z_loss_backward(np.float64(np.nan), zcache), "router_z_loss_backward", "dz")
    assert isinstance(route_np, Routing)


@pytest.mark.parametrize("arg, value", [("n_experts", 0), ("top_k", 4), ("expert", "relu"), ("capacity_factor", 0.0),
                                        ("router_jitter", 1.0), ("aux_loss_coef", -1.0), ("normalize_topk", 1)])
def test_layer_rejects_bad_options(arg, value):
    kwargs = dict(d_model=4, d_hidden=3, n_experts=3, top_k=2, rng=np.random.default_rng(0))
    kwargs[arg] = value
    expect_rejected(lambda: MoEMLP(**kwargs), "MoEMLP", arg)


def test_layer_backward_rejects_bad_dprobs_and_keeps_its_cache():
    layer = MoEMLP(4, 3, 3, rng=np.random.default_rng(0), dtype=np.float64)
    x = np.ones((2, 4))
    layer.forward(x)
    expect_rejected(lambda: layer.backward(np.ones((2, 4)), np.zeros((3, 3))), "MoEMLP.backward", "dprobs")
    assert layer.pending_backwards == 1
    expect_rejected(lambda: layer.forward(np.ones((2, 5))), "MoEMLP.forward", "x")


@pytest.mark.derivation("MOE.15")
@pytest.mark.derivation("MOE.16")
@given(routings(), rngs())
def test_masked_load_balance_is_the_mean_over_kept_tokens(case, rng):
    """(MOE.15): f and P over the kept rows alone, equal to the unmasked loss of those rows; (MOE.16): the gradient
    E f_e / M in a kept row, 0 in a masked one, and torch's through the kept rows."""
    logits, k, normalize, capacity = case
    if logits.shape[0] == 0:
        logits = randn(rng, (3, logits.shape[1]), logits.dtype)
    route_np, _ = moe_router_forward(logits, k, normalize, capacity)
    N, E = logits.shape
    mask = rng.random(N) < 0.6
    mask[rng.integers(N)] = True
    aux, cache = load_balancing_loss_forward(route_np.probs, route_np.expert, mask)
    dprobs = load_balancing_loss_backward(np.asarray(0.7, logits.dtype), cache)
    M = mask.sum()
    f = np.bincount(route_np.expert[mask].ravel(), minlength=E) / M
    P = route_np.probs[mask].astype(np.float64).sum(axis=0) / M
    assert_close(aux, E * np.sum(f * P), what="(MOE.15)")
    assert_close(dprobs, mask[:, None] * (0.7 * E * f / M)[None, :], what="(MOE.16)")
    kept_aux, _ = load_balancing_loss_forward(route_np.probs[mask], route_np.expert[mask])
    assert_close(aux, kept_aux, what="the kept rows' plain loss")
    p = torch.tensor(route_np.probs, dtype=torch.float64, requires_grad=True)
    (0.7 * load_balancing_loss(p[torch.from_numpy(mask)], torch.from_numpy(route_np.expert[mask]))).backward()
    assert_close(dprobs, p.grad.numpy(), what="torch")
    assert aux.dtype == logits.dtype and dprobs.dtype == logits.dtype
    # the masked rows' values change nothing
    probs2 = route_np.probs.copy()
    probs2[~mask] = np.roll(probs2[~mask], 1, axis=1)
    expert2 = route_np.expert.copy()
    expert2[~mask] = (expert2[~mask] + 1) % E if E > k else expert2[~mask]
    assert load_balancing_loss_forward(probs2, expert2, mask)[0] == aux
    everything, _ = load_balancing_loss_forward(route_np.probs, route_np.expert, np.ones(N, bool))
    assert_close(everything, load_balancing_loss_forward(route_np.probs, route_np.expert)[0], what="all kept")


def test_masked_load_balance_with_nothing_kept_is_zero():
    probs = np.full((4, 3), 1 / 3)
    aux, cache = load_balancing_loss_forward(probs, np.zeros((4, 1), np.int64), np.zeros(4, bool))
    assert aux == 0.0
    assert not load_balancing_loss_backward(1.0, cache).any()


@pytest.mark.parametrize("bad", [np.ones(3, bool), np.ones(4), [True] * 4, np.ones((4, 1), bool)])
def test_load_balance_rejects_bad_masks(bad):
    expect_rejected(lambda: load_balancing_loss_forward(np.full((4, 3), 1 / 3), np.zeros((4, 1), np.int64), bad),
                    "load_balancing_loss_forward", "mask")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_router_rejects_non_finite_logits(bad):
    logits = np.zeros((3, 4))
    logits[1, 2] = bad
    with pytest.raises(ValueError, match="moe_router_forward: argument 'logits' expected finite"):
        moe_router_forward(logits, 2)


@pytest.mark.derivation("MOE.4")
def test_capacity_is_the_exact_ceil_of_the_printed_decimal():
    """C = ceil(c N k / E) with c read as the decimal it prints as, over a sweep of factors and sizes; the float
    product overshoots an exact integer (1.1 * 50 * 2 / 2 = 55.00000000000001)."""
    assert capacity_of(50, 2, 2, 1.1) == 55
    assert ceil_of_decimal_product(0.55, 100) == 55
    overshoots = 0
    for hundredths in range(1, 401):
        c = hundredths / 100
        for N, k, E in [(100, 1, 1), (50, 2, 2), (7, 3, 5), (1000, 2, 8), (33, 1, 3)]:
            exact = Fraction(str(c)) * N * k / E
            expected = math.ceil(exact)
            assert capacity_of(N, k, E, c) == expected, (c, N, k, E)
            overshoots += math.ceil(c * N * k / E) != expected
    assert overshoots > 0  # the sweep meets the float product's overshoot
    assert capacity_of(10, 1, 4, None) is None
