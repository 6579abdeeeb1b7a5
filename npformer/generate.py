"""Sampling from a language model: temperature, top-k, top-p, with or without a KV cache.

``generate`` works with any model that has ``forward(ids, kv_caches=None) -> (logits, _)``,
``make_kv_caches(batch)`` and ``cfg.block_size`` (the GPT of ``npformer.models``).
The cached path feeds the prompt once, then one token per step; the uncached path
re-runs the whole (cropped) context every step. Both draw from the same generator
in the same order, so in float64 they pick the same tokens.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def filter_logits(logits: np.ndarray, top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p.

    logits: (B, V) -> (B, V) (a copy).
    """
    logits = np.array(logits, dtype=np.float64)
    V = logits.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        mass_before = np.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the best token always survives
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    return logits


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> np.ndarray:
    """One token id per row of logits (B, V); temperature 0 means greedy."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    z = filter_logits(logits, top_k, top_p) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)  # inverse-CDF draw


def generate(model, ids: np.ndarray, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             rng: Optional[np.random.Generator] = None, use_cache: bool = True) -> np.ndarray:
    """Extend ids (B, T0) by ``max_new_tokens`` sampled tokens -> (B, T0 + max_new_tokens)."""
    rng = rng or np.random.default_rng()
    was_training = model.training
    model.eval()
    T_max = model.cfg.block_size
    out = np.array(ids)
    try:
        caches = model.make_kv_caches(ids.shape[0]) if use_cache else None
        pending = out
        for _ in range(max_new_tokens):
            if caches is not None and caches[0].length + pending.shape[1] > T_max:
                # The window is full: positions shift, so the cache is rebuilt from the last T_max tokens
                # (exactly what the uncached path sees).
                caches, pending = model.make_kv_caches(ids.shape[0]), out[:, -T_max:]
            context = pending if caches is not None else out[:, -T_max:]
            logits, _ = model.forward(context, kv_caches=caches)
            nxt = sample_next(logits[:, -1], rng, temperature, top_k, top_p)
            out = np.concatenate([out, nxt[:, None].astype(out.dtype)], axis=1)
            pending = out[:, -1:]
    finally:
        model.train(was_training)
    return out
