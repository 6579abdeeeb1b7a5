"""LLaMA: token embeddings, pre-RMSNorm blocks with rotary attention and a SwiGLU MLP, an untied head.

The same family covers Mistral (``sliding_window``), Qwen2 (``qkv_bias``) and, with
``num_local_experts`` > 0, Mixtral: a mixture of experts (``npformer.nn.moe.MoEMLP``) in place of
each SwiGLU MLP, whose load-balancing loss joins the cross entropy (``Mixtral`` is the same model
under the name Hugging Face folders give it). Read it beside
``gpt.py``: ``forward`` runs the layers in order, ``backward`` walks them in reverse, one
line per layer. What differs from GPT: no position table (RoPE rotates q and k inside
each attention layer), RMSNorm instead of LayerNorm, SwiGLU instead of GELU, grouped-query
attention (``n_kv_head`` key/value heads), no dropout, and a head of its own unless
``tie_word_embeddings``.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (without its ``model.`` prefix):
``embed_tokens.weight``, ``layers.{i}.input_layernorm.weight``,
``layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (and ``.bias`` with ``qkv_bias`` / ``o_bias``),
``layers.{i}.post_attention_layernorm.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``
(and ``.bias`` with ``mlp_bias``), ``norm.weight``, ``lm_head.weight`` (absent when tied). With experts:
``layers.{i}.mlp.gate.weight`` (the router) and ``layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``.

With a ``capacity_factor``, routing is non-causal and batch-dependent (as Switch's training-time
routing is): whether a token reaches an expert depends on how many tokens of the whole call, later
positions and other rows of the batch included, chose that expert before it in the flattened order, and
the capacity grows with the call's token count. Such a model cannot decode with a KV cache:
``supports_kv_cache`` is False, and ``make_kv_caches`` and ``forward(kv_caches=...)`` refuse by name
(``npformer.generate`` recomputes the context instead). See ``proofs/moe.md``.

Shapes: ids (B, T) int, logits (B, T, V), hidden (B, T, D) with D = d_model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Embedding, Linear, RMSNorm, check_dout, check_features
from ..nn.lm import IGNORE_INDEX, check_kv_length, check_lm_inputs, prefix_lm_bias
from ..nn.mlp import SwiGLUMLP
from ..nn.moe import MoEMLP
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_float, check_ndim, check_real
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.fastpath import add
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.moe import LoadBalanceCache, load_balancing_loss_backward, load_balancing_loss_forward


@dataclass
class LlamaConfig:
    """A LLaMA-family model's shape; Hugging Face's field name, where it differs, in the comment.

    ``head_dim`` and ``intermediate_size`` may be left None: the config keeps None (so it
    round-trips through ``to_dict`` unchanged) and the model reads the resolved sizes from
    the properties ``resolved_head_dim`` (d_model // n_head) and ``resolved_intermediate_size``
    (LLaMA's rule: floor(8 d_model / 3) rounded up to a multiple of 32).
    """

    vocab_size: int = 65
    block_size: int = 256  # context length (max_position_embeddings)
    n_layer: int = 4  # num_hidden_layers
    n_head: int = 6  # num_attention_heads
    n_kv_head: int = 2  # num_key_value_heads (GQA; = n_head for MHA, 1 for MQA)
    d_model: int = 192  # hidden_size
    head_dim: Optional[int] = None  # None: d_model // n_head
    intermediate_size: Optional[int] = None  # None: floor(8 d_model / 3) rounded up to a multiple of 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    o_bias: bool = False  # LLaMA's attention_bias sets both qkv_bias and o_bias
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral: each query sees its sliding_window latest keys
    num_local_experts: int = 0  # 0: a dense SwiGLU MLP; E >= 1: a mixture of E SwiGLU experts (Mixtral)
    num_experts_per_tok: int = 2  # k experts per token, their k weights renormalised (Mixtral)
    router_aux_loss_coef: float = 0.0  # the pooled load balance's weight in the loss (0: not added), as HF's
    # with output_router_logits
    capacity_factor: Optional[float] = None  # None: no token dropped; else C = ceil(factor * N k / E) per expert
    # (non-causal and batch-dependent: a model with it decodes without a KV cache)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model; NumPy scalars
        become Python numbers (the config is JSON in checkpoints and Hugging Face folders)."""
        op = "LlamaConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        for name in ("head_dim", "intermediate_size", "sliding_window"):
            if getattr(self, name) is not None:
                setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"{op}: argument 'n_kv_head' expected a divisor of n_head = {self.n_head}, "
                             f"got {self.n_kv_head}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model} "
                             f"(or give head_dim), got {self.n_head}")
        if self.resolved_head_dim % 2:
            name = "head_dim" if self.head_dim is not None else "n_head"
            raise ValueError(f"{op}: argument '{name}' expected an even head_dim (RoPE rotates pairs), "
                             f"got head_dim {self.resolved_head_dim}")
        self.rope_theta = check_real(op, "rope_theta", self.rope_theta, lo=0.0, lo_open=True)
        self.rms_norm_eps = check_real(op, "rms_norm_eps", self.rms_norm_eps, lo=0.0)
        self.num_local_experts = check_count(op, "num_local_experts", self.num_local_experts, 0, MAX_POSITION)
        self.num_experts_per_tok = check_count(op, "num_experts_per_tok", self.num_experts_per_tok, 1,
                                               self.num_local_experts or None)  # k <= E where there are experts
        self.router_aux_loss_coef = check_real(op, "router_aux_loss_coef", self.router_aux_loss_coef, lo=0.0)
        if self.capacity_factor is not None:
            self.capacity_factor = check_real(op, "capacity_factor", self.capacity_factor, lo=0.0, lo_open=True)
        if not self.num_local_experts:  # the mixture's fields would do nothing in a dense model: refused by name
            for name, default in (("num_experts_per_tok", 2), ("router_aux_loss_coef", 0.0),
                                  ("capacity_factor", None)):
                if getattr(self, name) != default:
                    raise ValueError(f"{op}: argument '{name}' expected {default} without experts "
                                     f"(num_local_experts = 0: a dense MLP, which it would not change), "
                                     f"got {getattr(self, name)}")
        for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias"):
            setattr(self, name, check_bool(op, name, getattr(self, name)))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    @property
    def resolved_head_dim(self) -> int:
        """D_h: ``head_dim``, or d_model // n_head when it is None."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_head

    @property
    def resolved_intermediate_size(self) -> int:
        """I: ``intermediate_size``, or LLaMA's rule, floor(8 d_model / 3) rounded up to a multiple of 32."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        multiple = 32
        return -(-(8 * self.d_model // 3) // multiple) * multiple

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), matmuls only.

        Per layer, with D = d_model, H heads, H_kv key/value heads of size D_h and I the MLP width:
        weight multiply-adds D H D_h (q) + 2 D H_kv D_h (k, v) + H D_h D (o) + 3 D I (gate, up,
        down; with experts k times that, plus D E for the router), and 2 T H D_h for Q K^T and P V
        at full length T (the dense kernels compute the masked entries too, sliding window or not);
        the head adds V D (tied or not). Norms, RoPE, SiLU and the softmaxes are left out.
        """
        c = self
        T = c.block_size if seq_len is None else check_count("LlamaConfig.flops_per_token", "seq_len", seq_len, 1)
        Dh, I = c.resolved_head_dim, c.resolved_intermediate_size
        attn = c.d_model * Dh * (2 * c.n_head + 2 * c.n_kv_head)
        mlp = 3 * c.d_model * I
        if c.num_local_experts:
            mlp = c.num_experts_per_tok * mlp + c.d_model * c.num_local_experts
        macs = c.n_layer * (attn + mlp + 2 * T * c.n_head * Dh) + c.vocab_size * c.d_model
        return 3 * 2 * macs


class DecoderLayerCache(NamedTuple):
    """One forward call of a ``LlamaDecoderLayer``: the shape its dout must have (the sublayers keep the rest)."""

    out_shape: Tuple[int, ...]


class LlamaDecoderLayer(Module):
    """h = x + self_attn(input_layernorm(x)), then out = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, cfg: LlamaConfig, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = MultiHeadAttention(
            cfg.d_model, cfg.n_head, cfg.n_kv_head, bias=cfg.o_bias, qkv_bias=cfg.qkv_bias,
            head_dim=cfg.resolved_head_dim, position="rope", rope_theta=cfg.rope_theta,
            window=cfg.sliding_window, rng=rng, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype=dtype)
        if cfg.num_local_experts:  # the load balance is pooled over the layers by the model: coefficients 0 here
            self.mlp = MoEMLP(cfg.d_model, cfg.resolved_intermediate_size, cfg.num_local_experts,
                              cfg.num_experts_per_tok, cfg.capacity_factor, "swiglu", normalize_topk=True,
                              rng=rng, dtype=dtype, bias=cfg.mlp_bias)
        else:
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.resolved_intermediate_size, cfg.mlp_bias, rng=rng, dtype=dtype)

    @atomic
    def forward(self, x: np.ndarray, kv_cache: Optional[KVCache] = None,
                mask_bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, D) -> (B, T, D); mask_bias (B, 1, T, S) replaces the causal mask (a prefix LM's, ATT.18)."""
        op, norm = "LlamaDecoderLayer.forward", self.input_layernorm.weight
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, norm.shape[0], norm.data.dtype)
        a = self.self_attn.forward(self.input_layernorm.forward(x), causal=mask_bias is None, kv_cache=kv_cache,
                                   bias=mask_bias)
        h = add(x, a)  # residual sums on several cores (fastpath.add): x + a
        m = self.mlp.forward(self.post_attention_layernorm.forward(h))
        out = add(h, m)
        self.save_cache(DecoderLayerCache(out_shape=out.shape))  # the residual stream needs nothing else
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray, drouter_probs: Optional[np.ndarray] = None) -> np.ndarray:
        """dout (B, T, D) -> dx (B, T, D): the forward's lines in reverse, one gradient per line.

        ``drouter_probs`` (B T, E): with experts, the gradient of the model's load balance with respect to
        this layer's router probabilities."""
        norm = self.input_layernorm.weight
        check_dout(self, "LlamaDecoderLayer.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        self.pop_cache()
        if isinstance(self.mlp, MoEMLP):
            dm_in = self.mlp.backward(dout, drouter_probs)  # into post_attention_layernorm's output
        else:
            dm_in = self.mlp.backward(dout)  # into post_attention_layernorm's output
        dh = add(dout, self.post_attention_layernorm.backward(dm_in))  # residual: identity path plus MLP path
        da_in = self.self_attn.backward(dh)  # into input_layernorm's output
        dx = add(dh, self.input_layernorm.backward(da_in))  # residual again
        self.record("dx", dx)
        return dx


class LlamaCache(NamedTuple):
    """One training forward of ``Llama``: the tied head's op cache (None when untied), the loss's, and the
    pooled load balance's (None without experts, targets or a coefficient)."""

    tied_head: Optional[LinearCache]  # logits = h @ embed_tokens^T when tied; lm_head keeps its own otherwise
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets
    aux: Optional[LoadBalanceCache] = None  # (MOE.11) over every layer's tokens at once


class Llama(Module):
    """embed_tokens -> layers -> norm -> lm_head (or embed_tokens^T when tied); ``forward``/``backward`` as GPT's.

    ``Llama(cfg)`` with ``cfg.num_local_experts`` > 0 makes a ``Mixtral`` (a subclass that adds nothing but
    its name), so that every model with experts is written to Hugging Face folders as Mixtral.
    """

    def __new__(cls, cfg=None, seed: int = 0):
        if cls is Llama and isinstance(cfg, LlamaConfig) and cfg.num_local_experts:
            cls = Mixtral
        return super().__new__(cls)

    def __init__(self, cfg: LlamaConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"Llama: argument 'cfg' expected a LlamaConfig, got {type(cfg).__name__}")
        check_count("Llama", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # every weight normal(0, 0.02), norms at 1
        dtype = np.dtype(cfg.dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        self.layers = ModuleList(LlamaDecoderLayer(cfg, rng) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, dtype=dtype)
        self.aux_loss = 0.0  # with experts and router_aux_loss_coef: the latest loss's load balance, (MOE.11)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, False, rng=rng, dtype=dtype)
        # Tied: the LM head is embed_tokens.weight itself, logits = h @ embed_tokens^T.

    # ------------------------------------------------------------------------------------
    @atomic
    def forward(self, ids: np.ndarray, targets: Optional[np.ndarray] = None,
                kv_caches: Optional[List[KVCache]] = None, *,
                prefix_len: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T) -> logits (B, T, V) and the mean cross entropy if targets (B, T) are given.

        ids are integers in [0, vocab_size), B >= 1 and 1 <= T <= block_size; targets
        are in [0, vocab_size) or -100 (ignored). With ``kv_caches`` (one per layer,
        eval mode), ids continue the cached sequence: the rotary positions start at the
        cache length (incremental decoding). In training mode each forward keeps its
        caches for one ``backward()``. ``prefix_len`` (B,) makes it a prefix LM (ATT.18),
        as ``GPT.forward``; a sliding window refuses it. With experts and ``router_aux_loss_coef``, the loss
        adds the load balance pooled over the layers, over the positions whose target is not -100 (MOE.15),
        so padding with ignored targets does not move it. A model with a ``capacity_factor`` refuses
        ``kv_caches`` by name (its routing is non-causal).
        """
        cfg = self.cfg
        op = "Llama.forward"
        if kv_caches is not None and not self.supports_kv_cache:
            raise ValueError(f"{op}: argument 'kv_caches' expected None for a model with capacity_factor "
                             f"{cfg.capacity_factor} (capacity routing counts every token of the call, later ones "
                             f"and other rows included, so cached decoding would differ; decode without a "
                             f"cache), got a list of caches")
        start = check_lm_inputs(op, ids, targets, kv_caches, vocab_size=cfg.vocab_size,
                                block_size=cfg.block_size, n_layer=cfg.n_layer, n_kv_head=cfg.n_kv_head,
                                head_dim=cfg.resolved_head_dim, dtype=np.dtype(cfg.dtype), training=self.training)
        mask_bias = None
        if prefix_len is not None:
            if cfg.sliding_window is not None:
                raise ValueError(f"{op}: argument 'prefix_len' expected None for a model with sliding_window = "
                                 f"{cfg.sliding_window} (a window is a causal mask), got an array")
            mask_bias = prefix_lm_bias(op, prefix_len, ids.shape[0], start, ids.shape[1], np.dtype(cfg.dtype))
        x = self.embed_tokens.forward(ids)  # (B, T, D); positions enter through RoPE in each layer
        routings = []
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, None if kv_caches is None else kv_caches[i], mask_bias)
            if cfg.num_local_experts:
                routings.append(layer.mlp.routing)
        h = self.norm.forward(x)
        if cfg.tie_word_embeddings:
            logits, tied_head = linear_forward(h, self.embed_tokens.weight.data)  # (B, T, V)
        else:
            logits, tied_head = self.lm_head.forward(h), None
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(logits, targets)
        aux_cache = None
        if loss is not None and cfg.num_local_experts and cfg.router_aux_loss_coef:
            # Mixtral's load balance: f and P over the tokens of every layer together, (MOE.11) on the stacked
            # rows; a position whose target is ignored (padding) counts in neither, (MOE.15)
            kept = (targets.reshape(-1) != IGNORE_INDEX)  # (B T,)
            aux, aux_cache = load_balancing_loss_forward(np.concatenate([r.probs for r in routings]),
                                                         np.concatenate([r.expert for r in routings]),
                                                         None if kept.all() else np.tile(kept, len(routings)))
            self.aux_loss = float(aux)
            loss = loss + cfg.router_aux_loss_coef * aux
        self.save_cache(LlamaCache(tied_head=tied_head, loss=loss_cache, aux=aux_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse."""
        if self.peek_cache().loss is None:
            raise RuntimeError("Llama.backward: the matching forward had no targets, so there is no loss to "
                               "differentiate")
        cache = self.pop_cache()
        dtype = self.norm.weight.data.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache.loss)
        self.record("dlogits", dlogits)
        if cache.tied_head is not None:
            dh, dW_head, _ = linear_backward(dlogits, cache.tied_head)
            self.embed_tokens.weight.grad += dW_head  # tied: the head's gradient joins the embedding's
        else:
            dh = self.lm_head.backward(dlogits)
        dx = self.norm.backward(dh)
        dprobs = [None] * len(self.layers)
        if cache.aux is not None:  # (MOE.13) or (MOE.16): the pooled loss's gradient, split into each layer's rows
            dprobs = np.split(load_balancing_loss_backward(np.asarray(self.cfg.router_aux_loss_coef, dtype),
                                                           cache.aux), len(self.layers))
        for layer, dp in zip(reversed(self.layers), reversed(dprobs)):
            dx = layer.backward(dx, dp)
        self.embed_tokens.backward(dx)

    def astype(self, dtype) -> "Llama":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.embed_tokens.weight.data.dtype.name)
        return self

    @property
    def supports_kv_cache(self) -> bool:
        """False for a model with a ``capacity_factor``: its routing looks ahead and across rows (proofs/moe.md)."""
        return self.cfg.capacity_factor is None

    def make_kv_caches(self, batch: int, max_len: Optional[int] = None) -> List[KVCache]:
        """One KVCache per layer for ``max_len`` positions (default and at most block_size); refused for a model
        with a capacity, which cannot decode with a cache."""
        if not self.supports_kv_cache:
            raise ValueError(f"Llama.make_kv_caches: argument 'self' expected a model that can decode with a KV "
                             f"cache, got one with capacity_factor {self.cfg.capacity_factor} (non-causal routing); "
                             f"generate with use_cache=False")
        max_len = check_kv_length("Llama.make_kv_caches", max_len, self.cfg.block_size)
        return [layer.self_attn.make_kv_cache(batch, max_len) for layer in self.layers]


class Mixtral(Llama):
    """``Llama`` with experts, under the name a Hugging Face ``mixtral`` folder gives it (the model it loads as).

    ``Llama(cfg)`` returns one whenever cfg has experts; the name tells the folder writer to write it as Mixtral.
    """

    def __init__(self, cfg: LlamaConfig, seed: int = 0):
        if isinstance(cfg, LlamaConfig) and not cfg.num_local_experts:
            raise ValueError("Mixtral: argument 'cfg' expected num_local_experts >= 1, got 0 "
                             "(a dense model is a Llama)")
        super().__init__(cfg, seed)
