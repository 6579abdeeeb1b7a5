# %% [markdown]
# # 3. A vanilla RNN and backpropagation through time
#
# A recurrent network reads the text one character at a time and carries a hidden state
# $h_t$ from step to step. Its weights are shared by every step, so their gradient is a
# sum over steps, and the gradient reaching an early state has passed through every later
# step: that product of Jacobians makes plain RNNs forget, one reason gated RNNs and then
# attention (notebook 4) took their place.
#
# Shapes: B sequences, T steps, V characters, $H$ hidden units. With $x_t$ the
# characters at step $t$ and $h_0 = 0$:
#
# $$a_t = W_{xh}[:, x_t] + W_{hh} h_{t-1} + b_h, \qquad h_t = \tanh a_t, \qquad z_t = W_{hy} h_t + b_y$$
#
# and the loss is the mean cross entropy of $z_t$ against the next characters over all
# $B T$ predictions ([proofs/cross_entropy.md](../proofs/cross_entropy.md)). Backward, from
# $t = T$ down to $1$, with $\bar a_{T+1} = 0$:
#
# $$\bar z_t = \frac{\mathrm{softmax}(z_t) - \mathrm{onehot}(y_t)}{BT}, \qquad
#   \bar h_t = W_{hy}^\top \bar z_t + W_{hh}^\top \bar a_{t+1}, \qquad
#   \bar a_t = \bar h_t \odot (1 - h_t^2)$$
#
# $$\bar W_{hy} = \sum_t \bar z_t h_t^\top, \quad \bar b_y = \sum_t \bar z_t, \quad
#   \bar W_{hh} = \sum_t \bar a_t h_{t-1}^\top, \quad \bar b_h = \sum_t \bar a_t, \quad
#   \bar W_{xh}[:, c] = \sum_{t, b:\ x_{tb} = c} \bar a_{tb}$$
#
# ($\bar W_{hy}$, $\bar W_{hh}$ are (LIN.4) of [proofs/linear.md](../proofs/linear.md) summed over steps; the
# column lookup is an embedding, whose gradient is the scatter-add (EMB.3) of
# [proofs/embedding.md](../proofs/embedding.md).)

# %%
import time

import numpy as np

from npformer.data import CharTokenizer, default_corpus, get_batch
from npformer.gradcheck import numerical_gradient

t_start = time.perf_counter()
text = default_corpus()
tok = CharTokenizer.from_text(text)
ids = tok.encode_array(text)
V, H = tok.vocab_size, 16

# %% [markdown]
# ## Forward and backward through time
#
# `rnn_backward` takes the gradient of the loss with respect to every step's logits, so the
# same code serves the full loss and, below, the loss of the last step alone. It also
# returns $\lVert \bar h_t \rVert$, the size of the gradient reaching each hidden state.

# %%
def init_params(rng: np.random.Generator, gain: float = 1.0) -> dict:
    q, _ = np.linalg.qr(rng.standard_normal((H, H)))  # orthogonal: every singular value 1
    return {
        "W_xh": rng.standard_normal((H, V)) * 0.5,
        "W_hh": gain * q,
        "b_h": rng.standard_normal(H) * 0.1,
        "W_hy": rng.standard_normal((V, H)) / np.sqrt(H),
        "b_y": rng.standard_normal(V) * 0.1,
    }


def rnn_forward(p: dict, x: np.ndarray, act=np.tanh) -> dict:
    """x (B, T) ids -> the states h (T + 1, B, H) with h[0] = 0 and the logits z (T, B, V)."""
    B, T = x.shape
    h = np.zeros((T + 1, B, H))
    z = np.empty((T, B, V))
    for t in range(T):
        h[t + 1] = act(p["W_xh"][:, x[:, t]].T + h[t] @ p["W_hh"].T + p["b_h"])
        z[t] = h[t + 1] @ p["W_hy"].T + p["b_y"]
    return {"x": x, "h": h, "z": z}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mean_loss(cache: dict, y: np.ndarray) -> float:
    """Mean cross entropy of the logits (T, B, V) against y (B, T)."""
    z = cache["z"]
    zmax = z.max(axis=-1, keepdims=True)
    logp = z - zmax - np.log(np.exp(z - zmax).sum(axis=-1, keepdims=True))
    T, B = y.shape[1], y.shape[0]
    return float(-logp[np.arange(T)[:, None], np.arange(B)[None, :], y.T].mean())


def loss_grad(cache: dict, y: np.ndarray) -> np.ndarray:
    """d mean_loss / d z: (softmax - onehot) / (B T), shape (T, B, V)  (CE.7)."""
    dz = softmax(cache["z"])
    T, B = y.shape[1], y.shape[0]
    dz[np.arange(T)[:, None], np.arange(B)[None, :], y.T] -= 1.0
    return dz / (B * T)


def rnn_backward(p: dict, cache: dict, dz: np.ndarray, act_grad=lambda h: 1.0 - h**2):
    """Gradients of every parameter given dz (T, B, V), and ||dh_t|| for t = 1..T."""
    x, h = cache["x"], cache["h"]
    T = dz.shape[0]
    g = {name: np.zeros_like(value) for name, value in p.items()}
    da_next = np.zeros_like(h[0])  # bar a_{T+1}: nothing comes from beyond the last step
    norms = np.empty(T)
    for t in reversed(range(T)):  # h[t + 1] is the state of step t
        g["W_hy"] += dz[t].T @ h[t + 1]  # (LIN.4), summed over steps
        g["b_y"] += dz[t].sum(axis=0)  # (LIN.5)
        dh = dz[t] @ p["W_hy"] + da_next @ p["W_hh"]  # from this step's logits and from the next step
        norms[t] = np.linalg.norm(dh)
        da = dh * act_grad(h[t + 1])  # tanh' = 1 - tanh^2
        g["W_hh"] += da.T @ h[t]  # (LIN.4), summed over steps
        g["b_h"] += da.sum(axis=0)  # (LIN.5)
        np.add.at(g["W_xh"].T, x[:, t], da)  # (EMB.3): column x_t of W_xh was read
        da_next = da
    return g, norms


params = init_params(np.random.default_rng(0))
x, y = get_batch(ids, batch_size=4, block_size=12, rng=np.random.default_rng(1))
cache = rnn_forward(params, x)
grads, _ = rnn_backward(params, cache, loss_grad(cache, y))
print(f"B, T = {x.shape}; loss {mean_loss(cache, y):.4f} (ln V = {np.log(V):.4f})")

# %% [markdown]
# ## Check: central finite differences
#
# Every entry of every weight, perturbed by $\pm 10^{-6}$ in float64.

# %%
for name, value in params.items():
    numeric = numerical_gradient(lambda: mean_loss(rnn_forward(params, x), y), value)
    err = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
    print(f"d{name:5} {str(value.shape):9} max relative error {err:.1e}")
    assert err < 1e-7, name

# %% [markdown]
# ## Vanishing and exploding gradients
#
# Take the loss of the last step alone and follow its gradient back:
# $\bar h_{t-1} = W_{hh}^\top (\bar h_t \odot \tanh'(a_t))$. Each step multiplies by
# $W_{hh}^\top$ and by $\tanh' \le 1$, so with $W_{hh} = g Q$ ($Q$ orthogonal, every
# singular value $g$), $\lVert \bar h_{t-1} \rVert \le g \lVert \bar h_t \rVert$:
# for $g < 1$ the gradient of a step $k$ steps back shrinks at least as $g^k$.
# Without the nonlinearity (a linear RNN, $h_t = a_t$) the bound is an equality: for
# $g > 1$ the gradient grows as $g^k$, it explodes. The tanh does not prevent that
# (with $g = 3$ and small inputs it explodes too), but large inputs saturate it,
# $\tanh' \approx 0$, and then the gradient vanishes even with large weights.

# %%
T = 40
x_long, y_long = get_batch(ids, batch_size=4, block_size=T, rng=np.random.default_rng(2))
rows = {}
tanh, tanh_grad = np.tanh, lambda h: 1.0 - h**2
linear, linear_grad = (lambda a: a), (lambda h: np.ones_like(h))
for label, gain, input_scale, act, act_grad in [
    ("tanh,   g = 0.5", 0.5, 0.1, tanh, tanh_grad),
    ("tanh,   g = 1.0", 1.0, 0.1, tanh, tanh_grad),
    ("tanh,   g = 3.0", 3.0, 0.1, tanh, tanh_grad),
    ("tanh,   g = 3.0, inputs x 200", 3.0, 20.0, tanh, tanh_grad),
    ("linear, g = 0.9", 0.9, 0.1, linear, linear_grad),
    ("linear, g = 1.1", 1.1, 0.1, linear, linear_grad),
]:
    p = init_params(np.random.default_rng(0), gain)
    p["W_xh"] *= input_scale
    c = rnn_forward(p, x_long, act)
    dz = np.zeros_like(c["z"])
    dz[-1] = loss_grad(c, y_long)[-1] * T  # the last step's loss only
    _, norms = rnn_backward(p, c, dz, act_grad)
    rows[label] = (gain, norms / norms[-1])

steps_back = [0, 5, 10, 20, 30, 39]
print("||dL_T/dh_t|| / ||dL_T/dh_T||, t = T - k")
print(f"{'':30}" + "".join(f"{'k = ' + str(k):>11}" for k in steps_back))
for label, (gain, rel) in rows.items():
    print(f"{label:30}" + "".join(f"{rel[T - 1 - k]:11.2e}" for k in steps_back))

for label, (gain, rel) in rows.items():
    ratios = rel[:-1] / rel[1:]  # ||dh_{t-1}|| / ||dh_t||
    assert np.all(ratios <= gain * (1 + 1e-12)), label  # the bound, at every step
    if label.startswith("linear"):
        assert np.allclose(ratios, gain, rtol=1e-10), label  # equality without the nonlinearity
assert rows["tanh,   g = 0.5"][1][0] < 0.5 ** (T - 1) * 1.0001  # vanished: below 2e-12
assert rows["linear, g = 1.1"][1][0] > 40  # exploded: 1.1^39 = 41
assert rows["tanh,   g = 3.0"][1][0] > 1e3  # tanh alone does not stop the growth
assert rows["tanh,   g = 3.0, inputs x 200"][1][0] < 1e-10  # saturated: large weights, vanishing gradient

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("03_rnn_bptt: all checks passed")
