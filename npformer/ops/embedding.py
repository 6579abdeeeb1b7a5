"""Embedding lookup: out[..., :] = W[ids[...], :], and its scatter-add backward.

Derivation: ``proofs/embedding.md``. Shapes: ``ids: (...)`` integers in ``[0, V)``,
``W: (V, D)``, ``out: (..., D)``; no ids at all is fine (an empty ``out`` and a zero
``dW``). The lookup is a product with a one-hot matrix, so the gradient of the table
adds every output row's gradient into the row it came from: a token that appears
twice receives the sum of both (EMB.3).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import check_cache_type, check_float, check_int, check_ndim, check_same_dtype_as, check_shape

OP = "embedding"


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (...)   the looked-up rows, needed by (EMB.3)
    num_rows: int  # V
    dim: int  # D
    dtype: np.dtype  # of W, so dW matches it


def check_ids(op: str, ids: np.ndarray, num_rows: int) -> None:
    """Every id must index a row of the table: no negative wrap-around, no clipping."""
    check_int(op, "ids", ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_rows):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{op}: argument 'ids' expected values in [0, {num_rows}), got {bad}")


def embedding_forward(ids: np.ndarray, W: np.ndarray) -> Tuple[np.ndarray, EmbeddingCache]:
    """out = W[ids].

    ids: (...) int, W: (V, D)  ->  out: (..., D)
    """
    op = f"{OP}_forward"
    check_float(op, "W", W)
    check_ndim(op, "W", W, 2)
    check_ids(op, ids, W.shape[0])
    out = W[ids]  # (EMB.1)
    return out, EmbeddingCache(ids=ids, num_rows=W.shape[0], dim=W.shape[1], dtype=W.dtype)


def embedding_backward(dout: np.ndarray, cache: EmbeddingCache) -> np.ndarray:
    """Gradient of the table (ids are integers and get none).

    dout: (..., D)  ->  dW: (V, D)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, EmbeddingCache)
    ids, V, D, dtype = cache
    check_same_dtype_as(op, "dout", dout, dtype, "W")
    check_shape(op, "dout", dout, ids.shape + (D,))
    flat_ids, flat_dout = ids.reshape(-1), dout.reshape(ids.size, D)
    # (EMB.3) as a sorted scatter: order the rows by id, sum each run of equal ids (np.add.reduceat),
    # write one sum per distinct id. Same result as np.add.at(dW, ids, dout), several times faster.
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if sorted_ids.size else sorted_ids
    dW = np.zeros((V, D), dtype)
    if sorted_ids.size:
        dW[sorted_ids[run_starts]] = np.add.reduceat(flat_dout[order], run_starts, axis=0)
    return dW


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck embedding`` (id 1 repeats)."""
    from ..gradcheck import Case

    ids = np.array([[1, 3, 1], [0, 1, 4]])
    yield Case("embedding", embedding_forward, embedding_backward, {"ids": ids, "W": rng.standard_normal((5, 3))},
               wrt=("W",))
