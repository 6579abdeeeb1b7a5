"""GroupNorm: torch's group_norm in every memory layout, finite differences, the equations of
proofs/groupnorm.md evaluated independently, one group against LayerNorm, one channel per group,
float32 rows far from zero, the layer, empty input, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.nn.layers import GroupNorm, LayerNorm
from npformer.ops.groupnorm import GroupNormCache, groupnorm_backward, groupnorm_forward
from npformer.ops.layernorm import layernorm_backward, layernorm_forward
from tests.badinput import BAD_COUNTS, EXACT_KINDS, ROW_KINDS, corrupt, expect_rejected
from tests.ops.huge_rows import exact_dx
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, NORM_ULPS, RTOL, assert_close

EPS = 1e-5
INPUTS = ("x", "gamma", "beta", "dy")


@st.composite
def cases(draw, max_dims=3):
    """(x, gamma, beta, dy, G): C = G * C_g with odd sizes and 1s, leading dims (B, T) or fewer or more."""
    G, Cg = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3, 5]))
    lead = draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=max_dims - 1))
    dtype, scale, rng = draw(DTYPES), draw(SCALES), draw(rngs())
    shape = (*lead, G * Cg)
    x = randn(rng, shape, dtype, scale) + dtype(scale * rng.standard_normal())  # an offset too
    return x, randn(rng, (G * Cg,), dtype), randn(rng, (G * Cg,), dtype), randn(rng, shape, dtype), G


def reference(x, gamma, beta, dy, G, eps=EPS):
    """(GN.1)-(GN.10) written out in float64 from the proof, independently of the op."""
    x, gamma, beta, dy = (np.asarray(a, np.float64) for a in (x, gamma, beta, dy))
    C = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], G, C // G)  # (GN.1)
    mu = xg.mean(-1, keepdims=True)  # (GN.2)
    var = ((xg - mu) ** 2).mean(-1, keepdims=True)  # (GN.3)
    r = 1.0 / np.sqrt(var + eps)  # (GN.4)
    xhat = ((xg - mu) * r).reshape(x.shape)  # (GN.5)
    y = gamma * xhat + beta  # (GN.6)
    rows = tuple(range(x.ndim - 1))
    dbeta = dy.sum(rows)  # (GN.7)
    dgamma = (dy * xhat).sum(rows)  # (GN.8)
    g = (dy * gamma).reshape(xg.shape)  # (GN.9)
    xh = xhat.reshape(xg.shape)
    dx = r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))  # (GN.10)
    return {"y": y, "dx": dx.reshape(x.shape), "dgamma": dgamma, "dbeta": dbeta, "xhat": xhat, "r": r}


def torch_group_norm(x, gamma, beta, dy, G):
    """torch.nn.functional.group_norm on the rows as samples of C channels (float64), and its gradients.

    torch refuses a single sample in training mode, so the rows are doubled: the copy gets dy = 0,
    which adds nothing to any gradient.
    """
    C = x.shape[-1]
    x2 = np.concatenate([x.reshape(-1, C), x.reshape(-1, C)]).astype(np.float64)
    dy2 = np.concatenate([dy.reshape(-1, C), np.zeros_like(dy.reshape(-1, C))]).astype(np.float64)
    tx, tg, tb = leaf(x2), leaf(gamma), leaf(beta)
    ty = torch.nn.functional.group_norm(tx, G, tg, tb, EPS)
    dx, dg, db = backprop(ty, dy2, tx, tg, tb)
    n = x2.shape[0] // 2
    return ty.detach().numpy()[:n].reshape(x.shape), dx[:n].reshape(x.shape), dg, db


def scales(x, gamma, beta, dy, G):
    """Sizes of the terms each result is summed from: the absolute floor of its comparison."""
    r = reference(x, gamma, beta, dy, G)["r"]
    dy_abs = np.abs(dy.astype(np.float64))
    n = max(dy_abs.size // x.shape[-1], 1)
    return {"y": float(np.abs(gamma).max() * 3 + np.abs(beta).max()),
            "dx": float(dy_abs.max() * np.abs(gamma).max() * r.max() * 3),
            "dgamma": float(dy_abs.max() * n * 3), "dbeta": float(dy_abs.max() * n)}


@pytest.mark.derivation("GN.6")
@pytest.mark.derivation("GN.10")
@given(case=cases(), layout=st.fixed_dictionaries({k: layouts() for k in INPUTS}))
def test_groupnorm_matches_torch(case, layout):
    """Forward and all three gradients against torch's group_norm, every input in any memory layout."""
    x, gamma, beta, dy, G = case
    args = {name: in_layout(a, layout[name]) for name, a in zip(INPUTS, (x, gamma, beta, dy))}
    saved = {name: a.copy() for name, a in args.items()}
    y, cache = groupnorm_forward(args["x"], args["gamma"], args["beta"], G, EPS)
    dx, dgamma, dbeta = groupnorm_backward(args["dy"], cache)
    for name, a in args.items():
        np.testing.assert_array_equal(a, saved[name], err_msg=f"{name} was written to")
    ty, tdx, tdg, tdb = torch_group_norm(x, gamma, beta, dy, G)
    for out in (y, dx, dgamma, dbeta):
        assert out.dtype == x.dtype
    rtol = RTOL[x.dtype] * (10 if x.dtype == np.float64 else 1)
    s = scales(x, gamma, beta, dy, G)
    for name, ours, theirs in (("y", y, ty), ("dgamma", dgamma, tdg), ("dbeta", dbeta, tdb), ("dx", dx, tdx)):
        assert_close(ours, theirs, rtol=rtol, scale=s[name], what=name)


@pytest.mark.derivation("GN.1")
@pytest.mark.derivation("GN.2")
@pytest.mark.derivation("GN.3")
@pytest.mark.derivation("GN.4")
@pytest.mark.derivation("GN.5")
@pytest.mark.derivation("GN.6")
@given(case=cases())
def test_groupnorm_is_its_formula(case):
    """y, the cached xhat and r equal (GN.1)-(GN.6) evaluated in float64, in float32 and float64."""
    x, gamma, beta, dy, G = case
    y, cache = groupnorm_forward(x, gamma, beta, G, EPS)
    ref = reference(x, gamma, beta, dy, G)
    rtol = RTOL[x.dtype]
    assert cache.xhat.shape == x.shape[:-1] + (G, x.shape[-1] // G) and cache.rstd.shape == x.shape[:-1] + (G, 1)
    assert_close(cache.rstd, ref["r"], rtol=rtol * 10, what="r")
    # xhat is about |x - mu| r: its error is relative to the group's spread, at most a few units of rounding
    assert_close(cache.xhat.reshape(x.shape), ref["xhat"], rtol=rtol * 10, scale=max(1.0, np.abs(ref["xhat"]).max()),
                 what="xhat")
    assert_close(y, ref["y"], rtol=rtol * 10, scale=float(np.abs(gamma).max() * max(1.0, np.abs(ref["xhat"]).max())
                                                          + np.abs(beta).max()), what="y")


@pytest.mark.derivation("GN.7")
@pytest.mark.derivation("GN.8")
@pytest.mark.derivation("GN.9")
@pytest.mark.derivation("GN.10")
@given(case=cases())
def test_groupnorm_gradients_are_their_formulas(case):
    """dbeta (GN.7), dgamma (GN.8) and dx (GN.9), (GN.10) against the float64 formulas; each group of dx sums to 0."""
    x, gamma, beta, dy, G = case
    x, gamma, beta, dy = (a.astype(np.float64) for a in (x, gamma, beta, dy))
    _, cache = groupnorm_forward(x, gamma, beta, G, EPS)
    dx, dgamma, dbeta = groupnorm_backward(dy, cache)
    ref = reference(x, gamma, beta, dy, G)
    n = max(dy.size // x.shape[-1], 1)
    s = float(np.abs(dy).max() * np.abs(gamma).max() * ref["r"].max()) * 3
    assert_close(dbeta, ref["dbeta"], rtol=1e-12, scale=float(np.abs(dy).max() * n), what="dbeta")
    assert_close(dgamma, ref["dgamma"], rtol=1e-9, scale=float(np.abs(dy).max() * n * 3), what="dgamma")
    assert_close(dx, ref["dx"], rtol=1e-9, scale=s, what="dx")
    group_sums = dx.reshape(*x.shape[:-1], G, -1).sum(-1)
    assert np.abs(group_sums).max() <= 1e-9 * s * x.shape[-1]


def exact_dx_by_group(dy, gamma, xhat, r):
    """(GN.9) and (GN.10) on the op's own cache (xhat, r grouped (..., G, C_g)): each group as a row of
    (LN.8) and (LN.10) with its own gamma, in exact arithmetic."""
    G, Cg = xhat.shape[-2:]
    dy, gamma = dy.reshape(xhat.shape), gamma.reshape(G, Cg)
    return np.stack([exact_dx(dy[..., g, :], gamma[g], xhat[..., g, :], r[..., g, :]) for g in range(G)], axis=-2)


@pytest.mark.derivation("GN.10")
@given(G=st.sampled_from([1, 2, 3, 4]), Cg=st.sampled_from([1, 2, 3, 5, 64, 257]), rows=st.sampled_from([1, 2, 3]),
       dtype=DTYPES, scale=SCALES, rng=rngs())
def test_groupnorm_dx_to_a_few_rounding_units(G, Cg, rows, dtype, scale, rng):
    """dx from the op's own cache against (GN.10) in exact arithmetic, each group judged by its own
    r_g max|dxhat| (the size of the terms that cancel): a few units of the dtype's rounding, where the
    comparisons above allow 1e-4 (float32) and 1e-9 (float64) of that size."""
    shape = (rows, G * Cg)
    x = randn(rng, shape, dtype, scale) + dtype(scale * rng.standard_normal())  # an offset too
    gamma, beta, dy = randn(rng, (G * Cg,), dtype), randn(rng, (G * Cg,), dtype), randn(rng, shape, dtype)
    _, cache = groupnorm_forward(x, gamma, beta, G, EPS)
    dx, _, _ = groupnorm_backward(dy, cache)
    expected = exact_dx_by_group(dy, gamma, cache.xhat, cache.rstd).reshape(shape)
    rtol = NORM_ULPS * float(np.finfo(dtype).eps)
    dxhat = np.abs(dy.astype(np.float64) * gamma).reshape(cache.xhat.shape)
    group_scale = cache.rstd[..., 0].astype(np.float64) * dxhat.max(-1)  # (rows, G)
    assert dx.dtype == dtype
    for i in np.ndindex(rows, G):
        assert_close(dx[i[0], i[1] * Cg:(i[1] + 1) * Cg], expected[i[0], i[1] * Cg:(i[1] + 1) * Cg], rtol=rtol,
                     scale=float(group_scale[i]), what=f"dx, row {i[0]}, group {i[1]}")


@pytest.mark.derivation("GN.10")
@given(G=st.sampled_from([1, 2, 3]), rng=rngs())
def test_groupnorm_finite_differences(G, rng):
    """Central differences in float64, independent of torch, for x, gamma and beta (C_g >= 3: with fewer
    channels a normalised group is constant up to eps and its gradient is round-off)."""
    C = 3 * G if G > 1 else 4
    inputs = {"x": rng.standard_normal((2, 3, C)), "gamma": rng.standard_normal(C), "beta": rng.standard_normal(C)}
    results = gradcheck.check(groupnorm_forward, groupnorm_backward, inputs, wrt=("x", "gamma", "beta"),
                              options={"num_groups": G, "eps": EPS})
    assert [r.input for r in results] == ["x", "gamma", "beta"]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


@pytest.mark.derivation("GN.11")
@given(case=cases(), layer=st.booleans())
def test_one_group_is_layernorm(case, layer):
    """G = 1: the output and all three gradients equal LayerNorm's, op and layer alike."""
    x, gamma, beta, dy, _ = case
    if layer:
        gn, ln = GroupNorm(x.shape[-1], 1, dtype=x.dtype), LayerNorm(x.shape[-1], dtype=x.dtype)
        for m in (gn, ln):
            m.weight.data[...], m.bias.data[...] = gamma, beta
        y, y_ln = gn.forward(x), ln.forward(x)
        grads = (gn.backward(dy), gn.weight.grad, gn.bias.grad)
        grads_ln = (ln.backward(dy), ln.weight.grad, ln.bias.grad)
    else:
        y, cache = groupnorm_forward(x, gamma, beta, 1, EPS)
        y_ln, cache_ln = layernorm_forward(x, gamma, beta, EPS)
        grads, grads_ln = groupnorm_backward(dy, cache), layernorm_backward(dy, cache_ln)
    np.testing.assert_array_equal(y, y_ln)  # the same statistics, computed by the same code
    for name, a, b in zip(("dx", "dgamma", "dbeta"), grads, grads_ln):
        assert a.dtype == b.dtype == x.dtype
        assert_close(a, b, rtol=RTOL[x.dtype], scale=float(np.abs(b).max()) + 1e-30, what=name)


@pytest.mark.derivation("GN.12")
@given(case=cases())
def test_one_channel_per_group_gives_beta(case):
    """G = C: every output is its channel's beta, and dx and dgamma are zero."""
    x, gamma, beta, dy, _ = case
    C = x.shape[-1]
    y, cache = groupnorm_forward(x, gamma, beta, C, EPS)
    dx, dgamma, dbeta = groupnorm_backward(dy, cache)
    np.testing.assert_array_equal(y, np.broadcast_to(beta, x.shape))
    assert not dx.any() and not dgamma.any()
    assert_close(dbeta, dy.sum(tuple(range(dy.ndim - 1))), what="dbeta")


def test_float32_groups_far_from_zero_keep_their_spread():
    """A float32 group at 10000 with a spread of 0.01 normalises as in float64 (centring, LN.12, carries over)."""
    rng = np.random.default_rng(0)
    x64 = 10000.0 + 0.01 * rng.standard_normal((3, 12))
    x = x64.astype(np.float32)
    ones, zeros = np.ones(12, np.float32), np.zeros(12, np.float32)
    y, _ = groupnorm_forward(x, ones, zeros, 3, eps=0.0)
    ref = reference(x.astype(np.float64), ones, zeros, np.zeros_like(x), 3, eps=0.0)["y"]
    assert_close(y, ref, rtol=1e-3, what="y")
    assert np.allclose(y.reshape(3, 3, 4).std(-1), 1.0, atol=1e-3)


@given(G=st.sampled_from([1, 2]), lead=st.sampled_from([(0,), (0, 3), (2, 0)]), dtype=DTYPES)
def test_empty_rows(G, lead, dtype):
    x = np.zeros((*lead, 4), dtype)
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    y, cache = groupnorm_forward(x, gamma, beta, G)
    dx, dgamma, dbeta = groupnorm_backward(np.zeros_like(x), cache)
    assert y.shape == dx.shape == x.shape and y.dtype == dx.dtype == dtype
    assert not dgamma.any() and not dbeta.any() and dgamma.shape == (4,)


@given(G=st.sampled_from([1, 2, 4]), bias=st.booleans(), dtype=DTYPES, rng=rngs())
def test_layer_shares_its_parameters_and_accumulates(G, bias, dtype, rng):
    """The layer twice before one backward: gradients add up (LIFO caches); without a bias the shift is 0."""
    layer = GroupNorm(8, G, bias=bias, dtype=dtype)
    layer.weight.data[...] = randn(rng, (8,), dtype)
    x1, x2, d1, d2 = (randn(rng, (2, 3, 8), dtype) for _ in range(4))
    y1, y2 = layer.forward(x1), layer.forward(x2)
    assert y2.shape == x2.shape and y2.dtype == dtype
    beta = layer.bias.data if bias else np.zeros(8, dtype)
    assert_close(y1, groupnorm_forward(x1, layer.weight.data, beta, G)[0], what="y1")
    dx2, dx1 = layer.backward(d2), layer.backward(d1)
    _, c1 = groupnorm_forward(x1, layer.weight.data, beta, G)
    _, c2 = groupnorm_forward(x2, layer.weight.data, beta, G)
    (e1, g1, b1), (e2, g2, b2) = groupnorm_backward(d1, c1), groupnorm_backward(d2, c2)
    assert_close(dx1, e1, what="dx1")
    assert_close(dx2, e2, what="dx2")
    assert_close(layer.weight.grad, g1 + g2, what="dweight")
    assert (layer.bias is None) == (not bias)
    if bias:
        assert_close(layer.bias.grad, b1 + b2, what="dbias")
    with pytest.raises(RuntimeError):
        layer.backward(d1)


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["x", "gamma", "beta"])
@given(data=st.data(), case=cases())
def test_forward_rejects_bad_arrays(arg, data, case):
    x, gamma, beta, _, G = case
    inputs = {"x": x, "gamma": gamma, "beta": beta}
    kinds = ROW_KINDS if arg == "x" else EXACT_KINDS
    kind = data.draw(st.sampled_from(kinds))
    inputs[arg] = corrupt(inputs[arg], kind) if kind != "other float" else inputs[arg].astype(
        np.float32 if x.dtype == np.float64 else np.float64)
    if arg == "x" and kind in ("last+1",):
        return
    expect_rejected(lambda: groupnorm_forward(inputs["x"], inputs["gamma"], inputs["beta"], G),
                    "groupnorm_forward", arg)


@given(bad=st.sampled_from(BAD_COUNTS + (0, 5, 7)))
def test_forward_rejects_bad_num_groups(bad):
    """num_groups: an integer >= 1 dividing C = 6 (5 and 7 do not)."""
    x, p = np.ones((2, 6)), np.ones(6)
    message = expect_rejected(lambda: groupnorm_forward(x, p, p, bad), "groupnorm_forward", "num_groups")
    assert "expected" in message and "got" in message
    expect_rejected(lambda: GroupNorm(6, bad), "GroupNorm", "num_groups")


@pytest.mark.parametrize("bad", [-1e-5, float("nan"), float("inf"), "1e-5", None, True])
def test_forward_rejects_bad_eps(bad):
    x, p = np.ones((2, 6)), np.ones(6)
    expect_rejected(lambda: groupnorm_forward(x, p, p, 2, bad), "groupnorm_forward", "eps")


@given(kind=st.sampled_from(EXACT_KINDS), case=cases())
def test_backward_rejects_bad_dy_and_cache(kind, case):
    x, gamma, beta, dy, G = case
    _, cache = groupnorm_forward(x, gamma, beta, G)
    bad_dy = corrupt(dy, kind) if kind != "other float" else dy.astype(
        np.float32 if dy.dtype == np.float64 else np.float64)
    expect_rejected(lambda: groupnorm_backward(bad_dy, cache), "groupnorm_backward", "dy")
    for wrong in (tuple(cache), None, layernorm_forward(x, gamma, beta)[1]):
        expect_rejected(lambda: groupnorm_backward(dy, wrong), "groupnorm_backward", "cache")
    assert isinstance(cache, GroupNormCache)


def test_messages_say_what_was_expected_and_what_came():
    x, p = np.ones((2, 6)), np.ones(6)
    assert ("groupnorm_forward: argument 'num_groups' expected a divisor of the channel count C = 6, got 4"
            in expect_rejected(lambda: groupnorm_forward(x, p, p, 4), "groupnorm_forward", "num_groups"))
    assert ("groupnorm_forward: argument 'gamma' expected shape (6,), got (5,)"
            in expect_rejected(lambda: groupnorm_forward(x, np.ones(5), p, 2), "groupnorm_forward", "gamma"))
    layer = GroupNorm(6, 3, dtype=np.float64)
    expect_rejected(lambda: layer.forward(np.ones((2, 5))), "GroupNorm.forward", "x")
    expect_rejected(lambda: GroupNorm(6, 3, bias=1), "GroupNorm", "bias")
