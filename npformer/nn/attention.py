"""Multi-head attention layer (MHA, GQA, MQA; self and cross attention) and its KV cache.

Shapes: x (B, T, d_model); context (B, S, d_model) for cross attention; heads are
split as q (B, H, T, D), k and v (B, Hkv, S, D) and handed to
``npformer.ops.attention`` (derivation: ``proofs/attention.md``). The head size D is
d_model // H by default (H must then divide d_model), or ``head_dim`` when given, in
which case d_model need not be H * D.

Parameter names follow Hugging Face (LLaMA, Mistral, Qwen2, T5, ...): ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, each a ``Linear`` with weight (out, in), so
checkpoints map one to one. ``q_proj`` projects to H * D, ``k_proj`` and ``v_proj``
to Hkv * D (grouped-query attention when Hkv < H, multi-query when Hkv = 1),
``o_proj`` back from H * D. ``bias`` sets the bias of ``o_proj`` and, unless
``qkv_bias`` says otherwise, of the other three (Qwen2: ``qkv_bias=True, bias=False``).

Positions (``position=``; the first new query sits at position t0 = ``kv_cache.length``,
0 without a cache, and key j at position j, (ATT.17)):

- ``"none"``: no positional information in the layer (GPT adds it to the embeddings);
- ``"rope"``: queries and keys rotated (rotate-half convention, base ``rope_theta``,
  ``npformer.ops.rope``); keys are cached already rotated;
- ``"alibi"``: the fixed ALiBi bias ``npformer.ops.alibi.alibi_bias`` added to the logits;
- ``"t5"``: a learned bucketed bias, table ``relative_attention_bias.weight``
  (num_buckets, H), ``npformer.ops.t5_bias``.

``window=W`` is a causal sliding window of W keys (ATT.15). Cross attention has no
positions: a context is refused with any position scheme or window.

Recorded names (when recording is on): ``<path>.probs`` (B, H, T, S) in the forward.

Decoding with a cache: ``make_kv_cache(B, T_max)`` returns a ``KVCache``; each
``forward(x_new, causal=True, kv_cache=cache)`` appends the new keys and values and
attends over every cached position, the causal mask aligned to the end (the last
new query sees every key). A forward with a cache is inference: call ``.eval()`` first.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

import numpy as np

from ..ops._checks import (
    MAX_POSITION,
    check_bool,
    check_count,
    check_fits,
    check_float,
    check_ndim,
    check_real,
    check_same_dtype,
    check_shape,
)
from ..ops.alibi import alibi_bias
from ..ops.attention import AttentionCache, attention_backward, attention_forward
from ..ops.fastpath import row_parallel
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.rope import RopeCache, rope_backward, rope_forward
from ..ops.t5_bias import T5BiasCache, t5_bias_backward, t5_bias_forward
from .layers import Embedding, Linear, check_dout, check_features, check_layer_options
from .module import Module, atomic


class KVCache:
    """Preallocated keys and values of the positions seen so far: k, v (B, Hkv, T_max, D).

    ``append(k_new, v_new)`` writes (B, Hkv, T_new, D) after the ``length`` positions
    already held and returns the views ``k[:, :, :length]``, ``v[:, :, :length]``.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype=np.float32):
        dtype = check_layer_options("KVCache", dtype=dtype, batch=batch, n_kv_head=n_kv_head, max_len=max_len,
                                    head_dim=head_dim)
        check_fits("KVCache", "max_len", (2, batch, n_kv_head, max_len, head_dim), dtype.itemsize)  # k and v
        self.k = np.zeros((batch, n_kv_head, max_len, head_dim), dtype)
        self.v = np.zeros((batch, n_kv_head, max_len, head_dim), dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k_new: np.ndarray, v_new: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        k, v = self.stage(k_new, v_new)
        self.length = k.shape[2]
        return k, v

    def stage(self, k_new: np.ndarray, v_new: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Write the new positions after ``length`` and return the views through them, without
        moving ``length``: a caller that fails afterwards leaves the cache as it was; one that
        succeeds sets ``length = k.shape[2]`` (``append`` does both)."""
        op = "KVCache.append"
        B, Hkv, _, D = self.k.shape
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            check_float(op, name, x)
            check_shape(op, name, x, (B, Hkv, None, D))
            if x.dtype != self.k.dtype:
                raise ValueError(f"{op}: argument '{name}' expected dtype {self.k.dtype} (the cache's), got {x.dtype}")
        check_shape(op, "v_new", v_new, k_new.shape)
        T_new = k_new.shape[2]
        if self.length + T_new > self.max_len:
            raise ValueError(
                f"KVCache.append: argument 'k_new' expected at most {self.max_len - self.length} new positions "
                f"(the cache holds {self.length} of {self.max_len}), got {T_new}"
            )
        end = self.length + T_new
        self.k[:, :, self.length:end] = k_new
        self.v[:, :, self.length:end] = v_new
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0

    def __repr__(self) -> str:
        B, Hkv, T_max, D = self.k.shape
        return f"KVCache(batch={B}, n_kv_head={Hkv}, length={self.length}/{T_max}, head_dim={D}, dtype={self.k.dtype})"


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, n_head * D) -> (B, n_head, T, D), contiguous."""
    B, T, C = x.shape
    return np.ascontiguousarray(x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3))


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


POSITIONS = ("none", "rope", "alibi", "t5")


def _sum_to(d: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """d summed over the axes along which an array of ``shape`` was broadcast to d's shape (ATT.10)."""
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and d.shape[a] != 1)
    return d.sum(axis=axes, keepdims=True) if axes else d


class MHACache(NamedTuple):
    """One forward call of ``MultiHeadAttention``: the ops' caches and the call's kind."""

    attn: AttentionCache  # q, k, v, probs, ... of ``attention_forward`` (q and k rotated under RoPE)
    is_cross: bool  # keys and values came from a context: backward returns (dx, dcontext)
    out_shape: Tuple[int, ...]  # (B, T, d_model): the shape dy must have
    rope_q: Optional[RopeCache] = None  # RoPE of the queries (positions t0 .. t0+T-1)
    rope_k: Optional[RopeCache] = None  # RoPE of this call's keys (same positions)
    t5: Optional[T5BiasCache] = None  # buckets of the T5 bias, for the table's gradient
    bias_shape: Optional[Tuple[int, ...]] = None  # shape of the caller's additive bias (None: none given)
    qkv: Optional[np.ndarray] = None  # x, when q, k, v of self attention came from one product of it


class MultiHeadAttention(Module):
    """o_proj(attention(q_proj(x), k_proj(src), v_proj(src))) with src = x, or context for cross attention."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None, bias: bool = True, *,
                 rng: np.random.Generator, dtype=np.float32, scale: Optional[float] = None,
                 head_dim: Optional[int] = None, qkv_bias: Optional[bool] = None, position: str = "none",
                 rope_theta: float = 10000.0, window: Optional[int] = None, t5_num_buckets: int = 32,
                 t5_max_distance: int = 128, t5_bidirectional: bool = True):
        super().__init__()
        name = "MultiHeadAttention"
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        check_layer_options(name, rng=rng, dtype=dtype, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head)
        if head_dim is None:
            if d_model % n_head != 0:
                raise ValueError(f"{name}: argument 'n_head' expected a divisor of d_model = {d_model}, got {n_head}")
            head_dim = d_model // n_head
        else:
            head_dim = check_count(name, "head_dim", head_dim, 1, MAX_POSITION)
        if n_head % n_kv_head != 0:
            raise ValueError(f"{name}: argument 'n_kv_head' expected a divisor of n_head = {n_head}, got {n_kv_head}")
        check_bool(name, "bias", bias)
        qkv_bias = bias if qkv_bias is None else check_bool(name, "qkv_bias", qkv_bias)
        if scale is not None:
            scale = check_real(name, "scale", scale, lo=0.0, lo_open=True)
        if not isinstance(position, str) or position not in POSITIONS:
            raise ValueError(f"{name}: argument 'position' expected one of {', '.join(map(repr, POSITIONS))}, "
                             f"got {position!r}")
        if position == "rope" and head_dim % 2:
            raise ValueError(f"{name}: argument 'head_dim' expected an even head size for position='rope' "
                             f"(RoPE rotates pairs), got {head_dim}")
        rope_theta = check_real(name, "rope_theta", rope_theta, lo=0.0, lo_open=True)
        if window is not None:
            window = check_count(name, "window", window, 1, MAX_POSITION)
        t5_bidirectional = check_bool(name, "t5_bidirectional", t5_bidirectional)
        t5_num_buckets = check_count(name, "t5_num_buckets", t5_num_buckets, 4 if t5_bidirectional else 2,
                                     MAX_POSITION)
        per_sign = t5_num_buckets // 2 if t5_bidirectional else t5_num_buckets
        t5_max_distance = check_count(name, "t5_max_distance", t5_max_distance, per_sign // 2 + 1, MAX_POSITION)

        self.d_model, self.n_head, self.n_kv_head, self.head_dim = d_model, n_head, n_kv_head, head_dim
        self.scale = scale  # None: 1 / sqrt(head_dim)
        self.bias, self.qkv_bias = bool(bias), bool(qkv_bias)
        self.position, self.rope_theta, self.window = position, rope_theta, window
        self.t5_num_buckets = t5_num_buckets  # T5 options, used when position == "t5"
        self.t5_max_distance = t5_max_distance
        self.t5_bidirectional = t5_bidirectional
        inner = n_head * head_dim
        self.q_proj = Linear(d_model, inner, qkv_bias, rng=rng, dtype=dtype)
        self.k_proj = Linear(d_model, n_kv_head * head_dim, qkv_bias, rng=rng, dtype=dtype)
        self.v_proj = Linear(d_model, n_kv_head * head_dim, qkv_bias, rng=rng, dtype=dtype)
        self.o_proj = Linear(inner, d_model, bias, rng=rng, dtype=dtype)
        if position == "t5":  # (num_buckets, H), as Hugging Face's T5 ``relative_attention_bias.weight``
            self.relative_attention_bias = Embedding(t5_num_buckets, n_head, rng=rng, dtype=dtype)

    def make_kv_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, self.q_proj.weight.data.dtype)

    def _check_bias(self, name: str, bias: object, q: np.ndarray, Tk: int) -> None:
        """The caller's additive bias, checked before it is added to the positional one (the rule of
        ``attention_forward``: 4-D, each dimension 1 or that of (B, H, Tq, Tk), the queries' dtype)."""
        check_float(name, "bias", bias)
        check_same_dtype(name, "x", q, bias=bias)
        full = (q.shape[0], q.shape[1], q.shape[2], Tk)
        if bias.ndim != 4 or any(b not in (1, f) for b, f in zip(bias.shape, full)):
            raise ValueError(f"{name}: argument 'bias' expected 4-D shape with each dimension 1 or equal to {full}, "
                             f"got {tuple(bias.shape)}")

    def _fused(self) -> bool:
        """Whether q, k and v share one array: three plain ``Linear`` projections (not adapted or
        quantized replacements), all with a bias or all without."""
        return (all(type(p) is Linear for p in (self.q_proj, self.k_proj, self.v_proj))
                and (self.q_proj.bias is None) == (self.k_proj.bias is None) == (self.v_proj.bias is None))

    def _qkv_columns(self) -> List[Tuple[Linear, slice]]:
        """q_proj, k_proj and v_proj, each with its columns of the one q, k, v product."""
        ends = np.cumsum([self.n_head, self.n_kv_head, self.n_kv_head]) * self.head_dim
        return [(p, slice(a, z)) for p, a, z in zip((self.q_proj, self.k_proj, self.v_proj), (0, *ends[:2]), ends)]

    def _qkv_forward(self, x: np.ndarray):
        """q (B, H, T, D), k, v (B, Hkv, T, D) of self attention as views of one array
        y = x [W_q; W_k; W_v]^T + [b_q; b_k; b_v] (B, T, (H + 2 Hkv) D): the three projections (LIN.1) as
        one product, whose columns are each projection's output, and the heads read in place (no copy
        into head-major order)."""
        B, T = x.shape[:2]
        D, H, Hkv = self.head_dim, self.n_head, self.n_kv_head
        parts = self._qkv_columns()
        W = np.concatenate([p.weight.data for p, _ in parts])  # [W_q; W_k; W_v]
        b = None if self.q_proj.bias is None else np.concatenate([p.bias.data for p, _ in parts])
        y, _ = linear_forward(x, W, b)  # (LIN.1)
        for p, columns in parts:
            p.record("out", y[..., columns])  # each projection's output, under its own name
        heads = y.reshape(B, T, H + 2 * Hkv, D).transpose(0, 2, 1, 3)  # (B, H + 2 Hkv, T, D), a view
        return heads[:, :H], heads[:, H:H + Hkv], heads[:, H + Hkv:], x

    def _qkv_backward(self, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray, x: np.ndarray) -> np.ndarray:
        """dx of the three projections as one: dq, dk, dv side by side as dy, one (LIN.3) for dx (summing
        the three paths into x inside the product) and one (LIN.4) for the three weights, split back
        into each projection's gradient. The weights are read as they are now, as a ``Linear`` reads its
        own in its backward."""
        B, H, T, D = dq.shape
        Hkv = dk.shape[1]
        dy = np.empty((B, T, H + 2 * Hkv, D), dq.dtype)

        def gather(batch: slice) -> None:  # a copy into row order: batch elements on several cores
            for part, d in zip((slice(0, H), slice(H, H + Hkv), slice(H + Hkv, None)), (dq, dk, dv)):
                dy[batch, :, part] = d[batch].transpose(0, 2, 1, 3)

        row_parallel(gather, B, T * (H + 2 * Hkv) * D)
        parts = self._qkv_columns()
        W = np.concatenate([p.weight.data for p, _ in parts])  # [W_q; W_k; W_v] as they are now
        cache = LinearCache(x=x, W=W, has_bias=self.q_proj.bias is not None)
        dx, dW, db = linear_backward(dy.reshape(B, T, (H + 2 * Hkv) * D), cache)  # (LIN.3) - (LIN.5)
        for p, columns in reversed(parts):  # v, k, q: the order of the three projections' own backward
            p.weight.grad += dW[columns]
            p.record("dW", dW[columns])
            if db is not None:
                p.bias.grad += db[columns]
                p.record("db", db[columns])
        return dx

    @atomic
    def forward(self, x: np.ndarray, *, causal: bool = False, kv_cache: Optional[KVCache] = None,
                context: Optional[np.ndarray] = None, key_padding_mask: Optional[np.ndarray] = None,
                bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, d_model) -> (B, T, d_model).

        context (B, S, d_model): cross attention, keys and values from ``context``.
        kv_cache: self attention appends this call's keys and values to it; cross
        attention fills it from ``context`` once (while empty) and then reuses it.
        A forward with a kv_cache is inference: the layer must be in eval mode.
        key_padding_mask (B, S) bool and bias (additive on the logits, added to the
        layer's ALiBi or T5 bias) are passed to ``attention_forward``, where S counts
        every key attended to. New queries sit at positions t0 .. t0 + T - 1 with
        t0 = kv_cache.length (0 without a cache), (ATT.17).
        """
        name = "MultiHeadAttention.forward"
        dtype = self.q_proj.weight.data.dtype
        check_float(name, "x", x)
        check_ndim(name, "x", x, 3)
        check_features(name, "x", x, self.d_model, dtype)
        check_bool(name, "causal", causal)
        if context is not None:
            check_float(name, "context", context)
            check_ndim(name, "context", context, 3)
            check_shape(name, "context", context, (x.shape[0], None, self.d_model))
            check_features(name, "context", context, self.d_model, dtype)
            if self.position != "none" or self.window is not None:
                option = f"position={self.position!r}" if self.position != "none" else f"window={self.window}"
                raise ValueError(f"{name}: argument 'context' expected None for a layer with {option} "
                                 "(a context has no positions), got an array")
        if self.window is not None and not causal:
            raise ValueError(f"{name}: argument 'causal' expected True for a layer with window={self.window} "
                             "(a sliding window is causal), got False")
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"{name}: argument 'kv_cache' expected a KVCache, got {type(kv_cache).__name__}")
            if self.training:
                raise ValueError(f"{name}: argument 'kv_cache' is for inference; call .eval() first "
                                 "(a training forward keeps caches for a backward)")
            want = (x.shape[0], self.n_kv_head, self.head_dim, dtype)
            got = (kv_cache.k.shape[0], kv_cache.k.shape[1], kv_cache.k.shape[3], kv_cache.k.dtype)
            if want != got:
                raise ValueError(f"{name}: argument 'kv_cache' expected (batch, n_kv_head, head_dim, dtype) = {want}, "
                                 f"got {got}")
        start = 0 if kv_cache is None or context is not None else kv_cache.length  # t0 of (ATT.17)

        rope_q = rope_k = t5_cache = qkv_cache = None
        if context is None and self._fused():  # q, k, v of self attention in one array, heads read in place
            q, k, v, qkv_cache = self._qkv_forward(x)
        else:
            q = split_heads(self.q_proj.forward(x), self.n_head)  # (B, H, T, D)
        if self.position == "rope":
            q, rope_q = rope_forward(q, base=self.rope_theta, offset=start)  # positions t0 + i, (ATT.17)
        if context is not None and kv_cache is not None and kv_cache.length > 0:
            k, v = kv_cache.k[:, :, :kv_cache.length], kv_cache.v[:, :, :kv_cache.length]  # cross: computed once
        else:
            if qkv_cache is None:
                src = x if context is None else context
                k = split_heads(self.k_proj.forward(src), self.n_kv_head)  # (B, Hkv, S, D)
                v = split_heads(self.v_proj.forward(src), self.n_kv_head)
            if self.position == "rope":
                k, rope_k = rope_forward(k, base=self.rope_theta, offset=start)  # cached rotated, (ATT.17)
            if kv_cache is not None:
                k, v = kv_cache.stage(k, v)  # the cache's length moves only once the call has succeeded

        Tq, Tk = q.shape[2], k.shape[2]
        if self.position == "alibi":
            position_bias = alibi_bias(self.n_head, Tq, Tk, dtype=dtype)  # (1, H, Tq, Tk), end-aligned
        elif self.position == "t5":  # query i at t0 + i, key j at j: the offset of (T5.1) is t0
            position_bias, t5_cache = t5_bias_forward(
                self.relative_attention_bias.weight.data, Tq, Tk, bidirectional=self.t5_bidirectional,
                max_distance=self.t5_max_distance, offset=start)
        else:
            position_bias = None
        total_bias = bias
        if position_bias is not None:
            if bias is not None:
                self._check_bias(name, bias, q, Tk)
                total_bias = bias + position_bias  # broadcast to the union of both shapes
            else:
                total_bias = position_bias
        out, attn = attention_forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                      bias=total_bias, scale=self.scale, window=self.window)
        y = self.o_proj.forward(merge_heads(out))
        if kv_cache is not None:
            kv_cache.length = k.shape[2]
        self.save_cache(MHACache(attn=attn, is_cross=context is not None, out_shape=y.shape, rope_q=rope_q,
                                 rope_k=rope_k, t5=t5_cache, bias_shape=None if bias is None else tuple(bias.shape),
                                 qkv=qkv_cache))
        self.record("probs", attn.probs)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """dy (B, T, d_model) -> dx, or (dx, dcontext) after a cross-attention forward.

        Parameter gradients are added into ``.grad``; the gradient of an additive
        ``bias`` given to the matching forward is left in ``self.dbias`` (None without one).
        """
        name = "MultiHeadAttention.backward"
        check_dout(self, name, "dy", dy, self.d_model, self.q_proj.weight.data.dtype)
        cache = self.pop_cache()
        dmerged = self.o_proj.backward(dy)  # (B, T, H*D); the projections in reverse order: o, v, k, q
        dout = split_heads(dmerged, self.n_head)  # (B, H, T, D)
        dq, dk, dv, dbias = attention_backward(dout, cache.attn)
        if cache.t5 is not None:  # the table's bias (1, H, Tq, Tk) was shared by the batch: (ATT.10), (T5.5)
            dtable = t5_bias_backward(_sum_to(dbias, (1,) + dbias.shape[1:]), cache.t5)
            self.relative_attention_bias.weight.grad += dtable
        self.dbias = None if cache.bias_shape is None else _sum_to(dbias, cache.bias_shape)  # (ATT.10)
        if cache.rope_q is not None:
            dq = rope_backward(dq, cache.rope_q)  # (ROPE.5)
            dk = rope_backward(dk, cache.rope_k)  # (ROPE.5)
        if cache.qkv is not None:
            return self._qkv_backward(dq, dk, dv, cache.qkv)
        dsrc_v = self.v_proj.backward(merge_heads(dv))
        dsrc_k = self.k_proj.backward(merge_heads(dk))
        dx = self.q_proj.backward(merge_heads(dq))
        dsrc = dsrc_k + dsrc_v
        if cache.is_cross:
            return dx, dsrc
        return dx + dsrc
