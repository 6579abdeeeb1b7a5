"""Bad input to the optimizers, gradient helpers, parameter groups and schedules, generated.

Every wrong option, malformed parameter list, gradient of the wrong shape or a corrupt
state dict raises ``ValueError`` or ``TypeError`` naming the function and the argument,
and leaves every parameter and the optimizer's state as they were.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.nn.module import Module, Parameter
from npformer.optim import (SGD, Adam, AdamW, Constant, LinearDecay, WarmupCosine, accumulate_gradients, classify,
                            clip_grad_norm_, constant, grad_norm, linear_decay, param_groups, scale_grads_,
                            warmup_cosine)
from tests.badinput import Case, expect_rejected
from tests.tolerances import RTOL


def params(seed=0):
    rng = np.random.default_rng(seed)
    out = [Parameter(rng.standard_normal(s)) for s in [(3, 2), (4,), (1,)]]
    for p in out:
        p.grad[...] = rng.standard_normal(p.shape)
    return out


class Tiny(Module):
    def __init__(self):
        super().__init__()
        self.weight = Parameter(np.ones((2, 3)))
        self.bias = Parameter(np.zeros(2))


# -- strategies of wrong values -----------------------------------------------------------------

NOT_REAL = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([0.1]), st.just(np.array([0.1])),
                     st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")), st.just(np.float32("nan")))


def below(lo, strict=True):
    """Finite reals below ``lo`` (or at or below it, with ``strict=False``), and non-reals."""
    return NOT_REAL | st.floats(max_value=lo, exclude_max=strict, allow_nan=False, allow_infinity=False)


def outside_unit(hi_open=True):
    """Reals outside [0, 1) (or [0, 1]), and non-reals."""
    return NOT_REAL | st.floats(max_value=0.0, exclude_max=True, allow_infinity=False) \
        | st.floats(min_value=1.0, exclude_min=not hi_open, allow_infinity=False)


def bad_counts(lo):
    return st.one_of(st.integers(lo - 20, lo - 1), st.floats().filter(lambda v: not (math.isfinite(v) and v == int(v))),
                     st.integers(lo, lo + 9).map(float), st.booleans(), st.none(), st.just("4"))


NON_BOOL = st.one_of(st.integers(0, 1), st.none(), st.text(max_size=2), st.floats(0, 1))
BAD_BETAS = st.one_of(st.tuples(outside_unit(), st.floats(0, 0.99)), st.tuples(st.floats(0, 0.99), outside_unit()),
                      st.floats(0, 0.99), st.lists(st.floats(0, 0.99), min_size=3, max_size=3), st.none(),
                      st.text(max_size=2), st.just([0.9]))
BAD_PARAM_LISTS = st.one_of(
    st.just([]), st.none(), st.integers(), st.text(max_size=2), st.just(np.ones(3)),
    st.just(Parameter(np.ones(2))), st.just({"params": []}),
    st.lists(st.one_of(st.just(np.ones(2)), st.floats(), st.none(), st.text(max_size=2)), min_size=1, max_size=2).map(
        lambda bad: params() + bad),
    st.just([{"lr": 0.1}]), st.just([{"params": 5}]), st.just([{"params": [np.ones(2)]}]),
    st.just([{"params": params()[:1]}, params()[1]]),
    st.just(params()[:1] * 2),
)



CASES = [
    Case("SGD", "lr", lambda bad: SGD(params(), lr=bad), below(0.0)),
    Case("SGD", "momentum", lambda bad: SGD(params(), lr=0.1, momentum=bad), outside_unit()),
    Case("SGD", "dampening", lambda bad: SGD(params(), lr=0.1, momentum=0.5, dampening=bad), outside_unit(False)),
    Case("SGD", "nesterov", lambda bad: SGD(params(), lr=0.1, momentum=0.5, nesterov=bad), NON_BOOL),
    Case("SGD", "weight_decay", lambda bad: SGD(params(), lr=0.1, weight_decay=bad), below(0.0)),
    Case("SGD", "params", lambda bad: SGD(bad, lr=0.1), BAD_PARAM_LISTS),
    Case("Adam", "lr", lambda bad: Adam(params(), lr=bad), below(0.0)),
    Case("Adam", "betas", lambda bad: Adam(params(), betas=bad), BAD_BETAS),
    Case("Adam", "eps", lambda bad: Adam(params(), eps=bad), below(0.0, strict=False)),
    Case("Adam", "weight_decay", lambda bad: Adam(params(), weight_decay=bad), below(0.0)),
    Case("Adam", "params", lambda bad: Adam(bad), BAD_PARAM_LISTS),
    Case("AdamW", "lr", lambda bad: AdamW([{"params": params(), "lr": bad}]), below(0.0)),
    Case("AdamW", "betas", lambda bad: AdamW([{"params": params(), "betas": bad}]), BAD_BETAS),
    Case("AdamW", "eps", lambda bad: AdamW(params(), eps=bad), below(0.0, strict=False)),
    Case("AdamW", "weight_decay", lambda bad: AdamW([{"params": params(), "weight_decay": bad}]), below(0.0)),
    Case("AdamW", "params", lambda bad: AdamW(bad), BAD_PARAM_LISTS),
    Case("SGD.add_param_group", "group", lambda bad: SGD(params()[:1], lr=0.1).add_param_group(bad),
         st.one_of(st.none(), st.integers(), st.just([params()[1]]), st.just({"lr": 0.1}), st.just({"params": 3}),
                   st.just({"params": [np.ones(2)]}), st.just({"params": "ab"}))),
    Case("Adam.add_param_group", "lr", lambda bad: Adam(params()[:1]).add_param_group({"params": params(), "lr": bad}),
         below(0.0)),
    Case("AdamW.load_state_dict", "state_dict", lambda bad: AdamW(params()).load_state_dict(bad),
         st.one_of(st.none(), st.integers(), st.just([]), st.just({}), st.just({"param_groups": {}}),
                   st.just({"param_groups": [{"params": [0, 1, 2]}] * 2}),
                   st.just({"param_groups": [{"params": [0, 1]}]}),
                   st.just({"param_groups": [{"params": ["0", 1, 2]}]}),
                   st.just({"param_groups": [{"params": [0, 1, 2]}], "state": []}),
                   st.just({"param_groups": [{"params": [0, 1, 2]}], "state": {"7": {}}}))),
    Case("AdamW.load_state_dict", "cast", lambda bad: AdamW(params()).load_state_dict(AdamW(params()).state_dict(),
                                                                                       cast=bad), NON_BOOL),
    Case("clip_grad_norm_", "params", lambda bad: clip_grad_norm_(bad, 1.0),
         BAD_PARAM_LISTS.filter(lambda v: not isinstance(v, (list, Parameter)) or (isinstance(v, list) and v and
                                                                                    not isinstance(v[0], Parameter)))),
    Case("clip_grad_norm_", "max_norm", lambda bad: clip_grad_norm_(params(), bad),
         below(0.0, strict=False).filter(lambda v: not (isinstance(v, float) and v == math.inf))),
    Case("clip_grad_norm_", "error_if_nonfinite", lambda bad: clip_grad_norm_(params(), 1.0, bad), NON_BOOL),
    Case("grad_norm", "params", grad_norm, st.one_of(st.none(), st.integers(), st.just([np.ones(2)]),
                                                      st.just({"a": 1}), st.text(min_size=1, max_size=2))),
    Case("scale_grads_", "factor", lambda bad: scale_grads_(params(), bad), NOT_REAL),
    Case("scale_grads_", "params", lambda bad: scale_grads_(bad, 0.5), st.one_of(st.none(), st.just([1.0]))),
    Case("accumulate_gradients", "micro_batches", lambda bad: accumulate_gradients(params(), bad, lambda *a: 0.0),
         st.one_of(st.just([]), st.none(), st.integers(), st.lists(st.integers() | st.none(), min_size=1, max_size=2))),
    Case("accumulate_gradients", "forward_backward", lambda bad: accumulate_gradients(params(), [(1,)], bad),
         st.one_of(st.none(), st.integers(), st.text(max_size=2),
                   st.sampled_from([None, "1.0", [1.0], True, np.ones(2)]).map(lambda loss: lambda *a: loss))),
    Case("param_groups", "model", lambda bad: param_groups(bad, 0.1), st.one_of(st.none(), st.integers(),
                                                                                 st.just(params()))),
    Case("param_groups", "weight_decay", lambda bad: param_groups(Tiny(), bad), below(0.0)),
    Case("param_groups", "no_decay", lambda bad: param_groups(Tiny(), 0.1, bad),
         st.one_of(st.sampled_from(["norm", "bias"]), st.none(), st.integers(), st.just([1]),
                   st.lists(st.text(max_size=5), min_size=1, max_size=2).filter(
                       lambda v: not set(v) <= {"embedding", "norm", "bias", "matrix", "vector"}))),
    Case("classify", "model", classify, st.one_of(st.none(), st.integers(), st.just(params()))),
    Case("constant", "lr", constant, below(0.0)),
    Case("Constant", "lr", Constant, below(0.0)),
    Case("warmup_cosine", "lr", lambda bad: warmup_cosine(bad, 0.0, 1, 10), below(0.0)),
    Case("warmup_cosine", "min_lr", lambda bad: warmup_cosine(0.5, bad, 1, 10),
         below(0.0) | st.floats(0.5, 1e6, exclude_min=True)),
    Case("warmup_cosine", "warmup", lambda bad: warmup_cosine(0.5, 0.1, bad, 10), bad_counts(0)),
    Case("warmup_cosine", "total_steps", lambda bad: warmup_cosine(0.5, 0.1, 1, bad), bad_counts(0)),
    Case("WarmupCosine", "min_lr", lambda bad: WarmupCosine(0.5, bad, 1, 10),
         below(0.0) | st.floats(0.5, 1e6, exclude_min=True)),
    Case("WarmupCosine", "warmup", lambda bad: WarmupCosine(0.5, 0.1, bad, 10), bad_counts(0)),
    Case("linear_decay", "lr", lambda bad: linear_decay(bad, 1, 10), below(0.0)),
    Case("linear_decay", "end_lr", lambda bad: linear_decay(0.5, 1, 10, bad),
         below(0.0) | st.floats(0.5, 1e6, exclude_min=True)),
    Case("linear_decay", "warmup", lambda bad: linear_decay(0.5, bad, 10), bad_counts(0)),
    Case("linear_decay", "total_steps", lambda bad: linear_decay(0.5, 1, bad), bad_counts(0)),
    Case("LinearDecay", "total_steps", lambda bad: LinearDecay(0.5, 1, bad), bad_counts(0)),
    Case("WarmupCosine", "step", lambda bad: warmup_cosine(0.5, 0.1, 2, 10)(bad), bad_counts(0)),
    Case("LinearDecay", "step", lambda bad: linear_decay(0.5, 2, 10)(bad), bad_counts(0)),
    Case("Constant", "step", lambda bad: constant(0.5)(bad), bad_counts(0)),
]


@pytest.mark.parametrize("case", CASES, ids=repr)
@given(data=st.data())
def test_bad_input_is_named(case, data):
    bad = data.draw(case.values, label=f"{case.func}({case.arg}=...)")
    expect_rejected(lambda: case.call(bad), case.func, case.arg)


# -- nothing changes when a check fails --------------------------------------------------------

OPTIMIZERS = st.sampled_from([
    lambda ps: SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: Adam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: AdamW([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}], lr=0.01),
])
GROUP_EDITS = st.one_of(
    st.tuples(st.just("lr"), below(0.0)), st.tuples(st.just("weight_decay"), below(0.0)),
    st.tuples(st.just("eps"), below(0.0, strict=False)), st.tuples(st.just("betas"), BAD_BETAS),
    st.tuples(st.just("momentum"), outside_unit()), st.tuples(st.just("nesterov"), NON_BOOL.filter(bool)),
)


def snapshot(opt, ps):
    sd = opt.state_dict()
    return [p.data.copy() for p in ps], {k: v for k, v in sd["state"].items()}, sd["param_groups"]


def assert_unchanged(before, after):
    (data0, state0, groups0), (data1, state1, groups1) = before, after
    for a, b in zip(data0, data1):
        np.testing.assert_array_equal(a, b)
    assert state0.keys() == state1.keys() and groups0 == groups1
    for k in state0:
        for name, value in state0[k].items():
            np.testing.assert_array_equal(value, state1[k][name])


@given(make=OPTIMIZERS, edit=GROUP_EDITS, group=st.integers(0, 1), steps=st.integers(0, 2))
def test_an_option_set_between_steps_is_checked_by_step(make, edit, group, steps):
    """A trainer writes ``group[key] = value`` directly; ``step`` refuses a bad value and updates nothing."""
    ps = params()
    opt = make(ps)
    for _ in range(steps):
        opt.step()
    key, bad = edit
    group = min(group, len(opt.param_groups) - 1)
    if key not in opt.param_groups[group]:
        return
    before = snapshot(opt, ps)
    opt.param_groups[group][key] = bad
    name = type(opt).__name__
    expect_rejected(opt.step, f"{name}.step (group {group})", key)
    opt.param_groups[group][key] = before[2][group][key] if key != "betas" else tuple(before[2][group][key])
    assert_unchanged(before, snapshot(opt, ps))


@given(make=OPTIMIZERS, which=st.integers(0, 2), bad=st.sampled_from(["shape", "dtype", "none", "list"]))
def test_a_gradient_of_the_wrong_kind_is_refused_before_any_update(make, which, bad):
    ps = params()
    opt = make(ps)
    opt.step()
    before = snapshot(opt, ps)
    p = ps[which]
    p.grad = {"shape": np.ones(p.shape + (2,)), "dtype": p.grad.astype(np.float32), "none": None,
              "list": p.grad.tolist()}[bad]
    message = expect_rejected(opt.step, f"{type(opt).__name__}.step", "params")
    assert "gradient" in message
    assert_unchanged(before, snapshot(opt, ps))


STATE_EDITS = st.sampled_from([
    "drop exp_avg", "transpose exp_avg", "int exp_avg", "float32 exp_avg", "negative step", "float step",
    "array step", "extra entry", "bad lr", "bad betas", "drop params", "repeat index", "bad state key",
    "state not a dict", "one group too many",
])


def edit_state(sd, edit):
    state0 = sd["state"]["0"]
    if edit == "drop exp_avg":
        del state0["exp_avg"]
    elif edit == "transpose exp_avg":
        state0["exp_avg"] = state0["exp_avg"].T
    elif edit == "int exp_avg":
        state0["exp_avg"] = state0["exp_avg"].astype(np.int64)
    elif edit == "float32 exp_avg":
        state0["exp_avg"] = state0["exp_avg"].astype(np.float32)
    elif edit == "negative step":
        state0["step"] = -1
    elif edit == "float step":
        state0["step"] = 2.5
    elif edit == "array step":
        state0["step"] = np.ones((3, 2))
    elif edit == "extra entry":
        state0["momentum_buffer"] = np.zeros((3, 2))
    elif edit == "bad lr":
        sd["param_groups"][-1]["lr"] = float("nan")
    elif edit == "bad betas":
        sd["param_groups"][-1]["betas"] = [0.9, 1.5]
    elif edit == "drop params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif edit == "repeat index":
        sd["param_groups"][-1]["params"][-1] = 0
    elif edit == "bad state key":
        sd["state"]["x"] = sd["state"].pop("0")
    elif edit == "state not a dict":
        sd["state"]["1"] = [1, 2]
    else:
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    return sd


@given(edit=STATE_EDITS, steps=st.integers(1, 3), groups=st.booleans())
def test_a_corrupt_state_dict_is_refused_and_nothing_is_loaded(edit, steps, groups):
    source_params, target_params = params(0), params(1)
    make = (lambda ps: AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01)) if groups else \
        (lambda ps: AdamW(ps, lr=0.01))
    source, target = make(source_params), make(target_params)
    for _ in range(steps):
        source.step()
    target.step()
    before = snapshot(target, target_params)
    bad = edit_state(source.state_dict(), edit)
    expect_rejected(lambda: target.load_state_dict(bad), "AdamW.load_state_dict", "state_dict")
    assert_unchanged(before, snapshot(target, target_params))
    if edit == "float32 exp_avg":  # a float dtype other than the parameter's loads when asked
        target.load_state_dict(bad, cast=True)
        assert target.state[target_params[0]]["exp_avg"].dtype == np.float64


# -- the checks accept what they should ---------------------------------------------------------

@given(lr=st.floats(0, 10), warmup=st.integers(0, 30), total=st.integers(0, 60), end=st.floats(0, 1),
       step=st.integers(0, 100))
def test_valid_schedules_stay_between_zero_and_lr(lr, warmup, total, end, step):
    """Any valid settings (warmup longer than the run included) give a rate in [0, lr] at every step."""
    end = end * lr
    for schedule in (constant(lr), warmup_cosine(lr, end, warmup, total), linear_decay(lr, warmup, total, end)):
        value = schedule(step)
        assert 0.0 <= value <= lr * (1 + RTOL[np.dtype(np.float64)])
        if step >= max(warmup, total) and not isinstance(schedule, Constant):
            assert value == end  # exactly: both decays end on their end value


@given(scale=st.floats(1e-3, 1e3))
def test_infinite_max_norm_measures_without_clipping(scale):
    ps = params()
    for p in ps:
        p.grad *= scale
    grads = [p.grad.copy() for p in ps]
    total = clip_grad_norm_(ps, math.inf)
    expected = math.sqrt(sum(float((g * g).sum()) for g in grads))
    assert total == pytest.approx(expected, rel=RTOL[np.dtype(np.float64)])
    for p, g in zip(ps, grads):
        np.testing.assert_array_equal(p.grad, g)


@given(make=OPTIMIZERS, bad=st.sampled_from(["repeat", "lr", "entry", "betas"]))
def test_a_refused_group_is_not_added(make, bad):
    ps = params()
    opt = make(ps[:2])
    groups = [dict(g) for g in opt.param_groups]
    group = {"repeat": {"params": ps[1:]}, "lr": {"params": ps[2:], "lr": -1.0},
             "entry": {"params": ps[2:] + [1.0]}, "betas": {"params": ps[2:], "betas": (0.9, 2.0)}}[bad]
    with pytest.raises((ValueError, TypeError)):
        opt.add_param_group(group)
    assert opt.param_groups == groups and len(opt.parameters()) == 2


# -- options and state dicts of another optimizer ---------------------------------------------------

MAKERS = {
    "SGD": lambda ps: SGD(ps, lr=0.1, momentum=0.9),
    "Adam": lambda ps: Adam(ps, lr=0.01),
    "AdamW": lambda ps: AdamW(ps, lr=0.01),
}
OPTION_NAMES = {"SGD": {"lr", "momentum", "dampening", "nesterov", "weight_decay"},
                "Adam": {"lr", "betas", "eps", "weight_decay"}, "AdamW": {"lr", "betas", "eps", "weight_decay"}}
UNKNOWN_KEYS = st.text(min_size=1, max_size=6) | st.sampled_from(["lrr", "momentum", "betas", "amsgrad", "name",
                                                                  "maximize", "Lr"])


@given(kind=st.sampled_from(sorted(MAKERS)), key=UNKNOWN_KEYS, where=st.sampled_from(["constructor", "add", "step"]))
def test_an_unknown_option_key_is_refused_by_name(kind, key, where):
    """A misspelt or foreign option (``"lrr"``, SGD's ``"momentum"`` given to Adam) is an error, never ignored."""
    if key in OPTION_NAMES[kind] | {"params", "names"}:
        return
    ps = params()
    if where == "constructor":
        call = lambda: MAKERS[kind]([{"params": ps, key: 0.1}])  # noqa: E731
        func = kind
    elif where == "add":
        opt = MAKERS[kind](ps[:1])
        call = lambda: opt.add_param_group({"params": ps[1:], key: 0.1})  # noqa: E731
        func = f"{kind}.add_param_group"
    else:
        opt = MAKERS[kind](ps)
        opt.step()
        before = snapshot(opt, ps)
        opt.param_groups[0][key] = 0.1  # a trainer's typo
        call, func = opt.step, f"{kind}.step"
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(func) and f"argument {key!r} is not an option of {kind}" in message, message
    assert "expected" in message and "got" in message
    if where == "step":
        del opt.param_groups[0][key]
        assert_unchanged(before, snapshot(opt, ps))


@given(source=st.sampled_from(sorted(MAKERS)), target=st.sampled_from(sorted(MAKERS)), steps=st.integers(0, 2),
       keep_type=st.booleans())
def test_the_state_of_another_optimizer_is_refused(source, target, steps, keep_type):
    """SGD's state into Adam (and Adam's into AdamW): refused by its type, or by its options when the type is gone."""
    if source == target:
        return
    src_params, dst_params = params(0), params(1)
    src, dst = MAKERS[source](src_params), MAKERS[target](dst_params)
    for _ in range(steps):
        src.step()
    dst.step()
    before = snapshot(dst, dst_params)
    sd = src.state_dict()
    assert sd["type"] == source
    if not keep_type:
        del sd["type"]
        if OPTION_NAMES[source] == OPTION_NAMES[target]:
            return  # Adam and AdamW have the same options and state: only the type tells them apart
    expect_rejected(lambda: dst.load_state_dict(sd), f"{target}.load_state_dict", "state_dict")
    assert_unchanged(before, snapshot(dst, dst_params))


BAD_INDEX_KEYS = st.sampled_from(["²", "٣", "01", "00", "+1", "-1", " 1", "1 ", "1.0", "1_0", "0x1", "", "one", "１"])


@given(key=BAD_INDEX_KEYS | st.text(max_size=3).filter(lambda k: not (k.isascii() and k.isdigit())),
       kind=st.sampled_from(sorted(MAKERS)))
def test_state_keys_are_decimal_indices(key, kind):
    """A state key is "0", "1", ... exactly: "²" (which str.isdigit accepts and int() refuses), "01", "+1" are not."""
    ps = params()
    opt = MAKERS[kind](ps)
    opt.step()
    sd = opt.state_dict()
    sd["state"][key] = sd["state"].pop("1")
    before = snapshot(opt, ps)
    message = expect_rejected(lambda: opt.load_state_dict(sd), f"{kind}.load_state_dict", "state_dict")
    assert "names no parameter" in message
    assert_unchanged(before, snapshot(opt, ps))


@given(kind=st.sampled_from(sorted(MAKERS)), twin=st.sampled_from(["01", 1, "1"]))
def test_one_parameter_state_given_twice_is_refused(kind, twin):
    """Keys "1" and 1 (or "1" and "01") both name parameter 1: refused, not last-one-wins."""
    ps = params()
    opt = MAKERS[kind](ps)
    opt.step()
    sd = opt.state_dict()
    state = dict(sd["state"])
    if twin == "1":
        state = {**{k: v for k, v in state.items() if k != "1"}, 1: state["1"], "1": state["1"]}
    else:
        state[twin] = state["1"]
    sd["state"] = state
    expect_rejected(lambda: opt.load_state_dict(sd), f"{kind}.load_state_dict", "state_dict")


@given(kind=st.sampled_from(sorted(MAKERS)),
       edit=st.sampled_from(["extra option", "missing option", "top-level key"]))
def test_a_state_dict_with_foreign_or_missing_options_is_refused(kind, edit):
    ps = params()
    opt = MAKERS[kind](ps)
    sd = opt.state_dict()
    if edit == "extra option":
        sd["param_groups"][0]["amsgrad"] = False
    elif edit == "missing option":
        del sd["param_groups"][0]["lr"]
    else:
        sd["scheduler"] = {}
    before = snapshot(opt, ps)
    expect_rejected(lambda: opt.load_state_dict(sd), f"{kind}.load_state_dict", "state_dict")
    assert_unchanged(before, snapshot(opt, ps))


@given(kind=st.sampled_from(sorted(MAKERS)), keep_type=st.booleans(), int_keys=st.booleans())
def test_its_own_state_dict_loads(kind, keep_type, int_keys):
    """The checks refuse only what they should: its own state, with or without "type", with int or text keys."""
    ps = params()
    opt = MAKERS[kind](ps)
    opt.step()
    sd = opt.state_dict()
    if not keep_type:
        del sd["type"]
    if int_keys:
        sd["state"] = {int(k): v for k, v in sd["state"].items()}
    other = MAKERS[kind](params(1))
    other.load_state_dict(sd)
    assert other.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for k, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(other.state_dict()["state"][k][name], value)


# -- schedules: exact landmarks -------------------------------------------------------------------

RATES = st.sampled_from([0.1, 0.3, 1 / 3, 0.7, 3e-4, 6e-4, 1.0, 2.5]) | st.floats(1e-6, 10)


@given(lr=RATES, end_fraction=st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0, 1), total=st.integers(0, 120),
       step=st.integers(0, 150))
def test_schedules_never_leave_their_interval_and_hit_their_landmarks_exactly(lr, end_fraction, total, step):
    """For every warmup from 0 to 40: the rate at any step lies in [0, lr] ([end, lr] after warmup), and is
    exactly lr at the end of warmup and the start of the decay, exactly the end value from the end on."""
    end = lr * end_fraction
    for warmup in range(41):
        for schedule in (warmup_cosine(lr, end, warmup, total), linear_decay(lr, warmup, total, end)):
            for s in {step, max(warmup - 1, 0), warmup, total, max(warmup, total)}:
                value = schedule(s)
                assert 0.0 <= value <= lr, (schedule, s)  # exactly: not one rounding step above lr
                if s >= warmup:
                    assert end <= value <= lr, (schedule, s)
                if s == warmup - 1 or (s == warmup and total > warmup):
                    assert value == lr, (schedule, s)  # the end of warmup, and the start of the decay
                if s >= max(warmup, total):
                    assert value == end, (schedule, s)


@pytest.mark.parametrize("schedule, step, expected", [
    (warmup_cosine(0.1, 0, 3, 10), 2, 0.1), (linear_decay(0.1, 3, 10), 2, 0.1),
    (warmup_cosine(0.3, 0.03, 5, 100), 5, 0.3), (linear_decay(0.3, 5, 100, 0.03), 5, 0.3),
    (warmup_cosine(0.3, 0.03, 0, 0), 0, 0.03), (linear_decay(0.3, 0, 0, 0.03), 7, 0.03),
])
def test_schedule_boundaries_are_exact(schedule, step, expected):
    assert schedule(step) == expected
