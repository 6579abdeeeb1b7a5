"""The DeBERTa-v2 map (``npformer.hf.deberta_map``) against transformers' DebertaV2ForMaskedLM, on tiny random
models built here (no network): logits in float32 and float64, every parameter's gradient in float64, both
spellings of the MLM head, the config.json writer, and the fields npformer refuses by name.

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

from npformer.hf import HFFormatError, read_safetensors, write_safetensors  # noqa: E402
from npformer.hf.deberta_map import (  # noqa: E402
    deberta_config,
    deberta_config_json,
    deberta_hf_state_dict,
    deberta_legacy,
    deberta_rows,
    deberta_state_from_hf,
)
from npformer.hf.pretrained import _Fields  # noqa: E402
from npformer.models.deberta import IGNORE_INDEX, Deberta, DebertaConfig  # noqa: E402
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
    config = transformers.DebertaV2Config(**BASE, **CASES[case])
    model = transformers.DebertaV2ForMaskedLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
            if "LayerNorm" in name and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    made = {}

    def get(case):
        if case not in made:
            made[case] = tmp_path_factory.mktemp(case)
            build_hf_model(case).save_pretrained(made[case])
        return made[case]

    return get


def fields(folder):
    path = folder / "config.json"
    return _Fields("load_deberta", path, json.loads(path.read_text()))


def load(folder, dtype="float32"):
    """What load_pretrained does for a deberta-v2 folder, through the map."""
    f = fields(folder)
    cfg = deberta_config(f, dtype)
    model = Deberta(cfg)
    weights = folder / "model.safetensors"
    state = deberta_state_from_hf("load_deberta", weights, read_safetensors(weights, dtype=dtype), cfg, model,
                                  legacy=deberta_legacy(f))
    model.load_state_dict(state, strict=True)
    return model.eval()


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
    model = load(folder)
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
    model = load(folder, "float64").train()
    hf = load_hf(folder, torch.float64)
    hf.train()  # dropout is 0: train mode changes nothing but is what a gradient is taken in
    ids, types, mask, labels = inputs(model.cfg, seed=1)

    outputs, loss = model.forward(ids, types, mask, labels)
    model.backward()
    logits = hf_logits(hf, ids, types, mask)
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.from_numpy(labels).reshape(-1), ignore_index=IGNORE_INDEX)
    hf_loss.backward()

    assert_close(outputs.mlm_logits, logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    legacy = deberta_legacy(fields(folder))
    ours = deberta_hf_state_dict(model, grads=True, legacy=legacy)
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
    names = {hf_name for hf_name, _, _ in deberta_rows(load_cfg("v3"), legacy=True)}
    assert names == set(hf.state_dict()) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}


def load_cfg(case):
    doc = {**transformers.DebertaV2Config(**BASE, **CASES[case]).to_dict(), "architectures": ["DebertaV2ForMaskedLM"]}
    return deberta_config(_Fields("load_deberta", "config.json", doc), "float64")


# -- the config.json writer and the reverse map --------------------------------------------------------------
@pytest.mark.parametrize("options, legacy", [
    (dict(), True), (dict(pos_att_type=("c2p",), share_att_key=False, position_buckets=None,
                          max_relative_positions=4, position_biased_input=True, type_vocab_size=2), False),
])
def test_a_written_folder_loads_in_transformers_with_the_same_logits(options, legacy, tmp_path):
    cfg = DebertaConfig(**{**dict(vocab_size=23, max_position=T + 1, n_layer=2, n_head=2, d_model=8, d_ff=11,
                                  dropout=0.1, position_buckets=4, max_relative_positions=8, dtype="float64"),
                           **options})
    model = Deberta(cfg, seed=3)
    rng = np.random.default_rng(5)
    for name, prm in model.named_parameters():
        prm.data[...] = (1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0) + \
            0.3 * rng.standard_normal(prm.shape)
    model.eval()
    doc = deberta_config_json(cfg, legacy=legacy)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    write_safetensors(tmp_path / "model.safetensors", deberta_hf_state_dict(model, legacy=legacy),
                      metadata={"format": "pt"})
    hf = load_hf(tmp_path, torch.float64)
    assert hf.config.legacy == legacy
    ids, types, mask, _ = inputs(cfg, seed=2)
    with torch.no_grad():
        theirs = hf_logits(hf, ids, types, mask)
    assert_close(model.forward(ids, types, mask)[0].mlm_logits, theirs.numpy(), rtol=HF_LOGITS_RTOL[F64],
                 what="logits")
    again = load(tmp_path, "float64")  # and back: the same config and weights
    assert again.cfg == DebertaConfig(**{**cfg.to_dict(), "dropout": 0.0})
    for name, value in model.state_dict().items():
        assert np.array_equal(again.state_dict()[name], value), name


# -- refusals -----------------------------------------------------------------------------------------------
V3 = {**BASE, **CASES["v3"], "model_type": "deberta-v2", "architectures": ["DebertaV2ForMaskedLM"]}


@pytest.mark.parametrize("field, value", [
    ("relative_attention", False), ("conv_kernel_size", 3), ("embedding_size", 8), ("attention_head_size", 2),
    ("hidden_act", "gelu_new"), ("tie_word_embeddings", False), ("pos_att_type", "p2c|p2p"),
    ("pos_att_type", 7), ("norm_rel_ebd", "layer_norm|scale"), ("legacy", "yes"), ("share_att_key", 1),
    ("position_buckets", 2.5), ("model_type", "deberta"), ("architectures", ["BertForMaskedLM"]),
])
def test_config_refuses_what_npformer_cannot_represent_by_name(field, value):
    doc = {**V3, field: value}
    with pytest.raises(HFFormatError) as err:
        deberta_config(_Fields("load_deberta", "config.json", doc), "float32")
    named = "model_type" if field == "architectures" else field
    assert "load_deberta" in str(err.value) and f"'{named}'" in str(err.value), str(err.value)


def test_config_refuses_buckets_beyond_their_largest_position():
    doc = {**V3, "position_buckets": 16, "max_relative_positions": 8}
    with pytest.raises(HFFormatError, match="max_relative_positions"):
        deberta_config(_Fields("load_deberta", "config.json", doc), "float32")


def test_config_defaults_follow_transformers():
    """Fields left out take transformers' defaults: no buckets, the span from max_position_embeddings,
    separate position projections, absolute positions, no relative LayerNorm, no position terms."""
    doc = {k: v for k, v in V3.items() if k not in ("position_buckets", "max_relative_positions", "pos_att_type",
                                                    "share_att_key", "norm_rel_ebd", "position_biased_input")}
    cfg = deberta_config(_Fields("load_deberta", "config.json", doc), "float32")
    assert (cfg.position_buckets, cfg.max_relative_positions, cfg.share_att_key, cfg.position_biased_input,
            cfg.norm_rel_ebd, cfg.pos_att_type) == (None, 16, False, True, False, ())


def test_loading_refuses_bad_tensors_by_name(folder_of, tmp_path):
    folder = folder_of("v3")
    tensors = read_safetensors(folder / "model.safetensors")
    cfg = load_cfg("v3")
    model = Deberta(DebertaConfig(**{**cfg.to_dict(), "dtype": "float32"}))
    for change, named in [
        (lambda t: t.pop("deberta.encoder.rel_embeddings.weight"), "deberta.encoder.rel_embeddings.weight"),
        (lambda t: t.__setitem__("deberta.encoder.extra", np.zeros(2, np.float32)), "deberta.encoder.extra"),
        (lambda t: t.__setitem__("cls.predictions.bias", np.zeros(3, np.float32)), "cls.predictions.bias"),
        (lambda t: t.__setitem__("cls.predictions.decoder.bias", np.ones(31, np.float32)),
         "cls.predictions.decoder.bias"),
    ]:
        bad = dict(tensors)
        change(bad)
        with pytest.raises(HFFormatError, match=named.replace(".", r"\.")):
            deberta_state_from_hf("load_deberta", folder / "model.safetensors", bad, cfg, model)
    ignored = dict(tensors, **{"mask_predictions.dense.weight": np.zeros((2, 2), np.float32),
                               "cls.predictions.decoder.bias": tensors["cls.predictions.bias"]})
    assert set(deberta_state_from_hf("load_deberta", folder / "model.safetensors", ignored, cfg, model)) == \
        set(model.state_dict())
