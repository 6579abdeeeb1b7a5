"""T5 relative position bias: bucketed relative positions, a learned (buckets, H) table.

Derivation: ``proofs/t5_bias.md``. Shapes: ``table: (N, H)`` with ``N`` buckets and
``H`` heads; the bias is ``(1, H, Tq, Tk)``, passed as the ``bias`` of
``npformer.ops.attention.attention_forward`` (T5 uses no 1/sqrt(D) scaling:
``scale=1.0``). The attention backward returns ``dbias``, and
``t5_bias_backward`` scatters it into the table.

Buckets follow Hugging Face's ``T5Attention._relative_position_bucket``, including its
float32 logarithm (T5.3). They agree for every position with 32 buckets and any
max_distance up to 1024 (tests sweep them). The two libraries' float32 logarithms differ
by one unit in the last place on some arguments, which matters only where the scaled
logarithm falls exactly on a whole number: a few unusual settings (34 buckets with
max_distance 27: log(18/8) / log(27/8) * 9 = 6) put one distance in adjacent buckets on
the two sides, and which side torch picks depends on its vector code.

Options: ``Tq``, ``Tk`` and ``offset`` (the position of the first query) are integers
>= 0 (an empty sequence gives an empty bias), positions at most 2**53 - 1
(``offset + Tq - 1`` included), and a bias that would not fit in memory is refused by
name; the table needs at least 4 rows (bidirectional) or 2 (one-way), one exact bucket
per sign, and ``max_distance`` must exceed the number of exact buckets.

Relative positions may be any integers of any integer dtype, int64's -2**63 and uint64
values beyond 2**63 included: every distance at or beyond ``max_distance`` shares the
last bucket of its sign, so they are clamped, exactly, before anything can wrap around.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numpy as np

from ._checks import (
    MAX_POSITION,
    _fail,
    check_bool,
    check_cache_type,
    check_count,
    check_fits,
    check_float,
    check_int,
    check_ndim,
    check_positions,
)

OP = "t5_bias"


class T5BiasCache(NamedTuple):
    buckets: np.ndarray  # (Tq, Tk) int64  bucket of each (query, key) pair, (T5.2), (T5.3)
    num_buckets: int  # N, rows of the table
    num_heads: int  # H, columns of the table
    dtype: np.dtype  # of the table, so dtable matches it


def _min_buckets(bidirectional: bool) -> int:
    """The fewest buckets the rule (T5.2), (T5.3) works with: one exact bucket per sign."""
    return 4 if bidirectional else 2


def _check_max_distance(op: str, max_distance: object, num_buckets: int, bidirectional: bool) -> int:
    """max_distance M must exceed the e exact buckets of (T5.3), so that ln(M/e) > 0."""
    n = num_buckets // 2 if bidirectional else num_buckets
    return check_count(op, "max_distance", max_distance, n // 2 + 1, MAX_POSITION)


# |r| beyond this is clamped before the conversion to int64 (it lands in the last bucket either way,
# since max_distance <= MAX_POSITION < _CLAMP): int64's -2**63 has no int64 absolute value, and
# uint64 values from 2**63 on are not int64 values at all.
_CLAMP = 2**62


def _clamped_int64(r: np.ndarray) -> np.ndarray:
    """r as int64, with every |r| > 2**62 brought to +-2**62 in r's own dtype first: no wraparound."""
    info = np.iinfo(r.dtype)
    if info.min < -_CLAMP or info.max > _CLAMP:  # int64, uint64 (smaller types fit as they are)
        r = np.clip(r, max(info.min, -_CLAMP), _CLAMP)
    return r.astype(np.int64)


def t5_relative_bucket(
    relative_position: np.ndarray, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bucket index of each relative position r = key position - query position.

    relative_position: (...) int  ->  buckets: (...) int64 in [0, num_buckets)
    """
    op = "t5_relative_bucket"
    check_int(op, "relative_position", relative_position)
    bidirectional = check_bool(op, "bidirectional", bidirectional)
    N = check_count(op, "num_buckets", num_buckets, _min_buckets(bidirectional), MAX_POSITION)
    max_distance = _check_max_distance(op, max_distance, N, bidirectional)
    n = N // 2 if bidirectional else N  # buckets per sign
    exact = n // 2  # distances 0 .. exact-1 get a bucket each
    r = _clamped_int64(relative_position)  # |r| <= 2**62: -r and |r| are exact in int64

    # (T5.2)  sign and distance
    if bidirectional:
        offset = np.where(r > 0, n, 0)  # keys after the query use the upper half
        a = np.abs(r)
    else:
        offset = np.zeros_like(r)
        a = np.maximum(-r, 0)  # only the past: keys after the query share bucket 0

    # (T5.3)  exact below `exact`, then log-spaced up to max_distance, clamped to n - 1.
    # float32 arithmetic as in the reference implementation; the argument is clipped
    # to >= exact so the logarithm is finite where its value is discarded anyway.
    ratio = np.maximum(a, exact).astype(np.float32) / exact
    log_part = np.log(ratio) / math.log(max_distance / exact) * (n - exact)
    large = np.minimum(exact + log_part.astype(np.int64), n - 1)
    return offset + np.where(a < exact, a, large)


def t5_bias_forward(
    table: np.ndarray,
    Tq: int,
    Tk: int,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    offset: int = 0,
) -> Tuple[np.ndarray, T5BiasCache]:
    """bias[0, h, i, j] = table[bucket(j - (offset + i)), h].

    table: (N, H)  ->  bias: (1, H, Tq, Tk)  (empty when Tq or Tk is 0)
    """
    op = f"{OP}_forward"
    check_float(op, "table", table)
    check_ndim(op, "table", table, 2)
    N, H = table.shape
    bidirectional = check_bool(op, "bidirectional", bidirectional)
    if N < _min_buckets(bidirectional) or H < 1:
        _fail(op, "table", f"shape (N, H) with N >= {_min_buckets(bidirectional)} buckets and H >= 1 heads",
              tuple(table.shape))
    max_distance = _check_max_distance(op, max_distance, N, bidirectional)
    Tq = check_count(op, "Tq", Tq, 0, MAX_POSITION)
    Tk = check_count(op, "Tk", Tk, 0, MAX_POSITION)
    offset = check_count(op, "offset", offset, 0, MAX_POSITION)
    check_positions(op, "offset", offset, Tq)  # the last query's position offset + Tq - 1
    check_fits(op, "Tq" if Tq >= Tk else "Tk", (Tq, Tk, H + 1), 8)  # int64 buckets and the gathered bias
    if Tq == 0 or Tk == 0:  # no pairs: nothing to look up (the other length may be huge)
        buckets = np.zeros((Tq, Tk), np.int64)
        return np.zeros((1, H, Tq, Tk), table.dtype), T5BiasCache(buckets=buckets, num_buckets=N, num_heads=H,
                                                                  dtype=table.dtype)
    query_pos = offset + np.arange(Tq)[:, None]  # (Tq, 1)
    key_pos = np.arange(Tk)[None, :]  # (1, Tk)
    relative = key_pos - query_pos  # (T5.1)  (Tq, Tk)
    buckets = t5_relative_bucket(relative, bidirectional=bidirectional, num_buckets=N, max_distance=max_distance)
    bias = np.ascontiguousarray(table[buckets].transpose(2, 0, 1))[None]  # (T5.4)  (1, H, Tq, Tk)
    return bias, T5BiasCache(buckets=buckets, num_buckets=N, num_heads=H, dtype=table.dtype)


def t5_bias_backward(dbias: np.ndarray, cache: T5BiasCache) -> np.ndarray:
    """Gradient of the table: each bucket collects the gradients of every (i, j) that used it.

    dbias: (1, H, Tq, Tk)  ->  dtable: (N, H)
    """
    op = f"{OP}_backward"
    check_cache_type(op, cache, T5BiasCache)
    buckets, N, H, dtype = cache
    check_float(op, "dbias", dbias)
    Tq, Tk = buckets.shape
    if dbias.shape != (1, H, Tq, Tk):
        _fail(op, "dbias", f"shape {(1, H, Tq, Tk)} (that of the forward's bias)", tuple(dbias.shape))
    if dbias.dtype != dtype:
        _fail(op, "dbias", f"dtype {dtype} (that of the forward's 'table')", dbias.dtype)
    per_pair = dbias[0].reshape(H, Tq * Tk).T  # (Tq*Tk, H)
    dtable = np.zeros((N, H), dtype)
    np.add.at(dtable, buckets.reshape(-1), per_pair)  # (T5.5): unbuffered, pairs sharing a bucket add up
    return dtable


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck t5_bias``: small tables so that buckets repeat."""
    from ..gradcheck import Case

    yield Case("t5_bias bidirectional", t5_bias_forward, t5_bias_backward, {"table": rng.standard_normal((8, 3))},
               wrt=("table",), options={"Tq": 4, "Tk": 9, "max_distance": 6})
    yield Case("t5_bias causal, offset", t5_bias_forward, t5_bias_backward, {"table": rng.standard_normal((6, 2))},
               wrt=("table",), options={"Tq": 3, "Tk": 12, "bidirectional": False, "max_distance": 8, "offset": 9})
