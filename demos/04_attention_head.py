# %% [markdown]
# # 4. One causal attention head, by hand
#
# A sequence of T vectors (one per token, width C) goes through one head of causal
# self-attention: each position asks a question (query), every position offers a key
# and a value, and each position's output is an average of the values of the positions
# it may see, weighted by how well their keys match its query. We compute every step in
# NumPy, then the backward step by step, each line citing its equation in
# [proofs/attention.md](../proofs/attention.md), and compare with `npformer.ops.attention` and with finite
# differences.
#
# Shapes: $x$ (T, C); $W_q, W_k, W_v$ (D, C); $Q, K, V$ (T, D); $S, P$ (T, T); $O$ (T, D).

# %%
import time

import numpy as np

from npformer.gradcheck import numerical_gradient
from npformer.ops.attention import attention_backward, attention_forward, causal_mask

t_start = time.perf_counter()
rng = np.random.default_rng(0)
tokens = list("causal")
T, C, D = len(tokens), 8, 4
x = rng.standard_normal((T, C))
W_q, W_k, W_v = (rng.standard_normal((D, C)) / np.sqrt(C) for _ in range(3))
dO = rng.standard_normal((T, D))  # the gradient arriving from above: L = sum(O * dO)

# %% [markdown]
# ## Forward
#
# Projections (three `linear` ops, (LIN.1) of [proofs/linear.md](../proofs/linear.md)), then
# (ATT.1) scores $S = c_s Q K^\top$ with $c_s = 1/\sqrt D$ (ATT.13), $-\infty$ where key $j$
# comes after query $i$ (the causal mask); (ATT.2) the row-wise softmax; (ATT.3) $O = PV$.

# %%
Q, K, V = x @ W_q.T, x @ W_k.T, x @ W_v.T  # (LIN.1)
c_s = 1.0 / np.sqrt(D)  # (ATT.13)
hidden = causal_mask(T, T)  # True where j > i
S = np.where(hidden, -np.inf, c_s * Q @ K.T)  # (ATT.1)
m = S.max(axis=1, keepdims=True)  # the row maximum: every exponent <= 0
E = np.exp(S - m)  # exp(-inf) = 0: masked keys get no weight
P = E / E.sum(axis=1, keepdims=True)  # (ATT.2)
O = P @ V  # (ATT.3)

print("P: query (rows) x key (columns)")
print("      " + "".join(f"{t:>7}" for t in tokens))
for t, row in zip(tokens, P):
    print(f"{t:>6}" + "".join(f"{p:7.3f}" for p in row))
assert np.all(P[hidden] == 0) and np.allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-15)
assert np.array_equal(O[0], V[0])  # the first token sees only itself

# %% [markdown]
# ## Backward
#
# Given $\bar O$: (ATT.4) $\bar V = P^\top \bar O$ and (ATT.5) $\bar P = \bar O V^\top$ through
# the product; (ATT.7) the softmax backward $\bar S = P \odot (\bar P - \mathrm{rowsum}(\bar P \odot P))$;
# (ATT.8) $\bar Q = c_s \bar S K$ and (ATT.9) $\bar K = c_s \bar S^\top Q$; then through the
# projections, (LIN.3) and (LIN.4).

# %%
dV = P.T @ dO  # (ATT.4)
dP = dO @ V.T  # (ATT.5)
rowsum = (dP * P).sum(axis=1, keepdims=True)  # (T, 1)
dS = P * (dP - rowsum)  # (ATT.7)
dQ = c_s * dS @ K  # (ATT.8)
dK = c_s * dS.T @ Q  # (ATT.9)
dW_q, dW_k, dW_v = dQ.T @ x, dK.T @ x, dV.T @ x  # (LIN.4)
dx = dQ @ W_q + dK @ W_k + dV @ W_v  # (LIN.3), x feeds all three projections
print("dS (zero above the diagonal, and each row sums to 0):")
print(dS.round(3) + 0.0)  # + 0.0 prints -0.0 as 0.0
assert np.all(dS[hidden] == 0)  # (ATT.11): no gradient reaches a masked score
assert np.allclose(dS.sum(axis=1), 0.0, atol=1e-15)  # softmax is shift invariant

# %% [markdown]
# (ATT.7) is the softmax Jacobian (ATT.6), $\partial P_{ij}/\partial S_{ik} = P_{ij}(\delta_{jk} - P_{ik})$,
# contracted with $\bar P$ without forming it. For one row, form it and compare:

# %%
i = T - 1
jacobian = np.diag(P[i]) - np.outer(P[i], P[i])  # (ATT.6), symmetric
assert np.allclose(jacobian @ dP[i], dS[i], rtol=0, atol=1e-15)
print(f"row {i}: Jacobian-vector product equals (ATT.7): {np.abs(jacobian @ dP[i] - dS[i]).max():.1e}")

# %% [markdown]
# ## npformer's attention op
#
# `attention_forward(q, k, v, causal=True)` takes (B, H, T, D) arrays: here B = H = 1.
# Its cache names the probabilities `cache.probs`, and `attention_backward` returns
# $\bar Q, \bar K, \bar V$ (and the bias gradient, `None` without a bias).

# %%
out, cache = attention_forward(Q[None, None], K[None, None], V[None, None], causal=True)
dq, dk, dv, dbias = attention_backward(dO[None, None], cache)
for name, ours, theirs in [("O", O, out), ("P", P, cache.probs), ("dQ", dQ, dq), ("dK", dK, dk), ("dV", dV, dv)]:
    err = np.abs(ours - theirs[0, 0]).max()
    print(f"{name:3} by hand vs npformer.ops.attention: max difference {err:.1e}")
    assert err <= 1e-14 * max(1.0, np.abs(ours).max()), name
assert dbias is None

# %% [markdown]
# ## Finite differences
#
# The whole head, from $x$ and the three weights to $L = \sum O \odot \bar O$.

# %%
def head_loss() -> float:
    q, k, v = x @ W_q.T, x @ W_k.T, x @ W_v.T
    o, _ = attention_forward(q[None, None], k[None, None], v[None, None], causal=True)
    return float((o[0, 0] * dO).sum())


for name, value, grad in [("x", x, dx), ("W_q", W_q, dW_q), ("W_k", W_k, dW_k), ("W_v", W_v, dW_v)]:
    numeric = numerical_gradient(head_loss, value)
    err = np.abs(grad - numeric).max() / np.abs(numeric).max()
    print(f"d{name:4} max relative error {err:.1e}")
    assert err < 1e-8, name

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("04_attention_head: all checks passed")
