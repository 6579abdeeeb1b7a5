# %% [markdown]
# # 5. The layer-norm backward, line by line
#
# Layer normalisation rescales each row of activations to mean 0 and variance 1, then
# applies a learned scale $\gamma$ and shift $\beta$. Its backward is the first one in a
# transformer where the gradient of one entry depends on every other entry of the row.
# Here each equation of [proofs/layernorm.md](../proofs/layernorm.md) is evaluated on its own line, its result
# printed, and the outcome compared with `npformer.ops.layernorm` and with finite
# differences.
#
# Shapes: $x$, $y$, $\bar y$ (N, D), one row per token; $\gamma, \beta$ (D,); $\mu$, $\sigma^2$, $r$ (N, 1).

# %%
import time

import numpy as np

from npformer.gradcheck import numerical_gradient
from npformer.ops.layernorm import layernorm_backward, layernorm_forward

np.set_printoptions(precision=4, suppress=True)
t_start = time.perf_counter()
rng = np.random.default_rng(0)
N, D, eps = 2, 5, 1e-5
x = rng.standard_normal((N, D)) * 2.0 + 1.0
gamma, beta = 1.0 + 0.3 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)
dy = rng.standard_normal((N, D))  # the gradient arriving from above
print("x =\n", x)

# %% [markdown]
# ## Forward, (LN.1) to (LN.5)

# %%
mu = x.mean(axis=1, keepdims=True)  # (LN.1)
var = ((x - mu) ** 2).mean(axis=1, keepdims=True)  # (LN.2)
r = 1.0 / np.sqrt(var + eps)  # (LN.3)
xhat = (x - mu) * r  # (LN.4)
y = gamma * xhat + beta  # (LN.5)
print("(LN.1) mu      =", mu.ravel())
print("(LN.2) sigma^2 =", var.ravel())
print("(LN.3) r       =", r.ravel())
print("(LN.4) xhat    =\n", xhat)
print("(LN.5) y       =\n", y)
assert np.allclose(xhat.mean(axis=1), 0, atol=1e-15) and np.allclose((xhat**2).mean(axis=1), var.ravel() * r.ravel()**2)

# %% [markdown]
# ## Backward, (LN.6) to (LN.10)
#
# The parameters are shared by the rows, so their gradients sum over rows; then the
# gradient goes through the affine map to $\hat x$, and through the normalisation with
# (LN.10), $\bar x = r\,(\bar{\hat x} - \mathrm{mean}(\bar{\hat x}) - \hat x\,\mathrm{mean}(\bar{\hat x}\odot\hat x))$.

# %%
dbeta = dy.sum(axis=0)  # (LN.6)
dgamma = (dy * xhat).sum(axis=0)  # (LN.7)
dxhat = dy * gamma  # (LN.8)
mean_dxhat = dxhat.mean(axis=1, keepdims=True)  # (LN.10), second term
mean_dxhat_xhat = (dxhat * xhat).mean(axis=1, keepdims=True)  # (LN.10), third term
dx = r * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)  # (LN.10)
print("(LN.6) dbeta  =", dbeta)
print("(LN.7) dgamma =", dgamma)
print("(LN.8) dxhat  =\n", dxhat)
print("(LN.10) mean(dxhat) =", mean_dxhat.ravel(), "  mean(dxhat * xhat) =", mean_dxhat_xhat.ravel())
print("(LN.10) dx    =\n", dx)

# %% [markdown]
# ## (LN.9): the Jacobian of one row
#
# $\partial\hat x_i/\partial x_j = \frac{r}{D}(D\delta_{ij} - 1 - \hat x_i\hat x_j)$. Formed for row 0,
# it equals the finite-difference Jacobian, and $J^\top \bar{\hat x}$ is (LN.10)'s row.

# %%
J = r[0, 0] / D * (D * np.eye(D) - 1.0 - np.outer(xhat[0], xhat[0]))  # (LN.9)
J_numeric = np.empty((D, D))
for i in range(D):  # row i: d xhat_i / d x, by central differences
    J_numeric[i] = numerical_gradient(lambda: float(layernorm_forward(x[:1], np.ones(D), np.zeros(D), eps)[1]
                                                    .xhat[0, i]), x[:1])[0]
print("(LN.9) J =\n", J)
print(f"max |J - finite differences| = {np.abs(J - J_numeric).max():.1e}")
assert np.allclose(J, J.T) and np.abs(J - J_numeric).max() < 1e-8
assert np.allclose(J.T @ dxhat[0], dx[0], rtol=1e-13, atol=0)

# %% [markdown]
# ## (LN.11): two consequences
#
# Each row of $\bar x$ sums to zero (adding a constant to a row does not change $\hat x$),
# and its component along $\hat x$ is $\varepsilon r^3 \sum_i \bar{\hat x}_i\hat x_i$: zero
# only when $\varepsilon = 0$.

# %%
along_xhat = (dx * xhat).sum(axis=1)
predicted = eps * r.ravel() ** 3 * (dxhat * xhat).sum(axis=1)  # (LN.11)
print("(LN.11) sum_j dx_j        =", np.array2string(dx.sum(axis=1), formatter={"float": "{:.2e}".format}))
print("(LN.11) sum_j dx_j xhat_j =", np.array2string(along_xhat, formatter={"float": "{:.6e}".format}),
      " predicted", np.array2string(predicted, formatter={"float": "{:.6e}".format}))
assert np.allclose(dx.sum(axis=1), 0, atol=1e-14)
assert np.allclose(along_xhat, predicted, rtol=1e-6, atol=1e-15)

# %% [markdown]
# ## npformer's op and finite differences
#
# `layernorm_forward` keeps `cache.xhat` and `cache.rstd` (the $r$ above) by name, and
# `layernorm_backward` runs the same lines. (The forward centres each row on its first
# entry first, (LN.12), which matters in float32 far from zero; in float64 here the two
# agree to round-off.)

# %%
y_op, cache = layernorm_forward(x, gamma, beta, eps)
dx_op, dgamma_op, dbeta_op = layernorm_backward(dy, cache)
for name, ours, theirs in [("y", y, y_op), ("xhat", xhat, cache.xhat), ("r", r, cache.rstd), ("dx", dx, dx_op),
                           ("dgamma", dgamma, dgamma_op), ("dbeta", dbeta, dbeta_op)]:
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"{name:7} by hand vs npformer.ops.layernorm: max relative difference {err:.1e}")
    assert err < 1e-13, name


def loss() -> float:
    return float((layernorm_forward(x, gamma, beta, eps)[0] * dy).sum())


for name, value, grad in [("x", x, dx), ("gamma", gamma, dgamma), ("beta", beta, dbeta)]:
    numeric = numerical_gradient(loss, value)
    err = np.abs(grad - numeric).max() / np.abs(numeric).max()
    print(f"d{name:6} vs finite differences: max relative error {err:.1e}")
    assert err < 1e-8, name

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("05_layernorm_backward: all checks passed")
