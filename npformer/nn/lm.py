"""What every causal language model here shares: the ignored target and the check of a forward's inputs.

A model's ``forward(ids, targets=None, kv_caches=None)`` takes ids (B, T) of integers in
[0, V), optional targets (B, T) in [0, V) or ``IGNORE_INDEX``, and optional KV caches
(one per layer, inference only) whose common length is the position of the first new
token. ``check_lm_inputs`` checks all of it by name, before any work, and returns that
first position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..ops._checks import check_count, check_int, check_ndim, check_shape
from .attention import KVCache

IGNORE_INDEX = -100  # a target that adds nothing to the loss (prompt positions, padding)


def prefix_lm_bias(op: str, prefix_len: object, batch: int, start: int, T: int, dtype: np.dtype) -> np.ndarray:
    """The prefix-LM mask of (ATT.18) as an additive bias (B, 1, T, start + T): 0 where the query at
    position start + i may see key j (j <= start + i, or j < prefix_len[b]), -inf elsewhere.

    prefix_len (B,) int in [0, start + T]: row b's first prefix_len[b] positions see each other in
    both directions; 0 or 1 is the causal mask. With ``start`` > 0 positions cached, at most
    ``start``: the cached keys and values were computed without the positions after them, so a
    prefix must have been run whole before the cached continuation. Checked by name (``op``'s
    argument 'prefix_len').
    """
    check_int(op, "prefix_len", prefix_len)
    check_shape(op, "prefix_len", prefix_len, (batch,))
    Tk = start + T
    if prefix_len.min() < 0 or prefix_len.max() > Tk:
        raise ValueError(f"{op}: argument 'prefix_len' expected values in [0, {Tk}] (the positions seen), "
                         f"got values in [{prefix_len.min()}, {prefix_len.max()}]")
    if start > 0 and prefix_len.max() > start:  # the cached keys were computed without the rest of the prefix
        raise ValueError(f"{op}: argument 'prefix_len' expected values of at most {start} with {start} positions "
                         f"cached (a prefix is run whole, before any cached continuation), got {prefix_len.max()}")
    query = np.arange(start, Tk)[:, None]  # absolute positions of the new queries
    key = np.arange(Tk)[None, :]
    seen = (key <= query)[None] | (key[None] < prefix_len[:, None, None])  # (B, T, Tk), (ATT.18)
    bias = np.where(seen, np.zeros((), dtype), np.asarray(-np.inf, dtype))
    return bias[:, None]  # (B, 1, T, Tk): one mask for every head


def check_lm_inputs(op: str, ids: object, targets: object, kv_caches: Optional[Sequence[KVCache]], *,
                    vocab_size: int, block_size: int, n_layer: int, n_kv_head: int, head_dim: int,
                    dtype: np.dtype, training: bool) -> int:
    """Validate a language model's forward arguments by name; returns the first position (the cache length).

    ids (B, T) int with B, T >= 1 and values in [0, vocab_size); targets None or (B, T) int in
    [0, vocab_size) or IGNORE_INDEX; kv_caches None, or (eval mode, no targets) a list of
    ``n_layer`` distinct ``KVCache`` of shape (B, n_kv_head, max_len, head_dim) in ``dtype`` with
    max_len <= block_size, all of one length and size; and the cached plus the new positions at
    most ``block_size`` (and at most the caches' max_len).
    """
    check_int(op, "ids", ids)
    check_ndim(op, "ids", ids, 2)
    B, T = ids.shape
    if B < 1 or T < 1:
        raise ValueError(f"{op}: argument 'ids' expected shape (B, T) with B >= 1 and T >= 1, got {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{op}: argument 'ids' expected values in [0, {vocab_size}), "
                         f"got values in [{ids.min()}, {ids.max()}]")
    if targets is not None:
        check_int(op, "targets", targets)
        check_shape(op, "targets", targets, ids.shape)
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
        if bad.any():
            raise ValueError(f"{op}: argument 'targets' expected values in [0, {vocab_size}) or "
                             f"{IGNORE_INDEX} (ignored), got {targets[bad].flat[0]}")
    start = 0
    if kv_caches is not None:
        if targets is not None or training:
            raise ValueError(f"{op}: argument 'kv_caches' is for inference: call .eval() first and pass no targets")
        if not isinstance(kv_caches, (list, tuple)) or not all(isinstance(c, KVCache) for c in kv_caches):
            got = type(kv_caches).__name__ if not isinstance(kv_caches, (list, tuple)) else \
                f"{type(kv_caches).__name__} holding {sorted({type(c).__name__ for c in kv_caches})}"
            raise TypeError(f"{op}: argument 'kv_caches' expected a list of {n_layer} KVCache "
                            f"(make_kv_caches), got {got}")
        if len(kv_caches) != n_layer:
            raise ValueError(f"{op}: argument 'kv_caches' expected a list of {n_layer} KVCache "
                             f"(make_kv_caches), got {len(kv_caches)}")
        if len({id(c) for c in kv_caches}) != len(kv_caches):
            raise ValueError(f"{op}: argument 'kv_caches' expected one distinct KVCache per block, "
                             "got the same cache for two blocks")
        max_len = kv_caches[0].max_len
        for i, c in enumerate(kv_caches):
            want = (B, n_kv_head, head_dim, min(max_len, block_size), np.dtype(dtype))
            got = (c.k.shape[0], c.k.shape[1], c.k.shape[3], c.max_len, c.k.dtype)
            if got != want:
                raise ValueError(f"{op}: argument 'kv_caches' entry {i} expected (batch, n_kv_head, head_dim, "
                                 f"max_len, dtype) = {want} with max_len <= block_size = {block_size}, got {got} "
                                 f"(use make_kv_caches)")
        lengths = {c.length for c in kv_caches}
        if len(lengths) != 1:
            raise ValueError(f"{op}: argument 'kv_caches' expected caches of one length, got lengths {sorted(lengths)}")
        start = lengths.pop()
    if start + T > block_size:
        raise ValueError(f"{op}: argument 'ids' expected at most {block_size - start} positions "
                         f"(block_size {block_size}, {start} cached), got {T}")
    if kv_caches is not None and start + T > max_len:
        raise ValueError(f"{op}: argument 'ids' expected at most {max_len - start} positions "
                         f"(the caches hold {max_len}, {start} used), got {T}")
    return start


def check_kv_length(op: str, max_len: object, block_size: int) -> int:
    """The positions a model's KV caches hold: ``max_len`` in [1, block_size], default block_size. A model
    whose context is long (a Hugging Face model's max_position_embeddings) decodes with caches only as
    long as the prompt and the new tokens need."""
    return block_size if max_len is None else check_count(op, "max_len", max_len, 1, block_size)
