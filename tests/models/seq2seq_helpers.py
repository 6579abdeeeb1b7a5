"""Helpers the encoder-decoder tests (the original Transformer, BART) share: weights of order one, a model
with its torch twin, padded batches, comparing the loss, every gradient and recordings with the twin,
cached decoding, and the refusals every encoder-decoder makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from npformer.debug import first_divergence
from npformer.nn.seq2seq import IGNORE_INDEX
from tests.badinput import expect_rejected
from tests.models import helpers
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, assert_close


# -- models, batches, twins ---------------------------------------------------------------------------
def randomise(model, seed=7):
    """Weights of order one (not the small init), so every mask, bias and norm shows in the loss."""
    return helpers.randomise(model, seed, unit=("norm.weight", "layernorm_embedding.weight"),
                             small=("final_logits_bias",))


def make_pair(model_cls, config_cls, twin_cls, seed=0, **cfg):
    return helpers.twin_pair(model_cls, twin_cls, config_cls(**{**cfg, "dtype": "float64"}), seed, randomise)


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


# -- checks both models' tests run -------------------------------------------------------------------------
TINY = dict(vocab_size=13, max_position=9, n_layer=2, n_head=2, d_model=8, dropout=0.0)  # a model to test on
DECODING_SHAPES = [(2, 5, 4), (1, 3, 1), (3, 1, 6)]  # (B, S, T) of the cached-decoding tests


def check_drawn_against_twin(model_cls, twin_cls, cfg, data):
    """check_against_twin on a drawn seed, batch shape and padding (``data``: hypothesis' st.data())."""
    model = randomise(model_cls(cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_cls(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    S, T = data.draw(st.integers(1, cfg.max_position)), data.draw(st.integers(1, cfg.max_position))
    batch = make_batch(cfg, B=data.draw(st.integers(1, 3)), S=S, T=T, seed=data.draw(st.integers(0, 9)),
                       pad=data.draw(st.booleans()))
    check_against_twin(model, twin, batch)


def check_decoding_shape(model, shape):
    """check_decoding on a batch of shape (B, S, T)."""
    B, S, T = shape
    check_decoding(model, make_batch(model.cfg, B, S, T, seed=S + T), chunks_seed=T)


def check_finder_agrees(model, twin, names):
    """Both recordings hold every one of ``names`` and the divergence finder finds nothing."""
    ours, theirs = record_both(model, twin, make_batch(model.cfg))
    shared = [n for n in ours if n in theirs]
    for name in names:
        assert name in shared, name
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def check_finder_names_planted_bug(monkeypatch, make_pair, activation, expected):
    """A feed-forward ``<activation>_backward`` 1% off: the finder must name ``expected``, about 1% off."""
    import npformer.nn.seq2seq as seq2seq

    name = f"{activation}_backward"
    right = getattr(seq2seq, name)
    monkeypatch.setattr(seq2seq, name, lambda dy, cache: right(dy, cache) * 1.01)
    model, twin = make_pair()
    ours, theirs = record_both(model, twin, make_batch(model.cfg))
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == expected, found
    assert 0.005 < found.max_rel < 0.02


def float32_step(model_cls, cfg):
    """One forward and backward of a float32 model: finite, float32 logits and gradients; returns the loss."""
    model = model_cls(cfg)
    src, tgt, targets, mask = make_batch(cfg)
    logits, loss = model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    assert logits.dtype == np.float32 and np.isfinite(loss)
    assert all(p.grad.dtype == np.float32 for p in model.parameters())
    return loss
