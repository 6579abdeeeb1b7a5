"""Mixture of experts: top-k routing with a capacity, dispatch and combine, and the router's two losses.

Derivation: ``proofs/moe.md``; each line of a backward cites the equation it implements.
Shapes, in the proof's letters: N tokens (any leading axes of the caller flattened into one),
D features, E experts, k experts per token (1 <= k <= E), S <= N k the assignments that are
kept (dispatched), C the capacity of one expert.

Four op pairs and one plan:

``route, cache = moe_router_forward(logits, top_k, normalize_topk=False, capacity_factor=None)``
    probabilities p = softmax(logits) (MOE.1); each token's k experts of largest probability
    (MOE.2; a tie goes to the lowest expert index); gate weights g, the selected probabilities
    (MOE.3a), renormalised to sum to one over the k when ``normalize_topk`` (MOE.3b); each expert
    keeps its first C assignments in token order and drops the rest (MOE.4). ``route`` (a ``Routing``) is
    the plan the other ops follow. ``dlogits = moe_router_backward(dgate, cache, dprobs=None)``
    differentiates through the gate weights (MOE.6, MOE.7) and, optionally, a gradient reaching
    the probabilities directly (a loss on them, MOE.11). The selection itself is piecewise
    constant: it has no gradient.
``xs, cache = moe_dispatch_forward(x, route)``
    the kept assignments' rows of x, grouped by expert (expert e's rows are
    ``xs[route.offsets[e]:route.offsets[e + 1]]``), a gather (MOE.8); its backward a scatter-add.
``y, cache = moe_combine_forward(ys, gate, route)``
    each token's kept expert outputs weighted by their gates and summed; a dropped assignment adds
    nothing, so a token whose every assignment is dropped gets y = 0 (the residual carries it),
    a scatter-add (MOE.9); its backward (MOE.10) gives the gate weights' gradient.
``aux, cache = load_balancing_loss_forward(probs, expert, mask=None)``
    Switch's E * sum_e f_e P_e (MOE.11), over the tokens a ``mask`` keeps when one is given (MOE.15);
    ``router_z_loss_forward(logits)``, the mean squared log-sum-exp (MOE.12). Their backwards (MOE.13),
    (MOE.16), (MOE.14).

A capacity makes routing non-causal and batch-dependent: whether a token is kept depends on how many
earlier tokens of the whole call (every row of a batch, flattened) chose the same expert, and C itself
grows with N. A model routing with a capacity therefore cannot decode with a KV cache (see proofs/moe.md).

Nothing builds a dense (N, E, C) one-hot tensor: dispatch and combine are index arrays,
``np.add.at`` and ``np.bincount``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Optional, Tuple

import numpy as np

from ._checks import (_fail, check_array, check_bool, check_cache_type, check_count, check_float, check_int, check_like,
                      check_ndim, check_real, check_same_dtype_as, check_shape)
from .softmax import SoftmaxCache, softmax_backward, softmax_forward

OP = "moe"


class Routing(NamedTuple):
    """The plan of one routing: which expert each assignment goes to, with which weight, and whether it is kept.

    An assignment is a pair (token n, choice j), j < k. ``token`` and ``choice`` list the kept ones
    grouped by expert (expert 0's first, each group in token order); ``offsets`` (E + 1,) bounds the groups.
    """

    probs: np.ndarray  # (N, E)  router probabilities p, (MOE.1)
    expert: np.ndarray  # (N, k) int64  the selected experts, largest probability first, (MOE.2)
    gate: np.ndarray  # (N, k)  gate weights g, (MOE.3a) or (MOE.3b)
    kept: np.ndarray  # (N, k) bool  assignment within its expert's capacity, (MOE.4)
    position: np.ndarray  # (N, k) int64  the assignment's place in its expert's queue (0, 1, ...)
    capacity: Optional[int]  # C, or None: no assignment is dropped
    token: np.ndarray  # (S,) int64  token of each kept assignment, grouped by expert
    choice: np.ndarray  # (S,) int64  its choice index j
    offsets: np.ndarray  # (E + 1,) int64  expert e's assignments are token[offsets[e]:offsets[e + 1]]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def counts(self) -> np.ndarray:
        """(E,) kept assignments per expert."""
        return np.diff(self.offsets)


class RouterCache(NamedTuple):
    softmax: SoftmaxCache  # p = softmax(logits), (MOE.1)
    expert: np.ndarray  # (N, k)
    gate: np.ndarray  # (N, k)
    normalize_topk: bool  # (MOE.3b) rather than (MOE.3a)


class DispatchCache(NamedTuple):
    token: np.ndarray  # (S,)  rows gathered, (MOE.8)
    x_shape: Tuple[int, int]  # (N, D)
    dtype: np.dtype


class CombineCache(NamedTuple):
    ys: np.ndarray  # (S, D)  expert outputs, (MOE.10) needs them
    g: np.ndarray  # (S,)  gate weight of each kept assignment
    token: np.ndarray  # (S,)
    choice: np.ndarray  # (S,)
    gate_shape: Tuple[int, int]  # (N, k)


class LoadBalanceCache(NamedTuple):
    f: np.ndarray  # (E,)  fraction of tokens selecting each expert, (MOE.11), a constant for the gradient
    shape: Tuple[int, int]  # (N, E)
    dtype: np.dtype
    mask: Optional[np.ndarray] = None  # (N,) bool  the tokens counted, (MOE.15); None: every token


class ZLossCache(NamedTuple):
    lse: np.ndarray  # (N,)  log-sum-exp of each row of logits
    p: np.ndarray  # (N, E)  softmax of the logits (the log-sum-exp's gradient)


# -- helpers -----------------------------------------------------------------------------------------
def _check_scalar_grad(op: str, name: str, d: object, dtype: np.dtype) -> float:
    """An upstream gradient of a scalar loss: a real number or a () array of ``dtype``."""
    if isinstance(d, np.ndarray):
        check_same_dtype_as(op, name, d, dtype, "the forward's input")
        if d.ndim != 0:
            _fail(op, name, "a scalar (shape ())", f"shape {d.shape}")
        d = d.item()
    return check_real(op, name, d)


def ceil_of_decimal_product(factor: float, numerator: int, denominator: int = 1) -> int:
    """ceil(factor * numerator / denominator), computed exactly for the decimal ``factor`` prints as.

    A float product overshoots when the exact value is an integer: 0.55 * 100 is 55.000000000000007 in
    binary floating point, whose ceil is 56. The factor is read as the shortest decimal that rounds to it
    (``repr``, 0.55 -> 11/20) and the product and the ceil are taken in rational arithmetic, so
    ceil(0.55 * 100) = 55 and ceil(1.1 * 50 * 2 / 2) = 55.
    """
    exact = Fraction(repr(float(factor))) * numerator / denominator
    return -((-exact.numerator) // exact.denominator)


def capacity_of(n_tokens: int, top_k: int, n_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """C = ceil(capacity_factor * N * k / E), or None (no capacity) when capacity_factor is None. (MOE.4)

    The product is exact for the decimal the factor prints as (``ceil_of_decimal_product``): a factor 1.1 with
    N k / E = 50 gives C = 55, not the 56 of the float product 55.00000000000001.
    """
    if capacity_factor is None:
        return None
    return ceil_of_decimal_product(capacity_factor, n_tokens * top_k, n_experts)


def top_k_experts(probs: np.ndarray, top_k: int) -> np.ndarray:
    """(N, E) -> (N, k) int64: each row's k largest entries' indices, largest first; ties to the lowest index.

    A stable sort of -p keeps equal entries in index order, so the rule is deterministic. (MOE.2)
    """
    return np.argsort(-probs, axis=1, kind="stable")[:, :top_k].astype(np.int64)


def _queue_positions(expert: np.ndarray, n_experts: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each assignment's place in its expert's queue, in token order; and the (N k,) stable order by expert.

    Flattening (N, k) row-major lists token 0's choices, then token 1's, ...; a stable sort by expert keeps
    that order inside each expert's group, so the place is the index in the sorted list minus the group start.
    """
    flat = expert.reshape(-1)
    order = np.argsort(flat, kind="stable")  # (N k,)
    counts = np.bincount(flat, minlength=n_experts)
    starts = np.cumsum(counts) - counts  # (E,)
    place = np.empty_like(flat)
    place[order] = np.arange(flat.size, dtype=np.int64) - starts[flat[order]]
    return place.reshape(expert.shape), order


# -- the router --------------------------------------------------------------------------------------------
def moe_router_forward(logits: np.ndarray, top_k: int, normalize_topk: bool = False,
                       capacity_factor: Optional[float] = None) -> Tuple[Routing, RouterCache]:
    """Route N tokens to k of E experts each.

    logits: (N, E) float  ->  Routing (probs (N, E), expert/gate/kept/position (N, k), token/choice (S,),
    offsets (E + 1,)). ``capacity_factor`` > 0 or None.
    """
    op = "moe_router_forward"
    check_float(op, "logits", logits)
    check_ndim(op, "logits", logits, 2)
    N, E = logits.shape
    if E == 0:
        _fail(op, "logits", "at least one expert (shape (N, E) with E >= 1)", f"shape {tuple(logits.shape)}")
    if not np.isfinite(logits).all():
        bad = logits[~np.isfinite(logits)].flat[0]
        _fail(op, "logits", "finite router logits", f"a non-finite value {bad}")
    top_k = check_count(op, "top_k", top_k, 1, E)
    normalize_topk = check_bool(op, "normalize_topk", normalize_topk)
    if capacity_factor is not None:
        capacity_factor = check_real(op, "capacity_factor", capacity_factor, lo=0.0, lo_open=True)

    p, sm = softmax_forward(logits, axis=-1)  # (MOE.1)
    expert = top_k_experts(p, top_k)  # (MOE.2)
    selected = np.take_along_axis(p, expert, axis=1)  # (N, k)  p at the selected experts
    if normalize_topk:
        gate = selected / selected.sum(axis=1, keepdims=True)  # (MOE.3b)
    else:
        gate = selected  # (MOE.3a)
    C = capacity_of(N, top_k, E, capacity_factor)
    position, order = _queue_positions(expert, E)
    kept = np.ones(expert.shape, dtype=bool) if C is None else position < C  # (MOE.4)
    order = order[kept.reshape(-1)[order]]  # kept assignments only, still grouped by expert in token order
    token, choice = np.divmod(order, top_k)
    counts = np.bincount(expert.reshape(-1)[order], minlength=E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    route = Routing(probs=p, expert=expert, gate=gate, kept=kept, position=position, capacity=C,
                    token=token.astype(np.int64), choice=choice.astype(np.int64), offsets=offsets)
    return route, RouterCache(softmax=sm, expert=expert, gate=gate.copy(), normalize_topk=normalize_topk)


def moe_router_backward(dgate: np.ndarray, cache: RouterCache, dprobs: Optional[np.ndarray] = None) -> np.ndarray:
    """Gradient with respect to the logits, through the gate weights and (optionally) the probabilities.

    dgate: (N, k), dprobs: (N, E) or None  ->  dlogits: (N, E)
    """
    op = "moe_router_backward"
    check_cache_type(op, cache, RouterCache)
    p = cache.softmax.y
    check_like(op, "dgate", dgate, cache.gate, "gate")
    if dprobs is not None:
        check_like(op, "dprobs", dprobs, p, "probs")
    g, expert = cache.gate, cache.expert
    rows = np.arange(g.shape[0])[:, None]
    if cache.normalize_topk:
        # g is a softmax over the k selected logits alone: its Jacobian restricted to them, (MOE.7)
        dsel = g * (dgate - np.sum(dgate * g, axis=1, keepdims=True))  # (N, k)
        dlogits = np.zeros_like(p)
        dlogits[rows, expert] = dsel  # a token's k experts are distinct: plain assignment
        if dprobs is not None:
            dlogits += softmax_backward(dprobs, cache.softmax)  # (MOE.13) through (SM.3)
        return dlogits
    dp = np.zeros_like(p) if dprobs is None else dprobs.copy()  # (N, E)
    dp[rows, expert] += dgate  # (MOE.6)  g_j = p_{e_j}: the gate's gradient lands on its expert's probability
    return softmax_backward(dp, cache.softmax)  # (MOE.6) through (SM.3)


# -- dispatch and combine ---------------------------------------------------------------------------------
def _check_route(op: str, route: object, n_tokens: Optional[int] = None) -> Routing:
    if not isinstance(route, Routing):
        _fail(op, "route", "a Routing from moe_router_forward", type(route).__name__)
    if n_tokens is not None and route.probs.shape[0] != n_tokens:
        _fail(op, "x", f"{route.probs.shape[0]} rows (the routed tokens)", f"{n_tokens}")
    return route


def moe_dispatch_forward(x: np.ndarray, route: Routing) -> Tuple[np.ndarray, DispatchCache]:
    """Gather each kept assignment's token row, grouped by expert.

    x: (N, D)  ->  xs: (S, D), expert e's rows at offsets[e]:offsets[e + 1]
    """
    op = "moe_dispatch_forward"
    check_float(op, "x", x)
    check_ndim(op, "x", x, 2)
    _check_route(op, route, x.shape[0])
    xs = x[route.token]  # (MOE.8)
    return xs, DispatchCache(token=route.token, x_shape=x.shape, dtype=x.dtype)


def moe_dispatch_backward(dxs: np.ndarray, cache: DispatchCache) -> np.ndarray:
    """dxs: (S, D)  ->  dx: (N, D), the rows scattered back and summed over a token's assignments."""
    op = "moe_dispatch_backward"
    check_cache_type(op, cache, DispatchCache)
    check_same_dtype_as(op, "dxs", dxs, cache.dtype, "x")
    check_shape(op, "dxs", dxs, (cache.token.shape[0], cache.x_shape[1]))
    dx = np.zeros(cache.x_shape, dtype=cache.dtype)
    np.add.at(dx, cache.token, dxs)  # (MOE.8) transposed: each token receives the sum over its kept assignments
    return dx


def moe_combine_forward(ys: np.ndarray, gate: np.ndarray, route: Routing) -> Tuple[np.ndarray, CombineCache]:
    """y_n = sum over token n's kept assignments of g_nj * (expert output); zero for a token with none kept.

    ys: (S, D) expert outputs in the dispatch order, gate: (N, k)  ->  y: (N, D)
    """
    op = "moe_combine_forward"
    _check_route(op, route)
    check_float(op, "ys", ys)
    check_shape(op, "ys", ys, (route.token.shape[0], None))
    check_same_dtype_as(op, "gate", gate, ys.dtype, "ys")
    check_shape(op, "gate", gate, route.expert.shape)
    g = gate[route.token, route.choice]  # (S,)
    y = np.zeros((gate.shape[0], ys.shape[1]), dtype=ys.dtype)
    np.add.at(y, route.token, g[:, None] * ys)  # (MOE.9)
    return y, CombineCache(ys=ys, g=g, token=route.token, choice=route.choice, gate_shape=gate.shape)


def moe_combine_backward(dy: np.ndarray, cache: CombineCache) -> Tuple[np.ndarray, np.ndarray]:
    """dy: (N, D)  ->  dys: (S, D), dgate: (N, k) (zero at a dropped assignment)."""
    op = "moe_combine_backward"
    check_cache_type(op, cache, CombineCache)
    check_same_dtype_as(op, "dy", dy, cache.ys.dtype, "ys")
    check_shape(op, "dy", dy, (cache.gate_shape[0], cache.ys.shape[1]))
    dy_s = dy[cache.token]  # (S, D)  each assignment's token's upstream gradient
    dys = cache.g[:, None] * dy_s  # (MOE.10)
    dgate = np.zeros(cache.gate_shape, dtype=dy.dtype)
    dgate[cache.token, cache.choice] = np.sum(dy_s * cache.ys, axis=1)  # (MOE.10)  pairs (n, j) are distinct
    return dys, dgate


# -- the router's losses ------------------------------------------------------------------------------------
def load_balancing_loss_forward(probs: np.ndarray, expert: np.ndarray,
                                mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, LoadBalanceCache]:
    """aux = E * sum_e f_e P_e, f_e = (selections of e) / N, P_e = mean_n p_ne (Switch; k selections a token).

    probs: (N, E), expert: (N, k) int in [0, E), mask: (N,) bool or None  ->  aux: a 0-d array of probs' dtype.
    With a ``mask``, f and P are means over the M kept tokens alone (MOE.15): a masked token (padding, an
    ignored target) counts nowhere. N = 0, or M = 0, gives 0.
    The selections are counted before any capacity drops them (the router's choice, not the dispatch).
    """
    op = "load_balancing_loss_forward"
    check_float(op, "probs", probs)
    check_ndim(op, "probs", probs, 2)
    check_int(op, "expert", expert)
    check_ndim(op, "expert", expert, 2)
    N, E = probs.shape
    if expert.shape[0] != N:
        _fail(op, "expert", f"{N} rows (as 'probs')", f"shape {tuple(expert.shape)}")
    if expert.size and (expert.min() < 0 or expert.max() >= E):
        _fail(op, "expert", f"indices in [0, {E})", f"values in [{expert.min()}, {expert.max()}]")
    if mask is not None:
        check_array(op, "mask", mask)  # a plain ndarray (no subclass)
        if mask.dtype != np.bool_:
            _fail(op, "mask", "a bool ndarray or None", mask.dtype)
        check_shape(op, "mask", mask, (N,))
    M = N if mask is None else int(mask.sum())  # the tokens counted
    if M == 0:
        return np.zeros((), probs.dtype), LoadBalanceCache(f=np.zeros(E, probs.dtype), shape=(N, E),
                                                           dtype=probs.dtype, mask=mask)
    if mask is None:
        f = (np.bincount(expert.reshape(-1), minlength=E) / N).astype(probs.dtype)  # (E,)  sums to k
        P = probs.mean(axis=0)  # (E,)
        aux = np.asarray(E * np.dot(f, P), dtype=probs.dtype)  # (MOE.11)
    else:
        f = (np.bincount(expert[mask].reshape(-1), minlength=E) / M).astype(probs.dtype)  # (E,)  (MOE.15)
        P = probs[mask].sum(axis=0) / M  # (E,)  (MOE.15)
        aux = np.asarray(E * np.dot(f, P), dtype=probs.dtype)  # (MOE.15)
    return aux, LoadBalanceCache(f=f, shape=(N, E), dtype=probs.dtype, mask=mask)


def load_balancing_loss_backward(daux: np.ndarray, cache: LoadBalanceCache) -> np.ndarray:
    """daux: a real number or a () array  ->  dprobs: (N, E), E f_e / M in every kept row (f held constant),
    0 in a masked one."""
    op = "load_balancing_loss_backward"
    check_cache_type(op, cache, LoadBalanceCache)
    daux = _check_scalar_grad(op, "daux", daux, cache.dtype)
    N, E = cache.shape
    if cache.mask is None:
        row = (daux * E / max(N, 1)) * cache.f  # (MOE.13)
        return np.broadcast_to(row, (N, E)).astype(cache.dtype, copy=True)
    M = int(cache.mask.sum())
    row = (daux * E / max(M, 1)) * cache.f  # (MOE.16)
    return (cache.mask[:, None] * row).astype(cache.dtype, copy=False)  # (MOE.16)  0 in a masked row


def router_z_loss_forward(logits: np.ndarray) -> Tuple[np.ndarray, ZLossCache]:
    """z = mean_n (log sum_e exp logits_ne)^2.  logits: (N, E), N >= 1, E >= 1  ->  a 0-d array."""
    op = "router_z_loss_forward"
    check_float(op, "logits", logits)
    check_ndim(op, "logits", logits, 2)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        _fail(op, "logits", "shape (N, E) with N, E >= 1", f"shape {tuple(logits.shape)}")
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    lse = (m + np.log(s))[:, 0]  # (N,)
    z = np.asarray(np.mean(lse * lse), dtype=logits.dtype)  # (MOE.12)
    return z, ZLossCache(lse=lse, p=e / s)


def router_z_loss_backward(dz: np.ndarray, cache: ZLossCache) -> np.ndarray:
    """dz: a real number or a () array  ->  dlogits: (N, E) = dz * 2 lse_n / N * softmax(logits_n)."""
    op = "router_z_loss_backward"
    check_cache_type(op, cache, ZLossCache)
    dz = _check_scalar_grad(op, "dz", dz, cache.p.dtype)
    N = cache.lse.shape[0]
    return ((dz * 2.0 / N) * cache.lse[:, None] * cache.p).astype(cache.p.dtype, copy=False)  # (MOE.14)


def gradcheck_cases(rng: np.random.Generator):
    """Inputs for ``python -m npformer.gradcheck moe``: the router through its gate weights, both forms."""
    from ..gradcheck import Case

    logits = {"logits": 2.0 * rng.standard_normal((7, 4))}

    def gates(logits, top_k, normalize_topk):
        route, cache = moe_router_forward(logits, top_k, normalize_topk)
        return route.gate, cache

    gates.__name__ = gates.__qualname__ = "moe_router_forward"  # the router itself, its gate weights as output

    yield Case("moe router (k=2)", gates, moe_router_backward, logits, wrt=("logits",),
               options={"top_k": 2, "normalize_topk": False})
    yield Case("moe router (k=2, renormalised)", gates, moe_router_backward, logits, wrt=("logits",),
               options={"top_k": 2, "normalize_topk": True})
    yield Case("router z-loss", router_z_loss_forward, router_z_loss_backward, logits, wrt=("logits",))
    # dispatch and combine along a fixed routing (capacity 1: some assignments dropped), the balance loss
    route, _ = moe_router_forward(2.0 * rng.standard_normal((7, 4)), 2, True, capacity_factor=1.0)
    S = int(route.token.shape[0])
    yield Case("moe dispatch", moe_dispatch_forward, moe_dispatch_backward, {"x": rng.standard_normal((7, 5))},
               wrt=("x",), options={"route": route})
    yield Case("moe combine", moe_combine_forward, moe_combine_backward,
               {"ys": rng.standard_normal((S, 5)), "gate": rng.random((7, 2))}, wrt=("ys", "gate"),
               options={"route": route})
    probs = rng.random((7, 4))
    yield Case("load-balancing loss", load_balancing_loss_forward, load_balancing_loss_backward,
               {"probs": probs / probs.sum(-1, keepdims=True)}, wrt=("probs",),
               options={"expert": route.expert, "mask": np.array([True, True, False, True, True, True, False])})
