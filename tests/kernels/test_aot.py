"""Ahead-of-time builds of every kernel for sm_80 and sm_90, with no GPU present.

``kernels.aot`` compiles a representative subset of the configurations the launchers
can pick (``python -m kernels.aot --full`` builds all of them) in a subprocess
without ``TRITON_INTERPRET``, and reads shared memory from Triton's metadata and
registers / spills from ``ptxas -v``. Cold, the subset takes about a minute on two
cores; Triton's cache makes later runs a few seconds.
"""

import os
from pathlib import Path

import pytest

from kernels import aot

pytestmark = pytest.mark.slow

TENSOR_CORE_KERNELS = ("attention.fwd", "attention.dkdv", "attention.dq")


def _ptxas_runs() -> bool:
    try:
        return all(Path(aot.ptxas_path(arch)).is_file() for arch in aot.ARCHS)
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
    limits = {80: 163 * 1024, 90: 227 * 1024}  # A100, H100/H200: opt-in shared memory per block
    over = [f"{_describe(r)}: {r['shared']} B" for r in reports if r["ok"] and r["shared"] > limits[r["arch"]]]
    assert not over, "\n".join(over)
    assert all(r["shared"] is not None and r["shared"] >= 0 for r in reports if r["ok"])


def test_no_register_spills(reports):
    spilled = [f"{_describe(r)}: {r['registers']} registers, {r['spill_stores']} B stores, "
               f"{r['spill_loads']} B loads" for r in reports if r["ok"] and r["spill_stores"] + r["spill_loads"] > 0]
    assert not spilled, "\n".join(spilled)
    assert all(0 < r["registers"] <= 255 for r in reports if r["ok"])


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
