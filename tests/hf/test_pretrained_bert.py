"""load_pretrained / save_pretrained for BERT (BertForPreTraining) and RoBERTa (RobertaForMaskedLM) against
transformers, on tiny random models built here (no network).

HF initialises biases to zero, norms to one and the padding rows to zero, which would hide a misplaced
bias, norm or frozen row, so every parameter is redrawn at random (norm weights around 1). The inputs
carry padding (right-padded rows, a pad id inside a row for RoBERTa's positions) and token types.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.hf import HFFormatError, load_pretrained, read_safetensors  # noqa: E402
from npformer.hf import save_pretrained, write_safetensors  # noqa: E402
from npformer.hf.pretrained import hf_state_dict  # noqa: E402
from npformer.models.bert import Bert, BertConfig  # noqa: E402
from tests.hf import encoder_helpers as hf_helpers  # noqa: E402
from tests.hf.encoder_helpers import (assert_grads_equal_hf, assert_same_model_and_tensors, hf_mlm_loss,  # noqa: E402
                                     masked_labels, padded_ids, saved_folders)
from tests.tolerances import HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 4321
T = 9

CASES = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=37, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
        max_position_embeddings=16, type_vocab_size=3, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0),
    "roberta": lambda: transformers.RobertaConfig(
        vocab_size=41, hidden_size=10, num_hidden_layers=2, num_attention_heads=2, intermediate_size=18,
        max_position_embeddings=T + 3, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
HF_CLASS = {"bert": lambda: transformers.BertForPreTraining, "roberta": lambda: transformers.RobertaForMaskedLM}


def build_hf_model(case: str, seed: int = SEED):
    return hf_helpers.build_hf_model(CASES[case](), HF_CLASS[case](), seed, norm_names=("LayerNorm", "layer_norm"))


def load_hf(case, folder, dtype=torch.float32):
    return hf_helpers.load_hf(HF_CLASS[case](), folder, dtype)


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


def inputs(cfg, seed=0, B=3):
    """ids with padding (rows 1, 2 right-padded, and a pad id inside row 0), token types, the mask,
    MLM labels (-100 where not masked and at padding), NSP labels for BERT."""
    rng = np.random.default_rng(seed)
    ids, mask = padded_ids(rng, cfg.vocab_size, cfg.pad_token_id, B, T, low=2, cut=6)  # RoBERTa counts past row 0's pad
    types = rng.integers(0, cfg.type_vocab_size, (B, T))
    labels = masked_labels(rng, cfg.vocab_size, mask)
    nsp = rng.integers(0, 2, B) if cfg.nsp_head else None
    return ids, types, mask, labels, nsp


def hf_outputs(case, hf, ids, types, mask):
    out = hf(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
             attention_mask=torch.from_numpy(mask))
    if case == "bert":
        return out.prediction_logits, out.seq_relationship_logits
    return out.logits, None


# -- logits and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder)
    assert not model.training and model.cfg.dropout == 0.0
    ids, types, mask, _, _ = inputs(model.cfg)
    ours, _ = model.forward(ids, types, mask)
    with torch.no_grad():
        mlm, nsp = hf_outputs(case, load_hf(case, folder), ids, types, mask)
    assert ours.mlm_logits.dtype == F32
    assert_close(ours.mlm_logits, mlm.numpy(), rtol=HF_LOGITS_RTOL[F32], what=f"{case} mlm logits")
    if case == "bert":
        assert_close(ours.nsp_logits, nsp.numpy(), rtol=HF_LOGITS_RTOL[F32], what="nsp logits")
    else:
        assert ours.nsp_logits is None


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_gradient_float64_equal_hf(case, folder_of):
    """float64 logits at 1e-10, and every parameter's MLM (+ NSP) loss gradient at HF_GRAD_RTOL."""
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = load_hf(case, folder, torch.float64)
    hf.train()  # dropout is 0: train mode changes nothing but is what a gradient is taken in
    ids, types, mask, labels, nsp = inputs(model.cfg, seed=1)

    outputs, loss = model.forward(ids, types, mask, labels, nsp)
    model.backward()
    mlm, nsp_logits = hf_outputs(case, hf, ids, types, mask)
    hf_loss = hf_mlm_loss(mlm, labels)
    if case == "bert":
        hf_loss = hf_loss + torch.nn.functional.cross_entropy(nsp_logits, torch.from_numpy(nsp))
    hf_loss.backward()

    assert_close(outputs.mlm_logits, mlm.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="mlm logits")
    if case == "bert":
        assert_close(outputs.nsp_logits, nsp_logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="nsp logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    theirs = assert_grads_equal_hf(hf_state_dict(model, grads=True), hf, case)
    assert len(theirs) == 16 * 2 + (14 if case == "bert" else 10)
    word = f"{'bert' if case == 'bert' else 'roberta'}.embeddings.word_embeddings.weight"
    assert np.any(theirs[word][model.cfg.pad_token_id] != 0)  # the pad row: the decoder's gradient, not the lookup's


def test_hf_layernorm_is_torch_layernorm_so_float64_needs_no_patch():
    """HF's BERT and RoBERTa normalise with torch.nn.LayerNorm, which computes in the input's dtype."""
    for case in CASES:
        norms = [m for m in build_hf_model(case).modules() if "LayerNorm" in type(m).__name__]
        assert norms and all(type(m) is torch.nn.LayerNorm for m in norms), case


# -- folders in and out -----------------------------------------------------------------------------------
def _npformer_model(case):
    options = dict(nsp_head=True) if case == "bert" else dict(type_vocab_size=1, pad_token_id=1,
                                                              position_padding_idx=1, nsp_head=False)
    model = Bert(BertConfig(vocab_size=29, max_position=T + 2, n_layer=2, n_head=2, d_model=8, d_ff=11,
                            layer_norm_eps=1e-6, dropout=0.1, dtype="float64", **options), seed=3)
    rng = np.random.default_rng(5)
    for name, prm in model.named_parameters():
        prm.data[...] = (1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0) + \
            0.3 * rng.standard_normal(prm.shape)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_saved_folder_loads_in_transformers_with_the_same_logits(case, tmp_path):
    model = _npformer_model(case)
    save_pretrained(model, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model_type"] == case and doc["architectures"] == [
        "BertForPreTraining" if case == "bert" else "RobertaForMaskedLM"]
    hf = load_hf(case, tmp_path, torch.float64)
    ids, types, mask, _, _ = inputs(model.cfg, seed=2)
    ours, _ = model.forward(ids, types, mask)
    with torch.no_grad():
        mlm, nsp = hf_outputs(case, hf, ids, types, mask)
    assert_close(ours.mlm_logits, mlm.numpy(), rtol=HF_LOGITS_RTOL[F64], what="mlm logits")
    if case == "bert":
        assert_close(ours.nsp_logits, nsp.numpy(), rtol=HF_LOGITS_RTOL[F64], what="nsp logits")


@pytest.mark.parametrize("case", list(CASES))
def test_load_save_load_is_bit_for_bit(case, folder_of, tmp_path):
    folder = folder_of(case)
    first = load_pretrained(folder)
    save_pretrained(first, tmp_path / "again")
    assert_same_model_and_tensors(first, load_pretrained(tmp_path / "again"), folder, tmp_path / "again")


@pytest.mark.parametrize("case", list(CASES))
def test_a_stored_tied_decoder_and_id_buffers_are_accepted(case, folder_of, tmp_path):
    """Checkpoints may store the decoder again (it must equal the table) and the position/token-type id buffers."""
    folder = folder_of(case)
    tensors = read_safetensors(folder / "model.safetensors")
    pre, head = ("bert", "cls.predictions") if case == "bert" else ("roberta", "lm_head")
    extra = dict(tensors)
    extra[f"{head}.decoder.weight"] = tensors[f"{pre}.embeddings.word_embeddings.weight"]
    extra[f"{head}.decoder.bias"] = tensors[f"{head}.bias"]
    extra[f"{pre}.embeddings.position_ids"] = np.arange(16, dtype=np.float32)[None]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors", extra)
    loaded = load_pretrained(tmp_path)
    assert np.array_equal(loaded.mlm_head.bias.data, tensors[f"{head}.bias"])
    extra[f"{head}.decoder.weight"] = extra[f"{head}.decoder.weight"] + 1  # an untied decoder: refused by name
    write_safetensors(tmp_path / "model.safetensors", extra)
    with pytest.raises(HFFormatError, match=f"tensor '{head}.decoder.weight' differs"):
        load_pretrained(tmp_path)


def _edited(folder, tmp_path, edit):
    doc = json.loads((folder / "config.json").read_text())
    edit(doc)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    return tmp_path


@pytest.mark.parametrize("case, field, value", [
    ("bert", "position_embedding_type", "relative_key"),
    ("roberta", "position_embedding_type", "relative_key_query"),
    ("bert", "hidden_act", "gelu_new"),
    ("roberta", "hidden_act", "relu"),
    ("bert", "is_decoder", True),
    ("bert", "add_cross_attention", True),
    ("roberta", "tie_word_embeddings", False),
    ("roberta", "pad_token_id", None),
    ("bert", "pad_token_id", -1),
    ("bert", "type_vocab_size", 0),
    ("bert", "architectures", ["LlamaForCausalLM"]),
    ("bert", "num_attention_heads", "3"),
])
def test_config_refused_by_name(case, field, value, folder_of, tmp_path):
    folder = _edited(folder_of(case), tmp_path, lambda c: c.update({field: value}))
    named = "model_type" if field == "architectures" else field
    with pytest.raises(HFFormatError, match=f"load_pretrained: .*config.json: field '{named}'"):
        load_pretrained(folder)


def test_missing_and_unexpected_tensors_refused_by_name(folder_of, tmp_path):
    folder = folder_of("bert")
    tensors = read_safetensors(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors",
                      {k: v for k, v in tensors.items() if k != "bert.pooler.dense.bias"})
    with pytest.raises(HFFormatError, match="missing tensor 'bert.pooler.dense.bias'"):
        load_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors",
                      {**tensors, "bert.encoder.layer.0.extra": tensors["cls.predictions.bias"]})
    with pytest.raises(HFFormatError, match="unexpected tensor 'bert.encoder.layer.0.extra'"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="load_pretrained: argument 'block_size'"):
        load_pretrained(folder, block_size=8)


def test_save_refuses_what_the_family_cannot_express(tmp_path):
    bert = _npformer_model("bert")
    with pytest.raises(ValueError, match="save_pretrained: argument 'model'"):
        save_pretrained(bert, tmp_path, model_type="roberta")  # roberta has no NSP head and counts positions
    with pytest.raises(ValueError, match="save_pretrained: argument 'model_type'"):
        save_pretrained(bert, tmp_path, model_type="llama")
    no_types = Bert(BertConfig(vocab_size=29, max_position=12, n_layer=1, n_head=2, d_model=8, d_ff=11,
                               type_vocab_size=0, nsp_head=False, pad_token_id=1, position_padding_idx=1))
    with pytest.raises(ValueError, match="save_pretrained: argument 'model' has type_vocab_size=0"):
        save_pretrained(no_types, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_hf_state_dict_names_follow_the_model_type_asked_for():
    model = _npformer_model("bert")
    as_bert = hf_state_dict(model)
    assert "cls.seq_relationship.weight" in as_bert and "bert.pooler.dense.weight" in as_bert
    assert all(name.startswith(("bert.", "cls.")) for name in as_bert)
    with pytest.raises(ValueError, match="hf_state_dict: argument 'model_type'"):
        hf_state_dict(model, model_type="llama")
    roberta = _npformer_model("roberta")
    as_roberta = hf_state_dict(roberta, model_type="roberta")
    assert as_roberta.keys() == hf_state_dict(roberta).keys() and "lm_head.bias" in as_roberta
    np.testing.assert_array_equal(as_roberta["lm_head.bias"], roberta.mlm_head.bias.data)
