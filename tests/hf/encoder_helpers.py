"""Helpers the encoder tests against transformers (BERT/RoBERTa, ALBERT, ELECTRA) share: a tiny HF model
with every parameter redrawn, saved folders made once per test module, loading a folder back in
transformers, and comparing npformer's gradients with HF's under HF's names.

HF initialises biases to zero, norms to one and the padding rows to zero, which would hide a misplaced
bias, norm or frozen row, so every parameter is redrawn at random (norm weights around 1).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np
import torch

from npformer.hf import read_safetensors
from tests.tolerances import HF_GRAD_RTOL, assert_close

IGNORE_INDEX = -100

# HF's key biases: their gradient is zero in exact arithmetic (softmax ignores a per-row shift), so each is
# judged at the scale of the value bias beside it.
KEY_BIASES = ("attention.self.key.bias", "attention.key.bias")


def redraw(model: torch.nn.Module, seed: int, norm_names: Sequence[str] = ("LayerNorm",), scale: float = 0.3):
    """Every parameter of ``model`` drawn anew, N(0, scale^2) from a float64 generator seeded ``seed``;
    weights of parameters whose name holds one of ``norm_names`` around 1. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            if any(n in name for n in norm_names) and name.endswith("weight"):
                noise += 1.0
            p.copy_(noise.to(p.dtype))
    return model.eval()


def build_hf_model(config, hf_class, seed: int, norm_names: Sequence[str] = ("LayerNorm",)):
    """``hf_class(config)`` with eager attention, built after ``torch.manual_seed(seed)`` and redrawn."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    return redraw(hf_class(config), seed, norm_names)


def load_hf(hf_class, folder, dtype=torch.float32):
    """A saved folder loaded back by transformers with eager attention, in eval mode."""
    return hf_class.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


def saved_folders(tmp_path_factory, build: Callable[[str], torch.nn.Module]):
    """``get(case)``: a folder holding ``build(case)`` saved by transformers, made on the first call."""
    made: Dict[str, object] = {}

    def get(case):
        if case not in made:
            made[case] = tmp_path_factory.mktemp(case)
            build(case).save_pretrained(made[case])
        return made[case]

    return get


def padded_ids(rng, vocab_size: int, pad_id: int, B: int, T: int, *, low: int, cut: int):
    """(B, T) ids drawn from [low, vocab_size) and their attention mask: row 1 right-padded from ``cut``,
    row 2 from 2, padded places holding ``pad_id``, and ``pad_id`` attended to inside row 0 (its lookup
    trains no row). B >= 3."""
    ids = rng.integers(low, vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, cut:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = pad_id
    ids[0, 3] = pad_id
    return ids, mask


def masked_labels(rng, vocab_size: int, mask: np.ndarray):
    """MLM labels: about half the tokens labelled, -100 elsewhere and at padding, (0, 0) labelled 5."""
    shape = mask.shape
    labels = np.where(rng.random(shape) < 0.5, rng.integers(0, vocab_size, shape), IGNORE_INDEX)
    labels[mask == 0] = IGNORE_INDEX
    labels[0, 0] = 5
    return labels


def hf_mlm_loss(logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Mean cross entropy of HF's (B, T, V) logits over the labels that are not -100."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(labels).flatten(),
                                             ignore_index=IGNORE_INDEX)


def assert_grads_equal_hf(ours: Dict[str, np.ndarray], hf: torch.nn.Module, case: str) -> Dict[str, np.ndarray]:
    """npformer's gradients under HF's names equal the HF model's, name by name (the same names), at
    HF_GRAD_RTOL; a key bias at its value bias's scale. Returns HF's gradients."""
    theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}  # the tied decoder once, as ours
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        scale = None
        if name.endswith(KEY_BIASES):  # zero in exact arithmetic: judged at its layer's scale
            scale = np.abs(theirs[name[:-len("key.bias")] + "value.bias"]).max()
        assert_close(ours[name], grad, rtol=HF_GRAD_RTOL, scale=scale, what=f"{case} d{name}")
    return theirs


def assert_same_model_and_tensors(first, second, folder, again) -> None:
    """``first`` (loaded from ``folder``) and ``second`` (loaded from ``again``, where ``first`` was saved)
    have the same config and parameters, and the two folders' safetensors files the same tensors under
    the same names, dtypes and bits."""
    assert first.cfg == second.cfg
    for name, value in first.state_dict().items():
        assert np.array_equal(value, second.state_dict()[name]), name
    original, saved = read_safetensors(folder / "model.safetensors"), read_safetensors(again / "model.safetensors")
    assert sorted(original) == sorted(saved)
    for name, value in original.items():
        assert value.dtype == saved[name].dtype and np.array_equal(value, saved[name]), name
