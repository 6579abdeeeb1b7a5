"""T5 (v1.0 and v1.1) against its torch twin: loss, logits, every gradient, dropout, recordings, encode/decode,
cached decoding, config and input checks, parameter names."""

import ast
import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.t5 as t5_module
from kernels.twins.t5 import TwinT5, relative_bucket
from npformer.debug import first_divergence
from npformer.models import FAMILIES, family_of
from npformer.models.t5 import IGNORE_INDEX, T5, T5Config
from npformer.ops.t5_bias import t5_relative_bucket
from tests.badinput import NON_ARRAYS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import in_layout, layouts
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, RTOL, assert_close

TINY = dict(vocab_size=13, d_model=8, d_kv=3, d_ff=7, num_layers=2, num_decoder_layers=1, n_head=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=6, dropout=0.0)
V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True)
V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def randomise(model, seed=7):
    """Weights of order one, so every bias, mask and norm shows in the loss."""
    rng = np.random.default_rng(seed)
    for name, prm in model.named_parameters():
        base = 1.0 if name.endswith("norm.weight") else 0.0
        scale = 0.3 if name.endswith("norm.weight") else 1.0 / np.sqrt(prm.shape[-1])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def pair(seed=0, **overrides):
    cfg = T5Config(**{**TINY, **V10, **overrides, "dtype": "float64"})
    model = randomise(T5(cfg, seed=seed), seed + 7)
    twin = TwinT5(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def batch(cfg, B=2, S=6, T=5, seed=1, pad=True):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, cfg.vocab_size, (B, S))
    tgt = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.25] = IGNORE_INDEX
    targets[0, -1] = rng.integers(0, cfg.vocab_size)  # at least one counted target
    mask = None
    if pad:
        mask = rng.random((B, S)) < 0.4
        mask[np.arange(B), rng.integers(0, S, B)] = False  # at least one real source token per row
    return src, tgt, targets, mask


def run_twin(twin, src, tgt, targets, mask, masks=None):
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    logits, loss = twin(t(src), t(tgt), t(targets), t(mask), masks=masks)
    twin.zero_grad()
    loss.backward()
    return logits.detach().numpy(), loss.item(), {n: p.grad.numpy() for n, p in twin.named_parameters()}


@st.composite
def configs(draw, dropout=False):
    """v1.0 or v1.1 (tied or not, scaled or not), 1-3 heads of any size, bucket counts and distances from the
    smallest legal ones up, decoder depth independent of the encoder's."""
    N = draw(st.integers(4, 12))
    return T5Config(
        vocab_size=draw(st.sampled_from([2, 5, 13])), d_model=draw(st.integers(1, 9)), d_kv=draw(st.integers(1, 4)),
        d_ff=draw(st.integers(1, 7)), num_layers=draw(st.integers(1, 3)),
        num_decoder_layers=draw(st.one_of(st.none(), st.integers(1, 3))), n_head=draw(st.integers(1, 3)),
        relative_attention_num_buckets=N, relative_attention_max_distance=draw(st.integers(N // 2 + 1, 12)),
        feed_forward_proj=draw(st.sampled_from(["relu", "gated-gelu"])), tie_word_embeddings=draw(st.booleans()),
        scale_decoder_outputs=draw(st.sampled_from([None, True, False])),
        layer_norm_epsilon=draw(st.sampled_from([1e-6, 0.1])),
        dropout=draw(st.sampled_from([0.1, 0.5])) if dropout else 0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dtype="float64")


def check_against_twin(cfg, data, *, dropout=False):
    model = randomise(T5(cfg, seed=data.draw(st.integers(0, 3))))
    twin = TwinT5(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    S, T = data.draw(st.integers(1, 13)), data.draw(st.sampled_from([1, 2, 5, 14]))
    src, tgt, targets, mask = batch(cfg, B=data.draw(st.integers(1, 3)), S=S, T=T, seed=data.draw(st.integers(0, 9)),
                                    pad=data.draw(st.booleans()))
    rec = model.start_recording() if dropout else None
    model.zero_grad()
    layout = data.draw(layouts())  # ids, targets and mask as views: the model must not assume C order
    view = lambda a: None if a is None else in_layout(a, layout)  # noqa: E731
    logits, loss = model.forward(view(src), view(tgt), view(targets), src_padding_mask=view(mask))
    model.backward()
    twin_logits, twin_loss, twin_grads = run_twin(twin, src, tgt, targets, mask, masks=rec)
    assert_close(logits, twin_logits, rtol=MODEL_RTOL, what="logits")
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)
    for name, prm in ours.items():  # a floor for tensors zero in exact arithmetic (q of a one-key cross attention)
        scale = max(float(np.abs(twin_grads[name]).max(initial=0.0)), 1e-6)
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, scale=scale, what=name)


@settings(max_examples=20)
@given(cfg=configs(), data=st.data())
def test_logits_loss_and_every_gradient_match_the_twin(cfg, data):
    check_against_twin(cfg, data)


@settings(max_examples=6)
@given(cfg=configs(dropout=True), data=st.data())
def test_training_with_dropout_matches_the_twin_on_the_same_masks(cfg, data):
    check_against_twin(cfg, data, dropout=True)


def test_dropout_masks_are_drawn_and_change_the_loss():
    model, _ = pair(dropout=0.5)
    src, tgt, targets, mask = batch(model.cfg)
    rec = model.start_recording()
    _, train_loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    assert any(name.endswith(".mask") for name in rec) and "encoder.dropout.mask@2" in rec
    model.eval()
    _, eval_loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    assert train_loss != eval_loss


@pytest.mark.parametrize("options", [dict(relative_attention_num_buckets=4), dict(relative_attention_max_distance=5),
                                     dict(scale_decoder_outputs=False), dict(layer_norm_epsilon=0.5)])
def test_the_options_checked_on_the_twin_change_the_loss(options):
    """Buckets, distance, the head's scaling and eps are not inert: each moves the loss."""
    model, _ = pair()
    src, tgt, targets, mask = batch(model.cfg, S=9, T=9)
    base = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    other, _ = pair(**options)
    assert abs(other.forward(src, tgt, targets, src_padding_mask=mask)[1] - base) > 1e-6


def test_the_twins_buckets_are_the_ops():
    r = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for N, M in ((32, 128), (8, 6), (4, 2), (7, 5)):
            if not bidirectional and M <= N // 2:
                continue
            np.testing.assert_array_equal(relative_bucket(r, bidirectional, N, M).numpy(),
                                          t5_relative_bucket(r.numpy(), bidirectional=bidirectional, num_buckets=N,
                                                             max_distance=M))


def test_one_position_table_per_stack_shared_by_every_layer():
    """Only the first block holds a table; moving one entry of it changes every layer's attention logits."""
    model, _ = pair(num_layers=3, num_decoder_layers=2)
    names = [n for n in model.state_dict() if "relative_attention_bias" in n]
    assert names == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    src, tgt, _, _ = batch(model.cfg, S=4, T=3, pad=False)
    model.eval()
    before = model.start_recording()
    model.forward(src, tgt)
    model.encoder.relative_attention_bias.weight.data[0] += 1.0  # bucket 0: distance 0 in the encoder
    after = model.start_recording()
    model.forward(src, tgt)
    for i in range(3):
        name = f"encoder.block.{i}.layer.0.SelfAttention.probs"
        assert not np.allclose(before[name], after[name]), name


# -- encode / decode / caches ------------------------------------------------------------------------
@pytest.mark.parametrize("options", [V10, V11, dict(num_decoder_layers=3, n_head=3, d_kv=2)])
def test_encode_then_decode_equals_forward(options):
    model, _ = pair(**options)
    src, tgt, _, mask = batch(model.cfg, B=3, S=7, T=4)
    model.eval()
    full, _ = model.forward(src, tgt, src_padding_mask=mask)
    memory = model.encode(src, src_padding_mask=mask)
    assert memory.shape == (3, 7, model.cfg.d_model)
    assert_close(model.decode(tgt, memory, src_padding_mask=mask), full, rtol=RTOL[np.dtype(np.float64)],
                 what="decode")


@settings(max_examples=10)
@given(cfg=configs(), data=st.data())
def test_cached_decoding_in_random_chunks_equals_uncached(cfg, data):
    model = randomise(T5(cfg)).eval()
    T = data.draw(st.integers(1, 16))  # past max_distance: the far buckets are reached
    S = data.draw(st.integers(1, 6))
    src, tgt, _, mask = batch(cfg, B=data.draw(st.integers(1, 2)), S=S, T=T, seed=data.draw(st.integers(0, 9)),
                              pad=data.draw(st.booleans()))
    memory = model.encode(src, src_padding_mask=mask)
    full = model.decode(tgt, memory, src_padding_mask=mask)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=4)) if T > 1 else []))
    caches = model.make_decoder_caches(src.shape[0], T + data.draw(st.integers(0, 2)), S)
    chunks = [model.decode(tgt[:, a:b], memory, caches, src_padding_mask=mask)
              for a, b in zip([0] + cuts, cuts + [T])]
    assert_close(np.concatenate(chunks, axis=1), full, rtol=RTOL[np.dtype(np.float64)], what="chunked logits")
    assert all(s.length == T and c.length == S for s, c in caches)


@pytest.mark.parametrize("options", [V10, V11])
def test_cached_decoding_one_token_at_a_time_equals_uncached(options):
    model, _ = pair(**options)
    model.eval()
    src, tgt, _, mask = batch(model.cfg, B=2, S=5, T=12)  # 12 > max_distance 6: the far bucket too
    memory = model.encode(src, src_padding_mask=mask)
    full = model.decode(tgt, memory, src_padding_mask=mask)
    caches = model.make_decoder_caches(2, 12, 5)
    steps = [model.decode(tgt[:, t:t + 1], memory, caches, src_padding_mask=mask) for t in range(12)]
    assert_close(np.concatenate(steps, axis=1), full, rtol=RTOL[np.dtype(np.float64)], what="step logits")


def test_greedy_steps_follow_the_twin():
    """Greedy decoding with caches picks the argmax of the twin's last logits, step by step."""
    model, twin = pair(**V11)
    model.eval()
    src = np.array([[3, 4, 5, 6]])
    memory = model.encode(src)
    caches = model.make_decoder_caches(1, 6, 4)
    out = [model.cfg.decoder_start_token_id]
    for _ in range(5):
        logits = model.decode(np.array([out[-1:]]), memory, caches)
        out.append(int(logits[0, -1].argmax()))
    with torch.no_grad():
        for t in range(1, 6):
            twin_logits, _ = twin(torch.from_numpy(src), torch.tensor([out[:t]]))
            assert out[t] == int(twin_logits[0, -1].argmax())


# -- the divergence finder ------------------------------------------------------------------------------
def record_both(model, twin, **batch_options):
    src, tgt, targets, mask = batch(model.cfg, **batch_options)
    ours, theirs = model.start_recording(), twin.start_recording()
    model.zero_grad()
    model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    run_twin(twin, src, tgt, targets, mask)
    return ours, theirs


@pytest.mark.parametrize("options", [V10, V11])
def test_divergence_finder_agrees_on_a_correct_model(options):
    ours, theirs = record_both(*pair(**options))
    shared = [n for n in ours if n in theirs]
    assert len(shared) > 60
    for name in ("encoder.block.0.layer.0.SelfAttention.probs", "decoder.block.0.layer.1.EncDecAttention.probs",
                 "decoder.block.0.layer.2.DenseReluDense.act", "encoder.block.1.out", "logits", "dlogits",
                 "decoder.final_layer_norm.dweight", "encoder.block.0.layer.0.SelfAttention.k_proj.dW"):
        assert name in shared, name
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def test_divergence_finder_names_a_planted_relu_gradient_bug(monkeypatch):
    """A wrong ReLU gradient: the finder points at the last decoder block's wi weight gradient."""
    right = t5_module.relu_backward
    monkeypatch.setattr(t5_module, "relu_backward", lambda dy, cache: right(dy, cache) * 1.01)
    ours, theirs = record_both(*pair(**V10))
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "decoder.block.0.layer.2.DenseReluDense.wi.dW", found
    assert 0.005 < found.max_rel < 0.02  # the planted 1% error, measured


def test_divergence_finder_names_a_planted_gated_gradient_bug(monkeypatch):
    import npformer.nn.mlp as mlp

    right = mlp.geglu_backward

    def wrong(dy, cache):
        dgate, dup = right(dy, cache)
        return dgate, dup * 1.01

    monkeypatch.setattr(mlp, "geglu_backward", wrong)
    ours, theirs = record_both(*pair(**V11))
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "decoder.block.0.layer.2.DenseReluDense.wi_1.dW", found


def test_divergence_finder_names_a_corrupted_weight():
    model, twin = pair()
    with torch.no_grad():
        twin.encoder.block[1].layer[0].SelfAttention.k_proj.weight[0, 0] += 1e-3
    ours, theirs = record_both(model, twin)
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "encoder.block.1.layer.0.SelfAttention.k_proj.out", found


# -- config -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", 2.0), ("d_model", 0), ("d_kv", None), ("d_ff", -1), ("num_layers", True),
    ("num_decoder_layers", 0), ("n_head", "2"), ("relative_attention_num_buckets", 3),
    ("relative_attention_max_distance", 16), ("feed_forward_proj", "gated-silu"), ("feed_forward_proj", None),
    ("tie_word_embeddings", 1), ("scale_decoder_outputs", "no"), ("layer_norm_epsilon", -1.0),
    ("layer_norm_epsilon", float("nan")), ("dropout", 1.0), ("dropout", -0.1), ("pad_token_id", 64),
    ("eos_token_id", -1), ("decoder_start_token_id", 1.5), ("dtype", "float16"), ("dtype", np.float64),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: T5Config(**{field: value}), "T5Config", field)


@given(cfg=configs())
def test_config_round_trips(cfg):
    assert T5Config(**cfg.to_dict()) == cfg
    model = T5(cfg)
    assert len(model.decoder.block) == (cfg.num_decoder_layers or cfg.num_layers)
    assert model.encoder.block[0].layer[0].SelfAttention.q_proj.weight.shape == (cfg.n_head * cfg.d_kv, cfg.d_model)


def test_model_refuses_a_bad_config_or_seed_and_is_a_family():
    expect_rejected(lambda: T5(dict(TINY)), "T5", "cfg")
    expect_rejected(lambda: T5(T5Config(**TINY), seed=-1), "T5", "seed")
    assert FAMILIES["t5"] == (T5, T5Config) and family_of(T5(T5Config(**TINY))) == "t5"


# -- inputs -------------------------------------------------------------------------------------------
def test_forward_refuses_bad_inputs_by_name():
    model = T5(T5Config(**TINY))
    src, tgt = np.zeros((2, 4), np.int64), np.zeros((2, 3), np.int64)
    op = "T5.forward"
    expect_rejected(lambda: model.forward(src + 13, tgt), op, "src_ids")
    expect_rejected(lambda: model.forward(src - 1, tgt), op, "src_ids")
    expect_rejected(lambda: model.forward(src, tgt + 13), op, "tgt_ids")
    expect_rejected(lambda: model.forward(src[0], tgt), op, "src_ids")
    expect_rejected(lambda: model.forward(src, tgt[None]), op, "tgt_ids")
    expect_rejected(lambda: model.forward(src, tgt[:1]), op, "tgt_ids")  # batch differs
    expect_rejected(lambda: model.forward(np.zeros((2, 0), np.int64), tgt), op, "src_ids")
    expect_rejected(lambda: model.forward(src.astype(np.float64), tgt), op, "src_ids")
    expect_rejected(lambda: model.forward(src, tgt, tgt[:, :2]), op, "targets")
    expect_rejected(lambda: model.forward(src, tgt, tgt - 2), op, "targets")
    expect_rejected(lambda: model.forward(src, tgt, tgt.astype(np.float32)), op, "targets")
    pad = np.zeros((2, 4), bool)
    expect_rejected(lambda: model.forward(src, tgt, src_padding_mask=pad[:, :3]), op, "src_padding_mask")
    expect_rejected(lambda: model.forward(src, tgt, src_padding_mask=pad.astype(np.int64)), op, "src_padding_mask")
    expect_rejected(lambda: model.forward(src, tgt, src_padding_mask=pad.tolist()), op, "src_padding_mask")
    all_pad = pad.copy()
    all_pad[1] = True
    expect_rejected(lambda: model.forward(src, tgt, src_padding_mask=all_pad), op, "src_padding_mask")
    assert model.pending_backwards == 0 and all(m.pending_backwards == 0 for _, m in model.named_modules())


NOT_IDS = NON_ARRAYS + SUBCLASS_KINDS + ("bool", "float16", "float32", "float64", "complex128", "object",
                                         "rank+1", "rank-1")


@given(kind=st.sampled_from(NOT_IDS), which=st.sampled_from(["src_ids", "tgt_ids"]))
def test_forward_refuses_generated_bad_ids(kind, which):
    model = T5(T5Config(**TINY))
    ids = {"src_ids": np.random.default_rng(0).integers(0, 13, (2, 5)),
           "tgt_ids": np.random.default_rng(1).integers(0, 13, (2, 3))}
    ids[which] = corrupt(ids[which], kind)
    expect_rejected(lambda: model.forward(ids["src_ids"], ids["tgt_ids"]), "T5.forward", which)
    assert all(m.pending_backwards == 0 for _, m in model.named_modules())


def test_encode_and_decode_refuse_training_mode_and_bad_inputs():
    model = T5(T5Config(**TINY))
    src, tgt = np.zeros((2, 4), np.int64), np.zeros((2, 3), np.int64)
    expect_rejected(lambda: model.encode(src), "T5.encode", "src_ids")
    memory = np.zeros((2, 4, 8), np.float32)
    expect_rejected(lambda: model.decode(tgt, memory), "T5.decode", "tgt_ids")
    model.eval()
    memory = model.encode(src)
    expect_rejected(lambda: model.encode(src + 13), "T5.encode", "src_ids")
    expect_rejected(lambda: model.encode(src, np.zeros((2, 5), bool)), "T5.encode", "src_padding_mask")
    expect_rejected(lambda: model.decode(tgt, memory.astype(np.float64)), "T5.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory[0]), "T5.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory[:1]), "T5.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory[..., :5]), "T5.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory.tolist()), "T5.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory, src_padding_mask=np.zeros((2, 3), bool)), "T5.decode",
                    "src_padding_mask")
    caches = model.make_decoder_caches(2, 4, 4)
    expect_rejected(lambda: model.decode(tgt, memory, caches[:0]), "T5.decode", "caches")
    expect_rejected(lambda: model.decode(tgt, memory, [caches[0][0]]), "T5.decode", "caches")
    expect_rejected(lambda: model.decode(tgt, memory, model.make_decoder_caches(3, 4, 4)), "T5.decode", "caches")
    expect_rejected(lambda: model.decode(tgt, memory, model.make_decoder_caches(2, 4, 5)), "T5.decode", "caches")
    expect_rejected(lambda: model.decode(tgt, memory, [(caches[0][0], caches[0][0])]), "T5.decode", "caches")
    model.decode(tgt, memory, caches)
    expect_rejected(lambda: model.decode(tgt, memory, caches), "T5.decode", "tgt_ids")  # 3 + 3 > 4 positions
    assert [(s.length, c.length) for s, c in caches] == [(3, 4)]  # a refused call leaves the caches as they were
    for bad in (0, -1, 2.0, True):
        expect_rejected(lambda: model.make_decoder_caches(bad, 4, 4), "T5.make_decoder_caches", "batch")
        expect_rejected(lambda: model.make_decoder_caches(2, bad, 4), "T5.make_decoder_caches", "max_len")
        expect_rejected(lambda: model.make_decoder_caches(2, 4, bad), "T5.make_decoder_caches", "src_len")


def test_backward_needs_a_loss():
    model = T5(T5Config(**TINY))
    model.forward(np.zeros((1, 3), np.int64), np.zeros((1, 2), np.int64))
    with pytest.raises(RuntimeError, match="T5.backward: the matching forward had no targets"):
        model.backward()


# -- names, dtypes ---------------------------------------------------------------------------------------
def test_state_dict_names_follow_hugging_face():
    v10 = T5(T5Config(**TINY, **V10)).state_dict()
    v11 = T5(T5Config(**TINY, **V11)).state_dict()
    assert "lm_head.weight" not in v10 and v11["lm_head.weight"].shape == (13, 8)
    assert "encoder.block.1.layer.1.DenseReluDense.wi.weight" in v10
    assert {f"decoder.block.0.layer.2.DenseReluDense.{w}.weight" for w in ("wi_0", "wi_1", "wo")} <= set(v11)
    assert {f"decoder.block.0.layer.1.EncDecAttention.{p}_proj.weight" for p in "qkvo"} <= set(v11)
    assert len(v10) == 1 + (2 * 8 + 1 + 1) + (13 + 1 + 1) and len(v11) == len(v10) + 3 + 1  # wi_0 + wi_1, lm_head
    assert not any("bias" in n and "relative_attention_bias" not in n for n in v11)  # no biases anywhere


def test_float32_trains_and_astype_round_trips():
    cfg = T5Config(**{**TINY, "dropout": 0.1})
    model = T5(cfg, seed=2)
    src, tgt, targets, mask = batch(cfg)
    logits, loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    assert logits.dtype == np.float32 and np.isfinite(loss)
    assert all(p.grad.dtype == np.float32 and np.isfinite(p.grad).all() for p in model.parameters())
    before = model.state_dict()
    assert model.astype(np.float64) is model and model.cfg.dtype == "float64"
    assert model.eval().forward(src, tgt)[0].dtype == np.float64
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name]), name


def test_the_model_imports_no_other_model():
    tree = ast.parse(inspect.getsource(t5_module))
    imported = {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m.startswith(".") and not m.startswith("..") for m in imported), imported  # no sibling model
    assert {"..nn.attention", "..nn.mlp", "..ops.t5_bias"} <= imported


# -- the gated feed forward (nn.mlp.GatedMLP) on its own ----------------------------------------------------
@given(dtype=st.sampled_from([np.float64, np.float32]), approximate=st.sampled_from(["tanh", "none"]),
       p=st.sampled_from([0.0, 0.4]), shape=st.sampled_from([(1, 1, 3), (2, 5, 3), (7, 3)]), layout=layouts(),
       seed=st.integers(0, 5))
def test_gated_mlp_matches_torch(dtype, approximate, p, shape, layout, seed):
    """gelu(wi_0 x) * wi_1 x -> dropout -> wo and every gradient, against torch autograd on the same mask."""
    from npformer.nn.mlp import GatedMLP

    rng = np.random.default_rng(seed)
    layer = GatedMLP(3, 4, approximate=approximate, rng=rng, dtype=dtype, dropout=p)
    for prm in layer.parameters():
        prm.data[...] = rng.standard_normal(prm.shape)
    x = in_layout(rng.standard_normal(shape).astype(dtype), layout)
    dy = rng.standard_normal(shape[:-1] + (3,)).astype(dtype)
    rec = layer.start_recording()
    y = layer.forward(x)
    dx = layer.backward(dy)
    w = {n: torch.tensor(prm.data, requires_grad=True) for n, prm in layer.named_parameters()}
    xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    a = torch.nn.functional.gelu(xt @ w["wi_0.weight"].T, approximate=approximate) * (xt @ w["wi_1.weight"].T)
    if p > 0:
        a = a * torch.from_numpy(rec["dropout.mask"]).to(a.dtype) / (1 - p)
    yt = a @ w["wo.weight"].T
    yt.backward(torch.from_numpy(dy))
    rtol = RTOL[np.dtype(dtype)]
    assert_close(y, yt.detach().numpy(), rtol=rtol, what="y")
    assert_close(dx, xt.grad.numpy(), rtol=rtol, what="dx")
    for name, prm in layer.named_parameters():
        assert prm.grad.dtype == dtype
        assert_close(prm.grad, w[name].grad.numpy(), rtol=rtol, what=name)


def test_gated_mlp_refuses_bad_options_and_gradients():
    from npformer.nn.mlp import GatedMLP

    rng = np.random.default_rng(0)
    expect_rejected(lambda: GatedMLP(3, 4, approximate="erf", rng=rng), "GatedMLP", "approximate")
    expect_rejected(lambda: GatedMLP(3, 0, rng=rng), "GatedMLP", "d_hidden")
    expect_rejected(lambda: GatedMLP(3, 4, bias=1, rng=rng), "GatedMLP", "bias")
    expect_rejected(lambda: GatedMLP(3, 4, rng=0), "GatedMLP", "rng")
    expect_rejected(lambda: GatedMLP(3, 4, rng=rng, dropout=1.0), "Dropout", "p")
    layer = GatedMLP(3, 4, rng=rng)
    expect_rejected(lambda: layer.forward(np.zeros((2, 4), np.float32)), "GatedMLP.forward", "x")
    layer.forward(np.zeros((2, 3), np.float32))
    expect_rejected(lambda: layer.backward(np.zeros((3, 3), np.float32)), "GatedMLP.backward", "dy")
    expect_rejected(lambda: layer.backward(np.zeros((2, 3), np.float64)), "GatedMLP.backward", "dy")
    assert layer.pending_backwards == 1  # a refused backward consumes nothing
