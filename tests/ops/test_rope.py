"""RoPE: torch oracle (both conventions), finite differences, the equations of proofs/rope.md."""

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer import gradcheck
from npformer.ops.rope import rope_backward, rope_cos_sin, rope_forward
from npformer.ops.rope import RopeCache
from tests.badinput import (
    ARRAY_KINDS,
    BAD_BASES,
    BAD_COUNTS,
    BAD_DTYPES,
    BAD_EVEN_DIMS,
    BAD_FLAGS,
    DTYPE_KINDS,
    NON_ARRAYS,
    SUBCLASS_KINDS,
    corrupt,
    other_float,
    rejects_all,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, assert_close

HEAD_DIMS = st.sampled_from([2, 4, 6, 8, 16])
OFFSETS = st.sampled_from([0, 1, 17, 1000])
BASES = st.sampled_from([10000.0, 500.0])


# ---------------------------------------------------------------- torch oracle


def torch_rope_half(x, pos, base):
    """Hugging Face / LLaMA style: cat(freqs, freqs) and rotate_half. x: (B,H,T,D), pos: (T,) or (B,T)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = pos.to(torch.float64)[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    cos, sin = (cos[None, None], sin[None, None]) if pos.ndim == 1 else (cos[:, None], sin[:, None])
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def torch_rope_interleaved(x, pos, base):
    """RoFormer / GPT-J style: pairs (2i, 2i+1) as complex numbers times exp(i theta)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = pos.to(torch.float64)[..., None] * inv_freq
    rot = torch.polar(torch.ones_like(freqs), freqs)
    rot = rot[None, None] if pos.ndim == 1 else rot[:, None]
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2))
    return torch.view_as_real(xc * rot).flatten(-2)


def torch_rope(x, pos, base, interleaved):
    return (torch_rope_interleaved if interleaved else torch_rope_half)(x, pos, base)


def run_both(x, dy, *, base=10000.0, offset=0, positions=None, interleaved=False, layout_of=None):
    """Ours (every array in the layout ``layout_of`` names for it) and the torch oracle."""
    lay = lambda name, a: a if a is None or layout_of is None else in_layout(a, layout_of[name])  # noqa: E731
    y, cache = rope_forward(lay("x", x), base=base, offset=offset, positions=lay("positions", positions),
                            interleaved=interleaved)
    dx = rope_backward(lay("dy", dy), cache)
    assert y.flags.c_contiguous and dx.flags.c_contiguous  # fresh arrays, whatever the inputs' layout
    pos = torch.arange(x.shape[2]) + offset if positions is None else torch.from_numpy(positions)
    tx = leaf(x)
    ty = torch_rope(tx, pos, base, interleaved)
    (tdx,) = backprop(ty, dy, tx)
    return (y, dx), (ty.detach().numpy(), tdx)


LAYOUTS_OF_INPUTS = st.fixed_dictionaries({name: layouts() for name in ("x", "dy", "positions")})


@st.composite
def rope_inputs(draw, dtypes=DTYPES):
    B, H, T = draw(SIDES), draw(st.sampled_from([1, 2, 3])), draw(SIDES)
    D, dtype, scale, rng = draw(HEAD_DIMS), draw(dtypes), draw(SCALES), draw(rngs())
    x = randn(rng, (B, H, T, D), dtype, scale)
    dy = randn(rng, (B, H, T, D), dtype)
    return x, dy, rng


def rotation_matrix(theta, interleaved):
    """The D x D matrix of (ROPE.2) for one position: theta (D/2,) angles."""
    K = theta.size
    D = 2 * K
    M = np.zeros((D, D))
    for i in range(K):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + K)
        c, s = np.cos(theta[i]), np.sin(theta[i])
        M[a, a], M[a, b], M[b, a], M[b, b] = c, -s, s, c
    return M


# ---------------------------------------------------------------- equations


@pytest.mark.derivation("ROPE.1")
@given(st.sampled_from([2, 4, 8, 64]), BASES, DTYPES, rngs())
def test_cos_sin_closed_form(D, base, dtype, rng):
    positions = rng.integers(-50, 5000, size=(3, 4))
    cos, sin = rope_cos_sin(positions, D, base, dtype)
    assert cos.shape == sin.shape == (3, 4, D // 2) and cos.dtype == sin.dtype == dtype
    i = np.arange(D // 2)
    theta = positions[..., None] * base ** (-2.0 * i / D)  # (ROPE.1)
    assert_close(cos, np.cos(theta), scale=1.0, what="cos")
    assert_close(sin, np.sin(theta), scale=1.0, what="sin")


@pytest.mark.derivation("ROPE.2")
@given(HEAD_DIMS, st.booleans(), OFFSETS, rngs())
def test_rotation_matrix_form(D, interleaved, offset, rng):
    T = 3
    x = rng.standard_normal((2, 2, T, D))
    y, _ = rope_forward(x, offset=offset, interleaved=interleaved)
    for t in range(T):
        theta = (offset + t) * 10000.0 ** (-np.arange(0, D, 2) / D)
        M = rotation_matrix(theta, interleaved)
        assert_close(y[:, :, t], x[:, :, t] @ M.T, scale=np.abs(x).max(), what=f"row at t={t}")


@pytest.mark.derivation("ROPE.3")
@given(rope_inputs(), st.booleans(), OFFSETS, BASES, LAYOUTS_OF_INPUTS)
def test_rope_matches_torch(inputs, interleaved, offset, base, layout_of):
    x, dy, _ = inputs
    (y, dx), (ty, tdx) = run_both(x, dy, base=base, offset=offset, interleaved=interleaved, layout_of=layout_of)
    assert y.dtype == dx.dtype == x.dtype
    assert_close(y, ty, scale=np.abs(x).max(), what="y")


@pytest.mark.derivation("ROPE.3")
@given(rope_inputs(), st.booleans(), rngs(), LAYOUTS_OF_INPUTS)
def test_positions_and_offset(inputs, interleaved, rng, layout_of):
    x, dy, _ = inputs
    B, H, T, D = x.shape
    # explicit (T,) positions equal to offset + arange(T) give the offset result
    y_off, _ = rope_forward(x, offset=5, interleaved=interleaved)
    y_pos, _ = rope_forward(x, positions=np.arange(5, 5 + T), interleaved=interleaved)
    np.testing.assert_array_equal(y_pos, y_off)
    # per-batch (B, T) positions, any order, vs torch; and row b equals a (T,) call with positions[b]
    positions = rng.integers(0, 4096, size=(B, T))
    (y, dx), (ty, tdx) = run_both(x, dy, positions=positions, interleaved=interleaved, layout_of=layout_of)
    assert_close(y, ty, scale=np.abs(x).max(), what="y with (B, T) positions")
    assert_close(dx, tdx, scale=np.abs(dy).max(), what="dx with (B, T) positions")
    for b in range(B):
        yb, _ = rope_forward(x[b : b + 1], positions=positions[b], interleaved=interleaved)
        np.testing.assert_array_equal(yb, y[b : b + 1])


@pytest.mark.derivation("ROPE.4")
@given(HEAD_DIMS, st.booleans(), st.integers(-100, 10000))
def test_orthogonality(D, interleaved, p):
    """The matrix of the op (its columns: the op applied to basis vectors) is orthogonal; backward is its transpose."""
    basis = np.eye(D).reshape(D, 1, 1, D)  # B = D rows, one per basis vector, all at position p
    y, cache = rope_forward(basis, positions=np.array([p]), interleaved=interleaved)
    M = y.reshape(D, D).T  # column j = R e_j
    assert_close(M.T @ M, np.eye(D), scale=1.0, what="R^T R")
    back = rope_backward(basis, cache).reshape(D, D).T
    assert_close(back, M.T, scale=1.0, what="backward matrix")


@pytest.mark.derivation("ROPE.4")
def test_orthogonality_symbolic():
    th = sp.Symbol("theta", real=True)
    R = lambda a: sp.Matrix([[sp.cos(a), -sp.sin(a)], [sp.sin(a), sp.cos(a)]])  # noqa: E731
    assert sp.simplify(R(th).T * R(th) - sp.eye(2)) == sp.zeros(2, 2)
    assert sp.simplify(R(th).T - R(-th)) == sp.zeros(2, 2)


@pytest.mark.derivation("ROPE.5")
@given(rope_inputs(), st.booleans(), OFFSETS, LAYOUTS_OF_INPUTS)
def test_backward_matches_torch(inputs, interleaved, offset, layout_of):
    x, dy, _ = inputs
    (y, dx), (ty, tdx) = run_both(x, dy, offset=offset, interleaved=interleaved, layout_of=layout_of)
    assert dx.dtype == x.dtype
    assert_close(dx, tdx, scale=np.abs(dy).max(), what="dx")


@pytest.mark.derivation("ROPE.5")
@given(rope_inputs(), st.booleans(), OFFSETS)
def test_backward_inverts_forward(inputs, interleaved, offset):
    x, _, _ = inputs
    y, cache = rope_forward(x, offset=offset, interleaved=interleaved)
    assert_close(rope_backward(y, cache), x, scale=np.abs(x).max(), what="R^T R x")


@pytest.mark.derivation("ROPE.5")
@given(st.sampled_from([2, 4, 6]), st.booleans(), OFFSETS, rngs())
def test_finite_differences(D, interleaved, offset, rng):
    x = rng.standard_normal((2, 2, 3, D))
    results = gradcheck.check(rope_forward, rope_backward, {"x": x}, wrt=("x",),
                              options={"offset": offset, "interleaved": interleaved})
    assert [r.input for r in results] == ["x"]
    assert results[0].max_rel < FD_RTOL, gradcheck.format_table(results)


def _symbolic_rope(vec, p, omegas, interleaved):
    """(ROPE.3) with symbolic position p and frequencies omegas."""
    K = len(omegas)
    out = list(vec)
    for i, w in enumerate(omegas):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + K)
        c, s = sp.cos(p * w), sp.sin(p * w)
        out[a], out[b] = vec[a] * c - vec[b] * s, vec[b] * c + vec[a] * s
    return out


@pytest.mark.derivation("ROPE.6")
@pytest.mark.parametrize("D, interleaved", [(2, False), (4, False), (4, True)])
def test_relative_position_symbolic(D, interleaved):
    m, n = sp.symbols("m n", integer=True)
    omegas = sp.symbols(f"omega0:{D // 2}", positive=True)
    q = sp.symbols(f"q0:{D}", real=True)
    k = sp.symbols(f"k0:{D}", real=True)
    lhs = sum(a * b for a, b in zip(_symbolic_rope(q, m, omegas, interleaved), _symbolic_rope(k, n, omegas, interleaved)))
    rhs = sum(a * b for a, b in zip(q, _symbolic_rope(k, n - m, omegas, interleaved)))
    assert sp.simplify(sp.expand_trig(lhs - rhs)) == 0


@pytest.mark.derivation("ROPE.6")
@given(HEAD_DIMS, st.booleans(), st.integers(0, 5000), st.integers(0, 5000), rngs())
def test_relative_position_numeric(D, interleaved, m, n, rng):
    q, k = rng.standard_normal((2, 1, 1, 1, D))
    qm, _ = rope_forward(q, positions=np.array([m]), interleaved=interleaved)
    kn, _ = rope_forward(k, positions=np.array([n]), interleaved=interleaved)
    k_rel, _ = rope_forward(k, positions=np.array([n - m]), interleaved=interleaved)
    scale = float(np.abs(q).sum() * np.abs(k).max())
    assert_close(np.sum(qm * kn), np.sum(q * k_rel), scale=scale, what="<R_m q, R_n k> vs <q, R_(n-m) k>")


@pytest.mark.derivation("ROPE.7")
@given(rope_inputs(), OFFSETS)
def test_conventions_differ_by_permutation(inputs, offset):
    x, dy, _ = inputs
    D = x.shape[-1]
    perm = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])  # (P x)_j = x[perm[j]]
    y_int, _ = rope_forward(x, offset=offset, interleaved=True)
    y_half_of_px, _ = rope_forward(np.ascontiguousarray(x[..., perm]), offset=offset)
    back = np.empty_like(y_half_of_px)
    back[..., perm] = y_half_of_px  # P^T
    assert_close(back, y_int, scale=np.abs(x).max(), what="P^T rope_half(P x)")


# ---------------------------------------------------------------- bad input

NOT_POSITIONS = tuple(k for k in NON_ARRAYS if k != "none") + SUBCLASS_KINDS + (
    "bool", "float16", "float32", "float64", "complex128", "object", "rank+1", "rank-1", "last+1", "first+1")


@st.composite
def valid_calls(draw):
    """x (B >= 2 so that (B, T) positions differ from (T,) ones), dy, (B, T) positions."""
    B, H, T, D = draw(st.sampled_from([2, 3])), draw(st.sampled_from([1, 2])), draw(SIDES), draw(HEAD_DIMS)
    dtype, rng = draw(DTYPES), draw(rngs())
    return randn(rng, (B, H, T, D), dtype), randn(rng, (B, H, T, D), dtype), rng.integers(-5, 100, size=(B, T))


@given(valid_calls())
def test_forward_rejects_bad_x(call):
    x, _, _ = call
    # a larger batch is a valid x; last+1: an odd D
    kinds = tuple(k for k in ARRAY_KINDS if k != "first+1") + SUBCLASS_KINDS
    rejects_all(lambda bad: rope_forward(bad), "rope_forward", "x", [corrupt(x, kind) for kind in kinds])


@given(valid_calls())
def test_forward_rejects_bad_positions(call):
    x, _, positions = call
    rejects_all(lambda bad: rope_forward(x, positions=bad), "rope_forward", "positions",
                [corrupt(positions, kind) for kind in NOT_POSITIONS])


@pytest.mark.parametrize("name, bad_values", [("offset", BAD_COUNTS), ("base", BAD_BASES),
                                              ("interleaved", BAD_FLAGS)])
@given(valid_calls())
def test_forward_rejects_bad_options(name, bad_values, call):
    x, _, positions = call
    rejects_all(lambda bad: rope_forward(x, **{name: bad}), "rope_forward", name, bad_values)
    if name == "offset":  # positions and an offset together: one or the other
        rejects_all(lambda bad: rope_forward(x, positions=positions, offset=bad), "rope_forward", "offset", [1, 7])


@pytest.mark.parametrize("name", ["dy", "cache"])
@given(valid_calls())
def test_backward_rejects_bad_input(name, call):
    x, dy, _ = call
    _, cache = rope_forward(x, offset=3)
    if name == "dy":
        bad_values = [corrupt(dy, kind) for kind in ARRAY_KINDS + SUBCLASS_KINDS + (other_float(dy.dtype),)]
        rejects_all(lambda bad: rope_backward(bad, cache), "rope_backward", "dy", bad_values)
    else:
        bad_values = [None, tuple(cache), list(cache), cache._asdict(), dy]
        rejects_all(lambda bad: rope_backward(dy, bad), "rope_backward", "cache", bad_values)
    assert isinstance(cache, RopeCache)


@pytest.mark.parametrize("name, bad_values", [("D", BAD_EVEN_DIMS), ("base", BAD_BASES), ("dtype", BAD_DTYPES)])
@given(valid_calls())
def test_cos_sin_rejects_bad_options(name, bad_values, call):
    _, _, positions = call
    arguments = {"D": 4, "base": 10000.0, "dtype": np.float32}
    rejects_all(lambda bad: rope_cos_sin(positions, **{**arguments, name: bad}), "rope_cos_sin", name, bad_values)
    integer_kinds = ("int64", "int32", "uint8")
    not_integers = [corrupt(positions, kind) for kind in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS
                    if kind not in integer_kinds]
    rejects_all(lambda bad: rope_cos_sin(bad, **arguments), "rope_cos_sin", "positions", not_integers)


def test_float32_stays_float32():
    x = np.ones((1, 1, 2, 4), np.float32)
    y, cache = rope_forward(x, offset=3)
    assert y.dtype == cache.cos.dtype == rope_backward(y, cache).dtype == np.float32
