"""The original Transformer against its torch twin: every gradient, cached decoding, encode/decode,
the divergence finder, config and input checks (helpers in seq2seq_helpers.py, shared with BART's tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.transformer import TwinTransformer
from npformer.models.transformer import Transformer, TransformerConfig
from tests.badinput import expect_rejected
from tests.models.seq2seq_helpers import (DECODING_SHAPES, TINY, check_decoding_shape, check_drawn_against_twin,
                                          check_finder_agrees, check_finder_names_planted_bug,
                                          check_inference_refusals, check_refusals, float32_step, make_batch,
                                          make_pair)
from tests.tolerances import assert_close


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
    check_drawn_against_twin(Transformer, TwinTransformer, cfg, data)


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


@pytest.mark.parametrize("shape", DECODING_SHAPES)
def test_cached_decoding_equals_the_uncached_decoder(shape):
    check_decoding_shape(pair()[0], shape)


def test_divergence_finder_agrees_on_a_correct_model():
    check_finder_agrees(*pair(), ("encoder_layers.0.self_attn.probs", "decoder_layers.1.encoder_attn.probs",
                                  "decoder_layers.0.act", "memory", "logits", "dlogits", "decoder_layers.1.dact",
                                  "encoder_layers.0.dx", "decoder_layers.0.encoder_attn.k_proj.dW"))


def test_divergence_finder_names_a_planted_bug(monkeypatch):
    """A wrong ReLU backward: the finder must point at the last decoder layer's feed-forward gradient."""
    check_finder_names_planted_bug(monkeypatch, pair, "relu", "decoder_layers.1.dact")


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
    float32_step(Transformer, TransformerConfig(**{**TINY, "dropout": 0.1}))


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
