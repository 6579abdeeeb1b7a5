"""Bridge to the PyTorch autograd oracle (torch appears in tests/ and kernels/ only)."""

import numpy as np
import torch


def leaf(x: np.ndarray, *, grad: bool = True) -> torch.Tensor:
    """A float64 torch leaf holding the same values as ``x`` (the oracle always runs in float64)."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64).copy())
    return t.requires_grad_(grad)


def backprop(out: torch.Tensor, dout: np.ndarray, *leaves: torch.Tensor):
    """Gradients of ``sum(out * dout)`` with respect to ``leaves`` as NumPy float64 arrays."""
    grads = torch.autograd.grad(out, leaves, grad_outputs=torch.from_numpy(np.array(dout, np.float64)), allow_unused=True)
    return [None if g is None else g.numpy() for g in grads]
