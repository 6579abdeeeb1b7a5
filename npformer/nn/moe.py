"""A mixture-of-experts feed-forward block: a router and E expert MLPs, each token through k of them.

``MoEMLP`` replaces a dense MLP: x (..., D) -> y (..., D). Its N = prod(leading axes) tokens are routed
by ``gate`` (a bias-free Linear D -> E, Mixtral's name) through ``npformer.ops.moe`` (proofs/moe.md):
softmax, top-k, an optional capacity, dispatch to the experts (``experts.0``, ``experts.1``, ...: SwiGLU
MLPs with gate_proj / up_proj / down_proj, which a Mixtral checkpoint calls w1 / w3 / w2, or GELU MLPs),
and the gate-weighted combine. An expert that receives no token runs no forward (and no backward).

Its two auxiliary losses, from the latest forward, are kept as ``aux_loss`` (Switch's load balance,
MOE.11) and ``z_loss`` (MOE.12); ``loss`` = aux_loss_coef * aux_loss + z_loss_coef * z_loss is what the
caller adds to its objective, and ``backward`` adds that term's gradient to the one from ``dy``. A model
that pools the load balance over several layers (as Mixtral does) builds its layers with both
coefficients 0, reads each forward's ``routing``, and hands the pooled loss's gradient with respect to
the router probabilities to ``backward(dy, dprobs)``.

``router_jitter`` > 0 multiplies the input by uniform noise in [1 - jitter, 1 + jitter] in training
(as Switch and Mixtral), drawn from the layer's generator and recorded as ``<path>.jitter``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..ops._checks import check_bool, check_count, check_real
from ..ops.moe import (CombineCache, DispatchCache, LoadBalanceCache, RouterCache, Routing, ZLossCache,
                       load_balancing_loss_backward, load_balancing_loss_forward, moe_combine_backward,
                       moe_combine_forward, moe_dispatch_backward, moe_dispatch_forward, moe_router_backward,
                       moe_router_forward, router_z_loss_backward, router_z_loss_forward)
from .layers import Linear, check_dout, check_features, check_layer_options
from .mlp import MLP, SwiGLUMLP
from .module import Module, ModuleList, atomic


class MoECache(NamedTuple):
    """One forward call of a ``MoEMLP``: the op caches, which experts ran, the jitter noise, the output shape."""

    router: RouterCache
    dispatch: DispatchCache
    combine: CombineCache
    aux: Optional[LoadBalanceCache]  # None when N = 0 (no token, no loss)
    z: Optional[ZLossCache]
    offsets: np.ndarray  # (E + 1,)  expert e's rows of the dispatch are offsets[e]:offsets[e + 1]
    ran: Tuple[int, ...]  # the experts that received at least one token, in the order they ran
    noise: Optional[np.ndarray]  # (N, D)  the jitter, or None
    out_shape: Tuple[int, ...]


class MoEMLP(Module):
    """Top-k mixture of ``n_experts`` MLPs (d_model -> d_hidden -> d_model) with a linear router.

    top_k = 1 with the probability as its weight is Switch; top_k = 2 with the two weights renormalised
    is Mixtral (``normalize_topk`` None, the default, renormalises when k > 1).
    ``capacity_factor`` None routes every assignment; a number drops those beyond each expert's
    capacity C = ceil(capacity_factor N k / E) in token order (MOE.4). That makes the layer non-causal and
    batch-dependent: a token's fate depends on the call's other tokens, later positions and other rows.
    """

    def __init__(self, d_model: int, d_hidden: int, n_experts: int, top_k: int = 2,
                 capacity_factor: Optional[float] = None, expert: str = "swiglu", router_jitter: float = 0.0,
                 aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0, normalize_topk: Optional[bool] = None, *,
                 rng: np.random.Generator, dtype=np.float32, bias: bool = False, proj_std: float = 0.02):
        super().__init__()
        op = "MoEMLP"
        dtype = check_layer_options(op, rng=rng, dtype=dtype, d_model=d_model, d_hidden=d_hidden,
                                    n_experts=n_experts)
        self.top_k = check_count(op, "top_k", top_k, 1, n_experts)
        if capacity_factor is not None:
            capacity_factor = check_real(op, "capacity_factor", capacity_factor, lo=0.0, lo_open=True)
        self.capacity_factor = capacity_factor
        if not isinstance(expert, str) or expert not in ("swiglu", "gelu"):
            raise ValueError(f"{op}: argument 'expert' expected 'swiglu' or 'gelu', got {expert!r}")
        self.expert = expert
        self.router_jitter = check_real(op, "router_jitter", router_jitter, lo=0.0, hi=1.0, hi_open=True)
        self.aux_loss_coef = check_real(op, "aux_loss_coef", aux_loss_coef, lo=0.0)
        self.z_loss_coef = check_real(op, "z_loss_coef", z_loss_coef, lo=0.0)
        # None: renormalise the k weights when k > 1 (Mixtral); k = 1 keeps the probability itself (Switch)
        self.normalize_topk = self.top_k > 1 if normalize_topk is None else check_bool(op, "normalize_topk",
                                                                                        normalize_topk)
        self.rng = rng
        self.gate = Linear(d_model, n_experts, False, rng=rng, dtype=dtype)  # the router
        if expert == "swiglu":
            made = (SwiGLUMLP(d_model, d_hidden, bias, rng=rng, proj_std=proj_std, dtype=dtype)
                    for _ in range(n_experts))
        else:
            made = (MLP(d_model, d_hidden, bias, rng=rng, proj_std=proj_std, dtype=dtype) for _ in range(n_experts))
        self.experts = ModuleList(made)
        self.routing: Optional[Routing] = None  # the latest forward's, for a model that pools the load balance
        self.aux_loss = 0.0  # (MOE.11) of the latest forward
        self.z_loss = 0.0  # (MOE.12) of the latest forward

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def loss(self) -> float:
        """aux_loss_coef * aux_loss + z_loss_coef * z_loss, of the latest forward: the caller adds it to its loss."""
        return self.aux_loss_coef * self.aux_loss + self.z_loss_coef * self.z_loss

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., D) -> y (..., D)."""
        W = self.gate.weight
        check_features("MoEMLP.forward", "x", x, W.shape[1], W.data.dtype)
        D = x.shape[-1]
        xf = x.reshape(-1, D)  # (N, D)
        noise = None
        if self.training and self.router_jitter > 0:
            noise = self.rng.uniform(1.0 - self.router_jitter, 1.0 + self.router_jitter, xf.shape).astype(x.dtype)
            self.record("jitter", noise)
            xf = xf * noise
        logits = self.gate.forward(xf)  # (N, E)
        route, router = moe_router_forward(logits, self.top_k, self.normalize_topk, self.capacity_factor)
        self.record("probs", route.probs)
        xs, dispatch = moe_dispatch_forward(xf, route)  # (S, D)
        ys = np.empty_like(xs)
        ran = []
        for e, expert in enumerate(self.experts):
            lo, hi = route.offsets[e], route.offsets[e + 1]
            if hi > lo:
                ys[lo:hi] = expert.forward(xs[lo:hi])
                ran.append(e)
        y, combine = moe_combine_forward(ys, route.gate, route)  # (N, D), (MOE.5)
        aux_cache = z_cache = None
        self.aux_loss = self.z_loss = 0.0
        if xf.shape[0]:
            aux, aux_cache = load_balancing_loss_forward(route.probs, route.expert)
            z, z_cache = router_z_loss_forward(logits)
            self.aux_loss, self.z_loss = float(aux), float(z)
        self.routing = route
        out = y.reshape(x.shape)
        self.save_cache(MoECache(router=router, dispatch=dispatch, combine=combine, aux=aux_cache, z=z_cache,
                                 offsets=route.offsets, ran=tuple(ran), noise=noise, out_shape=out.shape))
        return out

    @atomic
    def backward(self, dy: np.ndarray, dprobs: Optional[np.ndarray] = None) -> np.ndarray:
        """dy (..., D) -> dx (..., D); ``dprobs`` (N, E): a further gradient with respect to the router
        probabilities (a load balance pooled by the caller), added to that of the layer's own ``loss``."""
        W = self.gate.weight
        check_dout(self, "MoEMLP.backward", "dy", dy, W.shape[1], W.data.dtype)
        cache = self.peek_cache()
        if dprobs is not None:
            check_features("MoEMLP.backward", "dprobs", dprobs, W.shape[0], W.data.dtype)
            n = int(np.prod(cache.out_shape[:-1]))
            if dprobs.shape != (n, W.shape[0]):
                raise ValueError(f"MoEMLP.backward: argument 'dprobs' expected shape {(n, W.shape[0])}, "
                                 f"got {tuple(dprobs.shape)}")
        cache = self.pop_cache()
        dtype = W.data.dtype
        dyf = dy.reshape(-1, dy.shape[-1])  # (N, D)
        dys, dgate = moe_combine_backward(dyf, cache.combine)  # (MOE.10): (MOE.5) differentiated, last step first
        dxs = np.zeros_like(dys)
        for e in reversed(cache.ran):  # reverse order of the forward
            lo, hi = cache.offsets[e], cache.offsets[e + 1]
            dxs[lo:hi] = self.experts[e].backward(dys[lo:hi])
        dxf = moe_dispatch_backward(dxs, cache.dispatch)  # (MOE.8), transposed
        dp = None if dprobs is None else dprobs.copy()
        if cache.aux is not None and self.aux_loss_coef:
            daux = load_balancing_loss_backward(np.asarray(self.aux_loss_coef, dtype), cache.aux)  # (MOE.13)
            dp = daux if dp is None else dp + daux
        dlogits = moe_router_backward(dgate, cache.router, dp)  # (MOE.6) or (MOE.7)
        if cache.z is not None and self.z_loss_coef:
            dlogits += router_z_loss_backward(np.asarray(self.z_loss_coef, dtype), cache.z)  # (MOE.14)
        dxf = dxf + self.gate.backward(dlogits)
        if cache.noise is not None:
            dxf *= cache.noise  # the jitter scaled the input of both the router and the experts
        return dxf.reshape(dy.shape)
