"""The suite's tolerances, stated once.

``assert_close`` compares elementwise with relative tolerance ``rtol`` and an
absolute floor of ``rtol * scale``, where ``scale`` defaults to ``max|expected|``
(at least 1e-8): a value that cancels to near zero is judged against the scale
of its tensor rather than against itself. Pass ``scale`` when a whole tensor is
zero in exact arithmetic and its size is set by the inputs instead.
"""

import numpy as np

# Agreement with the PyTorch autograd oracle, by the dtype under test.
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}

# A normalisation's r, or its backward's dx from its own cache, against its formula in exact arithmetic: each
# row within this many units of the dtype's machine epsilon (of r itself; of r * max|dxhat| for dx, the size of
# the terms that cancel in (LN.10)). Measured: dx at most about 2 units for rows up to 4096 wide, 3.6 at 262144.
NORM_ULPS = 8

# Central finite differences in float64 (step 1e-6): truncation ~1e-12, round-off ~1e-10.
FD_RTOL = 1e-6
FD_EPS = 1e-6

# erf is held to float64 round-off, in units of float64's machine epsilon (2.2e-16):
# a few units absolute (about 1e-15) and 45 units relative (about 1e-14).
F64_EPS = float(np.finfo(np.float64).eps)
ERF_ATOL = 5 * F64_EPS
ERF_RTOL = 45 * F64_EPS

# Triton kernels against the NumPy reference, by the dtype of the kernel's inputs: float32 as
# the oracle's float32 bound, the 16-bit formats at four units of their machine epsilon.
KERNEL_RTOL = {"float32": RTOL[np.dtype(np.float32)], "float16": 4 * 2.0**-10, "bfloat16": 4 * 2.0**-7}

# A whole model sums many float64 round-offs: about 1e-9 relative against its torch twin.
MODEL_RTOL = 1e-9
# Some model gradients are zero in exact arithmetic (a key bias: softmax ignores a per-row shift):
# their recorded values are round-off, about 1e-20, so the divergence finder also gets a floor.
FINDER_ATOL = 1e-15

# A Hugging Face model against npformer with the same weights: logits at about 1e-5 relative in
# float32 (two libraries' summation orders over a few layers) and 1e-10 in float64; the loss
# gradient of every parameter (a longer chain of products) at 1e-8 relative in float64.
HF_LOGITS_RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
HF_GRAD_RTOL = 1e-8


def assert_close(actual, expected, *, rtol=None, scale=None, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    if rtol is None:
        rtol = RTOL[actual.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=rtol, atol=rtol * max(scale, 1e-8), err_msg=what
    )
