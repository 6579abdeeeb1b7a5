"""The ``npformer`` command: train, sample, bench, gradcheck."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence

import numpy as np


def _add_train(sub) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a GPT on the built-in corpus (or --data FILE)")
    p.add_argument("--config", help="JSON file of TrainConfig fields; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=kind, default=None, help=f"default {f.default}")


def _run_train(args) -> int:
    from .train import TrainConfig, train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.config:
        cfg = TrainConfig.from_json(args.config, **overrides)
    else:
        cfg = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    summary = train(cfg)
    print(f"final: train loss {summary['train_loss']:.4f}, val loss {summary['val_loss']:.4f}, "
          f"{summary['tokens_per_s']:,.0f} tok/s; checkpoint {summary['checkpoint']}, plot {summary['plot']}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample text from a training checkpoint")
    p.add_argument("--checkpoint", default="runs/gpt/ckpt.npz")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")


def _run_sample(args) -> int:
    from . import checkpoint
    from .data.char import CharTokenizer
    from .generate import generate
    from .models.gpt import GPT, GPTConfig

    state = checkpoint.load(args.checkpoint)
    model = GPT(GPTConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    tok = CharTokenizer.from_dict(state["vocab"])
    prompt = np.asarray([tok.encode(args.prompt)], dtype=np.int64)
    out = generate(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   rng=np.random.default_rng(args.seed), use_cache=not args.no_cache)
    print(tok.decode(out[0].tolist()))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time a training step; tokens/s, MFU, ratio vs a torch twin")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after three untimed ones)")
    p.add_argument("--batch", type=int, default=16)
    for name in ("n_layer", "n_head", "d_model", "block_size", "vocab_size"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--no-torch", action="store_true", help="skip the torch twin")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="npformer", description="An educational transformer engine in NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_bench(sub)
    sub.add_parser("gradcheck", help="finite-difference check of op families ('all' or names)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gradcheck"]:
        from .gradcheck import main as gradcheck_main

        return gradcheck_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "train":
        return _run_train(args)
    if args.command == "sample":
        return _run_sample(args)
    from .bench import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
