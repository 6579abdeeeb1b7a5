"""DeBERTa-v2 masked-LM against its torch twin: loss and every gradient over drawn configurations (position
terms, buckets, spans, padding, shared or separate position projections, absolute positions, T = 1), the shared
relative table's gradient from every layer, the enhanced mask decoder (the last layer applied again with a query
stream; its gradients summed over the calls), recordings and the divergence finder, config and input checks."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.deberta as deberta_module
from kernels.twins.deberta import TwinDeberta, relative_index
from npformer.models.deberta import MAX_EMD_LAYERS, Deberta, DebertaConfig, DebertaOutputs, deberta_scale
from npformer.ops.disentangled_attention import deberta_relative_indices
from tests.badinput import expect_rejected
from tests.models.encoders import (adamw_losses, assert_backward_needs_a_loss, assert_eval_keeps_no_cache,
                                   assert_float32_matches_twin, assert_grads_match, assert_init_and_astype,
                                   assert_refuses_corrupted, bad_encoder_inputs, bad_kinds, divergence,
                                   divergence_after_planting, imported_modules, layer_names, mlm_labels,
                                   model_and_twin, padded_inputs, pending, randomise, record_both, run_both, run_twin,
                                   twin_of)
from tests.tolerances import MODEL_RTOL, assert_close

TINY = dict(vocab_size=13, max_position=10, n_layer=2, n_head=2, d_model=6, d_ff=7, dropout=0.0,
            position_buckets=4, max_relative_positions=6)
# Gradients that are zero in exact arithmetic (softmax ignores a shift shared by a row): a key bias, and with
# c2p alone the relative LayerNorm's bias and a separate position-key bias. Judged at a sibling tensor's scale.
ZERO_BY_SHIFT = {"key_proj.bias": "value_proj.weight", "rel_norm.bias": "rel_embeddings.weight"}


def pair(seed=0, **overrides):
    return model_and_twin(DebertaConfig, Deberta, TwinDeberta, TINY, seed, **overrides)


def batch(cfg, B=3, T=8, seed=1, pad_rows=True):
    """ids, token types (where the model has them), an attention mask whose later rows are right-padded
    (every row keeps a token), MLM labels with -100 where not masked."""
    rng = np.random.default_rng(seed)
    ids, types, mask = padded_inputs(rng, cfg, B, T, pad_rows)
    return ids, types, mask, mlm_labels(rng, cfg, B, T)


@st.composite
def configs(draw):
    """A small DeBERTa: c2p and/or p2c, bucketed (N, M) or a plain span, shared or separate position
    projections, the relative LayerNorm or not, absolute positions and token types or not, dropout or not."""
    n_head = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([2, 5, 13]))
    buckets = draw(st.sampled_from([None, 2, 4, 5, 8]))
    if buckets is None:
        max_rel = draw(st.integers(1, 6))
    else:
        max_rel = draw(st.integers(buckets // 2 + 2, 12))
    return DebertaConfig(
        vocab_size=vocab, max_position=draw(st.integers(7, 9)), type_vocab_size=draw(st.integers(0, 2)),
        n_layer=draw(st.integers(1, 2)), n_head=n_head, d_model=n_head * draw(st.integers(-(-3 // n_head), 3)),
        d_ff=draw(st.integers(1, 6)), dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        layer_norm_eps=draw(st.sampled_from([1e-7, 1e-5, 0.1])),
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        position_biased_input=draw(st.booleans()), position_buckets=buckets, max_relative_positions=max_rel,
        pos_att_type=draw(st.sampled_from([("c2p", "p2c"), ("p2c", "c2p"), ("c2p",), ("p2c",)])),
        share_att_key=draw(st.booleans()), norm_rel_ebd=draw(st.booleans()), dtype="float64")


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    model = randomise(Deberta(cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_of(model, TwinDeberta)
    T = data.draw(st.sampled_from([1, 2, 5, 7]))
    args = batch(cfg, B=data.draw(st.integers(1, 3)), T=T, seed=data.draw(st.integers(0, 9)),
                 pad_rows=data.draw(st.booleans()))
    outputs, loss, twin_loss, twin_grads = run_both(model, twin, args)
    assert outputs.mlm_logits.shape == args[0].shape + (cfg.vocab_size,)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    assert_grads_match(model, twin_grads, zero_by_shift=ZERO_BY_SHIFT)


@pytest.mark.parametrize("options", [dict(), dict(pos_att_type=("c2p",), share_att_key=False),
                                     dict(position_biased_input=True, type_vocab_size=2), dict(emd_layers=2)])
def test_float32_matches_the_twin(options):
    model, twin = pair(**options)
    assert_float32_matches_twin(model, twin, batch(model.cfg), zero_by_shift=ZERO_BY_SHIFT)


# -- the relative table: shared, LayerNorm'd once, gradients from every layer ---------------------------
def test_the_relative_table_collects_every_layers_gradient():
    """The table's gradient is the sum of the layers' shares: zeroing one layer's share changes it, and a
    one-layer model gets exactly its own layer's share."""
    model, twin = pair(n_layer=3)
    rec = model.start_recording()
    args = batch(model.cfg)
    model.forward(*args)
    model.backward()
    _, twin_grads = run_twin(twin, args)
    assert_close(model.rel_embeddings.weight.grad, twin_grads["rel_embeddings.weight"], rtol=MODEL_RTOL,
                 what="rel table")
    for i in range(3):  # every layer sends the projected rows a gradient: dk_r, dq_r (H, 2S, D_h)
        assert np.any(rec[f"layers.{i}.attention.dk_r"] != 0) and np.any(rec[f"layers.{i}.attention.dq_r"] != 0)
    # a twin whose relative rows reach only the last layer gets a different table gradient
    detached = twin_of(model, TwinDeberta)
    for layer in detached.layers[:-1]:
        original = layer.attention.forward
        layer.attention.forward = (lambda f: lambda x, rel, *a: f(x, rel.detach(), *a))(original)
    _, partial = run_twin(detached, args)
    assert not np.allclose(partial["rel_embeddings.weight"], twin_grads["rel_embeddings.weight"])


@given(T=st.integers(1, 40), config=st.sampled_from([(None, 1), (None, 5), (2, 3), (4, 6), (8, 12), (256, 512)]))
def test_twin_and_op_read_the_same_relative_rows(T, config):
    """The twin's own float32 torch buckets give npformer's tables (DA.3), and the p2c table read per key."""
    N, M = config
    c2p, p2c = deberta_relative_indices(T, T, position_buckets=N, max_relative_positions=M)
    twin_c2p, twin_p2c_by_key = relative_index(T, N, M)
    np.testing.assert_array_equal(twin_c2p.numpy(), c2p)
    np.testing.assert_array_equal(twin_p2c_by_key.numpy().T, p2c)


def test_scale_is_the_float32_root():
    for head_dim, n in ((3, 2), (64, 2), (5, 1), (7, 0)):
        root32 = float(torch.sqrt(torch.tensor(head_dim * (1 + n), dtype=torch.float32)))
        assert deberta_scale(head_dim, n) == 1.0 / root32
    assert deberta_scale(3, 2) == 1.0 / 3.0  # an exact root stays exact
    assert deberta_scale(5, 1) != 1.0 / np.sqrt(10.0)  # an inexact one is float32's, not float64's


# -- the enhanced mask decoder --------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(cfg=configs(), emd_layers=st.integers(1, 3), data=st.data())
def test_enhanced_mask_decoder_every_gradient_matches_the_twin(cfg, emd_layers, data):
    """The last layer's parameters get the sum over its ordinary call and every decoder call, its input H the
    keys' and values' share of every call and the query stream's start, the position table the stream's."""
    cfg = DebertaConfig(**{**cfg.to_dict(), "emd_layers": emd_layers})
    model = randomise(Deberta(cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_of(model, TwinDeberta)
    T = data.draw(st.sampled_from([1, 2, 5, 7]))
    args = batch(cfg, B=data.draw(st.integers(1, 3)), T=T, seed=data.draw(st.integers(0, 9)),
                 pad_rows=data.draw(st.booleans()))
    outputs, loss, twin_loss, twin_grads = run_both(model, twin, args)
    assert outputs.mlm_logits.shape == args[0].shape + (cfg.vocab_size,)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    assert_grads_match(model, twin_grads, zero_by_shift=ZERO_BY_SHIFT)
    assert pending(model) == 0  # every call's cache consumed


@pytest.mark.parametrize("n_layer", [1, 2])
def test_enhanced_mask_decoder_structure(n_layer):
    """The decoder reads the last layer's input H (the embeddings' output in a one-layer model) plus the position
    rows; the ordinary last output gets an exact zero gradient; each decoder call moves the loss; encode is the
    body without it; emd_layers=0 is the model without the table."""
    E = 2
    model, twin = pair(emd_layers=E, n_layer=n_layer, dropout=0.2)
    rec = model.start_recording()
    args = batch(model.cfg)
    model.forward(*args)
    model.backward()
    last = f"layers.{n_layer - 1}"
    H = rec["embeddings.out"] if n_layer == 1 else rec["layers.0.out"]
    P = model.emd_position_embeddings.weight.data[:args[0].shape[1]]
    assert_close(rec[f"{last}.attention.query_proj.out@2"],  # the first decoder call's queries: from H + P
                 (H + P) @ model.layers[-1].attention.query_proj.weight.data.T
                 + model.layers[-1].attention.query_proj.bias.data, rtol=MODEL_RTOL, what="queries of H + P")
    assert np.all(rec[f"{last}.dx@{E + 1}"] == 0)  # the ordinary call: backward last, with a zero gradient
    assert np.any(rec[f"{last}.dx"] != 0) and np.any(rec[f"{last}.dquery"] != 0)
    # the position table's gradient is the stream's start gradient summed over the batch, row t for position t
    assert_close(model.emd_position_embeddings.weight.grad[:args[0].shape[1]], rec["emd.dquery"].sum(0),
                 rtol=MODEL_RTOL, what="position table")
    assert np.all(model.emd_position_embeddings.weight.grad[args[0].shape[1]:] == 0)
    model.eval()
    ids, types, mask, labels = args
    losses = [pair(emd_layers=k, n_layer=n_layer)[0].eval().forward(ids, types, mask, labels)[1] for k in range(4)]
    assert len(set(losses)) == 4, losses
    plain = pair(n_layer=n_layer, dropout=0.2)[0]
    assert set(model.state_dict()) - set(plain.state_dict()) == {"emd_position_embeddings.weight"}
    for name, prm in plain.named_parameters():  # the same weights, without the table
        prm.data[...] = model.state_dict()[name]
    encoded = model.encode(ids, types, mask)  # the body: the last layer's ordinary output, no decoder
    assert_close(encoded, plain.eval().encode(ids, types, mask), rtol=0, what="encode")
    model.train()
    model.zero_grad()
    model.encode(ids, types, mask)
    model.backward_encode(np.ones_like(encoded))
    assert np.all(model.emd_position_embeddings.weight.grad == 0) and pending(model) == 0


@pytest.mark.derivation("DA.18")
@given(cfg=configs(), T=st.sampled_from([1, 3, 6]), data=st.data())
def test_the_layer_keeps_the_query_streams_gradient_apart(cfg, T, data):
    """(DA.18) at the layer: with query_states Z, dquery is Z's gradient (the residual and the query
    projection) and dx X's (keys and values), each equal to autograd's on the twin's layer; with Z = X their sum
    is the ordinary call's input gradient; the weights' gradients add over calls."""
    model = randomise(Deberta(DebertaConfig(**{**cfg.to_dict(), "dropout": 0.0}), seed=1))
    twin = twin_of(model, TwinDeberta)
    layer, twin_layer = model.layers[-1], twin.layers[-1]
    rng = np.random.default_rng(data.draw(st.integers(0, 9)))
    B, D = 2, cfg.d_model
    x, z, dout = (rng.standard_normal((B, T, D)) for _ in range(3))
    rel = model.rel_embeddings.weight.data
    c2p, p2c = deberta_relative_indices(T, T, position_buckets=cfg.position_buckets,
                                        max_relative_positions=cfg.max_relative_positions)
    visible = np.ones((B, 1, T, T), bool)
    visible[1, :, :, T - T // 2:] = False
    visible[1, :, T - T // 2:, :] = False

    layer.forward(x, rel, visible, c2p, p2c, query_states=z)
    dx, drel, dquery = layer.backward(dout)
    tx, tz, trel = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, z, rel))
    out = twin_layer(tx, trel, torch.from_numpy(visible), tuple(torch.from_numpy(i) for i in (c2p, p2c.T)), None,
                     "layers.x", query_states=tz)
    want_dx, want_dz, want_drel = torch.autograd.grad(out, (tx, tz, trel), torch.from_numpy(dout))
    assert_close(dquery, want_dz.numpy(), rtol=MODEL_RTOL, what="dquery")
    assert_close(dx, want_dx.numpy(), rtol=MODEL_RTOL, what="dx (keys and values)")
    assert_close(drel, want_drel.numpy(), rtol=MODEL_RTOL, what="drel")

    layer.forward(x, rel, visible, c2p, p2c)  # an ordinary call: Z = X
    whole, _, none = layer.backward(dout)
    layer.forward(x, rel, visible, c2p, p2c, query_states=x)
    keys_values, _, query = layer.backward(dout)
    assert none is None
    assert_close(keys_values + query, whole, rtol=MODEL_RTOL, what="the two shares add up")


def test_layer_refuses_a_bad_query_stream_by_name():
    model = Deberta(DebertaConfig(**TINY))
    layer = model.layers[0]
    x = np.zeros((1, 3, 6), np.float32)
    c2p, p2c = deberta_relative_indices(3, 3, position_buckets=4, max_relative_positions=6)
    rel = model.rel_embeddings.weight.data
    for bad in (np.zeros((1, 4, 6), np.float32), np.zeros((1, 3, 6), np.float64), np.zeros((1, 3, 6), np.int64),
                [[0.0] * 6] * 3):
        expect_rejected(lambda: layer.forward(x, rel, None, c2p, p2c, query_states=bad), "DebertaLayer.forward",
                        "query_states" if not (isinstance(bad, np.ndarray) and bad.dtype == np.float64) else "x")
    assert pending(model) == 0


def test_enhanced_mask_decoder_limits_the_length_to_its_table():
    model = Deberta(DebertaConfig(**TINY, emd_layers=2))
    expect_rejected(lambda: model.forward(np.ones((1, 11), np.int64)), "Deberta.forward", "ids")
    assert model.forward(np.ones((1, 10), np.int64))[0].mlm_logits.shape == (1, 10, 13)
    plain = Deberta(DebertaConfig(**TINY), seed=0)  # the body alone reads no decoder table: no limit from it
    hidden = model.encode(np.ones((1, 11), np.int64))
    model.backward_encode(np.zeros_like(hidden))
    assert np.array_equal(hidden, plain.encode(np.ones((1, 11), np.int64)))


# -- padding --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(position_biased_input=True)])
def test_padding_changes_nothing_at_the_tokens(options):
    """Right padding leaves every token's logits as without it; padded positions' embeddings are zero."""
    model, _ = pair(**options)
    model.eval()
    rec = model.start_recording()
    ids = np.array([[3, 5, 7, 2]])
    alone = model.forward(ids)[0]
    pad = model.cfg.pad_token_id
    padded = model.forward(np.array([[3, 5, 7, 2, pad, pad]]), attention_mask=np.array([[1, 1, 1, 1, 0, 0]]))[0]
    assert_close(padded.mlm_logits[:, :4], alone.mlm_logits, what="token logits")
    assert np.all(rec["embeddings.out@2"][:, 4:] == 0)
    probs = rec["layers.0.attention.probs@2"]  # a padding query sees no key: a uniform row
    assert_close(probs[0, :, 4], np.full((2, 6), 1 / 6), what="padding rows")
    assert np.all(probs[0, :, :4, 4:] == 0)
    unmasked = model.forward(np.array([[3, 5, 7, 2, pad, pad]]))[0]  # the mask is not inert
    assert not np.allclose(unmasked.mlm_logits[:, :4], alone.mlm_logits)


def test_the_options_move_the_loss():
    model, _ = pair(type_vocab_size=2)
    ids, types, mask, labels = batch(model.cfg)
    base = model.forward(ids, types, mask, labels)[1]
    assert model.forward(ids, None, mask, labels)[1] != base
    assert model.forward(ids, types, None, labels)[1] != base
    for change in (dict(pos_att_type=("c2p",)), dict(pos_att_type=("p2c",)), dict(share_att_key=False),
                   dict(norm_rel_ebd=False), dict(position_biased_input=True), dict(position_buckets=None)):
        assert pair(type_vocab_size=2, **change)[0].forward(ids, types, mask, labels)[1] != base, change


def test_the_word_pad_row_gets_only_the_decoders_gradient():
    model, _ = pair(pad_token_id=1)
    rec = model.start_recording()
    ids, types, mask, labels = batch(model.cfg)
    ids[0, 2] = 1
    model.forward(ids, types, mask, labels)
    model.backward()
    assert np.all(rec["embeddings.word_embeddings.dW"][1] == 0)
    assert np.any(model.embeddings.word_embeddings.weight.grad[1] != 0)


# -- the divergence finder ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(dropout=0.2), dict(share_att_key=False, pos_att_type=("p2c",)),
                                     dict(emd_layers=2, dropout=0.2)])
def test_recordings_agree_everywhere(options):
    model, twin = pair(**options)
    ours, theirs = record_both(model, twin, batch(model.cfg))
    assert divergence(ours, theirs) is None
    shared = set(ours) & set(theirs)
    assert {"embeddings.out", "layers.1.attention.probs", "layers.0.dx", "dmlm_logits", "mlm_head.act",
            "drel", "rel_embeddings.dW", "layers.0.attention.dq_r", "rel_norm.dweight",
            "layers.0.output_norm.dx"} <= shared
    if model.cfg.emd_layers:  # every decoder call of the last layer, forward and backward
        assert {"layers.1.out@3", "layers.1.attention.probs@3", "layers.1.dx@2", "layers.1.attention.dq_r@2",
                "emd_position_embeddings.dW"} <= shared


@pytest.mark.parametrize("where, options, expected", [
    ("layers.1.attention.value_proj.weight", dict(), "layers.1.attention.value_proj.out"),
    ("rel_norm.weight", dict(), "rel_norm.out"),
    ("rel_embeddings.weight", dict(norm_rel_ebd=False), "layers.0.attention.probs"),
    ("layers.0.attention.pos_query_proj.weight", dict(share_att_key=False), "layers.0.attention.probs"),
    ("mlm_head.layer_norm.bias", dict(), "mlm_head.layer_norm.out"),
])
def test_divergence_finder_names_a_planted_forward_error(where, options, expected):
    model, twin = pair(**options)
    found = divergence_after_planting(model, twin, batch(model.cfg), where)
    assert found is not None and found.name == expected, found


def test_divergence_finder_names_a_planted_backward_error(monkeypatch):
    """A wrong relative-row gradient in one layer is found there, after a forward that agrees."""
    model, twin = pair()
    import npformer.models.deberta as mod

    original = mod.disentangled_attention_backward
    calls = []

    def wrong(dout, cache):
        grads = list(original(dout, cache))
        calls.append(1)
        if len(calls) == 1:  # the last layer's backward runs first
            grads[4] = grads[4] * 1.001  # dk_r
        return tuple(grads)

    monkeypatch.setattr(mod, "disentangled_attention_backward", wrong)
    found = divergence(*record_both(model, twin, batch(model.cfg)))
    assert found is not None and found.name == "layers.1.attention.dk_r", found


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", 2.0), ("max_position", -1), ("type_vocab_size", -1), ("n_layer", True),
    ("n_head", 0), ("n_head", 5), ("d_model", None), ("d_ff", 0), ("dropout", 1.0), ("dropout", "0.1"),
    ("layer_norm_eps", -1e-7), ("layer_norm_eps", float("nan")), ("pad_token_id", 13), ("pad_token_id", -1),
    ("position_biased_input", 1), ("share_att_key", None), ("norm_rel_ebd", "layer_norm"),
    ("position_buckets", 1), ("position_buckets", 0), ("position_buckets", 4.0), ("max_relative_positions", 3),
    ("pos_att_type", "c2p"), ("pos_att_type", ("c2p", "c2p")), ("pos_att_type", ("p2p",)),
    ("dtype", "float16"), ("dtype", np.float32), ("emd_layers", -1), ("emd_layers", True), ("emd_layers", 2.0),
    ("emd_layers", "2"), ("emd_layers", None), ("emd_layers", MAX_EMD_LAYERS + 1),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: DebertaConfig(**{**TINY, field: value}), "DebertaConfig", field)


def test_config_refuses_a_bad_span_without_buckets():
    expect_rejected(lambda: DebertaConfig(**{**TINY, "position_buckets": None, "max_relative_positions": 0}),
                    "DebertaConfig", "max_relative_positions")


@given(cfg=configs())
def test_config_round_trips(cfg):
    assert DebertaConfig(**cfg.to_dict()) == cfg
    assert cfg.att_span == (cfg.max_relative_positions if cfg.position_buckets is None else cfg.position_buckets)
    assert Deberta(cfg).rel_embeddings.weight.shape == (2 * cfg.att_span, cfg.d_model)


def test_model_refuses_a_bad_config_or_seed():
    expect_rejected(lambda: Deberta(dict(TINY)), "Deberta", "cfg")
    expect_rejected(lambda: Deberta(DebertaConfig(**TINY), seed=-1), "Deberta", "seed")


# -- inputs ---------------------------------------------------------------------------------------------
def test_forward_refuses_bad_inputs_by_name():
    model = Deberta(DebertaConfig(**TINY, type_vocab_size=2, position_biased_input=True))
    ids = np.ones((2, 4), np.int64)
    for call, arg in bad_encoder_inputs(model, ids):
        expect_rejected(call, "Deberta.forward", arg)
    assert pending(model) == 0  # refused before any work
    plain = Deberta(DebertaConfig(**TINY))
    expect_rejected(lambda: plain.forward(ids, ids * 0), "Deberta.forward", "token_type_ids")
    assert plain.forward(np.ones((1, 40), np.int64))[0].mlm_logits.shape == (1, 40, 13)  # no absolute table


BAD_KINDS = bad_kinds("mlm_labels")


@given(arg=st.sampled_from(sorted(BAD_KINDS)), data=st.data())
def test_forward_refuses_generated_bad_arguments(arg, data):
    kind = data.draw(st.sampled_from(BAD_KINDS[arg]))
    model = Deberta(DebertaConfig(**TINY, type_vocab_size=2))
    ids = np.random.default_rng(0).integers(0, 2, (2, 5))
    good = dict(ids=ids, token_type_ids=ids, attention_mask=np.ones_like(ids), mlm_labels=ids)
    assert_refuses_corrupted(model, good, arg, kind, "Deberta.forward")


def test_backward_needs_a_loss_and_eval_keeps_no_cache():
    model = Deberta(DebertaConfig(**TINY))
    ids = np.ones((1, 3), np.int64)
    assert_backward_needs_a_loss(model, ids)
    assert_eval_keeps_no_cache(model, ids, DebertaOutputs)


# -- names, dtypes, init --------------------------------------------------------------------------------
def test_state_dict_names():
    model = Deberta(DebertaConfig(**{**TINY, "n_layer": 1}))
    layer = layer_names("layers.0", projections=("query_proj", "key_proj", "value_proj", "o_proj"))
    emb = {"embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    rel = {"rel_embeddings.weight", "rel_norm.weight", "rel_norm.bias"}
    head = {"mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.layer_norm.weight",
            "mlm_head.layer_norm.bias", "mlm_head.bias"}
    assert set(model.state_dict()) == layer | emb | rel | head
    other = Deberta(DebertaConfig(**{**TINY, "n_layer": 1}, share_att_key=False, norm_rel_ebd=False,
                                  position_biased_input=True, type_vocab_size=2))
    extra = {f"layers.0.attention.pos_{p}_proj.{w}" for p in ("key", "query") for w in ("weight", "bias")}
    extra |= {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"}
    assert set(other.state_dict()) == (layer | emb | rel | head | extra) - {"rel_norm.weight", "rel_norm.bias"}


def test_init_and_astype():
    assert_init_and_astype(Deberta(DebertaConfig(n_layer=2), seed=3), tol=0.001)


def test_the_model_imports_no_other_model():
    imported = imported_modules(deberta_module)
    assert not any(m.startswith("..models") for m in imported), imported
    assert "..ops.disentangled_attention" in imported


@pytest.mark.parametrize("emd_layers", [0, 2])
def test_a_few_adamw_steps_fit_a_fixed_batch(emd_layers):
    model = Deberta(DebertaConfig(**{**TINY, "dropout": 0.1, "emd_layers": emd_layers}), seed=1)
    losses = adamw_losses(model, batch(model.cfg, seed=3))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
