"""``npformer bench`` on a tiny config: the figures it reports are present and consistent."""

import json

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from npformer.bench import REFERENCE, run
from npformer.cli import main as cli_main
from npformer.models.gpt import GPTConfig
from tests.badinput import expect_rejected

TINY = GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, d_model=16)


def test_run_reports_throughput_utilisation_and_the_torch_ratio():
    result = run(TINY, batch=2, steps=2, log=lambda *a: None)
    tokens = 2 * TINY.block_size
    assert abs(result["tokens_per_s"] * result["step_s"] - tokens) < 1e-6 * tokens
    assert 0 < result["mfu"] < 1  # a tiny model is far from peak, but never above it
    expected_mfu = TINY.flops_per_token() * result["tokens_per_s"] / result["matmul_flops"]
    assert abs(result["mfu"] - expected_mfu) <= 1e-12 * expected_mfu  # same quantities, other rounding order
    assert result["torch_tokens_per_s"] > 0
    assert abs(result["ratio_vs_torch"] - result["tokens_per_s"] / result["torch_tokens_per_s"]) < 1e-12
    assert result["blas"]["internal_api"] in ("openblas", "mkl", "blis", "accelerate")


def test_json_line_is_last(capsys):
    assert cli_main(["bench", "--steps", "1", "--batch", "1", "--n-layer", "1", "--d-model", "16", "--n-head", "2",
                     "--block-size", "8", "--no-torch", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert data["config"]["d_model"] == 16 and data["config"]["batch"] == 1
    assert data["torch_tokens_per_s"] is None and data["ratio_vs_torch"] is None and data["matmul_ratio_vs_torch"] is None
    assert {"tokens_per_s", "mfu", "blas"} <= set(data)


def test_reference_config_and_flops():
    assert (REFERENCE.n_layer, REFERENCE.d_model, REFERENCE.n_head, REFERENCE.block_size, REFERENCE.vocab_size) == \
        (6, 384, 6, 256, 65)
    # 6 x (weights per token) + attention: 12 D^2 per layer, 2 T D per layer, V D for the head, times 6.
    D, T, L, V = 384, 256, 6, 65
    assert REFERENCE.flops_per_token() == 6 * (L * (12 * D * D + 2 * T * D) + V * D)


@given(st.sampled_from(["batch", "steps", "torch_twin", "cfg"]), st.data())
def test_run_rejects_bad_arguments_before_timing_anything(name, data):
    bad = data.draw({"batch": st.integers(max_value=0) | st.sampled_from([1.0, True, "2", None]),
                     "steps": st.integers(max_value=0) | st.sampled_from([2.5, False, "1", None]),
                     "torch_twin": st.sampled_from([1, 0, "yes", None]),
                     "cfg": st.sampled_from([None, {"n_layer": 1}, "gpt", TINY.to_dict()])}[name])
    lines = []
    arguments = {"cfg": TINY, "batch": 1, "steps": 1, "torch_twin": False, name: bad}
    expect_rejected(lambda: run(log=lines.append, **arguments), "bench.run", name)
    assert lines == []  # nothing measured, nothing printed


@given(st.booleans())
def test_the_torch_twin_line_says_why_it_did_not_run(skip):
    """--no-torch says the twin was skipped; it is not 'torch not installed' when torch is installed."""
    import importlib.util

    lines = []
    result = run(TINY, batch=1, steps=1, torch_twin=not skip, log=lines.append)
    twin_line = next(line for line in lines if line.startswith("torch twin:"))
    installed = importlib.util.find_spec("torch") is not None
    if skip:
        assert twin_line == "torch twin: skipped (--no-torch)" and result["torch_twin"] == "skipped"
        assert result["torch_tokens_per_s"] is None
    elif installed:
        assert result["torch_twin"] == "ran" and "tok/s" in twin_line
    else:
        assert twin_line == "torch twin: not run (torch not installed)"


def test_the_twin_utilisation_stands_beside_npformers():
    result = run(TINY, batch=2, steps=2, log=lambda *a: None)
    tokens = 2 * TINY.block_size
    assert result["torch_matmul_flops"] > 0 and result["torch_step_s"] > 0
    expected = TINY.flops_per_token() * tokens / result["torch_step_s"] / result["torch_matmul_flops"]
    assert abs(result["torch_mfu"] - expected) <= 1e-12 * expected
    assert abs(result["torch_tokens_per_s"] * result["torch_step_s"] - tokens) < 1e-6 * tokens
    assert isinstance(result["machine"]["torch_blas"], str) and result["machine"]["torch_blas"]
    from npformer.ops import fastpath

    assert result["fastpath"] == {"threads": fastpath.num_threads(), "causal_block": fastpath.causal_block(),
                                  "keeps_freed_memory": fastpath.keep_freed_memory()}


def test_engines_take_turns_round_after_round():
    from npformer.bench import interleaved

    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then alternating rounds
    assert [len(t) for t in times.values()] == [3, 3] and all(x >= 0 for t in times.values() for x in t)


def test_profile_attributes_the_step_to_op_families(capsys):
    from npformer.bench_profile import DIRECTIONS, profile_step

    result = profile_step(TINY, batch=2, steps=2, warmup=1)
    families = {r["family"] for r in result["rows"]}
    assert {"linear", "attention", "layernorm", "activations", "optimizer", "embedding", "cross_entropy"} <= families
    for r in result["rows"]:
        assert abs(r["total"] - sum(r[d] for d in DIRECTIONS)) <= 1e-12 * max(r["total"], 1e-30)
        assert all(r[d] >= 0 for d in DIRECTIONS)
    by = {r["family"]: r for r in result["rows"]}
    assert by["optimizer"]["update"] > 0 and by["optimizer"]["forward"] == by["optimizer"]["backward"] == 0
    assert by["linear"]["forward"] > 0 and by["linear"]["backward"] > 0 and by["linear"]["update"] == 0
    # every profiled second lands in exactly one row: the rows add up to the profiled step
    assert 0.7 * result["profiled_step_s"] <= result["attributed_s"] <= 1.05 * result["profiled_step_s"]
    totals = [r["total"] for r in result["rows"]]
    assert totals == sorted(totals, reverse=True)


def test_profile_of_the_twin_attributes_its_step_to_the_same_families():
    """With ``twin=True`` the torch twin's step is profiled too: its operators land in npformer's families
    (matrix products in linear, the fused attention in attention, AdamW's in optimizer...), each row's
    directions add up to its total, and the rows to about the profiled step."""
    from npformer.bench_profile import DIRECTIONS, format_table, profile_step

    result = profile_step(TINY, batch=2, steps=2, warmup=1, twin=True)
    twin = result["twin"]
    by = {r["family"]: r for r in twin["rows"]}
    assert {"linear", "attention", "layernorm", "activations", "optimizer", "cross_entropy"} <= set(by)
    for r in twin["rows"]:
        assert abs(r["total"] - sum(r[d] for d in DIRECTIONS)) <= 1e-12 * max(r["total"], 1e-30)
    assert by["optimizer"]["update"] > 0 and by["optimizer"]["forward"] == by["optimizer"]["backward"] == 0
    assert by["linear"]["forward"] > 0 and by["linear"]["backward"] > 0 and by["linear"]["update"] == 0
    assert 0.3 * twin["profiled_step_s"] <= twin["attributed_s"] <= 1.05 * twin["profiled_step_s"]
    table = format_table(result).splitlines()
    assert table[0].endswith("| torch twin ms |")
    linear = next(line for line in table if line.startswith("| linear |"))
    assert linear.endswith(f" {by['linear']['total'] * 1e3:.1f} |")
    assert table[-1].startswith("The torch twin's profiled step")
    assert profile_step(TINY, batch=1, steps=1, warmup=1)["twin"] is None  # off unless asked


def test_profile_flag_prints_the_table(capsys):
    assert cli_main(["bench", "--profile", "--steps", "1", "--batch", "1", "--n-layer", "1", "--d-model", "16",
                     "--n-head", "2", "--block-size", "8", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| op family | forward ms | backward ms |")
    assert any(line.startswith("| linear |") for line in out) and any("**step**" in line for line in out)
    data = json.loads(out[-1])
    assert {r["family"] for r in data["rows"]} >= {"linear", "attention"}
    assert out[0].endswith("| torch twin ms |") and {r["family"] for r in data["twin"]["rows"]} >= {"linear"}
    assert cli_main(["bench", "--profile", "--steps", "1", "--batch", "1", "--n-layer", "1", "--d-model", "16",
                     "--n-head", "2", "--block-size", "8", "--no-torch"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith("| share |") and "twin" not in out[-1]


def test_profile_does_not_combine_with_inference(capsys):
    assert cli_main(["bench", "--profile", "--inference"]) == 2
    assert "--profile" in capsys.readouterr().err


def test_each_engines_matmul_speed_is_the_better_of_a_measurement_before_and_after_the_rounds(monkeypatch):
    """A slow moment during one measurement of the matmul speed cannot raise a utilisation: the bench
    measures each engine's speed before and after the rounds and keeps the higher."""
    import npformer.bench as bench
    from kernels.twins import common

    numpy_speeds, torch_speeds = iter([1e9, 3e9]), iter([5e9, 2e9])  # NumPy slow first, torch slow last
    monkeypatch.setattr(bench, "matmul_flops", lambda dtype: next(numpy_speeds))
    monkeypatch.setattr(common, "matmul_flops", lambda dtype: next(torch_speeds))
    lines = []
    result = run(TINY, batch=2, steps=1, log=lines.append)
    assert result["matmul_flops"] == 3e9 and result["torch_matmul_flops"] == 5e9
    assert result["matmul_ratio_vs_torch"] == 3e9 / 5e9 and lines[-1].endswith("with NumPy's matmul 0.60x torch's")
    assert lines[0].startswith("numpy float32 matmul: 3 GFLOP/s") and lines[1].startswith("torch float32 matmul: 5 ")
    tokens = 2 * TINY.block_size
    assert abs(result["mfu"] - TINY.flops_per_token() * tokens / result["step_s"] / 3e9) <= 1e-12 * result["mfu"]


def test_linear_shapes_count_every_product_of_the_step():
    """The linear layers' shapes carry the step's weight FLOPs: 3 products of 2 N Din Dout FLOPs per
    layer, which with attention's 2 T D per layer and position make up ``flops_per_token``."""
    from npformer.bench import linear_shapes

    for cfg, batch in ((REFERENCE, 16), (TINY, 3)):
        shapes = linear_shapes(cfg, batch)
        tokens = batch * cfg.block_size
        assert all(n == tokens for n, _, _, _ in shapes)
        weight_flops = sum(3 * 2 * n * din * dout * count for n, din, dout, count in shapes)
        attention_flops = 3 * 2 * cfg.n_layer * 2 * cfg.block_size * cfg.d_model * tokens
        assert weight_flops + attention_flops == cfg.flops_per_token() * tokens


def test_products_step_makes_the_three_products_of_each_layer():
    """``products_step`` computes y = x W^T, dx = dy W and dW = dy^T x into its outputs, ``count`` times."""
    from npformer.bench import products_step

    made, calls = [], []
    rng = np.random.default_rng(1)

    def array(shape):
        made.append(rng.standard_normal(shape))
        return made[-1]

    def matmul(a, b, out):
        calls.append(out.shape)
        np.matmul(a, b, out=out)

    step = products_step([(5, 3, 4, 2), (5, 4, 2, 1)], array, matmul)
    step()
    assert calls == [(5, 4), (5, 3), (4, 3)] * 2 + [(5, 2), (5, 4), (2, 4)]
    x, W, dy, y, dx, dW = made[:6]
    np.testing.assert_array_equal(y, x @ W.T)
    np.testing.assert_array_equal(dx, dy @ W)
    np.testing.assert_array_equal(dW, dy.T @ x)


def test_run_compares_the_linear_products_of_the_two_engines():
    lines = []
    result = run(TINY, batch=2, steps=2, log=lines.append)
    assert result["products_s"] > 0 and result["torch_products_s"] > 0
    assert result["products_ratio_vs_torch"] == result["torch_products_s"] / result["products_s"]
    assert any(line.startswith("the step's linear-layer products alone") and
               line.endswith(f"NumPy's {result['products_ratio_vs_torch']:.2f}x torch's speed") for line in lines)


def test_every_figure_of_a_float64_bench_is_in_float64(monkeypatch):
    """--dtype float64: npformer's step, the twin's step, both matmul speeds and both products run in float64."""
    import npformer.bench as bench
    from kernels.twins import common

    seen = []
    for module in (bench, common):
        original = module.matmul_flops
        monkeypatch.setattr(module, "matmul_flops", lambda *a, original=original, **k: seen.append(k["dtype"]) or
                            original(n=64, seconds=0.01, dtype=k["dtype"]))
    from kernels.twins import gpt as twin_gpt

    made = []
    make = twin_gpt._make_step  # common.make_training_step, as the GPT twin imported it
    monkeypatch.setattr(twin_gpt, "_make_step", lambda *a, **k: made.append(a[1]["dtype"]) or make(*a, **k))
    products_dtypes = []
    step = bench.products_step
    for module in (bench, common):  # common imported products_step from bench
        monkeypatch.setattr(module, "products_step", lambda shapes, array, matmul: products_dtypes.append(
            str(array((1, 1)).dtype)) or step(shapes, array, matmul))
    lines = []
    cfg = GPTConfig(**{**TINY.to_dict(), "dtype": "float64"})
    result = run(cfg, batch=1, steps=1, log=lines.append)
    assert {str(np.dtype(d)) for d in seen} == {"float64"} and len(seen) == 4  # each engine, before and after
    assert made == ["float64"] and sorted(products_dtypes) == ["float64", "torch.float64"]
    assert lines[0].startswith("numpy float64 matmul") and lines[1].startswith("torch float64 matmul")
    assert result["config"]["dtype"] == "float64" and result["products_ratio_vs_torch"] > 0
