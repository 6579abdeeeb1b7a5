"""Teach a small GPT 3-digit addition, then test it on problems it never saw.

    python demos/addition.py               # answers least significant digit first (the carry order)
    python demos/addition.py --no-reverse  # answers written the usual way (harder)

Problems look like ``"123+456=9750\\n"`` (0579 written backwards: the digit a carry
goes into comes after the carry's source); the loss covers the answer characters only
(the prompt's targets are ignored with ``ignore_index``). Every ``--eval-every`` steps
the model answers held-out problems greedily, using its KV cache, and the exact-match
rate is printed; training stops once it reaches ``--target``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from npformer.data.arithmetic import ArithmeticTask, exact_match, make_batch, tokenizer
from npformer.generate import generate
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine


def answer(model: GPT, task: ArithmeticTask, problems, tok) -> list:
    """Greedy answers (strings) to problems of one fixed-width format, all rows at once."""
    prompts = np.asarray([tok.encode(p.prompt) for p in problems], dtype=np.int64)
    width = problems[0].answer_width
    out = generate(model, prompts, width, temperature=0)
    return [tok.decode(row[prompts.shape[1]:].tolist()) for row in out]


def evaluate(model, task, problems, tok, batch=500) -> float:
    answers = []
    for i in range(0, len(problems), batch):
        answers += answer(model, task, problems[i:i + batch], tok)
    return exact_match(answers, problems)


def parser():
    from npformer.cli import Parser

    p = Parser(prog="demos/addition.py", description=__doc__.split("\n")[0])
    p.add_argument("--digits", type=int, default=3, help="digits per operand, >= 1 (default: 3)")
    p.add_argument("--reverse", action=argparse.BooleanOptionalAction, default=True,
                   help="answers least significant digit first (default: True)")
    p.add_argument("--steps", type=int, default=6000, help="most training steps, >= 1 (default: 6000)")
    p.add_argument("--batch-size", type=int, default=64, help="problems per step, >= 1 (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, > 0 (default: 0.002)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="steps between held-out evaluations, >= 1 (default: 250)")
    p.add_argument("--eval-problems", type=int, default=2000, help="held-out problems, >= 1 (default: 2000)")
    p.add_argument("--target", type=float, default=0.99,
                   help="stop at this held-out exact match, >= 0; above 1 never stops early (default: 0.99)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the problems, >= 0 (default: 0)")
    return p


def check_args(args) -> None:
    """Every option checked before any work; an ``OptionError`` names the bad one."""
    from npformer.cli import check_option
    from npformer.ops._checks import check_count, check_real

    for name in ("digits", "steps", "batch_size", "eval_every", "eval_problems"):
        check_option(name, check_count, getattr(args, name), lo=1)
    check_option("seed", check_count, args.seed, lo=0)
    check_option("lr", check_real, args.lr, lo=0.0, lo_open=True)
    check_option("target", check_real, args.target, lo=0.0)


def main(argv=None) -> int:
    from npformer.cli import OptionError

    p = parser()
    try:
        args = p.parse_args(argv)
        check_args(args)
    except OptionError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, or a value argparse itself refuses
        return e.code if isinstance(e.code, int) else 2

    tok = tokenizer()
    task = ArithmeticTask("+", args.digits, reverse=args.reverse)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=task.line_length - 1, n_layer=2, n_head=4, d_model=128)
    model = GPT(cfg, seed=args.seed)
    opt = AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.98))
    schedule = warmup_cosine(args.lr, args.lr / 10, 100, args.steps)
    rng = np.random.default_rng(args.seed)
    heldout = task.sample(np.random.default_rng(12345), args.eval_problems, "heldout")
    print(f"{model.num_parameters():,} parameters; lines like {heldout[0].text!r}; "
          f"{len(heldout)} held-out problems never seen in training")

    t0, acc = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = schedule(step - 1)
        x, y, _ = make_batch(task.sample(rng, args.batch_size, "train"), tok)
        _, loss = model.forward(x, y)  # prompt targets are -100: the loss covers the answers only
        model.zero_grad()
        model.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, task, heldout, tok)
            print(f"step {step:5d}  loss {loss:.4f}  held-out exact match {acc:.2%}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if acc >= args.target:
                break
    elapsed = time.perf_counter() - t0
    print(f"final held-out exact match {acc:.2%} after {step} steps in {elapsed:.0f} s")
    return 0 if acc >= args.target else 1


if __name__ == "__main__":
    raise SystemExit(main())
