"""The whole LLaMA (with Mistral's window and Qwen2's biases) against its torch twin: loss, every
gradient, recordings, decoding, config and input checks, parameter names."""

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.llama as llama_module
from kernels.twins.llama import TwinLlama
from npformer.debug import first_divergence
from npformer.generate import generate
from npformer.models.llama import Llama, LlamaConfig
from tests.badinput import NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.models.helpers import batch, check_against_twin, randomise, record_both, twin_pair
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, assert_close

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_kv_head=2, d_model=16)


def pair(seed=0, **overrides):
    return twin_pair(Llama, TwinLlama, LlamaConfig(**{**TINY, **overrides, "dtype": "float64"}), seed)


@st.composite
def configs(draw):
    """A small LLaMA-family config: MHA, GQA or MQA, head_dim given or implied, any biases, tied or not,
    a sliding window or none, several RoPE bases, odd sizes."""
    n_kv_head = draw(st.integers(1, 3))
    n_head = n_kv_head * draw(st.integers(1, 3))  # ratio 1: MHA; n_kv_head 1: MQA
    given_head_dim = draw(st.booleans())
    if given_head_dim:
        head_dim, d_model = 2 * draw(st.integers(1, 3)), draw(st.integers(1, 9))  # d_model free: any (odd) size
    else:
        head_dim, d_model = None, n_head * 2 * draw(st.integers(1, 3))
    block_size = draw(st.integers(1, 7))
    return LlamaConfig(
        vocab_size=draw(st.sampled_from([1, 2, 5, 13])), block_size=block_size, n_layer=draw(st.integers(1, 2)),
        n_head=n_head, n_kv_head=n_kv_head, d_model=d_model, head_dim=head_dim,
        intermediate_size=draw(st.one_of(st.none(), st.integers(1, 9))),
        rope_theta=draw(st.sampled_from([10000.0, 1e6, 3.0, 0.5])),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        tie_word_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()), o_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()), sliding_window=draw(st.one_of(st.none(), st.integers(1, block_size))),
        dtype="float64")


@settings(max_examples=25)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    model = randomise(Llama(cfg, seed=data.draw(st.integers(0, 3))))
    T = data.draw(st.integers(1, cfg.block_size))
    ids, targets = batch(cfg, B=data.draw(st.integers(1, 2)), T=T, seed=data.draw(st.integers(0, 9)))
    check_against_twin(model, TwinLlama(**cfg.to_dict()).double(), ids, targets)  # a tied head: embed_tokens.weight


def test_the_window_and_the_rope_base_change_the_loss():
    """The options the twin is checked on are not inert: each moves the loss (so the twin test sees them)."""
    ids, targets = batch(LlamaConfig(**TINY))
    losses = [pair(**kw)[0].forward(ids, targets)[1]
              for kw in (dict(), dict(sliding_window=2), dict(rope_theta=3.0), dict(n_kv_head=1))]
    assert len({round(v, 12) for v in losses}) == 4, losses


@pytest.mark.parametrize("options", [dict(), dict(tie_word_embeddings=True, qkv_bias=True, o_bias=True,
                                                  mlp_bias=True, sliding_window=3, n_kv_head=1)])
def test_divergence_finder_agrees_on_a_correct_model(options):
    ours, theirs = record_both(*pair(**options))
    shared = [n for n in ours if n in theirs]
    assert len(shared) > 40  # forward values and gradients of every layer
    for name in ("layers.0.self_attn.probs", "layers.1.mlp.act", "layers.1.out", "layers.0.dx", "logits",
                 "dlogits", "norm.dweight", "layers.0.self_attn.k_proj.dW"):
        assert name in shared, name
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def test_divergence_finder_names_a_planted_gradient_bug(monkeypatch):
    """A wrong SwiGLU gate gradient: the finder must point at the last layer's gate_proj weight gradient."""
    import npformer.nn.mlp as mlp

    right = mlp.swiglu_backward

    def wrong(dy, cache):
        dgate, dup = right(dy, cache)
        return dgate * 1.01, dup

    monkeypatch.setattr(mlp, "swiglu_backward", wrong)
    ours, theirs = record_both(*pair())
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "layers.1.mlp.gate_proj.dW", found
    assert 0.005 < found.max_rel < 0.02  # the planted 1% error, measured


def test_divergence_finder_names_a_corrupted_weight():
    """One key weight off in the twin: the first value to differ is that projection's output."""
    model, twin = pair()
    with torch.no_grad():
        twin.layers[1].self_attn.k_proj.weight[0, 0] += 1e-3
    ours, theirs = record_both(model, twin)
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "layers.1.self_attn.k_proj.out", found


@pytest.mark.parametrize("options", [dict(), dict(sliding_window=3), dict(n_kv_head=1, head_dim=6),
                                     dict(tie_word_embeddings=True, qkv_bias=True)])
def test_cached_decoding_equals_full_recomputation(options):
    model, _ = pair(**options)
    ids, _ = batch(model.cfg, B=2)
    model.eval()  # decoding is inference: no caches kept for a backward
    full, _ = model.forward(ids)
    caches = model.make_kv_caches(2)
    chunks = [model.forward(ids[:, a:b], kv_caches=caches)[0] for a, b in [(0, 3), (3, 4), (4, 5), (5, 8)]]
    assert_close(np.concatenate(chunks, axis=1), full, what="logits")
    assert [c.length for c in caches] == [8] * model.cfg.n_layer


@pytest.mark.parametrize("options", [dict(), dict(sliding_window=3), dict(sliding_window=1, n_kv_head=1)])
@pytest.mark.parametrize("prompt_len", [3, 11])  # 11: longer than block_size 8, cropped for the model
def test_greedy_generation_with_cache_equals_without(options, prompt_len):
    model, _ = pair(**options)
    prompt = np.random.default_rng(4).integers(0, model.cfg.vocab_size, (2, prompt_len))
    n_new = 2 * model.cfg.block_size  # past the context window: the cache is rebuilt
    cached = generate(model, prompt, n_new, temperature=0, use_cache=True)
    plain = generate(model, prompt, n_new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + n_new)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    np.testing.assert_array_equal(cached, plain)
    assert len(np.unique(cached[:, prompt_len:])) > 1  # the weights are not so degenerate that any cache agrees


def test_greedy_generation_follows_the_twin():
    """Uncached greedy decoding is argmax of the twin's last logits, step by step (window included)."""
    model, twin = pair(sliding_window=3)
    out = generate(model, np.array([[1, 2, 3]]), 5, temperature=0, use_cache=True)
    for t in range(3, 8):
        logits, _ = twin(torch.from_numpy(out[:, :t]))
        assert out[0, t] == int(logits[0, -1].argmax())


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", 2.0), ("block_size", -1), ("n_layer", True), ("n_head", 0),
    ("n_head", "6"), ("n_kv_head", 0), ("n_kv_head", 4), ("d_model", 0), ("d_model", None),
    ("head_dim", 3), ("head_dim", 0), ("head_dim", 4.0), ("intermediate_size", 0), ("intermediate_size", 1.5),
    ("rope_theta", 0.0), ("rope_theta", float("nan")), ("rope_theta", "1e4"), ("rms_norm_eps", -1e-6),
    ("rms_norm_eps", float("inf")), ("tie_word_embeddings", 1), ("qkv_bias", "yes"), ("o_bias", None),
    ("mlp_bias", 0), ("sliding_window", 0), ("sliding_window", 2.5), ("dtype", "float16"), ("dtype", np.float32),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: LlamaConfig(**{field: value}), "LlamaConfig", field)


@pytest.mark.parametrize("fields, named", [
    (dict(d_model=190, n_head=6), "n_head"),  # no head_dim: n_head must divide d_model
    (dict(d_model=18, n_head=6, n_kv_head=2), "n_head"),  # implied head_dim 3: odd, RoPE needs pairs
    (dict(n_head=6, n_kv_head=4), "n_kv_head"),
])
def test_config_refuses_inconsistent_sizes(fields, named):
    expect_rejected(lambda: LlamaConfig(**fields), "LlamaConfig", named)


@given(cfg=configs())
def test_config_round_trips_and_resolves_its_sizes(cfg):
    assert LlamaConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["head_dim"] == cfg.head_dim  # None stays None: the rule is applied by the properties
    assert cfg.resolved_head_dim == (cfg.head_dim or cfg.d_model // cfg.n_head)
    model = Llama(cfg)
    assert model.layers[0].self_attn.q_proj.weight.shape == (cfg.n_head * cfg.resolved_head_dim, cfg.d_model)
    assert model.layers[0].mlp.up_proj.weight.shape == (cfg.resolved_intermediate_size, cfg.d_model)


@pytest.mark.parametrize("d_model, expected", [(192, 512), (100, 288), (4096, 10944), (12, 32), (1, 32)])
def test_llama_intermediate_size_rule(d_model, expected):
    """floor(8 D / 3) rounded up to a multiple of 32, checked against the rule evaluated here."""
    assert expected == math.ceil(int(8 * d_model / 3) / 32) * 32
    cfg = LlamaConfig(d_model=d_model, n_head=1, n_kv_head=1, head_dim=2)
    assert cfg.resolved_intermediate_size == expected and cfg.intermediate_size is None


@given(cfg=configs(), seq_len=st.one_of(st.none(), st.integers(1, 64)))
def test_flops_per_token_counts_every_matmul(cfg, seq_len):
    """6 x (every weight matrix the forward multiplies by, the head counted once tied or not, plus Q K^T and P V)."""
    model = Llama(cfg)
    weights = sum(p.data.size for n, p in model.named_parameters() if p.data.ndim == 2 and n != "embed_tokens.weight")
    head_if_tied = cfg.vocab_size * cfg.d_model if cfg.tie_word_embeddings else 0
    T = seq_len or cfg.block_size
    attention = cfg.n_layer * 2 * T * cfg.n_head * cfg.resolved_head_dim
    assert cfg.flops_per_token(seq_len) == 6 * (weights + head_if_tied + attention)


def test_model_refuses_a_bad_config_or_seed():
    expect_rejected(lambda: Llama(dict(TINY)), "Llama", "cfg")
    expect_rejected(lambda: Llama(LlamaConfig(**TINY), seed=-1), "Llama", "seed")


# -- inputs ------------------------------------------------------------------------------------------
def test_forward_refuses_bad_inputs_by_name():
    model = Llama(LlamaConfig(**TINY, head_dim=6))
    ids = np.zeros((2, 4), np.int64)
    expect_rejected(lambda: model.forward(ids.astype(np.float64)), "Llama.forward", "ids")
    expect_rejected(lambda: model.forward(ids[0]), "Llama.forward", "ids")
    expect_rejected(lambda: model.forward(ids + 11), "Llama.forward", "ids")
    expect_rejected(lambda: model.forward(np.zeros((2, 0), np.int64)), "Llama.forward", "ids")
    expect_rejected(lambda: model.forward(ids, ids[:, :3]), "Llama.forward", "targets")
    expect_rejected(lambda: model.forward(ids, ids - 2), "Llama.forward", "targets")
    expect_rejected(lambda: model.forward(ids, ids.astype(np.float32)), "Llama.forward", "targets")
    msg = expect_rejected(lambda: model.forward(np.zeros((1, 9), np.int64)), "Llama.forward", "ids")
    assert "at most 8 positions (block_size 8, 0 cached)" in msg
    expect_rejected(lambda: model.forward(ids, kv_caches=model.make_kv_caches(2)), "Llama.forward", "kv_caches")
    model.eval()
    caches = model.make_kv_caches(2)
    expect_rejected(lambda: model.forward(ids, kv_caches=caches[:1]), "Llama.forward", "kv_caches")
    expect_rejected(lambda: model.forward(ids, kv_caches=[caches[0]] * 2), "Llama.forward", "kv_caches")
    expect_rejected(lambda: model.forward(ids, kv_caches=model.make_kv_caches(3)), "Llama.forward", "kv_caches")
    other = Llama(LlamaConfig(**TINY)).eval()  # head_dim 4, not 6: the caches' shapes are checked
    msg = expect_rejected(lambda: model.forward(ids, kv_caches=other.make_kv_caches(2)), "Llama.forward", "kv_caches")
    assert "(2, 2, 6, 8, dtype('float32'))" in msg
    model.forward(ids, kv_caches=caches)
    expect_rejected(lambda: model.forward(ids[:, :1].repeat(5, 1), kv_caches=caches), "Llama.forward", "ids")
    assert [c.length for c in caches] == [4, 4]  # a refused call leaves the caches as they were


NOT_IDS = NON_ARRAYS + SUBCLASS_KINDS + ("bool", "float16", "float32", "float64", "complex128", "object")
NOT_TARGETS = tuple(k for k in NOT_IDS if k != "none") + RANK_KINDS + SHAPE_KINDS  # None: no loss, legal


@given(kind=st.sampled_from(NOT_IDS + ("rank+1", "rank-1")), tied=st.booleans())
def test_forward_refuses_generated_bad_ids(kind, tied):
    model = Llama(LlamaConfig(**TINY, tie_word_embeddings=tied))
    ids = np.random.default_rng(0).integers(0, 11, (2, 5))
    expect_rejected(lambda: model.forward(corrupt(ids, kind)), "Llama.forward", "ids")
    assert model.pending_backwards == 0  # refused before any work: no cache kept


@given(kind=st.sampled_from(NOT_TARGETS))
def test_forward_refuses_generated_bad_targets(kind):
    model = Llama(LlamaConfig(**TINY))
    ids = np.random.default_rng(0).integers(0, 11, (2, 5))
    expect_rejected(lambda: model.forward(ids, corrupt(ids, kind)), "Llama.forward", "targets")
    assert model.pending_backwards == 0


def test_gpt_and_llama_check_their_inputs_alike():
    """Both models check through one helper: the same call is refused with the same message, bar the name."""
    from npformer.models.gpt import GPT, GPTConfig

    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8))
    llama = Llama(LlamaConfig(**TINY))
    for args in [(np.zeros((1, 9), np.int64),), (np.full((2, 3), 11),), (np.zeros((2, 3), int), np.full((2, 3), -5))]:
        messages = []
        for model in (gpt, llama):
            with pytest.raises(ValueError) as info:
                model.forward(*args)
            messages.append(str(info.value).replace("Llama.forward", "GPT.forward"))
        assert messages[0] == messages[1]


def test_backward_needs_a_loss():
    model = Llama(LlamaConfig(**TINY))
    model.forward(np.zeros((1, 3), np.int64))
    with pytest.raises(RuntimeError, match="Llama.backward: the matching forward had no targets"):
        model.backward()


# -- names, dtypes, init -----------------------------------------------------------------------------
def expected_names(cfg):
    names = {"embed_tokens.weight", "norm.weight"} | ({"lm_head.weight"} if not cfg.tie_word_embeddings else set())
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"} | {f"{p}mlp.{x}_proj.weight" for x in
                                                                       ("gate", "up", "down")}
        names |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv" if cfg.qkv_bias}
        names |= {f"{p}self_attn.o_proj.bias"} if cfg.o_bias else set()
        names |= {f"{p}mlp.{x}_proj.bias" for x in ("gate", "up", "down") if cfg.mlp_bias}
    return names


@given(cfg=configs())
def test_state_dict_names_follow_hugging_face(cfg):
    model = Llama(cfg)
    assert set(model.state_dict()) == expected_names(cfg)
    assert ("lm_head.weight" in model.state_dict()) == (not cfg.tie_word_embeddings)
    assert hasattr(model, "lm_head") == (not cfg.tie_word_embeddings)


def test_default_state_dict_is_exactly_llamas():
    model = Llama(LlamaConfig(n_layer=1))
    assert sorted(model.state_dict()) == [
        "embed_tokens.weight", "layers.0.input_layernorm.weight", "layers.0.mlp.down_proj.weight",
        "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.post_attention_layernorm.weight",
        "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.v_proj.weight", "lm_head.weight", "norm.weight"]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes["layers.0.self_attn.k_proj.weight"] == (2 * 32, 192)  # n_kv_head 2 of head_dim 192 / 6
    assert shapes["layers.0.mlp.gate_proj.weight"] == (512, 192)
    assert shapes["lm_head.weight"] == (65, 192)


def test_tied_head_is_the_embedding():
    model, twin = pair(tie_word_embeddings=True)
    assert "lm_head.weight" not in model.state_dict()
    h_ids = np.array([[1, 2, 3]])
    model.eval()
    logits, _ = model.forward(h_ids)
    model.embed_tokens.weight.data[4] += 1.0  # the head row of token 4 moves with its embedding
    moved, _ = model.forward(h_ids)
    changed = np.abs(moved - logits).max(axis=(0, 1)) > 0
    assert changed[4] and changed.sum() == 1  # only the head row moved: token 4 is not an input


def test_init_is_normal_002_with_norms_at_one():
    model = Llama(LlamaConfig(qkv_bias=True, o_bias=True, mlp_bias=True), seed=3)
    matrices = np.concatenate([p.data.ravel() for p in model.parameters() if p.data.ndim == 2])
    assert abs(matrices.std() - 0.02) < 0.0005 and abs(matrices.mean()) < 0.0005
    for name, prm in model.named_parameters():
        if name.endswith("norm.weight"):
            assert np.all(prm.data == 1), name
        elif prm.data.ndim == 1:
            assert np.all(prm.data == 0), name


def test_astype_round_trip_and_float32_keeps_float32():
    cfg = LlamaConfig(**TINY)
    m32, m64 = Llama(cfg, seed=2), Llama(LlamaConfig(**{**TINY, "dtype": "float64"}), seed=2)
    ids, targets = batch(cfg)
    logits, loss = m32.forward(ids, targets)
    m32.backward()
    assert logits.dtype == np.float32 and np.isfinite(loss)
    assert all(p.grad.dtype == np.float32 for p in m32.parameters())
    assert abs(loss - np.log(cfg.vocab_size)) < 0.1  # small init: near-uniform predictions
    before = {n: v.copy() for n, v in m32.state_dict().items()}
    assert m32.astype(np.float64) is m32 and m32.cfg.dtype == "float64"
    assert m32.forward(ids)[0].dtype == np.float64
    for name, value in m32.state_dict().items():  # float32 -> float64 is exact
        assert value.dtype == np.float64 and np.array_equal(value, before[name]), name
    m32.astype("float32")
    assert m32.cfg.dtype == "float32"
    m64.astype("float32")  # the same seed draws the same float64 weights, cast once
    for name, value in m32.state_dict().items():
        assert value.dtype == np.float32 and np.array_equal(value, before[name]), name
        assert np.array_equal(m64.state_dict()[name], value), name


def test_logits_are_causal_and_there_is_no_position_table():
    """A prefix's logits do not depend on what follows it; positions enter through RoPE alone."""
    model, _ = pair()
    model.eval()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    full, _ = model.forward(ids)
    prefix, _ = model.forward(ids[:, :5])
    assert_close(full[:, :5], prefix, what="prefix logits")
    assert not any("position" in name or "wpe" in name for name in model.state_dict())


def test_the_model_imports_no_other_model():
    tree = ast.parse(inspect.getsource(llama_module))
    imported = {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("gpt" in m or m.startswith("..models") for m in imported), imported
    assert {"..nn.lm", "..nn.attention", "..nn.mlp"} <= imported


def test_twin_times_a_training_step():
    from kernels.twins.llama import time_training_step

    threads = torch.get_num_threads()
    try:
        result = time_training_step(LlamaConfig(**TINY).to_dict(), batch=2, steps=2)
    finally:
        torch.set_num_threads(threads)
    assert result["step_s"] > 0 and result["threads"] == 1 and result["torch"] == torch.__version__
