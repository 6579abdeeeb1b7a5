"""``npformer bench --profile``: where a training step goes, by op family, forward and backward.

The step of ``npformer bench`` (forward, backward, AdamW) runs under ``cProfile``. Each
profiled function's own time goes to the first function up its call chain that names an
op family and a direction:

- an op of ``npformer/ops/<name>.py`` whose name says ``forward`` or ``backward`` (its
  helpers, the rows it hands to threads and the waiting for them climb to it): family
  ``<name>``;
- a layer's or model's ``forward``/``backward`` in ``npformer/nn`` or ``npformer/models``:
  family ``layer code`` (residual sums, reshapes, the glue between ops);
- the optimizer (``npformer/optim``): family ``optimizer``, direction ``update``;
- anything else (``zero_grad``, the loop): ``other``.

A function called from several places splits its time among its callers in proportion to
the time each call path took. Matrix products are inside the ops that make them (``linear``
is almost all matmul; ``attention`` holds its own products), and threads' work shows as the
calling thread's wait. The profiler costs a few percent; the table's total is the profiled
step, printed beside the unprofiled one.

With torch installed (and ``twin`` on), the torch twin's step is profiled the same way by
torch's own profiler (``kernels.twins.common.profile_training_step``: each operator's own time
goes to the family it serves, torch's glue of adds and copies to ``layer code``), and its
milliseconds per family stand in a last column, so that the two engines' steps can be read
family by family.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from typing import Dict, List, Tuple

import numpy as np

PACKAGE = os.path.dirname(os.path.abspath(__file__))
DIRECTIONS = ("forward", "backward", "update")


def _label(func: Tuple[str, int, str]) -> Tuple[str, str] | None:
    """(family, direction) of a profiled function, or None if its time belongs to its callers."""
    path, _, name = func
    if not path.startswith(PACKAGE + os.sep):
        return None
    rel = os.path.relpath(path, PACKAGE).split(os.sep)
    if rel[0] == "optim":
        return "optimizer", "update"
    direction = "backward" if "backward" in name else "forward" if "forward" in name else None
    if direction is None:
        return None
    if rel[0] == "ops" and len(rel) == 2:
        return os.path.splitext(rel[1])[0], direction
    if rel[0] in ("nn", "models"):
        return "layer code", direction
    return None


def attribute(stats: pstats.Stats) -> Dict[Tuple[str, str], float]:
    """Seconds of own time per (family, direction), each function's time climbing its call chain."""
    table = stats.stats  # func -> (calls, primitive calls, own time, cumulative time, callers)
    shares_memo: Dict[tuple, Dict[Tuple[str, str], float]] = {}

    def shares(func, visiting) -> Dict[Tuple[str, str], float]:
        label = _label(func)
        if label is not None:
            return {label: 1.0}
        if func in shares_memo:
            return shares_memo[func]
        callers = {c: v for c, v in table[func][4].items() if c not in visiting and c in table}
        weights = {c: v[3] for c, v in callers.items()}  # cumulative time of func under each caller
        total = sum(weights.values())
        out: Dict[Tuple[str, str], float] = {}
        if total <= 0:
            out = {("other", "forward"): 1.0}
        else:
            for c, w in weights.items():
                for key, f in shares(c, visiting | {func}).items():
                    out[key] = out.get(key, 0.0) + f * w / total
        shares_memo[func] = out
        return out

    seconds: Dict[Tuple[str, str], float] = {}
    for func, (_, _, own, _, _) in table.items():
        for key, f in shares(func, frozenset()).items():
            seconds[key] = seconds.get(key, 0.0) + own * f
    return seconds


def _timed(step, steps: int) -> float:
    """Seconds per call of ``steps`` calls of ``step``."""
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def _rows(seconds: Dict[Tuple[str, str], float], steps: int) -> List[Dict[str, object]]:
    """Seconds per step by family and direction, the families with the most time first."""
    families = sorted({f for f, _ in seconds}, key=lambda f: -sum(seconds.get((f, d), 0.0) for d in DIRECTIONS))
    rows: List[Dict[str, object]] = []
    for family in families:
        per = {d: seconds.get((family, d), 0.0) / steps for d in DIRECTIONS}
        rows.append({"family": family, **per, "total": sum(per.values())})
    return rows


def profile_step(cfg, batch: int, steps: int, warmup: int = 3, twin: bool = False) -> Dict[str, object]:
    """Profile ``steps`` training steps of ``cfg`` (after ``warmup``): rows of seconds per step by family;
    with ``twin`` and torch installed, the torch twin's too, under ``"twin"`` (else that is None)."""
    from .bench import make_step, twin_training_step

    step = make_step(cfg, batch)
    for _ in range(warmup):
        step()
    plain = _timed(step, steps)
    profiler = cProfile.Profile()
    profiler.enable()
    profiled = _timed(step, steps)
    profiler.disable()
    rows = _rows(attribute(pstats.Stats(profiler)), steps)
    result = {"rows": rows, "step_s": plain, "profiled_step_s": profiled,
              "attributed_s": float(np.sum([r["total"] for r in rows])), "twin": None}
    made = twin_training_step(cfg, batch) if twin else None
    if made is not None:
        twin_step, common = made
        for _ in range(warmup):
            twin_step()
        twin_plain = _timed(twin_step, steps)
        seconds, wall = common.profile_training_step(twin_step, steps)
        twin_rows = _rows(seconds, steps)
        result["twin"] = {"rows": twin_rows, "step_s": twin_plain, "profiled_step_s": wall / steps,
                          "attributed_s": float(np.sum([r["total"] for r in twin_rows]))}
    return result


def format_table(result: Dict[str, object]) -> str:
    """The profile as a Markdown table: ms per step by family and direction, and share of the step; with
    the twin's profile, a last column of the twin's ms per family (its families npformer lacks below)."""
    total, twin = result["attributed_s"], result.get("twin")
    twin_ms = {} if twin is None else {r["family"]: r["total"] * 1e3 for r in twin["rows"]}
    last = " torch twin ms |" if twin is not None else ""
    lines = ["| op family | forward ms | backward ms | update ms | total ms | share |" + last,
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if twin is not None else "")]

    def twin_cell(family: str) -> str:
        if twin is None:
            return ""
        return f" {twin_ms[family]:.1f} |" if family in twin_ms else " |"

    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['forward'] * 1e3:.1f} | {r['backward'] * 1e3:.1f} | "
                     f"{r['update'] * 1e3:.1f} | {r['total'] * 1e3:.1f} | {r['total'] / total:.1%} |"
                     + twin_cell(r["family"]))
    ours = {r["family"] for r in result["rows"]}
    for family in (f for f in twin_ms if f not in ours):
        lines.append(f"| {family} | | | | | |" + twin_cell(family))
    lines.append(f"| **step** | | | | **{total * 1e3:.1f}** | 100% |"
                 + ("" if twin is None else f" **{twin['attributed_s'] * 1e3:.1f}** |"))
    lines.append("")
    lines.append(f"Profiled step {result['profiled_step_s'] * 1e3:.0f} ms; the same step unprofiled "
                 f"{result['step_s'] * 1e3:.0f} ms.")
    if twin is not None:
        lines.append(f"The torch twin's profiled step {twin['profiled_step_s'] * 1e3:.0f} ms; unprofiled "
                     f"{twin['step_s'] * 1e3:.0f} ms.")
    return "\n".join(lines)
