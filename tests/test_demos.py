"""The demos run end to end (briefly: the full runs take minutes)."""

import contextlib
import importlib.util
import io
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def load(name):
    spec = importlib.util.spec_from_file_location(name, DEMOS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_addition_demo_trains_and_scores_held_out_problems(capsys):
    demo = load("addition")
    assert demo.main(["--steps", "40", "--eval-every", "20", "--eval-problems", "64", "--target", "1.01"]) == 1
    out = capsys.readouterr().out
    scores = [float(x) for x in re.findall(r"held-out exact match ([\d.]+)%", out)]
    assert len(scores) == 3 and all(0.0 <= s <= 100.0 for s in scores)  # two evaluations, then the final line
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", out)]
    assert losses[1] < losses[0] < 3.0  # learning from the first steps (uniform guessing is ln 14 = 2.64)


BAD = {"--digits": 1, "--steps": 1, "--batch-size": 1, "--eval-every": 1, "--eval-problems": 1, "--seed": 0}


@given(st.sampled_from(sorted(BAD) + ["--lr", "--target"]), st.data())
def test_addition_demo_refuses_bad_options_in_one_line(option, data):
    if option in BAD:
        value = data.draw(st.integers(max_value=BAD[option] - 1).map(str) | st.sampled_from(["1.5", "x"]))
    else:
        value = data.draw(st.floats(max_value=0.0, exclude_max=option == "--target").map(repr)
                          | st.sampled_from(["nan", "inf", "x"]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = load("addition").main([f"{option}={value}"])
    assert status == 2
    assert re.fullmatch(rf"demos/addition\.py: error: argument {option}: .+\n", err.getvalue()), err.getvalue()


def test_addition_demo_help_gives_every_default():
    actions = [a for a in load("addition").parser()._actions if a.option_strings[0] != "-h"]
    assert len(actions) == 9 and all(a.help and "(default: " in a.help for a in actions)
