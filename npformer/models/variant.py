"""A configurable decoder-only language model: GPT-2's skeleton with every common design choice a switch.

``VariantLM`` is the model for ablations: one file, one config, and each choice that
separates GPT-2, LLaMA and the original Transformer's decoder is a field of ``VariantConfig``:

- ``norm``: LayerNorm (GPT-2), RMSNorm (LLaMA) or GroupNorm over each token's channels in
  ``num_groups`` groups (GN.6; one group is LayerNorm, GN.11);
- ``norm_position``: "pre", x + f(norm(x)) with a final norm ``ln_f`` (GPT-2), or "post",
  x = norm(x + f(x)) (the original Transformer). A post-norm model has no ``ln_f``: the last
  block already ends in a norm (its ``ln_2``), as the original Transformer, whose decoder
  stack ends at its last layer norm;
- ``activation``: GELU in its tanh form (GPT-2, "gelu"), exact ("gelu_erf", ACT.6) or sigmoid
  ("gelu_sigmoid", x sigmoid(1.702 x), ACT.22) form, ReLU (the original Transformer), Mish
  (ACT.14) or SwiGLU (LLaMA). ``d_ff`` None gives 4 d_model for all but SwiGLU and, for
  SwiGLU, the width that spends the same parameters as a 4 d_model GELU MLP: three matrices
  of D x F against two of D x 4D, so F = 2/3 * 4D = 8D/3, rounded to the nearest integer
  (``resolved_d_ff``);
- ``position``: a learned (block_size, D) table added to the token embeddings (GPT-2); the
  fixed sinusoidal table (POS.1), added likewise, with no parameters, to token embeddings scaled
  by sqrt(D) and drawn with std D^-1/2 (the original Transformer's recipe: both terms of unit
  scale; with GPT-2's std 0.02 embeddings the table's +-1 entries drown which token is which,
  and such a model learns only the letter frequencies); rotary q and k inside
  each attention layer (RoPE, ROPE.3); ALiBi's per-head linear bias on the scores (ALIBI.3);
  or none at all (the causal mask alone orders the tokens);
- ``n_kv_head``: multi-head (None), grouped-query (a divisor of n_head) or multi-query (1)
  attention; the KV cache shrinks with it (``kv_cache_bytes_per_token``);
- ``bias`` (every linear layer's and LayerNorm's or GroupNorm's bias; RMSNorm has none), ``tie_head``
  (logits = h wte^T, or a head ``lm_head`` of its own), ``dropout``;
- ``parallel_block`` (GPT-J, PaLM): x + attn(ln_1(x)) + mlp(ln_1(x)), both branches reading one
  norm of the block's input, so a parallel block has no ``ln_2``. Pre-norm only;
- ``mod_capacity``: Mixture of Depths (Raote et al. 2024, ``proofs/mixture_of_depths.md``). Every
  other block (blocks 1, 3, 5, ...) gets a ``router`` (a D -> 1 linear map, MOD.5); in each sequence
  only the k = ceil(c T) tokens with the largest router scalar r pass through the block, and
  their output is x + r f(x) (MOD.7), f the block's residual branches; the other tokens skip
  the block unchanged. The k routed tokens form a sequence of their own inside the block: they
  attend causally to one another only, and RoPE and ALiBi see them at positions 0 .. k-1. Top-k
  over the sequence looks ahead (whether token t is routed depends on the tokens after it), so a
  routed model is not causal and cannot decode with a KV cache: ``forward`` with ``kv_caches``
  and ``make_kv_caches`` refuse it by name (``supports_kv_cache`` is False); ``generate`` runs
  it with ``use_cache=False``, each step routing over the context it has. Pre-norm only.

Length generalisation: ``block_size`` is the longest context ``forward`` accepts, and a model
may be trained on shorter windows (length L) and then evaluated at 2L or 4L. Sinusoidal, RoPE,
ALiBi and no positions define every position up to block_size without parameters. A learned
table has block_size rows, but a model trained at length L has only ever updated rows
0 .. L-1: evaluated beyond L it reads rows still at their random initialisation, which is the
failure a length-generalisation study measures, not a bug.

Names follow GPT's where they exist: ``wte``, ``wpe`` (learned positions only),
``blocks.{i}.ln_1``, ``blocks.{i}.attn.{q,k,v,o}_proj``, ``blocks.{i}.ln_2``, ``blocks.{i}.mlp``
(``fc``, ``proj``; or ``gate_proj``, ``up_proj``, ``down_proj`` for SwiGLU), ``ln_f`` (pre-norm
only), ``lm_head`` (untied only), ``blocks.{i}.router`` (routed blocks only). Recorded values are
GPT's too: ``blocks.{i}.out``, ``blocks.{i}.attn.probs``, ``blocks.{i}.mlp.act``, ``logits``,
``dlogits``; a routed block also records ``blocks.{i}.routed`` (B, k), the positions it took.

Read it beside ``gpt.py``: ``forward`` runs the layers in order, ``backward`` walks them in
reverse, one line per layer. Shapes: ids (B, T) int, logits (B, T, V), hidden (B, T, D).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Dropout, Embedding, GroupNorm, LayerNorm, Linear, RMSNorm, check_dout, check_features
from ..nn.lm import IGNORE_INDEX, check_kv_length, check_lm_inputs, prefix_lm_bias  # noqa: F401  (IGNORE_INDEX too)
from ..nn.mlp import MLP, SwiGLUMLP
from ..nn.module import Module, ModuleList, Parameter, atomic
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_float, check_ndim, check_real
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.layernorm import layernorm_backward, layernorm_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.moe import ceil_of_decimal_product
from ..ops.positional import sinusoidal_table

NORMS = ("layernorm", "rmsnorm", "groupnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "relu", "swiglu", "mish", "gelu_erf", "gelu_sigmoid")
# activation -> the MLP's (activation, approximate): GELU's three forms (ACT.8), (ACT.6), (ACT.22)
MLP_ACTIVATION = {"gelu": ("gelu", "tanh"), "gelu_erf": ("gelu", "none"), "gelu_sigmoid": ("gelu", "sigmoid"),
                  "relu": ("relu", "tanh"), "mish": ("mish", "tanh")}
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
DTYPES = ("float32", "float64")


def routed_tokens(capacity: float, T: int) -> int:
    """k = ceil(c T), at least 1 and at most T (MOD.6).

    The product is exact for the decimal c prints as (``ceil_of_decimal_product``): c = 0.55 and T = 100
    give k = 55, not the 56 of the float product 55.000000000000007.
    """
    return min(T, max(1, ceil_of_decimal_product(capacity, T)))


def _check_choice(op: str, name: str, value: object, choices: Tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{op}: argument '{name}' expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


@dataclass
class VariantConfig:
    """A variant's shape and design choices; the module docstring says what each option means.

    ``n_kv_head`` and ``d_ff`` may be left None: the config keeps None (so it round-trips through
    ``to_dict`` unchanged) and the model reads ``resolved_n_kv_head`` (n_head) and
    ``resolved_d_ff`` (4 d_model; round(8 d_model / 3) for SwiGLU, the same parameter count).
    """

    vocab_size: int = 65
    block_size: int = 256  # the longest context forward accepts (a model may train on shorter windows)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None: n_head (MHA); a divisor of n_head (GQA); 1 (MQA)
    d_model: int = 128
    d_ff: Optional[int] = None  # None: 4 d_model (gelu, relu); round(8 d_model / 3) (swiglu)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" | "groupnorm"
    num_groups: int = 1  # GroupNorm's groups over d_model (a divisor of it); read only for "groupnorm"
    norm_position: str = "pre"  # "pre" (GPT-2) | "post" (original Transformer: x = norm(x + f(x)))
    activation: str = "gelu"  # "gelu" (tanh, GPT-2) | "relu" | "swiglu" | "mish" | "gelu_erf" | "gelu_sigmoid"
    position: str = "learned"  # "learned" | "sinusoidal" | "rope" | "alibi" | "none"
    dropout: float = 0.0
    bias: bool = True  # linear and LayerNorm biases (RMSNorm has none)
    tie_head: bool = True  # logits = h @ wte^T; False: a head lm_head of its own
    dtype: str = "float32"
    parallel_block: bool = False  # x + attn(ln_1(x)) + mlp(ln_1(x)) (GPT-J, PaLM); pre-norm only
    mod_capacity: Optional[float] = None  # Mixture of Depths: the fraction c in (0, 1] of tokens routed
    # through every other block (None: off); pre-norm only

    def __post_init__(self) -> None:
        """Every field checked by name when the config is made, so a bad one never builds a model."""
        op = "VariantConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        for name in ("n_kv_head", "d_ff"):
            if getattr(self, name) is not None:
                setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model}, "
                             f"got {self.n_head}")
        if self.n_head % self.resolved_n_kv_head:
            raise ValueError(f"{op}: argument 'n_kv_head' expected a divisor of n_head = {self.n_head}, "
                             f"got {self.n_kv_head}")
        self.norm = _check_choice(op, "norm", self.norm, NORMS)
        self.num_groups = check_count(op, "num_groups", self.num_groups, 1, MAX_POSITION)
        if self.norm == "groupnorm" and self.d_model % self.num_groups:
            raise ValueError(f"{op}: argument 'num_groups' expected a divisor of d_model = {self.d_model} for "
                             f"'groupnorm', got {self.num_groups}")
        self.norm_position = _check_choice(op, "norm_position", self.norm_position, NORM_POSITIONS)
        self.activation = _check_choice(op, "activation", self.activation, ACTIVATIONS)
        self.position = _check_choice(op, "position", self.position, POSITIONS)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"{op}: argument 'position' expected an even head_dim d_model / n_head for 'rope' "
                             f"(RoPE rotates pairs), got 'rope' with head_dim {self.head_dim}")
        if self.position == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"{op}: argument 'position' expected an even d_model for 'sinusoidal' "
                             f"(the table pairs sines and cosines), got 'sinusoidal' with d_model {self.d_model}")
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.bias = check_bool(op, "bias", self.bias)
        self.tie_head = check_bool(op, "tie_head", self.tie_head)
        self.dtype = _check_choice(op, "dtype", self.dtype, DTYPES)
        self.parallel_block = check_bool(op, "parallel_block", self.parallel_block)
        if self.parallel_block and self.norm_position != "pre":
            raise ValueError(f"{op}: argument 'parallel_block' expected False with norm_position 'post' (a parallel "
                             f"block reads one pre-norm of its input), got True")
        if self.mod_capacity is not None:
            self.mod_capacity = check_real(op, "mod_capacity", self.mod_capacity, lo=0.0, hi=1.0, lo_open=True)
            if self.norm_position != "pre":
                raise ValueError(f"{op}: argument 'mod_capacity' expected None with norm_position 'post' (a routed "
                                 f"token's output x + r f(x) scales the residual branches f of a pre-norm block), "
                                 f"got {self.mod_capacity}")
            if self.n_layer < 2:
                raise ValueError(f"{op}: argument 'mod_capacity' expected None with n_layer = {self.n_layer} (blocks "
                                 f"1, 3, 5, ... route, so a one-block model has no routed block and the capacity "
                                 f"would do nothing), got {self.mod_capacity}")

    @property
    def head_dim(self) -> int:
        """D_h = d_model / n_head."""
        return self.d_model // self.n_head

    @property
    def resolved_n_kv_head(self) -> int:
        """H_kv: ``n_kv_head``, or n_head when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def resolved_d_ff(self) -> int:
        """F: ``d_ff``, or 4 D for GELU and ReLU; for SwiGLU 2/3 of 4 D rounded to the nearest integer,
        so that its three D x F matrices hold as many weights as GELU's two D x 4D (8 D^2)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return (8 * self.d_model + 1) // 3  # round(8 D / 3): 8 D mod 3 is never 1.5 away
        return 4 * self.d_model

    def routed(self, layer: int) -> bool:
        """Whether block ``layer`` routes its tokens (Mixture of Depths): every other block, 1, 3, 5, ..."""
        return self.mod_capacity is not None and layer % 2 == 1

    def mod_tokens(self, T: int) -> int:
        """k = ceil(c T): the tokens of a T-token sequence a routed block processes (MOD.6); 1 <= k <= T."""
        return routed_tokens(self.mod_capacity, T)

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), matmuls only.

        Per layer, with D = d_model, H heads and H_kv key/value heads of size D_h, F the MLP width:
        weight multiply-adds 2 D H D_h (q, o) + 2 D H_kv D_h (k, v), 2 D F for a GELU or ReLU MLP
        (fc, proj) or 3 D F for SwiGLU (gate, up, down), and 2 T H D_h for Q K^T and P V at full
        length T (the dense kernels compute the masked half too); the head adds V D, tied or not.
        Norms, positions, activations and the softmax are left out. The count is the dense model's:
        a Mixture-of-Depths model spends less in its routed blocks (c of the weight products and
        about c^2 of the attention scores, ``proofs/mixture_of_depths.md``).
        """
        c = self
        T = c.block_size if seq_len is None else check_count("VariantConfig.flops_per_token", "seq_len", seq_len, 1)
        Dh, F = c.head_dim, c.resolved_d_ff
        attn = c.d_model * Dh * (2 * c.n_head + 2 * c.resolved_n_kv_head)
        mlp = (3 if c.activation == "swiglu" else 2) * c.d_model * F
        macs = c.n_layer * (attn + mlp + 2 * T * c.n_head * Dh) + c.vocab_size * c.d_model
        return 3 * 2 * macs

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        """Bytes one token adds to the KV caches: 2 (k and v) n_layer H_kv D_h dtype_bytes (ATT.14)."""
        b = check_count("VariantConfig.kv_cache_bytes_per_token", "dtype_bytes", dtype_bytes, 1)
        return 2 * self.n_layer * self.resolved_n_kv_head * self.head_dim * b


class LayerNormNoBias(Module):
    """LayerNorm with a gain and no bias (beta = 0 in (LN.5)): a ``bias=False`` model's LayerNorm."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=np.float32):
        super().__init__()
        self.eps = float(check_real("LayerNormNoBias", "eps", eps, lo=0.0))
        self.weight = Parameter(np.ones(check_count("LayerNormNoBias", "dim", dim, 1, MAX_POSITION), dtype))

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., D) -> y (..., D)."""
        check_features("LayerNormNoBias.forward", "x", x, self.weight.shape[0], self.weight.data.dtype)
        zero = np.zeros_like(self.weight.data)
        y, cache = layernorm_forward(x, self.weight.data, zero, self.eps)  # (LN.5) with beta = 0
        self.save_cache(cache)
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        cache = self.pop_cache()
        dx, dweight, _ = layernorm_backward(dy, cache)  # the bias's gradient has no parameter to go to
        self.weight.grad += dweight
        self.record("dweight", dweight)
        self.record("dx", dx)
        return dx


def make_norm(cfg: VariantConfig) -> Module:
    """The config's norm over d_model: LayerNorm or GroupNorm (each with or without its bias) or RMSNorm."""
    dtype = np.dtype(cfg.dtype)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, dtype=dtype)
    if cfg.norm == "groupnorm":
        return GroupNorm(cfg.d_model, cfg.num_groups, bias=cfg.bias, dtype=dtype)
    return LayerNorm(cfg.d_model, dtype=dtype) if cfg.bias else LayerNormNoBias(cfg.d_model, dtype=dtype)


class BlockCache(NamedTuple):
    """One forward call of a ``VariantBlock``: the shape its dout must have (the sublayers keep the rest),
    and for a routed block (Mixture of Depths) what its backward needs beyond the sublayers' caches."""

    out_shape: Tuple[int, ...]
    routed: Optional[np.ndarray] = None  # (B, k) int: the positions routed through the block, ascending (MOD.6)
    r: Optional[np.ndarray] = None  # (B, k, 1): their router scalars (MOD.5)
    f: Optional[np.ndarray] = None  # (B, k, D): the residual branches' output on them (MOD.7)


def top_k_positions(r: np.ndarray, k: int) -> np.ndarray:
    """r (B, T) -> (B, k): each row's k positions of largest r, in ascending order (MOD.6).

    Ties go to the earlier position (a stable sort of -r), so the choice is the same in any
    implementation that sorts stably.
    """
    best = np.argsort(-r, axis=1, kind="stable")[:, :k]
    return np.sort(best, axis=1)


def _take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """a (B, T, ...) and idx (B, k) -> (B, k, ...): row b's entries at positions idx[b]."""
    return a[np.arange(a.shape[0])[:, None], idx]


class VariantBlock(Module):
    """Pre-norm: x + drop(attn(ln_1(x))), then + drop(mlp(ln_2(x))).
    Parallel (pre-norm): x + drop(attn(ln_1(x))) + drop(mlp(ln_1(x))), one norm for both branches.
    Post-norm: x = ln_1(x + drop(attn(x))), then ln_2(x + drop(mlp(x))).
    Routed (Mixture of Depths, pre-norm): the top-k tokens by router scalar r get x + r f(x), f the
    residual branches above run on those k tokens alone; the others pass unchanged (MOD.7)."""

    def __init__(self, cfg: VariantConfig, rng: np.random.Generator, layer: int = 0):
        super().__init__()
        dtype, proj_std = np.dtype(cfg.dtype), 0.02 / np.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.pre = cfg.norm_position == "pre"
        self.parallel = cfg.parallel_block
        self.mod_capacity = cfg.mod_capacity  # c, read by routed blocks only
        position = cfg.position if cfg.position in ("rope", "alibi") else "none"  # the others enter at the input
        self.ln_1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.resolved_n_kv_head, bias=cfg.bias,
                                       position=position, dtype=dtype, rng=rng)
        o_shape = self.attn.o_proj.weight.shape
        self.attn.o_proj.weight.data[...] = (rng.standard_normal(o_shape) * proj_std).astype(dtype)
        self.drop_1 = Dropout(cfg.dropout, rng=rng)
        if not self.parallel:  # a parallel block's MLP reads ln_1's output too
            self.ln_2 = make_norm(cfg)
        if cfg.activation == "swiglu":
            self.mlp = SwiGLUMLP(cfg.d_model, cfg.resolved_d_ff, cfg.bias, rng=rng, proj_std=proj_std, dtype=dtype)
        else:
            activation, approximate = MLP_ACTIVATION[cfg.activation]
            self.mlp = MLP(cfg.d_model, cfg.resolved_d_ff, cfg.bias, approximate, rng=rng, proj_std=proj_std,
                           dtype=dtype, activation=activation)
        self.drop_2 = Dropout(cfg.dropout, rng=rng)
        self.routed = cfg.routed(layer)
        if self.routed:
            self.router = Linear(cfg.d_model, 1, False, rng=rng, dtype=dtype)  # r = x w (MOD.5)

    # -- the residual branches of a pre-norm block: x + f(x) ---------------------------------------
    def _branches(self, x: np.ndarray, kv_cache: Optional[KVCache], mask_bias: Optional[np.ndarray]) -> np.ndarray:
        """f(x) (B, T, D): sequential, drop(attn(ln_1(x))) + drop(mlp(ln_2(x + drop(attn(ln_1(x))))));
        parallel, drop(attn(h)) + drop(mlp(h)) with h = ln_1(x)."""
        h = self.ln_1.forward(x)
        a = self.drop_1.forward(self.attn.forward(h, causal=mask_bias is None, kv_cache=kv_cache, bias=mask_bias))
        if self.parallel:
            return a + self.drop_2.forward(self.mlp.forward(h))  # (MOD.2)
        return a + self.drop_2.forward(self.mlp.forward(self.ln_2.forward(x + a)))  # (MOD.1)

    def _branches_backward(self, df: np.ndarray) -> np.ndarray:
        """The gradient of <df, f(x)> with respect to x: the branches' lines in reverse."""
        if self.parallel:  # (MOD.4)
            dh = self.attn.backward(self.drop_1.backward(df))  # into ln_1's output, from the attention branch
            dh = dh + self.mlp.backward(self.drop_2.backward(df))  # and from the MLP branch (one norm, two readers)
            return self.ln_1.backward(dh)
        # (MOD.3)
        dx_mid = self.ln_2.backward(self.mlp.backward(self.drop_2.backward(df)))  # into x + a, via the MLP
        da = df + dx_mid  # a enters f directly and through x + a
        return dx_mid + self.ln_1.backward(self.attn.backward(self.drop_1.backward(da)))  # x + a's x; attn's x

    @atomic
    def forward(self, x: np.ndarray, kv_cache: Optional[KVCache] = None,
                mask_bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, D) -> (B, T, D); mask_bias (B, 1, T, S) replaces the causal mask (a prefix LM's, ATT.18)."""
        op = "VariantBlock.forward"
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, self.ln_1.weight.shape[0], self.ln_1.weight.data.dtype)
        if self.routed:
            if kv_cache is not None:
                raise ValueError(f"{op}: argument 'kv_cache' expected None in a routed block (top-k routing over the "
                                 f"sequence looks ahead, so it cannot continue a cache), got a KVCache")
            return self._routed_forward(x, mask_bias)
        causal = mask_bias is None
        if self.pre:
            x = x + self._branches(x, kv_cache, mask_bias)  # x + f(x), (MOD.1) or (MOD.2)
        else:
            a = self.attn.forward(x, causal=causal, kv_cache=kv_cache, bias=mask_bias)
            x = self.ln_1.forward(x + self.drop_1.forward(a))
            m = self.mlp.forward(x)
            x = self.ln_2.forward(x + self.drop_2.forward(m))
        self.save_cache(BlockCache(out_shape=x.shape))  # the residual stream needs nothing else
        self.record("out", x)
        return x

    def _routed_forward(self, x: np.ndarray, mask_bias: Optional[np.ndarray]) -> np.ndarray:
        """Mixture of Depths: x (B, T, D) -> (B, T, D), the top-k tokens of each row through the block."""
        r = self.router.forward(x)  # (B, T, 1)  (MOD.5)
        routed = top_k_positions(r[..., 0], routed_tokens(self.mod_capacity, x.shape[1]))  # (B, k)  (MOD.6)
        self.record("routed", routed)
        x_k, r_k = _take_rows(x, routed), _take_rows(r, routed)  # (B, k, D), (B, k, 1)
        if mask_bias is not None:  # the k routed rows and columns of each row's mask
            b = np.arange(x.shape[0])[:, None, None]
            mask_bias = mask_bias[b, 0, routed[:, :, None], routed[:, None, :]][:, None]  # (B, 1, k, k)
        f = self._branches(x_k, None, mask_bias)  # (B, k, D): the block on the routed tokens alone
        out = x.copy()  # the tokens not routed skip the block (MOD.7)
        out[np.arange(x.shape[0])[:, None], routed] = x_k + r_k * f  # (MOD.7)
        self.save_cache(BlockCache(out_shape=out.shape, routed=routed, r=r_k, f=f))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, T, D) -> dx (B, T, D): the forward's lines in reverse, one gradient per line."""
        check_dout(self, "VariantBlock.backward", "dout", dout, self.ln_1.weight.shape[0],
                   self.ln_1.weight.data.dtype)
        cache = self.pop_cache()
        if cache.routed is not None:
            dx = self._routed_backward(dout, cache)
        elif self.pre:
            dx = dout + self._branches_backward(dout)  # the identity path plus the branches, (MOD.3) or (MOD.4)
        else:
            ds_2 = self.ln_2.backward(dout)  # into the second residual sum x_mid + drop(mlp(x_mid))
            dx_mid = ds_2 + self.mlp.backward(self.drop_2.backward(ds_2))  # identity path plus MLP path
            ds_1 = self.ln_1.backward(dx_mid)  # into the first residual sum x + drop(attn(x))
            dx = ds_1 + self.attn.backward(self.drop_1.backward(ds_1))  # identity path plus attention path
        self.record("dx", dx)
        return dx

    def _routed_backward(self, dout: np.ndarray, cache: BlockCache) -> np.ndarray:
        rows = np.arange(dout.shape[0])[:, None]
        dout_k = _take_rows(dout, cache.routed)  # (B, k, D)
        dr_k = np.sum(dout_k * cache.f, axis=-1, keepdims=True)  # (B, k, 1)  (MOD.9)
        dx = dout.copy()  # every token's identity path (MOD.8)
        dx[rows, cache.routed] += self._branches_backward(cache.r * dout_k)  # (MOD.8)
        dr = np.zeros(dout.shape[:2] + (1,), dout.dtype)  # tokens not routed: r does not reach the loss (MOD.9)
        dr[rows, cache.routed] = dr_k
        dx += self.router.backward(dr)  # (MOD.10)  r = x w: dw = x^T dr, dx += dr w^T
        return dx


class VariantCache(NamedTuple):
    """One training forward of ``VariantLM``: the tied head's op cache (None when untied) and the loss's."""

    tied_head: Optional[LinearCache]  # logits = h @ wte^T when tied; lm_head keeps its own otherwise
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets


class VariantLM(Module):
    """wte (+ wpe or the sinusoidal table) -> blocks -> ln_f (pre-norm) -> head; ``forward``/``backward`` as GPT's."""

    def __init__(self, cfg: VariantConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, VariantConfig):
            raise TypeError(f"VariantLM: argument 'cfg' expected a VariantConfig, got {type(cfg).__name__}")
        check_count("VariantLM", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init, then dropout masks (saved in checkpoints)
        dtype = np.dtype(cfg.dtype)
        # the sinusoidal recipe: embeddings of std D^-1/2, scaled by sqrt(D) in forward (unit scale, as the table)
        self.embed_scale = float(np.sqrt(cfg.d_model)) if cfg.position == "sinusoidal" else 1.0
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype,
                             std=cfg.d_model ** -0.5 if cfg.position == "sinusoidal" else 0.02)
        if cfg.position == "learned":
            self.wpe = Embedding(cfg.block_size, cfg.d_model, rng=rng, std=0.01, dtype=dtype)
        # Sinusoidal: a constant (block_size, D) table (POS.1), not a parameter; converted by astype.
        self.pe = sinusoidal_table(cfg.block_size, cfg.d_model, dtype=dtype) if cfg.position == "sinusoidal" else None
        self.drop = Dropout(cfg.dropout, rng=rng)
        self.blocks = ModuleList(VariantBlock(cfg, rng, i) for i in range(cfg.n_layer))
        if cfg.norm_position == "pre":
            self.ln_f = make_norm(cfg)  # post-norm: the last block's ln_2 is the final norm
        if not cfg.tie_head:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, False, rng=rng, dtype=dtype)
        # Tied: the LM head is wte.weight itself, logits = h @ wte^T.

    # ------------------------------------------------------------------------------------
    @atomic
    def forward(self, ids: np.ndarray, targets: Optional[np.ndarray] = None,
                kv_caches: Optional[List[KVCache]] = None, *,
                prefix_len: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T) -> logits (B, T, V) and the mean cross entropy if targets (B, T) are given.

        ids are integers in [0, vocab_size), B >= 1 and 1 <= T <= block_size; targets are in
        [0, vocab_size) or -100 (ignored). With ``kv_caches`` (one per block, eval mode), ids
        continue the cached sequence: positions (learned, sinusoidal, rotary, ALiBi) start at the
        cache length. In training mode each forward keeps its caches for one ``backward()``.
        ``prefix_len`` (B,) makes it a prefix LM (ATT.18), as ``GPT.forward``. A learned table's
        rows beyond the training length were never trained (see the module docstring). A
        Mixture-of-Depths model routes over the whole of ids and refuses ``kv_caches`` by name.
        """
        cfg = self.cfg
        op = "VariantLM.forward"
        if kv_caches is not None and not self.supports_kv_cache:
            raise ValueError(f"{op}: argument 'kv_caches' expected None for a Mixture-of-Depths model (mod_capacity "
                             f"{cfg.mod_capacity}: top-k routing over the sequence looks ahead, so cached decoding is "
                             f"not defined; decode without a cache), got a list of caches")
        start = check_lm_inputs(op, ids, targets, kv_caches, vocab_size=cfg.vocab_size,
                                block_size=cfg.block_size, n_layer=cfg.n_layer, n_kv_head=cfg.resolved_n_kv_head,
                                head_dim=cfg.head_dim, dtype=np.dtype(cfg.dtype),
                                training=self.training)  # the first position: the cache length
        B, T = ids.shape
        mask_bias = None if prefix_len is None else \
            prefix_lm_bias(op, prefix_len, B, start, T, np.dtype(cfg.dtype))  # (B, 1, T, start + T)
        x = self.wte.forward(ids)  # (B, T, D)
        if cfg.position == "learned":
            x = x + self.wpe.forward(np.arange(start, start + T))  # (T, D) rows of the table
        elif cfg.position == "sinusoidal":
            x = x * x.dtype.type(self.embed_scale) + self.pe[start:start + T]  # (T, D), a constant (POS.1)
        x = self.drop.forward(x)
        for i, block in enumerate(self.blocks):
            x = block.forward(x, None if kv_caches is None else kv_caches[i], mask_bias)
        h = self.ln_f.forward(x) if cfg.norm_position == "pre" else x
        if cfg.tie_head:
            logits, tied_head = linear_forward(h, self.wte.weight.data)  # (B, T, V)
        else:
            logits, tied_head = self.lm_head.forward(h), None
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(logits, targets)
        self.save_cache(VariantCache(tied_head=tied_head, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse."""
        if self.peek_cache().loss is None:
            raise RuntimeError("VariantLM.backward: the matching forward had no targets, so there is no loss to "
                               "differentiate")
        cache = self.pop_cache()
        cfg = self.cfg
        dtype = self.wte.weight.data.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache.loss)
        self.record("dlogits", dlogits)
        if cache.tied_head is not None:
            dh, dW_head, _ = linear_backward(dlogits, cache.tied_head)
            self.wte.weight.grad += dW_head  # tied: the head's gradient joins the embedding's
        else:
            dh = self.lm_head.backward(dlogits)
        dx = self.ln_f.backward(dh) if cfg.norm_position == "pre" else dh
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        if cfg.position == "learned":
            self.wpe.backward(dx.sum(axis=0))  # one table row per t, shared over the batch
        if cfg.position == "sinusoidal":  # x = sqrt(D) wte[ids] + table: the table is constant
            dx = dx * dx.dtype.type(self.embed_scale)
        self.wte.backward(dx)

    def astype(self, dtype) -> "VariantLM":
        """Convert the parameters to float32 or float64; the config and the sinusoidal table follow."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.wte.weight.data.dtype.name)
        if self.pe is not None:
            self.pe = self.pe.astype(self.cfg.dtype)
        return self

    @property
    def supports_kv_cache(self) -> bool:
        """False for a Mixture-of-Depths model: its top-k routing looks ahead (``proofs/mixture_of_depths.md``)."""
        return self.cfg.mod_capacity is None

    def make_kv_caches(self, batch: int, max_len: Optional[int] = None) -> List[KVCache]:
        """One KVCache per block for ``max_len`` positions (default and at most block_size); refused for a
        Mixture-of-Depths model, which cannot decode with a cache."""
        if not self.supports_kv_cache:
            raise ValueError(f"VariantLM.make_kv_caches: argument 'self' expected a model that can decode with a KV "
                             f"cache, got a Mixture-of-Depths model (mod_capacity {self.cfg.mod_capacity}); "
                             f"generate with use_cache=False")
        max_len = check_kv_length("VariantLM.make_kv_caches", max_len, self.cfg.block_size)
        return [block.attn.make_kv_cache(batch, max_len) for block in self.blocks]
