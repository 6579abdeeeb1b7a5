"""Arithmetic reasoning studies: exact match by operand length, length generalisation, grokking.

Three studies, one command each (``npformer reasoning tasks|length|grokking``), every one
writing a CSV table, a Markdown table, PNG plots and ``summary.json`` (options, wall time) to
its output folder:

- ``tasks``: one small model per task kind (add, sub, mul, compare, mod, chain), operands of
  1..digits digits, trained with the loss on the answers only; held-out exact match by
  operand length.
- ``length``: train on operands of 1..n digits, test on 1..2n (n+1..2n were never seen), for
  every position scheme asked for (learned, RoPE, ALiBi ...) with and without reversed
  answers, index hints optional; a table and a plot of accuracy against length.
- ``grokking``: (a + b) mod p for a fraction of all p^2 pairs, AdamW with a large weight
  decay; training and held-out accuracy recorded every ``eval_every`` steps, plotted on a
  log step axis, and the step at which each first reached 99% (or never).

Exact match is measured by greedy decoding, batched, with the KV cache (``answer``): prompts
are grouped by length so each batch is one rectangle, and each row stops at its newline.
During grokking, where it is measured often, the same number comes from one teacher-forced
forward pass (``teacher_forced_exact``): greedy decoding writes the target exactly when, fed
the target's own prefix, the model's argmax at every target position is the target's next
token, and the pass costs one forward instead of one per token. Both score what ``exact_match``
scores, the answer (after the scratchpad's ";" when there is one): a scratchpad item whose
working differs from the target's is decoded greedily, since its answer may still be right, so
the two agree with and without scratchpads (tested).

Each study writes to ``--out``, by default ``runs/reasoning_<study>`` (a trial run never
overwrites the results kept elsewhere).

Models are ``VariantLM`` (any ``position``) when ``npformer.models.variant`` is present, else
``GPT`` (learned positions only). All randomness comes from ``seed``. The studies run NumPy's
BLAS on one thread when threadpoolctl is installed: their matrices are small (B T x 64), and
on a busy two-core machine one thread trained a 2-layer, d=64 model about 20x faster per step
than two competing ones (38 ms against 810 ms, measured side by side).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .data.arithmetic import KINDS, Item, ReasoningTask, exact_match, full_tokenizer, make_batch
from .data.char import CharTokenizer
from .generate import generate
from .ops._checks import check_bool, check_count, check_real

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
STUDIES = ("tasks", "length", "grokking")


class ReasoningError(ValueError):
    """A study option that cannot work: ``field`` names it, ``reason`` says what was expected and what came."""

    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"reasoning: argument '{field_name}' {reason}")


def _option(name: str, check: Callable, value, **kw):
    """A ``_checks`` helper on one option; a ``ReasoningError`` naming it if it fails."""
    try:
        return check("reasoning", name, value, **kw)
    except (ValueError, TypeError) as e:
        raise ReasoningError(name, str(e).split(f"argument '{name}' ", 1)[-1]) from None


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ReasoningError(name, f"expected one of {tuple(choices)}, got {value!r:.40}")
    return value


def _choices(name: str, values: object, choices: Sequence[str]) -> Tuple[str, ...]:
    """A non-empty list of distinct choices (a comma-separated string is split)."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",")]
    if not isinstance(values, (list, tuple)) or not values:
        raise ReasoningError(name, f"expected a non-empty list of {tuple(choices)}, got {values!r:.60}")
    for v in values:
        _choice(name, v, choices)
    if len(set(values)) != len(values):
        raise ReasoningError(name, f"expected distinct entries, got {list(values)!r:.60}")
    return tuple(values)


# -- models and training ---------------------------------------------------------------------------
@dataclass
class ModelShape:
    """The small decoder every study trains."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64

    def check(self) -> "ModelShape":
        for name in ("n_layer", "n_head", "d_model"):
            _option(name, check_count, getattr(self, name), lo=1, hi=4096)
        if self.d_model % self.n_head:
            raise ReasoningError("n_head", f"expected a divisor of d_model = {self.d_model}, got {self.n_head}")
        return self


def variant_available() -> bool:
    """Whether ``npformer.models.variant`` (VariantLM, any position scheme) can be imported."""
    import importlib

    try:
        importlib.import_module("npformer.models.variant")
    except ImportError:
        return False
    return True


def build_model(position: str, vocab_size: int, block_size: int, shape: ModelShape = ModelShape(), seed: int = 0):
    """A fresh decoder with this position scheme: ``VariantLM`` when present, else ``GPT`` for "learned"."""
    _choice("position", position, POSITIONS)
    if variant_available():
        from .models.variant import VariantConfig, VariantLM

        cfg = VariantConfig(vocab_size=vocab_size, block_size=block_size, n_layer=shape.n_layer,
                            n_head=shape.n_head, d_model=shape.d_model, position=position)
        return VariantLM(cfg, seed=seed)
    if position != "learned":
        raise ReasoningError("position", f"expected 'learned' (npformer.models.variant, which has the other "
                                         f"schemes, cannot be imported), got {position!r}")
    from .models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=shape.n_layer,
                         n_head=shape.n_head, d_model=shape.d_model), seed=seed)


def train_steps(model, next_batch: Callable[[int], Tuple[np.ndarray, np.ndarray]], steps: int, *, lr: float = 3e-3,
                weight_decay: float = 0.1, warmup: int = 50, min_lr_ratio: float = 0.1, clip: float = 1.0,
                betas: Tuple[float, float] = (0.9, 0.98), on_step: Optional[Callable[[int, float], None]] = None,
                schedule: str = "cosine") -> List[float]:
    """``steps`` AdamW steps on ``next_batch(step) -> (x, y)`` (targets -100 outside the answers) -> the losses.

    ``schedule``: "cosine" (linear warm-up, then cosine down to ``min_lr_ratio * lr``) or
    "constant" (warm-up, then ``lr``). ``on_step(step, loss)`` runs after each step (1-based).
    """
    from .optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine

    warmup = min(warmup, steps)
    cosine = warmup_cosine(lr, lr * min_lr_ratio, warmup, steps) if schedule == "cosine" else None
    opt = AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        rate = cosine(step - 1) if cosine is not None else lr * min(1.0, step / max(warmup, 1))
        for group in opt.param_groups:
            group["lr"] = rate
        x, y = next_batch(step)
        _, loss = model.forward(x, y)
        if not np.isfinite(loss):
            raise FloatingPointError(f"reasoning: the loss became {loss} at step {step} (lower --lr)")
        model.zero_grad()
        model.backward()
        clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return losses


def task_batches(task: ReasoningTask, rng: np.random.Generator, batch_size: int, tok: CharTokenizer):
    """``next_batch`` for ``train_steps``: fresh training-side problems of ``task`` every step."""

    def next_batch(step: int):
        x, y, _ = make_batch(task.sample(rng, batch_size, "train"), tok)
        return x, y

    return next_batch


# -- evaluation ------------------------------------------------------------------------------------
def answer(model, items: Sequence[Item], tok: CharTokenizer, batch_size: int = 256,
           max_new_tokens: Optional[int] = None) -> List[str]:
    """Greedy targets (working and answer, no newline) for each item, in order.

    Items are grouped by prompt length; each group is decoded ``batch_size`` rows at a time with
    the KV cache, every row stopping at its newline. ``max_new_tokens`` defaults to the longest
    target + 1 among the items' tasks.
    """
    items = list(items)
    if not items:
        return []
    batch_size = check_count("answer", "batch_size", batch_size, lo=1)
    newline = tok.stoi["\n"]
    if max_new_tokens is None:
        max_new_tokens = max(t.max_line_length for t in {p.task for p in items}) - min(len(p.prompt) for p in items)
    out: List[Optional[str]] = [None] * len(items)
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(items):
        groups.setdefault(len(p.prompt), []).append(i)
    for T0, rows in sorted(groups.items()):
        new = max(1, min(max_new_tokens, model.cfg.block_size - T0))
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            prompts = np.asarray([tok.encode(items[i].prompt) for i in chunk], dtype=np.int64)
            ids = generate(model, prompts, new, temperature=0, stop_tokens=[newline])
            for i, row in zip(chunk, ids[:, T0:]):
                row = row.tolist()
                end = row.index(newline) if newline in row else len(row)
                out[i] = tok.decode(row[:end])
    return out  # type: ignore[return-value]


def teacher_forced_exact(model, items: Sequence[Item], tok: CharTokenizer, batch_size: int = 1024) -> np.ndarray:
    """Per item, whether greedy decoding answers it exactly, as ``exact_match`` scores it. -> (N,) bool.

    Greedy decoding writes target t_1..t_m (then the newline) exactly when the argmax of the
    model's prediction after prompt + t_1..t_{j-1} is t_j for every j: by induction, each
    greedy step then sees the same prefix as the teacher-forced pass, so one forward pass per
    batch settles every item whose whole target is written. An item without a scratchpad that
    misses it is not answered exactly. An item with a scratchpad that misses it may still end
    in the right answer after other working (``exact_match`` scores only the part after ";"):
    those items alone are decoded greedily (``answer``) and scored as ``exact_match`` scores them.
    """
    items = list(items)
    hits = np.zeros(len(items), bool)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(items), batch_size):
            x, y, mask = make_batch(items[s:s + batch_size], tok)
            logits, _ = model.forward(x)
            pred = logits.argmax(-1)
            hits[s:s + len(x)] = np.all((pred == y) | ~mask, axis=1)
    finally:
        model.train(was_training)
    unsettled = [i for i, p in enumerate(items) if not hits[i] and p.task.scratchpad]
    if unsettled:
        written = answer(model, [items[i] for i in unsettled], tok)
        for i, text in zip(unsettled, written):
            hits[i] = items[i].final(text) == items[i].answer
    return hits


@dataclass
class LengthScore:
    """Exact match at one operand length."""

    length: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def exact_match_by_length(generated: Sequence[str], items: Sequence[Item]) -> List[LengthScore]:
    """Exact match of generated targets grouped by ``Item.length`` (sorted by length).

    Each group's accuracy is ``exact_match`` on that group, so the two agree by construction.
    """
    items = list(items)
    generated = list(generated)
    if len(generated) != len(items):
        raise ValueError(f"exact_match_by_length: argument 'generated' expected {len(items)} strings "
                         f"(one per item), got {len(generated)}")
    groups: Dict[int, List[int]] = {}
    for i, p in enumerate(items):
        groups.setdefault(p.length, []).append(i)
    scores = []
    for length, rows in sorted(groups.items()):
        acc = exact_match([generated[i] for i in rows], [items[i] for i in rows])
        scores.append(LengthScore(length, int(round(acc * len(rows))), len(rows)))
    return scores


def evaluate_by_length(model, items: Sequence[Item], tok: CharTokenizer, batch_size: int = 256) -> List[LengthScore]:
    """``answer`` then ``exact_match_by_length``."""
    return exact_match_by_length(answer(model, items, tok, batch_size), items)


def heldout_by_length(kind: str, lengths: Sequence[int], per_length: int, rng: np.random.Generator,
                      **fmt) -> List[Item]:
    """Up to ``per_length`` distinct held-out problems at each operand length L (every operand exactly L digits).

    Short lengths have few problems (one-digit addition has 100, about 10 of them held out), so
    a length may get fewer than ``per_length``: each problem is scored once, never repeated.
    """
    items: List[Item] = []
    for L in lengths:
        task = ReasoningTask(kind, L, min_digits=L, **fmt)
        seen = {}
        for _ in range(4):
            for p in task.sample(rng, per_length, "heldout"):
                seen.setdefault((p.operands, p.ops), p)
            if len(seen) >= per_length:
                break
        items += list(seen.values())[:per_length]
    return items


# -- output ------------------------------------------------------------------------------------------
def _write_table(out: Path, name: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Tuple[Path, Path]:
    """``name.csv`` and ``name.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_common(out, steps, batch_size, lr, eval_problems, seed, shape) -> Path:
    if not isinstance(out, (str, Path)) or not str(out):
        raise ReasoningError("out", f"expected a folder path, got {out!r:.40}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_problems", eval_problems)):
        _option(name, check_count, value, lo=1, hi=10**7)
    _option("seed", check_count, seed, lo=0)
    _option("lr", check_real, lr, lo=0.0, lo_open=True, hi=1.0)
    if not isinstance(shape, ModelShape):
        raise ReasoningError("shape", f"expected a ModelShape, got {type(shape).__name__}")
    shape.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReasoningError("out", f"expected a folder, got the file {str(out)!r}")
    return out


def _one_blas_thread():
    """A context running BLAS on one thread (threadpoolctl, when installed; otherwise nothing changes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - an optional speed-up
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _summary(out: Path, study: str, options: dict, t0: float, extra: dict) -> dict:
    summary = {"study": study, "options": options, "seconds": round(time.perf_counter() - t0, 1),
               "model": "VariantLM" if variant_available() else "GPT", **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# -- study: tasks ------------------------------------------------------------------------------------
def study_tasks(out, *, kinds: Sequence[str] = KINDS, digits: int = 3, steps: int = 1200, batch_size: int = 64,
                lr: float = 3e-3, eval_problems: int = 100, reverse: bool = True, p: int = 97, seed: int = 0,
                shape: ModelShape = ModelShape(), log: Callable[[str], None] = print) -> dict:
    """Held-out exact match by operand length (1..digits) for each task kind, one small model per kind.

    ``eval_problems`` held-out problems per length (both operands of that length).
    """
    out = _check_common(out, steps, batch_size, lr, eval_problems, seed, shape)
    kinds = _choices("kinds", kinds, KINDS)
    digits = _option("digits", check_count, digits, lo=1, hi=4)
    _option("reverse", check_bool, reverse)
    p = _option("p", check_count, p, lo=2, hi=10**9)
    t0 = time.perf_counter()
    tok = full_tokenizer()
    rows, curves = [], {}
    for k, kind in enumerate(kinds):
        t_kind = time.perf_counter()
        task = ReasoningTask(kind, digits, min_digits=1, reverse=reverse, p=p)
        model = build_model("learned", tok.vocab_size, task.max_line_length, shape, seed + k)
        rng = np.random.default_rng(seed + 1000 + k)
        losses = train_steps(model, task_batches(task, rng, batch_size, tok), steps, lr=lr)
        items = heldout_by_length(kind, range(1, digits + 1), eval_problems, np.random.default_rng(seed + 2000 + k),
                                  reverse=reverse, p=p)
        scores = evaluate_by_length(model, items, tok)
        overall = sum(s.correct for s in scores) / sum(s.total for s in scores)
        for s in scores:
            rows.append([kind, s.length, s.correct, s.total, s.accuracy])
        curves[kind] = scores
        log(f"{kind:8s} e.g. {task.sample(rng, 1)[0].text!r:28s} loss {np.mean(losses[-50:]):.3f}  "
            f"exact match {overall:.1%}  ({time.perf_counter() - t_kind:.0f} s)")
    _write_table(out, "tasks", ["task", "length", "correct", "total", "exact_match"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, scores in curves.items():
        ax.plot([s.length for s in scores], [s.accuracy for s in scores], marker="o", label=kind)
    ax.set_xlabel("operand length (digits)")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(range(1, digits + 1))
    ax.set_title(f"one model per task, trained {steps} steps on 1..{digits} digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tasks.png", dpi=120)
    plt.close(fig)
    options = dict(kinds=list(kinds), digits=digits, steps=steps, batch_size=batch_size, lr=lr,
                   eval_problems=eval_problems, reverse=reverse, p=p, seed=seed, shape=asdict(shape))
    return _summary(out, "tasks", options, t0, {"rows": rows})


# -- study: length -------------------------------------------------------------------------------------
def study_length(out, *, kind: str = "add", train_digits: int = 2,
                 positions: Sequence[str] = ("learned", "rope", "alibi"),
                 reverse_modes: Sequence[bool] = (True, False), index_hints: bool = False, steps: int = 1200,
                 batch_size: int = 64, lr: float = 3e-3, eval_problems: int = 100, seed: int = 0,
                 shape: ModelShape = ModelShape(), log: Callable[[str], None] = print) -> dict:
    """Train on operands of 1..n digits (n = ``train_digits``), test at every length 1..2n.

    One model per (position scheme, reversed answers or not); ``index_hints`` marks every digit
    with its place in all of them. ``eval_problems`` held-out problems per length.
    """
    out = _check_common(out, steps, batch_size, lr, eval_problems, seed, shape)
    kind = _choice("kind", kind, ("add", "sub", "mul", "compare", "mod"))
    n = _option("train_digits", check_count, train_digits, lo=1, hi=4)
    positions = _choices("positions", positions, POSITIONS)
    if not variant_available() and positions != ("learned",):
        raise ReasoningError("positions", f"expected ('learned',) (npformer.models.variant, which has the other "
                                          f"schemes, cannot be imported), got {positions}")
    if not isinstance(reverse_modes, (list, tuple)) or not reverse_modes or \
            len(set(reverse_modes)) != len(reverse_modes):
        raise ReasoningError("reverse_modes",
                             f"expected a non-empty tuple of distinct bools, got {reverse_modes!r:.40}")
    for r in reverse_modes:
        _option("reverse_modes", check_bool, r)
    _option("index_hints", check_bool, index_hints)
    t0 = time.perf_counter()
    tok = full_tokenizer()
    lengths = list(range(1, 2 * n + 1))
    block = ReasoningTask(kind, 2 * n, index_hints=index_hints, reverse=True).max_line_length
    rows, curves = [], {}
    for r_i, reverse in enumerate(reverse_modes):
        task = ReasoningTask(kind, n, min_digits=1, reverse=reverse, index_hints=index_hints)
        items = heldout_by_length(kind, lengths, eval_problems, np.random.default_rng(seed + 2000),
                                  reverse=reverse, index_hints=index_hints)
        for position in positions:
            t_run = time.perf_counter()
            model = build_model(position, tok.vocab_size, block, shape, seed)
            rng = np.random.default_rng(seed + 1000 + r_i)
            train_steps(model, task_batches(task, rng, batch_size, tok), steps, lr=lr)
            scores = evaluate_by_length(model, items, tok)
            label = f"{position}, {'reversed' if reverse else 'plain'}"
            curves[label] = scores
            for s in scores:
                rows.append([position, reverse, index_hints, s.length, "train" if s.length <= n else "unseen",
                             s.correct, s.total, s.accuracy])
            seen = [s.accuracy for s in scores if s.length <= n]
            unseen = [s.accuracy for s in scores if s.length > n]
            log(f"{label:22s} lengths 1..{n}: {np.mean(seen):.1%}   {n + 1}..{2 * n}: {np.mean(unseen):.1%}  "
                f"({time.perf_counter() - t_run:.0f} s)")
    _write_table(out, "length", ["position", "reversed", "index_hints", "length", "seen", "correct", "total",
                                 "exact_match"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, scores in curves.items():
        ax.plot([s.length for s in scores], [s.accuracy for s in scores], marker="o",
                linestyle="-" if "reversed" in label else "--", label=label)
    ax.axvspan(0.5, n + 0.5, color="0.9", zorder=0, label="training lengths")
    ax.set_xlabel("operand length (digits)")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(lengths)
    ax.set_title(f"{kind}: trained on 1..{n} digits{', index hints' if index_hints else ''}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "length.png", dpi=120)
    plt.close(fig)
    options = dict(kind=kind, train_digits=n, positions=list(positions), reverse_modes=list(reverse_modes),
                   index_hints=index_hints, steps=steps, batch_size=batch_size, lr=lr, eval_problems=eval_problems,
                   seed=seed, shape=asdict(shape))
    return _summary(out, "length", options, t0, {"rows": rows})


# -- study: grokking -----------------------------------------------------------------------------------
@dataclass
class GrokkingRecord:
    """Accuracies recorded every ``eval_every`` steps (and at step 0 and the last step)."""

    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    val_acc: List[float] = field(default_factory=list)
    model: object = field(default=None, repr=False)  # the trained model, for a look after the run

    def first_step_at(self, which: str, level: float) -> Optional[int]:
        """The first recorded step where ``which`` ("train_acc" or "val_acc") reached ``level`` (None if never)."""
        values = getattr(self, which)
        return next((s for s, v in zip(self.steps, values) if v >= level), None)


def run_grokking(p: int = 97, train_fraction: float = 0.5, steps: int = 2000, batch_size: int = 256,
                 lr: float = 3e-3, weight_decay: float = 1.0, eval_every: int = 50, seed: int = 0,
                 shape: ModelShape = ModelShape(n_layer=1, n_head=4, d_model=128),
                 log: Optional[Callable[[str], None]] = None) -> Tuple[GrokkingRecord, dict]:
    """Train on ``train_fraction`` of all (a, b) in [0, p)^2 for (a + b) mod p; -> (record, facts).

    The split is ``ReasoningTask``'s hash split (held out with probability 1 - train_fraction).
    Each step is a minibatch of ``batch_size`` training pairs (all of them when fewer), drawn
    without replacement within an epoch; the learning rate is warmed up over 10 steps and then
    constant. Accuracies are exact match (``teacher_forced_exact``) on every training pair
    and every held-out pair, at step 0, every ``eval_every`` steps and the last step.
    """
    p = _option("p", check_count, p, lo=2, hi=997)
    train_fraction = _option("train_fraction", check_real, train_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        _option(name, check_count, value, lo=1, hi=10**7)
    _option("seed", check_count, seed, lo=0)
    _option("lr", check_real, lr, lo=0.0, lo_open=True, hi=1.0)
    _option("weight_decay", check_real, weight_decay, lo=0.0)
    if not isinstance(shape, ModelShape):
        raise ReasoningError("shape", f"expected a ModelShape, got {type(shape).__name__}")
    shape.check()
    tok = full_tokenizer()
    task = ReasoningTask("mod", len(str(p - 1)), fixed_width=True, p=p, heldout_fraction=1.0 - train_fraction)
    train, val = task.split_pairs(task.all_pairs())
    if not train or not val:
        raise ReasoningError("train_fraction", f"expected a split with pairs on both sides for p = {p}, got "
                                               f"{len(train)} training and {len(val)} held-out pairs")
    x_all, y_all, _ = make_batch(train, tok)
    model = build_model("learned", tok.vocab_size, x_all.shape[1], shape, seed)
    rng = np.random.default_rng(seed + 1)
    record = GrokkingRecord(model=model)
    order: List[int] = []

    def next_batch(step: int):
        nonlocal order
        if len(order) < min(batch_size, len(train)):
            order = order + rng.permutation(len(train)).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        return x_all[rows], y_all[rows]

    def measure(step: int, loss: float) -> None:
        record.steps.append(step)
        record.train_loss.append(loss)
        record.train_acc.append(float(teacher_forced_exact(model, train, tok).mean()))
        record.val_acc.append(float(teacher_forced_exact(model, val, tok).mean()))
        if log is not None:
            log(f"step {step:6d}  loss {loss:.4f}  train {record.train_acc[-1]:.1%}  held-out {record.val_acc[-1]:.1%}")

    model.eval()  # the step-0 loss only: no backward follows, so no caches are kept
    _, loss0 = model.forward(x_all[:batch_size], y_all[:batch_size])
    model.train()
    measure(0, float(loss0))

    def on_step(step: int, loss: float) -> None:
        if step % eval_every == 0 or step == steps:
            measure(step, loss)

    train_steps(model, next_batch, steps, lr=lr, weight_decay=weight_decay, warmup=10, schedule="constant",
                on_step=on_step)
    facts = {"p": p, "train_pairs": len(train), "heldout_pairs": len(val), "example": train[0].text,
             "train_99": record.first_step_at("train_acc", 0.99), "val_99": record.first_step_at("val_acc", 0.99),
             "val_50": record.first_step_at("val_acc", 0.5), "final_train": record.train_acc[-1],
             "val_at_train_99": (None if record.first_step_at("train_acc", 0.99) is None else
                                 record.val_acc[record.steps.index(record.first_step_at("train_acc", 0.99))]),
             "final_val": record.val_acc[-1]}
    return record, facts


def grokking_verdict(facts: dict, steps: int) -> str:
    """One sentence on whether held-out accuracy came late (delayed generalisation) within the run."""
    tr, va = facts["train_99"], facts["val_99"]
    if tr is None:
        final_train, final_val = facts["final_train"], facts["final_val"]
        head = (f"training accuracy never reached 99% within {steps} steps (final: train {final_train:.1%}, "
                f"held-out {final_val:.1%}): ")
        if final_train >= 0.1 and final_val >= 0.8 * final_train:
            return head + ("held-out accuracy rose with training accuracy, generalisation without a memorisation "
                           "phase, so no delayed generalisation (grokking) within this budget")
        return head + "no memorisation yet, so no grokking to see within this budget"
    if va is None:
        then, final = facts.get("val_at_train_99"), facts["final_val"]
        then_text = "" if then is None else f", held-out then {then:.1%}"
        if then is not None and final - then >= 0.1:
            return (f"memorised (train 99% at step {tr}{then_text}); held-out accuracy kept rising after that, to "
                    f"{final:.1%} at step {steps}, without reaching 99%: the start of a delayed generalisation, "
                    f"not finished within this budget")
        return (f"memorised (train 99% at step {tr}{then_text}) but held-out accuracy was {final:.1%} after "
                f"{steps} steps: no delayed generalisation within this budget")
    lag = va - tr
    if lag >= max(2 * tr, 200):
        return f"delayed generalisation: train reached 99% at step {tr}, held-out only at step {va} ({lag} steps later)"
    return f"train and held-out reached 99% close together (steps {tr} and {va}): generalisation without a long delay"


def study_grokking(out, *, p: int = 97, train_fraction: float = 0.5, steps: int = 2000, batch_size: int = 256,
                   lr: float = 3e-3, weight_decay: float = 1.0, eval_every: int = 50, seed: int = 0,
                   shape: ModelShape = ModelShape(n_layer=1, n_head=4, d_model=128),
                   log: Callable[[str], None] = print) -> dict:
    """``run_grokking``, then ``grokking.csv``/``.md`` (one row per measurement) and ``grokking.png``."""
    out = _check_common(out, steps, batch_size, lr, 1, seed, shape)
    t0 = time.perf_counter()
    record, facts = run_grokking(p, train_fraction, steps, batch_size, lr, weight_decay, eval_every, seed, shape, log)
    rows = [[s, l, a, v] for s, l, a, v in zip(record.steps, record.train_loss, record.train_acc, record.val_acc)]
    _write_table(out, "grokking", ["step", "train_loss", "train_exact_match", "heldout_exact_match"], rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [max(s, 1) for s in record.steps]
    ax.plot(xs, record.train_acc, label="train")
    ax.plot(xs, record.val_acc, label="held out")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"(a+b) mod {facts['p']}: {facts['train_pairs']} training pairs, AdamW wd={weight_decay}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "grokking.png", dpi=120)
    plt.close(fig)
    verdict = grokking_verdict(facts, steps)
    log(verdict)
    options = dict(p=p, train_fraction=train_fraction, steps=steps, batch_size=batch_size, lr=lr,
                   weight_decay=weight_decay, eval_every=eval_every, seed=seed, shape=asdict(shape))
    return _summary(out, "grokking", options, t0, {**facts, "verdict": verdict})


# -- the command: npformer reasoning tasks|length|grokking ----------------------------------------------
_DEFAULT_OUT = {s: f"runs/reasoning_{s}" for s in STUDIES}  # as npformer experiment's runs/study_<name>


def add_reasoning_parser(sub):
    """Add ``reasoning`` and its three studies to a subparsers object; -> the ``reasoning`` parser."""
    import argparse

    p = sub.add_parser("reasoning", help="arithmetic reasoning studies: exact match by operand length (tasks), "
                                         "length generalisation (length), grokking",
                       description="Train small decoders on arithmetic written as text (loss on the answers only) "
                                   "and write a CSV/Markdown table, PNG plots and summary.json to --out.")
    studies = p.add_subparsers(dest="study", required=True, metavar="{tasks,length,grokking}")
    helps = {"tasks": "exact match by operand length for each task kind, one small model per kind",
             "length": "train on 1..n digits, test on 1..2n; learned vs RoPE vs ALiBi, reversed or not",
             "grokking": "(a+b) mod p on a fraction of all pairs with AdamW weight decay; accuracy over steps"}
    defaults = {"tasks": dict(steps=1200, batch_size=64, lr=3e-3, n_layer=2, n_head=4, d_model=64),
                "length": dict(steps=1200, batch_size=64, lr=3e-3, n_layer=2, n_head=4, d_model=64),
                "grokking": dict(steps=2000, batch_size=256, lr=3e-3, n_layer=1, n_head=4, d_model=128)}
    for name in STUDIES:
        s = studies.add_parser(name, help=helps[name], description=helps[name])
        d = defaults[name]
        s.add_argument("--out", default=_DEFAULT_OUT[name], help=f"output folder (default: {_DEFAULT_OUT[name]})")
        s.add_argument("--steps", type=int, default=d["steps"],
                       help=f"training steps per model (default: {d['steps']})")
        s.add_argument("--batch-size", type=int, default=d["batch_size"],
                       help=f"problems per step (default: {d['batch_size']})")
        s.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default: {d['lr']})")
        s.add_argument("--seed", type=int, default=0, help="seed of models and problems (default: 0)")
        for f in ("n_layer", "n_head", "d_model"):
            s.add_argument("--" + f.replace("_", "-"), type=int, default=d[f], help=f"model {f} (default: {d[f]})")
        if name != "grokking":
            s.add_argument("--eval-problems", type=int, default=100,
                           help="held-out problems per operand length (default: 100)")
        if name == "tasks":
            s.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated kinds (default: all of {KINDS})")
            s.add_argument("--digits", type=int, default=3, help="operands of 1..digits digits, <= 4 (default: 3)")
            s.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=True,
                           help="answers least significant digit first (default: True)")
            s.add_argument("--p", type=int, default=97, help="modulus of the mod task (default: 97)")
        if name == "length":
            s.add_argument("--kind", default="add", help="task kind: add, sub, mul, compare, mod (default: add)")
            s.add_argument("--train-digits", type=int, default=2,
                           help="train on 1..n digits, test on 1..2n, n <= 4 (default: 2)")
            s.add_argument("--positions", default="learned,rope,alibi",
                           help=f"comma-separated position schemes of {POSITIONS} (default: learned,rope,alibi)")
            s.add_argument("--reverse-modes", default="reversed,plain",
                           help="comma-separated answer orders: reversed, plain (default: both)")
            s.add_argument("--index-hints", action="store_true", help="mark every digit with its place (default: off)")
        if name == "grokking":
            s.add_argument("--p", type=int, default=97, help="the modulus, 2..997 (default: 97)")
            s.add_argument("--train-fraction", type=float, default=0.5,
                           help="fraction of all pairs trained on, in (0, 1) (default: 0.5)")
            s.add_argument("--weight-decay", type=float, default=1.0, help="AdamW weight decay (default: 1.0)")
            s.add_argument("--eval-every", type=int, default=50, help="steps between measurements (default: 50)")
    return p


def run_reasoning(args) -> int:
    """Run the study ``args.study`` from parsed options; ``ReasoningError`` names a bad one."""
    with _one_blas_thread():
        summary = _run_study(args)
    out = Path(args.out)
    print((out / f"{args.study}.md").read_text(), end="" if args.study != "grokking" else "\n")
    print(f"{args.study}: {summary['seconds']:.1f} s; tables and plots in {out}")
    return 0


def _run_study(args) -> dict:
    shape = ModelShape(args.n_layer, args.n_head, args.d_model)
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, shape=shape)
    if args.study == "tasks":
        summary = study_tasks(args.out, kinds=args.kinds, digits=args.digits, reverse=args.reverse, p=args.p,
                              eval_problems=args.eval_problems, **common)
    elif args.study == "length":
        modes = _choices("reverse_modes", args.reverse_modes, ("reversed", "plain"))
        summary = study_length(args.out, kind=args.kind, train_digits=args.train_digits, positions=args.positions,
                               reverse_modes=tuple(m == "reversed" for m in modes), index_hints=args.index_hints,
                               eval_problems=args.eval_problems, **common)
    else:
        summary = study_grokking(args.out, p=args.p, train_fraction=args.train_fraction,
                                 weight_decay=args.weight_decay, eval_every=args.eval_every, **common)
    return summary
