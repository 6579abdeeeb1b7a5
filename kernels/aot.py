"""Ahead-of-time compile checks: build every kernel configuration for sm_80 and sm_90
without a GPU, and report registers, spills, shared memory and the use of ``wgmma``.

Triton compiles for a named target with no device present::

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))

gives the TTGIR, PTX and cubin of one specialisation, and its metadata (shared
memory, warps, stages). The PTX is then passed through the bundled ``ptxas -v`` to
read the register count and the spill traffic.

A build is described as a *launch*: the argument values a real call would pass
(contiguous tensors of a representative size), specialised the way the Triton
runtime does it: a tensor becomes a pointer aligned to 16 bytes, an integer equal
to 1 becomes the constant 1, an integer divisible by 16 is marked so.

Which configurations (``enumerate_builds``):

- ``full=True`` (``python -m kernels.aot --full``; about 1200 builds, 5 minutes on two
  cores): for attention every configuration of the launcher's table for the
  architecture (``attention.config_space``) x dtype (fp16, bf16, fp32) x head tile
  (16, 32, 64, 128) x causal, for the forward, dK/dV (group of 1 and of 4 query heads)
  and dQ kernels, plus the preprocess kernel; for RMSNorm every row block (16 ... 8192
  and the 4096-wide chunked walk) x dtype x residual on/off, forward and backward;
  for RoPE head sizes 64 and 128 x dtype, forward and inverse. Row blocks, warps
  and RoPE tiles are the launchers' own (``rmsnorm.warps_for``, ``rope.launch_config``).
- ``full=False`` (the default, used by the tests; about 130 builds, one minute cold):
  every table entry for bf16 at D = 128, fp16 at D = 64 and fp32 at D = 64 (causal),
  the first entry for bf16 at D = 80 (non-causal, dK/dV with a group of 4) and fp32
  at D = 128; RMSNorm rows of 1024, 8192 and the chunked walk with the residual, and
  RoPE at D = 128, for bf16 and fp32.

This module must run in a process where ``TRITON_INTERPRET`` is not set (under the
interpreter ``triton.jit`` returns an interpreted function that cannot be compiled);
``python -m kernels.aot`` re-runs itself without it, and ``run_in_subprocess`` does
the same for callers (the tests, the benchmark).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (opt-in), per architecture.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: a pointer to ``dtype`` elements (Triton type name: fp16, bf16, fp32, fp64, i64)."""

    dtype: str


@dataclass
class Build:
    """One specialisation of one kernel for one architecture."""

    kernel: str  # "attention.fwd", "rmsnorm.bwd", ...
    module: str  # "kernels.attention"
    fn: str  # name of the @triton.jit function in that module
    arch: int  # 80 or 90
    dtype: str
    args: Dict[str, object]  # runtime arguments by name: Ptr, int or float
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    label: str  # "bf16 D=128 causal M128 N64 w8 s3"


@dataclass
class BuildReport:
    kernel: str
    arch: int
    dtype: str
    label: str
    num_warps: int
    num_stages: int
    ok: bool = False
    error: str = ""
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    shared: Optional[int] = None  # bytes of dynamic shared memory
    smem_limit: int = 0
    wgmma: bool = False  # the PTX issues wgmma.mma_async (Hopper warp-group MMA)
    mma: bool = False  # the PTX issues mma.sync (Ampere-style tensor-core MMA)
    seconds: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# compatibility shim over triton.compile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def specialise(fn, args: Dict[str, object], constexprs: Dict[str, object]):
    """(signature, constexprs, attrs) for ``ASTSource`` as the runtime would specialise ``args``.

    signature: {name: "*bf16" | "i32" | "i64" | "fp32" | "constexpr"} for every parameter;
    constexprs: {(index,): value} (the kernel's constexpr parameters and integers equal to 1);
    attrs: {(index,): [["tt.divisibility", 16]]} for aligned pointers and integers divisible by 16.
    """
    names = list(fn.arg_names)
    missing = [n for n in names if n not in args and n not in constexprs]
    extra = [n for n in list(args) + list(constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"aot: kernel {fn.__name__}: missing arguments {missing}, unknown {extra}")
    signature, consts, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
            continue
        value = args[name]
        if isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                consts[(i,)] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"aot: argument {name!r} of {fn.__name__}: unsupported value {value!r}")
    return signature, consts, attrs


def make_source(fn, signature, consts, attrs):
    """``ASTSource`` across Triton versions.

    Triton >= 3.3 (3.6 and 3.9 included): ``ASTSource(fn, signature, constexprs, attrs)``
    with every parameter in ``signature`` (constexpr ones typed "constexpr"), constants
    keyed by ``(index,)`` and attributes as ``{(index,): [[name, value]]}``.
    Older releases took ``constants`` by name and an ``AttrsDescriptor``; they are
    refused with a clear message rather than half supported.
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    import triton

    raise RuntimeError(f"aot: triton {triton.__version__} has an ASTSource API older than 3.3 "
                       f"(parameters {list(params)}); AOT builds need triton >= 3.3")


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (recent releases ship a newer one for sm_90+).

    ``TRITON_PTXAS_PATH`` overrides; otherwise Triton's own choice, falling back to the
    bundled ``backends/nvidia/bin/ptxas``.
    """
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        return env
    try:
        from triton.backends.nvidia import compiler as nv

        get = getattr(nv, "get_ptxas", None)
        if get is not None:
            tool = get(arch) if inspect.signature(get).parameters else get()
            if getattr(tool, "path", None):
                return tool.path
    except Exception:  # older layouts: fall through to the bundled binary
        pass
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_info(ptx: str, arch: int) -> Dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` (max over the entries in the PTX)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", "--gpu-name", gpu, str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {text.strip()[-2000:]}")
    regs = [int(m) for m in _PTXAS_REGS.findall(text)]
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(text)]
    if not regs or not spills:
        raise RuntimeError(f"could not read ptxas -v output: {text.strip()[-2000:]}")
    return {"registers": max(regs), "stack_frame": max(s[0] for s in spills),
            "spill_stores": max(s[1] for s in spills), "spill_loads": max(s[2] for s in spills)}


def compile_build(build: Build) -> BuildReport:
    """Compile one build for its architecture and read the report off the artefacts."""
    report = BuildReport(kernel=build.kernel, arch=build.arch, dtype=build.dtype, label=build.label,
                         num_warps=build.num_warps, num_stages=build.num_stages,
                         smem_limit=SMEM_LIMIT.get(build.arch, 0), extra={"constexprs": dict(build.constexprs)})
    t0 = time.time()
    try:
        if _interpreting():
            raise RuntimeError("TRITON_INTERPRET=1 is set: kernels are interpreted, not compiled")
        import triton
        from triton.backends.compiler import GPUTarget

        fn = getattr(importlib.import_module(build.module), build.fn)
        signature, consts, attrs = specialise(fn, build.args, build.constexprs)
        src = make_source(fn, signature, consts, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", build.arch, 32),
                                  options={"num_warps": build.num_warps, "num_stages": build.num_stages})
        ptx = compiled.asm["ptx"]
        report.shared = int(compiled.metadata.shared)
        report.wgmma = "wgmma.mma_async" in ptx
        report.mma = "mma.sync" in ptx
        for key, value in ptxas_info(ptx, build.arch).items():
            setattr(report, key, value)
        report.ok = True
    except Exception as e:  # a failed build is reported, not raised: the report lists every build
        report.error = f"{type(e).__name__}: {str(e).strip()[:1500]}"
    report.seconds = round(time.time() - t0, 2)
    return report


# ---------------------------------------------------------------------------------------
# what to build

_TORCH_NAME = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _strides(prefix: str, shape) -> Dict[str, int]:
    return dict(zip((prefix + c for c in "bhtd"), _contiguous_strides(shape)))


ATTN_SHAPE = (4, 16, 2048)  # B, H, T of the representative launch


def attention_build(arch: int, kind: str, dtype: str, D: int, causal: bool, group: int, cfg) -> Build:
    """One attention kernel ("fwd", "dkdv", "dq") with one configuration (BLOCK_M, BLOCK_N, warps, stages)."""
    import torch

    A = importlib.import_module("kernels.attention")

    B, H, T = ATTN_SHAPE
    tdtype = getattr(torch, _TORCH_NAME[dtype])
    Hkv = H // group
    q, kv = (B, H, T, D), (B, Hkv, T, D)
    common = {"H": H, "Tq": T, "Tk": T, "D": D, "qk_scale": 0.125 * A.LOG2E}
    ptrs = {n: Ptr(dtype) for n in ("Q", "K", "V", "DO")}
    bm, bn, warps, stages = cfg
    const = {"CAUSAL": causal, "PRECISION": A.precision_for(tdtype), "DOT_F32": False,
             "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": A.block_d_for(D)}
    if kind == "fwd":
        fn = "_attn_fwd_kernel"
        args = {"Q": ptrs["Q"], "K": ptrs["K"], "V": ptrs["V"], "O": Ptr(dtype), "LSE": Ptr("fp32"),
                **_strides("sq", q), **_strides("sk", kv), **_strides("sv", kv), **_strides("so", q),
                "GROUP": group, **common}
    elif kind == "dkdv":
        fn = "_attn_bwd_dkdv_kernel"
        args = {**ptrs, "LSE": Ptr("fp32"), "DELTA": Ptr("fp32"), "DK": Ptr(dtype), "DV": Ptr(dtype),
                **_strides("sq", q), **_strides("sk", kv), **_strides("sv", kv), **_strides("sd", q),
                **_strides("skg", kv), **_strides("svg", kv),
                "HKV": Hkv, "GROUP": group, **common, "scale": 0.125}
    elif kind == "dq":
        fn = "_attn_bwd_dq_kernel"
        args = {**ptrs, "LSE": Ptr("fp32"), "DELTA": Ptr("fp32"), "DQ": Ptr(dtype),
                **_strides("sq", q), **_strides("sk", kv), **_strides("sv", kv), **_strides("sd", q),
                **_strides("sqg", q), "GROUP": group, **common, "scale": 0.125}
    else:
        raise ValueError(f"aot: unknown attention kernel {kind!r}")
    label = f"{dtype} D={D} {'causal' if causal else 'full'} G={group} M{bm} N{bn} w{warps} s{stages}"
    return Build(f"attention.{kind}", "kernels.attention", fn, arch, dtype, args, const, warps, stages, label)


def attention_space(arch: int, kind: str, dtype: str, D: int) -> List[tuple]:
    """The configurations the launcher may pick for this kernel, dtype and head size on ``arch``."""
    import torch

    A = importlib.import_module("kernels.attention")

    return A.config_space(kind, getattr(torch, _TORCH_NAME[dtype]), A.block_d_for(D), arch,
                          interpreting=False)


def attention_builds(arch: int, full: bool) -> List[Build]:
    builds = []
    kinds = ("fwd", "dkdv", "dq")
    if full:
        for dtype in DTYPES:
            for D in (16, 32, 64, 128):
                for causal in (False, True):
                    for kind in kinds:
                        for group in ((1, 4) if kind == "dkdv" else (1,)):
                            builds += [attention_build(arch, kind, dtype, D, causal, group, c)
                                       for c in attention_space(arch, kind, dtype, D)]
    else:
        for kind in kinds:
            for dtype, D, causal, group, every in (("bf16", 128, True, 1, True), ("fp16", 64, True, 1, True),
                                                   ("bf16", 80, False, 4 if kind == "dkdv" else 1, False),
                                                   ("fp32", 64, True, 1, True), ("fp32", 128, False, 1, False)):
                space = attention_space(arch, kind, dtype, D)
                space = space if every else space[:1]
                builds += [attention_build(arch, kind, dtype, D, causal, group, c) for c in space]
    B, H, T = ATTN_SHAPE
    for dtype in (DTYPES if full else ("bf16",)):
        D = 128
        builds.append(Build("attention.preprocess", "kernels.attention", "_attn_bwd_preprocess", arch, dtype,
                            {"O": Ptr(dtype), "DO": Ptr(dtype), "DELTA": Ptr("fp32"),
                             **_strides("so", (B, H, T, D)), **_strides("sd", (B, H, T, D)),
                             "H": H, "Tq": T, "D": D},
                            {"BLOCK_M": 64, "BLOCK_D": 128}, 4, 1, f"{dtype} D={D} M64"))
    return builds


def rmsnorm_builds(arch: int, full: bool) -> List[Build]:
    R = importlib.import_module("kernels.rmsnorm")

    blocks = [(2 ** i, True) for i in range(4, 14)] + [(R.CHUNK_BLOCK_D, False)]
    if not full:
        blocks = [(1024, True), (R.MAX_FUSED_BLOCK_D, True), (R.CHUNK_BLOCK_D, False)]
    builds = []
    for dtype in (DTYPES if full else ("bf16", "fp32")):
        for BLOCK_D, one in blocks:
            D = BLOCK_D if one else 65536
            warps = R.warps_for(BLOCK_D, one)
            tag = f"{dtype} BLOCK_D={BLOCK_D}{'' if one else ' chunked'} w{warps}"
            for flag in ((False, True) if full else (True,)):
                builds.append(Build(
                    "rmsnorm.fwd", "kernels.rmsnorm", "_rmsnorm_fwd_kernel", arch, dtype,
                    {"X": Ptr(dtype), "R": Ptr(dtype), "W": Ptr(dtype), "Y": Ptr(dtype), "Hout": Ptr(dtype),
                     "RSTD": Ptr("fp32"), "stride_x": D, "stride_r": D, "stride_y": D, "stride_h": D,
                     "D": D, "eps": 1e-6},
                    {"HAS_RESIDUAL": flag, "BLOCK_D": BLOCK_D, "ONE_BLOCK": one}, warps, 1,
                    f"{tag} residual={flag}"))
                builds.append(Build(
                    "rmsnorm.bwd", "kernels.rmsnorm", "_rmsnorm_bwd_kernel", arch, dtype,
                    {"DY": Ptr(dtype), "X": Ptr(dtype), "W": Ptr(dtype), "RSTD": Ptr("fp32"), "DH": Ptr(dtype),
                     "DX": Ptr(dtype), "DW_PARTIAL": Ptr("fp32"), "N": 8192, "D": D, "rows_per_program": 31},
                    {"HAS_DH": flag, "BLOCK_D": BLOCK_D, "ONE_BLOCK": one}, warps, 1, f"{tag} dresidual={flag}"))
        builds.append(Build("rmsnorm.sum_partials", "kernels.rmsnorm", "_sum_partials_kernel", arch, dtype,
                            {"P": Ptr("fp32"), "OUT": Ptr(dtype), "G": 264, "D": 4096}, {"BLOCK": 1024}, 4, 1,
                            f"{dtype} BLOCK=1024"))
    return builds


def rope_builds(arch: int, full: bool) -> List[Build]:
    P = importlib.import_module("kernels.rope")

    B, H, Hkv, T = 4, 32, 8, 2048
    builds = []
    for dtype in (DTYPES if full else ("bf16", "fp32")):
        for D in ((64, 128) if full else (128,)):
            for inverse in ((False, True) if full else (False,)):
                HALF = D // 2
                BLOCK_K, BLOCK_H, warps = P.launch_config(max(H, Hkv), HALF, 4 if dtype == "fp32" else 2)
                q, k = (B, H, T, D), (B, Hkv, T, D)
                args = {"Q": Ptr(dtype), "K": Ptr(dtype), "QO": Ptr(dtype), "KO": Ptr(dtype),
                        "INV_FREQ": Ptr("fp64"), "POS": Ptr("i64"),
                        **_strides("sq", q), **_strides("sk", k), **_strides("so", q), **_strides("sp", k),
                        "stride_pos_b": T, "stride_pos_t": 1, "T": T, "H": H, "HKV": Hkv, "offset": 0}
                const = {"HAS_POS": True, "INVERSE": inverse, "HALF": HALF, "BLOCK_K": BLOCK_K,
                         "BLOCK_H": BLOCK_H}
                builds.append(Build("rope.fwd" if not inverse else "rope.bwd", "kernels.rope", "_rope_kernel",
                                    arch, dtype, args, const, warps, 1, f"{dtype} D={D} BLOCK_H={BLOCK_H} w{warps} inverse={inverse}"))
    return builds


def enumerate_builds(archs=ARCHS, full: bool = False, families=("attention", "rmsnorm", "rope")) -> List[Build]:
    makers = {"attention": attention_builds, "rmsnorm": rmsnorm_builds, "rope": rope_builds}
    return [b for arch in archs for fam in families for b in makers[fam](arch, full)]


def run(builds: List[Build], jobs: int = 2) -> List[BuildReport]:
    """Compile every build (``jobs`` processes) and return the reports in order."""
    if jobs <= 1 or len(builds) <= 1:
        return [compile_build(b) for b in builds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_build, builds, chunksize=1))


def run_in_subprocess(full: bool = False, archs=ARCHS, families=("attention", "rmsnorm", "rope"),
                      jobs: int = 2, timeout: Optional[float] = None) -> List[dict]:
    """Run the AOT builds in a fresh interpreter without ``TRITON_INTERPRET``; reports as dicts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "kernels.aot", "--json", str(out), "--jobs", str(jobs), "--quiet",
               "--arch", *map(str, archs), "--family", *families] + (["--full"] if full else [])
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"kernels.aot failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["builds"]


def format_report(reports: List[dict]) -> str:
    """A fixed-width table, one row per build."""
    head = f"{'kernel':<22}{'arch':>5} {'config':<44}{'regs':>5}{'spill':>7}{'smem KiB':>9}{'wgmma':>6}  status"
    lines = [head, "-" * len(head)]
    for r in reports:
        if r["ok"]:
            spill = r["spill_stores"] + r["spill_loads"]
            status = "ok" if r["shared"] <= r["smem_limit"] and spill == 0 else "CHECK"
            lines.append(f"{r['kernel']:<22}{'sm_' + str(r['arch']):>5} {r['label']:<44}{r['registers']:>5}"
                         f"{spill:>7}{r['shared'] / 1024:>9.1f}{('yes' if r['wgmma'] else '-'):>6}  {status}")
        else:
            lines.append(f"{r['kernel']:<22}{'sm_' + str(r['arch']):>5} {r['label']:<44}  FAILED: {r['error'][:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every kernel configuration for sm_80 / sm_90 and report.")
    parser.add_argument("--full", action="store_true", help="every configuration (default: a representative subset)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--family", nargs="+", default=["attention", "rmsnorm", "rope"])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write the reports to this file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if _interpreting():  # re-run without the interpreter: compiled kernels are wanted here
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "kernels.aot", *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    import triton

    t0 = time.time()
    reports = [asdict(r) for r in run(enumerate_builds(args.arch, args.full, args.family), args.jobs)]
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "full": args.full,
                                               "seconds": round(time.time() - t0, 1), "builds": reports}, indent=1))
    if not args.quiet:
        print(format_report(reports))
        print(f"{len(reports)} builds, {sum(not r['ok'] for r in reports)} failed, triton {triton.__version__}, "
              f"{time.time() - t0:.0f} s")
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
