# %% [markdown]
# # 6. A GPT from scratch
#
# The pieces of notebooks 2 to 5 (embeddings, linear layers, GELU, attention, layer
# norm, cross entropy) make a GPT: `npformer.models.gpt.GPT`. Its `forward` runs the
# layers in order and its `backward` walks them in reverse, one line per layer, each
# layer calling the op pairs of `npformer/ops/` whose derivations are in [proofs/](../proofs/README.md).
# Here a tiny one (2 layers, 4 heads, width 64) learns the built-in corpus for 400 steps
# of 16 windows of 64 characters, on a CPU, in seconds.
#
# The full-size run is `python -m npformer train` (see the README); this notebook uses
# the same parts, written out.

# %%
import time

import numpy as np

from npformer.data import CharTokenizer, default_corpus, get_batch, train_val_split
from npformer.generate import generate
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW, clip_grad_norm_, param_groups, warmup_cosine

t_start = time.perf_counter()
text = default_corpus()
tok = CharTokenizer.from_text(text)
train, val = train_val_split(tok.encode_array(text), val_fraction=0.1, seed=0)
cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, d_model=64)
model = GPT(cfg, seed=0)
print(cfg)
print(f"{model.num_parameters():,} parameters")
for name, p in list(model.named_parameters())[:8]:
    print(f"  {name:28} {p.shape}")

# %% [markdown]
# ## Held-out loss before training
#
# In eval mode the model keeps no caches (nothing waits for a backward). The held-out
# loss is averaged over 8 fixed batches of the validation text. At initialisation every
# character is about equally likely: the loss is near $\ln V$.

# %%
val_batches = [get_batch(val, 16, cfg.block_size, np.random.default_rng(100 + i)) for i in range(8)]


def held_out_loss(model: GPT) -> float:
    model.eval()
    loss = float(np.mean([model.forward(x, y)[1] for x, y in val_batches]))
    model.train()
    return loss


before = held_out_loss(model)
print(f"held-out loss {before:.3f}, ln V = {np.log(cfg.vocab_size):.3f}")
assert abs(before - np.log(cfg.vocab_size)) < 0.1

# %% [markdown]
# ## Training
#
# One step: a random batch, `forward` (logits and mean cross entropy), `backward`
# (every `Parameter.grad`), clipping of the global gradient norm to 1, and an AdamW step
# (weight decay 0.1 on the matrices, none on norms, biases and embeddings), with a
# warmup-then-cosine learning rate.

# %%
steps = 400
opt = AdamW(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.99))
schedule = warmup_cosine(3e-3, 3e-4, 30, steps)
rng = np.random.default_rng(0)
losses = []
for step in range(steps):
    for group in opt.param_groups:
        group["lr"] = schedule(step)
    x, y = get_batch(train, 16, cfg.block_size, rng)
    _, loss = model.forward(x, y)
    model.zero_grad()
    model.backward()
    norm = clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    losses.append(loss)
    if step % 50 == 0 or step == steps - 1:
        print(f"step {step:4d}  loss {loss:.3f}  gradient norm {norm:.2f}  lr {schedule(step):.2e}")

after = held_out_loss(model)
first, last = np.mean(losses[:20]), np.mean(losses[-20:])
print(f"training loss, mean of 20 steps: {first:.3f} at the start, {last:.3f} at the end")
print(f"held-out loss {before:.3f} -> {after:.3f} (the bigram table of notebook 1: 2.643)")
assert last < first - 1.5 and after < before - 1.5
assert after < 2.643  # below the bigram baseline

# %% [markdown]
# ## A sample
#
# `npformer.generate.generate` extends a prompt one token at a time, reusing the keys and
# values of earlier positions (a KV cache), with temperature and top-k sampling.

# %%
prompt = np.array([tok.encode("The ")])
out = generate(model, prompt, 200, temperature=0.8, top_k=20, rng=np.random.default_rng(0))
sample = tok.decode(out[0].tolist())
print(sample)
assert out.shape == (1, 4 + 200) and sample.startswith("The ")

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("06_gpt_from_scratch: all checks passed")
