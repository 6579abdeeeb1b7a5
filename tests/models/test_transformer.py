"""The original Transformer against its torch twin: every gradient, cached decoding, encode/decode,
the divergence finder, config and input checks. The helpers serve BART's tests too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.transformer import TwinTransformer
from npformer.debug import first_divergence
from npformer.models.transformer import Transformer, TransformerConfig
from npformer.nn.seq2seq import IGNORE_INDEX
from tests.badinput import expect_rejected
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, assert_close

TINY = dict(vocab_size=13, max_position=9, n_layer=2, n_head=2, d_model=8, dropout=0.0)


# -- helpers shared with test_bart.py ---------------------------------------------------------------
def randomise(model, seed=7):
    """Weights of order one (not the small init), so every mask, bias and norm shows in the loss."""
    rng = np.random.default_rng(seed)
    for name, prm in model.named_parameters():
        base = 1.0 if name.endswith("norm.weight") or name.endswith("layernorm_embedding.weight") else 0.0
        scale = 0.3 if prm.data.ndim == 1 or name == "final_logits_bias" else 1.0 / np.sqrt(prm.shape[1])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def make_pair(model_cls, config_cls, twin_cls, seed=0, **cfg):
    config = config_cls(**{**cfg, "dtype": "float64"})
    model = randomise(model_cls(config, seed=seed), seed + 7)
    twin = twin_cls(**config.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def make_batch(cfg, B=2, S=5, T=4, seed=1, pad=True, ignore=True):
    """src (B, S), tgt (B, T), targets (B, T) with some -100, a padding mask with a token in every row."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, cfg.vocab_size, (B, S))
    tgt = rng.integers(0, cfg.vocab_size, (B, T))
    tgt[:, 0] = cfg.decoder_start_token_id
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    if ignore:
        targets[rng.random((B, T)) < 0.25] = IGNORE_INDEX
        targets[0, -1] = rng.integers(0, cfg.vocab_size)  # at least one counted target
    mask = None
    if pad:
        lengths = rng.integers(1, S + 1, B)
        mask = np.arange(S)[None, :] >= lengths[:, None]  # True after each row's length
        src[mask] = cfg.pad_token_id
    return src, tgt, targets, mask


def run_twin(twin, src, tgt, targets, mask, masks=None):
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    _, loss = twin(t(src), t(tgt), t(targets), t(mask), masks)
    twin.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in twin.named_parameters()}


def check_against_twin(model, twin, batch):
    """One forward and backward of each, dropout masks shared: the loss and every parameter's gradient."""
    src, tgt, targets, mask = batch
    rec = model.start_recording()  # the dropout masks, for the twin
    model.zero_grad()
    _, loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    model.stop_recording()
    masks = {k: v for k, v in rec.items() if k.endswith(".mask")}
    assert (len(masks) > 0) == (model.cfg.dropout > 0)
    twin_loss, twin_grads = run_twin(twin, src, tgt, targets, mask, masks)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)
    for name, prm in ours.items():
        # A key bias's gradient is zero in exact arithmetic (softmax ignores a shift per row): judge it on
        # the scale of the value bias's gradient.
        scale = np.abs(twin_grads[name.replace("k_proj", "v_proj")]).max() if name.endswith("k_proj.bias") else None
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, scale=scale, what=name)


def check_decoding(model, batch, chunks_seed=0):
    """encode + decode equals forward; cached decoding, a token at a time and in random chunks, equals it."""
    src, tgt, _, mask = batch
    model.eval()
    full, _ = model.forward(src, tgt, src_padding_mask=mask)
    memory = model.encode(src, src_padding_mask=mask)
    assert_close(model.decode(tgt, memory, src_padding_mask=mask), full, what="decode")
    B, T = tgt.shape
    caches = model.make_decoder_caches(B, T, src.shape[1])
    steps = [model.decode(tgt[:, t:t + 1], memory, caches, src_padding_mask=mask) for t in range(T)]
    assert_close(np.concatenate(steps, axis=1), full, what="one token at a time")
    rng = np.random.default_rng(chunks_seed)
    cuts = np.unique(np.concatenate([[0, T], rng.integers(0, T + 1, 2)]))
    caches = model.make_decoder_caches(B, T + 1, src.shape[1])  # room to spare
    parts = [model.decode(tgt[:, a:b], memory, caches, src_padding_mask=mask) for a, b in zip(cuts[:-1], cuts[1:])]
    assert_close(np.concatenate(parts, axis=1), full, what=f"chunks {cuts}")
    assert all(s.length == T and c.length == src.shape[1] for s, c in caches)


def record_both(model, twin, batch):
    src, tgt, targets, mask = batch
    ours, theirs = model.start_recording(), twin.start_recording()
    model.zero_grad()
    model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    run_twin(twin, src, tgt, targets, mask)
    model.stop_recording()
    twin.stop_recording()
    return ours, theirs


# -- the Transformer -------------------------------------------------------------------------------------
def pair(seed=0, **overrides):
    return make_pair(Transformer, TransformerConfig, TwinTransformer, seed, **{**TINY, **overrides})


@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 3))
    return TransformerConfig(
        vocab_size=draw(st.sampled_from([3, 7, 13])), max_position=draw(st.integers(1, 7)),
        n_layer=draw(st.integers(1, 2)), n_decoder_layer=draw(st.one_of(st.none(), st.integers(1, 2))),
        n_head=n_head, d_model=n_head * 2 * draw(st.integers(1, 2)), d_ff=draw(st.one_of(st.none(), st.integers(1, 7))),
        dropout=draw(st.sampled_from([0.0, 0.3])), label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        layer_norm_eps=draw(st.sampled_from([1e-5, 0.1])), dtype="float64")


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    model = randomise(Transformer(cfg, seed=data.draw(st.integers(0, 3))))
    twin = TwinTransformer(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    S, T = data.draw(st.integers(1, cfg.max_position)), data.draw(st.integers(1, cfg.max_position))
    batch = make_batch(cfg, B=data.draw(st.integers(1, 3)), S=S, T=T, seed=data.draw(st.integers(0, 9)),
                       pad=data.draw(st.booleans()))
    check_against_twin(model, twin, batch)


def test_label_smoothing_and_padding_change_the_loss():
    """The options the twin test draws are not inert."""
    model, _ = pair()
    src, tgt, targets, mask = make_batch(model.cfg)
    assert mask.any()
    base = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    assert base != model.forward(src, tgt, targets)[1]
    model.cfg.label_smoothing = 0.0
    assert base != model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    model.clear_caches()


@pytest.mark.parametrize("shape", [(2, 5, 4), (1, 3, 1), (3, 1, 6)])
def test_cached_decoding_equals_the_uncached_decoder(shape):
    B, S, T = shape
    model, _ = pair()
    check_decoding(model, make_batch(model.cfg, B, S, T, seed=S + T), chunks_seed=T)


def test_divergence_finder_agrees_on_a_correct_model():
    model, twin = pair()
    ours, theirs = record_both(model, twin, make_batch(model.cfg))
    shared = [n for n in ours if n in theirs]
    for name in ("encoder_layers.0.self_attn.probs", "decoder_layers.1.encoder_attn.probs", "decoder_layers.0.act",
                 "memory", "logits", "dlogits", "decoder_layers.1.dact", "encoder_layers.0.dx",
                 "decoder_layers.0.encoder_attn.k_proj.dW"):
        assert name in shared, name
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def test_divergence_finder_names_a_planted_bug(monkeypatch):
    """A wrong ReLU backward: the finder must point at the last decoder layer's feed-forward gradient."""
    import npformer.nn.seq2seq as seq2seq

    right = seq2seq.relu_backward
    monkeypatch.setattr(seq2seq, "relu_backward", lambda dy, cache: right(dy, cache) * 1.01)
    model, twin = pair()
    ours, theirs = record_both(model, twin, make_batch(model.cfg))
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "decoder_layers.1.dact", found
    assert 0.005 < found.max_rel < 0.02


def test_embeddings_are_scaled_and_positions_sinusoidal():
    """The decoder's first input is sqrt(D) E[ids] + PE (dropout 0): recorded through the first layer's q_proj."""
    model, _ = pair()
    src, tgt, _, _ = make_batch(model.cfg, pad=False)
    model.eval()
    rec = model.start_recording()
    model.forward(src, tgt)
    E, D = model.embed_tokens.weight.data, model.cfg.d_model
    p = np.arange(tgt.shape[1])[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)
    pe = np.stack([np.sin(p), np.cos(p)], axis=-1).reshape(tgt.shape[1], D)
    x = np.sqrt(D) * E[tgt] + pe
    W, b = (model.decoder_layers[0].self_attn.q_proj.weight.data, model.decoder_layers[0].self_attn.q_proj.bias.data)
    assert_close(rec["decoder_layers.0.self_attn.q_proj.out"], x @ W.T + b, what="q of the first decoder layer")


def test_float32_model_keeps_float32():
    cfg = TransformerConfig(**{**TINY, "dropout": 0.1})
    model = Transformer(cfg)
    src, tgt, targets, mask = make_batch(cfg)
    logits, loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    assert logits.dtype == np.float32 and np.isfinite(loss)
    assert all(p.grad.dtype == np.float32 for p in model.parameters())


def test_a_training_step_lowers_the_loss():
    model, _ = pair(dropout=0.0)
    src, tgt, targets, mask = make_batch(model.cfg)
    before = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    model.zero_grad()
    model.backward()
    for p in model.parameters():
        p.data -= 1e-2 * p.grad
    assert model.forward(src, tgt, targets, src_padding_mask=mask)[1] < before
    model.clear_caches()


# -- refusals -------------------------------------------------------------------------------------------
def bad_inputs(cfg):
    """(argument, forward's keyword arguments) pairs that must be refused, naming the argument."""
    src, tgt, targets, mask = make_batch(cfg, B=2, S=5, T=4)
    good = dict(src_ids=src, tgt_ids=tgt, targets=targets, src_padding_mask=mask)
    V = cfg.vocab_size
    return [
        ("src_ids", dict(good, src_ids=src.astype(np.float64))), ("src_ids", dict(good, src_ids=src[0])),
        ("src_ids", dict(good, src_ids=src + V)), ("src_ids", dict(good, src_ids=src.tolist())),
        ("src_ids", dict(good, src_ids=np.zeros((2, cfg.max_position + 1), np.int64), src_padding_mask=None)),
        ("tgt_ids", dict(good, tgt_ids=tgt[:1])), ("tgt_ids", dict(good, tgt_ids=-tgt - 1)),
        ("tgt_ids", dict(good, tgt_ids=tgt[:, :0], targets=None)),
        ("tgt_ids", dict(good, tgt_ids=np.zeros((2, cfg.max_position + 1), np.int64), targets=None)),
        ("targets", dict(good, targets=targets[:, :-1])), ("targets", dict(good, targets=targets + V + 200)),
        ("targets", dict(good, targets=targets.astype(np.float32))),
        ("src_padding_mask", dict(good, src_padding_mask=mask.astype(np.int64))),
        ("src_padding_mask", dict(good, src_padding_mask=mask[:, :-1])),
        ("src_padding_mask", dict(good, src_padding_mask=np.ones_like(mask))),
    ]


def check_refusals(model, op):
    for name, kwargs in bad_inputs(model.cfg):
        expect_rejected(lambda: model.forward(**kwargs), op, name)
        assert all(m.pending_backwards == 0 for _, m in model.named_modules())  # nothing kept


def check_inference_refusals(model, prefix):
    src, tgt, _, mask = make_batch(model.cfg)
    model.train()
    with pytest.raises(RuntimeError, match=f"{prefix}.encode: inference only"):
        model.encode(src)
    model.eval()
    memory = model.encode(src, src_padding_mask=mask)
    expect_rejected(lambda: model.decode(tgt, memory[:1]), f"{prefix}.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory.astype(np.float32)), f"{prefix}.decode", "memory")
    expect_rejected(lambda: model.decode(tgt, memory, src_padding_mask=mask[:, :2]), f"{prefix}.decode",
                    "src_padding_mask")
    expect_rejected(lambda: model.decode(tgt, memory, [1, 2]), f"{prefix}.decode", "caches")
    caches = model.make_decoder_caches(2, 2, memory.shape[1])
    expect_rejected(lambda: model.decode(tgt, memory, caches), f"{prefix}.decode", "tgt_ids")  # 4 > 2 positions
    assert all(s.length == 0 and c.length == 0 for s, c in caches)  # a refused call moves no cache
    expect_rejected(lambda: model.decode(tgt, memory, caches[:1]), f"{prefix}.decode", "caches")
    expect_rejected(lambda: model.encode(src.astype(np.float32)), f"{prefix}.encode", "src_ids")
    expect_rejected(lambda: model.make_decoder_caches(0), f"{prefix}.make_decoder_caches", "batch")
    model.train()


def test_bad_inputs_are_refused_by_name():
    model, _ = pair()
    check_refusals(model, "Transformer.forward")
    check_inference_refusals(model, "Transformer")
    with pytest.raises(RuntimeError, match="Transformer.backward: the matching forward had no targets"):
        src, tgt, _, _ = make_batch(model.cfg)
        model.forward(src, tgt)
        model.backward()


@pytest.mark.parametrize("name, bad", [("vocab_size", 0), ("n_head", 3), ("d_model", 6.0), ("dropout", 1.0),
                                       ("label_smoothing", 1.5), ("pad_token_id", 13), ("decoder_start_token_id", -1),
                                       ("dtype", "float16"), ("n_decoder_layer", 0), ("d_ff", True)])
def test_bad_config_refused_by_name(name, bad):
    expect_rejected(lambda: TransformerConfig(**{**TINY, name: bad}), "TransformerConfig", name)


def test_odd_width_refused_for_the_sinusoidal_table():
    expect_rejected(lambda: TransformerConfig(**{**TINY, "d_model": 9, "n_head": 3}), "TransformerConfig", "d_model")


def test_config_round_trips_and_family_builds():
    from npformer.models import build, family_of

    cfg = TransformerConfig(**TINY)
    model = build("transformer", cfg.to_dict(), seed=3)
    assert isinstance(model, Transformer) and family_of(model) == "transformer"
    assert TransformerConfig(**cfg.to_dict()) == cfg
