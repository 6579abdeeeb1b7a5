"""load_pretrained / save_pretrained for Mamba (MambaForCausalLM) against transformers, on tiny random models
built here (no network).

HF initialises norms to one and D to one, which would hide a misplaced norm or skip, so every parameter is
redrawn at random (A_log as the log of a decay rate). Cases: a tied head with the "auto" dt rank; an untied
head with in/out biases, no convolution bias, a dt rank of its own and a 2-tap convolution.

The float64 oracle: transformers' Mamba computes parts in float32 whatever the model's dtype (RMSNorm casts
its input, A, D and the dt bias are taken ``.float()``, the residual is kept in float32, the logits are
returned ``.float()``). ``hf_float64`` keeps those in the model's dtype for one test: RMSNorm's forward in
the input's dtype, ``Tensor.float`` a no-op on float64 tensors, ``residual_in_fp32`` off. A test checks
that the patched model agrees with the unpatched one in float32, so the patch changes precision only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers.models.mamba import modeling_mamba  # noqa: E402

from npformer.generate import generate  # noqa: E402
from npformer.hf import HFFormatError, load_pretrained, read_safetensors, save_pretrained  # noqa: E402
from npformer.hf import write_safetensors  # noqa: E402
from npformer.hf.mamba_map import DEFAULT_BLOCK_SIZE  # noqa: E402
from npformer.ops._checks import MAX_POSITION  # noqa: E402
from npformer.models.mamba import MambaConfig, MambaLM  # noqa: E402
from tests.tolerances import HF_GRAD_RTOL, HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 1357
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    "tied": lambda: transformers.MambaConfig(
        vocab_size=37, hidden_size=16, state_size=5, num_hidden_layers=2, conv_kernel=3, expand=2,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, **NO_SPECIAL_TOKENS),
    "untied_biases": lambda: transformers.MambaConfig(
        vocab_size=29, hidden_size=12, state_size=3, num_hidden_layers=3, conv_kernel=2, expand=3, time_step_rank=4,
        use_bias=True, use_conv_bias=False, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        **NO_SPECIAL_TOKENS),
}


def build_hf_model(case: str, seed: int = SEED):
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(CASES[case]()).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("A_log"):
                prm.copy_(torch.log(torch.rand_like(prm) * 2.5 + 0.3))
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                prm.copy_(1.0 + 0.3 * torch.randn_like(prm))
            else:
                prm.copy_(0.4 * torch.randn_like(prm))
    return model


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    made = {}

    def get(case):
        if case not in made:
            made[case] = tmp_path_factory.mktemp(case)
            build_hf_model(case).save_pretrained(made[case])
        return made[case]

    return get


@pytest.fixture
def hf_float64(monkeypatch):
    """transformers' Mamba computed in float64 throughout (see the module's notes)."""
    plain_float = torch.Tensor.float

    def rms_in_input_dtype(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else plain_float(self, *a, **k))
    monkeypatch.setattr(modeling_mamba.MambaRMSNorm, "forward", rms_in_input_dtype)

    def load(folder):
        model = transformers.MambaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        for block in model.backbone.layers:
            block.residual_in_fp32 = False
        return model

    return load


def ids_of(vocab_size, B=2, T=9, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, (B, T))


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_parameters_load(case, folder_of):
    model = load_pretrained(folder_of(case))
    hf = build_hf_model(case)
    cfg = hf.config
    assert isinstance(model, MambaLM) and not model.training
    assert model.cfg == MambaConfig(
        vocab_size=cfg.vocab_size, block_size=DEFAULT_BLOCK_SIZE, n_layer=cfg.num_hidden_layers,
        d_model=cfg.hidden_size, d_state=cfg.state_size, expand=cfg.expand, d_conv=cfg.conv_kernel,
        dt_rank=None if case == "tied" else 4, layer_norm_epsilon=cfg.layer_norm_epsilon, use_bias=cfg.use_bias,
        use_conv_bias=cfg.use_conv_bias, tie_word_embeddings=cfg.tie_word_embeddings)
    ours = model.state_dict()
    for name, prm in hf.named_parameters():
        assert np.array_equal(ours[name.removeprefix("backbone.")], prm.detach().numpy()), name


@pytest.mark.parametrize("case", list(CASES))
def test_float32_logits_equal_transformers(case, folder_of):
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float32")
    ids = ids_of(model.cfg.vocab_size)
    logits, _ = model.forward(ids)
    assert logits.dtype == F32
    assert_close(logits, hf_logits(build_hf_model(case), ids), rtol=HF_LOGITS_RTOL[F32], what="logits")


@pytest.mark.parametrize("case", list(CASES))
def test_float64_logits_and_gradients_equal_transformers(case, folder_of, hf_float64):
    folder = folder_of(case)
    model = load_pretrained(folder, dtype="float64").train()
    hf = hf_float64(folder)
    ids = ids_of(model.cfg.vocab_size, seed=1)
    targets = ids_of(model.cfg.vocab_size, seed=2)
    targets[0, :3] = -100
    logits, loss = model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    hf_out = hf(torch.from_numpy(ids), use_cache=False).logits
    assert hf_out.dtype == torch.float64
    assert_close(logits, hf_out.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    hf_loss = F.cross_entropy(hf_out.flatten(0, 1), torch.from_numpy(targets).flatten(), ignore_index=-100)
    hf_loss.backward()
    assert abs(loss - hf_loss.item()) <= HF_LOGITS_RTOL[F64] * abs(hf_loss.item())
    ours = dict(model.named_parameters())
    for name, prm in hf.named_parameters():
        if prm.grad is None:  # a tied head is the embedding
            continue
        assert_close(ours[name.removeprefix("backbone.")].grad, prm.grad.numpy(), rtol=HF_GRAD_RTOL, what=name)


def test_the_float64_patch_changes_precision_only(folder_of, monkeypatch):
    ids = ids_of(37)
    plain = hf_logits(build_hf_model("tied"), ids)
    plain_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda self, *a, **k: self if self.dtype == torch.float64 else plain_float(self, *a, **k))
    monkeypatch.setattr(modeling_mamba.MambaRMSNorm, "forward",
                        lambda self, x: self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                       + self.variance_epsilon)))
    patched = hf_logits(build_hf_model("tied"), ids)
    assert_close(patched, plain, rtol=HF_LOGITS_RTOL[F32], what="logits")


@pytest.mark.parametrize("case", list(CASES))
def test_saved_folders_load_in_transformers_with_the_same_logits(case, folder_of, tmp_path):
    model = load_pretrained(folder_of(case))
    save_pretrained(model, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model_type"] == "mamba" and doc["architectures"] == ["MambaForCausalLM"]
    again = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = ids_of(model.cfg.vocab_size, seed=3)
    assert_close(hf_logits(again, ids), hf_logits(build_hf_model(case), ids), rtol=HF_LOGITS_RTOL[F32],
                 what="logits")
    back = load_pretrained(tmp_path)
    assert back.cfg == model.cfg
    for name, value in model.state_dict().items():
        assert np.array_equal(back.state_dict()[name], value), name


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_transformers(case, folder_of):
    """npformer's cached decoding (the state cache) picks the tokens transformers' cached decoding picks."""
    model = load_pretrained(folder_of(case), dtype="float64")
    hf = build_hf_model(case).double()
    ids = ids_of(model.cfg.vocab_size, B=2, T=4, seed=4)
    ours = generate(model, ids, 6, top_k=1, rng=np.random.default_rng(0))
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(ids), max_new_tokens=6, do_sample=False, min_new_tokens=6).numpy()
    assert np.array_equal(ours, theirs)


def test_block_size_comes_from_the_argument_or_the_folder(folder_of, tmp_path):
    assert load_pretrained(folder_of("tied"), block_size=7).cfg.block_size == 7
    model = load_pretrained(folder_of("tied"), block_size=7)
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path).cfg.block_size == 7


def test_the_older_embedding_name_is_read(folder_of, tmp_path):
    folder = folder_of("tied")
    tensors = read_safetensors(folder / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model, old = load_pretrained(folder), load_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert np.array_equal(old.state_dict()[name], value), name


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu"), ("intermediate_size", 40),
                                          ("time_step_rank", "big"), ("state_size", 0)])
def test_configs_npformer_cannot_compute_are_refused_by_field(field, value, folder_of, tmp_path):
    folder = folder_of("tied")
    doc = json.loads((folder / "config.json").read_text())
    doc[field] = value
    (tmp_path / "config.json").write_text(json.dumps(doc))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(HFFormatError, match=f"field '{field}'"):
        load_pretrained(tmp_path)


def test_a_folder_without_a_context_length_never_crops_the_prompt(folder_of):
    """A recurrent model has no context limit: a folder with no max_position_embeddings loads with block_size
    MAX_POSITION, so generate feeds the whole prompt and picks transformers' tokens; an explicit small block_size
    crops the prompt and differs."""
    folder = folder_of("tied")
    assert "max_position_embeddings" not in json.loads((folder / "config.json").read_text())
    model = load_pretrained(folder, dtype="float64")
    assert model.cfg.block_size == DEFAULT_BLOCK_SIZE == MAX_POSITION
    hf = build_hf_model("tied").double()
    ids = ids_of(model.cfg.vocab_size, B=2, T=14, seed=11)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(ids), max_new_tokens=5, do_sample=False, min_new_tokens=5).numpy()
    ours = generate(model, ids, 5, top_k=1, rng=np.random.default_rng(0))
    assert np.array_equal(ours, theirs)
    assert np.array_equal(generate(model, ids, 5, top_k=1, use_cache=False), theirs)
    cropped = load_pretrained(folder, dtype="float64", block_size=4)
    assert not np.array_equal(generate(cropped, ids, 5, top_k=1, use_cache=False), theirs)
