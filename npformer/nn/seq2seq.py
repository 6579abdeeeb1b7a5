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
- ``EncoderDecoderConfig``: the checks and derived sizes the models' config dataclasses share.
- ``EncoderDecoder``: a model over those layers: the training forward and backward steps and
  the inference methods ``encode``, ``make_decoder_caches`` and ``decode``, written once over
  the model's embedding and head.

The feed-forward is fc1 -> activation (ReLU, or GELU with erf) -> fc2. Sublayer names are those
of Hugging Face's BART (``self_attn``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``), with the attention
projections named as everywhere here (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).

Shapes: src_ids (B, S), tgt_ids (B, T) int; memory (B, S, D); hidden (B, T, D);
src_padding_mask (B, S) bool, True where a source token is padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..ops._checks import (MAX_POSITION, check_array, check_count, check_float, check_int, check_ndim, check_real,
                           check_shape)
from ..ops.activations import gelu_backward, gelu_forward, relu_backward, relu_forward
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.linear import LinearCache
from .attention import KVCache, MultiHeadAttention
from .layers import Dropout, LayerNorm, Linear, check_dout, check_features, check_layer_options
from .lm import IGNORE_INDEX
from .module import Module, atomic

__all__ = ["shift_right", "check_ids", "check_padding_mask", "check_seq2seq_inputs", "check_memory",
           "check_decoder_caches", "Seq2SeqEncoderLayer", "PostNormDecoderLayer", "EncoderDecoderConfig", "EncoderDecoder",
           "Seq2SeqCache",
           "ACTIVATIONS",
           "IGNORE_INDEX"]

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


# -- the config --------------------------------------------------------------------------------------------
@dataclass
class EncoderDecoderConfig:
    """The fields every encoder-decoder's config starts with. A model's config dataclass derives from
    it (its fields follow these, its defaults may replace these), adds the token ids and dtype, and
    its ``__post_init__`` calls the checks below, each refusal naming ``op`` (the config's class)
    and the field."""

    vocab_size: int = 64
    max_position: int = 128  # the longest source or target
    n_layer: int = 2  # encoder layers
    n_decoder_layer: Optional[int] = None  # decoder layers (None: n_layer, set when the config is made)
    n_head: int = 4
    d_model: int = 64
    d_ff: Optional[int] = None  # feed-forward width (None: 4 d_model, set when the config is made)
    dropout: float = 0.1
    label_smoothing: float = 0.0
    layer_norm_eps: float = 1e-5

    def _check_sizes(self, op: str) -> None:
        """The sizes in [1, MAX_POSITION]; n_decoder_layer and d_ff resolved; n_head divides d_model."""
        for name in ("vocab_size", "max_position", "n_layer", "n_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        for name in ("n_decoder_layer", "d_ff"):
            if getattr(self, name) is not None:
                setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        self.n_decoder_layer = self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer  # resolved
        self.d_ff = 4 * self.d_model if self.d_ff is None else self.d_ff
        if self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model}, "
                             f"got {self.n_head}")

    def _check_rates(self, op: str) -> None:
        """dropout in [0, 1), label_smoothing in [0, 1], layer_norm_eps >= 0."""
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.label_smoothing = check_real(op, "label_smoothing", self.label_smoothing, lo=0.0, hi=1.0)
        self.layer_norm_eps = check_real(op, "layer_norm_eps", self.layer_norm_eps, lo=0.0)

    def _check_token_ids_and_dtype(self, op: str, names: Sequence[str]) -> None:
        """The token ids ``names`` in [0, vocab_size); dtype float32 or float64."""
        for name in names:
            setattr(self, name, check_count(op, name, getattr(self, name), 0, self.vocab_size - 1))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    @property
    def decoder_layers(self) -> int:
        return self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def to_dict(self) -> dict:
        return asdict(self)


# -- the model ------------------------------------------------------------------------------------------
class Seq2SeqCache(NamedTuple):
    """One training forward of an ``EncoderDecoder``: the tied head's and the loss's op caches."""

    head: LinearCache  # logits = h @ E^T (+ a bias)
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets


class EncoderDecoder(Module):
    """A post-norm encoder-decoder: what the original Transformer and BART do alike.

    The encoder embeds src_ids and runs ``Seq2SeqEncoderLayer``s to the memory (B, S, D); the
    decoder embeds tgt_ids from position ``start`` and runs ``PostNormDecoderLayer``s over it
    and the memory; a tied head maps the hidden (B, T, D) to logits (B, T, V).

    A subclass sets ``name`` (its class's name: errors read ``"<name>.decode: ..."``) and
    ``config_type`` (its ``EncoderDecoderConfig``), calls ``super().__init__(cfg, seed)`` (which
    checks both and sets ``cfg`` and ``rng``, the generator of the initial weights and then of the
    dropout masks), builds its parameters from them, and provides the hooks (``side`` is
    "encoder" or "decoder"):

    - ``_layers(side)``: that side's layers, in order;
    - ``_embed(side, ids, start)``: ids (B, L) at positions start.. -> x (B, L, D);
    - ``_embed_backward(side, dx)``: add the embedding's parameter gradients of the latest
      ``_embed`` of that side;
    - ``_head(h)``: h (B, T, D) -> (logits (B, T, V), LinearCache);
    - ``_head_backward(dlogits, cache)``: add the head's parameter gradients, return dh (B, T, D).

    Every subclass defines ``forward`` and ``backward`` as two ``@atomic`` lines calling
    ``_forward`` and ``_backward`` (so its errors carry its own name, ``Bart.forward``, and a
    debugger steps from the model's method into the shared body), and inherits ``encode``,
    ``make_decoder_caches`` and ``decode``.
    """

    name: str  # the subclass's name, first in its errors
    config_type: type  # the subclass's config dataclass

    def __init__(self, cfg, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, self.config_type):
            raise TypeError(f"{self.name}: argument 'cfg' expected a {self.config_type.__name__}, "
                            f"got {type(cfg).__name__}")
        check_count(self.name, "seed", seed, 0)
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)  # init, then dropout masks

    # -- hooks --------------------------------------------------------------------------------------
    def _layers(self, side: str) -> Sequence[Module]:
        raise NotImplementedError

    def _embed(self, side: str, ids: np.ndarray, start: int) -> np.ndarray:
        raise NotImplementedError

    def _embed_backward(self, side: str, dx: np.ndarray) -> None:
        raise NotImplementedError

    def _head(self, h: np.ndarray) -> Tuple[np.ndarray, LinearCache]:
        raise NotImplementedError

    def _head_backward(self, dlogits: np.ndarray, cache: LinearCache) -> np.ndarray:
        raise NotImplementedError

    # -- the two halves -------------------------------------------------------------------------------
    def _encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray]) -> np.ndarray:
        """src_ids (B, S) -> memory (B, S, D)."""
        x = self._embed("encoder", src_ids, 0)
        for layer in self._layers("encoder"):
            x = layer.forward(x, key_padding_mask=src_padding_mask)
        self.record("memory", x)
        return x

    def _decode(self, tgt_ids: np.ndarray, memory: np.ndarray, src_padding_mask: Optional[np.ndarray],
                caches: Optional[List[Tuple[KVCache, KVCache]]], start: int) -> np.ndarray:
        """tgt_ids (B, T) at positions start.., memory (B, S, D) -> hidden (B, T, D)."""
        y = self._embed("decoder", tgt_ids, start)
        for i, layer in enumerate(self._layers("decoder")):
            self_c, cross_c = (None, None) if caches is None else caches[i]
            y = layer.forward(y, memory, memory_padding_mask=src_padding_mask, self_cache=self_c, cross_cache=cross_c)
        return y

    # -- training -----------------------------------------------------------------------------------
    def _forward(self, src_ids: np.ndarray, tgt_ids: np.ndarray, targets: Optional[np.ndarray] = None, *,
                 src_padding_mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """src_ids (B, S), tgt_ids (B, T) -> logits (B, T, V) and the mean cross entropy of targets (B, T)
        (in [0, V) or -100, ignored; smoothed by cfg.label_smoothing) when given. src_padding_mask (B, S) bool,
        True = padding. (Each subclass's ``forward``.)"""
        op, cfg = f"{self.name}.forward", self.cfg
        check_seq2seq_inputs(op, src_ids, tgt_ids, targets, src_padding_mask, cfg.vocab_size,
                             max_src_len=cfg.max_position, max_tgt_len=cfg.max_position)
        memory = self._encode(src_ids, src_padding_mask)
        h = self._decode(tgt_ids, memory, src_padding_mask, None, 0)
        logits, head = self._head(h)
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(
            logits, targets, label_smoothing=cfg.label_smoothing)
        self.save_cache(Seq2SeqCache(head=head, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    def _backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss: the head, the decoder down,
        then the encoder down. (Each subclass's ``backward``.)"""
        op = f"{self.name}.backward"
        if self.peek_cache().loss is None:
            raise RuntimeError(f"{op}: the matching forward had no targets, so there is no loss to differentiate")
        cache = self.pop_cache()
        dlogits = cross_entropy_backward(np.asarray(1.0, cache.head.x.dtype), cache.loss)
        self.record("dlogits", dlogits)
        dy = self._head_backward(dlogits, cache.head)
        dmemory = None
        for layer in reversed(self._layers("decoder")):
            dy, dmem = layer.backward(dy)
            dmemory = dmem if dmemory is None else dmemory + dmem  # every layer reads the same memory
        self._embed_backward("decoder", dy)  # the target lookup came second: its gradient first
        dx = dmemory
        for layer in reversed(self._layers("encoder")):
            dx = layer.backward(dx)
        self._embed_backward("encoder", dx)

    # -- inference -----------------------------------------------------------------------------------
    def _check_eval(self, op: str) -> None:
        if self.training:
            raise RuntimeError(f"{op}: inference only; call .eval() first")

    def encode(self, src_ids: np.ndarray, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """src_ids (B, S) -> memory (B, S, D); eval mode only."""
        op = f"{self.name}.encode"
        self._check_eval(op)
        B, S = check_ids(op, "src_ids", src_ids, self.cfg.vocab_size)
        check_padding_mask(op, src_padding_mask, (B, S))
        if S > self.cfg.max_position:
            raise ValueError(f"{op}: argument 'src_ids' expected at most {self.cfg.max_position} positions, got {S}")
        return self._encode(src_ids, src_padding_mask)

    def make_decoder_caches(self, batch: int, max_len: Optional[int] = None,
                            src_len: Optional[int] = None) -> List[Tuple[KVCache, KVCache]]:
        """(self cache for max_len target positions, cross cache for src_len source positions) per decoder layer."""
        op, P = f"{self.name}.make_decoder_caches", self.cfg.max_position
        batch = check_count(op, "batch", batch, 1)
        max_len = P if max_len is None else check_count(op, "max_len", max_len, 1, P)
        src_len = P if src_len is None else check_count(op, "src_len", src_len, 1, P)
        return stack_caches(self._layers("decoder"), batch, max_len, src_len)

    def decode(self, tgt_ids: np.ndarray, memory: np.ndarray, caches: Optional[List[Tuple[KVCache, KVCache]]] = None,
               *, src_padding_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """tgt_ids (B, T), memory (B, S, D) -> logits (B, T, V); eval mode only. With caches, tgt_ids continue
        the cached sequence (positions from the self caches' length)."""
        op, cfg = f"{self.name}.decode", self.cfg
        self._check_eval(op)
        B, T = check_ids(op, "tgt_ids", tgt_ids, cfg.vocab_size)
        S = check_memory(op, memory, B, cfg.d_model, np.dtype(cfg.dtype), src_padding_mask, cfg.max_position)
        start = 0
        if caches is not None:
            start = check_decoder_caches(op, caches, n_layer=cfg.decoder_layers, batch=B, src_len=S, n_head=cfg.n_head,
                                         head_dim=cfg.d_model // cfg.n_head, dtype=np.dtype(cfg.dtype),
                                         training=self.training)
            if start + T > caches[0][0].max_len:
                raise ValueError(f"{op}: argument 'tgt_ids' expected at most {caches[0][0].max_len - start} "
                                 f"positions (the caches hold {caches[0][0].max_len}, {start} used), got {T}")
        check_seq2seq_inputs(op, None, tgt_ids, None, None, cfg.vocab_size, max_tgt_len=cfg.max_position,
                             tgt_start=start)
        h = self._decode(tgt_ids, memory, src_padding_mask, caches, start)
        return self._head(h)[0]
