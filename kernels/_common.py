"""What the kernel modules share: the interpreter switch, the device check, the
shared-memory limits per architecture, and the message for a missing extra.

This module imports neither torch nor triton, so ``python -m kernels.aot`` and
``python -m kernels.bench`` can say what to install when they are missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Largest dynamic shared memory one block may use (opt-in), by compute capability:
# A100 / A30 (80), the GA10x and Ada consumer parts (86, 89), Orin (87), H100 / H200 (90).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# 32-bit registers of one streaming multiprocessor, all a block's threads together
# (sm_80 and sm_90), and the most one thread may address.
REGISTER_FILE = 64 * 1024
MAX_REGISTERS_PER_THREAD = 255

INSTALL_HINT = "pip install -c constraints.txt -e '.[test]' (or: make test-deps)"


def interpreting() -> bool:
    """True when triton was (or will be) imported with ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(op: str, name: str, x, *, ndim=None, min_ndim=None, dtypes=None):
    """``x`` must be a ``torch.Tensor`` (``TypeError`` otherwise) of ``ndim`` (or at least
    ``min_ndim``) dimensions and one of ``dtypes`` (default: float16, bfloat16, float32)."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' expected {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: argument '{name}' expected at least {min_ndim} dimension(s), "
                         f"got shape {tuple(x.shape)}")
    dtypes = dtypes or (torch.float16, torch.bfloat16, torch.float32)
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: argument '{name}' expected dtype {names}, got {x.dtype}")
    return x


def check_runnable(op: str, t) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op}: tensors on {t.device} need the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported (or move the tensors to a CUDA device)")


def require_extra(command: str) -> bool:
    """True if torch and triton are installed; otherwise print one line naming the extra
    that provides them and return False (the command then exits with status 2)."""
    missing = [name for name in ("torch", "triton") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{command}: needs {' and '.join(missing)}, which the core install leaves out; "
              f"install the test extra: {INSTALL_HINT}", file=sys.stderr)
        return False
    return True
