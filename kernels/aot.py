"""Ahead-of-time compile checks: build every kernel configuration for sm_80 and sm_90
without a GPU, and check registers, spills and shared memory on the cubins Triton built.

Triton compiles for a named target with no device present::

    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))

gives the TTGIR, PTX and cubin of one specialisation (from Triton's cache when it
has built it before), and its metadata (shared memory, warps, stages). The figures of
the report are read off what Triton launches, never off a rebuild with other flags:

- registers and stack frame: the cubin's own resource table (``cuobjdump -res-usage``,
  the ``cuobjdump`` bundled with Triton);
- spill stores and loads: a cubin without a stack frame has nowhere to spill to (0);
  for one with a stack frame (a spill, or the local array of the float64 sine and
  cosine's slow path) the PTX goes once more through Triton's own cubin stage with
  its ptxas log switched on (``TRITON_DUMP_PTXAS_LOG``), i.e. the very ptxas command
  line of the installed Triton, and the log's figures are taken only if that stage
  gives back the same register count as the cubin;
- shared memory: the compiled kernel's metadata.

A build *fails a check* (status ``FAIL`` in the table; ``python -m kernels.aot`` then
exits with status 1) when it does not compile, spills (any spill store or load),
needs more registers than a thread may have (255) or than the register file holds
for its block (64 Ki registers), or asks for more shared memory than a block may
opt in to on its architecture (``SMEM_LIMIT``).

A build is described as a *launch*: the argument values a real call would pass
(contiguous tensors of a representative size), specialised the way the Triton
runtime does it: a tensor becomes a pointer aligned to 16 bytes, an integer equal
to 1 becomes the constant 1, an integer divisible by 16 is marked so.

Which configurations (``enumerate_builds``):

- ``full=True`` (``python -m kernels.aot --full``; 1574 builds, 10 to 25 minutes cold on
  two cores shared with other work, far less with Triton's cache warm): for attention
  every configuration of the launcher's table for the architecture
  (``attention.config_space``) x dtype (fp16, bf16, fp32) x head tile
  (16, 32, 64, 128) x causal, for the forward, dK/dV (group of 1 and of 4 query heads)
  and dQ kernels, plus the preprocess kernel; for RMSNorm every row block (16 ... 8192
  and the 4096-wide chunked walk) x dtype (and a float32 weight with fp16 / bf16 rows)
  x residual on/off, forward and backward; for RoPE head sizes 64 and 128 x dtype,
  forward and inverse; for split-KV decoding the partial kernel at every head tile
  (16 ... 128) x dtype x causal x four (G, Tq) packings (1 and 4 heads with one query, 32-
  and 64-row tiles of a few queries; 16-row tiles for fp32), and the merge kernel per dtype
  and head tile. Row blocks, warps, RoPE tiles and decode tiles are the launchers' own
  (``rmsnorm.warps_for``, ``rope.launch_config``, ``decode.launch_config``).
- ``full=False`` (the default, used by the tests and the benchmark; 140 builds, a few
  minutes cold, seconds warm): every table entry for bf16 at D = 128, fp16 at D = 64 and fp32 at
  D = 64 (causal), the first entry for bf16 at D = 80 (non-causal, dK/dV with a group
  of 4) and fp32 at D = 128; RMSNorm rows of 1024, 8192 and the chunked walk with the
  residual, for bf16 (also with a float32 weight) and fp32, and RoPE at D = 128. The
  decode family is not in the default subset; ``--family decode`` builds its own subset
  (every packing for bf16 at D = 128, fp32 at D = 64, fp16 at D = 80, both merges).

``python -m kernels.aot --full --commit-results`` writes the table to
``kernels/results/aot-full-triton<major.minor>.txt``, the committed report of the
installed Triton; ``tests/kernels/test_aot.py`` checks that every committed report
lists exactly the builds the launch tables give, all passing.

This module must run in a process where ``TRITON_INTERPRET`` is not set (under the
interpreter ``triton.jit`` returns an interpreted function that cannot be compiled);
``python -m kernels.aot`` re-runs itself without it, and ``run_in_subprocess`` does
the same for callers (the tests, the benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
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

from ._common import MAX_REGISTERS_PER_THREAD, REGISTER_FILE, SMEM_LIMIT, interpreting, require_extra

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
FAMILIES = ("attention", "rmsnorm", "rope", "decode")
# The families of the default subset (``full=False``, no ``families`` given: what the tests'
# subset fixture and ``python -m kernels.bench`` report). The decode kernels' subset is
# built when asked for (``--family decode``, ``families=("decode",)``); every decode build
# is in the ``--full`` report.
SUBSET_FAMILIES = ("attention", "rmsnorm", "rope")
RESULTS = Path(__file__).resolve().parent / "results"


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
    ok: bool = False  # compiled; ``failures`` says whether it passes the checks
    error: str = ""
    registers: Optional[int] = None
    stack_frame: Optional[int] = None  # bytes per thread
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    spills_from: str = ""  # "cubin" (no stack frame) or "ptxas log"
    shared: Optional[int] = None  # bytes of dynamic shared memory
    smem_limit: int = 0
    wgmma: bool = False  # the PTX issues wgmma.mma_async (Hopper warp-group MMA)
    mma: bool = False  # the PTX issues mma.sync (Ampere-style tensor-core MMA)
    failures: List[str] = field(default_factory=list)  # the checks it fails
    seconds: float = 0.0
    extra: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# compiling, and reading the cubin


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


def nvidia_tool(name: str) -> str:
    """Path of a tool Triton bundles (``cuobjdump``, ``ptxas``); ``TRITON_<NAME>_PATH`` overrides."""
    from triton import knobs

    tool = getattr(knobs.nvidia, name.replace("-", "_"))
    if tool is None or not getattr(tool, "path", None):
        raise RuntimeError(f"aot: triton's NVIDIA backend has no {name}")
    return tool.path


_RES_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_usage(cubin: bytes, entry: str) -> Dict[str, int]:
    """Registers, stack frame and local memory of function ``entry`` of ``cubin``, as the
    cubin's resource table records them (what the driver allocates when it loads it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    found = {m.group(1): tuple(map(int, m.groups()[1:])) for m in _RES_USAGE.finditer(text)}
    if proc.returncode != 0 or entry not in found:
        raise RuntimeError(f"cuobjdump -res-usage gave no entry {entry!r} ({proc.returncode}): {text.strip()[-2000:]}")
    regs, stack, _, local = found[entry]
    return {"registers": regs, "stack_frame": stack, "local": local}


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> Dict[str, int]:
    """Registers of the entry and spill bytes (largest over the functions in the log) from ``ptxas -v``."""
    regs = [int(m) for m in _PTXAS_REGS.findall(text)]
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(text)]
    if not regs or not spills:
        raise RuntimeError(f"could not read the ptxas log: {text.strip()[-2000:]}")
    return {"registers": max(regs), "spill_stores": max(s[1] for s in spills),
            "spill_loads": max(s[2] for s in spills)}


def triton_ptxas_log(compiled, arch: int) -> str:
    """The ptxas log of Triton's own cubin stage on this kernel's PTX (same options, same
    command line as the build Triton launches; Triton prints it when asked to)."""
    from triton.backends.compiler import GPUTarget, Language
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    metadata = compiled.metadata._asdict()
    stages: dict = {}
    backend.add_stages(stages, backend.parse_options(dict(metadata)), Language.TRITON)
    saved = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            stages["cubin"](compiled.asm["ptx"], dict(metadata))
    finally:
        if saved is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved
    return out.getvalue()


def check_failures(r: BuildReport) -> List[str]:
    """The checks a compiled build fails (empty when it passes)."""
    out = []
    spill = (r.spill_stores or 0) + (r.spill_loads or 0)
    if spill:
        out.append(f"spills {r.spill_stores} B stores, {r.spill_loads} B loads")
    threads = 32 * r.num_warps
    per_thread = -(-r.registers // 8) * 8  # registers are allocated in steps of 8 per thread
    if r.registers > MAX_REGISTERS_PER_THREAD or per_thread * threads > REGISTER_FILE:
        out.append(f"{r.registers} registers x {threads} threads exceed the register file")
    if r.shared > r.smem_limit:
        out.append(f"shared memory {r.shared} B > {r.smem_limit} B")
    return out


def compile_build(build: Build) -> BuildReport:
    """Compile one build for its architecture and read the report off the artefacts."""
    report = BuildReport(kernel=build.kernel, arch=build.arch, dtype=build.dtype, label=build.label,
                         num_warps=build.num_warps, num_stages=build.num_stages,
                         smem_limit=SMEM_LIMIT[build.arch], extra={"constexprs": dict(build.constexprs)})
    t0 = time.time()
    try:
        if interpreting():
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
        usage = cubin_usage(compiled.asm["cubin"], compiled.metadata.name)
        report.registers, report.stack_frame = usage["registers"], usage["stack_frame"]
        if usage["stack_frame"] == 0 and usage["local"] == 0:
            report.spill_stores = report.spill_loads = 0
            report.spills_from = "cubin"
        else:
            log = parse_ptxas_log(triton_ptxas_log(compiled, build.arch))
            if log["registers"] != report.registers:
                raise RuntimeError(f"the ptxas log ({log['registers']} registers) does not describe the cubin "
                                   f"({report.registers} registers)")
            report.spill_stores, report.spill_loads = log["spill_stores"], log["spill_loads"]
            report.spills_from = "ptxas log"
        report.failures = check_failures(report)
        report.ok = True
    except Exception as e:  # a failed build is reported, not raised: the report lists every build
        report.error = f"{type(e).__name__}: {str(e).strip()[:1500]}"
        report.failures = ["does not compile"]
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
    common = {"H": H, "Tq": T, "Tk": T, "D": D, "qk_scale": 0.125 * A.LOG2E,
              "Tq_bucket": A.length_bucket(T), "Tk_bucket": A.length_bucket(T)}
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
                          interpret=False)


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
    # (rows' dtype, weight's dtype): the weight in the rows' dtype, or float32 with 16-bit rows
    if full:
        pairs = [(d, d) for d in DTYPES] + [("fp16", "fp32"), ("bf16", "fp32")]
    else:
        pairs = [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")]
    builds = []
    for dtype, wtype in pairs:
        for BLOCK_D, one in blocks:
            D = BLOCK_D if one else 65536
            warps = R.warps_for(BLOCK_D, one)
            weight = "" if wtype == dtype else f" weight={wtype}"
            tag = f"{dtype}{weight} BLOCK_D={BLOCK_D}{'' if one else ' chunked'} w{warps}"
            for flag in ((False, True) if full else (True,)):
                builds.append(Build(
                    "rmsnorm.fwd", "kernels.rmsnorm", "_rmsnorm_fwd_kernel", arch, dtype,
                    {"X": Ptr(dtype), "R": Ptr(dtype), "W": Ptr(wtype), "Y": Ptr(dtype), "Hout": Ptr(dtype),
                     "RSTD": Ptr("fp32"), "stride_x": D, "stride_r": D, "stride_y": D, "stride_h": D,
                     "D": D, "eps": 1e-6},
                    {"HAS_RESIDUAL": flag, "BLOCK_D": BLOCK_D, "ONE_BLOCK": one}, warps, 1,
                    f"{tag} residual={flag}"))
                builds.append(Build(
                    "rmsnorm.bwd", "kernels.rmsnorm", "_rmsnorm_bwd_kernel", arch, dtype,
                    {"DY": Ptr(dtype), "X": Ptr(dtype), "W": Ptr(wtype), "RSTD": Ptr("fp32"), "DH": Ptr(dtype),
                     "DX": Ptr(dtype), "DW_PARTIAL": Ptr("fp32"), "N": 8192, "D": D, "rows_per_program": 31},
                    {"HAS_DH": flag, "BLOCK_D": BLOCK_D, "ONE_BLOCK": one}, warps, 1, f"{tag} dresidual={flag}"))
        if wtype == dtype:  # dweight is written in the weight's dtype
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
                label = f"{dtype} D={D} BLOCK_H={BLOCK_H} w{warps} inverse={inverse}"
                builds.append(Build("rope.fwd" if not inverse else "rope.bwd", "kernels.rope", "_rope_kernel",
                                    arch, dtype, args, const, warps, 1, label))
    return builds


def decode_build(arch: int, dtype: str, D: int, causal: bool, group: int, Tq: int) -> Build:
    """The split-KV partial kernel for one launch shape: G = ``group`` query heads per key/value
    head and ``Tq`` queries packed into the rows of a tile (``BLOCK_M`` from G * Tq), with the
    launcher's (BLOCK_N, warps, stages) for the dtype, head tile and architecture."""
    import torch

    A = importlib.import_module("kernels.attention")
    Dm = importlib.import_module("kernels.decode")

    B, Hkv, Tk, splits = DECODE_SHAPE
    H = Hkv * group
    tdtype = getattr(torch, _TORCH_NAME[dtype])
    BLOCK_D = A.block_d_for(D)
    BLOCK_M = Dm.block_m_for(group * Tq, tdtype, interpret=False)
    BLOCK_N, warps, stages = Dm.launch_config(tdtype, BLOCK_D, BLOCK_M, arch, interpret=False)
    args = {"Q": Ptr(dtype), "K": Ptr(dtype), "V": Ptr(dtype), "OP": Ptr("fp32"), "LSEP": Ptr("fp32"),
            **_strides("sq", (B, H, Tq, D)), **_strides("sk", (B, Hkv, Tk, D)), **_strides("sv", (B, Hkv, Tk, D)),
            "HKV": Hkv, "GROUP": group, "Tq": Tq, "Tk": Tk, "D": D, "NUM_SPLITS": splits,
            "keys_per_split": Dm.keys_per_split_for(Tk, splits, BLOCK_N), "qk_scale": 0.125 * A.LOG2E}
    const = {"CAUSAL": causal, "PRECISION": A.precision_for(tdtype), "DOT_F32": False,
             "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}
    label = (f"{dtype} D={D} {'causal' if causal else 'full'} G={group} Tq={Tq} "
             f"M{BLOCK_M} N{BLOCK_N} w{warps} s{stages}")
    return Build("decode.partial", "kernels.decode", "_decode_partial_kernel", arch, dtype, args, const, warps,
                 stages, label)


def decode_merge_build(arch: int, dtype: str, D: int) -> Build:
    A = importlib.import_module("kernels.attention")
    Dm = importlib.import_module("kernels.decode")

    B, Hkv, _, splits = DECODE_SHAPE
    H, Tq = 4 * Hkv, 1
    BLOCK_D = A.block_d_for(D)
    args = {"OP": Ptr("fp32"), "LSEP": Ptr("fp32"), "O": Ptr(dtype), "LSE": Ptr("fp32"),
            **_strides("so", (B, H, Tq, D)), "H": H, "Tq": Tq, "D": D, "NUM_SPLITS": splits}
    const = {"BLOCK_S": Dm.MERGE_BLOCK_S, "BLOCK_D": BLOCK_D}
    return Build("decode.merge", "kernels.decode", "_decode_merge_kernel", arch, dtype, args, const,
                 Dm.MERGE_WARPS, 1, f"{dtype} D={D} S={splits} BLOCK_S={Dm.MERGE_BLOCK_S} w{Dm.MERGE_WARPS}")


DECODE_SHAPE = (8, 8, 8192, 16)  # B, Hkv, Tk, splits of the representative decoding launch
# (G, Tq) of the partial kernel's builds: one query of multi-head attention (an integer 1 is
# specialised to a constant, so Tq = 1 and G = 1 each compile their own kernel), one query of
# a group of 4, and the 32- and 64-row tiles of speculative steps
DECODE_ROWS = ((1, 1), (4, 1), (8, 4), (4, 16))


def decode_builds(arch: int, full: bool) -> List[Build]:
    builds = []
    if full:
        for dtype in DTYPES:
            for D in (16, 32, 64, 128):
                for causal in (False, True):
                    builds += [decode_build(arch, dtype, D, causal, g, tq) for g, tq in DECODE_ROWS]
        builds += [decode_merge_build(arch, dtype, D) for dtype in DTYPES for D in (16, 32, 64, 128)]
    else:
        builds += [decode_build(arch, "bf16", 128, True, g, tq) for g, tq in DECODE_ROWS]
        builds += [decode_build(arch, "fp32", 64, True, 1, 1), decode_build(arch, "fp16", 80, False, 4, 16)]
        builds += [decode_merge_build(arch, "bf16", 128), decode_merge_build(arch, "fp32", 64)]
    return builds


def enumerate_builds(archs=ARCHS, full: bool = False, families=None) -> List[Build]:
    """The builds of ``families`` (default: every family with ``full``, ``SUBSET_FAMILIES`` without)."""
    makers = {"attention": attention_builds, "rmsnorm": rmsnorm_builds, "rope": rope_builds,
              "decode": decode_builds}
    if families is None:
        families = FAMILIES if full else SUBSET_FAMILIES
    return [b for arch in archs for fam in families for b in makers[fam](arch, full)]


def run(builds: List[Build], jobs: int = 2) -> List[BuildReport]:
    """Compile every build (``jobs`` processes) and return the reports in order."""
    if jobs <= 1 or len(builds) <= 1:
        return [compile_build(b) for b in builds]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_build, builds, chunksize=1))


def run_in_subprocess(full: bool = False, archs=ARCHS, families=None,
                      jobs: int = 2, timeout: Optional[float] = None) -> List[dict]:
    """Run the AOT builds in a fresh interpreter without ``TRITON_INTERPRET``; reports as dicts
    (whether or not they pass the checks: ``failures`` says)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [sys.executable, "-m", "kernels.aot", "--json", str(out), "--jobs", str(jobs), "--quiet",
               "--arch", *map(str, archs)] + (["--family", *families] if families else [])
        cmd += ["--full"] if full else []
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"kernels.aot failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["builds"]


# ---------------------------------------------------------------------------------------
# the report

LABEL_WIDTH = 58
HEADER = (f"{'kernel':<22}{'arch':>5} {'config':<{LABEL_WIDTH}}{'regs':>5}{'stack':>6}{'spill':>6}"
          f"{'smem KiB':>9}{'wgmma':>6}  status")
# one row of the table: kernel, arch, configuration, registers, stack, spill, shared KiB, wgmma, status
ROW = re.compile(r"^(\S+)\s+sm_(\d+) (.+?)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(yes|-)  (ok|FAIL: .*)$")
FAILED_ROW = re.compile(r"^(\S+)\s+sm_(\d+) (.+?)\s+FAILED: (.*)$")


def format_row(r: dict) -> str:
    where = f"{r['kernel']:<22}{'sm_' + str(r['arch']):>5} {r['label']:<{LABEL_WIDTH}}"
    if not r["ok"]:
        return f"{where}FAILED: {r['error'][:200]}"
    status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
    return (f"{where}{r['registers']:>5}{r['stack_frame']:>6}{r['spill_stores'] + r['spill_loads']:>6}"
            f"{r['shared'] / 1024:>9.1f}{('yes' if r['wgmma'] else '-'):>6}  {status}")


def format_report(reports: List[dict]) -> str:
    """A fixed-width table, one row per build."""
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in reports])


def summary_line(reports: List[dict], version: str) -> str:
    failing = sum(bool(r["failures"]) for r in reports)
    return (f"{len(reports)} builds, {sum(not r['ok'] for r in reports)} not compiled, {failing} failing a check, "
            f"triton {version}")


def parse_report(text: str) -> List[dict]:
    """The rows of a report written by ``format_report``: kernel, arch, label, passed."""
    rows = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows.append({"kernel": m.group(1), "arch": int(m.group(2)), "label": m.group(3),
                         "registers": int(m.group(4)), "stack_frame": int(m.group(5)), "spill": int(m.group(6)),
                         "passed": m.group(9) == "ok"})
            continue
        m = FAILED_ROW.match(line)
        if m:
            rows.append({"kernel": m.group(1), "arch": int(m.group(2)), "label": m.group(3), "passed": False})
    return rows


def committed_report_path(version: str) -> Path:
    """``kernels/results/aot-full-triton<major.minor>.txt`` for a Triton version string."""
    return RESULTS / f"aot-full-triton{'.'.join(version.split('.')[:2])}.txt"


def _ptxas_versions(archs) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return ", ".join(f"sm_{a}: ptxas {get_ptxas(a).version}" for a in archs)
    except Exception as e:  # the report still lists the builds
        return f"ptxas version unknown ({type(e).__name__})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernels.aot",
        description="Compile every kernel configuration for sm_80 / sm_90 without a GPU and check registers, "
                    "spills and shared memory on the cubins Triton built. Exit status 1 if any build fails a check.")
    parser.add_argument("--full", action="store_true",
                        help="every configuration of the launch tables (default: a representative subset)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS),
                        help="architectures to build for (default: %(default)s)")
    parser.add_argument("--family", nargs="+", default=None, choices=list(FAMILIES),
                        help="kernel families to build (default: all with --full, else "
                             f"{', '.join(SUBSET_FAMILIES)})")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default: %(default)s)")
    parser.add_argument("--json", help="also write the reports to this file (default: none)")
    parser.add_argument("--commit-results", action="store_true",
                        help="write the table to kernels/results/aot-full-triton<version>.txt, the committed report "
                             "(needs --full and every architecture and family)")
    parser.add_argument("--quiet", action="store_true", help="print nothing (default: the table and a summary)")
    args = parser.parse_args(argv)
    if args.commit_results and not (args.full and set(args.arch) == set(ARCHS)
                                and set(args.family or FAMILIES) == set(FAMILIES)):
        parser.error("--commit-results needs --full with every architecture and family")
    if args.jobs < 1:
        parser.error(f"--jobs expected an integer >= 1, got {args.jobs}")
    if not require_extra("kernels.aot"):
        return 2
    if interpreting():  # re-run without the interpreter: compiled kernels are wanted here
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "kernels.aot", *(argv if argv is not None else sys.argv[1:])],
                               env=env)
    import triton

    t0 = time.time()
    reports = [asdict(r) for r in run(enumerate_builds(args.arch, args.full, args.family), args.jobs)]
    seconds = time.time() - t0
    summary = summary_line(reports, triton.__version__)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "full": args.full,
                                               "seconds": round(seconds, 1), "builds": reports}, indent=1))
    if args.commit_results:
        path = committed_report_path(triton.__version__)
        path.write_text(f"# python -m kernels.aot --full --commit-results\n"
                        f"# triton {triton.__version__}; {_ptxas_versions(ARCHS)}\n"
                        f"{format_report(reports)}\n{summary}\n")
        if not args.quiet:
            print(f"wrote {path}")
    if not args.quiet:
        print(format_report(reports))
        print(f"{summary}, {seconds:.0f} s")
    return 0 if not any(r["failures"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
