"""The torch twins' training step, timed: the baseline of ``npformer bench``.

One function for every twin (``TwinGPT``, ``TwinLlama``): the same float32 step as npformer's
bench (forward with the loss, backward, AdamW with the same settings), on the same batch
shape, with a given thread count; the median of ``steps`` timed steps after ``warmup``.
"""

from __future__ import annotations

import time
from typing import Callable, Dict

import numpy as np
import torch


def time_training_step(make_twin: Callable[..., torch.nn.Module], config: Dict[str, object], batch: int,
                       steps: int, *, warmup: int = 1, threads: int = 1) -> Dict[str, object]:
    """Median seconds of one float32 training step of ``make_twin(**config)`` at full length ``block_size``."""
    torch.set_num_threads(threads)
    model = make_twin(**config).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config["vocab_size"],
                                                              (batch, config["block_size"] + 1)))
    x, y = ids[:, :-1], ids[:, 1:]
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": float(np.median(times)), "torch": torch.__version__, "threads": torch.get_num_threads()}
