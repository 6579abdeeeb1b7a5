"""Every op family's gradcheck cases pass (finite differences, independent of torch)."""

import numpy as np
import pytest

from npformer import gradcheck
from tests.tolerances import FD_EPS, FD_RTOL

CASES = [case for family in gradcheck.families() for case in gradcheck.cases(family)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_passes(case):
    results = gradcheck.check_case(case, eps=FD_EPS, tol=FD_RTOL)
    assert results, f"{case.name}: nothing was checked"
    assert all(r.ok for r in results), gradcheck.format_table(results)


def test_numerical_gradient_of_a_known_function():
    x = np.array([0.5, -1.0, 2.0])
    grad = gradcheck.numerical_gradient(lambda: float(np.sum(np.sin(x) * x)), x)
    np.testing.assert_allclose(grad, np.cos(x) * x + np.sin(x), rtol=0, atol=FD_RTOL * 1e-2)
    np.testing.assert_array_equal(x, [0.5, -1.0, 2.0])  # restored after perturbation


def test_a_wrong_backward_is_caught():
    def forward(x):
        return x**2, x

    def wrong_backward(dout, x):
        return 3 * x * dout  # the truth is 2 x dout

    [result] = gradcheck.check(forward, wrong_backward, {"x": np.array([1.0, 2.0])}, wrt=("x",))
    assert not result.ok and result.max_rel == pytest.approx(0.5, rel=1e-6)


def test_command_prints_a_passing_table(capsys):
    assert gradcheck.main(["layernorm"]) == 0
    out = capsys.readouterr().out
    assert "layernorm" in out and "FAIL" not in out and "3 passed, 0 failed" in out
