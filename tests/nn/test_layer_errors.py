"""Bad input to layers, the model and its config: a named ValueError/TypeError before any work."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.models.gpt import GPT, GPTConfig
from npformer.nn.attention import KVCache, MultiHeadAttention
from npformer.nn.layers import Dropout, Embedding, LayerNorm, Linear, RMSNorm
from npformer.nn.mlp import MLP, SwiGLUMLP
from npformer.nn.module import Module, Parameter
from tests.badinput import ARRAY_KINDS, DTYPE_KINDS, NON_ARRAYS, corrupt, expect_rejected

RNG = np.random.default_rng(0)
D = 6


def layer_and_input(kind):
    x = RNG.standard_normal((2, 3, D)).astype(np.float32)
    return {
        "Linear": (Linear(D, 4, rng=RNG), x),
        "LayerNorm": (LayerNorm(D), x),
        "RMSNorm": (RMSNorm(D), x),
        "MLP": (MLP(D, 8, rng=RNG), x),
        "SwiGLUMLP": (SwiGLUMLP(D, 8, rng=RNG), x),
        "MultiHeadAttention": (MultiHeadAttention(D, 2, rng=RNG), x),
    }[kind]


# Wrong for every layer input: not an array, not a float32 array, the wrong feature size.
# (The rank of x is free for all but attention, so "rank" kinds are tested there alone.)
FEATURE_KINDS = NON_ARRAYS + DTYPE_KINDS + ("last+1",)


@given(st.sampled_from(["Linear", "LayerNorm", "RMSNorm", "MLP", "SwiGLUMLP", "MultiHeadAttention"]),
       st.sampled_from(FEATURE_KINDS + ("float64",)))
def test_layer_forward_rejects_bad_x(kind, bad):
    layer, x = layer_and_input(kind)
    message = expect_rejected(lambda: layer.forward(corrupt(x, bad) if bad != "float64" else x.astype(np.float64)),
                              f"{kind}.forward", "x")
    assert message.startswith(f"{kind}.forward")  # the layer the user called comes first
    assert layer.pending_backwards == 0  # nothing was kept


@given(st.sampled_from(["rank+1", "rank-1"]))
def test_attention_rejects_wrong_rank(bad):
    layer, x = layer_and_input("MultiHeadAttention")
    expect_rejected(lambda: layer.forward(corrupt(x, bad)), "MultiHeadAttention.forward", "x")


@given(st.sampled_from(NON_ARRAYS + ("float64", "float16", "bool", "object")))
def test_embedding_rejects_bad_ids(bad):
    emb = Embedding(5, D, rng=RNG)
    ids = np.array([[0, 1, 4]])
    expect_rejected(lambda: emb.forward(corrupt(ids, bad)), "Embedding.forward", "ids")


@given(st.sampled_from(["x", "context", "kv_cache", "causal"]), st.sampled_from(ARRAY_KINDS + ("training",)))
def test_attention_rejects_bad_options(arg, bad):
    if (bad == "none" and arg in ("context", "kv_cache")) or (bad == "first+1" and arg == "x"):
        return  # None is the default (self attention, no cache); the batch size of x is free
    layer, x = layer_and_input("MultiHeadAttention")
    kwargs = {"x": x}
    if arg == "context":
        kwargs["context"] = corrupt(x, bad) if bad != "training" else x[:, :, :-1]
    elif arg == "kv_cache":
        kwargs["kv_cache"] = layer.make_kv_cache(2, 8) if bad == "training" else corrupt(x, bad)
    elif arg == "causal":
        kwargs["causal"] = 1 if bad == "training" else corrupt(x, bad)
    else:
        kwargs["x"] = corrupt(x, bad) if bad != "training" else x.astype(np.float64)
    x_in = kwargs.pop("x")
    expect_rejected(lambda: layer.forward(x_in, **kwargs), "MultiHeadAttention.forward", arg)


OPTIONS = [
    ("Linear", lambda v: Linear(v, 3, rng=RNG), "d_in"),
    ("Linear", lambda v: Linear(3, v, rng=RNG), "d_out"),
    ("Embedding", lambda v: Embedding(v, 3, rng=RNG), "num"),
    ("LayerNorm", lambda v: LayerNorm(v), "dim"),
    ("RMSNorm", lambda v: RMSNorm(v), "dim"),
    ("MLP", lambda v: MLP(4, v, rng=RNG), "d_hidden"),
    ("SwiGLUMLP", lambda v: SwiGLUMLP(v, 4, rng=RNG), "d_model"),
    ("MultiHeadAttention", lambda v: MultiHeadAttention(8, v, rng=RNG), "n_head"),
    ("MultiHeadAttention", lambda v: MultiHeadAttention(8, 4, v, rng=RNG), "n_kv_head"),
    ("KVCache", lambda v: KVCache(1, 1, v, 4), "max_len"),
]


@given(st.sampled_from(OPTIONS), st.sampled_from([0, -1, 2.5, True, "3", None, np.nan]))
def test_layer_sizes_are_positive_integers(option, value):
    layer, build, arg = option
    if value is None and arg == "n_kv_head":  # None means "as many as n_head"
        assert build(value).n_kv_head == 4
        return
    expect_rejected(lambda: build(value), layer, arg)


@given(st.sampled_from([("LayerNorm", lambda v: LayerNorm(4, eps=v), "eps"),
                        ("RMSNorm", lambda v: RMSNorm(4, eps=v), "eps"),
                        ("Dropout", lambda v: Dropout(v, rng=RNG), "p"),
                        ("MultiHeadAttention", lambda v: MultiHeadAttention(8, 2, rng=RNG, scale=v), "scale"),
                        ("Linear", lambda v: Linear(2, 2, rng=RNG, std=v), "std")]),
       st.sampled_from([-1e-3, np.nan, np.inf, -np.inf, True, "0.1", 1.0]))
def test_real_options_are_finite_and_in_range(option, value):
    layer, build, arg = option
    if type(value) is float and value == 1.0 and arg != "p":  # 1.0 is a legal eps, scale and std; only dropout's p must be < 1
        assert isinstance(build(value), Module)
        return
    expect_rejected(lambda: build(value), layer, arg)


@given(st.sampled_from([("dtype", "float16"), ("dtype", "int64"), ("dtype", "nonsense"), ("rng", 0), ("rng", None)]))
def test_layer_dtype_and_rng(case):
    arg, value = case
    expect_rejected(lambda: Linear(2, 2, **{"rng": RNG, arg: value}), "Linear", arg)


CONFIG_FIELDS = {"vocab_size": [0, -1, 2.0, True], "block_size": [0, -4], "n_layer": [0, -1, 1.5],
                 "n_head": [0, 5, -2], "d_model": [0, 7, -12], "dropout": [-0.1, 1.0, np.nan, "0.1"],
                 "bias": [1, "yes", None], "dtype": ["float16", "int32", np.float32]}


@given(st.sampled_from([(f, v) for f, vs in CONFIG_FIELDS.items() for v in vs]))
def test_config_rejects_each_bad_field(case):
    field, value = case
    base = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=12)
    arg = "n_head" if field == "d_model" and value == 7 else field  # 7 is positive: the divisibility fails
    expect_rejected(lambda: GPTConfig(**{**base, field: value}), "GPTConfig", arg)


MODEL = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=12), seed=0)
IDS = np.random.default_rng(1).integers(0, 11, (2, 5))


@given(st.sampled_from(NON_ARRAYS + ("float64", "float32", "bool", "rank+1", "rank-1", "empty-T", "empty-B",
                                     "negative", "too-large", "too-long")))
def test_gpt_forward_rejects_bad_ids(bad):
    ids = {"empty-T": IDS[:, :0], "empty-B": IDS[:0], "negative": IDS - 1, "too-large": IDS + 11,
           "too-long": np.zeros((1, 9), np.int64)}.get(bad)
    if ids is None:
        ids = corrupt(IDS, bad) if bad in NON_ARRAYS + ("rank+1", "rank-1") else IDS.astype(bad)
    expect_rejected(lambda: MODEL.forward(ids), "GPT.forward", "ids")
    assert MODEL.pending_backwards == 0


@given(st.sampled_from(NON_ARRAYS + ("float64", "first+1", "last+1", "rank+1", "out-of-range")))
def test_gpt_forward_rejects_bad_targets(bad):
    t = IDS + 11 if bad == "out-of-range" else IDS.astype(np.float64) if bad == "float64" else corrupt(IDS, bad)
    if t is None:
        return  # None means "no targets"
    expect_rejected(lambda: MODEL.forward(IDS, t), "GPT.forward", "targets")


@given(st.sampled_from(["empty", "short", "not-caches", "tuple-of-arrays", "training", "mixed-lengths", "dict"]))
def test_gpt_forward_rejects_bad_kv_caches(bad):
    model = GPT(MODEL.cfg, seed=0).eval()
    caches = model.make_kv_caches(2)
    if bad == "mixed-lengths":
        model.forward(IDS[:, :1], kv_caches=caches[:1] + caches[1:])
        caches[0].reset()
    value = {"empty": [], "short": caches[:1], "not-caches": [None, None], "tuple-of-arrays": (IDS, IDS),
             "training": caches, "mixed-lengths": caches, "dict": {0: caches[0]}}[bad]
    if bad == "training":
        model.train()
    expect_rejected(lambda: model.forward(IDS, kv_caches=value), "GPT.forward", "kv_caches")


def test_gpt_backward_before_forward_and_after_inference():
    model = GPT(MODEL.cfg, seed=0)
    with pytest.raises(RuntimeError, match="GPT.backward: no forward left to match"):
        model.backward()
    model.forward(IDS)  # no targets: nothing to differentiate
    with pytest.raises(RuntimeError, match="GPT.backward: the matching forward had no targets"):
        model.backward()
    assert model.pending_backwards == 1  # a failed backward consumes nothing
    model.clear_caches()
    model.eval().forward(IDS, IDS)
    with pytest.raises(RuntimeError, match="eval mode keeps no cache"):
        model.backward()


class Net(Module):
    def __init__(self):
        super().__init__()
        self.a = Parameter(np.arange(3, dtype=np.float32))
        self.b = Parameter(np.ones((2, 2), np.float32))


@given(st.sampled_from(["shape", "int64", "bool", "uint8", "float16", "float64", "list", "scalar"]),
       st.sampled_from(["a", "b"]))
def test_load_state_dict_is_all_or_nothing(bad, which):
    net = Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    state = {k: v + 5 for k, v in before.items()}  # every entry would change the model
    state[which] = corrupt(state[which], "last+1" if bad == "shape" else bad) \
        if bad in ("shape", "list", "scalar") else state[which].astype(bad)
    message = expect_rejected(lambda: net.load_state_dict(state), "load_state_dict", "state")
    assert repr(which) in message
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k])  # nothing was written
    if bad in ("float16", "float64"):  # another float dtype loads when asked for explicitly
        net.load_state_dict(state, cast=True)
        np.testing.assert_array_equal(net.state_dict()[which], state[which].astype(np.float32))


def test_load_state_dict_wants_a_mapping():
    expect_rejected(lambda: Net().load_state_dict([("a", np.zeros(3))]), "load_state_dict", "state")
