"""load_pretrained / save_pretrained against transformers on tiny random models (no network).

The HF models come from ``conftest.py``: built with a fixed seed, saved, and read back
by both libraries from the same folder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from npformer.generate import generate
from npformer.hf import HFFormatError, load_pretrained, read_generation_config, read_safetensors, save_pretrained
from npformer.hf import write_safetensors
from npformer.hf.pretrained import hf_state_dict
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import Llama, LlamaConfig
from tests.hf.conftest import CASES, LLAMA_CASES, load_hf
from tests.tolerances import HF_GRAD_RTOL, HF_LOGITS_RTOL, assert_close

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
T = 12  # longer than mistral_window's sliding window of 8


def _ids(vocab: int, shape=(2, T), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _hf_tensors(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# -- logits, gradients, generation ---------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_float32_equal_hf(case, hf_folder):
    folder = hf_folder(case)
    model = load_pretrained(folder)
    ids = _ids(model.cfg.vocab_size)
    logits, _ = model.forward(ids)
    assert logits.dtype == F32
    assert_close(logits, _hf_logits(load_hf(folder), ids), rtol=HF_LOGITS_RTOL[F32], what=case)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_float64_equal_hf(case, hf_folder, hf_float64):
    """float64 logits at 1e-10, and every parameter's loss gradient at HF_GRAD_RTOL, against torch autograd."""
    folder = hf_folder(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = load_hf(folder, torch.float64)
    ids, targets = _ids(model.cfg.vocab_size, seed=1), _ids(model.cfg.vocab_size, seed=2)
    targets[0, :3] = -100  # ignored positions, as a prompt's

    logits, loss = model.forward(ids, targets)
    model.backward()
    out = hf(torch.from_numpy(ids)).logits
    hf_loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.from_numpy(targets).reshape(-1),
                                                ignore_index=-100)
    hf_loss.backward()

    assert logits.dtype == F64
    assert_close(logits, out.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what=f"{case} logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what=f"{case} loss")
    ours = hf_state_dict(model, grads=True)
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}  # tied weights once, as ours
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert_close(ours[name], grad, rtol=HF_GRAD_RTOL, what=f"{case} d{name}")


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_float64_patch_changes_precision_only(case, hf_folder, monkeypatch, request):
    """The oracle's float64 patches, applied to a float32 model, leave its logits as they were (to float32 accuracy)."""
    folder = hf_folder(case)
    ids = _ids(200, seed=3) % CASES[case]().vocab_size
    plain = _hf_logits(load_hf(folder), ids)
    request.getfixturevalue("hf_float64")
    patched = _hf_logits(load_hf(folder), ids)
    assert_close(patched, plain, rtol=HF_LOGITS_RTOL[F32], what=case)
    assert not np.array_equal(patched, plain) or case == "gpt2"  # the patch is in effect: float64 angles differ


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_hf(case, hf_folder):
    folder = hf_folder(case)
    model = load_pretrained(folder)
    prompt = _ids(model.cfg.vocab_size, shape=(1, 6), seed=4)
    ours = generate(model, prompt, 32, temperature=0)
    hf = load_hf(folder)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=32, min_new_tokens=32)
    assert ours.shape == (1, 6 + 32)
    np.testing.assert_array_equal(ours, theirs.numpy())


# -- folders in and out --------------------------------------------------------------------------------------
def _npformer_models():
    yield "gpt2", GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, d_model=16), seed=3)
    yield "llama", Llama(LlamaConfig(vocab_size=67, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                                     intermediate_size=40), seed=3)
    yield "llama", Llama(LlamaConfig(vocab_size=67, block_size=32, n_layer=1, n_head=2, n_kv_head=1, d_model=16,
                                     head_dim=6, qkv_bias=True, o_bias=True, mlp_bias=True,
                                     tie_word_embeddings=True), seed=4)
    yield "mistral", Llama(LlamaConfig(vocab_size=53, block_size=32, n_layer=2, n_head=2, n_kv_head=2, d_model=16,
                                       sliding_window=5, rope_theta=1000.0), seed=5)
    yield "qwen2", Llama(LlamaConfig(vocab_size=59, block_size=32, n_layer=2, n_head=4, n_kv_head=1, d_model=16,
                                     qkv_bias=True, tie_word_embeddings=True), seed=6)


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data[...] = p.data + rng.standard_normal(p.shape).astype(p.data.dtype) * 0.1  # biases nonzero
    return model


@pytest.mark.parametrize("index", range(5))
def test_save_pretrained_loads_in_transformers(index, tmp_path):
    model_type, model = list(_npformer_models())[index]
    _randomize(model, index).eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type  # inferred from the model
    ids = _ids(model.cfg.vocab_size, shape=(2, 11), seed=5)
    logits, _ = model.forward(ids)
    hf = load_hf(tmp_path)
    classes = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
    assert type(hf).__name__ == classes[model_type]
    assert_close(_hf_logits(hf, ids), logits, rtol=HF_LOGITS_RTOL[F32], what=model_type)
    stored = read_safetensors(tmp_path)
    tied = getattr(model.cfg, "tie_word_embeddings", True)
    assert ("lm_head.weight" in stored) == (not tied)  # a tied head is not stored twice
    assert sorted(stored) == sorted(k for k in _hf_tensors(hf) if k in stored)


@pytest.mark.parametrize("case", list(CASES))
def test_load_save_load_is_bit_for_bit(case, hf_folder, tmp_path):
    folder = hf_folder(case)
    first = load_pretrained(folder)
    save_pretrained(first, tmp_path / "out")
    second = load_pretrained(tmp_path / "out")
    for (name, a), (name2, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert name == name2 and a.dtype == b.dtype and np.array_equal(a, b), name
    original, saved = read_safetensors(folder), read_safetensors(tmp_path / "out")
    assert set(saved) <= set(original)
    for name, a in saved.items():
        assert np.array_equal(a, original[name]), name  # the same tensors, in HF's names and layouts
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == CASES[case]().model_type


@pytest.mark.parametrize("case", ["gpt2", "llama_bias_tied", "mistral_window"])
def test_bfloat16_checkpoint_loads_as_torch_float(case, hf_folder):
    folder = hf_folder(case, "bfloat16")
    raw = (folder / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}  # stored as bf16 by torch
    model = load_pretrained(folder)
    theirs = _hf_tensors(load_hf(folder, torch.bfloat16))
    for name, a in hf_state_dict(model).items():
        assert a.dtype == np.float32 and np.array_equal(a, theirs[name]), name


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa"])
def test_sharded_folder_loads(case, hf_folder):
    folder = hf_folder(case, "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded, single = load_pretrained(folder), load_pretrained(hf_folder(case))
    for (name, a), b in zip(sharded.state_dict().items(), single.state_dict().values()):
        assert np.array_equal(a, b), name


def test_save_pretrained_dtype_and_source(hf_folder, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(hf_folder("llama_gqa"), source)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7], "do_sample": False}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).write_text(json.dumps({"name": name}))
    model = load_pretrained(source)
    save_pretrained(model, tmp_path / "bf16", dtype="bfloat16", source=source)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "bf16" / name).read_bytes() == (source / name).read_bytes()
    assert read_generation_config(tmp_path / "bf16") == {"eos_token_id": [5, 7], "do_sample": False}
    again = load_pretrained(tmp_path / "bf16", dtype="float64")
    theirs = _hf_tensors(load_hf(source).to(torch.bfloat16))  # torch's own rounding to bf16
    for name, a in hf_state_dict(again).items():
        assert np.array_equal(a, theirs[name].astype(np.float64)), name


def test_model_type_given_and_checked(tmp_path):
    _, gpt = next(_npformer_models())
    with pytest.raises(ValueError, match="save_pretrained: argument 'model_type'"):
        save_pretrained(gpt, tmp_path, model_type="llama")
    llama = list(_npformer_models())[1][1]
    save_pretrained(llama, tmp_path / "m", model_type="mistral")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "mistral"
    assert load_pretrained(tmp_path / "m").cfg.sliding_window is None  # a null sliding_window: full attention
    qwen = list(_npformer_models())[4][1]
    with pytest.raises(ValueError, match="'llama' has one attention_bias"):
        save_pretrained(qwen, tmp_path / "q", model_type="llama")
    with pytest.raises(TypeError, match="save_pretrained: argument 'model'"):
        save_pretrained(object(), tmp_path)


# -- configs: the forms accepted and the fields refused ---------------------------------------------------------
def _edited(folder, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if edit_config is not None:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = read_safetensors(out / "model.safetensors")
        edit_tensors(tensors)
        write_safetensors(out / "model.safetensors", tensors)
    return out


def _old_style_rope(config):
    theta = config.pop("rope_parameters")["rope_theta"]
    config["rope_theta"] = theta
    config["rope_scaling"] = None


@pytest.mark.parametrize("edit", [_old_style_rope, lambda c: c.update(rope_scaling={"type": "default"})])
def test_rope_theta_top_level_or_in_rope_parameters(edit, hf_folder, tmp_path):
    folder = hf_folder("llama_gqa")
    model = load_pretrained(_edited(folder, tmp_path, edit))
    assert model.cfg.rope_theta == 500000.0 == load_pretrained(folder).cfg.rope_theta


GPT2_REFUSED = [
    ("activation_function", "relu"), ("activation_function", "gelu"), ("n_inner", 96), ("layer_norm_epsilon", 1e-6),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("tie_word_embeddings", False),
    ("scale_attn_weights", False), ("n_embd", "32"),
]
LLAMA_REFUSED = [
    ("llama_gqa", "hidden_act", "gelu"),
    ("llama_gqa", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    ("llama_gqa", "rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("llama_gqa", "rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
    ("llama_gqa", "num_hidden_layers", 0),
    ("llama_gqa", "model_type", "bert"),
    ("llama_gqa", "max_position_embeddings", "64"),
    ("llama_gqa", "rope_theta", -1.0),
    ("llama_gqa", "rope_theta", 10000.0),  # disagrees with rope_parameters' 500000
]


@pytest.mark.parametrize("field,value", GPT2_REFUSED)
def test_gpt2_config_refused_by_name(field, value, hf_folder, tmp_path):
    folder = _edited(hf_folder("gpt2"), tmp_path, lambda c: c.update({field: value}))
    with pytest.raises(HFFormatError, match=f"load_pretrained: .*config.json: field '{field}'"):
        load_pretrained(folder)


@pytest.mark.parametrize("case,field,value", LLAMA_REFUSED)
def test_llama_config_refused_by_name(case, field, value, hf_folder, tmp_path):
    folder = _edited(hf_folder(case), tmp_path, lambda c: c.update({field: value}))
    with pytest.raises(HFFormatError, match=f"load_pretrained: .*config.json: field '{field}'") as err:
        load_pretrained(folder)
    if isinstance(value, dict):
        assert repr(value.get("rope_type", value.get("type"))) in str(err.value)  # the rope type is named


def test_config_npformer_cannot_build_named(hf_folder, tmp_path):
    folder = _edited(hf_folder("llama_gqa"), tmp_path, lambda c: c.update(num_key_value_heads=4))  # 6 heads over 4
    with pytest.raises(HFFormatError, match="config.json: describes a model npformer cannot build: .*n_kv_head"):
        load_pretrained(folder)


def test_float64_weights_beyond_float32_refused(hf_folder, tmp_path):
    def big(t):
        t["model.norm.weight"] = np.full(t["model.norm.weight"].shape, 1e300)
    folder = _edited(hf_folder("llama_gqa"), tmp_path, edit_tensors=big)
    with pytest.raises(HFFormatError, match="tensor 'model.norm.weight' holds values beyond the range of float32"):
        load_pretrained(folder)
    assert load_pretrained(folder, dtype="float64").norm.weight.data[0] == 1e300


def test_mistral_null_sliding_window_is_full_attention(hf_folder, tmp_path):
    folder = _edited(hf_folder("mistral_window"), tmp_path, lambda c: c.update(sliding_window=None))
    model = load_pretrained(folder)
    assert model.cfg.sliding_window is None and load_pretrained(hf_folder("mistral_window")).cfg.sliding_window == 8
    ids = _ids(model.cfg.vocab_size, seed=6)
    assert_close(model.forward(ids)[0], _hf_logits(load_hf(folder), ids), rtol=HF_LOGITS_RTOL[F32])


def _drop(name):
    return lambda t: t.pop(name)


def _add(name, value):
    return lambda t: t.update({name: value})


def _reshape(name):
    return lambda t: t.update({name: t[name][:-1]})


def _as_int(name):
    return lambda t: t.update({name: t[name].astype(np.int32)})


TENSOR_ERRORS = [
    ("gpt2", _drop("transformer.h.1.attn.c_attn.bias"), "missing tensor 'transformer.h.1.attn.c_attn.bias'"),
    ("gpt2", _add("transformer.h.0.attn.extra", np.zeros(3, np.float32)),
     "unexpected tensor 'transformer.h.0.attn.extra'"),
    ("gpt2", _reshape("transformer.h.0.mlp.c_fc.weight"), "tensor 'transformer.h.0.mlp.c_fc.weight' has shape"),
    ("gpt2", _as_int("transformer.ln_f.bias"), "tensor 'transformer.ln_f.bias' has dtype int32"),
    ("gpt2", _add("lm_head.weight", np.zeros((97, 32), np.float32)), "tensor 'lm_head.weight' differs"),
    ("llama_gqa", _drop("lm_head.weight"), "missing tensor 'lm_head.weight'"),
    ("llama_gqa", _reshape("model.layers.1.self_attn.k_proj.weight"),
     "'model.layers.1.self_attn.k_proj.weight' has shape"),
    ("qwen2", _drop("model.layers.0.self_attn.v_proj.bias"), "missing tensor 'model.layers.0.self_attn.v_proj.bias'"),
    ("qwen2", _add("model.layers.0.self_attn.o_proj.bias", np.zeros(32, np.float32)), "unexpected tensor"),
    ("mistral_window", _as_int("model.norm.weight"), "'model.norm.weight' has dtype int32"),
]


@pytest.mark.parametrize("case,edit,message", TENSOR_ERRORS)
def test_tensor_errors_named(case, edit, message, hf_folder, tmp_path):
    folder = _edited(hf_folder(case), tmp_path, edit_tensors=edit)
    with pytest.raises(HFFormatError, match="load_pretrained: .*model.safetensors: ") as err:
        load_pretrained(folder)
    assert message in str(err.value)


def test_known_buffers_and_old_names_ignored(hf_folder, tmp_path):
    """GPT-2's attn.bias / attn.masked_bias buffers, unprefixed GPT-2 names and LLaMA's rotary inv_freq load."""
    gpt2 = hf_folder("gpt2")

    def old_gpt2(t):
        for name in list(t):
            t[name[len("transformer."):]] = t.pop(name)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        t["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    model = load_pretrained(_edited(gpt2, tmp_path, edit_tensors=old_gpt2))
    for a, b in zip(model.state_dict().values(), load_pretrained(gpt2).state_dict().values()):
        assert np.array_equal(a, b)
    llama = load_pretrained(_edited(hf_folder("qwen2"), tmp_path / "q", edit_tensors=_add(
        "model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(4, np.float32))))
    assert llama.cfg.qkv_bias and not llama.cfg.o_bias


def test_folder_errors(tmp_path, hf_folder):
    with pytest.raises(HFFormatError, match="is not a folder"):
        load_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFFormatError, match="config.json: no such file"):
        load_pretrained(tmp_path / "empty")
    folder = _edited(hf_folder("gpt2"), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="holds neither model.safetensors"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(HFFormatError, match="config.json: is not readable JSON"):
        load_pretrained(folder)
    with pytest.raises(TypeError, match="load_pretrained: argument 'path'"):
        load_pretrained(3)
    with pytest.raises(ValueError, match="load_pretrained: argument 'dtype'"):
        load_pretrained(folder, dtype="float16")
    with pytest.raises(ValueError, match="load_pretrained: argument 'block_size'"):
        load_pretrained(folder, block_size=0)
    with pytest.raises(ValueError, match="load_pretrained: argument 'block_size' expected None or n_positions = 64"):
        load_pretrained(hf_folder("gpt2"), block_size=32)


def test_block_size_given(hf_folder):
    model = load_pretrained(hf_folder("qwen2"), block_size=20)
    full = load_pretrained(hf_folder("qwen2"))
    assert model.cfg.block_size == 20 and full.cfg.block_size == 64
    ids = _ids(model.cfg.vocab_size, shape=(1, 20))
    assert np.array_equal(model.forward(ids)[0], full.forward(ids)[0])


# -- generation_config.json -----------------------------------------------------------------------------------
def test_read_generation_config(tmp_path):
    assert read_generation_config(tmp_path) == {}
    doc = {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": None, "max_new_tokens": 20, "do_sample": True,
           "temperature": 0.7, "top_k": 50, "top_p": 0.9, "transformers_version": "5.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(doc))
    assert read_generation_config(tmp_path) == {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize("field,value", [
    ("eos_token_id", "2"), ("eos_token_id", [1, -2]), ("eos_token_id", []), ("bos_token_id", 1.0),
    ("pad_token_id", True), ("max_new_tokens", -1), ("do_sample", 1), ("temperature", "hot"), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5),
])
def test_generation_config_bad_field_named(field, value, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(HFFormatError, match=f"read_generation_config: .*generation_config.json: field '{field}'"):
        read_generation_config(tmp_path)


def test_bad_arguments_named(tmp_path):
    _, gpt = next(_npformer_models())
    for call, func, arg, error in [
        (lambda: save_pretrained(gpt, 3), "save_pretrained", "path", TypeError),
        (lambda: save_pretrained(gpt, tmp_path, dtype="float16"), "save_pretrained", "dtype", ValueError),
        (lambda: save_pretrained(gpt, tmp_path, source=tmp_path / "absent"), "save_pretrained", "source", ValueError),
        (lambda: save_pretrained(gpt, tmp_path, model_type=2), "save_pretrained", "model_type", ValueError),
        (lambda: read_generation_config(None), "read_generation_config", "path", TypeError),
        (lambda: read_safetensors(tmp_path, with_metadata=1), "read_safetensors", "with_metadata", TypeError),
    ]:
        with pytest.raises(error, match=f"{func}: argument '{arg}'"):
            call()
    assert not (tmp_path / "config.json").exists()  # nothing written by a refused call
    no_bias = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, d_model=4, bias=False))
    with pytest.raises(ValueError, match="save_pretrained: argument 'model' has bias=False"):
        save_pretrained(no_bias, tmp_path)


# -- folders saved over, and what transformers defaults to ---------------------------------------------------
def test_saving_over_a_sharded_folder_replaces_its_weights(hf_folder, tmp_path):
    """A folder saved sharded, then saved again by npformer: both libraries read the new weights (the old index
    and shards are removed; and a single file wins over an index, as in transformers)."""
    folder = tmp_path / "m"
    shutil.copytree(hf_folder("llama_gqa", "sharded"), folder)
    model = load_pretrained(folder)
    for p in model.parameters():
        p.data *= 0.5
    save_pretrained(model, folder)
    assert not (folder / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    back = load_pretrained(folder)
    ids = _ids(model.cfg.vocab_size)
    ours, _ = back.forward(ids)
    assert_close(ours, model.forward(ids)[0], rtol=HF_LOGITS_RTOL[F32], what="reloaded")
    assert_close(ours, _hf_logits(load_hf(folder), ids), rtol=HF_LOGITS_RTOL[F32], what="transformers")


def test_a_single_file_wins_over_an_index(hf_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(hf_folder("llama_gqa", "sharded"), folder)
    shutil.copyfile(hf_folder("llama_bias_tied") / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(HFFormatError, match="model.safetensors"):  # the single file is read: another model's
        load_pretrained(folder)


def test_mistral_without_a_sliding_window_key_gets_transformers_default(hf_folder, tmp_path):
    import transformers

    folder = _edited(hf_folder("mistral_window"), tmp_path, lambda c: c.pop("sliding_window"))
    assert load_pretrained(folder).cfg.sliding_window == 4096 == transformers.MistralConfig().sliding_window
    null = tmp_path / "null"
    shutil.copytree(folder, null)
    config = json.loads((null / "config.json").read_text()) | {"sliding_window": None}
    (null / "config.json").write_text(json.dumps(config))
    assert load_pretrained(null).cfg.sliding_window is None  # null: full attention


@pytest.mark.parametrize("max_window_layers, refused", [(2, False), (28, False), (1, True), (0, True)])
def test_qwen2_sliding_window_on_no_layer_is_full_attention(hf_folder, tmp_path, max_window_layers, refused):
    """use_sliding_window with max_window_layers >= num_hidden_layers windows no layer: logits as transformers'."""
    edit = lambda c: c.update(use_sliding_window=True, sliding_window=4, max_window_layers=max_window_layers)  # noqa
    folder = _edited(hf_folder("qwen2"), tmp_path, edit)
    if refused:
        with pytest.raises(HFFormatError, match="use_sliding_window"):
            load_pretrained(folder)
        return
    model = load_pretrained(folder)
    ids = _ids(model.cfg.vocab_size)
    assert_close(model.forward(ids)[0], _hf_logits(load_hf(folder), ids), rtol=HF_LOGITS_RTOL[F32], what="qwen2")


def test_save_pretrained_carries_the_chat_template_and_special_ids(hf_folder, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(hf_folder("qwen2"), source)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = json.loads((source / "config.json").read_text()) | {"bos_token_id": 3, "eos_token_id": [4, 5]}
    (source / "config.json").write_text(json.dumps(config))
    save_pretrained(load_pretrained(source), tmp_path / "out", source=source)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == (source / "chat_template.jinja").read_text()
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["bos_token_id"] == 3 and saved["eos_token_id"] == [4, 5]
