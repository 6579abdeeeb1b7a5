"""The registry of Hugging Face families (``npformer.hf.pretrained.REGISTRY``): each model type and each npformer
model class belongs to one family, and every family and variant writes a folder that it reads back as the same
model, bit for bit, with every parameter in exactly one of its rows. ALBERT and ELECTRA (discriminator and
generator) through ``load_pretrained`` / ``save_pretrained`` / ``hf_state_dict`` against transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.hf import hf_state_dict, load_pretrained, save_pretrained  # noqa: E402
from npformer.hf.pretrained import REGISTRY, SUPPORTED_MODEL_TYPES  # noqa: E402
from npformer.models.albert import Albert, AlbertConfig  # noqa: E402
from npformer.models.bart import Bart, BartConfig  # noqa: E402
from npformer.models.bert import Bert, BertConfig  # noqa: E402
from npformer.models.deberta import Deberta, DebertaConfig  # noqa: E402
from npformer.models.electra import ElectraConfig, ElectraDiscriminator, ElectraGenerator  # noqa: E402
from npformer.models.gpt import GPT, GPTConfig  # noqa: E402
from npformer.models.llama import Llama, LlamaConfig, Mixtral  # noqa: E402
from npformer.models.mamba import MambaConfig, MambaLM  # noqa: E402
from npformer.models.t5 import T5, T5Config  # noqa: E402
from tests.hf.encoder_helpers import assert_grads_equal_hf, load_hf, saved_folders  # noqa: E402
from tests.hf.test_pretrained_albert_electra import HF_CLASS, build_hf_model, hf_forward, inputs  # noqa: E402
from tests.hf.test_pretrained_albert_electra import ours_forward  # noqa: E402
from tests.tolerances import HF_LOGITS_RTOL, assert_close  # noqa: E402

F64 = np.dtype(np.float64)
SIZES = dict(n_layer=2, n_head=2, d_model=8, dtype="float64")
ENCODER = dict(vocab_size=23, max_position=12, d_ff=11, **SIZES)
DECODER = dict(vocab_size=23, block_size=12, head_dim=4, intermediate_size=11, **SIZES)  # Llama's, resolved
# One tiny model of every (model type, variant) the registry writes: model type -> variant -> model.
MODELS = {
    "gpt2": {None: lambda: GPT(GPTConfig(vocab_size=23, block_size=12, **SIZES), seed=1)},
    "llama": {None: lambda: Llama(LlamaConfig(n_kv_head=1, **DECODER), seed=2)},
    "mistral": {None: lambda: Llama(LlamaConfig(sliding_window=4, tie_word_embeddings=True, **DECODER), seed=3)},
    "qwen2": {None: lambda: Llama(LlamaConfig(qkv_bias=True, **DECODER), seed=4)},
    "mixtral": {None: lambda: Mixtral(LlamaConfig(num_local_experts=3, num_experts_per_tok=2, router_aux_loss_coef=0.01,
                                                  **DECODER), seed=13)},
    "bert": {None: lambda: Bert(BertConfig(nsp_head=True, dropout=0.0, **ENCODER), seed=5)},
    "roberta": {None: lambda: Bert(BertConfig(type_vocab_size=1, pad_token_id=1, position_padding_idx=1,
                                              nsp_head=False, dropout=0.0, **ENCODER), seed=6)},
    "albert": {None: lambda: Albert(AlbertConfig(embedding_size=5, hidden_act="gelu_new", **ENCODER), seed=7)},
    "electra": {"discriminator": lambda: ElectraDiscriminator(ElectraConfig(embedding_size=8, dropout=0.0,
                                                                            **ENCODER), seed=8),
                "generator": lambda: ElectraGenerator(ElectraConfig(embedding_size=6, dropout=0.0, **ENCODER), seed=9)},
    "deberta-v2": {v: lambda: Deberta(DebertaConfig(position_buckets=4, max_relative_positions=8, dropout=0.0,
                                                    **ENCODER), seed=10) for v in ("legacy", "lm_predictions")},
    "t5": {None: lambda: T5(T5Config(vocab_size=23, d_model=8, d_kv=3, d_ff=11, num_layers=2, num_decoder_layers=1,
                                     n_head=2, relative_attention_num_buckets=6, relative_attention_max_distance=4,
                                     dropout=0.0, dtype="float64"), seed=11)},
    "bart": {None: lambda: Bart(BartConfig(vocab_size=23, max_position=12, dropout=0.0, **SIZES), seed=12)},
    "mamba": {None: lambda: MambaLM(MambaConfig(vocab_size=23, block_size=12, n_layer=2, d_model=8, d_state=3, d_conv=3,
                                                dtype="float64"), seed=14)},
}


def test_each_model_type_and_model_class_belongs_to_one_family():
    types = [t for family in REGISTRY.values() for t in family.model_types]
    assert sorted(types) == sorted(set(types)) == sorted(SUPPORTED_MODEL_TYPES)
    classes = [cls for family in REGISTRY.values() for cls in family.classes]
    assert len(classes) == len(set(classes))
    # isinstance picks the first family whose class matches: a subclass (Mixtral of Llama) comes before its base
    assert all(classes.index(a) < classes.index(b) for a in classes for b in classes if a is not b and issubclass(a, b))
    assert {name: family.name for name, family in REGISTRY.items()} == {name: name for name in REGISTRY}
    written = {(t, v) for t, variants in MODELS.items() for v in variants}
    assert written == {(t, v) for family in REGISTRY.values() for t in family.model_types for v in family.models}


@pytest.mark.parametrize("model", [None, "gpt2", object(), np.zeros(3), GPTConfig()])
def test_what_is_not_a_registered_model_is_refused_by_name(model, tmp_path):
    for call, func in [(lambda: save_pretrained(model, tmp_path), "save_pretrained"),
                       (lambda: hf_state_dict(model), "hf_state_dict")]:
        with pytest.raises(TypeError, match=f"{func}: argument 'model' expected an npformer GPT, Mixtral, Llama, Bert"):
            call()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model_type, variant", [(t, v) for t, variants in MODELS.items() for v in variants])
def test_every_family_reads_back_what_it_writes(model_type, variant, tmp_path):
    """Every parameter sits in exactly one row; save -> load gives the same class, config and parameters."""
    model = MODELS[model_type][variant]()
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters():  # no parameter left at an initial 0 or 1 that another could match
        p.data[...] = rng.standard_normal(p.shape)
    family = next(f for f in REGISTRY.values() if model_type in f.model_types)
    names = [n for _, ours, _ in family.rows(model.cfg, variant, model_type) for n in ours]
    assert sorted(names) == sorted(model.state_dict())
    save_pretrained(model, tmp_path, model_type=model_type, variant=variant)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    again = load_pretrained(tmp_path, dtype="float64")
    assert type(again) is type(model) and again.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert np.array_equal(again.state_dict()[name], value), name
    assert sorted(hf_state_dict(again, model_type=model_type, variant=variant)) == \
        sorted(hf_state_dict(model, model_type=model_type, variant=variant))


# -- ALBERT and ELECTRA against transformers, through the public functions ------------------------------------
ENCODER_CASES = list(HF_CLASS)  # ALBERT (erf and tanh GELU), ELECTRA's discriminator and generator
NPFORMER_CLASS = {"AlbertForPreTraining": Albert, "ElectraForPreTraining": ElectraDiscriminator,
                  "ElectraForMaskedLM": ElectraGenerator}


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_loaded_folders_give_hf_logits_and_gradients(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    assert type(model) is NPFORMER_CLASS[HF_CLASS[case]().__name__]
    hf = load_hf(HF_CLASS[case](), folder, torch.float64)
    hf.train()  # dropout 0: the mode a gradient is taken in
    ids, types, mask, labels, sop = inputs(case, model.cfg.vocab_size, seed=1)
    logits, _, loss = ours_forward(case, model, ids, types, mask, labels, sop)
    model.backward()
    hf_logits, _, hf_loss = hf_forward(case, hf, ids, types, mask, labels, sop)
    hf_loss.backward()
    assert_close(logits, hf_logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    assert_grads_equal_hf(hf_state_dict(model, grads=True), hf, case)


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_saved_folders_load_in_transformers_and_back_bit_for_bit(case, folder_of, tmp_path):
    folder = folder_of(case)
    first = load_pretrained(folder, dtype="float64")
    save_pretrained(first, tmp_path)
    doc, original = json.loads((tmp_path / "config.json").read_text()), json.loads((folder / "config.json").read_text())
    assert (doc["model_type"], doc["architectures"]) == (original["model_type"], original["architectures"])
    ids, types, mask, _, _ = inputs(case, first.cfg.vocab_size, seed=3)
    with torch.no_grad():
        hf_logits, hf_sop, _ = hf_forward(case, load_hf(HF_CLASS[case](), tmp_path, torch.float64), ids, types, mask)
    logits, sop, _ = ours_forward(case, first, ids, types, mask)
    assert_close(logits, hf_logits.numpy(), rtol=HF_LOGITS_RTOL[F64], what=f"{case} logits")
    if hf_sop is not None:
        assert_close(sop, hf_sop.numpy(), rtol=HF_LOGITS_RTOL[F64], what="sop logits")
    second = load_pretrained(tmp_path, dtype="float64")
    assert second.cfg == first.cfg
    for name, value in first.state_dict().items():
        assert np.array_equal(value, second.state_dict()[name]), name
