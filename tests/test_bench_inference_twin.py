"""The torch twins' KV-cached decoding (``kernels/twins/decode.py``) and the twin's column of
``npformer bench --inference``.

The cached forward must give, at every step, the logits of the twin's own full forward over the
tokens so far (float64, GPT and LLaMA with grouped-query attention, windows, tied heads, biases,
experts), and those of npformer's own cached decoding; the bench reports the twin's tokens/s and
the ratios npformer / twin beside transformers', and in float64 the three engines' greedy tokens
are the same.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins import decode, hf_decode
from npformer import bench_inference
from npformer.bench_inference import npformer_decode
from npformer.cli import main as cli_main
from npformer.hf import save_pretrained
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import Llama, LlamaConfig
from tests.badinput import expect_rejected
from tests.models.helpers import randomise
from tests.tolerances import MODEL_RTOL, assert_close

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The bench sets torch's thread count for its timings; the rest of the suite runs torch on one thread."""
    yield
    torch.set_num_threads(1)


@st.composite
def gpt_configs(draw):
    n_head = draw(st.integers(1, 3))
    return GPTConfig(vocab_size=draw(st.sampled_from([1, 5, 13])), block_size=draw(st.integers(2, 9)),
                     n_layer=draw(st.integers(1, 2)), n_head=n_head, d_model=n_head * draw(st.integers(1, 3)),
                     bias=draw(st.booleans()), dtype="float64")


@st.composite
def llama_configs(draw):
    """MHA, GQA or MQA; head_dim given or implied; biases, a tied head, a sliding window, experts or none."""
    n_kv_head = draw(st.integers(1, 3))
    n_head = n_kv_head * draw(st.integers(1, 3))
    head_dim = draw(st.one_of(st.none(), st.sampled_from([2, 4])))
    d_model = draw(st.integers(1, 7)) if head_dim else n_head * 2 * draw(st.integers(1, 2))
    block_size = draw(st.integers(2, 9))
    return LlamaConfig(
        vocab_size=draw(st.sampled_from([1, 5, 13])), block_size=block_size, n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_kv_head=n_kv_head, d_model=d_model, head_dim=head_dim,
        intermediate_size=draw(st.one_of(st.none(), st.integers(1, 7))),
        rope_theta=draw(st.sampled_from([10000.0, 3.0])), tie_word_embeddings=draw(st.booleans()),
        qkv_bias=draw(st.booleans()), o_bias=draw(st.booleans()),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, block_size))),
        num_local_experts=draw(st.sampled_from([0, 0, 3])), num_experts_per_tok=2, dtype="float64")


def _pair(model_cls, cfg, seed):
    """An npformer float64 model with weights of order one, and its twin holding the same weights."""
    model = randomise(model_cls(cfg, seed=seed), seed + 7)
    model.eval()
    family = "gpt" if model_cls is GPT else "llama"
    return model, decode.load_twin(family, cfg.to_dict(), model.state_dict())


def _chunks(draw, T: int):
    """Lengths of the calls that feed T tokens: a prompt, then single tokens or short runs."""
    sizes = [draw(st.integers(1, T))]
    while sum(sizes) < T:
        sizes.append(draw(st.integers(1, min(3, T - sum(sizes)))))
    return sizes


@settings(max_examples=12)
@given(family=st.sampled_from(["gpt", "llama"]), data=st.data())
def test_cached_logits_equal_the_twins_own_full_forward_at_every_step(family, data):
    """Each call's logits (B, T_call, V) through the cache equal the twin's ``forward`` over the whole prefix at
    those positions, and npformer's cached forward of the same calls."""
    cfg = data.draw(gpt_configs() if family == "gpt" else llama_configs(), label="cfg")
    model, twin = _pair(GPT if family == "gpt" else Llama, cfg, data.draw(st.integers(0, 3)))
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    B = data.draw(st.integers(1, 2), label="B")
    ids = np.random.default_rng(data.draw(st.integers(0, 9))).integers(0, cfg.vocab_size, (B, T))
    caches, ours = decode.make_kv_caches(twin, B), model.make_kv_caches(B)
    t0 = 0
    for size in _chunks(data.draw, T):
        got = decode.forward_cached(twin, torch.from_numpy(ids[:, t0:t0 + size]), caches).numpy()
        with torch.no_grad():
            full = twin(torch.from_numpy(ids[:, :t0 + size]))[0].numpy()[:, t0:]  # the twin's own forward
        assert_close(got, full, rtol=MODEL_RTOL, what=f"positions {t0} .. {t0 + size - 1}")
        np_logits, _ = model.forward(ids[:, t0:t0 + size], kv_caches=ours)
        assert_close(got, np_logits, rtol=MODEL_RTOL, what=f"npformer at {t0} .. {t0 + size - 1}")
        t0 += size
    assert all(c.length == T for c in caches)


@settings(max_examples=6)
@given(family=st.sampled_from(["gpt", "llama"]), data=st.data())
def test_greedy_decode_picks_npformers_tokens_in_float64(family, data):
    cfg = data.draw(gpt_configs() if family == "gpt" else llama_configs(), label="cfg")
    model, twin = _pair(GPT if family == "gpt" else Llama, cfg, data.draw(st.integers(0, 3)))
    P = data.draw(st.integers(1, cfg.block_size - 1), label="prompt")
    n = data.draw(st.integers(1, cfg.block_size - P), label="new")
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, P))
    seconds, theirs = decode.greedy_decode(twin, torch.from_numpy(prompt), n)
    _, ours = npformer_decode(model, prompt, n)
    assert seconds >= 0 and theirs.shape == (2, n)
    np.testing.assert_array_equal(theirs, ours)


def test_the_window_and_the_cache_change_the_logits():
    """What the cached path is checked on is not inert: a window hides old keys, a cache holds the prompt."""
    base = dict(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_kv_head=1, d_model=8, dtype="float64")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])  # the last two differ: a window of 2 still mixes two values
    last = []
    for window in (None, 2):
        _, twin = _pair(Llama, LlamaConfig(**base, sliding_window=window), 0)
        caches = decode.make_kv_caches(twin, 1)
        decode.forward_cached(twin, ids[:, :7], caches)
        last.append(decode.forward_cached(twin, ids[:, 7:], caches)[0, -1].numpy())
        fresh = decode.forward_cached(twin, ids[:, 7:], decode.make_kv_caches(twin, 1))[0, -1].numpy()
        assert np.abs(last[-1] - fresh).max() > 1e-3  # the prompt in the cache moves the last token's logits
    assert np.abs(last[0] - last[1]).max() > 1e-3


# -- the bench's twin column ------------------------------------------------------------------------
SMALL = {"gpt": (GPT, GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, d_model=16)),
         "llama": (Llama, LlamaConfig(vocab_size=40, block_size=24, n_layer=2, n_head=4, n_kv_head=2, d_model=16))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float32 Hugging Face folder of a small GPT and of a small LLaMA with grouped-query attention."""
    out = {}
    for family, (model_cls, cfg) in SMALL.items():
        out[family] = tmp_path_factory.mktemp(family)
        save_pretrained(randomise(model_cls(cfg, seed=1), 5), out[family])
    return out


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_bench_json_has_the_twins_figures_and_ratios(folders, family, capsys):
    assert cli_main(["bench", "--inference", "--hf", str(folders[family]), "--prompt-len", "5", "--new-tokens", "4",
                     "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    ours, twin, hf = result["npformer"], result["twin"], result["transformers"]
    for engine in (ours, twin, hf):
        assert engine["prefill_tokens_per_s"] > 0 and engine["decode_tokens_per_s"] > 0
    assert result["twin_prefill_ratio"] == pytest.approx(ours["prefill_tokens_per_s"] / twin["prefill_tokens_per_s"])
    assert result["twin_decode_ratio"] == pytest.approx(ours["decode_tokens_per_s"] / twin["decode_tokens_per_s"])
    assert result["decode_ratio"] == pytest.approx(ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
    assert twin["blas"] != "unknown" and twin["num_threads"] >= 1 and result["dtype"] == "float32"
    assert isinstance(result["same_tokens_twin"], bool) and isinstance(result["all_same_tokens"], bool)
    assert result["all_same_tokens"] == (result["same_tokens_twin"] and result["same_tokens"])
    assert "torch twin:" in out and "npformer / torch twin:" in out


@pytest.mark.parametrize("family", ["gpt", "llama"])
@settings(max_examples=2)
@given(batch=st.integers(1, 2), prompt_len=st.integers(1, 9))
def test_three_engines_pick_the_same_greedy_tokens_in_float64(folders, family, batch, prompt_len):
    lines = []
    result = bench_inference.run(str(folders[family]), prompt_len=prompt_len, new_tokens=6, batch=batch,
                                 repeats=1, dtype="float64", log=lines.append)
    assert result["dtype"] == "float64"
    assert result["same_tokens_twin"] is True and result["same_tokens"] is True and result["all_same_tokens"] is True
    assert result["first_difference_twin"] is None and result["first_difference"] is None
    assert any("the same in every engine" in line and "float64" in line for line in lines)


def test_a_disagreement_is_reported_not_raised(folders, monkeypatch):
    """The twin's tokens changed from the third new token on: the bench says so and where, and finishes."""
    timed = decode.time_inference

    def altered(*args, **kwargs):
        out = timed(*args, **kwargs)
        out["tokens"] = out["tokens"].copy()
        out["tokens"][:, 2:] = (out["tokens"][:, 2:] + 1) % SMALL["gpt"][1].vocab_size
        return out

    monkeypatch.setattr(decode, "time_inference", altered)
    lines = []
    result = bench_inference.run(str(folders["gpt"]), prompt_len=4, new_tokens=5, repeats=1, hf=False,
                                 log=lines.append)
    assert result["same_tokens_twin"] is False and result["first_difference_twin"] == 2
    assert result["all_same_tokens"] is False and result["transformers"] is None and result["same_tokens"] is None
    assert any("from new token 3 of 5" in line for line in lines)


def test_no_torch_engines_leave_their_fields_empty(folders):
    result = bench_inference.run(str(folders["llama"]), prompt_len=3, new_tokens=2, repeats=1, hf=False, twin=False,
                                 log=lambda *a: None)
    assert result["npformer"]["decode_tokens_per_s"] > 0
    for key in ("twin", "transformers", "twin_prefill_ratio", "twin_decode_ratio", "same_tokens_twin",
                "all_same_tokens"):
        assert result[key] is None, key


def test_cli_takes_dtype_with_inference(folders, capsys):
    assert cli_main(["bench", "--inference", "--hf", str(folders["gpt"]), "--prompt-len", "3", "--new-tokens", "2",
                     "--repeats", "1", "--dtype", "float64", "--no-torch", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dtype"] == "float64" and result["twin"] is None and result["transformers"] is None


# -- bad input --------------------------------------------------------------------------------------
def _tiny_twin():
    return _pair(Llama, LlamaConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_kv_head=1, d_model=4,
                                    dtype="float64"), 0)[1]


@pytest.mark.parametrize("arg, bad", [("family", "bert"), ("family", None), ("state", "float16"),
                                      ("state", "mixed")])
def test_load_twin_rejects_bad_input(arg, bad):
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=2), seed=0)
    state = model.state_dict()
    if arg == "state":
        state = {k: v.astype(np.float16) if bad == "float16" or i == 0 else v for i, (k, v) in enumerate(state.items())}
    family = bad if arg == "family" else "gpt"
    expect_rejected(lambda: decode.load_twin(family, model.cfg.to_dict(), state), "load_twin", arg)


@pytest.mark.parametrize("arg, bad", [("twin", "model"), ("twin", None), ("batch", 0), ("batch", 1.0),
                                      ("max_len", 7), ("max_len", 0), ("max_len", True)])
def test_make_kv_caches_rejects_bad_input(arg, bad):
    twin = _tiny_twin()
    kwargs = {"twin": twin, "batch": 1, "max_len": None, arg: bad}
    expect_rejected(lambda: decode.make_kv_caches(**kwargs), "make_kv_caches", arg)


@pytest.mark.parametrize("arg, bad", [
    ("ids", np.zeros((1, 2), np.int64)), ("ids", torch.zeros(1, 2, dtype=torch.int32)),
    ("ids", torch.zeros(2, dtype=torch.int64)), ("ids", torch.zeros(1, 0, dtype=torch.int64)),
    ("ids", torch.full((1, 2), 7)), ("ids", torch.full((1, 2), -1)), ("ids", torch.zeros(1, 7, dtype=torch.int64)),
    ("caches", None), ("caches", "one"), ("caches", "batch 2"), ("caches", "uneven"), ("caches", "float32"),
    ("twin", "model")])
def test_forward_cached_rejects_bad_input(arg, bad):
    twin = _tiny_twin()
    ids, caches = torch.zeros(1, 2, dtype=torch.int64), decode.make_kv_caches(twin, 1)
    if arg == "ids":
        ids = bad
    elif arg == "caches":
        caches = {None: None, "one": caches[:1], "batch 2": decode.make_kv_caches(twin, 2), "uneven": caches,
                  "float32": decode.make_kv_caches(twin.float(), 1)}[bad]
        twin.double()
        if bad == "uneven":
            caches[0].length = 1  # one layer's cache ahead of the other's
    elif arg == "twin":
        twin = bad
    expect_rejected(lambda: decode.forward_cached(twin, ids, caches), "forward_cached", arg)


@pytest.mark.parametrize("arg, bad", [("new_tokens", 0), ("new_tokens", 2.0), ("new_tokens", 6),
                                      ("prompt", np.zeros((1, 2), np.int64)), ("prompt", torch.zeros(3, dtype=torch.int64))])
def test_greedy_decode_rejects_bad_input(arg, bad):
    kwargs = {"prompt": torch.zeros(1, 2, dtype=torch.int64), "new_tokens": 2, arg: bad}
    expect_rejected(lambda: decode.greedy_decode(_tiny_twin(), **kwargs), "greedy_decode", arg)


@pytest.mark.parametrize("arg, bad", [("dtype", "float16"), ("dtype", None), ("twin", 1), ("twin", "yes")])
def test_bench_run_rejects_bad_options_before_timing(arg, bad):
    lines = []
    expect_rejected(lambda: bench_inference.run(**{arg: bad}, log=lines.append), "bench_inference.run", arg)
    assert lines == []


def test_a_transformers_failure_is_reported_and_the_other_engines_kept(tmp_path):
    """transformers' grouped MoE matmul has no float64 kernel: a float64 bench of a Mixtral folder
    reports that engine as not run, with the reason on one line, and keeps npformer's figures."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=24,
                                     num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    lines = []
    result = bench_inference.run(str(tmp_path), prompt_len=3, new_tokens=3, repeats=1, dtype="float64",
                                 log=lines.append)
    assert result["npformer"]["decode_tokens_per_s"] > 0
    for key in ("transformers", "prefill_ratio", "decode_ratio", "same_tokens", "first_difference"):
        assert result[key] is None, key
    failed = [line for line in lines if line.startswith("transformers: not run (")]
    assert len(failed) == 1 and "\n" not in failed[0] and failed[0].endswith(")")


@pytest.mark.parametrize("value,threads", [(None, "cores"), ("3", 3), (" 2 ", 2), ("2,1", 2), ("", None),
                                           ("x", None), ("0", None), ("-1", None), (",4", None)])
def test_thread_count_reads_omp_num_threads_leniently(value, threads):
    expected = (os.cpu_count() or 1) if threads == "cores" else threads
    assert hf_decode.thread_count(value) == expected


@pytest.mark.parametrize("value", ["2,1", "", "many"])
def test_a_bad_omp_num_threads_does_not_stop_the_twin(folders, monkeypatch, value):
    """OpenMP's list form takes its first number; a value with none leaves torch's thread count as it is."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    try:
        result = bench_inference.run(str(folders["gpt"]), prompt_len=3, new_tokens=2, repeats=1, hf=False,
                                     log=lambda *a: None)
        assert result["twin"]["num_threads"] == (2 if value == "2,1" else before)
        assert result["same_tokens_twin"] is not None
    finally:
        torch.set_num_threads(before)
