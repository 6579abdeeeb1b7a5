"""Training loop for a character- or BPE-level GPT on a text corpus.

``python -m npformer train`` runs ``train(TrainConfig(...))``: AdamW with warmup +
cosine decay, gradient clipping, periodic validation and samples, an atomic
checkpoint (model, optimizer, RNG streams, step), and a loss-curve PNG. With
``resume=True`` it continues from the checkpoint so that every later loss equals
the one an uninterrupted run would have printed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import checkpoint
from ._memory import reuse_freed_memory
from .data.char import CharTokenizer
from .data.corpus import default_corpus, get_batch, train_val_split
from .generate import generate
from .models.gpt import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine


@dataclass
class TrainConfig:
    # data
    data: str = "default"  # "default" (built-in corpus) or a path to a UTF-8 text file
    val_fraction: float = 0.1
    # model
    n_layer: int = 4
    n_head: int = 6
    d_model: int = 192
    block_size: int = 128
    dropout: float = 0.0
    dtype: str = "float32"
    # optimisation
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 250
    eval_batches: int = 8
    sample_tokens: int = 120
    out_dir: str = "runs/gpt"
    checkpoint_format: str = "npz"  # or "safetensors"
    seed: int = 1337
    resume: bool = False
    stop_at: int = 0  # if > 0, save and stop after this many steps (a run to --resume later)
    progress: bool = True

    @classmethod
    def from_json(cls, path: str, **overrides) -> "TrainConfig":
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys in {path}: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class History:
    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    val_steps: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)


def load_text(cfg: TrainConfig) -> str:
    return default_corpus() if cfg.data == "default" else Path(cfg.data).read_text(encoding="utf-8")


def estimate_loss(model: GPT, data: np.ndarray, cfg: TrainConfig) -> float:
    """Mean loss over ``eval_batches`` fixed batches (a fixed generator, so comparable across steps)."""
    rng = np.random.default_rng(0)
    model.eval()
    losses = [model.forward(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1] for _ in range(cfg.eval_batches)]
    model.train()
    return float(np.mean(losses))


def checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"ckpt.{cfg.checkpoint_format}"


def train(cfg: TrainConfig, log=print) -> Dict[str, object]:
    """Train and return a summary (final losses, tokens/s, checkpoint path, history)."""
    reuse_freed_memory()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = load_text(cfg)
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train_ids, val_ids = train_val_split(ids, cfg.val_fraction, seed=cfg.seed)

    mcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     d_model=cfg.d_model, dropout=cfg.dropout, dtype=cfg.dtype)
    model = GPT(mcfg, seed=cfg.seed)
    opt = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    data_rng = np.random.default_rng(cfg.seed + 1)
    history, start = History(), 0

    if cfg.resume:
        state = checkpoint.load(checkpoint_path(cfg))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        data_rng.bit_generator.state = state["rng"]["data"]
        model.rng.bit_generator.state = state["rng"]["model"]
        history = History(**state["history"])
        start = int(state["step"])
        log(f"resumed from {checkpoint_path(cfg)} at step {start}")

    def save(step: int) -> Path:
        return checkpoint.save(checkpoint_path(cfg), {
            "config": asdict(cfg), "model_config": mcfg.to_dict(), "vocab": tok.to_dict(),
            "model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "rng": {"data": data_rng.bit_generator.state, "model": model.rng.bit_generator.state},
            "history": asdict(history),
        })

    log(f"model: {model.num_parameters():,} parameters, vocab {tok.vocab_size}, "
        f"{len(train_ids):,} train / {len(val_ids):,} val tokens, {cfg.dtype}")
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)
    tokens_per_step = cfg.batch_size * cfg.block_size
    bar = _progress(range(start, cfg.steps), cfg.progress)
    t0, tokens_seen = time.perf_counter(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        x, y = get_batch(train_ids, cfg.batch_size, cfg.block_size, data_rng)
        _, loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        history.steps.append(step)
        history.train_loss.append(loss)
        tokens_seen += tokens_per_step
        tok_s = tokens_seen / (time.perf_counter() - t0)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_interval == 0 or last:
            val = estimate_loss(model, val_ids, cfg)
            history.val_steps.append(step)
            history.val_loss.append(val)
            prompt = np.asarray([tok.encode("\n")], dtype=np.int64)
            text_out = tok.decode(generate(model, prompt, cfg.sample_tokens, temperature=0.8, top_k=20,
                                           rng=np.random.default_rng(step))[0].tolist())
            _write(bar, f"\nstep {step + 1}: train {loss:.4f}, val {val:.4f}, {tok_s:,.0f} tok/s\n{text_out}\n")
            save(step + 1)
        if cfg.stop_at and step + 1 >= cfg.stop_at and not last:
            save(step + 1)
            break
    elapsed = time.perf_counter() - t0
    plot = plot_losses(history, out_dir / "loss.png")
    return {"train_loss": history.train_loss[-1] if history.train_loss else None,
            "val_loss": history.val_loss[-1] if history.val_loss else None,
            "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
            "checkpoint": str(checkpoint_path(cfg)), "plot": str(plot), "history": history}


def _progress(it, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc="train", unit="step", dynamic_ncols=True)


def _write(bar, text: str) -> None:
    (bar.write if hasattr(bar, "write") else print)(text)


def plot_losses(history: History, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.steps, history.train_loss, lw=0.8, alpha=0.7, label="train")
    if history.val_steps:
        ax.plot(history.val_steps, history.val_loss, "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
