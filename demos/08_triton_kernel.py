# %% [markdown]
# # 8. A Triton kernel against its NumPy reference
#
# [kernels/attention.py](../kernels/attention.py) is fused attention in Triton, on FlashAttention-2's schedule:
# the (T, T) matrix of probabilities is never stored. Each program holds a tile of
# queries and walks the key tiles, keeping a running maximum $m$, a running sum $\ell$
# and an unnormalised output $a$ that it rescales whenever the maximum grows, the online
# softmax of (FA.3) in [proofs/flash_attention.md](../proofs/flash_attention.md); at the end $o = a/\ell$ and the
# log-sum-exp $\mathrm{lse} = m + \log\ell$ (FA.4) are written. The backward recomputes the
# probabilities from lse (FA.5) and uses $\delta = \mathrm{rowsum}(\bar O \odot O)$ (FA.6) in
# place of the row sums of (ATT.7).
#
# Its reference is the plain attention op, `npformer.ops.attention` (notebook 4):
# same inputs, the reference in float64, the kernel in float32.
#
# Without a GPU the kernel runs in Triton's interpreter, which executes each program in
# NumPy on the CPU: `TRITON_INTERPRET=1` must be set before `triton` is first imported.
# Needs the test extra (`torch`, `triton`).

# %%
import os
import time

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (kernels.attention imports it)

import numpy as np

from kernels.attention import flash_attention
from npformer.ops.attention import attention_backward, attention_forward, causal_mask

t_start = time.perf_counter()
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {device}; Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}")

# %% [markdown]
# ## One comparison
#
# Random q, k, v and an upstream gradient $\bar O$ in float32; the kernel's output,
# lse and gradients (through its `torch.autograd.Function`) against the reference's, run
# in float64 on the very same float32 values, so only the kernel's own rounding is
# measured. The error is $\max|a - b| / \max|b|$.

# %%
def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    actual = actual.detach().cpu().double().numpy()
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def compare(B: int, H: int, Hkv: int, Tq: int, Tk: int, D: int, causal: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q, dout = (torch.from_numpy(rng.standard_normal((B, H, Tq, D))).float() for _ in range(2))
    k, v = (torch.from_numpy(rng.standard_normal((B, Hkv, Tk, D))).float() for _ in range(2))
    q, k, v, dout = (t.to(device) for t in (q, k, v, dout))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    as64 = [t.detach().cpu().double().numpy() for t in (q, k, v, dout)]
    out_ref, cache = attention_forward(*as64[:3], causal=causal)  # (ATT.1)-(ATT.3)
    dq_ref, dk_ref, dv_ref, _ = attention_backward(as64[3], cache)  # (ATT.4)-(ATT.9)
    # lse of (FA.4) from the scores of (ATT.1): log sum_j exp(S_ij) over the visible keys
    S = np.einsum("bhid,bhjd->bhij", as64[0], np.repeat(as64[1], H // Hkv, axis=1)) / np.sqrt(D)
    if causal:
        S = np.where(causal_mask(Tq, Tk), -np.inf, S)
    m = S.max(axis=-1, keepdims=True)
    lse_ref = (m + np.log(np.exp(S - m).sum(axis=-1, keepdims=True)))[..., 0]
    return {"out": relative_error(out, out_ref), "lse": relative_error(lse, lse_ref),
            "dq": relative_error(dq, dq_ref), "dk": relative_error(dk, dk_ref), "dv": relative_error(dv, dv_ref)}


errors = compare(B=1, H=2, Hkv=2, Tq=16, Tk=16, D=16, causal=True)
print({name: f"{e:.1e}" for name, e in errors.items()})
assert max(errors.values()) < 1e-5

# %% [markdown]
# ## Shapes the tiling has to get right
#
# Lengths that are not a multiple of the tile (the interpreter's tiles are 16 wide, so
# 17 and 33 leave a partial tile), head sizes that are not powers of two (padded and
# masked), grouped-query and multi-query attention (H query heads sharing Hkv key/value
# heads; the kernel sums dK and dV over each group, (ATT.12)), more keys than queries
# (the causal mask aligns the last query with the last key), and a single query.

# %%
cases = [
    # B, H, Hkv, Tq, Tk, D, causal
    (2, 2, 2, 17, 17, 24, False),
    (1, 4, 2, 17, 33, 16, True),
    (1, 3, 1, 5, 21, 40, True),
    (2, 2, 1, 1, 16, 16, True),
]
print(f"{'B':>2} {'H':>2} {'Hkv':>3} {'Tq':>3} {'Tk':>3} {'D':>3} {'causal':>6}   "
      + "  ".join(f"{n:>7}" for n in ("out", "lse", "dq", "dk", "dv")))
for B, H, Hkv, Tq, Tk, D, causal in cases:
    errors = compare(B, H, Hkv, Tq, Tk, D, causal, seed=Tq + Tk)
    print(f"{B:2d} {H:2d} {Hkv:3d} {Tq:3d} {Tk:3d} {D:3d} {str(causal):>6}   "
          + "  ".join(f"{e:7.1e}" for e in errors.values()))
    assert max(errors.values()) < 1e-5, (B, H, Hkv, Tq, Tk, D, causal)

# %% [markdown]
# On a GPU, `python -m kernels.bench` times the kernel against torch's attention backends and
# the NumPy reference (TFLOP/s, and the fraction of the device's measured matmul peak); the
# kernel's tests, which draw many more shapes, dtypes (fp16, bf16) and memory layouts, are
# [tests/kernels/test_attention_kernel.py](../tests/kernels/test_attention_kernel.py).

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("08_triton_kernel: all checks passed")
