"""The configurable decoder LM against its torch twin over every option, and as a language model:
cached decoding, lengths beyond the training window, sampling, its config's checks and sizes."""

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.variant import TwinVariant
from npformer.debug import first_divergence
from npformer.generate import generate
from npformer.models import CAUSAL_LMS, FAMILIES, build, check_causal_lm, family_of
from npformer.models.variant import (ACTIVATIONS, NORM_POSITIONS, NORMS, POSITIONS, VariantConfig, VariantLM)
from npformer.nn.mlp import MLP, SwiGLUMLP
from tests.badinput import BAD_COUNTS, BAD_FLAGS, expect_rejected
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, RTOL, assert_close

TINY = dict(vocab_size=11, block_size=9, n_layer=2, n_head=2, d_model=8)
OPTIONS = dict(norm=NORMS, position=POSITIONS, activation=ACTIVATIONS, norm_position=NORM_POSITIONS,
               tie_head=(True, False), bias=(True, False))


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
    n_head = draw(st.sampled_from([1, 2, 3, 4, 6]))
    n_kv_head = draw(st.sampled_from([None] + [d for d in range(1, n_head + 1) if n_head % d == 0]))
    head_dim = draw(st.sampled_from([2, 4] if options["position"] in ("rope", "sinusoidal") else [1, 2, 3, 5]))
    if options["position"] == "sinusoidal" and (n_head * head_dim) % 2:
        head_dim *= 2
    d_ff = draw(st.sampled_from([None, None, 1, 7]))
    return VariantConfig(vocab_size=draw(st.sampled_from([1, 2, 7, 13])), block_size=draw(st.integers(1, 9)),
                         n_layer=draw(st.integers(1, 3)), n_head=n_head, n_kv_head=n_kv_head,
                         d_model=n_head * head_dim, d_ff=d_ff, dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
                         dtype="float64", **options)


@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    """Drawn configs (every option, odd sizes, T = 1 included, dropout masks shared) against the twin in float64."""
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


@pytest.mark.parametrize("norm, position", list(itertools.product(NORMS, POSITIONS)))
def test_every_option_combination_matches_the_twin(norm, position):
    """The whole product of the categorical options (and MHA, GQA, MQA), at one small size each."""
    rng = np.random.default_rng(7)
    ids, targets = rng.integers(0, TINY["vocab_size"], (2, 2, 5))
    for activation, norm_position, tie_head, bias, n_kv_head in itertools.product(
            ACTIVATIONS, NORM_POSITIONS, (True, False), (True, False), (None, 2, 1)):
        model, twin = pair(n_head=4, d_model=16, n_kv_head=n_kv_head, norm=norm, position=position,
                           activation=activation, norm_position=norm_position, tie_head=tie_head, bias=bias)
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
    model, _ = pair(seed=data.draw(st.integers(0, 3)), n_head=4, d_model=16, n_kv_head=n_kv_head,
                    position=position, norm_position=norm_position,
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
    "activation": ("silu", "GELU", None), "position": ("t5", "relative", None, 0),
    "dropout": (-0.1, 1.0, float("nan"), "0.1", None), "bias": BAD_FLAGS, "tie_head": BAD_FLAGS,
    "dtype": ("float16", "int32", np.float64, None),
}


@pytest.mark.parametrize("name", sorted(BAD_FIELDS))
def test_bad_config_fields_are_refused_by_name(name):
    for bad in BAD_FIELDS[name]:
        message = expect_rejected(lambda: VariantConfig(**{**TINY, "n_kv_head": 2, name: bad}), "VariantConfig", name)
        assert "expected" in message and "got" in message


@pytest.mark.parametrize("fields, name", [(dict(position="rope", n_head=8), "position"),  # head_dim 1
                                          (dict(position="sinusoidal", d_model=9, n_head=3), "position"),
                                          (dict(n_head=4, n_kv_head=3), "n_kv_head"),
                                          (dict(d_model=7), "n_head")])  # n_head = 2 does not divide 7
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
    """d_ff None: 4 D for GELU and ReLU; round(8 D / 3) for SwiGLU, whose MLP is within 1% of GELU's size."""
    rng = np.random.default_rng(0)
    gelu, relu, swiglu = (VariantConfig(d_model=d_model, n_head=1, activation=a) for a in ACTIVATIONS)
    assert gelu.resolved_d_ff == relu.resolved_d_ff == 4 * d_model and gelu.d_ff is None
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
    assert abs(loss64 - np.log(cfg.vocab_size)) < 0.1  # small init: near-uniform predictions
    grads64 = dict(m64.named_parameters())
    for name, prm in m32.named_parameters():
        if name.endswith("k_proj.bias") and position != "rope":  # zero in exact arithmetic (a key bias shifts a
            # row of scores, which softmax ignores; rotated by RoPE it is a different vector at each position)
            assert np.abs(prm.grad).max() <= 1e-6 * np.abs(m32.wte.weight.grad).max(), name
            continue
        assert_close(prm.grad, grads64[name].grad, rtol=RTOL[np.dtype(np.float32)], what=name)
