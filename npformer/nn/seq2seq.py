"""What every encoder-decoder shares: decoder inputs, input checks, post-norm encoder and decoder layers.

The original Transformer, BART and T5 read a source sequence with an encoder and write the
target with a decoder that attends to the encoder's output (the *memory*):

- ``shift_right(labels, decoder_start_token_id, pad_token_id)``: the decoder inputs of teacher
  forcing, ``[start, labels[:, :-1]]`` with ignored labels (-100) turned into padding.
- ``check_seq2seq_inputs``: a model's ``forward(src_ids, tgt_ids, targets, src_padding_mask)``
  checked by name before any work; ``check_memory`` and ``check_decoder_caches`` check what
  ``decode`` is given.
- ``Seq2SeqEncoderLayer``: h = LN(x + drop(self_attn(x))), out = LN(h + drop(ffn(h))).
- ``PostNormDecoderLayer``: h1 = LN(x + drop(self_attn(x, causal))),
  h2 = LN(h1 + drop(cross_attn(h1, memory))), out = LN(h2 + drop(ffn(h2))).

The feed-forward is fc1 -> activation (ReLU, or GELU with erf) -> fc2. Sublayer names are those
of Hugging Face's BART (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``), with the attention
projections named as everywhere here (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); hidden (B, T, D);
src_padding_mask (B, S) bool, True where a source token is padding.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..ops._checks import check_array, check_count, check_float, check_int, check_ndim, check_shape
from ..ops.activations import gelu_backward, gelu_forward, relu_backward, relu_forward
from .attention import KVCache, MultiHeadAttention
from .layers import Dropout, LayerNorm, Linear, check_dout, check_features, check_layer_options
from .lm import IGNORE_INDEX
from .module import Module, atomic

__all__ = ["shift_right", "check_ids", "check_padding_mask", "check_seq2seq_inputs", "check_memory",
           "check_decoder_caches", "Seq2SeqEncoderLayer", "PostNormDecoderLayer", "ACTIVATIONS", "IGNORE_INDEX"]

ACTIVATIONS = ("relu", "gelu")  # the feed-forward's nonlinearity: ReLU (ACT.4) or exact GELU (ACT.6)


# -- decoder inputs and input checks ----------------------------------------------------------------------
def check_ids(op: str, name: str, ids: object, vocab_size: int) -> Tuple[int, int]:
    """ids (B, L) of integers in [0, vocab_size) with B, L >= 1; returns (B, L)."""
    check_int(op, name, ids)
    check_ndim(op, name, ids, 2)
    B, L = ids.shape
    if B < 1 or L < 1:
        raise ValueError(f"{op}: argument '{name}' expected shape (B, L) with B >= 1 and L >= 1, got {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{op}: argument '{name}' expected values in [0, {vocab_size}), "
                         f"got values in [{ids.min()}, {ids.max()}]")
    return B, L


def check_padding_mask(op: str, mask: object, shape: Tuple[int, int], name: str = "src_padding_mask") -> None:
    """mask (B, S) bool, True where a source token is padding; every row keeps at least one token."""
    if mask is None:
        return
    check_array(op, name, mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"{op}: argument '{name}' expected dtype bool (True = padding), got {mask.dtype}")
    check_shape(op, name, mask, shape)
    if mask.all(axis=1).any():
        row = int(np.flatnonzero(mask.all(axis=1))[0])
        raise ValueError(f"{op}: argument '{name}' expected at least one token (False) in every row, "
                         f"got row {row} all padding")


def shift_right(labels: np.ndarray, decoder_start_token_id: int, pad_token_id: int) -> np.ndarray:
    """labels (B, T) int -> decoder inputs (B, T) int64: [start, labels[:, :-1]], -100 replaced by pad.

    Teacher forcing: the decoder reads position t's input and predicts labels[:, t]; its input at
    t is the label before it, and at t = 0 the start token.
    """
    op = "shift_right"
    check_int(op, "labels", labels)
    check_ndim(op, "labels", labels, 2)
    start = check_count(op, "decoder_start_token_id", decoder_start_token_id, 0)
    pad = check_count(op, "pad_token_id", pad_token_id, 0)
    bad = (labels != IGNORE_INDEX) & (labels < 0)
    if bad.any():
        raise ValueError(f"{op}: argument 'labels' expected ids >= 0 or {IGNORE_INDEX} (ignored), "
                         f"got {labels[bad].flat[0]}")
    out = np.empty(labels.shape, np.int64)
    out[:, 0] = start
    out[:, 1:] = labels[:, :-1]
    out[out == IGNORE_INDEX] = pad
    return out


def check_seq2seq_inputs(op: str, src_ids: object, tgt_ids: object, targets: object, src_padding_mask: object,
                         vocab_size: int, *, max_src_len: Optional[int] = None, max_tgt_len: Optional[int] = None,
                         tgt_start: int = 0) -> Tuple[int, int, int]:
    """An encoder-decoder's inputs checked by name before any work; returns (B, S, T).

    src_ids (B, S) and tgt_ids (B, T) int in [0, vocab_size), one batch size; targets None or
    (B, T) int in [0, vocab_size) or -100 (ignored); src_padding_mask None or (B, S) bool with a
    token in every row; S <= max_src_len and tgt_start + T <= max_tgt_len where given (a model
    with a position table of that many rows). ``src_ids`` None checks the decoder's side only.
    """
    T_shape = check_ids(op, "tgt_ids", tgt_ids, vocab_size)
    B, T = T_shape
    S = 0
    if src_ids is not None:
        B_src, S = check_ids(op, "src_ids", src_ids, vocab_size)
        if B_src != B:
            raise ValueError(f"{op}: argument 'tgt_ids' expected batch size {B_src} (that of 'src_ids'), got {B}")
        check_padding_mask(op, src_padding_mask, (B, S))
        if max_src_len is not None and S > max_src_len:
            raise ValueError(f"{op}: argument 'src_ids' expected at most {max_src_len} positions, got {S}")
    if targets is not None:
        check_int(op, "targets", targets)
        check_shape(op, "targets", targets, (B, T))
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
        if bad.any():
            raise ValueError(f"{op}: argument 'targets' expected values in [0, {vocab_size}) or "
                             f"{IGNORE_INDEX} (ignored), got {targets[bad].flat[0]}")
    if max_tgt_len is not None and tgt_start + T > max_tgt_len:
        raise ValueError(f"{op}: argument 'tgt_ids' expected at most {max_tgt_len - tgt_start} positions "
                         f"({max_tgt_len} in all, {tgt_start} cached), got {T}")
    return B, S, T


def check_memory(op: str, memory: object, batch: int, d_model: int, dtype: np.dtype,
                 src_padding_mask: object = None, max_src_len: Optional[int] = None) -> int:
    """memory (B, S, D) of the model's dtype (``encode``'s output) and its padding mask; returns S."""
    check_float(op, "memory", memory)
    check_ndim(op, "memory", memory, 3)
    check_shape(op, "memory", memory, (batch, None, d_model))
    if memory.dtype != dtype:
        raise ValueError(f"{op}: argument 'memory' expected dtype {dtype} (the parameters'), got {memory.dtype}")
    S = memory.shape[1]
    if S < 1:
        raise ValueError(f"{op}: argument 'memory' expected at least one source position, got shape {memory.shape}")
    if max_src_len is not None and S > max_src_len:
        raise ValueError(f"{op}: argument 'memory' expected at most {max_src_len} positions, got {S}")
    check_padding_mask(op, src_padding_mask, (batch, S))
    return S


def check_decoder_caches(op: str, caches: object, *, n_layer: int, batch: int, src_len: int, n_head: int,
                         head_dim: int, dtype: np.dtype, training: bool) -> int:
    """``make_decoder_caches``' list of (self_cache, cross_cache) per decoder layer; returns the self caches'
    common length (the position of the first new target token)."""
    if training:
        raise ValueError(f"{op}: argument 'caches' is for inference: call .eval() first")
    ok = isinstance(caches, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(c, KVCache) for c in pair)
        for pair in caches)
    if not ok:
        raise TypeError(f"{op}: argument 'caches' expected a list of {n_layer} (KVCache, KVCache) pairs "
                        f"(make_decoder_caches), got {type(caches).__name__}")
    if len(caches) != n_layer:
        raise ValueError(f"{op}: argument 'caches' expected {n_layer} (self, cross) pairs, got {len(caches)}")
    flat = [c for pair in caches for c in pair]
    if len({id(c) for c in flat}) != len(flat):
        raise ValueError(f"{op}: argument 'caches' expected distinct KVCache objects, got one used twice")
    for i, (self_c, cross_c) in enumerate(caches):
        for kind, c in (("self", self_c), ("cross", cross_c)):
            want = (batch, n_head, head_dim, np.dtype(dtype))
            got = (c.k.shape[0], c.k.shape[1], c.k.shape[3], c.k.dtype)
            if got != want:
                raise ValueError(f"{op}: argument 'caches' entry {i} ({kind}) expected (batch, n_head, head_dim, "
                                 f"dtype) = {want}, got {got} (use make_decoder_caches)")
        if cross_c.length not in (0, src_len) or cross_c.max_len < src_len:
            raise ValueError(f"{op}: argument 'caches' entry {i} (cross) expected room for the {src_len} source "
                             f"positions of 'memory', got length {cross_c.length} of {cross_c.max_len}")
    lengths = {c.length for c, _ in caches}
    if len(lengths) != 1:
        raise ValueError(f"{op}: argument 'caches' expected self caches of one length, got {sorted(lengths)}")
    return lengths.pop()


def check_layer_activation(layer: str, activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{layer}: argument 'activation' expected one of {', '.join(map(repr, ACTIVATIONS))}, "
                         f"got {activation!r}")
    return activation


# -- layers -------------------------------------------------------------------------------------------
class Seq2SeqLayerCache(NamedTuple):
    """One forward of a post-norm layer: the feed-forward activation's op cache and the output's shape."""

    act: object  # ReluCache or GeluCache of the feed-forward
    out_shape: Tuple[int, ...]


class _FeedForward:
    """fc1 -> activation -> fc2 on a layer that owns ``fc1``, ``fc2`` and ``activation`` (shared by both layers)."""

    def _ffn_forward(self, h: np.ndarray):
        z = self.fc1.forward(h)
        a, act = relu_forward(z) if self.activation == "relu" else gelu_forward(z, approximate="none")
        self.record("act", a)
        return self.fc2.forward(a), act

    def _ffn_backward(self, dm: np.ndarray, act) -> np.ndarray:
        da = self.fc2.backward(dm)
        dz = relu_backward(da, act) if self.activation == "relu" else gelu_backward(da, act)
        self.record("dact", dz)
        return self.fc1.backward(dz)


class Seq2SeqEncoderLayer(_FeedForward, Module):
    """h = self_attn_layer_norm(x + drop_1(self_attn(x))), out = final_layer_norm(h + drop_2(ffn(h)))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 activation: str = "relu", rng: np.random.Generator, std: float = 0.02, dtype=np.float32):
        super().__init__()
        name = "Seq2SeqEncoderLayer"
        dtype = check_layer_options(name, rng=rng, dtype=dtype, std=std, eps=layer_norm_eps, d_model=d_model,
                                    n_head=n_head, d_ff=d_ff)
        self.activation = check_layer_activation(name, activation)
        self.self_attn = MultiHeadAttention(d_model, n_head, bias=True, rng=rng, dtype=dtype)
        self.drop_1 = Dropout(dropout, rng=rng)
        self.self_attn_layer_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.fc1 = Linear(d_model, d_ff, True, rng=rng, std=std, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, True, rng=rng, std=std, dtype=dtype)
        self.drop_2 = Dropout(dropout, rng=rng)
        self.final_layer_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)

    @atomic
    def forward(self, x: np.ndarray, key_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, S, D) -> (B, S, D); key_padding_mask (B, S) bool, True where a key is padding."""
        op, norm = "Seq2SeqEncoderLayer.forward", self.final_layer_norm.weight
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, norm.shape[0], norm.data.dtype)
        a = self.self_attn.forward(x, key_padding_mask=key_padding_mask)  # bidirectional
        h = self.self_attn_layer_norm.forward(x + self.drop_1.forward(a))
        m, act = self._ffn_forward(h)
        out = self.final_layer_norm.forward(h + self.drop_2.forward(m))
        self.save_cache(Seq2SeqLayerCache(act=act, out_shape=out.shape))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, S, D) -> dx (B, S, D): the forward's lines in reverse."""
        norm = self.final_layer_norm.weight
        check_dout(self, "Seq2SeqEncoderLayer.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        cache = self.pop_cache()
        dz_2 = self.final_layer_norm.backward(dout)  # into h + drop_2(m)
        dh = dz_2 + self._ffn_backward(self.drop_2.backward(dz_2), cache.act)  # identity path + feed-forward
        dz_1 = self.self_attn_layer_norm.backward(dh)  # into x + drop_1(a)
        dx = dz_1 + self.self_attn.backward(self.drop_1.backward(dz_1))
        self.record("dx", dx)
        return dx


class PostNormDecoderLayer(_FeedForward, Module):
    """h1 = LN(x + drop(self_attn(x, causal))), h2 = LN(h1 + drop(encoder_attn(h1, memory))),
    out = LN(h2 + drop(ffn(h2))); backward returns (dx, dmemory)."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 activation: str = "relu", rng: np.random.Generator, std: float = 0.02, dtype=np.float32):
        super().__init__()
        name = "PostNormDecoderLayer"
        dtype = check_layer_options(name, rng=rng, dtype=dtype, std=std, eps=layer_norm_eps, d_model=d_model,
                                    n_head=n_head, d_ff=d_ff)
        self.activation = check_layer_activation(name, activation)
        self.self_attn = MultiHeadAttention(d_model, n_head, bias=True, rng=rng, dtype=dtype)
        self.drop_1 = Dropout(dropout, rng=rng)
        self.self_attn_layer_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.encoder_attn = MultiHeadAttention(d_model, n_head, bias=True, rng=rng, dtype=dtype)
        self.drop_2 = Dropout(dropout, rng=rng)
        self.encoder_attn_layer_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)
        self.fc1 = Linear(d_model, d_ff, True, rng=rng, std=std, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, True, rng=rng, std=std, dtype=dtype)
        self.drop_3 = Dropout(dropout, rng=rng)
        self.final_layer_norm = LayerNorm(d_model, layer_norm_eps, dtype=dtype)

    def make_caches(self, batch: int, max_len: int, src_len: int) -> Tuple[KVCache, KVCache]:
        """(self cache for ``max_len`` target positions, cross cache for ``src_len`` source positions)."""
        return self.self_attn.make_kv_cache(batch, max_len), self.encoder_attn.make_kv_cache(batch, src_len)

    @atomic
    def forward(self, x: np.ndarray, memory: np.ndarray, *, memory_padding_mask: Optional[np.ndarray] = None,
                self_cache: Optional[KVCache] = None, cross_cache: Optional[KVCache] = None) -> np.ndarray:
        """x (B, T, D), memory (B, S, D) -> (B, T, D).

        memory_padding_mask (B, S) bool masks padded source keys in the cross attention. With
        caches (eval mode): x continues the sequence held by ``self_cache``; ``cross_cache`` is
        filled from memory on its first call and reused afterwards.
        """
        op, norm = "PostNormDecoderLayer.forward", self.final_layer_norm.weight
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, norm.shape[0], norm.data.dtype)
        check_float(op, "memory", memory)
        check_ndim(op, "memory", memory, 3)
        check_shape(op, "memory", memory, (x.shape[0], None, norm.shape[0]))
        check_features(op, "memory", memory, norm.shape[0], norm.data.dtype)
        a = self.self_attn.forward(x, causal=True, kv_cache=self_cache)
        h_1 = self.self_attn_layer_norm.forward(x + self.drop_1.forward(a))
        c = self.encoder_attn.forward(h_1, context=memory, key_padding_mask=memory_padding_mask, kv_cache=cross_cache)
        h_2 = self.encoder_attn_layer_norm.forward(h_1 + self.drop_2.forward(c))
        m, act = self._ffn_forward(h_2)
        out = self.final_layer_norm.forward(h_2 + self.drop_3.forward(m))
        self.save_cache(Seq2SeqLayerCache(act=act, out_shape=out.shape))
        self.record("out", out)
        return out

    @atomic
    def backward(self, dout: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """dout (B, T, D) -> (dx (B, T, D), dmemory (B, S, D)): the forward's lines in reverse."""
        norm = self.final_layer_norm.weight
        check_dout(self, "PostNormDecoderLayer.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        cache = self.pop_cache()
        dz_3 = self.final_layer_norm.backward(dout)  # into h_2 + drop_3(m)
        dh_2 = dz_3 + self._ffn_backward(self.drop_3.backward(dz_3), cache.act)  # identity path + feed-forward
        dz_2 = self.encoder_attn_layer_norm.backward(dh_2)  # into h_1 + drop_2(c)
        dh_1_cross, dmemory = self.encoder_attn.backward(self.drop_2.backward(dz_2))
        dh_1 = dz_2 + dh_1_cross  # identity path + cross attention's query path
        dz_1 = self.self_attn_layer_norm.backward(dh_1)  # into x + drop_1(a)
        dx = dz_1 + self.self_attn.backward(self.drop_1.backward(dz_1))
        self.record("dx", dx)
        return dx, dmemory


def stack_caches(layers: Sequence[PostNormDecoderLayer], batch: int, max_len: int,
                 src_len: int) -> List[Tuple[KVCache, KVCache]]:
    """``make_decoder_caches`` of a model whose decoder layers are ``layers``."""
    return [layer.make_caches(batch, max_len, src_len) for layer in layers]
