"""Multi-head attention layer (MHA, GQA, MQA; self and cross attention) and its KV cache.

Shapes: x (B, T, d_model) with d_model = H * D; context (B, S, d_model) for cross
attention; heads are split as q (B, H, T, D), k and v (B, Hkv, S, D) and handed to
``npformer.ops.attention`` (derivation: ``proofs/attention.md``).

Parameter names follow Hugging Face (LLaMA, Mistral, ...): ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, each a ``Linear`` with weight (out, in), so checkpoints map
one to one. ``k_proj`` and ``v_proj`` project to Hkv * D (grouped-query attention
when Hkv < H, multi-query when Hkv = 1).

Recorded names (when recording is on): ``<path>.probs`` (B, H, T, S) in the forward.

Decoding with a cache: ``make_kv_cache(B, T_max)`` returns a ``KVCache``; each
``forward(x_new, causal=True, kv_cache=cache)`` appends the new keys and values and
attends over every cached position, the causal mask aligned to the end (the last
new query sees every key). A forward with a cache is inference: call ``.eval()`` first.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import numpy as np

from ..ops._checks import check_bool, check_float, check_ndim, check_real, check_shape
from ..ops.attention import AttentionCache, attention_backward, attention_forward
from .layers import Linear, check_dout, check_features, check_layer_options
from .module import Module, atomic


class KVCache:
    """Preallocated keys and values of the positions seen so far: k, v (B, Hkv, T_max, D).

    ``append(k_new, v_new)`` writes (B, Hkv, T_new, D) after the ``length`` positions
    already held and returns the views ``k[:, :, :length]``, ``v[:, :, :length]``.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype=np.float32):
        dtype = check_layer_options("KVCache", dtype=dtype, batch=batch, n_kv_head=n_kv_head, max_len=max_len,
                                    head_dim=head_dim)
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


class MHACache(NamedTuple):
    """One forward call of ``MultiHeadAttention``: the attention op's cache and the call's kind."""

    attn: AttentionCache  # q, k, v, probs, ... of ``attention_forward``
    is_cross: bool  # keys and values came from a context: backward returns (dx, dcontext)
    out_shape: Tuple[int, ...]  # (B, T, d_model): the shape dy must have


class MultiHeadAttention(Module):
    """o_proj(attention(q_proj(x), k_proj(src), v_proj(src))) with src = x, or context for cross attention."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: Optional[int] = None, bias: bool = True, *,
                 rng: np.random.Generator, dtype=np.float32, scale: Optional[float] = None):
        super().__init__()
        name = "MultiHeadAttention"
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        check_layer_options(name, rng=rng, dtype=dtype, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head)
        if d_model % n_head != 0:
            raise ValueError(f"{name}: argument 'n_head' expected a divisor of d_model = {d_model}, got {n_head}")
        if n_head % n_kv_head != 0:
            raise ValueError(f"{name}: argument 'n_kv_head' expected a divisor of n_head = {n_head}, got {n_kv_head}")
        check_bool(name, "bias", bias)
        if scale is not None:
            scale = check_real(name, "scale", scale, lo=0.0, lo_open=True)
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.scale = scale  # None: 1 / sqrt(head_dim)
        self.q_proj = Linear(d_model, n_head * self.head_dim, bias, rng=rng, dtype=dtype)
        self.k_proj = Linear(d_model, n_kv_head * self.head_dim, bias, rng=rng, dtype=dtype)
        self.v_proj = Linear(d_model, n_kv_head * self.head_dim, bias, rng=rng, dtype=dtype)
        self.o_proj = Linear(n_head * self.head_dim, d_model, bias, rng=rng, dtype=dtype)

    def make_kv_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim, self.q_proj.weight.data.dtype)

    @atomic
    def forward(self, x: np.ndarray, *, causal: bool = False, kv_cache: Optional[KVCache] = None,
                context: Optional[np.ndarray] = None, key_padding_mask: Optional[np.ndarray] = None,
                bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, d_model) -> (B, T, d_model).

        context (B, S, d_model): cross attention, keys and values from ``context``.
        kv_cache: self attention appends this call's keys and values to it; cross
        attention fills it from ``context`` once (while empty) and then reuses it.
        A forward with a kv_cache is inference: the layer must be in eval mode.
        key_padding_mask (B, S) bool and bias (additive on the logits) are passed to
        ``attention_forward``, where S counts every key attended to.
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

        q = split_heads(self.q_proj.forward(x), self.n_head)  # (B, H, T, D)
        if context is not None and kv_cache is not None and kv_cache.length > 0:
            k, v = kv_cache.k[:, :, :kv_cache.length], kv_cache.v[:, :, :kv_cache.length]  # cross: computed once
        else:
            src = x if context is None else context
            k = split_heads(self.k_proj.forward(src), self.n_kv_head)  # (B, Hkv, S, D)
            v = split_heads(self.v_proj.forward(src), self.n_kv_head)
            if kv_cache is not None:
                k, v = kv_cache.stage(k, v)  # the cache's length moves only once the call has succeeded
        out, attn = attention_forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                      bias=bias, scale=self.scale)
        y = self.o_proj.forward(merge_heads(out))
        if kv_cache is not None:
            kv_cache.length = k.shape[2]
        self.save_cache(MHACache(attn=attn, is_cross=context is not None, out_shape=y.shape))
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
        dq, dk, dv, self.dbias = attention_backward(dout, cache.attn)
        dsrc_v = self.v_proj.backward(merge_heads(dv))
        dsrc_k = self.k_proj.backward(merge_heads(dk))
        dx = self.q_proj.backward(merge_heads(dq))
        dsrc = dsrc_k + dsrc_v
        if cache.is_cross:
            return dx, dsrc
        return dx + dsrc
