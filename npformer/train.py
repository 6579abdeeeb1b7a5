"""Training loop for a character-level GPT on a text corpus.

``python -m npformer train`` runs ``train(TrainConfig(...))``: AdamW with warmup +
cosine decay, gradient clipping, periodic validation and samples, an atomic
checkpoint (model, optimizer, RNG streams, step, the data's fingerprint), and a
loss-curve PNG. With ``resume=True`` it continues from the checkpoint so that every
later loss equals the one an uninterrupted run would have printed.

Every option is checked before any work, and a bad one raises ``ConfigError``
naming the field (the command line turns it into ``argument --field: ...``):

- ``TrainConfig.validate`` checks each field on its own (types, ranges, choices,
  that ``n_head`` divides ``d_model``, that ``data`` names a file);
- ``train`` then checks what needs the checkpoint or the data: a run is never
  overwritten without ``overwrite=True``; a resumed run must find its checkpoint,
  keep its model, seed and data (the same text, hence the same vocabulary), and
  have steps left; the text must be long enough for ``block_size``; and the
  estimated memory of a training step must fit in the memory available.

Nothing is written (not even ``out_dir``) until all of that has passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import checkpoint
from ._memory import reuse_freed_memory
from .data.bpe import ByteBPE
from .data.char import CharTokenizer
from .data.corpus import default_corpus, get_batch, train_val_split
from .data.vocab import check_vocab, tokenizer_difference
from .generate import generate
from .models.gpt import GPT, GPTConfig
from .ops._checks import check_bool, check_count, check_real
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
    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 200
    eval_batches: int = 8
    sample_tokens: int = 120
    out_dir: str = "runs/gpt"
    checkpoint_format: str = "npz"  # or "safetensors"
    seed: int = 1337
    resume: bool = False
    stop_at: int = 0  # if > 0, save and stop after this many steps (a run to --resume later)
    progress: bool = True
    overwrite: bool = False  # replace a run already saved in out_dir

    @classmethod
    def from_json(cls, path: str, **overrides) -> "TrainConfig":
        """Fields from a JSON object in ``path``; ``overrides`` that are not None win."""
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"TrainConfig.from_json: argument 'path' expected a readable JSON file, "
                             f"got {str(path)!r}: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"TrainConfig.from_json: argument 'path' expected a JSON object of fields, "
                             f"got a JSON {type(values).__name__} in {path}")
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TrainConfig.from_json: argument 'path' holds unknown fields {sorted(unknown)} ({path})")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> "TrainConfig":
        """Check every field on its own; raises ``ConfigError`` naming the first bad one."""
        _field(self, "data", _check_data)
        _field(self, "val_fraction", check_real, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        for name in ("n_layer", "n_head", "d_model", "block_size", "steps", "batch_size", "eval_interval",
                     "eval_batches"):
            _field(self, name, check_count, lo=1)
        for name in ("warmup", "sample_tokens", "seed", "stop_at"):
            _field(self, name, check_count, lo=0)
        if self.d_model % self.n_head:
            raise ConfigError("n_head", f"expected a divisor of d_model = {self.d_model}, got {self.n_head}")
        _field(self, "dropout", check_real, lo=0.0, hi=1.0, hi_open=True)
        _field(self, "lr", check_real, lo=0.0, lo_open=True)
        _field(self, "min_lr", check_real, lo=0.0, hi=float(self.lr))
        _field(self, "weight_decay", check_real, lo=0.0)
        _field(self, "grad_clip", check_real, lo=0.0, lo_open=True)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out_dir", f"expected a folder name, got {self.out_dir!r}")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ConfigError("out_dir", f"expected a folder, got {self.out_dir!r}, which is a file")
        for name in ("resume", "progress", "overwrite"):
            _field(self, name, check_bool)
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "cannot be combined with resume (continue a run, or replace it)")
        return self


# One line of help per field (the command line's --help shows it with the default).
FIELD_HELP = {
    "data": "'default' (text from the standard library's help and docstrings) or a UTF-8 text file",
    "val_fraction": "fraction of the text held out for the validation loss, in (0, 1)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads; must divide --d-model",
    "d_model": "width of the residual stream",
    "block_size": "context length in tokens",
    "dropout": "dropout rate, in [0, 1)",
    "dtype": "floating-point type of weights and activations",
    "steps": "optimisation steps of the whole run (resume with a larger value to extend a finished run)",
    "batch_size": "sequences per step",
    "lr": "peak learning rate, reached after the warmup",
    "min_lr": "learning rate at the end of the cosine decay (at most --lr)",
    "warmup": "steps of linear learning-rate warmup",
    "weight_decay": "AdamW weight decay of the weight matrices",
    "grad_clip": "clip the global gradient norm to this value",
    "eval_interval": "every this many steps: validation loss, a sample and a checkpoint",
    "eval_batches": "batches averaged for the validation loss",
    "sample_tokens": "characters sampled at each validation (0: no sample)",
    "out_dir": "run folder: checkpoint ckpt.<format> and loss.png",
    "checkpoint_format": "checkpoint file format",
    "seed": "seed of the initialisation, the batches and dropout",
    "resume": "continue the run saved in --out-dir with its own settings (flags given here override them)",
    "stop_at": "if > 0, save and stop after this many steps (to --resume later)",
    "progress": "progress bar with loss, tokens/s and time left",
    "overwrite": "replace a run already saved in --out-dir (otherwise refused)",
}
CHOICES = {"dtype": ("float32", "float64"), "checkpoint_format": ("npz", "safetensors")}
# What a resumed run must share with its checkpoint: the model, the data split, and the parameter
# groups' decay, all of which the saved state depends on. The text itself is compared by content.
FIXED_ON_RESUME = ("val_fraction", "n_layer", "n_head", "d_model", "block_size", "dropout", "dtype",
                   "weight_decay", "seed")
# Fields a resumed run does not take from its checkpoint: they say what to do this time.
NOT_INHERITED = ("resume", "overwrite", "stop_at")


class ConfigError(ValueError):
    """A training option that cannot work: ``field`` names it, ``reason`` says what was expected and what came."""

    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"train: argument '{field_name}' {reason}")


def _field(cfg: TrainConfig, name: str, check, **options) -> None:
    """Run a ``_checks`` helper on one field, as a ``ConfigError`` naming it."""
    try:
        check("train", name, getattr(cfg, name), **options)
    except ValueError as e:
        raise ConfigError(name, str(e).split(f"argument '{name}' ", 1)[-1]) from None


def _check_data(op: str, name: str, data: object) -> None:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{op}: argument '{name}' expected 'default' or a file name, got {data!r}")
    if data != "default" and not Path(data).is_file():
        why = "a folder" if Path(data).is_dir() else "no such file"
        raise ValueError(f"{op}: argument '{name}' expected 'default' or a text file, got {data!r} ({why})")


@dataclass
class History:
    steps: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    val_steps: List[int] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)


def load_text(cfg: TrainConfig) -> str:
    if cfg.data == "default":
        return default_corpus()
    try:
        text = Path(cfg.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("data", f"expected a readable UTF-8 text file, got {cfg.data!r}: {e}") from e
    if not text:
        raise ConfigError("data", f"expected some text, got an empty file {cfg.data!r}")
    return text


def fingerprint(text: str) -> Dict[str, object]:
    """What identifies a training text in a checkpoint: its length and SHA-256."""
    return {"characters": len(text), "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def estimate_loss(model: GPT, data: np.ndarray, cfg: TrainConfig) -> float:
    """Mean loss over ``eval_batches`` fixed batches (a fixed generator, so comparable across steps)."""
    rng = np.random.default_rng(0)
    model.eval()
    losses = [model.forward(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1] for _ in range(cfg.eval_batches)]
    model.train()
    return float(np.mean(losses))


def checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"ckpt.{cfg.checkpoint_format}"


def saved_runs(out_dir: str | os.PathLike) -> List[Path]:
    """The checkpoints already in ``out_dir`` (either format)."""
    return [p for p in (Path(out_dir) / f"ckpt.{fmt}" for fmt in CHOICES["checkpoint_format"]) if p.is_file()]


# -- memory -------------------------------------------------------------------------------------
def estimate_memory(mcfg: GPTConfig, batch_size: int) -> Dict[str, int]:
    """Bytes of one training step, roughly (within a factor of about two), by part.

    Parameters, their gradients and AdamW's two moments are four copies of the weights.
    Activations kept for the backward per block: about 24 (B, T, D) arrays (norms, q/k/v,
    the 4D-wide MLP, residuals) and the attention probabilities (B, H, T, T), plus one
    more (B, H, T, T) for the backward's softmax gradient; at the head, logits,
    probabilities and their gradient (B, T, V).
    """
    B, T, L, H, D, V = batch_size, mcfg.block_size, mcfg.n_layer, mcfg.n_head, mcfg.d_model, mcfg.vocab_size
    item = np.dtype(mcfg.dtype).itemsize
    n_params = L * (12 * D * D + 13 * D) + (V + T) * D + 2 * D
    attention = (L + 1) * B * H * T * T
    other = L * 24 * B * T * D + 3 * B * T * V
    return {"parameters": n_params * item, "gradients": n_params * item, "optimizer": 2 * n_params * item,
            "attention": attention * item, "activations": other * item}


def available_memory() -> Optional[int]:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else sysconf); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def check_memory(mcfg: GPTConfig, batch_size: int, available: Optional[int] = None, field_names=None) -> int:
    """The estimated bytes of a training step; ``ConfigError`` if more than ``available`` (default: now).

    The error names the option that drives the largest part: ``block_size`` for the attention
    (quadratic in T), ``batch_size`` for the other activations, ``d_model`` for the weights.
    """
    parts = estimate_memory(mcfg, batch_size)
    total = sum(parts.values())
    available = available_memory() if available is None else available
    if available is not None and total > available:
        weights = parts["parameters"] + parts["gradients"] + parts["optimizer"]
        largest = max((parts["attention"], "block_size"), (parts["activations"], "batch_size"), (weights, "d_model"))[1]
        sizes = ("block_size", "batch_size", "d_model", "n_layer")
        names = {name: (field_names or {}).get(name, name) for name in sizes}
        detail = ", ".join(f"{k} {_bytes(v)}" for k, v in parts.items())
        lower = ", ".join("--" + names[n].replace("_", "-") for n in sizes)
        raise ConfigError(names[largest],
                          f"needs about {_bytes(total)} for one training step ({detail}; batch {batch_size} x "
                          f"block {mcfg.block_size}), but {_bytes(available)} is available: lower one of {lower}")
    return total


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# -- the tokenizer and data of a saved run -------------------------------------------------------
def tokenizer_from_checkpoint(state: Dict[str, object], where: str):
    """The checkpoint's tokenizer, checked against the model's ``vocab_size`` here, at load, rather than
    at the first id it cannot decode. A problem raises ``CheckpointError`` naming ``where``."""
    vocab, mcfg = state.get("vocab"), state.get("model_config")
    if not isinstance(vocab, dict) or not isinstance(mcfg, dict):
        raise checkpoint.CheckpointError(f"{where}: no vocab or model_config entry (not a training checkpoint)")
    kinds = {"char": CharTokenizer, "byte-bpe": ByteBPE}
    kind = vocab.get("kind", "char")
    if kind not in kinds:
        raise checkpoint.CheckpointError(f"{where}: unknown tokenizer kind {kind!r} (expected one of {sorted(kinds)})")
    try:
        tok = kinds[kind].from_dict(vocab)
        check_vocab(tok, mcfg.get("vocab_size"), where)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{where}: its vocabulary does not fit its model: {e}") from e
    return tok


def _load_run(cfg: TrainConfig) -> Dict[str, object]:
    """The checkpoint of the run to resume, checked against ``cfg`` (but not yet against the data)."""
    path = checkpoint_path(cfg)
    if not path.is_file():
        others = [p.name for p in saved_runs(cfg.out_dir) if p != path]
        hint = f" (there is {others[0]}: pass --checkpoint-format {others[0].split('.', 1)[1]})" if others else \
            " (train one first, without --resume)"
        raise ConfigError("resume", f"expected a checkpoint to resume, but there is no {path}{hint}")
    state = checkpoint.load(path)
    _check_run_state(state, path)
    tokenizer_from_checkpoint(state, str(path))
    saved = state["config"]
    for name in FIXED_ON_RESUME:
        if name in saved and saved[name] != getattr(cfg, name):
            raise ConfigError(name, f"expected {saved[name]!r} as in {path} (a resumed run keeps its model, data "
                                    f"split and seed), got {getattr(cfg, name)!r}")
    done = int(state["step"])
    if cfg.steps < done:
        raise ConfigError("steps", f"expected at least the {done} steps {path} has done, got {cfg.steps}")
    if cfg.stop_at and cfg.stop_at <= done:
        raise ConfigError("stop_at", f"expected 0 or more than the {done} steps {path} has done, got {cfg.stop_at}")
    return state


RUN_ENTRIES = ("config", "model_config", "vocab", "model", "optim", "step", "rng", "history")


def _check_run_state(state: Dict[str, object], path: Path) -> None:
    """A checkpoint ``train`` wrote: every entry a resume reads is there, of the right kind."""
    missing = [k for k in RUN_ENTRIES if k not in state]
    if missing:
        raise checkpoint.CheckpointError(f"{path}: not a training run's checkpoint (no {', '.join(missing)})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise checkpoint.CheckpointError(f"{path}: 'step' expected an integer >= 0, got {step!r}")
    history = state["history"]
    if not isinstance(history, dict) or set(history) != {f.name for f in fields(History)}:
        raise checkpoint.CheckpointError(f"{path}: 'history' expected the entries "
                                         f"{[f.name for f in fields(History)]}, got {history!r:.80}")
    if not isinstance(state["config"], dict) or not isinstance(state["rng"], dict) \
            or not {"data", "model"} <= set(state["rng"]):
        raise checkpoint.CheckpointError(f"{path}: 'config' and 'rng' expected the entries a training run saves")


def _check_same_data(state: Dict[str, object], tok: CharTokenizer, text: str, path: Path) -> None:
    difference = tokenizer_difference(tokenizer_from_checkpoint(state, str(path)), tok)
    if difference:
        raise ConfigError("data", f"expected the text {path} was trained on, but its vocabulary differs: {difference}")
    saved = state.get("data")
    here = fingerprint(text)
    if isinstance(saved, dict) and saved != here:
        raise ConfigError("data", f"expected the text {path} was trained on ({saved.get('characters')} characters, "
                                  f"sha256 {str(saved.get('sha256'))[:12]}...), got {here['characters']} characters, "
                                  f"sha256 {here['sha256'][:12]}...")


# -- the loop ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, log=print) -> Dict[str, object]:
    """Train and return a summary (final losses, training tokens/s, checkpoint path, history).

    ``tokens_per_s`` counts the training steps' time only (not validation, sampling or saving).
    A resumed run that has already done ``steps`` steps trains nothing: the summary has
    ``complete=True`` and ``steps_run=0``.
    """
    reuse_freed_memory()
    cfg.validate()
    path = checkpoint_path(cfg)
    state = None
    if cfg.resume:
        state = _load_run(cfg)
        if int(state["step"]) == cfg.steps:
            history = History(**state["history"])
            log(f"{path} is a finished run ({cfg.steps} of {cfg.steps} steps): nothing to do. To train it further, "
                f"resume with a larger --steps, e.g. npformer train --resume --out-dir {cfg.out_dir} "
                f"--steps {2 * cfg.steps}")
            return {"complete": True, "steps_run": 0, "step": cfg.steps,
                    "train_loss": history.train_loss[-1] if history.train_loss else None,
                    "val_loss": history.val_loss[-1] if history.val_loss else None,
                    "tokens_per_s": None, "checkpoint": str(path), "plot": None, "history": history}
    elif saved_runs(cfg.out_dir) and not cfg.overwrite:
        names = ", ".join(str(p) for p in saved_runs(cfg.out_dir))
        raise ConfigError("out_dir", f"expected a folder without a run, but {names} exists: pass --resume to "
                                     f"continue it, --overwrite to replace it, or another --out-dir")

    text = load_text(cfg)
    tok = CharTokenizer.from_text(text)
    if state is not None:
        _check_same_data(state, tok, text, path)
    ids = tok.encode_array(text)
    train_ids, val_ids = train_val_split(ids, cfg.val_fraction, seed=cfg.seed)
    shortest = min(len(train_ids), len(val_ids))
    if shortest <= cfg.block_size:
        raise ConfigError("block_size", f"expected fewer tokens than the shortest split of the data "
                                        f"({len(train_ids)} train, {len(val_ids)} validation), got {cfg.block_size}")
    mcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     d_model=cfg.d_model, dropout=cfg.dropout, dtype=cfg.dtype)
    check_memory(mcfg, cfg.batch_size)

    # Every check has passed: from here on, work and write.
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = GPT(mcfg, seed=cfg.seed)
    opt = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    data_rng = np.random.default_rng(cfg.seed + 1)
    history, start = History(), 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        data_rng.bit_generator.state = state["rng"]["data"]
        model.rng.bit_generator.state = state["rng"]["model"]
        history = History(**state["history"])
        start = int(state["step"])
        log(f"resumed from {path} at step {start} of {cfg.steps}")

    def save(step: int) -> Path:
        return checkpoint.save(path, {
            "config": asdict(cfg), "model_config": mcfg.to_dict(), "vocab": tok.to_dict(), "data": fingerprint(text),
            "model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "rng": {"data": data_rng.bit_generator.state, "model": model.rng.bit_generator.state},
            "history": asdict(history),
        })

    log(f"model: {model.num_parameters():,} parameters, vocab {tok.vocab_size}, "
        f"{len(train_ids):,} train / {len(val_ids):,} val tokens, {cfg.dtype}")
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)
    tokens_per_step = cfg.batch_size * cfg.block_size
    prompt = tok.encode_array("\n" if "\n" in tok.stoi else text[0])[None]  # (1, 1)
    bar = _progress(range(start, cfg.steps), cfg.progress)
    train_time, tokens_seen, steps_run = 0.0, 0, 0
    for step in bar:
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        x, y = get_batch(train_ids, cfg.batch_size, cfg.block_size, data_rng)
        _, loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_time += time.perf_counter() - t  # training throughput: validation, samples and saves excluded
        history.steps.append(step)
        history.train_loss.append(loss)
        tokens_seen += tokens_per_step
        steps_run += 1
        tok_s = tokens_seen / train_time
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_interval == 0 or last:
            val = estimate_loss(model, val_ids, cfg)
            history.val_steps.append(step)
            history.val_loss.append(val)
            text_out = ""
            if cfg.sample_tokens:
                out = generate(model, prompt, cfg.sample_tokens, temperature=0.8, top_k=20,
                               rng=np.random.default_rng(step))
                text_out = tok.decode(out[0].tolist())
            _write(bar, f"\nstep {step + 1}: train {loss:.4f}, val {val:.4f}, {tok_s:,.0f} tok/s (training)\n"
                        f"{text_out}\n")
            save(step + 1)
        if cfg.stop_at and step + 1 >= cfg.stop_at and not last:
            save(step + 1)
            break
    plot = plot_losses(history, out_dir / "loss.png")
    return {"complete": history.steps[-1] + 1 == cfg.steps if history.steps else False, "steps_run": steps_run,
            "step": start + steps_run,
            "train_loss": history.train_loss[-1] if history.train_loss else None,
            "val_loss": history.val_loss[-1] if history.val_loss else None,
            "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
            "checkpoint": str(path), "plot": str(plot), "history": history}


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
