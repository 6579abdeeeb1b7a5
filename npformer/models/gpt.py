"""GPT-2: token + learned position embeddings, pre-norm blocks, tied LM head.

Read top to bottom: ``forward`` runs the layers in order, ``backward`` walks them
in reverse, one line per layer, so one breakpoint in ``backward`` lets you follow the
gradient down the whole stack (as in llm.c's ``gpt2_backward``).

Shapes: ids (B, T) int, logits (B, T, V), hidden (B, T, D).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Dropout, Embedding, LayerNorm
from ..nn.mlp import MLP
from ..nn.module import Module, ModuleList
from ..ops.cross_entropy import cross_entropy_backward, cross_entropy_forward
from ..ops.linear import linear_backward, linear_forward


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256  # context length T_max
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    dropout: float = 0.0
    bias: bool = True
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), matmuls only.

        Per layer 12 D^2 weight multiply-adds (q, k, v, o: 4 D^2; MLP: 8 D^2) and 2 T D for
        Q K^T and P V at full length T (the dense kernels compute the masked half too);
        the tied head adds V D.
        """
        c = self
        T = seq_len or c.block_size
        macs = c.n_layer * (12 * c.d_model**2 + 2 * T * c.d_model) + c.vocab_size * c.d_model
        return 3 * 2 * macs


class Block(Module):
    """x + drop(attn(ln_1(x))), then + drop(mlp(ln_2(x)))."""

    def __init__(self, cfg: GPTConfig, rng: np.random.Generator):
        super().__init__()
        dtype, proj_std = np.dtype(cfg.dtype), 0.02 / np.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        self.ln_1 = LayerNorm(cfg.d_model, dtype=dtype)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, bias=cfg.bias, dtype=dtype, rng=rng)
        self.attn.o_proj.weight.data[...] = (rng.standard_normal(self.attn.o_proj.weight.shape) * proj_std).astype(dtype)
        self.drop_1 = Dropout(cfg.dropout, rng=rng)
        self.ln_2 = LayerNorm(cfg.d_model, dtype=dtype)
        self.mlp = MLP(cfg.d_model, 4 * cfg.d_model, cfg.bias, "tanh", rng=rng, proj_std=proj_std, dtype=dtype)
        self.drop_2 = Dropout(cfg.dropout, rng=rng)

    def forward(self, x: np.ndarray, kv_cache: Optional[KVCache] = None) -> np.ndarray:
        x = x + self.drop_1.forward(self.attn.forward(self.ln_1.forward(x), causal=True, kv_cache=kv_cache))
        x = x + self.drop_2.forward(self.mlp.forward(self.ln_2.forward(x)))
        self.record("out", x)
        return x

    def backward(self, dx: np.ndarray) -> np.ndarray:
        dx = dx + self.ln_2.backward(self.mlp.backward(self.drop_2.backward(dx)))
        dx = dx + self.ln_1.backward(self.attn.backward(self.drop_1.backward(dx)))
        self.record("dx", dx)
        return dx


class GPT(Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.rng = rng = np.random.default_rng(seed)  # init, then dropout masks (saved in checkpoints)
        dtype = np.dtype(cfg.dtype)
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, rng=rng, dtype=dtype)
        self.wpe = Embedding(cfg.block_size, cfg.d_model, rng=rng, std=0.01, dtype=dtype)
        self.drop = Dropout(cfg.dropout, rng=rng)
        self.blocks = ModuleList(Block(cfg, rng) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.d_model, dtype=dtype)
        # The LM head is wte.weight itself (tied): logits = h @ wte^T.

    # ------------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, targets: Optional[np.ndarray] = None,
                kv_caches: Optional[List[KVCache]] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T) -> logits (B, T, V) and the mean cross entropy if targets (B, T) are given.

        With ``kv_caches`` (one per block), ids continue the cached sequence: positions
        start at the cache length (incremental decoding; inference only).
        """
        B, T = ids.shape
        start = kv_caches[0].length if kv_caches else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"GPT.forward: sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte.forward(ids) + self.wpe.forward(np.arange(start, start + T))
        x = self.drop.forward(x)
        for i, block in enumerate(self.blocks):
            x = block.forward(x, None if kv_caches is None else kv_caches[i])
        h = self.ln_f.forward(x)
        logits, self.head_cache = linear_forward(h, self.wte.weight.data)  # tied LM head
        self.record("logits", logits)
        if targets is None:
            self.loss_cache = None
            return logits, None
        loss, self.loss_cache = cross_entropy_forward(logits, targets)
        return logits, float(loss)

    def backward(self) -> None:
        """Fill every parameter's .grad from the last forward's loss, walking the layers in reverse."""
        if self.loss_cache is None:
            raise RuntimeError("GPT.backward: the last forward had no targets, so there is no loss to differentiate")
        dtype = self.head_cache.x.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), self.loss_cache)
        dh, dW_head, _ = linear_backward(dlogits, self.head_cache)
        self.wte.weight.grad += dW_head  # tied: the head's gradient joins the embedding's
        self.record("dlogits", dlogits)
        dx = self.ln_f.backward(dh)
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        self.wpe.backward(dx.sum(axis=0))  # one position table row per t, shared over the batch
        self.wte.backward(dx)

    def make_kv_caches(self, batch: int) -> List[KVCache]:
        return [block.attn.make_kv_cache(batch, self.cfg.block_size) for block in self.blocks]
