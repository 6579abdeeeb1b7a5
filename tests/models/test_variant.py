"""The configurable decoder LM against its torch twin over every option (GroupNorm, GELU's forms and
Mish, parallel blocks and Mixture of Depths included), and as a language model: cached decoding,
lengths beyond the training window, sampling, its config's checks and sizes; the equations of
proofs/mixture_of_depths.md on a block."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.variant import TwinVariant
from npformer import gradcheck
from npformer.debug import first_divergence
from npformer.generate import generate
from npformer.models import CAUSAL_LMS, FAMILIES, build, check_causal_lm, family_of
from npformer.models.variant import (ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONS, VariantBlock, VariantConfig,
                                     VariantLM, routed_tokens, top_k_positions)
from npformer.nn.mlp import MLP, SwiGLUMLP
from tests.badinput import BAD_COUNTS, BAD_FLAGS, expect_rejected
from tests.tolerances import FD_RTOL, FINDER_ATOL, MODEL_RTOL, RTOL, assert_close

TINY = dict(vocab_size=11, block_size=9, n_layer=2, n_head=2, d_model=8)
OPTIONS = dict(norm=NORMS, position=POSITIONS, activation=ACTIVATIONS, norm_position=NORM_POSITIONS,
               tie_head=(True, False), bias=(True, False), parallel_block=(False, True),
               mod_capacity=(None, None, 0.25, 0.5, 1.0))
PRE_ONLY = {"parallel_block": False, "mod_capacity": None}  # what a post-norm model must leave off


def pair(seed=0, **fields):
    cfg = VariantConfig(**{**TINY, "dtype": "float64", **fields})
    model = VariantLM(cfg, seed=seed)
    twin = TwinVariant(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def loss_and_grads(model, twin, ids, targets, prefix_len=None):
    """One forward and backward of each; the dropout masks npformer drew are given to the twin (a recording
    already started is kept going)."""
    started = model.recorder is None
    rec = model.start_recording() if started else model.recorder
    _, loss = model.forward(ids, targets, prefix_len=prefix_len)
    model.zero_grad()
    model.backward()
    if started:
        model.stop_recording()
    masks = {k: v for k, v in rec.items() if k.endswith(".mask")}
    _, twin_loss = twin(torch.from_numpy(ids), torch.from_numpy(targets), masks=masks, prefix_len=prefix_len)
    twin.zero_grad()
    twin_loss.backward()
    return loss, twin_loss.item(), {n: p.grad.numpy() for n, p in twin.named_parameters()}


def assert_matches_twin(model, twin, ids, targets, prefix_len=None):
    loss, twin_loss, twin_grads = loss_and_grads(model, twin, ids, targets, prefix_len)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)  # the same names, a tied head once (as wte.weight)
    for name, prm in ours.items():
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, what=name)


@st.composite
def configs(draw, **fixed):
    """Odd and unit sizes, every option; head_dim even where RoPE needs it, d_model even for sinusoidal."""
    options = {k: fixed[k] if k in fixed else draw(st.sampled_from(v)) for k, v in OPTIONS.items()}
    if options["norm_position"] == "post":
        options.update(PRE_ONLY)
    n_head = draw(st.sampled_from([1, 2, 3, 4, 6]))
    n_kv_head = draw(st.sampled_from([None] + [d for d in range(1, n_head + 1) if n_head % d == 0]))
    head_dim = draw(st.sampled_from([2, 4] if options["position"] in ("rope", "sinusoidal") else [1, 2, 3, 5]))
    if options["position"] == "sinusoidal" and (n_head * head_dim) % 2:
        head_dim *= 2
    d_ff = draw(st.sampled_from([None, None, 1, 7]))
    d_model = n_head * head_dim
    num_groups = draw(st.sampled_from([g for g in range(1, d_model + 1) if d_model % g == 0]))
    return VariantConfig(vocab_size=draw(st.sampled_from([1, 2, 7, 13])), block_size=draw(st.integers(1, 9)),
                         n_layer=draw(st.integers(1 if options["mod_capacity"] is None else 2, 3)),  # a routed block
                         n_head=n_head, n_kv_head=n_kv_head,
                         d_model=d_model, d_ff=d_ff, dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
                         num_groups=num_groups, dtype="float64", **options)


@pytest.mark.derivation("MOD.8")
@pytest.mark.derivation("MOD.9")
@pytest.mark.derivation("MOD.10")
@given(cfg=configs(), data=st.data())
@settings(max_examples=30)
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    """Drawn configs (every option, odd sizes, T = 1 included, dropout masks shared) against the twin in float64:
    a routed block's gradients, the router's among them, equal autograd's through gather and scatter."""
    model = VariantLM(cfg, seed=data.draw(st.integers(0, 3)))
    twin = TwinVariant(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    B, T = data.draw(st.integers(1, 3)), data.draw(st.integers(1, cfg.block_size))
    ids, targets = rng.integers(0, cfg.vocab_size, (2, B, T))
    targets[rng.random((B, T)) < 0.2] = -100  # some ignored targets
    targets[0, 0] = rng.integers(0, cfg.vocab_size)  # at least one counted
    prefix_len = rng.integers(0, T + 1, B) if data.draw(st.booleans()) else None
    assert_matches_twin(model, twin, ids, targets, prefix_len)


BLOCK_FORMS = [("post", False, None), ("pre", False, None), ("pre", True, None), ("pre", False, 0.5),
               ("pre", True, 0.5)]  # (norm_position, parallel_block, mod_capacity): every valid block


@pytest.mark.parametrize("norm, position", list(itertools.product(NORMS, POSITIONS)))
def test_every_option_combination_matches_the_twin(norm, position):
    """Every activation with every block form (post, pre, parallel, routed, parallel and routed), for each norm
    and position; tie_head, bias and MHA/GQA/MQA cycle through their product alongside (the full product
    would take minutes), so each of their values meets every activation and block form across the norms."""
    rng = np.random.default_rng(7)
    ids, targets = rng.integers(0, TINY["vocab_size"], (2, 2, 5))
    others = list(itertools.product((True, False), (True, False), (None, 2, 1)))  # tie_head, bias, n_kv_head
    shift = NORMS.index(norm) * 7 + POSITIONS.index(position)
    for i, (activation, (norm_position, parallel, capacity)) in enumerate(itertools.product(ACTIVATIONS, BLOCK_FORMS)):
        tie_head, bias, n_kv_head = others[(i + shift) % len(others)]
        model, twin = pair(n_head=4, d_model=16, n_kv_head=n_kv_head, norm=norm, position=position, num_groups=4,
                           activation=activation, norm_position=norm_position, tie_head=tie_head, bias=bias,
                           parallel_block=parallel, mod_capacity=capacity, n_layer=2)
        assert_matches_twin(model, twin, ids, targets)


def test_recordings_use_gpts_names_and_equal_the_twins():
    model, twin = pair(n_kv_head=1, activation="swiglu", position="alibi")
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, TINY["vocab_size"], (2, 3, 6))
    ours, theirs = model.start_recording(), twin.start_recording()
    loss_and_grads(model, twin, ids, targets)
    for i in range(model.cfg.n_layer):
        for name in (f"blocks.{i}.out", f"blocks.{i}.attn.probs", f"blocks.{i}.mlp.act"):
            assert name in ours and name in theirs, name
    shared = [n for n in ours if n in theirs]
    assert len(shared) == 3 * model.cfg.n_layer + 2  # and logits, dlogits
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
@pytest.mark.parametrize("position", POSITIONS)
@given(data=st.data())
@settings(max_examples=4)
def test_cached_decoding_equals_full_recomputation(position, norm_position, data):
    """Chunks through KV caches (positions starting at the cache length) give the logits of one full forward."""
    n_kv_head = data.draw(st.sampled_from([None, 2, 1]))
    parallel = norm_position == "pre" and data.draw(st.booleans())
    model, _ = pair(seed=data.draw(st.integers(0, 3)), n_head=4, d_model=16, n_kv_head=n_kv_head,
                    position=position, norm_position=norm_position, parallel_block=parallel, num_groups=2,
                    norm=data.draw(st.sampled_from(NORMS)), activation=data.draw(st.sampled_from(ACTIVATIONS)))
    T = model.cfg.block_size
    ids = np.random.default_rng(data.draw(st.integers(0, 99))).integers(0, TINY["vocab_size"], (2, T))
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4)))
    model.eval()
    full, _ = model.forward(ids)
    caches = model.make_kv_caches(2)
    chunks = [model.forward(ids[:, a:b], kv_caches=caches)[0] for a, b in zip([0] + cuts, cuts + [T])]
    assert caches[0].length == T
    assert_close(np.concatenate(chunks, axis=1), full, what="logits")


@pytest.mark.parametrize("position", POSITIONS)
def test_evaluation_beyond_the_training_length(position):
    """Trained (one step) at L = 4, evaluated at 2L and 4L = block_size: the first L positions' logits do not
    change (causality), every logit is finite; learned positions beyond L got no gradient (untrained rows),
    and no scheme accepts more than block_size positions."""
    L = 4
    model, _ = pair(block_size=4 * L, position=position)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, TINY["vocab_size"], (2, 4 * L))
    model.forward(ids[:, :L], rng.integers(0, TINY["vocab_size"], (2, L)))
    model.zero_grad()
    model.backward()
    if position == "learned":
        assert np.all(model.wpe.weight.grad[L:] == 0) and np.any(model.wpe.weight.grad[:L] != 0)
    else:
        assert not hasattr(model, "wpe")
    model.eval()
    short, _ = model.forward(ids[:, :L])
    for T in (2 * L, 4 * L):
        logits, _ = model.forward(ids[:, :T])
        assert logits.shape == (2, T, TINY["vocab_size"]) and np.isfinite(logits).all()
        assert_close(logits[:, :L], short, rtol=MODEL_RTOL, what=f"first {L} positions at T = {T}")
    expect_rejected(lambda: model.forward(np.zeros((1, 4 * L + 1), np.int64)), "VariantLM.forward", "ids")


@pytest.mark.parametrize("position", POSITIONS)
def test_generate_runs_and_its_cache_changes_nothing(position):
    model, _ = pair(position=position, n_head=4, d_model=16, n_kv_head=2)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    n_new = 2 * model.cfg.block_size  # past the context window: the cache is rebuilt
    cached = generate(model, prompt, n_new, rng=np.random.default_rng(5), use_cache=True)
    plain = generate(model, prompt, n_new, rng=np.random.default_rng(5), use_cache=False)
    assert cached.shape == (2, 3 + n_new) and cached.min() >= 0 and cached.max() < TINY["vocab_size"]
    np.testing.assert_array_equal(cached[:, :3], prompt)
    np.testing.assert_array_equal(cached, plain)


def test_registered_as_a_causal_lm_family():
    assert FAMILIES["variant"] == (VariantLM, VariantConfig) and "variant" in CAUSAL_LMS
    cfg = VariantConfig(**TINY, position="rope", norm="rmsnorm", activation="swiglu", n_kv_head=1)
    model = build("variant", json.loads(json.dumps(cfg.to_dict())), seed=2)
    assert family_of(model) == "variant" and model.cfg == cfg
    check_causal_lm("test", "model", model)  # no error: generate and the trainer accept it
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(),
                                                       VariantLM(cfg, seed=2).state_dict().values()))


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_astype_converts_parameters_config_and_table(position):
    model = VariantLM(VariantConfig(**TINY, position=position))
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 5))
    logits32, _ = model.forward(ids)
    model.astype(np.float64)
    logits64, loss = model.forward(ids, ids)
    model.backward()
    assert model.cfg.dtype == "float64" and logits64.dtype == np.float64 and np.isfinite(loss)
    assert all(p.data.dtype == np.float64 and p.grad.dtype == np.float64 for p in model.parameters())
    assert model.pe is None or model.pe.dtype == np.float64
    assert_close(logits32, logits64, rtol=1e-4, what="logits")


def test_parameter_names_follow_gpt():
    pre = dict(VariantLM(VariantConfig(**{**TINY, "n_layer": 1})).named_parameters())
    assert set(pre) == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"blocks.0.{n}" for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.fc.weight",
                                  "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias")
        + tuple(f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias"))}
    post = dict(VariantLM(VariantConfig(**{**TINY, "n_layer": 1}, norm_position="post", norm="rmsnorm", bias=False,
                                        position="rope", activation="swiglu", tie_head=False)).named_parameters())
    assert set(post) == {"wte.weight", "lm_head.weight"} | {
        f"blocks.0.{n}" for n in ("ln_1.weight", "ln_2.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight") + tuple(f"attn.{p}_proj.weight" for p in "qkvo")}


# -- the config ---------------------------------------------------------------------------------------
BAD_FIELDS = {
    "vocab_size": BAD_COUNTS + (0,), "block_size": BAD_COUNTS + (0,), "n_layer": BAD_COUNTS + (0,),
    "n_head": (0, 3, 2.0, True, "2"),  # 3 does not divide d_model = 8
    "n_kv_head": (0, 3, -1, 2.0, True), "d_model": (0, -8, 8.0, "8"),
    "d_ff": (0, -1, 2.5, True, "4"),
    "norm": ("batchnorm", "LayerNorm", None, 1), "norm_position": ("middle", None, True),
    "activation": ("silu", "GELU", "gelu_tanh", "Mish", None), "position": ("t5", "relative", None, 0),
    "num_groups": BAD_COUNTS + (0, 3),  # 3 does not divide d_model = 8 (checked with norm "groupnorm")
    "parallel_block": BAD_FLAGS, "mod_capacity": (0.0, -0.5, 1.5, float("nan"), "0.5", True, [0.5]),
    "dropout": (-0.1, 1.0, float("nan"), "0.1", None), "bias": BAD_FLAGS, "tie_head": BAD_FLAGS,
    "dtype": ("float16", "int32", np.float64, None),
}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_bad_config_fields_are_refused_by_name(name):
    for bad in BAD_FIELDS[name]:
        fields = {**TINY, "n_kv_head": 2, "norm": "layernorm" if name == "norm" else "groupnorm", name: bad}
        message = expect_rejected(lambda: VariantConfig(**fields), "VariantConfig", name)
        assert "expected" in message and "got" in message


@pytest.mark.parametrize("fields, name", [(dict(position="rope", n_head=8), "position"),  # head_dim 1
                                          (dict(position="sinusoidal", d_model=9, n_head=3), "position"),
                                          (dict(n_head=4, n_kv_head=3), "n_kv_head"),
                                          (dict(d_model=7), "n_head"),  # n_head = 2 does not divide 7
                                          (dict(norm="groupnorm", num_groups=3), "num_groups"),
                                          (dict(norm_position="post", parallel_block=True), "parallel_block"),
                                          (dict(norm_position="post", mod_capacity=0.5), "mod_capacity"),
                                          (dict(n_layer=1, mod_capacity=0.5), "mod_capacity")])  # no routed block
def test_option_conflicts_are_refused_by_name(fields, name):
    expect_rejected(lambda: VariantConfig(**{**TINY, **fields}), "VariantConfig", name)


def test_model_checks_its_arguments():
    expect_rejected(lambda: VariantLM(dict(TINY)), "VariantLM", "cfg")
    expect_rejected(lambda: VariantLM(VariantConfig(**TINY), seed=-1), "VariantLM", "seed")
    model = VariantLM(VariantConfig(**TINY))
    expect_rejected(lambda: model.forward(np.full((1, 3), TINY["vocab_size"])), "VariantLM.forward", "ids")
    expect_rejected(lambda: model.forward(np.zeros((1, 3), np.int64), np.zeros((1, 4), np.int64)),
                    "VariantLM.forward", "targets")
    expect_rejected(lambda: model.make_kv_caches(1, TINY["block_size"] + 1), "VariantLM.make_kv_caches", "max_len")
    model.forward(np.zeros((1, 3), np.int64))
    with pytest.raises(RuntimeError, match="VariantLM.backward: the matching forward had no targets"):
        model.backward()


@given(d_model=st.integers(19, 600), bias=st.booleans())
def test_swiglu_default_width_spends_the_parameters_of_a_4d_gelu_mlp(d_model, bias):
    """d_ff None: 4 D for GELU (each form), ReLU and Mish; round(8 D / 3) for SwiGLU, whose MLP is within 1% of
    GELU's size."""
    rng = np.random.default_rng(0)
    gelu, swiglu = (VariantConfig(d_model=d_model, n_head=1, activation=a) for a in ("gelu", "swiglu"))
    for a in ACTIVATIONS:
        if a != "swiglu":
            assert VariantConfig(d_model=d_model, n_head=1, activation=a).resolved_d_ff == 4 * d_model
    assert gelu.d_ff is None
    F = swiglu.resolved_d_ff
    assert abs(F - 8 * d_model / 3) <= 0.5 and swiglu.d_ff is None
    n_gelu = MLP(d_model, gelu.resolved_d_ff, bias, rng=rng).num_parameters()
    n_swiglu = SwiGLUMLP(d_model, F, bias, rng=rng).num_parameters()
    assert abs(n_swiglu - n_gelu) <= 0.01 * n_gelu
    assert VariantConfig(d_model=d_model, n_head=1, activation="swiglu", d_ff=5).resolved_d_ff == 5


def test_the_models_mlp_has_the_resolved_width():
    model = VariantLM(VariantConfig(**{**TINY, "d_model": 24}, activation="swiglu"))
    assert model.blocks[0].mlp.gate_proj.weight.shape == (64, 24)  # round(8 * 24 / 3) = 64


@pytest.mark.derivation("ATT.14")
@given(n_head=st.sampled_from([1, 2, 4, 6]), data=st.data(), dtype=st.sampled_from(["float32", "float64"]))
def test_kv_cache_bytes_per_token_equals_the_caches_size(n_head, data, dtype):
    """(ATT.14): 2 n_layer H_kv D_h bytes per token, against the bytes make_kv_caches holds."""
    n_kv_head = data.draw(st.sampled_from([d for d in range(1, n_head + 1) if n_head % d == 0]))
    n_layer, B, head_dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    cfg = VariantConfig(vocab_size=5, block_size=7, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                        d_model=n_head * head_dim, position="none", dtype=dtype)
    caches = VariantLM(cfg).make_kv_caches(B)
    held = sum(c.k.nbytes + c.v.nbytes for c in caches)
    itemsize = np.dtype(dtype).itemsize
    assert held == B * cfg.block_size * cfg.kv_cache_bytes_per_token(itemsize)
    assert cfg.kv_cache_bytes_per_token(itemsize) == 2 * n_layer * n_kv_head * head_dim * itemsize
    assert cfg.kv_cache_bytes_per_token() == 2 * n_layer * n_kv_head * head_dim * 4


def test_flops_per_token_counts_every_matmul():
    """Count the weight matrices of a built model: 6 x (weights multiplied + attention's 2 T H D_h per layer)."""
    for activation, n_kv_head, tie_head in itertools.product(ACTIVATIONS, (None, 1), (True, False)):
        cfg = VariantConfig(**{**TINY, "n_head": 4, "d_model": 16}, activation=activation, n_kv_head=n_kv_head,
                            tie_head=tie_head, position="rope")
        model = VariantLM(cfg)
        matrices = sum(p.data.size for n, p in model.named_parameters() if p.data.ndim == 2 and "wte" not in n
                       and "lm_head" not in n)
        T = 5
        expected = 6 * (matrices + cfg.n_layer * 2 * T * cfg.d_model + cfg.vocab_size * cfg.d_model)
        assert cfg.flops_per_token(T) == expected
        assert cfg.flops_per_token() == cfg.flops_per_token(cfg.block_size)
    expect_rejected(lambda: cfg.flops_per_token(0), "VariantConfig.flops_per_token", "seq_len")
    expect_rejected(lambda: cfg.kv_cache_bytes_per_token(0), "VariantConfig.kv_cache_bytes_per_token", "dtype_bytes")


def test_config_round_trips_through_json_and_keeps_none():
    cfg = VariantConfig(**TINY, n_kv_head=np.int64(1), dropout=np.float32(0.5), bias=np.True_)
    assert type(cfg.n_kv_head) is int and type(cfg.dropout) is float and cfg.bias is True
    again = VariantConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and VariantConfig(**TINY).to_dict()["d_ff"] is None


@pytest.mark.parametrize("position", POSITIONS)
def test_float32_model_keeps_float32_and_agrees_with_float64(position):
    """The same weights in float32 and float64: float32 throughout, loss and gradients within RTOL[float32]."""
    cfg = VariantConfig(**{**TINY, "n_head": 4, "d_model": 16}, position=position, n_kv_head=2, activation="swiglu")
    m32, m64 = VariantLM(cfg, seed=1), VariantLM(cfg, seed=1).astype(np.float64)
    ids, targets = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 3, cfg.block_size))
    (logits, loss32), (_, loss64) = m32.forward(ids, targets), m64.forward(ids, targets)
    m32.backward()
    m64.backward()
    assert logits.dtype == np.float32 and all(p.grad.dtype == np.float32 for p in m32.parameters())
    assert abs(loss32 - loss64) <= RTOL[np.dtype(np.float32)] * loss64
    if position != "sinusoidal":  # sinusoidal: unit-scale embeddings, so the tied head starts far from uniform
        assert abs(loss64 - np.log(cfg.vocab_size)) < 0.1  # small init: near-uniform predictions
    grads64 = dict(m64.named_parameters())
    for name, prm in m32.named_parameters():
        if name.endswith("k_proj.bias") and position != "rope":  # zero in exact arithmetic (a key bias shifts a
            # row of scores, which softmax ignores; rotated by RoPE it is a different vector at each position)
            assert np.abs(prm.grad).max() <= 1e-6 * np.abs(m32.wte.weight.grad).max(), name
            continue
        assert_close(prm.grad, grads64[name].grad, rtol=RTOL[np.dtype(np.float32)], what=name)


# -- block forms: parallel blocks and Mixture of Depths (proofs/mixture_of_depths.md) --------------------
BLOCK = dict(vocab_size=11, block_size=9, n_layer=2, n_head=2, d_model=8, dtype="float64", num_groups=2)


def twin_block_of(block, cfg):
    """A TwinBlock holding ``block``'s weights (block 1 of a routed config is routed in both)."""
    from kernels.twins.variant import TwinBlock, resolved_d_ff
    twin = TwinBlock(cfg.d_model, cfg.n_head, cfg.resolved_n_kv_head, resolved_d_ff(cfg.d_model, cfg.d_ff,
                     cfg.activation), cfg.norm, cfg.norm_position, cfg.activation, cfg.position, cfg.bias, 0.0,
                     cfg.num_groups, cfg.parallel_block, cfg.mod_capacity if block.routed else None).double()
    own = dict(twin.named_parameters())
    state = dict(block.named_parameters())
    assert set(own) == set(state)
    with torch.no_grad():
        for name, prm in own.items():
            prm.copy_(torch.from_numpy(state[name].data))
    return twin


def block_against_twin(block, twin, x, dy):
    """The block's output and every gradient (x and parameters) against autograd through the twin block."""
    block.zero_grad()
    y = block.forward(x)
    dx = block.backward(dy)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = twin(tx, None, "b")
    ty.backward(torch.from_numpy(dy))
    assert_close(y, ty.detach().numpy(), rtol=MODEL_RTOL, what="y")
    assert_close(dx, tx.grad.numpy(), rtol=MODEL_RTOL, what="dx")
    for name, prm in block.named_parameters():
        assert_close(prm.grad, dict(twin.named_parameters())[name].grad.numpy(), rtol=MODEL_RTOL, what=name)


@pytest.mark.derivation("MOD.1")
@pytest.mark.derivation("MOD.2")
@pytest.mark.derivation("MOD.3")
@pytest.mark.derivation("MOD.4")
@given(parallel=st.booleans(), norm=st.sampled_from(NORMS), activation=st.sampled_from(ACTIVATIONS),
       seed=st.integers(0, 99), T=st.integers(1, 6))
def test_block_branches_and_their_gradients(parallel, norm, activation, seed, T):
    """x + f(x) with f of (MOD.1) (sequential) or (MOD.2) (parallel, no ln_2) composed from the sublayers;
    its backward (MOD.3) or (MOD.4) against autograd through the twin block."""
    cfg = VariantConfig(**BLOCK, parallel_block=parallel, norm=norm, activation=activation)
    block = VariantLM(cfg, seed=seed).blocks[0]
    assert hasattr(block, "ln_2") != parallel
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((2, 2, T, cfg.d_model))
    block.eval()
    h = block.ln_1.forward(x)
    a = block.attn.forward(h, causal=True)
    m = block.mlp.forward(h if parallel else block.ln_2.forward(x + a))
    assert_close(block.forward(x), x + a + m, rtol=MODEL_RTOL, what="x + f(x)")
    block.train()
    block_against_twin(block, twin_block_of(block, cfg), x, dy)


def reference_routing(x, w, capacity):
    """(MOD.5), (MOD.6) from the proof: r = x w, each row's k = ceil(c T) largest, ties to the earlier position."""
    r = x @ w  # (B, T)
    T = x.shape[1]
    k = min(T, max(1, math.ceil(capacity * T)))
    routed = np.array([sorted(sorted(range(T), key=lambda t: (-row[t], t))[:k]) for row in r], dtype=np.int64)
    return r, routed.reshape(x.shape[0], k)


def dense_branches(cfg, block, x):
    """f(x) of the routed block's sublayers, run by a block with no router (the same weights), in eval mode."""
    dense = VariantBlock(VariantConfig(**{**cfg.to_dict(), "mod_capacity": None}), np.random.default_rng(0))
    for name, prm in dense.named_parameters():
        prm.data[...] = dict(block.named_parameters())[name].data
    dense.eval()
    return dense.forward(x) - x


@pytest.mark.derivation("MOD.5")
@pytest.mark.derivation("MOD.6")
@pytest.mark.derivation("MOD.7")
@given(capacity=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]), parallel=st.booleans(), T=st.integers(1, 9),
       B=st.integers(1, 3), seed=st.integers(0, 99), ties=st.booleans())
def test_routed_block_forward_is_its_formula(capacity, parallel, T, B, seed, ties):
    """Only every other block routes; its top-k rows are x + r f(x_S) with f the dense block's branches on the
    routed tokens alone, the others are x exactly; equal scalars route the earliest tokens."""
    cfg = VariantConfig(**{**BLOCK, "n_layer": 3}, mod_capacity=capacity, parallel_block=parallel, position="rope")
    model = VariantLM(cfg, seed=seed)
    assert [b.routed for b in model.blocks] == [False, True, False]
    assert [hasattr(b, "router") for b in model.blocks] == [False, True, False]
    block = model.blocks[1]
    rng = np.random.default_rng(seed)
    if ties:
        block.router.weight.data[...] = 0.0  # every r = 0: the first k tokens, and r f = 0
    x = rng.standard_normal((B, T, cfg.d_model))
    r, routed = reference_routing(x, block.router.weight.data[0], capacity)
    np.testing.assert_array_equal(top_k_positions(r, routed.shape[1]), routed)
    block.eval()
    rec = block.start_recording()
    y = block.forward(x)
    block.stop_recording()
    np.testing.assert_array_equal(rec["routed"], routed)
    for b in range(B):
        skipped = np.setdiff1d(np.arange(T), routed[b])
        np.testing.assert_array_equal(y[b, skipped], x[b, skipped])  # (MOD.7): untouched, bit for bit
        x_s = x[b:b + 1, routed[b]]
        f = dense_branches(cfg, block, x_s)[0]
        assert_close(y[b, routed[b]], x_s[0] + r[b, routed[b], None] * f, rtol=MODEL_RTOL, scale=1.0, what="routed")
    if ties:
        np.testing.assert_array_equal(routed, np.broadcast_to(np.arange(routed.shape[1]), routed.shape))
        np.testing.assert_array_equal(y, x)


@pytest.mark.derivation("MOD.8")
@pytest.mark.derivation("MOD.9")
@pytest.mark.derivation("MOD.10")
@given(capacity=st.sampled_from([0.25, 0.5, 0.8]), parallel=st.booleans(), seed=st.integers(0, 99),
       norm=st.sampled_from(NORMS))
@settings(max_examples=6)
def test_routed_block_gradients_equal_finite_differences(capacity, parallel, seed, norm):
    """dx (MOD.8), the router's dw (MOD.9), (MOD.10) and a sublayer weight's gradient against central differences
    of <dy, y> in float64, independent of torch (the routing stays fixed under the small steps); and against
    autograd through the twin block."""
    cfg = VariantConfig(**BLOCK, mod_capacity=capacity, parallel_block=parallel, norm=norm)
    block = VariantLM(cfg, seed=seed).blocks[1]
    rng = np.random.default_rng(seed)
    block.router.weight.data[...] = rng.standard_normal(block.router.weight.shape)  # scalars of order one
    x, dy = rng.standard_normal((2, 2, 6, cfg.d_model))
    block.zero_grad()
    block.forward(x)
    dx = block.backward(dy)
    block.eval()
    routed = top_k_positions(x @ block.router.weight.data[0], cfg.mod_tokens(6))

    def loss():
        assert np.array_equal(top_k_positions(x @ block.router.weight.data[0], cfg.mod_tokens(6)), routed)
        return float(np.sum(block.forward(x) * dy))

    for name, value, grad in (("x", x, dx), ("router.weight", block.router.weight.data, block.router.weight.grad),
                              ("mlp.fc.weight", block.mlp.fc.weight.data, block.mlp.fc.weight.grad)):
        numeric = gradcheck.numerical_gradient(loss, value)
        assert_close(grad, numeric, rtol=FD_RTOL, what=name)
    assert np.any(block.router.weight.grad != 0)
    block.train()
    block_against_twin(block, twin_block_of(block, cfg), x, dy)


@pytest.mark.derivation("MOD.11")
@given(parallel=st.booleans(), seed=st.integers(0, 99), position=st.sampled_from(POSITIONS))
@settings(max_examples=8)
def test_full_capacity_routes_every_token_and_is_causal(parallel, seed, position):
    """c = 1 routes every token (y = x + r f(x)) and the model is causal; c = 1/2 looks ahead: some change of the
    last token moves an earlier position's logits, through the routing alone."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, BLOCK["vocab_size"], (1, 8))

    def largest_move(model, logits):
        """How far the logits before the last position move over every choice of the last token."""
        moved = 0.0
        for v in range(BLOCK["vocab_size"]):
            other = ids.copy()
            other[0, -1] = v
            moved = max(moved, float(np.abs(model.forward(other)[0][:, :-1] - logits[:, :-1]).max()))
        return moved

    moves = {}
    for capacity in (1.0, 0.5):
        cfg = VariantConfig(**{**BLOCK, "n_head": 2, "d_model": 8}, mod_capacity=capacity, parallel_block=parallel,
                            position=position)
        model = VariantLM(cfg, seed=seed).eval()
        model.wte.weight.data *= 30  # scalars that spread over the vocabulary, so the last token can win or lose
        moves[capacity] = []
        for _ in range(4):  # a few routers of order one: routing that matters
            model.blocks[1].router.weight.data[...] = 3 * rng.standard_normal((1, 8))
            rec = model.start_recording()
            logits, _ = model.forward(ids)
            model.stop_recording()
            assert rec["blocks.1.routed"].shape == (1, 8 if capacity == 1.0 else 4)
            if capacity == 1.0:
                np.testing.assert_array_equal(rec["blocks.1.routed"], np.arange(8)[None])
            moves[capacity].append(largest_move(model, logits))
    assert max(moves[1.0]) <= MODEL_RTOL * 10  # causal: the earlier logits do not see the last token
    assert max(moves[0.5]) > 1e-6  # looks ahead


def test_mod_refuses_cached_decoding_by_name_and_generates_without_a_cache():
    cfg = VariantConfig(**BLOCK, mod_capacity=0.5)
    model = VariantLM(cfg).eval()
    assert not model.supports_kv_cache and VariantLM(VariantConfig(**BLOCK)).supports_kv_cache
    caches = VariantLM(VariantConfig(**BLOCK)).make_kv_caches(1)
    ids = np.array([[1, 2, 3]])
    message = expect_rejected(lambda: model.forward(ids, kv_caches=caches), "VariantLM.forward", "kv_caches")
    assert "Mixture-of-Depths" in message
    expect_rejected(lambda: model.make_kv_caches(1), "VariantLM.make_kv_caches", "self")
    expect_rejected(lambda: model.blocks[1].forward(np.zeros((1, 3, 8)), caches[1]), "VariantBlock.forward",
                    "kv_cache")
    cached = generate(model, ids, 4, rng=np.random.default_rng(0))  # generate recomputes: supports_kv_cache
    np.testing.assert_array_equal(cached, generate(model, ids, 4, rng=np.random.default_rng(0), use_cache=False))
    out = generate(model, ids, 2 * cfg.block_size, rng=np.random.default_rng(0), use_cache=False)
    assert out.shape == (1, 3 + 2 * cfg.block_size) and out.min() >= 0 and out.max() < cfg.vocab_size


def test_parallel_and_routed_parameter_names():
    names = set(dict(VariantLM(VariantConfig(**{**BLOCK, "n_layer": 4}, parallel_block=True, mod_capacity=0.5,
                                             norm="groupnorm")).named_parameters()))
    assert {n for n in names if "ln_2" in n} == set()
    assert {n for n in names if "router" in n} == {"blocks.1.router.weight", "blocks.3.router.weight"}
    assert {"blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "ln_f.weight", "ln_f.bias"} <= names
    no_bias = set(dict(VariantLM(VariantConfig(**BLOCK, norm="groupnorm", bias=False)).named_parameters()))
    assert "blocks.0.ln_1.weight" in no_bias and "blocks.0.ln_1.bias" not in no_bias


def test_groupnorm_with_one_group_is_the_layernorm_model():
    """norm "groupnorm" with num_groups 1 gives the LayerNorm model's loss and gradients (GN.11), weights alike."""
    ln = VariantLM(VariantConfig(**BLOCK, norm="layernorm"), seed=3)
    gn = VariantLM(VariantConfig(**{**BLOCK, "num_groups": 1}, norm="groupnorm"), seed=3)
    ids, targets = np.random.default_rng(0).integers(0, 11, (2, 2, 7))
    (_, l1), (_, l2) = ln.forward(ids, targets), gn.forward(ids, targets)
    ln.backward()
    gn.backward()
    assert abs(l1 - l2) <= MODEL_RTOL * abs(l1)
    theirs = dict(ln.named_parameters())
    for name, prm in gn.named_parameters():
        assert_close(prm.grad, theirs[name].grad, rtol=MODEL_RTOL, what=name)


def test_sinusoidal_embeddings_have_the_scale_of_the_table():
    """x = sqrt(D) wte[ids] + table, wte drawn with std D^-1/2: both terms of unit scale (the original
    Transformer's recipe), and the table's rows are what the first block receives beside the scaled rows."""
    cfg = VariantConfig(vocab_size=200, block_size=16, n_layer=1, n_head=2, d_model=64, position="sinusoidal",
                        dtype="float64")
    model = VariantLM(cfg, seed=0)
    assert abs(model.wte.weight.data.std() - 64 ** -0.5) < 0.1 * 64 ** -0.5
    rec = model.start_recording()
    ids = np.arange(16)[None] % 200
    model.eval()
    model.forward(ids)
    first = rec["blocks.0.ln_1.out"] if "blocks.0.ln_1.out" in rec else None
    expected = model.wte.weight.data[ids] * 8.0 + model.pe[:16]
    from npformer.ops.layernorm import layernorm_forward
    if first is not None:
        norm = model.blocks[0].ln_1
        np.testing.assert_allclose(first, layernorm_forward(expected, norm.weight.data, norm.bias.data, 1e-5)[0],
                                   rtol=1e-12)
    assert 0.5 < np.abs(model.wte.weight.data[ids] * 8.0).mean() / np.abs(model.pe[:16]).mean() < 2.0



@pytest.mark.derivation("MOD.6")
def test_routed_tokens_is_the_exact_ceil_of_the_printed_decimal():
    """k = ceil(c T) with c read as the decimal it prints as: 0.55 of 100 tokens is 55 (the float product
    55.000000000000007 would give 56), over a sweep of capacities and lengths against Fraction(str(c))."""
    import math
    from fractions import Fraction

    assert 0.55 * 100 > 55 and routed_tokens(0.55, 100) == 55
    overshoots = 0
    for thousandths in range(1, 1001):
        c = thousandths / 1000
        for T in (1, 3, 7, 10, 100, 1000, 4096):
            expected = min(T, max(1, math.ceil(Fraction(str(c)) * T)))
            assert routed_tokens(c, T) == expected, (c, T)
            overshoots += min(T, max(1, math.ceil(c * T))) != expected
    assert overshoots > 0  # the sweep meets the float product's overshoot
