"""Training loop for a character-level GPT or LLaMA on a text corpus.

``python -m npformer train`` runs ``train(TrainConfig(...))``: AdamW with warmup +
cosine decay, gradient clipping, periodic validation and samples, an atomic
checkpoint (model, optimizer, RNG streams, step, the data's fingerprint and split),
and a loss-curve PNG. With ``resume=True`` it continues from the checkpoint in
``out_dir`` so that every later loss equals the one an uninterrupted run would have
printed.

With ``precision`` "bfloat16" or "float16" (``--precision``) the step goes through
``npformer.mixed_precision.MixedPrecisionTrainer``: the model computes with a rounded working
copy of float32 master weights, which AdamW updates after the gradients, stored scaled in the
low precision and unscaled, are clipped. float16 scales the loss dynamically: a step whose scaled
gradient overflows is skipped (its batch and loss still count) and the loss scale halved. bfloat16,
with float32's range, keeps a fixed scale of 1 (a gradient that is itself inf or NaN stops the run
as diverged). Between steps the model holds the master
weights, so validation, samples and checkpoints use them; the checkpoint adds the loss scale and
its counters (``mixed_precision``), and a resumed run continues them bit for bit.

Every option is checked before any work, and a bad one raises ``ConfigError``
naming the field (the command line turns it into ``argument --field: ...``):

- ``TrainConfig.validate`` checks each field on its own (types, ranges, choices,
  that ``n_head`` divides ``d_model``, that ``data`` names a regular file, that
  ``out_dir`` is or can become a folder, that ``stop_at`` is at most ``steps``);
- ``train`` then checks what needs the checkpoint or the data: a run is never
  overwritten without ``overwrite=True``; a resumed run must find exactly one
  checkpoint, whose every entry (weights, optimizer state, RNG streams, history) fits
  the run, keep its model, seed and data (the same text, hence the same vocabulary),
  and have steps left; the text must be long enough for ``block_size`` and
  ``val_fraction``; and the estimated memory of a training step must fit in the
  memory available.

Nothing is written (not even ``out_dir``) until all of that has passed.

While it trains, ``train`` stops with ``TrainingDiverged`` (saving nothing) as soon as
the training loss, the gradient norm, the validation loss or a weight is not finite,
and a Ctrl-C (``KeyboardInterrupt``) saves the steps done since the last checkpoint
and raises ``TrainingInterrupted``, so that ``resume=True`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import stat
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

from . import checkpoint
from .data.bpe import ByteBPE
from .data.char import CharTokenizer
from .data.corpus import default_corpus, get_batch, get_prefix_batch, train_val_split
from .data.vocab import check_vocab, tokenizer_difference
from .generate import NonFiniteLogitsError, generate
from . import pretraining
from .pretraining import ENCODERS, OBJECTIVES, SEQ2SEQ
from .mixed_precision import MixedPrecisionTrainer, check_state as check_mp_state
from .models import build as build_model, check_causal_lm, family
from .models.gpt import GPTConfig
from .ops import fastpath
from .ops._checks import check_bool, check_count, check_real
from .optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine

LM_OBJECTIVES = ("clm", "prefix")  # a causal LM's: next token, or next token after a bidirectional prefix (ATT.18)

# Upper bounds of the per-validation work (a larger value is a typo, not a plan).
MAX_EVAL_BATCHES = 1000
MAX_SAMPLE_TOKENS = 10_000


@dataclass
class TrainConfig:
    # data
    data: str = "default"  # "default" (built-in corpus) or a path to a UTF-8 text file
    val_fraction: float = 0.1
    # model
    model: str = "gpt"  # the family: "gpt" (GPT-2), "llama" (RMSNorm, SwiGLU, RoPE, GQA), or an encoder
    objective: str = ""  # "" the family's own: next token for gpt/llama, masked LM for the encoders
    n_layer: int = 4
    n_head: int = 6
    n_kv_head: int = 0  # llama: key/value heads (grouped-query attention); 0 means one per query head
    d_model: int = 192
    block_size: int = 128
    dropout: float = 0.0
    dtype: str = "float32"
    precision: str = "float32"  # or "bfloat16", "float16": a working copy over float32 master weights
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
    # Hugging Face folders
    hf: str = ""  # fine-tune the model of this local folder, with its tokenizer, instead of a new model
    save_hf: str = ""  # also write the model as a Hugging Face folder here at every checkpoint
    # looking inside
    gradflow_every: int = 0  # every this many steps, per-block gradient and activation statistics (0: off)

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
        self._check_hf()  # first: with --hf, the model's own options are the folder's
        _field(self, "val_fraction", check_real, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        for name in ("n_layer", "n_head", "d_model", "block_size", "steps", "batch_size", "eval_interval"):
            _field(self, name, check_count, lo=1)
        _field(self, "eval_batches", check_count, lo=1, hi=MAX_EVAL_BATCHES)
        _field(self, "sample_tokens", check_count, lo=0, hi=MAX_SAMPLE_TOKENS)
        for name in ("warmup", "seed", "stop_at", "gradflow_every"):
            _field(self, name, check_count, lo=0)
        if self.stop_at > self.steps:
            raise ConfigError("stop_at", f"expected 0 or a step at most --steps = {self.steps}, got {self.stop_at}")
        if self.d_model % self.n_head:
            raise ConfigError("n_head", f"expected a divisor of d_model = {self.d_model}, got {self.n_head}")
        _field(self, "dropout", check_real, lo=0.0, hi=1.0, hi_open=True)
        _field(self, "n_kv_head", check_count, lo=0)
        self._check_objective()
        if self.model in SEQ2SEQ:
            self._check_seq2seq_block()
        if self.model == "llama":
            if self.n_kv_head and self.n_head % self.n_kv_head:
                raise ConfigError("n_kv_head", f"expected 0 or a divisor of n_head = {self.n_head}, got {self.n_kv_head}")
            if (self.d_model // self.n_head) % 2:
                raise ConfigError("n_head", f"expected heads of even width for llama's rotary embedding, got "
                                            f"d_model / n_head = {self.d_model} / {self.n_head} = "
                                            f"{self.d_model // self.n_head}")
            if self.dropout:
                raise ConfigError("dropout", f"expected 0 for llama, which has no dropout, got {self.dropout}")
        elif self.n_kv_head:
            raise ConfigError("n_kv_head", f"expected 0 for {self.model!r} (grouped-query attention is llama's), "
                                           f"got {self.n_kv_head}")
        _field(self, "lr", check_real, lo=0.0, lo_open=True)
        _field(self, "min_lr", check_real, lo=0.0, hi=float(self.lr))
        _field(self, "weight_decay", check_real, lo=0.0)
        _field(self, "grad_clip", check_real, lo=0.0, lo_open=True)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.precision != "float32" and self.dtype != "float32":
            raise ConfigError("precision", f"expected float32 with --dtype {self.dtype} (a {self.precision} working "
                                           f"copy is kept over float32 master weights), got {self.precision!r}")
        _check_out_dir(self.out_dir)
        for name in ("resume", "progress", "overwrite"):
            _field(self, name, check_bool)
        if self.resume and self.overwrite:
            raise ConfigError("overwrite", "cannot be combined with resume (continue a run, or replace it)")
        return self

    def _check_objective(self) -> None:
        """The objective must be one the family trains with ('' picks its default)."""
        allowed = OBJECTIVES.get(self.model, LM_OBJECTIVES) if isinstance(self.model, str) else LM_OBJECTIVES
        if not isinstance(self.objective, str) or self.objective not in ("",) + allowed:
            raise ConfigError("objective", f"expected '' or one of {', '.join(allowed)} for --model {self.model}, "
                                           f"got {self.objective!r}")

    def _check_seq2seq_block(self) -> None:
        """An encoder-decoder's source holds at least 4 tokens, and span corruption needs a sentinel per span."""
        from .data.seq2seq_objectives import noise_span_counts, span_raw_length

        if self.block_size < 4:
            raise ConfigError("block_size", f"expected at least 4 for an encoder-decoder (--model {self.model}), "
                                            f"got {self.block_size}")
        if self.resolved_objective == "span":
            spans = noise_span_counts(span_raw_length(self.block_size))[1]
            if spans > pretraining.N_SENTINELS:
                raise ConfigError("block_size", f"expected a source of at most {pretraining.N_SENTINELS} noise spans "
                                                f"for --objective span (one sentinel each), got {self.block_size} "
                                                f"tokens, which hold {spans}")

    @property
    def encoder(self) -> bool:
        """Whether the model is an encoder or an encoder-decoder, pre-trained by ``npformer.pretraining``."""
        return self.model in OBJECTIVES

    @property
    def resolved_objective(self) -> str:
        """The objective the run trains with: ``objective``, or the family's first."""
        return self.objective or OBJECTIVES.get(self.model, LM_OBJECTIVES)[0]

    def _check_hf(self) -> None:
        """--hf names a model folder, whose config sets the model (so the model's own flags keep their
        defaults); --save-hf is a folder that can be written."""
        for name in ("hf", "save_hf"):
            if not isinstance(getattr(self, name), str) or "\x00" in getattr(self, name):
                raise ConfigError(name, f"expected a folder name or '', got {getattr(self, name)!r}")
        if self.hf:
            if not (Path(self.hf) / "config.json").is_file():
                raise ConfigError("hf", f"expected a Hugging Face model folder with a config.json, got {self.hf!r}")
            for name in HF_SETS:
                if getattr(self, name) != getattr(TrainConfig, name):
                    raise ConfigError(name, f"is set by the --hf folder's config.json, so it cannot be given with "
                                            f"--hf (got {getattr(self, name)!r})")
        if self.save_hf:
            try:
                _check_out_dir(self.save_hf)
            except ConfigError as e:
                raise ConfigError("save_hf", e.reason) from None


# The model options a Hugging Face folder sets: with --hf they keep their defaults (block_size stays the
# training window, at most the model's context).
HF_SETS = ("model", "objective", "n_layer", "n_head", "n_kv_head", "d_model", "dropout")


# How the text is split (see ``split_tokens``): chunks of SPLIT_CHUNK tokens where that gives a
# validation share within SPLIT_TOLERANCE of val_fraction (relative to the smaller of the two
# shares), else shorter chunks down to SPLIT_MIN_CHUNK, else the text's last part.
SPLIT_CHUNK = 4096
SPLIT_MIN_CHUNK = 512
SPLIT_TOLERANCE = 0.1

# One line of help per field (the command line's --help shows it with the default).
FIELD_HELP = {
    "data": "'default' (text from the standard library's help and docstrings) or a UTF-8 text file; with "
            "--resume the run's own file unless given, and its content must be the checkpoint's",
    "val_fraction": f"fraction of the text held out for the validation loss, in (0, 1): random chunks of "
                    f"{SPLIT_CHUNK} characters, shorter ones (down to {SPLIT_MIN_CHUNK}) or else the text's "
                    f"end when needed to hold the fraction within {SPLIT_TOLERANCE:.0%} (the split is printed)",
    "model": "model family: gpt (LayerNorm, GELU, learned positions, tied head), llama (RMSNorm, SwiGLU, "
             "rotary positions, grouped-query attention, untied head), an encoder pre-trained with --objective: "
             "bert, roberta, deberta, albert, electra, or an encoder-decoder pre-trained with --objective: t5, bart, "
             "transformer (the original Transformer)",
    "objective": "what the model learns: clm (next token; gpt, llama), prefix (prefix LM: next token after a "
                 "prefix of random length whose tokens see each other both ways; gpt, llama), mlm (masked LM, 15% "
                 "of tokens, 80/10/10), wwm (whole-word masked LM), nsp (MLM plus next-sentence prediction; bert), sop (MLM plus "
                 "sentence-order prediction; albert), rtd (generator MLM plus replaced-token detection; electra), span "
                 "(T5's span corruption: 15% of tokens in spans of mean 3, each replaced by a sentinel), infill "
                 "(BART's text infilling: 30% of tokens in Poisson(3) spans, each replaced by one mask), permute "
                 "(sentences shuffled), permute+infill (both; t5, bart, transformer); "
                 "'' for the family's first",
    "n_kv_head": "llama only: key/value heads, a divisor of --n-head (grouped-query attention); 0: as many as --n-head",
    "n_layer": "transformer blocks",
    "n_head": "attention heads; must divide --d-model",
    "d_model": "width of the residual stream",
    "block_size": "context length in tokens",
    "dropout": "dropout rate, in [0, 1)",
    "dtype": "floating-point type of weights and activations",
    "precision": "mixed precision (npformer.mixed_precision): bfloat16 or float16 weights and gradients in the model "
                 "over float32 master weights that the optimizer updates; float16 with dynamic loss scaling (a step "
                 "whose scaled gradient overflows is skipped and the scale halved; the log shows the scale and the "
                 "steps skipped), bfloat16 at a fixed scale of 1; validation, samples and checkpoints use the "
                 "master weights; float32: no working copy (needs --dtype float32 otherwise)",
    "steps": "optimisation steps of the whole run; --resume with a larger value extends a run, and the cosine "
             "schedule is then stretched to the new total, so the learning rate rises again (it is printed)",
    "batch_size": "sequences per step",
    "lr": "peak learning rate, reached after the warmup (a run whose loss becomes NaN or inf stops: lower it)",
    "min_lr": "learning rate at the end of the cosine decay (at most --lr)",
    "warmup": "steps of linear learning-rate warmup",
    "weight_decay": "AdamW weight decay of the weight matrices",
    "grad_clip": "clip the global gradient norm to this value",
    "eval_interval": "every this many steps: validation loss, a sample and a checkpoint",
    "eval_batches": f"batches averaged for the validation loss, 1 to {MAX_EVAL_BATCHES}",
    "sample_tokens": f"characters sampled at each validation, 0 (no sample) to {MAX_SAMPLE_TOKENS}",
    "out_dir": "run folder: checkpoint ckpt.<format> and loss.png, gradflow.json with --gradflow-every (also the "
               "folder --resume reads and writes)",
    "checkpoint_format": "checkpoint file format",
    "seed": "seed of the initialisation, the batches and dropout",
    "resume": "continue the run saved in --out-dir with its own settings (flags given here override them; "
              "--out-dir is never taken from the checkpoint)",
    "stop_at": "if > 0, save and stop after this many steps, at most --steps (to --resume later)",
    "progress": "progress bar with loss, tokens/s and time left",
    "overwrite": "replace a run already saved in --out-dir, in either checkpoint format (otherwise refused)",
    "hf": "a local Hugging Face folder (GPT-2, LLaMA, Mistral, Qwen2) to fine-tune: its weights, config and "
          "tokenizer.json replace a new model and the character vocabulary ('' for none)",
    "save_hf": "also write the model as a Hugging Face folder (config.json, model.safetensors, and the --hf "
               "folder's tokenizer and generation files) at every checkpoint ('' for none); without --hf the "
               "run's character vocabulary is no tokenizer.json, so transformers loads the model but sample --hf "
               "has no tokenizer to read",
    "gradflow_every": "every this many steps (0: never), record per block the gradient norm, the update/weight "
                      "ratio and the MLP activation's statistics into gradflow.json in --out-dir, written with each "
                      "checkpoint (npformer viz gradflow draws it); a resumed run continues the file only with the "
                      "interval it was recorded with, and --overwrite starts it afresh (or removes it without this "
                      "option)",
}
CHOICES = {"model": ("gpt", "llama") + ENCODERS + SEQ2SEQ, "dtype": ("float32", "float64"),
           "precision": ("float32", "bfloat16", "float16"), "checkpoint_format": ("npz", "safetensors")}
# What a resumed run must share with its checkpoint: the model, the data split, and the parameter
# groups' decay, all of which the saved state depends on. The text itself is compared by content.
FIXED_ON_RESUME = ("val_fraction", "model", "objective", "n_layer", "n_head", "n_kv_head", "d_model", "block_size", "dropout",
                   "dtype", "precision", "hf", "weight_decay", "seed")
# Fields a resumed run does not take from its checkpoint: they say what to do this time, or where
# (the run folder is the one named now, never the one the checkpoint was first written in).
NOT_INHERITED = ("resume", "overwrite", "stop_at", "out_dir", "progress", "save_hf")


class ConfigError(ValueError):
    """A training option that cannot work: ``field`` names it, ``reason`` says what was expected and what came."""

    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"train: argument '{field_name}' {reason}")


class TrainingDiverged(RuntimeError):
    """The run diverged (a loss, the gradient norm or a weight is not finite); nothing was saved.

    ``step`` is the step (1-based) that failed, ``what`` names the quantity, ``saved_step`` the
    step the checkpoint holds (None if there is none).
    """

    def __init__(self, step: int, what: str, lr: float, checkpoint_path: Path, saved_step: Optional[int]):
        self.step, self.what, self.lr, self.saved_step = step, what, lr, saved_step
        kept = (f"{checkpoint_path} still holds step {saved_step}" if saved_step is not None
                else "no checkpoint was written")
        super().__init__(f"the run diverged at step {step}: {what}; stopped without saving ({kept}): "
                         f"train again with a lower --lr (now {lr:g})")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: the steps done were saved (if any since the last save); resume continues them."""

    def __init__(self, step: int, checkpoint_path: Path, saved: bool):
        self.step, self.checkpoint, self.saved = step, checkpoint_path, saved
        if saved:
            what = f"saved {checkpoint_path}"
        elif checkpoint_path.is_file():
            what = f"{checkpoint_path} already holds it"
        else:
            what = "nothing to save"
        super().__init__(f"interrupted at step {step}; {what}; continue with --resume "
                         f"--out-dir {checkpoint_path.parent}")


def _field(cfg: TrainConfig, name: str, check, **options) -> None:
    """Run a ``_checks`` helper on one field, as a ``ConfigError`` naming it."""
    try:
        check("train", name, getattr(cfg, name), **options)
    except ValueError as e:
        raise ConfigError(name, str(e).split(f"argument '{name}' ", 1)[-1]) from None


def describe_path(path: str | os.PathLike) -> Optional[str]:
    """None if ``path`` is a regular file (or a link to one); else what is there, in words."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "something else")
    return kind if kind == "a folder" else f"{kind}, not a regular file"


def _check_data(op: str, name: str, data: object) -> None:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{op}: argument '{name}' expected 'default' or a file name, got {data!r}")
    if data != "default":
        why = describe_path(data)
        if why is not None:
            raise ValueError(f"{op}: argument '{name}' expected 'default' or a text file, got {data!r} ({why})")


def _check_out_dir(out_dir: object) -> None:
    """A folder, or a path whose nearest existing ancestor is a folder this process may create in."""
    if not isinstance(out_dir, str) or not out_dir or "\x00" in out_dir:
        raise ConfigError("out_dir", f"expected a folder name, got {out_dir!r}")
    path = Path(out_dir)
    if path.exists():
        if not path.is_dir():
            raise ConfigError("out_dir", f"expected a folder, got {out_dir!r}, which is "
                                         f"{describe_path(path) or 'a file'}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError("out_dir", f"expected a folder this user can write in, got {out_dir!r}")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError("out_dir", f"expected a folder that can be created, got {out_dir!r}, but {str(ancestor)!r} "
                                     f"is {describe_path(ancestor) or 'a file'}, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError("out_dir", f"expected a folder that can be created, got {out_dir!r}, but this user "
                                     f"cannot write in {str(ancestor)!r}")


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


def estimate_loss(model, data, cfg: TrainConfig, tokenizer=None) -> float:
    """Mean loss over ``eval_batches`` fixed batches (a fixed generator, so comparable across steps).

    data: the validation token ids, or for an encoder its validation text (batched by its
    objective with ``tokenizer``)."""
    rng = np.random.default_rng(0)
    was_training = model.training
    model.eval()
    try:
        if cfg.encoder:
            batches = pretraining.batches(tokenizer, cfg.resolved_objective, data, batch_size=cfg.batch_size,
                                          block_size=cfg.block_size, specials=pretraining.specials_for(tokenizer, cfg.model),
                                          rng=rng)
            losses = [pretraining.forward(model, next(batches)) for _ in range(cfg.eval_batches)]
        else:
            losses = [lm_forward(model, data, cfg, rng) for _ in range(cfg.eval_batches)]
    finally:
        model.train(was_training)  # the mode it found, even if a forward raised
    return float(np.mean(losses))


def lm_forward(model, ids: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> float:
    """The loss of one batch of a causal LM run: next-token windows ("clm"), or the same windows as a prefix
    LM ("prefix": each row's first tokens see each other both ways, their copied targets ignored)."""
    if cfg.resolved_objective == "prefix":
        x, y, prefix_len = get_prefix_batch(ids, cfg.batch_size, cfg.block_size, rng)
        return model.forward(x, y, prefix_len=prefix_len)[1]
    return model.forward(*get_batch(ids, cfg.batch_size, cfg.block_size, rng))[1]


def checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"ckpt.{cfg.checkpoint_format}"


def saved_runs(out_dir: str | os.PathLike) -> List[Path]:
    """The checkpoints already in ``out_dir`` (either format)."""
    return [p for p in (Path(out_dir) / f"ckpt.{fmt}" for fmt in CHOICES["checkpoint_format"]) if p.is_file()]


def both_formats(out_dir: str | os.PathLike) -> Optional[str]:
    """If ``out_dir`` holds a checkpoint in each format (which run is current cannot be told), says so."""
    runs = saved_runs(out_dir)
    if len(runs) < 2:
        return None
    return (f"{' and '.join(map(str, runs))} both exist, so which run is current cannot be told: "
            f"remove the one that is not")


# -- the train/validation split ---------------------------------------------------------------------
def split_tokens(ids: np.ndarray, val_fraction: float, seed: int,
                 method: Optional[Dict[str, object]] = None) -> Tuple[np.ndarray, np.ndarray, Dict[str, object]]:
    """Training and validation tokens, and how they were split (saved in the checkpoint).

    ``method`` (a resumed run's) is ``{"chunk_size": n}`` or ``{"contiguous": True}``. Without
    one, the first that holds the validation share within ``SPLIT_TOLERANCE`` of
    ``val_fraction`` (relative to ``min(val_fraction, 1 - val_fraction)``) is used: random
    chunks of ``SPLIT_CHUNK`` tokens (the corpus's topics mixed into both sides), then
    shorter chunks down to ``SPLIT_MIN_CHUNK``, then the text's last part (exact to a
    token). A text of fewer than 2 tokens cannot be split: ``ConfigError`` naming ``data``.
    """
    N = len(ids)
    if N < 2:
        raise ConfigError("data", f"expected a text of at least 2 characters to split into training and validation "
                                  f"text, got {N}")
    if method is not None:
        if method.get("contiguous") is True:
            return (*train_val_split(ids, val_fraction, seed=seed, contiguous=True), method)
        return (*train_val_split(ids, val_fraction, seed=seed, chunk_size=int(method["chunk_size"])), method)
    tolerance = SPLIT_TOLERANCE * min(val_fraction, 1 - val_fraction)
    sizes = sorted({round(SPLIT_CHUNK * 2 ** (-k / 4)) for k in range(13)} | {SPLIT_MIN_CHUNK}, reverse=True)
    for chunk_size in (s for s in sizes if s >= SPLIT_MIN_CHUNK):
        train_ids, val_ids = train_val_split(ids, val_fraction, seed=seed, chunk_size=chunk_size)
        if abs(len(val_ids) / N - val_fraction) <= tolerance:
            return train_ids, val_ids, {"chunk_size": chunk_size}
    return (*train_val_split(ids, val_fraction, seed=seed, contiguous=True), {"contiguous": True})


def _describe_split(train_ids: np.ndarray, val_ids: np.ndarray, method: Dict[str, object]) -> str:
    share = len(val_ids) / (len(train_ids) + len(val_ids))
    how = "the text's end" if method.get("contiguous") else f"chunks of {method['chunk_size']}"
    return f"{len(train_ids):,} train / {len(val_ids):,} val tokens ({share:.1%} validation, {how})"


def _check_split(train_ids, val_ids, method, cfg: TrainConfig, resumed: bool) -> None:
    """The split must leave a window of ``block_size + 1`` tokens on each side, and hold ``val_fraction``."""
    N, shortest = len(train_ids) + len(val_ids), min(len(train_ids), len(val_ids))
    split = f"{N} tokens split into {len(train_ids)} train and {len(val_ids)} validation"
    if shortest < 2:
        raise ConfigError("data", f"expected a longer text: {split}, too short for any --block-size (each side "
                                  f"needs at least block_size + 1 >= 2 tokens)")
    if shortest <= cfg.block_size:
        raise ConfigError("block_size", f"expected fewer tokens than the shortest split of the data ({split}), "
                                        f"got {cfg.block_size}: lower it to at most {shortest - 1}, or use a longer "
                                        f"--data")
    share = len(val_ids) / N
    if not resumed and abs(share - cfg.val_fraction) > SPLIT_TOLERANCE * min(cfg.val_fraction, 1 - cfg.val_fraction):
        raise ConfigError("val_fraction", f"expected a fraction this text can hold within {SPLIT_TOLERANCE:.0%}: "
                                          f"{split} ({share:.1%}) is the nearest split, got {cfg.val_fraction}")


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


# The options a memory refusal may name, in the order of its "lower one of" list (ties go to the first).
MEMORY_OPTIONS = ("block_size", "batch_size", "d_model", "n_layer")


def memory_culprit(mcfg: GPTConfig, batch_size: int) -> str:
    """The option of ``MEMORY_OPTIONS`` that, set to 1 with the others kept, shrinks the estimate the most."""
    values = {**mcfg.to_dict(), "batch_size": batch_size}
    total = sum(estimate_memory(mcfg, batch_size).values())

    def shrink(name: str) -> float:
        lowered = {**values, name: 1}
        smaller = sum(estimate_memory(SimpleNamespace(**lowered), lowered["batch_size"]).values())
        return total / smaller

    return max(MEMORY_OPTIONS, key=lambda name: (shrink(name), -MEMORY_OPTIONS.index(name)))


def check_memory(mcfg: GPTConfig, batch_size: int, available: Optional[int] = None, field_names=None) -> int:
    """The estimated bytes of a training step; ``ConfigError`` if more than ``available`` (default: now).

    The error names the option that drives the estimate (``memory_culprit``: the one whose
    lowering to 1 shrinks it the most, e.g. ``block_size`` when the attention's T^2 dominates,
    ``n_layer`` for a very deep model, ``d_model`` for a very wide one).
    """
    parts = estimate_memory(mcfg, batch_size)
    total = sum(parts.values())
    available = available_memory() if available is None else available
    if available is not None and total > available:
        names = {name: (field_names or {}).get(name, name) for name in MEMORY_OPTIONS}
        detail = ", ".join(f"{k} {_bytes(v)}" for k, v in parts.items())
        lower = ", ".join("--" + names[n].replace("_", "-") for n in MEMORY_OPTIONS)
        raise ConfigError(names[memory_culprit(mcfg, batch_size)],
                          f"needs about {_bytes(total)} for one training step ({detail}; batch {batch_size} x "
                          f"block {mcfg.block_size}, {mcfg.n_layer} layers of width {mcfg.d_model}), but "
                          f"{_bytes(available)} is available: lower one of {lower}")
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
    from .hf.tokenizer import HFTokenizer

    kinds = {"char": CharTokenizer, "byte-bpe": ByteBPE, "hf": HFTokenizer}
    kind = vocab.get("kind", "char")
    if kind not in kinds:
        raise checkpoint.CheckpointError(f"{where}: unknown tokenizer kind {kind!r} (expected one of {sorted(kinds)})")
    try:
        tok = kinds[kind].from_dict(vocab)
        # A Hugging Face model's vocab_size may exceed its tokenizer's (rows padded to a round number)
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        encoder = saved.get("model") in OBJECTIVES  # its vocabulary adds special ids after the text's
        vocab_size = mcfg.get("vocab_size", (mcfg.get("discriminator") or {}).get("vocab_size"))  # electra: a pair's
        check_vocab(tok, vocab_size, where, allow_padding=kind == "hf" or encoder)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{where}: its vocabulary does not fit its model: {e}") from e
    return tok


def nonfinite_weights(model) -> Optional[str]:
    """None if every weight of ``model`` is finite; else which parameter is not, in words."""
    for name, p in model.named_parameters():
        if not np.isfinite(p.data).all():
            return (f"weight {name!r} holds {int(np.isnan(p.data).sum())} NaN and "
                    f"{int(np.isinf(p.data).sum())} infinite values")
    return None


def _load_run(cfg: TrainConfig) -> Dict[str, object]:
    """The checkpoint of the run to resume, checked against ``cfg`` (but not yet against the data)."""
    path = checkpoint_path(cfg)
    both = both_formats(cfg.out_dir)
    if both:
        raise ConfigError("resume", f"expected one run in {cfg.out_dir}, but {both}")
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


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _check_run_state(state: Dict[str, object], path: Path) -> None:
    """A checkpoint ``train`` wrote: every entry a resume reads is there, of the right kind and size.

    Whether the weights, the optimizer state and the RNG streams fit the model is checked when
    they are loaded (``_restore``), still before anything is written.
    """
    def bad(what: str) -> checkpoint.CheckpointError:
        return checkpoint.CheckpointError(f"{path}: {what}")

    missing = [k for k in RUN_ENTRIES if k not in state]
    if missing:
        raise bad(f"not a training run's checkpoint (no {', '.join(missing)})")
    step = state["step"]
    if not _is_int(step) or step < 0:
        raise bad(f"'step' expected an integer >= 0, got {step!r:.80}")
    for name in ("config", "model_config", "model", "optim", "rng"):
        if not isinstance(state[name], dict):
            raise bad(f"'{name}' expected a dict (as train saves it), got {type(state[name]).__name__}")
    rng = state["rng"]
    if set(rng) != {"data", "model"} or not all(isinstance(v, dict) for v in rng.values()):
        raise bad(f"'rng' expected the entries ['data', 'model'], each a generator state, got {sorted(map(str, rng))}")
    for name, value in state["model"].items():
        if not isinstance(value, np.ndarray):
            raise bad(f"'model' entry {name!r} expected an array, got {type(value).__name__}")
    names = [f.name for f in fields(History)]
    history = state["history"]
    if not isinstance(history, dict) or set(history) != set(names):
        raise bad(f"'history' expected the entries {names}, got {history!r:.80}")
    for name in names:
        if not isinstance(history[name], list):
            raise bad(f"'history/{name}' expected a list, got {type(history[name]).__name__}")
    if history["steps"] != list(range(step)):
        raise bad(f"'history/steps' expected the steps 0 to {step - 1} (step {step} is saved), got "
                  f"{len(history['steps'])} entries {history['steps'][:5]!r:.60}")
    for losses, steps in (("train_loss", "steps"), ("val_loss", "val_steps")):
        if len(history[losses]) != len(history[steps]):
            raise bad(f"'history/{losses}' expected one loss per entry of 'history/{steps}' "
                      f"({len(history[steps])}), got {len(history[losses])}")
        if not all(_is_real(v) for v in history[losses]):
            raise bad(f"'history/{losses}' expected numbers, got {history[losses][:5]!r:.60}")
    val_steps = history["val_steps"]
    increasing = all(a < b for a, b in zip(val_steps, val_steps[1:]))
    if not all(_is_int(s) and 0 <= s < step for s in val_steps) or not increasing:
        raise bad(f"'history/val_steps' expected increasing steps below {step}, got {val_steps[:5]!r:.60}")
    for losses in ("train_loss", "val_loss"):
        if not all(math.isfinite(v) for v in history[losses]):
            raise bad(f"'history/{losses}' expected finite losses, got {history[losses][:5]!r:.60}")
    data = state.get("data")  # absent in checkpoints written before the text's fingerprint was kept
    if data is not None and not (isinstance(data, dict) and set(data) == {"characters", "sha256"}
                                 and _is_int(data["characters"]) and data["characters"] >= 1
                                 and isinstance(data["sha256"], str) and len(data["sha256"]) == 64
                                 and all(c in "0123456789abcdef" for c in data["sha256"])):
        raise bad(f"'data' expected the text's fingerprint {{'characters': n, 'sha256': hex}}, got {data!r:.80}")
    saved_cfg = _check_saved_config(state["config"], step, path, bad)
    _check_optim_state(state["optim"], step, saved_cfg, bad, updates=step - _check_precision_state(state, step,
                                                                                                   saved_cfg, bad))
    split = state.get("split")
    if split is not None and not (split == {"contiguous": True} or (
            isinstance(split, dict) and set(split) == {"chunk_size"} and _is_int(split["chunk_size"])
            and split["chunk_size"] >= 1)):
        raise bad(f"'split' expected {{'chunk_size': n}} or {{'contiguous': True}}, got {split!r:.80}")


def _check_saved_config(saved: Dict[str, object], step: int, path: Path, bad) -> TrainConfig:
    """The run's saved settings, each checked as ``TrainConfig.validate`` checks an option, with
    ``steps`` at least the saved step. The data file and run folder are those of this resume, not checked here."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(map(str, set(saved) - known))
    if unknown:
        raise bad(f"'config' holds unknown settings {unknown[:5]}")
    values = {k: v for k, v in saved.items() if k not in ("data", "out_dir", "resume", "overwrite")}
    values["out_dir"] = str(path.parent)  # the folder of this resume (the saved one is never used)
    try:
        cfg = TrainConfig(**values).validate()
    except ConfigError as e:
        raise bad(f"'config/{e.field}' {e.reason}") from None
    if cfg.steps < step:
        raise bad(f"'config/steps' expected at least the {step} steps saved, got {cfg.steps}")
    return cfg


def _optim_groups(cfg: TrainConfig, step: int) -> List[Dict[str, object]]:
    """The options of the two AdamW groups ``train`` saves after ``step`` steps of ``cfg`` (names aside)."""
    lr = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)(step - 1) if step > 0 else cfg.lr
    return [{"weight_decay": wd, "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8} for wd in (cfg.weight_decay, 0.0)]


def _same_number(a: object, b: float) -> bool:
    return _is_real(a) and math.isclose(float(a), b, rel_tol=1e-12, abs_tol=0.0)


def _check_precision_state(state: Dict[str, object], step: int, cfg: TrainConfig, bad) -> int:
    """A mixed-precision run's loss scale and counters (``mixed_precision``, none for float32); returns the
    steps it skipped (0 for float32), which its optimizer did not take."""
    entry = state.get("mixed_precision")
    if cfg.precision == "float32":
        if entry is not None:
            raise bad(f"'mixed_precision' expected no entry for a float32 run, got {entry!r:.80}")
        return 0
    if entry is None:
        raise bad(f"'mixed_precision' expected the loss scale of a --precision {cfg.precision} run, got none")
    try:
        check_mp_state("train", entry, steps=step)
    except ValueError as e:
        reason = str(e).split("argument 'state' ", 1)[-1]
        raise bad(f"'mixed_precision' {reason}") from None
    return int(entry["skipped"])


def _check_optim_state(optim: Dict[str, object], step: int, cfg: TrainConfig, bad, updates: Optional[int] = None) -> None:
    """The optimizer state of a run saved after ``step`` steps of ``cfg``: the groups' options are those the
    settings imply, and every parameter has a state (none before the first update) whose ``step`` is the
    number of updates, ``updates`` (the run's steps, less those a mixed-precision run skipped)."""
    updates = step if updates is None else updates
    groups = optim.get("param_groups")
    expected = _optim_groups(cfg, step)
    if not isinstance(groups, list) or len(groups) != len(expected) or not all(isinstance(g, dict) for g in groups):
        raise bad(f"'optim/param_groups' expected {len(expected)} groups (decayed, exempt), got {groups!r:.80}")
    count = 0
    for i, (group, want) in enumerate(zip(groups, expected)):
        for key, value in want.items():
            got = group.get(key)
            same = (isinstance(got, list) and len(got) == len(value) and all(map(_same_number, got, value))
                    if isinstance(value, list) else _same_number(got, value))
            if not same:
                raise bad(f"'optim/param_groups/{i}/{key}' expected {value!r} (from the run's settings at step "
                          f"{step}), got {got!r:.80}")
        params = group.get("params")
        if not isinstance(params, list):
            raise bad(f"'optim/param_groups/{i}/params' expected a list of parameter indices, got {params!r:.80}")
        count += len(params)
    moments = optim.get("state", {})
    if not isinstance(moments, dict):
        raise bad(f"'optim/state' expected a dict, got {type(moments).__name__}")
    want_keys = {str(i) for i in range(count)} if updates > 0 else set()
    if set(moments) != want_keys:
        missing = sorted(want_keys - set(moments), key=lambda k: (len(k), k))
        extra = sorted(set(map(str, moments)) - want_keys)
        what = f"no state for parameters {missing[:5]}" if missing else f"states for no parameter {extra[:5]}"
        taken = "(none at step 0)" if updates == step else \
            f"({updates} updates, {step - updates} steps skipped; none before the first update)"
        raise bad(f"'optim/state' expected the state of each of the {count} parameters after step {step} "
                  f"{taken}, got {what}")
    for key, entry in moments.items():
        got = entry.get("step") if isinstance(entry, dict) else None
        if not (_is_int(got) and got == updates):
            want = f"the run's step {step}" if updates == step else \
                f"the run's {updates} updates ({step} steps, {step - updates} skipped)"
            raise bad(f"'optim/state/{key}/step' expected {want}, got {got!r:.40}")


def _encoder_data(cfg: TrainConfig, tok, train_ids: np.ndarray, val_ids: np.ndarray, rng: np.random.Generator):
    """An encoder run's training batches (drawn from ``rng`` lazily) and its validation text; ``ConfigError``
    naming ``data`` when the text cannot make the objective's batches (e.g. NSP with one document)."""

    texts = tok.decode(train_ids.tolist()), tok.decode(val_ids.tolist())
    try:
        for text in texts[1:]:  # the validation text is batched afresh at each validation: checked here once
            pretraining.batches(tok, cfg.resolved_objective, text, batch_size=cfg.batch_size,
                                block_size=cfg.block_size, specials=pretraining.specials_for(tok, cfg.model),
                                rng=np.random.default_rng(0))
        train_batches = pretraining.batches(tok, cfg.resolved_objective, texts[0], batch_size=cfg.batch_size,
                                            block_size=cfg.block_size, specials=pretraining.specials_for(tok, cfg.model),
                                            rng=rng)
    except ValueError as e:
        raise ConfigError("data", f"expected a text that makes --objective {cfg.resolved_objective} batches of "
                                  f"--block-size {cfg.block_size}: {e}") from None
    return train_batches, texts[1]


def _load_hf(cfg: TrainConfig):
    """(model, tokenizer) of the --hf folder, in the run's dtype; ``ConfigError`` naming ``hf`` if unreadable."""
    from .hf import load_pretrained, load_tokenizer

    try:
        model = load_pretrained(cfg.hf, dtype=cfg.dtype)
        check_causal_lm("train", "hf", model)
        tok = load_tokenizer(cfg.hf)
        check_vocab(tok, model.cfg.vocab_size, f"{cfg.hf}", allow_padding=True)
    except (ValueError, OSError) as e:
        raise ConfigError("hf", f"expected a model folder npformer can read and fine-tune, got {cfg.hf!r}: {e}") from None
    return model, tok


def model_config(cfg: TrainConfig, vocab_size: int):
    """The model settings of a run of ``cfg`` on a tokenizer of ``vocab_size`` ids (GPTConfig, LlamaConfig, or an
    encoder's or encoder-decoder's, whose vocabulary adds its special ids)."""
    if cfg.encoder:
        return pretraining.model_config(cfg.model, cfg.resolved_objective, text_vocab_size=vocab_size,
                                        block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                        d_model=cfg.d_model, dropout=cfg.dropout, dtype=cfg.dtype)
    shape = dict(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                 d_model=cfg.d_model, dtype=cfg.dtype)
    if cfg.model == "llama":
        return family("llama")[1](**shape, n_kv_head=cfg.n_kv_head or cfg.n_head)
    return GPTConfig(**shape, dropout=cfg.dropout)


def _restore(state: Dict[str, object], path: Path, mcfg, model, opt: AdamW,
             data_rng: np.random.Generator, trainer: Optional[MixedPrecisionTrainer] = None) -> None:
    """Load a checked run into the model, the optimizer and the generators (and a mixed-precision run's
    master weights and loss scale into ``trainer``): all of it, or a ``CheckpointError`` naming the file
    and what does not fit (the objects are then discarded)."""
    try:
        saved = type(mcfg)(**state["model_config"]).to_dict()
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"{path}: 'model_config' is not a model's settings: {e}") from None
    if saved != mcfg.to_dict():
        diff = sorted(k for k in saved if saved[k] != mcfg.to_dict()[k])
        raise checkpoint.CheckpointError(f"{path}: 'model_config' differs from the model of this run in {diff}")
    names = [g.get("names") for g in state["optim"]["param_groups"]]
    for i, (saved_names, group) in enumerate(zip(names, opt.param_groups)):
        if saved_names != group["names"]:
            raise checkpoint.CheckpointError(f"{path}: 'optim/param_groups/{i}/names' expected the parameters "
                                             f"{group['names'][:3]}... of this model's group {i}, got "
                                             f"{saved_names!r:.80}")
    steps = [("model", lambda: model.load_state_dict(state["model"])),
             ("optim", lambda: opt.load_state_dict(state["optim"])),
             ("rng/data", lambda: setattr(data_rng.bit_generator, "state", state["rng"]["data"])),
             ("rng/model", lambda: setattr(model.rng.bit_generator, "state", state["rng"]["model"]))]
    if trainer is not None:  # the model's weights, just loaded, are the master weights
        steps += [("model", trainer.read_master),
                  ("mixed_precision", lambda: trainer.load_state_dict(state["mixed_precision"]))]
    for entry, load in steps:
        try:
            load()
        except (TypeError, ValueError, KeyError) as e:
            raise checkpoint.CheckpointError(f"{path}: '{entry}' does not fit this run: {e}") from None
    bad = nonfinite_weights(model)
    if bad:
        raise checkpoint.CheckpointError(f"{path}: {bad} (a diverged run; resume an earlier checkpoint)")


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


# -- Ctrl-C ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C (SIGINT) until the block is done, so an update is never cut in half; then deliver it.

    Only in the main thread, where Python handles signals; elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # no signal handling here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # to the handler that was there before (KeyboardInterrupt by default)


# -- the loop ---------------------------------------------------------------------------------------
class _FolderLock:
    """An exclusive, non-blocking ``flock`` on the run folder itself (its directory file descriptor).

    Held for the whole training, so that a second training (or a resume) in the same
    folder is refused instead of overwriting the first one's files. Locking the folder
    writes nothing into it. Released by ``release`` (and by the system when the process
    ends, however it ends). Where ``fcntl`` is missing (Windows), nothing is locked.
    """

    def __init__(self, out_dir: str):
        self.out_dir, self.fd = out_dir, None

    def acquire(self) -> None:
        """Take the lock if the folder exists and it is not held yet; ``ConfigError`` if another process holds it."""
        if self.fd is not None or fcntl is None:
            return
        try:
            fd = os.open(self.out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            return  # not made yet: taken once it is, before anything is written
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("out_dir", f"another training is running in {self.out_dir}: wait for it to end, "
                                         f"or use another --out-dir") from None
        except OSError:  # a file system without locks: train unlocked, as before
            os.close(fd)
            return
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the only descriptor of the open file releases the lock


def lock_run_folder(out_dir: str) -> "_FolderLock":
    """The lock ``train`` holds on ``out_dir`` while it trains, taken now (``ConfigError`` if held elsewhere)."""
    lock = _FolderLock(str(out_dir))
    lock.acquire()
    return lock


def train(cfg: TrainConfig, log=print) -> Dict[str, object]:
    """Train and return a summary (final losses, training tokens/s, checkpoint path, history).

    ``tokens_per_s`` counts the training steps' time only (not validation, sampling or saving).
    A resumed run that has already done ``steps`` steps trains nothing: the summary has
    ``complete=True`` and ``steps_run=0``. A run stopped by ``stop_at`` is evaluated at the
    step it stops at, so ``val_loss`` is the current one (not recorded in the history, which
    stays that of an uninterrupted run).

    Raises ``ConfigError`` (an option), ``checkpoint.CheckpointError`` (the run to resume),
    ``TrainingDiverged`` (a non-finite loss, gradient or weight: nothing saved) and
    ``TrainingInterrupted`` (Ctrl-C: the steps done are saved first).

    The run folder is locked for the whole training (``lock_run_folder``): a second
    training or resume in a folder where one is running raises ``ConfigError`` naming
    ``out_dir`` before any work.
    """
    fastpath.keep_freed_memory()  # a step reuses the last one's memory (no fresh pages to fault in)
    cfg.validate()
    lock = _FolderLock(cfg.out_dir)
    try:
        lock.acquire()
        return _train(cfg, log, lock)
    finally:
        lock.release()


def _train(cfg: TrainConfig, log, lock: "_FolderLock") -> Dict[str, object]:
    path = checkpoint_path(cfg)
    state = None
    if cfg.resume:
        state = _load_run(cfg)
    elif saved_runs(cfg.out_dir) and not cfg.overwrite:
        names = ", ".join(str(p) for p in saved_runs(cfg.out_dir))
        raise ConfigError("out_dir", f"expected a folder without a run, but {names} exists: pass --resume to "
                                     f"continue it, --overwrite to replace it, or another --out-dir")

    text = load_text(cfg)
    pretrained = _load_hf(cfg) if cfg.hf else None
    tok = pretrained[1] if pretrained else CharTokenizer.from_text(text)
    if state is not None:
        _check_same_data(state, tok, text, path)
        if int(state["step"]) == cfg.steps:
            history = History(**state["history"])
            log(f"{path} is a finished run ({cfg.steps} of {cfg.steps} steps): nothing to do. To train it further, "
                f"resume with a larger --steps, e.g. npformer train --resume --out-dir {cfg.out_dir} "
                f"--steps {2 * cfg.steps}")
            return {"complete": True, "steps_run": 0, "step": cfg.steps,
                    "train_loss": history.train_loss[-1] if history.train_loss else None,
                    "val_loss": history.val_loss[-1] if history.val_loss else None,
                    "tokens_per_s": None, "checkpoint": str(path), "plot": None, "history": history,
                    "loss_scale": state.get("mixed_precision", {}).get("scale"),
                    "skipped_steps": state.get("mixed_precision", {}).get("skipped")}
    ids = tok.encode_array(text)
    # A run resumed from a checkpoint without a saved split was split with chunks of 4096 tokens.
    saved_split = None if state is None else state.get("split", {"chunk_size": SPLIT_CHUNK})
    train_ids, val_ids, split = split_tokens(ids, cfg.val_fraction, cfg.seed, saved_split)
    data_rng = np.random.default_rng(cfg.seed + 1)
    _check_split(train_ids, val_ids, split, cfg, resumed=state is not None)
    train_batches = None
    if cfg.encoder:  # batches of the objective, drawn from data_rng (as it stands after a restore, below)
        train_batches, val_ids = _encoder_data(cfg, tok, train_ids, val_ids, data_rng)
    if pretrained:
        model = pretrained[0]
        mcfg = model.cfg
        if cfg.block_size > mcfg.block_size:
            raise ConfigError("block_size", f"expected at most the context of the --hf model, {mcfg.block_size}, "
                                            f"got {cfg.block_size}")
        model.rng = np.random.default_rng(cfg.seed)  # the stream a checkpoint saves (no dropout draws from it)
        model.train()  # load_pretrained gives a model in eval mode
    else:
        mcfg = model_config(cfg, tok.vocab_size)
    # An encoder's step holds about what a GPT of its shape holds: its estimate stands in
    check_memory(model_config(replace(cfg, model="gpt", objective=""), mcfg.vocab_size) if cfg.encoder else mcfg,
                 cfg.batch_size)
    if not pretrained:
        model = build_model(cfg.model, mcfg.to_dict(), seed=cfg.seed)
    trainer = None
    if cfg.precision == "float32":
        opt = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    else:  # AdamW updates float32 masters, in the groups (names, order) the model's own would have
        trainer = MixedPrecisionTrainer(model, lambda masters: AdamW(master_groups(model, masters, cfg.weight_decay),
                                                                     lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8),
                                        precision=cfg.precision, dynamic=cfg.precision == "float16")
        opt = trainer.optimizer  # bf16 has float32's range: a fixed loss scale of 1 (MP.6)
    history, start = History(), 0
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps)
    if state is not None:
        _restore(state, path, mcfg, model, opt, data_rng, trainer)
        history = History(**state["history"])
        start = int(state["step"])
    from .viz import GRADFLOW_FILE, GradientFlow

    flow = None
    if cfg.gradflow_every:  # per-block statistics (npformer.viz), continued from the run's file on resume only
        flow = GradientFlow(model, cfg.gradflow_every)
        if state is not None:  # a new run (--overwrite too) starts the file afresh at its first save
            try:
                flow.resume(Path(cfg.out_dir) / GRADFLOW_FILE, start)
            except ValueError as e:
                raise ConfigError("gradflow_every", f"cannot continue {GRADFLOW_FILE} of {cfg.out_dir} (resume "
                                                    f"with the --gradflow-every it was recorded with, or remove it "
                                                    f"to start it afresh): {e}") from None

    if cfg.save_hf:  # a family without a Hugging Face map is refused now, not after the first checkpoint
        from .hf import check_savable

        try:
            check_savable(model)
        except (TypeError, ValueError) as e:
            raise ConfigError("save_hf", f"expected a model that a Hugging Face folder can hold, got --model "
                                         f"{cfg.model}: {e}") from None

    # Every check has passed: from here on, work and write.
    if cfg.save_hf:
        try:
            Path(cfg.save_hf).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("save_hf", f"expected a folder that can be created, got {cfg.save_hf!r}: "
                                         f"{e.strerror or e}") from None
    out_dir = Path(cfg.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("out_dir", f"expected a folder that can be created, got {cfg.out_dir!r}: "
                                     f"{e.strerror or e}") from None
    lock.acquire()  # a folder made just now: locked before anything is written in it
    if state is not None:
        log(_resume_line(path, start, cfg, state, schedule))
    if pretrained:  # the text's first token, which the tokenizer surely reads back
        sample_prompt = tok.decode(train_ids[:1].tolist())
    else:
        sample_prompt = "\n" if "\n" in tok.stoi else text[0]
    saved_step: Optional[int] = start if state is not None else None
    replaced_others = not cfg.overwrite

    def save(step: int) -> None:
        nonlocal saved_step, replaced_others
        bad = nonfinite_weights(model)
        if bad:
            raise TrainingDiverged(step, bad, cfg.lr, path, saved_step)
        checkpoint.save(path, {
            "config": asdict(cfg), "model_config": mcfg.to_dict(), "vocab": tok.to_dict(), "data": fingerprint(text),
            "split": split, "sample_prompt": sample_prompt,
            "model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "rng": {"data": data_rng.bit_generator.state, "model": model.rng.bit_generator.state},
            "history": asdict(history),
            **({"mixed_precision": trainer.state_dict()} if trainer is not None else {}),
        })
        if flow is not None:
            flow.save(out_dir / GRADFLOW_FILE)
        saved_step = step
        if cfg.save_hf:
            from .hf import save_pretrained

            save_pretrained(model, cfg.save_hf, source=cfg.hf or None)
        if not replaced_others:  # --overwrite: the replaced run's checkpoint in the other format goes too
            for other in saved_runs(out_dir):
                if other != path:
                    other.unlink()
            if flow is None:  # and its gradflow.json, which would describe the replaced run
                (out_dir / GRADFLOW_FILE).unlink(missing_ok=True)
            replaced_others = True

    def interrupted() -> TrainingInterrupted:
        """After a Ctrl-C: the state of the last whole step, saved if newer than the checkpoint.

        A step cut before its update is undone (its batch and dropout draws go back to the
        generators); a validation cut short is done again, so the history is that of an
        uninterrupted run. A second Ctrl-C while saving gives up the save.
        """
        saved = False
        try:
            if rng_at_step is not None and rng_at_step[0] == done:  # step `done` did not update: undo its draws
                data_rng.bit_generator.state, model.rng.bit_generator.state = rng_at_step[1]
                for group in opt.param_groups:  # and its learning rate: the groups hold the last update's
                    group["lr"] = schedule(done - 1) if done > 0 else cfg.lr
            model.clear_caches()
            model.stop_recording()  # a step cut while gradflow recorded it
            model.train()
            if trainer is not None:  # a step cut after its working copy was cast: the masters are the state
                trainer.write_master()
            if done > (saved_step if saved_step is not None else 0):
                if (done % cfg.eval_interval == 0 or done == cfg.steps) and history.val_steps[-1:] != [done - 1]:
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        _validate(model, val_ids, cfg, done, path, saved_step, history, tok)
                save(done)
                saved = True
            if done > start:
                plot_losses(history, out_dir / "loss.png")
        except KeyboardInterrupt:
            saved = False
        return TrainingInterrupted(done, path, saved)

    log(f"model: {model.num_parameters():,} parameters, vocab {tok.vocab_size}, "
        f"{_describe_split(train_ids, val_ids, split)}, {cfg.dtype}"
        + (f" master weights, {cfg.precision} working copy" if trainer is not None else ""))
    tokens_per_step = cfg.batch_size * cfg.block_size
    prompt = tok.encode_array(sample_prompt)[None]  # (1, 1)
    bar = _progress(range(start, cfg.steps), cfg.progress)
    train_time, tokens_seen = 0.0, 0
    done = start  # steps whose update is applied and recorded in the history
    rng_at_step = None  # (step, generator states before it)
    final_val = None
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are checked here
            for step in bar:
                rng_at_step = (step, (data_rng.bit_generator.state, model.rng.bit_generator.state))
                t = time.perf_counter()
                lr = schedule(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                recorder = model.start_recording() if flow is not None and flow.due(step) else None
                if trainer is not None:  # the step computes with the master weights rounded (MP.3)
                    trainer.cast_working_copy()
                if train_batches is not None:  # an encoder: its objective's batch
                    loss = pretraining.forward(model, next(train_batches))
                else:
                    loss = lm_forward(model, train_ids, cfg, data_rng)
                if not math.isfinite(loss):
                    raise TrainingDiverged(step + 1, f"the training loss is {loss}", cfg.lr, path, saved_step)
                model.zero_grad()
                model.backward()
                stepped = True
                if trainer is not None:  # the gradients stored scaled in low precision, unscaled into the masters'
                    stepped = trainer.unscale_gradients()  # (MP.4), (MP.5); an overflow skips the step (MP.6)
                    if not stepped and not all(np.isfinite(p.grad).all() for p in model.parameters()):
                        raise TrainingDiverged(step + 1, "the gradient is not finite", cfg.lr, path, saved_step)
                weights = _named_weights(model, trainer)  # the parameters the optimizer updates
                if recorder is not None:
                    model.stop_recording()
                    before = {n: w.data.copy() for n, w in weights.items()}
                    grads = {n: w.grad.copy() for n, w in weights.items()}  # the gradient before clipping
                if stepped:
                    norm = clip_grad_norm_(list(weights.values()), cfg.grad_clip, error_if_nonfinite=False)
                    if not math.isfinite(norm):
                        raise TrainingDiverged(step + 1, f"the gradient norm is {norm}", cfg.lr, path, saved_step)
                with _sigint_deferred():  # the update and its record: both or neither
                    if trainer is None:
                        opt.step()
                    else:
                        trainer.update(stepped)  # skipped: no update, the scale halves (MP.6)
                        trainer.write_master()  # validation, samples and checkpoints see the master weights
                    if recorder is not None:
                        flow.collect(step, model, before, {n: w.data for n, w in weights.items()}, recorder, grads)
                    history.steps.append(step)
                    history.train_loss.append(loss)
                    done = step + 1
                train_time += time.perf_counter() - t  # training throughput: validation, samples and saves excluded
                tokens_seen += tokens_per_step
                tok_s = tokens_seen / train_time
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                last = done == cfg.steps
                if done % cfg.eval_interval == 0 or last:
                    val = _validate(model, val_ids, cfg, done, path, saved_step, history, tok)
                    text_out = ""
                    if cfg.sample_tokens and not cfg.encoder:  # an encoder does not continue text
                        try:
                            out = generate(model, prompt, cfg.sample_tokens, temperature=0.8, top_k=20,
                                           rng=np.random.default_rng(step),
                                           prefix=cfg.resolved_objective == "prefix")
                        except NonFiniteLogitsError as e:
                            raise TrainingDiverged(done, str(e), cfg.lr, path, saved_step) from None
                        text_out = tok.decode(out[0].tolist())
                    skips = "" if trainer is None else f"{trainer.skipped} step{'' if trainer.skipped == 1 else 's'}"
                    scaling = "" if trainer is None else f", loss scale {trainer.scale:g}, {skips} skipped"
                    _write(bar, f"\nstep {done}: train {loss:.4f}, val {val:.4f}, {tok_s:,.0f} tok/s (training)"
                                f"{scaling}\n" + (f"{text_out}\n" if text_out else ""))
                    save(done)
                if cfg.stop_at and done >= cfg.stop_at and not last:
                    if saved_step != done:
                        save(done)
                    final_val = history.val_loss[-1] if history.val_steps[-1:] == [step] else \
                        estimate_loss(model, val_ids, cfg, tok)
                    break
    except KeyboardInterrupt:
        _close(bar)
        raise interrupted() from None
    finally:
        _close(bar)  # also when the run diverged
    plot = plot_losses(history, out_dir / "loss.png")
    if final_val is None:
        final_val = history.val_loss[-1] if history.val_loss else None
    return {"complete": done == cfg.steps, "steps_run": done - start, "step": done,
            "train_loss": history.train_loss[-1] if history.train_loss else None, "val_loss": final_val,
            "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
            "checkpoint": str(path), "plot": str(plot), "history": history,
            "loss_scale": None if trainer is None else trainer.scale,
            "skipped_steps": None if trainer is None else trainer.skipped}


def master_groups(model, masters: List, weight_decay: float) -> List[Dict[str, object]]:
    """``param_groups(model, weight_decay)`` with each parameter replaced by its master (``masters`` in the
    order of ``model.parameters()``): the same names, decay and order, so the optimizer's state dict reads
    as a float32 run's."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return [{**group, "params": [masters[index[id(p)]] for p in group["params"]]}
            for group in param_groups(model, weight_decay)]


def _named_weights(model, trainer: Optional[MixedPrecisionTrainer]) -> Dict[str, object]:
    """The parameters the optimizer updates, by the model's names: the model's own, or the trainer's masters."""
    if trainer is None:
        return dict(model.named_parameters())
    return {name: m for (name, _), m in zip(model.named_parameters(), trainer.master)}


def _validate(model, val_ids, cfg, done, path, saved_step, history, tokenizer=None) -> float:
    """The validation loss after step ``done``, recorded in the history; ``TrainingDiverged`` if not finite."""
    val = estimate_loss(model, val_ids, cfg, tokenizer)
    if not math.isfinite(val):
        raise TrainingDiverged(done, f"the validation loss is {val}", cfg.lr, path, saved_step)
    with _sigint_deferred():  # both entries or neither
        history.val_steps.append(done - 1)
        history.val_loss.append(val)
    return val


def _resume_line(path: Path, start: int, cfg: TrainConfig, state: Dict[str, object], schedule) -> str:
    """Where the run resumes, and its learning rate there (which a longer --steps raises: the cosine restarts)."""
    line = f"resumed from {path} at step {start} of {cfg.steps}"
    saved_steps = state["config"].get("steps")
    if start < cfg.steps:
        line += f"; learning rate {schedule(start):.3g}"
        groups = state["optim"].get("param_groups")
        last = groups[0].get("lr") if isinstance(groups, list) and groups and isinstance(groups[0], dict) else None
        if _is_real(last) and start > 0:
            line += f" (the last step used {last:.3g})"
        if saved_steps != cfg.steps:
            line += f": the cosine schedule now decays to --min-lr at step {cfg.steps}, not {saved_steps}"
    return line


def _progress(it, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc="train", unit="step", dynamic_ncols=True)


def _close(bar) -> None:
    if hasattr(bar, "close"):
        bar.close()


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
