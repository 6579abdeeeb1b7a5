"""Weight-only quantisation (proofs/quantization.md): packing, the per-weight and matmul error
bounds, the dequantising forward, and a small trained GPT quantised to int8 and 4 bits."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npformer.data.char import CharTokenizer
from npformer.data.corpus import default_corpus, get_batch, train_val_split
from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.layers import Linear
from npformer.nn.module import ModuleList
from npformer.ops.linear import linear_forward
from npformer.optim import AdamW
from npformer.quant import (QuantLinear, dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
                            quantize_model, unpack_int4, weight_bytes)
from tests.badinput import ARRAY_KINDS, BAD_COUNTS, corrupt, expect_rejected, rejects_all
from tests.strategies import DTYPES, SCALES, SIDES, in_layout, layouts, randn, rngs

# The per-weight bounds (QUANT.3), (QUANT.6) hold exactly for the stored scale up to the rounding of
# W / s in float64 and of the weight itself: a relative slack of a few float64 units on s / 2.
SLACK = 1 + 1e-12


def eps(dtype):
    return float(np.finfo(dtype).eps)


# -- (QUANT.7) packing --------------------------------------------------------------------------
@pytest.mark.derivation("QUANT.7")
@given(rng=rngs(), O=SIDES, I=st.integers(1, 19))
def test_pack_unpack_roundtrip(rng, O, I):
    q = rng.integers(0, 16, size=(O, I)).astype(np.uint8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (O, (I + 1) // 2)
    padded = np.concatenate([q, np.zeros((O, I % 2), np.uint8)], axis=1).astype(np.int64)
    np.testing.assert_array_equal(packed, padded[:, 0::2] + 16 * padded[:, 1::2])  # the byte formula (QUANT.7)
    np.testing.assert_array_equal(unpack_int4(packed, I), q)


def test_pack_extremes():
    q = np.array([[0, 15, 15, 0, 7]], np.uint8)
    np.testing.assert_array_equal(pack_int4(q), [[0xF0, 0x0F, 0x07]])


# -- (QUANT.1)-(QUANT.3) int8 -------------------------------------------------------------------
@pytest.mark.derivation("QUANT.1")
@pytest.mark.derivation("QUANT.2")
@pytest.mark.derivation("QUANT.3")
@given(rng=rngs(), O=SIDES, I=SIDES, dtype=DTYPES, scale=SCALES, layout=layouts())
def test_int8_dequantised_within_half_a_step(rng, O, I, dtype, scale, layout):
    W = randn(rng, (O, I), dtype, scale)
    W[0] = 0  # an all-zero row stays exactly zero
    w = quantize_int8(in_layout(W, layout))
    assert w.q.dtype == np.int8 and w.q.shape == (O, I) and w.scales.dtype == dtype
    assert np.abs(w.q.astype(np.int64)).max() <= 127
    absmax = np.abs(W.astype(np.float64)).max(axis=1)
    expected_s = np.where(absmax > 0, absmax / 127, 1.0)
    np.testing.assert_allclose(w.scales, expected_s, rtol=eps(dtype))  # (QUANT.1)
    s = w.scales.astype(np.float64)[:, None]
    np.testing.assert_array_equal(w.q, np.clip(np.rint(W / s), -127, 127))  # (QUANT.2)
    err = np.abs(W.astype(np.float64) - w.q * s)  # q s is exact in float64
    assert np.all(err <= s / 2 * SLACK), f"max error / (s/2) = {np.max(err / (s / 2))}"  # (QUANT.3)
    np.testing.assert_array_equal(dequantize_int8(w)[0], 0)
    Wh = dequantize_int8(w)
    assert Wh.dtype == dtype
    assert np.all(np.abs(W.astype(np.float64) - Wh) <= s / 2 * (1 + 2 * eps(dtype)))  # (QUANT.3) in W's dtype


# -- (QUANT.4)-(QUANT.6) 4 bits -----------------------------------------------------------------
@pytest.mark.derivation("QUANT.4")
@pytest.mark.derivation("QUANT.5")
@pytest.mark.derivation("QUANT.6")
@given(rng=rngs(), O=SIDES, G=st.integers(1, 4), g=st.sampled_from([1, 2, 3, 4, 8]), dtype=DTYPES, scale=SCALES,
       shift=st.sampled_from([0.0, 1.0, -3.0]), layout=layouts())
def test_int4_dequantised_within_half_a_step(rng, O, G, g, dtype, scale, shift, layout):
    I = G * g
    W = randn(rng, (O, I), dtype, scale) + dtype(shift * scale)  # shifted: groups of one sign too
    W[0, :g] = 0  # an all-zero group
    w = quantize_int4(in_layout(W, layout), group_size=g)
    assert w.scales.shape == w.zeros.shape == (O, G) and w.zeros.dtype == np.uint8 and w.scales.dtype == dtype
    Wg = W.astype(np.float64).reshape(O, G, g)
    lo, hi = np.minimum(Wg.min(axis=2), 0), np.maximum(Wg.max(axis=2), 0)
    np.testing.assert_allclose(w.scales, np.where(hi > lo, (hi - lo) / 15, 1.0), rtol=eps(dtype))  # (QUANT.4)
    s = w.scales.astype(np.float64)
    np.testing.assert_array_equal(w.zeros, np.clip(np.rint(-lo / s), 0, 15))  # (QUANT.4)
    assert w.zeros.max() <= 15
    q = unpack_int4(w.qweight, I).reshape(O, G, g).astype(np.int64)
    np.testing.assert_array_equal(q, np.clip(np.rint(Wg / s[..., None]) + w.zeros[..., None], 0, 15))  # (QUANT.5)
    err = np.abs(Wg - (q - w.zeros[..., None]) * s[..., None])
    half = s[..., None] / 2
    assert np.all(err <= half * SLACK), f"max error / (s/2) = {np.max(err / half)}"  # (QUANT.6)
    Wh = dequantize_int4(w)
    assert Wh.dtype == dtype and Wh.shape == (O, I)
    np.testing.assert_array_equal(Wh[0, :g], 0)
    bound = np.repeat(s, g, axis=1) / 2 * (1 + 4 * eps(dtype))
    assert np.all(np.abs(W.astype(np.float64) - Wh) <= bound)  # (QUANT.6) in W's dtype


def test_int4_zero_weights_stay_zero():
    W = np.array([[0.0, 1.0, -2.0, 0.0, 0.5, 0.0, 0.0, 3.0]])
    Wh = dequantize_int4(quantize_int4(W, group_size=4))
    np.testing.assert_array_equal(Wh[W == 0], 0)


# -- (QUANT.8) the dequantising matmul -----------------------------------------------------------
def make_linear(rng, I, O, bias, dtype, scale):
    lin = Linear(I, O, bias, rng=rng, dtype=dtype)
    lin.weight.data[...] = randn(rng, (O, I), dtype, scale)
    if bias:
        lin.bias.data[...] = randn(rng, (O,), dtype)
    return lin


@pytest.mark.derivation("QUANT.8")
@given(rng=rngs(), O=SIDES, G=st.integers(1, 3), bits=st.sampled_from([8, 4]), bias=st.booleans(),
       scale=SCALES, lead=st.sampled_from([(1,), (3,), (2, 5)]))
def test_matmul_error_within_bound(rng, O, G, bits, bias, scale, lead):
    g = 4
    I = G * g
    lin = make_linear(rng, I, O, bias, np.float64, scale)
    ql = QuantLinear(lin, bits, group_size=g).eval()
    x = randn(rng, lead + (I,), np.float64, 3.0)
    y = linear_forward(x, lin.weight.data, None if lin.bias is None else lin.bias.data)[0]
    yh = ql.forward(x)
    s = ql.qweight.scales
    smax = s if bits == 8 else s.max(axis=1)  # (O,)
    bound = smax / 2 * np.abs(x).sum(axis=-1, keepdims=True)  # (QUANT.8)
    roundoff = 8 * I * eps(np.float64) * (np.abs(x) @ np.abs(lin.weight.data).T + 1)
    assert np.all(np.abs(y - yh) <= bound + roundoff)
    s_col = np.broadcast_to(s[:, None], (O, I)) if bits == 8 else np.repeat(s, g, axis=1)
    tighter = np.abs(x) @ (s_col / 2).T  # the middle term of (QUANT.8)
    assert np.all(np.abs(y - yh) <= tighter + roundoff)


@given(rng=rngs(), O=SIDES, I=SIDES, dtype=DTYPES, bias=st.booleans(), layout=layouts())
def test_int8_forward_is_the_dequantised_matmul(rng, O, I, dtype, bias, layout):
    lin = make_linear(rng, I, O, bias, dtype, 1.0)
    ql = QuantLinear(lin, 8).eval()
    x = in_layout(randn(rng, (2, 3, I), dtype), layout)
    Wh = dequantize_int8(ql.qweight)
    rows = np.ascontiguousarray(x).reshape(-1, I)  # the rows as one matrix, as the layer multiplies them
    expected = (rows @ Wh.T + (0 if lin.bias is None else lin.bias.data)).reshape(2, 3, O)
    np.testing.assert_array_equal(ql.forward(x), expected)  # exactly, as computed (a stacked 3-D product may round otherwise)
    assert ql.forward(x).dtype == dtype


def test_int4_forward_is_the_dequantised_matmul():
    rng = np.random.default_rng(3)
    lin = make_linear(rng, 16, 5, True, np.float32, 1.0)
    ql = QuantLinear(lin, 4, group_size=8).eval()
    x = randn(rng, (4, 16), np.float32)
    np.testing.assert_array_equal(ql.forward(x), x @ dequantize_int4(ql.qweight).T + lin.bias.data)


# -- the layer refuses training ----------------------------------------------------------------------
def test_quant_linear_is_inference_only():
    rng = np.random.default_rng(0)
    ql = QuantLinear(make_linear(rng, 8, 3, True, np.float32, 1.0), 8)
    x = randn(rng, (2, 8), np.float32)
    with pytest.raises(RuntimeError, match="QuantLinear.forward.*inference only"):
        ql.forward(x)  # a new module is in training mode
    ql.eval()
    assert ql.forward(x).shape == (2, 3)
    with pytest.raises(RuntimeError, match="QuantLinear.backward.*inference only"):
        ql.backward(np.ones((2, 3), np.float32))
    assert ql.parameters() == []  # nothing for an optimiser to update
    assert ql.weight.shape == (3, 8) and ql.weight.dtype == np.float32
    np.testing.assert_array_equal(ql.weight.data, dequantize_int8(ql.qweight))
    with pytest.raises(ValueError):
        ql.weight.data[0, 0] = 1.0  # a fresh read-only copy: writing to it would change nothing


# -- bad input --------------------------------------------------------------------------------------
@given(kind=st.sampled_from(ARRAY_KINDS))
def test_quantize_rejects_bad_weights(kind):
    W = np.random.default_rng(0).standard_normal((3, 4))
    expect_rejected(lambda: quantize_int8(corrupt(W, kind) if kind not in ("last+1", "first+1") else np.ones(5)),
                    "quantize_int8", "W")
    expect_rejected(lambda: quantize_int4(corrupt(W, kind) if kind not in ("last+1", "first+1") else np.ones(5), 2),
                    "quantize_int4", "W")


def test_bad_options_rejected():
    W = np.ones((2, 6))
    expect_rejected(lambda: quantize_int8(np.full((2, 2), np.nan)), "quantize_int8", "W")
    expect_rejected(lambda: quantize_int4(W, group_size=4), "quantize_int4", "group_size")
    rejects_all(lambda g: quantize_int4(W, group_size=g), "quantize_int4", "group_size", BAD_COUNTS + (0,))
    expect_rejected(lambda: pack_int4(np.array([[16]])), "pack_int4", "q")
    expect_rejected(lambda: pack_int4(np.array([[-1]])), "pack_int4", "q")
    expect_rejected(lambda: pack_int4(np.array([[1.0]])), "pack_int4", "q")
    expect_rejected(lambda: pack_int4(np.array([1, 2])), "pack_int4", "q")
    expect_rejected(lambda: unpack_int4(np.zeros((1, 2), np.uint8), 5), "unpack_int4", "packed")
    expect_rejected(lambda: unpack_int4(np.zeros((1, 2), np.int8), 4), "unpack_int4", "packed")
    rejects_all(lambda n: unpack_int4(np.zeros((1, 2), np.uint8), n), "unpack_int4", "in_features", BAD_COUNTS)
    lin = make_linear(np.random.default_rng(0), 6, 2, True, np.float32, 1.0)
    for bits in (3, 16, True, "8", None):
        expect_rejected(lambda: QuantLinear(lin, bits), "QuantLinear", "bits")
        expect_rejected(lambda: quantize_model(ModuleList([lin]), bits), "quantize_model", "bits")
    expect_rejected(lambda: QuantLinear("W", 8), "QuantLinear", "linear")
    expect_rejected(lambda: quantize_model([lin], 8), "quantize_model", "model")
    model = ModuleList([lin])
    expect_rejected(lambda: quantize_model(model, 4, group_size=4), "quantize_model", "group_size")
    assert model[0] is lin  # nothing replaced when a layer is refused
    ql = QuantLinear(lin, 8).eval()
    for bad in (np.ones((2, 6), np.float64), np.ones((2, 5), np.float32), [1.0] * 6, np.ones((2, 6), np.int64)):
        expect_rejected(lambda: ql.forward(bad), "QuantLinear.forward", "x")


# -- whole models ----------------------------------------------------------------------------------
def test_quantize_model_replaces_every_linear():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=32))
    linears = [m for _, m in model.named_modules() if isinstance(m, Linear)]
    n_float = sum(p.data.nbytes for m in linears for p in m.parameters())
    info = quantize_model(model, 8)
    assert info["layers"] == len(linears) == 2 * 6  # q, k, v, o, fc, proj per block
    assert not any(isinstance(m, Linear) for _, m in model.named_modules())
    assert sum(isinstance(m, QuantLinear) for _, m in model.named_modules()) == len(linears)
    assert info["bytes_before"] == n_float
    assert info["bytes_after"] == sum(m.nbytes for _, m in model.named_modules() if isinstance(m, QuantLinear))
    assert not model.training
    with pytest.raises(RuntimeError, match="QuantLinear.forward"):
        model.train().forward(np.zeros((1, 4), np.int64))


def test_shared_linear_becomes_one_quant_linear():
    lin = make_linear(np.random.default_rng(0), 8, 4, False, np.float32, 1.0)
    model = ModuleList([lin, lin])
    info = quantize_model(model, 4, group_size=4)
    assert info["layers"] == 1 and model[0] is model[1] and isinstance(model[0], QuantLinear)
    assert info["bytes_before"] == 8 * 4 * 4 and info["bytes_after"] == weight_bytes(model[0].qweight)


def one_blas_thread():
    """Small matmuls run fastest on one BLAS thread, above all on shared cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


@pytest.fixture(scope="module")
def trained():
    """A two-layer GPT trained for 100 steps on the default corpus; its validation batches."""
    text = default_corpus(200_000)
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tok.encode_array(text), 0.1, seed=0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, d_model=64)
    model = GPT(cfg, seed=0)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(1)
    with one_blas_thread():
        for _ in range(100):
            x, y = get_batch(train_ids, 16, cfg.block_size, rng)
            opt.zero_grad()
            model.forward(x, y)
            model.backward()
            opt.step()
    model.eval()
    vrng = np.random.default_rng(2)
    val = [get_batch(val_ids, 16, cfg.block_size, vrng) for _ in range(8)]
    return model, val


def evaluate(model, val):
    """Mean validation loss and the logits of every batch."""
    with one_blas_thread():
        outs = [model.forward(x, y) for x, y in val]
    return float(np.mean([loss for _, loss in outs])), np.concatenate([logits for logits, _ in outs])


def quantized_copy(model, bits, group_size=64):
    clone = GPT(model.cfg)
    clone.load_state_dict(model.state_dict())
    info = quantize_model(clone, bits, group_size)
    return clone, info


@pytest.mark.parametrize("bits, ppl_rtol", [(8, 0.01), (4, 0.05)])
def test_trained_gpt_quantised(trained, bits, ppl_rtol):
    model, val = trained
    loss, logits = evaluate(model, val)
    assert np.exp(loss) < 20, f"the float model did not learn: perplexity {np.exp(loss):.2f}"
    qmodel, info = quantized_copy(model, bits)
    qloss, qlogits = evaluate(qmodel, val)
    ppl, qppl = np.exp(loss), np.exp(qloss)
    max_err = float(np.abs(qlogits - logits).max())
    whole_before = sum(p.data.nbytes for p in model.parameters())
    whole_after = whole_before - info["bytes_before"] + info["bytes_after"]
    print(f"\nint{bits}: val loss {loss:.4f} -> {qloss:.4f}, perplexity {ppl:.3f} -> {qppl:.3f} "
          f"({100 * (qppl / ppl - 1):+.2f}%), max |logit error| {max_err:.4f} (logit range "
          f"{float(np.ptp(logits)):.1f}); Linear bytes {info['bytes_before']} -> {info['bytes_after']} "
          f"({info['bytes_before'] / info['bytes_after']:.2f}x); whole model {whole_before} -> {whole_after}")
    assert abs(qppl / ppl - 1) <= ppl_rtol
    assert max_err <= (0.01 if bits == 8 else 0.1) * float(np.ptp(logits))
    # bytes per float32 byte, I >= 64 and g = 64: (1 + 4/I)/4 for int8, (1/2 + 5/g)/4 for 4 bits
    expected = 0.25 + 1 / 64 if bits == 8 else 1 / 8 + 5 / (4 * 64)
    assert info["bytes_after"] <= expected * info["bytes_before"] + sum(
        m.bias.nbytes for _, m in qmodel.named_modules() if isinstance(m, QuantLinear))


def test_quantised_llama_and_cached_generation():
    """Every Linear of a LLaMA (q/k/v/o, gate/up/down, the untied head) is replaced; the quantised GPT
    decodes with KV caches exactly as without them (the caches take their dtype from the QuantWeight)."""
    from npformer.generate import generate
    from npformer.models.llama import Llama, LlamaConfig

    llama = Llama(LlamaConfig(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                              intermediate_size=64), seed=0)
    ids = np.random.default_rng(0).integers(0, 13, size=(2, 7))
    llama.eval()
    ref = llama.forward(ids)[0]
    n_linear = sum(isinstance(m, Linear) for _, m in llama.named_modules())
    info = quantize_model(llama, 8, group_size=32)
    assert info["layers"] == n_linear == 2 * 7 + 1
    out = llama.forward(ids)[0]
    assert np.abs(out - ref).max() <= 0.01 * np.ptp(ref)
    gpt = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, d_model=32))
    quantize_model(gpt, 4, group_size=16)
    cached = generate(gpt, ids[:, :3], 5, top_k=1, use_cache=True)
    uncached = generate(gpt, ids[:, :3], 5, top_k=1, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
