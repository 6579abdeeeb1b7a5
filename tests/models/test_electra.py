"""ELECTRA against its torch twins: the generator and the discriminator alone, the pair sharing embeddings
(replaced-token detection), the binary cross entropy, the sampling, config and input checks, names."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.models.electra as electra_module
from kernels.twins.electra import TwinElectraDiscriminator, TwinElectraGenerator, TwinElectraPretraining
from npformer.models.electra import (IGNORE_INDEX, RTD_WEIGHT, ElectraConfig, ElectraDiscriminator,
                                     ElectraGenerator, ElectraPretraining, bce_with_logits_backward,
                                     bce_with_logits_forward, sample_from_logits)
from tests.badinput import expect_rejected
from tests.models.encoders import (assert_float32_matches_twin, assert_grads_match, assert_layout_changes_nothing,
                                   assert_refuses_corrupted, bad_kinds, divergence, divergence_after_planting,
                                   imported_modules, mlm_labels, model_and_twin, padded_inputs, pending, randomise,
                                   record_both, run_both, to_torch, twin_of)
from tests.strategies import layouts
from tests.tolerances import FD_RTOL, MODEL_RTOL, RTOL, assert_close

TINY = dict(vocab_size=13, max_position=10, embedding_size=4, n_layer=2, n_head=2, d_model=6, d_ff=7, dropout=0.0)
KINDS = {"generator": (ElectraGenerator, TwinElectraGenerator),
         "discriminator": (ElectraDiscriminator, TwinElectraDiscriminator)}


def pair(kind, seed=0, **overrides):
    return model_and_twin(ElectraConfig, KINDS[kind][0], KINDS[kind][1], TINY, seed, **overrides)


def batch(cfg, kind, B=3, T=None, seed=1, pad_rows=True):
    """ids, token types, a right-padding mask, and MLM labels (generator) or 0/1 replaced labels (discriminator)."""
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    ids, types, mask = padded_inputs(rng, cfg, B, T, pad_rows)
    if kind == "generator":
        labels = mlm_labels(rng, cfg, B, T)
    else:
        labels = (rng.random((B, T)) < 0.3).astype(np.int64)
    return ids, types, mask, labels


@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 3))
    vocab = draw(st.sampled_from([2, 5, 13]))
    d_model = n_head * draw(st.integers(-(-3 // n_head), 3))
    return ElectraConfig(
        vocab_size=vocab, max_position=draw(st.integers(1, 7)), type_vocab_size=draw(st.integers(0, 3)),
        embedding_size=draw(st.sampled_from([d_model, 3, 5])), n_layer=draw(st.integers(1, 2)), n_head=n_head,
        d_model=d_model, d_ff=draw(st.integers(1, 9)), dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 0.1])),
        pad_token_id=draw(st.one_of(st.none(), st.integers(0, vocab - 1))), dtype="float64")


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), cfg=configs(), data=st.data())
def test_loss_and_every_gradient_match_the_twin(kind, cfg, data):
    model = randomise(KINDS[kind][0](cfg, seed=data.draw(st.integers(0, 3))))
    twin = twin_of(model, KINDS[kind][1])
    args = batch(cfg, kind, B=data.draw(st.integers(1, 3)), T=data.draw(st.integers(1, cfg.block_size)),
                 seed=data.draw(st.integers(0, 9)), pad_rows=data.draw(st.booleans()))
    if data.draw(st.booleans()):
        args = (args[0], args[1], None, args[3])  # no attention mask: every token counts
    outputs, loss, twin_loss, twin_grads = run_both(model, twin, args)
    assert outputs[0].shape == args[0].shape + ((cfg.vocab_size,) if kind == "generator" else ())
    assert hasattr(model, "embeddings_project") == (cfg.embedding_size != cfg.d_model)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    assert_grads_match(model, twin_grads)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float32_matches_the_twin(kind):
    model, twin = pair(kind)
    assert_float32_matches_twin(model, twin, batch(model.cfg, kind))


@given(layout=layouts(), kind=st.sampled_from(sorted(KINDS)),
       which=st.sampled_from(["ids", "token_type_ids", "attention_mask", "labels"]))
def test_inputs_in_any_memory_layout_give_the_same_loss_and_gradients(layout, kind, which):
    model, _ = pair(kind)
    index = ["ids", "token_type_ids", "attention_mask", "labels"].index(which)
    assert_layout_changes_nothing(model, batch(model.cfg, kind), index, layout)


# -- the binary cross entropy ---------------------------------------------------------------------------
@given(seed=st.integers(0, 100), shape=st.sampled_from([(1, 1), (2, 3), (4, 1)]), big=st.booleans())
def test_bce_with_logits_equals_its_formula_and_its_gradient_is_sigmoid_minus_label_over_n(seed, shape, big):
    """loss = mean of -y log s - (1 - y) log(1 - s), evaluated here in longhand; dz = (s - y) / N at counted tokens,
    checked by central differences and against torch (large |z| too: the stable form must not overflow)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * (30.0 if big else 2.0)
    y = rng.integers(0, 2, shape)
    counted = rng.random(shape) < 0.7
    counted.flat[0] = True
    loss, cache = bce_with_logits_forward(z, y, counted)
    dz = bce_with_logits_backward(3.0, cache)
    if not big:
        s = 1.0 / (1.0 + np.exp(-z))
        longhand = -(y * np.log(s) + (1 - y) * np.log(1 - s))[counted].mean()
        assert_close(loss, longhand, rtol=RTOL[np.dtype(np.float64)], what="loss")
        assert_close(dz, np.where(counted, 3.0 * (s - y) / counted.sum(), 0), what="dz")
        h = 1e-6
        fd = np.zeros_like(z)
        for i in range(z.size):
            e = np.zeros_like(z)
            e.flat[i] = h
            fd.flat[i] = 3.0 * (bce_with_logits_forward(z + e, y, counted)[0] -
                                bce_with_logits_forward(z - e, y, counted)[0]) / (2 * h)
        assert_close(dz, fd, rtol=FD_RTOL, what="central differences")
    zt = torch.from_numpy(z).requires_grad_()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(zt[torch.from_numpy(counted)],
                                                               torch.from_numpy(y[counted]).double())
    (3.0 * ref).backward()
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    assert_close(loss, ref.item(), what="torch loss")
    assert_close(dz, zt.grad.numpy(), what="torch dz")


def test_the_discriminator_loss_counts_only_the_tokens_the_mask_keeps():
    model, _ = pair("discriminator")
    ids, types, mask, labels = batch(model.cfg, "discriminator")
    model.eval()
    _, loss = model.forward(ids, types, mask, labels)
    flipped = labels.copy()
    flipped[mask == 0] = 1 - flipped[mask == 0]
    assert (mask == 0).any() and model.forward(ids, types, mask, flipped)[1] == loss
    assert model.forward(ids, types, mask, 1 - labels)[1] != loss


# -- the pair ---------------------------------------------------------------------------------------------
GEN = dict(TINY, n_layer=1, n_head=1, d_model=3, d_ff=5)  # the generator: smaller, the same embeddings


def pretraining(seed=0, **overrides):
    g = ElectraConfig(**{**GEN, **overrides, "dtype": "float64"})
    d = ElectraConfig(**{**TINY, **overrides, "dtype": "float64"})
    model = randomise(ElectraPretraining(g, d, seed=seed), seed + 3)
    twin = TwinElectraPretraining(g.to_dict(), d.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def masked_batch(cfg, seed=1):
    rng = np.random.default_rng(seed)
    ids, types, mask, _ = batch(cfg, "discriminator", seed=seed)
    labels = np.full(ids.shape, IGNORE_INDEX)
    chosen = (rng.random(ids.shape) < 0.5) & (mask == 1)
    chosen[0, 0] = True
    labels[chosen] = ids[chosen]
    masked_ids = np.where(chosen, 1, ids)  # 1 plays [MASK]
    return masked_ids, labels, types, mask


@given(seed=st.integers(0, 30), embedding_size=st.sampled_from([3, 4, 6]))
def test_pretraining_loss_and_every_gradient_match_the_twin(seed, embedding_size):
    """MLM + 50 * BCE on the tokens npformer sampled; the shared embeddings get both models' gradients."""
    model, twin = pretraining(seed, embedding_size=embedding_size)
    ids, labels, types, mask = masked_batch(model.discriminator.cfg, seed)
    outputs, loss = model.forward(ids, types, mask, labels, rng=np.random.default_rng(seed))
    model.backward()
    twin.zero_grad()
    _, _, twin_loss = twin(*map(to_torch, (ids, types, mask, labels, outputs.corrupted_ids, outputs.rtd_labels)))
    twin_loss.backward()
    assert abs(loss - twin_loss.item()) <= MODEL_RTOL * abs(twin_loss.item())
    assert_grads_match(model, {n: p.grad.numpy() for n, p in twin.named_parameters()})
    assert model.generator.embeddings is model.discriminator.embeddings
    assert not any(n.startswith("generator.embeddings.") for n, _ in model.named_parameters())
    assert pending(model) == 0


def test_pretraining_samples_only_masked_positions_and_labels_what_changed():
    model, _ = pretraining()
    ids, labels, types, mask = masked_batch(model.discriminator.cfg)
    model.eval()
    out, _ = model.forward(ids, types, mask, labels, rng=np.random.default_rng(4))
    again, _ = model.forward(ids, types, mask, labels, rng=np.random.default_rng(4))
    masked = labels != IGNORE_INDEX
    np.testing.assert_array_equal(out.corrupted_ids, again.corrupted_ids)  # the given rng decides
    np.testing.assert_array_equal(out.corrupted_ids[~masked], ids[~masked])
    original = np.where(masked, labels, ids)
    np.testing.assert_array_equal(out.rtd_labels, (out.corrupted_ids != original).astype(np.int64))


def test_the_loss_weights_the_discriminator_by_lambda():
    model, _ = pretraining()
    ids, labels, types, mask = masked_batch(model.discriminator.cfg)
    model.eval()
    out, loss = model.forward(ids, types, mask, labels, rng=np.random.default_rng(0))
    _, mlm = model.generator.forward(ids, types, mask, labels)
    _, rtd = model.discriminator.forward(out.corrupted_ids, types, mask, out.rtd_labels)
    assert model.rtd_weight == RTD_WEIGHT == 50.0
    assert_close(loss, mlm + 50.0 * rtd, what="loss")


@given(seed=st.integers(0, 20))
def test_sampling_follows_the_softmax(seed):
    """Frequencies of 20000 draws from 3 rows of logits within 4 standard errors of softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((3, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    draws = sample_from_logits(np.tile(logits, (20000, 1)), rng).reshape(20000, 3)  # (n, 3)
    for row in range(3):
        freq = np.bincount(draws[:, row], minlength=4) / draws.shape[0]
        assert np.all(np.abs(freq - p[row]) <= 4 * np.sqrt(p[row] * (1 - p[row]) / draws.shape[0]) + 1e-12)


def test_pretraining_refuses_configs_that_cannot_share_embeddings():
    d = ElectraConfig(**TINY)
    for field, value in (("embedding_size", 5), ("vocab_size", 11), ("max_position", 9), ("pad_token_id", None)):
        expect_rejected(lambda: ElectraPretraining(ElectraConfig(**{**GEN, field: value}), d), "ElectraPretraining",
                        "generator_cfg")
    expect_rejected(lambda: ElectraPretraining(dict(GEN), d), "ElectraPretraining", "generator_cfg")
    expect_rejected(lambda: ElectraPretraining(ElectraConfig(**GEN), d, rtd_weight=-1.0), "ElectraPretraining",
                    "rtd_weight")
    model = ElectraPretraining(ElectraConfig(**GEN), d)
    ids = np.ones((1, 3), np.int64)
    expect_rejected(lambda: model.forward(ids, rng=np.random.default_rng(0)), "ElectraPretraining.forward",
                    "mlm_labels")
    expect_rejected(lambda: model.forward(ids, mlm_labels=ids, rng=0), "ElectraPretraining.forward", "rng")
    expect_rejected(lambda: model.forward(ids, mlm_labels=ids + 20, rng=np.random.default_rng(0)),
                    "ElectraPretraining.forward", "mlm_labels")


def test_pretraining_learns_a_fixed_batch():
    """Training end to end: the generator's MLM loss falls below half of chance, the pair's loss falls."""
    from npformer.optim.optimizer import AdamW

    g, d = ElectraConfig(**GEN), ElectraConfig(**TINY)
    model = ElectraPretraining(g, d, seed=2)
    ids, labels, types, mask = masked_batch(d, seed=5)
    opt = AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    losses = []
    for step in range(100):
        model.zero_grad()
        losses.append(model.forward(ids, types, mask, labels, rng=np.random.default_rng(step))[1])
        model.backward()
        opt.step()
    model.eval()
    _, gen_loss = model.generator.forward(ids, types, mask, labels)
    assert gen_loss < 0.5 * np.log(d.vocab_size)  # the generator learned the masked tokens
    assert np.mean(losses[-10:]) < 0.8 * losses[0], losses[::10]  # the samples vary: the total falls on average


# -- recordings and the divergence finder ------------------------------------------------------------------
@pytest.mark.parametrize("kind, options", [("generator", dict()), ("discriminator", dict(dropout=0.2)),
                                           ("discriminator", dict(embedding_size=6))])
def test_recordings_agree_everywhere(kind, options):
    model, twin = pair(kind, **options)
    ours, theirs = record_both(model, twin, batch(model.cfg, kind))
    assert divergence(ours, theirs) is None
    shared = set(ours) & set(theirs)
    assert {"embeddings.out", "layers.1.attention.probs", "layers.0.dx", "layers.0.output_norm.dx"} <= shared
    assert {"generator": "dmlm_logits", "discriminator": "drtd_logits"}[kind] in shared
    assert ("embeddings_project.dW" in shared) == (model.cfg.embedding_size != model.cfg.d_model)


@pytest.mark.parametrize("kind, where, expected", [
    ("discriminator", "embeddings_project.weight", "embeddings_project.out"),
    ("discriminator", "discriminator_predictions.dense_prediction.bias",
     "discriminator_predictions.dense_prediction.out"),
    ("generator", "generator_predictions.layer_norm.weight", "generator_predictions.layer_norm.out"),
])
def test_divergence_finder_names_a_planted_forward_error(kind, where, expected):
    model, twin = pair(kind)
    found = divergence_after_planting(model, twin, batch(model.cfg, kind), where)
    assert found is not None and found.name == expected, found


def test_divergence_finder_names_a_planted_backward_error(monkeypatch):
    model, twin = pair("discriminator")
    head = model.discriminator_predictions
    original = type(head.dense).backward

    def wrong(self, dy):
        return original(self, dy) * 1.001 if self is head.dense else original(self, dy)

    monkeypatch.setattr(type(head.dense), "backward", wrong)
    found = divergence(*record_both(model, twin, batch(model.cfg, "discriminator")))
    assert found is not None and found.name == "layers.1.output_norm.dweight", found


# -- config and inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("vocab_size", 0), ("max_position", -1), ("type_vocab_size", 1.5), ("embedding_size", 0),
    ("embedding_size", "4"), ("n_layer", True), ("n_head", 5), ("d_model", None), ("d_ff", 0), ("dropout", 1.0),
    ("layer_norm_eps", float("nan")), ("pad_token_id", 65), ("dtype", "bfloat16"),
])
def test_config_refuses_a_bad_field_by_name(field, value):
    expect_rejected(lambda: ElectraConfig(**{field: value}), "ElectraConfig", field)


@given(cfg=configs())
def test_config_round_trips(cfg):
    assert ElectraConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_refuses_a_bad_config_or_seed(kind):
    cls = KINDS[kind][0]
    expect_rejected(lambda: cls(dict(TINY)), cls.__name__, "cfg")
    expect_rejected(lambda: cls(ElectraConfig(**TINY), seed=-1), cls.__name__, "seed")


BAD_KINDS = bad_kinds("labels")


@given(kind=st.sampled_from(sorted(KINDS)), arg=st.sampled_from(sorted(BAD_KINDS)), data=st.data())
def test_forward_refuses_generated_bad_arguments(kind, arg, data):
    bad = data.draw(st.sampled_from(BAD_KINDS[arg]))
    cls = KINDS[kind][0]
    model = cls(ElectraConfig(**TINY))
    ids = np.random.default_rng(0).integers(0, 2, (2, 5))
    label_name = "mlm_labels" if kind == "generator" else "labels"
    good = {"ids": ids, "token_type_ids": ids, "attention_mask": np.ones_like(ids), label_name: ids}
    arg = label_name if arg == "labels" else arg
    assert_refuses_corrupted(model, good, arg, bad, f"{cls.__name__}.forward")


def test_forward_refuses_bad_label_values_and_backward_needs_a_loss():
    ids = np.ones((2, 4), np.int64)
    disc = ElectraDiscriminator(ElectraConfig(**TINY))
    expect_rejected(lambda: disc.forward(ids, labels=ids * 2), "ElectraDiscriminator.forward", "labels")
    gen = ElectraGenerator(ElectraConfig(**TINY))
    expect_rejected(lambda: gen.forward(ids, mlm_labels=ids - 5), "ElectraGenerator.forward", "mlm_labels")
    for model in (disc, gen):
        model.forward(ids)
        with pytest.raises(RuntimeError, match=f"{type(model).__name__}.backward: the matching forward had no labels"):
            model.backward()


def test_the_discriminator_head_and_backward_refuse_bad_arguments_by_name():
    disc = ElectraDiscriminator(ElectraConfig(**TINY))
    head = disc.discriminator_predictions
    expect_rejected(lambda: head.forward(np.ones((2, 3, 5))), "ElectraDiscriminatorHead.forward", "h")
    expect_rejected(lambda: head.forward(np.ones((2, 6), np.float32)), "ElectraDiscriminatorHead.forward", "h")
    head.forward(np.ones((2, 3, 6), np.float32))
    expect_rejected(lambda: head.backward(np.ones((2, 4), np.float32)), "ElectraDiscriminatorHead.backward", "dlogits")
    expect_rejected(lambda: head.backward(np.ones((2, 3))), "ElectraDiscriminatorHead.backward", "dlogits")
    assert head.pending_backwards == 1  # a refused backward consumes nothing
    ids = np.ones((1, 3), np.int64)
    disc.forward(ids, labels=ids)
    expect_rejected(lambda: disc.backward("1"), "ElectraDiscriminator.backward", "dloss")


def test_state_dict_names_follow_the_two_models():
    gen, disc = ElectraGenerator(ElectraConfig(**TINY)), ElectraDiscriminator(ElectraConfig(**TINY))
    common = {f"embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")}
    common |= {"embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias", "embeddings_project.weight",
               "embeddings_project.bias"}
    common |= {f"layers.{i}.{n}.{w}" for i in range(2) for w in ("weight", "bias") for n in
               ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "attention_norm",
                "mlp.fc", "mlp.proj", "output_norm")}
    assert set(gen.state_dict()) == common | {"generator_predictions.dense.weight", "generator_predictions.dense.bias",
                                              "generator_predictions.layer_norm.weight",
                                              "generator_predictions.layer_norm.bias", "generator_predictions.bias"}
    assert set(disc.state_dict()) == common | {f"discriminator_predictions.{n}.{w}" for w in ("weight", "bias")
                                               for n in ("dense", "dense_prediction")}
    square = ElectraDiscriminator(ElectraConfig(**{**TINY, "embedding_size": 6}))
    assert not any("embeddings_project" in n for n in square.state_dict())


def test_the_model_imports_no_other_model():
    imported = imported_modules(electra_module)
    assert not any(m.startswith("..models") for m in imported), imported
    assert "..nn.encoder" in imported
