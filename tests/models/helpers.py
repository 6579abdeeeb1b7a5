"""Helpers the model tests share: weights of order one, an npformer model with its torch twin, a batch of
next-token targets, running the twin and comparing every gradient with it."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from npformer.nn.lm import IGNORE_INDEX
from tests.tolerances import MODEL_RTOL, assert_close

Draw = Callable[[np.random.Generator, tuple], np.ndarray]  # (rng, shape) -> values


def randomise(model, seed: int = 7, *, unit: Sequence[str] = ("norm.weight",), small: Sequence[str] = (),
              fan_in_axis: int = 1, special: Optional[Dict[str, Draw]] = None):
    """Weights of order one (not the small init), so every mask, bias and norm shows in the loss.

    A parameter named ``...<suffix>`` for a suffix of ``special`` is drawn by that function; the
    others are base + scale N(0, 1), base 1 for names ending in one of ``unit`` (norm gains), else
    0, and scale 0.3 for vectors and the names in ``small``, else 1 / sqrt(shape[fan_in_axis]).
    Parameters are drawn in ``named_parameters`` order from one generator of ``seed``.
    """
    rng = np.random.default_rng(seed)
    special = special or {}
    for name, prm in model.named_parameters():
        draw = next((f for suffix, f in special.items() if name.endswith(suffix)), None)
        if draw is not None:
            prm.data[...] = draw(rng, prm.shape)
            continue
        base = 1.0 if name.endswith(tuple(unit)) else 0.0
        scale = 0.3 if prm.data.ndim == 1 or name in small else 1.0 / np.sqrt(prm.shape[fan_in_axis])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def twin_pair(model_cls, twin_cls, cfg, seed: int = 0, redraw: Callable = randomise):
    """A float64 model of ``cfg``, its weights redrawn with seed + 7, and its twin holding the same weights."""
    model = redraw(model_cls(cfg, seed=seed), seed + 7)
    twin = twin_cls(**cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return model, twin


def batch(cfg, B: int = 3, T: Optional[int] = None, seed: int = 1):
    """ids (B, T) and targets (B, T) with some -100 (prompt or padding positions), at least one counted."""
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[rng.random((B, T)) < 0.25] = IGNORE_INDEX
    targets[0, -1] = rng.integers(0, cfg.vocab_size)
    return ids, targets


def run_twin(twin, ids, targets):
    """The twin's loss and every parameter's gradient of it."""
    _, loss = twin(torch.from_numpy(ids), torch.from_numpy(targets))
    twin.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in twin.named_parameters()}


def check_against_twin(model, twin, ids, targets):
    """The twin takes the model's weights; one forward and backward of each: the loss and every gradient."""
    twin.load_npformer_state(model.state_dict())
    model.zero_grad()
    _, loss = model.forward(ids, targets)
    model.backward()
    twin_loss, twin_grads = run_twin(twin, ids, targets)
    assert abs(loss - twin_loss) <= MODEL_RTOL * abs(twin_loss)
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)  # same names; a tied head appears once
    for name, prm in ours.items():
        assert_close(prm.grad, twin_grads[name], rtol=MODEL_RTOL, what=name)


def record_both(model, twin):
    """One forward and backward of each on the same batch, recording under the same names."""
    ids, targets = batch(model.cfg)
    ours, theirs = model.start_recording(), twin.start_recording()
    model.forward(ids, targets)
    model.zero_grad()
    model.backward()
    run_twin(twin, ids, targets)
    return ours, theirs
