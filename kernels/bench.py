"""Benchmark the Triton kernels against torch and the npformer NumPy references.

    python -m kernels.bench                    # the full sweep, into runs/kernels/<device>/
    python -m kernels.bench --quick            # fewer sizes and repetitions
    python -m kernels.bench --no-aot           # skip the static compile report
    python -m kernels.bench --commit-results   # into kernels/results/ (the committed results)

On a CUDA device, in one run:

- the device's measured peaks: copy bandwidth (``y.copy_(x)`` of 1 GiB) and bf16
  matmul FLOP/s (8192^3 ``torch.matmul``);
- RMSNorm, RoPE (memory bound: GB/s, fraction of copy bandwidth) and attention
  (TFLOP/s, fraction of the matmul peak), forward and forward+backward, Triton vs
  torch eager, ``F.rms_norm`` and the SDPA backends (flash, cuDNN, memory-efficient,
  each through ``torch.nn.attention.sdpa_kernel``);
- split-KV decoding (one query per sequence against a long KV cache; GB/s of K and V,
  fraction of copy bandwidth), Triton vs the SDPA backends;
- the NumPy reference on the CPU at a CPU-sized problem, as a throughput, and the
  Triton speedup over it (throughput ratio, since the sizes differ), with the BLAS
  library NumPy runs and its threads (threadpoolctl);
- the static AOT report (registers, spills, shared memory, wgmma) of ``kernels.aot``.

Without a CUDA device: a small correctness sweep of every kernel under the Triton
interpreter, the NumPy (and torch CPU) timings, the AOT report; the GPU figures are
absent and the JSON says so.

Results go to ``runs/kernels/<device>/<device>.json``, ``.md`` and ``.png`` (or the
folder ``--out`` names), stamped with the device, the library versions, the date and
the command line; only ``--commit-results`` writes the committed copies in
``kernels/results/``. The last line printed is one JSON object: per kernel, the best
and worst speedup over the fastest torch implementation and the best and worst
fraction of the device peak.

Without torch and triton (the core install) the command says which extra to install
and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from kernels._common import require_extra

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path("runs") / "kernels"
DEVICE = "cuda"

# GPU problem sizes, full and --quick.
SWEEP = {
    False: {"rmsnorm_rows": 16384, "rmsnorm_hidden": [1024, 2048, 4096, 8192, 16384, 65536],
            "rope_lengths": [512, 1024, 2048, 4096, 8192], "attention_tokens": 16384,
            "attention_lengths": [512, 1024, 2048, 4096, 8192],
            # (head size, causal, H, Hkv)
            "attention_cases": [(128, False, 16, 16), (128, True, 16, 16), (64, True, 32, 32), (128, True, 32, 8)],
            # one decoding step: batch, key lengths of the cache
            "decode_batch": 8, "decode_lengths": [1024, 4096, 16384, 65536]},
    True: {"rmsnorm_rows": 8192, "rmsnorm_hidden": [1024, 4096, 16384], "rope_lengths": [1024, 4096],
           "attention_tokens": 16384, "attention_lengths": [1024, 4096],
           "attention_cases": [(128, False, 16, 16), (128, True, 16, 16), (128, True, 32, 8)],
           "decode_batch": 8, "decode_lengths": [4096, 32768]},
}


def _reexec_for_interpreter() -> None:
    """Without CUDA the kernels need the interpreter, chosen before triton is imported."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    sys.exit(subprocess.call([sys.executable, "-m", "kernels.bench", *sys.argv[1:]], env=env))


# ---------------------------------------------------------------------------------------
# timing helpers


def cpu_time(fn, *, repeat: int = 5, min_time: float = 0.05) -> float:
    """Median seconds per call of ``fn`` on the CPU (each sample runs >= ``min_time``)."""
    fn()
    n, samples = 1, []
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 12:
            break
        n *= 2
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    samples.sort()
    return samples[len(samples) // 2]


def gpu_time(fn, quick: bool) -> float:
    """Median seconds per call on the GPU (``triton.testing.do_bench``)."""
    import triton.testing

    fn()  # compile / autotune outside the timed region
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                   return_mode="median") * 1e-3


def try_time(fn, quick):
    try:
        return gpu_time(fn, quick)
    except Exception as e:  # a backend that does not support a shape is recorded, not fatal
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


# ---------------------------------------------------------------------------------------
# peaks


def cuda_peaks(quick: bool) -> dict:
    import torch

    x = torch.empty(1 << 29, dtype=torch.float16, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = gpu_time(lambda: y.copy_(x), quick)
    copy = 2 * x.numel() * x.element_size() / t
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = gpu_time(lambda: a @ b, quick)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy / 1e9, "bf16_matmul_TFLOPs": 2 * n ** 3 / t / 1e12}


def numpy_peaks() -> dict:
    import numpy as np

    x = np.ones(1 << 25, np.float32)  # 128 MiB
    y = np.empty_like(x)
    t = cpu_time(lambda: np.copyto(y, x), repeat=3)
    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    tm = cpu_time(lambda: a @ a, repeat=3)
    return {"copy_GBps": 2 * x.nbytes / t / 1e9, "f32_matmul_GFLOPs": 2 * n ** 3 / tm / 1e9}


# ---------------------------------------------------------------------------------------
# torch baselines


def torch_rmsnorm(x, w, eps=1e-6):
    """LlamaRMSNorm in torch eager: weight * (x_f32 * rsqrt(mean(x^2) + eps)).to(dtype)."""
    import torch

    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rope_tables(T, D, device, base=10000.0):
    import torch

    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    freqs = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def torch_rope(q, k, cos, sin):
    """Hugging Face LLaMA's apply_rotary_pos_emb (cos/sin precomputed, in the input dtype)."""
    import torch

    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def torch_attention_eager(q, k, v, causal):
    import torch

    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        hidden = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def sdpa(backend_name):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return run


# ---------------------------------------------------------------------------------------
# GPU sweeps


def _fwd_bwd(f, inputs, grads):
    import torch

    def run():
        out = f(*inputs)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), inputs, grads)

    return run


def _record(rows, kernel, shape, mode, impl, t, work, unit, peak):
    """One measurement: seconds, throughput in ``unit`` (GB/s or TFLOP/s) and fraction of ``peak``."""
    row = {"kernel": kernel, "shape": shape, "mode": mode, "impl": impl}
    if isinstance(t, str):
        row.update(seconds=None, error=t)
    else:
        thr = work / t / (1e9 if unit == "GB/s" else 1e12)
        row.update(seconds=t, throughput=thr, unit=unit, fraction_of_peak=thr / peak)
    rows.append(row)


def gpu_rmsnorm(rows, peaks, quick):
    import torch
    import torch.nn.functional as F

    import kernels

    N = SWEEP[quick]["rmsnorm_rows"]
    for D in SWEEP[quick]["rmsnorm_hidden"]:
        n = N if D <= 16384 else max(1, N // 8)
        x = torch.randn(n, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        w = torch.randn(D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        dy = torch.randn_like(x)
        e = x.element_size()
        impls = {"triton": lambda a, b: kernels.rms_norm(a, b), "torch eager": torch_rmsnorm,
                 "torch F.rms_norm": lambda a, b: F.rms_norm(a, (D,), b, 1e-6)}
        shape = f"{n}x{D} bf16"
        for name, f in impls.items():
            _record(rows, "rmsnorm", shape, "fwd", name, try_time(lambda: f(x, w), quick),
                    2 * n * D * e, "GB/s", peaks["copy_GBps"])
            _record(rows, "rmsnorm", shape, "fwd+bwd", name, try_time(_fwd_bwd(f, (x, w), (dy,)), quick),
                    5 * n * D * e, "GB/s", peaks["copy_GBps"])


def gpu_rope(rows, peaks, quick):
    import torch

    import kernels

    B, H, Hkv, D = 4, 32, 8, 128
    for T in SWEEP[quick]["rope_lengths"]:
        q = torch.randn(B, H, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        cos, sin = torch_rope_tables(T, D, DEVICE)
        work = 2 * (q.numel() + k.numel()) * q.element_size()
        shape = f"B{B} H{H}/{Hkv} T{T} D{D} bf16"
        for name, f in {"triton": lambda a, b: kernels.apply_rope(a, b),
                        "torch eager": lambda a, b: torch_rope(a, b, cos, sin)}.items():
            _record(rows, "rope", shape, "fwd", name, try_time(lambda: f(q, k), quick), work, "GB/s",
                    peaks["copy_GBps"])
            _record(rows, "rope", shape, "fwd+bwd", name, try_time(_fwd_bwd(f, (q, k), (dq, dk)), quick),
                    2 * work, "GB/s", peaks["copy_GBps"])


def gpu_attention(rows, peaks, quick):
    import torch

    import kernels

    tokens = SWEEP[quick]["attention_tokens"]
    for D, causal, H, Hkv in SWEEP[quick]["attention_cases"]:
        for T in SWEEP[quick]["attention_lengths"]:
            B = max(1, tokens // T)
            q = torch.randn(B, H, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
            k = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
            v = torch.randn(B, Hkv, T, D, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
            do = torch.randn_like(q)
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            shape = f"B{B} H{H}/{Hkv} T{T} D{D} {'causal' if causal else 'full'} bf16"
            impls = {"triton": lambda a, b, c: kernels.flash_attention(a, b, c, causal=causal)}
            for backend, label in (("FLASH_ATTENTION", "sdpa flash"), ("CUDNN_ATTENTION", "sdpa cudnn"),
                                   ("EFFICIENT_ATTENTION", "sdpa efficient")):
                impls[label] = (lambda f: lambda a, b, c: f(a, b, c, causal))(sdpa(backend))
            if T <= 4096:
                impls["torch eager"] = lambda a, b, c: torch_attention_eager(a, b, c, causal)
            for name, f in impls.items():
                _record(rows, "attention", shape, "fwd", name, try_time(lambda: f(q, k, v), quick), flops,
                        "TFLOP/s", peaks["bf16_matmul_TFLOPs"])
                _record(rows, "attention", shape, "fwd+bwd", name,
                        try_time(_fwd_bwd(f, (q, k, v), (do,)), quick), 3.5 * flops, "TFLOP/s",
                        peaks["bf16_matmul_TFLOPs"])
            del q, k, v, do
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def gpu_decode(rows, peaks, quick):
    """One decoding step: one query per sequence (32 query heads, 8 key/value heads, D = 128,
    bf16) against a long KV cache. Memory bound: GB/s of K and V read once, as a fraction of
    the copy bandwidth; the split-KV kernel against the SDPA backends. (Tq = 1 sees every
    key, causal or not: SDPA's ``is_causal`` aligns to the top-left, so both run unmasked.)"""
    import torch

    from kernels.decode import flash_decode

    B, H, Hkv, D = SWEEP[quick]["decode_batch"], 32, 8, 128
    for Tk in SWEEP[quick]["decode_lengths"]:
        q = torch.randn(B, H, 1, D, dtype=torch.bfloat16, device=DEVICE)
        k = torch.randn(B, Hkv, Tk, D, dtype=torch.bfloat16, device=DEVICE)
        v = torch.randn(B, Hkv, Tk, D, dtype=torch.bfloat16, device=DEVICE)
        shape = f"B{B} H{H}/{Hkv} Tq1 Tk{Tk} D{D} bf16"
        impls = {"triton": lambda a, b, c: flash_decode(a, b, c, causal=False)}
        for backend, label in (("FLASH_ATTENTION", "sdpa flash"), ("CUDNN_ATTENTION", "sdpa cudnn"),
                               ("EFFICIENT_ATTENTION", "sdpa efficient")):
            impls[label] = (lambda f: lambda a, b, c: f(a, b, c, False))(sdpa(backend))
        with torch.no_grad():
            for name, f in impls.items():
                _record(rows, "decode", shape, "fwd", name, try_time(lambda: f(q, k, v), quick),
                        2 * k.numel() * k.element_size(), "GB/s", peaks["copy_GBps"])
        del q, k, v
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# NumPy references (CPU) and, without a GPU, the interpreter sweep


def numpy_timings(quick: bool) -> list:
    """The npformer references on the CPU at CPU-sized problems, with torch CPU beside them."""
    import numpy as np
    import torch

    from npformer.ops.flash_attention import flash_attention_backward, flash_attention_forward
    from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
    from npformer.ops.rope import rope_backward, rope_forward

    rng = np.random.default_rng(0)
    out = []
    # one torch thread: its thread pool contends badly with anything else on a small machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def add(kernel, shape, mode, impl, t, work, unit):
        thr = work / t / (1e9 if unit == "GB/s" else 1e12)
        out.append({"kernel": kernel, "shape": shape, "mode": mode, "impl": impl, "seconds": t,
                    "throughput": thr, "unit": unit})

    N, D = (512, 1024) if quick else (2048, 2048)
    x, w = rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    y, cache = rmsnorm_forward(x, w)
    shape = f"{N}x{D} f32"
    add("rmsnorm", shape, "fwd", "numpy", cpu_time(lambda: rmsnorm_forward(x, w)), 2 * x.nbytes, "GB/s")
    add("rmsnorm", shape, "fwd+bwd", "numpy",
        cpu_time(lambda: rmsnorm_backward(y, rmsnorm_forward(x, w)[1])), 5 * x.nbytes, "GB/s")
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    add("rmsnorm", shape, "fwd", "torch cpu", cpu_time(lambda: torch_rmsnorm(tx, tw)), 2 * x.nbytes, "GB/s")

    B, H, T, Dh = (1, 8, 256, 64) if quick else (2, 16, 1024, 64)
    q = rng.standard_normal((B, H, T, Dh)).astype(np.float32)
    shape = f"B{B} H{H} T{T} D{Dh} f32"
    add("rope", shape, "fwd", "numpy", cpu_time(lambda: rope_forward(q)), 2 * q.nbytes, "GB/s")
    yq, rc = rope_forward(q)
    add("rope", shape, "fwd+bwd", "numpy", cpu_time(lambda: rope_backward(yq, rope_forward(q)[1])),
        4 * q.nbytes, "GB/s")

    B, H, T, Dh = (1, 4, 256, 64) if quick else (1, 8, 1024, 64)
    q, k, v = (rng.standard_normal((B, H, T, Dh)).astype(np.float32) for _ in range(3))
    flops = 4 * B * H * T * T * Dh * 0.5
    shape = f"B{B} H{H} T{T} D{Dh} causal f32"
    add("attention", shape, "fwd", "numpy", cpu_time(lambda: flash_attention_forward(q, k, v, causal=True), repeat=3),
        flops, "TFLOP/s")
    o, fc = flash_attention_forward(q, k, v, causal=True)
    add("attention", shape, "fwd+bwd", "numpy",
        cpu_time(lambda: flash_attention_backward(o, flash_attention_forward(q, k, v, causal=True)[1]), repeat=3),
        3.5 * flops, "TFLOP/s")
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    add("attention", shape, "fwd", "torch cpu",
        cpu_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True), repeat=3),
        flops, "TFLOP/s")
    torch.set_num_threads(threads)
    return out


def interpreter_sweep() -> list:
    """Each kernel on small shapes (interpreter or GPU) against the float64 NumPy reference."""
    import numpy as np
    import torch

    import kernels
    import kernels.decode
    from npformer.ops.attention import attention_backward, attention_forward
    from npformer.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
    from npformer.ops.rope import rope_backward, rope_forward

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # four units of round-off for fp16/bf16 (as tests/kernels), the suite's 1e-4 for fp32
    rtol = {torch.float32: 1e-4, torch.float16: 4 * torch.finfo(torch.float16).eps,
            torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}
    rng = np.random.default_rng(0)
    rows = []

    def t(shape, dtype):
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype=dtype, device=device).requires_grad_()

    def f64(x):
        return x.detach().double().cpu().numpy()

    def err(a, b):
        b = np.asarray(b, np.float64)
        return float(np.max(np.abs(f64(a) - b)) / max(np.max(np.abs(b)), 1e-30))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        for wtype in (dtype, torch.float32) if dtype != torch.float32 else (dtype,):
            x, w = t((6, 40), dtype), t((40,), wtype)
            y = kernels.rms_norm(x, w)
            dy = torch.randn_like(y)
            dx, dw = torch.autograd.grad(y, (x, w), dy)
            yr, c = rmsnorm_forward(f64(x), f64(w))
            dxr, dwr = rmsnorm_backward(f64(dy), c)
            shape = "6x40" + ("" if wtype == dtype else ", float32 weight")
            rows.append({"kernel": "rmsnorm", "dtype": name, "shape": shape,
                         "max_rel_err": max(err(y, yr), err(dx, dxr), err(dw, dwr)), "rtol": rtol[dtype]})

        q, k = t((2, 4, 9, 16), dtype), t((2, 2, 9, 16), dtype)
        qr, kr = kernels.apply_rope(q, k, offset=3)
        dq, dk = torch.randn_like(qr), torch.randn_like(kr)
        gq, gk = torch.autograd.grad((qr, kr), (q, k), (dq, dk))
        e = 0.0
        for a, ga, xin, d in ((qr, gq, q, dq), (kr, gk, k, dk)):
            ref, c = rope_forward(f64(xin), offset=3)
            e = max(e, err(a, ref), err(ga, rope_backward(f64(d), c)))
        rows.append({"kernel": "rope", "dtype": name, "shape": "q 2x4x9x16, k 2x2x9x16", "max_rel_err": e,
                     "rtol": rtol[dtype]})

        for causal in (False, True):
            q, k, v = t((1, 4, 20, 24), dtype), t((1, 2, 33, 24), dtype), t((1, 2, 33, 24), dtype)
            o = kernels.flash_attention(q, k, v, causal=causal)
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            ref, c = attention_forward(f64(q), f64(k), f64(v), causal=causal)
            gr = attention_backward(f64(do), c)[:3]
            rows.append({"kernel": "attention", "dtype": name, "shape": f"q 1x4x20x24, kv 1x2x33x24 causal={causal}",
                         "max_rel_err": max([err(o, ref)] + [err(a, b) for a, b in zip(g, gr)]),
                         "rtol": rtol[dtype]})

        q, k, v = t((2, 8, 3, 40), dtype), t((2, 2, 37, 40), dtype), t((2, 2, 37, 40), dtype)
        o = kernels.decode.flash_decode(q, k, v, causal=True, num_splits=3)
        ref, _ = attention_forward(f64(q), f64(k), f64(v), causal=True)
        rows.append({"kernel": "decode", "dtype": name, "shape": "q 2x8x3x40, kv 2x2x37x40 causal, 3 splits",
                     "max_rel_err": err(o, ref), "rtol": rtol[dtype]})
    for r in rows:
        r["ok"] = r["max_rel_err"] <= r["rtol"]
    return rows


# ---------------------------------------------------------------------------------------
# output


def _versions() -> dict:
    import numpy as np
    import torch
    import triton

    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
         "numpy": np.__version__}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarise(rows: list) -> dict:
    """Per kernel: best/worst speedup of Triton over the fastest torch implementation of the
    same shape and mode, and best/worst fraction of the device peak (Triton)."""
    out = {}
    for kernel in sorted({r["kernel"] for r in rows}):
        ratios, fractions = [], []
        for key in sorted({(r["shape"], r["mode"]) for r in rows if r["kernel"] == kernel}):
            group = [r for r in rows if r["kernel"] == kernel and (r["shape"], r["mode"]) == key and r["seconds"]]
            tri = [r for r in group if r["impl"] == "triton"]
            torch_t = [r["seconds"] for r in group if r["impl"] != "triton"]
            if tri:
                fractions.append(tri[0]["fraction_of_peak"])
                if torch_t:
                    ratios.append(min(torch_t) / tri[0]["seconds"])
        out[kernel] = {
            "speedup_vs_best_torch": {"best": max(ratios), "worst": min(ratios)} if ratios else None,
            "fraction_of_peak": {"best": max(fractions), "worst": min(fractions)} if fractions else None,
        }
    return out


def speedups_over_numpy(rows: list, numpy_rows: list) -> list:
    """Triton throughput / NumPy throughput for the same kernel and mode (different sizes)."""
    out = []
    for n in (r for r in numpy_rows if r["impl"] == "numpy"):
        tri = [r for r in rows if r["kernel"] == n["kernel"] and r["mode"] == n["mode"] and r["impl"] == "triton"
               and r["seconds"]]
        if tri:
            best = max(tri, key=lambda r: r["throughput"])
            out.append({"kernel": n["kernel"], "mode": n["mode"], "triton_shape": best["shape"],
                        "numpy_shape": n["shape"], "speedup": best["throughput"] / n["throughput"]})
    return out


def write_markdown(path: Path, result: dict) -> None:
    lines = [f"# Kernel benchmark: {result['device']}", "",
             f"{result['date']} · " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             f"Made by `{result['command']}`.", ""]
    if result["gpu"]:
        p = result["peaks"]
        lines += [f"Measured peaks: copy {p['copy_GBps']:.0f} GB/s, bf16 matmul {p['bf16_matmul_TFLOPs']:.0f} TFLOP/s.",
                  "", "| kernel | shape | mode | impl | ms | throughput | of peak |", "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            if r["seconds"]:
                lines.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['impl']} | {r['seconds'] * 1e3:.3f} "
                             f"| {r['throughput']:.1f} {r['unit']} | {r['fraction_of_peak']:.0%} |")
            else:
                lines.append(f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['impl']} | - | {r['error']} | - |")
        lines += ["", "## Speedup over the NumPy reference (throughput ratio)", "",
                  "| kernel | mode | Triton at | NumPy at | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {s['kernel']} | {s['mode']} | {s['triton_shape']} | {s['numpy_shape']} | {s['speedup']:.0f}x |"
                  for s in result["speedup_over_numpy"]]
    else:
        lines += ["**No CUDA device: GPU figures are absent.** The kernels ran under the Triton interpreter "
                  "for correctness only.", "", "## Interpreter correctness sweep (vs float64 NumPy reference)", "",
                  "| kernel | dtype | shape | max rel err | tolerance | ok |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {r['max_rel_err']:.2e} | {r['rtol']:.1e} | "
                  f"{'yes' if r['ok'] else 'NO'} |" for r in result["interpreter_sweep"]]
    np_peaks = result["numpy_peaks"]
    blas = result["numpy_blas"]
    blas_text = (f"{blas.get('internal_api')} {blas.get('version')} ({blas.get('architecture')} kernels, "
                 f"{blas.get('num_threads')} threads)" if blas.get("internal_api") else blas.get("note", "unknown"))
    lines += ["", f"## NumPy reference on the CPU ({result['cpu']}; torch CPU with one thread)", "",
              f"NumPy's BLAS: {blas_text}. Measured: copy {np_peaks['copy_GBps']:.1f} GB/s, "
              f"f32 matmul {np_peaks['f32_matmul_GFLOPs']:.0f} GFLOP/s.",
              "", "| kernel | shape | mode | impl | ms | throughput |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['shape']} | {r['mode']} | {r['impl']} | {r['seconds'] * 1e3:.2f} | "
              f"{r['throughput'] * (1e3 if r['unit'] == 'TFLOP/s' else 1):.2f} "
              f"{'GFLOP/s' if r['unit'] == 'TFLOP/s' else r['unit']} |" for r in result["numpy"]]
    if result.get("aot"):
        a = result["aot"]
        lines += ["", "## Static compile report (kernels.aot)", "",
                  f"{a['builds']} builds for sm_80 and sm_90, {a['failed']} not compiled, {a['spilling']} spilling, "
                  f"{a['failing_a_check']} failing a check, "
                  f"max shared memory {a['max_shared_KiB']:.0f} KiB, sm_90 fp16/bf16 attention builds with wgmma: "
                  f"{a['sm90_attention_wgmma']}.", "", "```", a["table"], "```"]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, result: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if result["gpu"]:
        kernels_ = ["rmsnorm", "rope", "attention"]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for ax, kernel in zip(axes, kernels_):
            rows = [r for r in result["rows"] if r["kernel"] == kernel and r["seconds"] and r["mode"] == "fwd+bwd"]
            shapes = list(dict.fromkeys(r["shape"] for r in rows))
            impls = list(dict.fromkeys(r["impl"] for r in rows))
            width = 0.8 / max(1, len(impls))
            for i, impl in enumerate(impls):
                vals = [next((r["fraction_of_peak"] for r in rows if r["shape"] == s and r["impl"] == impl), 0)
                        for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels(shapes, rotation=60, ha="right", fontsize=6)
            ax.set_title(f"{kernel} fwd+bwd")
            ax.set_ylabel("fraction of measured peak")
            ax.legend(fontsize=7)
    else:
        fig, ax = plt.subplots(figsize=(8, 4))
        rows = result["numpy"]
        labels = [f"{r['kernel']} {r['mode']}\n{r['impl']}" for r in rows]
        ax.bar(range(len(rows)), [r["seconds"] * 1e3 for r in rows])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("ms per call (CPU)")
        ax.set_title("NumPy references on the CPU (no GPU: Triton figures absent)")
    fig.suptitle(f"{result['device']} · {result['date']} · triton {result['versions']['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def aot_summary(reports: list) -> dict:
    from kernels.aot import format_report

    ok = [r for r in reports if r["ok"]]
    attn = [r for r in ok if r["arch"] == 90 and r["kernel"] in ("attention.fwd", "attention.dkdv", "attention.dq")
            and r["dtype"] in ("fp16", "bf16")]
    return {"builds": len(reports), "failed": len(reports) - len(ok),
            "spilling": sum(r["spill_stores"] + r["spill_loads"] > 0 for r in ok),
            "failing_a_check": sum(bool(r["failures"]) for r in reports),
            "max_shared_KiB": max((r["shared"] for r in ok), default=0) / 1024,
            "sm90_attention_wgmma": f"{sum(r['wgmma'] for r in attn)}/{len(attn)}",
            "table": format_report(reports)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (default: the full sweep)")
    parser.add_argument("--no-aot", action="store_true", help="skip the static compile report (default: include it)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="folder for the result files (default: runs/kernels/<device>/)")
    where.add_argument("--commit-results", action="store_true",
                       help="write the committed result files in kernels/results/ (default: a run folder)")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace, device: str) -> Path:
    """Where the result files go: a run folder, unless the committed results are asked for."""
    if args.commit_results:
        return RESULTS
    return args.out if args.out is not None else RUNS / device


def main(argv=None) -> int:
    args = parse_args(argv)
    if not require_extra("kernels.bench"):
        return 2
    _reexec_for_interpreter()

    import torch

    from npformer.bench import blas_info

    t0 = time.time()
    gpu = torch.cuda.is_available()
    device = _slug(torch.cuda.get_device_name()) if gpu else f"cpu-{_slug(platform.machine())}"
    command = "python -m kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"device": device, "gpu": gpu, "cpu": _cpu_name(), "versions": _versions(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "command": command.strip()}
    rows = []
    if gpu:
        print(f"device {torch.cuda.get_device_name()}: measuring peaks ...", flush=True)
        result["peaks"] = cuda_peaks(args.quick)
        print(json.dumps(result["peaks"]), flush=True)
        for name, sweep in (("rmsnorm", gpu_rmsnorm), ("rope", gpu_rope), ("attention", gpu_attention),
                            ("decode", gpu_decode)):
            print(f"{name} ...", flush=True)
            sweep(rows, result["peaks"], args.quick)
        result["interpreter_sweep"] = None
    else:
        result["gpu_results_absent"] = True
        result["note"] = ("no CUDA device: Triton timings and device peaks are absent; "
                          "correctness ran in the interpreter")
        print("no CUDA device: GPU figures are absent; running the interpreter correctness sweep", flush=True)
        result["interpreter_sweep"] = interpreter_sweep()
        for r in result["interpreter_sweep"]:
            print(f"  {r['kernel']:<10} {r['dtype']:<9} {r['shape']:<40} max rel err {r['max_rel_err']:.2e} "
                  f"(tol {r['rtol']:.1e}) {'ok' if r['ok'] else 'FAIL'}", flush=True)
    result["rows"] = rows
    print("NumPy references on the CPU ...", flush=True)
    result["numpy_blas"] = blas_info()
    result["numpy_peaks"] = numpy_peaks()
    result["numpy"] = numpy_timings(args.quick)
    for r in result["numpy"]:
        print(f"  {r['kernel']:<10} {r['mode']:<8} {r['impl']:<10} {r['shape']:<28} {r['seconds'] * 1e3:9.2f} ms",
              flush=True)
    result["speedup_over_numpy"] = speedups_over_numpy(rows, result["numpy"])
    result["summary"] = summarise(rows) if gpu else {k: None for k in ("attention", "decode", "rmsnorm", "rope")}

    if not args.no_aot:
        from kernels.aot import run_in_subprocess

        print("static AOT report (sm_80, sm_90) ...", flush=True)
        try:
            result["aot"] = aot_summary(run_in_subprocess(full=False, timeout=900))
            print(result["aot"]["table"])
        except Exception as e:
            result["aot"] = None
            result["aot_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"AOT report failed: {result['aot_error']}")

    out = output_dir(args, device)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / device
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    write_markdown(stem.with_suffix(".md"), result)
    plotted = write_plot(stem.with_suffix(".png"), result)
    print(f"wrote {stem}.json, .md{', .png' if plotted else ''} in {time.time() - t0:.0f} s")
    final = {"device": device, "gpu": gpu, "summary": result["summary"]}
    if not gpu:
        final["note"] = "GPU figures absent"
        final["interpreter_sweep_ok"] = all(r["ok"] for r in result["interpreter_sweep"])
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
