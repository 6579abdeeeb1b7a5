"""load_pretrained / save_pretrained for BART (BartForConditionalGeneration) against transformers, on tiny random
models built here (no network).

HF initialises biases and final_logits_bias to zero, norms to one and the pad row to zero, which would hide a
misplaced bias, norm or frozen row, so every parameter (and final_logits_bias) is redrawn at random. The sources
are right-padded with a pad id inside a row too; the decoder inputs are the labels shifted right.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.hf import HFFormatError, load_pretrained, read_safetensors, save_pretrained  # noqa: E402
from npformer.hf import write_safetensors  # noqa: E402
from npformer.hf.pretrained import hf_state_dict  # noqa: E402
from npformer.models.bart import Bart, BartConfig  # noqa: E402
from npformer.nn.seq2seq import IGNORE_INDEX, shift_right  # noqa: E402
from tests.hf import encoder_helpers as hf_helpers  # noqa: E402
from tests.hf.encoder_helpers import assert_same_model_and_tensors, padded_ids, saved_folders  # noqa: E402
from tests.tolerances import HF_GRAD_RTOL, HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 2468
S, T = 9, 6

CASES = {
    "bart": lambda: transformers.BartConfig(
        vocab_size=37, d_model=12, encoder_layers=2, decoder_layers=3, encoder_attention_heads=3,
        decoder_attention_heads=3, encoder_ffn_dim=20, decoder_ffn_dim=20, max_position_embeddings=S + 2,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "bart_scaled": lambda: transformers.BartConfig(
        vocab_size=29, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=11, decoder_ffn_dim=11, max_position_embeddings=S,
        scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
}
NORMS = ("layer_norm", "layernorm_embedding")


def build_hf_model(case: str, seed: int = SEED):
    model = hf_helpers.build_hf_model(CASES[case](), transformers.BartForConditionalGeneration, seed, NORMS)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a buffer, not a parameter: redrawn here
        model.final_logits_bias.copy_(0.3 * torch.randn(model.final_logits_bias.shape, generator=g,
                                                        dtype=torch.float64))
    return model


def load_hf(folder, dtype=torch.float32):
    return hf_helpers.load_hf(transformers.BartForConditionalGeneration, folder, dtype)


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


def inputs(cfg, seed=0, B=3):
    """Padded sources and their attention mask, labels (-100 at some places), the shifted decoder inputs."""
    rng = np.random.default_rng(seed)
    src, mask = padded_ids(rng, cfg.vocab_size, cfg.pad_token_id, B, S, low=3, cut=6)
    labels = rng.integers(3, cfg.vocab_size, (B, T))
    labels[1, 4:] = IGNORE_INDEX
    tgt = shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    return src, mask, labels, tgt


def hf_logits(hf, src, mask, tgt):
    return hf(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask),
              decoder_input_ids=torch.from_numpy(tgt)).logits


# -- logits and gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder)
    assert isinstance(model, Bart) and not model.training and model.cfg.dropout == 0.0
    src, mask, _, tgt = inputs(model.cfg)
    ours, _ = model.forward(src, tgt, src_padding_mask=mask == 0)
    with torch.no_grad():
        theirs = hf_logits(load_hf(folder), src, mask, tgt).numpy()
    assert ours.dtype == F32
    assert_close(ours, theirs, rtol=HF_LOGITS_RTOL[F32], what=f"{case} logits")
    memory = model.encode(src, src_padding_mask=mask == 0)  # the decoding path agrees too
    caches = model.make_decoder_caches(src.shape[0], T, S)
    steps = [model.decode(tgt[:, t:t + 1], memory, caches, src_padding_mask=mask == 0) for t in range(T)]
    assert_close(np.concatenate(steps, axis=1), theirs, rtol=HF_LOGITS_RTOL[F32], what=f"{case} cached logits")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_gradient_float64_equal_hf(case, folder_of):
    """float64 logits at 1e-10, and every parameter's loss gradient (final_logits_bias's too) at HF_GRAD_RTOL."""
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = load_hf(folder, torch.float64).train()  # dropout is 0: train mode changes nothing
    hf.final_logits_bias.requires_grad_(True)  # a buffer in HF: its gradient, for ours to be checked against
    src, mask, labels, tgt = inputs(model.cfg, seed=1)

    logits, loss = model.forward(src, tgt, labels, src_padding_mask=mask == 0)
    model.zero_grad()
    model.backward()
    theirs_logits = hf_logits(hf, src, mask, tgt)
    hf_loss = torch.nn.functional.cross_entropy(theirs_logits.flatten(0, 1), torch.from_numpy(labels).flatten(),
                                                ignore_index=IGNORE_INDEX)
    hf_loss.backward()

    assert_close(logits, theirs_logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    ours = hf_state_dict(model, grads=True)
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    theirs["final_logits_bias"] = hf.final_logits_bias.grad.numpy()
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        scale = np.abs(theirs[name.replace("k_proj.bias", "v_proj.bias")]).max() if name.endswith("k_proj.bias") \
            else None  # zero in exact arithmetic: judged at the value bias's scale
        assert_close(ours[name], grad, rtol=HF_GRAD_RTOL, scale=scale, what=f"{case} d{name}")
    assert np.any(theirs["model.shared.weight"][model.cfg.pad_token_id] != 0)  # the head's share, not a lookup's


# -- folders in and out -----------------------------------------------------------------------------------
def _npformer_model(**options):
    model = Bart(BartConfig(vocab_size=31, max_position=S + 1, n_layer=2, n_decoder_layer=1, n_head=2, d_model=8,
                            d_ff=13, dropout=0.1, dtype="float64", **options), seed=3)
    rng = np.random.default_rng(5)
    for name, prm in model.named_parameters():
        prm.data[...] = (1.0 if "norm" in name and name.endswith("weight") else 0.0) + \
            0.3 * rng.standard_normal(prm.shape)
    return model.eval()


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_saved_folder_loads_in_transformers_and_back_with_the_same_logits(scale_embedding, tmp_path):
    model = _npformer_model(scale_embedding=scale_embedding)
    save_pretrained(model, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model_type"] == "bart" and doc["architectures"] == ["BartForConditionalGeneration"]
    src, mask, _, tgt = inputs(model.cfg, seed=2)
    ours, _ = model.forward(src, tgt, src_padding_mask=mask == 0)
    with torch.no_grad():
        theirs = hf_logits(load_hf(tmp_path, torch.float64), src, mask, tgt).numpy()
    assert_close(ours, theirs, rtol=HF_LOGITS_RTOL[F64], what="logits")
    back = load_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(back.forward(src, tgt, src_padding_mask=mask == 0)[0], ours)


@pytest.mark.parametrize("case", list(CASES))
def test_load_save_load_is_bit_for_bit(case, folder_of, tmp_path):
    folder = folder_of(case)
    first = load_pretrained(folder)
    save_pretrained(first, tmp_path / "again")
    assert_same_model_and_tensors(first, load_pretrained(tmp_path / "again"), folder, tmp_path / "again")


def test_stored_tied_tables_are_accepted_and_must_equal_the_shared_one(folder_of, tmp_path):
    folder = folder_of("bart")
    tensors = read_safetensors(folder / "model.safetensors")
    extra = dict(tensors)
    for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
        extra[name] = tensors["model.shared.weight"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors", extra)
    loaded = load_pretrained(tmp_path)
    assert np.array_equal(loaded.shared.weight.data, tensors["model.shared.weight"])
    extra["lm_head.weight"] = extra["lm_head.weight"] + 1  # an untied head: refused by name
    write_safetensors(tmp_path / "model.safetensors", extra)
    with pytest.raises(HFFormatError, match="tensor 'lm_head.weight' differs"):
        load_pretrained(tmp_path)


def _edited(folder, tmp_path, edit):
    doc = json.loads((folder / "config.json").read_text())
    edit(doc)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    return tmp_path


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"), ("activation_function", "gelu_new"), ("tie_word_embeddings", False),
    ("decoder_attention_heads", 4), ("decoder_ffn_dim", 21), ("normalize_before", True),
    ("add_final_layer_norm", True), ("d_model", "12"), ("encoder_layers", 0), ("architectures", ["T5Model"]),
    ("pad_token_id", None), ("eos_token_id", None), ("decoder_start_token_id", None)])
def test_unsupported_configs_are_refused_by_field(field, value, folder_of, tmp_path):
    folder = _edited(folder_of("bart"), tmp_path, lambda doc: doc.__setitem__(field, value))
    shown = "model_type" if field == "architectures" else field
    with pytest.raises(HFFormatError, match=f"field '{shown}'"):
        load_pretrained(folder)


def test_a_missing_or_misshapen_tensor_is_refused_by_name(folder_of, tmp_path):
    folder = folder_of("bart")
    tensors = read_safetensors(folder / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if k != "final_logits_bias"}
    write_safetensors(tmp_path / "model.safetensors", missing)
    with pytest.raises(HFFormatError, match="final_logits_bias"):
        load_pretrained(tmp_path)
    bad = dict(tensors)
    bad["model.decoder.layers.0.encoder_attn.out_proj.weight"] = np.zeros((3, 3), np.float32)
    write_safetensors(tmp_path / "model.safetensors", bad)
    with pytest.raises(HFFormatError, match="model.decoder.layers.0.encoder_attn.out_proj.weight"):
        load_pretrained(tmp_path)


def test_save_refuses_what_bart_cannot_express(tmp_path):
    model = Bart(BartConfig(vocab_size=11, max_position=5, n_layer=1, n_head=2, d_model=4, layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match="save_pretrained: argument 'model' has layer_norm_eps"):
        save_pretrained(model, tmp_path)


def test_block_size_other_than_the_table_is_refused(folder_of):
    with pytest.raises(ValueError, match="argument 'block_size'"):
        load_pretrained(folder_of("bart"), block_size=3)
