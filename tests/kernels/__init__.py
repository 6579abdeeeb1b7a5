"""Shared set-up of the kernel tests: device, dtypes, tolerances, conversions.

The same tests run on a CUDA device and, without one, under the Triton interpreter on
CPU tensors (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is
imported). The interpreter is slow, so shapes stay small and hypothesis draws a
bounded number of examples (``KERNEL_EXAMPLES``).

Tolerances: a kernel run in ``dtype`` is compared with the float64 reference evaluated
on the *same* (already rounded) inputs, so only the kernel's own rounding is measured.
float32 uses the suite's float32 tolerance; fp16 and bf16 allow four units of the
dtype's machine epsilon (the kernels round the output once and at most one intermediate
-- xhat, P, dS -- once more, with fp32 accumulation in between).

Inputs are also drawn in other memory layouts (``in_layout``): a transposed or
strided view holds the same values and must give the same results.
"""

import importlib

import numpy as np
import torch
from hypothesis import settings

from tests.tolerances import KERNEL_RTOL as TOLERANCES
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# On a GPU, attention launches the first configuration of its table instead of timing
# them all for every new shape; test_attention_kernel.py pins every configuration in turn.
importlib.import_module("kernels.attention").AUTOTUNE = False

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_RTOL = {dtype: TOLERANCES[str(dtype).removeprefix("torch.")] for dtype in KERNEL_DTYPES}

# Hypothesis examples per kernel property: the profile's number (15 in CI), capped where
# the interpreter runs each program in Python.
KERNEL_EXAMPLES = min(settings.default.max_examples, 30 if DEVICE == "cpu" else 100)
few_examples = settings(max_examples=KERNEL_EXAMPLES)


def tensor(rng: np.random.Generator, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values times ``scale``, rounded to ``dtype``, on DEVICE."""
    return torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype=dtype, device=DEVICE)


# The same values in another memory layout (torch has no negative strides).
LAYOUTS = ("contiguous", "transposed", "strided")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in the layout named ``layout``: a view with other strides where it can be."""
    if layout == "contiguous" or t.dim() == 0:
        return t
    if layout == "transposed":  # the axes stored in reverse order, viewed back: no axis has stride 1 but the first
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    if layout == "strided":  # every other element of a buffer twice the size on every axis
        buf = torch.full(tuple(2 * s for s in t.shape), float("nan"), dtype=t.dtype, device=t.device)
        view = buf[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    raise ValueError(f"in_layout: unknown layout {layout!r}")


def f64(t: torch.Tensor) -> np.ndarray:
    """The exact values of ``t`` as a NumPy float64 array (for the references)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def check(actual: torch.Tensor, expected, dtype: torch.dtype, *, scale=None, what=""):
    """``actual`` (a kernel result in ``dtype``) against the float64 ``expected``."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert_close(f64(actual), np.asarray(expected, dtype=np.float64), rtol=KERNEL_RTOL[dtype], scale=scale, what=what)
