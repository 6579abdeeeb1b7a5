"""Triton GPU kernels whose NumPy references are the npformer ops of the same name,
and (in ``kernels.twins``) torch twins of npformer models.

Functional API (torch tensors in, torch tensors out, differentiable)::

    y = kernels.rmsnorm(x, weight, eps=1e-6)                    # x: (..., D)
    y, h = kernels.rmsnorm(x, weight, eps, residual=r)          # h = x + r, y = rmsnorm(h)
    q_rot, k_rot = kernels.rope(q, k, base=10000.0, offset=0)   # q: (B, H, T, D), k: (B, Hkv, T, D)
    out = kernels.attention(q, k, v, causal=True)               # fused, GQA, FlashAttention-2 schedule

On a machine without a CUDA device the kernels run under the Triton interpreter:
set ``TRITON_INTERPRET=1`` before triton is first imported (the test suite does).

Each function shares its name with the module that defines it (kernels, launchers,
``torch.autograd.Function``). ``kernels.rmsnorm`` is the function; reach the module's
other names with ``from kernels.rmsnorm import rmsnorm_fwd`` (or
``importlib.import_module("kernels.rmsnorm")``).

- ``python -m kernels.aot``: compile every configuration for sm_80 / sm_90 without a
  GPU; registers, spills, shared memory, ``wgmma`` use.
- ``python -m kernels.bench``: benchmarks against torch and the NumPy reference.
"""

__all__ = ["attention", "rmsnorm", "rope"]

try:
    import triton  # noqa: F401  (no wheels on some platforms: the torch twins still import)
except ImportError as _e:  # pragma: no cover - depends on the platform
    _missing = _e

    def _unavailable(*args, **kwargs):
        raise ImportError(f"kernels: triton is not installed ({_missing})")

    attention = rmsnorm = rope = _unavailable
else:
    from .attention import attention
    from .rmsnorm import rmsnorm
    from .rope import rope
