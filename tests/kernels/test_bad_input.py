"""Bad input to the kernels' functional API, generated: every argument made wrong in every
way that is wrong for it (not a tensor, a dtype no kernel takes, the wrong rank or size,
an option of the wrong type or out of range). Each must raise ``ValueError`` or
``TypeError`` naming the function and the argument, before any kernel is launched.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from tests.badinput import NON_ARRAYS, expect_rejected, not_an_array
from tests.kernels import DEVICE

# Not a tensor at all (a NumPy array included: the API takes torch tensors only).
NON_TENSORS = NON_ARRAYS + ("ndarray",)
# A dtype no kernel takes (float32 inputs: float16 / bfloat16 differ from the other tensors').
BAD_DTYPES = ("int64", "int32", "bool", "float64", "complex64", "uint8")
OTHER_FLOATS = ("float16", "bfloat16")
RANKS = ("rank+1", "rank-1")
SIZES = ("last+1", "first+1")


def corrupt(t: torch.Tensor, kind: str):
    """``t`` made wrong in the way ``kind`` names (values kept where the kind allows)."""
    if kind in NON_ARRAYS:
        return not_an_array(t, kind)
    if kind == "ndarray":
        return t.detach().cpu().numpy()
    if kind in BAD_DTYPES + OTHER_FLOATS:
        return t.to(getattr(torch, kind))
    if kind == "rank+1":
        return t[None]
    if kind == "rank-1":
        return t.reshape(-1)[0] if t.dim() <= 1 else t.reshape(-1, *t.shape[2:])
    if kind == "last+1":
        return torch.cat([t, t[..., :1]], dim=-1)
    if kind == "first+1":
        return torch.cat([t, t[:1]], dim=0)
    raise ValueError(f"corrupt: unknown kind {kind!r}")


def _zeros(*shape):
    return torch.zeros(shape, dtype=torch.float32, device=DEVICE)


# ---------------------------------------------------------------------------------------
# flash_attention(q, k, v, causal=, scale=, return_lse=)

ATTENTION_TENSORS = (
    [("q", kind) for kind in NON_TENSORS + BAD_DTYPES + RANKS]
    + [("k", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
    + [("v", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
)
ATTENTION_OPTIONS = (
    [("causal", v) for v in (1, 0, "yes", None, np.float64(1.0))]
    + [("return_lse", v) for v in (1, None, "no")]
    + [("scale", v) for v in (math.nan, math.inf, -1.0, 0.0, "x", True, [0.5])]
)


@pytest.mark.parametrize("arg,kind", ATTENTION_TENSORS)
def test_flash_attention_rejects_bad_tensors(arg, kind):
    inputs = {"q": _zeros(1, 4, 3, 16), "k": _zeros(1, 2, 5, 16), "v": _zeros(1, 2, 5, 16)}
    inputs[arg] = corrupt(inputs[arg], kind)
    expect_rejected(lambda: kernels.flash_attention(**inputs), "flash_attention", arg)


@pytest.mark.parametrize("arg,value", ATTENTION_OPTIONS)
def test_flash_attention_rejects_bad_options(arg, value):
    q, k = _zeros(1, 2, 3, 16), _zeros(1, 1, 3, 16)
    expect_rejected(lambda: kernels.flash_attention(q, k, k, **{arg: value}), "flash_attention", arg)


def test_flash_attention_shape_rules():
    """Heads that do not divide, a head size over 128: named, not launched."""
    q = _zeros(1, 4, 3, 16)
    expect_rejected(lambda: kernels.flash_attention(q, _zeros(1, 3, 5, 16), _zeros(1, 3, 5, 16)),
                    "flash_attention", "k")
    big = _zeros(1, 1, 2, 130)
    expect_rejected(lambda: kernels.flash_attention(big, big, big), "flash_attention", "q")


# ---------------------------------------------------------------------------------------
# rms_norm(x, weight, eps, residual=)

RMSNORM_TENSORS = (
    [("x", kind) for kind in NON_TENSORS + BAD_DTYPES + ("rank0",)]
    + [("weight", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
    + [("residual", kind) for kind in tuple(k for k in NON_TENSORS if k != "none") + BAD_DTYPES + OTHER_FLOATS
       + RANKS + SIZES]
)
RMSNORM_OPTIONS = [("eps", v) for v in (-1e-6, math.nan, math.inf, "x", True, None)]


@pytest.mark.parametrize("arg,kind", RMSNORM_TENSORS)
def test_rms_norm_rejects_bad_tensors(arg, kind):
    inputs = {"x": _zeros(2, 8), "weight": _zeros(8), "residual": _zeros(2, 8)}
    inputs[arg] = inputs[arg].sum() if kind == "rank0" else corrupt(inputs[arg], kind)
    expect_rejected(lambda: kernels.rms_norm(**inputs), "rms_norm", arg)


@pytest.mark.parametrize("arg,value", RMSNORM_OPTIONS)
def test_rms_norm_rejects_bad_options(arg, value):
    expect_rejected(lambda: kernels.rms_norm(_zeros(2, 8), _zeros(8), **{arg: value}), "rms_norm", arg)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_rms_norm_weight_is_in_the_input_dtype_or_float32(x_dtype, w_dtype):
    """A float32 weight is accepted with 16-bit rows (see test_rmsnorm_kernel); any other mix is not."""
    x, w = _zeros(2, 8).to(x_dtype), _zeros(8).to(w_dtype)
    message = expect_rejected(lambda: kernels.rms_norm(x, w), "rms_norm", "weight")
    assert "float32" in message


# ---------------------------------------------------------------------------------------
# apply_rope(q, k, base=, offset=, positions=, inplace=)

ROPE_TENSORS = (
    [("q", kind) for kind in NON_TENSORS + BAD_DTYPES + RANKS]
    + [("k", kind) for kind in NON_TENSORS + BAD_DTYPES + OTHER_FLOATS + RANKS + SIZES]
)
ROPE_OPTIONS = (
    [("base", v) for v in (0.0, -1.0, math.nan, math.inf, "x", True, None)]
    + [("offset", v) for v in (1.5, -1, True, "3", None, 2.0)]
    + [("inplace", v) for v in (1, None, "yes")]
)


@pytest.mark.parametrize("arg,kind", ROPE_TENSORS)
def test_apply_rope_rejects_bad_tensors(arg, kind):
    inputs = {"q": _zeros(1, 2, 3, 4), "k": _zeros(1, 1, 3, 4)}
    inputs[arg] = corrupt(inputs[arg], kind)
    expect_rejected(lambda: kernels.apply_rope(**inputs), "apply_rope", arg)


@pytest.mark.parametrize("arg,value", ROPE_OPTIONS)
def test_apply_rope_rejects_bad_options(arg, value):
    q, k = _zeros(1, 2, 3, 4), _zeros(1, 1, 3, 4)
    expect_rejected(lambda: kernels.apply_rope(q, k, **{arg: value}), "apply_rope", arg)


@pytest.mark.parametrize("kind", ["list", "float", "bool", "shape", "offset"])
def test_apply_rope_rejects_bad_positions(kind):
    q, k = _zeros(1, 2, 3, 4), _zeros(1, 1, 3, 4)
    pos = torch.arange(3, device=DEVICE)
    arg, kw = "positions", {"positions": {"list": [0, 1, 2], "float": pos.float(), "bool": pos > 0,
                                          "shape": torch.arange(4, device=DEVICE), "offset": pos}[kind]}
    if kind == "offset":
        arg, kw["offset"] = "offset", 2
    expect_rejected(lambda: kernels.apply_rope(q, k, **kw), "apply_rope", arg)


def test_apply_rope_shape_rules():
    """An odd head size cannot be split into pairs: named, not launched."""
    expect_rejected(lambda: kernels.apply_rope(_zeros(1, 2, 3, 5), _zeros(1, 1, 3, 5)), "apply_rope", "q")


@given(st.sampled_from(["offset", "positions"]), st.sampled_from([2**31 - 2, 2**31 - 1, 2**31, 2**53 - 1, 2**62]))
def test_rope_positions_past_int32_are_refused_not_wrapped(where, last):
    """The kernel forms positions in int32: a last position past 2**31 - 1 must be refused by name."""
    T = 3
    q, k = _zeros(1, 1, T, 4), _zeros(1, 1, T, 4)
    first = last - (T - 1)
    call = (lambda: kernels.apply_rope(q, k, offset=first)) if where == "offset" else (
        lambda: kernels.apply_rope(q, k, positions=torch.arange(first, last + 1, device=DEVICE)))
    if last <= 2**31 - 1:
        q_rot, k_rot = call()  # in range: runs
        assert q_rot.shape == q.shape and k_rot.shape == k.shape
    else:
        expect_rejected(call, "apply_rope", where)


def test_rope_in_place_on_one_tensor_and_rms_norm_of_nothing_are_refused():
    x = _zeros(1, 1, 2, 4)
    expect_rejected(lambda: kernels.apply_rope(x, x, inplace=True), "apply_rope", "k")
    expect_rejected(lambda: kernels.rms_norm(_zeros(2, 0), _zeros(0), 1e-6), "rms_norm", "x")
