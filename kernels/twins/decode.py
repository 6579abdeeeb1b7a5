"""KV-cached greedy decoding with the torch twins: the third engine of ``npformer bench --inference``.

A twin's own ``forward`` recomputes every position from the first (the twins are the oracle of the
gradient tests, and that forward stays as it is). Here the same modules run one layer at a time with
a cache of keys and values per layer, as npformer's ``KVCache`` does:

- ``make_kv_caches(twin, B)``: one ``TwinKVCache`` per layer, k and v (B, Hkv, T_max, Dh) preallocated;
- ``forward_cached(twin, ids, caches)``: ids (B, T) at positions t0 .. t0 + T - 1, t0 the number of
  positions the caches hold; each layer writes its T new keys and values after them and its queries
  attend to all t0 + T; the logits (B, T, V);
- ``greedy_decode(twin, prompt, n)``: the prompt's forward, then one token per step, the arg-max of
  the last logits each time;
- ``time_inference``: the medians the bench reports (prefill timed with the twin's own ``forward``).

Keys are cached after RoPE, rotated at their own positions, so a step rotates only its new key. A
LLaMA query head h reads key/value head h // G (G = H / Hkv), as the twin's ``repeat_interleave``
does, without repeating the cache (``enable_gqa``). Mistral's window hides key j from query i when
j <= i - W; the cache keeps every key, as npformer's does. Plain torch with no autograd
(``torch.inference_mode``); dropout is off, as in any inference.

Shapes: ids (B, T) int64, hidden (B, T, D), q (B, H, T, Dh), cached k and v (B, Hkv, S, Dh) with
S = t0 + T, logits (B, T, V).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .gpt import TwinGPT
from .hf_decode import set_threads, torch_blas
from .llama import TwinLlama, rope_cos_sin, rotate_half_rope

TWINS = {"gpt": TwinGPT, "llama": TwinLlama}  # the families whose twin decodes with a cache


class TwinKVCache:
    """Keys and values of the positions seen so far, k and v (B, Hkv, T_max, Dh); ``length`` of them held.

    ``append(k_new, v_new)`` writes (B, Hkv, T_new, Dh) after the ``length`` positions held and returns
    the views through them, ``k[:, :, :length]`` and ``v[:, :, :length]``.
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype):
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_head, max_len, head_dim, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_new.shape[2]
        self.k[:, :, self.length:end] = k_new
        self.v[:, :, self.length:end] = v_new
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def __repr__(self) -> str:
        B, Hkv, T_max, Dh = self.k.shape
        return (f"TwinKVCache(batch={B}, n_kv_head={Hkv}, length={self.length}/{T_max}, head_dim={Dh}, "
                f"dtype={self.k.dtype})")


# -- building a twin from npformer's weights --------------------------------------------------------
def load_twin(family: str, config: Dict[str, object], state: Dict[str, np.ndarray]) -> torch.nn.Module:
    """The twin of an npformer model, ``family`` 'gpt' or 'llama' (Mistral, Qwen2, Mixtral), of ``config``
    (its ``to_dict()``) holding ``state`` (its ``state_dict()``), in the dtype of those weights, eval mode."""
    op = "load_twin"
    if family not in TWINS:
        raise ValueError(f"{op}: argument 'family' expected one of {', '.join(TWINS)}, got {family!r}")
    dtypes = {np.asarray(a).dtype for a in state.values()}
    if not dtypes <= {np.dtype(np.float32), np.dtype(np.float64)} or len(dtypes) != 1:
        raise ValueError(f"{op}: argument 'state' expected arrays of one dtype, float32 or float64, "
                         f"got {sorted(d.name for d in dtypes)}")
    twin = TWINS[family](**config).to(torch.float64 if dtypes == {np.dtype(np.float64)} else torch.float32)
    twin.load_npformer_state(state)
    return twin.eval()


def _shape(twin) -> Tuple[int, int, int, int]:
    """(n_layer, H, Hkv, Dh) of a GPT or LLaMA twin."""
    if isinstance(twin, TwinGPT):
        attn = twin.blocks[0].attn
        return len(twin.blocks), attn.n_head, attn.n_head, attn.q_proj.in_features // attn.n_head
    attn = twin.layers[0].self_attn
    return len(twin.layers), attn.n_head, attn.n_kv_head, attn.head_dim


def _check_twin(op: str, twin) -> None:
    if not isinstance(twin, (TwinGPT, TwinLlama)):
        raise TypeError(f"{op}: argument 'twin' expected a TwinGPT or TwinLlama, got {type(twin).__name__}")
    if isinstance(twin, TwinLlama) and any(getattr(layer.mlp, "capacity_factor", None) is not None
                                           for layer in twin.layers):
        raise ValueError(f"{op}: argument 'twin' expected experts without a capacity_factor (routing with a "
                         "capacity depends on later tokens, so it cannot decode with a cache)")


def max_positions(twin) -> int:
    """The longest sequence the twin takes: its position table's rows (GPT) or its block_size (LLaMA)."""
    return twin.wpe.weight.shape[0] if isinstance(twin, TwinGPT) else twin.block_size


def make_kv_caches(twin, batch: int, max_len: Optional[int] = None) -> List[TwinKVCache]:
    """One ``TwinKVCache`` per layer for ``max_len`` positions (default and at most the twin's ``max_positions``)."""
    op = "make_kv_caches"
    _check_twin(op, twin)
    limit = max_positions(twin)
    max_len = limit if max_len is None else max_len
    for name, value, hi in (("batch", batch, None), ("max_len", max_len, limit)):
        if type(value) is not int or value < 1 or (hi is not None and value > hi):
            bound = f"an int in [1, {hi}]" if hi is not None else "an int >= 1"
            raise ValueError(f"{op}: argument '{name}' expected {bound}, got {value!r}")
    n_layer, _, Hkv, Dh = _shape(twin)
    dtype = next(twin.parameters()).dtype
    return [TwinKVCache(batch, Hkv, max_len, Dh, dtype) for _ in range(n_layer)]


# -- the cached forward -----------------------------------------------------------------------------
def _visible(t0: int, T: int, S: int, window: Optional[int]) -> Optional[torch.Tensor]:
    """True where query t0 + i may see key j, (T, S): j <= t0 + i, and j > t0 + i - W with a window W.
    None when every key is visible to every query (one query and no window reaching back)."""
    if T == 1 and (window is None or S <= window):
        return None
    i, j = t0 + torch.arange(T)[:, None], torch.arange(S)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (j > i - window)
    return visible


def _attention(attn, x: torch.Tensor, cache: TwinKVCache, t0: int, H: int, Hkv: int, Dh: int,
               rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, window: Optional[int] = None) -> torch.Tensor:
    """x (B, T, D) at positions t0 .. t0 + T - 1 -> o_proj of the attention over the cache's t0 + T keys."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
    k = attn.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
    v = attn.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)
    if rope is not None:
        cos, sin = rope  # (T, Dh / 2) at positions t0 + i
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
    k, v = cache.append(k, v)  # (B, Hkv, S, Dh), S = t0 + T
    S = k.shape[2]
    visible = _visible(t0, T, S, window)
    if visible is None or (t0 == 0 and window is None):  # all keys, or the plain causal square
        y = F.scaled_dot_product_attention(q, k, v, is_causal=visible is not None, enable_gqa=Hkv != H)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=Hkv != H)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * Dh))


def _gpt_forward(twin: TwinGPT, ids: torch.Tensor, caches: List[TwinKVCache], t0: int) -> torch.Tensor:
    """Pre-LayerNorm blocks; position rows t0 .. t0 + T - 1 of wpe; the head tied to wte."""
    _, H, Hkv, Dh = _shape(twin)
    x = twin.wte.weight[ids] + twin.wpe.weight[t0:t0 + ids.shape[1]]  # (B, T, D)
    for block, cache in zip(twin.blocks, caches):
        x = x + _attention(block.attn, block.ln_1(x), cache, t0, H, Hkv, Dh)
        x = x + block.mlp(block.ln_2(x))
    return twin.ln_f(x) @ twin.wte.weight.T  # (B, T, V)


def _llama_forward(twin: TwinLlama, ids: torch.Tensor, caches: List[TwinKVCache], t0: int) -> torch.Tensor:
    """RMSNorm layers with RoPE at positions t0 + i (one table for all layers), SwiGLU or experts, the head."""
    _, H, Hkv, Dh = _shape(twin)
    first = twin.layers[0].self_attn
    x = twin.embed_tokens.weight[ids]  # (B, T, D)
    rope = rope_cos_sin(ids.shape[1], Dh, first.rope_theta, x.dtype, start=t0)
    for layer, cache in zip(twin.layers, caches):
        attn = layer.self_attn
        x = x + _attention(attn, layer.input_layernorm(x), cache, t0, H, Hkv, Dh, rope, attn.window)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = twin.norm(x)
    return h @ twin.embed_tokens.weight.T if twin.tied else twin.lm_head(h)  # (B, T, V)


def forward_cached(twin, ids: torch.Tensor, caches: List[TwinKVCache]) -> torch.Tensor:
    """ids (B, T) int64 after the positions the caches hold -> logits (B, T, V); the caches take the T positions."""
    op = "forward_cached"
    _check_twin(op, twin)
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 or 0 in ids.shape:
        got = (f"a {ids.dim()}-d {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
               else type(ids).__name__)
        raise ValueError(f"{op}: argument 'ids' expected a non-empty (B, T) int64 tensor, got {got}")
    n_layer = _shape(twin)[0]
    if (not isinstance(caches, (list, tuple)) or len(caches) != n_layer
            or not all(isinstance(c, TwinKVCache) for c in caches)):
        raise ValueError(f"{op}: argument 'caches' expected a list of {n_layer} TwinKVCache (make_kv_caches), "
                         f"got {type(caches).__name__}")
    B, T = ids.shape
    t0, (_, _, Hkv, Dh), dtype = caches[0].length, _shape(twin), next(twin.parameters()).dtype
    if any(c.length != t0 or c.k.shape != (B, Hkv, c.max_len, Dh) or c.k.dtype != dtype for c in caches):
        raise ValueError(f"{op}: argument 'caches' expected {n_layer} caches of batch {B}, {Hkv} key/value heads of "
                         f"{Dh}, {dtype}, holding one length, got {', '.join(repr(c) for c in caches)}")
    if t0 + T > caches[0].max_len:
        raise ValueError(f"{op}: argument 'ids' expected at most {caches[0].max_len - t0} positions (the caches hold "
                         f"{t0} of {caches[0].max_len}), got {T}")
    V = twin.wte.weight.shape[0] if isinstance(twin, TwinGPT) else twin.embed_tokens.weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"{op}: argument 'ids' expected token ids in [0, {V}), got {int(ids.min())} .. "
                         f"{int(ids.max())}")
    with torch.inference_mode():
        if isinstance(twin, TwinGPT):
            return _gpt_forward(twin, ids, caches, t0)
        return _llama_forward(twin, ids, caches, t0)


# -- greedy decoding and its timing -----------------------------------------------------------------
def greedy_decode(twin, prompt: torch.Tensor, new_tokens: int) -> Tuple[float, np.ndarray]:
    """The prompt's cached forward, then ``new_tokens - 1`` one-token steps: (seconds of those steps,
    the greedy tokens (B, new_tokens) as int64)."""
    op = "greedy_decode"
    if type(new_tokens) is not int or new_tokens < 1:
        raise ValueError(f"{op}: argument 'new_tokens' expected an int >= 1, got {new_tokens!r}")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        raise ValueError(f"{op}: argument 'prompt' expected a (B, T) int64 tensor, got {type(prompt).__name__}")
    with torch.inference_mode():
        caches = make_kv_caches(twin, prompt.shape[0])
        if prompt.shape[1] + new_tokens - 1 > caches[0].max_len:
            raise ValueError(f"{op}: argument 'new_tokens' expected prompt length + new_tokens - 1 <= "
                             f"{caches[0].max_len}, got {prompt.shape[1]} + {new_tokens} - 1")
        nxt = forward_cached(twin, prompt, caches)[:, -1].argmax(-1)[:, None]  # (B, 1)
        tokens = [nxt]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt = forward_cached(twin, nxt, caches)[:, -1].argmax(-1)[:, None]
            tokens.append(nxt)
        seconds = time.perf_counter() - t
    return seconds, torch.cat(tokens, dim=1).numpy()


def time_inference(twin, prompt: np.ndarray, new_tokens: int, repeats: int) -> Dict[str, object]:
    """Median seconds of the twin's own forward over the prompt (prefill) and of ``greedy_decode``'s steps, each
    after one untimed run; the greedy tokens; torch's BLAS and thread count (``set_threads``)."""
    set_threads()
    ids = torch.from_numpy(np.ascontiguousarray(prompt, dtype=np.int64))
    prefill = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            twin(ids)
            prefill.append(time.perf_counter() - t)
    decode, tokens = [], None
    for _ in range(repeats + 1):
        seconds, tokens = greedy_decode(twin, ids, new_tokens)
        decode.append(seconds)
    return {"prefill_s": float(np.median(prefill[1:])), "decode_s": float(np.median(decode[1:])), "tokens": tokens,
            **torch_blas()}
