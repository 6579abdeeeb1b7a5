"""What every torch twin shares: loading npformer's weights, ending a recording, and a timed step.

``TwinModel`` is the base of ``TwinGPT`` and ``TwinLlama``: ``load_npformer_state`` copies an
npformer ``state_dict`` (the same names, none missing, none extra) and ``stop_recording`` removes
the hooks ``start_recording`` placed. ``make_training_step`` is the baseline of ``npformer
bench``: the same float32 step as npformer's (forward with the loss, backward, AdamW with the
same settings), on the same batch shape, with a given thread count; the median of ``steps``
timed steps after ``warmup``.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import nn

from npformer.bench import best_seconds, interleaved, products_step


class TwinModel(nn.Module):
    """A twin whose submodules of the types in ``recording_modules`` record into ``self.recorder``."""

    recording_modules: tuple = ()

    def stop_recording(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.recorder = None
        for m in self.modules():
            if isinstance(m, self.recording_modules):
                m.recorder = None

    def load_npformer_state(self, state: Dict[str, np.ndarray]) -> None:
        """Copy an npformer ``state_dict`` (same names) into this twin, in the twin's dtype."""
        own = dict(self.named_parameters())
        missing, extra = set(own) - set(state), set(state) - set(own)
        if missing or extra:
            raise ValueError(f"{type(self).__name__}.load_npformer_state: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        with torch.no_grad():
            for name, prm in own.items():
                prm.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))


def make_training_step(make_twin: Callable[..., torch.nn.Module], config: Dict[str, object], batch: int, *,
                       threads: int = 1) -> Callable[[], None]:
    """One training step of ``make_twin(**config)`` at full length ``block_size`` (forward with the loss,
    backward, AdamW as npformer's bench sets it), as a function to call; in the config's ``dtype``
    (float32 where it names none)."""
    torch.set_num_threads(threads)
    model = make_twin(**config).to(torch_dtype(config.get("dtype", "float32")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config["vocab_size"],
                                                              (batch, config["block_size"] + 1)))
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    return step


def time_training_step(make_twin: Callable[..., torch.nn.Module], config: Dict[str, object], batch: int,
                       steps: int, *, warmup: int = 1, threads: int = 1) -> Dict[str, object]:
    """Median seconds of one float32 training step of ``make_twin(**config)`` at full length ``block_size``."""
    step = make_training_step(make_twin, config, batch, threads=threads)
    times = interleaved({"twin": step}, steps, warmup=warmup)["twin"]
    return {"step_s": float(np.median(times)), "torch": torch.__version__, "threads": torch.get_num_threads()}


def torch_dtype(dtype) -> torch.dtype:
    """torch's dtype of a NumPy float dtype or its name ("float32", "float64")."""
    return {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]


def matmul_flops(n: int = 1024, seconds: float = 1.0, dtype="float32") -> float:
    """Best observed FLOP/s of an n x n x n matmul of ``dtype`` in torch (its own BLAS, its thread setting)."""
    a, b = torch.randn(n, n, dtype=torch_dtype(dtype)), torch.randn(n, n, dtype=torch_dtype(dtype))
    out = torch.empty(n, n, dtype=torch_dtype(dtype))
    return 2 * n**3 / best_seconds(lambda: torch.matmul(a, b, out=out), seconds)


def products(shapes, dtype="float32") -> Callable[[], None]:
    """``npformer.bench.products_step`` in torch: the same linear-layer products, in torch's BLAS."""
    generator = torch.Generator().manual_seed(0)
    return products_step(shapes, lambda shape: torch.randn(shape, generator=generator, dtype=torch_dtype(dtype)),
                         lambda a, b, out: torch.matmul(a, b, out=out))


def hidden_keys(T: int, prefix_len=None, window=None) -> torch.Tensor:
    """True where query i may not see key j: the causal mask, narrowed by a sliding ``window`` (query i
    sees i - W < j <= i) or widened by a prefix LM's ``prefix_len`` (B,) (row b's first prefix_len[b]
    positions see each other); (T, T), or (B, 1, T, T) with a prefix."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    hidden = j > i
    if window is not None:
        hidden = hidden | (j <= i - window)
    if prefix_len is not None:
        inside = j[None] < torch.as_tensor(np.asarray(prefix_len))[:, None, None]  # (B, 1, T)
        hidden = (hidden[None] & ~inside)[:, None]
    return hidden


def torch_facts(dtype="float32") -> Dict[str, object]:
    """torch's version, intra-op threads, the BLAS it was built with and its measured ``dtype`` matmul FLOP/s."""
    blas = "unknown"
    for line in torch.__config__.show().splitlines():
        if "BLAS_INFO=" in line:
            blas = line.split("BLAS_INFO=")[1].split(",")[0].strip()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_flops": matmul_flops(dtype=dtype),
            "blas": blas}


# torch's operators (and the autograd nodes that call them) by the npformer op family they belong to;
# an operator not named here (adds, copies, views, sums: the model's glue) takes the family of the
# first named operator above it, else "layer code"
_TORCH_FAMILIES = (
    ("linear", ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::addmv", "AddmmBackward0",
                "MmBackward0", "BmmBackward0")),
    ("attention", ("scaled_dot_product",)),
    ("activations", ("aten::gelu", "GeluBackward")),
    ("layernorm", ("layer_norm", "LayerNormBackward")),
    ("embedding", ("aten::embedding", "EmbeddingBackward", "aten::index", "IndexBackward", "aten::_index_put_impl_")),
    ("cross_entropy", ("cross_entropy", "log_softmax", "nll_loss", "LogSoftmaxBackward", "NllLossBackward")),
)


def _torch_family(name: str):
    for family, keys in _TORCH_FAMILIES:
        if any(key in name for key in keys):
            return family
    return None


def profile_training_step(step: Callable[[], None], steps: int) -> Tuple[Dict[Tuple[str, str], float], float]:
    """Seconds of ``steps`` calls of a twin's training step per (op family, direction), by torch's profiler,
    and the profiled calls' wall seconds. Each operator's own CPU time goes to its family
    (``_TORCH_FAMILIES``, or that of the first operator above it with one), in the direction of the call it
    is under: ``update`` under the optimizer's step, ``backward`` under an autograd node, else ``forward``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t
    seconds: Dict[Tuple[str, str], float] = {}
    for event in prof.events():
        family, direction, node = _torch_family(event.name), "forward", event
        while node is not None:
            if family is None:
                family = _torch_family(node.name)
            if node.name.startswith("Optimizer.step"):
                direction = "update"
            elif direction == "forward" and node.name.startswith("autograd::engine::evaluate_function"):
                direction = "backward"
            node = node.cpu_parent
        family = "optimizer" if direction == "update" else family or "layer code"
        key = (family, direction)
        seconds[key] = seconds.get(key, 0.0) + event.self_cpu_time_total * 1e-6
    return seconds, wall
