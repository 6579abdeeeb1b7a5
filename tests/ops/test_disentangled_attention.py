"""DeBERTa-v2 disentangled attention (proofs/disentangled_attention.md): buckets and index tables
against Hugging Face's, forward and gradients against a torch.gather reference and against Hugging
Face's DisentangledSelfAttention, the backward's equations evaluated one by one, finite differences
and bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DebertaV2Config
from transformers.models.deberta_v2.modeling_deberta_v2 import (
    DisentangledSelfAttention,
    build_relative_position,
    make_log_bucket_position,
)

from npformer import gradcheck
from npformer.ops.disentangled_attention import (
    _scatter_add,
    deberta_log_bucket,
    deberta_relative_indices,
    disentangled_attention_backward,
    disentangled_attention_forward,
    pairwise_attention_mask,
)
from tests.badinput import (
    BAD_COUNTS,
    BAD_SCALES,
    DTYPE_KINDS,
    EXACT_KINDS,
    NON_ARRAYS,
    NOT_A_MASK,
    RANK_KINDS,
    SHAPE_KINDS,
    SUBCLASS_KINDS,
    corrupt,
    other_float,
    rejects_all,
)
from tests.oracle import backprop, leaf
from tests.strategies import DTYPES, in_layout, layouts, randn, rngs
from tests.tolerances import FD_RTOL, RTOL, assert_close

# (bucket_size N, max_position M) with M >= N, as every DeBERTa-v2/v3 configuration has (256, 512).
# Over these, and distances up to 4 M, the buckets equal the reference's one for one; elsewhere the two
# float32 logarithms can differ in the last bit (see the proof, "Float32").
BUCKET_CONFIGS = [(4, 4), (4, 16), (6, 12), (8, 8), (8, 32), (16, 64), (32, 32), (64, 128), (128, 512), (256, 512),
                  (256, 1024), (512, 512)]
TERM_SETS = [("c2p", "p2c"), ("p2c", "c2p"), ("c2p",), ("p2c",), ()]


def hf_bucket(r, N, M):
    return make_log_bucket_position(torch.from_numpy(np.asarray(r, np.int64)), N, M).to(torch.long).numpy()


# -- relative positions: (DA.1)-(DA.3) ------------------------------------------------------------


@pytest.mark.derivation("DA.1")
@given(st.sampled_from(BUCKET_CONFIGS), rngs(), st.sampled_from([np.int64, np.int32, np.int16]), layouts())
def test_bucket_matches_reference(config, rng, dtype, layout):
    N, M = config
    near = np.arange(-N - 2, N + 3)
    far = rng.integers(-4 * M, 4 * M + 1, size=2000)
    r = np.concatenate([near, far, [M - 1, M, 1 - M, -M, 4 * M, -4 * M]]).astype(dtype)
    ours = deberta_log_bucket(in_layout(r, layout), N, M)
    assert ours.dtype == np.int64 and ours.shape == r.shape
    np.testing.assert_array_equal(ours, hf_bucket(r, N, M))


@pytest.mark.derivation("DA.1")
def test_bucket_matches_reference_exhaustively():
    """Every distance up to 2**16 in DeBERTa-v3's configuration (256 buckets, 512 positions)."""
    r = np.arange(-(2**16), 2**16 + 1)
    np.testing.assert_array_equal(deberta_log_bucket(r, 256, 512), hf_bucket(r, 256, 512))


@pytest.mark.derivation("DA.1")
@given(st.sampled_from(BUCKET_CONFIGS))
def test_bucket_properties(config):
    """Exact for |r| <= mid, odd, non-decreasing in r, mid + (mid - 1) = 2 mid - 1 at |r| = M - 1 (the
    log ratio is 1 there): |bucket| <= 2 mid - 1 for |r| < M, and beyond it from there on."""
    N, M = config
    mid = N // 2
    r = np.arange(-3 * M, 3 * M + 1)
    bucket = deberta_log_bucket(r, N, M)
    small = np.abs(r) <= mid
    np.testing.assert_array_equal(bucket[small], r[small])
    np.testing.assert_array_equal(bucket, -bucket[::-1])  # odd: r and -r are mirror images
    assert np.all(np.diff(bucket) >= 0)
    assert deberta_log_bucket(np.array([M - 1]), N, M)[0] == 2 * mid - 1
    inside = np.abs(r) <= M - 1
    assert np.all(np.abs(bucket[inside]) <= 2 * mid - 1) and np.all(np.abs(bucket[~inside]) >= 2 * mid - 1)
    assert np.all(np.abs(bucket[np.abs(r) > mid]) > mid)  # ceil of a positive logarithm: at least mid + 1


@pytest.mark.derivation("DA.2")
@pytest.mark.derivation("DA.3")
@given(st.sampled_from(BUCKET_CONFIGS + [(None, 3), (None, 7), (None, 64)]), st.sampled_from([1, 2, 5, 9, 40]))
def test_indices_match_reference(config, T):
    """The c2p table is the reference's clamp(relative_pos + S); the p2c table is the transpose of its
    clamp(-relative_pos + S); for DeBERTa's odd bucket function the two tables coincide."""
    N, M = config
    c2p, p2c = deberta_relative_indices(T, T, position_buckets=N, max_relative_positions=M)
    span = M if N is None else N
    x = torch.zeros(1, T, 1)
    rel = build_relative_position(x, x, bucket_size=-1 if N is None else N, max_position=M)[0]  # (T, T)
    np.testing.assert_array_equal(c2p, torch.clamp(rel + span, 0, 2 * span - 1).numpy())
    np.testing.assert_array_equal(p2c, torch.clamp(-rel + span, 0, 2 * span - 1).numpy().T)
    np.testing.assert_array_equal(p2c, c2p)
    assert c2p.dtype == np.int64 and c2p.min() >= 0 and c2p.max() < 2 * span


@pytest.mark.derivation("DA.2")
@given(st.sampled_from([0, 1, 3, 6]), st.sampled_from([1, 4, 7]))
def test_indices_of_unequal_lengths_are_a_slice(Tq, Tk):
    """Queries 0..Tq-1 against keys 0..Tk-1 are the top-left block of the tables of max(Tq, Tk) tokens."""
    T = max(Tq, Tk)
    c2p, p2c = deberta_relative_indices(Tq, Tk, position_buckets=4, max_relative_positions=8)
    full_c2p, full_p2c = deberta_relative_indices(T, T, position_buckets=4, max_relative_positions=8)
    np.testing.assert_array_equal(c2p, full_c2p[:Tq, :Tk])
    np.testing.assert_array_equal(p2c, full_p2c[:Tq, :Tk])


# -- forward and gradients against a torch.gather reference ---------------------------------------


def torch_scores(qc, kc, qr, kr, alpha, beta, terms):
    """A = q_c k_c^T + gathered c2p + gathered p2c, the p2c product gathered per key and transposed."""
    B, H, Tq, _ = qc.shape
    Tk = kc.shape[2]
    a = qc @ kc.transpose(-1, -2)
    if "c2p" in terms:
        c2p_all = qc @ kr.transpose(-1, -2)  # (B, H, Tq, R)
        a = a + torch.gather(c2p_all, -1, torch.from_numpy(alpha).expand(B, H, Tq, Tk))
    if "p2c" in terms:
        p2c_all = kc @ qr.transpose(-1, -2)  # (B, H, Tk, R)
        index = torch.from_numpy(np.ascontiguousarray(beta.T)).expand(B, H, Tk, Tq)
        a = a + torch.gather(p2c_all, -1, index).transpose(-1, -2)
    return a


def torch_attention_from_scores(a, v, mask, scale):
    s = a * scale
    if mask is not None:
        s = s.masked_fill(~torch.from_numpy(np.array(mask)), torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


def torch_reference(qc, kc, v, qr, kr, alpha, beta, mask, terms, scale):
    return torch_attention_from_scores(torch_scores(qc, kc, qr, kr, alpha, beta, terms), v, mask, scale)


@st.composite
def cases(draw, dtypes=DTYPES):
    """Inputs in drawn layouts, index tables (DeBERTa's or arbitrary), a mask (with fully hidden rows at
    times), the position terms and an upstream gradient."""
    rng, dtype = draw(rngs()), draw(dtypes)
    B, H = draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    Tq, D = draw(st.sampled_from([1, 2, 5, 7])), draw(st.sampled_from([1, 2, 5]))
    Tk = Tq if draw(st.booleans()) else draw(st.sampled_from([1, 3, 6]))  # self-attention's square tables too
    terms = draw(st.sampled_from(TERM_SETS))
    magnitude = draw(st.sampled_from([0.3, 1.0, 3.0] if dtype == np.float64 else [0.3, 1.0]))
    if draw(st.booleans()):
        span = draw(st.sampled_from([2, 4, 8]))
        c2p, p2c = deberta_relative_indices(Tq, Tk, position_buckets=span, max_relative_positions=2 * span)
        R = 2 * span
    else:  # any tables: repeated rows, rows never read, c2p and p2c different
        R = draw(st.sampled_from([1, 3, 6]))
        c2p, p2c = rng.integers(0, R, size=(Tq, Tk)), rng.integers(0, R, size=(Tq, Tk)).astype(np.int32)
    mask_kind = draw(st.sampled_from(["none", "pairwise", "random", "broadcast"]))
    if mask_kind == "pairwise" and Tq == Tk:
        mask = pairwise_attention_mask(rng.random((B, Tq)) < 0.7)
    elif mask_kind in ("random", "pairwise"):
        mask = rng.random((B, H, Tq, Tk)) < 0.6
    elif mask_kind == "broadcast":
        mask = rng.random((1, 1, Tq, Tk)) < 0.6
    else:
        mask = None
    lay = draw(layouts())
    arrays = {
        "q_c": randn(rng, (B, H, Tq, D), dtype, magnitude), "k_c": randn(rng, (B, H, Tk, D), dtype, magnitude),
        "v": randn(rng, (B, H, Tk, D), dtype), "q_r": randn(rng, (H, R, D), dtype, magnitude),
        "k_r": randn(rng, (H, R, D), dtype, magnitude)}
    arrays = {k: in_layout(x, lay) for k, x in arrays.items()}
    dout = in_layout(randn(rng, (B, H, Tq, D), dtype), draw(layouts()))
    kwargs = dict(q_c=arrays["q_c"], k_c=arrays["k_c"], v=arrays["v"],
                  q_r=arrays["q_r"] if "p2c" in terms else None, k_r=arrays["k_r"] if "c2p" in terms else None,
                  c2p_index=c2p if "c2p" in terms else None, p2c_index=p2c if "p2c" in terms else None,
                  attention_mask=mask, pos_att_type=terms)
    return kwargs, dout


def reference_of(kwargs, dout, scale):
    """Output and the five gradients from torch autograd (float64); None for an absent input."""
    names = ("q_c", "k_c", "v", "q_r", "k_r")
    leaves = {n: leaf(kwargs[n]) for n in names if kwargs[n] is not None}
    placeholder = torch.zeros(1, dtype=torch.float64)
    out = torch_reference(leaves["q_c"], leaves["k_c"], leaves["v"], leaves.get("q_r", placeholder),
                          leaves.get("k_r", placeholder), kwargs["c2p_index"], kwargs["p2c_index"],
                          kwargs["attention_mask"], kwargs["pos_att_type"], scale)
    grads = backprop(out, dout, *leaves.values()) if out.numel() else [np.zeros(x.shape) for x in leaves.values()]
    by_name = dict(zip(leaves, grads))
    return out.detach().numpy(), [by_name.get(n) for n in names]


@pytest.mark.derivation("DA.4")
@pytest.mark.derivation("DA.5")
@pytest.mark.derivation("DA.6")
@pytest.mark.derivation("DA.7")
@pytest.mark.derivation("DA.8")
@pytest.mark.derivation("DA.9")
@pytest.mark.derivation("DA.10")
@pytest.mark.derivation("DA.11")
@pytest.mark.derivation("DA.14")
@pytest.mark.derivation("DA.16")
@pytest.mark.derivation("DA.17")
@settings(max_examples=40)
@given(cases())
def test_matches_torch(case):
    kwargs, dout = case
    out, cache = disentangled_attention_forward(**kwargs)
    D, n_terms = kwargs["q_c"].shape[3], len(kwargs["pos_att_type"])
    assert cache.scale == 1.0 / np.sqrt(D * (1 + n_terms))  # (DA.7)
    expected_out, expected_grads = reference_of(kwargs, dout, cache.scale)
    dtype = kwargs["q_c"].dtype
    assert out.dtype == dtype and out.flags.c_contiguous
    assert_close(out, expected_out, what="out")
    grads = disentangled_attention_backward(dout, cache)
    # A gradient can cancel to zero in exact arithmetic (every key of a row reading the same k_r row: softmax
    # ignores a shift of the row); it is judged against the size of one summand, |dO| |V| |Q or K|.
    def largest(x):
        return 0.0 if x is None or x.size == 0 else float(np.abs(x).max())

    summand = largest(dout) * largest(kwargs["v"]) * max(largest(kwargs[n]) for n in ("q_c", "k_c", "q_r", "k_r"))
    for name, g, expected in zip(("dq_c", "dk_c", "dv", "dq_r", "dk_r"), grads, expected_grads):
        assert (g is None) == (expected is None), name
        if g is not None:
            assert g.dtype == dtype and g.shape == expected.shape, name
            assert_close(g, expected, scale=max(summand, np.abs(expected).max(initial=0.0)), what=name)


@pytest.mark.derivation("DA.8")
@pytest.mark.derivation("DA.13")
@given(rngs(), DTYPES)
def test_hidden_rows_are_uniform_and_carry_no_score_gradient(rng, dtype):
    """A query that sees no key: uniform probabilities (output = mean of the values), no gradient to
    its q_c row, the values' gradient dv = P^T dO with P = 1/Tk; hidden keys of other rows get P = 0."""
    B, H, T, D = 2, 2, 5, 3
    c2p, p2c = deberta_relative_indices(T, T, position_buckets=4, max_relative_positions=8)
    padding = np.array([[True] * 5, [True] * 3 + [False] * 2])
    mask = pairwise_attention_mask(padding)
    x = {n: randn(rng, s, dtype) for n, s in (("q_c", (B, H, T, D)), ("k_c", (B, H, T, D)), ("v", (B, H, T, D)),
                                              ("q_r", (H, 8, D)), ("k_r", (H, 8, D)))}
    out, cache = disentangled_attention_forward(**x, c2p_index=c2p, p2c_index=p2c, attention_mask=mask)
    np.testing.assert_allclose(cache.probs[1, :, 3:, :], 1.0 / T, rtol=RTOL[np.dtype(dtype)])
    assert np.all(cache.probs[1, :, :3, 3:] == 0)  # hidden keys of rows that see some key: exactly 0
    assert_close(out[1, :, 3:], np.broadcast_to(x["v"][1].mean(axis=1, keepdims=True), (H, 2, D)))
    dout = randn(rng, (B, H, T, D), dtype)
    dq_c, dk_c, dv, dq_r, dk_r = disentangled_attention_backward(dout, cache)
    assert np.all(dq_c[1, :, 3:] == 0)
    # the padded keys get value gradients only from the padded (uniform) queries
    assert_close(dv[1, :, 3:], np.broadcast_to(dout[1, :, 3:].sum(axis=1, keepdims=True) / T, (H, 2, D)),
                 scale=np.abs(dout).max())


# -- the backward's equations one by one ----------------------------------------------------------


@pytest.mark.derivation("DA.15")
@given(rngs(), st.sampled_from([1, 2, 3]), st.sampled_from([1, 4, 6]), st.sampled_from([1, 5]),
       st.sampled_from([1, 3, 8]))
def test_scatter_add_is_the_adjoint_of_the_gather(rng, H, Tq, Tk, R):
    """<gather(X), G> = <X, scatter(G)> for every X, and the bincount equals np.add.at (repeated indices
    add up)."""
    index = rng.integers(0, R, size=(Tq, Tk))
    g = rng.standard_normal((H, Tq, Tk))
    flat = (np.arange(H)[:, None, None] * Tq + np.arange(Tq)[:, None]) * R + index
    scattered = _scatter_add(g, flat, (H, Tq, R))
    expected = np.zeros((H, Tq, R))
    np.add.at(expected, (np.arange(H)[:, None, None], np.arange(Tq)[:, None], index), g)
    assert_close(scattered, expected)
    x = rng.standard_normal((H, Tq, R))
    gathered = x[:, np.arange(Tq)[:, None], index]
    assert_close(np.sum(gathered * g), np.sum(x * scattered))


@pytest.mark.derivation("DA.11")
@pytest.mark.derivation("DA.12")
@pytest.mark.derivation("DA.13")
@pytest.mark.derivation("DA.14")
@pytest.mark.derivation("DA.15")
@pytest.mark.derivation("DA.16")
@pytest.mark.derivation("DA.17")
@given(rngs(), st.sampled_from(["none", "random"]))
def test_backward_equations_by_loops(rng, mask_kind):
    """G = dL/dA from autograd on A itself; then (DA.11), (DA.14)-(DA.17) evaluated as the sums they
    state, one (b, h, i, j) at a time, equal the op's gradients."""
    B, H, Tq, Tk, D, R = 2, 2, 3, 4, 2, 5
    alpha, beta = rng.integers(0, R, size=(Tq, Tk)), rng.integers(0, R, size=(Tq, Tk))
    qc, kc, v = (rng.standard_normal(shape) for shape in ((B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D)))
    qr, kr = rng.standard_normal((H, R, D)), rng.standard_normal((H, R, D))
    mask = None if mask_kind == "none" else rng.random((B, 1, Tq, Tk)) < 0.6
    dout = rng.standard_normal((B, H, Tq, D))
    _, cache = disentangled_attention_forward(qc, kc, v, qr, kr, c2p_index=alpha, p2c_index=beta, attention_mask=mask)
    dq_c, dk_c, dv, dq_r, dk_r = disentangled_attention_backward(dout, cache)

    a = torch_scores(leaf(qc, grad=False), leaf(kc, grad=False), leaf(qr, grad=False), leaf(kr, grad=False),
                     alpha, beta, ("c2p", "p2c")).requires_grad_(True)
    out = torch_attention_from_scores(a, leaf(v, grad=False), mask, cache.scale)
    (G,) = backprop(out, dout, a)
    p = cache.probs
    want = {n: np.zeros(x.shape) for n, x in (("dq_c", qc), ("dk_c", kc), ("dv", v), ("dq_r", qr), ("dk_r", kr))}
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                for j in range(Tk):
                    want["dv"][b, h, j] += p[b, h, i, j] * dout[b, h, i]  # (DA.11)
                    g = G[b, h, i, j]
                    want["dq_c"][b, h, i] += g * (kc[b, h, j] + kr[h, alpha[i, j]])  # (DA.14), (DA.16)
                    want["dk_c"][b, h, j] += g * (qc[b, h, i] + qr[h, beta[i, j]])  # (DA.14), (DA.17)
                    want["dk_r"][h, alpha[i, j]] += g * qc[b, h, i]  # (DA.15), (DA.16)
                    want["dq_r"][h, beta[i, j]] += g * kc[b, h, j]  # (DA.15), (DA.17)
    for name, got in zip(("dq_c", "dk_c", "dv", "dq_r", "dk_r"), (dq_c, dk_c, dv, dq_r, dk_r)):
        assert_close(got, want[name], what=name)
    if mask is not None:  # (DA.13): G vanishes on hidden scores
        assert np.all(np.broadcast_to(G, p.shape)[~np.broadcast_to(mask, p.shape)] == 0)


# -- Hugging Face's DisentangledSelfAttention ----------------------------------------------------


def hf_layer(rng, H, D, N, M, terms, share):
    config = DebertaV2Config(hidden_size=H * D, num_attention_heads=H, intermediate_size=4, relative_attention=True,
                             position_buckets=-1 if N is None else N, max_relative_positions=M,
                             pos_att_type=list(terms), share_att_key=share, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    layer = DisentangledSelfAttention(config).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.5))
    return layer


def heads(x, H):
    """(..., rows, H*D) -> (..., H, rows, D)."""
    return x.reshape(*x.shape[:-1], H, -1).transpose(-2, -3)


@pytest.mark.derivation("DA.7")
@pytest.mark.derivation("DA.10")
@pytest.mark.derivation("DA.16")
@pytest.mark.derivation("DA.17")
@settings(max_examples=10)
@given(rngs(), st.sampled_from([(None, 3), (None, 16), (4, 8), (8, 16), (256, 512)]),
       st.sampled_from([("c2p", "p2c"), ("c2p",), ("p2c",)]), st.booleans(), st.sampled_from([1, 4, 9]))
def test_matches_hugging_face(rng, config, terms, share, T):
    """Output, and the gradients of the hidden states and the relative embeddings (torch backpropagates
    the projections only, through the op's five gradients), equal those of Hugging Face's layer."""
    N, M = config
    B, H, D = 2, 2, 3
    span = M if N is None else N
    layer = hf_layer(rng, H, D, N, M, terms, share)
    x = leaf(rng.standard_normal((B, T, H * D)))
    rel_emb = leaf(rng.standard_normal((2 * span, H * D)))
    padding = np.ones((B, T), bool)
    padding[1, T - T // 3:] = False
    mask = pairwise_attention_mask(padding)
    rel = build_relative_position(x, x, bucket_size=-1 if N is None else N, max_position=M)
    expected, _ = layer(x, torch.from_numpy(mask), relative_pos=rel, rel_embeddings=rel_emb)
    dout = rng.standard_normal(expected.shape)
    expected_dx, expected_drel = backprop(expected, dout, x, rel_emb)

    c2p, p2c = deberta_relative_indices(T, T, position_buckets=N, max_relative_positions=M)
    q_c, k_c, v = (heads(proj(x), H) for proj in (layer.query_proj, layer.key_proj, layer.value_proj))
    q_proj = layer.query_proj if share or "p2c" not in terms else layer.pos_query_proj
    k_proj = layer.key_proj if share or "c2p" not in terms else layer.pos_key_proj
    q_r, k_r = heads(q_proj(rel_emb), H), heads(k_proj(rel_emb), H)  # (H, 2 S, D)
    # the reference takes sqrt(D * (1 + n)) in float32 (DA.7)
    scale = 1.0 / float(torch.sqrt(torch.tensor(D, dtype=torch.float) * (1 + len(terms))))
    arrays = {n: t.detach().numpy() for n, t in (("q_c", q_c), ("k_c", k_c), ("v", v), ("q_r", q_r), ("k_r", k_r))}
    out, cache = disentangled_attention_forward(
        arrays["q_c"], arrays["k_c"], arrays["v"], arrays["q_r"] if "p2c" in terms else None,
        arrays["k_r"] if "c2p" in terms else None, c2p_index=c2p if "c2p" in terms else None,
        p2c_index=p2c if "p2c" in terms else None, attention_mask=mask, pos_att_type=terms, scale=scale)
    assert_close(out.transpose(0, 2, 1, 3).reshape(B, T, H * D), expected.detach().numpy(), what="out")

    dout_heads = np.ascontiguousarray(dout.reshape(B, T, H, D).transpose(0, 2, 1, 3))
    grads = disentangled_attention_backward(dout_heads, cache)
    pairs = [(t, g) for t, g in zip((q_c, k_c, v, q_r, k_r), grads) if g is not None]
    dx, drel = torch.autograd.grad([t for t, _ in pairs], [x, rel_emb], [torch.from_numpy(g) for _, g in pairs])
    assert_close(dx.numpy(), expected_dx, what="d hidden_states")
    assert_close(drel.numpy(), expected_drel, what="d rel_embeddings")


@pytest.mark.derivation("DA.18")
@settings(max_examples=10)
@given(rngs(), st.sampled_from([(None, 3), (4, 8), (256, 512)]),
       st.sampled_from([("c2p", "p2c"), ("c2p",), ("p2c",)]), st.booleans(), st.sampled_from([1, 4, 7]))
def test_query_stream_gradients_match_hugging_face(rng, config, terms, share, T):
    """Queries from another stream Z (Hugging Face's ``query_states``), keys and values from X: the op's
    gradients, carried back through the projections by (DA.18) in NumPy, give Z and X their own shares, equal
    to Hugging Face's, and their sum is not X's share (the streams are not mixed up)."""
    N, M = config
    B, H, D = 2, 2, 3
    span = M if N is None else N
    layer = hf_layer(rng, H, D, N, M, terms, share)
    x, z = leaf(rng.standard_normal((B, T, H * D))), leaf(rng.standard_normal((B, T, H * D)))
    rel_emb = leaf(rng.standard_normal((2 * span, H * D)))
    padding = np.ones((B, T), bool)
    padding[1, T - T // 3:] = False
    mask = pairwise_attention_mask(padding)
    rel = build_relative_position(x, x, bucket_size=-1 if N is None else N, max_position=M)
    expected, _ = layer(x, torch.from_numpy(mask), query_states=z, relative_pos=rel, rel_embeddings=rel_emb)
    dout = rng.standard_normal(expected.shape)
    expected_dx, expected_dz = backprop(expected, dout, x, z)

    c2p, p2c = deberta_relative_indices(T, T, position_buckets=N, max_relative_positions=M)
    weight = {n: getattr(layer, n).weight.detach().numpy() for n in ("query_proj", "key_proj", "value_proj")}
    bias = {n: getattr(layer, n).bias.detach().numpy() for n in weight}
    q_proj = layer.query_proj if share or "p2c" not in terms else layer.pos_query_proj
    k_proj = layer.key_proj if share or "c2p" not in terms else layer.pos_key_proj
    with torch.no_grad():
        q_r, k_r = (heads(p(rel_emb), H).numpy() for p in (q_proj, k_proj))
    x_np, z_np = x.detach().numpy(), z.detach().numpy()
    split = lambda a: a.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # noqa: E731
    q_c = split(z_np @ weight["query_proj"].T + bias["query_proj"])  # from Z
    k_c = split(x_np @ weight["key_proj"].T + bias["key_proj"])  # from X
    v = split(x_np @ weight["value_proj"].T + bias["value_proj"])
    scale = 1.0 / float(torch.sqrt(torch.tensor(D, dtype=torch.float) * (1 + len(terms))))
    out, cache = disentangled_attention_forward(
        q_c, k_c, v, q_r if "p2c" in terms else None, k_r if "c2p" in terms else None,
        c2p_index=c2p if "c2p" in terms else None, p2c_index=p2c if "p2c" in terms else None,
        attention_mask=mask, pos_att_type=terms, scale=scale)
    assert_close(out.transpose(0, 2, 1, 3).reshape(B, T, H * D), expected.detach().numpy(), what="out")

    merge = lambda g: g.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # noqa: E731
    dq_c, dk_c, dv, _, _ = disentangled_attention_backward(
        np.ascontiguousarray(dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)), cache)
    dz = merge(dq_c) @ weight["query_proj"]  # (DA.18)  the query stream (no residual in this layer)
    dx = merge(dk_c) @ weight["key_proj"] + merge(dv) @ weight["value_proj"]  # (DA.18)  keys and values
    assert_close(dz, expected_dz, what="d query_states")
    assert_close(dx, expected_dx, what="d hidden_states")
    if T > 1:  # the query stream's share is really apart (one key: a constant softmax, no query gradient)
        assert not np.allclose(dx + dz, expected_dx)


# -- finite differences ---------------------------------------------------------------------------


@pytest.mark.derivation("DA.11")
@pytest.mark.derivation("DA.14")
@pytest.mark.derivation("DA.16")
@pytest.mark.derivation("DA.17")
@settings(max_examples=6)
@given(rngs(), st.sampled_from(TERM_SETS), st.booleans(), st.sampled_from([(2, 4), (4, 3), (3, 3)]))
def test_finite_differences(rng, terms, masked, lengths):
    B, H, D, R = 2, 2, 2, 4
    Tq, Tk = lengths
    inputs = {"q_c": rng.standard_normal((B, H, Tq, D)), "k_c": rng.standard_normal((B, H, Tk, D)),
              "v": rng.standard_normal((B, H, Tk, D)),
              "q_r": rng.standard_normal((H, R, D)) if "p2c" in terms else None,
              "k_r": rng.standard_normal((H, R, D)) if "c2p" in terms else None,
              "c2p_index": rng.integers(0, R, (Tq, Tk)) if "c2p" in terms else None,
              "p2c_index": rng.integers(0, R, (Tq, Tk)) if "p2c" in terms else None,
              "attention_mask": (rng.random((B, 1, Tq, Tk)) < 0.7) if masked else None}
    wrt = ("q_c", "k_c", "v", "q_r" if "p2c" in terms else None, "k_r" if "c2p" in terms else None)
    results = gradcheck.check(disentangled_attention_forward, disentangled_attention_backward, inputs, wrt=wrt,
                              options={"pos_att_type": terms})
    assert [r.input for r in results] == [n for n in wrt if n is not None]
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


def test_gradcheck_cases_pass():
    results = [r for case in gradcheck.cases("disentangled_attention") for r in gradcheck.check_case(case)]
    assert len(results) == 9  # 5 + 4 (c2p only)
    assert max(r.max_rel for r in results) < FD_RTOL, gradcheck.format_table(results)


# -- bad input ------------------------------------------------------------------------------------

NOT_INTEGERS = tuple(k for k in NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS if k not in ("int64", "int32", "uint8")) + (
    "float64",)
BAD_TERMS = (["c2p", "c2p"], ("c2p", "x"), "c2p", ("C2P",), None, ("c2p", 1), {"c2p"})


def small_case(rng, dtype=np.float64):
    B, H, Tq, Tk, D, R = 2, 2, 3, 4, 2, 5
    return dict(q_c=randn(rng, (B, H, Tq, D), dtype), k_c=randn(rng, (B, H, Tk, D), dtype),
                v=randn(rng, (B, H, Tk, D), dtype), q_r=randn(rng, (H, R, D), dtype), k_r=randn(rng, (H, R, D), dtype),
                c2p_index=rng.integers(0, R, (Tq, Tk)), p2c_index=rng.integers(0, R, (Tq, Tk)),
                attention_mask=rng.random((B, 1, Tq, Tk)) < 0.7)


@pytest.mark.parametrize("name", ["q_c", "k_c", "v", "q_r", "k_r", "c2p_index", "p2c_index", "attention_mask",
                                  "pos_att_type", "scale"])
@given(rngs(), DTYPES)
def test_forward_rejects_bad_arguments(name, rng, dtype):
    kwargs = small_case(rng, dtype)
    x = kwargs.get(name)
    if name in ("q_c", "k_c", "v"):
        kinds = NON_ARRAYS + SUBCLASS_KINDS + DTYPE_KINDS + RANK_KINDS + (other_float(dtype),)
        bad = [corrupt(x, k) for k in kinds]
        if name != "q_c":  # q_c's own sizes set the others', so a change in them is named there
            bad += [x[:1], x[..., :0, :]]  # another batch, no keys
        if name == "v":
            bad.append(corrupt(x, "last+1"))
    elif name in ("q_r", "k_r"):
        bad = [corrupt(x, k) for k in EXACT_KINDS] + [x[:, :0]]
    elif name in ("c2p_index", "p2c_index"):
        R = kwargs["q_r"].shape[1]
        bad = [corrupt(x, k) for k in NOT_INTEGERS + RANK_KINDS + SHAPE_KINDS] + [x + R, x - R]
    elif name == "attention_mask":
        bad = [corrupt(x, k) for k in NOT_A_MASK] + [np.ones((2, 3, 3, 4), bool)]
    elif name == "pos_att_type":
        bad = list(BAD_TERMS)
    else:
        bad = list(BAD_SCALES)
    rejects_all(lambda b: disentangled_attention_forward(**{**kwargs, name: b}), "disentangled_attention_forward",
                name, bad)


@pytest.mark.parametrize("term, inputs", [("c2p", ("k_r", "c2p_index")), ("p2c", ("q_r", "p2c_index"))])
@given(rngs())
def test_forward_rejects_inputs_of_an_absent_term(term, inputs, rng):
    """An input that only an absent term reads is refused rather than ignored."""
    kwargs = small_case(rng)
    other = "p2c" if term == "c2p" else "c2p"
    without = {**kwargs, **{name: None for name in inputs}}
    out, _ = disentangled_attention_forward(**without, pos_att_type=(other,))
    assert out.shape == kwargs["q_c"].shape
    for name in inputs:
        rejects_all(lambda b: disentangled_attention_forward(**{**without, name: b}, pos_att_type=(other,)),
                    "disentangled_attention_forward", name, [kwargs[name]])
    q_r = kwargs["q_r"]
    rejects_all(lambda b: disentangled_attention_forward(**{**kwargs, "q_r": b}), "disentangled_attention_forward",
                "q_r", [q_r[:, :2]])  # R of q_r must equal R of k_r
    rejects_all(lambda b: disentangled_attention_forward(**{**kwargs, "k_r": b}), "disentangled_attention_forward",
                "k_r", [None])


@pytest.mark.parametrize("name", ["dout", "cache"])
@given(rngs(), DTYPES)
def test_backward_rejects_bad_input(name, rng, dtype):
    kwargs = small_case(rng, dtype)
    out, cache = disentangled_attention_forward(**kwargs)
    if name == "dout":
        bad = [corrupt(out, k) for k in EXACT_KINDS]
        rejects_all(lambda b: disentangled_attention_backward(b, cache), "disentangled_attention_backward", "dout", bad)
    else:
        rejects_all(lambda b: disentangled_attention_backward(out, b), "disentangled_attention_backward", "cache",
                    [None, tuple(cache), list(cache), cache._asdict(), out])


@given(rngs(), st.sampled_from(BUCKET_CONFIGS))
def test_bucket_helpers_reject_bad_arguments(rng, config):
    N, M = config
    r = rng.integers(-50, 50, size=(3, 4))
    op = "deberta_log_bucket"
    rejects_all(lambda b: deberta_log_bucket(b, N, M), op, "relative_position",
                [corrupt(r, k) for k in NOT_INTEGERS] + [np.array([2**53]), np.array([-(2**63)]),
                                                         np.array([2**64 - 1], np.uint64)])
    rejects_all(lambda b: deberta_log_bucket(r, b, M), op, "bucket_size", (1, 0, -4, 4.0, True, "4", None, 2**53))
    rejects_all(lambda b: deberta_log_bucket(r, N, b), op, "max_position",
                (N // 2 + 1, 0, -1, float(M), True, "512", None, 2**53))
    op = "deberta_relative_indices"
    for name in ("Tq", "Tk"):
        rejects_all(lambda b: deberta_relative_indices(**{"Tq": 3, "Tk": 3, name: b}), op, name, BAD_COUNTS)
    rejects_all(lambda b: deberta_relative_indices(3, 3, position_buckets=b), op, "position_buckets",
                (1, 0, -1, 4.0, True, "256"))
    rejects_all(lambda b: deberta_relative_indices(3, 3, position_buckets=None, max_relative_positions=b), op,
                "max_relative_positions", (0, -1, 2.0, True, None, 2**53))
    rejects_all(lambda b: pairwise_attention_mask(b), "pairwise_attention_mask", "padding_mask",
                [corrupt(r > 0, k) for k in NON_ARRAYS + SUBCLASS_KINDS + ("int64", "float64") + RANK_KINDS])


def test_helpers_accept_the_ends_of_their_ranges():
    r = np.array([-(2**53 - 1), 2**53 - 1, 0])
    bucket = deberta_log_bucket(r, 256, 512)
    assert bucket[2] == 0 and bucket[0] == -bucket[1] and bucket[1] > 255
    assert deberta_log_bucket(np.array([5], np.uint64), 4, 4).tolist() == hf_bucket([5], 4, 4).tolist()
    c2p, p2c = deberta_relative_indices(0, 5)
    assert c2p.shape == p2c.shape == (0, 5)
