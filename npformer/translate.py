"""Learning a built-in translation task with an encoder-decoder: ``npformer translate``.

The task is one of ``npformer.data.translation`` ("numbers": English words -> digits, "dates":
ISO 8601 -> "7 March 2024"; ``reverse`` swaps the two sides), at the character level of
``TranslationVocab`` (PAD 0, EOS 1, BOS 2). The model is a fresh Transformer, T5 or BART of
``npformer.models`` whose ``pad_token_id``, ``eos_token_id`` and ``decoder_start_token_id`` are
set to PAD, EOS and BOS, so every family reads the batches of ``translation_batches`` as they are.

Training: AdamW with betas (0.9, 0.98) and eps 1e-9 (the Transformer paper's Adam), weight decay
on matrices only (``optim.param_groups``), gradient clipping, and a learning-rate schedule:

- "inverse_sqrt" (the Transformer's default, as in the paper): a linear rise over ``warmup``
  updates to the peak ``lr``, then the rate falls as 1 / sqrt(update): ``optim.inverse_sqrt``
  scaled so that its peak is ``lr``.
- "cosine" (the default for T5 and BART): a linear warmup to ``lr`` then a cosine decay to
  ``lr / 10`` at the last step (``optim.warmup_cosine``).

Defaults that depend on the family (a field left at None takes them; the summary's ``config``
holds the values used):

    family        schedule       lr      warmup  label_smoothing
    transformer   inverse_sqrt   2e-3    100     0.1 (the paper's)
    t5            cosine         5e-3    100     0 (T5's loss has no smoothing: only 0 is accepted)
    bart          cosine         1e-3    100     0.1

A warmup left at None is shortened to ``steps`` in a shorter run; a warmup given longer than
``steps`` is refused (``TranslateError`` 'warmup'): the peak ``lr`` comes at update warmup - 1.

The other defaults make a run of a few minutes on two CPU cores that learns the numbers task well:
two layers of width 64 (feed-forward 128), no dropout, 2000 steps of 32 pairs over 4000 training
pairs. A smaller or narrower Transformer stays longer on the plateau where it predicts the target
characters' marginal (loss about ln 10 on digits) before its cross attention starts to align;
T5's relative position buckets leave it sooner.

Every ``eval_interval`` steps (and after the last) the validation split is scored: its loss (the
plain mean cross entropy per target token, teacher forced, without label smoothing, so the
families compare) and the exact match of its greedy decodings. At the end the TEST split is
decoded twice, greedily and with beam search (``num_beams``, ``length_penalty``), both with the
model's KV caches (``npformer.decoding``), in batches; each is scored by:

- exact match: the decoded string equals the whole target string. A decoding is read up to its first
  EOS by ``decoded_text``, which writes a PAD, BOS or other non-character id before it as ``STRAY``
  ("\ufffd", in no target): a row such as [BOS, PAD, BOS, "3", "4", "2", EOS] is no match for "342",
  and its BLEU tokens hold the marker;
- corpus BLEU (``npformer.metrics.corpus_bleu``, no smoothing) over the targets' tokens. The
  tokens are the target's words (split on spaces), except for a target written in digits (the
  numbers task's "342", the reversed dates task's "2024-03-07"), whose tokens are its
  characters: a one-word target would otherwise have no n-gram past the first order. A decoding
  is split as its reference is. The order
  is 4, or the longest reference's token count when that is shorter (the dates task's targets
  are three words: "7 March 2024"), so that every order has n-grams to count.

The beam's gain over greedy is beam minus greedy, for both metrics. ``translate`` returns a
summary dict (see its docstring).

Shapes: src_ids (B, S), tgt_in and targets (B, T) int64; logits (B, T, V); V = the vocabulary.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Tuple

import numpy as np

from .data.translation import (BOS_ID, CHARS, EOS_ID, PAD_ID, TRANSLATION_TASKS, TranslationTask, TranslationVocab,
                               translation_batches, translation_task)
from .decoding import beam_search, greedy
from .metrics import corpus_bleu, exact_match
from .nn.lm import IGNORE_INDEX
from .ops._checks import check_bool, check_count, check_real
from .optim import AdamW, clip_grad_norm_, inverse_sqrt, param_groups, warmup_cosine

__all__ = ["TranslateConfig", "TranslateError", "TranslateDiverged", "translate", "build_translation_model",
           "score_translations", "target_tokens", "FAMILIES", "SCHEDULES", "FAMILY_DEFAULTS", "FIELD_HELP",
           "results_table", "decoded_text", "STRAY"]

FAMILIES = ("transformer", "t5", "bart")
SCHEDULES = ("inverse_sqrt", "cosine")
# lr, warmup, schedule and label_smoothing of each family when the field is None (see the module doc)
FAMILY_DEFAULTS: Dict[str, Dict[str, object]] = {
    "transformer": {"schedule": "inverse_sqrt", "lr": 2e-3, "warmup": 100, "label_smoothing": 0.1},
    "t5": {"schedule": "cosine", "lr": 5e-3, "warmup": 100, "label_smoothing": 0.0},
    "bart": {"schedule": "cosine", "lr": 1e-3, "warmup": 100, "label_smoothing": 0.1},
}
MIN_LR_FRACTION = 0.1  # the cosine schedule ends at lr / 10
MAX_NEW_TOKENS_MARGIN = 4  # the default max_new_tokens: the longest target (EOS included) + this
EVAL_BATCH = 100  # source rows per decoding call and per validation forward
BLEU_ORDER = 4


@dataclass
class TranslateConfig:
    model: str = "transformer"
    task: str = "numbers"
    reverse: bool = False
    train_size: int = 4000
    valid_size: int = 200
    test_size: int = 500
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 128
    dropout: float = 0.0
    steps: int = 2000
    batch_size: int = 32
    lr: Optional[float] = None
    warmup: Optional[int] = None
    schedule: Optional[str] = None
    label_smoothing: Optional[float] = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 500
    num_beams: int = 4
    length_penalty: float = 1.0
    max_new_tokens: Optional[int] = None
    dtype: str = "float32"
    progress: bool = False

    def validate(self) -> "TranslateConfig":
        """Every field checked, ``TranslateError`` naming the first that cannot work; the family's defaults
        fill the fields left at None (lr, warmup, schedule, label_smoothing). Returns self."""
        if not isinstance(self.model, str) or self.model not in FAMILIES:
            raise TranslateError("model", f"expected one of {', '.join(FAMILIES)}, got {self.model!r:.60}")
        if not isinstance(self.task, str) or self.task not in TRANSLATION_TASKS:
            raise TranslateError("task", f"expected one of {', '.join(TRANSLATION_TASKS)}, got {self.task!r:.60}")
        _field(self, "reverse", check_bool)
        _field(self, "progress", check_bool)
        for name, lo in (("train_size", 1), ("valid_size", 1), ("test_size", 1), ("n_layer", 1), ("n_head", 1),
                         ("d_model", 2), ("d_ff", 1), ("steps", 1), ("batch_size", 1), ("seed", 0),
                         ("eval_interval", 1), ("num_beams", 1)):
            _field(self, name, check_count, lo=lo)
        if self.d_model % self.n_head:
            raise TranslateError("n_head", f"expected a divisor of d_model = {self.d_model}, got {self.n_head}")
        if self.model in ("transformer", "bart") and self.d_model % 2:
            raise TranslateError("d_model", f"expected an even size for {self.model} (its sinusoidal or learned "
                                            f"positions pair dimensions), got {self.d_model}")
        _field(self, "dropout", check_real, lo=0.0, hi=1.0, hi_open=True)
        defaults = FAMILY_DEFAULTS[self.model]
        warmup_given = self.warmup is not None
        for name in ("lr", "warmup", "schedule", "label_smoothing"):
            if getattr(self, name) is None:
                setattr(self, name, defaults[name])
        _field(self, "lr", check_real, lo=0.0, lo_open=True)
        _field(self, "warmup", check_count, lo=1)
        if self.warmup > self.steps:
            if warmup_given:  # the peak, at update warmup - 1, would never be trained at
                raise TranslateError("warmup", f"expected at most steps = {self.steps} updates (the rate rises "
                                               f"to the peak lr over the warmup), got {self.warmup}")
            self.warmup = self.steps  # the family's warmup, shortened to fit a run shorter than it
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise TranslateError("schedule", f"expected one of {', '.join(SCHEDULES)} (or None: the family's), "
                                             f"got {self.schedule!r:.60}")
        _field(self, "label_smoothing", check_real, lo=0.0, hi=1.0, hi_open=True)
        if self.model == "t5" and self.label_smoothing != 0.0:
            raise TranslateError("label_smoothing", f"expected 0 for t5 (its loss has no label smoothing), "
                                                    f"got {self.label_smoothing}")
        _field(self, "weight_decay", check_real, lo=0.0)
        _field(self, "grad_clip", check_real, lo=0.0)
        _field(self, "length_penalty", check_real)
        if self.max_new_tokens is not None:
            _field(self, "max_new_tokens", check_count, lo=1, hi=MAX_TOKENS)
        if self.dtype not in ("float32", "float64"):
            raise TranslateError("dtype", f"expected 'float32' or 'float64', got {self.dtype!r:.60}")
        return self


MAX_TOKENS = 512  # the most target tokens decoding may add (the model's position table is sized to fit)

FIELD_HELP = {
    "model": "the encoder-decoder: transformer (post-norm, sinusoidal positions), t5 (relative position "
             "buckets) or bart (learned positions)",
    "task": "numbers (English words -> digits, 0 to 999 999) or dates (2024-03-07 -> 7 March 2024)",
    "reverse": "swap source and target (digits -> words, 7 March 2024 -> 2024-03-07)",
    "train_size": "training pairs",
    "valid_size": "validation pairs (scored every --eval-interval steps)",
    "test_size": "test pairs (decoded at the end, greedy and beam search)",
    "n_layer": "encoder layers (and as many decoder layers)",
    "n_head": "attention heads",
    "d_model": "hidden width",
    "d_ff": "feed-forward width",
    "dropout": "dropout rate",
    "steps": "optimizer steps",
    "batch_size": "pairs per step",
    "lr": "peak learning rate of AdamW (None: the family's: transformer 2e-3, t5 5e-3, bart 1e-3)",
    "warmup": "steps of linear warmup to --lr, at most --steps (None: 100, or --steps when fewer)",
    "schedule": "inverse_sqrt (the Transformer paper's, peak --lr) or cosine (warmup, then down to lr/10); "
                "None: inverse_sqrt for transformer, cosine for t5 and bart",
    "label_smoothing": "label smoothing of the training loss (None: 0.1 for transformer and bart, 0 for t5, "
                       "which has none)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "clip the gradient's global norm to this (0: no clipping)",
    "seed": "seed of the model's initialisation, dropout and batch order",
    "eval_interval": "score the validation split every this many steps (and at the end)",
    "num_beams": "beams of the beam search on the test split",
    "length_penalty": "beam search's length penalty (a hypothesis scores log p / length ** this)",
    "max_new_tokens": "the most tokens a decoding adds (None: the longest target, EOS included, + 4)",
    "dtype": "float32 or float64",
    "progress": "a progress bar over the training steps",
}


class TranslateError(ValueError):
    """A translation option that cannot work: ``field`` names it, ``reason`` says what was expected and what came."""

    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"translate: argument '{field_name}' {reason}")


class TranslateDiverged(RuntimeError):
    """The training loss or the gradient norm is not finite."""


def _field(cfg: TranslateConfig, name: str, check, **options) -> None:
    try:
        setattr(cfg, name, check("translate", name, getattr(cfg, name), **options))
    except (TypeError, ValueError) as e:
        raise TranslateError(name, str(e).split(f"argument '{name}' ", 1)[-1]) from None


def _too_many(cfg: TranslateConfig, error: ValueError) -> TranslateError:
    """The error naming the first split size that the task cannot fill (``translation_task``'s message lists
    what each split holds)."""
    asked = (cfg.train_size, cfg.valid_size, cfg.test_size)
    found = re.search(r"\{'train': (\d+), 'validation': (\d+), 'test': (\d+)\}", str(error))
    held = tuple(int(n) for n in found.groups()) if found else (-1, -1, -1)
    for name, want, have in zip(("train_size", "valid_size", "test_size"), asked, held):
        if want > have >= 0:
            return TranslateError(name, f"expected at most the {have} pairs of the {cfg.task} task's split, "
                                        f"got {want}")
    return TranslateError("train_size", f"(with valid_size and test_size) expected sizes the {cfg.task} task can "
                                        f"fill: {error}")


# -- the model -----------------------------------------------------------------------------------------
def build_translation_model(cfg: TranslateConfig, vocab_size: int, max_len: int):
    """A fresh ``cfg.model`` with PAD/EOS/BOS as its pad, eos and decoder start ids; ``max_len`` bounds every
    source and target (the Transformer's and BART's position tables)."""
    from .models.bart import Bart, BartConfig
    from .models.t5 import T5, T5Config
    from .models.transformer import Transformer, TransformerConfig

    ids = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID)
    if cfg.model == "transformer":
        mcfg = TransformerConfig(vocab_size=vocab_size, max_position=max_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                 d_model=cfg.d_model, d_ff=cfg.d_ff, dropout=cfg.dropout,
                                 label_smoothing=cfg.label_smoothing, dtype=cfg.dtype, **ids)
        return Transformer(mcfg, seed=cfg.seed)
    if cfg.model == "t5":
        mcfg = T5Config(vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_model // cfg.n_head, d_ff=cfg.d_ff,
                        num_layers=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout, dtype=cfg.dtype, **ids)
        return T5(mcfg, seed=cfg.seed)
    mcfg = BartConfig(vocab_size=vocab_size, max_position=max_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      d_model=cfg.d_model, d_ff=cfg.d_ff, dropout=cfg.dropout, label_smoothing=cfg.label_smoothing,
                      bos_token_id=BOS_ID, dtype=cfg.dtype, **ids)
    return Bart(mcfg, seed=cfg.seed)


# -- scores ----------------------------------------------------------------------------------------------
def _written_in_digits(text: str) -> bool:
    return bool(text) and all(c.isdigit() or c == "-" for c in text) and any(c.isdigit() for c in text)


def target_tokens(text: str, characters: Optional[bool] = None) -> Tuple[str, ...]:
    """BLEU's tokens of a target: its characters when it is written in digits ("342", "2024-03-07"), else
    its words split on spaces ("7 March 2024" -> ("7", "March", "2024")). ``characters`` forces one way
    (a decoding is split as its reference is)."""
    if characters is None:
        characters = _written_in_digits(text)
    if characters:
        return tuple(text)
    return tuple(text.split(" ")) if text else ()


def score_translations(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """exact_match and corpus BLEU of decoded strings against their targets (see the module doc for BLEU's
    tokens and order; a decoding is split into tokens as its reference is); also bleu_order, the order used."""
    kinds = [_written_in_digits(r) for r in references]
    refs = [target_tokens(r, c) for r, c in zip(references, kinds)]
    hyps = [target_tokens(p, c) for p, c in zip(predictions, kinds)]
    order = max(1, min(BLEU_ORDER, max(len(r) for r in refs)))
    return {"exact_match": exact_match(predictions, references),
            "bleu": corpus_bleu([[r] for r in refs], hyps, max_order=order), "bleu_order": order}


STRAY = "\ufffd"  # a decoded PAD, BOS or unknown id before EOS: no target holds it, so it is never a match


def decoded_text(ids) -> str:
    """The text a decoding is scored as: the characters of ``ids`` (the tokens after the decoder start) up to
    the first EOS, each PAD, BOS or other non-character id before it written as ``STRAY``. Unlike
    ``TranslationVocab.decode``, which skips PAD and BOS, a stray special token is not credited: the row is no
    exact match, and its BLEU tokens hold the marker."""
    out = []
    n_special = TranslationVocab.n_special
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        out.append(CHARS[i - n_special] if n_special <= i < n_special + len(CHARS) else STRAY)
    return "".join(out)


def _decode_split(model, task: TranslationTask, split: str, vocab: TranslationVocab, max_new_tokens: int,
                  num_beams: int, length_penalty: float) -> List[str]:
    """The decoded strings of every source of ``split``, in order: greedy (num_beams 0) or beam search."""
    out: List[str] = []
    for batch in translation_batches(task, split, batch_size=EVAL_BATCH):
        if num_beams == 0:
            ids = greedy(model, batch.src_ids, src_padding_mask=batch.src_padding_mask,
                         max_new_tokens=max_new_tokens)
        else:
            ids, _ = beam_search(model, batch.src_ids, src_padding_mask=batch.src_padding_mask,
                                 num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
        out.extend(decoded_text(row[1:]) for row in ids)  # after the decoder start token, up to EOS
    return out


def _validation_loss(model, task: TranslationTask) -> float:
    """The plain mean cross entropy per target token of the validation split, teacher forced, in eval mode."""
    total, counted = 0.0, 0
    for batch in translation_batches(task, "validation", batch_size=EVAL_BATCH):
        logits, _ = model.forward(batch.src_ids, batch.tgt_in, None, src_padding_mask=batch.src_padding_mask)
        z = logits.astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, T, V) log-softmax
        scored = batch.targets != IGNORE_INDEX
        picked = np.take_along_axis(logp, np.where(scored, batch.targets, 0)[..., None], axis=-1)[..., 0]
        total -= float(picked[scored].sum())
        counted += int(scored.sum())
    return total / max(counted, 1)


def _in_eval(model, run):
    was_training = model.training
    model.eval()
    try:
        return run()
    finally:
        model.train(was_training)


# -- the run -----------------------------------------------------------------------------------------------
def translate(cfg: TranslateConfig, log=print) -> Dict[str, object]:
    """Train ``cfg.model`` on ``cfg.task`` and score the test split greedily and with beam search.

    Returns a dict: task, family, reverse, parameters, steps, max_new_tokens, history (steps,
    train_loss, val_steps, val_loss, val_exact_match), validation (loss, exact_match: the last),
    greedy and beam (exact_match, bleu, bleu_order on the test split), gain (beam minus greedy:
    exact_match, bleu), examples (a few test sources with their targets and decodings), model
    (the trained model), seconds (training) and decode_seconds (the test decodings), config (the
    resolved fields).
    """
    if not isinstance(cfg, TranslateConfig):
        raise TypeError(f"translate: argument 'cfg' expected a TranslateConfig, got {type(cfg).__name__}")
    cfg.validate()
    try:
        task = translation_task(cfg.task, sizes=(cfg.train_size, cfg.valid_size, cfg.test_size),
                                reverse=cfg.reverse)
    except ValueError as e:
        raise _too_many(cfg, e) from None
    vocab = task.vocab
    pairs = task.train + task.validation + task.test
    longest_src = max(len(p.source) for p in pairs) + 1  # + EOS
    longest_tgt = max(len(p.target) for p in pairs) + 1
    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else longest_tgt + MAX_NEW_TOKENS_MARGIN
    model = build_translation_model(cfg, vocab.vocab_size, max(longest_src, longest_tgt + 1, max_new + 1))
    model.train()

    opt = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    if cfg.schedule == "inverse_sqrt":  # scaled so that its peak, at update warmup - 1, is lr
        schedule = inverse_sqrt(cfg.d_model, cfg.warmup, scale=cfg.lr * math.sqrt(cfg.d_model * cfg.warmup))
    else:
        schedule = warmup_cosine(cfg.lr, cfg.lr * MIN_LR_FRACTION, cfg.warmup, cfg.steps)
    data_rng = np.random.default_rng(cfg.seed + 1)
    direction = "reversed" if cfg.reverse else "forward"
    log(f"translate {cfg.task} ({direction}) with {cfg.model}: {model.num_parameters():,} parameters, "
        f"{len(task.train)}/{len(task.validation)}/{len(task.test)} pairs (train/validation/test), "
        f"{cfg.schedule} schedule to lr {cfg.lr:g} after {cfg.warmup} warmup updates, label smoothing {cfg.label_smoothing:g}")

    history: Dict[str, list] = {"steps": [], "train_loss": [], "val_steps": [], "val_loss": [],
                                "val_exact_match": []}
    validation: Dict[str, float] = {}
    steps = range(cfg.steps)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        steps = bar = tqdm(steps, desc="translate", unit="step", dynamic_ncols=True)
    say = bar.write if (bar is not None and log is print) else log
    start = time.perf_counter()
    epoch = iter(())
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for step in steps:
                batch = next(epoch, None)
                if batch is None:  # a new pass over the training pairs, in a new order
                    epoch = translation_batches(task, "train", batch_size=cfg.batch_size, rng=data_rng)
                    batch = next(epoch)
                for group in opt.param_groups:
                    group["lr"] = schedule(step)
                _, loss = model.forward(batch.src_ids, batch.tgt_in, batch.targets,
                                        src_padding_mask=batch.src_padding_mask)
                if not math.isfinite(loss):
                    raise TranslateDiverged(f"step {step + 1}: the training loss is {loss} (try a smaller --lr "
                                            f"than {cfg.lr})")
                model.zero_grad()
                model.backward()
                if cfg.grad_clip > 0:
                    norm = clip_grad_norm_(model.parameters(), cfg.grad_clip, error_if_nonfinite=False)
                    if not math.isfinite(norm):
                        raise TranslateDiverged(f"step {step + 1}: the gradient norm is {norm} (try a smaller "
                                                f"--lr than {cfg.lr})")
                opt.step()
                history["steps"].append(step + 1)
                history["train_loss"].append(loss)
                done = step + 1
                if done % cfg.eval_interval == 0 or done == cfg.steps:
                    val_loss = _in_eval(model, lambda: _validation_loss(model, task))
                    decoded = _in_eval(model, lambda: _decode_split(model, task, "validation", vocab, max_new, 0,
                                                                    cfg.length_penalty))
                    em = exact_match(decoded, [p.target for p in task.validation])
                    validation = {"loss": val_loss, "exact_match": em}
                    history["val_steps"].append(done)
                    history["val_loss"].append(val_loss)
                    history["val_exact_match"].append(em)
                    say(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f}, val exact match {em:.4f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    began = time.perf_counter()
    references = [p.target for p in task.test]
    decodings = {}
    results = {}
    for name, beams in (("greedy", 0), ("beam", cfg.num_beams)):
        decodings[name] = _decode_split(model, task, "test", vocab, max_new, beams, cfg.length_penalty)
        results[name] = score_translations(decodings[name], references)
    decode_seconds = time.perf_counter() - began
    gain = {key: results["beam"][key] - results["greedy"][key] for key in ("exact_match", "bleu")}
    log(f"test ({len(task.test)} pairs): greedy exact match {results['greedy']['exact_match']:.4f}, "
        f"BLEU {results['greedy']['bleu']:.4f}; beam search ({cfg.num_beams} beams) exact match "
        f"{results['beam']['exact_match']:.4f}, BLEU {results['beam']['bleu']:.4f}")
    examples = [{"source": p.source, "target": p.target, "greedy": g, "beam": b}
                for p, g, b in list(zip(task.test, decodings["greedy"], decodings["beam"]))[:5]]
    return {"task": cfg.task, "family": cfg.model, "reverse": cfg.reverse, "parameters": model.num_parameters(),
            "steps": cfg.steps, "max_new_tokens": max_new, "history": history, "validation": validation,
            "greedy": results["greedy"], "beam": results["beam"], "gain": gain, "examples": examples,
            "model": model, "seconds": seconds, "decode_seconds": decode_seconds, "config": asdict(cfg)}


def results_table(summary: Dict[str, object]) -> str:
    """The test scores of a ``translate`` summary as a short table: greedy, beam search and the gain."""
    g, b, d = summary["greedy"], summary["beam"], summary["gain"]
    beams = summary["config"]["num_beams"]
    n = summary["config"]["test_size"]
    rows = [f"{'test (' + str(n) + ' pairs)':<22}{'exact match':>12}{'BLEU-' + str(g['bleu_order']):>10}",
            f"{'greedy':<22}{g['exact_match']:>12.4f}{g['bleu']:>10.4f}",
            f"{'beam search (' + str(beams) + ')':<22}{b['exact_match']:>12.4f}{b['bleu']:>10.4f}",
            f"{'beam - greedy':<22}{d['exact_match']:>+12.4f}{d['bleu']:>+10.4f}"]
    return "\n".join(rows)


# fields whose default depends on the family (None in the dataclass)
FAMILY_FIELDS = tuple(f.name for f in fields(TranslateConfig) if f.default is None)
