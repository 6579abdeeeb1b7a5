"""Triton GPU kernels whose NumPy references are the npformer ops of the same name,
and (in ``kernels.twins``) torch twins of npformer models.

Functional API (torch tensors in, torch tensors out, differentiable)::

    y = kernels.rms_norm(x, weight, eps=1e-6)                        # x: (..., D), weight: (D,)
    y, h = kernels.rms_norm(x, weight, eps, residual=r)              # h = x + r, y = rms_norm(h)
    q_rot, k_rot = kernels.apply_rope(q, k, base=10000.0, offset=0)  # q: (B, H, T, D), k: (B, Hkv, T, D)
    out = kernels.flash_attention(q, k, v, causal=True)              # fused, GQA, FlashAttention-2 schedule
    out = kernels.flash_decode(q, k, v, causal=True)                 # Tq <= 16 queries on a long KV cache: split-KV

Each function lives in the module of its kernel family (``kernels.rmsnorm``,
``kernels.rope``, ``kernels.attention``, ``kernels.decode``), beside its kernels, launchers and
``torch.autograd.Function``; ``import kernels.attention as A`` gives that module.

On a machine without a CUDA device the kernels run under the Triton interpreter:
set ``TRITON_INTERPRET=1`` before triton is first imported (the test suite does).

- ``python -m kernels.aot``: compile every configuration for sm_80 / sm_90 without a
  GPU; registers, spills, shared memory, ``wgmma`` use, read from the cubins Triton built.
- ``python -m kernels.bench``: benchmarks against torch and the NumPy reference.
"""

from ._common import INSTALL_HINT

__all__ = ["apply_rope", "flash_attention", "flash_decode", "rms_norm"]

try:
    from .attention import flash_attention
    from .decode import flash_decode
    from .rmsnorm import rms_norm
    from .rope import apply_rope
except ModuleNotFoundError as _e:  # the core install has neither torch nor triton (the twins need only torch)
    if _e.name not in ("torch", "triton"):
        raise
    _missing = _e.name

    def _unavailable(*args, **kwargs):
        raise ImportError(f"kernels: {_missing} is not installed; install the test extra: {INSTALL_HINT}")

    apply_rope = flash_attention = flash_decode = rms_norm = _unavailable
