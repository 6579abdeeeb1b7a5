"""The selective scan (proofs/mamba.md): forward and every gradient against torch autograd and finite
differences, each backward equation on its own, the parallel scan against the sequential one, the
combine operator's associativity (sympy), a sequence continued from its state, and bad input."""

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.causal_conv1d import causal_conv1d_forward
from npformer.ops.selective_scan import (
    SelectiveScanCache,
    _adjoint_state,
    selective_scan_backward,
    selective_scan_forward,
    selective_scan_parallel,
)
from tests.badinput import DTYPE_KINDS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, SUBCLASS_KINDS, corrupt, expect_rejected
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_EPS, FD_RTOL, assert_close

NAMES = ("x", "delta", "A", "Bm", "C", "D", "h0")
SCANS = {"sequential": selective_scan_forward, "parallel": selective_scan_parallel}


def make(rng, Bsz, L, Dch, N, dtype=np.float64, scale=1.0, h0=True):
    """Inputs of one scan: delta > 0 and A < 0 as the model makes them, x at ``scale``."""
    a = dict(x=randn(rng, (Bsz, L, Dch), dtype, scale),
             delta=rng.uniform(0.05, 1.5, (Bsz, L, Dch)).astype(dtype),
             A=-rng.uniform(0.2, 3.0, (Dch, N)).astype(dtype),
             Bm=randn(rng, (Bsz, L, N), dtype), C=randn(rng, (Bsz, L, N), dtype),
             D=randn(rng, (Dch,), dtype), h0=randn(rng, (Bsz, Dch, N), dtype) if h0 else None)
    a["dy"] = randn(rng, (Bsz, L, Dch), dtype)
    return a


@st.composite
def cases(draw, lengths=SIDES):
    Bsz, L, Dch, N = draw(st.sampled_from([1, 2, 3])), draw(lengths), draw(SIDES), draw(st.sampled_from([1, 2, 3, 5]))
    return make(draw(rngs()), Bsz, L, Dch, N, draw(DTYPES), draw(SCALES), draw(st.booleans()))


def args(a):
    return [a[n] for n in NAMES]


def torch_scan(x, delta, A, Bm, C, D, h0):
    """The recurrence of (MAMBA.1) - (MAMBA.4) in torch, position by position."""
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1) if ys else x * D


def torch_run(a):
    ts = {n: None if a[n] is None else torch.tensor(a[n], requires_grad=True) for n in NAMES}
    y = torch_scan(*[ts[n] for n in NAMES])
    y.backward(torch.tensor(a["dy"]))
    return y.detach().numpy(), [None if ts[n] is None else ts[n].grad.numpy() for n in NAMES]


# ---- forward ---------------------------------------------------------------------------------------------

@pytest.mark.derivation("MAMBA.1")
@pytest.mark.derivation("MAMBA.2")
@pytest.mark.derivation("MAMBA.3")
@pytest.mark.derivation("MAMBA.4")
def test_forward_matches_the_recurrence():
    """Every entry of y from (MAMBA.1) - (MAMBA.4) with scalar loops over b, t, d, n."""
    a = make(np.random.default_rng(0), 2, 5, 3, 4)
    y, _ = selective_scan_forward(*args(a))
    want = np.zeros_like(y)
    for b in range(2):
        for d in range(3):
            h = a["h0"][b, d].copy()
            for t in range(5):
                for n in range(4):
                    Abar = np.exp(a["delta"][b, t, d] * a["A"][d, n])  # (MAMBA.1)
                    u = a["delta"][b, t, d] * a["Bm"][b, t, n] * a["x"][b, t, d]  # (MAMBA.2)
                    h[n] = Abar * h[n] + u  # (MAMBA.3)
                want[b, t, d] = sum(a["C"][b, t, n] * h[n] for n in range(4)) + a["D"][d] * a["x"][b, t, d]
    assert_close(y, want, what="y")


@pytest.mark.derivation("MAMBA.4")
@given(cases(), layouts(), st.sampled_from(list(SCANS)))
def test_scan_matches_torch(a, layout, scan):
    a["x"], a["Bm"] = in_layout(a["x"], layout), in_layout(a["Bm"], layout)
    y, cache = SCANS[scan](*args(a))
    want, _ = torch_run({k: v if v is None else v.astype(np.float64) for k, v in a.items()})
    assert y.dtype == a["x"].dtype and y.shape == a["x"].shape
    assert_close(y, want, what="y")
    assert cache.h.shape == a["x"].shape + (a["A"].shape[1],)


# ---- backward --------------------------------------------------------------------------------------------

@pytest.mark.derivation("MAMBA.8")
@pytest.mark.derivation("MAMBA.9")
@pytest.mark.derivation("MAMBA.10")
@given(cases(), st.sampled_from(list(SCANS)))
def test_gradients_match_torch(a, scan):
    y, cache = SCANS[scan](*args(a))
    grads = selective_scan_backward(a["dy"], cache)
    _, want = torch_run({k: v if v is None else v.astype(np.float64) for k, v in a.items()})
    for name, g, w in zip(NAMES, grads, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == a["x"].dtype and g.shape == w.shape, name
        assert_close(g, w, what=name)


@pytest.mark.derivation("MAMBA.9")
@pytest.mark.derivation("MAMBA.10")
@pytest.mark.parametrize("scan", list(SCANS))
def test_finite_differences(scan):
    a = make(np.random.default_rng(3), 2, 4, 3, 2)
    inputs = {n: a[n] for n in NAMES}
    results = gradcheck.check(SCANS[scan], selective_scan_backward, inputs, NAMES, eps=FD_EPS)
    assert len(results) == len(NAMES)
    for r in results:
        assert r.max_rel < FD_RTOL, (r.input, r.max_rel)


@pytest.mark.derivation("MAMBA.5")
@given(cases())
def test_adjoint_state_formula(a):
    """g_t = sum over s >= t of (Abar_(t+1) ... Abar_s) dy_s C_s, the recurrence (MAMBA.5) unrolled."""
    _, cache = selective_scan_forward(*args(a))
    g, carry = _adjoint_state(a["dy"], a["C"], cache.Abar)
    L = a["x"].shape[1]
    want = np.zeros(g.shape)
    for t in range(L):
        decay = np.ones(g[:, 0].shape)
        for s in range(t, L):
            if s > t:
                decay = decay * cache.Abar[:, s]
            want[:, t] += decay * a["dy"][:, s, :, None] * a["C"][:, s, None, :]
    assert_close(g, want, what="g")
    if L:
        assert_close(carry, cache.Abar[:, 0] * g[:, 0], what="Abar_1 g_1")


@pytest.mark.derivation("MAMBA.6")
@given(cases())
def test_dC_formula(a):
    _, cache = selective_scan_forward(*args(a))
    dC = selective_scan_backward(a["dy"], cache)[4]
    assert_close(dC, np.einsum("bld,bldn->bln", a["dy"].astype(np.float64), cache.h.astype(np.float64)), what="dC")


@pytest.mark.derivation("MAMBA.7")
@given(cases())
def test_dD_formula(a):
    _, cache = selective_scan_forward(*args(a))
    dD = selective_scan_backward(a["dy"], cache)[5]
    assert_close(dD, (a["dy"].astype(np.float64) * a["x"]).sum(axis=(0, 1)), what="dD")


@pytest.mark.derivation("MAMBA.11")
@given(cases())
def test_dh0_formula(a):
    """dh0 = Abar_1 g_1; with no h0 the slot is None; a sequence of length 0 passes h0 nothing."""
    _, cache = selective_scan_forward(*args(a))
    dh0 = selective_scan_backward(a["dy"], cache)[6]
    if a["h0"] is None:
        assert dh0 is None
        return
    g, _ = _adjoint_state(a["dy"], a["C"], cache.Abar)
    assert_close(dh0, cache.Abar[:, 0] * g[:, 0], what="dh0")


def test_an_empty_sequence_gives_empty_outputs_and_zero_gradients():
    a = make(np.random.default_rng(1), 2, 0, 3, 2)
    for scan in SCANS.values():
        y, cache = scan(*args(a))
        assert y.shape == (2, 0, 3)
        dx, ddelta, dA, dBm, dC, dD, dh0 = selective_scan_backward(a["dy"], cache)
        assert dx.shape == (2, 0, 3) and not dA.any() and not dD.any() and not dh0.any()


# ---- the parallel scan ------------------------------------------------------------------------------------

@pytest.mark.derivation("MAMBA.13")
@pytest.mark.derivation("MAMBA.15")
@given(cases(lengths=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])))
def test_parallel_scan_equals_sequential(a):
    y_seq, c_seq = selective_scan_forward(*args(a))
    y_par, c_par = selective_scan_parallel(*args(a))
    scale = float(np.abs(c_seq.h).max())
    assert_close(c_par.h, c_seq.h.astype(np.float64), scale=scale, what="h")
    assert_close(y_par, y_seq.astype(np.float64), what="y")


@pytest.mark.derivation("MAMBA.14")
def test_operator_is_associative_symbolic():
    a1, b1, a2, b2, a3, b3, h = sympy.symbols("a1 b1 a2 b2 a3 b3 h")

    def op(p, q):  # (MAMBA.13)
        return (p[0] * q[0], q[0] * p[1] + q[1])

    left = op(op((a1, b1), (a2, b2)), (a3, b3))
    right = op((a1, b1), op((a2, b2), (a3, b3)))
    assert all(sympy.expand(u - v) == 0 for u, v in zip(left, right))
    # the b of the composite is the three steps of (MAMBA.3) applied to h0 = h (folded into b1)
    h3 = a3 * (a2 * (a1 * h + b1) + b2) + b3
    folded = op(op((a1, a1 * h + b1), (a2, b2)), (a3, b3))
    assert sympy.expand(folded[1] - h3) == 0


@pytest.mark.derivation("MAMBA.14")
@given(cases(lengths=st.sampled_from([1, 2, 5, 8])))
def test_prefix_composites_are_states(a):
    """Folding (MAMBA.13) from the left over (Abar_s, u_s), s <= t, gives (prod Abar, h_t)."""
    _, cache = selective_scan_forward(*args(a))
    Abar = cache.Abar.astype(np.float64)
    u = (a["delta"] * a["x"]).astype(np.float64)[..., None] * a["Bm"][:, :, None, :]
    h0 = np.zeros(Abar[:, 0].shape) if a["h0"] is None else a["h0"]
    acc = (np.ones_like(h0), h0)  # the identity (1, 0) with h0 folded in: (1, h0)
    for t in range(Abar.shape[1]):
        acc = (acc[0] * Abar[:, t], Abar[:, t] * acc[1] + u[:, t])
        assert_close(cache.h[:, t], acc[1], scale=float(np.abs(cache.h).max()), what=f"h_{t + 1}")
        assert np.allclose(acc[0], np.prod(Abar[:, :t + 1], axis=1))


@pytest.mark.derivation("MAMBA.16")
def test_euler_input_is_second_order_close():
    """The exact zero-order-hold input term minus Delta B x, over Delta^2, tends to A B x / 2."""
    A, Bx = -1.7, 0.9
    ratios = []
    for delta in (1e-1, 1e-2, 1e-3):
        a = delta * A
        exact = np.expm1(a) / a * delta * Bx
        ratios.append((exact - delta * Bx) / delta**2)
    assert abs(ratios[-1] - A * Bx / 2) < 1e-3 * abs(A * Bx)
    assert abs(ratios[0] - A * Bx / 2) > abs(ratios[-1] - A * Bx / 2)  # the limit is approached


@pytest.mark.derivation("MAMBA.21")
@given(cases(lengths=st.sampled_from([2, 3, 5, 8])), st.data())
def test_scan_continues_from_a_state(a, data):
    """Two scans, the second from the first's last state, give the one scan's output."""
    L = a["x"].shape[1]
    L1 = data.draw(st.integers(1, L - 1), label="L1")
    y, _ = selective_scan_forward(*args(a))
    part = {n: a[n] for n in NAMES}
    first = {n: (v[:, :L1] if n in ("x", "delta", "Bm", "C") else v) for n, v in part.items()}
    y1, c1 = selective_scan_forward(*[first[n] for n in NAMES])
    second = {n: (v[:, L1:] if n in ("x", "delta", "Bm", "C") else v) for n, v in part.items()}
    second["h0"] = c1.h[:, -1]
    y2, _ = selective_scan_forward(*[second[n] for n in NAMES])
    assert_close(np.concatenate([y1, y2], axis=1), y.astype(np.float64), what="y")


# ---- bad input ---------------------------------------------------------------------------------------------

EXACT = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + SHAPE_KINDS + ("other float",)
KINDS = {
    "x": NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS,  # x sets B, L, D: a changed shape is another's fault
    "delta": EXACT,
    "A": NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + ("first+1", "other float"),  # A sets N
    "Bm": EXACT, "C": EXACT, "D": EXACT,
    "h0": tuple(k for k in EXACT if k != "none"),
}


def bad(a, kind):
    if kind == "other float":
        return a.astype(np.float32 if a.dtype == np.float64 else np.float64)
    return corrupt(a, kind)


@pytest.mark.parametrize("func", list(SCANS.values()), ids=list(SCANS))
@pytest.mark.parametrize("arg", NAMES)
@given(data=st.data())
def test_forward_rejects_bad_arrays(func, arg, data):
    a = make(np.random.default_rng(0), 2, 3, 5, 2, data.draw(DTYPES))
    a[arg] = bad(a[arg], data.draw(st.sampled_from(KINDS[arg]), label="kind"))
    expect_rejected(lambda: func(*args(a)), func.__name__, arg)


@given(st.sampled_from(EXACT), DTYPES)
def test_backward_rejects_bad_dy(kind, dtype):
    a = make(np.random.default_rng(0), 2, 3, 5, 2, dtype)
    _, cache = selective_scan_forward(*args(a))
    expect_rejected(lambda: selective_scan_backward(bad(a["dy"], kind), cache), "selective_scan_backward", "dy")


@pytest.mark.parametrize("kind", ["tuple", "none", "other op"])
def test_backward_rejects_a_cache_it_did_not_make(kind):
    a = make(np.random.default_rng(0), 2, 3, 5, 2)
    _, cache = selective_scan_forward(*args(a))
    assert isinstance(cache, SelectiveScanCache)
    other = causal_conv1d_forward(a["x"], np.ones((5, 2)))[1]
    wrong = {"tuple": tuple(cache), "none": None, "other op": other}[kind]
    expect_rejected(lambda: selective_scan_backward(a["dy"], wrong), "selective_scan_backward", "cache")


def test_messages_name_the_expected_and_the_given_shape():
    a = make(np.random.default_rng(0), 2, 3, 5, 2)
    a["C"] = a["C"][:, :, :1]
    message = expect_rejected(lambda: selective_scan_forward(*args(a)), "selective_scan_forward", "C")
    assert "expected shape (2, 3, 2), got (2, 3, 1)" in message
