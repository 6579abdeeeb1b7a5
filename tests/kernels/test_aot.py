"""Ahead-of-time builds of every kernel for sm_80 and sm_90, with no GPU present.

``kernels.aot`` compiles a representative subset of the configurations the launchers
can pick (``python -m kernels.aot --full`` builds all of them) in a subprocess
without ``TRITON_INTERPRET``, and reads registers and spills off the cubins Triton
built (shared memory from its metadata). Cold, the subset takes a few minutes on two
cores; Triton's cache makes later runs a few seconds.

The committed reports (``kernels/results/aot-full-triton*.txt``, and the AOT table in
the committed benchmark results) are checked against the launch tables without
compiling anything: a table entry added, removed or changed without regenerating
the report fails here.
"""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import _common, aot, bench

pytestmark = pytest.mark.slow

TENSOR_CORE_KERNELS = ("attention.fwd", "attention.dkdv", "attention.dq")
ROOT = Path(__file__).resolve().parents[2]


def _ptxas_runs() -> bool:
    try:
        return all(Path(aot.nvidia_tool(name)).is_file() for name in ("cuobjdump", "ptxas"))
    except Exception:
        return False


@pytest.fixture(scope="module")
def reports():
    import triton.backends

    if "nvidia" not in triton.backends.backends or not _ptxas_runs():
        pytest.skip("this triton has no NVIDIA backend / ptxas to compile with")
    return aot.run_in_subprocess(full=False, timeout=900)


def _describe(r):
    return f"{r['kernel']} sm_{r['arch']} {r['label']}"


def test_every_build_compiles(reports):
    failed = [f"{_describe(r)}: {r['error']}" for r in reports if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_every_kernel_is_built_for_both_architectures(reports):
    built = {(r["kernel"], r["arch"]) for r in reports}
    kernels = {"attention.fwd", "attention.dkdv", "attention.dq", "attention.preprocess", "rmsnorm.fwd",
               "rmsnorm.bwd", "rmsnorm.sum_partials", "rope.fwd"}
    assert built == {(k, arch) for k in kernels for arch in aot.ARCHS}


def test_shared_memory_fits(reports):
    over = [f"{_describe(r)}: {r['shared']} B" for r in reports
            if r["ok"] and r["shared"] > _common.SMEM_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)
    assert all(r["shared"] is not None and r["shared"] >= 0 for r in reports if r["ok"])


def test_no_register_spills(reports):
    spilled = [f"{_describe(r)}: {r['registers']} registers, {r['spill_stores']} B stores, "
               f"{r['spill_loads']} B loads" for r in reports if r["ok"] and r["spill_stores"] + r["spill_loads"] > 0]
    assert not spilled, "\n".join(spilled)
    assert all(0 < r["registers"] <= 255 for r in reports if r["ok"])


def test_every_build_passes_the_checks(reports):
    failing = [f"{_describe(r)}: {r['failures']}" for r in reports if r["failures"]]
    assert not failing, "\n".join(failing)


def test_spills_are_read_where_a_stack_frame_could_hold_them(reports):
    """No stack frame in the cubin: nothing can spill. A stack frame (the float64 sine and
    cosine of fp32 RoPE keep a local array there): the spill figures come from Triton's
    own ptxas log of the same build."""
    ok = [r for r in reports if r["ok"]]
    assert all(r["spills_from"] == ("cubin" if r["stack_frame"] == 0 else "ptxas log") for r in ok)
    rope32 = [r for r in ok if r["kernel"] == "rope.fwd" and r["dtype"] == "fp32"]
    assert rope32 and all(r["stack_frame"] > 0 and r["spills_from"] == "ptxas log" for r in rope32)


def test_sm90_attention_uses_wgmma(reports):
    """fp16/bf16 attention products on Hopper are warp-group MMAs (wgmma.mma_async)."""
    builds = [r for r in reports if r["ok"] and r["arch"] == 90 and r["kernel"] in TENSOR_CORE_KERNELS
              and r["dtype"] in ("fp16", "bf16")]
    assert builds
    missing = [_describe(r) for r in builds if not r["wgmma"]]
    assert not missing, "\n".join(missing)


def test_sm80_attention_uses_mma_not_wgmma(reports):
    """On Ampere the same kernels fall back to mma.sync (wgmma does not exist there)."""
    builds = [r for r in reports if r["ok"] and r["arch"] == 80 and r["kernel"] in TENSOR_CORE_KERNELS]
    assert builds
    wrong = [_describe(r) for r in builds if r["wgmma"] or not r["mma"]]
    assert not wrong, "\n".join(wrong)


def test_shared_memory_estimate_is_conservative(reports):
    """The estimate that prunes configurations on smaller-memory devices never undercounts."""
    from kernels.attention import smem_estimate

    builds = [r for r in reports if r["ok"] and r["kernel"] in TENSOR_CORE_KERNELS]
    assert builds
    for r in builds:
        c = r["extra"]["constexprs"]
        estimate = smem_estimate(r["kernel"].split(".")[1], c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"],
                                 4 if r["dtype"] == "fp32" else 2, r["num_stages"])
        assert r["shared"] <= estimate, f"{_describe(r)}: {r['shared']} B > estimate {estimate} B"


# ---------------------------------------------------------------------------------------
# the split-KV decoding kernels (family "decode": built on request, and all in --full)

DECODE_KERNELS = ("decode.partial", "decode.merge")


@pytest.fixture(scope="module")
def decode_reports():
    import triton.backends

    if "nvidia" not in triton.backends.backends or not _ptxas_runs():
        pytest.skip("this triton has no NVIDIA backend / ptxas to compile with")
    return aot.run_in_subprocess(full=False, families=("decode",), timeout=900)


def test_decode_builds_compile_and_pass_the_checks(decode_reports):
    """Both decoding kernels, for sm_80 and sm_90: compiled, no spill, registers and shared
    memory within the limits."""
    assert {(r["kernel"], r["arch"]) for r in decode_reports} == {(k, a) for k in DECODE_KERNELS for a in aot.ARCHS}
    failing = [f"{_describe(r)}: {r['error'] or r['failures']}" for r in decode_reports if not r["ok"] or r["failures"]]
    assert not failing, "\n".join(failing)
    assert all(r["spill_stores"] + r["spill_loads"] == 0 and 0 < r["registers"] <= 255 for r in decode_reports)
    assert all(r["shared"] <= _common.SMEM_LIMIT[r["arch"]] for r in decode_reports)


def test_decode_builds_use_the_launchers_configuration():
    """Each partial-kernel build carries the tile rows and (BLOCK_N, warps, stages) the
    launcher picks for its group and queries; the default subset leaves the family out and
    --full builds every entry of the table."""
    import torch

    import kernels.decode as Dm

    builds = aot.enumerate_builds(full=True, families=("decode",))
    partial = [b for b in builds if b.kernel == "decode.partial"]
    assert partial and {b.kernel for b in builds} == set(DECODE_KERNELS)
    for b in partial:
        dtype = getattr(torch, aot._TORCH_NAME[b.dtype])
        rows = b.args["GROUP"] * b.args["Tq"]
        assert b.constexprs["BLOCK_M"] == Dm.block_m_for(rows, dtype, interpret=False)
        assert (b.constexprs["BLOCK_N"], b.num_warps, b.num_stages) == Dm.launch_config(
            dtype, b.constexprs["BLOCK_D"], b.constexprs["BLOCK_M"], b.arch, interpret=False)
    used = {(4 if b.dtype == "fp32" else 2, 64 if b.constexprs["BLOCK_D"] <= 64 else 128, b.constexprs["BLOCK_M"],
             b.arch) for b in partial}
    assert used == set(Dm.CONFIGS)
    assert not any(b.kernel.startswith("decode.") for b in aot.enumerate_builds(full=False))


def test_specialisation_follows_the_runtime():
    """Pointers and multiples of 16 are marked 16-divisible, 1 becomes a constant, constexprs stay constants."""
    from kernels.rmsnorm import _sum_partials_kernel

    signature, consts, attrs = aot.specialise(
        _sum_partials_kernel, {"P": aot.Ptr("fp32"), "OUT": aot.Ptr("bf16"), "G": 1, "D": 4096}, {"BLOCK": 1024})
    assert signature == {"P": "*fp32", "OUT": "*bf16", "G": "constexpr", "D": "i32", "BLOCK": "constexpr"}
    assert consts == {(2,): 1, (4,): 1024}
    assert attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}
    with pytest.raises(ValueError, match="missing arguments"):
        aot.specialise(_sum_partials_kernel, {"P": aot.Ptr("fp32")}, {"BLOCK": 1024})


def test_refuses_to_compile_under_the_interpreter():
    """In this (interpreted) process a build reports why it cannot compile instead of crashing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful where the test process runs the interpreter")
    build = aot.rmsnorm_builds(90, full=False)[0]
    report = aot.compile_build(build)
    assert not report.ok and "TRITON_INTERPRET" in report.error


# ---------------------------------------------------------------------------------------
# reading the tools' output, and the checks (no compiling)

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _helper:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:0 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {name}:
  REG:{regs} STACK:{stack} SHARED:1024 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '{name}' for 'sm_90a'
ptxas info    : Function properties for {name}
    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, {stack} bytes cumulative stack size
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


@given(st.integers(1, 255), st.integers(0, 4096), st.integers(0, 512), st.integers(0, 512))
def test_tool_output_is_read_for_the_right_function(regs, stack, stores, loads):
    name = "_attn_fwd_kernel"
    text = RES_USAGE.format(name=name, regs=regs, stack=stack)
    pattern = aot._RES_USAGE
    found = {m.group(1): m.groups()[1:] for m in pattern.finditer(text)}
    assert found[name][:2] == (str(regs), str(stack)) and found["_helper"][0] == "12"
    log = aot.parse_ptxas_log(PTXAS_LOG.format(name=name, regs=regs, stack=stack, stores=stores, loads=loads))
    assert log == {"registers": regs, "spill_stores": stores, "spill_loads": loads}
    with pytest.raises(RuntimeError, match="could not read"):
        aot.parse_ptxas_log("ptxas info    : 11 bytes gmem")


def _report(**kw):
    base = dict(kernel="attention.fwd", arch=90, dtype="fp32", label="x", num_warps=4, num_stages=2, ok=True,
                registers=128, stack_frame=0, spill_stores=0, spill_loads=0, shared=1024, smem_limit=227 * 1024)
    base.update(kw)
    return aot.BuildReport(**base)


@given(st.integers(1, 300), st.sampled_from([1, 2, 4, 8, 16, 32]), st.integers(0, 64), st.integers(0, 64),
       st.integers(0, 300 * 1024), st.sampled_from(sorted(_common.SMEM_LIMIT)))
def test_checks(regs, warps, stores, loads, shared, arch):
    """Each check, restated: any spill; more than 255 registers, or more than the 64 Ki
    register file for the block (registers allocated in steps of 8); shared memory over
    the architecture's opt-in limit."""
    r = _report(registers=regs, num_warps=warps, spill_stores=stores, spill_loads=loads, shared=shared,
                smem_limit=_common.SMEM_LIMIT[arch])
    failures = " | ".join(aot.check_failures(r))
    assert ("spills" in failures) == (stores + loads > 0)
    too_many = regs > 255 or ((regs + 7) // 8 * 8) * 32 * warps > 65536
    assert ("register file" in failures) == too_many
    assert ("shared memory" in failures) == (shared > _common.SMEM_LIMIT[arch])


@pytest.mark.parametrize("failing", [False, True])
def test_exit_status_says_whether_every_build_passes(monkeypatch, capsys, failing):
    """``python -m kernels.aot`` exits 1 when any build fails a check, 0 when all pass."""
    monkeypatch.setattr(aot, "interpreting", lambda: False)
    reports = [_report(label="a"), _report(label="b", spill_stores=8 if failing else 0)]
    for r in reports:
        r.failures = aot.check_failures(r)
    monkeypatch.setattr(aot, "run", lambda builds, jobs: reports)
    assert aot.main(["--family", "rope", "--arch", "90"]) == (1 if failing else 0)
    out = capsys.readouterr().out
    assert ("FAIL: spills 8 B stores" in out) == failing


@pytest.mark.parametrize("command", ["kernels.aot", "kernels.bench"])
@pytest.mark.parametrize("missing", [("torch",), ("triton",), ("torch", "triton")])
def test_core_install_is_told_which_extra_to_install(command, missing):
    """Without torch or triton (``make run`` installs neither) the commands print one line
    naming what is missing and how to install it, and exit with status 2."""
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in missing)
    code = (f"import runpy, sys; {hide}; sys.argv = [{command!r}]; "
            f"runpy.run_module({command!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert all(name in lines[0] for name in missing) and "make test-deps" in lines[0]
    assert "pip install -c constraints.txt -e '.[test]'" in lines[0]


# ---------------------------------------------------------------------------------------
# the committed results agree with the launch tables

REPORTS = sorted((ROOT / "kernels" / "results").glob("aot-full-triton*.txt"))


def _key(row) -> tuple:
    return (row["kernel"], row["arch"], row["label"])


@pytest.fixture(scope="module")
def full_builds():
    return sorted((b.kernel, b.arch, b.label) for b in aot.enumerate_builds(full=True))


def test_the_installed_triton_has_a_committed_report():
    import triton

    assert aot.committed_report_path(triton.__version__) in REPORTS, (
        f"no committed AOT report for triton {triton.__version__}: "
        "run python -m kernels.aot --full --commit-results")


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_committed_report_lists_exactly_the_launch_tables(path, full_builds):
    text = path.read_text()
    rows = aot.parse_report(text)
    assert text.startswith("# python -m kernels.aot --full --commit-results\n")
    version = re.search(r"^# triton (\S+);", text, re.M).group(1)
    assert path == aot.committed_report_path(version)
    listed = sorted(_key(r) for r in rows)
    missing, extra = sorted(set(full_builds) - set(listed)), sorted(set(listed) - set(full_builds))
    assert not missing and not extra, (f"{path.name} is stale (python -m kernels.aot --full --commit-results):\n"
                                       f"not in the report: {missing[:10]}\nno longer in the tables: {extra[:10]}")
    assert len(listed) == len(full_builds)  # each build once
    failing = [_key(r) for r in rows if not r["passed"]]
    assert not failing, f"{path.name}: builds failing a check: {failing[:10]}"
    summary = f"{len(rows)} builds, 0 not compiled, 0 failing a check, triton {version}"
    assert summary in text


def test_report_parser_reads_what_the_formatter_writes():
    reports = [asdict(_report(label="fp32 D=128 causal G=1 M128 N32 w8 s1")),
               asdict(_report(label="bf16 weight=fp32 BLOCK_D=4096 chunked w8 dresidual=False", spill_loads=4)),
               asdict(_report(label="y", ok=False, error="RuntimeError: boom"))]
    for r in reports:
        r["failures"] = aot.check_failures(aot.BuildReport(**r)) if r["ok"] else ["does not compile"]
    rows = aot.parse_report(aot.format_report(reports))
    assert [(r["label"], r["passed"]) for r in rows] == [(reports[0]["label"], True), (reports[1]["label"], False),
                                                         ("y", False)]


def test_committed_benchmark_results_match_the_tables():
    """The committed CPU results were made by the command, with the current tables: their
    AOT table lists the subset's builds, every one passing, and the interpreter sweep passed."""
    paths = sorted((ROOT / "kernels" / "results").glob("cpu-*.json"))
    assert paths
    subset = sorted((b.kernel, b.arch, b.label) for b in aot.enumerate_builds(full=False))
    for path in paths:
        result = json.loads(path.read_text())
        assert "--commit-results" in result["command"]
        assert result["numpy_blas"].get("internal_api"), "the BLAS NumPy ran is recorded"
        assert all(r["ok"] for r in result["interpreter_sweep"])
        rows = aot.parse_report(result["aot"]["table"])
        assert sorted(_key(r) for r in rows) == subset, f"{path.name} is stale: python -m kernels.bench --quick " \
                                                         "--commit-results"
        assert all(r["passed"] for r in rows) and result["aot"]["failing_a_check"] == 0
        md = path.with_suffix(".md").read_text()
        assert result["date"] in md and result["aot"]["table"] in md


def test_bench_writes_a_run_folder_unless_asked_to_commit():
    assert bench.output_dir(bench.parse_args([]), "cpu-x") == Path("runs") / "kernels" / "cpu-x"
    assert bench.output_dir(bench.parse_args(["--commit-results"]), "cpu-x") == bench.RESULTS
    assert bench.output_dir(bench.parse_args(["--out", "elsewhere"]), "cpu-x") == Path("elsewhere")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "elsewhere", "--commit-results"])
