"""Absolute position embeddings: the fixed sinusoidal table and a learned table.

Derivation: ``proofs/positional.md``. Both give one vector per position, added to
the token embeddings of a sequence of length ``T``: ``x = tok_emb + pos[None]``.

- ``sinusoidal_table(T, D)``: ``(T, D)``, sin on even and cos on odd columns
  (POS.1). It is a constant: nothing to learn, no backward.
- ``positional_embedding_forward(table, T, offset=...)``: rows ``offset .. offset+T-1``
  of a learned ``(P, D)`` table (POS.4); the backward puts ``dout`` back into
  those rows (POS.5).

Lengths and offsets are integers >= 0 (floats are refused, not truncated), at most
2**53 - 1, so that every position is exact in float64; ``T = 0`` gives an empty table or
output, and a table that would not fit in memory is refused by name before any work.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_cache_type,
    check_count,
    check_dtype_option,
    check_fits,
    check_float,
    check_ndim,
    check_real,
)

OP = "positional_embedding"


class PositionalEmbeddingCache(NamedTuple):
    offset: int  # first row used, (POS.4)
    T: int  # number of rows used
    table_shape: tuple  # (P, D)
    dtype: np.dtype  # of the table, so dtable matches it


def sinusoidal_table(T: int, D: int, *, base: float = 10000.0, dtype=np.float32) -> np.ndarray:
    """PE[p, 2i] = sin(p * base**(-2i/D)), PE[p, 2i+1] = cos(p * base**(-2i/D)).

    ->  (T, D) in ``dtype`` (computed in float64, then cast; empty when T = 0)
    """
    op = "sinusoidal_table"
    T = check_count(op, "T", T, 0, MAX_POSITION)
    D = check_count(op, "D", D, 2, MAX_POSITION)
    if D % 2:
        _fail(op, "D", "an even integer", D)
    check_fits(op, "T" if T >= D else "D", (T, D), 8)  # the float64 table
    base = check_real(op, "base", base, lo=0.0, lo_open=True)
    dtype = check_dtype_option(op, "dtype", dtype)
    if T == 0:
        return np.zeros((0, D), dtype)  # no positions (D may be large: no frequencies needed)
    omega = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)
    angle = np.arange(T, dtype=np.float64)[:, None] * omega  # (T, D/2)
    pe = np.empty((T, D), np.float64)
    pe[:, 0::2] = np.sin(angle)  # (POS.1)
    pe[:, 1::2] = np.cos(angle)  # (POS.1)
    return pe.astype(dtype)


def positional_embedding_forward(
    table: np.ndarray, T: int, *, offset: int = 0
) -> Tuple[np.ndarray, PositionalEmbeddingCache]:
    """out[t] = table[offset + t] for t < T (a copy, not a view of the parameter).

    table: (P, D)  ->  out: (T, D)  (empty when T = 0)
    """
    op = f"{OP}_forward"
    check_float(op, "table", table)
    check_ndim(op, "table", table, 2)
    T = check_count(op, "T", T, 0, MAX_POSITION)
    offset = check_count(op, "offset", offset, 0, MAX_POSITION)
    P = table.shape[0]
    if offset + T > P:
        _fail(op, "T", f"'offset' + 'T' <= {P}, the rows of 'table'", f"{offset} + {T} = {offset + T}")
    out = table[offset : offset + T].copy()  # (POS.4)
    return out, PositionalEmbeddingCache(offset=offset, T=T, table_shape=table.shape, dtype=table.dtype)


def positional_embedding_backward(dout: np.ndarray, cache: PositionalEmbeddingCache) -> np.ndarray:
    """Gradient of the table: dout in the rows that were used, zeros elsewhere.

    dout: (T, D)  ->  dtable: (P, D)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, PositionalEmbeddingCache)
    offset, T, (P, D), dtype = cache
    check_float(op, "dout", dout)
    if dout.shape != (T, D):
        _fail(op, "dout", f"shape {(T, D)} (that of the forward's output)", tuple(dout.shape))
    if dout.dtype != dtype:
        _fail(op, "dout", f"dtype {dtype} (that of the forward's 'table')", dout.dtype)
    dtable = np.zeros((P, D), dtype)
    dtable[offset : offset + T] = dout  # (POS.5)
    return dtable


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck positional``."""
    from ..gradcheck import Case

    yield Case("positional_embedding offset 2", positional_embedding_forward, positional_embedding_backward,
               {"table": rng.standard_normal((9, 4))}, wrt=("table",), options={"T": 5, "offset": 2})
