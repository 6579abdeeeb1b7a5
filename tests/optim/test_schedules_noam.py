"""The Transformer's warmup-inverse-square-root schedule against its formula and torch's LambdaLR."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.optim.schedules import InverseSqrt, inverse_sqrt, noam
from tests.badinput import expect_rejected
from tests.tolerances import RTOL, assert_close


def paper(step: int, d_model: int, warmup: int) -> float:
    """lrate = d_model^-0.5 min(n^-0.5, n warmup^-1.5), n = step + 1 (the paper's step number)."""
    n = step + 1
    return d_model ** -0.5 * min(n ** -0.5, n * warmup ** -1.5)


@given(d_model=st.integers(1, 1024), warmup=st.integers(1, 5000), step=st.integers(0, 100_000),
       scale=st.sampled_from([1.0, 2.0, 0.5]))
def test_inverse_sqrt_equals_the_formula(d_model, warmup, step, scale):
    got = inverse_sqrt(d_model, warmup, scale)(step)
    assert abs(got - scale * paper(step, d_model, warmup)) <= RTOL[np.dtype(np.float64)] * got


@given(d_model=st.integers(1, 512), warmup=st.integers(1, 50))
def test_peak_at_the_last_warmup_update(d_model, warmup):
    s = noam(d_model, warmup)
    lrs = [s(i) for i in range(3 * warmup + 2)]
    assert int(np.argmax(lrs)) == warmup - 1
    assert math.isclose(lrs[warmup - 1], s.peak, rel_tol=1e-12)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # rises through warmup
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # never rises afterwards


def test_matches_lambda_lr():
    d_model, warmup, steps = 64, 7, 40
    schedule = inverse_sqrt(d_model, warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: d_model ** -0.5 * min((s + 1) ** -0.5, (s + 1) * warmup ** -1.5))
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() before optimizer.step()
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    assert_close(np.array([schedule(s) for s in range(steps)]), np.array(lrs), what="inverse_sqrt")


def test_is_a_readable_dataclass():
    s = noam(16, 4)
    assert isinstance(s, InverseSqrt) and s == InverseSqrt(16, 4, 1.0)
    assert "d_model=16" in repr(s) and "warmup=4" in repr(s)


@pytest.mark.parametrize("name, bad", [("d_model", 0), ("d_model", 2.0), ("warmup", 0), ("warmup", True),
                                       ("scale", -1.0), ("scale", float("nan"))])
def test_bad_settings_refused_by_name(name, bad):
    args = dict(d_model=8, warmup=3, scale=1.0)
    args[name] = bad
    expect_rejected(lambda: inverse_sqrt(**args), "inverse_sqrt", name)
    expect_rejected(lambda: InverseSqrt(**args), "InverseSqrt", name)


@pytest.mark.parametrize("step", [-1, 1.0, None, True])
def test_bad_step_refused_by_name(step):
    expect_rejected(lambda: noam(8, 3)(step), "InverseSqrt", "step")
