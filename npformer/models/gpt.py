"""GPT-2: token + learned position embeddings, pre-norm blocks, tied LM head.

Read top to bottom: ``forward`` runs the layers in order, ``backward`` walks them
in reverse, one line per layer, so one breakpoint in ``backward`` lets you follow the
gradient down the whole stack (as in llm.c's ``gpt2_backward``).

Shapes: ids (B, T) int, logits (B, T, V), hidden (B, T, D).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from ..nn.attention import KVCache, MultiHeadAttention
from ..nn.layers import Dropout, Embedding, LayerNorm
from ..nn.mlp import MLP
from ..nn.layers import check_dout, check_features
from ..nn.lm import IGNORE_INDEX, check_kv_length, check_lm_inputs, prefix_lm_bias  # noqa: F401  (IGNORE_INDEX too)
from ..nn.module import Module, ModuleList, atomic
from ..ops._checks import MAX_POSITION, check_bool, check_count, check_float, check_ndim, check_real
from ..ops.cross_entropy import CrossEntropyCache, cross_entropy_backward, cross_entropy_forward
from ..ops.fastpath import add
from ..ops.linear import LinearCache, linear_backward, linear_forward


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

    def __post_init__(self) -> None:
        """Every field checked when the config is made, so a bad one never builds a model."""
        op = "GPTConfig"
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            setattr(self, name, check_count(op, name, getattr(self, name), 1, MAX_POSITION))
        if self.d_model % self.n_head:
            raise ValueError(f"{op}: argument 'n_head' expected a divisor of d_model = {self.d_model}, "
                             f"got {self.n_head}")
        self.dropout = check_real(op, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.bias = check_bool(op, "bias", self.bias)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), matmuls only.

        Per layer 12 D^2 weight multiply-adds (q, k, v, o: 4 D^2; MLP: 8 D^2) and 2 T D for
        Q K^T and P V at full length T (the dense kernels compute the masked half too);
        the tied head adds V D.
        """
        c = self
        T = c.block_size if seq_len is None else check_count("GPTConfig.flops_per_token", "seq_len", seq_len, 1)
        macs = c.n_layer * (12 * c.d_model**2 + 2 * T * c.d_model) + c.vocab_size * c.d_model
        return 3 * 2 * macs


class BlockCache(NamedTuple):
    """One forward call of a ``Block``: the shape its dout must have (the sublayers keep the rest)."""

    out_shape: Tuple[int, ...]


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

    @atomic
    def forward(self, x: np.ndarray, kv_cache: Optional[KVCache] = None,
                mask_bias: Optional[np.ndarray] = None) -> np.ndarray:
        """x (B, T, D) -> (B, T, D); mask_bias (B, 1, T, S) replaces the causal mask (a prefix LM's, ATT.18)."""
        check_float("Block.forward", "x", x)
        check_ndim("Block.forward", "x", x, 3)
        check_features("Block.forward", "x", x, self.ln_1.weight.shape[0], self.ln_1.weight.data.dtype)
        a = self.attn.forward(self.ln_1.forward(x), causal=mask_bias is None, kv_cache=kv_cache, bias=mask_bias)
        x = add(x, self.drop_1.forward(a))  # residual sums on several cores (fastpath.add): x + ...
        m = self.mlp.forward(self.ln_2.forward(x))
        x = add(x, self.drop_2.forward(m))
        self.save_cache(BlockCache(out_shape=x.shape))  # the residual stream needs nothing else
        self.record("out", x)
        return x

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dout (B, T, D) -> dx (B, T, D): the forward's lines in reverse, one gradient per line."""
        check_dout(self, "Block.backward", "dout", dout, self.ln_1.weight.shape[0], self.ln_1.weight.data.dtype)
        self.pop_cache()
        dm = self.drop_2.backward(dout)  # into the MLP branch
        dh_2 = self.mlp.backward(dm)  # into ln_2's output
        dx_mid = add(dout, self.ln_2.backward(dh_2))  # residual: the identity path plus the MLP path
        da = self.drop_1.backward(dx_mid)  # into the attention branch
        dh_1 = self.attn.backward(da)  # into ln_1's output
        dx = add(dx_mid, self.ln_1.backward(dh_1))  # residual again
        self.record("dx", dx)
        return dx


class GPTCache(NamedTuple):
    """One training forward of ``GPT``: the tied head's and the loss's op caches."""

    head: LinearCache  # logits = h @ wte^T
    loss: Optional[CrossEntropyCache]  # None when the forward had no targets


class GPT(Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"GPT: argument 'cfg' expected a GPTConfig, got {type(cfg).__name__}")
        check_count("GPT", "seed", seed, 0)
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
    @atomic
    def forward(self, ids: np.ndarray, targets: Optional[np.ndarray] = None,
                kv_caches: Optional[List[KVCache]] = None, *,
                prefix_len: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[float]]:
        """ids (B, T) -> logits (B, T, V) and the mean cross entropy if targets (B, T) are given.

        ids are integers in [0, vocab_size), B >= 1 and 1 <= T <= block_size; targets
        are in [0, vocab_size) or -100 (ignored). With ``kv_caches`` (one per block,
        eval mode), ids continue the cached sequence: positions start at the cache
        length (incremental decoding). In training mode each forward keeps its caches
        for one ``backward()``. ``prefix_len`` (B,) makes it a prefix LM (ATT.18): row b's
        first prefix_len[b] positions attend to each other in both directions (set their
        targets to -100 but the last, which would otherwise be copied, not predicted).
        """
        cfg = self.cfg
        start = check_lm_inputs("GPT.forward", ids, targets, kv_caches, vocab_size=cfg.vocab_size,
                                block_size=cfg.block_size, n_layer=cfg.n_layer, n_kv_head=cfg.n_head,
                                head_dim=cfg.d_model // cfg.n_head, dtype=np.dtype(cfg.dtype),
                                training=self.training)  # the first position: the cache length
        B, T = ids.shape
        mask_bias = None if prefix_len is None else \
            prefix_lm_bias("GPT.forward", prefix_len, B, start, T, np.dtype(cfg.dtype))  # (B, 1, T, start + T)
        tok = self.wte.forward(ids)  # (B, T, D)
        pos = self.wpe.forward(np.arange(start, start + T))  # (T, D)
        x = self.drop.forward(tok + pos)
        for i, block in enumerate(self.blocks):
            x = block.forward(x, None if kv_caches is None else kv_caches[i], mask_bias)
        h = self.ln_f.forward(x)
        logits, head = linear_forward(h, self.wte.weight.data)  # tied LM head
        self.record("logits", logits)
        loss, loss_cache = (None, None) if targets is None else cross_entropy_forward(logits, targets)
        self.save_cache(GPTCache(head=head, loss=loss_cache))
        return logits, None if loss is None else float(loss)

    @atomic
    def backward(self) -> None:
        """Add every parameter's gradient of the latest unmatched forward's loss, walking the layers in reverse."""
        if self.peek_cache().loss is None:
            raise RuntimeError("GPT.backward: the matching forward had no targets, so there is no loss to differentiate")
        cache = self.pop_cache()
        dtype = cache.head.x.dtype
        dlogits = cross_entropy_backward(np.asarray(1.0, dtype), cache.loss)
        self.record("dlogits", dlogits)
        dh, dW_head, _ = linear_backward(dlogits, cache.head)
        self.wte.weight.grad += dW_head  # tied: the head's gradient joins the embedding's
        dx = self.ln_f.backward(dh)
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        dpos = dx.sum(axis=0)  # one position table row per t, shared over the batch
        self.wpe.backward(dpos)
        self.wte.backward(dx)

    def astype(self, dtype) -> "GPT":
        """Convert the parameters to float32 or float64; the config follows."""
        super().astype(dtype)
        self.cfg = replace(self.cfg, dtype=self.wte.weight.data.dtype.name)
        return self

    def make_kv_caches(self, batch: int, max_len: Optional[int] = None) -> List[KVCache]:
        """One KVCache per block for ``max_len`` positions (default and at most block_size)."""
        max_len = check_kv_length("GPT.make_kv_caches", max_len, self.cfg.block_size)
        return [block.attn.make_kv_cache(batch, max_len) for block in self.blocks]
