"""Tensor (Megatron) and pipeline (GPipe, 1F1B) parallelism, simulated exactly on N ranks in one process.

proofs/parallelism_model.md derives every step. Tensor parallel: the GPT MLP's fc is split by
output features (columns of x W^T) and proj by input features, the attention's q/k/v by heads and
o_proj by input features, so each rank computes a partial sum of the layer's output and one
all-reduce (the g operator, PARM.2) completes it; the backward needs one all-reduce for the input
gradient (the f operator, PARM.1). Pipeline: a GPT's blocks are cut into N contiguous stages and a
batch into M micro-batches; a schedule is an explicit list of ``Event(time, stage, op, micro)``.

Letters: B batch, T length, D model width, F = 4 D hidden width, H heads, N ranks or stages,
M micro-batches.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..models.gpt import GPT, Block
from ..nn.attention import MultiHeadAttention, merge_heads, split_heads
from ..nn.mlp import MLP
from ..ops._checks import check_count, check_float, check_ndim
from ..ops.activations import gelu_backward, gelu_forward
from ..ops.attention import attention_backward, attention_forward
from ..ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..ops.linear import linear_backward, linear_forward


class Communicator:
    """N simulated ranks; ``all_reduce`` sums one array per rank and counts the bytes moved."""

    def __init__(self, n_ranks: int):
        self.n_ranks = check_count("Communicator", "n_ranks", n_ranks, 1)
        self.log: List[Tuple[str, int]] = []  # (name, payload bytes) per all-reduce

    def all_reduce(self, name: str, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The sum of the N partial arrays, which every rank receives (rank order fixed: deterministic)."""
        if len(parts) != self.n_ranks:
            raise ValueError(f"Communicator.all_reduce: argument 'parts' expected {self.n_ranks} arrays, got {len(parts)}")
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        self.log.append((name, int(total.nbytes)))
        return total

    def ring_bytes_per_rank(self, payload: int) -> float:
        """Bytes each rank sends in a ring all-reduce of ``payload`` bytes: 2 (N - 1) / N payload (PARM.3)."""
        return 2.0 * (self.n_ranks - 1) / self.n_ranks * payload  # (PARM.3)


def _shards(op: str, total: int, n: int) -> List[slice]:
    if total % n:
        raise ValueError(f"{op}: argument 'n_ranks' expected a divisor of {total}, got {n}")
    w = total // n
    return [slice(r * w, (r + 1) * w) for r in range(n)]


def _param(p) -> Optional[np.ndarray]:
    return None if p is None else p.data


class TensorParallelMLP:
    """GPT's MLP split across N ranks: rank r holds fc's rows r (F/N, D) and proj's columns r (D, F/N)."""

    def __init__(self, mlp: MLP, comm: Communicator):
        if not isinstance(mlp, MLP) or mlp.activation != "gelu":
            raise TypeError(f"TensorParallelMLP: argument 'mlp' expected a GELU MLP, got {type(mlp).__name__}")
        self.mlp, self.comm, self.approximate = mlp, comm, mlp.approximate
        self.shards = _shards("TensorParallelMLP", mlp.fc.weight.shape[0], comm.n_ranks)
        self._caches: list = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, T, D) -> y (B, T, D): f is the identity (PARM.1), g all-reduces the partial outputs (PARM.2)."""
        fc, proj = self.mlp.fc, self.mlp.proj
        parts, caches = [], []
        for s in self.shards:  # rank r, given the same x (f forward: identity)
            h, c_fc = linear_forward(x, fc.weight.data[s], None if fc.bias is None else fc.bias.data[s])  # (PARM.4)
            a, c_act = gelu_forward(h, approximate=self.approximate)  # local: GELU acts per feature (PARM.4)
            y_r, c_proj = linear_forward(a, proj.weight.data[:, s])  # partial sum (PARM.5)
            parts.append(y_r)
            caches.append((c_fc, c_act, c_proj))
        y = self.comm.all_reduce("mlp.g.forward", parts)  # g forward (PARM.2)
        if proj.bias is not None:
            y = y + proj.bias.data  # added once, after the sum
        self._caches.append(caches)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (B, T, D) -> dx (B, T, D); weight gradients land in the shards of the unsplit MLP's grads."""
        fc, proj = self.mlp.fc, self.mlp.proj
        caches = self._caches.pop()
        if proj.bias is not None:
            proj.bias.grad += dy.reshape(-1, dy.shape[-1]).sum(axis=0)
        parts = []
        for s, (c_fc, c_act, c_proj) in zip(self.shards, caches):  # g backward: identity, every rank has dy (PARM.2)
            da, dW_proj, _ = linear_backward(dy, c_proj)
            proj.weight.grad[:, s] += dW_proj
            dh = gelu_backward(da, c_act)
            dx_r, dW_fc, db_fc = linear_backward(dh, c_fc)
            fc.weight.grad[s] += dW_fc
            if db_fc is not None:
                fc.bias.grad[s] += db_fc
            parts.append(dx_r)
        return self.comm.all_reduce("mlp.f.backward", parts)  # f backward (PARM.1)


class TensorParallelAttention:
    """Causal multi-head attention split by heads: rank r holds H/N heads of q, k, v and o_proj's matching columns."""

    def __init__(self, attn: MultiHeadAttention, comm: Communicator):
        if not isinstance(attn, MultiHeadAttention) or attn.position != "none" or attn.n_kv_head != attn.n_head \
                or attn.window is not None:
            raise TypeError("TensorParallelAttention: argument 'attn' expected plain multi-head attention "
                            f"(no position bias, no grouped heads, no window), got {type(attn).__name__}")
        self.attn, self.comm = attn, comm
        head_groups = _shards("TensorParallelAttention", attn.n_head, comm.n_ranks)
        hd = attn.head_dim
        self.heads_per_rank = attn.n_head // comm.n_ranks
        self.shards = [slice(g.start * hd, g.stop * hd) for g in head_groups]  # feature rows of rank r's heads
        self._caches: list = []

    def forward(self, x: np.ndarray, causal: bool = True) -> np.ndarray:
        """x (B, T, D) -> y (B, T, D): heads are independent, so each rank's heads need only its q, k, v (PARM.6)."""
        a = self.attn
        parts, caches = [], []
        for s in self.shards:
            qkv, cs = [], []
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                z, c = linear_forward(x, lin.weight.data[s], None if lin.bias is None else lin.bias.data[s])
                qkv.append(split_heads(z, self.heads_per_rank))  # (B, H/N, T, D/H)
                cs.append(c)
            out, c_att = attention_forward(*qkv, causal=causal, scale=a.scale)
            y_r, c_o = linear_forward(merge_heads(out), a.o_proj.weight.data[:, s])  # partial sum (PARM.6)
            parts.append(y_r)
            caches.append((cs, c_att, c_o))
        y = self.comm.all_reduce("attn.g.forward", parts)  # g forward (PARM.2)
        if a.o_proj.bias is not None:
            y = y + a.o_proj.bias.data
        self._caches.append(caches)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        a = self.attn
        caches = self._caches.pop()
        if a.o_proj.bias is not None:
            a.o_proj.bias.grad += dy.reshape(-1, dy.shape[-1]).sum(axis=0)
        parts = []
        for s, (cs, c_att, c_o) in zip(self.shards, caches):
            dmerged, dW_o, _ = linear_backward(dy, c_o)
            a.o_proj.weight.grad[:, s] += dW_o
            dq, dk, dv, _ = attention_backward(split_heads(dmerged, self.heads_per_rank), c_att)
            dx_r = 0
            for lin, c, d in zip((a.v_proj, a.k_proj, a.q_proj), cs[::-1], (dv, dk, dq)):
                dx_part, dW, db = linear_backward(merge_heads(d), c)
                lin.weight.grad[s] += dW
                if db is not None:
                    lin.bias.grad[s] += db
                dx_r = dx_r + dx_part
            parts.append(dx_r)
        return self.comm.all_reduce("attn.f.backward", parts)  # f backward (PARM.1)


class TensorParallelBlock:
    """A GPT ``Block`` with its attention and MLP split across N ranks; the layer norms are replicated."""

    def __init__(self, block: Block, n_ranks: int):
        if not isinstance(block, Block):
            raise TypeError(f"TensorParallelBlock: argument 'block' expected a Block, got {type(block).__name__}")
        if block.drop_1.p or block.drop_2.p:
            raise ValueError("TensorParallelBlock: argument 'block' expected dropout 0, got "
                             f"{max(block.drop_1.p, block.drop_2.p)}")
        self.block, self.comm = block, Communicator(n_ranks)
        self.attn = TensorParallelAttention(block.attn, self.comm)
        self.mlp = TensorParallelMLP(block.mlp, self.comm)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (B, T, D) -> (B, T, D): two all-reduces forward (PARM.7)."""
        check_float("TensorParallelBlock.forward", "x", x)
        check_ndim("TensorParallelBlock.forward", "x", x, 3)
        b = self.block
        x = x + self.attn.forward(b.ln_1.forward(x))  # first g (PARM.7)
        return x + self.mlp.forward(b.ln_2.forward(x))  # second g (PARM.7)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, T, D) -> dx (B, T, D): two all-reduces backward (PARM.7)."""
        b = self.block
        dx_mid = dout + b.ln_2.backward(self.mlp.backward(dout))  # first f (PARM.7)
        return dx_mid + b.ln_1.backward(self.attn.backward(dx_mid))  # second f (PARM.7)


# ---------------------------------------------------------------------------------------- pipeline
class Event(NamedTuple):
    time: int
    stage: int
    op: str  # 'F' or 'B'
    micro: int


SCHEDULES = ("gpipe", "1f1b")


def _stage_orders(kind: str, N: int, M: int) -> List[List[Tuple[str, int]]]:
    """Each stage's op order: GPipe all F then all B (PARM.8); 1F1B N-1-s warm-up F, then F/B pairs (PARM.10)."""
    orders = []
    for s in range(N):
        if kind == "gpipe":
            orders.append([("F", m) for m in range(M)] + [("B", m) for m in range(M)])  # (PARM.8)
            continue
        warm = min(N - 1 - s, M)  # warm-up forwards, then one F one B (PARM.10)
        order = [("F", m) for m in range(warm)]
        f, b = warm, 0
        while b < M:
            if f < M:
                order.append(("F", f))
                f += 1
            order.append(("B", b))
            b += 1
        orders.append(order)
    return orders


def pipeline_schedule(kind: str, n_stages: int, n_micro: int) -> List[Event]:
    """The events of a GPipe or 1F1B schedule with unit-time F and B, sorted by (time, stage).

    Each op starts as soon as its stage is free and its input is ready: F(s, m) after F(s-1, m),
    B(s, m) after B(s+1, m) (the last stage's B after its own F).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline_schedule: argument 'kind' expected one of {SCHEDULES}, got {kind!r}")
    N = check_count("pipeline_schedule", "n_stages", n_stages, 1)
    M = check_count("pipeline_schedule", "n_micro", n_micro, 1)
    orders = _stage_orders(kind, N, M)
    done: Dict[Tuple[str, int, int], int] = {}  # (op, stage, micro) -> end time
    free, pos, events = [0] * N, [0] * N, []
    while len(events) < 2 * N * M:
        progressed = False
        for s in range(N):
            if pos[s] == len(orders[s]):
                continue
            op, m = orders[s][pos[s]]
            dep = ("F", s - 1, m) if op == "F" else (("B", s + 1, m) if s < N - 1 else ("F", s, m))
            if op == "F" and s == 0:
                ready = 0
            elif dep in done:
                ready = done[dep]
            else:
                continue
            t = max(free[s], ready)
            events.append(Event(t, s, op, m))
            done[(op, s, m)] = free[s] = t + 1
            pos[s] += 1
            progressed = True
        if not progressed:  # cannot happen for these two orders; a guard against an invalid order
            raise RuntimeError("pipeline_schedule: the stage orders deadlock")
    return sorted(events)


def bubble_fraction(events: Sequence[Event], n_stages: int) -> float:
    """Idle share of the N x makespan grid of unit slots (PARM.9)."""
    makespan = max(e.time for e in events) + 1
    return 1.0 - len(events) / (n_stages * makespan)  # (PARM.9)


def peak_stored_activations(events: Sequence[Event], n_stages: int) -> List[int]:
    """Per stage, the most micro-batches whose forward ran and backward has not (PARM.11)."""
    live, peak = [0] * n_stages, [0] * n_stages
    for e in sorted(events):
        live[e.stage] += 1 if e.op == "F" else -1
        peak[e.stage] = max(peak[e.stage], live[e.stage])  # (PARM.11)
    return peak


def _take_caches(modules) -> list:
    taken = []
    for mod in modules:
        for _, m in mod.named_modules():
            taken.append((m, list(m._caches)))
            m._caches.clear()
    return taken


def _put_caches(taken) -> None:
    for m, caches in taken:
        m._caches[:] = caches


def run_pipeline(model: GPT, ids: np.ndarray, targets: np.ndarray, n_stages: int, n_micro: int,
                 kind: str = "1f1b") -> Tuple[float, List[int]]:
    """Run ``kind``'s schedule on ``model`` split into N stages; add the full batch's gradients (PARM.12).

    ids, targets (B, T) are cut into M micro-batches along B; micro-batch m's loss is weighted by its
    share of the counted targets, so the summed gradients are the full-batch mean loss's. Returns the
    full-batch loss and, per stage, the peak number of micro-batches whose activations it held.
    """
    op = "run_pipeline"
    if not isinstance(model, GPT):
        raise TypeError(f"{op}: argument 'model' expected a GPT, got {type(model).__name__}")
    if model.cfg.dropout:
        raise ValueError(f"{op}: argument 'model' expected dropout 0, got {model.cfg.dropout}")
    N = check_count(op, "n_stages", n_stages, 1, model.cfg.n_layer)
    ids, targets = np.asarray(ids), np.asarray(targets)
    check_ndim(op, "ids", ids, 2)
    if targets.shape != ids.shape:
        raise ValueError(f"{op}: argument 'targets' expected shape {ids.shape}, got {targets.shape}")
    M = check_count(op, "n_micro", n_micro, 1, ids.shape[0])
    events = pipeline_schedule(kind, N, M)
    dtype = model.wte.weight.data.dtype
    cuts = np.array_split(np.arange(model.cfg.n_layer), N)
    stage_blocks = [[model.blocks[i] for i in c] for c in cuts]
    stage_mods = [list(b) for b in stage_blocks]
    stage_mods[0] += [model.wte, model.wpe, model.drop]
    stage_mods[-1] += [model.ln_f]
    rows = np.array_split(np.arange(ids.shape[0]), M)
    counted = [(targets[r] != -100).sum() for r in rows]
    total = max(int(sum(counted)), 1)
    sent: Dict[Tuple[int, int], np.ndarray] = {}  # (stage receiving, micro) -> activation or gradient
    stash: Dict[Tuple[int, int], tuple] = {}
    live, peak, loss = [0] * N, [0] * N, 0.0
    for e in events:  # sorted by time: every dependency ran earlier
        s, m = e.stage, e.micro
        if e.op == "F":
            extra = None
            if s == 0:
                T = ids.shape[1]
                x = model.drop.forward(model.wte.forward(ids[rows[m]]) + model.wpe.forward(np.arange(T)))
            else:
                x = sent.pop(("F", s, m))
            for blk in stage_blocks[s]:
                x = blk.forward(x)
            if s == N - 1:
                logits, head = linear_forward(model.ln_f.forward(x), model.wte.weight.data)
                l_m, lc = cross_entropy_forward(logits, targets[rows[m]])
                loss += float(l_m) * counted[m] / total
                extra = (head, lc)
            else:
                sent[("F", s + 1, m)] = x
            stash[(s, m)] = (_take_caches(stage_mods[s]), extra)
            live[s] += 1
            peak[s] = max(peak[s], live[s])
        else:
            taken, extra = stash.pop((s, m))
            _put_caches(taken)
            live[s] -= 1
            if s == N - 1:
                head, lc = extra
                dlogits = cross_entropy_backward(np.asarray(counted[m] / total, dtype), lc)  # (PARM.12)
                dh, dW_head, _ = linear_backward(dlogits, head)
                model.wte.weight.grad += dW_head
                dx = model.ln_f.backward(dh)
            else:
                dx = sent.pop(("B", s, m))
            for blk in reversed(stage_blocks[s]):
                dx = blk.backward(dx)
            if s == 0:
                dx = model.drop.backward(dx)
                model.wpe.backward(dx.sum(axis=0))
                model.wte.backward(dx)
            else:
                sent[("B", s - 1, m)] = dx
    return loss, peak


__all__ = ["Communicator", "TensorParallelMLP", "TensorParallelAttention", "TensorParallelBlock", "Event",
           "SCHEDULES", "pipeline_schedule", "bubble_fraction", "peak_stored_activations", "run_pipeline"]
