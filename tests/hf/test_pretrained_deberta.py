"""DeBERTa-v2 folders through ``load_pretrained`` / ``save_pretrained`` / ``hf_state_dict`` (the ``deberta``
family of the registry) against transformers' DebertaV2ForMaskedLM, on tiny random models built here (no
network): logits in float32 and float64, every parameter's gradient in float64, both spellings of the MLM head
(the variants 'legacy' and 'lm_predictions'), written folders that transformers loads, load -> save -> load bit
for bit, and the fields and tensors npformer refuses by name.

HF initialises biases to zero, norms to one and the pad row to zero, which would hide a misplaced bias, norm or
frozen row, so every parameter is redrawn at random (norm weights around 1). Hugging Face takes the attention
scale's square root and the log buckets in float32 whatever the model's dtype; npformer's model does the same
(``deberta_scale``, ``deberta_log_bucket``), so float64 logits agree to round-off.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.hf import HFFormatError, hf_state_dict, load_pretrained, read_safetensors  # noqa: E402
from npformer.hf import check_savable, save_pretrained, write_safetensors  # noqa: E402
from npformer.hf.deberta_map import deberta_config  # noqa: E402
from npformer.hf.family import _Fields  # noqa: E402
from npformer.models.bert import Bert, BertConfig  # noqa: E402
from npformer.models.deberta import IGNORE_INDEX, Deberta, DebertaConfig  # noqa: E402
from tests.hf.encoder_helpers import hf_mlm_loss, redraw, saved_folders  # noqa: E402
from tests.tolerances import HF_GRAD_RTOL, HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 2468
T = 9
BASE = dict(vocab_size=31, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=17,
            max_position_embeddings=16, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            relative_attention=True, layer_norm_eps=1e-7)
CASES = {  # DeBERTa-v3's settings (buckets, shared keys, normalised table, no absolute positions), and others
    "v3": dict(position_buckets=4, max_relative_positions=12, pos_att_type="p2c|c2p", share_att_key=True,
               norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0),
    "v3-new-head": dict(position_buckets=8, max_relative_positions=16, pos_att_type=["c2p", "p2c"],
                        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                        type_vocab_size=0, legacy=False),
    "v2-c2p-separate": dict(position_buckets=-1, max_relative_positions=3, pos_att_type="c2p", share_att_key=False,
                            norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2),
    "p2c-separate": dict(position_buckets=4, max_relative_positions=6, pos_att_type=["p2c"], share_att_key=False,
                         norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=3),
}


def build_hf_model(case: str, seed: int = SEED):
    torch.manual_seed(seed)
    return redraw(transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**BASE, **CASES[case])), seed)


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


def variant_of(folder):
    """The head spelling a folder's config.json asks for ('legacy' unless legacy is false)."""
    return "legacy" if json.loads((folder / "config.json").read_text()).get("legacy", True) else "lm_predictions"


def load_hf(folder, dtype=torch.float32):
    return transformers.DebertaV2ForMaskedLM.from_pretrained(folder, dtype=dtype).eval()


def inputs(cfg, seed=0, B=3):
    """ids with padding (rows 1 and 2 right-padded, a pad id inside row 0), token types, the mask, labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = cfg.pad_token_id
    ids[0, 3] = cfg.pad_token_id  # attended to: its lookup trains no row
    types = rng.integers(0, cfg.type_vocab_size, (B, T)) if cfg.type_vocab_size else None
    labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, cfg.vocab_size, (B, T)), IGNORE_INDEX)
    labels[mask == 0] = IGNORE_INDEX
    labels[0, 0] = 5
    return ids, types, mask, labels


def hf_logits(hf, ids, types, mask):
    return hf(input_ids=torch.from_numpy(ids), token_type_ids=None if types is None else torch.from_numpy(types),
              attention_mask=torch.from_numpy(mask)).logits


# -- logits and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder)
    assert type(model) is Deberta and not model.training
    ids, types, mask, _ = inputs(model.cfg)
    ours, _ = model.forward(ids, types, mask)
    with torch.no_grad():
        theirs = hf_logits(load_hf(folder), ids, types, mask)
    assert ours.mlm_logits.dtype == F32
    assert_close(ours.mlm_logits, theirs.numpy(), rtol=HF_LOGITS_RTOL[F32], what=f"{case} logits")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_gradient_float64_equal_hf(case, folder_of):
    """float64 logits (padding positions included) at 1e-10, and every parameter's MLM loss gradient at
    HF_GRAD_RTOL against torch autograd through transformers' model."""
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = load_hf(folder, torch.float64)
    hf.train()  # dropout is 0: train mode changes nothing but is what a gradient is taken in
    ids, types, mask, labels = inputs(model.cfg, seed=1)

    outputs, loss = model.forward(ids, types, mask, labels)
    model.backward()
    logits = hf_logits(hf, ids, types, mask)
    hf_loss = hf_mlm_loss(logits, labels)
    hf_loss.backward()

    assert_close(outputs.mlm_logits, logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    ours = hf_state_dict(model, grads=True, variant=variant_of(folder))
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}  # the tied decoder once, as ours
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        scale = None
        if name.endswith(("self.key_proj.bias", "pos_key_proj.bias")) or (
                name == "deberta.encoder.LayerNorm.bias" and model.cfg.pos_att_type == ("c2p",)):
            # zero in exact arithmetic (softmax ignores a shift shared by a row): judged at its layer's scale
            scale = np.abs(theirs[name.rsplit(".", 2)[0] + ".value_proj.weight"]
                           if "proj" in name else theirs["deberta.encoder.rel_embeddings.weight"]).max()
        assert_close(ours[name], grad, rtol=HF_GRAD_RTOL, scale=scale, what=f"{case} d{name}")
    assert np.any(theirs["deberta.encoder.rel_embeddings.weight"] != 0)
    assert np.any(theirs["deberta.embeddings.word_embeddings.weight"][0] != 0)  # the decoder's share of the pad row


def test_hf_modules_are_what_the_map_assumes():
    """transformers' DeBERTa-v2 normalises with torch.nn.LayerNorm (in the input's dtype), keeps EMD off
    (z_steps 0), and its legacy head's decoder is the word table (stored once)."""
    hf = build_hf_model("v3")
    assert hf.deberta.z_steps == 0
    norms = [m for m in hf.modules() if "LayerNorm" in type(m).__name__]
    assert norms and all(type(m) is torch.nn.LayerNorm for m in norms)
    assert hf.cls.predictions.decoder.weight is hf.deberta.embeddings.word_embeddings.weight
    ours = Deberta(DebertaConfig(**{**load_pretrained_cfg("v3"), "dtype": "float32"}))
    names = set(hf_state_dict(ours))
    assert names == set(hf.state_dict()) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def load_pretrained_cfg(case):
    """The DebertaConfig fields config.json of ``case`` reads as (through the family's config map)."""
    doc = {**transformers.DebertaV2Config(**BASE, **CASES[case]).to_dict(), "architectures": ["DebertaV2ForMaskedLM"]}
    return deberta_config(_Fields("load_pretrained", "config.json", doc), "float64").to_dict()


# -- folders written, and read back -----------------------------------------------------------------------
@pytest.mark.parametrize("options, variant", [
    (dict(), None), (dict(pos_att_type=("c2p",), share_att_key=False, position_buckets=None,
                          max_relative_positions=4, position_biased_input=True, type_vocab_size=2), "lm_predictions"),
])
def test_a_saved_folder_loads_in_transformers_with_the_same_logits(options, variant, tmp_path):
    cfg = DebertaConfig(**{**dict(vocab_size=23, max_position=T + 1, n_layer=2, n_head=2, d_model=8, d_ff=11,
                                  dropout=0.1, position_buckets=4, max_relative_positions=8, dtype="float64"),
                           **options})
    model = Deberta(cfg, seed=3)
    rng = np.random.default_rng(5)
    for name, prm in model.named_parameters():
        prm.data[...] = (1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0) + \
            0.3 * rng.standard_normal(prm.shape)
    model.eval()
    save_pretrained(model, tmp_path, variant=variant)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert (doc["model_type"], doc["architectures"], doc["legacy"]) == \
        ("deberta-v2", ["DebertaV2ForMaskedLM"], variant is None)  # the default variant: the legacy head
    hf = load_hf(tmp_path, torch.float64)
    assert hf.config.legacy == (variant is None)
    ids, types, mask, _ = inputs(cfg, seed=2)
    with torch.no_grad():
        theirs = hf_logits(hf, ids, types, mask)
    assert_close(model.forward(ids, types, mask)[0].mlm_logits, theirs.numpy(), rtol=HF_LOGITS_RTOL[F64],
                 what="logits")
    again = load_pretrained(tmp_path, dtype="float64")  # and back: the same config and weights
    assert again.cfg == DebertaConfig(**{**cfg.to_dict(), "dropout": 0.0})
    for name, value in model.state_dict().items():
        assert np.array_equal(again.state_dict()[name], value), name


@pytest.mark.parametrize("case", ["v3", "v3-new-head", "v2-c2p-separate"])
def test_load_save_load_is_bit_for_bit(case, folder_of, tmp_path):
    """A folder transformers wrote, loaded, saved in the same variant and loaded again: the same config and
    parameters, and the same tensors under the same names as transformers stored."""
    folder = folder_of(case)
    first = load_pretrained(folder)
    save_pretrained(first, tmp_path / "again", variant=variant_of(folder))
    assert variant_of(tmp_path / "again") == variant_of(folder)
    second = load_pretrained(tmp_path / "again")
    assert first.cfg == second.cfg
    for name, value in first.state_dict().items():
        assert np.array_equal(value, second.state_dict()[name]), name
    original, saved = read_safetensors(folder / "model.safetensors"), read_safetensors(tmp_path / "again" /
                                                                                        "model.safetensors")
    assert sorted(original) == sorted(saved)
    for name, value in original.items():
        assert value.dtype == saved[name].dtype and np.array_equal(value, saved[name]), name


def test_model_type_and_variant_are_checked_by_name(tmp_path):
    deberta = Deberta(DebertaConfig(vocab_size=11, max_position=8, n_layer=1, n_head=2, d_model=4, d_ff=5))
    bert = Bert(BertConfig(vocab_size=11, max_position=8, n_layer=1, n_head=2, d_model=4, d_ff=5))
    for call, func, arg in [
        (lambda: save_pretrained(deberta, tmp_path, variant="new"), "save_pretrained", "variant"),
        (lambda: save_pretrained(deberta, tmp_path, model_type="bert"), "save_pretrained", "model_type"),
        (lambda: save_pretrained(bert, tmp_path, variant="legacy"), "save_pretrained", "variant"),
        (lambda: hf_state_dict(deberta, variant=True), "hf_state_dict", "variant"),
        (lambda: hf_state_dict(deberta, model_type="deberta"), "hf_state_dict", "model_type"),
    ]:
        with pytest.raises(ValueError, match=f"{func}: argument '{arg}'"):
            call()
    assert not any(tmp_path.iterdir())  # refused before anything is written
    assert set(hf_state_dict(deberta, variant="lm_predictions")) - set(hf_state_dict(deberta)) == \
        {"lm_predictions.lm_head.dense.weight", "lm_predictions.lm_head.dense.bias",
         "lm_predictions.lm_head.LayerNorm.weight", "lm_predictions.lm_head.LayerNorm.bias",
         "lm_predictions.lm_head.bias"}


def test_a_model_with_the_enhanced_mask_decoder_is_not_saved_and_a_loaded_one_has_none(folder_of, tmp_path):
    """HF's DebertaV2ForMaskedLM has no EMD position table: such a model is refused by name before anything is
    written (save_pretrained, check_savable, and hf_state_dict, which would drop the table), the same model
    without it saves; loading gives emd_layers=0,
    so a released checkpoint's mask_predictions.* tensors are dropped, not read as a decoder."""
    small = dict(vocab_size=11, max_position=8, n_layer=2, n_head=2, d_model=4, d_ff=5)
    for emd_layers in (1, 2):
        model = Deberta(DebertaConfig(**small, emd_layers=emd_layers))
        for call in (lambda: save_pretrained(model, tmp_path / "emd"), lambda: check_savable(model)):
            with pytest.raises(ValueError, match=f"save_pretrained: argument 'model' has emd_layers={emd_layers}"):
                call()
        with pytest.raises(ValueError, match=f"hf_state_dict: argument 'model' has emd_layers={emd_layers}"):
            hf_state_dict(model, grads=True)
    assert not any(tmp_path.iterdir())  # refused before anything is written
    plain = Deberta(DebertaConfig(**small))
    check_savable(plain)
    assert load_pretrained(save_pretrained(plain, tmp_path / "plain")).cfg.emd_layers == 0
    tensors = read_safetensors(folder_of("v3") / "model.safetensors")
    tensors["mask_predictions.dense.weight"] = np.ones((12, 12), np.float32)  # a released checkpoint's EMD head
    (tmp_path / "released").mkdir()
    loaded = load_pretrained(_folder(tmp_path / "released", V3, tensors))
    assert loaded.cfg.emd_layers == 0 and "emd_position_embeddings.weight" not in loaded.state_dict()


# -- refusals -----------------------------------------------------------------------------------------------
V3 = {**BASE, **CASES["v3"], "model_type": "deberta-v2", "architectures": ["DebertaV2ForMaskedLM"]}


def _folder(tmp_path, doc, tensors=None):
    (tmp_path / "config.json").write_text(json.dumps(doc))
    if tensors is not None:
        write_safetensors(tmp_path / "model.safetensors", tensors)
    return tmp_path


@pytest.mark.parametrize("field, value", [
    ("relative_attention", False), ("conv_kernel_size", 3), ("embedding_size", 8), ("attention_head_size", 2),
    ("hidden_act", "gelu_new"), ("tie_word_embeddings", False), ("pos_att_type", "p2c|p2p"),
    ("pos_att_type", 7), ("norm_rel_ebd", "layer_norm|scale"), ("legacy", "yes"), ("share_att_key", 1),
    ("position_buckets", 2.5), ("model_type", "deberta"), ("architectures", ["BertForMaskedLM"]),
])
def test_config_refuses_what_npformer_cannot_represent_by_name(field, value, folder_of, tmp_path):
    tensors = read_safetensors(folder_of("v3") / "model.safetensors")
    with pytest.raises(HFFormatError) as err:
        load_pretrained(_folder(tmp_path, {**V3, field: value}, tensors))
    named = "model_type" if field == "architectures" else field
    assert "load_pretrained" in str(err.value) and f"'{named}'" in str(err.value), str(err.value)


def test_config_refuses_buckets_beyond_their_largest_position(tmp_path):
    with pytest.raises(HFFormatError, match="config.json: describes a model npformer cannot build: "
                                            ".*max_relative_positions"):
        load_pretrained(_folder(tmp_path, {**V3, "position_buckets": 16, "max_relative_positions": 8}))


def test_block_size_is_the_absolute_table_where_there_is_one(folder_of):
    with pytest.raises(ValueError, match="load_pretrained: argument 'block_size' expected None or 16"):
        load_pretrained(folder_of("v2-c2p-separate"), block_size=8)
    assert load_pretrained(folder_of("v3"), block_size=8).cfg.max_position == 16  # no absolute table: any length


def test_config_defaults_follow_transformers():
    """Fields left out take transformers' defaults: no buckets, the span from max_position_embeddings,
    separate position projections, absolute positions, no relative LayerNorm, no position terms."""
    doc = {k: v for k, v in V3.items() if k not in ("position_buckets", "max_relative_positions", "pos_att_type",
                                                    "share_att_key", "norm_rel_ebd", "position_biased_input")}
    cfg = deberta_config(_Fields("load_pretrained", "config.json", doc), "float32")
    assert (cfg.position_buckets, cfg.max_relative_positions, cfg.share_att_key, cfg.position_biased_input,
            cfg.norm_rel_ebd, cfg.pos_att_type) == (None, 16, False, True, False, ())


def test_loading_refuses_bad_tensors_by_name(folder_of, tmp_path):
    folder = folder_of("v3")
    tensors = read_safetensors(folder / "model.safetensors")
    doc = json.loads((folder / "config.json").read_text())
    for change, named in [
        (lambda t: t.pop("deberta.encoder.rel_embeddings.weight"), "missing tensor 'deberta.encoder.rel_embeddings"),
        (lambda t: t.__setitem__("deberta.encoder.extra", np.zeros(2, np.float32)), "unexpected tensor "
                                                                                    "'deberta.encoder.extra'"),
        (lambda t: t.__setitem__("cls.predictions.bias", np.zeros(3, np.float32)),
         "tensor 'cls.predictions.bias' has shape"),
        (lambda t: t.__setitem__("cls.predictions.decoder.bias", np.ones(31, np.float32)),
         "tensor 'cls.predictions.decoder.bias' differs"),
        (lambda t: t.__setitem__("lm_predictions.lm_head.bias", t["cls.predictions.bias"]),  # the other spelling
         "unexpected tensor 'lm_predictions.lm_head.bias'"),
    ]:
        bad = dict(tensors)
        change(bad)
        with pytest.raises(HFFormatError, match="load_pretrained: .*model.safetensors: " + named.replace(".", r"\.")):
            load_pretrained(_folder(tmp_path, doc, bad))
    ignored = dict(tensors, **{"mask_predictions.dense.weight": np.zeros((2, 2), np.float32),
                               "deberta.embeddings.position_ids": np.arange(16, dtype=np.float32)[None],
                               "cls.predictions.decoder.weight": tensors["deberta.embeddings.word_embeddings.weight"],
                               "cls.predictions.decoder.bias": tensors["cls.predictions.bias"]})
    loaded = load_pretrained(_folder(tmp_path, doc, ignored))
    assert np.array_equal(loaded.mlm_head.bias.data, tensors["cls.predictions.bias"])
