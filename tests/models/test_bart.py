"""BART against its torch twin: every gradient, cached decoding, encode/decode, the divergence finder,
BART's own details (offset positions, the frozen pad row, the logits bias), config and input checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.bart import TwinBart
from npformer.models.bart import Bart, BartConfig
from tests.badinput import expect_rejected
from tests.models.seq2seq_helpers import (DECODING_SHAPES, TINY, check_decoding_shape, check_drawn_against_twin,
                                          check_finder_agrees, check_finder_names_planted_bug,
                                          check_inference_refusals, check_refusals, float32_step, make_batch,
                                          make_pair, randomise)
from tests.tolerances import MODEL_RTOL, assert_close

def pair(seed=0, **overrides):
    return make_pair(Bart, BartConfig, TwinBart, seed, **{**TINY, **overrides})


@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 3))
    return BartConfig(
        vocab_size=draw(st.sampled_from([3, 7, 13])), max_position=draw(st.integers(1, 7)),
        n_layer=draw(st.integers(1, 2)), n_decoder_layer=draw(st.one_of(st.none(), st.integers(1, 2))),
        n_head=n_head, d_model=n_head * draw(st.integers(1, 3)), d_ff=draw(st.one_of(st.none(), st.integers(1, 7))),
        dropout=draw(st.sampled_from([0.0, 0.3])), label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        scale_embedding=draw(st.booleans()), layer_norm_eps=draw(st.sampled_from([1e-5, 0.1])),
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, dtype="float64")


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    check_drawn_against_twin(Bart, TwinBart, cfg, data)


def test_scale_embedding_and_logits_bias_change_the_loss():
    model, _ = pair()
    src, tgt, targets, mask = make_batch(model.cfg)
    base = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    model.embed_scale = np.sqrt(model.cfg.d_model)
    scaled = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    model.final_logits_bias.data[0, targets[0, -1]] += 1.0
    biased = model.forward(src, tgt, targets, src_padding_mask=mask)[1]
    assert len({base, scaled, biased}) == 3
    model.clear_caches()


def test_pad_row_gets_only_the_heads_gradient_and_two_position_rows_none():
    """A pad lookup adds nothing to the pad row (as torch's padding_idx); positions read rows p + 2."""
    model, _ = pair()
    src, tgt, targets, mask = make_batch(model.cfg, pad=True)
    assert (src == model.cfg.pad_token_id).any()
    rec = model.start_recording()
    model.zero_grad()
    model.forward(src, tgt, targets, src_padding_mask=mask)
    model.backward()
    pad = model.cfg.pad_token_id
    h = rec["decoder.layers.1.out"]  # the decoder's output, the head's input
    head_grad = np.einsum("btv,btd->vd", rec["dlogits"], h)  # dlogits^T h: the head's share of the table's gradient
    assert_close(model.shared.weight.grad[pad], head_grad[pad], rtol=MODEL_RTOL, what="pad row")
    assert_close(model.final_logits_bias.grad[0], rec["dlogits"].sum(axis=(0, 1)), rtol=MODEL_RTOL, what="bias")
    for side, L in (("encoder", src.shape[1]), ("decoder", tgt.shape[1])):
        g = getattr(model, side).embed_positions.weight.grad
        assert not g[:2].any() and not g[2 + L:].any() and g[2:2 + L].any()


@pytest.mark.parametrize("shape", DECODING_SHAPES)
def test_cached_decoding_equals_the_uncached_decoder(shape):
    check_decoding_shape(pair(scale_embedding=True)[0], shape)


def test_divergence_finder_agrees_on_a_correct_model():
    check_finder_agrees(*pair(dropout=0.0), (
        "encoder.layers.0.self_attn.probs", "decoder.layers.1.encoder_attn.probs", "decoder.layers.0.act",
        "encoder.layernorm_embedding.out", "memory", "logits", "dlogits", "decoder.layers.1.dact",
        "encoder.layers.0.dx", "decoder.layernorm_embedding.dweight"))


def test_divergence_finder_names_a_planted_bug(monkeypatch):
    """A wrong GELU backward: the finder must point at the last decoder layer's feed-forward gradient."""
    check_finder_names_planted_bug(monkeypatch, pair, "gelu", "decoder.layers.1.dact")


def test_float32_model_keeps_float32():
    cfg = BartConfig(**{**TINY, "dropout": 0.1})
    loss = float32_step(Bart, cfg)
    assert abs(loss - np.log(cfg.vocab_size)) < 0.2  # small init: near-uniform predictions


def test_parameter_names_follow_hugging_face():
    model = Bart(BartConfig(**TINY))
    names = set(dict(model.named_parameters()))
    for name in ("shared.weight", "final_logits_bias", "encoder.embed_positions.weight",
                 "decoder.layernorm_embedding.bias", "encoder.layers.1.fc2.weight",
                 "decoder.layers.0.encoder_attn.o_proj.weight", "decoder.layers.1.encoder_attn_layer_norm.weight"):
        assert name in names, name
    assert model.encoder.embed_positions.weight.shape == (TINY["max_position"] + 2, TINY["d_model"])
    assert model.final_logits_bias.shape == (1, TINY["vocab_size"]) and not model.final_logits_bias.data.any()


def test_bad_inputs_are_refused_by_name():
    model, _ = pair()
    randomise(model)
    check_refusals(model, "Bart.forward")
    check_inference_refusals(model, "Bart")


@pytest.mark.parametrize("name, bad", [("vocab_size", 0), ("n_head", 3), ("dropout", -0.1), ("scale_embedding", 1),
                                       ("pad_token_id", 13), ("eos_token_id", 2.0), ("dtype", "bfloat16"),
                                       ("init_std", float("inf")), ("max_position", 0)])
def test_bad_config_refused_by_name(name, bad):
    expect_rejected(lambda: BartConfig(**{**TINY, name: bad}), "BartConfig", name)
