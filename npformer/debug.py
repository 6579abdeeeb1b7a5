"""Find the first place two runs of the same model disagree.

Both runs record named arrays in the order they were produced: npformer through
``Module.start_recording()`` (forward intermediates in execution order, then
gradients in backward order), a reference (e.g. a torch twin) through whatever
hooks it has, under the same names. ``first_divergence`` walks npformer's order
and names the first entry whose difference exceeds the tolerance: the earliest
forward value that is off, or, if the forward agrees, the first gradient on the
way down. That is where a wrong hand-written backward shows itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional

import numpy as np

from .ops._checks import check_real


@dataclass
class Divergence:
    name: str
    index: int  # position in npformer's recording order
    max_abs: float
    max_rel: float  # max |a - b| / max |b|
    shape: tuple
    scale: float  # max |b|

    def __str__(self) -> str:
        return (f"first divergence at '{self.name}' (entry {self.index}, shape {self.shape}): "
                f"max abs diff {self.max_abs:.3e}, relative {self.max_rel:.3e}")


def compare(a: np.ndarray, b: np.ndarray) -> tuple:
    """(max |a - b|, max |a - b| / max |b|, max |b|); infinite differences for mismatched shapes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    if a.shape != b.shape:
        return float("inf"), float("inf"), scale
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    return max_abs, max_abs / max(scale, 1e-300), scale


def divergences(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                names: Optional[Iterable[str]] = None) -> List[Divergence]:
    """Every name both recordings share, in npformer's order, with its differences."""
    out = []
    for i, name in enumerate(names if names is not None else ours):
        if name in reference:
            max_abs, max_rel, scale = compare(ours[name], reference[name])
            out.append(Divergence(name, i, max_abs, max_rel, tuple(np.shape(ours[name])), scale))
    return out


def first_divergence(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                     rtol: float = 1e-6, atol: float = 0.0) -> Optional[Divergence]:
    """The first shared entry with ``max|a - b| > rtol * max|b| + atol``, or None if all agree.

    ``atol`` matters for tensors that are zero in exact arithmetic (the gradient of a key
    bias, which softmax cannot see): their "relative" difference is round-off over round-off.
    """
    op = "first_divergence"
    for name, rec in (("ours", ours), ("reference", reference)):
        if not isinstance(rec, Mapping):
            raise TypeError(f"{op}: argument '{name}' expected a mapping of name -> array (a recording), "
                            f"got {type(rec).__name__}")
    check_real(op, "rtol", rtol, lo=0.0)
    check_real(op, "atol", atol, lo=0.0)
    shared = divergences(ours, reference)
    if not shared:
        raise ValueError("first_divergence: the two recordings share no names")
    return next((d for d in shared if not d.max_abs <= rtol * d.scale + atol), None)
