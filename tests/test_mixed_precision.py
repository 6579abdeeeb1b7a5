"""Mixed precision: bf16 rounding bit for bit against torch, loss scaling, bf16/fp16 training curves."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from npformer.mixed_precision import (MixedPrecisionTrainer, bf16_bits, bf16_to_float32, round_bf16, round_to)
from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.module import Parameter
from npformer.optim.optimizer import SGD, AdamW


def torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


EDGE_BITS = np.array([
    0x00000000, 0x80000000,  # +-0
    0x3F808000, 0x3F818000, 0xBF808000,  # exact ties: to even (down), to even (up), negative
    0x3F808001, 0x3F807FFF,  # just above / below a tie
    0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # largest float32 rounds to inf; a tie at the top; just below
    0x7F800000, 0xFF800000,  # +-inf
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x80008001, 0x00400000,  # subnormals, ties among them
    0x00800000, 0x0080FFFF,  # the smallest normal, and rounding up from it
], dtype=np.uint32)


@pytest.mark.derivation("MP.1")
def test_bf16_rounding_equals_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)  # every exponent, sign, mantissa
    x = np.concatenate([sample, EDGE_BITS]).view(np.float32)
    finite_or_inf = ~np.isnan(x)
    ours, theirs = bf16_bits(x), torch_bits(x)
    assert np.array_equal(ours[finite_or_inf], theirs[finite_or_inf])
    # NaN stays NaN (torch's vectorised CPU path writes 0xFFFF, its scalar path 0x7FC0, as here).
    assert np.isnan(bf16_to_float32(ours[~finite_or_inf])).all() and (ours[~finite_or_inf] == 0x7FC0).all()
    assert np.isnan(bf16_to_float32(theirs[~finite_or_inf])).all()
    assert (~finite_or_inf).sum() > 1000  # the sample does hold NaNs (any exponent-255 pattern with a mantissa)


@pytest.mark.derivation("MP.1")
def test_ties_round_to_even_by_the_formula():
    """(MP.1) evaluated directly: a tie (low half 0x8000) keeps the even neighbour."""
    x = np.array([0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32)
    assert list(bf16_bits(x)) == [0x3F80, 0x3F82]
    assert bf16_bits(np.array([3.4028235e38], dtype=np.float32))[0] == 0x7F80  # rounds past the largest bf16


@pytest.mark.derivation("MP.2")
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40))
def test_round_bf16_is_the_nearest_bf16_value(values):
    x = np.array(values, dtype=np.float32)
    r = round_bf16(x)
    assert r.dtype == np.float32 and (r.view(np.uint32) & 0xFFFF == 0).all()
    assert np.array_equal(r, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.array_equal(round_bf16(r), r)  # idempotent: bf16 values are exact
    finite = np.isfinite(r)
    with np.errstate(over="ignore", invalid="ignore"):
        err = np.abs(r[finite].astype(np.float64) - x[finite])
    assert (err <= 2.0**-8 * np.abs(x[finite].astype(np.float64)) + 2.0**-133).all()  # half an ulp of 8 bits


def test_round_to_float16_matches_torch():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 1e3
    x[:3] = [1e6, -1e6, 1e-9]
    assert np.array_equal(round_to(x, "float16"), torch.from_numpy(x).half().float().numpy())


def test_bad_input():
    for fn in (bf16_bits, round_bf16):
        with pytest.raises(TypeError, match=f"{fn.__name__}: argument 'x'"):
            fn(np.zeros(3, dtype=np.float64))
        with pytest.raises(TypeError, match=f"{fn.__name__}: argument 'x'"):
            fn([1.0])
    with pytest.raises(TypeError, match="bf16_to_float32: argument 'bits'"):
        bf16_to_float32(np.zeros(3, dtype=np.int16))
    with pytest.raises(ValueError, match="round_to: argument 'precision'"):
        round_to(np.zeros(2, dtype=np.float32), "int8")
    model = tiny_gpt()
    with pytest.raises(TypeError, match="MixedPrecisionTrainer: argument 'model'"):
        MixedPrecisionTrainer("gpt", lambda ps: SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="MixedPrecisionTrainer: argument 'precision'"):
        MixedPrecisionTrainer(model, lambda ps: SGD(ps, lr=0.1), precision="fp8")
    with pytest.raises(ValueError, match="MixedPrecisionTrainer: argument 'init_scale'"):
        MixedPrecisionTrainer(model, lambda ps: SGD(ps, lr=0.1), init_scale=0.0)
    with pytest.raises(ValueError, match="MixedPrecisionTrainer: argument 'model'"):
        MixedPrecisionTrainer(tiny_gpt().astype("float64"), lambda ps: SGD(ps, lr=0.1))
    with pytest.raises(TypeError, match="MixedPrecisionTrainer.step: argument 'forward_backward'"):
        MixedPrecisionTrainer(model, lambda ps: SGD(ps, lr=0.1)).step(1.0)


class Scalar:
    """A one-parameter 'model' whose gradient the test chooses: loss = g * w."""

    def __init__(self, g):
        from npformer.nn.module import Module

        class M(Module):
            pass

        self.module = M()
        self.module.w = Parameter(np.ones(2, dtype=np.float32))
        self.g = g

    def forward_backward(self):
        self.module.w.grad += np.float32(self.g)
        return float(self.g)


@pytest.mark.derivation("MP.6")
def test_loss_scaling_skips_overflowing_steps_and_grows_back():
    s = Scalar(1000.0)  # 1000 * 2**16 overflows float16 (max 65504); 1000 * 64 does not
    trainer = MixedPrecisionTrainer(s.module, lambda ps: SGD(ps, lr=1e-6), precision="float16",
                                    init_scale=2.0**16, growth_interval=3)
    scales, stepped = [], []
    for _ in range(14):
        w_before = trainer.master[0].data.copy()
        _, ok = trainer.step(s.forward_backward)
        stepped.append(ok)
        scales.append(trainer.scale)
        assert ok != np.array_equal(trainer.master[0].data, w_before)  # a skipped step changes nothing
    # 2**16 .. 2**7 overflow (1000 * 128 > 65504): ten halvings, then 2**6 is good three times -> 2**7 overflows again.
    assert stepped[:10] == [False] * 10 and scales[9] == 2.0**6
    assert stepped[10:13] == [True] * 3 and scales[12] == 2.0**7
    assert stepped[13] is False and scales[13] == 2.0**6
    assert trainer.skipped == 11


@pytest.mark.derivation("MP.5")
def test_unscaled_gradient_is_the_rounded_scaled_gradient_over_s():
    s = Scalar(1e-6)  # below float16's smallest normal: scaling keeps its digits
    trainer = MixedPrecisionTrainer(s.module, lambda ps: SGD(ps, lr=0.0), precision="float16", init_scale=2.0**10)
    trainer.step(s.forward_backward)
    S = np.float32(2.0**10)
    expected = np.float32(np.float16(np.float32(1e-6) * S)) / S
    assert trainer.master[0].grad[0] == expected
    assert abs(expected - 1e-6) < 1e-3 * 1e-6  # scaling keeps 1e-6 to fp16's relative precision
    assert abs(np.float32(np.float16(1e-6)) - 1e-6) > 1e-2 * 1e-6  # unscaled, a subnormal loses digits


@pytest.mark.derivation("MP.3")
def test_master_weights_stay_float32_and_the_working_copy_is_rounded():
    model = tiny_gpt()
    trainer = MixedPrecisionTrainer(model, lambda ps: AdamW(ps, lr=1e-2), precision="bfloat16")
    ids, targets = batch(model)
    trainer.step(lambda: fb(model, ids, targets))
    for p, m in zip(model.parameters(), trainer.master):
        assert m.data.dtype == np.float32
        trainer.cast_working_copy()
        assert np.array_equal(p.data, round_bf16(m.data))
    assert any((m.data.view(np.uint32) & 0xFFFF).any() for m in trainer.master)  # the master keeps all 24 bits


def tiny_gpt():
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=16), seed=0)


def batch(model, seed=1):
    """A learnable task: each target is the next token of a cyclic sequence."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 11, (8, 1))
    seq = (start + np.arange(9)) % 11
    return seq[:, :-1], seq[:, 1:]


def fb(model, ids, targets):
    _, loss = model.forward(ids, targets)
    model.backward()
    return loss


def curve(precision, steps=60):
    model = tiny_gpt()
    trainer = MixedPrecisionTrainer(model, lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.0), precision=precision,
                                    growth_interval=20)
    losses = []
    for i in range(steps):
        ids, targets = batch(model, seed=i)
        losses.append(trainer.step(lambda: fb(model, ids, targets))[0])
    model.eval()
    trainer.cast_working_copy()
    ids, targets = batch(model, seed=999)
    return losses, model.forward(ids, targets)[1]


@pytest.mark.derivation("MP.4")
def test_bf16_and_fp16_training_tracks_float32():
    (c32, final32), (_, finalbf), (c16, final16) = curve("float32"), curve("bfloat16"), curve("float16")
    assert c32[-1] < 0.5 * c32[0]  # it learns
    assert abs(finalbf - final32) <= 0.05 * final32
    assert abs(final16 - final32) <= 0.05 * final32
    assert np.mean(c16[-10:]) == pytest.approx(np.mean(c32[-10:]), rel=0.05)
