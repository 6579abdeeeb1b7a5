"""The task heads against torch autograd: logits, loss, every parameter's gradient and dhidden; -100 labels,
dropout masks, last-in-first-out calls, eval mode, bad input, and the encode cache contract."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from npformer.nn.heads import IGNORE_INDEX, SequenceClassificationHead, TokenClassificationHead
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn
from tests.tolerances import RTOL, assert_close

HEADS = {"sequence": SequenceClassificationHead, "token": TokenClassificationHead}


def make(kind, D, K, dtype, dropout=0.0, seed=0):
    head = HEADS[kind](D, K, dropout=dropout, rng=np.random.default_rng(seed), dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for _, p in head.named_parameters():  # weights of order one, so every term shows in the loss
        p.data[...] = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
    return head


def draw_labels(rng, shape, K, ignore_share=0.3):
    labels = rng.integers(0, K, shape)
    labels[rng.random(shape) < ignore_share] = IGNORE_INDEX
    labels.reshape(-1)[0] = rng.integers(0, K)  # at least one scored label
    return labels


def torch_head(kind, head, hidden, labels, mask=None, p=0.0):
    """The head in torch from its weights; (logits, loss, dhidden, grads by npformer name)."""
    params = {n: torch.tensor(q.data.astype(np.float64), requires_grad=True) for n, q in head.named_parameters()}
    h = torch.tensor(np.array(hidden), requires_grad=True)
    x = torch.tanh(F.linear(h[:, 0], params["pooler.dense.weight"], params["pooler.dense.bias"])) \
        if kind == "sequence" else h
    if mask is not None:
        x = x * torch.from_numpy(mask).to(x.dtype) / (1.0 - p)
    logits = F.linear(x, params["classifier.weight"], params["classifier.bias"])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(labels).reshape(-1),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    return (logits.detach().numpy(), loss.item(), h.grad.numpy(),
            {n: t.grad.numpy() for n, t in params.items()})


@given(kind=st.sampled_from(sorted(HEADS)), B=st.sampled_from([1, 2, 5]), T=st.sampled_from([1, 3, 4]),
       D=st.sampled_from([1, 3, 8]), K=st.sampled_from([1, 2, 7]), dtype=DTYPES, scale=SCALES,
       layout=layouts(), dropout=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_head_matches_torch(kind, B, T, D, K, dtype, scale, layout, dropout, seed):
    # float32 through a saturated tanh: 1 - y^2 is all rounding error, in torch's float32 as in ours
    assume(dtype == np.float64 or scale <= 1.0)
    rng = np.random.default_rng(seed)
    head = make(kind, D, K, dtype, dropout, seed)
    rec = head.start_recording()
    hidden = randn(rng, (B, T, D), dtype, scale)
    labels = draw_labels(rng, (B,) if kind == "sequence" else (B, T), K)
    logits, loss = head.forward(in_layout(hidden, layout), labels)
    dhidden = head.backward()
    mask = rec.get("dropout.mask")
    want_logits, want_loss, want_dhidden, want_grads = torch_head(
        kind, head, hidden.astype(np.float64), labels, mask, dropout)
    rtol = RTOL[np.dtype(dtype)]
    assert logits.dtype == dtype and dhidden.dtype == dtype
    assert_close(logits, want_logits, rtol=rtol, what="logits")
    assert_close(loss, want_loss, rtol=rtol, scale=max(abs(want_loss), 1.0), what="loss")
    assert_close(dhidden, want_dhidden, rtol=rtol, what="dhidden")
    for name, p in head.named_parameters():
        assert_close(p.grad, want_grads[name], rtol=rtol, what=name)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_ignored_labels_take_no_part(kind):
    """A label of -100 adds nothing: the loss and gradients are those of the scored labels alone."""
    rng = np.random.default_rng(3)
    head = make(kind, 4, 3, np.float64)
    hidden = randn(rng, (4, 3, 4))
    labels = draw_labels(rng, (4,) if kind == "sequence" else (4, 3), 3, ignore_share=0.5)
    _, loss = head.forward(hidden, labels)
    dhidden = head.backward()
    scored = labels != IGNORE_INDEX
    logits, _ = head.eval().forward(hidden)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(logp[scored], labels[scored][:, None], -1))
    assert_close(loss, want, scale=1.0)
    if kind == "token":
        assert np.all(dhidden[~scored] == 0) and np.any(dhidden[scored] != 0)
    else:
        assert np.all(dhidden[~scored] == 0) and np.all(dhidden[:, 1:] == 0)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_all_labels_ignored_give_zero(kind):
    head = make(kind, 3, 2, np.float64)
    hidden = randn(np.random.default_rng(0), (2, 2, 3))
    labels = np.full((2,) if kind == "sequence" else (2, 2), IGNORE_INDEX)
    _, loss = head.forward(hidden, labels)
    assert loss == 0.0
    assert np.all(head.backward() == 0)
    assert all(np.all(p.grad == 0) for p in head.parameters())


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_calls_match_last_in_first_out(kind):
    """Two forwards, then two backwards: each returns its own call's dhidden; the gradients add up."""
    rng = np.random.default_rng(5)
    head = make(kind, 4, 3, np.float64)
    shape = (2,) if kind == "sequence" else (2, 3)
    calls = [(randn(rng, (2, 3, 4)), draw_labels(rng, shape, 3)) for _ in range(2)]
    alone = []
    for hidden, labels in calls:
        head.zero_grad()
        head.forward(hidden, labels)
        alone.append((head.backward(), [p.grad.copy() for p in head.parameters()]))
    head.zero_grad()
    for hidden, labels in calls:
        head.forward(hidden, labels)
    assert_close(head.backward(), alone[1][0])
    assert_close(head.backward(), alone[0][0])
    for p, g1, g2 in zip(head.parameters(), alone[0][1], alone[1][1]):
        assert_close(p.grad, g1 + g2)
    with pytest.raises(RuntimeError, match="no forward left"):
        head.backward()


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_eval_mode_keeps_no_cache_and_labels_are_needed(kind):
    head = make(kind, 3, 2, np.float32)
    hidden = randn(np.random.default_rng(1), (2, 2, 3), np.float32)
    logits, loss = head.forward(hidden)
    assert loss is None and logits.shape == ((2, 2) if kind == "sequence" else (2, 2, 2))
    with pytest.raises(RuntimeError, match="no labels"):
        head.backward()
    assert len(head._caches) == 1  # the failed backward consumed nothing
    head.clear_caches()
    head.eval()
    head.forward(hidden, np.zeros((2,) if kind == "sequence" else (2, 2), np.int64))
    assert head._caches == []


HIDDEN_KINDS = NON_ARRAYS + SUBCLASS_KINDS + tuple(k for k in DTYPE_KINDS) + RANK_KINDS + ("last+1", "other float")


@given(kind=st.sampled_from(sorted(HEADS)), bad=st.sampled_from(HIDDEN_KINDS))
def test_bad_hidden_is_refused_by_name(kind, bad):
    head = make(kind, 3, 2, np.float64)
    hidden = randn(np.random.default_rng(0), (2, 2, 3))
    name = f"{HEADS[kind].__name__}.forward"
    expect_rejected(lambda: head.forward(corrupt(hidden, bad)), name, "hidden")
    assert head._caches == [] and all(m._caches == [] for _, m in head.named_modules())


@given(kind=st.sampled_from(sorted(HEADS)), bad=st.sampled_from(["class K", "negative", "float", "shape", "list"]))
def test_bad_labels_are_refused_by_name(kind, bad):
    head = make(kind, 3, 2, np.float64)
    hidden = randn(np.random.default_rng(0), (2, 2, 3))
    labels = np.zeros((2,) if kind == "sequence" else (2, 2), np.int64)
    labels = {"class K": labels + 2, "negative": labels - 1, "float": labels.astype(np.float64),
              "shape": np.concatenate([labels, labels[:1]]), "list": labels.tolist()}[bad]
    expect_rejected(lambda: head.forward(hidden, labels), f"{HEADS[kind].__name__}.forward", "labels")
    assert all(m._caches == [] for _, m in head.named_modules())


@pytest.mark.parametrize("kind", sorted(HEADS))
@pytest.mark.parametrize("arg, value", [("d_model", 0), ("num_labels", 0), ("dropout", 1.0), ("dropout", -0.1),
                                        ("rng", 3), ("dtype", np.int64)])
def test_bad_options_are_refused_by_name(kind, arg, value):
    options = dict(d_model=3, num_labels=2, dropout=0.0, rng=np.random.default_rng(0), dtype=np.float64)
    options[arg] = value
    expect_rejected(lambda: HEADS[kind](options.pop("d_model"), options.pop("num_labels"), **options),
                    HEADS[kind].__name__, arg)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_bad_dloss_is_refused_and_nothing_consumed(kind):
    head = make(kind, 3, 2, np.float64)
    head.forward(randn(np.random.default_rng(0), (2, 2, 3)), np.zeros((2,) if kind == "sequence" else (2, 2),
                                                                     np.int64))
    expect_rejected(lambda: head.backward(np.nan), f"{HEADS[kind].__name__}.backward", "dloss")
    assert len(head._caches) == 1 and all(np.all(p.grad == 0) for p in head.parameters())
    assert head.backward(2.0).shape == (2, 2, 3)
