"""Central finite differences for any forward/backward pair.

From a debugger::

    from npformer import gradcheck
    from npformer.ops.layernorm import layernorm_forward, layernorm_backward
    results = gradcheck.check(layernorm_forward, layernorm_backward,
                              {"x": x, "gamma": g, "beta": b}, wrt=("x", "gamma", "beta"))
    print(gradcheck.format_table(results))

From a shell (the cases each op module lists in its ``gradcheck_cases``)::

    python -m npformer.gradcheck layernorm
    python -m npformer.gradcheck all

The check contracts the op's output with a fixed random upstream gradient ``dout``,
so the scalar ``L = sum(out * dout)`` has ``dL/dinput`` equal to what the backward
returns for that ``dout``. Each input's gradient is compared with

    (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

in float64. The relative error is ``max|analytic - numeric| / max|numeric|``: relative
to the gradient's scale, so entries that are zero up to round-off do not blow it up.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

DEFAULT_EPS = 1e-6
DEFAULT_TOL = 1e-6


@dataclass
class Case:
    """One forward/backward pair on concrete float64 inputs.

    ``wrt`` names, in the order ``backward`` returns them, the input each gradient
    belongs to; ``None`` marks a returned slot to skip (e.g. ``db`` of a bias-free linear).
    Inputs not in ``wrt`` (integer ids, masks) are held fixed.
    """

    name: str
    forward: Callable[..., Any]
    backward: Callable[..., Any]
    inputs: Dict[str, np.ndarray]
    wrt: Sequence[Optional[str]]
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    case: str
    input: str
    shape: tuple
    max_abs: float
    max_rel: float
    ok: bool


def numerical_gradient(f: Callable[[], float], x: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """d f / d x by central differences; ``f`` reads ``x``, which is perturbed in place and restored."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)  # views: x must be contiguous
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + eps
        f_plus = f()
        flat_x[i] = saved - eps
        f_minus = f()
        flat_x[i] = saved
        flat_g[i] = (f_plus - f_minus) / (2.0 * eps)
    return grad


def _as_tuple(grads: Any) -> tuple:
    return grads if isinstance(grads, tuple) else (grads,)


def check(
    forward: Callable[..., Any],
    backward: Callable[..., Any],
    inputs: Dict[str, np.ndarray],
    wrt: Sequence[Optional[str]],
    options: Optional[Dict[str, Any]] = None,
    *,
    name: str = "",
    eps: float = DEFAULT_EPS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
) -> List[Result]:
    """Compare ``backward`` with central differences of ``forward`` for every input in ``wrt``."""
    options = dict(options or {})
    inputs = {k: (np.ascontiguousarray(v, dtype=np.float64) if k in wrt else v) for k, v in inputs.items()}
    out, cache = forward(**inputs, **options)
    dout = np.random.default_rng(seed).standard_normal(np.shape(out))
    analytic = _as_tuple(backward(dout if np.ndim(out) else np.float64(dout), cache))
    if len(analytic) != len(wrt):
        raise ValueError(f"gradcheck {name}: backward returned {len(analytic)} gradients, wrt names {len(wrt)}")

    def loss() -> float:
        return float(np.sum(forward(**inputs, **options)[0] * dout))

    results = []
    for input_name, grad in zip(wrt, analytic):
        if input_name is None:
            continue
        numeric = numerical_gradient(loss, inputs[input_name], eps)
        max_abs = float(np.max(np.abs(grad - numeric))) if numeric.size else 0.0
        scale = float(np.max(np.abs(numeric))) if numeric.size else 0.0
        max_rel = max_abs / max(scale, 1e-12)
        results.append(Result(name, input_name, tuple(numeric.shape), max_abs, max_rel, max_rel <= tol))
    return results


def check_case(case: Case, **kwargs: Any) -> List[Result]:
    return check(case.forward, case.backward, case.inputs, case.wrt, case.options, name=case.name, **kwargs)


def families() -> List[str]:
    """Op families (modules of ``npformer.ops``) that list gradcheck cases."""
    import npformer.ops as ops

    names = [m.name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_")]
    return sorted(n for n in names if hasattr(importlib.import_module(f"npformer.ops.{n}"), "gradcheck_cases"))


def cases(family: str, seed: int = 0) -> List[Case]:
    module = importlib.import_module(f"npformer.ops.{family}")
    return list(module.gradcheck_cases(np.random.default_rng(seed)))


def format_table(results: Sequence[Result]) -> str:
    header = f"{'case':<34} {'input':<8} {'shape':<14} {'max abs err':>12} {'max rel err':>12}  status"
    lines = [header, "-" * len(header)]
    for r in results:
        status = "ok" if r.ok else "FAIL"
        lines.append(f"{r.case:<34} {r.input:<8} {str(r.shape):<14} {r.max_abs:12.2e} {r.max_rel:12.2e}  {status}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m npformer.gradcheck") -> int:
    """Check the named op families; returns 0 if every gradient passes, 1 if one fails, 2 for a bad option."""
    from .cli import OptionError, Parser, check_option
    from .ops._checks import check_count, check_real

    known = families()
    parser = Parser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="+", metavar="FAMILY",
                        help=f"'all', or one or more of: {', '.join(known)}")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help=f"finite-difference step, > 0 (default: {DEFAULT_EPS:g})")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL,
                        help=f"largest relative error that passes, > 0 (default: {DEFAULT_TOL:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the upstream gradient, >= 0 (default: 0)")
    try:
        args = parser.parse_args(argv)
        unknown = [f for f in args.families if f != "all" and f not in known]
        if unknown:
            raise OptionError("FAMILY", f"expected 'all' or op families from {', '.join(known)}, got {unknown}")
        check_option("eps", check_real, args.eps, lo=0.0, lo_open=True)
        check_option("tol", check_real, args.tol, lo=0.0, lo_open=True)
        check_option("seed", check_count, args.seed, lo=0)
    except OptionError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or argparse's own usage error
        return e.code if isinstance(e.code, int) else 2

    wanted = known if "all" in args.families else list(dict.fromkeys(args.families))
    results: List[Result] = []
    for family in wanted:
        for case in cases(family, args.seed):
            results.extend(check_case(case, eps=args.eps, tol=args.tol, seed=args.seed))
    print(format_table(results))
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed (tolerance {args.tol:g} relative, eps {args.eps:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    from npformer.gradcheck import main as _main  # the importable module, not __main__

    sys.exit(_main())
