"""Fine-tuning an encoder on a labelled task: ``npformer finetune --task docstrings|tokens``.

The encoder (BERT, RoBERTa, ALBERT, DeBERTa, ELECTRA) comes from a pre-training checkpoint of
``npformer train --model <encoder>`` (``checkpoint``: its model config, weights and character
vocabulary) or is built fresh (``model`` and the shape fields). Its pre-training heads are
dropped; the body's ``encode`` feeds a task head of ``nn/heads.py``:

- "docstrings" (sequence classification, 10 modules): ``SequenceClassificationHead`` on the
  [CLS] token. A checkpoint whose model has a pooler (BERT with NSP, ALBERT) lends the head its
  pre-trained pooler, as BERT's sequence classifier does; otherwise the pooler starts fresh.
- "tokens" (token classification, 6 Python token kinds): ``TokenClassificationHead`` on every
  token; a word's tag is scored at its first piece (``data/tasks.py``).

ELECTRA is fine-tuned through its discriminator's body, as in the paper; the generator is left
out. Texts are encoded with the checkpoint's tokenizer (fresh: the characters of the training
split), and the four special ids after it ([CLS], [SEP], [MASK], [PAD]) as pre-training uses
them; a character the tokenizer has never seen reads as [MASK].

Training: AdamW (decay on matrices only, ``optim.param_groups``), a linear warmup then a
linear or cosine decay, gradient clipping. Every ``eval_interval`` steps the validation split
is scored: loss, accuracy (token accuracy for "tokens") and macro-F1, beside the majority
baseline (always the most frequent training label); at the end, the test split.
``finetune`` returns a summary dict of it all.

Shapes: ids (B, T) int, hidden (B, T, D), logits (B, K) or (B, T, K), K = the task's labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import checkpoint
from .data.char import CharTokenizer
from .data.objectives import SpecialIds, special_ids_for
from .data.tasks import (
    IGNORE_INDEX,
    TASKS,
    Task,
    classification_batches,
    load_task,
    macro_f1,
    majority_baseline,
)
from .models import build as build_model
from .nn.heads import SequenceClassificationHead, TokenClassificationHead
from .nn.module import Module, atomic
from .ops._checks import check_count, check_real
from .optim import AdamW, clip_grad_norm_, linear_decay, param_groups, warmup_cosine
from .pretraining import ENCODERS, OBJECTIVES, encoder_config

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneDiverged", "FinetuneModel", "finetune", "evaluate",
           "load_encoder", "fresh_encoder", "SCHEDULES", "PRETRAINING_HEADS", "FIELD_HELP"]

SCHEDULES = ("linear", "cosine")
# The heads a pre-trained encoder drops for fine-tuning (its pooler moves into a sequence head).
PRETRAINING_HEADS = ("mlm_head", "pooler", "seq_relationship", "sop_classifier", "discriminator_predictions",
                     "generator_predictions")
SHAPE_FIELDS = ("model", "n_layer", "n_head", "d_model", "dropout")  # a fresh encoder's; a checkpoint has its own


@dataclass
class FinetuneConfig:
    task: str = "docstrings"
    checkpoint: str = ""
    model: str = "bert"
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 32
    dropout: float = 0.1
    steps: int = 200
    batch_size: int = 32
    block_size: int = 64
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup: int = 20
    schedule: str = "linear"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 100
    seed: int = 0
    dtype: str = "float32"

    def validate(self) -> "FinetuneConfig":
        """Every field checked, ``FinetuneError`` naming the first that cannot work; returns self."""
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise FinetuneError("task", f"expected one of {', '.join(TASKS)}, got {self.task!r:.60}")
        if not isinstance(self.checkpoint, str) or "\x00" in self.checkpoint:
            raise FinetuneError("checkpoint", f"expected a path or '' (a fresh model), got {self.checkpoint!r:.60}")
        if self.checkpoint:
            from .train import describe_path

            why = describe_path(self.checkpoint)
            if why is not None:
                raise FinetuneError("checkpoint", f"expected a checkpoint file of npformer train, got "
                                                  f"{self.checkpoint!r} ({why})")
        if not isinstance(self.model, str) or self.model not in ENCODERS:
            raise FinetuneError("model", f"expected an encoder, one of {', '.join(ENCODERS)}, got {self.model!r:.60}")
        for name, lo in (("n_layer", 1), ("n_head", 1), ("d_model", 1), ("steps", 1), ("batch_size", 1),
                         ("block_size", 3), ("warmup", 0), ("eval_interval", 1), ("seed", 0)):
            _field(self, name, check_count, lo=lo)
        if self.d_model % self.n_head:
            raise FinetuneError("n_head", f"expected a divisor of d_model = {self.d_model}, got {self.n_head}")
        _field(self, "dropout", check_real, lo=0.0, hi=1.0, hi_open=True)
        _field(self, "lr", check_real, lo=0.0, lo_open=True)
        _field(self, "min_lr", check_real, lo=0.0)
        if self.min_lr > self.lr:
            raise FinetuneError("min_lr", f"expected at most lr = {self.lr}, got {self.min_lr}")
        _field(self, "weight_decay", check_real, lo=0.0)
        _field(self, "grad_clip", check_real, lo=0.0)
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise FinetuneError("schedule", f"expected one of {', '.join(SCHEDULES)}, got {self.schedule!r:.60}")
        if self.dtype not in ("float32", "float64"):
            raise FinetuneError("dtype", f"expected 'float32' or 'float64', got {self.dtype!r:.60}")
        return self


FIELD_HELP = {
    "task": "the labelled task: docstrings (which module a docstring is from, 10 classes) or tokens (the kind of "
            "each Python token, 6 tags)",
    "checkpoint": "a pre-training checkpoint of npformer train --model bert|roberta|deberta|albert|electra to start "
                  "from; '' builds a fresh --model",
    "model": "the encoder family of a fresh model (without --checkpoint)",
    "n_layer": "layers of a fresh model",
    "n_head": "attention heads of a fresh model",
    "d_model": "hidden width of a fresh model",
    "dropout": "dropout of a fresh model and its head (a checkpoint's model keeps its own)",
    "steps": "optimizer steps",
    "batch_size": "examples per step",
    "block_size": "tokens per example, [CLS] and [SEP] included (longer texts are cut)",
    "lr": "peak learning rate of AdamW",
    "min_lr": "learning rate at the last step",
    "warmup": "steps of linear warmup up to --lr (a run of fewer steps ends before the peak)",
    "schedule": "decay after warmup: linear or cosine",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "clip the gradient's global norm to this (0: no clipping)",
    "eval_interval": "score the validation split every this many steps (and at the end)",
    "seed": "seed of the model's initialisation, dropout and batch order",
    "dtype": "float32 or float64",
}


class FinetuneError(ValueError):
    """A fine-tuning option that cannot work: ``field`` names it, ``reason`` says what was expected and what came."""

    def __init__(self, field_name: str, reason: str):
        self.field, self.reason = field_name, reason
        super().__init__(f"finetune: argument '{field_name}' {reason}")


class FinetuneDiverged(RuntimeError):
    """The training loss or the gradient norm is not finite."""


def _field(cfg: FinetuneConfig, name: str, check, **options) -> None:
    try:
        setattr(cfg, name, check("finetune", name, getattr(cfg, name), **options))
    except (TypeError, ValueError) as e:
        raise FinetuneError(name, str(e).split(f"argument '{name}' ", 1)[-1]) from None


# -- the model ----------------------------------------------------------------------------------------
class FinetuneModel(Module):
    """encoder.encode -> head: ``forward(ids, attention_mask, labels) -> (logits, loss)``, ``backward()``."""

    def __init__(self, encoder: Module, head: Module):
        super().__init__()
        for name, m, kinds in (("encoder", encoder, None), ("head", head,
                                                           (SequenceClassificationHead, TokenClassificationHead))):
            if not isinstance(m, Module) or (kinds and not isinstance(m, kinds)):
                raise TypeError(f"FinetuneModel: argument '{name}' expected "
                                f"{'an encoder Module' if kinds is None else 'a classification head'}, "
                                f"got {type(m).__name__}")
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"FinetuneModel: argument 'encoder' expected a model with encode(), "
                            f"got {type(encoder).__name__}")
        self.encoder = encoder
        self.head = head

    @atomic
    def forward(self, ids: np.ndarray, attention_mask: Optional[np.ndarray] = None,
                labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T), attention_mask (B, T) of 1/0, labels (B,) or (B, T) -> (logits, mean cross entropy or None)."""
        hidden = self.encoder.encode(ids, None, attention_mask)  # (B, T, D); token types default to 0
        return self.head.forward(hidden, labels)

    @atomic
    def backward(self) -> None:
        """Every parameter's gradient of the latest unmatched forward's loss: the head, then the body."""
        dhidden = self.head.backward()  # (B, T, D)
        self.encoder.backward_encode(dhidden)


def _body(model: Module) -> Module:
    """The encoder that ``encode`` runs: ELECTRA's discriminator (its generator left out), else the model."""
    return model.discriminator if hasattr(model, "discriminator") else model


def _make_head(task: Task, body: Module, dropout: float, seed: int) -> Module:
    cls = SequenceClassificationHead if task.kind == "sequence" else TokenClassificationHead
    dtype = body.embeddings.LayerNorm.weight.data.dtype
    head = cls(body.cfg.d_model, task.num_labels, dropout=dropout, rng=np.random.default_rng(seed + 1), dtype=dtype)
    pooler = getattr(body, "pooler", None)
    if isinstance(head, SequenceClassificationHead) and pooler is not None:
        head.pooler.load_state_dict(pooler.state_dict())  # the pre-trained pooler (BERT's NSP, ALBERT's SOP)
    return head


def _strip(body: Module) -> Module:
    """The body without its pre-training heads (so they take no optimizer state and no checkpoint space)."""
    for name in PRETRAINING_HEADS:
        if name in body._modules:
            setattr(body, name, None)
    return body


def fresh_encoder(cfg: FinetuneConfig, specials: SpecialIds) -> Module:
    """A new ``cfg.model`` encoder on the special ids' vocabulary, shaped as ``npformer train`` shapes one."""
    mcfg = encoder_config(cfg.model, OBJECTIVES[cfg.model][0], vocab_size=specials.vocab_size, specials=specials,
                          block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                          dropout=cfg.dropout, dtype=cfg.dtype)
    return build_model(cfg.model, mcfg.to_dict(), seed=cfg.seed)


def load_encoder(path: str, dtype: str = "float32", seed: int = 0):
    """(encoder model, tokenizer, family) of a pre-training checkpoint; ``FinetuneError`` naming ``checkpoint``
    for a file that is no encoder's checkpoint (a GPT's, a damaged one)."""
    from .train import tokenizer_from_checkpoint

    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise FinetuneError("checkpoint", f"expected a checkpoint of npformer train, got {path!r}: {e}") from None
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    name = saved.get("model")
    if name not in ENCODERS:
        raise FinetuneError("checkpoint", f"expected the checkpoint of a pre-trained encoder "
                                          f"({', '.join(ENCODERS)}), got a {name!r:.40} checkpoint in {path!r}"
                                          + (", a causal language model" if name in ("gpt", "llama") else ""))
    try:
        tok = tokenizer_from_checkpoint(state, path)
        model = build_model(name, state["model_config"], seed=seed)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FinetuneError("checkpoint", f"expected a readable {name} checkpoint in {path!r}: {e}") from None
    if model.cfg.dtype != dtype:
        model.astype(dtype)
    return model, tok, name


class _KnownChars:
    """A character tokenizer that reads a character it has never seen as ``unknown`` (the [MASK] id)."""

    def __init__(self, tok: CharTokenizer, unknown: int):
        self.stoi, self.unknown = tok.stoi, unknown
        self.unseen: set = set()

    def encode(self, text: str) -> List[int]:
        ids = []
        for c in text:
            i = self.stoi.get(c)
            if i is None:
                self.unseen.add(c)
                i = self.unknown
            ids.append(i)
        return ids


# -- batches and scores -------------------------------------------------------------------------------
def _trim(batch: Dict[str, np.ndarray], token_task: bool) -> Dict[str, np.ndarray]:
    """The batch cut to its longest row (padding past it changes nothing: its keys are masked, its labels -100)."""
    T = int(batch["attention_mask"].sum(axis=1).max())
    out = {k: (v[:, :T] if v.ndim == 2 and (k != "labels" or token_task) else v) for k, v in batch.items()}
    return out


EVAL_BATCH = 128  # examples per forward when scoring a split (no backward: more fit in memory)


def _batches(tok, task: Task, split: str, cfg: FinetuneConfig, specials: SpecialIds,
             rng: Optional[np.random.Generator], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
    for batch in classification_batches(tok, task, split, batch_size=batch_size, max_length=cfg.block_size,
                                        rng=rng, specials=specials):
        yield _trim(batch, task.kind == "token")


def evaluate(model: FinetuneModel, task: Task, split: str, tok, specials: SpecialIds,
             cfg: FinetuneConfig) -> Dict[str, float]:
    """loss, accuracy (per token for a token task), macro_f1 and majority_baseline on ``split`` (eval mode)."""
    was_training = model.training
    model.eval()
    labels_all, preds_all, loss_sum, counted = [], [], 0.0, 0
    try:
        for batch in _batches(tok, task, split, cfg, specials, None, max(cfg.batch_size, EVAL_BATCH)):
            labels = batch["labels"]
            logits, loss = model.forward(batch["input_ids"], batch["attention_mask"], labels)
            scored = labels != IGNORE_INDEX
            n = int(scored.sum())
            loss_sum += loss * n
            counted += n
            labels_all.append(labels[scored])
            preds_all.append(logits.argmax(axis=-1)[scored])
    finally:
        model.train(was_training)
    y, p = np.concatenate(labels_all), np.concatenate(preds_all)
    train_labels = task.labels("train")
    return {"loss": loss_sum / max(counted, 1), "accuracy": float(np.mean(y == p)),
            "macro_f1": macro_f1(y, p, task.num_labels), "majority_baseline": majority_baseline(train_labels, y),
            "scored": int(y.size)}


# -- the run ---------------------------------------------------------------------------------------------
def finetune(cfg: FinetuneConfig, log=print) -> Dict[str, object]:
    """Fine-tune as ``cfg`` says; returns the summary (see the module docstring).

    Keys: task, family, parameters, steps, history (steps, train_loss, val_steps, val_loss,
    val_accuracy, val_macro_f1; the validation scores from step 0, before any update), validation and test
    (``evaluate``'s dicts, the last), model (the ``FinetuneModel``), seconds, config.
    """
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"finetune: argument 'cfg' expected a FinetuneConfig, got {type(cfg).__name__}")
    cfg.validate()
    task = load_task(cfg.task)
    if cfg.checkpoint:
        model, tok, family = load_encoder(cfg.checkpoint, cfg.dtype, cfg.seed)
        dropout = _body(model).cfg.dropout
    else:
        family, dropout = cfg.model, cfg.dropout
        tok = CharTokenizer.from_text("".join(e.text for e in task.train))
        model = fresh_encoder(cfg, special_ids_for(tok))
    specials = special_ids_for(tok)
    body = _body(model)
    limit = body.cfg.block_size
    if limit is not None and cfg.block_size > limit:
        raise FinetuneError("block_size", f"expected at most the {family} model's {limit} positions, "
                                          f"got {cfg.block_size}")
    head = _make_head(task, body, dropout, cfg.seed)
    net = FinetuneModel(_strip(body), head)
    reader = _KnownChars(tok, specials.mask) if isinstance(tok, CharTokenizer) else tok

    opt = AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = (linear_decay(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr) if cfg.schedule == "linear"
                else warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, cfg.steps))
    data_rng = np.random.default_rng(cfg.seed + 2)
    source = cfg.checkpoint or f"a fresh {family}"
    log(f"finetune {family} ({source}) on {task.name}: {net.num_parameters():,} parameters, "
        f"{task.num_labels} labels, {len(task.train)}/{len(task.validation)}/{len(task.test)} examples "
        f"(train/validation/test)")

    history: Dict[str, list] = {"steps": [], "train_loss": [], "val_steps": [], "val_loss": [], "val_accuracy": [],
                                "val_macro_f1": []}
    what = "token accuracy" if task.kind == "token" else "accuracy"
    start = time.perf_counter()

    def validate(done: int, loss: Optional[float]) -> Dict[str, float]:
        scores = evaluate(net, task, "validation", reader, specials, cfg)
        for key in ("loss", "accuracy", "macro_f1"):
            history[f"val_{key}"].append(scores[key])
        history["val_steps"].append(done)
        train = "" if loss is None else f"train loss {loss:.4f}, "
        log(f"step {done}: {train}val loss {scores['loss']:.4f}, val {what} {scores['accuracy']:.4f}, "
            f"macro-F1 {scores['macro_f1']:.4f} (majority baseline {scores['majority_baseline']:.4f})")
        return scores

    validation = validate(0, None)  # the untrained head: where the loss starts
    epoch = iter(())
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in range(cfg.steps):
            batch = next(epoch, None)
            if batch is None:  # a new pass over the training split, in a new order
                epoch = _batches(reader, task, "train", cfg, specials, data_rng, cfg.batch_size)
                batch = next(epoch)
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            _, loss = net.forward(batch["input_ids"], batch["attention_mask"], batch["labels"])
            if not math.isfinite(loss):
                raise FinetuneDiverged(f"step {step + 1}: the training loss is {loss} (try a smaller --lr than "
                                       f"{cfg.lr})")
            net.zero_grad()
            net.backward()
            if cfg.grad_clip > 0:
                norm = clip_grad_norm_(net.parameters(), cfg.grad_clip, error_if_nonfinite=False)
                if not math.isfinite(norm):
                    raise FinetuneDiverged(f"step {step + 1}: the gradient norm is {norm} (try a smaller --lr "
                                           f"than {cfg.lr})")
            opt.step()
            history["steps"].append(step + 1)
            history["train_loss"].append(loss)
            done = step + 1
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                validation = validate(done, loss)
    test = evaluate(net, task, "test", reader, specials, cfg)
    unseen = getattr(reader, "unseen", ())
    if unseen:
        log(f"{len(unseen)} characters the tokenizer never saw read as [MASK]: "
            f"{''.join(sorted(unseen))[:40]!r}")
    log(f"test macro-F1 {test['macro_f1']:.4f}")
    log(f"test accuracy {test['accuracy']:.4f} (majority baseline {test['majority_baseline']:.4f})")
    return {"task": task.name, "family": family, "parameters": net.num_parameters(), "steps": cfg.steps,
            "history": history, "validation": validation, "test": test, "model": net,
            "seconds": time.perf_counter() - start, "config": asdict(cfg)}
