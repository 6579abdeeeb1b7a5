"""The whole Mamba against its torch twin: loss and every parameter's gradient, recordings and the divergence
finder, incremental decoding with the state cache, generate, the family registry, config and input checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.twins.mamba import TwinMamba
from npformer.debug import first_divergence
from npformer.generate import generate
from npformer.models import CAUSAL_LMS, FAMILIES, build, check_causal_lm, family_of
from npformer.models.mamba import MambaConfig, MambaLM, MambaStateCache
from tests.badinput import BAD_COUNTS, BAD_FLAGS, NON_ARRAYS, RANK_KINDS, SHAPE_KINDS, corrupt, expect_rejected
from tests.models import helpers
from tests.models.helpers import batch, check_against_twin, record_both, twin_pair
from tests.tolerances import FINDER_ATOL, MODEL_RTOL, RTOL, assert_close

TINY = dict(vocab_size=11, block_size=8, n_layer=2, d_model=6, d_state=3, expand=2, d_conv=3)


def randomise(model, seed=7):
    """Weights of order one, so every part of the mixer shows in the loss; A_log stays a log of a decay rate."""
    return helpers.randomise(model, seed, unit=("norm.weight", "norm_f.weight"), fan_in_axis=-1,
                             special={"A_log": lambda rng, shape: np.log(rng.uniform(0.3, 3.0, shape))})


def pair(seed=0, **overrides):
    return twin_pair(MambaLM, TwinMamba, MambaConfig(**{**TINY, **overrides, "dtype": "float64"}), seed, randomise)


@st.composite
def configs(draw):
    """Small Mamba configs: odd widths, 1 state or several, K = 1 (no history) to 4, dt_rank given or
    implied, biases on or off, tied or not."""
    return MambaConfig(
        vocab_size=draw(st.sampled_from([1, 2, 5, 13])), block_size=draw(st.integers(1, 7)),
        n_layer=draw(st.integers(1, 2)), d_model=draw(st.integers(1, 7)), d_state=draw(st.sampled_from([1, 2, 4])),
        expand=draw(st.integers(1, 2)), d_conv=draw(st.integers(1, 4)),
        dt_rank=draw(st.one_of(st.none(), st.integers(1, 3))),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-6, 0.1])), use_bias=draw(st.booleans()),
        use_conv_bias=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()), dtype="float64")


@pytest.mark.derivation("MAMBA.12")
@settings(max_examples=20)
@given(cfg=configs(), data=st.data())
def test_every_gradient_matches_the_twin(cfg, data):
    model = randomise(MambaLM(cfg, seed=data.draw(st.integers(0, 3))), data.draw(st.integers(0, 9)))
    T = data.draw(st.integers(1, cfg.block_size))
    ids, targets = batch(cfg, B=data.draw(st.integers(1, 2)), T=T, seed=data.draw(st.integers(0, 9)))
    check_against_twin(model, TwinMamba(**cfg.to_dict()).double(), ids, targets)


def test_float32_loss_and_gradients_are_close_to_float64():
    model64, _ = pair()
    model32 = MambaLM(MambaConfig(**TINY), seed=0)
    model32.load_state_dict(model64.state_dict(), cast=True)
    ids, targets = batch(model64.cfg)
    for m in (model32, model64):
        m.zero_grad()
        m.forward(ids, targets)
        m.backward()
    grads64 = dict(model64.named_parameters())
    for name, prm in model32.named_parameters():
        assert prm.grad.dtype == np.float32
        assert_close(prm.grad, grads64[name].grad, rtol=10 * RTOL[np.dtype(np.float32)], what=name)


def test_each_option_changes_the_loss():
    """The options the twin is checked on are not inert."""
    ids, targets = batch(MambaConfig(**TINY))
    losses = [pair(**kw)[0].forward(ids, targets)[1]
              for kw in (dict(), dict(d_conv=1), dict(d_state=1), dict(dt_rank=2), dict(use_conv_bias=False))]
    assert len({round(v, 12) for v in losses}) == len(losses), losses


def test_two_forwards_then_two_backwards_match_two_separate_steps():
    model, _ = pair()
    (ids1, t1), (ids2, t2) = batch(model.cfg, seed=1), batch(model.cfg, seed=2)
    model.forward(ids1, t1)
    model.forward(ids2, t2)
    model.backward()
    model.backward()
    both = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    for ids, t in ((ids1, t1), (ids2, t2)):
        model.forward(ids, t)
        model.backward()
    for n, p in model.named_parameters():
        assert_close(both[n], p.grad, what=n)


# ---- recordings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(tie_word_embeddings=False, use_bias=True)])
def test_divergence_finder_agrees_on_a_correct_model(options):
    ours, theirs = record_both(*pair(**options))
    shared = [n for n in ours if n in theirs]
    for name in ("layers.0.mixer.delta", "layers.1.mixer.y", "layers.1.out", "logits", "dlogits", "norm_f.dweight",
                 "layers.0.mixer.x_proj.dW", "layers.1.mixer.in_proj.out"):
        assert name in shared, name
    assert first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL) is None


def test_divergence_finder_names_a_planted_gradient_bug(monkeypatch):
    """A wrong gradient of C in the scan: the first to differ is the last layer's x_proj weight gradient."""
    import npformer.models.mamba as mamba

    right = mamba.selective_scan_backward

    def wrong(dy, cache):
        grads = list(right(dy, cache))
        grads[4] = grads[4] * 1.01
        return tuple(grads)

    monkeypatch.setattr(mamba, "selective_scan_backward", wrong)
    ours, theirs = record_both(*pair())
    found = first_divergence(ours, theirs, rtol=MODEL_RTOL, atol=FINDER_ATOL)
    assert found is not None and found.name == "layers.1.mixer.x_proj.dW", found


# ---- incremental decoding ----------------------------------------------------------------------------------

@pytest.mark.derivation("MAMBA.21")
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.sampled_from([1, 2, 3, 4]), st.integers(0, 5))
def test_cached_decoding_equals_uncached(chunks, d_conv, seed):
    """Feeding the sequence in chunks through the state caches gives the logits of one uncached forward."""
    model, _ = pair(d_conv=d_conv)
    model.eval()
    T = min(sum(chunks), model.cfg.block_size)
    ids, _ = batch(model.cfg, B=2, T=T, seed=seed)
    full, _ = model.forward(ids)
    caches = model.make_kv_caches(2)
    pieces, start = [], 0
    for n in chunks:
        if start >= T:
            break
        pieces.append(model.forward(ids[:, start:start + n], kv_caches=caches)[0])
        start += pieces[-1].shape[1]
    assert caches[0].length == T and all(c.length == T for c in caches)
    assert_close(np.concatenate(pieces, axis=1), full, what="logits")


@pytest.mark.parametrize("T0, new", [(1, 5), (3, 9), (8, 4)])
def test_generate_with_the_cache_equals_without(T0, new):
    """Greedy-equivalent sampling from one seed: cached and uncached runs draw the same tokens, across the
    rebuild of the caches when the window of block_size fills."""
    model, _ = pair()
    ids, _ = batch(model.cfg, B=2, T=T0)
    cached = generate(model, ids, new, rng=np.random.default_rng(0))
    plain = generate(model, ids, new, rng=np.random.default_rng(0), use_cache=False)
    assert cached.shape == (2, T0 + new) and np.array_equal(cached, plain)
    assert model.training  # generate restores the mode


def test_a_failed_cached_forward_leaves_the_caches_as_they_were():
    model, _ = pair()
    model.eval()
    caches = model.make_kv_caches(1)
    model.forward(np.array([[1, 2]]), kv_caches=caches)
    before = [(c.conv.copy(), c.ssm.copy(), c.length) for c in caches]
    with pytest.raises(ValueError):
        model.forward(np.array([[1, 99]]), kv_caches=caches)  # an id out of range
    for c, (conv, ssm, length) in zip(caches, before):
        assert np.array_equal(c.conv, conv) and np.array_equal(c.ssm, ssm) and c.length == length


# ---- the family --------------------------------------------------------------------------------------------

def test_mamba_is_a_registered_causal_lm():
    assert FAMILIES["mamba"] == (MambaLM, MambaConfig) and "mamba" in CAUSAL_LMS
    model = build("mamba", MambaConfig(**TINY).to_dict(), seed=3)
    assert family_of(model) == "mamba"
    check_causal_lm("test", "model", model)  # no error
    again = build("mamba", model.cfg.to_dict(), seed=3)
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == m and np.array_equal(a, b)


def test_parameter_names_are_hugging_faces():
    names = set(MambaLM(MambaConfig(**TINY, tie_word_embeddings=False, use_bias=True)).state_dict())
    mixer = {"in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "A_log", "D", "out_proj.weight", "out_proj.bias"}
    want = {"embeddings.weight", "norm_f.weight", "lm_head.weight"}
    want |= {f"layers.{i}.norm.weight" for i in range(2)} | {f"layers.{i}.mixer.{n}" for i in range(2) for n in mixer}
    assert names == want
    model = MambaLM(MambaConfig(**TINY))
    assert model.layers[0].mixer.conv1d.weight.shape == (12, 1, 3)  # torch's Conv1d layout
    assert "lm_head.weight" not in model.state_dict()  # tied by default, as Hugging Face's


def test_initialisation_follows_mamba():
    cfg = MambaConfig(**TINY)
    mixer = MambaLM(cfg, seed=1).layers[0].mixer
    assert np.allclose(np.exp(mixer.A_log.data), np.arange(1, 4))  # A = -(1, 2, ..., N) in every channel
    assert np.array_equal(mixer.D.data, np.ones(12))
    delta = np.log1p(np.exp(mixer.dt_proj.bias.data.astype(np.float64)))  # softplus of the bias
    assert (delta >= 1e-3 * (1 - 1e-6)).all() and (delta <= 0.1 * (1 + 1e-6)).all()


def test_flops_per_token_counts_the_matrix_products():
    cfg = MambaConfig(**TINY)
    D, E, N, R, K, V = 6, 12, 3, 1, 3, 11
    per_layer = 2 * D * E + E * (R + 2 * N) + R * E + E * D + K * E + 3 * E * N
    assert cfg.flops_per_token() == 6 * (2 * per_layer + V * D)


def test_astype_converts_and_the_config_follows():
    model = MambaLM(MambaConfig(**TINY)).astype("float64")
    assert model.cfg.dtype == "float64" and all(p.data.dtype == np.float64 for p in model.parameters())
    assert model.forward(batch(model.cfg)[0])[0].dtype == np.float64


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "d_model", "d_state", "expand", "d_conv"])
def test_config_rejects_bad_counts(field):
    for bad in BAD_COUNTS[:8]:
        expect_rejected(lambda: MambaConfig(**{**TINY, field: bad}), "MambaConfig", field)
    expect_rejected(lambda: MambaConfig(**{**TINY, field: 0}), "MambaConfig", field)


@pytest.mark.parametrize("field", ["use_bias", "use_conv_bias", "tie_word_embeddings"])
def test_config_rejects_bad_flags(field):
    for bad in BAD_FLAGS:
        expect_rejected(lambda: MambaConfig(**{**TINY, field: bad}), "MambaConfig", field)


def test_config_rejects_a_bad_dt_rank_eps_and_dtype():
    expect_rejected(lambda: MambaConfig(**TINY, dt_rank=0), "MambaConfig", "dt_rank")
    expect_rejected(lambda: MambaConfig(**TINY, layer_norm_epsilon=-1.0), "MambaConfig", "layer_norm_epsilon")
    expect_rejected(lambda: MambaConfig(**TINY, dtype="float16"), "MambaConfig", "dtype")
    expect_rejected(lambda: MambaLM(dict(TINY)), "MambaLM", "cfg")
    expect_rejected(lambda: MambaLM(MambaConfig(**TINY), seed=-1), "MambaLM", "seed")


@pytest.mark.parametrize("kind", NON_ARRAYS + RANK_KINDS + ("float64", "bool"))
def test_forward_rejects_bad_ids(kind):
    model = MambaLM(MambaConfig(**TINY))
    ids, targets = batch(model.cfg)
    expect_rejected(lambda: model.forward(corrupt(ids, kind)), "MambaLM.forward", "ids")
    assert model.pending_backwards == 0


@pytest.mark.parametrize("kind", ("list", "scalar", "string") + RANK_KINDS + SHAPE_KINDS + ("float64",))
def test_forward_rejects_bad_targets(kind):
    model = MambaLM(MambaConfig(**TINY))
    ids, targets = batch(model.cfg)
    expect_rejected(lambda: model.forward(ids, corrupt(targets, kind)), "MambaLM.forward", "targets")


def test_forward_rejects_out_of_range_values_and_bad_caches():
    model = MambaLM(MambaConfig(**TINY))
    ids, targets = batch(model.cfg)
    expect_rejected(lambda: model.forward(ids + 11), "MambaLM.forward", "ids")
    expect_rejected(lambda: model.forward(ids, targets + 11), "MambaLM.forward", "targets")
    expect_rejected(lambda: model.forward(ids, prefix_len=np.ones(3, np.int64)), "MambaLM.forward", "prefix_len")
    caches = model.make_kv_caches(3)
    expect_rejected(lambda: model.forward(ids, kv_caches=caches), "MambaLM.forward", "kv_caches")  # training mode
    model.eval()
    expect_rejected(lambda: model.forward(ids, kv_caches=caches[:1]), "MambaLM.forward", "kv_caches")
    expect_rejected(lambda: model.forward(ids, kv_caches=[caches[0]] * 2), "MambaLM.forward", "kv_caches")
    expect_rejected(lambda: model.forward(ids, kv_caches=model.make_kv_caches(2)), "MambaLM.forward", "kv_caches")
    expect_rejected(lambda: model.forward(ids[:, :1], kv_caches=model.make_kv_caches(3, max_len=0)),
                    "MambaLM.make_kv_caches", "max_len")
    short = model.make_kv_caches(3, max_len=2)
    expect_rejected(lambda: model.forward(ids[:, :3], kv_caches=short), "MambaLM.forward", "ids")
    assert all(c.length == 0 for c in short)
    assert isinstance(short[0], MambaStateCache) and "length=0" in repr(short[0])


def test_backward_without_targets_or_forward_is_refused():
    model = MambaLM(MambaConfig(**TINY))
    with pytest.raises(RuntimeError, match="MambaLM.backward"):
        model.backward()
    model.forward(batch(model.cfg)[0])
    with pytest.raises(RuntimeError, match="no targets"):
        model.backward()


def test_state_cache_and_layers_reject_bad_arguments():
    expect_rejected(lambda: MambaStateCache(0, 4, 2, 3, 8), "MambaStateCache", "batch")
    expect_rejected(lambda: MambaStateCache(1, 4, 2, 3, 8, dtype=np.int64), "MambaStateCache", "dtype")
    cache = MambaStateCache(2, 4, 2, 3, 8, dtype=np.float64)
    assert cache.conv.shape == (2, 2, 4) and cache.ssm.shape == (2, 4, 2) and cache.length == 0
    model = MambaLM(MambaConfig(**TINY))
    block = model.layers[0]
    for bad in (np.ones((2, 3, 5), np.float32), np.ones((2, 6), np.float32), np.ones((2, 3, 6)), [[1.0] * 6]):
        expect_rejected(lambda: block.forward(bad), "MambaBlock.forward", "x")
    expect_rejected(lambda: model.layers[0].mixer.forward(np.ones((2, 3, 5), np.float32)), "MambaMixer.forward", "x")
    assert block.pending_backwards == 0 and block.mixer.pending_backwards == 0
    out, state = block.forward(np.ones((2, 3, 6), np.float32))
    assert out.shape == (2, 3, 6) and state.conv.shape == (2, 2, 12) and state.ssm.shape == (2, 12, 3)
    expect_rejected(lambda: block.backward(np.ones((2, 4, 6), np.float32)), "MambaBlock.backward", "dout")
    assert block.pending_backwards == 1  # a refused backward consumes nothing
