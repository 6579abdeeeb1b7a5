# %% [markdown]
# # 2. An MLP language model, backward by hand
#
# The bigram table of notebook 1 sees one character. Here a small network sees three:
# each is looked up in an embedding table, the three vectors are joined, and a hidden
# layer with GELU feeds a linear head over the vocabulary (the model of Bengio et al.,
# 2003, with GELU in place of tanh). We write its backward pass by hand in NumPy, check
# it against central finite differences, then build the same model from npformer's
# layers (`npformer.nn.Embedding`, `npformer.nn.Linear`) and ops (`gelu_forward`,
# `cross_entropy_forward`) and get the same gradients. Finally npformer's AdamW trains it.
#
# Derivations: [proofs/embedding.md](../proofs/embedding.md) (EMB), [proofs/linear.md](../proofs/linear.md) (LIN),
# [proofs/activations.md](../proofs/activations.md) (ACT), [proofs/cross_entropy.md](../proofs/cross_entropy.md) (CE).
#
# Shapes: B examples, context of C = 3 characters, E embedding width, H hidden units,
# V characters in the vocabulary.
#
# | step | forward | backward |
# |---|---|---|
# | embedding | $e = \mathrm{concat}(W_E[x_1], W_E[x_2], W_E[x_3])$, (B, CE) | $\bar W_E$: scatter-add of $\bar e$ (EMB.3) |
# | hidden | $a = e W_1^\top + b_1$, (B, H) (LIN.1) | $\bar W_1 = \bar a^\top e$ (LIN.4), $\bar b_1 = \sum_n \bar a_n$ (LIN.5), $\bar e = \bar a W_1$ (LIN.3) |
# | GELU | $h = \tfrac12 a (1 + \tanh u)$ (ACT.8) | $\bar a = \bar h \odot \mathrm{GELU}'(a)$ (ACT.9) |
# | head | $z = h W_2^\top + b_2$, (B, V) | as the hidden layer |
# | loss | $L = -\frac1B \sum_n \log \mathrm{softmax}(z_n)_{y_n}$ (CE.2) | $\bar z = (\mathrm{softmax}(z) - \mathrm{onehot}(y)) / B$ (CE.7) |

# %%
import time

import numpy as np

from npformer.data import CharTokenizer, default_corpus, train_val_split
from npformer.nn.layers import Embedding, Linear
from npformer.nn.module import Module
from npformer.ops.activations import gelu_backward, gelu_forward
from npformer.ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from npformer.optim import AdamW, param_groups

t_start = time.perf_counter()
text = default_corpus()
tok = CharTokenizer.from_text(text)
train, val = train_val_split(tok.encode_array(text), val_fraction=0.1, seed=0)
V, C, E, H = tok.vocab_size, 3, 12, 128


def windows(ids: np.ndarray, starts: np.ndarray):
    """Contexts (B, C) and next characters (B,) for windows starting at ``starts``."""
    x = ids[starts[:, None] + np.arange(C)]
    return x, ids[starts + C]


rng = np.random.default_rng(0)
x, y = windows(train, rng.integers(0, len(train) - C, size=6))
for row, target in zip(x, y):
    print(f"{tok.decode(row)!r} -> {tok.decode([target])!r}")

# %% [markdown]
# ## The forward and the backward, by hand
#
# Every intermediate the backward needs is kept in a dictionary, as npformer's ops keep
# theirs in a named cache. GELU is the tanh form GPT-2 uses, with
# $u = \sqrt{2/\pi}\,(a + \kappa a^3)$, $\kappa = 0.044715$.

# %%
KAPPA, SQRT_2_OVER_PI = 0.044715, np.sqrt(2.0 / np.pi)


def init_params(rng: np.random.Generator, dtype=np.float64) -> dict:
    return {
        "W_E": rng.standard_normal((V, E)).astype(dtype) * 0.5,
        "W1": rng.standard_normal((H, C * E)).astype(dtype) / np.sqrt(C * E),
        "b1": rng.standard_normal(H).astype(dtype) * 0.1,
        "W2": rng.standard_normal((V, H)).astype(dtype) / np.sqrt(H),
        "b2": rng.standard_normal(V).astype(dtype) * 0.1,
    }


def forward(p: dict, x: np.ndarray, y: np.ndarray):
    B = x.shape[0]
    e = p["W_E"][x].reshape(B, C * E)  # (EMB.1), the C rows side by side
    a = e @ p["W1"].T + p["b1"]  # (LIN.1)
    t = np.tanh(SQRT_2_OVER_PI * (a + KAPPA * a**3))  # tanh u
    h = 0.5 * a * (1.0 + t)  # (ACT.8)
    z = h @ p["W2"].T + p["b2"]  # (LIN.1)
    zmax = z.max(axis=1, keepdims=True)
    logp = z - zmax - np.log(np.exp(z - zmax).sum(axis=1, keepdims=True))  # log softmax, stabilised
    loss = -logp[np.arange(B), y].mean()  # (CE.2), (CE.5)
    return loss, {"x": x, "y": y, "e": e, "a": a, "t": t, "h": h, "p": np.exp(logp)}


def backward(p: dict, cache: dict) -> dict:
    x, y, e, a, t, h, probs = (cache[k] for k in ("x", "y", "e", "a", "t", "h", "p"))
    B = x.shape[0]
    dz = probs.copy()
    dz[np.arange(B), y] -= 1.0
    dz /= B  # (CE.7): (softmax - onehot) / B
    dW2 = dz.T @ h  # (LIN.4)
    db2 = dz.sum(axis=0)  # (LIN.5)
    dh = dz @ p["W2"]  # (LIN.3)
    gelu_grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t**2) * SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * a**2)  # (ACT.9)
    da = dh * gelu_grad
    dW1 = da.T @ e  # (LIN.4)
    db1 = da.sum(axis=0)  # (LIN.5)
    de = da @ p["W1"]  # (LIN.3)
    dW_E = np.zeros_like(p["W_E"])
    np.add.at(dW_E, x, de.reshape(B, C, E))  # (EMB.3): a character used twice gets both gradients
    return {"W_E": dW_E, "W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


params = init_params(np.random.default_rng(1))
x, y = windows(train, np.random.default_rng(2).integers(0, len(train) - C, size=16))
loss, cache = forward(params, x, y)
grads = backward(params, cache)
print(f"loss at initialisation {loss:.4f} (ln V = {np.log(V):.4f})")

# %% [markdown]
# ## Check: central finite differences
#
# For an entry $\theta_i$ of a parameter,
# $\frac{\partial L}{\partial\theta_i} \approx \frac{L(\theta + \epsilon e_i) - L(\theta - \epsilon e_i)}{2\epsilon}$,
# in float64 with $\epsilon = 10^{-6}$. The error of the difference quotient is
# $O(\epsilon^2)$ plus round-off $O(10^{-16}/\epsilon)$, so agreement to about $10^{-8}$
# relative to the gradient's size is what a correct backward gives. Two forwards per entry:
# the biases are checked entry by entry, the matrices at 200 random entries each
# (`npformer.gradcheck.numerical_gradient` does every entry of an array).

# %%
def finite_differences(f, x: np.ndarray, flat_index: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dL/dx at the entries ``flat_index`` of x (perturbed in place, then restored)."""
    flat, out = x.reshape(-1), np.empty(len(flat_index))
    for n, i in enumerate(flat_index):
        saved = flat[i]
        flat[i] = saved + eps
        f_plus = f()
        flat[i] = saved - eps
        f_minus = f()
        flat[i] = saved
        out[n] = (f_plus - f_minus) / (2 * eps)
    return out


pick = np.random.default_rng(5)
for name, value in params.items():
    index = np.arange(value.size) if value.ndim == 1 else pick.choice(value.size, 200, replace=False)
    numeric = finite_differences(lambda: forward(params, x, y)[0], value, index)
    analytic = grads[name].reshape(-1)[index]
    err = np.abs(analytic - numeric).max() / np.abs(numeric).max()
    print(f"d{name:4} {str(value.shape):10} {len(index):4d} entries, max relative error {err:.1e}")
    assert err < 1e-7, name

# %% [markdown]
# ## The same model from npformer's layers
#
# `Embedding` and `Linear` hold `Parameter`s and call the op pairs of `npformer/ops/`;
# their `backward` adds into `.grad`. The model's own `backward` walks the layers in
# reverse, one line per layer. With the hand-written model's weights copied in, both
# give the same gradients up to round-off (the products are grouped differently).

# %%
class CharMLP(Module):
    """C characters -> embeddings -> Linear -> GELU (tanh) -> Linear -> logits over V."""

    def __init__(self, rng: np.random.Generator, dtype=np.float32):
        super().__init__()
        self.wte = Embedding(V, E, rng=rng, std=0.5, dtype=dtype)
        self.fc = Linear(C * E, H, rng=rng, std=1 / np.sqrt(C * E), dtype=dtype)
        self.head = Linear(H, V, rng=rng, std=1 / np.sqrt(H), dtype=dtype)

    def forward(self, x: np.ndarray, y: np.ndarray) -> float:
        B = x.shape[0]
        e = self.wte.forward(x).reshape(B, C * E)  # (EMB.1)
        h, self.gelu_cache = gelu_forward(self.fc.forward(e), approximate="tanh")  # (LIN.1), (ACT.8)
        loss, self.loss_cache = cross_entropy_forward(self.head.forward(h), y)  # (LIN.1), (CE.5)
        return float(loss)

    def backward(self) -> None:
        dz = cross_entropy_backward(1.0, self.loss_cache)  # (CE.7)
        dh = self.head.backward(dz)  # (LIN.3)-(LIN.5)
        de = self.fc.backward(gelu_backward(dh, self.gelu_cache))  # (ACT.9), then (LIN.3)-(LIN.5)
        self.wte.backward(de.reshape(-1, C, E))  # (EMB.3)


model = CharMLP(np.random.default_rng(0), dtype=np.float64)
names = {"wte.weight": "W_E", "fc.weight": "W1", "fc.bias": "b1", "head.weight": "W2", "head.bias": "b2"}
model.load_state_dict({ours: params[theirs] for ours, theirs in names.items()})
model.zero_grad()
ours = model.forward(x, y)
model.backward()
assert abs(ours - loss) <= 1e-13 * loss
for name, parameter in model.named_parameters():
    err = np.abs(parameter.grad - grads[names[name]]).max() / np.abs(grads[names[name]]).max()
    print(f"{name:12} npformer vs by hand: max relative difference {err:.1e}")
    assert err < 1e-12, name

# %% [markdown]
# ## Training
#
# The npformer model in float32, AdamW (`npformer.optim`, weight decay on the two matrices
# only), batches of 128 random windows. The held-out loss is measured on 20,000 fixed
# held-out windows before and after, and compared with the bigram table of notebook 1
# (recounted here).

# %%
model = CharMLP(np.random.default_rng(0))
opt = AdamW(param_groups(model, 0.01), lr=3e-3)
held_out = windows(val, np.random.default_rng(3).integers(0, len(val) - C, size=20_000))
first = model.forward(*held_out)
model.clear_caches()
rng = np.random.default_rng(4)
for step in range(1, 2001):
    model.zero_grad()
    loss = model.forward(*windows(train, rng.integers(0, len(train) - C, size=128)))
    model.backward()
    opt.step()
    if step % 400 == 0:
        print(f"step {step:5d}  training loss {loss:.3f}")
last = model.forward(*held_out)
model.clear_caches()

counts = np.zeros((V, V))
np.add.at(counts, (train[:-1], train[1:]), 1)
bigram = (counts + 0.1) / (counts + 0.1).sum(axis=1, keepdims=True)
bigram_loss = float(-np.log(bigram[held_out[0][:, -1], held_out[1]]).mean())
print(f"held-out loss: {first:.3f} at initialisation, {last:.3f} after training; bigram table {bigram_loss:.3f}")
assert last < bigram_loss < first  # three characters of context beat one

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("02_mlp: all checks passed")
