"""Optimizers, parameter groups, clipping, accumulation and schedules against torch.optim."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import checkpoint
from npformer.nn.module import Module, ModuleList, Parameter
from npformer.optim import (SGD, Adam, AdamW, accumulate_gradients, classify, clip_grad_norm_, constant, grad_norm,
                            linear_decay, param_groups, scale_grads_, warmup_cosine)
from tests.badinput import expect_rejected
from tests.strategies import DTYPES, rngs, shapes
from tests.tolerances import RTOL, assert_close

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,)]
STEPS = 10

# (npformer class, torch class, options): momentum / Nesterov / dampening / weight-decay variants.
CONFIGS = [
    (SGD, torch.optim.SGD, dict(lr=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    (Adam, torch.optim.Adam, dict(lr=1e-2)),
    (Adam, torch.optim.Adam, dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2)),
    (AdamW, torch.optim.AdamW, dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
]
IDS = [f"{c[0].__name__}-{i}" for i, c in enumerate(CONFIGS)]


def make_params(rng, dtype=np.float64):
    ours = [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]
    theirs = [torch.tensor(p.data.astype(np.float64), requires_grad=True) for p in ours]
    return ours, theirs


def set_grads(rng, ours, theirs, scale=1.0):
    for p, t in zip(ours, theirs):
        g = np.asarray(rng.standard_normal(p.shape) * scale)  # 0-d stays an array
        p.grad[...] = g
        t.grad = torch.from_numpy(g.copy())


def grouped(params, lr_scale=1.0):
    """Two groups with their own lr / weight decay overriding some defaults."""
    return [{"params": params[:2], "lr": 0.02 * lr_scale, "weight_decay": 0.05}, {"params": params[2:]}]


def assert_params_close(ours, theirs, what):
    for i, (p, t) in enumerate(zip(ours, theirs)):
        assert_close(p.data, t.detach().numpy(), what=f"{what}: param {i}")


@pytest.mark.parametrize("ours_cls, torch_cls, options", CONFIGS, ids=IDS)
@given(rng=rngs(), groups=st.booleans())
def test_matches_torch_over_ten_steps(ours_cls, torch_cls, options, rng, groups):
    ours, theirs = make_params(rng)
    if groups:
        opt, topt = ours_cls(grouped(ours), **options), torch_cls(grouped(theirs), **options)
    else:
        opt, topt = ours_cls(ours, **options), torch_cls(theirs, **options)
    for step in range(STEPS):
        set_grads(rng, ours, theirs)
        opt.step()
        topt.step()
        assert_params_close(ours, theirs, f"step {step}")
    for p in ours:
        assert p.data.dtype == np.float64


@given(rng=rngs())
def test_lr_set_per_step_reaches_the_update(rng):
    """The trainer's pattern: group["lr"] = schedule(step) before each step, same as torch."""
    ours, theirs = make_params(rng)
    opt = AdamW(grouped(ours), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    topt = torch.optim.AdamW(grouped(theirs), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = warmup_cosine(3e-2, 3e-3, 3, STEPS)
    for step in range(STEPS):
        for g, tg in zip(opt.param_groups, topt.param_groups):
            g["lr"] = tg["lr"] = schedule(step)
        set_grads(rng, ours, theirs)
        opt.step()
        topt.step()
    assert_params_close(ours, theirs, "after 10 scheduled steps")


@pytest.mark.parametrize("ours_cls, torch_cls, options", [CONFIGS[3], CONFIGS[7]], ids=[IDS[3], IDS[7]])
@given(rng=rngs())
def test_float32_stays_float32_and_in_place(ours_cls, torch_cls, options, rng):
    ours, theirs = make_params(rng, np.float32)
    arrays = [p.data for p in ours]
    opt, topt = ours_cls(ours, **options), torch_cls(theirs, **options)
    for _ in range(STEPS):
        set_grads(rng, ours, theirs)
        opt.step()
        topt.step()
    for p, a, t in zip(ours, arrays, theirs):
        assert p.data is a and p.data.dtype == np.float32 and p.grad.dtype == np.float32
        assert_close(p.data, t.detach().numpy(), what="float32 against the float64 oracle")
    for state in opt.state.values():
        assert all(v.dtype == np.float32 for v in state.values() if isinstance(v, np.ndarray))


def test_grad_is_not_modified_by_l2_decay():
    rng = np.random.default_rng(0)
    ours, _ = make_params(rng)
    for cls in (SGD, Adam):
        for p in ours:
            p.grad[...] = 1.0
        cls(ours, lr=0.1, weight_decay=0.5).step()
        assert all(np.all(p.grad == 1.0) for p in ours)


# -- state dicts -----------------------------------------------------------------------------

def run(opt, params, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad[...] = gi
        opt.step()


@pytest.mark.parametrize("make", [
    lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: Adam(ps, lr=1e-2, weight_decay=0.01),
    lambda ps: AdamW(grouped(ps), lr=1e-2, betas=(0.9, 0.95)),
], ids=["SGD", "Adam", "AdamW-groups"])
@pytest.mark.parametrize("suffix", ["npz", "safetensors"])
def test_state_dict_round_trip_through_checkpoint(make, suffix, tmp_path):
    rng = np.random.default_rng(1)
    params, _ = make_params(rng)
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(8)]
    opt = make(params)
    run(opt, params, grads[:4])
    opt.param_groups[0]["lr"] = 0.007  # a hyperparameter changed mid-run comes back too
    path = checkpoint.save(tmp_path / f"opt.{suffix}", {"optim": opt.state_dict(),
                                                         "params": [p.data.copy() for p in params]})
    saved = checkpoint.load(path)

    fresh = [Parameter(a) for a in saved["params"]]
    restored = make(fresh)
    restored.load_state_dict(saved["optim"])
    assert restored.param_groups[0]["lr"] == 0.007
    run(opt, params, grads[4:])
    run(restored, fresh, grads[4:])
    for p, q in zip(params, fresh):
        np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_is_a_snapshot_and_plain_values():
    rng = np.random.default_rng(2)
    params, _ = make_params(rng)
    opt = AdamW(params, lr=1e-2)
    run(opt, params, [[np.ones(p.shape) for p in params]])
    sd = opt.state_dict()
    before = sd["state"]["0"]["exp_avg"].copy()
    run(opt, params, [[np.ones(p.shape) for p in params]])
    np.testing.assert_array_equal(sd["state"]["0"]["exp_avg"], before)
    assert sd["state"]["0"]["step"] == 1 and sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["param_groups"][0]["betas"] == [0.9, 0.999]


def test_load_state_dict_rejects_other_layouts():
    rng = np.random.default_rng(3)
    params, _ = make_params(rng)
    opt = AdamW(grouped(params))
    run(opt, params, [[np.ones(p.shape) for p in params]])
    with pytest.raises(ValueError, match="expected 1 parameter groups, got 2"):
        AdamW(params).load_state_dict(opt.state_dict())
    other = [Parameter(np.zeros((4, 3))), params[1], params[2], params[3]]
    with pytest.raises(ValueError, match=r"state of parameter 0: 'exp_avg' expected shape \(4, 3\), got \(3, 4\)"):
        AdamW(grouped(other)).load_state_dict(opt.state_dict())


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda ps: AdamW(ps, lr=-1.0), "AdamW: argument 'lr' expected a finite real number in [0.0, inf), got -1.0"),
    (lambda ps: Adam(ps, betas=(0.9, 1.0)), "Adam: argument 'betas' expected a finite real number in [0.0, 1.0), "
                                            "got 1.0"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "SGD: argument 'nesterov' expected momentum > 0"),
    (lambda ps: SGD(ps + ps[:1], lr=0.1), "expected each Parameter in one group once"),
    (lambda ps: SGD([], lr=0.1), "SGD: argument 'params' expected a non-empty list"),
    (lambda ps: SGD([ps[0].data], lr=0.1), "SGD: argument 'params', group 0, expected Parameter entries, "
                                           "got ndarray at position 0"),
    (lambda ps: AdamW([{"params": ps, "weight_decay": -0.1}]), "AdamW (group 0): argument 'weight_decay' expected"),
])
def test_bad_hyperparameters_are_named(build, message):
    params, _ = make_params(np.random.default_rng(0))
    with pytest.raises((ValueError, TypeError)) as err:
        build(params)
    assert message in str(err.value)


def test_zero_grad_zeroes_only_its_params():
    params, _ = make_params(np.random.default_rng(0))
    for p in params:
        p.grad[...] = 1.0
    SGD(params[:2], lr=0.1).zero_grad()
    assert [float(np.abs(p.grad).sum()) for p in params] == [0.0, 0.0, 12.0, 1.0]


# -- gradient clipping -----------------------------------------------------------------------

@given(rng=rngs(), dtype=DTYPES, max_norm=st.sampled_from([1e-3, 0.5, 3.0, 1e3]))
def test_clip_grad_norm_matches_torch(rng, dtype, max_norm):
    ours, _ = make_params(rng, dtype)
    theirs = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in ours]
    set_grads(rng, ours, theirs, scale=float(rng.choice([1e-3, 1.0, 1e2])))
    total = clip_grad_norm_(ours, max_norm)
    expected = float(torch.nn.utils.clip_grad_norm_(theirs, max_norm))
    assert isinstance(total, float)
    assert_close(np.asarray(total, dtype), expected, what="total norm")
    for p, t in zip(ours, theirs):
        assert p.grad.dtype == dtype
        assert_close(p.grad, t.grad.numpy(), what="clipped grad")
    assert grad_norm(ours) <= max_norm * (1 + RTOL[np.dtype(dtype)]) or total <= max_norm


def test_clip_leaves_small_gradients_alone():
    p = Parameter(np.zeros(4))
    p.grad[...] = [0.1, -0.2, 0.0, 0.2]
    assert clip_grad_norm_(p, 1.0) == pytest.approx(0.3, rel=RTOL[np.dtype(np.float64)])
    np.testing.assert_array_equal(p.grad, [0.1, -0.2, 0.0, 0.2])


# -- parameter groups ------------------------------------------------------------------------

class Embedding(Module):
    def __init__(self, v, d):
        super().__init__()
        self.weight = Parameter(np.ones((v, d)))


class RMSNorm(Module):
    def __init__(self, d):
        super().__init__()
        self.weight = Parameter(np.ones(d))


class Linear(Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = Parameter(np.ones((d_out, d_in)))
        self.bias = Parameter(np.zeros(d_out))


class Attention(Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = Parameter(np.ones((3 * d, d)))
        self.qkv_bias = Parameter(np.zeros(3 * d))
        self.gate = Parameter(np.ones(1))  # a learned scalar gate: a "vector"


class Toy(Module):
    def __init__(self, d=4, v=7):
        super().__init__()
        self.wte = Embedding(v, d)
        self.embed_positions = Parameter(np.ones((5, d)))  # an embedding by name, not by module type
        self.blocks = ModuleList([Attention(d), Linear(d, d)])
        self.norm = RMSNorm(d)
        self.head = Linear(d, v)
        self.head.weight = self.wte.weight  # tied: classified where it is first reached (the embedding)


def test_classify_kinds():
    assert classify(Toy()) == {
        "embed_positions": "embedding",
        "wte.weight": "embedding",
        "blocks.0.qkv": "matrix",
        "blocks.0.qkv_bias": "bias",
        "blocks.0.gate": "vector",
        "blocks.1.weight": "matrix",
        "blocks.1.bias": "bias",
        "norm.weight": "norm",
        "head.bias": "bias",
    }


def test_param_groups_exempt_norms_biases_embeddings():
    model = Toy()
    decay, exempt = param_groups(model, 0.1)
    assert decay["names"] == ["blocks.0.qkv", "blocks.1.weight"] and decay["weight_decay"] == 0.1
    assert exempt["names"] == ["embed_positions", "wte.weight", "blocks.0.qkv_bias", "blocks.0.gate",
                               "blocks.1.bias", "norm.weight", "head.bias"]
    assert exempt["weight_decay"] == 0.0
    params = dict(model.named_parameters())
    assert [id(p) for p in decay["params"]] == [id(params[n]) for n in decay["names"]]
    assert len(decay["params"]) + len(exempt["params"]) == len(model.parameters())


def test_param_groups_can_decay_embeddings():
    decay, exempt = param_groups(Toy(), 0.1, no_decay=("norm", "bias", "vector"))
    assert decay["names"] == ["embed_positions", "wte.weight", "blocks.0.qkv", "blocks.1.weight"]
    assert "norm.weight" in exempt["names"]
    with pytest.raises(ValueError, match=r"argument 'no_decay' expected kinds from .*, got \['biases'\]"):
        param_groups(Toy(), 0.1, no_decay=("biases",))


def test_param_groups_drive_weight_decay_in_adamw():
    """Exempt parameters with zero gradient do not move; decayed ones shrink by exactly (1 - lr wd)."""
    model = Toy()
    opt = AdamW(param_groups(model, 0.5), lr=0.1)
    opt.step()  # all gradients are zero: only decay acts
    assert np.all(model.blocks[0].qkv.data == 1 - 0.1 * 0.5)
    assert np.all(model.wte.weight.data == 1.0) and np.all(model.norm.weight.data == 1.0)


# -- gradient accumulation -------------------------------------------------------------------

class Regression(Module):
    """Mean squared error of y = x w over a batch; backward adds into w.grad."""

    def __init__(self, d):
        super().__init__()
        self.w = Parameter(np.linspace(-1, 1, d))

    def forward_backward(self, x, y):
        r = x @ self.w.data - y
        self.w.grad += 2 * x.T @ r / len(y)
        return float(np.mean(r * r))


@given(rng=rngs(), k=st.sampled_from([1, 2, 4]))
def test_accumulated_gradient_equals_full_batch(rng, k):
    model = Regression(3)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal(8)
    model.w.grad[...] = 123.0  # stale gradient: the helper zeroes first
    loss = accumulate_gradients(model.parameters(), list(zip(np.split(x, k), np.split(y, k))), model.forward_backward)
    accumulated = model.w.grad.copy()
    model.zero_grad()
    full_loss = model.forward_backward(x, y)
    assert_close(accumulated, model.w.grad, what="accumulated gradient")
    assert_close(np.asarray(loss), full_loss, what="mean loss")


def test_scale_grads_in_place():
    p = Parameter(np.ones(3, np.float32))
    p.grad[...] = 1.0
    grad = p.grad
    scale_grads_(p, 0.25)
    assert p.grad is grad and p.grad.dtype == np.float32 and np.all(p.grad == 0.25)


# -- schedules -------------------------------------------------------------------------------

LR, MIN_LR, WARMUP, TOTAL = 0.3, 0.03, 5, 40

SCHEDULES = {
    "constant": constant(LR),
    "warmup_cosine": warmup_cosine(LR, MIN_LR, WARMUP, TOTAL),
    "linear_decay": linear_decay(LR, WARMUP, TOTAL, end_lr=MIN_LR),
}


def torch_lrs(make_scheduler, steps):
    """The lr torch's optimizer holds for each update 0 .. steps-1 under a scheduler."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = make_scheduler(opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about scheduler.step() before optimizer.step()
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            scheduler.step()
    return np.array(lrs)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_convention_matches_lambda_lr(name):
    schedule = SCHEDULES[name]
    lam = torch_lrs(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / LR), TOTAL + 5)
    assert_close(np.array([schedule(s) for s in range(TOTAL + 5)]), lam, what=name)


def test_warmup_cosine_matches_linear_then_cosine_annealing():
    lrs = torch_lrs(lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / WARMUP, end_factor=1.0, total_iters=WARMUP - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL - WARMUP, eta_min=MIN_LR),
    ], milestones=[WARMUP]), TOTAL + 1)
    ours = SCHEDULES["warmup_cosine"]
    assert_close(np.array([ours(s) for s in range(TOTAL + 1)]), lrs, what="warmup + cosine")


def test_linear_decay_matches_two_linear_lrs():
    lrs = torch_lrs(lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / WARMUP, end_factor=1.0, total_iters=WARMUP - 1),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=MIN_LR / LR, total_iters=TOTAL - WARMUP),
    ], milestones=[WARMUP]), TOTAL + 5)
    ours = SCHEDULES["linear_decay"]
    assert_close(np.array([ours(s) for s in range(TOTAL + 5)]), lrs, what="warmup + linear")


def test_schedule_landmarks():
    cos, lin = SCHEDULES["warmup_cosine"], SCHEDULES["linear_decay"]
    rtol = RTOL[np.dtype(np.float64)]
    assert cos(0) == pytest.approx(LR / WARMUP, rel=rtol) and cos(WARMUP - 1) == pytest.approx(LR, rel=rtol)
    assert cos(WARMUP) == pytest.approx(LR, rel=rtol)
    mid = (WARMUP + TOTAL) // 2  # 22, progress 17/35 through the decay: the half-cosine formula, written out
    assert cos(mid) == pytest.approx(MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * 17 / 35)) / 2, rel=rtol)
    assert cos(mid) > (LR + MIN_LR) / 2 > cos(mid + 1)
    assert cos(TOTAL) == cos(10 * TOTAL) == pytest.approx(MIN_LR, rel=rtol)
    assert lin(TOTAL) == lin(10 * TOTAL) == pytest.approx(MIN_LR, rel=rtol)
    decay = [cos(s) for s in range(WARMUP, TOTAL + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert linear_decay(1.0, 0, 4)(2) == pytest.approx(0.5, rel=rtol)  # no warmup, default end_lr = 0
    assert warmup_cosine(1.0, 0.1, 10, 5)(10) == pytest.approx(0.1, rel=rtol)  # no room to decay: min_lr
    assert math.isclose(constant(0.5)(10**6), 0.5)


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="warmup_cosine: argument 'min_lr' expected a finite real number in"):
        warmup_cosine(1.0, -0.1, 1, 10)
    with pytest.raises(ValueError, match="linear_decay: argument 'warmup' expected an integer >= 0, got 2.5"):
        linear_decay(1.0, 2.5, 10)


# -- any shape (0-d included), every option, several steps: against torch.optim in float64 ---------

# The structure of the options (which terms are on); hypothesis draws their values.
OPTION_SWITCHES = [
    ("SGD", dict(momentum=False, dampening=False, nesterov=False, weight_decay=False)),
    ("SGD", dict(momentum=False, dampening=False, nesterov=False, weight_decay=True)),
    ("SGD", dict(momentum=True, dampening=False, nesterov=False, weight_decay=False)),
    ("SGD", dict(momentum=True, dampening=False, nesterov=False, weight_decay=True)),
    ("SGD", dict(momentum=True, dampening=True, nesterov=False, weight_decay=False)),
    ("SGD", dict(momentum=True, dampening=True, nesterov=False, weight_decay=True)),
    ("SGD", dict(momentum=True, dampening=False, nesterov=True, weight_decay=False)),
    ("SGD", dict(momentum=True, dampening=False, nesterov=True, weight_decay=True)),
    ("Adam", dict(weight_decay=False)),
    ("Adam", dict(weight_decay=True)),
    ("AdamW", dict(weight_decay=False)),
    ("AdamW", dict(weight_decay=True)),
]
OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
THEIRS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
ANY_SHAPES = st.lists(st.just(()) | shapes(min_dims=0, max_dims=3, sides=st.sampled_from([1, 2, 3])),
                      min_size=1, max_size=4)


@st.composite
def options_for(draw, kind, switches):
    lr = draw(st.sampled_from([0.0, 0.01, 0.1, 0.7]))
    wd = draw(st.sampled_from([0.01, 0.1, 0.5])) if switches["weight_decay"] else 0.0
    if kind == "SGD":
        momentum = draw(st.sampled_from([0.1, 0.5, 0.9])) if switches["momentum"] else 0.0
        dampening = draw(st.sampled_from([0.3, 1.0])) if switches["dampening"] else 0.0
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=switches["nesterov"], weight_decay=wd)
    betas = draw(st.sampled_from([(0.9, 0.999), (0.0, 0.5), (0.5, 0.0), (0.8, 0.95), (0.0, 0.0)]))
    return dict(lr=lr, betas=betas, eps=draw(st.sampled_from([1e-8, 1e-3, 0.5])), weight_decay=wd)


@pytest.mark.parametrize("kind, switches", OPTION_SWITCHES, ids=[f"{k}-{'-'.join(n for n, on in s.items() if on)}"
                                                                 for k, s in OPTION_SWITCHES])
@given(data=st.data(), shapes_=ANY_SHAPES, rng=rngs(), steps=st.integers(1, 5), groups=st.booleans())
def test_every_option_and_any_shape_match_torch_step_by_step(kind, switches, data, shapes_, rng, steps, groups):
    """0-d, size-1 and other shapes, each option on or off, several steps: the values torch.optim gives."""
    options = data.draw(options_for(kind, switches), label="options")
    ours = [Parameter(np.asarray(rng.standard_normal(s))) for s in shapes_]
    theirs = [torch.tensor(p.data.copy(), requires_grad=True) for p in ours]
    arrays = [p.data for p in ours]
    if groups and len(ours) > 1:  # a second group with its own lr and weight decay
        opt = OURS[kind]([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.05, "weight_decay": 0.2}], **options)
        topt = THEIRS[kind]([{"params": theirs[:1]}, {"params": theirs[1:], "lr": 0.05, "weight_decay": 0.2}],
                            **options)
    else:
        opt, topt = OURS[kind](ours, **options), THEIRS[kind](theirs, **options)
    for step in range(steps):
        set_grads(rng, ours, theirs, scale=float(rng.choice([0.0, 1.0, 10.0])))
        opt.step()
        topt.step()
        assert_params_close(ours, theirs, f"{kind} {options} step {step}")
    for p, a in zip(ours, arrays):
        assert p.data is a  # written in place
        for name, value in opt.state[p].items():
            if name != "step":  # every buffer an array of its parameter's shape, 0-d ones included
                assert type(value) is np.ndarray and value.shape == p.shape and value.dtype == p.data.dtype, name


def test_sgd_momentum_and_weight_decay_on_a_0d_parameter_keeps_its_buffer():
    """Five steps of gradient 1 from 1.0 (lr 0.1, momentum 0.9, weight decay 0.1): torch gives -0.41202571510000024."""
    p = Parameter(np.array(1.0))
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(5):
        p.grad[...] = 1.0
        opt.step()
    t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    topt = torch.optim.SGD([t], lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(5):
        t.grad = torch.tensor(1.0, dtype=torch.float64)
        topt.step()
    assert_close(p.data, t.detach().numpy(), what="0-d SGD")
    assert p.data.shape == () and type(opt.state[p]["momentum_buffer"]) is np.ndarray


# -- step() is all or nothing ------------------------------------------------------------------------

def optimizer_state(opt, params):
    return [p.data.copy() for p in params], {id(p): {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                                      for k, v in s.items()} for p, s in opt.state.items()}


def assert_same_state(before, after):
    (data0, state0), (data1, state1) = before, after
    for a, b in zip(data0, data1):
        np.testing.assert_array_equal(a, b)
    assert state0.keys() == state1.keys()
    for k in state0:
        assert state0[k].keys() == state1[k].keys()
        for name in state0[k]:
            np.testing.assert_array_equal(state0[k][name], state1[k][name])


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
@given(shapes_=ANY_SHAPES, rng=rngs(), warm=st.integers(0, 2), where=st.data(),
       failure=st.sampled_from(["overflow", "read-only"]))
def test_a_step_that_fails_part_way_changes_nothing(kind, shapes_, rng, warm, where, failure):
    """An error on any parameter (an overflow under np.seterr(all="raise"), a read-only array) leaves every
    parameter and the whole state as they were, the parameters before it included."""
    ours = [Parameter(np.asarray(rng.standard_normal(s))) for s in shapes_]
    opt = OURS[kind](ours, lr=1.0, **({"momentum": 0.9} if kind == "SGD" else {}))
    for _ in range(warm):
        for p in ours:
            p.grad[...] = rng.standard_normal(p.shape)
        opt.step()
    bad = where.draw(st.integers(0, len(ours) - 1), label="failing parameter")
    for p in ours:
        p.grad[...] = rng.standard_normal(p.shape)
    before = optimizer_state(opt, ours)
    if failure == "overflow":  # SGD: p - lr * g overflows; Adam: g * g overflows
        ours[bad].data[...] = -1.5e308
        ours[bad].grad[...] = 1.5e308 if kind == "SGD" else 1e200
        before = optimizer_state(opt, ours)
        with np.errstate(over="raise", invalid="raise"), pytest.raises(FloatingPointError):
            opt.step()
    else:
        ours[bad].data.flags.writeable = False
        expect_rejected(opt.step, f"{kind}.step", "params")
        ours[bad].data.flags.writeable = True
    assert_same_state(before, optimizer_state(opt, ours))


# -- clipping non-finite gradients ------------------------------------------------------------------

@st.composite
def gradients_with(draw, bad_values):
    """Gradients of a few parameters, one entry (or more) replaced by a value from ``bad_values``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes_ = draw(ANY_SHAPES)
    grads = [np.asarray(rng.standard_normal(s)) for s in shapes_]
    for _ in range(draw(st.integers(1, 3))):
        g = grads[draw(st.integers(0, len(grads) - 1))]
        g[np.unravel_index(draw(st.integers(0, g.size - 1)), g.shape) if g.ndim else ()] = draw(
            st.sampled_from(bad_values))
    return grads


def params_with(grads):
    params = [Parameter(np.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad[...] = g
    return params


@given(grads=gradients_with([math.nan, math.inf, -math.inf]), max_norm=st.sampled_from([0.5, 3.0, math.inf]))
def test_clip_refuses_a_gradient_that_is_not_finite_and_changes_nothing(grads, max_norm):
    params = params_with(grads)
    message = expect_rejected(lambda: clip_grad_norm_(params, max_norm), "clip_grad_norm_", "params")
    first = next(i for i, g in enumerate(grads) if not np.isfinite(g).all())
    assert "not finite" in message and f"parameter {first}'s gradient holds" in message
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad, g)


@given(grads=gradients_with([math.nan, math.inf, -math.inf]), max_norm=st.sampled_from([0.5, 3.0, math.inf]))
def test_clip_with_error_if_nonfinite_false_scales_as_torch(grads, max_norm):
    params = params_with(grads)
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g.copy())
    total = clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    expected = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm, error_if_nonfinite=False))
    assert (math.isnan(total) and math.isnan(expected)) or total == expected
    for p, t in zip(params, tensors):
        np.testing.assert_array_equal(p.grad, t.grad.numpy())  # NaN where torch has NaN, 0 where it has 0


@given(rng=rngs(), exponent=st.integers(160, 300), dtype=st.sampled_from([np.float64, np.float32]))
def test_clip_measures_finite_gradients_whose_squares_overflow(rng, exponent, dtype):
    """|g| ~ 1e200 (float64) or ~ 1e30 (float32): the squares overflow, the norm does not, and the clip works."""
    scale = 10.0 ** (exponent if dtype == np.float64 else exponent // 10)
    grads = [(rng.standard_normal(s) * scale).astype(dtype) for s in [(3, 2), (4,)]]
    params = params_with(grads)
    exact = math.hypot(*(float(x) for g in grads for x in g.ravel()))
    assert grad_norm(params) == pytest.approx(exact, rel=1e-6)
    assert clip_grad_norm_(params, 1.0) == pytest.approx(exact, rel=1e-6)
    assert grad_norm(params) == pytest.approx(1.0, rel=1e-5)
