"""The mixed-precision runs of the main job, tabulated and plotted.

The three runs (the main job's config, ``npformer train`` defaults, 800 steps, seed 1337),
one per precision, into runs/mp/<precision>, each with its output in runs/mp/<precision>.log
and its wall time as a line "<precision> rc=0 wall_s=<seconds>" in runs/mp/times.txt:

    OPENBLAS_NUM_THREADS=1 nice -n 19 python -m npformer train --precision float32 \\
        --out-dir runs/mp/float32 --no-progress > runs/mp/float32.log

(and the same with bfloat16 and float16). Then, from the repository root:

    python demos/results/mixed_precision/make_results.py

writes loss_curves.png (``npformer viz losses`` of the three runs), loss_difference.png (each
low-precision run minus the float32 run) and results.md beside this file. A run not yet
finished is shown at the step its checkpoint holds.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from npformer import checkpoint, viz

HERE = Path(__file__).resolve().parent
RUNS = Path("runs/mp")
PRECISIONS = ("float32", "bfloat16", "float16")
WINDOW = 25  # steps in the moving mean of the training-loss differences


def load_runs():
    times = dict(re.findall(r"^(\w+) rc=0 wall_s=([\d.]+)$", (RUNS / "times.txt").read_text(), re.M)) \
        if (RUNS / "times.txt").is_file() else {}
    cpu = dict(re.findall(r"^(\w+) cpu_s=([\d.]+)$", (RUNS / "cpu.txt").read_text(), re.M)) \
        if (RUNS / "cpu.txt").is_file() else {}
    runs = {}
    for p in PRECISIONS:
        state = checkpoint.load(RUNS / p / "ckpt.npz")
        assert state["config"].get("precision", "float32") == p, (p, state["config"].get("precision"))
        log = (RUNS / f"{p}.log").read_text()
        speeds = re.findall(r"([\d,]+) tok/s \(training\)", log)
        runs[p] = {"state": state, "history": state["history"], "step": int(state["step"]),
                   "wall_s": float(times[p]) if p in times else None, "cpu_s": float(cpu[p]) if p in cpu else None,
                   "tokens_per_s": speeds[-1] if speeds else "-", "scaling": state.get("mixed_precision")}
    return runs


def table(runs) -> str:
    head = ("| precision | steps | train loss (last step) | train loss (mean of the last 50) | val loss | "
            "val perplexity | val loss - float32's | wall time (s) | CPU time (s) | training tok/s | skipped steps | "
            "final loss scale |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = runs["float32"]["history"]
    for p, run in runs.items():
        h = run["history"]
        val_step = h["val_steps"][-1] + 1
        same = base["val_steps"].index(h["val_steps"][-1]) if h["val_steps"][-1] in base["val_steps"] else None
        diff = f"{h['val_loss'][-1] - base['val_loss'][same]:+.4f}" if same is not None else "-"
        scaling = run["scaling"] or {}
        wall = "-" if run["wall_s"] is None else f"{run['wall_s']:.0f}"
        cpu = "-" if run["cpu_s"] is None else f"{run['cpu_s']:.0f}"
        scale = f"{scaling['scale']:g}" if scaling else "-"
        lines.append(
            f"| {p} | {run['step']} | {h['train_loss'][-1]:.4f} | {np.mean(h['train_loss'][-50:]):.4f} | "
            f"{h['val_loss'][-1]:.4f} (step {val_step}) | {math.exp(h['val_loss'][-1]):.3f} | {diff} | {wall} | {cpu} | "
            f"{run['tokens_per_s']} | {scaling.get('skipped', '-')} | {scale} |")
    return "\n".join(lines)


def difference_figure(runs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.0), dpi=viz.DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = runs["float32"]["history"]
    for i, p in enumerate(PRECISIONS[1:], start=1):
        h = runs[p]["history"]
        n = min(len(h["train_loss"]), len(base["train_loss"]))
        d = np.asarray(h["train_loss"][:n]) - np.asarray(base["train_loss"][:n])
        mean = np.convolve(d, np.ones(WINDOW) / WINDOW, mode="valid")
        ax.plot(np.arange(WINDOW - 1, n), mean, color=f"C{i}", lw=1.2,
                label=f"{p} - float32, training loss ({WINDOW}-step mean)")
        k = min(len(h["val_loss"]), len(base["val_loss"]))
        dv = np.asarray(h["val_loss"][:k]) - np.asarray(base["val_loss"][:k])
        ax.plot(h["val_steps"][:k], dv, "o", color=f"C{i}", label=f"{p} - float32, validation loss")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss difference (nats/token)")
    ax.set_title("each precision minus the float32 run (same seed, same batches)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91)
    return fig


INTRO = """# Mixed precision on the main job

The main job (`make run`: a character-level GPT of 4 layers, width 192, 6 heads, context 128,
1.82 M parameters, batch 16, 800 AdamW steps with lr 2e-3 -> 2e-4, warmup 50, clipping 1, seed
1337, on the built-in corpus) trained three times from the same initialisation and the same
batches: in float32, and with `--precision bfloat16` and `--precision float16`, where the model
computes with the float32 master weights rounded to the low precision, the gradients are stored
scaled in the low precision and unscaled into float32, AdamW updates the float32 masters, and a
step whose scaled gradient overflows is skipped and the loss scale halved (float16 starts at
2^16 and doubles after 2000 good steps in a row, so not within 800 steps; bfloat16, with float32's range,
keeps a fixed scale of 1).
The arithmetic inside the model stays float32 (see [the proof](../../../proofs/mixed_precision.md)).
Validation (8 fixed batches) uses the master weights.

![training and validation loss of the three runs](loss_curves.png)

![each low-precision run minus the float32 run](loss_difference.png)

"""

OUTRO = """
Wall time is a whole run (validations, samples and saves included), CPU time the process's
user and system seconds, and training tok/s the training steps' wall-clock throughput. All
three ran on this project's 2-core machine shared with other work, with one BLAS thread at the
lowest priority (`nice -n 19`): float32 alone, then bfloat16 and float16 side by side, and those
two were held still for several minutes while other work ran, so their wall times and tok/s
measure the machine's load, not the precision (the float32 run's CPU time was not recorded).
The emulated rounding itself is two passes per step over the 1.82 M weights and gradients,
35 ms each for bfloat16 and 19 ms for float16 timed alone, against about 0.45 s of CPU per step
(validations included). The validation loss is that of the last validation (step 800); the training loss of
a single step is noisy, hence the mean of the last 50.

Made by (from the repository root):

```
OPENBLAS_NUM_THREADS=1 nice -n 19 python -m npformer train --precision float32  --out-dir runs/mp/float32  --no-progress > runs/mp/float32.log
OPENBLAS_NUM_THREADS=1 nice -n 19 python -m npformer train --precision bfloat16 --out-dir runs/mp/bfloat16 --no-progress > runs/mp/bfloat16.log
OPENBLAS_NUM_THREADS=1 nice -n 19 python -m npformer train --precision float16  --out-dir runs/mp/float16  --no-progress > runs/mp/float16.log
python demos/results/mixed_precision/make_results.py
```

(its loss_curves.png is `npformer viz losses runs/mp/float32 runs/mp/bfloat16 runs/mp/float16`).
"""


def validation_lines(runs) -> str:
    lines = ["Validation loss at each evaluation:", ""]
    steps = runs["float32"]["history"]["val_steps"]
    lines.append("| precision | " + " | ".join(f"step {s + 1}" for s in steps) + " |")
    lines.append("|---|" + "---|" * len(steps))
    for p, run in runs.items():
        values = [f"{v:.4f}" for v in run["history"]["val_loss"]] + ["-"] * (len(steps) - len(run["history"]["val_loss"]))
        lines.append(f"| {p} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    runs = load_runs()
    viz.save_figure(viz.plot_runs([RUNS / p for p in PRECISIONS], list(PRECISIONS)), HERE / "loss_curves.png")
    viz.save_figure(difference_figure(runs), HERE / "loss_difference.png")
    text = INTRO + table(runs) + "\n\n" + validation_lines(runs) + OUTRO
    (HERE / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
