"""Architecture studies: train a few model variants over a few seeds and tabulate the results.

A *study* is a JSON object (``npformer/studies/*.json`` holds the built-in ones)::

    {"name": "norm", "family": "variant",
     "description": "...",                                   (optional)
     "base": {"n_layer": 8, "n_head": 4, "d_model": 64},     fields of the family's config
     "variants": {"pre_layernorm": {"norm": "layernorm", "norm_position": "pre"}, ...},
     "seeds": [0, 1],
     "train": {"steps": 300, "batch_size": 16, "block_size": 64, "lr": 2e-3, "min_lr": 2e-4,
               "warmup": 0, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 50,
               "eval_batches": 4},
     "eval": {"lengths": [64, 128, 256]},                    (optional; default [train.block_size])
     "data": "default",                                      (optional; or a UTF-8 text file)
     "plot": {"x": "kv_cache_bytes_per_token"}}              (optional; see ``PLOT_X``)

A variant's overrides may also name another ``family`` (e.g. ``"gpt"`` beside ``"llama"``).
The model's ``vocab_size`` is the corpus's character count, and its ``block_size`` (the
longest context it accepts) defaults to the longest of ``train.block_size`` and the
evaluation lengths. Every key is checked before anything runs: an unknown key or a bad
value raises ``StudyError`` naming its path (``train.steps``, ``variants.post.norm``): a
``train.warmup`` of ``train.steps`` or more (the peak rate would never be trained at), a ``data``
file that is not UTF-8 or is empty, a variant's override that breaks a base valid alone (named
under the variant), a base key that is no field of a variant's other family (named as the variant).

``run_study`` trains every variant with every seed, one after another, each run a small
loop of its own: AdamW (betas 0.9, 0.95) over ``param_groups`` with weight decay, linear
warmup then cosine decay, global gradient-norm clipping, on the character-tokenized corpus
split as ``npformer train`` splits it with its default seed (so every run, whatever its
seed, is scored on the same validation text). The seed sets the initialisation and the
batches. Each run writes ``<out>/runs/<label>/seed<k>/result.json`` (its history's ``steps`` and
``val_steps`` count the updates done: 10, 20 for validations after 10 and 20 updates); a run whose result
exists (made by the same settings) is not run again, so an interrupted study continues
where it stopped. A run whose loss or gradient becomes NaN or inf stops there and is
recorded as diverged, its losses NaN.

Then ``<out>`` receives ``results.csv`` and ``results.md`` (one row per variant: the mean
and the standard deviation over seeds, ddof = 1, "-" for one seed, of each metric),
``loss_curves.png`` (mean validation loss against step, one line per variant) and the
study's own plot: ``val_loss_vs_<plot x>.png`` (``val_loss_by_variant.png`` for the default bars).

Small models run fastest with one BLAS thread: ``OPENBLAS_NUM_THREADS=1 npformer experiment norm``
(NumPy's default of one thread per core spends more time coordinating threads than multiplying
64 x 64 matrices, all the more on a busy machine).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .data.char import CharTokenizer
from .data.corpus import default_corpus, get_batch
from .models import FAMILIES
from .optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine

STUDY_KEYS = ("name", "family", "description", "base", "variants", "seeds", "train", "eval", "data", "plot")
REQUIRED_KEYS = ("name", "base", "variants", "seeds", "train")
TRAIN_DEFAULTS: Dict[str, object] = {"steps": 200, "batch_size": 16, "block_size": 64, "lr": 2e-3, "min_lr": 2e-4,
                                     "warmup": 20, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 50,
                                     "eval_batches": 4}
TRAIN_COUNTS = ("steps", "batch_size", "block_size", "eval_interval", "eval_batches")  # integers >= 1
LANGUAGE_MODELS = ("gpt", "llama", "variant", "mamba")  # families a study can train (next-token prediction)
# The study's own plot: its x axis. "eval_length" draws validation loss against context length (one line per
# variant); a metric draws validation loss against it (one point per variant, error bars over seeds); "variant"
# draws a bar per variant.
PLOT_X = ("variant", "eval_length", "kv_cache_bytes_per_token", "parameters", "flops_per_token", "tokens_per_s")
MAX_STEPS = 1_000_000
MAX_EVAL_BATCHES = 1000
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VAL_FRACTION, SPLIT_SEED = 0.1, 1337  # as npformer train's defaults: every study scores the same validation text
TRAIN_LOSS_TAIL = 10  # the final training loss is the mean of the last this many steps' losses (one is noisy)
HISTORY_STEPS = "updates done"  # a result's history steps: the number of updates done when recorded (1, 2, ...)
STUDIES_PACKAGE = "npformer"
STUDIES_FOLDER = "studies"


class StudyError(ValueError):
    """A study that cannot run: ``path`` names the key (``train.steps``; ``study`` for the whole file)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass
class Study:
    """A checked study; ``variants`` maps a label to its model config fields (the base's with its overrides)
    and ``families`` a label to its family."""

    name: str
    family: str
    description: str
    base: Dict[str, object]
    variants: Dict[str, Dict[str, object]]
    families: Dict[str, str]
    seeds: List[int]
    train: Dict[str, object]
    lengths: List[int]
    data: str
    plot: Dict[str, object] = field(default_factory=dict)

    def model_config(self, label: str, vocab_size: int) -> Dict[str, object]:
        """The fields the label's model is built from (``vocab_size`` and ``block_size`` filled in)."""
        cfg = dict(self.variants[label])
        cfg["vocab_size"] = vocab_size
        cfg.setdefault("block_size", max([int(self.train["block_size"])] + self.lengths))
        return cfg


# -- reading and checking a study ---------------------------------------------------------------
def builtin_studies() -> Dict[str, Path]:
    """The built-in studies by name: ``npformer/studies/<name>.json``."""
    folder = resources.files(STUDIES_PACKAGE) / STUDIES_FOLDER
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".json")}


def find_study(name_or_path: str) -> Path:
    """A built-in study's file by name, or a JSON file's path; ``StudyError`` ('study') otherwise."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise StudyError("study", f"expected a built-in study name or a JSON file, got {name_or_path!r}")
    studies = builtin_studies()
    if name_or_path in studies:
        return studies[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise StudyError("study", f"expected a built-in study ({', '.join(studies)}) or a JSON file, "
                              f"got {name_or_path!r}")


def load_study(name_or_path: str) -> Study:
    """Read and check a study (by built-in name or file path)."""
    path = find_study(name_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudyError("study", f"expected a readable JSON file, got {str(path)!r}: {e}") from None
    return validate_study(raw)


def _int(path: str, value: object, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StudyError(path, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise StudyError(path, f"expected an integer {bound}, got {value}")
    return value


def _real(path: str, value: object, lo: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StudyError(path, f"expected a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise StudyError(path, f"expected a number {'>' if lo_open else '>='} {lo}, got {value}")
    return float(value)


def _object(path: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise StudyError(path, f"expected a JSON object, got {type(value).__name__} {value!r:.60}")
    return value


def _unknown(path: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise StudyError(where, f"unknown key (expected one of {', '.join(allowed)})")


def _config_class(family: str):
    return FAMILIES[family][1]


def _check_family(path: str, value: object) -> str:
    if value not in LANGUAGE_MODELS or value not in FAMILIES:
        have = [f for f in LANGUAGE_MODELS if f in FAMILIES]
        raise StudyError(path, f"expected one of {', '.join(have)}, got {value!r}")
    return value


def _check_model(label: str, family: str, study_family: str, base: Dict[str, object],
                 overrides: Dict[str, object], vocab_size: int, block_size: int) -> None:
    """Build the label's config (so its own checks run), naming the key of a bad field: the variant's own key
    (or the variant, when its overrides break a base that is valid alone), else the base's."""
    config_cls = _config_class(family)
    names = [f.name for f in fields(config_cls)] if is_dataclass(config_cls) else None
    allowed = [n for n in names if n != "vocab_size"] if names else None
    own = {k: v for k, v in overrides.items() if k != "family"}
    if allowed is not None:
        for where, given in (("base", base), (f"variants.{label}", own)):
            bad = sorted(set(given) - set(allowed))
            if not bad:
                continue
            if where == "base" and family != study_family:
                raise StudyError(f"variants.{label}", f"base key '{bad[0]}' does not apply to this variant's family "
                                                      f"{family} (not a field of {config_cls.__name__}: expected "
                                                      f"one of {', '.join(allowed)})")
            raise StudyError(f"{where}.{bad[0]}", f"unknown field of {config_cls.__name__} "
                                                  f"(expected one of {', '.join(allowed)})")

    def build(given: Dict[str, object]):
        cfg = {**given, "vocab_size": vocab_size}
        cfg.setdefault("block_size", block_size)
        return config_cls(**cfg)

    try:
        made = build({**base, **own})
    except (TypeError, ValueError) as e:
        match = re.search(r"argument '(\w+)'", str(e))
        key = match.group(1) if match else "study"
        try:
            build(base)
            base_alone = True
        except (TypeError, ValueError):
            base_alone = False
        variant = f"variants.{label}"
        if key in own:
            raise StudyError(f"{variant}.{key}", str(e)) from None
        if own and base_alone:  # the base alone is valid: the variant's overrides broke it
            where = f"{variant}.{next(iter(own))}" if len(own) == 1 else variant
            given = ", ".join(f"{k}={v!r}" for k, v in own.items())
            raise StudyError(where, f"{e} (with the variant's {given} over the base)") from None
        raise StudyError(f"base.{key}" if key in base else variant, str(e)) from None
    context = getattr(made, "block_size", block_size)
    if context < block_size:
        key = "block_size"
        where = f"variants.{label}.{key}" if key in overrides else f"base.{key}"
        raise StudyError(where, f"expected at least the longest training or evaluation length, {block_size}, "
                                f"got {context}")


def validate_study(raw: object) -> Study:
    """Check every key of a study's JSON object; ``StudyError`` naming the first bad one's path."""
    raw = _object("study", raw)
    _unknown("", raw, STUDY_KEYS)
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise StudyError(key, "missing (a study needs " + ", ".join(REQUIRED_KEYS) + ")")
    name = raw["name"]
    if not isinstance(name, str) or not LABEL.fullmatch(name):
        raise StudyError("name", f"expected a name of letters, digits, '_', '.', '-' (at most 64), got {name!r}")
    family = _check_family("family", raw.get("family", "variant"))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise StudyError("description", f"expected a string, got {description!r:.60}")

    train = _object("train", raw["train"])
    _unknown("train", train, TRAIN_DEFAULTS)
    train = {**TRAIN_DEFAULTS, **train}
    for key in TRAIN_COUNTS:
        hi = MAX_STEPS if key == "steps" else MAX_EVAL_BATCHES if key == "eval_batches" else None
        _int(f"train.{key}", train[key], 1, hi)
    _int("train.warmup", train["warmup"], 0, MAX_STEPS)
    if train["warmup"] >= train["steps"]:  # the peak train.lr would come at the last update or never
        raise StudyError("train.warmup", f"expected fewer updates than train.steps = {train['steps']} (the rate "
                                         f"rises to train.lr over the warmup, then decays), got {train['warmup']}")
    train["lr"] = _real("train.lr", train["lr"], 0.0, lo_open=True)
    train["min_lr"] = _real("train.min_lr", train["min_lr"], 0.0)
    if train["min_lr"] > train["lr"]:
        raise StudyError("train.min_lr", f"expected at most train.lr = {train['lr']}, got {train['min_lr']}")
    train["weight_decay"] = _real("train.weight_decay", train["weight_decay"], 0.0)
    train["grad_clip"] = _real("train.grad_clip", train["grad_clip"], 0.0, lo_open=True)

    ev = _object("eval", raw.get("eval", {}))
    _unknown("eval", ev, ("lengths",))
    lengths = ev.get("lengths", [train["block_size"]])
    if not isinstance(lengths, list) or not lengths:
        raise StudyError("eval.lengths", f"expected a non-empty list of context lengths, got {lengths!r:.60}")
    lengths = [_int(f"eval.lengths.{i}", n, 1) for i, n in enumerate(lengths)]
    if len(set(lengths)) != len(lengths):
        raise StudyError("eval.lengths", f"expected distinct lengths, got {lengths}")

    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise StudyError("seeds", f"expected a non-empty list of integers, got {seeds!r:.60}")
    seeds = [_int(f"seeds.{i}", s, 0, 2**32 - 1) for i, s in enumerate(seeds)]
    if len(set(seeds)) != len(seeds):
        raise StudyError("seeds", f"expected distinct seeds, got {seeds}")

    data = raw.get("data", "default")
    if not isinstance(data, str) or not (data == "default" or Path(data).is_file()):
        raise StudyError("data", f"expected 'default' or a UTF-8 text file, got {data!r:.80}")
    if data != "default":
        load_corpus_text(data)

    plot = _object("plot", raw.get("plot", {}))
    _unknown("plot", plot, ("x", "title"))
    if plot.get("x", "variant") not in PLOT_X:
        raise StudyError("plot.x", f"expected one of {', '.join(PLOT_X)}, got {plot.get('x')!r}")
    if not isinstance(plot.get("title", ""), str):
        raise StudyError("plot.title", f"expected a string, got {plot.get('title')!r:.60}")

    base = _object("base", raw["base"])
    for key in ("vocab_size", "family"):
        if key in base:
            raise StudyError(f"base.{key}", "is not a model field a study sets" + (
                " (it is the corpus's character count)" if key == "vocab_size" else " here (use the study's 'family')"))
    variants_raw = _object("variants", raw["variants"])
    if not variants_raw:
        raise StudyError("variants", "expected at least one variant")
    context = max([train["block_size"]] + lengths)
    variants, families = {}, {}
    for label, overrides in variants_raw.items():
        if not LABEL.fullmatch(label):
            raise StudyError(f"variants.{label}", "expected a label of letters, digits, '_', '.', '-' (at most 64, "
                                                  "a folder name)")
        overrides = _object(f"variants.{label}", overrides)
        if "vocab_size" in overrides:
            raise StudyError(f"variants.{label}.vocab_size", "is not a model field a study sets (it is the "
                                                             "corpus's character count)")
        fam = _check_family(f"variants.{label}.family", overrides.get("family", family))
        _check_model(label, fam, family, base, overrides, vocab_size=256, block_size=context)
        variants[label] = {**base, **{k: v for k, v in overrides.items() if k != "family"}}
        families[label] = fam
    return Study(name=name, family=family, description=description, base=dict(base), variants=variants,
                 families=families, seeds=seeds, train=train, lengths=lengths, data=data, plot=dict(plot))


# -- one run ------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The tokenized text and its split (the same for every run of a study)."""

    tokenizer: CharTokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray


def load_corpus_text(data: str) -> str:
    """The study's text: the default corpus, or the file ``data`` (``StudyError('data')`` when it is not
    UTF-8 or is empty)."""
    if data == "default":
        return default_corpus()
    try:
        text = Path(data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StudyError("data", f"expected a readable UTF-8 text file, got {data!r:.80}: {e}") from None
    if not text:
        raise StudyError("data", f"expected a text file with some text, got the empty file {data!r:.80}")
    return text


def load_corpus(data: str) -> Corpus:
    """The character-tokenized corpus, split as ``npformer train`` splits it with its default seed."""
    from .train import split_tokens

    text = load_corpus_text(data)
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids, _ = split_tokens(tok.encode_array(text), VAL_FRACTION, SPLIT_SEED)
    return Corpus(tok, train_ids, val_ids)


def kv_cache_bytes_per_token(family: str, cfg, dtype_bytes: int) -> int:
    """Bytes of keys and values a decoder caches per token, all layers (2 L H_kv d_head bytes)."""
    if hasattr(cfg, "kv_cache_bytes_per_token"):
        return int(cfg.kv_cache_bytes_per_token(dtype_bytes=dtype_bytes))
    if family == "llama":
        head_dim = cfg.head_dim or cfg.d_model // cfg.n_head
        return 2 * cfg.n_layer * cfg.n_kv_head * head_dim * dtype_bytes
    if family == "mamba":  # a recurrent state of fixed size: nothing grows with the tokens
        return 0
    return 2 * cfg.n_layer * cfg.d_model * dtype_bytes  # gpt: one key and one value head per query head


def eval_loss(model, ids: np.ndarray, length: int, batch_size: int, batches: int) -> float:
    """Mean loss over ``batches`` fixed batches of windows of ``length`` tokens (the same windows every call)."""
    rng = np.random.default_rng(0)
    was_training = model.training
    model.eval()
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            losses = [model.forward(*get_batch(ids, batch_size, length, rng))[1] for _ in range(batches)]
    finally:
        model.train(was_training)
    return float(np.mean(losses))


def run_spec(study: Study, label: str, seed: int, vocab_size: int) -> Dict[str, object]:
    """What a run's result depends on: a result.json made with another spec is not reused."""
    return {"family": study.families[label], "model": study.model_config(label, vocab_size), "seed": seed,
            "train": study.train, "eval_lengths": study.lengths, "data": study.data}


def run_one(study: Study, label: str, seed: int, corpus: Corpus,
            on_step: Optional[Callable[[int, float], None]] = None) -> Dict[str, object]:
    """Train the variant ``label`` with ``seed``; the result (metrics, loss history, spec) as a dict."""
    from .models import build

    t0 = time.perf_counter()
    tr = study.train
    spec = run_spec(study, label, seed, corpus.tokenizer.vocab_size)
    family = study.families[label]
    model = build(family, spec["model"], seed=seed)
    cfg = model.cfg
    model.train()
    data_rng = np.random.default_rng(seed + 1)  # as npformer train: the batches' stream beside the model's
    opt = AdamW(param_groups(model, tr["weight_decay"]), lr=tr["lr"], betas=(0.9, 0.95), eps=1e-8)
    schedule = warmup_cosine(tr["lr"], tr["min_lr"], tr["warmup"], tr["steps"])
    B, T = tr["batch_size"], tr["block_size"]
    history = {"steps": [], "train_loss": [], "val_steps": [], "val_loss": []}
    diverged, train_time = None, 0.0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for step in range(tr["steps"]):
            t = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            x, y = get_batch(corpus.train_ids, B, T, data_rng)
            loss = model.forward(x, y)[1]
            if not math.isfinite(loss):
                diverged = {"step": step + 1, "what": f"training loss {loss}"}
                model.clear_caches()
                break
            model.zero_grad()
            model.backward()
            norm = clip_grad_norm_(model.parameters(), tr["grad_clip"], error_if_nonfinite=False)
            if not math.isfinite(norm):
                diverged = {"step": step + 1, "what": f"gradient norm {norm}"}
                break
            opt.step()
            train_time += time.perf_counter() - t
            done = step + 1
            history["steps"].append(done)
            history["train_loss"].append(float(loss))
            if done % tr["eval_interval"] == 0 or done == tr["steps"]:
                val = eval_loss(model, corpus.val_ids, T, B, tr["eval_batches"])
                history["val_steps"].append(done)
                history["val_loss"].append(val)
                if not math.isfinite(val):
                    diverged = {"step": done, "what": f"validation loss {val}"}
                    break
            if on_step is not None:
                on_step(done, loss)
    nan = float("nan")
    if diverged is None:
        val_at = {str(L): eval_loss(model, corpus.val_ids, L, B, tr["eval_batches"]) for L in study.lengths}
        tail = history["train_loss"][-TRAIN_LOSS_TAIL:]
        train_loss, val_loss = float(np.mean(tail)), history["val_loss"][-1]
    else:
        val_at = {str(L): nan for L in study.lengths}
        train_loss = val_loss = nan
    steps_done = len(history["steps"])
    dtype_bytes = np.dtype(cfg.dtype).itemsize
    flops = cfg.flops_per_token() if hasattr(cfg, "flops_per_token") else nan
    return {
        "study": study.name, "label": label, "seed": seed, "spec": spec, "config": cfg.to_dict(),
        "train_loss": train_loss, "val_loss": val_loss, "perplexity": math.exp(val_loss) if val_loss < 700 else nan,
        "val_loss_at": val_at, "diverged": diverged, "steps": steps_done,
        "tokens_per_s": steps_done * B * T / train_time if train_time > 0 else nan,
        "parameters": int(model.num_parameters()),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(family, cfg, dtype_bytes),
        "flops_per_token": float(flops), "wall_s": time.perf_counter() - t0, "history": history,
        "history_steps": HISTORY_STEPS,
    }


# -- the study ----------------------------------------------------------------------------------
def result_path(out: Path, label: str, seed: int) -> Path:
    return Path(out) / "runs" / label / f"seed{seed}" / "result.json"


def _write_json(path: Path, obj: object) -> None:
    """Write atomically (a temporary file renamed), so an interrupted write leaves no half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def history_of(result: Dict[str, object]) -> Dict[str, list]:
    """A result's history with its steps counting the updates done (1, 2, ...); a result written before
    ``history_steps`` was recorded counted from 0, and is read shifted by one."""
    history = dict(result["history"])
    if result.get("history_steps") != HISTORY_STEPS:
        for key in ("steps", "val_steps"):
            history[key] = [s + 1 for s in history.get(key, [])]
    return history


def _read_result(path: Path, spec: Dict[str, object]) -> Optional[Dict[str, object]]:
    """A finished run's result, or None if it has none; ``StudyError`` if it was made by other settings."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # unreadable: run it again
    if not isinstance(result, dict) or json.loads(json.dumps(spec)) != result.get("spec"):
        raise StudyError("study", f"{path} was made by other settings than this study's: remove it (or the "
                                  f"study's folder) to run it again, or choose another output folder")
    return result


def run_study(study: Study, out: str | os.PathLike, progress: bool = True, log=print) -> Dict[str, object]:
    """Run every variant x seed (skipping those with a result), then write the tables and plots.

    Returns ``{"rows": [...], "results": {label: [result per seed]}, "ran": n, "skipped": n,
    "wall_s": seconds, "files": {...}}``.
    """
    out = Path(out)
    corpus = load_corpus(study.data)
    shortest = min(len(corpus.train_ids), len(corpus.val_ids))
    longest = max([study.train["block_size"]] + study.lengths)
    if longest >= shortest:
        raise StudyError("eval.lengths" if max(study.lengths) >= shortest else "train.block_size",
                         f"expected lengths below the shortest split of the data ({shortest} tokens), got {longest}")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", _study_json(study))
    t0 = time.perf_counter()
    jobs = [(label, seed) for label in study.variants for seed in study.seeds]
    results: Dict[str, List[Dict[str, object]]] = {label: [] for label in study.variants}
    todo = []
    for label, seed in jobs:
        found = _read_result(result_path(out, label, seed), run_spec(study, label, seed, corpus.tokenizer.vocab_size))
        if found is None:
            todo.append((label, seed))
    skipped = len(jobs) - len(todo)
    if skipped:
        log(f"{study.name}: {skipped} of {len(jobs)} runs already done in {out}, {len(todo)} to run")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=study.name, unit="run", dynamic_ncols=True)
    try:
        for label, seed in todo:
            if bar is not None:
                bar.set_postfix_str(f"{label} seed {seed}")

                def on_step(done, loss, label=label, seed=seed):
                    if done % 10 == 0:
                        bar.set_postfix_str(f"{label} seed {seed} step {done} loss {loss:.3f}")
            else:
                on_step = None
            result = run_one(study, label, seed, corpus, on_step)
            _write_json(result_path(out, label, seed), result)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for label, seed in jobs:
        results[label].append(json.loads(result_path(out, label, seed).read_text(encoding="utf-8")))
    rows = summarize(study, results)
    files = write_outputs(study, rows, results, out)
    return {"rows": rows, "results": results, "ran": len(todo), "skipped": skipped,
            "wall_s": time.perf_counter() - t0, "files": files}


def _study_json(study: Study) -> Dict[str, object]:
    return {"name": study.name, "family": study.family, "description": study.description, "variants": study.variants,
            "families": study.families, "seeds": study.seeds, "train": study.train,
            "eval": {"lengths": study.lengths}, "data": study.data, "plot": study.plot}


# -- tables -------------------------------------------------------------------------------------
def metric_names(study: Study) -> List[str]:
    """The table's metrics, in column order."""
    return (["val_loss", "train_loss", "perplexity"] + [f"val_loss@{L}" for L in study.lengths]
            + ["parameters", "kv_cache_bytes_per_token", "flops_per_token", "tokens_per_s", "wall_s"])


def metric(result: Dict[str, object], name: str) -> float:
    if name.startswith("val_loss@"):
        return float(result["val_loss_at"][name.split("@", 1)[1]])
    return float(result[name])


def mean_std(values: List[float]):
    """Mean and standard deviation over seeds (ddof = 1); the deviation is None for one value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def summarize(study: Study, results: Dict[str, List[Dict[str, object]]]) -> List[Dict[str, object]]:
    """One row per variant: ``{"variant", "family", "seeds", "diverged", metric: (mean, std or None), ...}``."""
    rows = []
    for label, runs in results.items():
        row = {"variant": label, "family": study.families[label], "seeds": len(runs),
               "diverged": sum(1 for r in runs if r.get("diverged"))}
        for name in metric_names(study):
            row[name] = mean_std([metric(r, name) for r in runs])
        rows.append(row)
    return rows


def _fmt(x: float, name: str) -> str:
    if math.isnan(x):
        return "nan"
    if name in ("parameters", "kv_cache_bytes_per_token", "tokens_per_s"):
        return f"{x:,.0f}"
    if name == "flops_per_token":
        return f"{x:.3g}"
    if name == "wall_s":
        return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return f"{x:.4f}"


def markdown_table(study: Study, rows: List[Dict[str, object]]) -> str:
    names = metric_names(study)
    head = ["variant", "family", "seeds", "diverged"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], row["family"], str(row["seeds"]), str(row["diverged"])]
        for name in names:
            m, s = row[name]
            cells.append(_fmt(m, name) + (" ± -" if s is None else f" ± {_fmt(s, name)}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(study: Study, rows, results, out: Path) -> Dict[str, str]:
    """results.csv, results.md, loss_curves.png and the study's plot in ``out``; their paths by kind."""
    names = metric_names(study)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["variant", "family", "seeds", "diverged"] + [f"{n}_{s}" for n in names for s in ("mean", "std")])
        for row in rows:
            cells = [row["variant"], row["family"], row["seeds"], row["diverged"]]
            for n in names:
                m, s = row[n]
                cells += [repr(m), "-" if s is None else repr(s)]
            w.writerow(cells)
    seeds = ", ".join(map(str, study.seeds))
    tr = study.train
    md = [f"# Study `{study.name}`", ""]
    if study.description:
        md += [study.description, ""]
    md += [f"Mean ± standard deviation over seeds {seeds} (ddof = 1; '-' for one seed). {tr['steps']} steps of "
           f"{tr['batch_size']} x {tr['block_size']} tokens, lr {tr['lr']:g} -> {tr['min_lr']:g}, warmup "
           f"{tr['warmup']}, weight decay {tr['weight_decay']:g}, clip {tr['grad_clip']:g}. val_loss: "
           f"validation loss (nats/token) at the training length; val_loss@L: at context length L; train_loss: "
           f"mean of the last {TRAIN_LOSS_TAIL} steps' losses; tokens_per_s (training steps only) and wall_s (a "
           f"whole run) depend on the machine and its load.", "", markdown_table(study, rows)]
    (out / "results.md").write_text("\n".join(md), encoding="utf-8")
    files = {"csv": str(out / "results.csv"), "md": str(out / "results.md")}
    files.update(plot_study(study, rows, results, out))
    return files


# -- plots --------------------------------------------------------------------------------------
def plot_study(study: Study, rows, results, out: Path) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, runs in results.items():
        curves = [history_of(r) for r in runs if r["history"]["val_steps"]]
        if not curves:
            continue
        n = min(len(c["val_steps"]) for c in curves)  # a diverged run stopped early: the common part
        steps = np.asarray(curves[0]["val_steps"][:n])
        mean = np.mean([c["val_loss"][:n] for c in curves], axis=0)
        ax.plot(steps, mean, "o-", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{study.name}: validation loss, mean over {len(study.seeds)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=90)
    plt.close(fig)
    files["loss_curves"] = str(out / "loss_curves.png")

    x = study.plot.get("x", "variant")
    title = study.plot.get("title") or f"{study.name}"
    fig, ax = plt.subplots(figsize=(7, 4))
    if x == "eval_length":
        for row in rows:
            means = [row[f"val_loss@{L}"][0] for L in study.lengths]
            errs = [row[f"val_loss@{L}"][1] or 0.0 for L in study.lengths]
            ax.errorbar(study.lengths, means, yerr=errs, marker="o", capsize=3, label=row["variant"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(study.lengths, [str(L) for L in study.lengths])
        ax.axvline(study.train["block_size"], color="grey", ls=":", lw=1)
        ax.set_xlabel("evaluation context length (training length dotted)")
        ax.legend(fontsize=8)
    elif x == "variant":
        labels = [row["variant"] for row in rows]
        ax.bar(range(len(rows)), [row["val_loss"][0] for row in rows], yerr=[row["val_loss"][1] or 0.0 for row in rows],
               capsize=4, color="C0", alpha=0.6, label="mean ± std")
        seen = []
        for i, row in enumerate(rows):  # each seed's value: a mean can hide runs that failed
            values = [r["val_loss"] for r in results[row["variant"]]]
            ax.plot([i] * len(values), values, "k.", ms=6, label="seeds" if i == 0 else None)
            m, s = row["val_loss"]
            seen += values + [m - (s or 0.0), m + (s or 0.0)]
        finite = [v for v in seen if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 0.05, max(finite) + 0.05)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_xlabel("variant")
        ax.legend(fontsize=8)
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    else:
        for i, row in enumerate(rows):
            ax.errorbar(row[x][0], row["val_loss"][0], xerr=row[x][1] or 0.0, yerr=row["val_loss"][1] or 0.0,
                        marker="o", capsize=3, color=f"C{i}", label=row["variant"])
            runs = results[row["variant"]]
            ax.plot([r[x] for r in runs], [r["val_loss"] for r in runs], ".", ms=4, color=f"C{i}", alpha=0.6)
            ax.annotate(row["variant"], (row[x][0], row["val_loss"][0]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
        ax.set_xlabel(x.replace("_", " "))
        ax.legend(fontsize=8)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = "val_loss_by_variant.png" if x == "variant" else f"val_loss_vs_{x}.png"
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    files["plot"] = str(out / name)
    return files
