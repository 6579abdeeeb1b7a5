"""T5 (v1.0 and v1.1): an encoder-decoder of pre-RMSNorm blocks with one bucketed relative position bias per stack.

Read it beside ``llama.py``: the encoder is a stack of blocks (self attention, feed forward), the
decoder a stack of blocks (causal self attention, cross attention over the encoder's output, feed
forward); both read their tokens from one shared embedding. What makes it T5:

- the norms are RMS norms without a bias (``RMSNorm``, eps ``layer_norm_epsilon``), before each
  sublayer, with a final norm per stack; residuals add the sublayer's (dropped-out) output;
- attention has no 1/sqrt(d) scaling (``scale=1.0``), no biases, heads of size ``d_kv`` (which need
  not be d_model / n_head);
- positions enter as one learned table of ``relative_attention_num_buckets`` x n_head per stack
  (the first block's, ``block.0.layer.0.SelfAttention.relative_attention_bias.weight``): the stack
  computes the bias once with ``npformer.ops.t5_bias`` (bidirectional buckets in the encoder,
  one-way in the decoder, queries offset by the cached length when decoding) and hands it to every
  layer's self attention; the table's gradient is (T5.5) of the sum of every layer's ``dbias``
  (ATT.10). Cross attention has no position bias;
- feed forward: ``"relu"`` (v1.0: wi -> ReLU -> dropout -> wo) or ``"gated-gelu"`` (v1.1:
  gelu_new(wi_0 x) * wi_1 x -> dropout -> wo, ``GatedMLP``);
- the head: tied (v1.0), logits = (h d_model^-1/2) E^T with E the shared table; untied (v1.1),
  logits = lm_head(h) without the scaling. ``scale_decoder_outputs`` sets the scaling on its own
  (transformers 5 writes a tied gated-gelu model with no scaling).

Dropout (``dropout``, Hugging Face's dropout_rate) acts on the embeddings, on every sublayer's
output, inside the feed forward and after each final norm; unlike Hugging Face's, it does not act
on the attention probabilities.

Parameter names follow Hugging Face's ``T5ForConditionalGeneration``: ``shared.weight``,
``{encoder,decoder}.block.{i}.layer.{j}.layer_norm.weight``,
``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}_proj.weight`` (HF: ``q``, ``k``, ``v``, ``o``),
``decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}_proj.weight``,
``...layer.{1 or 2}.DenseReluDense.{wi,wo}.weight`` (v1.0) or ``.{wi_0,wi_1,wo}.weight`` (v1.1),
``{encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight``,
``{encoder,decoder}.final_layer_norm.weight`` and ``lm_head.weight`` (absent when tied).

It offers the encoder-decoder interface (``forward``/``backward``, ``encode``, ``decode``,
``make_decoder_caches``). Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D) with
D = d_model; logits (B, T, V).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Dropout, Embedding, Linear, RMSNorm, check_dout, check_features
from ..nn.lm import IGNORE_INDEX
from ..nn.mlp import GatedMLP
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import (MAX_POSITION, check_array, check_bool, check_count, check_float, check_int, check_ndim,
                           check_real, check_shape)
from ..ops.activations import ReluCache, relu_backward, relu_forward
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.t5_bias import T5BiasCache, t5_bias_backward, t5_bias_forward

FEED_FORWARD = ("relu", "gated-gelu")


@dataclass
class T5Config:
    """A T5 model's shape; Hugging Face's field name, where it differs, in the comment."""

    vocab_size: int = 64
    d_model: int = 64
    d_kv: int = 16  # head size; need not be d_model / n_head
    d_ff: int = 128
    num_layers: int = 2  # encoder blocks
    num_decoder_layers: Optional[int] = None  # None: num_layers
    n_head: int = 4  # num_heads
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1)
    tie_word_embeddings: bool = True  # v1.0: the head is the shared table; v1.1: an lm_head of its own
    scale_decoder_outputs: Optional[bool] = None  # h * d_model^-1/2 before the head; None: tie_word_embeddings
    layer_norm_epsilon: float = 1e-6
    dropout: float = 0.1  # dropout_rate
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "T5Config"
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "n_head"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.num_decoder_layers is not None:
            self.num_decoder_layers = check_count(op, "num_decoder_layers", self.num_decoder_layers, 1, MAX_POSITION)
        # The encoder's buckets are two-way (needs 4: one exact bucket per sign), the decoder's one-way; max_distance
        # must exceed the exact buckets of either, N // 2 in the decoder's (T5.3).
        N = self.relative_attention_num_buckets = check_count(
            op, "relative_attention_num_buckets", self.relative_attention_num_buckets, 4, MAX_POSITION)
        self.relative_attention_max_distance = check_count(
            op, "relative_attention_max_distance", self.relative_attention_max_distance, N // 2 + 1, MAX_POSITION)
        if not isinstance(self.feed_forward_proj, str) or self.feed_forward_proj not in FEED_FORWARD:
            allowed = ", ".join(map(repr, FEED_FORWARD))
            raise ValueError(f"{op}: argument 'feed_forward_proj' expected one of {allowed}, got {self.feed_forward_proj!r}")
        self.tie_word_embeddings = check_bool(op, "tie_word_embeddings", self.tie_word_embeddings)
        if self.scale_decoder_outputs is not None:
            self.scale_decoder_outputs = check_bool(op, "scale_decoder_outputs", self.scale_decoder_outputs)
        self.layer_norm_epsilon = check_real(op, "layer_norm_epsilon", self.layer_norm_epsilon, lo=0.0)
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = check_count(op, name, getattr(self, name), 0, MAX_POSITION)
            if value >= self.vocab_size:
                raise ValueError(f"{op}: argument '{name}' expected an id below vocab_size = {self.vocab_size}, "
                                 f"got {value}")
            setattr(self, name, value)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    @property
    def resolved_num_decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def resolved_scale_decoder_outputs(self) -> bool:
        return self.tie_word_embeddings if self.scale_decoder_outputs is None else self.scale_decoder_outputs

    def to_dict(self) -> dict:
        return asdict(self)


# -- sublayers --------------------------------------------------------------------------------------------
class DenseCache(NamedTuple):
    act: ReluCache
    out_shape: Tuple[int, ...]


class T5DenseActDense(Module):
    """T5 v1.0's feed forward: x -> wi -> ReLU (ACT.4) -> dropout -> wo, no biases."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, *, rng: np.random.Generator, dtype):
        super().__init__()
        self.wi = Linear(d_model, d_ff, False, rng=rng, dtype=dtype)
        self.wo = Linear(d_ff, d_model, False, rng=rng, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        a, act = relu_forward(self.wi.forward(x))  # (ACT.4)
        self.record("act", a)
        y = self.wo.forward(self.dropout.forward(a))
        self.save_cache(DenseCache(act=act, out_shape=y.shape))
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        check_dout(self, "T5DenseActDense.backward", "dy", dy, self.wo.weight.shape[0], self.wo.weight.data.dtype)
        cache = self.pop_cache()
        da = self.dropout.backward(self.wo.backward(dy))
        return self.wi.backward(relu_backward(da, cache.act))  # (ACT.5)


class SublayerCache(NamedTuple):
    out_shape: Tuple[int, ...]


class T5LayerSelfAttention(Module):
    """h = x + dropout(SelfAttention(layer_norm(x), bias)): the stack's position bias, added to the logits."""

    def __init__(self, cfg: T5Config, causal: bool, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        self.causal = causal
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.SelfAttention = MultiHeadAttention(cfg.d_model, cfg.n_head, bias=False, head_dim=cfg.d_kv, scale=1.0,
                                                rng=rng, dtype=dtype)
        self.dropout = Dropout(cfg.dropout, rng=rng)

    @atomic
    def forward(self, x: np.ndarray, bias: np.ndarray, key_padding_mask: Optional[np.ndarray] = None,
                kv_cache: Optional[KVCache] = None) -> np.ndarray:
        a = self.SelfAttention.forward(self.layer_norm.forward(x), causal=self.causal, kv_cache=kv_cache,
                                       key_padding_mask=key_padding_mask, bias=bias)
        h = x + self.dropout.forward(a)
        self.save_cache(SublayerCache(out_shape=h.shape))
        return h

    @atomic
    def backward(self, dh: np.ndarray) -> np.ndarray:
        """dh (B, T, D) -> dx; the bias's gradient is left in ``self.SelfAttention.dbias`` (ATT.10)."""
        check_dout(self, "T5LayerSelfAttention.backward", "dh", dh, self.layer_norm.weight.shape[0],
                   self.layer_norm.weight.data.dtype)
        self.pop_cache()
        da = self.SelfAttention.backward(self.dropout.backward(dh))
        return dh + self.layer_norm.backward(da)  # residual: identity path plus attention path


class T5LayerCrossAttention(Module):
    """h = x + dropout(EncDecAttention(layer_norm(x), memory)); no position bias."""

    def __init__(self, cfg: T5Config, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.EncDecAttention = MultiHeadAttention(cfg.d_model, cfg.n_head, bias=False, head_dim=cfg.d_kv, scale=1.0,
                                                  rng=rng, dtype=dtype)
        self.dropout = Dropout(cfg.dropout, rng=rng)

    @atomic
    def forward(self, x: np.ndarray, memory: np.ndarray, memory_padding_mask: Optional[np.ndarray] = None,
                kv_cache: Optional[KVCache] = None) -> np.ndarray:
        a = self.EncDecAttention.forward(self.layer_norm.forward(x), context=memory, kv_cache=kv_cache,
                                         key_padding_mask=memory_padding_mask)
        h = x + self.dropout.forward(a)
        self.save_cache(SublayerCache(out_shape=h.shape))
        return h

    @atomic
    def backward(self, dh: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """dh (B, T, D) -> (dx (B, T, D), dmemory (B, S, D))."""
        check_dout(self, "T5LayerCrossAttention.backward", "dh", dh, self.layer_norm.weight.shape[0],
                   self.layer_norm.weight.data.dtype)
        self.pop_cache()
        da, dmemory = self.EncDecAttention.backward(self.dropout.backward(dh))
        return dh + self.layer_norm.backward(da), dmemory


class T5LayerFF(Module):
    """h = x + dropout(DenseReluDense(layer_norm(x)))."""

    def __init__(self, cfg: T5Config, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        if cfg.feed_forward_proj == "relu":
            self.DenseReluDense = T5DenseActDense(cfg.d_model, cfg.d_ff, cfg.dropout, rng=rng, dtype=dtype)
        else:  # gated-gelu: gelu_new, the tanh form
            self.DenseReluDense = GatedMLP(cfg.d_model, cfg.d_ff, False, "tanh", rng=rng, dtype=dtype,
                                           dropout=cfg.dropout)
        self.dropout = Dropout(cfg.dropout, rng=rng)

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        h = x + self.dropout.forward(self.DenseReluDense.forward(self.layer_norm.forward(x)))
        self.save_cache(SublayerCache(out_shape=h.shape))
        return h

    @atomic
    def backward(self, dh: np.ndarray) -> np.ndarray:
        check_dout(self, "T5LayerFF.backward", "dh", dh, self.layer_norm.weight.shape[0],
                   self.layer_norm.weight.data.dtype)
        self.pop_cache()
        dm = self.DenseReluDense.backward(self.dropout.backward(dh))
        return dh + self.layer_norm.backward(dm)


class T5Block(Module):
    """``layer``: [self attention, feed forward] (encoder) or [self attention, cross attention, feed forward]."""

    def __init__(self, cfg: T5Config, is_decoder: bool, rng: np.random.Generator):
        super().__init__()
        self.is_decoder = is_decoder
        parts = [T5LayerSelfAttention(cfg, causal=is_decoder, rng=rng)]
        if is_decoder:
            parts.append(T5LayerCrossAttention(cfg, rng))
        parts.append(T5LayerFF(cfg, rng))
        self.layer = ModuleList(parts)

    @atomic
    def forward(self, x: np.ndarray, bias: np.ndarray, key_padding_mask: Optional[np.ndarray] = None,
                memory: Optional[np.ndarray] = None, memory_padding_mask: Optional[np.ndarray] = None,
                caches: Optional[Tuple[KVCache, KVCache]] = None) -> np.ndarray:
        self_cache, cross_cache = (None, None) if caches is None else caches
        h = self.layer[0].forward(x, bias, key_padding_mask, self_cache)
        if self.is_decoder:
            h = self.layer[1].forward(h, memory, memory_padding_mask, cross_cache)
        out = self.layer[-1].forward(h)
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """dout -> (dx, dmemory or None); the bias's gradient is in ``layer[0].SelfAttention.dbias``."""
        dh = self.layer[-1].backward(dout)
        dmemory = None
        if self.is_decoder:
            dh, dmemory = self.layer[1].backward(dh)
        dx = self.layer[0].backward(dh)
        self.record("dx", dx)
        return dx, dmemory


class StackCache(NamedTuple):
    bias: T5BiasCache  # buckets of the stack's position bias, for the table's gradient (T5.5)
    out_shape: Tuple[int, ...]


class T5Stack(Module):
    """dropout(x) -> blocks (one position bias for all) -> final_layer_norm -> dropout."""

    def __init__(self, cfg: T5Config, n_blocks: int, is_decoder: bool, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        self.is_decoder = is_decoder
        self.max_distance = cfg.relative_attention_max_distance
        self.block = ModuleList(T5Block(cfg, is_decoder, rng) for _ in range(n_blocks))
        # The stack's one table sits where Hugging Face keeps it, in the first block's self attention.
        self.block[0].layer[0].SelfAttention.relative_attention_bias = Embedding(
            cfg.relative_attention_num_buckets, cfg.n_head, rng=rng, dtype=dtype)
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.dropout = Dropout(cfg.dropout, rng=rng)

    @property
    def relative_attention_bias(self) -> Embedding:
        return self.block[0].layer[0].SelfAttention.relative_attention_bias

    @atomic
    def forward(self, x: np.ndarray, key_padding_mask: Optional[np.ndarray] = None,
                memory: Optional[np.ndarray] = None, memory_padding_mask: Optional[np.ndarray] = None,
                caches: Optional[Sequence[Tuple[KVCache, KVCache]]] = None) -> np.ndarray:
        """x (B, T, D) embedded tokens -> (B, T, D). Decoder: queries from position t0 = the self caches' length."""
        T = x.shape[1]
        t0 = 0 if caches is None else caches[0][0].length
        # (T5.1)-(T5.4): query t0 + i, key j; two-way buckets in the encoder, one-way in the decoder
        bias, bias_cache = t5_bias_forward(self.relative_attention_bias.weight.data, T, t0 + T,
                                           bidirectional=not self.is_decoder, max_distance=self.max_distance,
                                           offset=t0)
        self.record("position_bias", bias)
        h = self.dropout.forward(x)
        for i, block in enumerate(self.block):
            h = block.forward(h, bias, key_padding_mask, memory, memory_padding_mask,
                              None if caches is None else caches[i])
        out = self.dropout.forward(self.final_layer_norm.forward(h))
        self.save_cache(StackCache(bias=bias_cache, out_shape=out.shape))
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """dout (B, T, D) -> (dx (B, T, D), dmemory (B, S, D) in the decoder, None in the encoder)."""
        norm = self.final_layer_norm.weight
        check_dout(self, "T5Stack.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        cache = self.pop_cache()
        dh = self.final_layer_norm.backward(self.dropout.backward(dout))
        dbias = np.zeros((1, cache.bias.num_heads) + cache.bias.buckets.shape, norm.data.dtype)  # (1, H, Tq, Tk)
        dmemory = None
        for block in reversed(self.block):
            dh, dmem = block.backward(dh)
            dbias += block.layer[0].SelfAttention.dbias  # every layer added the same bias: gradients add (ATT.10)
            if dmem is not None:
                dmemory = dmem if dmemory is None else dmemory + dmem
        dtable = t5_bias_backward(dbias, cache.bias)  # (T5.5)
        self.relative_attention_bias.weight.grad += dtable
        self.record("dposition_bias", dbias)
        dx = self.dropout.backward(dh)
        return dx, dmemory


# -- the model ---------------------------------------------------------------------------------------------
class T5Cache(NamedTuple):
    """One training forward of ``T5``: the tied head's op cache (None untied), the scale, the loss's cache."""

    tied_head: Optional[LinearCache]
    scale: float  # d_model^-1/2 when the decoder's output is scaled before the head, else 1
    loss: Optional[CrossEntropyCache]


class T5(Module):
    """shared -> encoder; shared -> decoder (causal, cross attention over the encoder) -> head."""

    def __init__(self, cfg: T5Config, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, T5Config):
            raise TypeError(f"T5: argument 'cfg' expected a T5Config, got {type(cfg).__name__}")
        check_count("T5", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)
        dtype = np.dtype(cfg.dtype)
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        self.encoder = T5Stack(cfg, cfg.num_layers, False, rng)
        self.decoder = T5Stack(cfg, cfg.resolved_num_decoder_layers, True, rng)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, False, rng=rng, dtype=dtype)
        self._init_weights(rng)

    def _init_weights(self, rng: np.random.Generator) -> None:
        """Normal weights of the T5 paper's scales: the tables 1, q (d_model d_kv)^-1/2, k, v, wi d_model^-1/2,
        o (n_head d_kv)^-1/2, wo d_ff^-1/2; norms at 1."""
        c = self.cfg
        for name, prm in self.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            std = {"shared": 1.0, "lm_head": 1.0, "q_proj": (c.d_model * c.d_kv) ** -0.5,
                   "k_proj": c.d_model ** -0.5, "v_proj": c.d_model ** -0.5, "o_proj": (c.n_head * c.d_kv) ** -0.5,
                   "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5,
                   "wo": c.d_ff ** -0.5, "relative_attention_bias": c.d_model ** -0.5}.get(leaf)
            if std is not None:
                prm.data[...] = rng.standard_normal(prm.shape) * std

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_ids(self, op: str, name: str, ids: object, batch: Optional[int] = None) -> None:
        check_int(op, name, ids)
        check_ndim(op, name, ids, 2)
        B, T = ids.shape
        if B < 1 or T < 1 or (batch is not None and B != batch):
            want = f"shape ({'B' if batch is None else batch}, T) with B >= 1 and T >= 1"
            raise ValueError(f"{op}: argument '{name}' expected {want}, got {ids.shape}")
        V = self.cfg.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"{op}: argument '{name}' expected values in [0, {V}), got values in "
                             f"[{ids.min()}, {ids.max()}]")

    @staticmethod
    def _check_mask(op: str, mask: object, B: int, S: int) -> None:
        if mask is None:
            return
        check_array(op, "src_padding_mask", mask)
        if mask.dtype != np.bool_:
            raise ValueError(f"{op}: argument 'src_padding_mask' expected dtype bool (True where a source token is "
                             f"padding), got {mask.dtype}")
        check_shape(op, "src_padding_mask", mask, (B, S))
        if mask.all(axis=1).any():
            raise ValueError(f"{op}: argument 'src_padding_mask' expected at least one non-padding position in "
                             f"every row, got a row of padding only")

    def _check_memory(self, op: str, memory: object, B: int) -> None:
        check_float(op, "memory", memory)
        check_ndim(op, "memory", memory, 3)
        check_shape(op, "memory", memory, (B, None, self.cfg.d_model))
        if memory.shape[1] < 1:
            raise ValueError(f"{op}: argument 'memory' expected at least one source position, got {memory.shape}")
        check_features(op, "memory", memory, self.cfg.d_model, self.shared.weight.data.dtype)

    def _check_caches(self, op: str, caches: object, B: int, T: int, S: int) -> None:
        n = self.cfg.resolved_num_decoder_layers
        what = f"a list of {n} (self KVCache, cross KVCache) pairs (make_decoder_caches)"
        if not isinstance(caches, (list, tuple)) or len(caches) != n or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(c, KVCache) for c in p)
                for p in caches):
            got = f"{type(caches).__name__} of {len(caches)}" if isinstance(caches, (list, tuple)) else \
                type(caches).__name__
            raise TypeError(f"{op}: argument 'caches' expected {what}, got {got}")
        flat = [c for p in caches for c in p]
        if len({id(c) for c in flat}) != len(flat):
            raise ValueError(f"{op}: argument 'caches' expected distinct KVCache objects, got one used twice")
        dtype = self.shared.weight.data.dtype
        want = (B, self.cfg.n_head, self.cfg.d_kv, dtype)
        for i, c in enumerate(flat):
            got = (c.k.shape[0], c.k.shape[1], c.k.shape[3], c.k.dtype)
            if got != want:
                raise ValueError(f"{op}: argument 'caches' entry {i // 2} expected (batch, n_head, d_kv, dtype) = "
                                 f"{want}, got {got}")
        lengths = {p[0].length for p in caches}
        if len(lengths) != 1:
            raise ValueError(f"{op}: argument 'caches' expected self caches of one length, got {sorted(lengths)}")
        t0, max_len = lengths.pop(), caches[0][0].max_len
        if any(p[0].max_len != max_len for p in caches):
            raise ValueError(f"{op}: argument 'caches' expected self caches of one max_len")
        if t0 + T > max_len:
            raise ValueError(f"{op}: argument 'tgt_ids' expected at most {max_len - t0} positions (the caches hold "
                             f"{max_len}, {t0} used), got {T}")
        for i, (_, cross) in enumerate(caches):
            if cross.max_len != S or cross.length not in (0, S):
                raise ValueError(f"{op}: argument 'caches' entry {i} expected a cross cache of {S} positions (the "
                                 f"memory's), empty or full, got length {cross.length} of {cross.max_len}")

    # -- the interface --------------------------------------------------------------------------------------------
    def _encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray]) -> np.ndarray:
        x = self.shared.forward(src_ids)  # (B, S, D)
        return self.encoder.forward(x, key_padding_mask=src_padding_mask)

    def _decode_hidden(self, tgt_ids: np.ndarray, memory: np.ndarray, caches, src_padding_mask) -> np.ndarray:
        y = self.shared.forward(tgt_ids)  # (B, T, D)
        return self.decoder.forward(y, memory=memory, memory_padding_mask=src_padding_mask, caches=caches)

    def _head(self, h: np.ndarray) -> Tuple[np.ndarray, Optional[LinearCache], float]:
        cfg = self.cfg
        scale = cfg.d_model ** -0.5 if cfg.resolved_scale_decoder_outputs else 1.0
        hs = h * h.dtype.type(scale) if scale != 1.0 else h
        if cfg.tie_word_embeddings:
            logits, tied = linear_forward(hs, self.shared.weight.data)  # (B, T, V) = hs E^T
        else:
            logits, tied = self.lm_head.forward(hs), None
        self.record("logits", logits)
        return logits, tied, scale

    @atomic
    def forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """src_ids (B, S), tgt_ids (B, T) -> logits (B, T, V) and the mean cross entropy over the targets
        (B, T) that are not -100 (None without targets). In training mode the forward keeps its caches
        for one ``backward()``."""
        op = "T5.forward"
        self._check_ids(op, "src_ids", src_ids)
        B, S = src_ids.shape
        self._check_ids(op, "tgt_ids", tgt_ids, B)
        self._check_mask(op, src_padding_mask, B, S)
        if targets is not None:
            check_int(op, "targets", targets)
            check_shape(op, "targets", targets, tgt_ids.shape)
            bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= self.cfg.vocab_size))
            if bad.any():
                raise ValueError(f"{op}: argument 'targets' expected values in [0, {self.cfg.vocab_size}) or "
                                 f"{IGNORE_INDEX} (ignored), got {targets[bad].flat[0]}")
        memory = self._encode(src_ids, src_padding_mask)
        h = self._decode_hidden(tgt_ids, memory, None, src_padding_mask)
        logits, tied, scale = self._head(h)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(logits, targets)
        self.save_cache(T5Cache(tied_head=tied, scale=scale, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss: head, decoder, encoder."""
        if self.peek_cache().loss is None:
            raise RuntimeError("T5.backward: the matching forward had no targets, so there is no loss to "
                               "differentiate")
        cache = self.pop_cache()
        dtype = self.shared.weight.data.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache.loss)
        self.record("dlogits", dlogits)
        if cache.tied_head is not None:
            dhs, dE_head, _ = linear_backward(dlogits, cache.tied_head)
            self.shared.weight.grad += dE_head  # tied: the head's gradient joins the table's
        else:
            dhs = self.lm_head.backward(dlogits)
        dh = dhs * dtype.type(cache.scale) if cache.scale != 1.0 else dhs  # through h * d_model^-1/2
        dy, dmemory = self.decoder.backward(dh)
        self.shared.backward(dy)  # the decoder's lookup ran last: its cache is popped first
        dx, _ = self.encoder.backward(dmemory)
        self.shared.backward(dx)

    def _check_inference(self, op: str, name: str) -> None:
        if self.training:
            raise ValueError(f"{op}: argument '{name}' is for inference: call .eval() first (a training forward "
                             "keeps caches for a backward)")

    @atomic
    def encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """src_ids (B, S) -> memory (B, S, D), the encoder's output; eval mode only."""
        op = "T5.encode"
        self._check_inference(op, "src_ids")
        self._check_ids(op, "src_ids", src_ids)
        self._check_mask(op, src_padding_mask, *src_ids.shape)
        return self._encode(src_ids, src_padding_mask)

    @atomic
    def decode(self, tgt_ids: np.ndarray, memory: np.ndarray, caches=None, *,
               src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """tgt_ids (B, T), memory (B, S, D) -> logits (B, T, V); eval mode only.

        With ``caches`` (``make_decoder_caches``), tgt_ids continue the cached sequence: the
        self-attention positions start at the self caches' length, and the cross caches are
        filled from memory on the first call and reused afterwards.
        """
        op = "T5.decode"
        self._check_inference(op, "tgt_ids")
        self._check_ids(op, "tgt_ids", tgt_ids)
        B, T = tgt_ids.shape
        self._check_memory(op, memory, B)
        S = memory.shape[1]
        self._check_mask(op, src_padding_mask, B, S)
        if caches is not None:
            self._check_caches(op, caches, B, T, S)
        h = self._decode_hidden(tgt_ids, memory, caches, src_padding_mask)
        return self._head(h)[0]

    def make_decoder_caches(self, batch: int, max_len: int, src_len: int) -> List[Tuple[KVCache, KVCache]]:
        """One (self KVCache (batch, n_head, max_len, d_kv), cross KVCache (..., src_len, ...)) per decoder block."""
        op = "T5.make_decoder_caches"
        batch = check_count(op, "batch", batch, 1, MAX_POSITION)
        max_len = check_count(op, "max_len", max_len, 1, MAX_POSITION)
        src_len = check_count(op, "src_len", src_len, 1, MAX_POSITION)
        return [(b.layer[0].SelfAttention.make_kv_cache(batch, max_len),
                 b.layer[1].EncDecAttention.make_kv_cache(batch, src_len)) for b in self.decoder.block]

    def astype(self, dtype) -> "T5":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.shared.weight.data.dtype.name)
        return self
