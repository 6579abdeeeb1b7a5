"""BERT and RoBERTa against their torch twin: loss, every gradient, recordings, padding, positions, the
shared encoder pieces, config and input checks, parameter names."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.bert as bert_module
from kernels.twins.bert import TwinBert, TwinEncoderLayer, TwinMLMHead, TwinPooler
from npformer.models.bert import Bert, BertConfig, BertOutputs
from npformer.nn.encoder import EncoderEmbeddings, MLMHead, Pooler, PostNormEncoderLayer, roberta_position_ids
from tests.badinput import expect_rejected
from tests.models.encoders import (adamw_losses, assert_backward_needs_a_loss, assert_eval_keeps_no_cache,
                                   assert_float32_matches_twin, assert_grads_match, assert_init_and_astype,
                                   assert_layout_changes_nothing, assert_refuses_corrupted, bad_encoder_inputs,
                                   bad_kinds, classifier_label_inputs, divergence, divergence_after_planting,
                                   imported_modules, layer_names, mlm_labels, model_and_twin, padded_inputs, pending,
                                   randomise, record_both, run_both, twin_of)
from tests.strategies import layouts
from tests.tolerances import MODEL_RTOL, assert_close

TINY = dict(vocab_size=13, max_position=10, n_layer=2, n_head=2, d_model=6, d_ff=7, dropout=0.0)
ROBERTA = dict(type_vocab_size=1, pad_token_id=1, position_padding_idx=1, nsp_head=False)


def pair(seed=0, **overrides):
    return model_and_twin(BertConfig, Bert, TwinBert, TINY, seed, **overrides)


def batch(cfg, B=3, T=None, seed=1, pad_rows=True, nsp=True):
    """ids, token types, an attention mask whose later rows are right-padded (every row keeps a token),
    MLM labels with -100 where not masked, NSP labels where the model has the head."""
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    ids, types, mask = padded_inputs(rng, cfg, B, T, pad_rows)
    labels = mlm_labels(rng, cfg, B, T)
    nsp_labels = rng.integers(0, 2, B) if cfg.nsp_head and nsp else None
    return ids, types, mask, labels, nsp_labels


@st.composite
def configs(draw):
    """A small BERT or RoBERTa: odd sizes, any number of token types (none too), a frozen pad row or none,
    RoBERTa's positions or BERT's, the NSP head or not, dropout or not. d_model >= 3: a LayerNorm over one or two
    features has an output (nearly) independent of its input, and gradients through it are round-off."""
    n_head = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([2, 5, 13]))
    roberta = draw(st.booleans())
    pad = draw(st.one_of(st.none(), st.integers(0, vocab - 1))) if not roberta else draw(st.integers(0, 1))
    max_position = draw(st.integers(1, 8)) + (pad + 1 if roberta else 0)
    return BertConfig(
        vocab_size=vocab, max_position=max_position, type_vocab_size=draw(st.integers(0, 3)),
        n_layer=draw(st.integers(1, 2)), n_head=n_head, d_model=n_head * draw(st.integers(-(-3 // n_head), 3)),
        d_ff=draw(st.integers(1, 9)), dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.1])), pad_token_id=pad,
        position_padding_idx=pad if roberta else None, nsp_head=draw(st.booleans()), dtype="float64")


@settings(max_examples=25, deadline=None)
@given(cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(cfg, data):
    model = randomise(Bert(cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_of(model, TwinBert)
    T = data.draw(st.integers(1, cfg.block_size))
    args = batch(cfg, B=data.draw(st.integers(1, 3)), T=T, seed=data.draw(st.integers(0, 9)),
                 pad_rows=data.draw(st.booleans()), nsp=data.draw(st.booleans()))
    if data.draw(st.booleans()) and args[4] is not None:
        args = args[:3] + (None, args[4])  # NSP alone
    outputs, loss, twin_loss, twin_grads = run_both(model, twin, args)
    assert outputs.mlm_logits.shape == args[0].shape + (cfg.vocab_size,)
    assert (outputs.nsp_logits is None) == (not cfg.nsp_head)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    assert_grads_match(model, twin_grads)


@pytest.mark.parametrize("options", [dict(), ROBERTA, dict(type_vocab_size=0, pad_token_id=None)])
def test_float32_matches_the_twin(options):
    model, twin = pair(**options)
    assert_float32_matches_twin(model, twin, batch(model.cfg))


# -- padding and positions ----------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), ROBERTA])
def test_padding_changes_nothing_at_the_tokens(options):
    """Right padding (masked keys, RoBERTa's pad positions) leaves every token's logits as without it."""
    model, _ = pair(**options)
    model.eval()
    ids = np.array([[3, 5, 7, 2]])
    alone = model.forward(ids)[0]
    pad = model.cfg.pad_token_id
    padded = model.forward(np.array([[3, 5, 7, 2, pad, pad]]), attention_mask=np.array([[1, 1, 1, 1, 0, 0]]))[0]
    assert_close(padded.mlm_logits[:, :4], alone.mlm_logits, what="token logits")
    if model.cfg.nsp_head:
        assert_close(padded.nsp_logits, alone.nsp_logits, what="NSP logits")
    unmasked = model.forward(np.array([[3, 5, 7, 2, pad, pad]]))[0]  # the mask is not inert
    assert not np.allclose(unmasked.mlm_logits[:, :4], alone.mlm_logits)


@given(ids=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=7), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1), padding_idx=st.integers(0, 4))
def test_roberta_positions_count_tokens_from_the_padding_index(ids, padding_idx):
    """p + k for the k-th non-pad token of its row (k = 1, 2, ...), p at a pad: counted here one by one."""
    ids = np.array(ids)
    expected = np.empty_like(ids)
    for b, row in enumerate(ids):
        k = 0
        for t, token in enumerate(row):
            if token == padding_idx:
                expected[b, t] = padding_idx
            else:
                k += 1
                expected[b, t] = padding_idx + k
    np.testing.assert_array_equal(roberta_position_ids(ids, padding_idx), expected)


def test_roberta_positions_reach_the_table_and_its_pad_row_is_frozen():
    model, _ = pair(**ROBERTA)
    rec = model.start_recording()
    ids, _, mask, labels, _ = batch(model.cfg, B=2, T=5)
    ids[0, 1] = 1  # a pad id inside a row: position 1, skipped by the count
    model.forward(ids, None, mask, labels)
    np.testing.assert_array_equal(rec["embeddings.position_ids"], roberta_position_ids(ids, 1))
    model.zero_grad()
    model.backward()
    assert np.all(model.embeddings.position_embeddings.weight.grad[1] == 0)  # the pad position: never trained
    assert np.all(rec["embeddings.word_embeddings.dW"][1] == 0)  # the lookup's part of the pad word row
    assert np.any(model.embeddings.word_embeddings.weight.grad[1] != 0)  # the tied decoder's part remains
    assert model.cfg.block_size == model.cfg.max_position - 2
    expect_rejected(lambda: model.forward(np.full((1, model.cfg.block_size + 1), 3)), "Bert.forward", "ids")


def test_the_options_move_the_loss():
    """Token types, RoBERTa's positions, the attention mask and the NSP head each change the loss."""
    model, _ = pair()
    ids, types, mask, labels, nsp = batch(model.cfg, T=8)
    base = model.forward(ids, types, mask, labels)[1]
    assert model.forward(ids, None, mask, labels)[1] != base
    assert model.forward(ids, types, None, labels)[1] != base
    assert model.forward(ids, types, mask, labels, nsp)[1] > base
    assert pair(position_padding_idx=0)[0].forward(ids, types, mask, labels)[1] != base


@given(layout=layouts(), which=st.sampled_from(["ids", "token_type_ids", "attention_mask", "mlm_labels"]),
       roberta=st.booleans())
def test_inputs_in_any_memory_layout_give_the_same_loss_and_gradients(layout, which, roberta):
    """Integer inputs as Fortran-ordered, transposed, strided, reversed or read-only views: the same numbers."""
    model, _ = pair(**(ROBERTA if roberta else dict(type_vocab_size=3)))
    index = ["ids", "token_type_ids", "attention_mask", "mlm_labels"].index(which)
    assert_layout_changes_nothing(model, batch(model.cfg), index, layout)  # RoBERTa has no token types


# -- the divergence finder ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(dropout=0.2), ROBERTA])
def test_recordings_agree_everywhere(options):
    model, twin = pair(**options)
    ours, theirs = record_both(model, twin, batch(model.cfg))
    assert divergence(ours, theirs) is None
    shared = set(ours) & set(theirs)
    assert {"embeddings.out", "layers.1.attention.probs", "layers.0.dx", "dmlm_logits", "mlm_head.act",
            "embeddings.position_embeddings.dW", "layers.0.output_norm.dx"} <= shared
    assert ("dnsp_logits" in shared) == model.cfg.nsp_head


@pytest.mark.parametrize("where, expected", [
    ("layers.1.attention.v_proj.weight", "layers.1.attention.v_proj.out"),
    ("mlm_head.layer_norm.bias", "mlm_head.layer_norm.out"),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type_embeddings.out"),
])
def test_divergence_finder_names_a_planted_forward_error(where, expected):
    model, twin = pair()
    found = divergence_after_planting(model, twin, batch(model.cfg), where)
    assert found is not None and found.name == expected, found


def test_divergence_finder_names_a_planted_backward_error(monkeypatch):
    """A wrong gradient in one layer's backward is found at that layer, after a forward that agrees."""
    model, twin = pair()
    layer = model.layers[0]
    original = type(layer.mlp).backward

    def wrong(self, dy):
        return original(self, dy) * 1.001 if self is layer.mlp else original(self, dy)

    monkeypatch.setattr(type(layer.mlp), "backward", wrong)
    found = divergence(*record_both(model, twin, batch(model.cfg)))
    assert found is not None and found.name == "layers.0.attention_norm.dweight", found


# -- the shared pieces, reused (ALBERT shares a layer; its MLM head narrows to the embedding width) ----
def _to_twin(npf_module, twin_module):
    with torch.no_grad():
        for name, prm in twin_module.named_parameters():
            prm.copy_(torch.from_numpy(dict(npf_module.named_parameters())[name].data))


@given(seed=st.integers(0, 50), T=st.integers(1, 5), repeats=st.integers(1, 3))
def test_a_shared_layer_applied_several_times_accumulates_torchs_gradient(seed, T, repeats):
    rng = np.random.default_rng(seed)
    layer = randomise(PostNormEncoderLayer(6, 3, 5, layer_norm_eps=1e-5, rng=rng, dtype=np.float64), seed)
    twin = TwinEncoderLayer(dict(d_model=6, n_head=3, d_ff=5, layer_norm_eps=1e-5, dropout=0.0)).double()
    _to_twin(layer, twin)
    x = rng.standard_normal((2, T, 6))
    pad = np.zeros((2, T), bool)
    pad[1, T // 2 + 1:] = True
    h = x
    for _ in range(repeats):
        h = layer.forward(h, key_padding_mask=pad)
    dout = rng.standard_normal(h.shape)
    d = dout
    for _ in range(repeats):
        d = layer.backward(d)
    xt = torch.from_numpy(x).requires_grad_()
    ht = xt
    for _ in range(repeats):
        ht = twin(ht, torch.from_numpy(pad), None, "")
    (ht * torch.from_numpy(dout)).sum().backward()
    assert_close(h, ht.detach().numpy(), rtol=MODEL_RTOL, what="out")
    assert_close(d, xt.grad.numpy(), rtol=MODEL_RTOL, what="dx")
    for name, prm in twin.named_parameters():
        scale = np.abs(dict(twin.named_parameters())[name.replace("k_proj", "v_proj")].grad.numpy()).max()
        assert_close(dict(layer.named_parameters())[name].grad, prm.grad.numpy(), rtol=MODEL_RTOL,
                     scale=scale if "k_proj.bias" in name else None, what=name)


@given(seed=st.integers(0, 50), embed_dim=st.integers(1, 5), shape=st.sampled_from([(1, 1), (2, 3), (3, 1)]))
def test_mlm_head_and_pooler_gradients_equal_torch(seed, embed_dim, shape):
    """The MLM head narrowing D = 4 to an embedding width E (ALBERT's), tied to a (V, E) table, and the pooler."""
    rng = np.random.default_rng(seed)
    head = randomise(MLMHead(4, 7, embed_dim, layer_norm_eps=1e-5, rng=rng, dtype=np.float64), seed)
    pooler = randomise(Pooler(4, rng=rng, dtype=np.float64), seed + 1)
    table = rng.standard_normal((7, embed_dim))
    h = rng.standard_normal(shape + (4,))
    logits, pooled = head.forward(h, table), pooler.forward(h)
    dlogits, dpooled = rng.standard_normal(logits.shape), rng.standard_normal(pooled.shape)
    dh_head, dtable = head.backward(dlogits)
    dh = dh_head + pooler.backward(dpooled)

    c = dict(d_model=4, layer_norm_eps=1e-5, vocab_size=7)
    t_head, t_pooler = TwinMLMHead(c).double(), TwinPooler(4).double()
    t_head.dense = torch.nn.Linear(4, embed_dim).double()
    t_head.layer_norm.weight = torch.nn.Parameter(torch.ones(embed_dim, dtype=torch.float64))
    t_head.layer_norm.bias = torch.nn.Parameter(torch.zeros(embed_dim, dtype=torch.float64))
    _to_twin(head, t_head)
    _to_twin(pooler, t_pooler)
    ht, tt = torch.from_numpy(h).requires_grad_(), torch.from_numpy(table).requires_grad_()
    lt, pt = t_head(ht, tt), t_pooler(ht)
    ((lt * torch.from_numpy(dlogits)).sum() + (pt * torch.from_numpy(dpooled)).sum()).backward()
    assert_close(logits, lt.detach().numpy(), rtol=MODEL_RTOL, what="logits")
    assert_close(pooled, pt.detach().numpy(), rtol=MODEL_RTOL, what="pooled")
    assert_close(dh, ht.grad.numpy(), rtol=MODEL_RTOL, what="dh")
    assert_close(dtable, tt.grad.numpy(), rtol=MODEL_RTOL, what="dtable")
    for module, twin in ((head, t_head), (pooler, t_pooler)):
        for name, prm in twin.named_parameters():
            assert_close(dict(module.named_parameters())[name].grad, prm.grad.numpy(), rtol=MODEL_RTOL, what=name)


def test_embeddings_with_their_own_width_and_no_token_types():
    emb = EncoderEmbeddings(11, 9, 3, type_vocab_size=0, pad_token_id=4, rng=np.random.default_rng(0),
                            dtype=np.float64)
    assert sorted(emb.state_dict()) == ["LayerNorm.bias", "LayerNorm.weight", "position_embeddings.weight",
                                        "word_embeddings.weight"]
    assert np.all(emb.word_embeddings.weight.data[4] == 0)  # the frozen row starts at zero
    out = emb.forward(np.array([[4, 1, 4]]))
    assert out.shape == (1, 3, 3)
    emb.backward(np.random.default_rng(1).standard_normal(out.shape))
    assert np.all(emb.word_embeddings.weight.grad[4] == 0) and np.any(emb.word_embeddings.weight.grad[1] != 0)
    expect_rejected(lambda: emb.forward(np.array([[1]]), np.array([[0]])), "EncoderEmbeddings.forward",
                    "token_type_ids")


# -- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("vocab_size", 2.0), ("max_position", -1), ("type_vocab_size", -1),
    ("type_vocab_size", 1.5), ("n_layer", True), ("n_head", 0), ("n_head", 5), ("d_model", None), ("d_ff", 0),
    ("dropout", 1.0), ("dropout", -0.1), ("dropout", "0.1"), ("layer_norm_eps", -1e-12),
    ("layer_norm_eps", float("nan")), ("pad_token_id", 65), ("pad_token_id", -1), ("pad_token_id", 1.0),
    ("position_padding_idx", 127), ("position_padding_idx", -1), ("nsp_head", 1), ("nsp_head", None),
    ("dtype", "float16"), ("dtype", np.float32),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: BertConfig(**{field: value}), "BertConfig", field)


@given(cfg=configs())
def test_config_round_trips(cfg):
    assert BertConfig(**cfg.to_dict()) == cfg
    assert cfg.block_size == cfg.max_position - (0 if cfg.position_padding_idx is None else
                                                 cfg.position_padding_idx + 1)


def test_model_refuses_a_bad_config_or_seed():
    expect_rejected(lambda: Bert(dict(TINY)), "Bert", "cfg")
    expect_rejected(lambda: Bert(BertConfig(**TINY), seed=-1), "Bert", "seed")


# -- inputs ---------------------------------------------------------------------------------------------
def test_forward_refuses_bad_inputs_by_name():
    model = Bert(BertConfig(**TINY))
    ids = np.ones((2, 4), np.int64)
    for call, arg in bad_encoder_inputs(model, ids) + classifier_label_inputs(model, ids, "nsp_labels"):
        expect_rejected(call, "Bert.forward", arg)
    assert pending(model) == 0  # refused before any work
    roberta = Bert(BertConfig(**TINY, type_vocab_size=0, nsp_head=False))
    expect_rejected(lambda: roberta.forward(ids, ids * 0), "Bert.forward", "token_type_ids")
    expect_rejected(lambda: roberta.forward(ids, nsp_labels=np.array([0, 1])), "Bert.forward", "nsp_labels")


BAD_KINDS = bad_kinds("mlm_labels", "nsp_labels")


@given(arg=st.sampled_from(sorted(BAD_KINDS)), data=st.data())
def test_forward_refuses_generated_bad_arguments(arg, data):
    kind = data.draw(st.sampled_from(BAD_KINDS[arg]))
    model = Bert(BertConfig(**TINY))
    ids = np.random.default_rng(0).integers(0, 2, (2, 5))
    good = dict(ids=ids, token_type_ids=ids, attention_mask=np.ones_like(ids), mlm_labels=ids,
                nsp_labels=ids[:, 0])
    assert_refuses_corrupted(model, good, arg, kind, "Bert.forward")


def test_backward_needs_a_loss_and_eval_keeps_no_cache():
    model = Bert(BertConfig(**TINY))
    ids = np.ones((1, 3), np.int64)
    assert_backward_needs_a_loss(model, ids)
    assert_eval_keeps_no_cache(model, ids, BertOutputs)


def test_a_head_without_labels_gets_no_gradient():
    model, _ = pair()
    ids, types, mask, labels, nsp = batch(model.cfg)
    model.forward(ids, types, mask, labels)  # MLM only: the NSP head ran but is not in the loss
    model.backward()
    assert np.all(model.seq_relationship.weight.grad == 0) and np.all(model.pooler.dense.weight.grad == 0)
    model.zero_grad()
    model.forward(ids, types, mask, None, nsp)  # NSP only
    model.backward()
    assert np.all(model.mlm_head.bias.grad == 0) and np.any(model.pooler.dense.weight.grad != 0)
    assert pending(model) == 0


# -- names, dtypes, init ----------------------------------------------------------------------------------
def test_state_dict_names():
    model = Bert(BertConfig(**{**TINY, "n_layer": 1}))
    layer = layer_names("layers.0")
    emb = {f"embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")}
    emb |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    heads = {"mlm_head.dense.weight", "mlm_head.dense.bias", "mlm_head.layer_norm.weight",
             "mlm_head.layer_norm.bias", "mlm_head.bias"}
    nsp = {"pooler.dense.weight", "pooler.dense.bias", "seq_relationship.weight", "seq_relationship.bias"}
    assert set(model.state_dict()) == layer | emb | heads | nsp
    roberta = Bert(BertConfig(**{**TINY, "n_layer": 1}, type_vocab_size=0, nsp_head=False))
    assert set(roberta.state_dict()) == layer | heads | emb - {"embeddings.token_type_embeddings.weight"}


def test_init_and_astype():
    assert_init_and_astype(Bert(BertConfig(n_layer=2), seed=3), tol=0.001)


def test_the_model_imports_no_other_model():
    imported = imported_modules(bert_module)
    assert not any(m.startswith("..models") or "gpt" in m or "llama" in m for m in imported), imported
    assert "..nn.encoder" in imported


def test_a_few_adamw_steps_fit_a_fixed_batch():
    """Training end to end: masked tokens and the NSP label of one batch are learned (loss falls by half)."""
    model = Bert(BertConfig(**{**TINY, "dropout": 0.1}), seed=1)
    losses = adamw_losses(model, batch(model.cfg, seed=3))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
