"""ALBERT against its torch twin: loss, every gradient (the shared layer's as the sum over its applications),
recordings and the divergence finder, config and input checks, parameter names."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.albert as albert_module
from kernels.twins.albert import TwinAlbert
from npformer.models.albert import Albert, AlbertConfig, AlbertOutputs
from tests.badinput import expect_rejected
from tests.models.encoders import (adamw_losses, assert_backward_needs_a_loss, assert_eval_keeps_no_cache,
                                   assert_float32_matches_twin, assert_grads_match, assert_init_and_astype,
                                   assert_layout_changes_nothing, assert_refuses_corrupted, bad_encoder_inputs,
                                   bad_kinds, classifier_label_inputs, divergence, divergence_after_planting,
                                   imported_modules, layer_names, mlm_labels, model_and_twin, padded_inputs, pending,
                                   randomise, record_both, run_both, twin_of)
from tests.strategies import layouts
from tests.tolerances import MODEL_RTOL, assert_close

TINY = dict(vocab_size=13, max_position=10, embedding_size=4, n_layer=3, n_head=2, d_model=6, d_ff=7, dropout=0.0)


def pair(seed=0, **overrides):
    return model_and_twin(AlbertConfig, Albert, TwinAlbert, TINY, seed, **overrides)


def batch(cfg, B=3, T=None, seed=1, pad_rows=True, sop=True):
    """ids, token types, a right-padding attention mask (every row keeps a token), MLM labels (-100 where not
    masked, at least one counted), SOP labels."""
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    ids, types, mask = padded_inputs(rng, cfg, B, T, pad_rows)
    labels = mlm_labels(rng, cfg, B, T)
    sop_labels = rng.integers(0, 2, B) if sop else None
    return ids, types, mask, labels, sop_labels


@st.composite
def configs(draw):
    """A small ALBERT: the embedding width below, at or above the hidden width, several depths of the one
    layer, any number of token types, a frozen pad row or none, dropout or not."""
    n_head = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([2, 5, 13]))
    return AlbertConfig(
        vocab_size=vocab, max_position=draw(st.integers(1, 7)), type_vocab_size=draw(st.integers(0, 3)),
        embedding_size=draw(st.integers(3, 7)), n_layer=draw(st.integers(1, 4)), n_head=n_head,
        d_model=n_head * draw(st.integers(-(-3 // n_head), 3)), d_ff=draw(st.integers(1, 9)),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])), layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.1])),
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))), dtype="float64")


@settings(max_examples=20, deadline=None)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    model = randomise(Albert(cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_of(model, TwinAlbert)
    args = batch(cfg, B=data.draw(st.integers(1, 3)), T=data.draw(st.integers(1, cfg.block_size)),
                 seed=data.draw(st.integers(0, 9)), pad_rows=data.draw(st.booleans()), sop=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        args = args[:3] + (None, np.zeros(args[0].shape[0], np.int64))  # SOP alone
    outputs, loss, twin_loss, twin_grads = run_both(model, twin, args)
    assert outputs.mlm_logits.shape == args[0].shape + (cfg.vocab_size,)
    assert outputs.sop_logits.shape == (args[0].shape[0], 2)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    assert_grads_match(model, twin_grads)


@given(n_layer=st.integers(1, 5), seed=st.integers(0, 20))
def test_the_shared_layer_gets_the_sum_over_its_applications(n_layer, seed):
    """Each application's gradient, recorded on both sides (npformer per backward call, the twin on its own
    copies of the weights), matches the twin's; their sum is the shared parameter's gradient."""
    model, twin = pair(seed=seed, n_layer=n_layer)
    ours, theirs = record_both(model, twin, batch(model.cfg, seed=seed))
    names = [n for n in ours if n.startswith("layer.mlp.fc.dW")]
    assert len(names) == n_layer
    for name, prm in (("layer.mlp.fc.dW", model.layer.mlp.fc.weight),
                      ("layer.attention_norm.dweight", model.layer.attention_norm.weight),
                      ("layer.attention.v_proj.db", model.layer.attention.v_proj.bias)):
        calls = [name] + [f"{name}@{i}" for i in range(2, n_layer + 1)]
        for call in calls:
            assert_close(ours[call], theirs[call], rtol=MODEL_RTOL, what=call)
        assert_close(prm.grad, np.sum([theirs[c] for c in calls], axis=0), rtol=MODEL_RTOL, what=f"sum {name}")
        if n_layer > 1:  # the applications differ: no one of them is the whole
            assert not np.allclose(prm.grad, ours[name])


def test_depth_changes_the_function_but_not_the_parameters():
    shallow, deep = pair(n_layer=1)[0], pair(n_layer=4)[0]
    assert shallow.state_dict().keys() == deep.state_dict().keys()
    for name, value in shallow.state_dict().items():
        np.testing.assert_array_equal(value, deep.state_dict()[name], err_msg=name)
    ids = batch(shallow.cfg)[0]
    assert not np.allclose(shallow.forward(ids)[0].mlm_logits, deep.forward(ids)[0].mlm_logits)


@pytest.mark.parametrize("options", [dict(), dict(type_vocab_size=0, pad_token_id=None, embedding_size=6)])
def test_float32_matches_the_twin(options):
    model, twin = pair(**options)
    assert_float32_matches_twin(model, twin, batch(model.cfg))


def test_padding_changes_nothing_at_the_tokens():
    model, _ = pair()
    model.eval()
    ids = np.array([[3, 5, 7, 2]])
    alone = model.forward(ids)[0]
    padded = model.forward(np.array([[3, 5, 7, 2, 0, 0]]), attention_mask=np.array([[1, 1, 1, 1, 0, 0]]))[0]
    assert_close(padded.mlm_logits[:, :4], alone.mlm_logits, what="token logits")
    assert_close(padded.sop_logits, alone.sop_logits, what="SOP logits")
    unmasked = model.forward(np.array([[3, 5, 7, 2, 0, 0]]))[0]
    assert not np.allclose(unmasked.mlm_logits[:, :4], alone.mlm_logits)


@given(layout=layouts(), which=st.sampled_from(["ids", "token_type_ids", "attention_mask", "mlm_labels"]))
def test_inputs_in_any_memory_layout_give_the_same_loss_and_gradients(layout, which):
    model, _ = pair(n_layer=2)
    index = ["ids", "token_type_ids", "attention_mask", "mlm_labels"].index(which)
    assert_layout_changes_nothing(model, batch(model.cfg), index, layout)


# -- the divergence finder ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(dropout=0.2), dict(embedding_size=6, n_layer=1)])
def test_recordings_agree_everywhere(options):
    model, twin = pair(**options)
    ours, theirs = record_both(model, twin, batch(model.cfg))
    assert divergence(ours, theirs) is None
    shared = set(ours) & set(theirs)
    n = model.cfg.n_layer
    assert {"embeddings.out", "embedding_hidden_mapping_in.out", "layer.attention.probs", "layer.dx",
            "dmlm_logits", "dsop_logits", "mlm_head.act", "layer.mlp.fc.dW", "embeddings.position_embeddings.dW",
            f"layer.out@{n}" if n > 1 else "layer.out", "embedding_hidden_mapping_in.dW"} <= shared


@pytest.mark.parametrize("where, expected", [
    ("layer.attention.v_proj.weight", "layer.attention.v_proj.out"),
    ("embedding_hidden_mapping_in.bias", "embedding_hidden_mapping_in.out"),
    ("sop_classifier.weight", "sop_classifier.out"),
])
def test_divergence_finder_names_a_planted_forward_error(where, expected):
    model, twin = pair()
    found = divergence_after_planting(model, twin, batch(model.cfg), where)
    assert found is not None and found.name == expected, found


@pytest.mark.parametrize("wrong_call, expected", [(1, "layer.attention_norm.dweight"),
                                                  (2, "layer.attention_norm.dweight@2")])
def test_divergence_finder_names_the_application_of_a_planted_backward_error(monkeypatch, wrong_call, expected):
    """A wrong MLP gradient in one backward call of the shared layer is found at that call (calls count from the
    last application, the first to run backward)."""
    model, twin = pair()
    original = type(model.layer.mlp).backward
    calls = []

    def wrong(self, dy):
        calls.append(1)
        dx = original(self, dy)
        return dx * 1.001 if self is model.layer.mlp and len(calls) == wrong_call else dx

    monkeypatch.setattr(type(model.layer.mlp), "backward", wrong)
    found = divergence(*record_both(model, twin, batch(model.cfg)))
    assert found is not None and found.name == expected, found


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", 2.0), ("max_position", -1), ("type_vocab_size", -1),
    ("embedding_size", 0), ("embedding_size", 1.5), ("n_layer", True), ("n_layer", 0), ("n_head", 5),
    ("d_model", None), ("d_ff", 0), ("dropout", 1.0), ("dropout", "0.1"), ("layer_norm_eps", -1e-12),
    ("layer_norm_eps", float("nan")), ("pad_token_id", 65), ("pad_token_id", -1), ("dtype", "float16"),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: AlbertConfig(**{field: value}), "AlbertConfig", field)


@given(cfg=configs())
def test_config_round_trips(cfg):
    assert AlbertConfig(**cfg.to_dict()) == cfg and cfg.block_size == cfg.max_position


def test_model_refuses_a_bad_config_or_seed():
    expect_rejected(lambda: Albert(dict(TINY)), "Albert", "cfg")
    expect_rejected(lambda: Albert(AlbertConfig(**TINY), seed=-1), "Albert", "seed")


# -- inputs ---------------------------------------------------------------------------------------------
def test_forward_refuses_bad_inputs_by_name():
    model = Albert(AlbertConfig(**TINY))
    ids = np.ones((2, 4), np.int64)
    for call, arg in bad_encoder_inputs(model, ids) + classifier_label_inputs(model, ids, "sop_labels"):
        expect_rejected(call, "Albert.forward", arg)
    assert pending(model) == 0  # refused before any work


BAD_KINDS = bad_kinds("mlm_labels", "sop_labels")


@given(arg=st.sampled_from(sorted(BAD_KINDS)), data=st.data())
def test_forward_refuses_generated_bad_arguments(arg, data):
    kind = data.draw(st.sampled_from(BAD_KINDS[arg]))
    model = Albert(AlbertConfig(**TINY))
    ids = np.random.default_rng(0).integers(0, 2, (2, 5))
    good = dict(ids=ids, token_type_ids=ids, attention_mask=np.ones_like(ids), mlm_labels=ids, sop_labels=ids[:, 0])
    assert_refuses_corrupted(model, good, arg, kind, "Albert.forward")


def test_backward_needs_a_loss_and_eval_keeps_no_cache():
    model = Albert(AlbertConfig(**TINY))
    ids = np.ones((1, 3), np.int64)
    assert_backward_needs_a_loss(model, ids)
    assert model.layer.pending_backwards == TINY["n_layer"]  # one cache per application
    assert_eval_keeps_no_cache(model, ids, AlbertOutputs)


def test_a_head_without_labels_gets_no_gradient():
    model, _ = pair()
    ids, types, mask, labels, sop = batch(model.cfg)
    model.forward(ids, types, mask, labels)
    model.backward()
    assert np.all(model.sop_classifier.weight.grad == 0) and np.all(model.pooler.dense.weight.grad == 0)
    model.zero_grad()
    model.forward(ids, types, mask, None, sop)
    model.backward()
    assert np.all(model.mlm_head.bias.grad == 0) and np.any(model.pooler.dense.weight.grad != 0)
    assert pending(model) == 0


# -- names, dtypes, init ----------------------------------------------------------------------------------
def test_state_dict_names():
    model = Albert(AlbertConfig(**TINY))
    layer = layer_names("layer")
    emb = {f"embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")}
    emb |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "embedding_hidden_mapping_in.weight",
            "embedding_hidden_mapping_in.bias"}
    heads = {"mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.layer_norm.weight",
             "mlm_head.layer_norm.bias", "mlm_head.bias", "pooler.dense.weight", "pooler.dense.bias",
             "sop_classifier.weight", "sop_classifier.bias"}
    assert set(model.state_dict()) == layer | emb | heads
    shapes = model.state_dict()
    assert shapes["embeddings.word_embeddings.weight"].shape == (13, 4)
    assert shapes["embedding_hidden_mapping_in.weight"].shape == (6, 4)
    assert shapes["mlm_head.dense.weight"].shape == (4, 6)


def test_init_and_astype():
    assert_init_and_astype(Albert(AlbertConfig(n_layer=2), seed=3), tol=0.002)


def test_the_model_imports_no_other_model():
    imported = imported_modules(albert_module)
    assert not any(m.startswith("..models") or "bert" in m.replace("albert", "") for m in imported), imported
    assert "..nn.encoder" in imported


def test_a_few_adamw_steps_fit_a_fixed_batch():
    model = Albert(AlbertConfig(**{**TINY, "dropout": 0.1}), seed=1)
    losses = adamw_losses(model, batch(model.cfg, seed=3))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
