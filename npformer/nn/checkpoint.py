"""Gradient checkpointing: keep a block's input, drop its caches, rebuild them in backward.

Derivation and costs: ``proofs/checkpointing.md``. A ``Checkpointed(block)`` behaves as
the block itself (same parameters under the same names, same outputs, same gradients
bit for bit) but a training forward keeps only what a recomputation needs (CKPT.1):
the block's input and arguments, and the state of every random generator the block
draws from. Its backward puts those generators back, runs the block's forward again
to rebuild the caches (CKPT.2), puts the generators where they were, and calls the
block's own backward (CKPT.3). Dropout masks are therefore redrawn identically.

Memory: with every one of n blocks wrapped, a training step holds n block inputs
(B, T, D) plus one block's caches at a time, instead of n blocks' caches (CKPT.4);
the cost is one more forward of every block (CKPT.5). ``proofs/checkpointing.md``
explains the sqrt(n) segment schedule (CKPT.6) that balances the two.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, NamedTuple, Tuple

import math

import numpy as np

from ..ops._checks import check_count
from .module import Module, ModuleList, atomic


class CheckpointCache(NamedTuple):
    """One training forward of a ``Checkpointed`` block: what re-running it needs, nothing more."""

    args: Tuple[Any, ...]  # the block's positional inputs, x (B, T, D) first (CKPT.1)
    kwargs: Dict[str, Any]
    rng_states: List[dict]  # bit_generator.state of each generator the block draws from, before the forward


def _generators(*blocks: Module) -> List[np.random.Generator]:
    """Every distinct numpy Generator held by a module of ``blocks`` (their dropout layers'), once each."""
    seen: Dict[int, np.random.Generator] = {}
    for m in (m for block in blocks for _, m in block.named_modules()):
        for value in vars(m).values():
            if isinstance(value, np.random.Generator):
                seen.setdefault(id(value), value)
    return list(seen.values())


class Checkpointed(Module):
    """``block`` with its caches recomputed in backward instead of kept from forward.

    The wrapper is transparent to traversal: ``named_modules`` yields the block under the
    wrapper's own path, so parameter names, ``state_dict``, ``train()``/``eval()``,
    ``clear_caches`` and recording are those of the unwrapped model. In eval mode the
    forward is the block's forward, unchanged.
    """

    def __init__(self, block: Module):
        super().__init__()
        if not isinstance(block, Module) or isinstance(block, Checkpointed):
            got = "a Checkpointed (already wrapped)" if isinstance(block, Checkpointed) else type(block).__name__
            raise TypeError(f"Checkpointed: argument 'block' expected a Module with forward and backward, got {got}")
        object.__setattr__(self, "block", block)  # not in _modules: named_modules below puts it at our path
        object.__setattr__(self, "training", block.training)
        object.__setattr__(self, "segment", [self])  # the wrappers recomputed together (CKPT.6); alone by default

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, Module]]:
        yield prefix, self
        yield from self.block.named_modules(prefix)  # the block under our path, its children below it

    @atomic
    def forward(self, *args, **kwargs):
        """The block's forward; in training, its caches are dropped and only the inputs kept (CKPT.1).

        Inside a segment (``checkpoint_blocks(model, segment_size=k)``) only the segment's first
        block keeps its input x; the others keep their other arguments and generator states.
        """
        if not self.training:
            return self.block.forward(*args, **kwargs)
        gens = _generators(self.block)
        states = [g.bit_generator.state for g in gens]  # a fresh dict each read: a snapshot
        modules = [m for _, m in self.block.named_modules()]
        depth = [len(m._caches) for m in modules]
        y = self.block.forward(*args, **kwargs)
        for m, n in zip(modules, depth):  # discard what this forward kept: its caches are recomputed (CKPT.2)
            del m._caches[n:]
        kept = args if self.segment[0] is self else (None,) + tuple(args[1:])  # a segment boundary keeps x (CKPT.6)
        self.save_cache(CheckpointCache(args=kept, kwargs=dict(kwargs), rng_states=states))
        return y

    @atomic
    def backward(self, dout: np.ndarray) -> np.ndarray:
        """Re-run the forward with the generators as they were (CKPT.2), then the block's backward (CKPT.3).

        The segment's last block (the first to receive its gradient) re-runs the whole segment
        from its first block's input, rebuilding every block's caches (CKPT.6); the others then
        find their caches in place.
        """
        cache = self.pop_cache()
        if self.segment[-1] is not self:
            return self.block.backward(dout)  # (CKPT.3): the caches were rebuilt with the segment's last block
        modules = [m for w in self.segment for _, m in w.block.named_modules()]
        depth = [len(m._caches) for m in modules]
        try:
            self._recompute([w.peek_cache() for w in self.segment[:-1]] + [cache])
            return self.block.backward(dout)  # (CKPT.3)
        except BaseException:  # the segment's other blocks are outside this call's snapshot: drop what it rebuilt
            for m, n in zip(modules, depth):
                del m._caches[n:]
            raise

    def _recompute(self, caches: List[CheckpointCache]) -> None:
        """Run the segment's blocks forward again from the saved input, each with its saved generator states."""
        gens = _generators(*(w.block for w in self.segment))
        now = [g.bit_generator.state for g in gens]
        modules = [m for w in self.segment for _, m in w.block.named_modules()]
        recorders = [m._recorder for m in modules]
        try:
            for m in modules:  # the recomputation is not a new forward: record nothing
                object.__setattr__(m, "_recorder", None)
            x = caches[0].args[0]
            for w, c in zip(self.segment, caches):
                for g, s in zip(_generators(w.block), c.rng_states):
                    g.bit_generator.state = s  # the same dropout masks as the first forward
                x = w.block.forward(x, *c.args[1:], **c.kwargs)  # rebuilds every cache (CKPT.2)
        finally:
            for g, s in zip(gens, now):
                g.bit_generator.state = s  # later draws continue as if nothing had been recomputed
            for m, r in zip(modules, recorders):
                object.__setattr__(m, "_recorder", r)

    def __repr__(self) -> str:
        return "Checkpointed(" + repr(self.block).replace("\n", "\n  ") + ")"


def checkpoint_blocks(model: Module, segment_size=1) -> Module:
    """Wrap every block of ``model.blocks`` (a ModuleList) in ``Checkpointed``, in place; returns the model.

    ``segment_size`` k (an int >= 1, or ``"sqrt"`` for round(sqrt(n))): consecutive runs of k
    blocks form a segment that keeps only its first input and is recomputed as one in
    backward (CKPT.6). k = 1 keeps every block's input: memory (CKPT.4), one extra forward
    of every block (CKPT.5). Blocks already wrapped are regrouped.
    """
    op = "checkpoint_blocks"
    blocks = getattr(model, "blocks", None)
    if not isinstance(model, Module) or not isinstance(blocks, ModuleList):
        got = type(model).__name__ if not isinstance(model, Module) else f"{type(model).__name__} without a ModuleList 'blocks'"
        raise TypeError(f"{op}: argument 'model' expected a Module with a ModuleList 'blocks', got {got}")
    n = len(blocks)
    if isinstance(segment_size, str) and segment_size == "sqrt":
        segment_size = max(1, int(round(math.sqrt(n))))  # (CKPT.6)
    else:
        segment_size = check_count(op, "segment_size", segment_size, 1)
    pending = sum(m.pending_backwards for _, m in model.named_modules())
    if pending:
        raise RuntimeError(f"{op}: forwards wait for their backward ({pending} caches); "
                           "run the backwards or clear_caches() first")
    wrappers = []  # one kept input per segment, (CKPT.4); one recomputation per block, (CKPT.5)
    for i, block in enumerate(blocks):
        if not isinstance(block, Checkpointed):
            setattr(blocks, str(i), Checkpointed(block))
        wrappers.append(blocks[i])
    for start in range(0, n, segment_size):
        segment = wrappers[start:start + segment_size]
        for w in segment:
            object.__setattr__(w, "segment", segment)
    return model
