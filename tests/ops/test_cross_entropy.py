"""Cross-entropy: torch oracle in every memory layout, finite differences, the equations of
proofs/cross_entropy.md, empty input, bad input."""

import warnings

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from npformer.ops.softmax import log_softmax_forward
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs, shapes
from tests.tolerances import FD_RTOL, RTOL, assert_close

IGNORE_INDICES = st.sampled_from([-100, -1, 1000])
SMOOTHINGS = st.sampled_from([0.0, 0.1, 0.5, 1.0])
REDUCTIONS = st.sampled_from(["mean", "sum"])


@st.composite
def cases(draw, dtypes=DTYPES, scales=st.one_of(SCALES, st.just(1e4)), at_least_one_valid=True):
    """logits (..., V), targets (...) with some rows ignored, the options, and an upstream dloss."""
    lead, V = draw(shapes(1, 3)), draw(SIDES)
    dtype, scale, rng = draw(dtypes), draw(scales), draw(rngs())
    ignore_index = draw(IGNORE_INDICES)
    logits = randn(rng, lead + (V,), dtype, scale)
    targets = rng.integers(0, V, size=lead)
    ignored = rng.random(lead) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    if at_least_one_valid:
        ignored.flat[0] = False
    targets[ignored] = ignore_index
    options = {"ignore_index": ignore_index, "label_smoothing": draw(SMOOTHINGS), "reduction": draw(REDUCTIONS)}
    dloss = np.asarray(rng.standard_normal(), dtype)
    return logits, targets, options, dloss


def torch_oracle(logits, targets, options, dloss):
    """Loss and dlogits from torch in float64; torch wants the classes on dim 1, so rows are flattened."""
    V = logits.shape[-1]
    tx = leaf(logits)
    loss = torch.nn.functional.cross_entropy(tx.reshape(-1, V), torch.from_numpy(targets.reshape(-1).astype(np.int64)),
                                             **options)
    (dlogits,) = backprop(loss, dloss, tx)
    return loss.detach().numpy(), dlogits


def normaliser(targets, options):
    """D of (CE.5): rows counted for "mean" (at least 1), 1 for "sum"."""
    n_valid = int(np.sum(targets != options["ignore_index"]))
    return max(n_valid, 1) if options["reduction"] == "mean" else 1


def dlogits_scale(targets, options, dloss):
    """Size of the terms of (CE.7): |dloss| / D * (p + q) <= 2 |dloss| / D."""
    return 2.0 * abs(float(dloss)) / normaliser(targets, options)


def loss_scale(expected):
    """The log-sum-exp of (CE.1) is >= 0 with round-off of about one unit in its last place
    of 1 (it is log V at most), so a loss near 0 is judged against 1."""
    return max(float(np.abs(expected)), 1.0)


@pytest.mark.derivation("CE.3")
@pytest.mark.derivation("CE.5")
@pytest.mark.derivation("CE.7")
@given(cases(), layouts(), layouts())
def test_cross_entropy_matches_torch(case, logits_layout, targets_layout):
    """logits and targets in every memory layout; neither is written to."""
    logits, targets, options, dloss = case
    logits_in, targets_in = in_layout(logits, logits_layout), in_layout(targets, targets_layout)
    loss, cache = cross_entropy_forward(logits_in, targets_in, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    np.testing.assert_array_equal(logits_in, logits)
    np.testing.assert_array_equal(targets_in, targets)
    t_loss, t_dlogits = torch_oracle(logits, targets, options, dloss)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == logits.dtype
    assert dlogits.dtype == logits.dtype
    assert_close(loss, t_loss, scale=loss_scale(t_loss), what="loss")
    assert_close(dlogits, t_dlogits, scale=dlogits_scale(targets, options, dloss), what="dlogits")


def reference_log_softmax(x):
    """log softmax over the last axis in float64, written out independently of the op under test."""
    x = x.astype(np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.derivation("CE.2")
@given(shapes(1, 3), SIDES, rngs())
def test_nll_is_minus_log_softmax_at_target(lead, V, rng):
    logits = randn(rng, lead + (V,), np.float64, 3.0)
    targets = rng.integers(0, V, size=lead)
    loss, _ = cross_entropy_forward(logits, targets, reduction="sum")
    logp = reference_log_softmax(logits)
    expected = -np.take_along_axis(logp, targets[..., None], axis=-1).sum()  # (CE.2), summed
    assert_close(loss, expected, scale=loss_scale(expected), what="sum of nll")


@pytest.mark.derivation("CE.1")
@given(shapes(1, 2), SIDES, DTYPES, st.one_of(SCALES, st.just(1e4)), rngs())
def test_log_probabilities_formula(lead, V, dtype, scale, rng):
    """(CE.1) entry by entry: row n alone with target v has loss -l_nv, and the softmax the forward keeps is
    exp(l), with l written out in float64 with the row maximum subtracted: finite where exp(l) underflows."""
    logits = randn(rng, lead + (V,), dtype, scale)
    rows = logits.reshape(-1, V)
    ell = reference_log_softmax(rows)  # (CE.1)
    _, cache = cross_entropy_forward(logits, np.zeros(lead, np.int64))
    assert_close(cache.p, np.exp(ell), scale=1.0, what="p = exp(l)")
    for n, v in np.ndindex(ell.shape):
        loss, _ = cross_entropy_forward(rows[n], np.array(v))
        assert np.isfinite(loss)
        assert_close(loss, -ell[n, v], scale=loss_scale(ell[n, v]), what=f"-l[{n}, {v}]")


@pytest.mark.derivation("CE.4")
@given(cases())
def test_smoothed_target_distribution(case):
    """(CE.4) in the op: the q the backward subtracts, p - dlogits / (dloss / D) on each counted row by (CE.7),
    is (1 - eps) onehot(t) + eps / V and sums to 1; and the loss is the cross-entropy -sum_v q_v l_v of that q."""
    logits, targets, options, dloss = case
    V, eps, dtype = logits.shape[-1], options["label_smoothing"], logits.dtype
    loss, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    counted = (targets != options["ignore_index"]).reshape(-1)
    t = targets.reshape(-1)[counted]
    coef = float(dloss) / normaliser(targets, options)  # dloss w_n / D of (CE.7)
    seen = cache.p.astype(np.float64) - dlogits.reshape(-1, V)[counted].astype(np.float64) / coef  # (CE.7) solved for q
    q = (1 - eps) * np.eye(V)[t] + eps / V  # (CE.4)
    assert_close(seen, q, rtol=RTOL[np.dtype(dtype)], scale=1.0, what="q vs (CE.4)")
    assert_close(seen.sum(-1), np.ones(t.size), rtol=RTOL[np.dtype(dtype)], scale=float(V), what="sum of q")
    expected = -(q * reference_log_softmax(logits.reshape(-1, V)[counted])).sum() / normaliser(targets, options)
    assert_close(loss, expected, scale=loss_scale(expected), what="loss vs cross-entropy of q")


@pytest.mark.derivation("CE.5")
@given(cases(dtypes=st.just(np.float64)))
def test_mean_is_sum_over_valid_rows(case):
    logits, targets, options, _ = case
    valid = targets != options["ignore_index"]
    mean, _ = cross_entropy_forward(logits, targets, **{**options, "reduction": "mean"})
    total, _ = cross_entropy_forward(logits, targets, **{**options, "reduction": "sum"})
    only_valid, _ = cross_entropy_forward(logits[valid], targets[valid], **{**options, "reduction": "sum"})
    assert_close(total, only_valid, what="ignored rows add nothing to the sum")
    assert_close(mean, total / valid.sum(), what="mean = sum / N_valid")


@pytest.mark.derivation("CE.5")
@pytest.mark.derivation("CE.7")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_ignored_gives_zero(dtype, reduction, label_smoothing):
    rng = np.random.default_rng(0)
    logits = randn(rng, (2, 3, 5), dtype)
    targets = np.full((2, 3), -100)
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    loss, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache)
    assert loss.shape == () and loss.dtype == dtype and loss == 0
    assert dlogits.shape == logits.shape and dlogits.dtype == dtype and np.all(dlogits == 0)
    # The documented difference: torch divides 0 by 0 rows for "mean"; both give 0 for "sum".
    t_loss, _ = torch_oracle(logits, targets, options, np.asarray(1.0))
    assert np.isnan(t_loss) if reduction == "mean" else t_loss == 0


# ---- what ignored rows hold; -inf in counted rows -----------------------------------------


def junk(dtype):
    """Values an ignored (padding) row may hold: infinities, nan, the largest floats."""
    big = float(np.finfo(dtype).max)
    return np.array([-np.inf, np.inf, np.nan, big, -big, big / 3], dtype)


@st.composite
def cases_with_ignored_rows(draw):
    """A case with at least one counted and at least one ignored row (two rows or more)."""
    logits, targets, options, dloss = draw(cases(at_least_one_valid=True))
    if targets.size < 2:
        logits, targets = np.stack([logits, logits]), np.stack([targets, targets])
    ignored = targets == options["ignore_index"]
    if not ignored.any():
        targets.flat[-1] = options["ignore_index"]
    return logits, targets, options, dloss


@pytest.mark.derivation("CE.5")
@pytest.mark.derivation("CE.7")
@given(cases_with_ignored_rows(), rngs())
@example((np.array([[-np.inf, 1.0, 2.0], [0.0, 1.0, 2.0]]), np.array([-100, 1]),
          {"ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}, np.asarray(1.0)),
         np.random.default_rng(0))
def test_ignored_rows_may_hold_anything(case, rng):
    """Ignored rows full of -inf, inf, nan and the largest floats: the loss and the gradient are
    bit for bit those of the same rows holding 0, the gradient there is exactly 0, and both agree
    with torch (whose loss is finite too)."""
    logits, targets, options, dloss = case
    ignored = targets == options["ignore_index"]
    clean = logits.copy()
    clean[ignored] = 0
    dirty = logits.copy()
    dirty[ignored] = rng.choice(junk(logits.dtype), size=dirty[ignored].shape)
    loss, cache = cross_entropy_forward(dirty, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    clean_loss, clean_cache = cross_entropy_forward(clean, targets, **options)
    np.testing.assert_array_equal(loss, clean_loss)
    np.testing.assert_array_equal(dlogits, cross_entropy_backward(dloss, clean_cache))
    assert np.all(dlogits[ignored] == 0) and np.isfinite(loss)
    t_loss, t_dlogits = torch_oracle(clean, targets, options, dloss)
    assert_close(loss, t_loss, scale=loss_scale(t_loss), what="loss vs torch")
    assert_close(dlogits, t_dlogits, scale=dlogits_scale(targets, options, dloss), what="dlogits vs torch")
    if options["label_smoothing"] == 0:  # torch, given the junk itself, returns the same loss
        t_dirty, _ = torch_oracle(dirty, targets, options, dloss)
        assert_close(loss, t_dirty, scale=loss_scale(t_dirty), what="loss vs torch on the junk rows")


@pytest.mark.derivation("CE.7")
@given(cases(scales=SCALES), st.booleans(), rngs())
def test_minus_inf_logits_in_counted_rows(case, target_at_minus_inf, rng):
    """-inf at a class other than the target is probability 0: the loss stays finite. -inf at the
    target (or anywhere, with label smoothing) gives loss +inf. The gradient p - q stays finite.
    Both as in torch, except label smoothing 1 with the target at -inf, where torch's 0 * inf gives nan
    and we give inf (the nll term has weight 0 and is left out)."""
    logits, targets, options, dloss = case
    V = logits.shape[-1]
    if V < 2:  # a row needs a finite logit: -inf everywhere has no distribution (nan)
        logits, targets = np.concatenate([logits, logits], axis=-1), np.minimum(targets, 2 * V - 1)
        V = 2 * V
    counted = targets != options["ignore_index"]
    rows, t = logits.reshape(-1, V), targets.reshape(-1)
    hidden = rng.random(rows.shape) < 0.4  # entries set to -inf in counted rows
    hidden[np.arange(t.size), np.where(counted.reshape(-1), t, 0)] = False  # targets stay finite ...
    hidden[np.arange(t.size), (np.where(counted.reshape(-1), t, 0) + 1) % V] = False  # ... and one more
    if target_at_minus_inf:  # ... except in the first counted row
        first = int(np.flatnonzero(counted.reshape(-1))[0])
        hidden[first, t[first]] = True
    hidden &= counted.reshape(-1)[:, None]
    rows[hidden] = -np.inf
    loss, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    assert np.all(np.isfinite(dlogits))
    t_loss, t_dlogits = torch_oracle(logits, targets, options, dloss)
    assert_close(dlogits, t_dlogits, scale=dlogits_scale(targets, options, dloss), what="dlogits vs torch")
    eps = options["label_smoothing"]
    if target_at_minus_inf or (eps > 0 and hidden.any()):
        assert loss == np.inf
        assert np.isnan(t_loss) if eps == 1 and target_at_minus_inf else t_loss == np.inf
    else:
        assert np.isfinite(loss)
        assert_close(loss, t_loss, scale=loss_scale(t_loss), what="loss vs torch")


# ---- symbolic checks, V = 3 --------------------------------------------------------

V_SYM = 3
X = sp.symbols(f"x0:{V_SYM}", real=True)
EPS = sp.Symbol("epsilon", real=True)
_E = [sp.exp(xi) for xi in X]
P = [e / sum(_E) for e in _E]  # softmax
LOGP = [xi - sp.log(sum(_E)) for xi in X]  # (CE.1) without the shift, which cancels


def q(t):
    """Smoothed target distribution of (CE.4)."""
    return [(1 - EPS) * sp.KroneckerDelta(v, t) + EPS / V_SYM for v in range(V_SYM)]


def smoothed_loss(t):
    return (1 - EPS) * (-LOGP[t]) + EPS / V_SYM * sum(-lv for lv in LOGP)  # (CE.3)


@pytest.mark.derivation("CE.3")
@pytest.mark.derivation("CE.4")
def test_smoothed_loss_symbolic():
    for t in range(V_SYM):
        assert sp.simplify(sum(q(t)) - 1) == 0
        cross = -sum(qv * lv for qv, lv in zip(q(t), LOGP))  # cross-entropy of q and p, (CE.4)
        assert sp.simplify(smoothed_loss(t) - cross) == 0, t


@pytest.mark.derivation("CE.6")
def test_row_gradient_symbolic():
    for t in range(V_SYM):
        for j in range(V_SYM):
            autodiff = sp.diff(smoothed_loss(t), X[j])
            claimed = P[j] - q(t)[j]  # (CE.6)
            assert sp.simplify(autodiff - claimed) == 0, (t, j)


@pytest.mark.derivation("CE.6")
@pytest.mark.derivation("CE.7")
@given(cases(dtypes=st.just(np.float64), at_least_one_valid=False))
def test_dlogits_formula(case):
    """dlogits = dloss * w / D * (softmax - q), written out with a dense one-hot; rows sum to zero."""
    logits, targets, options, dloss = case
    V, eps = logits.shape[-1], options["label_smoothing"]
    _, cache = cross_entropy_forward(logits, targets, **options)
    dlogits = cross_entropy_backward(dloss, cache)
    valid = targets != options["ignore_index"]
    p = np.exp(reference_log_softmax(logits))
    onehot = np.eye(V)[np.where(valid, targets, 0)]
    q = (1 - eps) * onehot + eps / V  # (CE.4)
    expected = float(dloss) * valid[..., None] / normaliser(targets, options) * (p - q)  # (CE.6), (CE.7)
    scale = dlogits_scale(targets, options, dloss)
    assert_close(dlogits, expected, scale=scale, what="dlogits")
    assert_close(dlogits.sum(-1), np.zeros(targets.shape), scale=scale * V, what="row sums")


@pytest.mark.derivation("CE.7")
@given(cases(dtypes=st.just(np.float64), scales=st.sampled_from([1.0, 3.0])))
def test_finite_differences(case):
    logits, targets, options, _ = case
    results = gradcheck.check(cross_entropy_forward, cross_entropy_backward, {"logits": logits, "targets": targets},
                              wrt=("logits",), options=options)
    assert [r.input for r in results] == ["logits"]
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


def test_gradcheck_cases_pass():
    for case in gradcheck.cases("cross_entropy"):
        results = gradcheck.check_case(case)
        assert results and all(r.max_rel < FD_RTOL for r in results), gradcheck.format_table(results)


# ---- stability and the model's call pattern ----------------------------------------


@pytest.mark.derivation("CE.2")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_logits_stay_finite(dtype):
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype)
    targets = np.array([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # together with np.seterr(all="raise") from conftest
        loss, cache = cross_entropy_forward(logits, targets, reduction="sum")
        dlogits = cross_entropy_backward(1.0, cache)
    # Row losses: 0 (target is the max), 2e4 (target 2e4 below it), log 3 (all equal).
    assert_close(loss, 2e4 + np.log(3), what="loss")
    assert_close(dlogits, [[0, 0, 0], [1, -1, 0], [1 / 3, 1 / 3, -2 / 3]], what="dlogits")


def test_gpt_call_pattern():
    """loss, cache = forward(logits, targets); float(loss); backward(np.asarray(1.0, dtype), cache)."""
    rng = np.random.default_rng(1)
    B, T, V = 4, 16, 65
    logits = randn(rng, (B, T, V), np.float32, 3.0)
    saved = logits.copy()
    targets = rng.integers(0, V, size=(B, T))
    loss, cache = cross_entropy_forward(logits, targets)
    assert isinstance(float(loss), float) and loss.dtype == np.float32
    dlogits = cross_entropy_backward(np.asarray(1.0, np.float32), cache)
    assert dlogits.shape == (B, T, V) and dlogits.dtype == np.float32
    assert np.array_equal(logits, saved), "the forward must not modify its input"
    assert np.array_equal(cross_entropy_backward(1.0, cache), dlogits), "a python float dloss gives the same result"
    t_loss, t_dlogits = torch_oracle(logits, targets, {}, np.asarray(1.0))
    assert_close(loss, t_loss, what="loss")
    assert_close(dlogits, t_dlogits, scale=2.0 / (B * T), what="dlogits")


def test_single_row():
    """logits (V,) with a 0-d target: one row."""
    logits, target = np.array([1.0, 2.0, 0.5]), np.array(1)
    loss, cache = cross_entropy_forward(logits, target)
    assert_close(loss, -reference_log_softmax(logits)[1], what="loss")
    assert cross_entropy_backward(1.0, cache).shape == (3,)


@pytest.mark.derivation("CE.5")
@given(DTYPES, shapes(0, 2), SIDES, REDUCTIONS, SMOOTHINGS)
def test_no_rows_is_the_all_ignored_case(dtype, lead, V, reduction, label_smoothing):
    """N = 0 rows: loss 0 (no rows to learn from, as when every row is ignored) and an empty gradient."""
    logits = np.zeros((0,) + lead + (V,), dtype)
    loss, cache = cross_entropy_forward(logits, np.zeros(logits.shape[:-1], np.int64), reduction=reduction,
                                        label_smoothing=label_smoothing)
    dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache)
    assert loss.shape == () and loss.dtype == dtype and loss == 0
    assert dlogits.shape == logits.shape and dlogits.dtype == dtype


@given(cases(dtypes=st.just(np.float64)), st.sampled_from(["python int", "python float", "numpy scalar", "0-d array"]))
def test_dloss_may_be_any_real_scalar(case, form):
    """dloss as a Python number, a NumPy scalar or a 0-d array of the logits' dtype: one gradient."""
    logits, targets, options, dloss = case
    _, cache = cross_entropy_forward(logits, targets, **options)
    value = round(float(dloss)) or 1
    given_as = {"python int": value, "python float": float(value), "numpy scalar": np.float32(value),
                "0-d array": np.asarray(value, np.float64)}[form]
    np.testing.assert_array_equal(cross_entropy_backward(given_as, cache),
                                  cross_entropy_backward(np.asarray(float(value)), cache))


# ---- bad input -----------------------------------------------------------------------

L, T = np.zeros((2, 3, 5)), np.zeros((2, 3), np.int64)


def targets_with(value):
    t = T.copy()
    t[1, 2] = value
    return t


LOGITS_KINDS = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + ("0-d", "V = 0")
TARGETS_KINDS = (NON_ARRAYS + SUBCLASS_KINDS + ("bool", "float16", "complex128", "object", "float32", "float64")
                 + RANK_KINDS + SHAPE_KINDS + ("too large", "negative"))
BAD_OPTIONS = {
    "ignore_index": ("a class", 1.5, True, None, "-100", np.float64(-100)),
    "label_smoothing": (-0.1, 1.5, float("nan"), float("inf"), True, None, "0.1", [0.1]),
    "reduction": ("none", "MEAN", None, 1, ("mean",), b"mean"),
}
BAD_DLOSS = ("list", "none", "string", float("nan"), float("inf"), "shape (1,)", "other float", "int array",
             "complex", True)


def bad(a, kind, V=None):
    """``a`` made wrong by ``kind``: a kind of tests/badinput.py, or one of the kinds named here."""
    if kind == "0-d":
        return np.asarray(a.reshape(-1)[0])
    if kind == "V = 0":
        return a[..., :0]
    if kind in ("float32", "float64"):
        return a.astype(kind)
    if kind == "too large":
        return np.full_like(a, V)
    if kind == "negative":
        return np.full_like(a, -3)
    return corrupt(a, kind)


def forward_with(logits, targets, options, **changes):
    return lambda: cross_entropy_forward(logits, targets, **{**options, **changes})


@given(st.sampled_from(LOGITS_KINDS), cases())
def test_forward_rejects_bad_logits(kind, case):
    logits, targets, options, _ = case
    expect_rejected(forward_with(bad(logits, kind), targets, options), "cross_entropy_forward", "logits")


@given(st.sampled_from(TARGETS_KINDS), cases(at_least_one_valid=False))
def test_forward_rejects_bad_targets(kind, case):
    """Wrong type, dtype (floats and bools are not class ids), shape, or a value outside [0, V)."""
    logits, targets, options, _ = case
    bad_targets = bad(targets, kind, V=logits.shape[-1])
    expect_rejected(forward_with(logits, bad_targets, options), "cross_entropy_forward", "targets")


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
@given(data=st.data(), case=cases())
def test_forward_rejects_bad_options(option, data, case):
    logits, targets, options, _ = case
    value = data.draw(st.sampled_from(BAD_OPTIONS[option]), label=option)
    if isinstance(value, str) and value == "a class":
        value = data.draw(st.integers(0, logits.shape[-1] - 1), label="class")
    expect_rejected(forward_with(logits, targets, options, **{option: value}), "cross_entropy_forward", option)


@given(st.sampled_from(BAD_DLOSS), cases())
def test_backward_rejects_bad_dloss(kind, case):
    logits, targets, options, dloss = case
    _, cache = cross_entropy_forward(logits, targets, **options)
    other = np.float32 if logits.dtype == np.float64 else np.float64
    value = {"list": [1.0], "none": None, "string": "1", "shape (1,)": np.ones(1, logits.dtype),
             "other float": np.asarray(1.0, other), "int array": np.asarray(1), "complex": 1 + 0j}.get(kind, kind) \
        if isinstance(kind, str) else kind
    expect_rejected(lambda: cross_entropy_backward(value, cache), "cross_entropy_backward", "dloss")


@given(st.sampled_from(["tuple", "none", "other op"]), cases())
def test_backward_rejects_a_cache_it_did_not_make(kind, case):
    logits, targets, options, dloss = case
    _, cache = cross_entropy_forward(logits, targets, **options)
    assert isinstance(cache, CrossEntropyCache)
    wrong = {"tuple": tuple(cache), "none": None, "other op": log_softmax_forward(logits)[1]}[kind]
    expect_rejected(lambda: cross_entropy_backward(dloss, wrong), "cross_entropy_backward", "cache")


@pytest.mark.parametrize(
    "logits, targets, options, message",
    [
        (L, targets_with(5), {}, "argument 'targets' expected a value in [0, 5), got 5"),
        (L, targets_with(-3), {}, "argument 'targets' expected a value in [0, 5), got -3"),
        (L, targets_with(-100), {"ignore_index": -1}, "argument 'targets' expected a value in [0, 5), got -100"),
        (L, T, {"ignore_index": 0}, "argument 'ignore_index' expected a value outside the class range [0, 5)"),
        (L, T, {"ignore_index": 4}, "argument 'ignore_index' expected a value outside the class range [0, 5)"),
        (L, T, {"reduction": "none"}, "argument 'reduction' expected one of ('mean', 'sum'), got 'none'"),
        (L, T, {"label_smoothing": 1.5},
         "argument 'label_smoothing' expected a finite real number in [0.0, 1.0], got 1.5"),
        (L, T, {"label_smoothing": -0.1},
         "argument 'label_smoothing' expected a finite real number in [0.0, 1.0], got -0.1"),
        (L, T[:, :2], {}, "argument 'targets' expected shape (2, 3), got (2, 2)"),
        (L, T.reshape(6), {}, "argument 'targets' expected shape (2, 3), got (6,)"),
        (L.astype(np.int64), T, {}, "argument 'logits' expected dtype float32 or float64, got int64"),
        (L, T.astype(np.float64), {}, "argument 'targets' expected an integer dtype, got float64"),
        (np.zeros((2, 0)), np.zeros(2, np.int64), {}, "argument 'logits' expected at least one class"),
        (np.zeros(()), np.zeros((), np.int64), {}, "argument 'logits' expected at least 1 dimensions, got 0"),
    ],
)
def test_messages_say_what_was_expected_and_what_came(logits, targets, options, message):
    got = expect_rejected(lambda: cross_entropy_forward(logits, targets, **options), "cross_entropy_forward",
                          message.split("'")[1])
    assert "cross_entropy_forward: " + message in got


def test_backward_message_names_dloss_and_its_shape():
    _, cache = cross_entropy_forward(L, T)
    got = expect_rejected(lambda: cross_entropy_backward(np.ones(1), cache), "cross_entropy_backward", "dloss")
    assert "cross_entropy_backward: argument 'dloss' expected a scalar (shape ()), got shape (1,)" in got
