"""``npformer bench``: time a training step (forward, backward, AdamW) and put it in context.

Reported in one run, on one machine, with one thread count:

- tokens/s of npformer (float32 by default; every figure below is in the config's dtype);
- model-FLOP utilisation: achieved matmul FLOP/s (``flops_per_token`` x tokens/s)
  over the matmul FLOP/s NumPy reaches on this machine, measured here;
- the fast path's settings (``npformer.ops.fastpath``: threads, causal block, whether malloc keeps freed memory);
- the same step in a torch CPU twin of the same config (if torch is installed and
  ``torch_twin`` is on, i.e. no ``--no-torch``) and the ratio npformer / torch; the
  result's ``torch_twin`` says which: ``"ran"``, ``"skipped"`` or ``"torch not installed"``;
  the twin's MFU against the matmul FLOP/s torch reaches, measured the same way, so that the
  two engines' utilisation of their own matmul stands side by side; the two steps take turns,
  round after round, and each figure is a median over the rounds;
- the matrix products of the step's linear layers alone (forward and backward, at the step's own
  shapes), in NumPy and in torch taking turns: the two BLAS compared where the step uses them, since
  their speeds at one large square product can differ from those at the step's thin ones;
- which BLAS NumPy runs, and with how many threads (threadpoolctl, if installed).

``--json`` ends the output with one JSON line holding all of it. ``--profile`` prints instead
where npformer's step goes, by op family, beside the torch twin's (``npformer.bench_profile``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import asdict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .models.gpt import GPT, GPTConfig
from .ops import fastpath
from .ops._checks import check_bool, check_count
from .optim import AdamW

REFERENCE = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, d_model=384, dropout=0.0)


def best_seconds(fn, seconds: float = 1.0) -> float:
    """The shortest of repeated calls of ``fn`` over about ``seconds``, after one untimed call."""
    fn()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n: int = 1024, dtype=np.float32, seconds: float = 1.0) -> float:
    """Best observed FLOP/s of an n x n x n matmul in NumPy."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    return 2 * n**3 / best_seconds(lambda: np.matmul(a, b, out=out), seconds)


def blas_info() -> Dict[str, object]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"note": "threadpoolctl not installed"}
    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return {k: info[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")} if info else {}


def linear_shapes(cfg: GPTConfig, batch: int) -> List[Tuple[int, int, int, int]]:
    """(rows, inputs, outputs, count) of the linear layers one step of ``cfg`` runs on ``batch``
    sequences: per block q, k and v as one (D -> 3D), the output projection (D -> D) and the MLP's two
    (D -> 4D, 4D -> D); the tied head (D -> vocabulary) once."""
    n, d, layers = batch * cfg.block_size, cfg.d_model, cfg.n_layer
    return [(n, d, 3 * d, layers), (n, d, d, layers), (n, d, 4 * d, layers), (n, 4 * d, d, layers),
            (n, d, cfg.vocab_size, 1)]


def products_step(shapes: List[Tuple[int, int, int, int]], array: Callable, matmul: Callable) -> Callable[[], None]:
    """A function making the three weight products of each linear layer of ``shapes`` (``linear_shapes``):
    y = x W^T, dx = dy W and dW = dy^T x, ``count`` times each (the bias gradient's row sum is left out).
    ``array(shape)`` makes an array of an engine and ``matmul(a, b, out)`` multiplies in it, so that
    NumPy and torch run the same products into preallocated outputs. Each shape's arrays are made once
    and reused by every layer of that shape: together (215 MB in float32 at the reference config, 230
    MB with the head's) they outgrow the caches, as a step's activations do."""
    sets = []
    for n, din, dout, count in shapes:
        x, W, dy = array((n, din)), array((dout, din)), array((n, dout))
        sets.append((count, x, W, dy, array((n, dout)), array((n, din)), array((dout, din))))

    def step() -> None:
        for count, x, W, dy, y, dx, dW in sets:
            for _ in range(count):
                matmul(x, W.T, y)  # (LIN.1)
                matmul(dy, W, dx)  # (LIN.3)
                matmul(dy.T, x, dW)  # (LIN.4)

    return step


def numpy_products(shapes: List[Tuple[int, int, int, int]], dtype=np.float32) -> Callable[[], None]:
    """``products_step`` in NumPy, on ``dtype`` arrays."""
    rng = np.random.default_rng(0)
    return products_step(shapes, lambda shape: rng.standard_normal(shape, dtype=dtype),
                         lambda a, b, out: np.matmul(a, b, out=out))


WARMUP = 3  # untimed steps first: the allocator's heap and the BLAS threads reach their steady state


def make_step(cfg: GPTConfig, batch: int):
    """A function running one training step (forward, backward, AdamW) of a fresh ``cfg`` model on
    ``batch`` random sequences of full length: the step every figure of the benchmark times."""
    model = GPT(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        opt.step()

    return step


class Twin(NamedTuple):
    """The torch side of the bench."""

    step: Callable[[], None]  # the twin's training step
    facts: Dict[str, object]  # torch's version, threads, BLAS and matmul FLOP/s (``common.torch_facts``)
    matmul_flops: Callable[[], float]  # measures torch's matmul FLOP/s again, in the step's dtype
    products: Callable[[List[Tuple[int, int, int, int]]], Callable[[], None]]  # ``products_step`` in torch, same dtype


def torch_step(cfg: GPTConfig, batch: int) -> Optional[Twin]:
    """The torch twin's step and facts (``Twin``), or None without torch. The twin lives with the other
    torch code (``kernels/twins/gpt.py``) and is imported by name, only here, so the engine never
    imports torch."""
    made = twin_training_step(cfg, batch)
    if made is None:
        return None
    step, common = made
    return Twin(step, common.torch_facts(cfg.dtype), functools.partial(common.matmul_flops, dtype=cfg.dtype),
                functools.partial(common.products, dtype=cfg.dtype))


def twin_training_step(cfg: GPTConfig, batch: int):
    """(the torch twin's training step of ``cfg`` on ``batch`` sequences, in ``cfg.dtype``, the module
    ``kernels.twins.common``), or None without torch; torch's threads: ``OMP_NUM_THREADS``, else every core."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    twin = importlib.import_module("kernels.twins.gpt")
    common = importlib.import_module("kernels.twins.common")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    return twin.make_training_step(asdict(cfg), batch, threads=threads), common


def interleaved(steps_by_engine: Dict[str, object], rounds: int, warmup: int = WARMUP) -> Dict[str, List[float]]:
    """Seconds of each engine's step, the engines taking turns for ``rounds`` rounds after ``warmup``
    untimed ones each: a machine that speeds up or slows down during the run does so for all of them."""
    for step in steps_by_engine.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps_by_engine}
    for _ in range(rounds):
        for name, step in steps_by_engine.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return times


def run(cfg: GPTConfig = REFERENCE, batch: int = 16, steps: int = 5, torch_twin: bool = True,
        log=print) -> Dict[str, object]:
    """Time ``steps`` training steps of ``cfg`` at ``batch`` sequences, taking turns with the torch
    twin's step when it runs; the figures by name."""
    op = "bench.run"
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"{op}: argument 'cfg' expected a GPTConfig, got {type(cfg).__name__}")
    check_count(op, "batch", batch, lo=1)
    check_count(op, "steps", steps, lo=1)
    check_bool(op, "torch_twin", torch_twin)
    kept = fastpath.keep_freed_memory()  # for both engines: the torch twin runs in this process too
    tokens = batch * cfg.block_size
    dtype = np.dtype(cfg.dtype)  # of every figure: both engines' steps, products and matmul speeds
    peak = matmul_flops(dtype=dtype)
    twin = torch_step(cfg, batch) if torch_twin else None
    engines = {"npformer": make_step(cfg, batch)}
    if twin is not None:
        engines["torch"] = twin.step
    times = interleaved(engines, steps)
    # the linear layers' products alone, in each engine, taking turns as the steps did
    shapes = linear_shapes(cfg, batch)
    products = {"npformer": numpy_products(shapes, dtype)}
    if twin is not None:
        products["torch"] = twin.products(shapes)
    product_times = interleaved(products, steps, warmup=1)
    del products
    # Each engine's matmul speed once more after the rounds, the better of the two kept: a slow moment
    # of the machine during one measurement cannot make a utilisation look higher than it is.
    peak = max(peak, matmul_flops(dtype=dtype))
    log(f"numpy {dtype} matmul: {peak / 1e9:.0f} GFLOP/s ({blas_info()})")
    if twin is not None:
        twin.facts["matmul_flops"] = max(twin.facts["matmul_flops"], twin.matmul_flops())
        log(f"torch {dtype} matmul: {twin.facts['matmul_flops'] / 1e9:.0f} GFLOP/s (BLAS {twin.facts['blas']}, "
            f"{twin.facts['threads']} threads)")
    t_products = {name: float(np.median(t)) for name, t in product_times.items()}
    versus = "" if twin is None else (f", torch {t_products['torch'] * 1e3:.1f} ms; NumPy's "
                                      f"{t_products['torch'] / t_products['npformer']:.2f}x torch's speed")
    log(f"the step's linear-layer products alone (forward and backward, at its shapes): NumPy "
        f"{t_products['npformer'] * 1e3:.1f} ms{versus}")
    t_np = float(np.median(times["npformer"]))
    flops_per_token = cfg.flops_per_token()
    result: Dict[str, object] = {
        "config": {**asdict(cfg), "batch": batch},
        "tokens_per_s": tokens / t_np,
        "step_s": t_np,
        "mfu": flops_per_token * tokens / t_np / peak,
        "matmul_flops": peak,
        "flops_per_token": flops_per_token,
        "blas": blas_info(),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "fastpath": {"threads": fastpath.num_threads(), "causal_block": fastpath.causal_block(),
                     "keeps_freed_memory": kept},
        "products_s": t_products["npformer"],
    }
    log(f"npformer: {result['tokens_per_s']:,.0f} tok/s ({t_np * 1e3:.0f} ms/step), MFU {result['mfu']:.1%} "
        f"of NumPy's matmul")
    result["torch_twin"] = "ran" if twin is not None else "torch not installed" if torch_twin else "skipped"
    t_torch = None if twin is None else float(np.median(times["torch"]))
    result["torch_step_s"] = t_torch
    result["torch_tokens_per_s"] = None if t_torch is None else tokens / t_torch
    result["ratio_vs_torch"] = None if t_torch is None else t_torch / t_np
    result["torch_matmul_flops"] = None if twin is None else twin.facts["matmul_flops"]
    result["torch_mfu"] = None if twin is None else flops_per_token * tokens / t_torch / twin.facts["matmul_flops"]
    # how far the engines' matmuls themselves differ here: the step ratio compares engines only where it is near 1
    result["matmul_ratio_vs_torch"] = None if twin is None else peak / twin.facts["matmul_flops"]
    result["torch_products_s"] = None if twin is None else t_products["torch"]
    result["products_ratio_vs_torch"] = None if twin is None else t_products["torch"] / t_products["npformer"]
    if twin is not None:
        result["machine"]["torch"] = twin.facts["torch"]
        result["machine"]["torch_threads"] = twin.facts["threads"]
        result["machine"]["torch_blas"] = twin.facts["blas"]
        log(f"torch twin: {result['torch_tokens_per_s']:,.0f} tok/s ({t_torch * 1e3:.0f} ms/step), MFU "
            f"{result['torch_mfu']:.1%} of torch's matmul; npformer / torch = {result['ratio_vs_torch']:.2f}x "
            f"(medians of {steps} rounds taking turns), with NumPy's matmul {result['matmul_ratio_vs_torch']:.2f}x "
            "torch's")
    elif torch_twin:
        log("torch twin: not run (torch not installed)")
    else:
        log("torch twin: skipped (--no-torch)")
    return result


def main(args) -> int:
    cfg = GPTConfig(**{**asdict(REFERENCE), **{k: v for k, v in vars(args).items()
                                                 if k in GPTConfig.__dataclass_fields__ and v is not None}})
    if getattr(args, "profile", False):
        from .bench_profile import format_table, profile_step

        fastpath.keep_freed_memory()
        table = profile_step(cfg, batch=args.batch, steps=args.steps, twin=not args.no_torch)
        print(format_table(table))
        if args.json:
            print(json.dumps(table))
        return 0
    result = run(cfg, batch=args.batch, steps=args.steps, torch_twin=not args.no_torch)
    if args.json:
        print(json.dumps(result))
    return 0
