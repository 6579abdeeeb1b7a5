"""The ALBERT and ELECTRA maps (npformer/hf/albert_map.py, electra_map.py) against transformers, on tiny random
AlbertForPreTraining, ElectraForPreTraining and ElectraForMaskedLM models built here (no network).

Each folder saved by transformers is read with ``read_safetensors`` and mapped by the family's rows (the
tied decoder, where stored again, must equal the word table); logits are compared in float32 and float64
and every parameter's gradient in float64 against torch autograd through the HF model. Every HF parameter
is redrawn at random (norm weights around 1), so no misplaced bias or norm hides behind zeros or ones.
Then the other way: an npformer model written with the rows and the config writer loads in transformers
and gives the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.hf import HFFormatError, read_safetensors, write_safetensors  # noqa: E402
from npformer.hf.albert_map import (TIED as ALBERT_TIED, albert_config, albert_config_json,  # noqa: E402
                                    albert_ignored, albert_rows)
from npformer.hf.electra_map import (TIED as ELECTRA_TIED, electra_config, electra_config_json,  # noqa: E402
                                     electra_ignored, electra_kind, electra_rows)
from npformer.hf.pretrained import _Fields  # noqa: E402
from npformer.models.albert import Albert  # noqa: E402
from npformer.models.electra import ElectraDiscriminator, ElectraGenerator  # noqa: E402
from tests.hf import encoder_helpers as hf_helpers  # noqa: E402
from tests.hf.encoder_helpers import (assert_grads_equal_hf, hf_mlm_loss, masked_labels, padded_ids,  # noqa: E402
                                     saved_folders)
from tests.tolerances import HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 2468
T = 7

CASES = {
    "albert": lambda: transformers.AlbertConfig(
        vocab_size=31, embedding_size=5, hidden_size=12, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=17, max_position_embeddings=12, type_vocab_size=3, hidden_act="gelu", pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0, layer_norm_eps=1e-5),
    "albert_gelu_new": lambda: transformers.AlbertConfig(  # the released checkpoints' tanh GELU, HF's default
        vocab_size=23, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=11, max_position_embeddings=10, type_vocab_size=2, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0),
    "electra_discriminator": lambda: transformers.ElectraConfig(
        vocab_size=29, embedding_size=10, hidden_size=10, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=13, max_position_embeddings=11, type_vocab_size=2, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "electra_generator": lambda: transformers.ElectraConfig(
        vocab_size=29, embedding_size=6, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=9, max_position_embeddings=11, type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
HF_CLASS = {"albert": lambda: transformers.AlbertForPreTraining,
            "albert_gelu_new": lambda: transformers.AlbertForPreTraining,
            "electra_discriminator": lambda: transformers.ElectraForPreTraining,
            "electra_generator": lambda: transformers.ElectraForMaskedLM}


def build_hf_model(case, seed=SEED):
    return hf_helpers.build_hf_model(CASES[case](), HF_CLASS[case](), seed)


def load_hf(case, folder, dtype=torch.float32):
    return hf_helpers.load_hf(HF_CLASS[case](), folder, dtype)


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


# -- loading with the maps ----------------------------------------------------------------------------------
def maps_of(f: _Fields, dtype: str):
    """(config, model class, rows, tied, ignored) for the folder's config.json."""
    if f.doc["model_type"] == "albert":
        cfg = albert_config(f, dtype)
        return cfg, Albert, albert_rows(cfg), ALBERT_TIED, albert_ignored
    kind = electra_kind(f)
    cfg = electra_config(f, dtype)
    model = ElectraGenerator if kind == "generator" else ElectraDiscriminator
    return cfg, model, electra_rows(cfg, kind), ELECTRA_TIED[kind], electra_ignored


def load(folder: Path, dtype: str = "float32"):
    """An npformer model from an HF folder through the maps, every tensor accounted for."""
    path = folder / "config.json"
    f = _Fields("load", path, json.loads(path.read_text()))
    cfg, Model, rows, tied, ignored = maps_of(f, dtype)
    tensors = read_safetensors(folder / "model.safetensors", dtype=dtype)
    expected = {hf for hf, _, _ in rows}
    for name in tensors:
        if name in tied:
            assert np.array_equal(tensors[name], tensors[tied[name]]), name
        else:
            assert name in expected or ignored(name), f"unexpected tensor {name}"
    model = Model(cfg)
    model.load_state_dict({ours[0]: tensors[hf] for hf, ours, layout in rows}, strict=True, cast=True)
    return model.eval()


def hf_names_of(model, rows, grads=False):
    params = dict(model.named_parameters())
    return {hf: (params[ours[0]].grad if grads else params[ours[0]].data) for hf, ours, _ in rows}


def rows_of(model):
    if isinstance(model, Albert):
        return albert_rows(model.cfg)
    return electra_rows(model.cfg, "generator" if isinstance(model, ElectraGenerator) else "discriminator")


def inputs(case, V, seed=0, B=3):
    """ids with padding (rows 1, 2 right-padded; a pad id inside row 0), token types, the mask, and labels:
    MLM labels (-100 where not masked and at padding), SOP labels, or 0/1 replaced labels."""
    rng = np.random.default_rng(seed)
    ids, mask = padded_ids(rng, V, 0, B, T, low=1, cut=5)
    types = rng.integers(0, 2, (B, T))
    if case == "electra_discriminator":
        return ids, types, mask, (rng.random((B, T)) < 0.4).astype(np.int64), None
    labels = masked_labels(rng, V, mask)
    return ids, types, mask, labels, (rng.integers(0, 2, B) if case.startswith("albert") else None)


def ours_forward(case, model, ids, types, mask, labels=None, sop=None):
    if case.startswith("albert"):
        out, loss = model.forward(ids, types, mask, labels, sop)
        return out.mlm_logits, out.sop_logits, loss
    out, loss = model.forward(ids, types, mask, labels)
    return out[0], None, loss


def hf_forward(case, hf, ids, types, mask, labels=None, sop=None):
    t = torch.from_numpy
    if case.startswith("albert"):
        out = hf(input_ids=t(ids), token_type_ids=t(types), attention_mask=t(mask))
        loss = None
        if labels is not None:
            loss = hf_mlm_loss(out.prediction_logits, labels)
            loss = loss + torch.nn.functional.cross_entropy(out.sop_logits, t(sop))
        return out.prediction_logits, out.sop_logits, loss
    if case == "electra_discriminator":
        out = hf(input_ids=t(ids), token_type_ids=t(types), attention_mask=t(mask),
                 labels=None if labels is None else t(labels))
        loss = None
        if labels is not None:  # HF's loss (BCE with logits over the tokens the mask keeps) casts the labels to
            keep = t(mask) == 1  # float32, and so is float32-accurate: the same loss, in the logits' dtype
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[keep],
                                                                        t(labels)[keep].to(out.logits.dtype))
            assert abs(loss.item() - out.loss.item()) <= HF_LOGITS_RTOL[F32] * abs(loss.item())
        return out.logits, None, loss
    out = hf(input_ids=t(ids), token_type_ids=t(types), attention_mask=t(mask),
             labels=None if labels is None else t(labels))
    return out.logits, None, out.loss


@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load(folder)
    V = model.cfg.vocab_size
    ids, types, mask, _, _ = inputs(case, V)
    logits, sop, _ = ours_forward(case, model, ids, types, mask)
    with torch.no_grad():
        hf_logits, hf_sop, _ = hf_forward(case, load_hf(case, folder), ids, types, mask)
    assert logits.dtype == F32
    assert_close(logits, hf_logits.numpy(), rtol=HF_LOGITS_RTOL[F32], what=f"{case} logits")
    if case.startswith("albert"):
        assert_close(sop, hf_sop.numpy(), rtol=HF_LOGITS_RTOL[F32], what="sop logits")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_gradient_float64_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load(folder, "float64").train()
    hf = load_hf(case, folder, torch.float64)
    hf.train()  # dropout 0: the mode a gradient is taken in
    ids, types, mask, labels, sop = inputs(case, model.cfg.vocab_size, seed=1)
    logits, sop_logits, loss = ours_forward(case, model, ids, types, mask, labels, sop)
    model.backward()
    hf_logits, hf_sop, hf_loss = hf_forward(case, hf, ids, types, mask, labels, sop)
    hf_loss.backward()
    assert_close(logits, hf_logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    if case.startswith("albert"):
        assert_close(sop_logits, hf_sop.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="sop logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    assert_grads_equal_hf(hf_names_of(model, rows_of(model), grads=True), hf, case)


def test_albert_shares_one_layer_across_its_depth(folder_of):
    """HF's 3 layers are one set of tensors; npformer's layer gradient is the sum over its 3 applications."""
    model = load(folder_of("albert"), "float64").train()
    assert model.cfg.n_layer == 3 and model.cfg.embedding_size == 5 and model.cfg.d_model == 12
    rec = model.start_recording()
    ids, types, mask, labels, sop = inputs("albert", model.cfg.vocab_size, seed=2)
    model.forward(ids, types, mask, labels, sop)
    model.backward()
    calls = ["layer.mlp.fc.dW", "layer.mlp.fc.dW@2", "layer.mlp.fc.dW@3"]
    assert_close(model.layer.mlp.fc.weight.grad, np.sum([rec[c] for c in calls], axis=0), what="sum over depth")


# -- writing with the maps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_a_model_written_with_the_maps_loads_in_transformers(case, folder_of, tmp_path):
    model = load(folder_of(case))
    kind = {"albert": None, "albert_gelu_new": None, "electra_discriminator": "discriminator",
            "electra_generator": "generator"}[case]
    doc = albert_config_json(model.cfg) if kind is None else electra_config_json(model.cfg, kind)
    doc["dtype"] = "float32"
    (tmp_path / "config.json").write_text(json.dumps(doc))
    write_safetensors(tmp_path / "model.safetensors", hf_names_of(model, rows_of(model)), metadata={"format": "pt"})
    again = load(tmp_path)
    assert again.cfg == model.cfg
    ids, types, mask, _, _ = inputs(case, model.cfg.vocab_size, seed=3)
    with torch.no_grad():
        hf_logits, hf_sop, _ = hf_forward(case, load_hf(case, tmp_path), ids, types, mask)
    logits, sop, _ = ours_forward(case, model, ids, types, mask)
    assert_close(logits, hf_logits.numpy(), rtol=HF_LOGITS_RTOL[F32], what=f"{case} logits")
    if case.startswith("albert"):
        assert_close(sop, hf_sop.numpy(), rtol=HF_LOGITS_RTOL[F32], what="sop logits")


# -- what the maps refuse ---------------------------------------------------------------------------------------
def fields(case, **changes):
    doc = json.loads(CASES[case]().to_json_string())
    doc["architectures"] = [HF_CLASS[case]().__name__]
    doc.update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del doc[key]
    return _Fields("load", Path("config.json"), doc)


@pytest.mark.parametrize("change, field", [
    (dict(num_hidden_groups=2), "num_hidden_groups"), (dict(inner_group_num=2), "inner_group_num"),
    (dict(hidden_act="relu"), "hidden_act"), (dict(hidden_act="gelu_fast"), "hidden_act"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    (dict(architectures=["BertForPreTraining"]), "model_type"),
    (dict(embedding_size=0), "embedding_size"), (dict(vocab_size=...), "vocab_size"),
])
def test_albert_config_refuses_what_npformer_cannot_compute_by_name(change, field):
    with pytest.raises(HFFormatError, match=f"field '{field}'"):
        albert_config(fields("albert", **change), "float32")


@pytest.mark.parametrize("change, field", [
    (dict(hidden_act="relu"), "hidden_act"), (dict(architectures=["ElectraForTokenClassification"]), "architectures"),
    (dict(architectures=...), "architectures"), (dict(is_decoder=True), "is_decoder"),
    (dict(position_embedding_type="relative_key_query"), "position_embedding_type"),
    (dict(add_cross_attention=True), "add_cross_attention"), (dict(hidden_size=1.5), "hidden_size"),
])
def test_electra_config_refuses_what_npformer_cannot_compute_by_name(change, field):
    with pytest.raises(HFFormatError, match=f"field '{field}'"):
        electra_config(fields("electra_generator", **change), "float32")


def test_the_config_writers_refuse_what_hf_cannot_express():
    from npformer.models.albert import AlbertConfig
    from npformer.models.electra import ElectraConfig

    with pytest.raises(ValueError, match="save_pretrained: argument 'model'"):
        albert_config_json(AlbertConfig(type_vocab_size=0))
    with pytest.raises(ValueError, match="save_pretrained: argument 'kind'"):
        electra_config_json(ElectraConfig(), "both")
    with pytest.raises(ValueError, match="electra_rows: argument 'kind'"):
        electra_rows(ElectraConfig(), "both")


def test_config_fields_round_trip_through_the_writers():
    for case in CASES:
        f = fields(case)
        cfg = albert_config(f, "float64") if case.startswith("albert") else electra_config(f, "float64")
        kind = None if case.startswith("albert") else electra_kind(f)
        doc = albert_config_json(cfg) if kind is None else electra_config_json(cfg, kind)
        again = _Fields("load", Path("config.json"), doc)
        assert (albert_config(again, "float64") if kind is None else electra_config(again, "float64")) == cfg
        hf_config = type(CASES[case]())(**{k: v for k, v in doc.items() if k != "architectures"})
        for key in ("vocab_size", "hidden_size", "embedding_size", "num_hidden_layers", "intermediate_size",
                    "layer_norm_eps", "hidden_act", "type_vocab_size", "max_position_embeddings"):
            assert getattr(hf_config, key) == getattr(CASES[case](), key), (case, key)
