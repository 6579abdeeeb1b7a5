"""load_pretrained / save_pretrained for T5 (T5ForConditionalGeneration, v1.0 and v1.1) against transformers, on
tiny random models built here (no network).

HF initialises norms to one, which would hide a misplaced norm, so every parameter is redrawn at random
(norm weights around 1). v1.0: ReLU feed forward, the head tied to the shared table with the
d_model^-1/2 scaling; v1.1: gated gelu_new feed forward and a head of its own, unscaled (transformers 5
ties every T5 head at construction, so the test unties it). The inputs carry source padding, S != T,
and labels with ignored (-100) places.
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
from npformer.models.t5 import T5, T5Config  # noqa: E402
from tests.hf.encoder_helpers import (assert_grads_equal_hf, assert_same_model_and_tensors, redraw,  # noqa: E402
                                     saved_folders)
from tests.tolerances import HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 2468
S, T = 9, 7

CASES = {
    "v1_0": lambda: transformers.T5Config(
        vocab_size=37, d_model=12, d_kv=5, d_ff=20, num_layers=2, num_decoder_layers=3, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=6, feed_forward_proj="relu",
        dropout_rate=0.0, tie_word_embeddings=True),
    "v1_1": lambda: transformers.T5Config(
        vocab_size=41, d_model=10, d_kv=4, d_ff=14, num_layers=3, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=6, relative_attention_max_distance=5, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=False),
}


def build_hf_model(case: str, seed: int = SEED):
    torch.manual_seed(seed)
    config = CASES[case]()
    config._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(config)
    if case == "v1_1":  # a head of its own (transformers 5 ties it at construction)
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
        model.config.tie_word_embeddings = False
    return redraw(model, seed, norm_names=("layer_norm",))


def load_hf(folder, dtype=torch.float32):
    return transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=dtype,
                                                                  attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    return saved_folders(tmp_path_factory, build_hf_model)


def inputs(cfg, seed=0, B=3):
    """Source ids and HF's attention mask (row 1 padded from 5, row 2 from 2), decoder inputs, labels."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, cfg.vocab_size, (B, S))
    mask = np.ones((B, S), np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    src[mask == 0] = cfg.pad_token_id
    tgt = rng.integers(0, cfg.vocab_size, (B, T))
    tgt[:, 0] = cfg.decoder_start_token_id
    labels = rng.integers(0, cfg.vocab_size, (B, T))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[0, 0] = 3
    return src, mask, tgt, labels


def hf_logits(hf, src, mask, tgt):
    return hf(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask),
              decoder_input_ids=torch.from_numpy(tgt)).logits


@pytest.mark.parametrize("case", list(CASES))
def test_config_is_read_as_written(case, folder_of):
    model = load_pretrained(folder_of(case))
    cfg, hf = model.cfg, CASES[case]()
    assert not model.training and cfg.dropout == 0.0
    assert (cfg.d_model, cfg.d_kv, cfg.n_head, cfg.num_layers, cfg.num_decoder_layers) == (
        hf.d_model, hf.d_kv, hf.num_heads, hf.num_layers, hf.num_decoder_layers)
    assert cfg.feed_forward_proj == hf.feed_forward_proj
    assert cfg.tie_word_embeddings == cfg.resolved_scale_decoder_outputs == (case == "v1_0")
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder)
    src, mask, tgt, _ = inputs(model.cfg)
    ours, _ = model.forward(src, tgt, src_padding_mask=mask == 0)
    with torch.no_grad():
        theirs = hf_logits(load_hf(folder), src, mask, tgt).numpy()
    assert ours.dtype == F32
    assert_close(ours, theirs, rtol=HF_LOGITS_RTOL[F32], what=f"{case} logits")


def test_the_float64_patch_changes_precision_only(folder_of, hf_t5_float64):
    """The patched norm agrees with HF's own in float32, where both compute the same thing."""
    folder = folder_of("v1_0")
    src, mask, tgt, _ = inputs(load_pretrained(folder).cfg)
    with torch.no_grad():
        patched = hf_logits(load_hf(folder), src, mask, tgt).numpy()
    model = load_pretrained(folder)
    assert_close(model.forward(src, tgt, src_padding_mask=mask == 0)[0], patched, rtol=HF_LOGITS_RTOL[F32],
                 what="patched")


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_every_gradient_float64_equal_hf(case, folder_of, hf_t5_float64):
    """float64 logits and loss at 1e-10, every parameter's gradient at HF_GRAD_RTOL (HF's names)."""
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = load_hf(folder, torch.float64)
    hf.train()  # dropout is 0: train mode changes nothing but is what a gradient is taken in
    src, mask, tgt, labels = inputs(model.cfg, seed=1)

    logits, loss = model.forward(src, tgt, labels, src_padding_mask=mask == 0)
    model.backward()
    out = hf(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask),
             decoder_input_ids=torch.from_numpy(tgt), labels=torch.from_numpy(labels))
    out.loss.backward()

    assert_close(logits, out.logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, out.loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    theirs = assert_grads_equal_hf(hf_state_dict(model, grads=True), hf, case)
    n_enc, n_dec = model.cfg.num_layers, model.cfg.num_decoder_layers
    per_ff = 3 if case == "v1_1" else 2
    # shared; per block two norms (three in the decoder), q k v o (twice in the decoder), the feed forward;
    # two position tables, two final norms; lm_head in v1.1
    assert len(theirs) == 1 + n_enc * (6 + per_ff) + n_dec * (11 + per_ff) + 4 + (case == "v1_1")
    table = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert np.any(theirs[table] != 0)  # the position tables are trained, through every layer's bias


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_decoding_equals_hf_generate(case, folder_of):
    """npformer's cached greedy steps pick the tokens transformers' generate picks."""
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64")
    hf = load_hf(folder, torch.float64)
    src, mask, _, _ = inputs(model.cfg, seed=2)
    n_new = 6
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=n_new, min_new_tokens=n_new, num_beams=1,
                          decoder_start_token_id=model.cfg.decoder_start_token_id,
                          use_cache=False).numpy()  # transformers' cache sizes itself by the encoder's depth
    memory = model.encode(src, src_padding_mask=mask == 0)
    caches = model.make_decoder_caches(3, n_new, S)
    out = np.full((3, 1), model.cfg.decoder_start_token_id)
    for _ in range(n_new):
        logits = model.decode(out[:, -1:], memory, caches, src_padding_mask=mask == 0)
        out = np.concatenate([out, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out[:, 1:])) > 1  # the weights are not so degenerate that any decoder agrees


# -- saving --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_load_save_load_is_bit_for_bit(case, folder_of, tmp_path):
    folder = folder_of(case)
    first = load_pretrained(folder)
    again = save_pretrained(first, tmp_path / "again")
    assert_same_model_and_tensors(first, load_pretrained(again), folder, again)


@pytest.mark.parametrize("fields", [dict(feed_forward_proj="relu"),
                                    dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                                    dict(feed_forward_proj="gated-gelu", scale_decoder_outputs=False)])
def test_a_saved_npformer_model_loads_in_transformers_with_equal_logits(fields, tmp_path):
    cfg = T5Config(vocab_size=23, d_model=8, d_kv=3, d_ff=9, num_layers=2, num_decoder_layers=1, n_head=2,
                   relative_attention_num_buckets=6, relative_attention_max_distance=4, dropout=0.0, dtype="float64",
                   **fields)
    model = T5(cfg, seed=3)
    rng = np.random.default_rng(0)
    for name, prm in model.named_parameters():
        prm.data[...] = (1.0 if name.endswith("norm.weight") else 0.0) + 0.4 * rng.standard_normal(prm.shape)
    model.eval()
    folder = save_pretrained(model, tmp_path / "out")
    hf = load_hf(folder, torch.float64)
    assert hf.config.scale_decoder_outputs == cfg.resolved_scale_decoder_outputs
    src, mask, tgt, _ = inputs(cfg)
    ours, _ = model.forward(src, tgt, src_padding_mask=mask == 0)
    with torch.no_grad():
        theirs = hf_logits(hf, src, mask, tgt).numpy()
    assert_close(ours, theirs, rtol=1e-6, what="logits")  # HF's norm takes its mean square in float32
    assert load_pretrained(folder, dtype="float64").cfg == cfg


# -- refusals ---------------------------------------------------------------------------------------------
def copy_folder(folder, tmp_path, config=None, tensors=None):
    out = tmp_path / "edited"
    out.mkdir()
    doc = json.loads((folder / "config.json").read_text())
    doc.update(config or {})
    (out / "config.json").write_text(json.dumps({k: v for k, v in doc.items() if v != "DROP"}))
    stored = read_safetensors(folder / "model.safetensors")
    stored.update(tensors or {})
    write_safetensors(out / "model.safetensors", {k: v for k, v in stored.items() if v is not None},
                      metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("config, named", [
    (dict(feed_forward_proj="gated-silu"), "feed_forward_proj"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(is_encoder_decoder=False), "is_encoder_decoder"),
    (dict(num_heads=0), "num_heads"),
    (dict(d_kv="5"), "d_kv"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(architectures=["BertForMaskedLM"]), "model_type"),
    (dict(d_model="DROP"), "d_model"),
    (dict(dense_act_fn="gelu"), "dense_act_fn"),  # transformers runs these two over feed_forward_proj's
    (dict(dense_act_fn="silu"), "dense_act_fn"),
    (dict(is_gated_act=True), "is_gated_act"),
    (dict(dense_act_fn="relu"), "v1_1:dense_act_fn"),
    (dict(dense_act_fn="gelu"), "v1_1:dense_act_fn"),
    (dict(is_gated_act=False), "v1_1:is_gated_act"),
    (dict(pad_token_id=None), "pad_token_id"),  # null: no id to pad or stop with (transformers: never stop)
    (dict(eos_token_id=None), "eos_token_id"),
])
def test_a_config_npformer_cannot_compute_is_refused_by_field(config, named, folder_of, tmp_path):
    variant, _, named = named.rpartition(":")
    folder = copy_folder(folder_of(variant or "v1_0"), tmp_path, config=config)
    with pytest.raises(HFFormatError, match=f"config.json: field '{named}'"):
        load_pretrained(folder)


def test_bad_tensors_are_refused_by_name(folder_of, tmp_path):
    folder = folder_of("v1_0")
    stored = read_safetensors(folder / "model.safetensors")
    shared = stored["shared.weight"]
    cases = [({"encoder.embed_tokens.weight": shared + 1}, "'encoder.embed_tokens.weight' differs"),
             ({"lm_head.weight": shared * 2}, "'lm_head.weight' differs"),
             ({"encoder.final_layer_norm.weight": None}, "missing tensor 'encoder.final_layer_norm.weight'"),
             ({"encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((3, 3), np.float32)},
              "tensor 'encoder.block.0.layer.0.SelfAttention.q.weight' has shape"),
             ({"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": np.zeros((8, 3), np.float32)},
              "unexpected tensor 'encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight'")]
    for i, (tensors, message) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        edited = copy_folder(folder, tmp_path / str(i), tensors=tensors)
        with pytest.raises(HFFormatError, match=message):
            load_pretrained(edited)


def test_copies_of_the_shared_table_and_the_unused_cross_table_are_accepted(folder_of, tmp_path):
    folder = folder_of("v1_0")
    shared = read_safetensors(folder / "model.safetensors")["shared.weight"]
    edited = copy_folder(folder, tmp_path, tensors={
        "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared, "lm_head.weight": shared,
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": np.ones((8, 3), np.float32)})
    model, plain = load_pretrained(edited), load_pretrained(folder)
    for name, value in plain.state_dict().items():
        assert np.array_equal(model.state_dict()[name], value), name


def test_block_size_is_refused_for_t5(folder_of):
    with pytest.raises(ValueError, match="load_pretrained: argument 'block_size' expected None for t5"):
        load_pretrained(folder_of("v1_0"), block_size=16)
