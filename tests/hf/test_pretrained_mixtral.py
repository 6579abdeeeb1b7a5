"""Mixtral folders against transformers on a tiny random MixtralForCausalLM built here (no network):
logits at 1e-5 (float32) and 1e-10 (float64), every parameter's float64 gradient against autograd through
the HF model (the loss with and without the router's load balance), save -> load -> the same logits.

The float64 oracle: besides the RMSNorm and rotary embedding (``tests/hf/conftest.py``), transformers'
Mixtral computes the router softmax and the load balance in float32 whatever the model's dtype. The
fixture ``mixtral_float64`` replaces, for the test that asks for it, the router's forward and the load
balance with the same formulas in the input's dtype; a test checks that the patch changes precision only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral import modeling_mixtral  # noqa: E402

from npformer.hf import load_pretrained, save_pretrained  # noqa: E402
from npformer.hf.pretrained import hf_state_dict  # noqa: E402
from npformer.models.llama import LlamaConfig, Mixtral  # noqa: E402
from tests.hf.conftest import NO_SPECIAL_TOKENS, _rmsnorm_in_input_dtype, _rotary_in_float64  # noqa: E402
from tests.tolerances import HF_GRAD_RTOL, HF_LOGITS_RTOL, assert_close  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SEED = 4321
T = 9


def build_hf_mixtral(aux_coef: float = 0.02, seed: int = SEED, **overrides):
    """A tiny MixtralForCausalLM (5 experts, 2 per token, GQA, untied head), every parameter redrawn at random."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=61, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, num_local_experts=5, num_experts_per_tok=2,
                  router_aux_loss_coef=aux_coef, output_router_logits=True, tie_word_embeddings=False,
                  rms_norm_eps=1e-5, **NO_SPECIAL_TOKENS)
    config = transformers.MixtralConfig(**{**fields, **overrides})
    config._attn_implementation = "sdpa"
    model = transformers.MixtralForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.8 if name.endswith("gate.weight")
                                                                               else 0.2)
            if "norm" in name:
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    build_hf_mixtral().save_pretrained(path)
    return path


def load_hf(path, dtype=torch.float32):
    """Read back by transformers with its plain per-expert loop (the grouped matmul needs 16-byte strides)."""
    return transformers.MixtralForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                           experts_implementation="eager").eval()


def _ids(vocab, shape=(2, T), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# -- the oracle's float64 mode -------------------------------------------------------------------------------
def _router_in_input_dtype(self, hidden_states):
    """Router logits, softmax, top k and the k weights renormalised, in the input's dtype (HF's: float32)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = torch.nn.functional.linear(hidden_states, self.weight)
    probs = torch.softmax(logits, dim=-1)
    top, index = torch.topk(probs, self.top_k, dim=-1)
    return logits, top / top.sum(dim=-1, keepdim=True), index


def _load_balance_in_input_dtype(gate_logits, num_experts=None, top_k=2, attention_mask=None):
    """E * sum_e f_e P_e with f and P over every layer's rows together, in the logits' dtype; with an attention
    mask (B, T), over the rows it keeps (transformers' masked form)."""
    logits = torch.cat(list(gate_logits))
    keep = (torch.ones(logits.shape[0], dtype=torch.bool) if attention_mask is None
            else attention_mask.reshape(-1).bool().repeat(len(gate_logits)))
    probs = torch.softmax(logits, dim=-1)[keep]
    selected = torch.topk(probs, top_k, dim=-1).indices
    f = torch.bincount(selected.reshape(-1), minlength=num_experts).to(probs.dtype) / probs.shape[0]
    return num_experts * torch.sum(f * probs.mean(dim=0))


@pytest.fixture
def mixtral_float64(monkeypatch):
    monkeypatch.setattr(modeling_mixtral.MixtralRMSNorm, "forward", _rmsnorm_in_input_dtype)
    monkeypatch.setattr(modeling_mixtral.MixtralRotaryEmbedding, "forward", _rotary_in_float64)
    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", _router_in_input_dtype)
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func", _load_balance_in_input_dtype)
    return True


def hf_grads_as_ours(hf, cfg) -> dict:
    """HF's gradients under the stored names: the fused gate_up_proj (E, 2I, D) split into w1 (gate) and w3 (up)."""
    out = {}
    I = cfg.resolved_intermediate_size
    for name, p in hf.named_parameters():
        g = p.grad.numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts")
            for e in range(g.shape[0]):
                out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = g[e, :I], g[e, I:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts")
            for e in range(g.shape[0]):
                out[f"{base}.{e}.w2.weight"] = g[e]
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = g
    return out


# -- tests ------------------------------------------------------------------------------------------------------
def test_logits_float32_equal_hf(folder):
    model = load_pretrained(folder)
    assert type(model) is Mixtral and model.cfg.num_local_experts == 5 and model.cfg.router_aux_loss_coef == 0.02
    ids = _ids(model.cfg.vocab_size)
    logits, _ = model.forward(ids)
    with torch.no_grad():
        theirs = load_hf(folder)(torch.from_numpy(ids)).logits.numpy()
    assert logits.dtype == F32
    assert_close(logits, theirs, rtol=HF_LOGITS_RTOL[F32], what="mixtral logits")


@pytest.mark.derivation("MOE.13")
@pytest.mark.derivation("MOE.16")
@pytest.mark.parametrize("with_aux", [False, True])
def test_logits_and_gradients_float64_equal_hf(with_aux, folder, mixtral_float64, monkeypatch):
    """float64 logits at 1e-10; the loss (with coef * load balance, or the cross entropy alone) and every
    parameter's gradient at HF_GRAD_RTOL against autograd through transformers' model. Ignored targets leave
    the load balance (MOE.15): the oracle's masked form gets them as its mask (the attention itself unmasked,
    as npformer's)."""
    model = load_pretrained(folder, dtype="float64").train()
    if not with_aux:
        model.cfg.router_aux_loss_coef = 0.0
    hf = load_hf(folder, torch.float64)
    ids, targets = _ids(model.cfg.vocab_size, seed=1), _ids(model.cfg.vocab_size, seed=2)
    targets[0, :3] = -100
    kept = torch.from_numpy(targets != -100)
    monkeypatch.setattr(modeling_mixtral, "load_balancing_loss_func",
                        lambda g, n, k, mask=None: _load_balance_in_input_dtype(g, n, k, kept))
    logits, loss = model.forward(ids, targets)
    model.backward()
    out = hf(torch.from_numpy(ids), labels=None, output_router_logits=with_aux)
    # transformers shifts labels inside its loss; the targets here are already the next tokens
    hf_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                                torch.from_numpy(targets).reshape(-1), ignore_index=-100)
    if with_aux:
        hf_loss = hf_loss + hf.router_aux_loss_coef * out.aux_loss
        assert_close(model.aux_loss, out.aux_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="aux loss")
    hf_loss.backward()
    assert_close(logits, out.logits.detach().numpy(), rtol=HF_LOGITS_RTOL[F64], what="logits")
    assert_close(loss, hf_loss.item(), rtol=HF_LOGITS_RTOL[F64], what="loss")
    ours, theirs = hf_state_dict(model, grads=True), hf_grads_as_ours(hf, model.cfg)
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert_close(ours[name], grad, rtol=HF_GRAD_RTOL, what=f"d{name}")
    router = theirs["model.layers.0.block_sparse_moe.gate.weight"]
    assert np.abs(router).max() > 0  # the router is trained through its gate weights


def test_float64_patch_changes_precision_only(folder, request):
    """The oracle's patches leave a float32 model's logits and load balance as they were (to float32 accuracy)."""
    ids = _ids(61, seed=3)

    def run():
        with torch.no_grad():
            out = load_hf(folder)(torch.from_numpy(ids), output_router_logits=True)
        return out.logits.numpy(), out.aux_loss.item()

    plain_logits, plain_aux = run()
    request.getfixturevalue("mixtral_float64")
    patched_logits, patched_aux = run()
    assert_close(patched_logits, plain_logits, rtol=HF_LOGITS_RTOL[F32], what="logits")
    assert patched_aux == pytest.approx(plain_aux, rel=1e-6)


def test_save_then_load_gives_the_same_logits(folder, tmp_path):
    first = load_pretrained(folder, dtype="float64")
    save_pretrained(first, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert (doc["model_type"], doc["architectures"], doc["output_router_logits"]) == (
        "mixtral", ["MixtralForCausalLM"], True)
    second = load_pretrained(tmp_path, dtype="float64")
    assert second.cfg == first.cfg
    ids = _ids(61, seed=5)
    np.testing.assert_array_equal(first.forward(ids)[0], second.forward(ids)[0])
    with torch.no_grad():
        theirs = load_hf(tmp_path, torch.float64)(torch.from_numpy(ids)).logits.numpy()
    assert_close(second.forward(ids)[0], theirs, rtol=1e-6, what="transformers reads the saved folder")


def test_npformer_mixtral_loads_in_transformers(tmp_path):
    model = Mixtral(LlamaConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_kv_head=1, d_model=8,
                                intermediate_size=10, num_local_experts=3, num_experts_per_tok=2), seed=3).eval()
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters():
        p.data[...] += rng.standard_normal(p.shape).astype(np.float32) * 0.3
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["output_router_logits"] is False  # coefficient 0
    ids = _ids(37, seed=6)
    with torch.no_grad():
        theirs = load_hf(tmp_path)(torch.from_numpy(ids)).logits.numpy()
    assert_close(model.forward(ids)[0], theirs, rtol=HF_LOGITS_RTOL[F32], what="npformer -> transformers")


@pytest.mark.parametrize("field, value, words", [("router_jitter_noise", 0.1, "routes without jitter"),
                                                 ("hidden_act", "gelu", "silu")])
def test_what_npformer_cannot_compute_is_refused_by_name(field, value, words, folder, tmp_path):
    doc = json.loads((folder / "config.json").read_text())
    doc[field] = value
    (tmp_path / "config.json").write_text(json.dumps(doc))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=f"field '{field}'.*{words}"):
        load_pretrained(tmp_path)


def test_a_capacity_is_not_written_as_mixtral(tmp_path):
    model = Mixtral(LlamaConfig(vocab_size=17, block_size=8, n_layer=1, n_head=2, n_kv_head=1, d_model=8,
                                num_local_experts=2, capacity_factor=1.5))
    with pytest.raises(ValueError, match="save_pretrained: argument 'model' .*capacity_factor=1.5"):
        save_pretrained(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.derivation("MOE.15")
def test_padding_leaves_the_load_balance_as_transformers_attention_mask_does(folder):
    """Right-padded rows: transformers' load balance with the attention mask equals npformer's with the padded
    positions' targets ignored (float32, transformers' own loss function), and the padding ids change nothing."""
    model = load_pretrained(folder)
    hf = load_hf(folder)
    ids = _ids(model.cfg.vocab_size, shape=(3, T), seed=7)
    attention = np.ones(ids.shape, np.int64)
    attention[0, 5:] = 0
    attention[2, 2:] = 0
    targets = np.where(attention == 1, _ids(model.cfg.vocab_size, shape=(3, T), seed=8), -100)
    logits, _ = model.forward(ids, targets)
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(attention), output_router_logits=True)
    keep = attention == 1
    assert_close(logits[keep], out.logits.numpy()[keep], rtol=HF_LOGITS_RTOL[F32], what="kept logits")
    assert_close(model.aux_loss, out.aux_loss.item(), rtol=HF_LOGITS_RTOL[F32], what="masked aux loss")
    with torch.no_grad():
        unmasked = hf(torch.from_numpy(ids), output_router_logits=True).aux_loss.item()
    assert abs(unmasked - out.aux_loss.item()) > 1e-4  # the mask matters for this batch
    other = np.where(keep, ids, (ids + 1) % model.cfg.vocab_size)
    aux = model.aux_loss
    model.forward(other, targets)
    assert model.aux_loss == pytest.approx(aux, rel=1e-6)


def test_transformers_fused_expert_layout_loads(tmp_path):
    """A folder in transformers 5's runtime layout (mlp.gate, mlp.experts.gate_up_proj (E, 2I, D), down_proj
    (E, D, I)) loads, gate_up_proj split into w1 (first half) and w3 (second half): the same logits."""
    import safetensors.torch

    hf = build_hf_mixtral()
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_pretrained(tmp_path)
    ids = _ids(model.cfg.vocab_size, seed=9)
    with torch.no_grad():
        theirs = load_hf(tmp_path)(torch.from_numpy(ids)).logits.numpy()
    assert_close(model.forward(ids)[0], theirs, rtol=HF_LOGITS_RTOL[F32], what="fused layout")
    I = model.cfg.resolved_intermediate_size
    w = hf.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(model.layers[1].mlp.experts[3].gate_proj.weight.data, w[3, :I])
    np.testing.assert_array_equal(model.layers[1].mlp.experts[3].up_proj.weight.data, w[3, I:])


def test_a_malformed_fused_tensor_is_refused_by_name(tmp_path):
    import safetensors.torch

    hf = build_hf_mixtral()
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    name = "model.layers.0.mlp.experts.gate_up_proj"
    state[name] = state[name][:, :-1].contiguous()
    safetensors.torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_up_proj.*fused expert layout.*expected shape"):
        load_pretrained(tmp_path)


def test_router_ties_go_to_the_lowest_expert_and_may_differ_from_transformers(folder):
    """A zero router ties every probability: npformer's rule (MOE.2) sends each token to experts 0 and 1."""
    model = load_pretrained(folder, dtype="float64")
    for layer in model.layers:
        layer.mlp.gate.weight.data[...] = 0.0
    model.forward(_ids(model.cfg.vocab_size, seed=10))
    for layer in model.layers:
        assert (layer.mlp.routing.expert == np.array([0, 1])).all()
