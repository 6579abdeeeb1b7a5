"""The ``npformer`` command: train, sample, bench, finetune, translate, experiment, viz, reasoning, gradcheck.

Every option is checked before any work. A bad value ends the command with one line
that names the option, in argparse's style, and exit status 2::

    npformer train: error: argument --steps: expected an integer >= 1, got 0

An unknown flag prints the subcommand's usage before that line; flags are never
abbreviated (``--ov`` is unknown, not ``--overwrite``). A failure while working (a run
that diverges, a model whose logits are NaN, a file that cannot be written) is one line
too, with exit status 1; Ctrl-C saves what training has done, says so in one line and
exits with 130. ``main`` returns the exit status rather than exiting, so it can be
called in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors for a bad option value; usage only for unknown or missing arguments.

    Abbreviated flags are not accepted (``allow_abbrev=False``, also in the subcommands' parsers,
    which argparse makes of this class): ``--ov`` must not silently mean ``--overwrite``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if message.startswith("argument "):
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


class OptionError(Exception):
    """A command-line option whose value cannot work: ``flag`` (e.g. ``--steps``) and the reason."""

    def __init__(self, flag: str, reason: str):
        super().__init__(f"argument {flag}: {reason}")
        self.flag, self.reason = flag, reason


class CommandFailed(Exception):
    """A command that could not finish: one line, and the exit status (1, or 130 for Ctrl-C)."""

    def __init__(self, message: str, status: int = 1, prefix: str = "error: "):
        super().__init__(message)
        self.status, self.prefix = status, prefix


def flag(name: str) -> str:
    """``block_size`` -> ``--block-size``."""
    return "--" + name.replace("_", "-")


def check_option(name: str, check: Callable, value, **options):
    """Run a ``_checks`` helper on an option's value; an ``OptionError`` naming ``--name`` if it fails."""
    try:
        return check("npformer", name, value, **options)
    except ValueError as e:
        raise OptionError(flag(name), str(e).split(f"argument '{name}' ", 1)[-1]) from None


# -- train ------------------------------------------------------------------------------------------
def _add_train(sub) -> argparse.ArgumentParser:
    from .train import CHOICES, FIELD_HELP, TrainConfig

    p = sub.add_parser("train", help="train a GPT or LLaMA on the built-in corpus (or --data FILE)",
                       description="Train a character-level GPT or LLaMA (--model). Any TrainConfig field is a flag; "
                                   "with --resume, the run's saved settings are the defaults.")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="JSON object of TrainConfig fields; flags given here override it (default: none)")
    metavars = {"data": "FILE", "out_dir": "DIR"}
    for f in fields(TrainConfig):
        text = f"{FIELD_HELP[f.name]} (default: {f.default!r})".replace("%", "%%")  # argparse formats help
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, choices=CHOICES.get(f.name),
                           metavar=metavars.get(f.name), help=text)
    return p


def _resolve_train(args: argparse.Namespace):
    """The TrainConfig to run, where each field came from ("flag", "config", "checkpoint", "default"),
    and the checkpoint that supplied settings (None without --resume).

    Precedence: flags > the --config file > the checkpoint's settings (with --resume) > defaults.
    The checkpoint read is the one in --out-dir as given now (default runs/gpt): the folder,
    and the other fields of ``NOT_INHERITED``, are never taken from it. The data file is (it
    is the text the run was trained on, checked by content), unless --data is given.
    """
    from . import checkpoint
    from .train import CHOICES, NOT_INHERITED, TrainConfig, both_formats, describe_path, saved_runs

    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    from_file: Dict[str, object] = {}
    if hasattr(args, "config"):
        path = Path(args.config)
        why = describe_path(path)
        if why is not None:
            raise OptionError("--config", f"expected a JSON file of TrainConfig fields, got {args.config!r} ({why})")
        try:
            from_file = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise OptionError("--config", f"expected a JSON file of TrainConfig fields, got {args.config!r}: {e}")
        if not isinstance(from_file, dict):
            raise OptionError("--config", f"expected a JSON object of TrainConfig fields, got a JSON "
                                          f"{type(from_file).__name__} in {args.config!r}")
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise OptionError("--config", f"expected TrainConfig fields, got unknown {unknown} in {args.config!r}")
    merged = {**from_file, **given}
    if merged.get("resume") is True and merged.get("overwrite") is True:  # before looking for the run
        raise OptionError("--overwrite", "cannot be combined with --resume (continue a run, or replace it)")
    from_checkpoint: Dict[str, object] = {}
    found = None
    out_dir, fmt = merged.get("out_dir", TrainConfig.out_dir), merged.get("checkpoint_format")
    # A bad out_dir or format is left to TrainConfig.validate, which names it.
    if merged.get("resume") is True and isinstance(out_dir, str) and out_dir and "\x00" not in out_dir \
            and fmt in (None, *CHOICES["checkpoint_format"]):
        both = both_formats(out_dir)
        if both:
            raise OptionError("--resume", f"expected one run in {out_dir}, but {both}")
        runs = saved_runs(out_dir)
        found = Path(out_dir) / f"ckpt.{fmt}" if fmt else (runs[0] if runs else None)
        if found is None or not found.is_file():
            where = found if found is not None else f"{out_dir}/ckpt.npz"
            raise OptionError("--resume", f"expected a run to resume, but there is no {where} "
                                          f"(train one first, without --resume, or pass its --out-dir)")
        try:
            saved = checkpoint.load(found).get("config")
        except checkpoint.CheckpointError as e:
            raise OptionError("--resume", str(e))
        saved = saved if isinstance(saved, dict) else {}  # train() says what the checkpoint lacks
        from_checkpoint = {k: v for k, v in saved.items() if k in names and k not in NOT_INHERITED}
        if fmt is None:
            from_checkpoint["checkpoint_format"] = found.suffix[1:]
        data = from_checkpoint.get("data")
        if "data" not in merged and isinstance(data, str) and data not in ("", "default"):
            why = describe_path(data)
            if why is not None:
                relative = "" if Path(data).is_absolute() else ", read from the current folder"
                state = "does not exist" if why == "no such file" else f"is {why}"
                raise OptionError("--data", f"not given, so the run's own text file was wanted, but {data!r} (the "
                                            f"path saved in {found}{relative}) {state}: pass --data FILE with "
                                            f"the text the run was trained on")
    values = {**from_checkpoint, **merged}
    source = {name: ("flag" if name in given else "config" if name in from_file
                     else "checkpoint" if name in from_checkpoint else "default") for name in names}
    return TrainConfig(**values), source, found


def _run_train(args) -> int:
    from . import checkpoint
    from .train import ConfigError, TrainingDiverged, TrainingInterrupted, train

    cfg, source, found = _resolve_train(args)
    try:
        summary = train(cfg)
    except ConfigError as e:
        if source.get(e.field) == "config":
            raise OptionError("--config", f"field '{e.field}' in {args.config!r} {e.reason}") from None
        if source.get(e.field) == "checkpoint":
            raise OptionError(flag(e.field), f"{e.reason} ({flag(e.field)} was not given: "
                                             f"{getattr(cfg, e.field)!r} is the value saved in {found})") from None
        raise OptionError(flag(e.field), e.reason) from None
    except checkpoint.CheckpointError as e:
        raise OptionError("--resume", str(e)) from None
    except TrainingDiverged as e:
        raise CommandFailed(str(e)) from None
    except TrainingInterrupted as e:
        raise CommandFailed(str(e), status=130, prefix="") from None
    except OSError as e:  # a file that cannot be written while training (a full disk, a folder removed)
        raise CommandFailed(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from None
    if summary["steps_run"] == 0:
        return 0  # a finished run: train() has said so and how to extend it
    losses = ", ".join(f"{k} loss {summary[f'{k}_loss']:.4f}" for k in ("train", "val")
                       if summary[f"{k}_loss"] is not None)
    label = "final" if summary["complete"] else f"at step {summary['step']}"
    print(f"{label}: {losses}, {summary['tokens_per_s']:,.0f} tok/s (training); "
          f"checkpoint {summary['checkpoint']}, plot {summary['plot']}")
    if not summary["complete"]:
        print(f"stopped at step {summary['step']} of {cfg.steps}: continue with npformer train --resume "
              f"--out-dir {cfg.out_dir}")
    return 0


# -- sample -----------------------------------------------------------------------------------------
MAX_SAMPLE_TOKENS = 100_000  # sample --tokens at most this (a bigger number is a typo, and would run for hours)


def _add_sample(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="sample text from a training checkpoint or a Hugging Face folder",
                       description="Continue a prompt with a model saved by npformer train, or (--hf DIR) with a "
                                   "local Hugging Face model and its tokenizer and generation settings.")
    p.add_argument("--hf", metavar="DIR", default=None,
                   help="a local Hugging Face folder (GPT-2, LLaMA, Mistral, Qwen2) instead of a checkpoint: its "
                        "tokenizer.json and generation_config.json (do_sample, temperature, top_k, top_p, "
                        "max_new_tokens, eos_token_id) give the defaults of the options below (default: none)")
    p.add_argument("--checkpoint", metavar="PATH", default="runs/gpt",
                   help="checkpoint written by npformer train, or its run folder (then the ckpt.npz or "
                        "ckpt.safetensors in it) (default: runs/gpt)")
    p.add_argument("--prompt", default=None,
                   help="text to continue; every character must be in the model's vocabulary (default: a newline, "
                        "or the first character of the run's text if it has none, as training samples)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"tokens (characters for a checkpoint) to sample, 0 to {MAX_SAMPLE_TOKENS} (default: 300; "
                        f"with --hf the folder's max_new_tokens, else 100)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature, >= 0; 0 picks the most likely token (default: 0.8; with --hf 0 unless "
                        "the folder's do_sample is true, then its temperature)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens, k >= 1 (default: all tokens)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the fewest most likely tokens whose probability reaches p, p in [0, 1]; "
                        "0 keeps the most likely token alone (default: all tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws, >= 0 (default: 0)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context for every token instead of using the KV cache (default: off)")
    return p


def _sample_checkpoint(given: str) -> Path:
    """The checkpoint file that ``--checkpoint`` names: a file, or a run folder holding exactly one."""
    from .train import CHOICES, both_formats, describe_path, saved_runs

    path = Path(given)
    if path.is_dir():
        runs = saved_runs(path)
        if not runs:
            raise OptionError("--checkpoint", f"expected a checkpoint file or a run folder, but the folder {path} "
                                              f"holds no ckpt.npz or ckpt.safetensors (train a model first with "
                                              f"npformer train --out-dir {path})")
        path = runs[0]
    else:
        why = describe_path(path)
        if why == "no such file":
            others = saved_runs(path.parent)
            hint = f"; there is {others[0]}" if others else "; train a model first with npformer train"
            raise OptionError("--checkpoint", f"expected a checkpoint file or a run folder, but there is no "
                                              f"{path}{hint}")
        if why is not None:
            raise OptionError("--checkpoint", f"expected a checkpoint file or a run folder, got {path}, {why}")
    if path.name in {f"ckpt.{fmt}" for fmt in CHOICES["checkpoint_format"]}:
        both = both_formats(path.parent)
        if both:
            raise OptionError("--checkpoint", f"expected one run in {path.parent}, but {both}")
    return path


def _default_prompt(state, tok) -> str:
    """What training samples from: the checkpoint's saved prompt, else a newline, else the vocabulary's first
    character (for a checkpoint saved before the prompt was)."""
    saved = state.get("sample_prompt")
    for candidate in ([saved] if isinstance(saved, str) and saved else []) + ["\n"]:
        try:
            tok.encode_array(candidate)
            return candidate
        except ValueError:
            continue
    return tok.decode([0])


def _run_sample(args) -> int:
    from . import checkpoint
    from .generate import NonFiniteLogitsError, generate
    from .models import build as build_model, check_causal_lm
    from .ops._checks import check_count, check_real
    from .train import nonfinite_weights, tokenizer_from_checkpoint

    if args.hf is not None:
        return _run_sample_hf(args)
    args.tokens = 300 if args.tokens is None else args.tokens
    args.temperature = 0.8 if args.temperature is None else args.temperature
    check_option("tokens", check_count, args.tokens, lo=0, hi=MAX_SAMPLE_TOKENS)
    check_option("temperature", check_real, args.temperature, lo=0.0)
    if args.top_k is not None:
        check_option("top_k", check_count, args.top_k, lo=1)
    if args.top_p is not None:
        check_option("top_p", check_real, args.top_p, lo=0.0, hi=1.0)
    check_option("seed", check_count, args.seed, lo=0)
    if args.prompt is not None and not args.prompt:
        raise OptionError("--prompt", "expected at least one character, got ''")
    path = _sample_checkpoint(args.checkpoint)
    try:
        state = checkpoint.load(path)
        tok = tokenizer_from_checkpoint(state, str(path))
        saved = state.get("config")
        model = build_model(saved.get("model", "gpt") if isinstance(saved, dict) else "gpt", state["model_config"])
        check_causal_lm("sample", "checkpoint", model)
        model.load_state_dict(state["model"])
    except (checkpoint.CheckpointError, ValueError, TypeError, KeyError) as e:
        raise OptionError("--checkpoint", f"expected a model saved by npformer train, got {path}: {e}") from None
    bad = nonfinite_weights(model)
    if bad:
        raise OptionError("--checkpoint", f"expected a model with finite weights, got {path}, whose {bad} "
                                          f"(a diverged run)")
    text = args.prompt if args.prompt is not None else _default_prompt(state, tok)
    try:
        prompt = tok.encode_array(text)[None]  # (1, T0)
    except ValueError as e:
        if args.prompt is None:
            raise OptionError("--prompt", f"not given, and the default prompt {text!r} is not in the model's "
                                          f"vocabulary: pass --prompt TEXT ({e})") from None
        raise OptionError("--prompt", f"expected characters of the model's vocabulary: {e}") from None
    try:
        prefix_lm = isinstance(saved, dict) and saved.get("objective") == "prefix"  # the prompt as its prefix
        out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       rng=np.random.default_rng(args.seed), use_cache=not args.no_cache, prefix=prefix_lm)
    except NonFiniteLogitsError as e:
        raise CommandFailed(f"{path}: {e}") from None
    print(tok.decode(out[0].tolist()))
    return 0


# generation_config.json settings ``sample --hf`` has no way to follow: refused when set, rather than ignored.
UNSUPPORTED_GENERATION = {"num_beams": 1, "no_repeat_ngram_size": 0}


def _generation_options(args, gen: Dict[str, object], prompt_len: int) -> Dict[str, object]:
    """The sampling options of ``sample --hf``: each flag given wins over the folder's generation_config.json,
    which wins over Hugging Face's own defaults (greedy unless do_sample; then temperature 1, top_k 50).
    max_new_tokens, else max_length (which counts the prompt), else 100 new tokens."""
    for field, neutral in UNSUPPORTED_GENERATION.items():
        if gen.get(field, neutral) != neutral:
            raise OptionError("--hf", f"expected a generation_config.json that npformer can follow, got {field} = "
                                      f"{gen[field]!r} in {args.hf} (not implemented: set it to {neutral} there)")
    sampling = bool(gen.get("do_sample", False))
    if sampling and args.temperature is None and gen.get("temperature", 1.0) == 0:
        raise OptionError("--hf", f"expected a temperature > 0 with do_sample true, got 0 in {args.hf}'s "
                                  f"generation_config.json (or pass --temperature)")
    temperature = args.temperature if args.temperature is not None else \
        (float(gen.get("temperature", 1.0)) if sampling else 0.0)
    top_k = args.top_k if args.top_k is not None else (gen.get("top_k", 50) if sampling else None)
    top_p = args.top_p if args.top_p is not None else (gen.get("top_p") if sampling else None)
    if args.tokens is not None:
        tokens = args.tokens
    elif "max_new_tokens" in gen:
        tokens = int(gen["max_new_tokens"])
    else:
        tokens = max(0, int(gen["max_length"]) - prompt_len) if "max_length" in gen else 100
    return {"temperature": temperature, "top_k": top_k or None, "top_p": top_p, "tokens": tokens,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "min_new_tokens": int(gen.get("min_new_tokens", 0))}


def _run_sample_hf(args) -> int:
    from .generate import NonFiniteLogitsError, generate
    from .hf import load_pretrained, load_tokenizer, read_generation_config
    from .models import check_causal_lm
    from .ops._checks import check_count, check_real

    if args.checkpoint != "runs/gpt":
        raise OptionError("--hf", "cannot be combined with --checkpoint (sample a checkpoint, or a folder)")
    folder = Path(args.hf)
    if not (folder / "config.json").is_file():
        raise OptionError("--hf", f"expected a Hugging Face model folder with a config.json, got {args.hf!r}")
    try:
        model = load_pretrained(folder)
        check_causal_lm("sample", "hf", model)
        tok = load_tokenizer(folder)
        gen = read_generation_config(folder)
    except (ValueError, OSError) as e:
        raise OptionError("--hf", f"expected a model folder npformer can read, got {args.hf!r}: {e}") from None
    if args.prompt is not None and not args.prompt:
        raise OptionError("--prompt", "expected at least one character, got ''")
    ids = tok.encode(args.prompt, add_special_tokens=True) if args.prompt is not None else []
    if not ids:  # no prompt: start from the beginning-of-text token, as Hugging Face's generate does
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise OptionError("--prompt", f"not given, and {args.hf} has no bos or eos token to start from")
        ids = [start]
    if max(ids) >= model.cfg.vocab_size:
        raise OptionError("--prompt", f"encodes to id {max(ids)}, outside the model's vocabulary of "
                                      f"{model.cfg.vocab_size} (the folder's tokenizer has more tokens than its model)")
    options = _generation_options(args, gen, len(ids))
    check_option("tokens", check_count, options["tokens"], lo=0, hi=MAX_SAMPLE_TOKENS)
    check_option("temperature", check_real, options["temperature"], lo=0.0)
    if options["top_k"] is not None:
        check_option("top_k", check_count, options["top_k"], lo=1)
    if options["top_p"] is not None:
        check_option("top_p", check_real, options["top_p"], lo=0.0, hi=1.0)
    check_option("seed", check_count, args.seed, lo=0)
    eos = gen.get("eos_token_id", tok.eos_token_id)
    stops = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.get("pad_token_id")
    try:
        out = generate(model, np.asarray([ids], np.int64), options["tokens"], temperature=options["temperature"],
                       top_k=options["top_k"], top_p=options["top_p"], rng=np.random.default_rng(args.seed),
                       use_cache=not args.no_cache, stop_tokens=stops, pad_token=pad if stops else None,
                       repetition_penalty=options["repetition_penalty"],
                       min_new_tokens=options["min_new_tokens"] if stops else 0)
    except NonFiniteLogitsError as e:
        raise CommandFailed(f"{args.hf}: {e}") from None
    except ValueError as e:  # a generation_config.json whose ids lie outside the model's vocabulary
        raise OptionError("--hf", f"expected generation settings that fit the model, got {args.hf!r}: {e}") from None
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    return 0


# -- bench ------------------------------------------------------------------------------------------
def _add_bench(sub) -> argparse.ArgumentParser:
    from .bench import REFERENCE

    p = sub.add_parser("bench", help="time a training step; tokens/s, MFU, ratio vs a torch twin",
                       description="Time a GPT training step (forward, backward, AdamW) in npformer and, if "
                                   "torch is installed, in a torch twin of the same config.")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after three untimed ones (default: 5)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step (default: 16; with --inference, prompts decoded together, default 1)")
    what = {"n_layer": "transformer blocks", "n_head": "attention heads", "d_model": "width of the residual stream",
            "block_size": "context length in tokens", "vocab_size": "vocabulary size"}
    for name, text in what.items():
        p.add_argument(flag(name), dest=name, type=int, default=None,
                       help=f"{text} (default: {getattr(REFERENCE, name)}, the reference config)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help=f"floating-point type (default: {REFERENCE.dtype}; with --inference, of all three engines: in "
                        "float64 their greedy tokens agree)")
    p.add_argument("--no-torch", action="store_true",
                   help="skip the torch twin (and, with --inference, transformers) (default: run them if installed)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results (default: off)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing against torch, print where npformer's step goes: milliseconds per op "
                        "family, forward and backward, as a table (default: off)")
    inf = p.add_argument_group("inference (--inference): prefill and KV-cached decode tokens/s against the torch twin "
                                "and transformers")
    inf.add_argument("--inference", action="store_true",
                     help="time inference instead of a training step: a GPT-2-124M-shaped model with random weights "
                          "(or --hf DIR), npformer against its torch twin and transformers with the same weights "
                          "(default: off)")
    inf.add_argument("--hf", metavar="DIR", default=None,
                     help="with --inference: a local Hugging Face folder (GPT-2, LLaMA, Mistral, Qwen2) to time "
                          "instead of random weights (default: none)")
    inf.add_argument("--model", choices=["gpt", "llama"], default="gpt",
                     help="with --inference and no --hf: the random model's family, GPT-2 small or a LLaMA of "
                          "its size (default: gpt)")
    inf.add_argument("--prompt-len", type=int, default=128, help="with --inference: prompt tokens (default: 128)")
    inf.add_argument("--new-tokens", type=int, default=32, help="with --inference: greedy tokens decoded (default: 32)")
    inf.add_argument("--repeats", type=int, default=3, help="with --inference: timed repeats, median taken (default: 3)")
    inf.add_argument("--attn", choices=["eager", "sdpa"], default="eager",
                     help="with --inference: transformers' attention implementation (default: eager)")
    return p


def _run_bench_inference(args) -> int:
    from . import bench_inference
    from .ops._checks import check_count

    for name in ("prompt_len", "new_tokens", "repeats"):
        check_option(name, check_count, getattr(args, name), lo=1)
    given = [flag(n) for n in ("n_layer", "n_head", "d_model", "block_size", "vocab_size")
             if getattr(args, n) is not None]
    if given:
        raise OptionError(given[0], "sets the training benchmark's model; --inference times a fixed GPT-2-small-"
                                    "shaped model (or --hf DIR)")
    if args.hf is not None and not Path(args.hf, "config.json").is_file():
        raise OptionError("--hf", f"expected a Hugging Face model folder with a config.json, got {args.hf!r}")
    try:
        result = bench_inference.run(args.hf, family=args.model, prompt_len=args.prompt_len,
                                     new_tokens=args.new_tokens, batch=args.batch,
                                     repeats=args.repeats, hf=not args.no_torch, twin=not args.no_torch,
                                     attn=args.attn, dtype=args.dtype or "float32")
    except ValueError as e:
        import re

        named = re.search(r"argument '(\w+)' (.*)", str(e))
        if named and named.group(1) in ("prompt_len", "new_tokens"):  # together longer than the model's context
            raise OptionError(flag(named.group(1)), named.group(2)) from None
        if named and named.group(1) == "folder":  # not a causal language model
            raise OptionError("--hf", named.group(2)) from None
        raise CommandFailed(str(e)) from None
    if args.json:
        print(json.dumps(result))
    return 0


def _run_bench(args) -> int:
    import re
    from dataclasses import asdict

    from .bench import REFERENCE
    from .bench import main as bench_main
    from .models.gpt import GPTConfig
    from .ops._checks import check_count
    from .train import ConfigError, check_memory

    check_option("steps", check_count, args.steps, lo=1)
    if args.batch is None:
        args.batch = 1 if args.inference else 16
    check_option("batch", check_count, args.batch, lo=1)
    if args.inference and args.profile:
        raise OptionError("--profile", "profiles the training step; it does not combine with --inference")
    if args.inference:
        return _run_bench_inference(args)
    for name in ("hf", "prompt_len", "new_tokens", "repeats", "attn", "model"):
        default = {"hf": None, "prompt_len": 128, "new_tokens": 32, "repeats": 3, "attn": "eager", "model": "gpt"}
        if getattr(args, name) != default[name]:
            raise OptionError(flag(name), "is an option of the inference benchmark: add --inference")
    overrides = {k: v for k, v in vars(args).items() if k in GPTConfig.__dataclass_fields__ and v is not None}
    for name, value in overrides.items():
        if name != "dtype":
            check_option(name, check_count, value, lo=1)
    try:
        cfg = GPTConfig(**{**asdict(REFERENCE), **overrides})
    except ValueError as e:
        named = re.search(r"argument '(\w+)' (.*)", str(e))
        raise OptionError(flag(named.group(1)), named.group(2)) if named else OptionError("--d-model", str(e))
    try:
        check_memory(cfg, args.batch, field_names={"batch_size": "batch"})
    except ConfigError as e:
        raise OptionError(flag(e.field), e.reason) from None
    return bench_main(args)


# -- finetune ---------------------------------------------------------------------------------------
def _add_finetune(sub) -> argparse.ArgumentParser:
    from .data.tasks import TASKS
    from .finetune import FIELD_HELP, SCHEDULES, FinetuneConfig
    from .pretraining import ENCODERS

    p = sub.add_parser("finetune", help="fine-tune an encoder (a pre-training checkpoint or a fresh --model) on a "
                                        "labelled task",
                       description="Fine-tune BERT, RoBERTa, ALBERT, DeBERTa or ELECTRA on the built-in docstrings "
                                   "(sequence) or tokens (token) task; prints validation scores every "
                                   "--eval-interval steps and the test accuracy beside the majority baseline.")
    choices = {"task": TASKS, "model": ENCODERS, "schedule": SCHEDULES, "dtype": ("float32", "float64")}
    for f in fields(FinetuneConfig):
        text = f"{FIELD_HELP[f.name]} (default: {f.default!r})".replace("%", "%%")  # argparse formats help
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, choices=choices.get(f.name),
                       metavar="PATH" if f.name == "checkpoint" else None, help=text)
    return p


def _run_finetune(args) -> int:
    from .finetune import SHAPE_FIELDS, FinetuneConfig, FinetuneDiverged, FinetuneError, finetune

    names = {f.name for f in fields(FinetuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given.get("checkpoint"):
        for name in SHAPE_FIELDS:
            if name in given:
                what = "family" if name == "model" else "shape and dropout"
                raise OptionError(flag(name), f"cannot be combined with --checkpoint (its model has its own {what})")
    try:
        finetune(FinetuneConfig(**given))
    except FinetuneError as e:
        raise OptionError(flag(e.field), e.reason) from None
    except FinetuneDiverged as e:
        raise CommandFailed(str(e)) from None
    return 0


# -- translate --------------------------------------------------------------------------------------
def _add_translate(sub) -> argparse.ArgumentParser:
    from .data.translation import TRANSLATION_TASKS
    from .translate import FAMILIES, FAMILY_FIELDS, FIELD_HELP, SCHEDULES, TranslateConfig

    p = sub.add_parser("translate", help="train an encoder-decoder (transformer, t5, bart) on a built-in "
                                         "translation task and score it, greedy and beam search",
                       description="Train a fresh Transformer, T5 or BART on the numbers (words -> digits) or dates "
                                   "(ISO -> '7 March 2024') task; prints validation scores every --eval-interval "
                                   "steps, then the test split's exact match and BLEU, greedy and with beam search.")
    choices = {"task": TRANSLATION_TASKS, "model": FAMILIES, "schedule": SCHEDULES, "dtype": ("float32", "float64")}
    kinds = {"lr": float, "warmup": int, "schedule": str, "label_smoothing": float, "max_new_tokens": int}
    for f in fields(TranslateConfig):
        default = "the model's" if f.name in FAMILY_FIELDS else repr(f.default)
        text = f"{FIELD_HELP[f.name]} (default: {default})".replace("%", "%%")  # argparse formats help
        if f.type in ("bool", bool):
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=text)
            continue
        kind = kinds.get(f.name) or {"int": int, "float": float, "str": str}[
            f.type if isinstance(f.type, str) else f.type.__name__]
        p.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, choices=choices.get(f.name), help=text)
    return p


def _run_translate(args) -> int:
    from .translate import TranslateConfig, TranslateDiverged, TranslateError, results_table, translate

    names = {f.name for f in fields(TranslateConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        summary = translate(TranslateConfig(**given))
    except TranslateError as e:
        raise OptionError(flag(e.field), e.reason) from None
    except TranslateDiverged as e:
        raise CommandFailed(str(e)) from None
    print(results_table(summary))
    print(f"trained in {summary['seconds']:.1f} s, decoded the test split in {summary['decode_seconds']:.1f} s")
    return 0


# -- experiment -------------------------------------------------------------------------------------
def _add_experiment(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("experiment", help="run an architecture study (variants x seeds) and tabulate the results",
                       description="Train every variant of a study with every seed (each a short run on the "
                                   "built-in corpus), then write results.csv, results.md (mean +- std over seeds), "
                                   "loss_curves.png and the study's plot in --out. Runs already done there are "
                                   "skipped, so an interrupted study continues where it stopped.")
    p.add_argument("study", nargs="?", help="a built-in study (see --list) or a study JSON file")
    p.add_argument("--out", default=None, help="output folder: the tables, the plots and runs/<variant>/seed<k>/"
                                               "result.json, which a rerun reuses (default: runs/study_<name>)")
    p.add_argument("--list", action="store_true", help="list the built-in studies and exit (default: False)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the runs, with the current run's step and loss (default: True)")
    return p


def _run_experiment(args) -> int:
    from .experiment import StudyError, builtin_studies, load_study, markdown_table, run_study

    if args.list:
        for name, path in builtin_studies().items():
            print(f"{name}: {json.loads(path.read_text(encoding='utf-8')).get('description', '')}")
        return 0
    if args.study is None:
        raise OptionError("study", "expected a built-in study name or a JSON file (see --list)")
    try:
        study = load_study(args.study)
    except StudyError as e:
        raise OptionError("study", f"{args.study}: {e}") from None
    out = args.out if args.out is not None else f"runs/study_{study.name}"
    if out == "" or (Path(out).exists() and not Path(out).is_dir()):
        raise OptionError("--out", f"expected a folder, got {out!r}")
    try:
        summary = run_study(study, out, progress=args.progress)
    except StudyError as e:
        raise CommandFailed(str(e)) from None
    except OSError as e:
        raise CommandFailed(f"{out}: {e.strerror or e}") from None
    print(markdown_table(study, summary["rows"]), end="")
    print(f"{summary['ran']} runs in {summary['wall_s']:.1f} s ({summary['skipped']} already done); "
          f"tables and plots in {out}")
    return 0


# -- viz --------------------------------------------------------------------------------------------
def _add_viz(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("viz", help="draw a look inside a model or a run as a PNG: attention, lens, gradflow, losses",
                       description="Draw one view (npformer.viz) into a PNG: a prompt's attention maps or logit "
                                   "lens (from a checkpoint or a Hugging Face folder), a run's gradient flow "
                                   "(train --gradflow-every), or several runs' loss curves.")
    views = p.add_subparsers(dest="view", required=True, metavar="{attention,lens,gradflow,losses}")
    texts = {"attention": ("every layer x head's attention of a prompt, labelled with its tokens",
                           "Attention probabilities of every layer and head for --prompt, as a grid of heatmaps "
                           "(queries down, keys across); --layer L --head H draws that head alone, large."),
             "lens": ("the logit lens of a prompt: the top-1 next token after each block",
                      "Each block's output read through the final norm and the head: the most likely next "
                      "token at each layer and position, coloured by its probability.")}
    for name, (help_text, description) in texts.items():
        v = views.add_parser(name, help=help_text, description=description)
        v.add_argument("--checkpoint", metavar="PATH", default=None,
                       help="checkpoint written by npformer train, or its run folder (default: none; give this or "
                            "--hf)")
        v.add_argument("--hf", metavar="DIR", default=None,
                       help="a local Hugging Face folder, with its tokenizer.json (default: none)")
        v.add_argument("--prompt", required=True, help="the text to look at (encoded by the model's tokenizer)")
        if name == "attention":
            v.add_argument("--layer", type=int, default=None,
                           help="with --head: draw this layer's head alone (default: the whole grid)")
            v.add_argument("--head", type=int, default=None, help="with --layer: the head to draw (default: all)")
        v.add_argument("--out", metavar="FILE.png", required=True, help="the PNG to write")
    g = views.add_parser("gradflow", help="a run's per-block gradient norms, update ratios and activations",
                         description="Plot the gradflow.json that npformer train --gradflow-every N writes in its "
                                     "run folder: one panel per statistic, one line per block.")
    g.add_argument("run", metavar="RUN_DIR", help="a run folder holding gradflow.json (or the file itself)")
    g.add_argument("--out", metavar="FILE.png", required=True, help="the PNG to write")
    losses = views.add_parser("losses", help="several runs' training and validation losses on one plot",
                              description="Training and validation loss of each run (its checkpoint's history), "
                                          "with its final validation perplexity in the legend.")
    losses.add_argument("runs", metavar="RUN", nargs="+", help="run folders or checkpoint files")
    losses.add_argument("--label", action="append", default=None,
                        help="a legend name, once per run in order (default: each run's folder name)")
    losses.add_argument("--out", metavar="FILE.png", required=True, help="the PNG to write")
    return p


def _reason(error: Exception) -> str:
    """A library error's reason without its "func: argument 'name' " prefix (the option is named instead)."""
    import re

    return re.sub(r"^.*?argument '\w+' ", "", str(error), count=1)


def _viz_out(given: str) -> Path:
    """--out: a .png file name in a folder that exists."""
    path = Path(given)
    if path.suffix.lower() != ".png":
        raise OptionError("--out", f"expected a file name ending in .png, got {given!r}")
    if not path.parent.is_dir() or path.is_dir():
        raise OptionError("--out", f"expected a file in an existing folder, got {given!r}")
    return path


def _viz_model(args):
    """(model, tokenizer, prompt ids, option, prefix) of --checkpoint or --hf, loaded as ``sample`` loads them;
    prefix: whether the checkpoint is a prefix LM's (--objective prefix), whose prompt is its prefix."""
    from . import checkpoint
    from .models import ENCODER_DECODERS, build as build_model, family
    from .train import nonfinite_weights, tokenizer_from_checkpoint

    if (args.checkpoint is None) == (args.hf is None):
        raise OptionError("--checkpoint", "expected exactly one of --checkpoint PATH and --hf DIR, got "
                                          + ("both" if args.hf is not None else "neither"))
    if not args.prompt:
        raise OptionError("--prompt", "expected at least one character, got ''")
    if args.hf is not None:
        from .hf import load_pretrained, load_tokenizer

        if not (Path(args.hf) / "config.json").is_file():
            raise OptionError("--hf", f"expected a Hugging Face model folder with a config.json, got {args.hf!r}")
        try:
            model = load_pretrained(args.hf)
            tok = load_tokenizer(args.hf)
        except (ValueError, OSError) as e:
            raise OptionError("--hf", f"expected a model folder npformer can read, got {args.hf!r}: {e}") from None
        where, source, prefix_lm = "--hf", args.hf, False
    else:
        path = _sample_checkpoint(args.checkpoint)
        try:
            state = checkpoint.load(path)
            tok = tokenizer_from_checkpoint(state, str(path))
            saved = state.get("config")
            model = build_model(saved.get("model", "gpt") if isinstance(saved, dict) else "gpt",
                                state["model_config"])
            model.load_state_dict(state["model"])
        except (checkpoint.CheckpointError, ValueError, TypeError, KeyError) as e:
            raise OptionError("--checkpoint", f"expected a model saved by npformer train, got {path}: {e}") from None
        bad = nonfinite_weights(model)
        if bad:
            raise OptionError("--checkpoint", f"expected a model with finite weights, got {path}, whose {bad}")
        where, source = "--checkpoint", str(path)
        prefix_lm = isinstance(saved, dict) and saved.get("objective") == "prefix"  # as sample reads the prompt
    if isinstance(model, tuple(family(f)[0] for f in ENCODER_DECODERS)):
        raise OptionError(where, f"expected a model that reads one sequence (a language model or an encoder), "
                                 f"got a {type(model).__name__} in {source}, an encoder-decoder")
    try:
        ids = tok.encode(args.prompt) if args.hf is not None else tok.encode_array(args.prompt).tolist()
    except ValueError as e:
        raise OptionError("--prompt", f"expected text the model's tokenizer can encode: {e}") from None
    if not ids:
        raise OptionError("--prompt", f"expected text that encodes to at least one token, got {args.prompt!r}")
    if max(ids) >= model.cfg.vocab_size:
        raise OptionError("--prompt", f"encodes to id {max(ids)}, outside the model's vocabulary of "
                                      f"{model.cfg.vocab_size}")
    block = getattr(model.cfg, "block_size", None)
    if block is not None and len(ids) > block:
        raise OptionError("--prompt", f"expected at most the model's context of {block} tokens, got {len(ids)}")
    return model, tok, np.asarray(ids, np.int64), where, prefix_lm


def _run_viz(args) -> int:
    from . import viz
    from .ops._checks import check_count

    out = _viz_out(args.out)
    if args.view in ("attention", "lens"):
        head = None
        if args.view == "attention" and (args.layer is None) != (args.head is None):
            given, missing = ("--layer", "--head") if args.head is None else ("--head", "--layer")
            raise OptionError(missing, f"expected with {given} (the head to draw alone), got none")
        model, tok, ids, where, prefix_lm = _viz_model(args)
        tokens = viz.token_strings(tok, ids.tolist())
        try:
            if args.view == "attention":
                if args.layer is not None:
                    shapes = [p.shape for p in viz.attention_probs(model, ids, prefix=prefix_lm).values()]
                    check_option("layer", check_count, args.layer, lo=0, hi=len(shapes) - 1)
                    check_option("head", check_count, args.head, lo=0, hi=shapes[args.layer][0] - 1)
                    head = (args.layer, args.head)
                fig, _ = viz.attention_maps(model, ids, tokens, head=head, prefix=prefix_lm)
            else:
                from .models import check_causal_lm

                check_causal_lm("viz lens", where[2:], model)
                _, fig = viz.logit_lens(model, ids, tokens, decode=lambda i: viz.token_strings(tok, [i])[0],
                                        prefix=prefix_lm)
        except ValueError as e:  # a model that records no attention, or has no next-token head
            raise OptionError(where, _reason(e)) from None
    elif args.view == "gradflow":
        try:
            fig = viz.plot_gradflow(args.run)
        except ValueError as e:
            raise OptionError("RUN_DIR", _reason(e)) from None
    else:
        if args.label is not None and len(args.label) != len(args.runs):
            raise OptionError("--label", f"expected one per run ({len(args.runs)}), got {len(args.label)}")
        try:
            fig = viz.plot_runs(args.runs, args.label)
        except ValueError as e:
            raise OptionError("RUN", _reason(e)) from None
    try:
        viz.save_figure(fig, out)
    except OSError as e:
        raise CommandFailed(f"{e.strerror or e}: {out}") from None
    print(f"wrote {out}")
    return 0


# -- reasoning --------------------------------------------------------------------------------------
def _add_reasoning(sub) -> argparse.ArgumentParser:
    from .reasoning import add_reasoning_parser

    return add_reasoning_parser(sub)


def _run_reasoning(args) -> int:
    from .reasoning import ReasoningError, run_reasoning

    try:
        return run_reasoning(args)
    except ReasoningError as e:
        raise OptionError(flag(e.field), e.reason) from None
    except FloatingPointError as e:
        raise CommandFailed(str(e)) from None
    except OSError as e:
        raise CommandFailed(f"{e.strerror or e}: {args.out}") from None


# -- the command ------------------------------------------------------------------------------------
def build_parser():
    """The top-level parser and its subcommands' parsers, by name."""
    parser = Parser(prog="npformer", description="An educational transformer engine in NumPy.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,sample,bench,finetune,translate,experiment,viz,reasoning,gradcheck}")
    subs = {"train": _add_train(sub), "sample": _add_sample(sub), "bench": _add_bench(sub),
            "finetune": _add_finetune(sub), "translate": _add_translate(sub),
            "experiment": _add_experiment(sub), "viz": _add_viz(sub), "reasoning": _add_reasoning(sub)}
    sub.add_parser("gradcheck", help="finite-difference check of op families ('all' or names; see gradcheck --help)",
                   add_help=False)
    return parser, subs


RUNNERS = {"train": _run_train, "sample": _run_sample, "bench": _run_bench, "finetune": _run_finetune,
           "translate": _run_translate, "experiment": _run_experiment, "viz": _run_viz,
           "reasoning": _run_reasoning}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand; returns the exit status (0 ok, 1 a failure while working, 2 a bad option,
    130 interrupted by Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    prog = subs[argv[0]].prog if argv and argv[0] in subs else parser.prog
    try:
        if argv[:1] == ["gradcheck"]:
            from .gradcheck import main as gradcheck_main

            return gradcheck_main(argv[1:], prog="npformer gradcheck")
        args, extra = parser.parse_known_args(argv)
        if extra:
            subs[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        return RUNNERS[args.command](args)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except OptionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"{prog}: {e.prefix}{e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:  # before or after training's own handling (which saves): no traceback
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
