"""Tiny Hugging Face models, built here with a fixed torch seed and saved to temporary folders.

Each case in ``CASES`` is a transformers config small enough to run in milliseconds,
chosen to cover what the maps must get right: GPT-2's fused c_attn; LLaMA with grouped
queries (6 heads over 2 KV heads), an untied head and a large rope_theta; LLaMA with
attention and MLP biases, a tied head and a head_dim that is not hidden/heads; Mistral
with one KV head and a sliding window shorter than the test sequences; Qwen2 with qkv
biases and a tied head. HF initialises biases to zero and norms to one, which would hide
a misplaced bias or norm, so every parameter is redrawn at random.

``hf_folder(case, variant)`` saves a case once per test session: "float32", "bfloat16"
(the same model cast to bf16) or "sharded" (float32 in several shards).

The oracle's float64 mode (fixture ``hf_float64``)
--------------------------------------------------
HF's LLaMA-family code computes some parts in float32 whatever the model's dtype:
RMSNorm casts its input to float32, and the rotary embedding computes its inverse
frequencies, angles, cos and sin in float32 (eager attention's softmax too, which the
"sdpa" implementation used here avoids). A model made ``.double()`` is therefore only
float32-accurate. ``hf_float64`` replaces, for the one test that asks for it, the
``forward`` of each family's RMSNorm and rotary embedding with the same formulas computed
in the input's dtype (float64 for a float64 model); a test checks that the patched model
still agrees with the unpatched one in float32, so the patch changes precision only.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

SEED = 1234
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # generation never stops early

CASES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **NO_SPECIAL_TOKENS),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=113, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, **NO_SPECIAL_TOKENS),
    "llama_bias_tied": lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, head_dim=12, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, **NO_SPECIAL_TOKENS),
    "mistral_window": lambda: transformers.MistralConfig(
        vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False,
        **NO_SPECIAL_TOKENS),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True,
        use_sliding_window=False, **NO_SPECIAL_TOKENS),
}
LLAMA_CASES = [c for c in CASES if c != "gpt2"]


def build_hf_model(case: str, seed: int = SEED):
    """The case's HF model, every parameter drawn at random (norm weights around 1), in eval mode."""
    torch.manual_seed(seed)
    config = CASES[case]()
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.15
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model.eval()


def load_hf(folder, dtype=torch.float32):
    """A saved folder loaded back by transformers (the oracle reads the same file npformer reads)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    made = {}

    def get(case: str, variant: str = "float32"):
        key = (case, variant)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{case}-{variant}")
            model = build_hf_model(case)
            if variant == "bfloat16":
                model = model.to(torch.bfloat16)
                model.save_pretrained(folder)
            elif variant == "sharded":
                model.save_pretrained(folder, max_shard_size="20KB")
            else:
                assert variant == "float32", variant
                model.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return get


# -- the oracle's float64 mode ---------------------------------------------------------------------
def _rmsnorm_in_input_dtype(self, hidden_states):
    """RMSNorm y = w * x / sqrt(mean(x^2) + eps), in x's own dtype (HF's forward casts to float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_in_float64(self, x, position_ids):
    """Default RoPE cos/sin: angles pos * theta^(-2i/Dh) for i < Dh/2, repeated twice along the last axis.

    Computed in float64 and cast to x's dtype (HF computes them in float32).
    """
    assert self.rope_type == "default", self.rope_type
    theta = float(self.config.rope_parameters["rope_theta"])
    dim = 2 * self.inv_freq.shape[0]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, Dh/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def hf_float64(monkeypatch):
    """Patch the LLaMA-family RMSNorm and rotary embedding to compute in the model's dtype (this test only)."""
    for module, prefix in ((modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2")):
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward", _rmsnorm_in_input_dtype)
        monkeypatch.setattr(getattr(module, f"{prefix}RotaryEmbedding"), "forward", _rotary_in_float64)
    return True


@pytest.fixture
def hf_t5_float64(monkeypatch):
    """Patch T5's layer norm (T5LayerNorm, which takes its mean square in float32) to compute in the input's
    dtype, for the one test that asks for it: a float64 T5 is then float64 throughout."""
    from transformers.models.t5 import modeling_t5

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", _rmsnorm_in_input_dtype)
    return True
