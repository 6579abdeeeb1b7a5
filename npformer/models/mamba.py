"""Mamba: token embeddings, pre-RMSNorm blocks of a selective state-space mixer, a tied (or own) head.

No attention and no positions: each block's mixer reads the sequence through a short causal
convolution and a selective scan whose step Delta, input matrix B and output matrix C depend on
the token (``proofs/mamba.md``). Read it beside ``llama.py``: ``forward`` runs the layers in
order, ``backward`` walks them in reverse, one line per layer. One mixer, with E = expand *
d_model channels, N states per channel and R = dt_rank:

    xz = in_proj(x)                      (B, L, 2E) -> xs = xz[..., :E], z = xz[..., E:]
    u = silu(conv1d(xs))                 causal depthwise convolution of K taps (MAMBA.17)
    dt_in, Bm, C = split(x_proj(u))      (B, L, R), (B, L, N), (B, L, N)
    delta = softplus(dt_proj(dt_in))     (B, L, E)
    A = -exp(A_log)                      (E, N), (MAMBA.12)
    y = selective_scan(u, delta, A, Bm, C, D)   (MAMBA.1) - (MAMBA.4)
    out = out_proj(y * silu(z))

Parameter names follow Hugging Face's ``MambaForCausalLM`` without its ``backbone.`` prefix:
``embeddings.weight``, ``layers.{i}.norm.weight``, ``layers.{i}.mixer.{in_proj, x_proj, dt_proj,
out_proj}.weight`` (and ``dt_proj.bias``; ``in_proj.bias``, ``out_proj.bias`` with ``use_bias``),
``layers.{i}.mixer.conv1d.weight`` (E, 1, K) as torch's Conv1d keeps it (and ``conv1d.bias`` with
``use_conv_bias``), ``layers.{i}.mixer.A_log``, ``layers.{i}.mixer.D``, ``norm_f.weight``,
``lm_head.weight`` (absent when tied).

Incremental decoding: ``make_kv_caches`` gives one ``MambaStateCache`` per layer, the last K - 1
inputs of its convolution and its scan's state h_L (B, E, N). A forward given the caches
continues the sequence they hold, at a cost per token that does not grow with its length, and
gives the logits the whole sequence would give. The caches move only when the whole forward
succeeded. ``block_size`` is the longest sequence the model is used on (the trainer's window
and ``generate``'s crop): nothing in the model depends on it. A model that should never crop its
context (a recurrence has no limit; Hugging Face folders without ``max_position_embeddings`` load so)
takes ``block_size = MAX_POSITION`` (``npformer.ops._checks``), the largest position npformer computes
exactly; its decoding state stays O(1) in the length.

Shapes: ids (B, T) int, logits (B, T, V), hidden (B, T, D) with D = d_model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.layers import Embedding, Linear, RMSNorm, check_dout, check_features, check_layer_options
from ..nn.lm import IGNORE_INDEX, check_kv_length  # noqa: F401  (IGNORE_INDEX: the ignored target)
from ..nn.module import Module, ModuleList, Parameter, atomic
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_float, check_int, check_ndim, check_real
from ..ops._checks import check_fits, check_shape
from ..ops.activations import SiluCache, SwigluCache, _sigmoid, _softplus, silu_backward, silu_forward
from ..ops.activations import swiglu_backward, swiglu_forward
from ..ops.causal_conv1d import CausalConv1dCache, causal_conv1d_backward, causal_conv1d_forward
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.linear import LinearCache, linear_backward, linear_forward
from ..ops.selective_scan import SelectiveScanCache, selective_scan_backward, selective_scan_forward

# The initial step Delta of every channel is drawn log-uniformly in [DT_MIN, DT_MAX] (at least DT_FLOOR),
# and dt_proj's bias is set to its softplus inverse, as Mamba initialises it.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


@dataclass
class MambaConfig:
    """A Mamba model's shape; Hugging Face's field name, where it differs, in the comment.

    ``dt_rank`` may be left None: the config keeps None and the model reads ``resolved_dt_rank``,
    ceil(d_model / 16) (Hugging Face's "auto").
    """

    vocab_size: int = 65
    block_size: int = 256  # the longest sequence the model is used on (the recurrence itself has no limit)
    n_layer: int = 4  # num_hidden_layers
    d_model: int = 64  # hidden_size
    d_state: int = 16  # state_size: N
    expand: int = 2  # intermediate_size E = expand * d_model
    d_conv: int = 4  # conv_kernel: K
    dt_rank: Optional[int] = None  # time_step_rank: R (None: ceil(d_model / 16))
    layer_norm_epsilon: float = 1e-5
    use_bias: bool = False  # biases of in_proj and out_proj
    use_conv_bias: bool = True
    tie_word_embeddings: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "MambaConfig"
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "d_state", "expand", "d_conv"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.dt_rank is not None:
            self.dt_rank = check_count(op, "dt_rank", self.dt_rank, 1, MAX_POSITION)
        self.layer_norm_epsilon = check_real(op, "layer_norm_epsilon", self.layer_norm_epsilon, lo=0.0)
        for name in ("use_bias", "use_conv_bias", "tie_word_embeddings"):
            setattr(self, name, check_bool(op, name, getattr(self, name)))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    @property
    def d_inner(self) -> int:
        """E: the mixer's channels, expand * d_model (Hugging Face's intermediate_size)."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """R: ``dt_rank``, or ceil(d_model / 16) when it is None."""
        return self.dt_rank if self.dt_rank is not None else -(-self.d_model // 16)

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), matrix products and the scan.

        Per layer, with D = d_model, E channels, N states, R = dt_rank and K taps: weight
        multiply-adds 2 D E (in_proj) + E (R + 2N) (x_proj) + R E (dt_proj) + E D (out_proj),
        K E (convolution), and 3 E N for the scan (the state update and the readout); the head
        adds V D. The norms and the activations are left out. No term grows with the length.
        """
        c = self
        E, N, R = c.d_inner, c.d_state, c.resolved_dt_rank
        per_layer = 3 * c.d_model * E + E * (R + 2 * N) + R * E + c.d_conv * E + 3 * E * N
        return 3 * 2 * (c.n_layer * per_layer + c.vocab_size * c.d_model)


class MambaStateCache:
    """What one layer carries from one forward to the next in incremental decoding.

    conv (B, K - 1, E): the convolution's last K - 1 inputs; ssm (B, E, N): the scan's state
    h after the last position; ``length``: the positions seen so far (at most ``max_len``).
    """

    def __init__(self, batch: int, d_inner: int, d_state: int, d_conv: int, max_len: int, dtype=np.float32):
        dtype = check_layer_options("MambaStateCache", dtype=dtype, batch=batch, d_inner=d_inner,
                                    d_state=d_state, d_conv=d_conv, max_len=max_len)
        check_fits("MambaStateCache", "batch", (batch, d_inner, d_state + d_conv), dtype.itemsize)
        self.conv = np.zeros((batch, d_conv - 1, d_inner), dtype)
        self.ssm = np.zeros((batch, d_inner, d_state), dtype)
        self.max_len = max_len
        self.length = 0

    def __repr__(self) -> str:
        return (f"MambaStateCache(batch={self.ssm.shape[0]}, length={self.length}, max_len={self.max_len}, "
                f"dtype={self.ssm.dtype})")


class LayerState(NamedTuple):
    """The state one mixer call starts from (or ends in): conv (B, K - 1, E), ssm (B, E, N)."""

    conv: np.ndarray
    ssm: np.ndarray


class MixerCache(NamedTuple):
    """One training forward of a ``MambaMixer``: the op caches between its linear layers."""

    conv: CausalConv1dCache  # conv1d of xs, (MAMBA.17)
    act: SiluCache  # u = silu(conv1d(xs))
    dt: np.ndarray  # (B, L, E) dt_proj's output, the input of softplus
    A: np.ndarray  # (E, N) -exp(A_log), (MAMBA.12)
    scan: SelectiveScanCache  # (MAMBA.1) - (MAMBA.4)
    gate: SwigluCache  # y * silu(z)
    out_shape: Tuple[int, ...]


class CausalConv1d(Module):
    """Depthwise causal convolution with torch's Conv1d layout: weight (E, 1, K), bias (E,)."""

    def __init__(self, channels: int, kernel: int, bias: bool = True, *, rng: np.random.Generator,
                 dtype=np.float32):
        super().__init__()
        dtype = check_layer_options("CausalConv1d", rng=rng, dtype=dtype, channels=channels, kernel=kernel)
        check_bool("CausalConv1d", "bias", bias)
        bound = 1.0 / math.sqrt(kernel)  # torch's Conv1d default: fan_in = K for a depthwise filter
        self.weight = Parameter(rng.uniform(-bound, bound, (channels, 1, kernel)).astype(dtype))
        self.bias = Parameter(rng.uniform(-bound, bound, channels).astype(dtype)) if bias else None


class MambaMixer(Module):
    """The selective state-space mixer of one block (the module docstring's seven lines)."""

    def __init__(self, cfg: MambaConfig, rng: np.random.Generator):
        super().__init__()
        dtype = np.dtype(cfg.dtype)
        D, E, N, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        self.in_proj = Linear(D, 2 * E, cfg.use_bias, rng=rng, dtype=dtype)
        self.conv1d = CausalConv1d(E, cfg.d_conv, cfg.use_conv_bias, rng=rng, dtype=dtype)
        self.x_proj = Linear(E, R + 2 * N, False, rng=rng, dtype=dtype)
        self.dt_proj = Linear(R, E, True, rng=rng, dtype=dtype)
        dt_std = R ** -0.5
        self.dt_proj.weight.data[...] = rng.uniform(-dt_std, dt_std, (E, R))
        dt = np.exp(rng.uniform(math.log(DT_MIN), math.log(DT_MAX), E)).clip(min=DT_FLOOR)
        self.dt_proj.bias.data[...] = dt + np.log(-np.expm1(-dt))  # softplus(bias) = dt
        self.A_log = Parameter(np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (E, 1))).astype(dtype))
        self.D = Parameter(np.ones(E, dtype))
        self.out_proj = Linear(E, D, cfg.use_bias, rng=rng, dtype=dtype)
        self.d_inner, self.d_state, self.dt_rank = E, N, R

    @atomic
    def forward(self, x: np.ndarray, state: Optional[LayerState] = None) -> Tuple[np.ndarray, LayerState]:
        """x (B, L, D) -> out (B, L, D) and the state after the last position; ``state``: the one before the first."""
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        conv_w = self.conv1d.weight.data[:, 0, :]  # (E, K)
        conv_b = None if self.conv1d.bias is None else self.conv1d.bias.data
        xz = self.in_proj.forward(x)  # (B, L, 2E)
        xs, z = xz[..., :E], xz[..., E:]
        c, conv_cache = causal_conv1d_forward(xs, conv_w, conv_b, None if state is None else state.conv)  # (MAMBA.17)
        u, act_cache = silu_forward(c)  # (ACT.11)
        dbc = self.x_proj.forward(u)  # (B, L, R + 2N)
        dt_in, Bm, C = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
        dt = self.dt_proj.forward(dt_in)  # (B, L, E)
        delta = _softplus(dt)  # (ACT.13)
        A = -np.exp(self.A_log.data)  # (MAMBA.12)
        y, scan_cache = selective_scan_forward(u, delta, A, Bm, C, self.D.data,
                                               None if state is None else state.ssm)  # (MAMBA.4)
        g, gate_cache = swiglu_forward(z, y)  # y * silu(z), (ACT.16)
        out = self.out_proj.forward(g)
        self.record("delta", delta)
        self.record("y", y)
        self.save_cache(MixerCache(conv=conv_cache, act=act_cache, dt=dt, A=A, scan=scan_cache, gate=gate_cache,
                                   out_shape=out.shape))
        K = conv_w.shape[1]
        new_state = LayerState(conv=conv_cache.xp[:, conv_cache.xp.shape[1] - (K - 1):], ssm=scan_cache.h[:, -1])
        return out, new_state

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, L, D) -> dx (B, L, D): the forward's lines in reverse."""
        check_dout(self, "MambaMixer.backward", "dout", dout, self.out_proj.weight.shape[0],
                   self.out_proj.weight.data.dtype)
        cache = self.pop_cache()
        dg = self.out_proj.backward(dout)
        dz, dy = swiglu_backward(dg, cache.gate)  # (ACT.17), (ACT.18)
        du_scan, ddelta, dA, dBm, dC, dD, _ = selective_scan_backward(dy, cache.scan)  # (MAMBA.5) - (MAMBA.10)
        self.D.grad += dD
        dA_log = dA * cache.A  # (MAMBA.12)  dA/dA_log = -exp(A_log) = A
        self.A_log.grad += dA_log
        ddt = ddelta * _sigmoid(cache.dt)  # (ACT.13)  softplus' = sigmoid
        ddt_in = self.dt_proj.backward(ddt)
        ddbc = np.concatenate([ddt_in, dBm, dC], axis=-1)
        du = self.x_proj.backward(ddbc) + du_scan  # u feeds x_proj and the scan
        dc = silu_backward(du, cache.act)  # (ACT.12)
        dxs, dw, db = causal_conv1d_backward(dc, cache.conv)  # (MAMBA.18) - (MAMBA.20)
        self.conv1d.weight.grad[:, 0, :] += dw
        if db is not None:
            self.conv1d.bias.grad += db
        dxz = np.concatenate([dxs, dz], axis=-1)
        dx = self.in_proj.backward(dxz)
        self.record("dA_log", dA_log)
        self.record("dx", dx)
        return dx


class BlockCache(NamedTuple):
    """One forward call of a ``MambaBlock``: the shape its dout must have (the sublayers keep the rest)."""

    out_shape: Tuple[int, ...]


class MambaBlock(Module):
    """out = x + mixer(norm(x))."""

    def __init__(self, cfg: MambaConfig, rng: np.random.Generator):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=np.dtype(cfg.dtype))
        self.mixer = MambaMixer(cfg, rng)

    @atomic
    def forward(self, x: np.ndarray, state: Optional[LayerState] = None) -> Tuple[np.ndarray, LayerState]:
        """x (B, L, D) -> (B, L, D) and the mixer's state after the last position."""
        op, norm = "MambaBlock.forward", self.norm.weight
        check_float(op, "x", x)
        check_ndim(op, "x", x, 3)
        check_features(op, "x", x, norm.shape[0], norm.data.dtype)
        m, new_state = self.mixer.forward(self.norm.forward(x), state)
        out = x + m
        self.save_cache(BlockCache(out_shape=out.shape))
        self.record("out", out)
        return out, new_state

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, L, D) -> dx (B, L, D): the residual's identity path plus the mixer's."""
        norm = self.norm.weight
        check_dout(self, "MambaBlock.backward", "dout", dout, norm.shape[0], norm.data.dtype)
        self.pop_cache()
        dx = dout + self.norm.backward(self.mixer.backward(dout))
        self.record("dx", dx)
        return dx


class MambaLMCache(NamedTuple):
    """One training forward of ``MambaLM``: the tied head's op cache (None when untied) and the loss's."""

    tied_head: Optional[LinearCache]
    loss: Optional[CrossEntropyCache]


class MambaLM(Module):
    """embeddings -> layers -> norm_f -> lm_head (or embeddings^T when tied); ``forward``/``backward`` as Llama's."""

    def __init__(self, cfg: MambaConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, MambaConfig):
            raise TypeError(f"MambaLM: argument 'cfg' expected a MambaConfig, got {type(cfg).__name__}")
        check_count("MambaLM", "seed", seed, 0)
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)
        dtype = np.dtype(cfg.dtype)
        self.embeddings = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        self.layers = ModuleList(MambaBlock(cfg, rng) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, False, rng=rng, dtype=dtype)

    def _check_inputs(self, op: str, ids, targets, kv_caches) -> None:
        cfg = self.cfg
        check_int(op, "ids", ids)
        check_ndim(op, "ids", ids, 2)
        Bsz, T = ids.shape
        if Bsz < 1 or T < 1:
            raise ValueError(f"{op}: argument 'ids' expected shape (B, T) with B >= 1 and T >= 1, got {ids.shape}")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"{op}: argument 'ids' expected values in [0, {cfg.vocab_size}), "
                             f"got values in [{ids.min()}, {ids.max()}]")
        if targets is not None:
            check_int(op, "targets", targets)
            check_shape(op, "targets", targets, ids.shape)
            bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= cfg.vocab_size))
            if bad.any():
                raise ValueError(f"{op}: argument 'targets' expected values in [0, {cfg.vocab_size}) or "
                                 f"{IGNORE_INDEX} (ignored), got {targets[bad].flat[0]}")
        start = 0
        if kv_caches is not None:
            if targets is not None or self.training:
                raise ValueError(f"{op}: argument 'kv_caches' is for inference: call .eval() first and pass no targets")
            if not isinstance(kv_caches, (list, tuple)) or len(kv_caches) != cfg.n_layer or \
                    not all(isinstance(c, MambaStateCache) for c in kv_caches):
                raise TypeError(f"{op}: argument 'kv_caches' expected a list of {cfg.n_layer} MambaStateCache "
                                f"(make_kv_caches), got {type(kv_caches).__name__}"
                                f"{'' if not isinstance(kv_caches, (list, tuple)) else f' of {len(kv_caches)}'}")
            if len({id(c) for c in kv_caches}) != len(kv_caches):
                raise ValueError(f"{op}: argument 'kv_caches' expected one distinct MambaStateCache per layer, "
                                 "got the same cache for two layers")
            want = (Bsz, cfg.d_conv - 1, cfg.d_inner, cfg.d_state, np.dtype(cfg.dtype))
            for i, c in enumerate(kv_caches):
                got = (c.ssm.shape[0], c.conv.shape[1], c.ssm.shape[1], c.ssm.shape[2], c.ssm.dtype)
                if got != want:
                    raise ValueError(f"{op}: argument 'kv_caches' entry {i} expected (batch, d_conv - 1, d_inner, "
                                     f"d_state, dtype) = {want}, got {got} (use make_kv_caches)")
            lengths = {c.length for c in kv_caches}
            if len(lengths) != 1:
                raise ValueError(f"{op}: argument 'kv_caches' expected caches of one length, got lengths "
                                 f"{sorted(lengths)}")
            start = lengths.pop()
            if start + T > kv_caches[0].max_len:
                raise ValueError(f"{op}: argument 'ids' expected at most {kv_caches[0].max_len - start} positions "
                                 f"(the caches hold {kv_caches[0].max_len}, {start} used), got {T}")

    # ------------------------------------------------------------------------------------
    @atomic
    def forward(self, ids: np.ndarray, targets: Optional[np.ndarray] = None,
                kv_caches: Optional[List[MambaStateCache]] = None, *,
                prefix_len: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T) -> logits (B, T, V) and the mean cross entropy if targets (B, T) are given.

        ids are integers in [0, vocab_size); targets are in [0, vocab_size) or -100 (ignored).
        With ``kv_caches`` (one per layer, eval mode), ids continue the sequence the caches
        hold. In training mode each forward keeps its caches for one ``backward()``. A
        recurrent model has no prefix LM: ``prefix_len`` must be None.
        """
        cfg = self.cfg
        op = "MambaLM.forward"
        if prefix_len is not None:
            raise ValueError(f"{op}: argument 'prefix_len' expected None (a recurrent model reads its input in "
                             "one direction only; there is no prefix LM), got an array")
        self._check_inputs(op, ids, targets, kv_caches)
        x = self.embeddings.forward(ids)  # (B, T, D)
        states = []
        for i, layer in enumerate(self.layers):
            c = None if kv_caches is None else kv_caches[i]
            # (MAMBA.21): continuing from the cached conv inputs and scan state is running the whole sequence
            x, state = layer.forward(x, None if c is None else LayerState(conv=c.conv, ssm=c.ssm))
            states.append(state)
        h = self.norm_f.forward(x)
        if cfg.tie_word_embeddings:
            logits, tied_head = linear_forward(h, self.embeddings.weight.data)  # (B, T, V)
        else:
            logits, tied_head = self.lm_head.forward(h), None
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(logits, targets)
        self.save_cache(MambaLMCache(tied_head=tied_head, loss=loss_cache))
        if kv_caches is not None:  # everything succeeded: the caches move on together
            for c, state in zip(kv_caches, states):
                c.conv, c.ssm = state.conv.copy(), state.ssm.copy()
                c.length += ids.shape[1]
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse."""
        if self.peek_cache().loss is None:
            raise RuntimeError("MambaLM.backward: the matching forward had no targets, so there is no loss to "
                               "differentiate")
        cache = self.pop_cache()
        dtype = self.norm_f.weight.data.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache.loss)
        self.record("dlogits", dlogits)
        if cache.tied_head is not None:
            dh, dW_head, _ = linear_backward(dlogits, cache.tied_head)
            self.embeddings.weight.grad += dW_head  # tied: the head's gradient joins the embedding's
        else:
            dh = self.lm_head.backward(dlogits)
        dx = self.norm_f.backward(dh)
        for layer in reversed(self.layers):
            dx = layer.backward(dx)
        self.embeddings.backward(dx)

    def astype(self, dtype) -> "MambaLM":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.embeddings.weight.data.dtype.name)
        return self

    def make_kv_caches(self, batch: int, max_len: Optional[int] = None) -> List[MambaStateCache]:
        """One MambaStateCache per layer for ``max_len`` positions (default and at most block_size)."""
        max_len = check_kv_length("MambaLM.make_kv_caches", max_len, self.cfg.block_size)
        cfg = self.cfg
        return [MambaStateCache(batch, cfg.d_inner, cfg.d_state, cfg.d_conv, max_len, np.dtype(cfg.dtype))
                for _ in range(cfg.n_layer)]
