"""npformer.viz: every view on tiny GPT, LLaMA, VariantLM (Mixture of Depths too), Mamba, Mixtral and ALBERT
models, gradient flow on encoder-decoders too, a Hugging Face folder for attention.

Each figure is checked as a picture (the PNG's pixel size, the axes, their titles and tick labels)
and as numbers: what it plots equals the model's own values (the recorder's attention
probabilities, the logits' argmax for the lens' last row), and every statistic equals a direct
computation written out here (entropy row by row, norms of a training step done by hand).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer import viz
from npformer.cli import main
from npformer.data.char import CharTokenizer
from npformer.data.corpus import get_batch
from npformer.models import build as build_model
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import Llama, LlamaConfig
from npformer.models.mamba import MambaLM
from npformer.models.variant import VariantLM
from npformer.optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine
from npformer.train import ConfigError, TrainConfig, model_config, split_tokens, train
from tests.badinput import expect_rejected
from tests.strategies import DTYPES, rngs
from tests.tolerances import MODEL_RTOL, RTOL, assert_close

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
QUIET = lambda *a: None  # noqa: E731
F64 = np.dtype(np.float64)


def make_model(kind: str, dtype: str = "float64"):
    """Tiny models of every head and norm the viewers must find."""
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=8, dtype=dtype), seed=1)
    if kind == "llama":  # grouped-query attention, untied head
        return Llama(LlamaConfig(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                                 dtype=dtype), seed=2)
    if kind == "llama_tied":
        return Llama(LlamaConfig(vocab_size=13, block_size=16, n_layer=3, n_head=2, n_kv_head=1, d_model=8,
                                 tie_word_embeddings=True, dtype=dtype), seed=3)
    if kind == "variant_post":  # post-norm (no ln_f), SwiGLU, untied head
        return build_model("variant", dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=8,
                                           norm="rmsnorm", norm_position="post", activation="swiglu",
                                           position="rope", tie_head=False, dtype=dtype), seed=4)
    if kind == "variant_pre":  # pre-norm LayerNorm ln_f, tied head
        return build_model("variant", dict(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=8,
                                           dtype=dtype), seed=5)
    if kind == "variant_parallel":  # parallel blocks, RMSNorm ln_f, untied head
        return build_model("variant", dict(vocab_size=13, block_size=16, n_layer=3, n_head=2, d_model=8,
                                           norm="rmsnorm", parallel_block=True, tie_head=False, dtype=dtype), seed=6)
    if kind == "variant_mod":  # Mixture of Depths: block 1 (and 3) routes half the tokens
        return build_model("variant", dict(vocab_size=13, block_size=16, n_layer=4, n_head=2, d_model=8,
                                           mod_capacity=0.5, position="rope", dtype=dtype), seed=7)
    if kind in ("mamba", "mamba_untied"):  # norm_f, the tied head stored as embeddings
        return build_model("mamba", dict(vocab_size=13, block_size=16, n_layer=2, d_model=8, d_state=4,
                                         tie_word_embeddings=kind == "mamba", dtype=dtype), seed=8)
    if kind == "mixtral":  # a mixture of experts in every layer (its router records 'probs' too)
        return Llama(LlamaConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_kv_head=1, d_model=8,
                                 num_local_experts=3, num_experts_per_tok=2, dtype=dtype), seed=9)
    raise ValueError(kind)


MODELS = ("gpt", "llama")
LENS_MODELS = ("gpt", "llama", "llama_tied", "variant_post", "variant_pre", "variant_parallel", "variant_mod",
               "mamba", "mamba_untied", "mixtral")


def png_size(path) -> tuple:
    """(width, height) in pixels from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_png(fig, path):
    viz.save_figure(fig, path)
    w, h = fig.get_size_inches() * viz.DPI
    assert png_size(path) == (round(w), round(h))


def recorded_probs(model, ids):
    """The attention probabilities the recorder holds after the model's own forward (batch row 0)."""
    model.eval()
    rec = model.start_recording()
    model.forward(ids[None])
    model.stop_recording()
    return {k: v[0] for k, v in rec.items() if k.endswith(".probs")}


def ticks(labels):
    return [t.get_text() for t in labels]


# -- attention ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("T", [1, 5])
def test_attention_grid_shows_every_layer_and_head_labelled_with_the_tokens(kind, T, tmp_path):
    model = make_model(kind)
    ids = np.arange(T) % 13 + 1
    tokens = [f"t{i}" for i in range(T - 1)] + ["a$b\n"]  # a dollar (not mathtext) and a newline, shown as text
    fig, probs = viz.attention_maps(model, ids, tokens)
    expected = recorded_probs(model, ids)
    assert list(probs) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(probs[name], expected[name])
    L, H = len(probs), next(iter(probs.values())).shape[0]
    assert L == model.cfg.n_layer and H == model.cfg.n_head
    heatmaps = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert len(fig.axes) == L * H + 1 and len(heatmaps) == L * H  # the grid and one colour bar
    labels = [viz.display_token(t) for t in tokens]
    assert labels[-1] == "a\\$b\\n"
    for k, ax in enumerate(heatmaps):
        l, h = divmod(k, H)
        assert ax.get_title() == f"layer {l} head {h}"
        assert ticks(ax.get_xticklabels()) == labels and ticks(ax.get_yticklabels()) == labels
        np.testing.assert_array_equal(ax.images[0].get_array(), list(probs.values())[l][h])
    assert_png(fig, tmp_path / "grid.png")


@pytest.mark.parametrize("kind", MODELS)
def test_attention_one_head_enlarged(kind, tmp_path):
    model = make_model(kind)
    ids = np.array([3, 1, 4, 1, 5, 9])
    tokens = list("pi-ish")
    fig, probs = viz.attention_maps(model, ids, tokens, head=(1, 1))
    name = list(probs)[1]
    assert len(fig.axes) == 2  # the map and its colour bar
    ax = fig.axes[0]
    assert ax.get_title() == f"layer 1 head 1 ({name})"
    assert ticks(ax.get_xticklabels()) == tokens and ax.get_xlabel() == "key" and ax.get_ylabel() == "query"
    np.testing.assert_array_equal(ax.images[0].get_array(), recorded_probs(model, ids)[name][1])
    assert len(ax.texts) == 36  # each probability written in its cell
    assert fig.get_size_inches()[0] > 4
    assert_png(fig, tmp_path / "one.png")


def entropy_by_rows(p):
    """Mean over queries (and leading axes) of -sum_j p log p, one row at a time, 0 log 0 = 0."""
    p = np.asarray(p, np.float64).reshape(-1, *p.shape[-3:])
    N, H, T, _ = p.shape
    out = np.zeros(H)
    for h in range(H):
        rows = [-sum(v * math.log(v) for v in p[n, h, i] if v > 0) for n in range(N) for i in range(T)]
        out[h] = sum(rows) / len(rows)
    return out


def diagonal_score(p, key):
    """Mean over queries i >= 1 of p[i, key(i)]."""
    p = np.asarray(p, np.float64).reshape(-1, *p.shape[-3:])
    N, H, T, _ = p.shape
    return np.array([np.mean([p[n, h, i, key(i)] for n in range(N) for i in range(1, T)]) for h in range(H)])


@given(rng=rngs(), B=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]), T=st.sampled_from([2, 3, 7]),
       dtype=DTYPES, causal=st.booleans())
def test_attention_scores_equal_a_direct_computation(rng, B, H, T, dtype, causal):
    z = rng.standard_normal((B, H, T, T)) * 3
    if causal:  # exact zeros above the diagonal: 0 log 0 must count as 0
        z = np.where(np.tril(np.ones((T, T), bool)), z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dtype)
    scores = viz.attention_scores({"blocks.0.attn.probs": p, "other": p[0]})
    for name, q in (("blocks.0.attn.probs", p), ("other", p[0])):
        s = scores[name]
        assert_close(s["entropy"], entropy_by_rows(q), rtol=RTOL[F64])
        assert_close(s["previous_token"], diagonal_score(q, lambda i: i - 1), rtol=RTOL[F64])
        assert_close(s["first_token"], diagonal_score(q, lambda i: 0), rtol=RTOL[F64])


def test_attention_scores_of_known_patterns():
    T = 5
    previous = np.zeros((1, T, T))
    previous[0, 0, 0] = 1.0
    previous[0, np.arange(1, T), np.arange(T - 1)] = 1.0  # every query on the key before it
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    s = viz.attention_scores({"prev": previous, "uniform": uniform[None]})
    assert s["prev"]["entropy"][0] == 0.0 and s["prev"]["previous_token"][0] == 1.0
    assert s["prev"]["first_token"][0] == 1 / (T - 1)  # only query 1's previous key is key 0
    assert_close(s["uniform"]["entropy"], [np.mean(np.log(np.arange(1, T + 1)))], rtol=RTOL[F64])
    one = viz.attention_scores({"one": np.ones((2, 1, 1))})["one"]  # T = 1: no query has a previous key
    assert one["entropy"].tolist() == [0.0, 0.0] and np.isnan(one["previous_token"]).all()


def test_attention_scores_of_a_model_equal_those_of_its_recorder():
    model = make_model("llama")
    ids = np.array([1, 2, 3, 4, 5, 6, 7])
    _, probs = viz.attention_maps(model, ids, list("abcdefg"))
    ours = viz.attention_scores(probs)
    direct = recorded_probs(model, ids)
    for name, p in direct.items():
        assert_close(ours[name]["entropy"], entropy_by_rows(p), rtol=RTOL[F64])
        assert_close(ours[name]["previous_token"], diagonal_score(p, lambda i: i - 1), rtol=RTOL[F64])


# -- logit lens -------------------------------------------------------------------------------------
def head_by_hand(model, x):
    """The final norm and head written out: LayerNorm / RMSNorm, then x W^T (+ b)."""
    if isinstance(model, GPT):
        ln = model.ln_f
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        h = (x - mu) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data
        return h @ model.wte.weight.data.T
    if isinstance(model, Llama):
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + model.cfg.rms_norm_eps) * model.norm.weight.data
        W = model.embed_tokens.weight.data if model.cfg.tie_word_embeddings else model.lm_head.weight.data
        return h @ W.T
    if isinstance(model, MambaLM):  # norm_f (RMSNorm), then lm_head or the tied embeddings
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + model.cfg.layer_norm_epsilon) * model.norm_f.weight.data
        W = model.embeddings.weight.data if model.cfg.tie_word_embeddings else model.lm_head.weight.data
        return h @ W.T
    W = model.wte.weight.data if model.cfg.tie_head else model.lm_head.weight.data
    if model.cfg.norm_position == "post":  # post-norm VariantLM: the last block ends in its norm
        return x @ W.T
    ln = model.ln_f
    if model.cfg.norm == "rmsnorm":
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + ln.eps) * ln.weight.data
    else:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        h = (x - mu) / np.sqrt(var + ln.eps) * ln.weight.data + ln.bias.data
    return h @ W.T


def stack_of(model):
    return "blocks" if isinstance(model, (GPT, VariantLM)) else "layers"


@pytest.mark.parametrize("kind", LENS_MODELS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logit_lens_reads_each_block_through_the_head_and_ends_at_the_logits(kind, dtype, tmp_path):
    model = make_model(kind, dtype)
    ids = np.array([[5, 3, 8, 1, 12, 0, 7]])
    tokens = list("abcdefg")
    lens, fig = viz.logit_lens(model, ids, tokens, decode=lambda i: "ABCDEFGHIJKLM"[i])
    model.eval()
    rec = model.start_recording()
    logits, _ = model.forward(ids)
    model.stop_recording()
    L, T = model.cfg.n_layer, 7
    assert lens.top_ids.shape == (L, T) and lens.logits.shape == (L, T, 13)
    np.testing.assert_array_equal(lens.top_ids[-1], logits[0].argmax(-1))  # the model's own prediction
    np.testing.assert_array_equal(lens.logits[-1], logits[0])
    p = np.exp(logits[0].astype(np.float64) - logits[0].max(-1, keepdims=True))
    assert_close(lens.top_probs[-1], p.max(-1) / p.sum(-1), rtol=RTOL[F64])
    stack = stack_of(model)
    assert lens.layers == [f"{stack}.{l}.out" for l in range(L)]
    for l in range(L):
        x = rec[f"{stack}.{l}.out"][0].astype(np.float64)
        assert_close(lens.logits[l], head_by_hand(model, x), rtol=RTOL[np.dtype(dtype)] * 10, what=f"layer {l}")
    np.testing.assert_array_equal(lens.top_ids, lens.logits.argmax(-1))
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    ax = fig.axes[0]
    assert ticks(ax.get_xticklabels()) == tokens and ticks(ax.get_yticklabels()) == lens.layers
    np.testing.assert_array_equal(ax.images[0].get_array(), lens.top_probs)
    assert [t.get_text() for t in ax.texts] == ["ABCDEFGHIJKLM"[i] for i in lens.top_ids.reshape(-1)]
    assert model.training is False and model.recorder is None
    assert_png(fig, tmp_path / "lens.png")


@settings(max_examples=8)
@given(kind=st.sampled_from(LENS_MODELS), T=st.sampled_from([1, 2, 3, 7, 16]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "float64"]), batched=st.booleans())
def test_any_prompt_lens_ends_at_the_argmax_and_probs_are_the_recorders(kind, T, seed, dtype, batched):
    model = make_model(kind, dtype)
    ids = np.random.default_rng(seed).integers(0, 13, size=(1, T) if batched else T)
    lens, _ = viz.logit_lens(model, ids)
    logits, _ = model.eval().forward(ids.reshape(1, T))
    np.testing.assert_array_equal(lens.top_ids[-1], logits[0].argmax(-1))
    if isinstance(model, MambaLM):  # no attention to look at
        return
    probs = viz.attention_probs(model, ids)
    expected = {k: v for k, v in recorded_probs(model, ids.reshape(-1)).items() if v.ndim == 3}
    assert list(probs) == list(expected) and len(probs) == model.cfg.n_layer
    for name, p in expected.items():
        np.testing.assert_array_equal(probs[name], p)
        k = model.cfg.mod_tokens(T) if kind == "variant_mod" and name.startswith(("blocks.1.", "blocks.3.")) else T
        assert probs[name].dtype == np.dtype(dtype) and probs[name].shape == (model.cfg.n_head, k, k)



def test_a_lens_that_would_not_end_at_the_models_logits_is_refused(monkeypatch):
    model = make_model("mamba")
    monkeypatch.setattr(viz, "FINAL_NORMS", ("ln_f",))  # norm_f not found: the rows would skip it
    message = expect_rejected(lambda: viz.logit_lens(model, np.array([1, 2, 3])), "logit_lens", "model")
    assert "logits" in message
    monkeypatch.setattr(viz, "TIED_TABLES", ("wte",))  # the tied table not found: no head at all
    expect_rejected(lambda: viz.logit_lens(model, np.array([1, 2, 3])), "logit_lens", "model")

def test_viewers_restore_the_mode_and_a_recording_in_progress():
    model = make_model("gpt").train()
    rec = model.start_recording()
    viz.logit_lens(model, np.array([1, 2]))
    viz.attention_maps(model, np.array([1, 2]), ["a", "b"])
    assert model.training and model.recorder is rec and len(rec) == 0
    assert all(m.pending_backwards == 0 for _, m in model.named_modules())


# -- gradient flow ------------------------------------------------------------------------------------
def tiny(root, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    data = root / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(data), n_layer=2, n_head=2, d_model=16, block_size=16, batch_size=4, steps=6, warmup=2,
                eval_interval=3, eval_batches=2, sample_tokens=0, lr=1e-2, out_dir=str(root / "run"), progress=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 6-step runs with --gradflow-every 2: a GPT and a LLaMA."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in MODELS:
        cfg = tiny(root / kind, model=kind, gradflow_every=2)
        train(cfg, log=QUIET)
        out[kind] = (cfg, Path(cfg.out_dir))
    return out


def norm(arrays):
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def first_step_by_hand(cfg):
    """Step 0 of ``train(cfg)`` written out: its gradient (before clipping), weights and recording."""
    tok = CharTokenizer.from_text(TEXT)
    train_ids, _, _ = split_tokens(tok.encode_array(TEXT), cfg.val_fraction, cfg.seed)
    data_rng = np.random.default_rng(cfg.seed + 1)
    model = build_model(cfg.model, model_config(cfg, tok.vocab_size).to_dict(), seed=cfg.seed)
    opt = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    for group in opt.param_groups:
        group["lr"] = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)(0)
    rec = model.start_recording()
    model.forward(*get_batch(train_ids, cfg.batch_size, cfg.block_size, data_rng))
    model.zero_grad()
    model.backward()
    model.stop_recording()
    params = dict(model.named_parameters())
    grads = {n: p.grad.copy() for n, p in params.items()}
    before = {n: p.data.copy() for n, p in params.items()}
    clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return params, grads, before, rec


@pytest.mark.parametrize("kind", MODELS)
def test_gradflow_json_holds_the_norms_of_a_step_done_by_hand(kind, runs):
    cfg, run = runs[kind]
    data = json.loads((run / viz.GRADFLOW_FILE).read_text())
    stack = "blocks" if kind == "gpt" else "layers"
    layers = [f"{stack}.0", f"{stack}.1", "other"]
    assert data["layers"] == layers and data["steps"] == [0, 2, 4] and data["every"] == 2
    assert set(data) == {"every", "saturation_threshold", "layers", "steps", *viz.GRADFLOW_STATS}
    for stat in viz.GRADFLOW_STATS:
        want = layers if stat not in viz.ACTIVATION_STATS else layers[:2]
        assert sorted(data[stat]) == sorted(want) and all(len(v) == 3 for v in data[stat].values())
    params, grads, before, rec = first_step_by_hand(cfg)
    first = "fc" if kind == "gpt" else "gate_proj"
    for layer in layers:
        names = [n for n in params if (n.startswith(layer + ".") if layer != "other" else not n.startswith(stack))]
        assert_close(data["grad_norm"][layer][0], norm(grads[n] for n in names), rtol=MODEL_RTOL)
        ratio = norm(params[n].data.astype(np.float64) - before[n] for n in names) / norm(before[n] for n in names)
        assert_close(data["update_ratio"][layer][0], ratio, rtol=MODEL_RTOL)
        if layer == "other":
            continue
        a_in = rec[f"{layer}.mlp.{first}.out"].astype(np.float64)
        a_out = rec[f"{layer}.mlp.act"].astype(np.float64)
        assert_close(data["act_in_mean"][layer][0], a_in.mean(), rtol=MODEL_RTOL)
        assert_close(data["act_in_std"][layer][0], a_in.std(), rtol=MODEL_RTOL)
        assert_close(data["act_out_mean"][layer][0], a_out.mean(), rtol=MODEL_RTOL)
        assert_close(data["act_out_std"][layer][0], a_out.std(), rtol=MODEL_RTOL)
        assert data["saturated"][layer][0] == float(np.mean(a_in < -3.0))


def test_gradflow_of_a_resumed_run_equals_the_uninterrupted_one(runs, tmp_path):
    cfg, run = runs["gpt"]
    part = tiny(tmp_path, gradflow_every=2, stop_at=3)
    train(part, log=QUIET)
    assert json.loads((tmp_path / "run" / viz.GRADFLOW_FILE).read_text())["steps"] == [0, 2]
    train(tiny(tmp_path, gradflow_every=2, resume=True), log=QUIET)
    assert (tmp_path / "run" / viz.GRADFLOW_FILE).read_text() == (run / viz.GRADFLOW_FILE).read_text()


def test_a_resumed_run_refuses_a_gradflow_file_it_cannot_continue(tmp_path):
    train(tiny(tmp_path, gradflow_every=1, stop_at=2), log=QUIET)
    flow_file = tmp_path / "run" / viz.GRADFLOW_FILE
    for bad in ("{not json", json.dumps({"layers": ["x"], "steps": []})):
        flow_file.write_text(bad)
        with pytest.raises(ConfigError) as info:
            train(tiny(tmp_path, gradflow_every=1, resume=True), log=QUIET)
        assert info.value.field == "gradflow_every" and flow_file.read_text() == bad  # nothing written


def test_gradflow_is_off_by_default_and_checked_by_name(tmp_path):
    assert TrainConfig().gradflow_every == 0
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError) as info:
            tiny(tmp_path, gradflow_every=bad).validate()
        assert info.value.field == "gradflow_every"
    train(tiny(tmp_path, steps=2, eval_interval=2), log=QUIET)
    assert not (tmp_path / "run" / viz.GRADFLOW_FILE).exists()


def test_gradient_flow_collect_by_hand():
    model = make_model("gpt").train()
    flow = viz.GradientFlow(model, every=3)
    assert flow.layers == ["blocks.0", "blocks.1", "other"] and flow.due(0) and flow.due(6) and not flow.due(4)
    rec = model.start_recording()
    model.forward(np.array([[1, 2, 3, 4]]), np.array([[2, 3, 4, 5]]))
    model.zero_grad()
    model.backward()
    model.stop_recording()
    before, grads = flow.snapshot(model)
    params = dict(model.named_parameters())
    for p in params.values():
        p.data -= 0.1 * p.grad
    row = flow.collect(0, model, before, {n: p.data for n, p in params.items()}, rec)
    names = [n for n in params if n.startswith("blocks.1.")]
    assert_close(row["grad_norm"]["blocks.1"], norm(params[n].grad for n in names), rtol=RTOL[F64])
    assert_close(row["update_ratio"]["blocks.1"], 0.1 * norm(params[n].grad for n in names)
                 / norm(before[n] for n in names), rtol=RTOL[F64])
    assert flow.to_dict()["grad_norm"]["other"] == [row["grad_norm"]["other"]]
    no_recorder = flow.collect(3, model, before, before)
    assert no_recorder["update_ratio"]["blocks.0"] == 0.0 and no_recorder["act_in_mean"]["blocks.0"] is None
    expect_rejected(lambda: flow.collect(3, model, before, before), "GradientFlow.collect", "step")
    expect_rejected(lambda: flow.collect(4, model, {}, before), "GradientFlow.collect", "before")
    bad = dict(before, **{"wte.weight": np.zeros(3)})
    expect_rejected(lambda: flow.collect(4, model, before, bad), "GradientFlow.collect", "after")
    expect_rejected(lambda: viz.GradientFlow(model, every=0), "GradientFlow", "every")
    expect_rejected(lambda: viz.GradientFlow("gpt"), "GradientFlow", "model")


@pytest.mark.parametrize("kind", MODELS)
def test_plot_gradflow_draws_one_line_per_layer_in_one_panel_per_statistic(kind, runs, tmp_path):
    _, run = runs[kind]
    data = json.loads((run / viz.GRADFLOW_FILE).read_text())
    for source in (run, run / viz.GRADFLOW_FILE, data):
        fig = viz.plot_gradflow(source)
        assert len(fig.axes) == len(viz.GRADFLOW_STATS) == 7
        for ax, (stat, title) in zip(fig.axes, viz.GRADFLOW_STATS.items()):
            assert ax.get_title() == title and ax.get_xlabel() == "step"
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == list(data[stat])
            for line in lines:
                np.testing.assert_array_equal(line.get_xdata(), data["steps"])
                np.testing.assert_array_equal(line.get_ydata(), data[stat][line.get_label()])
    assert fig.axes[0].get_yscale() == "log"
    assert_png(fig, tmp_path / "flow.png")


# -- loss curves ------------------------------------------------------------------------------------------
def test_plot_runs_puts_every_run_on_one_plot_with_its_final_perplexity(runs, tmp_path):
    from npformer import checkpoint

    dirs = [runs[k][1] for k in MODELS]
    fig = viz.plot_runs([dirs[0], dirs[1] / "ckpt.npz"], ["small gpt", "small llama"])
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for k, (run, label) in enumerate(zip(dirs, ["small gpt", "small llama"])):
        history = checkpoint.load(run / "ckpt.npz")["history"]
        train_line, val_line = lines[2 * k], lines[2 * k + 1]
        np.testing.assert_array_equal(train_line.get_xdata(), history["steps"])
        np.testing.assert_array_equal(train_line.get_ydata(), history["train_loss"])
        np.testing.assert_array_equal(val_line.get_ydata(), history["val_loss"])
        ppl = math.exp(history["val_loss"][-1])
        assert legend[2 * k:2 * k + 2] == [f"{label} train", f"{label} val (final ppl {ppl:.3f})"]
        assert train_line.get_color() == val_line.get_color()
    assert viz.plot_runs(dirs).axes[0].get_lines()[0].get_label() == "run train"  # the folder's name
    assert_png(fig, tmp_path / "losses.png")


# -- bad arguments ------------------------------------------------------------------------------------
def test_token_strings_and_layers():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode_array("the fox\n")
    assert viz.token_strings(tok, ids) == list("the fox\n") == viz.token_strings(tok, ids.tolist())
    assert [viz.display_token(t) for t in ("a b", "\n", "$x$", "")] == ["a\u2423b", "\\n", "\\$x\\$", "''"]
    assert [viz.layer_of(n) for n in ("blocks.3.attn.q_proj.weight", "layers.10.mlp.up_proj.weight", "wte.weight",
                                      "encoder.layer.0.x", "norm.weight")] == \
        ["blocks.3", "layers.10", "other", "encoder.layer.0", "other"]


def test_bad_arguments_are_refused_by_name(runs, tmp_path):
    model = make_model("gpt")
    ids = np.array([1, 2, 3])
    tok = CharTokenizer.from_text(TEXT)
    am = viz.attention_maps
    cases = [
        (lambda: am(object(), ids, list("abc")), "attention_maps", "model"),
        (lambda: am(model, ids.astype(float), list("abc")), "attention_maps", "ids"),
        (lambda: am(model, [1, 2, 3], list("abc")), "attention_maps", "ids"),
        (lambda: am(model, np.ones((2, 3), int), list("abc")), "attention_maps", "ids"),
        (lambda: am(model, np.array([1, 13]), list("ab")), "attention_maps", "ids"),
        (lambda: am(model, np.arange(17) % 5, list("a" * 17)), "attention_maps", "ids"),
        (lambda: am(model, ids, list("ab")), "attention_maps", "tokens"),
        (lambda: am(model, ids, "abc"), "attention_maps", "tokens"),
        (lambda: am(model, ids, list("abc"), head=(2, 0)), "attention_maps", "head"),
        (lambda: am(model, ids, list("abc"), head=(0, 2)), "attention_maps", "head"),
        (lambda: am(model, ids, list("abc"), head=1), "attention_maps", "head"),
        (lambda: viz.attention_scores([np.ones((1, 2, 2))]), "attention_scores", "probs"),
        (lambda: viz.attention_scores({}), "attention_scores", "probs"),
        (lambda: viz.attention_scores({"a": np.ones((1, 2, 3))}), "attention_scores", "probs"),
        (lambda: viz.attention_scores({"a": np.ones((2, 2), int)}), "attention_scores", "probs"),
        (lambda: viz.logit_lens(model, np.array([0.5])), "logit_lens", "ids"),
        (lambda: viz.logit_lens(model, ids, tokens=["a"]), "logit_lens", "tokens"),
        (lambda: viz.logit_lens(model, ids, decode="x"), "logit_lens", "decode"),
        (lambda: viz.plot_gradflow(3), "plot_gradflow", "path_or_data"),
        (lambda: viz.plot_gradflow({"steps": []}), "plot_gradflow", "path_or_data"),
        (lambda: viz.plot_gradflow(tmp_path / "none.json"), "plot_gradflow", "path_or_data"),
        (lambda: viz.plot_runs([]), "plot_runs", "runs"),
        (lambda: viz.plot_runs(str(runs["gpt"][1])), "plot_runs", "runs"),
        (lambda: viz.plot_runs([tmp_path]), "plot_runs", "runs"),
        (lambda: viz.plot_runs([runs["gpt"][1]], ["a", "b"]), "plot_runs", "labels"),
        (lambda: viz.save_figure(None, tmp_path / "x.png"), "save_figure", "fig"),
        (lambda: viz.attention_probs(object(), ids), "attention_probs", "model"),
        (lambda: viz.attention_probs(model, ids[None, None]), "attention_probs", "ids"),
        (lambda: viz.display_token(3), "display_token", "token"),
        (lambda: viz.token_strings(None, [1]), "token_strings", "tokenizer"),
        (lambda: viz.token_strings(tok, "ab"), "token_strings", "ids"),
        (lambda: viz.token_strings(tok, [1.5]), "token_strings", "ids"),
        (lambda: viz.token_strings(tok, [True]), "token_strings", "ids"),
        (lambda: viz.layer_of(3), "layer_of", "name"),
        (lambda: viz.read_gradflow(tmp_path / "none.json"), "read_gradflow", "path"),
        (lambda: viz.run_history(3), "run_history", "run"),
        (lambda: viz.run_history(tmp_path), "run_history", "run"),
        (lambda: viz.run_history(tmp_path / "x.npz"), "run_history", "run"),
    ]
    for call, func, arg in cases:
        message = expect_rejected(call, func, arg)
        assert "expected" in message, message
    fig, _ = am(model, ids, list("abc"))
    expect_rejected(lambda: viz.save_figure(fig, tmp_path / "x.jpg"), "save_figure", "path")


# -- the command line ---------------------------------------------------------------------------------
def run_cli(argv, cwd):
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def test_cli_writes_each_view(runs, tmp_path):
    gpt, llama = (str(runs[k][1]) for k in MODELS)
    commands = {
        "attention.png": ["attention", "--checkpoint", gpt, "--prompt", "the fox"],
        "head.png": ["attention", "--checkpoint", llama, "--prompt", "the fox", "--layer", "1", "--head", "0"],
        "lens.png": ["lens", "--checkpoint", llama + "/ckpt.npz", "--prompt", "the fox"],
        "flow.png": ["gradflow", gpt],
        "losses.png": ["losses", gpt, llama, "--label", "gpt", "--label", "llama"],
    }
    for name, argv in commands.items():
        status, out, err = run_cli(["viz", *argv, "--out", name], tmp_path)
        assert (status, err) == (0, ""), (name, err)
        assert out == f"wrote {name}\n" and png_size(tmp_path / name)[0] > 100


@pytest.mark.parametrize("argv, option", [
    (["attention", "--prompt", "the", "--out", "a.png"], "--checkpoint"),
    (["attention", "--checkpoint", "RUN", "--hf", "x", "--prompt", "the", "--out", "a.png"], "--checkpoint"),
    (["attention", "--checkpoint", "RUN", "--prompt", "the", "--out", "a.jpg"], "--out"),
    (["attention", "--checkpoint", "RUN", "--prompt", "the", "--out", "no/such/a.png"], "--out"),
    (["attention", "--checkpoint", "RUN", "--prompt", "the", "--layer", "0", "--out", "a.png"], "--head"),
    (["attention", "--checkpoint", "RUN", "--prompt", "the", "--layer", "2", "--head", "0", "--out", "a.png"],
     "--layer"),
    (["attention", "--checkpoint", "RUN", "--prompt", "the", "--layer", "1", "--head", "-1", "--out", "a.png"],
     "--head"),
    (["attention", "--checkpoint", "RUN", "--prompt", "THE", "--out", "a.png"], "--prompt"),
    (["attention", "--checkpoint", "RUN", "--prompt", "", "--out", "a.png"], "--prompt"),
    (["lens", "--checkpoint", "nowhere", "--prompt", "the", "--out", "a.png"], "--checkpoint"),
    (["lens", "--hf", "nowhere", "--prompt", "the", "--out", "a.png"], "--hf"),
    (["gradflow", "nowhere", "--out", "a.png"], "RUN_DIR"),
    (["losses", "RUN", "nowhere", "--out", "a.png"], "RUN"),
    (["losses", "RUN", "--label", "a", "--label", "b", "--out", "a.png"], "--label"),
])
def test_cli_refuses_bad_options_by_name(argv, option, runs, tmp_path):
    argv = [str(runs["gpt"][1]) if a == "RUN" else a for a in argv]
    status, out, err = run_cli(["viz", *argv], tmp_path)
    assert status == 2 and out == ""
    assert err.startswith("npformer viz: error: argument " + option + ":") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_cli_usage_errors_and_train_flag(tmp_path):
    assert run_cli(["viz"], tmp_path)[0] == 2
    assert run_cli(["viz", "attention", "--checkpoint", "x", "--out", "a.png"], tmp_path)[0] == 2  # no --prompt
    status, _, err = run_cli(["train", "--gradflow-every", "-1", "--out-dir", "r"], tmp_path)
    assert status == 2 and "argument --gradflow-every:" in err


# -- Mixture of Depths: a routed block's attention over its routed tokens ---------------------------------
def scores_in_real_positions(p, pos):
    """previous / first-token scores written out query by query: the mass on the key at real position
    pos[a] - 1 (resp. 0) where that key is among pos, else 0, over the queries with pos[a] >= 1."""
    p = np.asarray(p, np.float64).reshape(-1, *p.shape[-3:])
    N, H, T, _ = p.shape
    queries = [a for a in range(T) if pos[a] >= 1]
    out = {"previous_token": np.zeros(H), "first_token": np.zeros(H)}
    for h in range(H):
        for key, want in (("previous_token", lambda a: pos[a] - 1), ("first_token", lambda a: 0)):
            values = [sum(p[n, h, a, b] for b in range(T) if pos[b] == want(a)) for n in range(N) for a in queries]
            out[key][h] = np.mean(values) if values else np.nan
    return out


@pytest.mark.parametrize("T", [3, 7, 16])
def test_a_routed_block_is_labelled_with_its_routed_tokens_and_scored_in_real_positions(T, tmp_path):
    model = make_model("variant_mod")
    ids = (np.arange(T) * 5 + 2) % 13
    tokens = [f"w{i}" for i in range(T)]
    model.eval()
    rec = model.start_recording()
    model.forward(ids[None])
    model.stop_recording()
    fig, probs = viz.attention_maps(model, ids, tokens)
    k = model.cfg.mod_tokens(T)
    names = list(probs)
    assert names == [f"blocks.{l}.attn.probs" for l in range(4)]
    for l, name in enumerate(names):
        routed = rec[f"blocks.{l}.routed"][0] if l % 2 else np.arange(T)
        assert probs[name].shape == (2, len(routed), len(routed)) and len(routed) == (k if l % 2 else T)
        np.testing.assert_array_equal(probs.positions[name], routed)
        np.testing.assert_array_equal(probs[name], rec[name][0])
        panels = [ax for ax in fig.axes if ax.get_title().startswith(f"layer {l} head")]
        assert len(panels) == 2
        want = [tokens[i] for i in routed]
        for ax in panels:
            assert ticks(ax.get_xticklabels()) == want and ticks(ax.get_yticklabels()) == want
    ours = viz.attention_scores(probs)
    for name in names:
        direct = scores_in_real_positions(probs[name], probs.positions[name])
        for key in ("previous_token", "first_token"):
            assert_close(ours[name][key], direct[key], rtol=RTOL[F64], what=f"{name} {key}")
    one, _ = viz.attention_maps(model, ids, tokens, head=(1, 1))  # a routed block's head alone
    ax = one.axes[0]
    want = [tokens[i] for i in rec["blocks.1.routed"][0]]
    assert ticks(ax.get_xticklabels()) == want and ax.get_title() == "layer 1 head 1 (blocks.1.attn.probs)"
    np.testing.assert_array_equal(ax.images[0].get_array(), rec["blocks.1.attn.probs"][0][1])
    assert len(ax.texts) == k * k
    assert_png(one, tmp_path / "routed.png")


def test_scores_in_real_positions_of_a_known_routing():
    pos = np.array([0, 2, 3, 5])  # positions 1 and 4 skipped the block
    p = np.zeros((1, 4, 4))
    p[0, 0, 0] = 1.0
    p[0, 1] = [0.25, 0.75, 0, 0]  # query at 2: its predecessor 1 not routed: previous 0, first 0.25
    p[0, 2] = [0.5, 0.2, 0.3, 0]  # query at 3: key at 2 (0.2) is its predecessor
    p[0, 3] = [0.1, 0.1, 0.1, 0.7]  # query at 5: predecessor 4 not routed
    s = viz.attention_scores({"b": p}, {"b": pos})["b"]
    assert_close(s["previous_token"], [0.2 / 3], rtol=RTOL[F64])
    assert_close(s["first_token"], [(0.25 + 0.5 + 0.1) / 3], rtol=RTOL[F64])
    late = viz.attention_scores({"b": p}, {"b": pos + 1})["b"]  # position 0 not routed: every query counts, first 0
    assert late["first_token"][0] == 0.0 and late["previous_token"][0] == 0.2 / 4  # only 3 -> 4 is adjacent
    none = viz.attention_scores({"b": np.ones((1, 1, 1))}, {"b": np.array([0])})["b"]
    assert np.isnan(none["previous_token"]).all()
    for bad in (np.array([0, 2, 2, 5]), np.array([0, 1]), np.array([0.0, 1, 2, 3]), [0, 1, 2, 3]):
        expect_rejected(lambda: viz.attention_scores({"b": p}, {"b": bad}), "attention_scores", "positions")
    expect_rejected(lambda: viz.attention_scores({"b": p}, [pos]), "attention_scores", "positions")


# -- a layer shared over depths (ALBERT) ----------------------------------------------------------------
def albert():
    return build_model("albert", dict(vocab_size=13, max_position=16, embedding_size=6, n_layer=3, n_head=2,
                                      d_model=8, d_ff=12, dtype="float64"), seed=3)


def test_attention_of_a_shared_layer_has_one_row_per_application(tmp_path):
    model = albert()
    ids = np.array([1, 4, 2, 7, 3])
    fig, probs = viz.attention_maps(model, ids, list("abcde"))
    assert list(probs) == ["layer.attention.probs", "layer.attention.probs@2", "layer.attention.probs@3"]
    model.eval()
    rec = model.start_recording()
    model.forward(ids[None])
    model.stop_recording()
    for name in probs:
        np.testing.assert_array_equal(probs[name], rec[name][0])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"layer {l} head {h}" for l in range(3) for h in range(2)]
    one, _ = viz.attention_maps(model, ids, list("abcde"), head=(2, 1))
    np.testing.assert_array_equal(one.axes[0].images[0].get_array(), rec["layer.attention.probs@3"][0][1])
    assert_png(fig, tmp_path / "albert.png")


def step_by_hand(model, *inputs):
    """One recorded forward and backward; returns (recorder, gradients, weights)."""
    model.train()
    rec = model.start_recording()
    model.forward(*inputs)
    model.zero_grad()
    model.backward()
    model.stop_recording()
    params = dict(model.named_parameters())
    return rec, {n: p.grad.copy() for n, p in params.items()}, {n: p.data.copy() for n, p in params.items()}


def pooled(rec, names):
    return np.concatenate([np.asarray(rec[n], np.float64).reshape(-1) for n in names])


def check_activations(row, layer, rec, outs, ins):
    a_out, a_in = pooled(rec, outs), pooled(rec, ins)
    assert_close(row["act_out_mean"][layer], a_out.mean(), rtol=RTOL[F64], what=layer)
    assert_close(row["act_out_std"][layer], a_out.std(), rtol=RTOL[F64], what=layer)
    assert_close(row["act_in_mean"][layer], a_in.mean(), rtol=RTOL[F64], what=layer)
    assert_close(row["act_in_std"][layer], a_in.std(), rtol=RTOL[F64], what=layer)
    assert row["saturated"][layer] == float(np.mean(a_in < viz.SATURATION_THRESHOLD))


def test_gradflow_groups_a_shared_layer_as_one_and_pools_its_applications():
    model = albert()
    flow = viz.GradientFlow(model)
    assert flow.layers == ["layer", "other"] and viz.shared_layers(model) == ("layer",)
    assert viz.layer_of("layer.mlp.fc.weight", ("layer",)) == "layer" and viz.layer_of("layer.mlp.fc.weight") == "other"
    ids = np.array([[1, 4, 2, 7, 3, 5]])
    labels = np.full_like(ids, -100)
    labels[0, [1, 4]] = [4, 3]
    rec, grads, before = step_by_hand(model, ids, None, None, labels, np.array([1]))
    row = flow.collect(0, model, before, before, rec, grads)
    names = [n for n in grads if n.startswith("layer.")]
    assert_close(row["grad_norm"]["layer"], norm(grads[n] for n in names), rtol=RTOL[F64])
    apps = ["", "@2", "@3"]
    check_activations(row, "layer", rec, [f"layer.mlp.act{a}" for a in apps], [f"layer.mlp.fc.out{a}" for a in apps])


@pytest.mark.parametrize("family", ["t5", "bart", "transformer"])
def test_gradflow_of_an_encoder_decoder_finds_its_activations_encoder_first(family):
    sizes = {"t5": dict(num_layers=2, num_decoder_layers=3, d_kv=4), "bart": dict(n_layer=2, n_decoder_layer=3),
             "transformer": dict(n_layer=2, n_decoder_layer=3)}[family]
    model = build_model(family, dict(vocab_size=13, n_head=2, d_model=8, d_ff=12, dtype="float64", **sizes), seed=2)
    flow = viz.GradientFlow(model)
    stack = {"t5": ("encoder.block", "decoder.block"), "bart": ("encoder.layers", "decoder.layers"),
             "transformer": ("encoder_layers", "decoder_layers")}[family]
    layers = [f"{stack[0]}.{i}" for i in range(2)] + [f"{stack[1]}.{i}" for i in range(3)]
    assert flow.layers == layers + ["other"]
    rec, grads, before = step_by_hand(model, np.array([[1, 2, 3, 4]]), np.array([[0, 5, 6]]), np.array([[5, 6, 2]]))
    row = flow.collect(0, model, before, before, rec, grads)
    for layer in layers:
        if family == "t5":
            ff = f"{layer}.layer.{2 if layer.startswith('decoder') else 1}.DenseReluDense"
            outs, ins = [f"{ff}.act"], [f"{ff}.wi.out"]
        else:
            outs, ins = [f"{layer}.act"], [f"{layer}.fc1.out"]
        check_activations(row, layer, rec, outs, ins)


def test_gradflow_of_a_mixture_of_experts_pools_every_expert():
    model = make_model("mixtral")
    flow = viz.GradientFlow(model)
    rec, grads, before = step_by_hand(model, np.array([[1, 2, 3, 4, 5]]), np.array([[2, 3, 4, 5, 6]]))
    row = flow.collect(0, model, before, before, rec, grads)
    for layer in ("layers.0", "layers.1"):
        experts = [n[:-len(".act")] for n in rec if n.startswith(layer + ".mlp.experts.") and n.endswith(".act")]
        assert experts
        check_activations(row, layer, rec, [f"{e}.act" for e in experts], [f"{e}.gate_proj.out" for e in experts])


# -- train --overwrite and --resume with gradflow ----------------------------------------------------------
def test_overwrite_removes_or_restarts_the_replaced_runs_gradflow(tmp_path):
    flow_file = tmp_path / "run" / viz.GRADFLOW_FILE
    train(tiny(tmp_path, steps=2, eval_interval=2, gradflow_every=1), log=QUIET)
    assert json.loads(flow_file.read_text())["steps"] == [0, 1]
    train(tiny(tmp_path, steps=2, eval_interval=2, overwrite=True), log=QUIET)  # no --gradflow-every
    assert not flow_file.exists()
    train(tiny(tmp_path, steps=2, eval_interval=2, gradflow_every=1, overwrite=True), log=QUIET)
    assert json.loads(flow_file.read_text())["layers"][0] == "blocks.0"
    # a run of another model and interval replaces it: its file is started afresh, not continued
    train(tiny(tmp_path, model="llama", steps=3, eval_interval=3, gradflow_every=2, overwrite=True), log=QUIET)
    data = json.loads(flow_file.read_text())
    assert data["every"] == 2 and data["steps"] == [0, 2] and data["layers"] == ["layers.0", "layers.1", "other"]


def test_a_resumed_run_refuses_another_gradflow_interval_by_name(tmp_path):
    train(tiny(tmp_path, gradflow_every=2, stop_at=3), log=QUIET)
    flow_file = tmp_path / "run" / viz.GRADFLOW_FILE
    before = flow_file.read_text()
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, gradflow_every=3, resume=True), log=QUIET)
    assert info.value.field == "gradflow_every" and "every 2" in str(info.value)
    assert flow_file.read_text() == before  # nothing written
    train(tiny(tmp_path, gradflow_every=2, resume=True), log=QUIET)  # the same interval continues it
    assert json.loads(flow_file.read_text())["steps"] == [0, 2, 4]


# -- a prefix LM's prompt ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt", "llama", "variant_pre"])
def test_a_prefix_lm_is_looked_at_with_the_prompt_as_its_prefix(kind):
    model = make_model(kind)
    ids = np.array([3, 1, 4, 1, 5])
    model.eval()
    rec = model.start_recording()
    logits, _ = model.forward(ids[None], prefix_len=np.array([5]))
    model.stop_recording()
    _, probs = viz.attention_maps(model, ids, list("abcde"), prefix=True)
    for name, p in probs.items():
        np.testing.assert_array_equal(p, rec[name][0])
        assert np.triu(p, 1).sum() > 0  # the prefix sees ahead
    lens, _ = viz.logit_lens(model, ids, prefix=True)
    np.testing.assert_array_equal(lens.logits[-1], logits[0])
    causal, _ = viz.logit_lens(model, ids)
    assert not np.allclose(causal.logits[-1], logits[0])
    expect_rejected(lambda: viz.logit_lens(model, ids, prefix="yes"), "logit_lens", "prefix")
    expect_rejected(lambda: viz.attention_maps(model, ids, list("abcde"), prefix=1), "attention_maps", "prefix")


def test_cli_reads_a_prefix_checkpoints_prompt_as_its_prefix(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, steps=2, eval_interval=2, objective="prefix")
    train(cfg, log=QUIET)
    seen = []
    for view in ("attention_maps", "logit_lens"):
        real = getattr(viz, view)
        monkeypatch.setattr(viz, view, lambda *a, _real=real, _view=view, **kw: seen.append((_view, kw.get("prefix")))
                            or _real(*a, **kw))
    for view in ("attention", "lens"):
        status, out, err = run_cli(["viz", view, "--checkpoint", cfg.out_dir, "--prompt", "the fox",
                                    "--out", f"{view}.png"], tmp_path)
        assert (status, err) == (0, ""), err
    assert seen == [("attention_maps", True), ("logit_lens", True)]


# -- tick labels -------------------------------------------------------------------------------------
def test_every_control_character_is_written_out_and_drawn_without_a_missing_glyph():
    import warnings

    controls = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\u200b", "\u2028", "\ue000"]
    labels = [viz.display_token(f"a{c}b") for c in controls]
    for c, label in zip(controls, labels):
        assert label.isprintable() and label.isascii() and label.startswith("a") and label.endswith("b"), label
        assert c not in label
    assert viz.display_token("\x1a") == "\\x1a" and viz.display_token("\x00\x7f") == "\\x00\\x7f"
    assert viz.display_token("\u200b") == "\\u200b" and viz.display_token("é\n") == "é\\n"
    fig = viz._new_figure(30.0, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xticks(range(len(labels)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ax.set_xticklabels(labels, rotation=90)
        fig.canvas.draw()
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]


@settings(max_examples=15)
@given(text=st.text(min_size=1, max_size=8))
def test_display_token_is_printable_for_any_text(text):
    label = viz.display_token(text)
    assert label.isprintable()


# -- a Hugging Face folder ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_of_a_hugging_face_folder_equals_transformers(family, tmp_path):
    pytest.importorskip("transformers")
    import torch
    import transformers

    from npformer.hf import load_pretrained, load_tokenizer
    from tests.hf.test_hf_cli import build_folder
    from tests.tolerances import HF_LOGITS_RTOL

    folder, _ = build_folder(tmp_path / family, family)
    model, tok = load_pretrained(folder), load_tokenizer(folder)
    ids = np.array(tok.encode("the water runs"), np.int64)
    tokens = viz.token_strings(tok, ids.tolist())
    assert "".join(tokens).replace("Ġ", " ").replace("▁", " ").strip().endswith("runs")
    fig, probs = viz.attention_maps(model, ids, tokens)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = theirs(torch.tensor(ids[None]), output_attentions=True).attentions
    assert len(probs) == len(attentions) == 2
    for ours, ref in zip(probs.values(), attentions):
        assert_close(ours, ref[0].numpy(), rtol=HF_LOGITS_RTOL[np.dtype(np.float32)])
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
    assert len(heatmaps) == 2 * 4 and ticks(heatmaps[0].get_xticklabels()) == [viz.display_token(t) for t in tokens]
    status, out, err = run_cli(["viz", "attention", "--hf", str(folder), "--prompt", "the water runs",
                                "--out", "hf.png"], tmp_path)
    assert (status, err) == (0, "") and png_size(tmp_path / "hf.png")[0] > 100
