"""A torch LLaMA with the same structure and parameter names as ``npformer.models.llama``.

Used as the whole-model oracle (float64, same weights), as the reference of npformer's
divergence finder (``start_recording`` records the values npformer records, under the
same names), and as a CPU baseline. Its math is spelled out in torch rather than taken
from a library: RMSNorm, rotate-half RoPE (cosines and sines computed in float64 by the
same formula as npformer, then cast), grouped-query attention by repeating each
key/value head over its group of query heads, Mistral's sliding window, SwiGLU, and Mixtral's
mixture of experts (``moe.TwinMoE``) with the load balance pooled over the layers.
Parameter names match npformer's ``state_dict`` one to one (``load_npformer_state``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import TwinModel, hidden_keys, time_training_step as _time_step
from .moe import TwinMoE, load_balancing_loss


def _store(recorder: Dict[str, np.ndarray], name: str):
    def hook(grad: torch.Tensor) -> None:
        recorder[name] = grad.detach().numpy().copy()

    return hook


def rope_cos_sin(T: int, head_dim: int, theta: float, dtype: torch.dtype, start: int = 0):
    """cos, sin (T, head_dim / 2) of the angles (start + t) * theta**(-2i / head_dim), computed in float64."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (Dh/2,)
    angles = (start + np.arange(T, dtype=np.int64)).astype(np.float64)[:, None] * inv_freq  # (T, Dh/2)
    return torch.from_numpy(np.cos(angles)).to(dtype), torch.from_numpy(np.sin(angles)).to(dtype)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh): each pair (x[..., i], x[..., i + Dh/2]) rotated by its angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TwinRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * rstd * self.weight


class TwinAttention(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head, head_dim, qkv_bias, o_bias, rope_theta, window):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.rope_theta, self.window = rope_theta, window
        self.q_proj = nn.Linear(d_model, n_head * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_head * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=o_bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor, prefix_len=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
        cos, sin = rope_cos_sin(T, Dh, self.rope_theta, x.dtype)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        k = k.repeat_interleave(H // Hkv, dim=1)  # query head h reads key/value head h // (H / Hkv)
        v = v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-2, -1)) / Dh**0.5  # (B, H, T, T)
        probs = scores.masked_fill(hidden_keys(T, prefix_len, self.window), float("-inf")).softmax(-1)
        if self.recorder is not None and probs.requires_grad:
            self.recorder[f"{self.path}.probs"] = probs.detach().numpy().copy()
        y = probs @ v  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


class TwinSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=bias)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=bias)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self.path = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        a = g * torch.sigmoid(g) * self.up_proj(x)  # silu(gate) * up
        if self.recorder is not None and a.requires_grad:
            self.recorder[f"{self.path}.act"] = a.detach().numpy().copy()
        return self.down_proj(a)


class TwinDecoderLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.input_layernorm = TwinRMSNorm(c["d_model"], c["rms_norm_eps"])
        self.self_attn = TwinAttention(c["d_model"], c["n_head"], c["n_kv_head"], c["head_dim"], c["qkv_bias"],
                                       c["o_bias"], c["rope_theta"], c["sliding_window"])
        self.post_attention_layernorm = TwinRMSNorm(c["d_model"], c["rms_norm_eps"])
        if c["num_local_experts"]:
            self.mlp = TwinMoE(c["d_model"], c["intermediate_size"], c["num_local_experts"], c["num_experts_per_tok"],
                               c["capacity_factor"], "swiglu", normalize_topk=True, bias=c["mlp_bias"])
        else:
            self.mlp = TwinSwiGLU(c["d_model"], c["intermediate_size"], c["mlp_bias"])

    def forward(self, x: torch.Tensor, prefix_len=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), prefix_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class TwinLlama(TwinModel):
    recording_modules = (TwinAttention, TwinSwiGLU)  # the submodules that record into self.recorder

    def __init__(self, vocab_size=65, block_size=256, n_layer=4, n_head=6, n_kv_head=2, d_model=192, head_dim=None,
                 intermediate_size=None, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 qkv_bias=False, o_bias=False, mlp_bias=False, sliding_window=None, num_local_experts=0,
                 num_experts_per_tok=2, router_aux_loss_coef=0.0, capacity_factor=None, **_):
        super().__init__()
        if head_dim is None:
            head_dim = d_model // n_head
        if intermediate_size is None:  # floor(8 D / 3) rounded up to a multiple of 32
            intermediate_size = -(-(8 * d_model // 3) // 32) * 32
        c = dict(d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, rope_theta=rope_theta,
                 intermediate_size=intermediate_size, rms_norm_eps=rms_norm_eps, qkv_bias=qkv_bias,
                 o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=sliding_window,
                 num_local_experts=num_local_experts, num_experts_per_tok=num_experts_per_tok,
                 capacity_factor=capacity_factor)
        self.router_aux_loss_coef = router_aux_loss_coef
        self.block_size, self.tied = block_size, tie_word_embeddings
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.layers = nn.ModuleList(TwinDecoderLayer(c) for _ in range(n_layer))
        self.norm = TwinRMSNorm(d_model, rms_norm_eps)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.recorder: Optional[Dict[str, np.ndarray]] = None
        self._hooks = []
        for name, prm in self.named_parameters():  # an init for benchmarking; tests load npformer's weights
            if name.endswith("norm.weight"):
                nn.init.ones_(prm)
            elif prm.dim() > 1:
                nn.init.normal_(prm, std=0.02)
            else:
                nn.init.zeros_(prm)

    def forward(self, ids, targets=None, prefix_len=None):
        rec = self.recorder
        x = self.embed_tokens.weight[ids]  # (B, T, D)
        if rec is not None and x.requires_grad:
            rec["embed_tokens.out"] = x.detach().numpy().copy()
        for i, layer in enumerate(self.layers):
            x = layer(x, prefix_len)
            if rec is not None and x.requires_grad:
                rec[f"layers.{i}.out"] = x.detach().numpy().copy()
        h = self.norm(x)
        logits = h @ self.embed_tokens.weight.T if self.tied else self.lm_head(h)
        if rec is not None and logits.requires_grad:
            rec["logits"] = logits.detach().numpy().copy()
            logits.register_hook(_store(rec, "dlogits"))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                            ignore_index=-100)
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, TwinMoE)]
        if loss is not None and moe and self.router_aux_loss_coef:  # one load balance over every layer's tokens
            aux = load_balancing_loss(torch.cat([m.probs for m in moe]), torch.cat([m.expert for m in moe]))
            loss = loss + self.router_aux_loss_coef * aux
        return logits, loss

    # -- recording, under npformer's names ----------------------------------------------------------
    def start_recording(self) -> Dict[str, np.ndarray]:
        """Record what npformer's layers record: ``<path>.out`` of every linear and norm layer, ``.dW``,
        ``.db``, ``.dweight``, ``.dx`` of the norms and decoder layers, attention probabilities, SwiGLU
        activations, logits and their gradient, and the embedding's gradient when the head is untied."""
        self.stop_recording()
        rec: Dict[str, np.ndarray] = OrderedDict()
        self.recorder = rec
        save = lambda name: (lambda mod, inp, out: rec.__setitem__(name, out.detach().numpy().copy()))  # noqa: E731
        save_dx = lambda name: (  # noqa: E731
            lambda mod, gin, gout: rec.__setitem__(name, gin[0].detach().numpy().copy()))
        for path, m in self.named_modules():
            if isinstance(m, (TwinAttention, TwinSwiGLU)):
                m.recorder, m.path = rec, path
            if isinstance(m, (nn.Linear, TwinRMSNorm)):
                self._hooks.append(m.register_forward_hook(save(f"{path}.out")))
            if isinstance(m, nn.Linear):
                for prm, gname in ((m.weight, "dW"), (m.bias, "db")):
                    if prm is not None:
                        self._hooks.append(prm.register_hook(_store(rec, f"{path}.{gname}")))
            if isinstance(m, TwinRMSNorm):
                self._hooks.append(m.weight.register_hook(_store(rec, f"{path}.dweight")))
                self._hooks.append(m.register_full_backward_hook(save_dx(f"{path}.dx")))
            if isinstance(m, TwinDecoderLayer):
                self._hooks.append(m.register_full_backward_hook(save_dx(f"{path}.dx")))
        if not self.tied:  # tied, npformer's embed_tokens.dW holds the lookup's part of the gradient alone
            self._hooks.append(self.embed_tokens.weight.register_hook(_store(rec, "embed_tokens.dW")))
        return rec


def time_training_step(config: Dict[str, object], batch: int, steps: int, *, warmup: int = 1,
                       threads: int = 1) -> Dict[str, object]:
    """Median seconds of one float32 training step of the twin of ``config`` (see ``common.py``)."""
    return _time_step(TwinLlama, config, batch, steps, warmup=warmup, threads=threads)
