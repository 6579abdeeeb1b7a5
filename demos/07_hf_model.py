# %% [markdown]
# # 7. A Hugging Face model, opened in NumPy
#
# `npformer.hf` reads a Hugging Face model folder (`config.json` and
# `model.safetensors`) into an npformer model, in NumPy only: the safetensors file is
# parsed by npformer itself, and each family's tensor names are mapped by one explicit
# table (`npformer/hf/gpt2_map.py` for GPT-2). Once loaded, the model is an ordinary
# npformer model: its attention probabilities and every gradient can be read by name.
#
# No download: a tiny GPT-2 with random weights is built here with `transformers`,
# saved to a temporary folder, and opened by both libraries. The comparison runs in
# float64, where the two must agree to about $10^{-10}$.
#
# Needs the test extra (`torch`, `transformers`).

# %%
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from npformer.hf import load_pretrained
from npformer.hf.pretrained import hf_state_dict

t_start = time.perf_counter()
transformers.utils.logging.disable_progress_bar()
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
hf = transformers.GPT2LMHeadModel(config)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():  # HF starts biases at 0 and norms at 1: redraw them, so a misplaced one would show
    for name, p in hf.named_parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.15 + (1.0 if ".ln_" in name and "weight" in name else 0))

workdir = tempfile.TemporaryDirectory()
folder = Path(workdir.name) / "tiny-gpt2"
hf.save_pretrained(folder)
print(sorted(p.name for p in folder.iterdir()))

# %% [markdown]
# ## Both libraries open the same folder

# %%
model = load_pretrained(folder, dtype="float64")  # eval mode, dropout 0
hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
hf.eval()
print(type(model).__name__, model.cfg)
print(type(hf).__name__, f"{sum(p.numel() for p in hf.parameters()):,} parameters; npformer: "
      f"{model.num_parameters():,}")
assert model.num_parameters() == sum(p.numel() for p in hf.parameters())  # the tied head is counted once

# %% [markdown]
# ## Logits

# %%
ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 16))
logits, _ = model.forward(ids)
with torch.no_grad():
    out = hf(torch.from_numpy(ids), output_attentions=True)
err = np.abs(logits - out.logits.numpy()).max() / np.abs(out.logits.numpy()).max()
print(f"logits {logits.shape}: max relative difference to transformers {err:.1e}")
assert err < 1e-10

# %% [markdown]
# ## Attention maps
#
# Every layer records its intermediates by name while a recorder is on
# (`model.start_recording()`): the attention probabilities $P$ of (ATT.2),
# [proofs/attention.md](../proofs/attention.md), are `blocks.<l>.attn.probs`, shape (B, H, T, T). They equal
# the `attentions` transformers returns. (`npformer viz attention` draws them as heatmaps,
# with `npformer.viz.attention_maps`.)

# %%
recorder = model.start_recording()
model.forward(ids)
model.stop_recording()
probs = {name: value for name, value in recorder.items() if name.endswith(".probs")}
print(list(probs))
for layer, (name, p) in enumerate(probs.items()):
    err = np.abs(p - out.attentions[layer].numpy()).max()
    print(f"{name}: max difference to transformers {err:.1e}")
    assert err < 1e-12
p = probs["blocks.1.attn.probs"][0, 2]  # batch row 0, layer 1, head 2
print("layer 1, head 2, the first 6 positions (queries down, keys across):")
print(np.array2string(p[:6, :6], precision=3, suppress_small=True))
print("most attended key of each query:", p.argmax(axis=1))
assert np.all(np.triu(p, 1) == 0)  # causal: nothing from the future

# %% [markdown]
# ## Gradients
#
# In training mode a forward with targets gives the mean cross entropy; `backward()` fills
# every `Parameter.grad`. `hf_state_dict(model, grads=True)` returns them under Hugging
# Face's names and layouts (GPT-2 stores its linear weights transposed, as `Conv1D`, and
# fuses q, k, v into `c_attn`), so each can be compared with torch autograd's.

# %%
targets = np.roll(ids, -1, axis=1)
targets[:, -1] = -100  # the last position has no next token: ignored
model.train()
recorder = model.start_recording()
_, loss = model.forward(ids, targets)
model.zero_grad()
model.backward()
model.stop_recording()

hf_logits = hf(torch.from_numpy(ids)).logits
hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, config.vocab_size),
                                            torch.from_numpy(targets).reshape(-1), ignore_index=-100)
hf_loss.backward()
print(f"loss: npformer {loss:.12f}, transformers {hf_loss.item():.12f}")
assert abs(loss - hf_loss.item()) < 1e-12 * loss

ours = hf_state_dict(model, grads=True)
theirs = {name: p.grad.numpy() for name, p in hf.named_parameters()}
assert sorted(ours) == sorted(theirs)
worst = max(np.abs(ours[n] - theirs[n]).max() / np.abs(theirs[n]).max() for n in theirs)
print(f"{len(theirs)} parameter gradients, max relative difference to torch autograd {worst:.1e}")
assert worst < 1e-9
print("gradient norms by parameter (largest first):")
for name in sorted(ours, key=lambda n: -np.linalg.norm(ours[n]))[:6]:
    print(f"  {name:36} {np.linalg.norm(ours[name]):.4f}")

# %% [markdown]
# The recorder also holds the backward's intermediates, named with a `d`: the gradient of
# the logits, of each norm's input and parameters, of each linear layer's weight, of each
# block's input (`blocks.<l>.dx`), in the order the backward produced them.

# %%
backward_names = [n for n in recorder if n.split(".")[-1].startswith("d")]
print(len(backward_names), "recorded gradients:", backward_names[:6], "...")
dW = recorder["blocks.0.mlp.fc.dW"]  # (out, in), npformer's layout
assert np.allclose(dW.T, theirs["transformer.h.0.mlp.c_fc.weight"], rtol=1e-9, atol=0)  # Conv1D: (in, out)
workdir.cleanup()

# %%
print(f"run time {time.perf_counter() - t_start:.1f} s")
print("07_hf_model: all checks passed")
