"""The demos run end to end (briefly: the full runs take minutes)."""

import importlib.util
import re
from pathlib import Path

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
