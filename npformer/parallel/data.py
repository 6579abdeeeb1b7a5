"""Data parallelism and ZeRO stages 1-3, simulated exactly on N ranks in one process.

Every rank is a Python object (a GPT replica, its optimizer, its shards); a collective
is a function from the list of the N ranks' arrays to the list of what each rank holds
afterwards, so the arithmetic is that of a real run and can be compared with a single
device to round-off (proofs/parallelism_data.md).

Shapes: ids, targets (B, T), split along B into N micro-batches; a model's parameters
flattened in ``named_parameters`` order form the vector of length P; rank r's shard is
``flat[lo_r:hi_r]`` with the bounds of ``shard_bounds(P, N)``.

Each collective adds to a ``Traffic`` record the bytes one rank sends in a ring
implementation (PAR.4): all-reduce 2 (N-1)/N S, reduce-scatter and all-gather (N-1)/N S,
S the bytes of the full vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..models.gpt import GPT
from ..nn.lm import IGNORE_INDEX
from ..nn.module import Parameter
from ..ops._checks import check_count
from ..optim.optimizer import AdamW

STAGES = (0, 1, 2, 3)
OPS = ("sum", "mean")


@dataclass
class Traffic:
    """Bytes one rank sends, per collective kind, summed over calls (ring algorithms, PAR.4)."""

    all_reduce: float = 0.0
    reduce_scatter: float = 0.0
    all_gather: float = 0.0
    calls: Dict[str, int] = field(default_factory=lambda: {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0})

    @property
    def total(self) -> float:
        return self.all_reduce + self.reduce_scatter + self.all_gather

    def add(self, kind: str, nbytes: float) -> None:
        setattr(self, kind, getattr(self, kind) + nbytes)
        self.calls[kind] += 1


# -- checks ---------------------------------------------------------------------------------
def _check_ranks(func: str, name: str, arrays: object, same_shape: bool = True) -> List[np.ndarray]:
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{func}: argument '{name}' expected a list of per-rank arrays, got {type(arrays).__name__}")
    if not arrays:
        raise ValueError(f"{func}: argument '{name}' expected at least one rank, got an empty list")
    for r, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{func}: argument '{name}' expected numpy arrays, got {type(a).__name__} at rank {r}")
        if a.dtype.kind != "f":
            raise ValueError(f"{func}: argument '{name}' expected float arrays, got {a.dtype} at rank {r}")
        if a.dtype != arrays[0].dtype:
            raise ValueError(f"{func}: argument '{name}' expected one dtype on every rank, got {arrays[0].dtype} "
                             f"at rank 0 and {a.dtype} at rank {r}")
        if same_shape and a.shape != arrays[0].shape:
            raise ValueError(f"{func}: argument '{name}' expected one shape on every rank, got {arrays[0].shape} "
                             f"at rank 0 and {a.shape} at rank {r}")
    return list(arrays)


def _check_op(func: str, op: object) -> str:
    if op not in OPS:
        raise ValueError(f"{func}: argument 'op' expected one of {list(OPS)}, got {op!r:.40}")
    return op


def _check_traffic(func: str, traffic: object) -> Optional[Traffic]:
    if traffic is not None and not isinstance(traffic, Traffic):
        raise TypeError(f"{func}: argument 'traffic' expected a Traffic or None, got {type(traffic).__name__}")
    return traffic


MAX_RANKS = 2**20  # a bound on N, so a mistaken huge count fails instead of allocating N shards


def _check_int(func: str, name: str, n: object, lo: int) -> int:
    return check_count(func, name, n, lo, MAX_RANKS if name == "N" else None)


def shard_bounds(size: int, N: int) -> List[Tuple[int, int]]:
    """Rank r's half-open range [lo_r, hi_r) of a vector of ``size`` entries: N contiguous parts,
    the first ``size % N`` one entry longer (PAR.5)."""
    size = _check_int("shard_bounds", "size", size, 0)
    N = _check_int("shard_bounds", "N", N, 1)
    q, extra = divmod(size, N)
    bounds, lo = [], 0
    for r in range(N):
        hi = lo + q + (r < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


# -- collectives ----------------------------------------------------------------------------
def _reduce(arrays: List[np.ndarray], op: str) -> np.ndarray:
    total = arrays[0].astype(arrays[0].dtype, copy=True)
    for a in arrays[1:]:  # rank order: the same sum on every rank
        total += a
    if op == "mean":
        total /= total.dtype.type(len(arrays))
    return total


def all_reduce(arrays: Sequence[np.ndarray], op: str = "sum", traffic: Optional[Traffic] = None) -> List[np.ndarray]:
    """Every rank receives the sum (or mean) of all ranks' arrays, each its own copy (PAR.3).

    Ring cost per rank: 2 (N-1)/N S bytes, S = the array's bytes (PAR.4).
    """
    arrays = _check_ranks("all_reduce", "arrays", arrays)
    op = _check_op("all_reduce", op)
    traffic = _check_traffic("all_reduce", traffic)
    N, total = len(arrays), _reduce(arrays, op)
    if traffic is not None:
        traffic.add("all_reduce", 2 * (N - 1) / N * total.nbytes)  # (PAR.4)
    return [total.copy() for _ in range(N)]


def reduce_scatter(arrays: Sequence[np.ndarray], op: str = "sum",
                   traffic: Optional[Traffic] = None) -> List[np.ndarray]:
    """Rank r receives shard r (``shard_bounds``) of the flattened sum (or mean) of all ranks' arrays (PAR.3).

    Ring cost per rank: (N-1)/N S bytes (PAR.4).
    """
    arrays = _check_ranks("reduce_scatter", "arrays", arrays)
    op = _check_op("reduce_scatter", op)
    traffic = _check_traffic("reduce_scatter", traffic)
    N, total = len(arrays), _reduce(arrays, op).reshape(-1)
    if traffic is not None:
        traffic.add("reduce_scatter", (N - 1) / N * total.nbytes)  # (PAR.4)
    return [total[lo:hi].copy() for lo, hi in shard_bounds(total.size, N)]


def all_gather(shards: Sequence[np.ndarray], traffic: Optional[Traffic] = None) -> List[np.ndarray]:
    """Every rank receives the concatenation of the ranks' 1-d shards, in rank order (PAR.3).

    Ring cost per rank: (N-1)/N S bytes, S = the full vector's bytes (PAR.4).
    """
    shards = _check_ranks("all_gather", "shards", shards, same_shape=False)
    traffic = _check_traffic("all_gather", traffic)
    for r, s in enumerate(shards):
        if s.ndim != 1:
            raise ValueError(f"all_gather: argument 'shards' expected 1-d shards, got shape {s.shape} at rank {r}")
    full = np.concatenate(shards)
    N = len(shards)
    if traffic is not None:
        traffic.add("all_gather", (N - 1) / N * full.nbytes)  # (PAR.4)
    return [full.copy() for _ in range(N)]


# -- flat parameter vectors -----------------------------------------------------------------
def flat_params(model) -> np.ndarray:
    """The parameters in ``named_parameters`` order as one vector (P,) (a copy)."""
    return np.concatenate([p.data.reshape(-1) for p in model.parameters()])


def flat_grads(model) -> np.ndarray:
    """The gradients in ``named_parameters`` order as one vector (P,) (a copy)."""
    return np.concatenate([p.grad.reshape(-1) for p in model.parameters()])


def _write_flat(model, flat: np.ndarray, attr: str = "data") -> None:
    lo = 0
    for p in model.parameters():
        target = getattr(p, attr)
        np.copyto(target, flat[lo:lo + target.size].reshape(target.shape))
        lo += target.size


# -- data parallel training -----------------------------------------------------------------
class DataParallel:
    """N GPT replicas trained with data parallelism, ZeRO ``stage`` 0 (plain), 1, 2 or 3 (PAR.6).

    ``model_factory()`` builds a GPT; rank 0's state is loaded into every other replica, so all
    start identical. Each ``step(ids, targets)`` gives rank r the micro-batch ``array_split``
    r of the B rows, weights its mean-loss gradient by its counted tokens (PAR.2), combines
    the gradients with the stage's collectives and takes one AdamW step with the given options.

    - stage 0: all-reduce the gradients; every rank runs AdamW on the whole model.
    - stage 1: all-reduce; rank r runs AdamW on its shard only (moments sharded), then all-gather.
    - stage 2: reduce-scatter (rank r keeps only its gradient shard), AdamW on it, all-gather.
    - stage 3: rank r keeps only its parameter shard between steps: all-gather before the
      forward and again before the backward, reduce-scatter, AdamW on the shard, then the
      replica's full parameters are freed (overwritten with NaN, so a stale read shows).
    """

    def __init__(self, model_factory: Callable[[], GPT], N: int, stage: int = 0, *, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        name = "DataParallel"
        if not callable(model_factory):
            raise TypeError(f"{name}: argument 'model_factory' expected a callable returning a GPT, "
                            f"got {type(model_factory).__name__}")
        self.N = N = _check_int(name, "N", N, 1)
        if stage not in STAGES or isinstance(stage, bool):
            raise ValueError(f"{name}: argument 'stage' expected one of {list(STAGES)}, got {stage!r:.40}")
        self.stage = stage
        self.models: List[GPT] = []
        for r in range(N):
            m = model_factory()
            if not isinstance(m, GPT):
                raise TypeError(f"{name}: argument 'model_factory' expected a callable returning a GPT, "
                                f"got {type(m).__name__}")
            if r:
                m.load_state_dict(self.models[0].state_dict())
            self.models.append(m)
        self.traffic = Traffic()
        options = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        flat = flat_params(self.models[0])
        self.n_params = flat.size
        self.bounds = shard_bounds(flat.size, N)
        if stage == 0:
            self.optimizers = [AdamW(m.parameters(), **options) for m in self.models]
        else:
            # Rank r owns the slice [lo_r, hi_r) of the flat vector: its parameters and AdamW moments (PAR.6).
            self.shards = [Parameter(flat[lo:hi].copy()) for lo, hi in self.bounds]
            self.optimizers = [AdamW([s], **options) for s in self.shards]
            if stage == 3:
                self._free()

    def _free(self) -> None:
        for m in self.models:
            for p in m.parameters():
                p.data.fill(np.nan)

    def _gather_params(self) -> None:
        full = all_gather([s.data for s in self.shards], self.traffic)
        for m, f in zip(self.models, full):
            _write_flat(m, f)

    def step(self, ids: np.ndarray, targets: np.ndarray) -> float:
        """One data-parallel AdamW step on the batch; returns the full-batch mean loss (PAR.1)."""
        name = "DataParallel.step"
        for arg, a in (("ids", ids), ("targets", targets)):
            if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind not in "iu":
                raise ValueError(f"{name}: argument '{arg}' expected a (B, T) integer array, got "
                                 f"{a.shape if isinstance(a, np.ndarray) else type(a).__name__}")
        if targets.shape != ids.shape:
            raise ValueError(f"{name}: argument 'targets' expected shape {ids.shape}, got {targets.shape}")
        if ids.shape[0] < self.N:
            raise ValueError(f"{name}: argument 'ids' expected at least N = {self.N} rows, got {ids.shape[0]}")
        micro_ids, micro_tg = np.array_split(ids, self.N), np.array_split(targets, self.N)
        counts = [np.array([np.count_nonzero(t != IGNORE_INDEX)], dtype=np.float64) for t in micro_tg]
        n = all_reduce(counts, "sum", self.traffic)  # n_r summed: every rank learns the total n (PAR.2)
        if n[0][0] == 0:
            raise ValueError(f"{name}: argument 'targets' expected at least one counted target, got all {IGNORE_INDEX}")
        if self.stage == 3:
            self._gather_params()  # parameters for the forward (PAR.6)
        losses, grads = [], []
        for r, m in enumerate(self.models):
            m.train()
            m.zero_grad()
            _, loss_r = m.forward(micro_ids[r], micro_tg[r])
            losses.append(loss_r)
        if self.stage == 3:
            self._gather_params()  # parameters again for the backward (freed after the forward in a real run)
        for r, m in enumerate(self.models):
            m.backward()
            w = counts[r][0] / n[r][0]  # (PAR.2) the share of the batch's counted tokens on rank r
            g = flat_grads(m)
            grads.append(g * g.dtype.type(self.N * w))  # so the mean over ranks is the batch gradient (PAR.2)
        loss = float(sum(l * c[0] for l, c in zip(losses, counts)) / n[0][0])  # (PAR.1)
        if self.stage == 0:
            reduced = all_reduce(grads, "mean", self.traffic)  # (PAR.3)
            for m, opt, g in zip(self.models, self.optimizers, reduced):
                _write_flat(m, g, "grad")
                opt.step()
            return loss
        if self.stage == 1:
            full = all_reduce(grads, "mean", self.traffic)  # (PAR.3) every rank holds the whole gradient
            shard_grads = [f[lo:hi] for f, (lo, hi) in zip(full, self.bounds)]
        else:
            shard_grads = reduce_scatter(grads, "mean", self.traffic)  # (PAR.3) rank r keeps slice r only
        for s, opt, g in zip(self.shards, self.optimizers, shard_grads):
            s.grad = g.copy()
            opt.step()  # AdamW is elementwise: its update of a slice is the slice of its update (PAR.5)
        if self.stage == 3:
            self._free()
        else:
            self._gather_params()  # (PAR.3) every replica gets the new weights
        return loss

    def full_params(self) -> List[np.ndarray]:
        """Each rank's view of the flat parameters (P,): its replica's, or the gathered shards at stage 3
        (no traffic is counted: this is for inspection)."""
        if self.stage == 3:
            full = np.concatenate([s.data for s in self.shards])
            return [full.copy() for _ in range(self.N)]
        return [flat_params(m) for m in self.models]


def data_parallel_step(model_factory: Callable[[], GPT], batch: Tuple[np.ndarray, np.ndarray], N: int,
                       stage: int = 0, **adamw) -> Tuple[DataParallel, float]:
    """One step of ``DataParallel(model_factory, N, stage, **adamw)`` on ``batch = (ids, targets)``;
    returns the trainer (replicas, shards, ``traffic``) and the batch loss."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"data_parallel_step: argument 'batch' expected a pair (ids, targets), "
                        f"got {type(batch).__name__}")
    dp = DataParallel(model_factory, N, stage, **adamw)
    loss = dp.step(*batch)
    return dp, loss


# -- memory ---------------------------------------------------------------------------------
ACCOUNTING = {
    # bytes per parameter: (weights, gradients, optimizer state)
    "float32": (4, 4, 8),  # npformer: float32 weights and gradients, AdamW's two float32 moments
    "mixed": (2, 2, 12),  # the ZeRO paper: fp16 weights and gradients; fp32 master copy, m and v (K = 12)
}


def memory_per_rank(stage: int, n_params: int, N: int, accounting: str = "float32") -> Dict[str, float]:
    """Bytes per rank of ``params``, ``grads``, ``optimizer`` state and their ``total`` (PAR.7).

    ``accounting="float32"`` (the default, what npformer holds): 4 + 4 + 8 = 16 bytes per
    parameter; ``"mixed"`` (the ZeRO paper): 2 + 2 + 12 = 16. Stage 1 divides the optimizer
    state by N, stage 2 also the gradients, stage 3 also the weights (even split, P/N each).
    """
    name = "memory_per_rank"
    if stage not in STAGES or isinstance(stage, bool):
        raise ValueError(f"{name}: argument 'stage' expected one of {list(STAGES)}, got {stage!r:.40}")
    n_params = _check_int(name, "n_params", n_params, 0)
    N = _check_int(name, "N", N, 1)
    if accounting not in ACCOUNTING:
        raise ValueError(f"{name}: argument 'accounting' expected one of {list(ACCOUNTING)}, got {accounting!r:.40}")
    w, g, o = ACCOUNTING[accounting]
    params = w * n_params / (N if stage >= 3 else 1)  # (PAR.7)
    grads = g * n_params / (N if stage >= 2 else 1)  # (PAR.7)
    optimizer = o * n_params / (N if stage >= 1 else 1)  # (PAR.7)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def memory_table(n_params: int, N: int, accounting: str = "float32") -> str:
    """A Markdown table of ``memory_per_rank`` for stages 0-3, in MiB."""
    rows = ["| stage | params | grads | optimizer | total (MiB) |", "|---|---|---|---|---|"]
    for s in STAGES:
        m = memory_per_rank(s, n_params, N, accounting)
        rows.append(f"| {s} | " + " | ".join(f"{m[k] / 2**20:.2f}" for k in ("params", "grads", "optimizer", "total"))
                    + " |")
    return "\n".join(rows)
