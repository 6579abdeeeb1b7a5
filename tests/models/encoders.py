"""Helpers the encoder tests (BERT/RoBERTa, ALBERT, DeBERTa, ELECTRA) share: weights of order one, an
npformer model with its torch twin, padded batches, running the twin, comparing gradients and
recordings, the memory-layout, float32, bad-input and training checks every encoder passes."""

from __future__ import annotations

import ast
import inspect
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import pytest
import torch

from npformer.debug import first_divergence
from tests.badinput import NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import in_layout
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, RTOL, assert_close

IGNORE_INDEX = -100
F32 = np.dtype(np.float32)

# Gradients zero in exact arithmetic (softmax ignores a shift shared by a row), judged at the scale of a
# sibling tensor in the same module: suffix -> the sibling's last name parts.
KEY_BIAS = {"k_proj.bias": "v_proj.bias"}

# Bad-input kinds for integer inputs (ids, token types, labels) and the attention mask.
NOT_IDS = NON_ARRAYS + SUBCLASS_KINDS + ("bool", "float16", "float32", "float64", "complex128", "object")
NOT_LABELS = tuple(k for k in NOT_IDS if k != "none") + RANK_KINDS + SHAPE_KINDS  # None: no loss, legal
NOT_A_MASK = tuple(k for k in NOT_IDS if k not in ("none", "bool")) + RANK_KINDS + SHAPE_KINDS


def bad_kinds(*label_names: str) -> Dict[str, tuple]:
    """argument -> the kinds it refuses: ids, token types, the mask, and every label argument named."""
    kinds = {"ids": NOT_IDS + RANK_KINDS, "token_type_ids": NOT_LABELS, "attention_mask": NOT_A_MASK}
    return {**kinds, **{name: NOT_LABELS for name in label_names}}


# -- models ---------------------------------------------------------------------------------------------
def randomise(model, seed=7):
    """Weights of order one (not the near-uniform init), so every mask, bias and norm shows in the loss."""
    rng = np.random.default_rng(seed)
    for name, prm in model.named_parameters():
        base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
        scale = 0.3 if prm.data.ndim == 1 else 1.0 / np.sqrt(prm.shape[1])
        prm.data[...] = base + scale * rng.standard_normal(prm.shape)
    return model


def twin_of(model, make_twin: Callable[..., torch.nn.Module]):
    """A float64 torch twin built from the model's config, holding the model's weights."""
    twin = make_twin(**model.cfg.to_dict()).double()
    twin.load_npformer_state(model.state_dict())
    return twin


def model_and_twin(make_config, make_model, make_twin, tiny: dict, seed=0, **overrides):
    """A float64 model from ``tiny`` with ``overrides``, randomised (seed + 7), and its twin."""
    cfg = make_config(**{**tiny, **overrides, "dtype": "float64"})
    model = randomise(make_model(cfg, seed=seed), seed + 7)
    return model, twin_of(model, make_twin)


def pending(model) -> int:
    """Caches waiting for a backward, over every module of the model."""
    return sum(m.pending_backwards for _, m in model.named_modules())


def imported_modules(module) -> set:
    """The relative and absolute ``from ... import`` sources of a module's code (``..nn.encoder``, ...)."""
    tree = ast.parse(inspect.getsource(module))
    return {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


# -- batches --------------------------------------------------------------------------------------------
def padded_inputs(rng, cfg, B: int, T: int, pad_rows: bool = True):
    """ids, token types (None without a token-type table) and an attention mask whose later rows are
    right-padded (every row keeps its first token); padded ids are the pad id where the model has one."""
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    if pad_rows:
        for b in range(1, B):
            mask[b, rng.integers(1, T + 1):] = 0  # row b keeps at least its first token
    if cfg.pad_token_id is not None:
        ids[mask == 0] = cfg.pad_token_id
    types = rng.integers(0, cfg.type_vocab_size, (B, T)) if cfg.type_vocab_size else None
    return ids, types, mask


def mlm_labels(rng, cfg, B: int, T: int):
    """(B, T) MLM labels, -100 where not masked (about 40%), at least one counted."""
    labels = rng.integers(0, cfg.vocab_size, (B, T))
    labels[rng.random((B, T)) < 0.4] = IGNORE_INDEX
    labels[0, 0] = rng.integers(0, cfg.vocab_size)  # at least one counted label
    return labels


# -- the twin -------------------------------------------------------------------------------------------
def to_torch(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def run_twin(twin, args, masks=None):
    """The twin's loss (its output's last item) on ``args`` with npformer's dropout ``masks``, after its
    backward: (loss, parameter name -> gradient, zeros where none reached)."""
    twin.zero_grad()
    loss = twin(*map(to_torch, args), masks=masks)[-1]
    loss.backward()
    return loss.item(), {n: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape)) for n, p in
                         twin.named_parameters()}


def run_both(model, twin, args):
    """The model's forward and backward on ``args`` (recording its dropout masks), then the twin's with
    those masks: (outputs, loss, twin loss, twin gradients)."""
    model.zero_grad()
    recording = model.start_recording()  # the dropout masks, for the twin to reuse
    outputs, loss = model.forward(*args)
    model.backward()
    twin_loss, twin_grads = run_twin(twin, args, masks=recording)
    return outputs, loss, twin_loss, twin_grads


def _sibling(name: str, zero_by_shift: Dict[str, str]) -> Optional[str]:
    scale_of = None
    for suffix, sibling in zero_by_shift.items():
        if name.endswith(suffix):  # the sibling in the same module (layers.0.attention.), or at the top
            scale_of = name[:name.rfind(".", 0, -len(suffix)) + 1] + sibling
    return scale_of


def assert_grads_match(model, twin_grads, rtol=MODEL_RTOL, zero_by_shift=KEY_BIAS):
    """Every parameter's gradient equals the twin's (the same names; the tied decoder once, as the word
    table); one zero in exact arithmetic (``zero_by_shift``) is judged at its sibling's scale."""
    ours = dict(model.named_parameters())
    assert set(ours) == set(twin_grads)
    for name, prm in ours.items():
        sibling = _sibling(name, zero_by_shift)
        scale = None if sibling is None else np.abs(twin_grads[sibling]).max()
        assert_close(prm.grad, twin_grads[name], rtol=rtol, scale=scale, what=name)


def assert_float32_matches_twin(model, twin, args, zero_by_shift=KEY_BIAS):
    """Both in float32: the logits and every gradient float32, the loss and gradients at float32's RTOL
    (those zero in exact arithmetic are round-off in float32, and not compared)."""
    model.astype("float32")
    twin.float()
    outputs, loss = model.forward(*args)
    model.backward()
    twin_loss, twin_grads = run_twin(twin, args)
    assert outputs[0].dtype == F32 and all(p.grad.dtype == F32 for p in model.parameters())
    assert abs(loss - twin_loss) <= RTOL[F32] * abs(twin_loss)
    for name, prm in model.named_parameters():
        if not name.endswith(tuple(zero_by_shift)):
            assert_close(prm.grad, twin_grads[name], rtol=RTOL[F32], what=name)


# -- recordings and the divergence finder ---------------------------------------------------------------
def record_both(model, twin, args):
    """Both recordings of one forward and backward on ``args``, the twin reusing npformer's dropout masks."""
    ours, theirs = model.start_recording(), twin.start_recording()
    model.forward(*args)
    model.zero_grad()
    model.backward()
    run_twin(twin, args, masks=ours)
    return ours, theirs


def divergence(ours, theirs):
    """The first recorded value where the two recordings differ, at the model tolerance (None: none)."""
    return first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)


def divergence_after_planting(model, twin, args, where: str):
    """The first divergence after the twin's parameter ``where`` is moved by 1e-3 at its first entry."""
    with torch.no_grad():
        dict(twin.named_parameters())[where].view(-1)[0] += 1e-3
    return divergence(*record_both(model, twin, args))


# -- checks every encoder passes ------------------------------------------------------------------------
def assert_layout_changes_nothing(model, args: Sequence, index: int, layout: str):
    """The loss and every gradient are the same, to the bit, with ``args[index]`` in the memory ``layout``
    (Fortran-ordered, transposed, strided, reversed or read-only views); None stays None."""
    args = list(args)
    _, loss = model.forward(*args)
    model.backward()
    expected = {n: p.grad.copy() for n, p in model.named_parameters()}
    if args[index] is not None:
        args[index] = in_layout(args[index], layout)
    model.zero_grad()
    _, loss_in_layout = model.forward(*args)
    model.backward()
    assert loss_in_layout == loss
    for name, prm in model.named_parameters():
        np.testing.assert_array_equal(prm.grad, expected[name], err_msg=name)


def bad_encoder_inputs(model, ids):
    """(call, argument) pairs a model with token types refuses, naming the argument: ids of a wrong dtype,
    rank, value, length 0 or longer than the position table; token types out of range or of another shape;
    masks not 0/1, of another dtype or shape, or hiding a whole row; MLM labels out of range or of another
    shape. ``ids`` is (2, 4)."""
    cfg = model.cfg
    return [
        (lambda: model.forward(ids.astype(np.float64)), "ids"),
        (lambda: model.forward(ids[0]), "ids"),
        (lambda: model.forward(ids + cfg.vocab_size), "ids"),
        (lambda: model.forward(np.zeros((2, 0), np.int64)), "ids"),
        (lambda: model.forward(np.ones((1, cfg.max_position + 1), np.int64)), "ids"),
        (lambda: model.forward(ids, ids * 2), "token_type_ids"),
        (lambda: model.forward(ids, ids[:, :3]), "token_type_ids"),
        (lambda: model.forward(ids, attention_mask=ids.astype(np.float32)), "attention_mask"),
        (lambda: model.forward(ids, attention_mask=ids * 2), "attention_mask"),
        (lambda: model.forward(ids, attention_mask=np.array([[1, 1, 0, 0], [0, 0, 0, 0]])), "attention_mask"),
        (lambda: model.forward(ids, attention_mask=ids[:, :2]), "attention_mask"),
        (lambda: model.forward(ids, mlm_labels=ids - 5), "mlm_labels"),
        (lambda: model.forward(ids, mlm_labels=ids[:1]), "mlm_labels"),
    ]


def classifier_label_inputs(model, ids, name: str):
    """(call, argument) pairs refused for a (B,) two-class label argument ``name``: out of range, of another
    length, float."""
    return [(lambda labels=labels: model.forward(ids, **{name: np.array(labels)}), name)
            for labels in ([0, 2], [0, 1, 1], [0.0, 1.0])]


def assert_refuses_corrupted(model, good: dict, arg: str, kind: str, func: str, named: Optional[str] = None):
    """``model.forward(**good)`` with ``good[arg]`` corrupted to ``kind`` raises naming ``func`` and the
    argument (``named``, ``arg`` by default), before any work."""
    kwargs = dict(good, **{arg: corrupt(good[arg], kind)})
    expect_rejected(lambda: model.forward(**kwargs), func, arg if named is None else named)
    assert pending(model) == 0


def assert_backward_needs_a_loss(model, ids):
    """After a forward without labels, backward refuses, naming the model."""
    model.forward(ids)
    with pytest.raises(RuntimeError, match=f"{type(model).__name__}.backward: the matching forward had no labels"):
        model.backward()


def assert_eval_keeps_no_cache(model, ids, outputs_type):
    """In eval mode a forward with labels returns ``outputs_type`` and a positive loss, and caches nothing."""
    model.clear_caches()
    model.eval()
    outputs, loss = model.forward(ids, mlm_labels=ids)
    assert isinstance(outputs, outputs_type) and loss > 0
    assert pending(model) == 0


def assert_init_and_astype(model, tol: float):
    """Matrices (but the word table) drawn with std 0.02 and mean 0 (within ``tol``), the pad word row zero;
    ``astype("float64")`` keeps every value and returns float64 logits."""
    matrices = np.concatenate([p.data.ravel() for n, p in model.named_parameters()
                               if p.data.ndim == 2 and n != "embeddings.word_embeddings.weight"])
    assert abs(matrices.std() - 0.02) < tol and abs(matrices.mean()) < tol
    assert np.all(model.embeddings.word_embeddings.weight.data[0] == 0)  # pad_token_id 0: the frozen row
    for name, prm in model.named_parameters():
        if prm.data.ndim == 1:
            assert np.all(prm.data == (1 if "norm" in name.lower() and name.endswith("weight") else 0)), name
    before = model.state_dict()
    assert model.astype("float64") is model and model.cfg.dtype == "float64"
    assert model.forward(np.ones((1, 4), np.int64))[0][0].dtype == np.float64
    for name, value in model.state_dict().items():
        assert value.dtype == np.float64 and np.array_equal(value, before[name]), name


def adamw_losses(model, args, steps: int = 60, lr: float = 1e-2):
    """The losses of ``steps`` AdamW steps (no weight decay) on one fixed batch."""
    from npformer.optim.optimizer import AdamW

    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        model.zero_grad()
        losses.append(model.forward(*args)[1])
        model.backward()
        opt.step()
    return losses


def layer_names(prefix: str, projections=("q_proj", "k_proj", "v_proj", "o_proj")) -> set:
    """The parameter names of a post-norm encoder layer at ``prefix``: its attention projections, two
    norms and the MLP."""
    names = {f"{prefix}.attention.{p}.{w}" for p in projections for w in ("weight", "bias")}
    return names | {f"{prefix}.{n}.{w}" for n in ("attention_norm", "output_norm", "mlp.fc", "mlp.proj")
                    for w in ("weight", "bias")}
