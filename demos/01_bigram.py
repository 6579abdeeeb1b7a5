# %% [markdown]
# # 1. A bigram baseline
#
# Before any network: count which character follows which in the built-in corpus
# (`npformer.data.default_corpus`, prose from the Python standard library), turn the
# counts into probabilities, and measure how surprised the table is by text it has not
# seen. Every model in the later notebooks has to beat this number.
#
# The loss is the mean cross entropy in nats per character,
# $L = -\frac1N\sum_n \log P(x_{n+1} \mid x_n)$, and the perplexity is $e^L$: the number
# of equally likely characters the model is, on average, choosing between.
# The cross entropy and its gradient are derived in [proofs/cross_entropy.md](../proofs/cross_entropy.md).

# %%
import time

import numpy as np

from npformer.data import CharTokenizer, default_corpus, train_val_split
from npformer.ops.cross_entropy import cross_entropy_forward

t_start = time.perf_counter()
text = default_corpus()
tok = CharTokenizer.from_text(text)
ids = tok.encode_array(text)
train, val = train_val_split(ids, val_fraction=0.1, seed=0)
V = tok.vocab_size
print(f"{len(text):,} characters, vocabulary of {V}; {len(train):,} for counting, {len(val):,} held out")
assert len(train) + len(val) == len(ids) and V == len(set(text))

# %% [markdown]
# ## Counting
#
# `counts[a, b]` is how often character `b` follows character `a` in the training text.
# `np.add.at` adds one for every (previous, next) pair, repeated pairs included.

# %%
counts = np.zeros((V, V), dtype=np.int64)
np.add.at(counts, (train[:-1], train[1:]), 1)
assert counts.sum() == len(train) - 1

most = np.argsort(counts.sum(axis=1))[::-1][:5]
for a in most:
    b = np.argsort(counts[a])[::-1][:3]
    after = ", ".join(f"{tok.decode([j])!r} {counts[a, j] / counts[a].sum():.2f}" for j in b)
    print(f"after {tok.decode([a])!r:6}  {after}")

# %% [markdown]
# ## From counts to probabilities
#
# The maximum-likelihood table is each row of counts divided by its sum. A pair never
# seen in training would get probability 0 and an infinite loss on held-out text, so we
# add $\alpha$ to every count (additive smoothing) and pick $\alpha$ on the held-out text.

# %%
def bigram_log_probs(counts: np.ndarray, alpha: float) -> np.ndarray:
    """log P(next | previous), (V, V) float64, from counts smoothed by alpha."""
    smoothed = counts + alpha
    with np.errstate(divide="ignore"):  # alpha = 0: unseen pairs get log 0 = -inf
        return np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))


def mean_nll(log_probs: np.ndarray, ids: np.ndarray) -> float:
    """Mean of -log P(ids[n+1] | ids[n]) over the stream."""
    return float(-log_probs[ids[:-1], ids[1:]].mean())


unseen = int(((counts[val[:-1], val[1:]]) == 0).sum())
print(f"{unseen} held-out pairs never occur in the training text")
losses = {}
for alpha in (0.0, 0.01, 0.1, 1.0):
    losses[alpha] = mean_nll(bigram_log_probs(counts, alpha), val)
    print(f"alpha {alpha:<5} held-out loss {losses[alpha]:.4f}  perplexity {np.exp(losses[alpha]):.2f}")
best = min((a for a in losses if a > 0), key=losses.get)
assert unseen == 0 or losses[0.0] == np.inf  # without smoothing, one unseen pair makes the loss infinite

# %% [markdown]
# ## Baselines to compare with
#
# Knowing nothing gives $\ln V$; knowing only the letter frequencies (a unigram model)
# gives the entropy of the character distribution. The bigram table must beat both.

# %%
log_probs = bigram_log_probs(counts, best)
unigram = (np.bincount(train, minlength=V) + best) / (len(train) + best * V)
unigram_loss = float(-np.log(unigram[val]).mean())
train_loss, val_loss = mean_nll(log_probs, train), losses[best]
print(f"uniform    {np.log(V):.4f} nats/char")
print(f"unigram    {unigram_loss:.4f}")
print(f"bigram     {val_loss:.4f} held out (alpha = {best}), {train_loss:.4f} on the counted text, "
      f"perplexity {np.exp(val_loss):.2f}")
assert val_loss < unigram_loss < np.log(V)
assert train_loss <= val_loss  # the table fits the text it counted better than new text

# %% [markdown]
# ## The same number through npformer's cross entropy
#
# The bigram model is a lookup of logits: row `x[n]` of the table. Passing the log
# probabilities as logits to `cross_entropy_forward` gives the same loss, since a
# softmax of log probabilities that already sum to one returns them unchanged (CE.1).

# %%
logits = log_probs[val[:-1]]  # (N, V) one row of the table per held-out position
loss, _ = cross_entropy_forward(logits, val[1:])
print(f"cross_entropy_forward: {float(loss):.12f}   direct lookup: {val_loss:.12f}")
assert abs(float(loss) - val_loss) <= 1e-12 * val_loss

# %% [markdown]
# ## A sample
#
# Generation draws each next character from the row of the current one.

# %%
rng = np.random.default_rng(0)
probs = np.exp(log_probs)
current = tok.encode("T")[0]
sample = [current]
for _ in range(300):
    current = rng.choice(V, p=probs[current])
    sample.append(current)
sample_text = tok.decode(sample)
print(sample_text)
assert len(sample_text) == 301

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("01_bigram: all checks passed")
