"""What GPT and LLaMA share as language models: configs that are plain JSON, FLOP counts, KV caches of any
length up to the context, and the input check's error types."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.generate import generate
from npformer.models.gpt import GPT, GPTConfig
from npformer.models.llama import Llama, LlamaConfig

SMALL = {"gpt": (GPT, GPTConfig, dict(vocab_size=13, block_size=10, n_layer=2, n_head=2, d_model=8, dtype="float64")),
         "llama": (Llama, LlamaConfig, dict(vocab_size=13, block_size=10, n_layer=2, n_head=4, n_kv_head=2, d_model=16,
                                            sliding_window=4, dtype="float64"))}
NUMPY_SCALARS = [np.int64, np.int32, np.uint16]


@pytest.mark.parametrize("family", sorted(SMALL))
@given(kind=st.sampled_from(NUMPY_SCALARS), data=st.data())
def test_numpy_scalars_become_python_numbers(family, kind, data):
    """A config made from NumPy values (read from an array, a sweep) is plain JSON and equals the plain one."""
    _, config_cls, fields = SMALL[family]
    name = data.draw(st.sampled_from([k for k, v in fields.items() if isinstance(v, int)]))
    given_cfg = config_cls(**{**fields, name: kind(fields[name])})
    assert given_cfg == config_cls(**fields) and type(getattr(given_cfg, name)) is int
    assert json.loads(json.dumps(given_cfg.to_dict())) == config_cls(**fields).to_dict()


def test_numpy_floats_and_bools_become_python_values():
    cfg = LlamaConfig(**SMALL["llama"][2] | dict(rope_theta=np.float32(5e5), qkv_bias=np.True_))
    assert type(cfg.rope_theta) is float and cfg.rope_theta == 5e5 and cfg.qkv_bias is True
    assert type(GPTConfig(**SMALL["gpt"][2] | dict(dropout=np.float64(0.25))).dropout) is float


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("name", ["block_size", "vocab_size", "d_model"])
def test_sizes_beyond_exact_positions_are_refused_by_the_config(family, name):
    _, config_cls, fields = SMALL[family]
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}: argument '{name}'"):
        config_cls(**{**fields, name: 2**60})


@pytest.mark.parametrize("name", ["sliding_window", "head_dim", "intermediate_size"])
def test_llama_optional_sizes_are_bounded_too(name):
    with pytest.raises(ValueError, match=rf"LlamaConfig: argument '{name}'"):
        LlamaConfig(**{**SMALL["llama"][2], name: 2**60})


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("seq_len, error", [(0, ValueError), (-5, ValueError), (2.5, ValueError), ("3", ValueError),
                                            (True, ValueError)])
def test_flops_per_token_checks_seq_len(family, seq_len, error):
    _, config_cls, fields = SMALL[family]
    cfg = config_cls(**fields)
    with pytest.raises(error, match=r"flops_per_token: argument 'seq_len'"):
        cfg.flops_per_token(seq_len)
    assert cfg.flops_per_token(cfg.block_size) == cfg.flops_per_token() < cfg.flops_per_token(cfg.block_size + 1)


@pytest.mark.parametrize("family", sorted(SMALL))
@given(max_len=st.integers(1, 10), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_short_caches_decode_as_the_full_forward(family, max_len, chunks, seed):
    """Caches of max_len <= block_size positions give the logits of one uncached forward, and refuse by name
    a chunk that would not fit."""
    model_cls, config_cls, fields = SMALL[family]
    model = model_cls(config_cls(**fields), seed=1).eval()
    ids = np.random.default_rng(seed).integers(0, 13, (2, sum(chunks)))
    caches = model.make_kv_caches(2, max_len=max_len)
    assert all(c.max_len == max_len for c in caches)
    start = 0
    full, _ = model.forward(ids[:, :min(sum(chunks), 10)])
    for n in chunks:
        if start + n > max_len:
            with pytest.raises(ValueError, match=r"forward: argument 'ids'"):
                model.forward(ids[:, start:start + n], kv_caches=caches)
            assert caches[0].length == start  # nothing moved
            break
        logits, _ = model.forward(ids[:, start:start + n], kv_caches=caches)
        np.testing.assert_allclose(logits, full[:, start:start + n], rtol=1e-12, atol=1e-12)
        start += n


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("max_len", [0, 11, -1, 2.0, True, "3"])
def test_make_kv_caches_refuses_a_length_outside_the_context(family, max_len):
    model_cls, config_cls, fields = SMALL[family]
    with pytest.raises(ValueError, match=r"make_kv_caches: argument 'max_len'"):
        model_cls(config_cls(**fields)).make_kv_caches(1, max_len=max_len)


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("caches", [{0: None}, "caches", 3, (None, None)])
def test_kv_caches_of_the_wrong_type_are_a_type_error(family, caches):
    model_cls, config_cls, fields = SMALL[family]
    model = model_cls(config_cls(**fields)).eval()
    with pytest.raises(TypeError, match=r"forward: argument 'kv_caches'"):
        model.forward(np.zeros((1, 2), np.int64), kv_caches=caches)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_generate_allocates_caches_only_for_what_it_decodes(family, monkeypatch):
    """A model with a long context decodes with caches of prompt + new tokens positions."""
    model_cls, config_cls, fields = SMALL[family]
    model = model_cls(config_cls(**fields), seed=0)
    lengths = []
    original = model.make_kv_caches
    monkeypatch.setattr(model, "make_kv_caches", lambda b, max_len=None: lengths.append(max_len) or original(b, max_len))
    out = generate(model, np.array([[1, 2, 3]]), 4, temperature=0)
    assert lengths == [7] and out.shape == (1, 7)
    plain = generate(model, np.array([[1, 2, 3]]), 4, temperature=0, use_cache=False)
    np.testing.assert_array_equal(out, plain)
